"""KvmTracer's tracefs scripts against a fake tracefs tree (a temporary
directory; this never touches the machine's real tracefs).

The fake is a plain directory, so the kernel's side is emulated where the
scripts need it: ``kprobe_events`` is an append-only file whose ``-:G/E`` lines
are applied by :func:`replay` after each script; ``mkdir``/``rmdir`` on PATH are
shims that populate a new instance from ``.instance`` (as tracefs does) and
remove a non-empty instance (as tracefs does)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator, Set

import pytest

from harness.errors import HostError
from harness.hosts.local import LocalHost
from harness.measure import kvm_trace
from harness.measure.kvm_trace import STALE_GROUP_S, KvmTracer, group_name

_MKDIR = """#!/bin/sh
"$REAL_MKDIR" "$@" || exit
for d in "$@"; do
  T=${d%/instances/*}; G=${d##*/}
  cp -R "$T/.instance/." "$d/"
  if grep -q "^[pr][0-9]*:$G/" "$T/kprobe_events"; then
    "$REAL_MKDIR" -p "$d/events/$G"; echo 0 > "$d/events/$G/enable"
  fi
done
"""
_RMDIR = """#!/bin/sh
for d in "$@"; do
  # an instance in use (e.g. trace_pipe open) is EBUSY
  if [ -e "$d/.busy" ]; then echo "rmdir: failed to remove '$d': Device or resource busy" >&2; exit 1; fi
