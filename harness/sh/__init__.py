"""The shell scripts the harness runs on hosts or puts into images: one ``*.sh``
file each, in this directory (package data, so an installed migstall has them),
checked by ``shellcheck`` in ``make lint``.

* ``kvm_trace_lib.sh``, ``kvm_trace_setup.sh``, ``kvm_trace_teardown.sh``: the
  tracefs scripts of :class:`harness.measure.kvm_trace.KvmTracer`, run with
  ``sh -c SCRIPT sh ARGS...`` (values as positional arguments);
* ``l1_rcS.sh``: the virtual host's ``/etc/init.d/rcS`` (:mod:`harness.hosts.l1image`);
* ``l1_keeper.sh``: the probe keeper that rcS runs
  (:func:`harness.measure.kvm_trace.keeper_init_script`).

A script that runs here or over SSH takes its values as arguments.  The L1 ones
run on another machine, from an initramfs built here, so their values are baked
in: :func:`fill` replaces each ``@NAME@`` word with the shell-quoted value.
"""

from __future__ import annotations

import re
import shlex
from importlib import resources
from typing import Mapping, Sequence, Set, Union

_TOKEN_RE = re.compile(r"@([A-Z][A-Z0-9_]*)@")


def script(name: str) -> str:
    """The text of ``name`` (a file of this directory)."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def fill(text: str, values: Mapping[str, Union[str, Sequence[str]]]) -> str:
    """``text`` with each ``@NAME@`` replaced by ``shlex.quote(values[NAME])``, or,
    for a list, by its items quoted one by one and joined by spaces (several words).
    One pass: a value is never searched for tokens.  Every ``@NAME@`` of ``text``
    needs a value and every value a ``@NAME@``."""
    used: Set[str] = set()

    def quoted(m: "re.Match[str]") -> str:
        name = m.group(1)
        if name not in values:
            raise ValueError(f"@{name}@ has no value")
        used.add(name)
        value = values[name]
        return shlex.quote(value) if isinstance(value, str) else " ".join(shlex.quote(v) for v in value)

    text = _TOKEN_RE.sub(quoted, text)
    unused = sorted(set(values) - used)
    if unused:
        raise ValueError(f"not in the script: {', '.join('@' + n + '@' for n in unused)}")
    return text
