"""The uvicorn server under the HTTP app: drain on SIGTERM, a header timeout for slow clients.

The first SIGTERM/SIGINT drains the service (see kawhi.serve); a second stops at once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("kawhi.server")


class DrainingServer:
    """uvicorn.Server whose first SIGTERM/SIGINT drains before stopping (see module doc)."""

    def __new__(cls, config: Any, state: Any) -> Any:  # build a subclass lazily: uvicorn imported on demand
        import uvicorn

        class _Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                if state.draining or self.should_exit:  # second signal: stop now
                    self._captured_signals.append(sig)
                    self.force_exit = True
                    self.should_exit = True
                    return
                self._captured_signals.append(sig)
                state.begin_drain()
                threading.Thread(target=self._drain, name="kawhi-drain", daemon=True).start()

            def _drain(self) -> None:
                # One deadline for the whole shutdown (drain_timeout_s): in-flight requests
                # finish, or answer 503 + Retry-After shortly before it; what uvicorn and the
                # lifespan wait for afterwards is bounded by what is left of it.
                answer_by = state.drain_left() - min(1.0, 0.2 * state.settings.drain_timeout_s)
                until = time.monotonic() + max(0.0, answer_by)
                while time.monotonic() < until and not state.idle():
                    time.sleep(0.02)
                if not state.idle():
                    log.warning("drain deadline: answering 503 to work in flight", extra={"in_flight": state.active})
                    state.expire_drain()
                    while state.drain_left() > 0 and state.active:
                        time.sleep(0.02)
                else:
                    log.info("drained")
                self.config.timeout_graceful_shutdown = max(0.0, state.drain_left())
                self.should_exit = True

        return _Server(config)


def header_timeout_protocol(timeout_s: float) -> Any:
    """uvicorn's h11 protocol, closing a connection whose first request headers take longer
    than ``timeout_s`` (a slow-loris client); later requests are bounded by keep-alive."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._kawhi_header_timer = self.loop.call_later(timeout_s, self._kawhi_header_timeout)

        def _kawhi_header_timeout(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                log.info("closing a connection whose request headers did not arrive in time",
                         extra={"timeout_s": timeout_s})
                self.transport.close()

        def connection_lost(self, exc: Any) -> None:
            self._kawhi_header_timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def uvicorn_server(settings: Any, app: Any, service: Any) -> Any:
    """The uvicorn server that runs ``app`` for ``service``: draining on SIGTERM, header timeout."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        # replaced by what is left of the drain deadline when the drain ends (DrainingServer)
        timeout_graceful_shutdown=settings.drain_timeout_s,
        http=header_timeout_protocol(settings.header_timeout_s),
        server_header=False,
        proxy_headers=False,
    )
    return DrainingServer(config, service)
