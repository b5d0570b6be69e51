# SPDX-License-Identifier: GPL-3.0-or-later
"""Latent codes inside ComfyUI: DPM Encode, Replay (at one cfg or several), Random Latent Code.

Each function checks its inputs against the model (a bad one is a :class:`NodeInputError` naming
it) and runs the pure-torch encoder / replay of ``samplers.dpm_encoder`` inside ComfyUI's sampling
machinery (``sampling.run_in_comfy``), so LoRAs, ControlNets and model patches apply as in KSampler.
"""
from __future__ import annotations

import torch

import comfy.sample

from ...samplers import CodeError, LatentCode, check_schedule, encode, latent_mask, prior_code, replay
from ...samplers.sweep import SweepError, parse_floats, split_cfg
from . import sampling as B


def encode_image(model, positive, negative, latent_image, seed, steps, scheduler, denoise, eta, cfg, sigmas=None):
    """DPM Encode: the image's latent code, stamped with the model's latent space."""
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
    B.check_clip_length(positive, samples.shape, "positive", "latent_image")
    B.check_clip_length(negative, samples.shape, "negative", "latent_image")
    try:  # before ComfyUI loads anything: a bad schedule is an input error
        check_schedule(sigmas, eta, family)
    except CodeError as e:
        raise B.code_error(e) from None

    result = {}

    def work(denoise_fn, x0, callback, _guider):
        result["code"] = encode(denoise_fn, x0.float(), sigmas, eta, family, seed, callback=callback,
                                mask=None if mask is None else mask.to(x0.device))
        return x0

    B.run_in_comfy(model, positive, negative, cfg, samples, sigmas, work, seed, len(sigmas) - 1, denoise_mask=mask)
    code = B.stamp_code(model, B.cpu_code(result["code"]))
    for name in ("start_mean", "start_noise", "noises", "residual"):
        B.check_finite(getattr(code, name), "DPM Encode", f"the code's {name}")
    return code


def replay_code(model, positive, negative, latent_code, cfg, mask=None, cfg_values=None) -> torch.Tensor:
    """Replay Latent with Prompt: the code replayed (at every value of ``cfg_values`` when given)."""
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
    B.check_clip_length(positive, code.shape, "positive", "the latent code")
    B.check_clip_length(negative, code.shape, "negative", "the latent code")
    if cfg_values is not None and cfg_values.strip():
        samples = replay_at_cfgs(model, positive, negative, code, parse_cfg_values(cfg_values))
        B.check_finite(samples, "Replay Latent with Prompt", "the replayed latent", code.steps, code.steps)
        return samples
    placeholder = torch.zeros(code.shape)

    def work(denoise_fn, _x0, callback, _guider):
        dev_code = code.to(device=_x0.device, dtype=torch.float32)
        return replay(denoise_fn, dev_code, callback=callback)

    samples = B.run_in_comfy(model, positive, negative, cfg, placeholder, code.sigmas, work, 0, code.steps,
                             denoise_mask=code.mask)
    B.check_finite(samples, "Replay Latent with Prompt", "the replayed latent", code.steps, code.steps)
    return samples


def random_code(model, width, height, batch_size, seed, steps, scheduler, eta, latent=None) -> LatentCode:
    """Random Latent Code: a code drawn from its prior for an image of width x height, or of the shape of
    ``latent`` (a LATENT, e.g. an empty video latent: the only way to give a video's frame count)."""
    fmt = model.get_model_object("latent_format")
    if latent is not None:
        samples = latent["samples"]
        if getattr(samples, "is_nested", False) or not isinstance(samples, torch.Tensor):
            raise B.NodeInputError("latent: nested (audio + video) latents are not supported")
        samples = comfy.sample.fix_empty_latent_channels(model, samples)  # as KSampler does for empty latents
        B.check_latent(model, samples, "latent")
        shape = tuple(int(v) for v in samples.shape)
    else:
        if getattr(fmt, "latent_dimensions", 2) != 2:
            raise B.NodeInputError(
                "model: its latents are video latents (B, C, T, H, W); width and height do not give the frame "
                "count. Connect an empty latent of the clip's size to 'latent' (e.g. Empty Hunyuan Latent Video, "
                "Wan Image To Video's latent) so the code takes its shape")
        ratio = int(getattr(fmt, "spacial_downscale_ratio", 8) or 8)
        if width < ratio or height < ratio:
            raise B.NodeInputError(f"width/height: at least {ratio} pixels")
        shape = (batch_size, B.latent_channels(model), height // ratio, width // ratio)
    sigmas = B.schedule(model, scheduler, steps, 1.0)
    try:
        code = B.stamp_code(model, prior_code(shape, sigmas, eta, B.family_of(model), seed))
    except CodeError as e:
        raise B.code_error(e) from None
    B.check_finite(code.start_noise, "Random Latent Code", "the code")
    B.check_finite(code.noises, "Random Latent Code", "the code")
    return code


# ---------------------------------------------------------------------------- replay at several cfg
def parse_cfg_values(text: str) -> list[float]:
    try:
        return parse_floats(text, "cfg_values", 0.0, 100.0)
    except SweepError as e:
        raise B.NodeInputError(f"{e} (or leave cfg_values unconnected to use cfg)") from None


def _per_image_cfg(model, scales: torch.Tensor):
    """A model clone whose CFG uses one scale per image of the batch."""
    m = model.clone()

    def cfg_fn(args):
        cond, uncond, x = args["cond_denoised"], args["uncond_denoised"], args["input"]
        s = scales.to(device=cond.device, dtype=cond.dtype).view(-1, *([1] * (cond.dim() - 1)))
        return x - (uncond + (cond - uncond) * s)

    m.set_model_sampler_cfg_function(cfg_fn)
    return m


def replay_at_cfgs(model, positive, negative, code: LatentCode, values: list[float]) -> torch.Tensor:
    """Replay ``code`` at every cfg in ``values``: images cfg-major (value i: i*B .. i*B+B-1).

    The values at exactly 1 run as one batch without the unconditional branch; the others as one
    batch with a per-image CFG scale. A model that already has a custom CFG function (another
    patch) is replayed once per value instead, so that patch is kept."""
    bsz = code.batch_size
    out: list = [None] * len(values)
    ones, others = split_cfg(values)
    groups = [(ones, 1.0)] if ones else []
    custom = "sampler_cfg_function" in model.model_options
    if others and custom:
        groups += [([i], values[i]) for i in others]
    elif others:
        groups.append((others, None))
    for idx, cfg in groups:
        tiled = code.tiled(len(idx))
        m = model
        if cfg is None:
            if len(idx) == 1:
                cfg = values[idx[0]]
            else:
                scales = torch.tensor([values[i] for i in idx], dtype=torch.float32).repeat_interleave(bsz)
                m, cfg = _per_image_cfg(model, scales), max(values[i] for i in idx)
        placeholder = torch.zeros(tiled.shape)

        def work(denoise_fn, x0, callback, _guider, tiled=tiled):
            return replay(denoise_fn, tiled.to(device=x0.device, dtype=torch.float32), callback=callback)

        samples = B.run_in_comfy(m, positive, negative, cfg, placeholder, code.sigmas, work, 0, code.steps,
                                 denoise_mask=tiled.mask)
        for j, i in enumerate(idx):
            out[i] = samples[j * bsz:(j + 1) * bsz]
    return torch.cat(out)
