"""Apply a series to the base with ``git am -3`` in a fresh worktree.

The patched commit is kept as ``refs/migstall/applied/<series16>-<base12>``
in the base repository (so applying twice is free); the worktree is always
removed.  When a patch does not apply, the error names the patch, the file
and the base, and nothing is left behind: no worktree, no ref.
"""

from __future__ import annotations

import logging
import re
import shutil
import uuid
from typing import Optional

from harness.errors import UserError
from harness.kernel.run import git
from harness.kernel.series import Series
from harness.kernel.source import SourceTree
from harness.progress import Progress

log = logging.getLogger(__name__)

#: timeout of creating a worktree (a full checkout) or of ``git am``, seconds
APPLY_TIMEOUT = 900.0

_FILE_PATTERNS = (
    re.compile(r"CONFLICT \([^)]*\): .*?(?:in|of) (\S+)"),
    re.compile(r"error: patch failed: (\S+?):\d+"),
    re.compile(r"sha1 information is lacking or useless \((\S+?)\)"),
    re.compile(r"error: (\S+?): (?:does not exist in index|already exists in (?:index|working directory)|"
               r"does not match index|patch does not apply)"),
)


def applied_ref(source: SourceTree, series: Series) -> str:
    return f"refs/migstall/applied/{series.sha256[:16]}-{source.commit[:12]}"


def _failure(source: SourceTree, series: Series, output: str) -> UserError:
    m = re.search(r"Patch failed at (\d+) (.*)", output)
    number = int(m.group(1)) if m else 0
    subject = m.group(2).strip() if m else "?"
    where = "?"
    for pat in _FILE_PATTERNS:
        f = pat.search(output)
        if f:
            where = f.group(1)
            break
    base = f"{source.description} ({source.version}, {source.commit[:12]})"
    return UserError(f"series {series.origin}: patch {number}/{series.count} '{subject}' does not apply "
                     f"to {base}: conflict in {where}; rebase the series onto that base or fix [base]")


def apply_series(source: SourceTree, series: Series, progress: Optional[Progress] = None) -> str:
    """Return the commit of base + series (cached as a ref in the base repo)."""
    progress = progress or Progress()
    repo = source.repo
    ref = applied_ref(source, series)
    have = git(["rev-parse", "--verify", "--quiet", ref], repo=repo, check=False)
    if have.returncode == 0:
        return have.stdout.strip()
    wt = repo.parent / f"am-{uuid.uuid4().hex[:8]}"
    try:
        with progress.task(f"git am -3 ({series.count} patches) on {source.version}"):
            git(["worktree", "add", "-q", "--detach", wt, source.commit], repo=repo, timeout=APPLY_TIMEOUT)
            proc = git(["am", "-3", "--committer-date-is-author-date", series.am_mbox], repo=wt,
                       timeout=APPLY_TIMEOUT, check=False)
        if proc.returncode != 0:
            err = _failure(source, series, proc.stdout + "\n" + proc.stderr)
            git(["am", "--abort"], repo=wt, check=False)
            log.info("git am failed:\n%s\n%s", proc.stdout, proc.stderr)
            raise err
        commit = git(["rev-parse", "HEAD"], repo=wt).stdout.strip()
        git(["update-ref", ref, commit], repo=repo)
        return commit
    finally:
        git(["worktree", "remove", "--force", wt], repo=repo, check=False)
        shutil.rmtree(wt, ignore_errors=True)
        git(["worktree", "prune"], repo=repo, check=False)
