# SPDX-License-Identifier: GPL-3.0-or-later
"""h-space of a ComfyUI model: where h is, the record a direction must match, and the patch that shifts it.

h is the U-Net bottleneck: the middle-block output, which ComfyUI's U-Net hands to every
``output_block_patch`` at block ("output", 0) before concatenating the first skip.  Beyond the
paper, for SD3 / Flux transformers, h is the image-token output of the middle joint block, and for
Wan 2.1 / 2.2 video DiTs the video-token output of the middle block, reached through
``patches_replace["dit"]``.  The patch is installed on a private ``model.clone()``, so the
caller's MODEL never carries it.
"""
from __future__ import annotations

import copy
import json

import torch

from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ...samplers import asyrp as AS
from . import sampling as B

UNET_SITE = "unet middle block"     # ComfyUI's output_block_patch at ("output", 0): the bottleneck h
DIT_SITE = "dit middle joint block"  # patches_replace["dit"][("double_block", i)], image tokens of block i


def h_site(base) -> tuple[str, int | None, dict, int]:
    """(site, block index, layout, h channels) of a diffusion network, or a clear node error.

    U-Nets (the paper's h-space): ComfyUI's ``UNetModel`` and the pack's diffusers ``UNet2DModel``
    wrapper, h = the middle-block output.  Beyond the paper, the joint-attention transformers whose
    block loop honours ``patches_replace["dit"]`` (read in the host's ``mmdit.py`` and
    ``flux/model.py``): h = the image-token output of the middle joint block, ``depth // 2``, as a
    ``(B, hidden, tokens, 1)`` map so the same direction modules apply."""
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
    from comfy.ldm.wan.model import WanModel

    from .diffusers_unet import DiffusersUNet

    net = getattr(base, "diffusion_model", None)
    if isinstance(net, UNetModel):
        # the same layout record as directions saved before DiT support, so they still match
        cfg = getattr(base.model_config, "unet_config", {}) or {}
        layout = {k: cfg.get(k) for k in ("model_channels", "channel_mult", "context_dim", "num_res_blocks",
                                            "transformer_depth_middle", "adm_in_channels")}
        return UNET_SITE, None, layout, int(cfg.get("model_channels", 0)) * int((cfg.get("channel_mult") or [1])[-1])
    if isinstance(net, DiffusersUNet):
        c = net.unet.config
        layout = {"diffusers": "UNet2DModel", **{k: c.get(k) for k in (
            "block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "in_channels",
            "out_channels", "add_attention")}}
        return UNET_SITE, None, layout, int(c.get("block_out_channels")[-1])
    if type(net) is OpenAISignatureMMDITWrapper:
        n = len(net.joint_blocks)
        # enough to tell SD3 medium, SD3.5 medium (MMDiT-X: self-attention x blocks) and SD3.5 large apart
        layout = {"mmdit": "SD3", "depth": n, "hidden_size": int(net.hidden_size),
                  "x_block_self_attn_layers": sorted(int(i) for i in (net.x_block_self_attn_layers or [])),
                  "pos_embed_max_size": net.pos_embed_max_size, "in_channels": int(net.in_channels),
                  "context_processor": net.context_processor is not None}
        return DIT_SITE, n // 2, layout, int(net.hidden_size)
    if type(net) is Flux:
        n, p = len(net.double_blocks), net.params
        layout = {"flux": "double_blocks", "double_blocks": n, "single_blocks": len(net.single_blocks),
                  "hidden_size": int(net.hidden_size), "in_channels": int(p.in_channels),
                  "context_in_dim": int(p.context_in_dim), "vec_in_dim": int(p.vec_in_dim)}
        return DIT_SITE, n // 2, layout, int(net.hidden_size)
    if type(net) is WanModel:
        # Wan 2.1 / 2.2 text-to-video DiT: its block loop honours patches_replace["dit"][("double_block", i)]
        # (read in the host's wan/model.py), so h = the video-token output (B, frames*h*w/4, dim) of the
        # middle block, num_layers // 2. Not VACE/camera/S2V/Animate variants (other classes, other loops).
        n = len(net.blocks)
        layout = {"wan": str(getattr(net, "model_type", "t2v")), "num_layers": n, "dim": int(net.dim),
                  "in_dim": int(net.patch_embedding.weight.shape[1]), "out_dim": int(net.out_dim),
                  "text_dim": int(net.text_embedding[0].weight.shape[1]), "ffn_dim": int(net.ffn_dim)}
        return DIT_SITE, n // 2, layout, int(net.dim)
    raise B.NodeInputError(
        f"model: Asyrp edits h-space, the U-Net bottleneck (or, beyond the paper, the middle joint block of "
        f"SD3 / Flux / Wan transformers); this {type(base).__name__} model's network is a {type(net).__name__}, "
        "which has neither. "
        "Supported: SD1.x, SD2, SDXL U-Nets (eps or v), diffusers UNet2DModel pixel DDPMs (Load Diffusers "
        "DDPM), SD3 MMDiT, Flux.1 and Wan 2.1 / 2.2 text-to-video.")


def model_record(model) -> dict:
    """What a direction must match: architecture, network layout, latent format, h site and channels, family."""
    base = model.model
    site, block, layout, channels = h_site(base)
    return {
        "architecture": type(base).__name__,
        "unet": json.dumps(layout, sort_keys=True, default=str),
        "latent_format": type(model.get_model_object("latent_format")).__name__,
        "h_channels": int(channels),
        "h_site": site,
        "h_block": block,
        "family": B.family_of(model),
    }


