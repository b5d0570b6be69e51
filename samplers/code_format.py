# SPDX-License-Identifier: GPL-3.0-or-later
"""Latent codes on disk: safetensors, never pickle, with a SHA-256 digest (see ``artifact``).

Tensors: ``sigmas`` (float64), ``start_mean``, ``start_noise``, ``noises``,
``residual`` (float32).  The header's string metadata repeats what a person
or another tool needs to read the file without this pack: format name and
version, family, eta, start_scale, latent shape, steps and the sigmas, and
(version 2) the latent space the code belongs to: ``latent_format``,
``latent_scale_factor`` and ``model_type``; a video code (shape ``[B, C, T, H, W]``)
also states ``frames`` (T, in latent frames).  Loading verifies the digest,
then checks every field against the tensors and refuses anything that does
not add up.  Version-1 files (no digest, no latent format) still load.

Optional tensors (``OPTIONAL_TENSOR_NAMES``, float32, saved when the code has
them): ``trajectory`` (the encoder's chain, for masked edits) and ``mask`` (the
edit mask).  Files without them load as codes without them; the digest covers
them like every other byte.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .artifact import ArtifactError, load_artifact, save_artifact
from .dpm_encoder import FAMILIES, CodeError, LatentCode

FORMAT_NAME = "dpm-latent-code"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
TENSOR_NAMES = ("sigmas", "start_mean", "start_noise", "noises", "residual")
OPTIONAL_TENSOR_NAMES = ("trajectory", "mask")


def code_metadata(code: LatentCode) -> dict[str, str]:
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "family": code.family,
        "eta": repr(float(code.eta)),
        "start_scale": repr(float(code.start_scale)),
        "shape": json.dumps(list(code.shape)),
        "steps": str(code.steps),
        "sigmas": json.dumps([float(s) for s in code.sigmas]),
    }
    if code.latent_format is not None:
        meta["latent_format"] = str(code.latent_format)
    if code.latent_scale_factor is not None:
        meta["latent_scale_factor"] = repr(float(code.latent_scale_factor))
    if code.model_type is not None:
        meta["model_type"] = str(code.model_type)
    if len(code.shape) == 5:  # a video code: (B, C, T, H, W); the frame count is latent frames
        meta["frames"] = str(code.shape[2])
    return meta


def code_tensors(code: LatentCode) -> dict[str, torch.Tensor]:
    tensors = {
        "sigmas": code.sigmas.detach().to("cpu", torch.float64).contiguous(),
        "start_mean": code.start_mean.detach().to("cpu", torch.float32).contiguous(),
        "start_noise": code.start_noise.detach().to("cpu", torch.float32).contiguous(),
        "noises": code.noises.detach().to("cpu", torch.float32).contiguous(),
        "residual": code.residual.detach().to("cpu", torch.float32).contiguous(),
    }
    for k in OPTIONAL_TENSOR_NAMES:
        if getattr(code, k, None) is not None:
            tensors[k] = getattr(code, k).detach().to("cpu", torch.float32).contiguous()
    return tensors


def save_code(code: LatentCode, path, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write ``code`` (validated first) with a SHA-256 digest over all tensors and metadata."""
    code.validate()
    meta = code_metadata(code)
    for k, v in (extra_metadata or {}).items():
        if k not in meta:
            meta[str(k)] = str(v)
    return save_artifact(path, code_tensors(code), meta)


def load_code(path) -> LatentCode:
    path = Path(path)
    name = path.name
    tensors, meta = load_artifact(path, FORMAT_NAME, what="DPM latent code")
    missing = [k for k in TENSOR_NAMES if k not in tensors]
    if missing:
        raise ArtifactError(f"{name}: corrupt latent code, tensors missing: {missing}")

    try:
        version = int(meta.get("format_version", "0"))
    except ValueError:
        raise CodeError(f"{name}: format_version {meta.get('format_version')!r} is not a number") from None
    if version not in READABLE_VERSIONS:
        raise CodeError(f"{name}: latent code format version {version}; this pack reads versions "
                        f"{', '.join(map(str, READABLE_VERSIONS))}. Update DPM Latent to read newer files.")
    if version >= 2 and "sha256" not in meta:
        raise ArtifactError(f"{name}: the file is corrupt (a version-{version} latent code without its checksum)")
    family = meta.get("family")
    if family not in FAMILIES:
        raise CodeError(f"{name}: family {family!r} is not one of {FAMILIES}")
    try:
        eta = float(meta["eta"])
        start_scale = float(meta["start_scale"])
        shape = tuple(int(v) for v in json.loads(meta["shape"]))
        steps = int(meta["steps"])
        header_sigmas = [float(v) for v in json.loads(meta["sigmas"])]
        scale_factor = meta.get("latent_scale_factor")
        scale_factor = None if scale_factor is None else float(scale_factor)
    except (KeyError, ValueError, TypeError) as e:
        raise CodeError(f"{name}: corrupt latent code header ({type(e).__name__}: {e})") from None

    sigmas = tensors["sigmas"]
    if sigmas.dtype != torch.float64 or sigmas.ndim != 1 or sigmas.numel() != steps + 1:
        raise CodeError(f"{name}: sigmas tensor does not match the header ({steps} steps)")
    if any(not math.isclose(a, float(b), rel_tol=0, abs_tol=1e-12) for a, b in zip(header_sigmas, sigmas)) \
            or len(header_sigmas) != sigmas.numel():
        raise CodeError(f"{name}: sigmas tensor and header disagree")
    for k in ("start_mean", "start_noise", "noises", "residual") + tuple(k for k in OPTIONAL_TENSOR_NAMES
                                                                          if k in tensors):
        if not tensors[k].dtype.is_floating_point:
            raise CodeError(f"{name}: tensor {k} is not floating point")
    if "frames" in meta and (len(shape) != 5 or meta["frames"] != str(shape[2])):
        raise CodeError(f"{name}: the header's frame count {meta['frames']!r} does not match its shape {shape}")
    if tuple(tensors["start_noise"].shape) != shape:
        raise CodeError(f"{name}: start_noise has shape {tuple(tensors['start_noise'].shape)}, header says {shape}")
    code = LatentCode(sigmas=sigmas, eta=eta, family=family,
                      start_mean=tensors["start_mean"].float(), start_scale=start_scale,
                      start_noise=tensors["start_noise"].float(), noises=tensors["noises"].float(),
                      residual=tensors["residual"].float(),
                      latent_format=meta.get("latent_format"), latent_scale_factor=scale_factor,
                      model_type=meta.get("model_type"),
                      **{k: tensors[k].float() for k in OPTIONAL_TENSOR_NAMES if k in tensors})
    try:
        return code.validate()
    except CodeError as e:
        raise CodeError(f"{name}: {e}") from None