done
exec rm -r -- "$@"
"""


def replay(tracefs: Path) -> Set[str]:
    """Apply the ``-:`` lines of the fake ``kprobe_events``; rewrite it as the
    kernel would show it; return the live events (``group/event``)."""
    path = tracefs / "kprobe_events"
    live = {}
    for line in path.read_text().splitlines():
        if line.startswith("-:"):
            live.pop(line[2:].strip(), None)
        elif re.match(r"^[pr][0-9]*:", line):
            live[line.split()[0].split(":", 1)[1]] = line
    path.write_text("".join(f"{v}\n" for v in live.values()))
    return set(live)


@pytest.fixture
def tracefs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, text in (("mkdir", _MKDIR), ("rmdir", _RMDIR)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    monkeypatch.setenv("REAL_MKDIR", shutil.which("mkdir") or "/bin/mkdir")
    monkeypatch.setenv("PATH", f"{shims}:{os.environ['PATH']}")
    t = tmp_path / "tracing"
    (t / "instances").mkdir(parents=True)
    (t / "events" / "kvm" / "kvm_migstall_slot").mkdir(parents=True)
    (t / "kprobe_events").write_text("p:kprobes/vfs_read vfs_read\n")   # someone else's
    (t / "available_filter_functions").write_text("kvm_set_memslot [kvm]\nkvm_mmu_slot_apply_flags [kvm]\n")
    inst = t / ".instance"
    (inst / "events" / "kvm" / "kvm_migstall_slot").mkdir(parents=True)
    (inst / "events" / "kvm" / "kvm_migstall_slot" / "enable").write_text("0\n")
    (inst / "tracing_on").write_text("1\n")
    (inst / "trace_clock").write_text("[local] global counter uptime perf mono mono_raw boot\n")
    (inst / "buffer_size_kb").write_text("1408\n")
    (inst / "trace").write_text("# tracer: nop\n")
    yield t


def _add_group(t: Path, group: str, *, instance: bool = True, mtime: float = 0.0) -> None:
    with open(t / "kprobe_events", "a") as fh:
        fh.write(f"p:{group}/kvm_set_memslot__e kvm_set_memslot\nr16:{group}/kvm_set_memslot__r kvm_set_memslot\n")
    if instance:
        d = t / "instances" / group
        (d / "events" / group).mkdir(parents=True)
        (d / "events" / group / "enable").write_text("1\n")
        (d / "tracing_on").write_text("1\n")
        if mtime:
            os.utime(d, (mtime, mtime))


def _setup(t: Path, group: str, *specs: str) -> subprocess.CompletedProcess:
    res = subprocess.run(["sh", "-c", kvm_trace._SETUP, "sh", str(t), group, "64", str(STALE_GROUP_S), *specs],
                         capture_output=True, text=True, timeout=60)
    replay(t)
    return res


def _groups(t: Path) -> Set[str]:
    return {e.split("/")[0] for e in replay(t)}


def _instances(t: Path) -> Set[str]:
    return {p.name for p in (t / "instances").iterdir()}


def test_group_name_is_a_valid_tracefs_group() -> None:
    name = group_name(1_712_345_678)
    assert re.fullmatch(r"migstall_1712345678_[0-9a-f]{6}", name)
    # tracefs: letters, digits and "_", not starting with a digit, at most 63 characters
    assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", group_name(99_999_999_999))


def test_setup_sweeps_stale_groups_and_keeps_young_ones(tracefs: Path) -> None:
    now = int(time.time())
    old = now - STALE_GROUP_S - 600
    stale = f"migstall_{old}_aaaaaa"
    stale_probes_only = f"migstall_{old}_cccccc"
    young = f"migstall_{now - STALE_GROUP_S + 600}_bbbbbb"
    future = f"migstall_{now + 3600}_dddddd"             # host clock stepped back: keep
    legacy_stale, legacy_young = "migstall_deadbeef", "migstall_0badc0de"
    legacy_probes_only, legacy_unknown = "migstall_12345678", "migstall_abcdef01"
    for g in (stale, young, future):
        _add_group(tracefs, g)
    _add_group(tracefs, stale_probes_only, instance=False)
    (tracefs / "instances" / f"migstall_{old}_eeeeee").mkdir()     # instance only
    (tracefs / "instances" / f"migstall_{old}_e.e").mkdir()        # not a name of ours: keep
    _add_group(tracefs, legacy_stale, mtime=old)
    _add_group(tracefs, legacy_young, mtime=now - 60)
    _add_group(tracefs, legacy_probes_only, instance=False)
    (tracefs / "events" / legacy_probes_only).mkdir()
    os.utime(tracefs / "events" / legacy_probes_only, (old, old))
    _add_group(tracefs, legacy_unknown, instance=False)        # no directory to date it by: keep
    _add_group(tracefs, "migstall_x_y", instance=False)          # not ours to judge: keep

    mine = group_name(now)
    res = _setup(tracefs, mine, "kvm_set_memslot")
    assert res.returncode == 0, res
    swept = {line.split()[1] for line in res.stdout.splitlines() if line.startswith("swept ")}
    assert swept == {stale, stale_probes_only, f"migstall_{old}_eeeeee", legacy_stale, legacy_probes_only}
    assert "error" not in res.stdout
    assert _groups(tracefs) == {"kprobes", young, future, legacy_young, legacy_unknown, "migstall_x_y", mine}
    assert _instances(tracefs) == {young, future, legacy_young, f"migstall_{old}_e.e", mine}
    # the young groups' instances were not switched off
    assert (tracefs / "instances" / young / "tracing_on").read_text() == "1\n"
    assert (tracefs / "instances" / young / "events" / young / "enable").read_text() == "1\n"

    # our own group is torn down by _TEARDOWN; nobody else's is
    td = subprocess.run(["sh", "-c", kvm_trace._TEARDOWN, "sh", str(tracefs), mine],
                        capture_output=True, text=True, timeout=60)
    assert td.returncode == 0, td
    assert _groups(tracefs) == {"kprobes", young, future, legacy_young, legacy_unknown, "migstall_x_y"}
    assert _instances(tracefs) == {young, future, legacy_young, f"migstall_{old}_e.e"}


def test_setup_reports_a_failed_sweep(tracefs: Path) -> None:
    stale = f"migstall_{int(time.time()) - STALE_GROUP_S - 600}_aaaaaa"
    _add_group(tracefs, stale)
    (tracefs / "instances" / stale / ".busy").touch()            # rmdir fails: reported, setup goes on
    res = _setup(tracefs, group_name(int(time.time())), "kvm_set_memslot")
    assert res.returncode == 0, res
    errors = [line for line in res.stdout.splitlines() if line.startswith("error ")]
    assert len(errors) == 1 and errors[0].startswith(f"error sweep {stale}:") and "busy" in errors[0], res.stdout
    assert "probed kvm_set_memslot" in res.stdout


@pytest.fixture
def tracer(tracefs: Path, monkeypatch: pytest.MonkeyPatch) -> KvmTracer:
    monkeypatch.setattr(KvmTracer, "available", lambda self: True)
    t = KvmTracer(LocalHost())
    t.tracefs = str(tracefs)
    return t


def test_tracer_logs_sweep_and_cleans_up(tracefs: Path, tracer: KvmTracer,
                                        caplog: pytest.LogCaptureFixture) -> None:
    stale = f"migstall_{int(time.time()) - STALE_GROUP_S - 600}_aaaaaa"
    _add_group(tracefs, stale)
    caplog.set_level(logging.INFO, logger=kvm_trace.__name__)
    with tracer:
        replay(tracefs)
        assert re.fullmatch(r"migstall_\d+_[0-9a-f]{6}", tracer.group)
        assert abs(int(tracer.group.split("_")[1]) - time.time()) < 600
        assert tracer._active and tracer.functions == ["kvm_set_memslot", "kvm_mmu_slot_apply_flags"]
        assert tracer.tracepoints == ["kvm_migstall_slot"]
        assert _instances(tracefs) == {tracer.group}
        inst = tracefs / "instances" / tracer.group
        assert (inst / "tracing_on").read_text() == "1\n"
        assert (inst / "events" / tracer.group / "enable").read_text() == "1\n"
        assert (inst / "buffer_size_kb").read_text() == f"{kvm_trace.BUFFER_KB}\n"
        assert (inst / "trace_clock").read_text() == "mono\n"
    assert any(stale in r.getMessage() and "left-over" in r.getMessage() for r in caplog.records)
    assert not any(r.levelno >= logging.WARNING for r in caplog.records), caplog.text
    assert _groups(tracefs) == {"kprobes"} and _instances(tracefs) == set()


def test_failed_optional_step_warns_and_keeps_tracing(tracefs: Path, tracer: KvmTracer,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    (tracefs / ".instance" / "buffer_size_kb").unlink()
    (tracefs / ".instance" / "buffer_size_kb").mkdir()          # the write fails (also as root)
    with tracer:
        assert tracer._active
        assert (tracefs / "instances" / tracer.group / "tracing_on").read_text() == "1\n"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "buffer_size_kb" in warnings[0], warnings
    assert _groups(tracefs) == {"kprobes"} and _instances(tracefs) == set()


def test_tracing_that_cannot_be_switched_on_is_unavailable(tracefs: Path, tracer: KvmTracer,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    (tracefs / ".instance" / "tracing_on").unlink()
    (tracefs / ".instance" / "tracing_on").mkdir()
    with tracer:
        assert not tracer._active
        assert "tracing_on" in tracer._why
        assert tracer.collect().enable_ms is None
        tracer.phase("enable")                                   # a no-op
    assert any(r.levelno == logging.WARNING and "tracing_on" in r.getMessage() for r in caplog.records)
    assert _groups(tracefs) == {"kprobes"} and _instances(tracefs) == set()


def test_instance_that_cannot_be_created_raises_as_before(tracefs: Path, tracer: KvmTracer) -> None:
    (tracefs / "instances").rmdir()
    with pytest.raises(HostError, match=r"exit 3"):
        with tracer:
            pass
    assert not tracer._active
    assert _groups(tracefs) == {"kprobes"}


@pytest.mark.parametrize("shell", ["sh", "busybox"])
def test_keeper_arms_probes_that_the_sweep_keeps(tracefs: Path, shell: str) -> None:
    """L1's keeper (harness/sh/l1_keeper.sh, filled in): the available candidates
    probed in migstall_keep, an instance that never records; a run's setup and
    teardown leave both alone.  ``busybox``: L1 runs it with busybox ash."""
    if shell == "busybox" and not shutil.which("busybox"):
        pytest.skip("no busybox")
    argv = ["sh", "-c"] if shell == "sh" else [shutil.which("busybox") or "busybox", "sh", "-c"]
    keep = kvm_trace.KEEP_GROUP
    (tracefs / "events" / keep).mkdir()          # the kernel makes it for the group's first probe
    script = kvm_trace.keeper_init_script(str(tracefs))
    if shell == "busybox":     # its own mkdir applet comes before PATH: a function comes before both
        script = f'mkdir() {{ "{tracefs.parent}/bin/mkdir" "$@"; }}\n' + script
    res = subprocess.run([*argv, script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not res.stderr, res
    lines = (tracefs / "kprobe_events").read_text().splitlines()
    assert lines == ["p:kprobes/vfs_read vfs_read",
                     f"p:{keep}/kvm_set_memslot__e kvm_set_memslot change=%cx:u32",
                     f"r:{keep}/kvm_set_memslot__r kvm_set_memslot",
                     f"p:{keep}/kvm_mmu_slot_apply_flags__e kvm_mmu_slot_apply_flags",
                     f"r:{keep}/kvm_mmu_slot_apply_flags__r kvm_mmu_slot_apply_flags"]
    inst = tracefs / "instances" / keep
    assert (inst / "tracing_on").read_text() == "0\n"
    assert (inst / "buffer_size_kb").read_text() == f"{kvm_trace.KEEP_BUFFER_KB}\n"
    assert (inst / "events" / keep / "enable").read_text() == "1\n"
    assert (inst / "events" / "kvm" / "kvm_migstall_slot" / "enable").read_text() == "1\n"

    mine = group_name(int(time.time()))
    assert _setup(tracefs, mine, "kvm_set_memslot").returncode == 0
    td = subprocess.run(["sh", "-c", kvm_trace._TEARDOWN, "sh", str(tracefs), mine],
                        capture_output=True, text=True, timeout=60)
    assert td.returncode == 0, td
    assert _groups(tracefs) == {"kprobes", keep} and _instances(tracefs) == {keep}
