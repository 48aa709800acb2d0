"""``--host`` specs -> Host objects.

* ``local``
* ``ssh://user@host[:port]``  (SSHHost; filled in by the virtual-host work)
* ``virtual[:KERNEL]``        (VirtualHost; filled in by the virtual-host work)
"""

from __future__ import annotations

from harness.errors import UserError
from harness.hosts.base import Host
from harness.hosts.local import LocalHost


def parse_host_spec(spec: str) -> None:
    """Validate ``spec`` without connecting (bad input -> UserError)."""
    if spec != "local":
        raise UserError(f"--host {spec!r} is not supported yet; use --host local")


def open_host(spec: str) -> Host:
    """Return an open Host for ``spec``; use it as a context manager."""
    parse_host_spec(spec)
    return LocalHost()
