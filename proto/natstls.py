"""TLS for the NATS control link, for the CLI and the agent alike: the settings, the SSL
context built from them, and a client that never speaks plaintext when TLS is wanted.

The control link carries commands that kill and pause processes on every node,
so TLS, once asked for, is never silently dropped. TLS is wanted when any URL
is ``tls://`` or any TLS file is given. nats-py on its own quietly goes on in
plaintext (credentials in CONNECT included) when a ``tls://`` server does not
require TLS; ``Client`` here instead upgrades where the server offers TLS
(``allow_non_tls``) and refuses where it offers none, before anything is sent,
on the first connect and on every reconnect. This is what the Go client does
(``nats: secure connection not available``).

Settings, for both programs:
- ``--tls-ca FILE`` / ``FAULTLINE_NATS_TLS_CA``: PEM CA bundle that signed the
  server's certificate (default: the system's CAs).
- ``--tls-cert FILE`` and ``--tls-key FILE`` / ``FAULTLINE_NATS_TLS_CERT`` and
  ``FAULTLINE_NATS_TLS_KEY``: a client certificate, for servers that verify
  clients (``verify: true``, mutual TLS).
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.aio.client
import nats.errors

log = logging.getLogger("faultline.nats")

ENV_CA = "FAULTLINE_NATS_TLS_CA"
ENV_CERT = "FAULTLINE_NATS_TLS_CERT"
ENV_KEY = "FAULTLINE_NATS_TLS_KEY"


class TlsSettingsError(ValueError):
    """A TLS setting that cannot work; str() names the setting and why."""


@dataclass(frozen=True)
class TlsFiles:
    """Where the TLS material comes from; every path as given (checked by ``context()``)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    ca_from: str = "--tls-ca"
    cert_from: str = "--tls-cert"
    key_from: str = "--tls-key"

    def stamp(self) -> tuple[float, ...]:
        """Modification times of the files (-1 for one that cannot be read): changed = rotated."""
        out = []
        for p in (self.ca, self.cert, self.key):
            try:
                out.append(p.stat().st_mtime if p is not None else 0.0)
            except OSError:
                out.append(-1.0)
        return tuple(out)

    @property
    def given(self) -> bool:
        return any(p is not None for p in (self.ca, self.cert, self.key))

    def wanted(self, servers: list[str]) -> bool:
        """TLS is required: a tls:// (or wss://) URL, or any TLS file given."""
        return self.given or any(s.startswith(("tls://", "wss://")) for s in servers)

    def context(self, servers: list[str]) -> ssl.SSLContext | None:
        """The SSL context for these servers, None when TLS is not wanted. Raises
        TlsSettingsError naming the setting: a file that cannot be read or used, a
        certificate without its key, TLS files with a plaintext ws:// URL."""
        if not self.wanted(servers):
            return None
        if any(s.startswith("ws://") for s in servers):
            raise TlsSettingsError(
                "TLS settings were given, but ws:// is plaintext: use wss:// (or nats:// and tls:// URLs)"
            )
        if (self.cert is None) != (self.key is None):
            given, missing = (self.cert_from, self.key_from) if self.key is None else (self.key_from, self.cert_from)
            raise TlsSettingsError(f"{given} needs {missing} as well: a client certificate is used with its key")
        if self.ca is not None:
            _readable(self.ca, self.ca_from)
            try:
                # this CA only, not added to the system's: a publicly trusted certificate for the
                # server's name is not enough
                ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
            except (ssl.SSLError, OSError) as exc:
                raise TlsSettingsError(
                    f"{self.ca_from} {self.ca}: not a PEM CA certificate bundle ({_why(exc)})"
                ) from None
        else:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if self.cert is not None and self.key is not None:
            _readable(self.cert, self.cert_from)
            _readable(self.key, self.key_from)
            try:
                ctx.load_cert_chain(certfile=str(self.cert), keyfile=str(self.key))
            except (ssl.SSLError, OSError) as exc:
                raise TlsSettingsError(
                    f"{self.cert_from} {self.cert} with {self.key_from} {self.key}: "
                    f"not a PEM certificate and its matching private key ({_why(exc)})"
                ) from None
        return ctx


