"""uvicorn's h11 protocol with a deadline for a request's headers (``request_timeout_s``).

uvicorn times out idle keep-alive connections, but not a connection that never finishes its first
request's headers; with a connection limit (``max_connections``), a few such sockets would shut
everyone else out. This protocol closes a connection whose first request has not arrived within
``request_timeout_s``; the body's own deadline is the app's (``app._read_body``).
Passed to uvicorn as ``http="grpo_lib.server.protocol:GuardedH11Protocol"``.
"""
from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol

from .request import ServerConfig

_TIMEOUT_S: float | None = None


def _timeout_s() -> float:
    global _TIMEOUT_S
    if _TIMEOUT_S is None:                    # the worker's config, from the environment, read once
        _TIMEOUT_S = ServerConfig.from_env().request_timeout_s
    return _TIMEOUT_S


class GuardedH11Protocol(H11Protocol):
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._headers_deadline = self.loop.call_later(_timeout_s(), self._headers_timed_out)

    def _headers_timed_out(self) -> None:
        if self.cycle is None and not self.transport.is_closing():   # no request has arrived yet
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self._headers_deadline.cancel()
        super().connection_lost(exc)
