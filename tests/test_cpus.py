"""available_cpus: min(affinity, ceil(cgroup quota)), read from a fake cgroup tree; never crashes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vision.core import cpus
from vision.core.cpus import available_cpus, cgroup_cpu_limit, describe_cpus

AFFINITY = 64  # a big node, so every quota below is the binding limit unless a test says otherwise


@pytest.fixture(autouse=True)
def big_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "_affinity_cpus", lambda: AFFINITY)


class FakeCgroup:
    """A fake /sys/fs/cgroup under tmp_path plus a fake /proc/self/cgroup naming the process's cgroup."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "cgroup"
        self.root.mkdir()
        self.proc = tmp_path / "proc_self_cgroup"

    def membership(self, text: str) -> None:
        self.proc.write_text(text)

    def write(self, relative: str, text: str) -> None:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def cpus(self) -> int:
        return available_cpus(cgroup_root=self.root, proc_self_cgroup=self.proc)

    def limit(self) -> float | None:
        return cgroup_cpu_limit(cgroup_root=self.root, proc_self_cgroup=self.proc)

    def describe(self) -> str:
        return describe_cpus(cgroup_root=self.root, proc_self_cgroup=self.proc)


@pytest.fixture
def cg(tmp_path: Path) -> FakeCgroup:
    return FakeCgroup(tmp_path)


# --- cgroup v2 ---------------------------------------------------------------------------------


def test_v2_limited(cg: FakeCgroup) -> None:
    cg.membership("0::/kubepods/pod1/ctr\n")
    cg.write("kubepods/pod1/ctr/cpu.max", "200000 100000\n")
    assert cg.cpus() == 2
    assert cg.describe() == "2 (cgroup quota 2.0 of 64 affinity CPUs)"


def test_v2_max_is_unlimited(cg: FakeCgroup) -> None:
    cg.membership("0::/kubepods/pod1/ctr\n")
    cg.write("kubepods/pod1/ctr/cpu.max", "max 100000\n")
    assert cg.limit() is None
    assert cg.cpus() == AFFINITY
    assert cg.describe() == "64 (no cgroup quota; 64 affinity CPUs)"


def test_v2_parent_limit_smaller_than_child(cg: FakeCgroup) -> None:
    # A pod-level limit of 3 CPUs throttles its container even though the container allows 8.
    cg.membership("0::/kubepods/pod1/ctr\n")
    cg.write("kubepods/pod1/ctr/cpu.max", "800000 100000\n")
    cg.write("kubepods/pod1/cpu.max", "300000 100000\n")
    cg.write("kubepods/cpu.max", "max 100000\n")
    assert cg.cpus() == 3


def test_v2_own_cgroup_mounted_as_root(cg: FakeCgroup) -> None:
    # Inside a container the host-side path does not exist; the limit sits at the mount root.
    cg.membership("0::/docker/abc123\n")
    cg.write("cpu.max", "400000 100000\n")
    assert cg.cpus() == 4


# --- cgroup v1 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mount", ["cpu,cpuacct", "cpu"])
def test_v1_limited(cg: FakeCgroup, mount: str) -> None:
    cg.membership("5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n")
    cg.write(f"{mount}/docker/abc/cpu.cfs_quota_us", "200000\n")
    cg.write(f"{mount}/docker/abc/cpu.cfs_period_us", "100000\n")
    assert cg.cpus() == 2


