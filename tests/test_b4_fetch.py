"""Fetching a series by Message-ID with the real b4, from a lore-shaped server.

:func:`lore_server` is a public-inbox look-alike on 127.0.0.1 (a free port,
stdlib ``ThreadingHTTPServer``): ``GET /all/<Message-ID>/t.mbox.gz`` answers
the gzipped thread, as lore does.  b4 is pointed at it through a private git
config (``GIT_CONFIG_GLOBAL``, with no identity, as on a fresh CI machine) or
through ``--lore-url``; the user's git config is never read or written.

The failures here stop before any kernel work (the series is read before the
base tree is prepared), so this module is fast.  The build of both variants
from a Message-ID is in test_kernel_build.py, which runs after the session's
background kernel build (conftest.py) and so hits its cache.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional

import pytest

from harness import paths
from harness.errors import UserError
from harness.kernel.manifest import check_lore_url, load_manifest
from harness.kernel.series import load_series

REPO = paths.REPO_ROOT
TEST_SERIES = REPO / "patches/migstall-dirtylog-tracepoints/series.toml"
TEST_MBOX = REPO / "patches/migstall-dirtylog-tracepoints/series.mbox"
#: the test series' own Message-ID: its cover letter's
TEST_MSGID = "cover.1795589080.git.migstall@example.org"
#: where patch 2/2 starts in the test series' mbox (its cover letter's From_ line names the same commit)
PATCH2 = b"\n\nFrom f83c59d0a12c6d0940f8b2fec7ab31360e8016af Mon Sep 17 00:00:00 2001\nMessage-Id: <f83c59d0"
#: how long a "hanging" server holds a request before it gives up (b4 is killed long before)
HANG_TIMEOUT = 60.0
#: timeout of one migstall call that fails before any kernel work
CLI_TIMEOUT = 120.0

pytestmark = pytest.mark.skipif(shutil.which("b4") is None, reason="b4 is not installed (apt-get install b4)")


@dataclass
class LoreServer:
    """What :func:`lore_server` yields: the inbox URL and the paths requested."""
    url: str                                   # http://127.0.0.1:PORT/all
    midmask: str                               # url + "/%s", as b4.midmask
    requests: List[str] = field(default_factory=list)


@contextlib.contextmanager
def lore_server(threads: Mapping[str, bytes], mode: str = "ok") -> Iterator[LoreServer]:
    """Serve ``threads`` (Message-ID -> mbox bytes) as lore does, gzipped, at
    ``/all/<Message-ID>/t.mbox.gz``; unknown Message-IDs get 404.  ``mode``
    "500" answers every request with HTTP 500, "hang" accepts and never answers
    (until the server stops, or HANG_TIMEOUT).  Stopped on exit, always."""
    if mode not in ("ok", "500", "hang"):
        raise ValueError(mode)
    release = threading.Event()
    state = LoreServer(url="", midmask="")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _msgid(self) -> Optional[str]:
            parts = urllib.parse.urlsplit(self.path).path.split("/")
            # /all/<quoted Message-ID>/t.mbox.gz  or  /all/<quoted Message-ID>/
            if len(parts) >= 4 and parts[1] == "all" and parts[3] in ("t.mbox.gz", ""):
                return urllib.parse.unquote_plus(parts[2])
            return None

        def _answer(self, head: bool) -> None:
            with lock:
                state.requests.append(f"{self.command} {self.path}")
            if mode == "hang":
                release.wait(HANG_TIMEOUT)
                self.close_connection = True
                return
            if mode == "500":
                self.send_error(500, "internal error (test server)")
                return
            msgid = self._msgid()
            if msgid is None or msgid not in threads:
                self.send_error(404, "no such message (test server)")
                return
            body = gzip.compress(threads[msgid]) if self.path.endswith("t.mbox.gz") else b""
            self.send_response(200)
            self.send_header("Content-Type", "application/gzip" if body else "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def do_GET(self) -> None:   # http.server's naming
            self._answer(head=False)

        def do_HEAD(self) -> None:
            self._answer(head=True)

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name="lore-server", daemon=True)
    try:
        thread.start()
        state.url = f"http://127.0.0.1:{server.server_address[1]}/all"
        state.midmask = state.url + "/%s"
        yield state
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def private_gitconfig(directory: Path, midmask: Optional[str]) -> Path:
    """A git config with b4.midmask and no identity (a fresh CI machine)."""
    path = directory / "gitconfig"
    path.write_text(f"[b4]\n\tmidmask = {midmask}\n" if midmask else "")
    return path


def b4_env(gitconfig: Path, cache: Optional[Path] = None) -> Dict[str, str]:
    """The environment of a migstall call: no git identity from anywhere, the
    private git config only (never the user's)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GIT_", "MIGSTALL_CACHE")) and k not in ("EMAIL",)}
    env.update({"GIT_CONFIG_GLOBAL": str(gitconfig), "GIT_CONFIG_NOSYSTEM": "1", "CI": "true"})
    if cache is not None:
        env["MIGSTALL_CACHE"] = str(cache)
    elif "MIGSTALL_CACHE" in os.environ:
        env["MIGSTALL_CACHE"] = os.environ["MIGSTALL_CACHE"]
    return env


def migstall(*args: str, env: Mapping[str, str], timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=dict(env))


def msgid_manifest(directory: Path, msgid: str = TEST_MSGID, patches: int = 2, extra: str = "") -> Path:
    """The test series' manifest with [series] naming its Message-ID instead of its mbox."""
    text = TEST_SERIES.read_text()
    assert 'mbox = "series.mbox"\npatches = 2\n' in text
    text = text.replace('mbox = "series.mbox"\npatches = 2\n', f'message_id = "{msgid}"\npatches = {patches}\n{extra}')
    path = directory / "series.toml"
    path.write_text(text)
    return path


def one_line(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def log_path(line: str) -> Path:
    assert "(log: " in line, line
    path = Path(line.rsplit("(log: ", 1)[1].rstrip(")"))
    assert path.is_file(), path
    return path


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# -- the server itself ------------------------------------------------------------------

def test_lore_server_serves_the_thread_gzipped_and_stops(tmp_path):
    import urllib.error
    import urllib.request

    with lore_server({TEST_MSGID: TEST_MBOX.read_bytes()}) as lore:
        quoted = urllib.parse.quote_plus(TEST_MSGID)
        with urllib.request.urlopen(f"{lore.url}/{quoted}/t.mbox.gz", timeout=10) as resp:
            assert gzip.decompress(resp.read()) == TEST_MBOX.read_bytes()
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(f"{lore.url}/nobody%40example.org/t.mbox.gz", timeout=10)
        assert exc.value.code == 404
        url = lore.url
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/{quoted}/t.mbox.gz", timeout=5)


# -- the series, through the library --------------------------------------------------------

def test_series_by_message_id_is_the_mbox_as_posted(tmp_path, cache, monkeypatch):
    """b4 fetches the thread (with a git config that has no identity); the
    series is its messages as posted, so it hashes as the local mbox does."""
    monkeypatch.setenv("MIGSTALL_CACHE", str(cache))
    for k in [k for k in os.environ if k.startswith("GIT_") or k == "EMAIL"]:
        monkeypatch.delenv(k)
    local = load_series(load_manifest(TEST_SERIES).series)
    with lore_server({TEST_MSGID: TEST_MBOX.read_bytes()}) as lore:
        monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(private_gitconfig(tmp_path, lore.midmask)))
        monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
        spec = load_manifest(msgid_manifest(tmp_path)).series
        fetched = load_series(spec)
        assert any("t.mbox.gz" in r for r in lore.requests), lore.requests
        n = len(lore.requests)
        again = load_series(spec)                      # cached by Message-ID: no request
        assert len(lore.requests) == n
    assert fetched.kind == "message_id" and fetched.origin == TEST_MSGID
    assert fetched.count == 2 and fetched.subjects == local.subjects
    assert fetched.sha256 == local.sha256 and again.sha256 == local.sha256
    assert fetched.mbox.read_bytes() == TEST_MBOX.read_bytes()
    assert "[PATCH 0/2]" not in fetched.am_mbox.read_text()
    b4log = fetched.mbox.parent / "b4.log"
    assert "Total patches: 2" in b4log.read_text()
    # migstall's identity went to b4 through the environment, not into any file
    assert "user" not in (tmp_path / "gitconfig").read_text()


def test_thread_with_a_reply_and_a_later_trailer_hashes_the_same(tmp_path, cache, monkeypatch):
    """A review reply in the thread (b4 adds its Reviewed-by to the patch) does
    not change the series: it is the posted messages, cover letter included."""
    monkeypatch.setenv("MIGSTALL_CACHE", str(cache))
    data = TEST_MBOX.read_bytes()
    reply = (b"From reviewer Mon Sep 17 00:00:00 2001\n"
             b"From: A Reviewer <reviewer@example.org>\n"
             b"Date: Thu, 26 Nov 2026 08:00:00 +0000\n"
             b"Subject: Re: [PATCH 1/2] KVM: x86: trace dirty-log enable and disable\n"
             b"Message-Id: <reply.1@example.org>\n"
             b"In-Reply-To: <9bc65ddd8bbdf56dfe6b425a24ea4486fa6eeaa4.1795589080.git.migstall@example.org>\n"
             b"References: <cover.1795589080.git.migstall@example.org>\n\n"
             b"Looks right.\n\nReviewed-by: A Reviewer <reviewer@example.org>\n\n")
    # the reply sits between the patches, as lore orders a thread by date
    cut = data.index(PATCH2) + 2
    with lore_server({TEST_MSGID: data[:cut] + reply + data[cut:]}) as lore:
        monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(private_gitconfig(tmp_path, None)))
        fetched = load_series(load_manifest(msgid_manifest(tmp_path)).series, lore_url=lore.url)
    assert fetched.mbox.read_bytes() == data
    b4log = (fetched.mbox.parent / "b4.log").read_text()
    assert "Total patches: 2" in b4log and "+ Reviewed-by: A Reviewer" in b4log


