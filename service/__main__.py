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
from service.app import create_app
from service.logs import uvicorn_log_config
from service.settings import Settings, settings_problems


def tcp_port(text: str) -> int:
    port = int(text)  # a ValueError: argparse's "invalid tcp_port value"
    if not 0 <= port <= 65535:  # uvicorn took 99999 as 34463 and announced 99999
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (0 to 65535)")
    return port


def bound_sockets(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to each address of ``host`` as asyncio's create_server binds them (listening comes later):
    made before the models load, so that a busy port or an unknown host is refused at once, not after the load."""
    addresses = dict.fromkeys(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE))
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in addresses:
            sockets.append(sock := socket.socket(family, kind, proto))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # "::" and "0.0.0.0" both: each its own socket
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Server(uvicorn.Server):
    """uvicorn's, on sockets bound beforehand; it says where it listens once the models are loaded, and SIGHUP
    reloads the model repository (as POST /v1/models/reload does) instead of ending the process."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app
        self.reloads: set[asyncio.Task[None]] = set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        for sock in sockets or []:
            address, port = sock.getsockname()[:2]
            host = f"[{address}]" if sock.family == socket.AF_INET6 else address
            logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", host, port)
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload_models)

    def reload_models(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload())
        self.reloads.add(task)  # the loop keeps weak references only
        task.add_done_callback(self.reloads.discard)

    async def reload(self) -> None:
        log = logging.getLogger("ocellus.models")
        try:
            changes = await self.app.state.repository.reload()
        except Exception as error:  # a missing models folder (ApiError), an unexpected fault: the server goes on
            log.error("SIGHUP: the model repository was not reloaded: %s", getattr(error, "message", error))
        else:
            log.info("SIGHUP: the model repository was reloaded: %s", changes)


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
    except OSError as error:  # a busy port, an address not of this machine, a host name that does not resolve
        parser.exit(1, f"{parser.prog}: cannot listen on {settings.host}:{settings.port}: {error.strerror or error}\n")
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
    if not server.started:  # as uvicorn.run: the start failed (its lifespan logged why)
        sys.exit(3)


if __name__ == "__main__":
    main()