def test_v1_own_cgroup_mounted_as_root(cg: FakeCgroup) -> None:
    cg.membership("3:cpu,cpuacct:/docker/abc\n")
    cg.write("cpu,cpuacct/cpu.cfs_quota_us", "50000\n")
    cg.write("cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert cg.limit() == 0.5
    assert cg.cpus() == 1  # never below one thread


def test_v1_minus_one_is_unlimited(cg: FakeCgroup) -> None:
    cg.membership("3:cpu,cpuacct:/docker/abc\n")
    cg.write("cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n")
    cg.write("cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    assert cg.limit() is None
    assert cg.cpus() == AFFINITY


# --- rounding and clamping ---------------------------------------------------------------------


def test_fractional_quota_rounds_up(cg: FakeCgroup) -> None:
    cg.membership("0::/ctr\n")
    cg.write("ctr/cpu.max", "150000 100000\n")
    assert cg.limit() == 1.5
    assert cg.cpus() == 2
    assert cg.describe() == "2 (cgroup quota 1.5 of 64 affinity CPUs)"


def test_quota_larger_than_affinity_gives_affinity(cg: FakeCgroup, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "_affinity_cpus", lambda: 4)
    cg.membership("0::/ctr\n")
    cg.write("ctr/cpu.max", "1600000 100000\n")
    assert cg.cpus() == 4


# --- broken or absent files: no limit, no crash ------------------------------------------------


@pytest.mark.parametrize(
    "cpu_max",
    ["", "garbage", "200000", "abc 100000", "200000 0", "-5 100000", "200000 100000 7"],
)
def test_malformed_v2_file_gives_affinity(cg: FakeCgroup, cpu_max: str) -> None:
    cg.membership("0::/ctr\n")
    cg.write("ctr/cpu.max", cpu_max)
    assert cg.cpus() == AFFINITY


def test_non_utf8_file_gives_affinity(cg: FakeCgroup) -> None:
    cg.membership("0::/ctr\n")
    (cg.root / "ctr").mkdir()
    (cg.root / "ctr" / "cpu.max").write_bytes(b"\xff\xfe 100000")
    assert cg.cpus() == AFFINITY


@pytest.mark.parametrize(
    ("quota", "period"), [("lots", "100000"), ("200000", "zero"), ("200000", "0"), ("0", "100000")]
)
def test_malformed_v1_files_give_affinity(cg: FakeCgroup, quota: str, period: str) -> None:
    cg.membership("3:cpu,cpuacct:/ctr\n")
    cg.write("cpu,cpuacct/ctr/cpu.cfs_quota_us", quota)
    cg.write("cpu,cpuacct/ctr/cpu.cfs_period_us", period)
    assert cg.cpus() == AFFINITY


def test_malformed_proc_self_cgroup_gives_affinity(cg: FakeCgroup) -> None:
    cg.membership("this is not a cgroup file\n\n")
    cg.write("cpu.max", "200000 100000\n")
    assert cg.cpus() == AFFINITY


def test_one_malformed_level_does_not_hide_a_good_one(cg: FakeCgroup) -> None:
    cg.membership("0::/pod/ctr\n")
    cg.write("pod/ctr/cpu.max", "nonsense")
    cg.write("pod/cpu.max", "300000 100000\n")
    assert cg.cpus() == 3


def test_missing_files_give_affinity(cg: FakeCgroup) -> None:
    # No /proc/self/cgroup at all (e.g. not Linux) ...
    assert cg.cpus() == AFFINITY
    # ... and a membership file naming cgroups whose files do not exist.
    cg.membership("3:cpu,cpuacct:/ctr\n0::/ctr\n")
    assert cg.cpus() == AFFINITY
    # A v1 quota without its period is no limit either.
    cg.write("cpu,cpuacct/ctr/cpu.cfs_quota_us", "200000\n")
    assert cg.cpus() == AFFINITY


def test_path_escaping_the_namespace_only_trusts_the_root(cg: FakeCgroup) -> None:
    # "/../other" is outside our cgroup namespace: "<root>/other" would be some other cgroup.
    cg.membership("0::/../other\n")
    cg.write("other/cpu.max", "100000 100000\n")
    cg.write("cpu.max", "500000 100000\n")
    assert cg.cpus() == 5


# --- this machine ------------------------------------------------------------------------------


def test_real_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # drop the autouse fake 64-core node: this one uses the real affinity
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = available_cpus()
    assert 1 <= n <= (affinity or 1)
    assert describe_cpus().startswith(f"{n} (")
