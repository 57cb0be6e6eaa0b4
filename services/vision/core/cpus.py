"""How many CPUs this process may really use, for sizing thread pools.

CPU affinity alone is not enough: a container limited to 2 CPUs on a 64-core node still sees all 64
cores in its affinity mask, and the limit is enforced by the CFS quota of its cgroup instead. Sizing
intra-op threads and decode workers from the affinity count there means 64 busy threads sharing 2
CPUs of quota, heavy throttling and a collapsed p99. So the count is min(affinity, cgroup quota).

Everything here is read once at start-up and must never stop the server from starting: a file that
is missing, unreadable or malformed simply contributes no limit (logged at debug).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["available_cpus", "cgroup_cpu_limit", "describe_cpus"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def _affinity_cpus() -> int:
    """CPUs in this process's affinity mask (all CPUs where the platform has no affinity call)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:  # missing is normal: not every layout has every file
        log.debug("cpus: cannot read %s: %s", path, exc)
        return None


def _cgroup_lines(proc_self_cgroup: Path) -> list[tuple[str, str, str]]:
    """(hierarchy id, controllers, path) for each line of /proc/self/cgroup."""
    text = _read(proc_self_cgroup)
    if text is None:
        return []
    lines = []
    for line in text.splitlines():
        fields = line.split(":", 2)  # the path itself may contain ':'
        if len(fields) == 3:
            lines.append((fields[0], fields[1], fields[2]))
        elif line.strip():
            log.debug("cpus: ignoring malformed line in %s: %r", proc_self_cgroup, line)
    return lines


def _self_and_ancestors(base: Path, cgroup_path: str) -> list[Path]:
    """base/a/b, base/a, base: a parent's quota throttles its children too, so every level counts.

    Walking up to `base` also covers containers, where the process's own cgroup is mounted as the
    root and /proc/self/cgroup still names the host-side path (which then does not exist here).
    """
    parts = [p for p in cgroup_path.split("/") if p not in ("", ".")]
    if ".." in parts:
        # The cgroup lies outside our cgroup namespace; joining the path could name some other
        # cgroup under the root, so only the root (our own mount) is trusted.
        parts = []
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _v2_limit(cpu_max: Path) -> float | None:
    """cgroup v2 cpu.max: "max 100000" (no limit) or "200000 100000" (2 CPUs)."""
    text = _read(cpu_max)
    if text is None:
        return None
    fields = text.split()
    try:
        if len(fields) != 2:
            raise ValueError("expected '<quota|max> <period>'")
        if fields[0] == "max":
            return None
        quota, period = int(fields[0]), int(fields[1])
        if quota <= 0 or period <= 0:
            raise ValueError("quota and period must be positive")
    except ValueError as exc:
        log.debug("cpus: malformed %s %r: %s", cpu_max, text, exc)
        return None
    return quota / period


def _v1_limit(directory: Path) -> float | None:
    """cgroup v1 cpu.cfs_quota_us (-1 = no limit) over cpu.cfs_period_us."""
    quota_text = _read(directory / "cpu.cfs_quota_us")
    if quota_text is None:
        return None
    try:
        quota = int(quota_text)
    except ValueError as exc:
        log.debug("cpus: malformed %s: %s", directory / "cpu.cfs_quota_us", exc)
        return None
    if quota < 0:  # -1: unlimited
        return None
    period_text = _read(directory / "cpu.cfs_period_us")
    if period_text is None:
        return None
    try:
        period = int(period_text)
        if quota == 0 or period <= 0:
            raise ValueError("quota and period must be positive")
    except ValueError as exc:
        log.debug("cpus: malformed quota/period in %s: %s", directory, exc)
        return None
    return quota / period


def cgroup_cpu_limit(
    *, cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP
) -> float | None:
    """The tightest CFS CPU quota (in CPUs, may be fractional) over this process's cgroup and its
    ancestors, in cgroup v2 and/or v1; None when there is no limit or nothing could be read."""
    limits: list[float] = []
    for hierarchy, controllers, path in _cgroup_lines(proc_self_cgroup):
        if hierarchy == "0" and controllers == "":  # cgroup v2 (unified) line: "0::/path"
            for directory in _self_and_ancestors(cgroup_root, path):
                limit = _v2_limit(directory / "cpu.max")
                if limit is not None:
                    limits.append(limit)
        elif "cpu" in controllers.split(","):  # cgroup v1 line: "3:cpu,cpuacct:/path"
            # The mount point is usually "cpu,cpuacct" (with a "cpu" symlink), sometimes only "cpu".
            for mount in dict.fromkeys((controllers, "cpu,cpuacct", "cpu")):
                for directory in _self_and_ancestors(cgroup_root / mount, path):
                    limit = _v1_limit(directory)
                    if limit is not None:
                        limits.append(limit)
    return min(limits, default=None)


def _clamp(affinity: int, limit: float | None) -> int:
    cpus = affinity
    if limit is not None:
        # Round a fractional quota up (1.5 CPUs -> 2 threads): a pool cannot have half a thread, and
        # rounding down would leave half a CPU of quota idle, while the throttling cost of one thread
        # beyond the quota is small.
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def available_cpus(*, cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """Threads worth running in parallel: min(affinity CPUs, ceil(cgroup quota)), at least 1."""
    limit = cgroup_cpu_limit(cgroup_root=cgroup_root, proc_self_cgroup=proc_self_cgroup)
    return _clamp(_affinity_cpus(), limit)


def describe_cpus(*, cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> str:
    """One start-up log line's worth, e.g. "2 (cgroup quota 2.0 of 64 affinity CPUs)"."""
    affinity = _affinity_cpus()
    limit = cgroup_cpu_limit(cgroup_root=cgroup_root, proc_self_cgroup=proc_self_cgroup)
    cpus = _clamp(affinity, limit)
    if limit is None:
        return f"{cpus} (no cgroup quota; {affinity} affinity CPUs)"
    return f"{cpus} (cgroup quota {round(limit, 2)} of {affinity} affinity CPUs)"
