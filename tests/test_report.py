"""The HTML report: self-contained, renders in headless Chromium, images load."""

from __future__ import annotations

import base64
import csv
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from harness import cli
from harness.compare import plots

FIX = Path(__file__).parent / "fixtures" / "compare"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_TIMEOUT_S = 180      # the machine is shared; Chromium normally takes ~2 s


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.iterdir()))}"
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}", *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT_S)
    finally:
        if proc.poll() is None or True:
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # Chromium's helpers are in its session
            except ProcessLookupError:
                pass
        proc.wait()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("report")
    rc = cli.main(["compare", str(FIX / "stock.csv"), str(FIX / "patched.csv"), "--report", str(d / "rep"),
                   "--fail-on", "dirty_log_start_ms:+10", "--quiet"])
    assert rc == 0
    return d / "rep" / "index.html"


def test_report_is_self_contained(report):
    text = report.read_text()
    srcs = re.findall(r"""\b(?:src|href)\s*=\s*['"]([^'"]*)['"]""", text)
    imgs = re.findall(r"<img\b[^>]*\bsrc='([^']*)'", text)
    # the headline, 3 scenarios x metrics figure, 1 timeline (the sidecars exist for mem=1024), 1 fit figure
    assert len(imgs) == 6
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in imgs:
        png = base64.b64decode(s.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "<script" not in text and "@import" not in text and "url(" not in text
    assert "Gate passed" in text and "9 s (stock) and 0.5 s (patched)" in text


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (scripts/setup-host)")
def test_report_renders_in_chromium(report, tmp_path):
    # 1) the images decode in the browser: a copy of the report with a tiny load check
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace(
        "</body>",
        "<script>window.addEventListener('load',()=>{const i=[...document.images];"
        "const ok=i.filter(x=>x.complete&&x.naturalWidth>0&&x.src.startsWith('data:image/png')).length;"
        "document.body.setAttribute('data-imgcheck',ok+'/'+i.length);});</script></body>"))
    dom = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-imgcheck="6/6"' in dom.stdout, re.findall(r"data-imgcheck=\"[^\"]*\"", dom.stdout)
    # 2) the report itself, as is: a screenshot
    shot = tmp_path / "report.png"
    res = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000   # not a blank page
    keep = os.environ.get("MIGSTALL_KEEP_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)


# --- the headline figure, the provenance table, the precopy figure ------------------------------

def _png_width(src: str) -> int:
    png = base64.b64decode(src.split(",", 1)[1])
    return int.from_bytes(png[16:20], "big")


def _imgs(text: str) -> list:
    """(alt, src) of every image, in document order."""
    return re.findall(r"<img alt='([^']*)' src='([^']*)'", text)


def _prov_row(text: str, name: str) -> str:
    rows = re.findall(r"<tr[^>]*>(?:(?!</tr>).)*<code>" + re.escape(name) + r"</code>.*?</tr>", text)
    assert len(rows) == 1, (name, rows)
    return rows[0]


def _edited(src: Path, dst: Path, edit) -> Path:
    """A copy of a results CSV with every row (a dict) passed through ``edit``; a column
    mapped to None in the first row's result is dropped from the file."""
    with open(src, newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows = [edit(dict(r)) for r in rows]
    header = [c for c in rows[0] if rows[0][c] is not None]
    with open(dst, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return dst


def _report(tmp_path: Path, base: Path, new: Path) -> str:
    out = tmp_path / "rep"
    assert cli.main(["compare", str(base), str(new), "--report", str(out), "--quiet"]) == 0
    return (out / "index.html").read_text()


def test_headline_first_and_provenance(report):
    text = report.read_text()
    order = [text.index(h) for h in ("<h2>Headline", "<h2>Provenance", "<h2>BASE vs NEW", "<h2>Method")]
    assert order == sorted(order)
    imgs = _imgs(text)
    assert imgs[0][0].startswith("headline")                 # the first figure of the report
    assert text.index(imgs[0][1]) < text.index("<h2>Provenance")
    assert _png_width(imgs[0][1]) > 1000                     # two panels: dirty-log start and pio
    assert "class='note'" not in text                        # every scenario has pio stalls
    # the kernels differ (stock vs patched): highlighted; QEMU, host and memory sizes are the same
    row = _prov_row(text, "host_kernel")
    assert "class='diff'" in row
    assert "6.1.0-migstall-stock-1a2b3c4d" in row and "6.1.0-migstall-patched-1a2b3c4d" in row
    assert "class='diff'" in _prov_row(text, "kernel_variant")
    for same in ("qemu_version", "host", "accel", "vcpus", "backing", "loops"):
        assert "class='diff'" not in _prov_row(text, same), same
    # stock has a ring scenario that patched lacks
    assert "class='diff'" in _prov_row(text, "dirty_log_mode")
    assert "17 (16 ok, 1 failed)" in text and "16 (15 ok, 1 failed)" in text
    assert "2026-11-25 01:01:00 .. 2026-11-25 01:15:00 UTC" in text


def test_headline_without_pio_column(tmp_path):
    """Results without the pio stall columns (no pio loop, or an older schema): dirty-log
    start only, and the report says so."""
    def drop_pio(r):
        return {k: (None if k.startswith("stall_pio_") else v) for k, v in r.items()}

    base = _edited(FIX / "stock.csv", tmp_path / "stock.csv", drop_pio)
    new = _edited(FIX / "patched.csv", tmp_path / "patched.csv", drop_pio)
    assert "stall_pio_max_us" not in base.read_text().splitlines()[0]
    text = _report(tmp_path, base, new)
    imgs = _imgs(text)
    assert imgs[0][0].startswith("headline") and _png_width(imgs[0][1]) < 1000    # one panel
    assert "No scenario has stall_pio_max_us data" in text and "dirty-log start only" in text


def test_headline_scenario_without_pio(tmp_path):
    """One scenario without pio stalls: still in the headline (dirty-log start), named in a note."""
    def no_pio_1024(r):
        if r["guest_mem_mib"] == "1024":
            r.update({k: "" for k in r if k.startswith("stall_pio_")})
        return r

    def new_without_pio_2048(r):
        if r["guest_mem_mib"] == "2048":
            r.update({k: "" for k in r if k.startswith("stall_pio_")})
        return no_pio_1024(r)

    base = _edited(FIX / "stock.csv", tmp_path / "stock.csv", no_pio_1024)
    new = _edited(FIX / "patched.csv", tmp_path / "patched.csv", new_without_pio_2048)
    text = _report(tmp_path, base, new)
    notes = re.findall(r"<p class='note'>([^<]*)</p>", text)
    assert any("No stall_pio_max_us data for sweep mem=1024" in n and "dirty-log start only" in n for n in notes)
    assert any("mem=2048" in n and "new side" in n for n in notes), notes
    assert _png_width(_imgs(text)[0][1]) > 1000


def test_precopy_columns_plotted(tmp_path):
    """The precopy stall rates (and their baseline-window rates) get a figure per scenario."""
    def add_precopy(r):
        ok = r["status"] == "ok"
        rep = float(r["repeat"] or 1)
        for cls, rate in (("pio", 4.0), ("write", 9.0)):
            r[f"stall_{cls}_precopy_ms_per_s"] = f"{rate + rep / 10:g}" if ok else ""
            r[f"baseline_stall_{cls}_ms_per_s"] = f"{rate / 4 + rep / 20:g}" if ok else ""
        return r

    base = _edited(FIX / "stock.csv", tmp_path / "stock.csv", add_precopy)
    new = _edited(FIX / "patched.csv", tmp_path / "patched.csv", add_precopy)
    text = _report(tmp_path, base, new)
    alts = [a for a, _ in _imgs(text)]
    assert sum("precopy vs baseline" in a for a in alts) == 3             # one per scenario
    for col in ("stall_write_precopy_ms_per_s", "baseline_stall_pio_ms_per_s"):
        assert f"<td>{col}</td>" in text                                  # the table rows
    assert not any(m in plots.PLOT_METRICS for m in plots.PRECOPY_METRICS)


def test_fit_uses_mapped_memory_when_every_run_has_it():
    """Per-GiB figures use the memory KVM had mapped at start (issue 10), never a mix of mapped
    and guest sizes in one line; kvm_enable_ms is fitted too."""
    import pandas as pd

    rows = pd.DataFrame({"status": ["ok"] * 4 + ["failed"],
                         "guest_mem_mib": [512, 1024, 2048, 2048, 4096],
                         "kvm_mapped_mib": [256.0, 512.0, 1024.0, 1024.0, float("nan")],
                         "dirty_log_start_ms": [10.0, 20.0, 40.0, 42.0, 1.0],
                         "kvm_enable_ms": [5.0, 10.0, 20.0, 20.0, 1.0]})
    assert plots.fit_basis([rows], "dirty_log_start_ms") == plots.FIT_BASIS_MAPPED   # the failed row is not a point
    pts = plots.fit_points_frame(rows, "kvm_enable_ms", plots.FIT_BASIS_MAPPED)
    assert pts == [(0.25, 5.0), (0.5, 10.0), (1.0, 20.0), (1.0, 20.0)]
    fit = plots.linear_fit(pts, "base", metric="kvm_enable_ms", basis=plots.FIT_BASIS_MAPPED)
    assert fit is not None and abs(fit.slope_ms_per_gib - 20.0) < 1e-9 and fit.basis == "mapped GiB"
    gap = rows.copy()
    gap.loc[1, "kvm_mapped_mib"] = float("nan")
    assert plots.fit_basis([rows, gap], "dirty_log_start_ms") == plots.FIT_BASIS_GUEST
    assert plots.fit_points_frame(gap, "dirty_log_start_ms")[0] == (0.5, 10.0)


def test_report_fits_enable_and_start(report):
    text = report.read_text()
    assert "<code>kvm_enable_ms</code>" in text and "<code>dirty_log_start_ms</code>" in text
    assert "guest GiB" in text          # the fixture's rows predate kvm_mapped_mib
    assert "not native figures" in text