# -- failures, through the CLI: none of them needs a kernel build --------------------------

def test_unknown_message_id_exits_2_naming_it(tmp_path, cache):
    with lore_server({TEST_MSGID: TEST_MBOX.read_bytes()}) as lore:
        env = b4_env(private_gitconfig(tmp_path, lore.midmask), cache)
        missing = "no-such-series.1@example.org"
        proc = migstall("kernel", "build", "--manifest", str(msgid_manifest(tmp_path, missing)), env=env)
        assert any("t.mbox.gz" in r for r in lore.requests), "b4 asked the server"
    line = one_line(proc, 2)
    assert missing in line and lore.url in line and "fix [series] message_id" in line
    assert "no network" not in line
    assert not list(cache.glob("kernel-src/*")), "nothing was prepared"
    assert not list(cache.glob("kernel-series/msgid*-*/series.mbx"))


@pytest.mark.parametrize("mode", ["500", "hang"])
def test_server_error_or_silence_exits_1_with_b4s_log(tmp_path, cache, mode):
    with lore_server({TEST_MSGID: TEST_MBOX.read_bytes()}, mode=mode) as lore:
        env = b4_env(private_gitconfig(tmp_path, lore.midmask), cache)
        proc = migstall("kernel", "build", "--manifest", str(msgid_manifest(tmp_path)),
                        "--fetch-timeout", "8", env=env)
        assert lore.requests, "b4 asked the server"
    line = one_line(proc, 1)
    assert TEST_MSGID in line and "no network" not in line
    assert ("answered HTTP 500" in line) if mode == "500" else ("did not finish within 8s" in line)
    log = log_path(line)
    assert log.name == "b4.log" and "b4 am" in log.read_text() and "Grabbing thread" in log.read_text()
    assert not list(cache.glob("kernel-src/*"))
    assert not list(cache.glob("kernel-series/msgid*-*/series.mbx"))


