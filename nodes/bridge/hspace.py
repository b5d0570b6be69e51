# SPDX-License-Identifier: GPL-3.0-or-later
"""h-space of a ComfyUI model: where h is, the record a direction must match, and the patch that shifts it.

h is the U-Net bottleneck: the middle-block output, which ComfyUI's U-Net hands to every
``output_block_patch`` at block ("output", 0) before concatenating the first skip.  Beyond the
paper, ``h_site`` "after first up block" takes h where the first up level ends (its last skip joined,
upsampled), handed to the patch at block ("output", k), k = that level's block count: on the demo
pixel DDPM the bottleneck carries layout but not colour, which the skips bring back; "after second up
block" likewise takes it where the second up level ends (U-Nets with three or more levels).  For SD3 / Flux
transformers, h is the image-token output of the middle joint block, and for Wan 2.1 / 2.2 video DiTs
the video-token output of the middle block, reached through
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
UNET_UP_SITE = "unet after first up block"  # output_block_patch at ("output", k): the first up level's output
UNET_UP2_SITE = "unet after second up block"  # ("output", k2): the second up level's output
DIT_SITE = "dit middle joint block"  # patches_replace["dit"][("double_block", i)], image tokens of block i

# the h_site input's options: the paper's bottleneck, and (U-Nets only) the end of the first or second up level
H_SITES = ("middle", "after first up block", "after second up block")
SITE_OPTION = {UNET_SITE: "middle", DIT_SITE: "middle", UNET_UP_SITE: "after first up block",
               UNET_UP2_SITE: "after second up block"}
UP_SITES = (UNET_UP_SITE, UNET_UP2_SITE)


def site_of(direction) -> str:
    """The site label a direction records (files from before h sites existed: the U-Net middle block)."""
    return str(direction.meta.get("h_site") or UNET_SITE)


def _up_site_refused(net_name: str, what: str, site: str = "after first up block"):
    return B.NodeInputError(
        f"{what}: h site {site!r} exists on U-Nets only (SD1.x, SD2, SDXL, diffusers UNet2DModel); "
        f"this model's network is a {net_name}, a transformer without up blocks, whose h is its middle joint "
        "block: use h_site 'middle'")


def h_site(base, site: str = "middle", what: str = "h_site") -> tuple[str, int | None, dict, int]:
    """(site label, block index, layout, h channels) of a diffusion network at ``site`` (one of
    ``H_SITES``), or a clear node error naming input ``what``.

    U-Nets (the paper's h-space): ComfyUI's ``UNetModel`` and the pack's diffusers ``UNet2DModel``
    wrapper, h = the middle-block output; at "after first up block", the output of the first up
    level (``output_blocks[k - 1]``, k = num_res_blocks + 1, seen by the patch at ("output", k);
    diffusers: ``up_blocks[0]``, k = its resnet count); at "after second up block", the output of the
    second (k2 = the blocks of the first two up levels; diffusers: ``up_blocks[1]``, k2 = the resnets of
    both).  Beyond the paper, the joint-attention transformers whose
    block loop honours ``patches_replace["dit"]`` (read in the host's ``mmdit.py`` and
    ``flux/model.py``): h = the image-token output of the middle joint block, ``depth // 2``, as a
    ``(B, hidden, tokens, 1)`` map so the same direction modules apply."""
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
    from comfy.ldm.wan.model import WanModel

    from .diffusers_unet import DiffusersUNet

    if site not in H_SITES:
        raise B.NodeInputError(f"{what}: {site!r} is not one of {list(H_SITES)}")
    up = site != "middle"
    second = site == "after second up block"
    net = getattr(base, "diffusion_model", None)
    if isinstance(net, UNetModel):
        # the same layout record as directions saved before DiT support, so they still match
        cfg = getattr(base.model_config, "unet_config", {}) or {}
        layout = {k: cfg.get(k) for k in ("model_channels", "channel_mult", "context_dim", "num_res_blocks",
                                            "transformer_depth_middle", "adm_in_channels")}
        width, mult = int(cfg.get("model_channels", 0)), [int(m) for m in (cfg.get("channel_mult") or [1, 1])]
        channels = width * mult[-1]
        if not up:
            return UNET_SITE, None, layout, channels
        nrb = [int(v) for v in net.num_res_blocks]
        k = nrb[-1] + 1   # blocks of the first (deepest) up level
        if len(net.output_blocks) <= k:
            raise B.NodeInputError(f"{what}: this U-Net has a single up level, so nothing follows its first up "
                                   "block; use h_site 'middle'")
        if not second:
            return UNET_UP_SITE, k, layout, channels
        k2 = k + nrb[-2] + 1  # ... and of the second
        if len(net.output_blocks) <= k2:
            raise B.NodeInputError(f"{what}: this U-Net has two up levels, so nothing follows its second up "
                                   "block; use h_site 'after first up block' or 'middle'")
        return UNET_UP2_SITE, k2, layout, width * mult[-2]
    if isinstance(net, DiffusersUNet):
        c = net.unet.config
        layout = {"diffusers": "UNet2DModel", **{k: c.get(k) for k in (
            "block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "in_channels",
            "out_channels", "add_attention")}}
        channels = int(c.get("block_out_channels")[-1])
        if not up:
            return UNET_SITE, None, layout, channels
        if len(net.unet.up_blocks) < 2:
            raise B.NodeInputError(f"{what}: this U-Net has a single up block, so nothing follows it; use "
                                   "h_site 'middle'")
        if not second:
            return UNET_UP_SITE, net.up_block_index, layout, channels
        if len(net.unet.up_blocks) < 3:
            raise B.NodeInputError(f"{what}: this U-Net has two up blocks, so nothing follows its second; use "
                                   "h_site 'after first up block' or 'middle'")
        return UNET_UP2_SITE, net.up_block2_index, layout, int(c.get("block_out_channels")[-2])
    if type(net) is OpenAISignatureMMDITWrapper:
        n = len(net.joint_blocks)
        # enough to tell SD3 medium, SD3.5 medium (MMDiT-X: self-attention x blocks) and SD3.5 large apart
        layout = {"mmdit": "SD3", "depth": n, "hidden_size": int(net.hidden_size),
                  "x_block_self_attn_layers": sorted(int(i) for i in (net.x_block_self_attn_layers or [])),
                  "pos_embed_max_size": net.pos_embed_max_size, "in_channels": int(net.in_channels),
                  "context_processor": net.context_processor is not None}
        if up:
            raise _up_site_refused("SD3 MMDiT", what, site)
        return DIT_SITE, n // 2, layout, int(net.hidden_size)
    if type(net) is Flux:
        n, p = len(net.double_blocks), net.params
        layout = {"flux": "double_blocks", "double_blocks": n, "single_blocks": len(net.single_blocks),
                  "hidden_size": int(net.hidden_size), "in_channels": int(p.in_channels),
                  "context_in_dim": int(p.context_in_dim), "vec_in_dim": int(p.vec_in_dim)}
        if up:
            raise _up_site_refused("Flux", what, site)
        return DIT_SITE, n // 2, layout, int(net.hidden_size)
    if type(net) is WanModel:
        if up:
            raise _up_site_refused("Wan", what, site)
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


def model_record(model, site: str = "middle", what: str = "h_site") -> dict:
    """What a direction must match: architecture, network layout, latent format, h site and channels, family.
    ``site``: one of ``H_SITES``; a model without it is a node error naming input ``what``."""
    base = model.model
    site, block, layout, channels = h_site(base, site, what)
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
    """The model's record at the direction's h site, or a node error naming ``what`` and both sites."""
    meta = dict(direction.meta)
    meta["h_site"] = site_of(direction)   # directions saved before DiT support are all U-Net middle ones
    meta.setdefault("h_block", None)
    if meta["h_site"] not in SITE_OPTION:
        raise B.NodeInputError(f"{what}: it records h site {meta['h_site']!r}, which this version does not know "
                               f"(known: {sorted(SITE_OPTION)}); update the pack or make the direction again")
    try:
        rec = model_record(model, SITE_OPTION[meta["h_site"]], what)
    except B.NodeInputError:
        plain = model_record(model)
        have = []
        for option in H_SITES:
            try:
                h_site(model.model, option)
                have.append(option)
            except B.NodeInputError:
                pass
        raise B.NodeInputError(
            f"{what}: it shifts h at site {meta['h_site']!r}, which this model lacks (its h is at "
            f"{plain['h_site']!r}); make a direction for this model with h_site "
            f"{' or '.join(repr(o) for o in have)}") from None
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
    acting only at block ``self.block``) or as a ``patches_replace["dit"]`` double-block wrapper (SD3 / Flux).

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
        self.block = ("output", 0)  # the output_block_patch block whose incoming h is shifted (U-Nets)

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
        if tuple(transformer_options.get("block") or ()) != self.block:
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
    if rec["h_site"] in (UNET_SITE, *UP_SITES):
        shift.block = ("output", int(rec["h_block"] or 0))
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
