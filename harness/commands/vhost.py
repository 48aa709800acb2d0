"""``migstall vhost up|down|ssh|status``: the virtual host, kept running for debugging.

``up`` boots L1 (see :mod:`harness.hosts.virtual`) and leaves it running; its
pid, SSH port and pinned keys are recorded in ``<cache>/vhost/state.json``.
While it is up, ``migstall run --host vhost`` runs scenarios in it, and
``migstall vhost ssh [-- CMD...]`` opens an SSH session with the pinned keys
(``StrictHostKeyChecking=yes`` against the per-VM known_hosts); CMD runs with
the words given, as an argument list (``-- sh -c 'a; b'`` works).  L1's own QMP
monitor is the ``qmp_socket`` that ``status`` prints (for a stuck L1).  ``down`` stops
it (SIGTERM, then SIGKILL) and removes its directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
from pathlib import Path
from typing import Any, Dict, List

from harness.errors import UserError
from harness.progress import for_terminal

# harness.hosts.virtual (and with it paramiko) is imported by the subcommands
# only: every migstall command builds this parser


def _up(args: argparse.Namespace) -> int:
    from harness.hosts.virtual import DEFAULT_L1_MEM_MIB, VirtualHost, running_state, vhost_dir

    if args.mem is None:
        args.mem = DEFAULT_L1_MEM_MIB
    if running_state() is not None:
        raise UserError("a virtual host is already up; use it (--host vhost) or stop it with 'migstall vhost down'")
    if args.mem < 1024:
        raise UserError(f"--mem {args.mem} is too small for L1 (QEMU + an L2 guest); use at least 1024")
    workdir = vhost_dir()
    shutil.rmtree(workdir, ignore_errors=True)
    kernel = args.kernel
    if kernel != "debian":
        if not Path(kernel).is_file():
            raise UserError(f"kernel {kernel} does not exist; pass a bzImage with CONFIG_KVM=y or 'debian'")
        kernel = str(Path(kernel).resolve())
    vh = VirtualHost(kernel=kernel, mem_mib=args.mem, cmdline_extra=args.l1_cmdline, progress=for_terminal(),
                     workdir=workdir)
    try:
        vh.start()
        st = vh.detach()
    except BaseException:
        vh.close()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    print(f"virtual host up: {st['name']}, L1 pid {st['pid']}, ssh root@127.0.0.1 -p {st['port']} "
          f"(booted in {vh.boot_s:.1f} s)")
    print("  run scenarios in it:  migstall run --host vhost ...")
    print("  shell:                migstall vhost ssh")
    print("  stop it:              migstall vhost down")
    return 0


def _down(args: argparse.Namespace) -> int:
    from harness.hosts.virtual import stop_running, vhost_dir

    if not (vhost_dir() / "state.json").exists():
        print("no virtual host is up")
        return 0
    pid = stop_running()
    print(f"virtual host stopped (pid {pid})")
    return 0


def ssh_argv(st: Dict[str, Any], command: List[str]) -> List[str]:
    return ["ssh", "-i", st["key_file"], "-p", str(st["port"]),
            "-o", f"UserKnownHostsFile={st['known_hosts']}", "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "root@127.0.0.1", *command]


def _ssh(args: argparse.Namespace) -> int:
    from harness.hosts.virtual import running_state

    st = running_state()
    if st is None:
        raise UserError("no virtual host is up; start one with 'migstall vhost up'")
    command = list(args.cmd)
    if command[:1] == ["--"]:
        command = command[1:]
    # one quoted string: the remote shell sees the same argv as given here
    # (plain ssh would join the words, so `sh -c 'a; b'` would lose its quoting)
    argv = ssh_argv(st, [shlex.join(command)] if command else [])
    if shutil.which("ssh") is None:
        raise UserError("ssh not found; install openssh-client (make setup)")
    os.execvp("ssh", argv)
    return 0  # not reached


def _status(args: argparse.Namespace) -> int:
    from harness.hosts.virtual import running_state

    st = running_state()
    if st is None:
        print("no virtual host is up")
        return 1
    print(json.dumps(st, indent=2))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("vhost", help="start/stop/enter the virtual host (L1 VM with nested KVM) for debugging",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    vs = p.add_subparsers(dest="vhost_cmd", metavar="ACTION", required=True)
    up = vs.add_parser("up", help="boot L1 and keep it running")
    up.add_argument("--kernel", default="debian", help="'debian' (default) or a bzImage with CONFIG_KVM=y")
    up.add_argument("--mem", type=int, default=None, help="L1 memory, MiB (default 3072: DEFAULT_L1_MEM_MIB)")
    up.add_argument("--l1-cmdline", default="", help="extra L1 kernel arguments, e.g. kvm.tdp_mmu=0")
    up.set_defaults(func=_up)
    down = vs.add_parser("down", help="stop the running L1")
    down.set_defaults(func=_down)
    ssh = vs.add_parser("ssh", help="SSH into L1 with the pinned keys: migstall vhost ssh [-- CMD...]")
    ssh.add_argument("cmd", nargs=argparse.REMAINDER)
    ssh.set_defaults(func=_ssh)
    status = vs.add_parser("status", help="print the running L1's state (exit 1 if none)")
    status.set_defaults(func=_status)
