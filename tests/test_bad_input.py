"""Bad input through the real command line: ``.venv/bin/migstall run ...``.

Every case must exit 2 with exactly one line on stderr (the problem and the
fix), no traceback, and nothing started: no QEMU (the runtime-dir base stays
empty, the autouse fixture sees no process) and no results file.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from harness.hosts import facts
from harness.hosts.local import LocalHost

REPO = Path(__file__).resolve().parent.parent
MIGSTALL = REPO / ".venv" / "bin" / "migstall"
HAS_VIRT = facts.read_cpu(LocalHost()).has_vmx or facts.read_cpu(LocalHost()).has_svm


@pytest.fixture
def sandbox(tmp_path):
    rt = tmp_path / "runtime"
    rt.mkdir(mode=0o700)
    return tmp_path, rt


def run_cli(sandbox, *args: str):
    tmp, rt = sandbox
    out = tmp / "results" / "bad.csv"
    argv = [str(MIGSTALL), "run", *args]
    if "--out" not in args:
        argv += ["--out", str(out)]
    env = {**os.environ, "CI": "true", "XDG_RUNTIME_DIR": str(rt)}
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=tmp)
    return r, out, rt


def write(tmp: Path, name: str, text: str) -> str:
    p = tmp / name
    p.write_text(text)
    return str(p)


CASES = [
    ("mem-zero", ["--mem", "0"], "below the 128 MiB minimum"),
    ("mem-bad-suffix", ["--mem", "12X"], "--mem '12X' is not a size"),
    ("mem-too-small", ["--mem", "64M"], "below the 128 MiB minimum"),
    ("vcpus-zero", ["--vcpus", "0"], "--vcpus 0"),
    ("backing-unknown", ["--backing", "bogus"], "--backing 'bogus' is unknown"),
    ("hugetlb1g-no-pages", ["--backing", "hugetlb1g", "--mem", "1G"], "hugepages"),
    ("mem-bigger-than-host", ["--mem", "100000G"], "more than the host's"),
    ("qemu-missing", ["--qemu", "/nonexistent/qemu-system-x86_64"], "does not exist or is not executable"),
    ("guest-kernel-missing", ["--guest-kernel", "/nonexistent/bzImage"], "--guest-kernel"),
    ("touch-bigger-than-mem", ["--mem", "512M", "--touch", "600"], "does not fit a 512 MiB guest"),
    ("loop-unknown", ["--loops", "pio,spin"], "unknown loop 'spin'"),
    ("end-unknown", ["--end", "stop"], "--end 'stop' is unknown"),
    ("ring-without-size", ["--accel", "kvm", "--dirty-log-mode", "ring"], None),
    ("ring-under-tcg", ["--accel", "tcg", "--dirty-log-mode", "ring", "--dirty-ring", "4096"], "ring needs KVM"),
    ("legacy-under-tcg", ["--accel", "tcg", "--dirty-log-mode", "legacy"], "legacy needs KVM"),
    ("ring-size-invalid", ["--accel", "tcg", "--dirty-log-mode", "ring", "--dirty-ring", "1000"], None),
    ("scenario-missing", ["--scenario", "/nonexistent/s.toml"], "does not exist"),
    ("out-is-dir", ["--out", "/tmp"], "--out /tmp is a directory"),
    ("out-uncreatable", ["--out", "/proc/migstall-nope/r.csv"], "--out /proc/migstall-nope/r.csv"),
]


@pytest.mark.parametrize("name,args,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_flags(sandbox, name, args, needle):
    r, out, rt = run_cli(sandbox, *args)
    check(r, out, rt, needle)


def check(r, out, rt, needle):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("migstall: ")
    if needle:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not any(p.name.startswith("migstall-") for p in rt.iterdir()), list(rt.iterdir())


@pytest.mark.skipif(HAS_VIRT, reason="this host has vmx/svm")
def test_accel_kvm_without_usable_kvm(sandbox):
    r, out, rt = run_cli(sandbox, "--accel", "kvm")
    check(r, out, rt, "KVM unusable: CPU has neither vmx nor svm")


def test_malformed_toml(sandbox):
    path = write(sandbox[0], "bad.toml", "[[scenario]\nmem = 512\n")
    r, out, rt = run_cli(sandbox, "--scenario", path)
    check(r, out, rt, "is not valid TOML")
    assert path in r.stderr


def test_unknown_toml_key(sandbox):
    path = write(sandbox[0], "unknown.toml", '[[scenario]]\nname = "x"\nmemory = "1G"\n')
    r, out, rt = run_cli(sandbox, "--scenario", path)
    check(r, out, rt, "unknown key 'memory'")
    assert "did you mean 'mem'" in r.stderr and path in r.stderr


def test_wrong_type_in_toml(sandbox):
    path = write(sandbox[0], "types.toml", '[[scenario]]\nvcpus = "two"\n')
    r, out, rt = run_cli(sandbox, "--scenario", path)
    check(r, out, rt, "vcpus 'two' is not an integer")


def test_bad_entry_late_in_matrix_starts_nothing(sandbox):
    path = write(sandbox[0], "late.toml",
                 '[[scenario]]\nname = "fine"\nmem = ["512M", "1G"]\n'
                 '[[scenario]]\nname = "broken"\nbacking = "hugetlb2m"\nmem = "1G"\n')
    r, out, rt = run_cli(sandbox, "--scenario", path)
    check(r, out, rt, "#2 (broken)")


def test_virtual_host_dir_that_is_no_kvm_modules_build(sandbox):
    """``--host virtual:DIR`` takes the output directory of ``migstall kernel
    build --target kvm-modules``; any other directory is refused up front."""
    empty = sandbox[0] / "not-a-build"
    empty.mkdir()
    r, out, rt = run_cli(sandbox, "--host", f"virtual:{empty}", "--accel", "kvm")
    check(r, out, rt, "is not a kvm-modules build")


def test_l1_cmdline_needs_the_virtual_host(sandbox):
    path = write(sandbox[0], "l1.toml",
                 '[[scenario]]\nname = "legacy-mmu"\naccel = "tcg"\nl1_cmdline = "kvm.tdp_mmu=0"\n')
    r, out, rt = run_cli(sandbox, "--scenario", path, "--host", "local")
    check(r, out, rt, "--host virtual")
