# SPDX-License-Identifier: GPL-3.0-or-later
"""Latent codes on disk: safetensors, never pickle.

Tensors: ``sigmas`` (float64), ``start_mean``, ``start_noise``, ``noises``,
``residual`` (float32).  The header's string metadata repeats what a person
or another tool needs to read the file without this pack: format name and
version, family, eta, start_scale, latent shape, steps and the sigmas.
Loading checks every field against the tensors and refuses anything that
does not add up.

Optional tensors (``OPTIONAL_TENSOR_NAMES``, float32, saved when the code has
them): ``trajectory`` (the encoder's chain, for masked edits) and ``mask`` (the
edit mask).  Files without them load as codes without them; readers that only
know the required tensors ignore them.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .dpm_encoder import FAMILIES, CodeError, LatentCode

FORMAT_NAME = "dpm-latent-code"
FORMAT_VERSION = 1
TENSOR_NAMES = ("sigmas", "start_mean", "start_noise", "noises", "residual")
OPTIONAL_TENSOR_NAMES = ("trajectory", "mask")


def code_metadata(code: LatentCode) -> dict[str, str]:
    return {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "family": code.family,
        "eta": repr(float(code.eta)),
        "start_scale": repr(float(code.start_scale)),
        "shape": json.dumps(list(code.shape)),
        "steps": str(code.steps),
        "sigmas": json.dumps([float(s) for s in code.sigmas]),
    }


def save_code(code: LatentCode, path, extra_metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    code.validate()
    meta = code_metadata(code)
    for k, v in (extra_metadata or {}).items():
        if k not in meta:
            meta[str(k)] = str(v)
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def load_code(path) -> LatentCode:
    from safetensors import safe_open

    path = Path(path)
    name = path.name
    if not path.is_file():
        raise CodeError(f"latent code file {name!r} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            missing = [k for k in TENSOR_NAMES if k not in keys]
            if meta.get("format") != FORMAT_NAME:
                raise CodeError(f"{name}: not a DPM latent code (header format is {meta.get('format')!r}, "
                                f"expected {FORMAT_NAME!r})")
            if missing:
                raise CodeError(f"{name}: corrupt latent code, tensors missing: {missing}")
            tensors = {k: f.get_tensor(k) for k in TENSOR_NAMES + OPTIONAL_TENSOR_NAMES if k in keys}
    except CodeError:
        raise
    except Exception as e:  # safetensors raises its own error types on a damaged file
        raise CodeError(f"{name}: not a readable safetensors latent code ({type(e).__name__}: {e})") from e

    try:
        version = int(meta.get("format_version", "0"))
    except ValueError:
        raise CodeError(f"{name}: format_version {meta.get('format_version')!r} is not a number") from None
    if version != FORMAT_VERSION:
        raise CodeError(f"{name}: latent code format version {version}; this pack reads version {FORMAT_VERSION}")
    family = meta.get("family")
    if family not in FAMILIES:
        raise CodeError(f"{name}: family {family!r} is not one of {FAMILIES}")
    try:
        eta = float(meta["eta"])
        start_scale = float(meta["start_scale"])
        shape = tuple(int(v) for v in json.loads(meta["shape"]))
        steps = int(meta["steps"])
        header_sigmas = [float(v) for v in json.loads(meta["sigmas"])]
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
    if tuple(tensors["start_noise"].shape) != shape:
        raise CodeError(f"{name}: start_noise has shape {tuple(tensors['start_noise'].shape)}, header says {shape}")
    code = LatentCode(sigmas=sigmas, eta=eta, family=family,
                      start_mean=tensors["start_mean"].float(), start_scale=start_scale,
                      start_noise=tensors["start_noise"].float(), noises=tensors["noises"].float(),
                      residual=tensors["residual"].float(),
                      **{k: tensors[k].float() for k in OPTIONAL_TENSOR_NAMES if k in tensors})
    try:
        return code.validate()
    except CodeError as e:
        raise CodeError(f"{name}: {e}") from None
