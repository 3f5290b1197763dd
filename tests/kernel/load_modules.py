"""Load kernel modules by name inside the UML guest, without kmod.

The host may have neither modprobe nor a /lib/modules mount point (and the
guest root is read-only, so none can be made). Read modules.dep from the UML
module tree and finit_module(2) each file, dependencies first.

Usage: python load_modules.py MODULE_DIR NAME...   (exit 1 if any failed)
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys

SYS_FINIT_MODULE = {"x86_64": 313, "aarch64": 273}.get(platform.machine(), 313)
_libc = ctypes.CDLL(None, use_errno=True)


def load(path: str) -> str | None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.syscall(SYS_FINIT_MODULE, fd, b"", 0) != 0:
            err = ctypes.get_errno()
            if err != errno.EEXIST:
                return os.strerror(err)
    finally:
        os.close(fd)
    return None


def main(argv: list[str]) -> int:
    moddir, names = argv[0], argv[1:]
    deps: dict[str, list[str]] = {}
    with open(os.path.join(moddir, "modules.dep")) as f:
        for line in f:
            target, _, rest = line.partition(":")
            deps[os.path.basename(target).split(".ko")[0].replace("-", "_")] = [target, *rest.split()]
    failed = 0
    for name in names:
        entry = deps.get(name.replace("-", "_"))
        if entry is None:
            print(f"load_modules: {name}: not in {moddir}/modules.dep (built in?)")
            continue
        target, *needs = entry
        for rel in [*reversed(needs), target]:
            why = load(os.path.join(moddir, rel))
            if why is not None:
                print(f"load_modules: {rel}: {why}")
                failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