def test_unreachable_server_says_no_network(tmp_path, cache):
    """The only case that guesses 'no network': nothing answers at the address."""
    with lore_server({}) as lore:
        url = lore.url                                  # a port that was free, now closed
    env = b4_env(private_gitconfig(tmp_path, None), cache)
    proc = migstall("kernel", "build", "--manifest", str(msgid_manifest(tmp_path)), "--lore-url", url, env=env)
    line = one_line(proc, 1)
    assert "cannot reach 127.0.0.1:" in line and "no network?" in line and TEST_MSGID in line
    assert log_path(line).name == "b4.log"


def test_thread_missing_a_patch_exits_2(tmp_path, cache):
    """The server's thread lacks patch 2/2: b4 writes one patch, the manifest says 2."""
    data = TEST_MBOX.read_bytes()
    partial = data[:data.index(PATCH2) + 2]
    with lore_server({TEST_MSGID: partial}) as lore:
        env = b4_env(private_gitconfig(tmp_path, lore.midmask), cache)
        proc = migstall("kernel", "build", "--manifest", str(msgid_manifest(tmp_path)), env=env)
    line = one_line(proc, 2)
    assert f"series {TEST_MSGID} has 1 patches but the manifest says 2" in line
    assert "fix [series] patches" in line
    assert not list(cache.glob("kernel-src/*"))


