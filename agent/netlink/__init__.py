"""Netlink helpers for network faults: namespaces, the tc tree we own, capability probing.

Everything here is synchronous pyroute2 and meant to run in a worker thread
(``asyncio.to_thread``); the fault injector owns the async boundary and its timeouts.
"""
