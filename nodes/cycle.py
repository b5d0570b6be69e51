# SPDX-License-Identifier: GPL-3.0-or-later
"""CycleDiffusion nodes: DPM Encode, Replay Latent with Prompt, Empty Conditioning."""
from __future__ import annotations

import torch
from comfy_api.latest import io

import comfy.model_base

from ..samplers import CodeError, check_schedule, encode, latent_mask, replay
from . import _bridge as B
from ._types import CATEGORY, LatentCodeIO


class DPMEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DPMEncode",
            display_name="DPM Encode",
            category=CATEGORY,
            description=(
                "DPM-Encoder (CycleDiffusion): encodes a latent image into the full random code of a "
                "stochastic DDIM-eta sampler, so that Replay Latent with Prompt with the same model and "
                "prompt gives the image back exactly, and with a new prompt or a second model gives an edit."),
            inputs=[
                io.Model.Input("model", tooltip="The model whose sampler is inverted (LoRAs and patches apply)."),
                io.Conditioning.Input("positive", tooltip="The SOURCE prompt: what the image shows now."),
                io.Conditioning.Input("negative", tooltip="Negative prompt; only used when cfg > 1."),
                io.Latent.Input("latent_image", tooltip="The image to encode, as a latent from VAE Encode. A noise "
                                                        "mask on it (Set Latent Noise Mask, VAE Encode for Inpaint) "
                                                        "travels in the code: replay then changes only the masked "
                                                        "region."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the forward-posterior draws; the same seed gives the same code."),
                io.Int.Input("steps", default=50, min=1, max=10000,
                             tooltip="Sampler steps that are encoded and later replayed (paper: 100 over the chain)."),
                io.Combo.Input("scheduler", options=B.SCHEDULERS, default="normal",
                               tooltip="Sigma schedule, as in KSampler."),
                io.Float.Input("denoise", default=0.7, min=0.01, max=1.0, step=0.01,
                               tooltip="Fraction of the chain that is encoded (KSampler's denoise): higher lets "
                                       "an edit change more. Paper: 0.5-0.85."),
                io.Float.Input("eta", default=0.1, min=0.001, max=1.0, step=0.01,
                               tooltip="DDIM eta of the stochastic sampler, > 0 (0.1 in the paper; 1 = DDPM)."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG while encoding. The paper encodes with the source prompt at cfg 1."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="Optional sigma schedule ending at 0; overrides steps, scheduler, denoise."),
            ],
            outputs=[LatentCodeIO.Output(display_name="latent_code",
                                         tooltip="The image's code: start latent plus one noise per step.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, scheduler, denoise, eta, cfg,
                sigmas=None) -> io.NodeOutput:
        samples = latent_image["samples"]
        B.check_latent(model, samples, "latent_image")
        mask = latent_image.get("noise_mask")
        if mask is not None:
            try:
                mask = latent_mask(mask.cpu(), samples.shape)
            except CodeError as e:
                raise B.NodeInputError(f"latent_image: its noise_mask cannot be used ({e})") from None
        family = B.family_of(model)
        if sigmas is None:
            sigmas = B.schedule(model, scheduler, steps, denoise)
        elif not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
            raise B.NodeInputError("sigmas: needs at least two values (one step)")
        B.check_conditioning_batch(positive, samples.shape[0], "positive")
        B.check_conditioning_batch(negative, samples.shape[0], "negative")
        try:  # before ComfyUI loads anything: a bad schedule is an input error
            check_schedule(sigmas, eta, family)
        except CodeError as e:
            raise B.code_error(e) from None

        result = {}

        def work(denoise_fn, x0, callback, _guider):
            result["code"] = encode(denoise_fn, x0.float(), sigmas, eta, family, seed, callback=callback,
                                    mask=None if mask is None else mask.to(x0.device))
            return x0

        B.run_in_comfy(model, positive, negative, cfg, samples, sigmas, work, seed, len(sigmas) - 1)
        code = B.stamp_code(model, B.cpu_code(result["code"]))
        for name in ("start_mean", "start_noise", "noises", "residual"):
            B.check_finite(getattr(code, name), "DPM Encode", f"the code's {name}")
        return io.NodeOutput(code)


class ReplayLatentWithPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ReplayLatentWithPrompt",
            display_name="Replay Latent with Prompt",
            category=CATEGORY,
            description=(
                "Runs the stochastic sampler with the noises stored in a latent code. Same model and prompt "
                "as DPM Encode: the encoded image back. New prompt: zero-shot edit. Another model of the same "
                "family: unpaired translation."),
            inputs=[
                io.Model.Input("model", tooltip="Model to replay with (the encoder's, or a second one)."),
                io.Conditioning.Input("positive", tooltip="The TARGET prompt."),
                io.Conditioning.Input("negative", tooltip="Negative prompt; only used when cfg > 1."),
                LatentCodeIO.Input("latent_code", tooltip="From DPM Encode, Load Latent Code or Random Latent Code."),
                io.Float.Input("cfg", default=3.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG of the replay; the paper sweeps 1-5."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional edit mask (white = may change), image-sized like any ComfyUI mask; "
                                      "overrides the mask stored in the code. Outside it the result is the encoded "
                                      "image at every step; soft values blend. Needs a code from DPM Encode."),
                io.String.Input("cfg_values", optional=True, force_input=True,
                                tooltip="Optional cfg list as text ('1, 1.5, 2', e.g. DPM Sweep's cfg): replays the "
                                        "code at every value as one batch (value-major) and overrides cfg."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="The replayed latent image.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_code, cfg, mask=None, cfg_values=None) -> io.NodeOutput:
        code = latent_code
        B.check_code_for_model(model, code)
        if mask is not None:
            try:
                code = code.with_mask(latent_mask(mask.cpu(), code.shape))
            except CodeError as e:
                msg = str(e)
                raise B.NodeInputError(msg if msg.startswith("mask") else f"mask: {msg}") from None
        B.check_conditioning_batch(positive, code.batch_size, "positive")
        B.check_conditioning_batch(negative, code.batch_size, "negative")
        if cfg_values is not None and cfg_values.strip():
            from .sweep import parse_cfg_values, replay_at_cfgs

            samples = replay_at_cfgs(model, positive, negative, code, parse_cfg_values(cfg_values))
            B.check_finite(samples, "Replay Latent with Prompt", "the replayed latent", code.steps, code.steps)
            return io.NodeOutput({"samples": samples})
        placeholder = torch.zeros(code.shape)

        def work(denoise_fn, _x0, callback, _guider):
            dev_code = code.to(device=_x0.device, dtype=torch.float32)
            return replay(denoise_fn, dev_code, callback=callback)

        samples = B.run_in_comfy(model, positive, negative, cfg, placeholder, code.sigmas, work, 0, code.steps)
        B.check_finite(samples, "Replay Latent with Prompt", "the replayed latent", code.steps, code.steps)
        return io.NodeOutput({"samples": samples})


def _conditioning_dims(model) -> tuple[int, int | None]:
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
    if type(base) is comfy.model_base.BaseModel and cfg.get("context_dim") and not cfg.get("adm_in_channels"):
        return int(cfg["context_dim"]), None
    raise B.NodeInputError(
        f"model: Empty Conditioning does not know the conditioning of {type(base).__name__} models; "
        "use CLIP Text Encode with an empty prompt (and Conditioning Zero Out) instead")


class EmptyConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EmptyConditioning",
            display_name="Empty Conditioning",
            category=CATEGORY,
            description=(
                "All-zero conditioning shaped for the model (SD1.x, SDXL, SD3, Flux): for unconditional "
                "models and checkpoints without a text encoder."),
            inputs=[
                io.Model.Input("model", tooltip="The model the conditioning is for."),
                io.Int.Input("tokens", default=77, min=1, max=4096,
                             tooltip="Number of (zero) text tokens."),
            ],
            outputs=[io.Conditioning.Output(display_name="CONDITIONING")],
        )

    @classmethod
    def execute(cls, model, tokens) -> io.NodeOutput:
        ctx, pooled = _conditioning_dims(model)
        extra = {}
        if pooled is not None:
            extra["pooled_output"] = torch.zeros(1, pooled)
        return io.NodeOutput([[torch.zeros(1, tokens, ctx), extra]])
