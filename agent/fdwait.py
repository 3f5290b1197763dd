"""Waiting on a file descriptor from the event loop: a pipe with data, a pidfd whose process exited."""

from __future__ import annotations

import asyncio


async def readable(fd: int, timeout_s: float, also: asyncio.Future[None] | None = None) -> bool:
    """Until ``fd`` can be read (True; or ``also`` is done), or ``timeout_s`` (False). A pidfd
    turns readable when its process exits."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = also if also is not None else loop.create_future()

    def on_ready() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, on_ready)
    try:
        await asyncio.wait_for(ready, timeout_s)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
