"""``nightly.toml``: the schema (pydantic models, :mod:`harness.config_schema`) and its up-front validation.

Everything is checked before any host is contacted or kernel built: unknown
keys (with a "did you mean"), types, the boot method against the host kind,
the scenario file (loaded and statically checked), the manifest or prebuilt
kernels, gate specs, paths.  Relative paths are relative to the config file.

Example::

    scenarios = "../scenarios/nightly.toml"     # the scenario matrix (required)
    out = "../results/nightly"                   # <out>/<host>/<variant>.csv + sidecars
    manifest = "../patches/x/series.toml"        # kernels built by `migstall kernel`
    target = "kernel"                            # or "kvm-modules" (virtual hosts only)
    variants = ["stock", "patched"]              # first = BASE of the report
    baseline = "../results/baseline"             # optional: gate tonight against it
    fail_on = ["dirty_log_start_ms:+10"]
    threshold = 10
    interleave = true                            # A B A B (one reboot per variant switch)
    boot_timeout_s = 600
    restore_default = true

    [kernels.patched]                            # optional: prebuilt instead of the manifest
    bzimage = "/srv/kernels/bzImage-patched"
    modules = "/srv/kernels/modules.tar.xz"      # tarball of lib/modules/<release>/ or that dir
    release = "6.1.0-migstall-patched-1a2b3c4d"  # expected `uname -r`

    [[host]]
    name = "vmx1"
    ssh = "ssh://root@vmx1.example.org"
    key = "~/.ssh/id_ed25519"
    known_hosts = "~/.ssh/known_hosts"
    boot = "kexec"                               # kexec | grub-reboot

    [[host]]
    name = "ci-virtual"
    virtual = "debian"                           # the virtual host and its default kernel
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from pydantic import Field

from harness import config_schema as schema
from harness.compare.gate import GateSpec, parse_spec
from harness.config_schema import ConfigModel, optional
from harness.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BOOT_METHODS = ("kexec", "grub-reboot", "virtual")
#: what ``manifest`` builds (harness.kernel.build / harness.kernel.modules)
TARGETS = ("kernel", "kvm-modules")
DEFAULT_BOOT_TIMEOUT_S = 600.0
DEFAULT_VARIANTS = ("stock", "patched")

class KernelTable(ConfigModel):
    """``[kernels.VARIANT]``: a prebuilt kernel."""

    bzimage: str = Field(description="path of the bzImage")
    modules: Optional[str] = optional("modules tarball (lib/modules/<release>/...) or that directory")
    release: Optional[str] = optional("expected uname -r")
    series_id: Optional[str] = optional("series hash written to the series_id column")


class HostTable(ConfigModel):
    """One ``[[host]]`` entry."""

    name: str = Field(description="short name, used in paths and the host column")
    ssh: Optional[str] = optional("ssh://[user@]host[:port] of a bare-metal host")
    virtual: Optional[str] = optional("the virtual host; its default kernel (debian or a bzImage)")
    key: Optional[str] = optional("SSH private key")
    known_hosts: Optional[str] = optional("known_hosts file that pins the host key")
    boot: Optional[str] = optional("kexec (default for ssh) | grub-reboot | virtual")
    cmdline_extra: Optional[str] = optional("extra kernel command line for the test kernels")
    interleave: Optional[bool] = optional("overrides the top-level interleave")
    initramfs: Optional[str] = optional("auto (default: update-initramfs/dracut if present) | none")
    l1_mem_mib: Optional[int] = optional("virtual host: L1 memory")


class NightlyFile(ConfigModel):
    """``nightly.toml`` as written (paths still relative to the file)."""

    scenarios: str = Field(description="scenario TOML file")
    out: Optional[str] = optional("results directory (default results/nightly next to the config)")
    manifest: Optional[str] = optional("series manifest; kernels are built with migstall kernel")
    target: Optional[str] = optional("what is built from the manifest: kernel (default) | kvm-modules "
                                     "(KVM's modules for the virtual host's Debian kernel)")
    variants: Optional[List[str]] = optional("kernel variants, first is BASE (default stock, patched)")
    kernels: Optional[Dict[str, KernelTable]] = optional("prebuilt kernels per variant")
    baseline: Optional[str] = optional("stored baseline results (CSV or dir)")
    report: Optional[str] = optional("report directory (default <out>/report)")
    fail_on: Optional[List[str]] = optional("gates METRIC:+PCT")
    threshold: Optional[float] = optional("verdict threshold, percent")
    interleave: Optional[bool] = optional("alternate variants A B A B (default true)")
    boot_timeout_s: Optional[float] = optional("seconds to wait for SSH after a boot")
    restore_default: Optional[bool] = optional("boot each host back into its default kernel at the end")
    host: List[HostTable] = Field(description="[[host]] entries")


@dataclass(frozen=True)
class KernelSpec:
    bzimage: Path
    modules: Optional[Path] = None
    release: str = ""
    series_id: str = ""


@dataclass(frozen=True)
class HostConfig:
    name: str
    boot: str
    ssh: str = ""
    virtual: str = ""
    key: Optional[str] = None
    known_hosts: Optional[str] = None
    cmdline_extra: str = ""
    interleave: bool = True
    initramfs: str = "auto"
    l1_mem_mib: int = 0


@dataclass(frozen=True)
class NightlyConfig:
    path: Path
    scenarios: Path
    out: Path
    report: Path
    hosts: Tuple[HostConfig, ...]
    variants: Tuple[str, ...] = DEFAULT_VARIANTS
    manifest: Optional[Path] = None
    kernels: Tuple[Tuple[str, KernelSpec], ...] = ()
    baseline: Optional[Path] = None
    target: str = "kernel"
    gates: Tuple[GateSpec, ...] = ()
    threshold: float = 10.0
    boot_timeout_s: float = DEFAULT_BOOT_TIMEOUT_S
    restore_default: bool = True
    scenario_list: Tuple[Any, ...] = field(default=(), repr=False)

    def kernel(self, variant: str) -> Optional[KernelSpec]:
        return dict(self.kernels).get(variant)

    def csv_path(self, host: str, variant: str) -> Path:
        return self.out / host / f"{variant}.csv"


def _path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def load_config(path: "str | Path", *, load_scenarios: bool = True) -> NightlyConfig:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise UserError(f"--config {path}: no such file; write a nightly.toml (see README 'Nightly')") from exc
    except PermissionError as exc:
        raise UserError(f"--config {path}: permission denied; make it readable") from exc
    except IsADirectoryError as exc:
        raise UserError(f"--config {path} is a directory; give the nightly.toml file") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid TOML ({' '.join(str(exc).split())}); fix the syntax") from exc
    where = f"{path}: "
    cfg = schema.validate(NightlyFile, doc, str(path))
    base = path.resolve().parent

    variants = tuple(cfg.variants) if cfg.variants is not None else DEFAULT_VARIANTS
    if not variants or not all(v.replace("-", "").replace("_", "").isalnum() for v in variants):
        raise UserError(f"{where}variants must be a non-empty list of names (letters, digits, - and _)")
    if len(set(variants)) != len(variants):
        raise UserError(f"{where}variants has duplicates; list each once")

    kernels: Dict[str, KernelSpec] = {}
    for name, table in (cfg.kernels or {}).items():
        kwhere = f"{where}[kernels.{name}] "
        if name not in variants:
            raise UserError(f"{kwhere}is not one of variants {list(variants)}; add it to variants or remove it")
        bz = _path(base, table.bzimage)
        if not bz.is_file():
            raise UserError(f"{kwhere}bzimage {bz} does not exist; build it (migstall kernel build) or fix the path")
        mods = _path(base, table.modules) if table.modules else None
        if mods is not None and not mods.exists():
            raise UserError(f"{kwhere}modules {mods} does not exist; fix the path or remove the key")
        kernels[name] = KernelSpec(bz, mods, table.release or "", table.series_id or "")

    manifest = _path(base, cfg.manifest) if cfg.manifest else None
    if manifest is not None:
        from harness.kernel.manifest import load_manifest

        load_manifest(manifest)      # validates (UserError on problems)
    missing = [v for v in variants if v not in kernels]
    if missing and manifest is None:
        raise UserError(f"{where}no kernel for variant(s) {', '.join(missing)}; set manifest = ... "
                        f"or add [kernels.{missing[0]}] bzimage = ...")

    target = cfg.target if cfg.target is not None else TARGETS[0]
    if target not in TARGETS:
        raise UserError(f"{where}target {target!r} is not one of {', '.join(TARGETS)}")
    if target == "kvm-modules" and manifest is None:
        raise UserError(f"{where}target = \"kvm-modules\" builds from the manifest; set manifest = ...")

    gates = []
    for spec in cfg.fail_on or []:
        try:
            gates.append(parse_spec(spec))
        except ValueError as exc:
            raise UserError(f"{where}{exc}") from exc
    threshold = cfg.threshold if cfg.threshold is not None else 10.0
    if not 0 < threshold < 1000:
        raise UserError(f"{where}threshold {threshold:g} is out of range; give a percentage such as 10")
    boot_timeout = cfg.boot_timeout_s if cfg.boot_timeout_s is not None else DEFAULT_BOOT_TIMEOUT_S
    if not 10 <= boot_timeout <= 7200:
        raise UserError(f"{where}boot_timeout_s {boot_timeout:g} is out of range 10..7200")
    baseline = _path(base, cfg.baseline) if cfg.baseline else None
    if baseline is not None and not baseline.exists():
        raise UserError(f"{where}baseline {baseline} does not exist; remove the key or point it at stored results")

    hosts = _hosts(cfg.host, where, cfg.interleave is not False)
    if target == "kvm-modules" and any(h.boot != "virtual" for h in hosts):
        raise UserError(f"{where}target = \"kvm-modules\" is for the virtual host (Debian's kernel in L1); "
                        f"hosts booted with kexec or grub-reboot need target = \"kernel\"")
    scen_path = _path(base, cfg.scenarios)
    if not scen_path.is_file():
        raise UserError(f"{where}scenarios {scen_path} does not exist; point it at a scenario TOML file")
    scenario_list: Tuple[Any, ...] = ()
    if load_scenarios:
        from harness import scenario as scen

        scenario_list = tuple(scen.load_scenarios(scen_path))
        for s in scenario_list:
            scen.check_static(s)
    out = _path(base, cfg.out if cfg.out is not None else "results/nightly")
    report = _path(base, cfg.report) if cfg.report else out / "report"
    return NightlyConfig(
        path=path, scenarios=scen_path, out=out, report=report, hosts=hosts, variants=variants,
        manifest=manifest, kernels=tuple(sorted(kernels.items())), baseline=baseline, gates=tuple(gates),
        threshold=threshold, boot_timeout_s=boot_timeout, restore_default=cfg.restore_default is not False,
        scenario_list=scenario_list, target=target,
    )


def _hosts(entries: Sequence[HostTable], where: str, interleave: bool) -> Tuple[HostConfig, ...]:
    if not entries:
        raise UserError(f"{where}host must be one or more [[host]] tables")
    hosts: List[HostConfig] = []
    for i, h in enumerate(entries):
        hwhere = f"{where}[[host]] #{i + 1} "
        name = h.name
        if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
            raise UserError(f"{hwhere}name {name!r} must be letters, digits, '-', '_' or '.'")
        if (h.ssh is not None) == (h.virtual is not None):
            raise UserError(f"{hwhere}({name}) needs exactly one of ssh = 'ssh://...' or virtual = 'debian'")
        kind = "ssh" if h.ssh is not None else "virtual"
        boot = h.boot if h.boot is not None else ("kexec" if kind == "ssh" else "virtual")
        if boot not in BOOT_METHODS:
            raise UserError(f"{hwhere}({name}) boot {boot!r} is unknown; use one of {', '.join(BOOT_METHODS)}")
        if (kind == "virtual") != (boot == "virtual"):
            raise UserError(f"{hwhere}({name}) boot {boot!r} does not fit a {kind} host; "
                            f"use {'virtual' if kind == 'virtual' else 'kexec or grub-reboot'}")
        from harness.hosts.factory import parse_host_spec

        if h.ssh is not None:
            parse_host_spec(h.ssh)
        else:
            parse_host_spec("virtual" + (f":{h.virtual}" if h.virtual else ""))
        initramfs = h.initramfs if h.initramfs is not None else "auto"
        if initramfs not in ("auto", "none"):
            raise UserError(f"{hwhere}({name}) initramfs must be 'auto' or 'none'")
        hosts.append(HostConfig(
            name=name, boot=boot, ssh=h.ssh or "", virtual=h.virtual or "",
            key=str(Path(h.key).expanduser()) if h.key else None,
            known_hosts=str(Path(h.known_hosts).expanduser()) if h.known_hosts else None,
            cmdline_extra=h.cmdline_extra or "", interleave=interleave if h.interleave is None else h.interleave,
            initramfs=initramfs, l1_mem_mib=h.l1_mem_mib or 0,
        ))
    names = [h.name for h in hosts]
    if len(set(names)) != len(names):
        raise UserError(f"{where}host names must be unique; {names}")
    return tuple(hosts)
