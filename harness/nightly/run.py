"""The nightly loop: for each host, boot each variant once per step, run, compare.

Per host (one after the other):

1. open it (SSH connect, or start the virtual host) and note its default
   ``uname -r``;
2. walk the plan (:func:`harness.nightly.plan.plan`): for each step, skip the
   runs that already have an ok row (resume), boot the step's variant if it is
   not the running one (install once, boot once, wait for SSH, verify ``uname
   -r``), and run the scenarios with :func:`harness.runner.run_matrix`, which
   appends rows to ``<out>/<host>/<variant>.csv`` with sidecars next to it
   (the CSVs and sidecars are written here, so nothing is left to fetch);
3. a boot that fails or never comes back: every run of that step gets a failed
   row; the variant is not tried again that night; the host is brought back to
   its default kernel (if it does not come back either, the host's remaining
   runs get failed rows);
4. finally the host is returned to its default kernel (``restore_default``).

Then the report: first variant (BASE) vs each other variant, over all hosts,
and the gate (against ``baseline`` when given, per variant; else BASE vs NEW).
The exit code is 1 when a gate tripped or any run failed, else 0.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from harness import results
from harness.errors import InfraError, MigstallError, UserError
from harness.nightly import boot as bootmod
from harness.nightly import plan as planmod
from harness.nightly.config import HostConfig, NightlyConfig
from harness.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class HostSummary:
    name: str
    default_release: str = ""
    boots: List[str] = field(default_factory=list)          # "variant release" per boot
    ran: int = 0
    skipped: int = 0
    failed: int = 0
    errors: List[str] = field(default_factory=list)


@dataclass
class NightlyOutcome:
    hosts: List[HostSummary]
    report_dirs: List[Path] = field(default_factory=list)
    markdown: List[Path] = field(default_factory=list)
    gate_failures: List[str] = field(default_factory=list)
    compare_error: str = ""

    @property
    def failed_runs(self) -> int:
        return sum(h.failed for h in self.hosts)

    @property
    def exit_code(self) -> int:
        return 1 if (self.gate_failures or self.failed_runs or self.compare_error
                     or any(h.errors for h in self.hosts)) else 0


def _failed_rows(cfg: NightlyConfig, hc: HostConfig, art: bootmod.Artifact, scenarios: Sequence, error: str,
                 release: str = "") -> int:
    import datetime as _dt

    from harness.runner import new_run_id

    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for sc in scenarios:
        base = {**planmod.scenario_row(hc.name, art.variant, sc), "run_id": new_run_id(sc), "started_at": now,
                "series_id": art.series_id, "host_kernel": release or art.release,
                "accel": sc.accel, "cpu_model": sc.cpu_model}
        rows.append(results.failed_row(base, error))
    if rows:
        results.append_rows(cfg.csv_path(hc.name, art.variant), rows)
    return len(rows)


def run_host(cfg: NightlyConfig, hc: HostConfig, arts: Dict[str, bootmod.Artifact],
             progress: Optional[Progress] = None) -> HostSummary:
    from harness.runner import RunContext, run_matrix

    progress = progress or Progress()
    summary = HostSummary(hc.name)
    steps = planmod.plan(cfg.variants, cfg.scenario_list, hc.interleave)
    done = planmod.done_keys(cfg.csv_path(hc.name, v) for v in cfg.variants)
    method = bootmod.for_host(hc, cfg.boot_timeout_s, progress)
    todo_total = sum(1 for st in steps for sc in st.scenarios if planmod.run_key(hc.name, st.variant, sc) not in done)
    summary.skipped = sum(len(st.scenarios) for st in steps) - todo_total
    if not todo_total:
        log.info("%s: every run already has an ok row; nothing to do", hc.name)
        return summary
    try:
        host = method.open()
    except InfraError as exc:
        why = f"{hc.name} unreachable: {exc.one_line()}"
        summary.errors.append(why)
        for st in steps:
            todo = [sc for sc in st.scenarios if planmod.run_key(hc.name, st.variant, sc) not in done]
            summary.failed += _failed_rows(cfg, hc, arts[st.variant], todo, why)
        return summary
    try:
        summary.default_release = host.run(["uname", "-r"], timeout=30).text.strip()
        current: Optional[str] = None
        broken: Dict[str, str] = {}
        host_down = ""
        for step in steps:
            art = arts[step.variant]
            todo = [sc for sc in step.scenarios if planmod.run_key(hc.name, step.variant, sc) not in done]
            if not todo:
                continue
            if host_down or step.variant in broken:
                why = host_down or broken[step.variant]
                summary.failed += _failed_rows(cfg, hc, art, todo, why)
                continue
            if current != step.variant:
                try:
                    release = method.boot(host, art)
                    summary.boots.append(f"{art.variant} {release}")
                    current = step.variant
                except MigstallError as exc:
                    if isinstance(exc, UserError) and not isinstance(exc, InfraError):
                        raise
                    current = None
                    _keep_log(exc, cfg.out / hc.name, f"boot-{art.variant}")
                    why = f"booting {art.variant} on {hc.name} failed: {exc.one_line()}"
                    log.error("%s", why)
                    summary.errors.append(why)
                    broken[step.variant] = why
                    summary.failed += _failed_rows(cfg, hc, art, todo, why)
                    try:
                        method.restore(host, summary.default_release)
                    except MigstallError as rexc:
                        host_down = f"{hc.name} did not come back after a failed boot: {rexc.one_line()}"
                        summary.errors.append(host_down)
                    continue
            ctx = RunContext(host=host, out=cfg.csv_path(hc.name, step.variant), host_label=hc.name,
                             kernel_variant=step.variant, series_id=art.series_id, progress=progress)
            rows = asyncio.run(run_matrix(ctx, todo))
            summary.ran += len(rows)
            summary.failed += sum(1 for r in rows if r.get("status") != results.STATUS_OK)
    finally:
        try:
            if cfg.restore_default and summary.default_release and not host_down_final(summary):
                method.restore(host, summary.default_release)
        except MigstallError as exc:
            summary.errors.append(f"{hc.name}: could not return to {summary.default_release}: {exc.one_line()}")
        finally:
            method.close(host)
    return summary


def _keep_log(exc: BaseException, directory: Path, stem: str) -> None:
    """Copy the log an InfraError points at (e.g. L1's console, removed with its
    runtime dir) next to the results, and point the error at the copy."""
    src = getattr(exc, "log_path", None)
    if not src or not Path(src).is_file():
        return
    import datetime as _dt
    import shutil

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = directory / f"{stem}-{stamp}.log"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    except OSError as err:
        log.warning("could not keep %s: %s", src, err)
        return
    exc.log_path = str(dest)  # type: ignore[attr-defined]


def host_down_final(summary: HostSummary) -> bool:
    return any("did not come back" in e for e in summary.errors)


def compare_and_report(cfg: NightlyConfig, outcome: NightlyOutcome) -> None:
    from harness.compare import api

    csvs = {v: [str(cfg.csv_path(h.name, v)) for h in cfg.hosts if cfg.csv_path(h.name, v).is_file()]
            for v in cfg.variants}
    base_v = cfg.variants[0]
    try:
        for new_v in cfg.variants[1:]:
            if not csvs[base_v] or not csvs[new_v]:
                outcome.compare_error = f"no results for {base_v if not csvs[base_v] else new_v}; nothing to compare"
                continue
            rdir = cfg.report if len(cfg.variants) == 2 else cfg.report / f"{base_v}-vs-{new_v}"
            md = rdir / "comparison.md"
            res = api.run(csvs[base_v], csvs[new_v], threshold_pct=cfg.threshold,
                          gates=() if cfg.baseline else cfg.gates, report_dir=rdir, markdown=md,
                          csv_out=rdir / "comparison.csv",
                          title=f"migstall nightly: {base_v} vs {new_v}")
            outcome.report_dirs.append(rdir)
            outcome.markdown.append(md)
            outcome.gate_failures += list(res.gate_failures)
        if cfg.baseline is not None:
            from harness.compare import load

            have = {r.get("kernel_variant") for r in load.load(str(cfg.baseline)).runs}
            for v in cfg.variants:
                if v not in have or not csvs[v]:
                    continue
                md = cfg.report / f"baseline-{v}.md"
                res = api.run([str(cfg.baseline)], csvs[v], base_variant=v, threshold_pct=cfg.threshold,
                              gates=cfg.gates, markdown=md)
                outcome.markdown.append(md)
                outcome.gate_failures += [f"{v} vs baseline: {f}" for f in res.gate_failures]
    except UserError as exc:
        outcome.compare_error = exc.one_line()


def run_nightly(cfg: NightlyConfig, progress: Optional[Progress] = None) -> NightlyOutcome:
    from harness.nightly import kernels

    progress = progress or Progress()
    results.check_writable(cfg.csv_path(cfg.hosts[0].name, cfg.variants[0]))
    arts = kernels.resolve(cfg, progress)
    outcome = NightlyOutcome(hosts=[])
    for hc in cfg.hosts:
        try:
            outcome.hosts.append(run_host(cfg, hc, arts, progress))
        except InfraError as exc:
            s = HostSummary(hc.name, errors=[f"{hc.name}: {exc.one_line()}"])
            outcome.hosts.append(s)
            log.error("%s", s.errors[0])
    compare_and_report(cfg, outcome)
    return outcome
