"""harness/sh: the shell scripts are package data, load, fill in and parse
(``sh -n``; no script is run against a real host or VM here)."""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib import resources

import pytest

from harness import sh
from harness.hosts import l1image
from harness.measure import kvm_trace

SCRIPTS = sorted(p.name for p in resources.files(sh).iterdir() if p.name.endswith(".sh"))


def test_every_script_is_there() -> None:
    assert SCRIPTS == ["kvm_trace_lib.sh", "kvm_trace_setup.sh", "kvm_trace_teardown.sh",
                       "l1_keeper.sh", "l1_rcS.sh"]


def _parses(text: str) -> None:
    for argv in (["sh", "-n"], [shutil.which("busybox") or "", "sh", "-n"]):
        if not argv[0]:
            continue
        res = subprocess.run([*argv, "/dev/stdin"], input=text, capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, (argv, res.stderr)


@pytest.mark.parametrize("text", [kvm_trace._SETUP, kvm_trace._TEARDOWN], ids=["setup", "teardown"])
def test_tracefs_scripts_parse(text: str) -> None:
    _parses(text)


def test_fill_quotes_each_value() -> None:
    text = "a=@ONE@; for w in @LIST@; do :; done\n"
    out = sh.fill(text, {"ONE": "x y'z", "LIST": ["p", "q r", "s@T@"]})
    assert out == "a='x y'\"'\"'z'; for w in p 'q r' s@T@; do :; done\n"
    res = subprocess.run(["sh", "-c", out + 'printf "%s|" "$a"; for w in @LIST@; do :; done'],
                         capture_output=True, text=True, timeout=30)
    assert res.stdout == "x y'z|"
    with pytest.raises(ValueError, match="@LIST@ has no value"):
        sh.fill(text, {"ONE": "1"})
    with pytest.raises(ValueError, match="@TWO@"):
        sh.fill(text, {"ONE": "1", "LIST": [], "TWO": "2"})


def test_keeper_is_filled_in() -> None:
    text = kvm_trace.keeper_init_script()
    assert not re.search(r"@[A-Z][A-Z0-9_]*@", text)
    assert "T=/sys/kernel/tracing; G=migstall_keep\n" in text
    assert "grep -oE '^(" + "|".join(kvm_trace.CANDIDATES) + ")( |$)' " in text
    assert "for spec in kvm_set_memslot@change=%cx:u32 __kvm_set_memory_region " in text
    _parses(text)


def test_l1_rcs() -> None:
    text = l1image.rcs_script()
    assert text.startswith("#!/bin/sh\n")
    assert kvm_trace.keeper_init_script() in text and "@KEEPER@" not in text
    for word in (l1image.READY_LINE, l1image.FAILED_LINE, l1image.STAGE_LINE):
        assert f'echo "{word} ' in text
    _parses(text)
