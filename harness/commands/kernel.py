"""``migstall kernel build|list``: stock and patched kernels from a series manifest."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from harness import progress as progress_mod


def register(sub: "argparse._SubParsersAction") -> None:
    parser = sub.add_parser("kernel", help="build stock and patched kernels from a series manifest",
                            description="Build stock and patched kernels from a series manifest "
                                        "(patches/<name>/series.toml); builds are cached by content.")
    ksub = parser.add_subparsers(dest="kernel_command", metavar="ACTION")

    b = ksub.add_parser("build", help="build (or fetch from the cache) stock/patched kernels")
    b.add_argument("--manifest", required=True, help="patches/<name>/series.toml")
    b.add_argument("--variant", choices=("stock", "patched", "both"), default="both")
    b.add_argument("--config", default=None,
                   help="tiny | defconfig | distro | PATH (default: the manifest's, else tiny)")
    b.add_argument("--source", default=None,
                   help="override the manifest's base: DIR[#REF], debian:PKG or URL#REF")
    b.add_argument("--builder", choices=("auto", "tuxmake", "make"), default="auto",
                   help="tuxmake (default when installed) or plain make")
    b.add_argument("-j", "--jobs", type=int, default=None, help="parallel jobs (default: nproc)")
    b.add_argument("--lore-url", default=None, metavar="URL",
                   help="public inbox b4 fetches a [series] message_id from, e.g. a lore mirror "
                        "(default: the manifest's lore_url, else b4.midmask from git config, "
                        "else https://lore.kernel.org/all)")
    b.add_argument("--fetch-timeout", type=float, default=None, metavar="S",
                   help="timeout of fetching a series by Message-ID with b4, seconds (default: 300)")
    b.add_argument("--target", choices=("kernel", "kvm-modules"), default="kernel",
                   help="kernel: a whole kernel (bzImage); kvm-modules: only KVM's modules, for the Debian "
                        "kernel the virtual host boots (seconds instead of minutes; the series may change "
                        "only KVM's files); boot them with --host virtual:OUT_DIR")
    b.add_argument("--json", action="store_true", help="print the builds as a JSON list")
    b.set_defaults(func=_build)

    ls = ksub.add_parser("list", help="list cached kernel builds")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)
    parser.set_defaults(func=lambda args: (parser.print_help(sys.stderr), 2)[1])


def _build(args: argparse.Namespace) -> int:
    from harness.errors import UserError
    from harness.kernel.build import build_kernels
    from harness.kernel.manifest import check_lore_url, load_manifest
    from harness.kernel.series import B4_TIMEOUT
    from harness.kernel.source import parse_source_option

    lore_url = check_lore_url(args.lore_url, "--lore-url") if args.lore_url is not None else None
    timeout = B4_TIMEOUT if args.fetch_timeout is None else args.fetch_timeout
    if not 0 < timeout < float("inf"):
        raise UserError(f"--fetch-timeout {args.fetch_timeout} must be a positive number of seconds; fix it")
    manifest = load_manifest(args.manifest)
    source = parse_source_option(args.source) if args.source else None
    variants = ("stock", "patched") if args.variant == "both" else (args.variant,)
    if args.target == "kvm-modules":
        return _build_modules(args, manifest, variants, lore_url, timeout, source)
    builds = build_kernels(manifest, variants, args.config, progress_mod.for_terminal(), source=source,
                           builder=args.builder, jobs=args.jobs, lore_url=lore_url, fetch_timeout=timeout)
    _print_builds(builds, args.json, [b.bzimage for b in builds])
    return 0


def _print_builds(builds: Sequence[Any], as_json: bool, where: Sequence[Any]) -> None:
    """One line per build (``where``: what to boot, a bzImage or a modules dir), or a JSON list."""
    if as_json:
        print(json.dumps([b.as_json() for b in builds], indent=1))
        return
    for b, path in zip(builds, where):
        how = "cached" if b.cached else f"built in {b.duration_s:.0f}s"
        print(f"{b.variant:8} {b.release:40} {how:16} {path}")


def _build_modules(args: argparse.Namespace, manifest, variants, lore_url, timeout, source) -> int:
    from harness.errors import UserError
    from harness.kernel.modules import build_modules

    wrong = [opt for opt, bad in (("--source", source is not None), ("--config", args.config is not None),
                                  ("--builder", args.builder != "auto")) if bad]
    if wrong:
        raise UserError(f"{', '.join(wrong)}: only for --target kernel (kvm-modules builds against Debian's "
                        f"kernel and its config); drop {'them' if len(wrong) > 1 else 'it'}")
    builds = build_modules(manifest, variants, progress_mod.for_terminal(), jobs=args.jobs, lore_url=lore_url,
                           fetch_timeout=timeout)
    _print_builds(builds, args.json, [b.out for b in builds])
    return 0


def _list(args: argparse.Namespace) -> int:
    from harness.kernel import build, modules

    builds = [{"target": "kernel", **b} for b in build.list_builds()] + modules.list_builds()
    if args.json:
        print(json.dumps(builds, indent=1))
        return 0
    if not builds:
        print("no cached kernel builds (migstall kernel build --manifest ...)")
        return 0
    for b in builds:
        print(f"{b['variant'] or '?':8} {b['release'] or '?':40} {b['manifest'] or '?':32} "
              f"{b['duration_s']!s:>8}s {b.get('bzimage') or b['out']}")
    return 0
