"""Target selection by names, labels and mode."""

from __future__ import annotations

import random

import pytest

from controller.experiment import Targets
from controller.targeting import TargetingError, select_nodes

FLEET = {
    "a1": {"zone": "a", "region": "r1"},
    "a2": {"zone": "a", "region": "r1"},
    "a3": {"zone": "a", "region": "r1"},
    "b1": {"zone": "b", "region": "r1"},
    "c1": {"zone": "c", "region": "r2"},
}


def t(**kw: object) -> Targets:
    return Targets.model_validate(kw)


def test_all_without_selectors_is_every_node() -> None:
    assert select_nodes(FLEET, t()) == sorted(FLEET)


def test_by_name_and_by_label_and_both() -> None:
    assert select_nodes(FLEET, t(nodes=["b1", "a1"])) == ["a1", "b1"]
    assert select_nodes(FLEET, t(labels={"zone": "a"})) == ["a1", "a2", "a3"]
    assert select_nodes(FLEET, t(labels={"region": "r1", "zone": "b"})) == ["b1"]
    assert select_nodes(FLEET, t(nodes=["a1", "b1"], labels={"zone": "a"})) == ["a1"]


def test_one_picks_a_single_matching_node() -> None:
    for seed in range(20):
        chosen = select_nodes(FLEET, t(labels={"zone": "a"}, mode="one"), random.Random(seed))
        assert len(chosen) == 1 and chosen[0].startswith("a")


def test_rng_makes_it_deterministic() -> None:
    a = select_nodes(FLEET, t(mode="fixed", value=2), random.Random(7))
    b = select_nodes(FLEET, t(mode="fixed", value=2), random.Random(7))
    assert a == b and len(a) == 2


def test_fixed_more_than_available() -> None:
    with pytest.raises(TargetingError, match="asks for 4 node"):
        select_nodes(FLEET, t(labels={"zone": "a"}, mode="fixed", value=4))


@pytest.mark.parametrize(("pct", "count"), [(1, 1), (33, 1), (34, 2), (66, 2), (67, 3), (100, 3)])
def test_fixed_percent_rounds_up(pct: float, count: int) -> None:
    chosen = select_nodes(FLEET, t(labels={"zone": "a"}, mode="fixed-percent", value=pct), random.Random(1))
    assert len(chosen) == count


def test_random_max_percent_stays_within_1_and_ceiling() -> None:
    seen = set()
    for seed in range(200):
        n = len(select_nodes(FLEET, t(mode="random-max-percent", value=50), random.Random(seed)))
        seen.add(n)
    assert seen == {1, 2, 3}  # ceil(50% of 5) = 3


def test_no_matching_agents() -> None:
    with pytest.raises(TargetingError, match="no matching agents"):
        select_nodes(FLEET, t(labels={"zone": "z"}))
    with pytest.raises(TargetingError, match="no matching agents"):
        select_nodes({}, t())


def test_named_node_not_in_fleet() -> None:
    with pytest.raises(TargetingError, match="node ghost is not in the fleet"):
        select_nodes(FLEET, t(nodes=["a1", "ghost"]))


def test_mode_value_missing_is_caught_even_without_model_validation() -> None:
    targets = Targets.model_construct(nodes=None, labels=None, mode="fixed", value=None, pods=None)
    with pytest.raises(TargetingError, match="needs a value"):
        select_nodes(FLEET, targets)


def test_a_node_named_as_given_to_its_agent_is_found_under_the_name_it_heartbeats_as() -> None:
    """A new user's review: `faultline-agent --node w1.example.com` heartbeats as w1_example_com
    (one NATS subject token), and `targets.nodes: [w1.example.com]` was "not in the fleet".
    Kubernetes node names are usually dotted."""
    fleet = {"w1_example_com": {}, "w2_example_com": {}}
    assert select_nodes(fleet, t(nodes=["w1.example.com"])) == ["w1_example_com"]
    assert select_nodes(fleet, t(nodes=["w1_example_com", "w1.example.com"])) == ["w1_example_com"]
    with pytest.raises(TargetingError) as missing:
        select_nodes(fleet, t(nodes=["w3.example.com"]))
    assert "node w3.example.com (as agents name it: w3_example_com) is not in the fleet" in str(missing.value)
