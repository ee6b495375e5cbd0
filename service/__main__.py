"""``python -m service [--host H] [--port P]``: serve the model repository with uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from service import program_name
from service.api.errors import ApiError
from service.app import create_app
from service.logs import uvicorn_log_config
from service.settings import Settings, settings_problems

log = logging.getLogger("uvicorn.error")  # where uvicorn says where it listens


def tcp_port(text: str) -> int:
    port = int(text)  # a ValueError: argparse's "invalid tcp_port value"
    if not 0 <= port <= 65535:  # uvicorn took 99999 as 34463 and announced 99999
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (0 to 65535)")
    return port


def bound_sockets(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to each address of ``host`` as asyncio's create_server binds them (an empty host: every
    interface): made before the models load, so that a busy port or an unknown host is refused at once, not after
    the load. They listen once the models are loaded (until then a connection is refused, not left waiting)."""
    found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(found):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:  # an address family this machine lacks (as asyncio skips it)
                continue
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # "::" and "0.0.0.0" both: each its own socket
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(f"no address of {host!r} can be used here")
    return sockets


def listening(sock: socket.socket) -> bool:
    """Whether ``sock`` listens: another process that bound the same port before either listened may have got it
    (uvloop then detaches the socket without a word)."""
    return sock.fileno() != -1 and bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


class Server(uvicorn.Server):
    """uvicorn's, on sockets bound beforehand; it says where it listens once the models are loaded, and SIGHUP
    reloads the model repository (as POST /v1/models/reload does) instead of ending the process."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app
        self.cannot_listen = False
        self.reload_wanted = False  # a SIGHUP not yet acted on
        self.reloading: asyncio.Task[None] | None = None
        # From now on a SIGHUP is noted (while the models load it ended the process), and acted on once they are loaded.
        signal.signal(signal.SIGHUP, lambda *_: setattr(self, "reload_wanted", True))

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.on_sighup)
        try:
            await super().startup(sockets)
        except OSError as error:  # asyncio's listen() on a port another process took meanwhile
            self.give_up_listening(str(error))
            self.started = True  # the lifespan did start: its shutdown closes the models
            return
        if not self.started:
            return
        if not all(map(listening, sockets or [])):
            self.give_up_listening("another process listens on that port now")
            return
        for sock in sockets or []:
            address, port = sock.getsockname()[:2]
            host = f"[{address}]" if sock.family == socket.AF_INET6 else address
            log.info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", host, port)
        if self.reload_wanted:
            self.on_sighup()

    def give_up_listening(self, why: str) -> None:
        settings = self.app.state.settings
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, why)
        self.cannot_listen = self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)  # no reload while the repository closes ...
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # ... and no end before it is closed (the removal restored SIG_DFL)
        if self.reloading is not None:
            self.reloading.cancel()
        await super().shutdown(sockets)

    def on_sighup(self) -> None:
        """Reload once the models are loaded; signals while a reload runs make one more, not one each."""
        self.reload_wanted = True
        if self.started and self.reloading is None:
            self.reloading = asyncio.get_running_loop().create_task(self.reload_while_wanted())

    async def reload_while_wanted(self) -> None:
        log = logging.getLogger("ocellus.models")
        try:
            while self.reload_wanted:
                self.reload_wanted = False
                try:
                    changes = await self.app.state.repository.reload()
                except ApiError as error:  # e.g. the models folder is gone: the server goes on with what it has
                    log.error("SIGHUP: the model repository was not reloaded: %s", error.detail)
                except Exception:
                    log.exception("SIGHUP: the model repository was not reloaded")
                else:
                    log.info("SIGHUP: the model repository was reloaded: %s", changes)
        finally:
            self.reloading = None


def main(argv: list[str] | None = None) -> None:
    logging.captureWarnings(True)  # e.g. numpy's RuntimeWarnings: logged as JSON like the rest
    parser = argparse.ArgumentParser(prog=program_name("service"), description="Serve the Ocellus model repository.")
    parser.add_argument("--host", help="default: OCELLUS_HOST or 127.0.0.1")
    parser.add_argument("--port", type=tcp_port, help="default: OCELLUS_PORT or 8000")
    args = parser.parse_args(argv)  # before the settings are read: --help works whatever the environment holds
    try:  # one line, not a traceback (a container's log, a restart loop)
        given = {name: value for name, value in (("host", args.host), ("port", args.port)) if value is not None}
        settings = Settings(**given)  # over OCELLUS_HOST and OCELLUS_PORT
        app = create_app(settings)
    except ValidationError as error:
        parser.exit(2, f"{parser.prog}: {settings_problems(error)}\n")
    except ValueError as error:  # check_environment's refusal to start open
        parser.exit(2, f"{parser.prog}: {error}\n")
    try:
        sockets = bound_sockets(settings.host, settings.port)
    except (OSError, UnicodeError) as error:  # a busy port, an address not of this machine, an unknown or malformed host
        why = getattr(error, "strerror", None) or error
        parser.exit(1, f"{parser.prog}: cannot listen on {settings.host}:{settings.port}: {why}\n")
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        log_config=uvicorn_log_config(settings.log_level),
        timeout_graceful_shutdown=settings.shutdown_grace_s,  # type: ignore[arg-type]  # a float: uvicorn hands it to asyncio.wait_for
    )
    server = Server(config, app)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C, raised again once the server has stopped (as uvicorn.run)
        server.run(sockets)
    if server.cannot_listen:
        sys.exit(1)
    if not server.started:  # as uvicorn.run: the start failed (its lifespan logged why)
        sys.exit(3)


if __name__ == "__main__":
    main()
