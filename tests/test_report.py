"""The HTML report: self-contained, renders in headless Chromium, images load."""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from harness import cli

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
    # 3 scenarios x metrics figure, 1 timeline (the sidecars exist for mem=1024), 1 fit figure
    assert len(imgs) == 5
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
    assert 'data-imgcheck="5/5"' in dom.stdout, re.findall(r"data-imgcheck=\"[^\"]*\"", dom.stdout)
    # 2) the report itself, as is: a screenshot
    shot = tmp_path / "report.png"
    res = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000   # not a blank page
    keep = os.environ.get("MIGSTALL_KEEP_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