def test_wrong_patch_count_in_the_manifest_exits_2(tmp_path, cache):
    with lore_server({TEST_MSGID: TEST_MBOX.read_bytes()}) as lore:
        env = b4_env(private_gitconfig(tmp_path, lore.midmask), cache)
        proc = migstall("kernel", "build", "--manifest", str(msgid_manifest(tmp_path, patches=3)), env=env)
    line = one_line(proc, 2)
    assert "has 2 patches but the manifest says 3" in line
    assert not list(cache.glob("kernel-src/*"))


# -- the lore_url setting ---------------------------------------------------------------------

def test_lore_url_in_the_manifest_overrides_the_git_config(tmp_path, cache):
    """[series] lore_url wins over b4.midmask (which points nowhere here)."""
    with lore_server({TEST_MSGID: TEST_MBOX.read_bytes()}) as lore:
        env = b4_env(private_gitconfig(tmp_path, "http://127.0.0.1:9/all/%s"), cache)
        manifest = msgid_manifest(tmp_path, patches=3, extra=f'lore_url = "{lore.url}/"\n')
        proc = migstall("kernel", "build", "--manifest", str(manifest), env=env)
        assert any("t.mbox.gz" in r for r in lore.requests)
    assert "has 2 patches but the manifest says 3" in one_line(proc, 2)


@pytest.mark.parametrize("value", ["ftp://lore.kernel.org/all", "lore.kernel.org/all", "https://", "http://h/a?x=1",
                                   "https://lore.kernel.org/all/%s", "https://h:99999/all", "https://h/a b"])
def test_bad_lore_url_exits_2(tmp_path, cache, value):
    with pytest.raises(UserError):
        check_lore_url(value, "--lore-url")
    env = b4_env(private_gitconfig(tmp_path, None), cache)
    line = one_line(migstall("kernel", "build", "--manifest", str(msgid_manifest(tmp_path)), "--lore-url", value,
                             env=env), 2)
    assert "--lore-url" in line and "https://lore.kernel.org/all" in line
    bad = msgid_manifest(tmp_path, extra=f'lore_url = "{value}"\n')
    line = one_line(migstall("kernel", "build", "--manifest", str(bad), env=env), 2)
    assert "[series] lore_url" in line and "https://lore.kernel.org/all" in line
    assert not cache.exists() or not list(cache.glob("kernel-series/msgid*-*/b4.log")), "b4 never ran"


def test_lore_url_only_with_message_id(tmp_path):
    text = TEST_SERIES.read_text().replace("patches = 2\n", 'patches = 2\nlore_url = "https://lore.kernel.org/all"\n')
    (tmp_path / "series.mbox").write_bytes(TEST_MBOX.read_bytes())
    path = tmp_path / "series.toml"
    path.write_text(text)
    with pytest.raises(UserError, match="lore_url applies only to message_id"):
        load_manifest(path)


def test_good_lore_urls_are_normalised():
    assert check_lore_url("https://lore.kernel.org/all/", "x") == "https://lore.kernel.org/all"
    assert check_lore_url("http://127.0.0.1:8080/all", "x") == "http://127.0.0.1:8080/all"
    assert load_manifest(REPO / "patches/fast-dbit-cleanup-v1/series.toml").series.lore_url is None


def test_b4s_git_identity_and_midmask_come_from_the_environment(tmp_path, monkeypatch):
    """Without migstall's additions git has no identity here (what b4 would get
    from a git that ignores GIT_CONFIG_COUNT): that is caught up front."""
    from harness.kernel.series import DEFAULT_MIDMASK, _b4_env, _effective_midmask

    for k in [k for k in os.environ if k.startswith("GIT_") or k == "EMAIL"]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(private_gitconfig(tmp_path, None)))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    with pytest.raises(UserError, match="user.name NAME and user.email ADDR"):
        _effective_midmask(dict(os.environ), None, tmp_path)
    assert _effective_midmask(_b4_env(None, tmp_path), None, tmp_path) == DEFAULT_MIDMASK
    mask = "http://127.0.0.1:1/all/%s"
    assert _effective_midmask(_b4_env(mask, tmp_path), mask, tmp_path) == mask
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(private_gitconfig(tmp_path, "https://mirror.example/all/%s")))
    assert _effective_midmask(_b4_env(None, tmp_path), None, tmp_path) == "https://mirror.example/all/%s"
    assert _effective_midmask(_b4_env(mask, tmp_path), mask, tmp_path) == mask       # lore_url wins over git config
    assert "user" not in (tmp_path / "gitconfig").read_text()
