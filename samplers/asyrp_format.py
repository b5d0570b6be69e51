# SPDX-License-Identifier: GPL-3.0-or-later
"""Asyrp directions on disk: safetensors with a SHA-256 digest (see ``artifact``), never pickle.

Tensors: ``term<k>.<name>``, the state of each term of the direction.  The header's string
metadata: the format name and version, ``terms`` (JSON: each term's ``config()`` and its
coefficient) and ``direction`` (JSON: the record of what the direction was made on: model
architecture and network layout, latent format, family, h site (files without one: the U-Net
middle block), h shape, schedule, texts, editing interval).  Loading verifies the digest, rebuilds
each term from its config and checks every tensor's name, shape and finiteness against it.
"""
from __future__ import annotations

import json
import os

import torch

from . import asyrp as AS
from .artifact import load_artifact, save_artifact
from .dpm_encoder import CodeError

FORMAT = "dpm-latent-asyrp-direction"
FORMAT_VERSION = 1
SUFFIX = ".asyrp.safetensors"
OLD_SITE = "unet middle block"  # files from before h sites existed are U-Net middle-block directions


def direction_tensors(direction: AS.Direction) -> tuple[dict, dict]:
    tensors, terms = {}, []
    for k, (term, coef) in enumerate(zip(direction.terms, direction.coefs)):
        for name, t in term.state_dict().items():
            tensors[f"term{k}.{name}"] = t.detach().to("cpu").contiguous()
        terms.append({"config": term.config(), "coef": float(coef)})
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "terms": json.dumps(terms),
            "direction": json.dumps(direction.meta)}
    return tensors, meta


def direction_from_tensors(tensors: dict, meta: dict, name: str) -> AS.Direction:
    try:
        version = int(meta.get("format_version", "0"))
        if version != FORMAT_VERSION:
            raise CodeError(f"format version {version}; this pack reads version {FORMAT_VERSION}")
        terms_spec = json.loads(meta["terms"])
        info = json.loads(meta["direction"])
        if isinstance(info, dict):
            info.setdefault("h_site", OLD_SITE)
        for key in ("architecture", "unet", "latent_format", "family", "h_shape", "sigmas", "source_text",
                    "target_text", "t_edit", "t_boost"):
            if key not in info:
                raise CodeError(f"the header lacks {key!r}")
        terms, coefs = [], []
        for k, spec in enumerate(terms_spec):
            term = AS.make_term(spec["config"])
            prefix = f"term{k}."
            sd = {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}
            want = term.state_dict()
            if set(sd) != set(want):
                raise CodeError(f"term {k}: tensors {sorted(sd)} do not match {sorted(want)}")
            for n, t in sd.items():
                if tuple(t.shape) != tuple(want[n].shape) or not t.dtype.is_floating_point:
                    raise CodeError(f"term {k}: tensor {n} has shape {tuple(t.shape)}, expected "
                                    f"{tuple(want[n].shape)}")
                if not torch.isfinite(t).all():
                    raise CodeError(f"term {k}: tensor {n} contains NaN or infinity")
            term.load_state_dict({n: t.to(want[n].dtype) for n, t in sd.items()})
            term.requires_grad_(False)
            terms.append(term)
            coefs.append(float(spec["coef"]))
        if not terms:
            raise CodeError("the file holds no direction")
    except CodeError as e:
        raise CodeError(f"{name}: {e}") from None
    except (KeyError, ValueError, TypeError) as e:
        raise CodeError(f"{name}: corrupt Asyrp direction header ({type(e).__name__}: {e})") from None
    return AS.Direction(terms, coefs, info)


def save_direction(direction: AS.Direction, path):
    tensors, meta = direction_tensors(direction)
    bad = [k for k, t in tensors.items() if t.dtype.is_floating_point and not torch.isfinite(t).all()]
    if bad:
        raise CodeError(f"the direction holds NaN or infinity in {bad}; it cannot be saved (train it again with "
                        "a lower learning_rate)")
    return save_artifact(path, tensors, meta)


def load_direction(path) -> AS.Direction:
    tensors, meta = load_artifact(path, FORMAT, "Asyrp direction")
    return direction_from_tensors(tensors, meta, os.path.basename(str(path)))
