"""``python -m service [--host H] [--port P]``: serve the model repository with uvicorn."""

from __future__ import annotations

import argparse
import logging

import uvicorn
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
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        log_config=uvicorn_log_config(settings.log_level),
        timeout_graceful_shutdown=settings.shutdown_grace_s,  # type: ignore[arg-type]  # a float: uvicorn hands it to asyncio.wait_for
    )


if __name__ == "__main__":
    main()
