"""`kawhi serve`: run the HTTP service under uvicorn.

``add_serve_parser(subparsers)`` registers the subcommand on the ``kawhi`` CLI; every
setting (``kawhi.server.settings.Settings``) is a flag named after it
(``--batch-tokens``, ``--temperature``, ``--sguf-delta-s`` ...). Precedence: flag >
``KAWHI_*`` environment variable > default. ``python -m kawhi.server.main`` runs the
same command on its own.

Start-up mistakes are one line on stderr and a non-zero exit, never a traceback in a log
line: a taken HTTP or gRPC port (exit 2, checked before the model loads) and a model
that does not load (exit 1, once the load fails: a pod crash-loops with the reason).

SIGTERM drains: the first signal flips the server to *draining* (``/readyz`` 503,
new /v1 work 503 + Retry-After, the listener stays open so load balancers see
it), in-flight requests finish (at most ``drain_timeout_s``), then uvicorn shuts
down and the process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
import time
import typing
from pathlib import Path
from typing import Any

from pydantic import SecretStr

log = logging.getLogger("kawhi.server")

# Namespace prefix of the serve flags: they never mix with a parent parser's options
# (the `kawhi` CLI has its own --log-level), and only flags actually given are set.
_DEST = "serve__"

# flags that get a short help line of their own in `kawhi serve --help`
_GROUPS = {
    "model": "model",
    "device": "model",
    "dtype": "model",
    "heads_file": "model",
    "host": "network",
    "port": "network",
    "grpc_port": "network",
    "api_keys": "network",
    "root_path": "network",
}


def _flag_type(annotation: Any) -> tuple[Any, list[Any] | None, bool]:
    """(argparse type, choices, is_bool) for a settings annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal:
        choices = list(typing.get_args(annotation))
        return type(choices[0]), choices, False
    if annotation is bool:
        return bool, None, True
    if annotation in (int, float):
        return annotation, None, False
    return str, None, False


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `serve` on an argparse subparsers object; sets ``func`` to run the server."""
    from kawhi.server.settings import METHOD_FIELDS, Settings

    parser = subparsers.add_parser(
        "serve",
        help="run the HTTP service (FastAPI + uvicorn), and gRPC beside it with --grpc-port",
        description=(
            "Serve KAWHI over HTTP (and gRPC with --grpc-port). With no arguments: the embedded kawhi-tiny model (docs/tiny.md) on "
            "127.0.0.1:8000. "
            "Every flag also reads KAWHI_<NAME> from the environment (flag > env > default)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    groups = {
        "model": parser.add_argument_group("model"),
        "network": parser.add_argument_group("network and auth"),
        "server": parser.add_argument_group("limits, scheduling, caches, logging"),
        "method": parser.add_argument_group("method defaults (a request's options override them, docs/api.md)"),
    }
    for name, field in Settings.model_fields.items():
        group = groups["method" if name in METHOD_FIELDS else _GROUPS.get(name, "server")]
        flag = "--" + name.replace("_", "-")
        env = "KAWHI_" + name.upper()
        default = field.default
        if isinstance(default, SecretStr):
            default = "<redacted>"
        help_text = f"{field.description or ''} [env {env}" + ("]" if default is None else f"; default {default!r}]")
        tp, choices, is_bool = _flag_type(field.annotation)
        if is_bool:
            group.add_argument(flag, dest=_DEST + name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, dest=_DEST + name, type=tp, choices=choices, default=argparse.SUPPRESS,
                               help=help_text, metavar=None if choices else name.upper())
    parser.set_defaults(func=run_serve)
    return parser


def settings_from_args(args: argparse.Namespace) -> Any:
    """Settings with the flags the operator gave (argparse leaves the others unset) over env and defaults."""
    from kawhi.server.settings import Settings

    given = {name: getattr(args, _DEST + name) for name in Settings.model_fields if hasattr(args, _DEST + name)}
    return Settings(**given)


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


def _exit_zero(signum: int, frame: Any) -> None:  # the signal uvicorn re-raises after a clean drain
    raise SystemExit(0)


def make_server(settings: Any, app: Any) -> Any:
    """The uvicorn server `kawhi serve` runs ``app`` under: draining on SIGTERM, header timeout,
    and the gRPC listener beside it when ``settings.grpc_port`` is set."""
    import uvicorn

    if settings.grpc_port is not None:  # gRPC side by side, on the same loop and state (kawhi.grpc.server)
        from kawhi.grpc.server import attach

        attach(app)
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
    return DrainingServer(config, app.state.kawhi)


class StartupError(Exception):
    """A start-up mistake `kawhi serve` reports in one line (exit 2)."""


def _address(host: str, port: int) -> tuple[int, tuple]:
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return family, address


def bind_listener(host: str, port: int, what: str = "HTTP") -> socket.socket:
    """A socket bound to ``host:port`` as uvicorn binds it (SO_REUSEADDR), before any model loads:
    a taken port is one line at once, not an error among the model's load warnings."""
    family, address = _address(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = f" (--{what.lower()}-port or KAWHI_{what.upper()}_PORT picks another)" if what == "gRPC" else \
            " (--port or KAWHI_PORT picks another)"
        raise StartupError(f"cannot listen for {what} on {host}:{port}: {exc.strerror or exc}{hint}") from None
    sock.set_inheritable(True)
    return sock


def serve(settings: Any) -> int:
    """Run the server in this (main) thread until SIGTERM/SIGINT. Returns the exit status:
    0 after a drain, 1 when the model failed to load (the reason on stderr)."""
    from kawhi.server.app import create_app
    from kawhi.server.logs import configure_logging

    if settings.grpc_port and settings.grpc_port == settings.port:
        raise StartupError(f"--grpc-port {settings.grpc_port} is the HTTP port too; give gRPC a port of its own")
    listener = bind_listener(settings.host, settings.port)
    if settings.grpc_port:  # gRPC binds once the app starts; a taken port is refused now, in one line
        bind_listener(settings.host, settings.grpc_port, "gRPC").close()
    configure_logging(settings.log_level, settings.log_json)
    app = create_app(settings)
    server = make_server(settings, app)
    failed: list[str] = []

    def stop_on_load_failure(reason: str) -> None:
        failed.append(reason)
        server.should_exit = True

    app.state.kawhi.on_load_failure = stop_on_load_failure
    # uvicorn re-raises the captured signal once it has shut down; exit 0 then (a clean drain).
    signal.signal(signal.SIGTERM, _exit_zero)
    signal.signal(signal.SIGINT, _exit_zero)
    server.run(sockets=[listener])
    if failed:
        print(f"kawhi serve: cannot load the model {settings.model or '(the embedded kawhi-tiny model)'}: {failed[0]}",
              file=sys.stderr)
        return 1
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "--" + "-".join(str(p) for p in first.get("loc", ()) if isinstance(p, str)).replace("_", "-")
        print(f"kawhi serve: invalid setting {name}: {first.get('msg', 'invalid value')}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a method default outside its range (w_min > w_max ...)
        print(f"kawhi serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    from kawhi.heads.files import FOLDER_HEADS_FILE, HeadsFileError, check_model_folder_heads

    model_dir = str(Path(__file__).resolve().parents[1] / "models" / "tiny")
    if settings.model is not None:  # a user's mistake is one line now, not a failed load later
        from kawhi.models.locate import DeviceUnavailable, ModelNotFound, check_device, locate_model

        try:
            model_dir = str(locate_model(settings.model))
            check_device(settings.device)
        except (ModelNotFound, DeviceUnavailable) as exc:
            print(f"kawhi serve: {exc}", file=sys.stderr)
            return 2
    try:  # a heads file made for another model is refused here, before the server starts
        if settings.heads_file or (Path(model_dir) / FOLDER_HEADS_FILE).is_file():
            check_model_folder_heads(model_dir, settings.heads_file)
    except HeadsFileError as exc:
        print(f"kawhi serve: {exc}", file=sys.stderr)
        return 2
    try:
        return serve(settings)
    except StartupError as exc:
        print(f"kawhi serve: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kawhi")
    sub = parser.add_subparsers(dest="command")
    add_serve_parser(sub)
    args = parser.parse_args(["serve", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