def _readable(path: Path, setting: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise TlsSettingsError(f"{setting} {path}: {exc.strerror or exc}") from None


def _why(exc: Exception) -> str:
    return getattr(exc, "reason", None) or str(exc) or type(exc).__name__


def from_env(environ: Mapping[str, str] | None = None, **flags: Path | None) -> TlsFiles:
    """The CLI's TLS files: a flag (ca=, cert=, key=) wins over its environment variable."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, var in (("ca", ENV_CA), ("cert", ENV_CERT), ("key", ENV_KEY)):
        flag = flags.get(name)
        if flag is not None:
            values[name] = flag
        elif env.get(var):
            values[name] = Path(env[var])
            values[f"{name}_from"] = var
    return TlsFiles(**values)


class TlsNotOffered(nats.errors.Error):
    """The server offers no TLS, and TLS is required: nothing was sent to it."""

    def __init__(self, server: str) -> None:
        super().__init__(
            f"the NATS server at {server} offers no TLS, and TLS is required (a tls:// URL or a TLS "
            "setting): refusing to send credentials and commands in plaintext; configure a tls {} "
            "block on the server, or use a nats:// URL without TLS settings"
        )
        self.server = server

    def __str__(self) -> str:
        return str(self.args[0])


class Client(nats.aio.client.Client):
    """nats-py's client, which never goes on in plaintext when ``require_tls`` is set.

    nats-py reads the server's INFO, then upgrades to TLS only when INFO says
    ``tls_required``, and sends CONNECT either way. Two hooks, on the first
    connect and on every reconnect (to a listed or a discovered server):
    - after INFO (``_process_info``): a server that offers TLS (``tls_available``)
      is upgraded as if it required it; one that offers none is refused. The
      TLS files are read again here when they changed on disk (a Secret rotated
      under a running agent), so a reconnect uses the current certificates.
    - just before CONNECT is written (``_connect_command``): fail closed; no
      CONNECT, and so no credential, goes out on a connection that is not TLS,
      whatever a future nats-py does between the two.
    Checked by tests/integration/test_nats_tls.py."""

    require_tls: bool = False
    tls_files: TlsFiles | None = None
    tls_servers: list[str] = []
    _tls_stamp: tuple[float, ...] = ()

    def _plaintext_allowed(self) -> bool:
        server = self._current_server
        return not self.require_tls or server is None or server.uri.scheme in ("ws", "wss")

    def _where(self) -> str:
        server = self._current_server
        return server.uri.netloc.rpartition("@")[2] if server is not None else "?"

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        if initial_connection and not self._plaintext_allowed():
            if not info.get("tls_required"):
                if not info.get("tls_available"):
                    raise TlsNotOffered(self._where())
                # nats-py keeps this same dict as _server_info and upgrades when it says so
                info["tls_required"] = True
            self._reload_tls()
        await super()._process_info(info, initial_connection)

    def _connect_command(self) -> bytes:
        if not self._plaintext_allowed():
            writer = getattr(self._transport, "_io_writer", None)
            if writer is None or writer.get_extra_info("ssl_object") is None:
                raise TlsNotOffered(self._where())
        return bytes(super()._connect_command())

    def _reload_tls(self) -> None:
        files = self.tls_files
        if files is None or not files.given:
            return
        stamp = files.stamp()
        if stamp == self._tls_stamp:
            return
        try:
            ctx = files.context(self.tls_servers)
        except TlsSettingsError as exc:  # mid-rotation, say: keep the context that worked
            log.warning("TLS files changed but cannot be used (%s); keeping the ones loaded before", exc)
            return
        self._tls_stamp = stamp
        if ctx is not None:
            self.options["tls"] = ctx
            log.info("TLS files read again: they changed on disk")


class _SslEofNoise(logging.Filter):
    """asyncio warns "returning true from eof_received() has no effect when using ssl" each time
    a TLS connection of nats-py's ends (its stream protocol returns True): noise on every
    `faultline` command over TLS, about nothing the user can change."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


_NOISE = _SslEofNoise()


def client(require_tls: bool, tls_files: TlsFiles | None = None, servers: list[str] | None = None) -> Client:
    """A client; ``tls_files`` (with the ``servers`` they are for) are read again when they change."""
    nc = Client()
    nc.require_tls = require_tls
    if tls_files is not None:
        nc.tls_files, nc.tls_servers = tls_files, list(servers or [])
        nc._tls_stamp = tls_files.stamp()
    if require_tls:
        logging.getLogger("asyncio").addFilter(_NOISE)  # a set: adding it again is a no-op
    return nc
