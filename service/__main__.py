"""``python -m service [--host H] [--port P]``: serve the model repository with uvicorn."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from service.app import create_app
from service.logs import uvicorn_log_config
from service.settings import Settings


def main(argv: list[str] | None = None) -> None:
    logging.captureWarnings(True)  # e.g. numpy's RuntimeWarnings: logged as JSON like the rest
    settings = Settings()
    parser = argparse.ArgumentParser(prog="python -m service", description="Serve the Ocellus model repository.")
    parser.add_argument("--host", default=settings.host, help="default: OCELLUS_HOST or 127.0.0.1")
    parser.add_argument("--port", type=int, default=settings.port, help="default: OCELLUS_PORT or 8000")
    args = parser.parse_args(argv)
    settings = settings.model_copy(update={"host": args.host, "port": args.port})
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=settings.log_level,
        access_log=False,
        log_config=uvicorn_log_config(settings.log_level),
        timeout_graceful_shutdown=settings.shutdown_grace_s,  # type: ignore[arg-type]  # a float: uvicorn hands it to asyncio.wait_for
    )


if __name__ == "__main__":
    main()
