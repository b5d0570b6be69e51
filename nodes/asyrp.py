# SPDX-License-Identifier: GPL-3.0-or-later
"""Asyrp h-space editing nodes: train a direction, edit with the asymmetric reverse process,
combine, save and load directions.

h is the U-Net bottleneck: the middle-block output, which ComfyUI's U-Net hands to every
``output_block_patch`` at block ("output", 0) before concatenating the first skip.  The patch is
installed on a private ``model.clone()``, so the caller's MODEL never carries it.
"""
from __future__ import annotations

import copy
import json
import math
import os

import torch
from comfy_api.latest import io, ui

import comfy.model_management
import comfy.utils
import folder_paths
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ..guidance import ClipFolderError, load_clip_folder
from ..samplers import CodeError
from ..samplers import asyrp as AS
from ..samplers.artifact import load_artifact, save_artifact
from . import _bridge as B
from . import _clip_management as CM
from . import _files as F
from . import _plot as P
from ._autograd import UnsupportedWeights, alias_conds, gradients_through
from ._types import CATEGORY, AsyrpDirectionIO, LatentCodeIO
from .cycle import _conditioning_dims
from .guidance_nodes import _vae_decoder, clip_folders

FORMAT = "dpm-latent-asyrp-direction"
FORMAT_VERSION = 1
SUFFIX = ".asyrp.safetensors"
FROM_DIRECTION = -1.0


# ---------------------------------------------------------------- model record and the h patch

UNET_SITE = "unet middle block"     # ComfyUI's output_block_patch at ("output", 0): the bottleneck h
DIT_SITE = "dit middle joint block"  # patches_replace["dit"][("double_block", i)], image tokens of block i


def _h_site(base) -> tuple[str, int | None, dict, int]:
    """(site, block index, layout, h channels) of a diffusion network, or a clear node error.

    U-Nets (the paper's h-space): ComfyUI's ``UNetModel`` and the pack's diffusers ``UNet2DModel``
    wrapper, h = the middle-block output.  Beyond the paper, the joint-attention transformers whose
    block loop honours ``patches_replace["dit"]`` (read in the host's ``mmdit.py`` and
    ``flux/model.py``): h = the image-token output of the middle joint block, ``depth // 2``, as a
    ``(B, hidden, tokens, 1)`` map so the same direction modules apply."""
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

    from .diffusers_ddpm import DiffusersUNet

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
    raise B.NodeInputError(
        f"model: Asyrp edits h-space, the U-Net bottleneck (or, beyond the paper, the middle joint block of "
        f"SD3 / Flux transformers); this {type(base).__name__} model's network is a {type(net).__name__}, "
        "which has neither. "
        "Supported: SD1.x, SD2, SDXL U-Nets (eps or v), diffusers UNet2DModel pixel DDPMs (Load Diffusers "
        "DDPM), SD3 MMDiT and Flux.1.")


def model_record(model) -> dict:
    """What a direction must match: architecture, network layout, latent format, h site and channels, family."""
    base = model.model
    site, block, layout, channels = _h_site(base)
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

    def __deepcopy__(self, memo):
        return self

    def shift(self, h, transformer_options):
        """h: (B, C, H, W); records its shape and, while active, returns h + k * delta_h."""
        self.h_shape = tuple(h.shape[1:])
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
        return h + k.view(-1, *([1] * (h.dim() - 1))) * delta

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


def _direction_on(direction: AS.Direction, device, dtype=torch.float32) -> AS.Direction:
    """A copy whose modules live on ``device`` (the cached direction is never moved)."""
    terms = []
    for t in direction.terms:
        p = next(iter(t.parameters()), None)
        if p is not None and (p.device != torch.device(device) or p.dtype != dtype):
            t = copy.deepcopy(t).to(device=device, dtype=dtype)
        terms.append(t)
    return AS.Direction(terms, list(direction.coefs), dict(direction.meta))


