"""Run local tools (git, tar, b4, make) for kernel work, with timeouts.

Kernel builds happen on this machine (the artifacts are then staged to
whatever host boots them), so this is a thin wrapper over subprocess with
the project's rules: argv lists, a timeout on every call, a fixed identity
and dates for git so that applying a series gives the same commits.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import IO, Mapping, Optional, Sequence, Union

from harness.errors import CommandTimeout, KernelBuildInfraError

log = logging.getLogger(__name__)

#: default timeout of a git/tar call, seconds (extracting or importing a full tree is the slow case)
DEFAULT_TIMEOUT = 900.0

#: identity and dates for commits migstall makes, so they are reproducible
GIT_ENV = {
    "GIT_AUTHOR_NAME": "migstall", "GIT_AUTHOR_EMAIL": "migstall@localhost",
    "GIT_COMMITTER_NAME": "migstall", "GIT_COMMITTER_EMAIL": "migstall@localhost",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00+00:00", "GIT_COMMITTER_DATE": "2000-01-01T00:00:00+00:00",
    "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C",
}


def run(argv: Sequence[Union[str, Path]], *, cwd: Optional[Path] = None, timeout: float = DEFAULT_TIMEOUT,
        env: Optional[Mapping[str, str]] = None, check: bool = True,
        stdout: Optional[int] = None) -> subprocess.CompletedProcess:
    """Run argv; output is captured (text).  Raises CommandTimeout, or
    KernelBuildInfraError when ``check`` and the exit status is non-zero."""
    args = [str(a) for a in argv]
    full_env = {**os.environ, **(env or {})}
    log.debug("run %s (cwd=%s)", " ".join(args), cwd)
    try:
        proc = subprocess.run(args, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL, text=True,
                              stdout=stdout if stdout is not None else subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=timeout, errors="replace")
    except subprocess.TimeoutExpired as exc:
        raise CommandTimeout(f"{' '.join(args[:3])} did not finish within {timeout:g}s") from exc
    except FileNotFoundError as exc:
        raise KernelBuildInfraError(f"{args[0]}: command not found") from exc
    if check and proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [""]
        raise KernelBuildInfraError(f"{' '.join(args[:4])} exited {proc.returncode}: {tail[0]}")
    return proc


def git(args: Sequence[Union[str, Path]], *, repo: Path, timeout: float = DEFAULT_TIMEOUT,
        check: bool = True, env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
    """``git -C repo ARGS`` with migstall's fixed identity."""
    return run(["git", "-C", repo, "-c", "gc.auto=0", "-c", "core.autocrlf=false", *args],
               timeout=timeout, check=check, env={**GIT_ENV, **(env or {})})


def run_logged(argv: Sequence[str], logfh: IO[str], cwd: Optional[Path], deadline: float, what: str,
               limit_s: float) -> int:
    """Run ``argv`` (a build) with its output appended to ``logfh``, in its own
    process group, and return its exit status; at the ``time.monotonic()``
    ``deadline`` the whole group is killed and CommandTimeout says that
    ``what`` did not finish within ``limit_s``."""
    logfh.write(f"$ {shlex.join(argv)}\n")
    logfh.flush()
    proc = subprocess.Popen(list(argv), cwd=cwd, stdin=subprocess.DEVNULL, stdout=logfh,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired as exc:
        raise CommandTimeout(f"{what} did not finish within {limit_s:g}s") from exc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
