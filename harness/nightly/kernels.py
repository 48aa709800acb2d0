"""Kernel artifacts per variant: prebuilt ([kernels.NAME]) or built from the
manifest (a whole kernel, or with ``target = "kvm-modules"`` KVM's modules for
the virtual host's Debian kernel)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

from harness.errors import UserError
from harness.nightly.boot import Artifact
from harness.nightly.config import NightlyConfig
from harness.progress import Progress

log = logging.getLogger(__name__)


def _from_build(variant: str, kb: Any) -> Artifact:
    """Adapt harness.kernel's KernelBuild(variant, release, bzimage, metadata, duration_s, cached)."""
    meta = getattr(kb, "metadata", None) or {}
    if isinstance(meta, (str, Path)) and Path(meta).is_file():
        import json

        meta = json.loads(Path(meta).read_text())
    meta = meta if isinstance(meta, dict) else {}
    raw_series = meta.get("series")
    series = raw_series if isinstance(raw_series, dict) else {}
    series_id = str(getattr(kb, "series_hash", "") or series.get("sha256") or series.get("hash8")
                    or meta.get("series_id") or meta.get("series_hash") or "")
    modules = getattr(kb, "modules", None) or meta.get("modules")
    return Artifact(variant=variant, bzimage=Path(kb.bzimage), release=str(getattr(kb, "release", "") or ""),
                    modules=Path(modules) if modules else None,
                    series_id=series_id)


def resolve(cfg: NightlyConfig, progress: Optional[Progress] = None) -> Dict[str, Artifact]:
    """Artifacts for every variant (builds run here, before any host is touched)."""
    progress = progress or Progress()
    out: Dict[str, Artifact] = {}
    for v in cfg.variants:
        spec = cfg.kernel(v)
        if spec is not None:
            out[v] = Artifact(v, spec.bzimage, spec.release, spec.modules, spec.series_id)
            continue
        try:
            from harness.kernel.build import build_kernel
        except ImportError as exc:
            raise UserError(f"variant {v}: this migstall has no kernel builder (harness.kernel.build_kernel); "
                            f"give [kernels.{v}] bzimage = ... in the nightly config") from exc
        from harness.kernel.manifest import load_manifest

        assert cfg.manifest is not None
        manifest = load_manifest(cfg.manifest)
        if cfg.target == "kvm-modules":
            from harness.kernel.modules import build_modules

            (mb,) = build_modules(manifest, (v,), progress)
            # the virtual host takes the build's directory where it takes a bzImage
            out[v] = Artifact(variant=v, bzimage=mb.out, release=mb.release, series_id=mb.series_id)
        else:
            out[v] = _from_build(v, build_kernel(manifest, v, progress=progress))
        log.info("variant %s: %s (%s)", v, out[v].bzimage, out[v].release)
    return out
