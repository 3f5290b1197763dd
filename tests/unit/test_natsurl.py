"""NATS URLs are checked at the edge: what nats-py accepts passes, the rest fails at once with the reason."""

from __future__ import annotations

import pytest

from proto.natsurl import DEFAULT_NATS_URL, NatsUrlError, configured, redacted, split_servers


@pytest.mark.parametrize(
    ("given", "servers"),
    [
        ("nats://10.0.0.5:4222", ["nats://10.0.0.5:4222"]),
        ("tls://nats.example:4443", ["tls://nats.example:4443"]),
        ("NATS://h:1", ["nats://h:1"]),  # nats-py matches the scheme case-sensitively
        ("127.0.0.1:4222", ["nats://127.0.0.1:4222"]),  # bare HOST:PORT, as nats-py takes it
        ("nats-0", ["nats://nats-0"]),  # bare HOST: nats-py adds port 4222
        ("[::1]:4222", ["nats://[::1]:4222"]),
        ("nats://u:p@h:4222", ["nats://u:p@h:4222"]),
        ("nats://a:4222, nats://b:4222", ["nats://a:4222", "nats://b:4222"]),  # as faultline-agent takes them
    ],
)
def test_accepted(given: str, servers: list[str]) -> None:
    assert split_servers(given) == servers


@pytest.mark.parametrize(
    ("given", "why"),
    [
        (
            "http://127.0.0.1:4222",
            "scheme http:// is not one NATS speaks; use nats://, tls://, ws://, wss:// or HOST:PORT",
        ),
        ("https://h", "scheme https:// is not one NATS speaks"),
        ("nats://127.0.0.1:abc", "port 'abc' is not a number from 1 to 65535"),
        ("nats://127.0.0.1:99999", "port '99999' is not a number from 1 to 65535"),
        ("nats://h:0", "port 0 is not a port a server listens on"),
        ("nats://:4222", "no host in nats://:4222"),
        ("", "no URL given"),
        ("nats://a:1,,nats://b:1", "an empty entry"),
        ("nats://none:4222", "no host in nats://none:4222"),
        ("h/path", "neither a URL with a scheme nor HOST[:PORT]"),
        ("foo bar", "'foo bar' has white space in it; several servers are comma-separated"),
        ("nats://a b:4222", "has white space in it"),
    ],
)
def test_refused_with_the_reason(given: str, why: str) -> None:
    with pytest.raises(ValueError, match="^") as exc:
        split_servers(given)
    assert why in str(exc.value)


def test_websocket_urls_need_aiohttp(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "aiohttp" else real(name, *a))
    with pytest.raises(ValueError, match="ws:// and wss:// need the aiohttp package"):
        split_servers("wss://nats.example")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "aiohttp" else real(name, *a))
    assert split_servers("ws://nats.example:8080") == ["ws://nats.example:8080"]
    with pytest.raises(ValueError, match="ws:// and wss:// URLs cannot be mixed"):
        split_servers("nats://a:1,ws://b:80")


def test_configured_names_where_the_url_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAULTLINE_NATS_URL", raising=False)
    assert configured(None) is None  # local mode for `run`
    with pytest.raises(NatsUrlError, match=r"^--nats http://x:1: not a NATS server URL: scheme http://"):
        configured("http://x:1")
    with pytest.raises(NatsUrlError, match=r"^--nats '': not a NATS server URL: no URL given"):
        configured("")
    monkeypatch.setenv("FAULTLINE_NATS_URL", "http://x:1")
    with pytest.raises(NatsUrlError, match=r"^FAULTLINE_NATS_URL=http://x:1: not a NATS server URL"):
        configured(None)
    target = configured(DEFAULT_NATS_URL)  # the flag wins over the environment
    assert target is not None and (target.source, target.servers) == ("--nats", [DEFAULT_NATS_URL])
    monkeypatch.setenv("FAULTLINE_NATS_URL", "")
    assert configured(None) is None  # empty counts as unset


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("nats://user:secret@h:4222", "nats://***@h:4222"),
        ("tls://token@h", "tls://***@h"),
        ("a:b@h:4222, nats://c:d@k", "***@h:4222, nats://***@k"),
        ("nats://h:4222", "nats://h:4222"),
        ("nats://u:p@ss@h:4222", "nats://***@h:4222"),  # nats-py splits at the last '@'
    ],
)
def test_credentials_never_appear_in_messages(given: str, shown: str) -> None:
    assert redacted(given) == shown
    with pytest.raises(NatsUrlError) as info:
        configured(given.replace("h:4222", "h:99999").replace("@h", "@h:0"))
    assert "secret" not in str(info.value) and ":d@" not in str(info.value) and "token@" not in str(info.value)
