"""migstall nightly: config validation, plan/resume, boot-method helpers (fast).

The end-to-end nightly against the virtual host is in test_nightly_e2e.py (slow).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import cli, results
from harness.errors import HostError, UserError
from harness.nightly import boot, plan
from harness.nightly.config import load_config
from harness.scenario import load_scenarios

SCEN = """
[defaults]
repeat = 2
[[scenario]]
name = "n1"
mem = ["512M", "1G"]
"""


def _write(tmp_path: Path, body: str, name: str = "nightly.toml") -> Path:
    (tmp_path / "scen.toml").write_text(SCEN)
    (tmp_path / "bzImage-stock").write_bytes(b"x")
    (tmp_path / "bzImage-patched").write_bytes(b"x")
    p = tmp_path / name
    p.write_text(body)
    return p


GOOD = """
scenarios = "scen.toml"
out = "res"
fail_on = ["dirty_log_start_ms:+10"]
[kernels.stock]
bzimage = "bzImage-stock"
[kernels.patched]
bzimage = "bzImage-patched"
release = "6.1.0-migstall-patched-1a2b3c4d"
[[host]]
name = "vmx1"
ssh = "ssh://root@vmx1.example:2222"
[[host]]
name = "ci"
virtual = "debian"
"""


def test_good_config(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD))
    assert cfg.variants == ("stock", "patched")
    assert [h.boot for h in cfg.hosts] == ["kexec", "virtual"]
    assert cfg.out == tmp_path / "res" and cfg.report == tmp_path / "res" / "report"
    assert cfg.csv_path("vmx1", "patched") == tmp_path / "res" / "vmx1" / "patched.csv"
    assert len(cfg.scenario_list) == 4 and str(cfg.gates[0]) == "dirty_log_start_ms:+10%"
    assert cfg.kernel("patched").release.endswith("1a2b3c4d")


@pytest.mark.parametrize("edit,needle", [
    (("out = \"res\"", "out = \"res\"\nbogus = 1"), "unknown key 'bogus'"),
    (("name = \"vmx1\"", "name = \"vmx1\"\nbot = \"kexec\""), "did you mean 'boot'"),
    (("[kernels.stock]", "[kernels.stock]\nbzimag = 'x'"), "unknown key 'bzimag'"),
    (("ssh = \"ssh://root@vmx1.example:2222\"", "ssh = \"ssh://root@vmx1.example:2222\"\nboot = \"pxe\""),
     "boot 'pxe' is unknown"),
    (("virtual = \"debian\"", "virtual = \"debian\"\nboot = \"kexec\""), "does not fit a virtual host"),
    (("ssh = \"ssh://root@vmx1.example:2222\"", "ssh = \"ftp://x\""), "not supported"),
    (("name = \"ci\"\nvirtual = \"debian\"", "name = \"ci\""), "exactly one of ssh"),
    (("fail_on = [\"dirty_log_start_ms:+10\"]", "fail_on = [\"dirty_log_start_ms:10\"]"), "METRIC:+PCT"),
    (("bzimage = \"bzImage-stock\"", "bzimage = \"nope\""), "does not exist"),
    (("scenarios = \"scen.toml\"", "scenarios = \"missing.toml\""), "does not exist"),
    (("scenarios = \"scen.toml\"", "scenarios = 3"), "scenarios 3 is not a string"),
    (("out = \"res\"", "out = \"res\"\nthreshold = -1"), "threshold"),
    (("out = \"res\"", "out = \"res\"\nboot_timeout_s = 1"), "boot_timeout_s"),
    (("[kernels.stock]\nbzimage = \"bzImage-stock\"", ""), "no kernel for variant(s) stock"),
    (("name = \"ci\"", "name = \"vmx1\""), "unique"),
    (("out = \"res\"", "out = \"res\"\nvariants = []"), "variants"),
    (("out = \"res\"", "out = \"res\"\nbaseline = \"nothere\""), "baseline"),
    (("out = \"res\"", "out = = \"res\""), "not valid TOML"),
    (("out = \"res\"", "out = \"res\"\ntarget = \"modules\""), "target 'modules' is not one of"),
    (("out = \"res\"", "out = \"res\"\ntarget = \"kvm-modules\""), "set manifest"),
])
def test_bad_config_is_user_error(tmp_path, edit, needle):
    old, new = edit
    assert old in GOOD
    p = _write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(UserError) as exc:
        load_config(p)
    assert needle in str(exc.value)
    assert "\n" not in exc.value.one_line()


def test_kvm_modules_target_is_for_the_virtual_host_only(tmp_path):
    manifest = Path(__file__).resolve().parent.parent / "patches" / "fast-write-protect-6.1" / "series.toml"
    body = GOOD.replace('out = "res"', f'out = "res"\nmanifest = "{manifest}"\ntarget = "kvm-modules"', 1)
    with pytest.raises(UserError, match="kexec or grub-reboot need target"):
        load_config(_write(tmp_path, body))
    virtual_only = body[:body.index("[[host]]")] + '[[host]]\nname = "ci"\nvirtual = "debian"\n'
    assert load_config(_write(tmp_path, virtual_only)).target == "kvm-modules"


def test_bad_scenario_in_matrix_is_user_error(tmp_path):
    p = _write(tmp_path, GOOD)
    (tmp_path / "scen.toml").write_text(SCEN + "backing = \"bogus\"\n")
    with pytest.raises(UserError, match="backing"):
        load_config(p)


def test_cli_bad_config_exit_2_one_line(tmp_path, capsys):
    p = _write(tmp_path, GOOD.replace("out = \"res\"", "out = \"res\"\nbogus = 1"))
    assert cli.main(["nightly", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "bogus" in err
    assert cli.main(["nightly", "--config", str(tmp_path / "none.toml")]) == 2


def test_cli_check(tmp_path, capsys):
    assert cli.main(["nightly", "--config", str(_write(tmp_path, GOOD)), "--check"]) == 0
    assert "2 host(s)" in capsys.readouterr().out


def test_plan_interleaves(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD))
    steps = plan.plan(cfg.variants, cfg.scenario_list, True)
    assert [(s.variant, {x.repeat for x in s.scenarios}) for s in steps] == [
        ("stock", {1}), ("patched", {1}), ("stock", {2}), ("patched", {2})]
    assert all(len(s.scenarios) == 2 for s in steps)
    flat = plan.plan(cfg.variants, cfg.scenario_list, False)
    assert [s.variant for s in flat] == ["stock", "patched"] and len(flat[0].scenarios) == 4


def test_resume_keys_match_runner_rows(tmp_path):
    from harness.runner import RunContext, base_row

    cfg = load_config(_write(tmp_path, GOOD))
    sc = cfg.scenario_list[0]
    out = tmp_path / "r.csv"
    ctx = RunContext(host=None, out=out, host_label="vmx1", kernel_variant="patched")  # type: ignore[arg-type]
    ok = dict(base_row(ctx, sc, "r1"), status="ok")
    failed = results.failed_row(dict(base_row(ctx, cfg.scenario_list[1], "r2")), "boom")
    results.append_rows(out, [ok, failed])
    done = plan.done_keys([out, tmp_path / "missing.csv"])
    assert plan.run_key("vmx1", "patched", sc) in done                        # ok row: skipped on resume
    assert plan.run_key("vmx1", "patched", cfg.scenario_list[1]) not in done  # failed row: run again
    assert plan.run_key("vmx1", "stock", sc) not in done


def test_verify_release():
    art = boot.Artifact("patched", Path("bz"), series_id="1a2b3c4d5e6f")
    boot.verify_release("6.1.0-migstall-patched-1a2b3c4d", art)
    for bad in ("6.1.0-56-amd64", "6.1.0-migstall-stock-1a2b3c4d", "6.1.0-migstall-patched-ffffffff"):
        with pytest.raises(HostError):
            boot.verify_release(bad, art)
    exact = boot.Artifact("stock", Path("bz"), release="6.1.0-migstall-stock-1a2b3c4d")
    boot.verify_release("6.1.0-migstall-stock-1a2b3c4d", exact)
    with pytest.raises(HostError):
        boot.verify_release("6.1.0-migstall-stock-1a2b3c4dx", exact)


GRUB_CFG = """
menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple-abcd' {
}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-abcd' {
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-migstall-patched-1a2b3c4d' --class debian $menuentry_id_option 'gnulinux-6.1.0-migstall-patched-1a2b3c4d-advanced-abcd' {
	}
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-migstall-patched-1a2b3c4d (recovery mode)' --class debian $menuentry_id_option 'gnulinux-6.1.0-migstall-patched-1a2b3c4d-recovery-abcd' {
	}
}
"""  # noqa: E501  grub.cfg as update-grub writes it


def test_grub_entry():
    assert boot.grub_entry(GRUB_CFG, "6.1.0-migstall-patched-1a2b3c4d") == \
        "gnulinux-advanced-abcd>gnulinux-6.1.0-migstall-patched-1a2b3c4d-advanced-abcd"
    with pytest.raises(HostError):
        boot.grub_entry(GRUB_CFG, "6.1.0-other")


def test_boot_methods_are_data(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD))
    kinds = {h.name: type(boot.for_host(h, 60)).__name__ for h in cfg.hosts}
    assert kinds == {"vmx1": "KexecBoot", "ci": "VirtualBoot"}
    assert set(boot.METHODS) == {"kexec", "grub-reboot", "virtual"}


def test_modules_dir_is_tarred(tmp_path):
    d = tmp_path / "6.1.0-x"
    (d / "kernel").mkdir(parents=True)
    (d / "kernel" / "a.ko").write_bytes(b"ko")
    import tarfile

    tar = boot._modules_tar(d, "6.1.0-x")
    with tarfile.open(tar) as t:
        assert "lib/modules/6.1.0-x/kernel/a.ko" in t.getnames()
    tar.unlink()
    tar.parent.rmdir()


def test_ci_templates_match_the_example_config(capsys):
    """ci/nightly.toml validates; both CI templates run its hosts as a matrix on 'vmx' runners."""
    repo = Path(__file__).resolve().parent.parent
    assert cli.main(["nightly", "--config", str(repo / "ci" / "nightly.toml"), "--check"]) == 0
    cfg = load_config(repo / "ci" / "nightly.toml")
    names = [h.name for h in cfg.hosts]
    gitlab = (repo / "ci" / "gitlab-ci.yml").read_text()
    github = (repo / "ci" / "github-nightly.yml").read_text()
    assert f"MIGSTALL_HOST: [{', '.join(names)}]" in gitlab and "tags: [vmx]" in gitlab
    assert f"host: [{', '.join(names)}]" in github and "runs-on: [self-hosted, vmx]" in github
    for text in (gitlab, github):
        assert "migstall nightly --config ci/nightly.toml --host" in text
    try:
        import yaml  # not a dependency; checked when present
    except ImportError:
        return
    assert yaml.safe_load(gitlab)["migstall-nightly"]["extends"] == ".migstall-nightly"
    assert yaml.safe_load(github)["jobs"]["nightly"]["runs-on"] == ["self-hosted", "vmx"]


def test_select_host(tmp_path):
    from harness.commands.nightly import select_hosts

    cfg = select_hosts(load_config(_write(tmp_path, GOOD)), ["ci"])
    assert [h.name for h in cfg.hosts] == ["ci"] and cfg.report.name == "ci"
    with pytest.raises(UserError, match="not a \\[\\[host\\]\\]"):
        select_hosts(cfg, ["nope"])


def test_install_through_the_host_api(tmp_path):
    """kexec/grub-reboot install (bzImage, modules, depmod) on a real host (LocalHost)
    into a scratch root; a merged-/usr /lib symlink survives the modules tarball."""
    import os
    import shutil as _sh

    from harness.hosts.local import LocalHost
    from harness.nightly.config import HostConfig

    if not _sh.which("depmod") and not os.path.exists("/usr/sbin/depmod") and not os.path.exists("/sbin/depmod"):
        pytest.skip("depmod (kmod) not installed")
    root = tmp_path / "root"
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    release = "6.1.0-migstall-patched-1a2b3c4d"
    mods = tmp_path / "mods" / release
    (mods / "kernel").mkdir(parents=True)
    (mods / "modules.order").write_text("")
    (mods / "modules.builtin").write_text("kernel/arch/x86/kvm/kvm.ko\n")
    bz = tmp_path / "bzImage"
    bz.write_bytes(b"not really a kernel")
    method = boot.KexecBoot(HostConfig(name="h", boot="kexec", ssh="ssh://h", initramfs="none"), 60)
    method.root = str(root)
    art = boot.Artifact("patched", bz, release=release, modules=mods)
    inst = method.install(LocalHost(), art)
    assert inst.kernel == f"{root}/boot/vmlinuz-{release}" and inst.initrd == ""
    assert (root / "boot" / f"vmlinuz-{release}").read_bytes() == bz.read_bytes()
    assert (root / "lib").is_symlink()
    assert (root / "usr" / "lib" / "modules" / release / "modules.dep").exists()   # depmod ran
    assert method.install(LocalHost(), art) is inst                                 # once per variant


@pytest.mark.parametrize("name", ["nightly-fwp-virtual.toml", "nightly-fwp-matrix.toml", "nightly-fwp-write.toml",
                                  "nightly-fwp-verify.toml"])
def test_series_nightly_on_the_virtual_host_validates(name):
    """The series' nightlies in the virtual host: ci/nightly-fwp-virtual.toml (2 GiB),
    ci/nightly-fwp-matrix.toml (256 MiB - 1 GiB), ci/nightly-fwp-write.toml (the
    write-only mix) and ci/nightly-fwp-verify.toml (the verified matrix, patched
    only).  L1 boots with the scenarios' l1_cmdline, so that a run does not boot it twice."""
    repo = Path(__file__).resolve().parent.parent
    path = repo / "ci" / name
    assert cli.main(["nightly", "--config", str(path), "--check"]) == 0
    cfg = load_config(path)
    (host,) = cfg.hosts
    assert host.boot == "virtual" and host.l1_mem_mib >= 4096
    l1_cmdlines = {s.l1_cmdline for s in load_scenarios(cfg.scenarios)}
    assert l1_cmdlines == {host.cmdline_extra}, (l1_cmdlines, host.cmdline_extra)
