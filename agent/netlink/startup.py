"""`python -m agent.netlink.startup`: the network kind's start-up work, in a child process.

Probes the kernel's tc capabilities and sweeps the root namespace of
leftovers of ours, then prints one JSON object and exits. Run as a child so
that an idle agent never imports pyroute2 (about 11 MB of resident memory on
every node); see agent/faults/network_lazy.py.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    from agent.faults.network import NetworkFault
    from agent.netlink.probe import probe

    caps = probe()
    swept = NetworkFault._sweep_sync(None)
    json.dump(
        {
            "capabilities": [[c.name, c.available, c.note] for c in caps],
            "swept": swept,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
