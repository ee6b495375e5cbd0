"""A throwaway PostgreSQL cluster for tests: initdb + pg_ctl on a free port, removed afterwards."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import free_port

BIN_DIRS = [  # 15 first (what CI installed when this was written), then the newest
    Path("/usr/lib/postgresql/15/bin"),
    *sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: [int(part) for part in re.findall(r"\d+", p.parent.name)[:2]],  # 9.6 < 15 < 17beta1
        reverse=True,
    ),
]


def _bin(name: str) -> str:
    for directory in BIN_DIRS:
        if (directory / name).exists():
            return str(directory / name)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} was not found (install postgresql; .ci/run does)")
    return found


PREFIX = "ocellus-pg-"
# Clusters live in /tmp whatever TMPDIR says: the server's socket path must stay under 108 bytes and hold no space
# (pg_ctl splits its -o options), and the postgres user must be able to reach it (a TMPDIR under /root it cannot).
CLUSTERS_DIR = Path("/tmp")
OWNER_FILE = "owner.pid"  # the test process that started the cluster


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_orphans() -> int:
    """Stop and remove clusters whose test process is gone (killed before its cleanup ran); how many."""
    stopped = 0
    for root in CLUSTERS_DIR.glob(f"{PREFIX}*"):
        try:
            owner = int((root / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours to judge (or still being set up)
        if _alive(owner):
            continue
        _resume(root / "data" / "postmaster.pid")  # killed inside paused(): a stopped server ignores pg_ctl stop
        PostgresCluster(root).stop()
        stopped += 1
    return stopped


def _resume(pid_file: Path) -> None:
    """SIGCONT the server and its backends, in case a test stopped them."""
    try:
        postmaster = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
    for pid in (postmaster, *map(int, children)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGCONT)


class PostgresCluster:
    """``with PostgresCluster() as pg: pg.url`` — a fresh database ``ocellus`` owned by user ``ocellus``."""

    def __init__(self, root: Path | None = None) -> None:
        if root is None:
            stop_orphans()
            root = Path(tempfile.mkdtemp(prefix=PREFIX, dir=CLUSTERS_DIR))
            (root / OWNER_FILE).write_text(str(os.getpid()))
        self.root = root
        self.data = self.root / "data"
        self.port = free_port()
        # PostgreSQL refuses to run as root: run it as the postgres system user then.
        self.prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://ocellus@127.0.0.1:{self.port}/ocellus"

    def _run(self, *command: str) -> None:
        subprocess.run([*self.prefix, *command], check=True, capture_output=True, timeout=120)

    def start(self) -> PostgresCluster:
        if self.prefix:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(_bin("initdb"), "-D", str(self.data), "-U", "ocellus", "--auth=trust", "-E", "UTF8", "--no-instructions")
        self._start_server()
        self._run(_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "ocellus", "ocellus")
        return self

    def _start_server(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=100"
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "-t", "60", "start")

    def crash_and_restart(self) -> None:
        """Stop as a crash would (immediate: no checkpoint, recovery from the WAL at the next start), then start."""
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        self._start_server()

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # never started
            self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The server and its backends stopped (SIGSTOP) but their sockets open: a hung database, which
        accepts connections and answers nothing, unlike a stopped one."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
        pids = [postmaster, *map(int, children)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

    def __enter__(self) -> PostgresCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *_: object) -> None:
        self.stop()
