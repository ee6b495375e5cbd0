"""Shared benchmark plumbing: a service subprocess, machine facts, result files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import onnxruntime as ort
from pydantic import ValidationError

from bench.loadgen import build_request, run_load
from service.manifest import MANIFEST_FILE, Manifest
from service.settings import Settings, settings_problems

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DATASETS = ROOT.parent / "shared" / "datasets"
Number = TypeVar("Number", int, float)


class ArgumentParser(argparse.ArgumentParser):
    """A benchmark's options: ``--help`` shows every option's default (argparse shows only documented ones')."""

    def __init__(self, doc: str | None) -> None:
        super().__init__(description=(doc or "").splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        kwargs.setdefault("help", "default: %(default)s")
        return super().add_argument(*args, **kwargs)


def positive(kind: Callable[[str], Number]) -> Callable[[str], Number]:
    """An argparse type: ``kind`` above 0 (a zero --seconds divided by zero, a zero concurrency sent nothing)."""

    def parse(text: str) -> Number:
        value = kind(text)  # a ValueError: argparse's "invalid value"
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} is not above 0")
        return value

    parse.__name__ = getattr(kind, "__name__", "number")
    return parse


def service_settings(**overrides: Any) -> Settings:
    """The settings the service would read (OCELLUS_*, which also shape the bare ONNX Runtime loops), or a one-line
    exit naming the bad ones."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise SystemExit(settings_problems(error)) from None


def served_model(name: str, task: str) -> tuple[Path, Manifest]:
    """``models/<name>`` and its manifest, or a one-line exit when it is not there or serves another task."""
    folder = ROOT / "models" / name
    if not (folder / MANIFEST_FILE).is_file():
        there = sorted(p.parent.name for p in (ROOT / "models").glob(f"*/{MANIFEST_FILE}"))
        raise SystemExit(f"--model {name!r}: no such model in models/ (there: {', '.join(there)})")
    manifest = Manifest.read(folder)
    if manifest.task.value != task:
        raise SystemExit(f"--model {name!r} is a {manifest.task.value} model: this benchmark needs a {task} one")
    return folder, manifest


def dataset_photos(paths: list[Path], where: Path) -> list[Path]:
    """``paths``, or a one-line exit naming the dataset folder they should have come from."""
    if not paths:
        raise SystemExit(f"no photos in {where}: the benchmarks read the datasets from ../shared/datasets")
    return paths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServiceProcess:
    """``python -m service`` in its own process (a load generator must not share its GIL; tests kill it)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        inherited = {k: v for k, v in os.environ.items() if k != "OCELLUS_API_KEY"}  # the enroll tool's, not a server's
        self.env = {**inherited, "OCELLUS_LOG_LEVEL": "warning", **(env or {})}
        # Without a data folder of its own, a scratch one: never the checkout's gallery, nor another run's.
        self.scratch = None if "OCELLUS_DATA_DIR" in self.env else Path(tempfile.mkdtemp(prefix="ocellus-data-"))
        if self.scratch is not None:
            self.env["OCELLUS_DATA_DIR"] = str(self.scratch)

    def start(self) -> ServiceProcess:
        self.process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(self.port)], env=self.env, cwd=ROOT)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and self.process.poll() is None:
            try:  # (its own server on 127.0.0.1: never through a proxy the environment names)
                if httpx.get(f"{self.url}/readyz", timeout=1, trust_env=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.process.kill()
        self.process.wait()
        self.stop()  # its scratch folder goes too
        raise RuntimeError("the service did not become ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def machine() -> dict[str, object]:
    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_1min": round(os.getloadavg()[0], 2),  # how busy the machine was as the run began
    }


def markdown_table(rows: list[dict[str, object]]) -> str:
    keys = list(dict.fromkeys(key for row in rows for key in row))  # every row's columns, "-" where one has none
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(k, "-")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) process ``pid`` has used so far: its main thread (the event loop), and all
    its other threads (ONNX Runtime, decoding) together. Linux /proc; threads that have ended are not counted."""
    tick = os.sysconf("SC_CLK_TCK")
    main = other = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # after the thread's name, which may hold spaces
        seconds = (int(fields[11]) + int(fields[12])) / tick
        if task.name == str(pid):
            main += seconds
        else:
            other += seconds
    return main, other


def results_name(task: str, model: str, default_model: str) -> str:
    """``task`` for the reference model, ``task-<model>`` for another (its run must not overwrite the quoted one)."""
    return task if model == default_model else f"{task}-{model}"


def write_results(name: str, result: dict[str, object], markdown: str) -> None:
    """``bench/results/<name>.{json,md}``, each with the command that made them, as it was typed."""
    main_module = sys.modules["__main__"].__spec__
    command = shlex.join(["python", "-m", main_module.name if main_module else sys.argv[0], *sys.argv[1:]])
    markdown += f"\nCommand: `{command}`\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({**result, "command": command}, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


def cpu_seconds_of(services: list[ServiceProcess]) -> tuple[float, float]:
    """``cpu_seconds`` summed over several service processes: their event loops, and their other threads."""
    each = [cpu_seconds(service.process.pid) for service in services]
    return sum(main for main, _ in each), sum(other for _, other in each)


def http_rows(
    setup: str,
    services: list[ServiceProcess],
    path: str,
    bodies: list[bytes],
    concurrencies: list[int],
    seconds: float,
    ceiling: float,
) -> list[dict[str, object]]:
    """One row per concurrency: ``path`` loaded with the JPEG ``bodies`` after a 2 s warm-up, with the CPU the
    service spent per request in its event loop (``loop_ms``) and in its other threads (``workers_ms``).
    Several services (processes) share the connections evenly and their CPU is added up."""
    ports = [s.port for s in services]
    requests = [build_request("127.0.0.1", ports[0], path, body, "image/jpeg") for body in bodies]
    run_load("127.0.0.1", ports, requests, 8, 2.0)
    rows: list[dict[str, object]] = []
    for concurrency in concurrencies:
        before = cpu_seconds_of(services)
        result = run_load("127.0.0.1", ports, requests, concurrency, seconds).check(path).row()
        loop_s, workers_s = (after - start for after, start in zip(cpu_seconds_of(services), before, strict=True))
        per_request = 1000 / max(1, int(result["requests"]))
        rows.append(
            {
                "setup": setup,
                "concurrency": concurrency,
                "rps": result["rps"],
                "p50_ms": result["p50_ms"],
                "p99_ms": result["p99_ms"],
                "errors": result["errors"],
                "of_ceiling": round(result["rps"] / ceiling, 3),
                "loop_ms": round(loop_s * per_request, 2),
                "workers_ms": round(workers_s * per_request, 2),
            }
        )
    return rows
