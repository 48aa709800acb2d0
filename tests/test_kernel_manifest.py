"""Kernel manifests, series and bad input: fast tests (no kernel is built).

Every bad input exits 2 with one line on stderr and starts nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from harness import paths
from harness.errors import UserError
from harness.kernel.config import harness_fragments, resolve_config
from harness.kernel.manifest import ManifestFile, SeriesTable, load_manifest
from harness.kernel.series import load_series, read_patches
from harness.kernel.toolchain import resolve_toolchain, working_engine

REPO = paths.REPO_ROOT
TEST_SERIES = REPO / "patches/migstall-dirtylog-tracepoints/series.toml"
SEED = REPO / "patches/fast-dbit-cleanup-v1/series.toml"
CONFLICT = REPO / "patches/migstall-conflict-test/series.toml"
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def migstall(*args: str, env=None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIGSTALL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- the shipped manifests ------------------------------------------------------------

def test_shipped_manifests_parse():
    m = load_manifest(TEST_SERIES)
    assert m.base.kind == "debian" and m.base.debian_source == "linux-source-6.1"
    assert m.series.patches == 2 and m.config == "tiny"
    assert "kvm/kvm_migstall_dirty_log_enable" in m.events
    seed = load_manifest(SEED)
    assert seed.base.git == "https://git.kernel.org/pub/scm/linux/kernel/git/torvalds/linux.git"
    assert seed.base.ref == "v5.0-rc2"
    assert seed.series.message_id == "1547733331-16140-1-git-send-email-ann.zhuangyanying@huawei.com"
    assert seed.series.patches == 4 and seed.compiler == "gcc-8" and seed.qemu == "3.1"
    assert seed.series.title == "KVM: MMU: fast cleanup D bit based on fast write protect"


def test_test_series_is_an_mbox_git_am_and_b4_accept(tmp_path):
    m = load_manifest(TEST_SERIES)
    subjects = read_patches(m.series.mbox)
    assert [s.split("]")[0] for s in subjects] == ["[PATCH 1/2", "[PATCH 2/2"]
    if shutil.which("b4"):
        out = tmp_path / "b4"
        out.mkdir()
        proc = subprocess.run(["b4", "am", "-m", str(m.series.mbox), "-o", str(out), "-n", "t"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "Total patches: 2" in proc.stdout + proc.stderr
        assert (out / "t.mbx").stat().st_size > 0


def test_series_hash_and_cover_letter_dropped(cache):
    m = load_manifest(TEST_SERIES)
    s = load_series(m.series)
    assert s.count == 2 and len(s.sha256) == 64 and s.hash8 == s.sha256[:8]
    assert "[PATCH 0/2]" not in s.am_mbox.read_text()
    assert s.am_mbox.read_text().count("\ndiff --git ") >= 2


def test_fragments_cover_the_virtual_host_needs():
    assert set(harness_fragments()) >= {"kvm-host", "tracing", "virtual-host"}
    plan = resolve_config("tiny", ["kvm-host", "tracing", "virtual-host"])
    text = "".join(f.read_text() for f in plan.fragments)
    for opt in ("KVM", "KVM_INTEL", "KVM_AMD", "FTRACE", "FUNCTION_GRAPH_TRACER", "KPROBE_EVENTS",
                "SERIAL_8250_CONSOLE", "VIRTIO_PCI", "VIRTIO_CONSOLE", "VIRTIO_NET", "VIRTIO_BLK",
                "BLK_DEV_INITRD", "DEVTMPFS", "ADVISE_SYSCALLS", "UNIX", "INET", "EVENTFD", "SIGNALFD",
                "TIMERFD", "EPOLL", "FUTEX", "SHMEM", "TMPFS", "UNIX98_PTYS", "MULTIUSER", "POSIX_TIMERS"):
        assert f"CONFIG_{opt}=y" in text, opt
    assert plan.base == "tinyconfig"
    assert resolve_config("tiny", ["kvm-host"]).digest != plan.digest


# -- bad manifests: exit 2, one line ---------------------------------------------------

def test_missing_manifest_exits_2(tmp_path):
    assert_user_error(migstall("kernel", "build", "--manifest", str(tmp_path / "nope.toml")),
                      "does not exist", "--manifest")


@pytest.mark.parametrize("text,needle", [
    ('name="x"\ndescription="d"\ncolour="red"\n[base]\ndebian_source="linux-source-6.1"\n[series]\nmbox="m"\n',
     "unknown key 'colour'"),
    ('name="x"\ndescription="d"\n[base]\ndebian_source="linux-source-6.1"\nbranch="x"\n[series]\nmbox="m"\n',
     "unknown key 'branch' in [base]"),
    ('name="x"\ndescription="d"\n[base]\ngit="https://x"\n[series]\nmbox="m"\n', "needs a ref"),
    ('name="x"\n[base]\ndebian_source="p"\n[series]\nmbox="m"\n', "missing 'description'"),
    ('name="x"\ndescription="d"\n[base]\ndebian_source="p"\npath="/"\n[series]\nmbox="m"\n', "exactly one of"),
    ('name="x"\ndescription="d"\n[base]\ndebian_source="p"\n[series]\nmessage_id="a@b"\n', "patches = N"),
    ('name="x"\ndescription="d"\n[base]\ndebian_source="p"\n[series]\nmbox="m"\npatches="2"\n',
     "[series]: patches '2' is not an integer"),
    ('name = \n', "not valid TOML"),
])
def test_bad_manifest_exits_2(tmp_path, text, needle):
    (tmp_path / "m").write_text("From x\n")
    path = write(tmp_path / "series.toml", text)
    with pytest.raises(UserError, match=None) as exc:
        load_manifest(path)
    assert needle in str(exc.value)
    assert_user_error(migstall("kernel", "build", "--manifest", str(path)), needle)


def test_schema_is_data():
    assert set(ManifestFile.model_fields) == {"name", "description", "base", "series", "build", "toolchain", "verify"}
    assert ManifestFile.model_fields["series"].annotation is SeriesTable
    assert SeriesTable.model_fields["patches"].annotation == Optional[int]


@pytest.fixture
def tiny_git_tree(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "Makefile").write_text("VERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 0\nEXTRAVERSION =\n")
    (tree / "Kconfig").write_text("")
    env = {**os.environ, **GIT_ENV}
    for argv in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "base"]):
        subprocess.run(argv, cwd=tree, check=True, env=env, capture_output=True)
    return tree


def _manifest_for(tmp_path: Path, base: str, series: str = 'mbox = "{mbox}"\npatches = 2') -> Path:
    mbox = REPO / "patches/migstall-dirtylog-tracepoints/series.mbox"
    return write(tmp_path / "series.toml", f'name = "t"\ndescription = "t"\n[base]\n{base}\n'
                                           f'[series]\n{series.format(mbox=mbox)}\n')


def test_nonexistent_ref_in_local_tree_exits_2(tmp_path, cache, tiny_git_tree):
    path = _manifest_for(tmp_path, f'path = "{tiny_git_tree}"\nref = "v9.9-nonexistent"')
    assert_user_error(migstall("kernel", "build", "--manifest", str(path)),
                      "base ref 'v9.9-nonexistent' does not exist")


def test_nonexistent_ref_in_git_url_exits_2(tmp_path, cache, tiny_git_tree):
    path = _manifest_for(tmp_path, f'git = "file://{tiny_git_tree}"\nref = "v9.9-nonexistent"')
    assert_user_error(migstall("kernel", "build", "--manifest", str(path)),
                      "base ref 'v9.9-nonexistent' does not exist")
    assert not list(Path(cache, "kernel-src").glob("git-*")), "nothing half-prepared is left"


def test_wrong_patch_count_exits_2(tmp_path, cache, tiny_git_tree):
    path = _manifest_for(tmp_path, f'path = "{tiny_git_tree}"', series='mbox = "{mbox}"\npatches = 3')
    assert_user_error(migstall("kernel", "build", "--manifest", str(path)), "has 2 patches", "says 3")


def test_bad_config_exits_2(cache):
    assert_user_error(migstall("kernel", "build", "--manifest", str(TEST_SERIES), "--config", "/nonexistent"),
                      "--config")


def test_missing_debian_source_exits_2(tmp_path, cache):
    path = _manifest_for(tmp_path, 'debian_source = "linux-source-0.1"')
    assert_user_error(migstall("kernel", "build", "--manifest", str(path)), "apt-get install linux-source-0.1")


# -- the old-kernel path ------------------------------------------------------------------

def test_seed_series_needs_gcc8_container_or_says_what_to_install(cache):
    """5.0-rc2 needs gcc-8: with no gcc-8 and no WORKING engine (a docker client
    with no daemon does not count) the build stops before any work."""
    if shutil.which("gcc-8"):
        pytest.skip("gcc-8 is installed here")
    if working_engine():
        tc = resolve_toolchain("gcc-8")
        assert tc.runtime in ("docker", "podman") and tc.builder == "tuxmake"
        return
    proc = migstall("kernel", "build", "--manifest", str(SEED), "--variant", "both")
    assert_user_error(proc, "gcc-8", "podman", "docker info")
    assert not list(Path(cache).glob("kernel-src/git-*")), "nothing was fetched"
    assert not list(Path(cache).glob("kernel-series/msgid*-*/series.mbx"))


def test_kernel_list_runs(cache):
    proc = migstall("kernel", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# -- pure helpers ------------------------------------------------------------------------

def test_apply_failure_names_patch_file_and_base(tmp_path):
    from harness.kernel.apply import _failure
    from harness.kernel.series import Series
    from harness.kernel.source import SourceTree

    src = SourceTree("debian", "debian:linux-source-6.1", tmp_path, "575457182f4e7477", "linux-source-6.1",
                     "6.1.192", "k")
    series = Series("mbox", "s.mbox", tmp_path / "s", "0" * 64, 2, ("a", "b"), tmp_path / "s")
    out = ("Applying: first\nApplying: KVM: x86: second\nUsing index info to reconstruct a base tree...\n"
           "Falling back to patching base and 3-way merge...\n"
           "CONFLICT (content): Merge conflict in arch/x86/kvm/x86.c\n"
           "error: Failed to merge in the changes.\nPatch failed at 0002 KVM: x86: second\n")
    msg = str(_failure(src, series, out))
    assert "patch 2/2 'KVM: x86: second'" in msg and "arch/x86/kvm/x86.c" in msg
    assert "debian:linux-source-6.1" in msg and "6.1.192" in msg
    out2 = ("error: sha1 information is lacking or useless (virt/kvm/kvm_main.c).\n"
            "error: could not build fake ancestor\nPatch failed at 0001 x\n")
    assert "virt/kvm/kvm_main.c" in str(_failure(src, series, out2))


def test_bootcheck_console_parsing():
    from harness.kernel.bootcheck import _init_script, _parse

    script = _init_script(["kvm/kvm_exit"], ["/sys/module/kvm/parameters/x"])
    assert "mount -t tracefs" in script and "uname -r" in script and "reboot -f" in script
    parsed = _parse("[ 1.0] noise\nMIGSTALL-UNAME 6.1.192-migstall-stock-12345678\r\nMIGSTALL-KVM yes\n"
                    "MIGSTALL-EVENT kvm/kvm_exit yes\n[ 1.1] MIGSTALL-MARKER /sys/x Y\nMIGSTALL-DONE\n")
    assert parsed["release"] == "6.1.192-migstall-stock-12345678" and parsed["kvm"] and parsed["done"]
    assert parsed["events"] == [("kvm/kvm_exit", True)] and parsed["markers"] == [("/sys/x", "Y")]


# -- --target kvm-modules: rejected before any download -------------------------------------

def test_kvm_modules_reject_whole_kernel_options(cache):
    assert_user_error(migstall("kernel", "build", "--manifest", str(TEST_SERIES), "--target", "kvm-modules",
                               "--config", "tiny"), "--config", "only for --target kernel")


def test_kvm_modules_reject_a_series_outside_kvm(cache):
    """The conflict-test series also changes Documentation/: KVM's modules alone
    cannot carry it, and nothing is downloaded to find that out."""
    assert_user_error(migstall("kernel", "build", "--manifest", str(CONFLICT), "--target", "kvm-modules",
                               "--variant", "patched"),
                      "Documentation/virt/kvm/migstall-notes.rst", "--target kernel")
    assert not list(Path(cache).glob("kvm-modules/kit-*")), "nothing was downloaded"


def test_kvm_modules_need_a_debian_base(tmp_path, cache, tiny_git_tree):
    path = _manifest_for(tmp_path, f'path = "{tiny_git_tree}"')
    assert_user_error(migstall("kernel", "build", "--manifest", str(path), "--target", "kvm-modules"),
                      "debian_source")


def test_kvm_modules_build_dir_is_read_back_and_listed(cache):
    """What `--host virtual:DIR` and `kernel list` read: a build's out/ with its metadata."""
    import json as _json

    from harness.kernel.modules import is_modules_dir, load_build

    out = Path(cache) / "kvm-modules" / "0123456789abcdef" / "out"
    out.mkdir(parents=True)
    for name in ("kvm.ko", "kvm-amd.ko"):
        (out / name).write_bytes(b"\x7fELF")
    (out / "metadata.json").write_text(_json.dumps({
        "target": "kvm-modules", "variant": "patched", "release": "6.1.0-56-amd64", "duration_s": 19.2,
        "started": "2026-12-05T08:45:00Z", "manifest": {"name": "fast-write-protect-6.1"},
        "series": {"sha256": "ab" * 32},
        "modules": [{"name": "kvm", "file": "kvm.ko"}, {"name": "kvm_amd", "file": "kvm-amd.ko"}]}))
    build = load_build(out)
    assert is_modules_dir(out) and not is_modules_dir(out.parent)
    assert build.variant == "patched" and build.series_id == "ab" * 32
    assert [n for n, _ in build.modules] == ["kvm", "kvm_amd"]
    listed = _json.loads(migstall("kernel", "list", "--json").stdout)
    assert [(b["target"], b["out"]) for b in listed] == [("kvm-modules", str(out))]
    (out / "kvm-amd.ko").unlink()
    with pytest.raises(UserError, match="modules missing"):
        load_build(out)


@pytest.mark.slow
def test_kvm_modules_build_failure_exits_2_with_the_log():
    """A series that applies but does not compile, as KVM modules: exit 2 naming
    the build log (the kit is fetched once into the default cache; about 40 s)."""
    broken = REPO / "patches/migstall-broken-build-test/series.toml"
    proc = migstall("kernel", "build", "--manifest", str(broken), "--variant", "patched", "--target", "kvm-modules",
                    timeout=2400)
    assert_user_error(proc, "patched kvm-modules build failed (make exited 2)", "see the log ")
    log = Path(proc.stderr.strip().rsplit("see the log ", 1)[1])
    assert "deliberately broken build" in log.read_text(errors="replace")
