# SPDX-License-Identifier: GPL-3.0-or-later
"""Saved artifacts: safetensors files whose metadata carry a SHA-256 of their content.

Minimal implementation of the pack's artifact API (``save_artifact`` /
``load_artifact`` / ``ArtifactError``); the digest covers every tensor's
name, dtype, shape and bytes and every metadata entry, so a flipped byte in
data or header is refused.  Never unpickles anything.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .dpm_encoder import CodeError

DIGEST_KEY = "sha256"


class ArtifactError(CodeError):
    """A saved artifact that cannot be used: corrupt, truncated, or of another kind."""


def _digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    h = hashlib.sha256()
    meta = {k: v for k, v in metadata.items() if k != DIGEST_KEY}
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def save_artifact(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write ``tensors`` and string ``metadata`` (which must hold ``format``) with a SHA-256 digest."""
    from safetensors.torch import save_file

    if "format" not in metadata:
        raise ArtifactError("artifact metadata needs a 'format' entry")
    meta = {str(k): str(v) for k, v in metadata.items()}
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta[DIGEST_KEY] = _digest(cpu, meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(cpu, str(path), metadata=meta)
    return path


def load_artifact(path, fmt: str, what: str = "file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an artifact of format ``fmt``; ``what`` names the kind of file in error messages."""
    from safetensors import safe_open

    path = Path(path)
    name = path.name
    if not path.is_file():
        raise ArtifactError(f"{what} {name!r} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types on a damaged file
        raise ArtifactError(f"{name}: not a readable safetensors {what} ({type(e).__name__}: {e})") from e
    if meta.get("format") != fmt:
        raise ArtifactError(f"{name}: not a {what} (header format is {meta.get('format')!r}, expected {fmt!r})")
    stored = meta.get(DIGEST_KEY)
    if stored is None or stored != _digest(tensors, meta):
        raise ArtifactError(f"{name}: the {what} is corrupt (its SHA-256 does not match its content); "
                            "save it again from the source")
    return tensors, meta
