"""How many CPUs this process may really use (affinity mask and cgroup CPU quota), for thread counts.

os.cpu_count() is the host's count: a container limited to 2 CPUs on a 64-core host would run 64 ONNX
Runtime threads against a quota of 2 and spend most of each scheduling period throttled.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def available_cpus(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int:
    """The affinity mask's CPUs, capped by the tightest CPU quota on this process's cgroups."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(root, self_cgroup)
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """The tightest CPU quota, in CPUs, on this process's cgroup and its ancestors; None when unlimited.

    cgroup v2 keeps it in ``cpu.max`` ("max 100000" or "150000 100000"), v1 in the cpu controller's
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: none). A systemd ``CPUQuota=`` sits on the
    service's own cgroup, a container's limit on the root of its cgroup namespace.
    """
    quotas = [quota for folder in _cpu_cgroups(root, self_cgroup) if (quota := _quota(folder)) is not None]
    return min(quotas, default=None)


def _cpu_cgroups(root: Path, self_cgroup: Path) -> Iterator[Path]:
    """This process's cgroup folders that carry CPU limits, innermost first, up to each hierarchy's root."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    hierarchies: list[tuple[Path, str]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:  # v2: one unified tree mounted at the root
            hierarchies.append((root, path))
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own tree
            mount = next((root / name for name in ("cpu", controllers, "cpu,cpuacct") if (root / name).is_dir()), None)
            if mount is not None:
                hierarchies.append((mount, path))
    if not hierarchies:  # no /proc/self/cgroup: the roots only
        hierarchies = [(root, "/"), (root / "cpu", "/")]
    for mount, path in hierarchies:
        folder = mount / path.strip("/")
        while True:  # a container without its own cgroup namespace sees the host's path: missing folders are skipped
            yield folder
            if folder == mount:
                break
            folder = folder.parent


def _quota(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((folder / "cpu.cfs_quota_us").read_text())
        period_us = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None