def _empty_cond(model):
    ctx, pooled = _conditioning_dims(model)
    extra = {} if pooled is None else {"pooled_output": torch.zeros(1, pooled)}
    return [[torch.zeros(1, 77, ctx), extra]]


# ---------------------------------------------------------------- training

class AsyrpTrainDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AsyrpTrainDirection",
            display_name="Asyrp Train Direction",
            category=CATEGORY,
            description=(
                "Asyrp (Kwon et al., ICLR 2023): learns an edit in the U-Net's h-space (its bottleneck) from "
                "two texts. The images are inverted with deterministic DDIM; at each step of [T, t_edit] one "
                "asymmetric step (h shifted only in the predicted x0) is scored by directional CLIP + L1 and "
                "takes one SGD step; gradients never cross timesteps. The model is run unconditionally (zero "
                "conditioning, cfg 1)."),
            inputs=[
                io.Model.Input("model", tooltip="A U-Net model (SD1.x, SD2, SDXL; eps or v). Stays frozen."),
                io.Vae.Input("vae", tooltip="Decodes the model's latents to pixels for CLIP."),
                io.Latent.Input("latents", tooltip="Training images as a latent batch (VAE Encode of an image "
                                                   "batch); the paper uses about 100."),
                io.Combo.Input("clip_name", options=list(clip_folders()),
                               tooltip="A CLIP folder in models/clip_energy/ (as CLIP Energy uses)."),
                io.String.Input("source_text", default="a photo of a face",
                                tooltip="What the training images show now."),
                io.String.Input("target_text", default="a photo of a smiling face",
                                tooltip="What the edit should make of them."),
                io.Int.Input("steps", default=40, min=2, max=1000,
                             tooltip="DDIM steps of the inversion and of training (paper: 40)."),
                io.Float.Input("t_edit", default=0.5, min=0.0, max=0.99, step=0.01,
                               tooltip="End of the editing interval as a fraction of the chain: steps starting "
                                       "above it are edited (paper: about 0.5, from LPIPS)."),
                io.Int.Input("iterations", default=5, min=1, max=1000,
                             tooltip="Passes over the training images (paper: 5)."),
                io.Float.Input("learning_rate", default=0.5, min=0.00001, max=100.0, step=0.01, round=0.00001,
                               tooltip="SGD learning rate (paper's script: 0.5)."),
                io.Float.Input("clip_weight", default=1.0, min=0.0, max=1000.0, step=0.1,
                               tooltip="Weight of the directional CLIP loss -log((1+cos)/2)."),
                io.Float.Input("l1_weight", default=3.0, min=0.0, max=1000.0, step=0.1,
                               tooltip="Weight of the L1 between the edited and the plain predicted x0 "
                                       "(keeps what the texts do not name)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the initial weights and of the image order."),
                io.Combo.Input("kind", options=list(AS.KINDS), default="implicit function",
                               tooltip="'implicit function': the paper's f_t(h, t), a small network (recommended; "
                                       "works at any image size). 'global direction': one delta_h per step "
                                       "(only at the trained image size)."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="Optional prompt the model runs under while training (Asyrp Edit "
                                              "takes its own). Unconnected: zero conditioning (Empty Conditioning "
                                              "with 77 tokens), the paper's unconditional setting."),
                io.Latent.Input("validation_latents", optional=True,
                                tooltip="Optional held-out images (not trained on): their directional CLIP loss "
                                        "of P_t is measured before and after training, shown on the plot and "
                                        "stored in the direction."),
            ],
            outputs=[
                AsyrpDirectionIO.Output(display_name="direction", tooltip="The trained h-space direction."),
                io.Image.Output(display_name="loss_plot", tooltip="Mean loss per iteration (total, CLIP, L1)."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, latents, clip_name, source_text, target_text, steps, t_edit, iterations,
                learning_rate, clip_weight, l1_weight, seed, kind, conditioning=None,
                validation_latents=None) -> io.NodeOutput:
        samples = latents["samples"]
        val = None
        if validation_latents is not None:
            val = validation_latents["samples"]
            B.check_latent(model, val, "validation_latents")
        rec = model_record(model)
        B.check_latent(model, samples, "latents")
        if vae is None or getattr(vae, "first_stage_model", None) is None:
            raise B.NodeInputError("vae: connect the VAE that decodes this model's latents")
        if kind not in AS.KINDS:
            raise B.NodeInputError(f"kind: {kind!r} is not one of {AS.KINDS}")
        if not source_text.strip() or not target_text.strip():
            raise B.NodeInputError("source_text / target_text: both texts are needed (the edit is their difference)")
        if source_text.strip() == target_text.strip():
            raise B.NodeInputError("target_text: equals source_text, so there is no direction to learn")
        if AS.edited_steps(steps, t_edit) == 0:
            raise B.NodeInputError(f"t_edit: {t_edit} leaves no step of {steps} to edit; lower it")
        folders = clip_folders()
        if clip_name not in folders:
            raise B.NodeInputError(f"clip_name: no CLIP folder named {clip_name!r} in "
                                   f"{folder_paths.get_folder_paths('clip_energy')}")
        sigmas = B.schedule(model, "normal", steps, 1.0)
        family = rec["family"]
        work_model, shift = patched(model, rec)
        if conditioning is not None:
            B.check_conditioning_batch(conditioning, 1, "conditioning")
        cond = _empty_cond(model) if conditioning is None else conditioning
        result = {}
        pbar = comfy.utils.ProgressBar(1)

        def work(denoise_fn, x0, _callback, guider):
            # The CLIP is read onto the offload device and loaded by ComfyUI's model management with the
            # model and the VAE, as CLIP Energy's is (so it leaves VRAM when others need it).
            with torch.inference_mode(False):
                try:
                    bundle = load_clip_folder(folders[clip_name], device=CM.offload_device())
                except ClipFolderError as e:
                    raise B.NodeInputError(f"clip_name: {e}") from None
            clip = CM.patcher_for(bundle)
            CM.load([clip], others=[guider.model_patcher, vae.patcher])
            device = x0.device
            bundle = bundle.at(CM.model_device(clip))
            with torch.inference_mode(False):
                text_dir = (bundle.text_embeds([target_text]) - bundle.text_embeds([source_text])).detach()
            try:
                with gradients_through(guider.inner_model, vae.first_stage_model, clip.model):
                    alias_conds(guider.conds)
                    x0 = x0.float().clone()
                    with torch.no_grad():
                        denoise_fn(x0[:1], float(sigmas[0]))  # reads h's shape
                    h_shape = shift.h_shape
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
                        if kind == "implicit function":
                            module = AS.DeltaBlock(h_shape[0])
                        else:
                            module = AS.GlobalDelta(h_shape, [AS.noise_level(float(s), family)
                                                              for s in sigmas[:-1]])
                    module = module.to(device)
                    decode = _vae_decoder(vae, guider)

                    def embed(lat):
                        return bundle.image_embeds(bundle.normalize(bundle.resize(decode(lat))))

                    def edited_with(x, sigma, mod):
                        shift.direction = AS.Direction([mod], [1.0])
                        shift.strengths = torch.ones(x.shape[0])
                        return shift.run(denoise_fn, x, sigma, family)

                    def progress(done, total, _loss):
                        pbar.update_absolute(done, total)

                    held = None
                    if val is not None:
                        held = guider.inner_model.process_latent_in(val.to(device).float()).clone()
                    try:
                        trace = AS.train_direction(denoise_fn, edited_with, module, x0, sigmas, family, embed,
                                                   text_dir, t_edit, iterations, learning_rate, clip_weight,
                                                   l1_weight, batch_size=1, seed=seed, progress=progress,
                                                   held_out=held)
                    except CodeError as e:
                        raise B.code_error(e) from None
                    except RuntimeError as e:
                        if "Inference tensors" not in str(e):
                            raise
                        raise B.NodeInputError(
                            "model: a patch attached to this MODEL cannot be differentiated through "
                            f"({e}); remove patches other than LoRAs for training") from None
            except UnsupportedWeights as e:
                raise B.NodeInputError(f"model: {e}") from None
            module = module.cpu().requires_grad_(False)
            for name, t in module.state_dict().items():
                if not torch.isfinite(t).all():
                    raise B.NodeInputError(
                        f"learning_rate: training diverged ({name} of the direction became NaN or infinite at "
                        f"{learning_rate}); lower learning_rate or clip_weight, or train in fp32")
            result["module"], result["trace"], result["h_shape"] = module, trace, h_shape
            return x0

        B.run_in_comfy(work_model, cond, cond, 1.0, samples, sigmas, work, seed, None)
        meta = {k: rec[k] for k in ("architecture", "unet", "latent_format", "family", "h_site", "h_block")}
        meta.update(h_shape=list(result["h_shape"]), sigmas=[float(s) for s in sigmas], steps=int(steps),
                    source_text=source_text, target_text=target_text, t_edit=float(t_edit), t_boost=0.0,
                    kind=kind, clip_name=clip_name, iterations=int(iterations), learning_rate=float(learning_rate),
                    clip_weight=float(clip_weight), l1_weight=float(l1_weight),
                    loss_curve=[float(v) for v in result["trace"].losses],
                    clip_loss_curve=[float(v) for v in result["trace"].clip_losses])
        trace = result["trace"]
        title = "loss per iteration"
        if trace.held_out_before is not None:
            meta.update(held_out_clip_loss_before=trace.held_out_before, held_out_clip_loss_after=trace.held_out_after,
                        held_out_images=int(val.shape[0]))
            title += f"; held-out CLIP loss {trace.held_out_before:.4f} -> {trace.held_out_after:.4f}"
        direction = AS.Direction([result["module"]], [1.0], meta)
        plot = P.paint([P.Panel(title, [("total", trace.losses, None), ("clip", trace.clip_losses, None),
                                        ("l1", trace.l1_losses, None)], legend=True)])
        return io.NodeOutput(direction, plot)


# ---------------------------------------------------------------- editing

def parse_strengths(text) -> list[float]:
    if isinstance(text, (int, float)):
        vals = [float(text)]
    else:
        parts = [p.strip() for p in str(text).replace(";", ",").split(",") if p.strip()]
        if not parts:
            raise B.NodeInputError("strength: give a number (e.g. 1.0) or a comma-separated list (e.g. -1, 0, 1, 2)")
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise B.NodeInputError(f"strength: {text!r} is not a number or a comma-separated list of numbers "
                                   "(e.g. 0.5, 1, 2)") from None
    if not all(math.isfinite(v) for v in vals):
        raise B.NodeInputError(f"strength: {text!r} contains a non-finite value")
    return vals


def resolve_interval(direction: AS.Direction, t_edit: float, t_boost: float) -> tuple[float, float]:
    te = float(direction.meta.get("t_edit", 0.5)) if t_edit < 0 else float(t_edit)
    tb = float(direction.meta.get("t_boost", 0.0)) if t_boost < 0 else float(t_boost)
    for name, v in (("t_edit", te), ("t_boost", tb)):
        if not (0.0 <= v <= 1.0):
            raise B.NodeInputError(f"{name}: must be a fraction of the chain in [0, 1] (or -1 for the "
                                   f"direction's value), got {v}")
    return te, tb


class AsyrpEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AsyrpEdit",
            display_name="Asyrp Edit",
            category=CATEGORY,
            description=(
                "Replays a latent code with Asyrp's asymmetric reverse process: inside [T, t_edit] the "
                "predicted x0 comes from the model with h + strength * delta_h and the direction term from "
                "the plain model; after t_edit the plain step. Below t_boost, quality boosting replaces the "
                "code's noise by fresh noise (eta = 1). Strength 0 with t_boost 0 is the plain replay, bit "
                "for bit."),
            inputs=[
                io.Model.Input("model", tooltip="The model the direction was trained on (or a fine-tune of it)."),
                io.Conditioning.Input("positive", tooltip="Prompt of the replay (the encoding prompt keeps the "
                                                          "image; Empty Conditioning for the paper's setting)."),
                io.Conditioning.Input("negative", tooltip="Negative prompt; only used when cfg > 1."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG of the replay; the encoding cfg reproduces the image."),
                LatentCodeIO.Input("latent_code", tooltip="From DPM Encode (a real image) or Random Latent Code."),
                AsyrpDirectionIO.Input("direction", tooltip="From Asyrp Train Direction, Load or Combine."),
                io.String.Input("strength", default="1.0",
                                tooltip="Scale of delta_h; negative reverses the edit. A comma-separated list "
                                        "(e.g. -1, 0, 1, 2) gives one image per value in the batch "
                                        "(strength-major: all images at the first value, then the next)."),
                io.Float.Input("t_edit", default=FROM_DIRECTION, min=-1.0, max=1.0, step=0.01,
                               tooltip="End of the editing interval as a fraction of the chain (1 = start); "
                                       "-1 uses the direction's training value."),
                io.Float.Input("t_boost", default=FROM_DIRECTION, min=-1.0, max=1.0, step=0.01,
                               tooltip="Quality boosting below this fraction (fresh eta = 1 noise; the image is "
                                       "then no longer reproduced exactly). 0 turns it off; -1 uses the "
                                       "direction's value (0 for trained directions)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, optional=True,
                             tooltip="Seed of the quality-boosting noise (unused when t_boost is 0)."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="The edited latents.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, latent_code, direction, strength, t_edit, t_boost,
                seed=0) -> io.NodeOutput:
        code = latent_code
        rec = check_direction_for_model(model, direction)
        B.check_code_for_model(model, code)
        if code.family != rec["family"]:
            raise B.NodeInputError("latent_code: made for another model family than this model")
        strengths = parse_strengths(strength)
        te, tb = resolve_interval(direction, t_edit, t_boost)
        B.check_conditioning_batch(positive, code.batch_size, "positive")
        B.check_conditioning_batch(negative, code.batch_size, "negative")
        full = code.tiled(len(strengths))
        per_latent = torch.tensor(strengths, dtype=torch.float32).repeat_interleave(code.batch_size)
        any_edit = any(v != 0.0 for v in strengths) and AS.edited_steps(code.steps, te) > 0
        work_model, shift = patched(model, rec)
        placeholder = torch.zeros(full.shape)

        def work(denoise_fn, x0, callback, _guider):
            dev_code = full.to(device=x0.device, dtype=torch.float32)
            edited = None
            if any_edit:
                shift.direction = _direction_on(direction, x0.device)
                shift.strengths = per_latent

                def edited(x, sigma):
                    return shift.run(denoise_fn, x, sigma, code.family)
            try:
                return AS.asyrp_replay(denoise_fn, edited, dev_code, te, tb, seed=seed, callback=callback)
            except CodeError as e:
                raise B.code_error(e) from None

        samples = B.run_in_comfy(work_model, positive, negative, cfg, placeholder, code.sigmas, work, seed,
                                 code.steps)
        B.check_finite(samples, "Asyrp Edit", "the edited latent", code.steps, code.steps)
        return io.NodeOutput({"samples": samples})


class AsyrpEditDDIM(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AsyrpEditDDIM",
            display_name="Asyrp Edit (DDIM Inversion)",
            category=CATEGORY,
            description=(
                "The paper's own route for real images: deterministic DDIM inversion (eta = 0, only x_T is "
                "kept), then deterministic DDIM with the asymmetric step inside [T, t_edit]. Unlike a DPM Encode "
                "code it does not reconstruct exactly; the node measures and shows how far the plain "
                "reconstruction lands from the input."),
            inputs=[
                io.Model.Input("model", tooltip="The model the direction was trained on (or a fine-tune of it)."),
                io.Conditioning.Input("positive", tooltip="Prompt of inversion and generation (Empty "
                                                          "Conditioning for the paper's setting)."),
                io.Conditioning.Input("negative", tooltip="Negative prompt; only used when cfg > 1."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG of inversion and generation (1 inverts best)."),
                io.Latent.Input("latent_image", tooltip="The images to edit (VAE Encode)."),
                AsyrpDirectionIO.Input("direction", tooltip="From Asyrp Train Direction, Load or Combine."),
                io.String.Input("strength", default="1.0",
                                tooltip="Scale of delta_h; a comma-separated list gives one image per value "
                                        "(strength-major)."),
                io.Int.Input("steps", default=40, min=2, max=1000,
                             tooltip="DDIM steps of inversion and generation (paper: 40)."),
                io.Float.Input("t_edit", default=FROM_DIRECTION, min=-1.0, max=1.0, step=0.01,
                               tooltip="End of the editing interval (fraction of the chain); -1: the direction's."),
                io.Float.Input("t_boost", default=FROM_DIRECTION, min=-1.0, max=1.0, step=0.01,
                               tooltip="Quality boosting (eta = 1 fresh noise) below this fraction; 0 off; "
                                       "-1: the direction's."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the quality-boosting noise."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="The edited latents.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, latent_image, direction, strength, steps, t_edit, t_boost,
                seed) -> io.NodeOutput:
        rec = check_direction_for_model(model, direction)
        samples = latent_image["samples"]
        B.check_latent(model, samples, "latent_image")
        strengths = parse_strengths(strength)
        te, tb = resolve_interval(direction, t_edit, t_boost)
        B.check_conditioning_batch(positive, samples.shape[0], "positive")
        B.check_conditioning_batch(negative, samples.shape[0], "negative")
        family = rec["family"]
        sigmas = B.schedule(model, "normal", steps, 1.0)
        n = samples.shape[0]
        per_latent = torch.tensor(strengths, dtype=torch.float32).repeat_interleave(n)
        work_model, shift = patched(model, rec)
        result = {}

        def work(denoise_fn, x0, callback, _guider):
            x0 = x0[:n].float()  # the latent handed in is the input tiled once per strength
            try:
                x_T = AS.ddim_invert(denoise_fn, x0, sigmas, family)
                plain = AS.asyrp_sample(denoise_fn, None, x_T, sigmas, family, te, tb, seed=seed)
                shift.direction = _direction_on(direction, x0.device)
                shift.strengths = per_latent
                big = x_T.repeat(len(strengths), *([1] * (x_T.dim() - 1)))

                def edited(x, sigma):
                    return shift.run(denoise_fn, x, sigma, family)
                out = AS.asyrp_sample(denoise_fn, edited, big, sigmas, family, te, tb, seed=seed, callback=callback)
            except CodeError as e:
                raise B.code_error(e) from None
            err = ((plain - x0).flatten(1).norm(dim=1) / x0.flatten(1).norm(dim=1).clamp_min(1e-12)).tolist()
            result["err"] = err
            return out

        placeholder = samples.repeat(len(strengths), *([1] * (samples.dim() - 1)))
        out = B.run_in_comfy(work_model, positive, negative, cfg, placeholder, sigmas, work, seed, steps)
        err = result["err"]
        text = (f"DDIM inversion, {steps} steps: plain reconstruction off the input by "
                f"{sum(err) / len(err):.4g} (mean relative L2 in latent space; max {max(err):.4g}, n = {len(err)})")
        B.check_finite(out, "Asyrp Edit (DDIM Inversion)", "the edited latent", steps, steps)
        return io.NodeOutput({"samples": out}, ui=ui.PreviewText(text))


class CombineAsyrpDirections(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CombineAsyrpDirections",
            display_name="Combine Asyrp Directions",
            category=CATEGORY,
            description="Multi-attribute editing: delta_h = c1*d1 + c2*d2 (+ c3*d3 + c4*d4). h-space is linear "
                        "enough that the edits add.",
            inputs=[
                AsyrpDirectionIO.Input("direction_1", tooltip="First direction."),
                io.Float.Input("coefficient_1", default=1.0, min=-100.0, max=100.0, step=0.05,
                               tooltip="Scale of direction_1 (negative reverses it)."),
                AsyrpDirectionIO.Input("direction_2", tooltip="Second direction (same model)."),
                io.Float.Input("coefficient_2", default=1.0, min=-100.0, max=100.0, step=0.05,
                               tooltip="Scale of direction_2."),
                AsyrpDirectionIO.Input("direction_3", optional=True, tooltip="Optional third direction."),
                io.Float.Input("coefficient_3", default=1.0, min=-100.0, max=100.0, step=0.05, optional=True,
                               tooltip="Scale of direction_3."),
                AsyrpDirectionIO.Input("direction_4", optional=True, tooltip="Optional fourth direction."),
                io.Float.Input("coefficient_4", default=1.0, min=-100.0, max=100.0, step=0.05, optional=True,
                               tooltip="Scale of direction_4."),
            ],
            outputs=[AsyrpDirectionIO.Output(display_name="direction")],
        )

    @classmethod
    def execute(cls, direction_1, coefficient_1, direction_2, coefficient_2, direction_3=None, coefficient_3=1.0,
                direction_4=None, coefficient_4=1.0) -> io.NodeOutput:
        pairs = [(d, c) for d, c in ((direction_1, coefficient_1), (direction_2, coefficient_2),
                                     (direction_3, coefficient_3), (direction_4, coefficient_4)) if d is not None]
        try:
            return io.NodeOutput(AS.combine([d for d, _ in pairs], [c for _, c in pairs]))
        except CodeError as e:
            raise B.NodeInputError(f"direction: {e}") from None


# ---------------------------------------------------------------- files

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


class SaveAsyrpDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SaveAsyrpDirection",
            display_name="Save Asyrp Direction",
            category=CATEGORY,
            description=f"Saves a direction to ComfyUI's output folder as <prefix>_NNNNN_{SUFFIX} (safetensors "
                        "with a SHA-256; records the model, h shape, schedule and texts). Load Asyrp Direction "
                        "lists it as '<name> [output]'.",
            inputs=[
                AsyrpDirectionIO.Input("direction", tooltip="The direction to save."),
                io.String.Input("filename_prefix", default="dpm_latent/asyrp",
                                tooltip="File name prefix; may contain sub-folders."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, direction, filename_prefix) -> io.NodeOutput:
        return F.save(filename_prefix, SUFFIX, lambda path: save_direction(direction, path))


class LoadAsyrpDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadAsyrpDirection",
            display_name="Load Asyrp Direction",
            category=CATEGORY,
            description=f"Loads a direction ({SUFFIX}) from ComfyUI's input folder, or from the output "
                        "folder (names ending in ' [output]'); checks its digest and every "
                        "field, never unpickles.",
            inputs=[
                io.Combo.Input("direction_file", options=F.file_options(SUFFIX),
                               tooltip=f"A {SUFFIX} file in ComfyUI's input folder, or one Save Asyrp Direction "
                                       "wrote to the output folder (listed with ' [output]')."),
            ],
            outputs=[AsyrpDirectionIO.Output(display_name="direction")],
        )

    @classmethod
    def validate_inputs(cls, direction_file):
        return F.validate(direction_file, "direction_file")

    @classmethod
    def fingerprint_inputs(cls, direction_file):
        return F.fingerprint(direction_file, "direction_file")

    @classmethod
    def execute(cls, direction_file) -> io.NodeOutput:
        return io.NodeOutput(F.load(direction_file, "direction_file", load_direction))