def check_direction_for_model(model, direction: AS.Direction, what: str = "direction") -> dict:
    rec = model_record(model)
    meta = dict(direction.meta)
    meta.setdefault("h_site", UNET_SITE)   # directions saved before DiT support are all U-Net ones
    meta.setdefault("h_block", None)
    for key, label in (("architecture", "model type"), ("unet", "network layout"), ("latent_format", "latent format"),
                       ("h_site", "h site"), ("h_block", "h block")):
        if meta.get(key) != rec[key]:
            raise B.NodeInputError(
                f"{what}: it was trained on a model with {label} {meta.get(key)!r}, this model has {rec[key]!r}; "
                "an h-space direction only applies to the model family it was trained on (e.g. an SD1.5 "
                "direction on SD1.5 checkpoints). Train one for this model with Asyrp Train Direction.")
    if direction.h_channels != rec["h_channels"]:
        raise B.NodeInputError(f"{what}: h has {direction.h_channels} channels in the direction, "
                               f"{rec['h_channels']} in this model")
    return rec


class HShift:
    """Adds ``strength * delta_h`` to h while active; installed as ComfyUI's output_block_patch (U-Net,
    block ("output", 0)) or as a ``patches_replace["dit"]`` double-block wrapper (SD3 / Flux).

    Stateful and shared on purpose: ComfyUI deep-copies model_options when it clones a patcher,
    and the sampling loop must still reach this one object."""

    def __init__(self):
        self.direction = None
        self.strengths = None  # (B,) tensor, one per latent in the batch
        self.level = 0.0
        self.active = False
        self.h_shape = None
        self.inner = None      # a replace patch that was already on the DiT block: it runs first
        self.seen = None       # while a list: every h that passes (before any shift) is appended to it
        self.ratios = None     # while a dict: noise level -> mean ||k delta_h|| / ||h|| of the last shift there
        self.norms = {}        # with ratios: noise level -> mean ||h|| there

    def __deepcopy__(self, memo):
        return self

    def shift(self, h, transformer_options):
        """h: (B, C, H, W); records its shape and, while active, returns h + k * delta_h."""
        self.h_shape = tuple(h.shape[1:])
        if self.seen is not None:
            self.seen.append(h.detach())
        if not self.active:
            return h
        delta = self.direction.delta(h, self.level)
        k = self.strengths.to(device=h.device, dtype=h.dtype)
        chunks = max(len(transformer_options.get("cond_or_uncond", [0])), 1)
        if h.shape[0] == k.numel() * chunks:
            k = k.repeat(chunks)
        elif bool((k == k[0]).all()):
            k = k[:1].expand(h.shape[0])
        else:
            raise RuntimeError(f"Asyrp: h batch {h.shape[0]} does not split into {chunks} x {k.numel()} latents")
        shift = k.view(-1, *([1] * (h.dim() - 1))) * delta
        if self.ratios is not None:
            with torch.no_grad():
                hn = h.detach().flatten(1).float().norm(dim=1)
                r = shift.detach().flatten(1).float().norm(dim=1) / hn.clamp_min(1e-12)
            self.ratios[round(float(self.level), 6)] = float(r.mean())
            self.norms[round(float(self.level), 6)] = float(hn.mean())
        return h + shift

    def __call__(self, h, hsp, transformer_options):
        if transformer_options.get("block") != ("output", 0):
            return h, hsp
        return self.shift(h, transformer_options), hsp

    def dit_block(self, args, extra):
        """patches_replace["dit"] wrapper: the original joint block, then h = its image tokens
        (B, L, D), seen as a (B, D, L, 1) map."""
        out = dict(self.inner(args, extra) if self.inner is not None else extra["original_block"](args))
        img = out["img"]
        h = img.transpose(1, 2).unsqueeze(-1)
        out["img"] = self.shift(h, args.get("transformer_options") or {}).squeeze(-1).transpose(1, 2)
        return out

    def read(self, call):
        """Runs ``call()`` (one model evaluation) and returns the h it passed through, (B, C, H, W): the
        conditional half when ComfyUI batched cond and uncond together."""
        self.seen = []
        try:
            call()
            seen = self.seen
        finally:
            self.seen = None
        if not seen:
            raise RuntimeError("Asyrp: the model evaluation never reached the h site")
        return seen[-1]

    def run(self, denoise_fn, x, sigma, family):
        self.level = AS.noise_level(sigma, family)
        self.active = True
        try:
            return denoise_fn(x, sigma)
        finally:
            self.active = False


def patched(model, rec: dict | None = None):
    """A clone of ``model`` carrying a fresh HShift patch at its h site; the caller's model is untouched.
    ``rec``: the model's ``model_record`` when the caller already has it."""
    rec = rec or model_record(model)
    shift = HShift()
    m = model.clone()
    if rec["h_site"] == UNET_SITE:
        m.set_model_output_block_patch(shift)
    else:
        key = ("double_block", rec["h_block"])
        shift.inner = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {}).get(key)
        m.set_model_patch_replace(shift.dit_block, "dit", *key)
    return m, shift


def direction_on(direction: AS.Direction, device, dtype=torch.float32) -> AS.Direction:
    """A copy whose modules live on ``device`` (the cached direction is never moved)."""
    terms = []
    for t in direction.terms:
        p = next(iter(t.parameters()), None)
        if p is not None and (p.device != torch.device(device) or p.dtype != dtype):
            t = copy.deepcopy(t).to(device=device, dtype=dtype)
        terms.append(t)
    return AS.Direction(terms, list(direction.coefs), dict(direction.meta))
