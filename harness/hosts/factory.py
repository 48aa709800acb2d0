"""``--host`` specs -> Host objects.

* ``local``                    this machine (:class:`LocalHost`)
* ``ssh://[user@]host[:port]`` a remote machine over SSH (:class:`SSHHost`); user
  defaults to ``root``, port to 22.  The private key comes from the ``ssh_key``
  argument, else ``$MIGSTALL_SSH_KEY``, else the SSH agent.  Host keys are checked
  against the ``known_hosts`` argument, else ``$MIGSTALL_SSH_KNOWN_HOSTS``, else
  ``~/.ssh/known_hosts``; unknown or changed keys are refused.
* ``virtual[:KERNEL]``         an L1 VM under TCG with nested KVM (:class:`VirtualHost`).
  ``KERNEL`` is ``debian`` (default: Debian's kernel with the KVM modules loaded)
  or a path to a bzImage built with ``CONFIG_KVM=y`` and ``CONFIG_KVM_AMD=y``.
  The L1 VM is booted by ``open_host`` and stopped when the host is closed.
* ``vhost``                    the virtual host left running by ``migstall vhost up``
  (an SSHHost with that VM's pinned keys; closing it leaves the VM running).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from harness.errors import UserError
from harness.hosts.base import Host
from harness.hosts.local import LocalHost
from harness.progress import Progress

_SSH_RE = re.compile(r"^ssh://(?:(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]*)@)?"
                     r"(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>\d{1,5}))?/?$")
_USAGE = "use --host local, ssh://user@host[:port], virtual[:debian|/path/to/bzImage|KVM_MODULES_DIR] or vhost"

#: ``--host`` help text shared by every command that takes one
HOST_HELP = ("where QEMU runs: local | ssh://[user@]host[:port] | virtual[:debian|BZIMAGE|KVM_MODULES_DIR] | "
             "vhost (the VM left by `migstall vhost up`); default local")


@dataclass(frozen=True)
class HostSpec:
    kind: str                       # local | ssh | virtual | vhost
    user: str = "root"
    hostname: str = ""
    port: int = 22
    kernel: str = "debian"          # virtual: "debian", a bzImage path or a kvm-modules build dir


def parse_host_spec(spec: str) -> HostSpec:
    """Validate ``spec`` without connecting or starting anything (bad input -> UserError)."""
    spec = (spec or "").strip()
    if spec == "local":
        return HostSpec("local")
    if spec.startswith("ssh://"):
        m = _SSH_RE.match(spec)
        if not m:
            raise UserError(f"--host {spec!r} is not a valid SSH spec; {_USAGE}")
        port = int(m.group("port") or 22)
        if not 0 < port < 65536:
            raise UserError(f"--host {spec!r}: port {port} is out of range 1-65535")
        return HostSpec("ssh", user=m.group("user") or "root", hostname=m.group("host").strip("[]"), port=port)
    if spec == "vhost":
        return HostSpec("vhost")
    if spec == "virtual" or spec.startswith("virtual:"):
        kernel = spec.partition(":")[2] or "debian"
        if kernel != "debian":
            path = Path(kernel).expanduser()
            if path.is_dir():
                from harness.kernel.modules import load_build

                load_build(path)                 # a kvm-modules build, or UserError
            elif not path.is_file():
                raise UserError(f"--host {spec!r}: kernel {kernel} does not exist; pass a bzImage built "
                                f"with CONFIG_KVM=y/CONFIG_KVM_AMD=y (migstall kernel build), the output "
                                f"directory of `migstall kernel build --target kvm-modules`, or 'virtual:debian'")
            kernel = str(path.resolve())
        return HostSpec("virtual", kernel=kernel)
    raise UserError(f"--host {spec!r} is not supported; {_USAGE}")


def open_host(spec: str, *, ssh_key: Optional[str] = None, known_hosts: Optional[str] = None,
              l1_cmdline: str = "", progress: Optional[Progress] = None) -> Host:
    """Return an open Host for ``spec``; use it as a context manager (closing it
    stops a virtual host's L1 VM)."""
    parsed = parse_host_spec(spec)
    if parsed.kind == "local":
        return LocalHost()
    if parsed.kind == "ssh":
        from harness.hosts.ssh import SSHHost

        key = ssh_key or os.environ.get("MIGSTALL_SSH_KEY") or None
        kh = known_hosts or os.environ.get("MIGSTALL_SSH_KNOWN_HOSTS") or None
        display = f"ssh://{parsed.user}@{parsed.hostname}" + (f":{parsed.port}" if parsed.port != 22 else "")
        return SSHHost(parsed.hostname, user=parsed.user, port=parsed.port, key_file=key,
                       known_hosts=kh, name=display)
    if parsed.kind == "vhost":
        from harness.hosts.virtual import attach_running

        return attach_running()
    from harness.hosts.virtual import VirtualHost

    host = VirtualHost(kernel=parsed.kernel, cmdline_extra=l1_cmdline, progress=progress)
    host.start()
    return host
