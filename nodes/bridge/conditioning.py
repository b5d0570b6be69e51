# SPDX-License-Identifier: GPL-3.0-or-later
"""Conditioning the pack builds itself: all-zero prompts shaped for a model."""
from __future__ import annotations

import torch

import comfy.model_base

from .sampling import NodeInputError


def conditioning_dims(model) -> tuple[int, int | None]:
    """(context feature size, pooled size or None) for the model's conditioning."""
    base = model.model
    cfg = getattr(base.model_config, "unet_config", {}) or {}
    if isinstance(base, comfy.model_base.SD3):
        ctx = cfg.get("context_embedder_config", {}).get("params", {}).get("in_features")
        return int(ctx), int(cfg["adm_in_channels"])
    if isinstance(base, comfy.model_base.Flux):
        return int(cfg.get("context_in_dim", 4096)), int(cfg.get("vec_in_dim", 768))
    if isinstance(base, comfy.model_base.SDXL):
        return int(cfg["context_dim"]), int(cfg["adm_in_channels"]) - 6 * 256
    net = base.diffusion_model
    if isinstance(base, comfy.model_base.WAN21):  # Wan 2.1 / 2.2 (WAN22 is a WAN21): umT5 tokens, no pooled vector
        return int(net.text_embedding[0].weight.shape[1]), None
    if isinstance(base, comfy.model_base.HunyuanVideo):
        vec = getattr(net, "vector_in", None)
        return int(net.txt_in.input_embedder.weight.shape[1]), (None if vec is None else int(vec.in_layer.weight.shape[1]))
    if isinstance(base, comfy.model_base.LTXV):
        return int(net.caption_projection.linear_1.weight.shape[1]), None
    if isinstance(base, comfy.model_base.GenmoMochi):  # T5-XXL tokens, pooled inside the model
        return int(net.t5_yproj.weight.shape[1]), None
    if isinstance(base, (comfy.model_base.CosmosVideo, comfy.model_base.CosmosPredict2)):  # Cosmos' T5 (1024 wide)
        return int(cfg.get("crossattn_emb_channels", 1024)), None
    if type(base) is comfy.model_base.BaseModel and cfg.get("context_dim") and not cfg.get("adm_in_channels"):
        return int(cfg["context_dim"]), None
    raise NodeInputError(
        f"model: Empty Conditioning does not know the conditioning of {type(base).__name__} models; "
        "use CLIP Text Encode with an empty prompt (and Conditioning Zero Out) instead")


def empty_conditioning(model, tokens: int = 77) -> list:
    """All-zero conditioning of ``tokens`` text tokens (and a zero pooled vector where the model takes one)."""
    ctx, pooled = conditioning_dims(model)
    base = model.model
    extra = {} if pooled is None else {"pooled_output": torch.zeros(1, pooled)}
    if isinstance(base, comfy.model_base.HunyuanVideo) and pooled is None:
        # HunyuanVideo 1.5 has no pooled vector, but model_base.HunyuanVideo reads the key (its text encoder
        # gives None there, as CLIP Text Encode passes it on)
        extra["pooled_output"] = None
    if isinstance(base, (comfy.model_base.LTXV, comfy.model_base.GenmoMochi, comfy.model_base.CosmosVideo,
                         comfy.model_base.CosmosPredict2)):
        # the text tokens' mask, as these models' T5 encoders give it (LTX-Video's and Mochi's forward need it)
        extra["attention_mask"] = torch.ones(1, tokens, dtype=torch.long)
    return [[torch.zeros(1, tokens, ctx), extra]]
