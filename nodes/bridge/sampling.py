# SPDX-License-Identifier: GPL-3.0-or-later
"""The thin layer between ComfyUI's objects and the pure-torch samplers.

Model calls go through ``comfy.samplers.CFGGuider.sample`` with a custom
``comfy.samplers.Sampler``: ComfyUI then loads and offloads the model, applies
LoRAs, ControlNets, hooks and wrappers, converts the conditioning and calls
``process_latent_in`` / ``process_latent_out``, exactly as for KSampler.
Inside the sampler the guider is a denoiser ``d = guider(x, sigma)``.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Optional

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from ...samplers import CodeError, LatentCode

SCHEDULERS = comfy.samplers.SCHEDULER_NAMES


class NodeInputError(ValueError):
    """Bad input to a node: ComfyUI shows the message on the node."""


def walk_dirs(root: str):
    """``os.walk`` that follows symbolic links (model folders often are links) but never loops."""
    seen = set()
    for dirpath, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        yield dirpath, dirs, files


def family_of(model) -> str:
    """'ve' (x = x0 + sigma*n: eps, v, EDM) or 'flow' (x = (1-sigma)*x0 + sigma*n).

    Decided by probing the patched model_sampling's own ``noise_scaling`` so
    that ModelSamplingSD3/Flux/Discrete patches are honoured.
    """
    ms = model.get_model_object("model_sampling")
    one = torch.ones(1, 1, 1, 1)
    sigma = torch.tensor([0.5])
    try:
        signal = float(ms.noise_scaling(sigma, one * 0.0, one, max_denoise=False).flatten()[0])
        noise = float(ms.noise_scaling(sigma, one, one * 0.0, max_denoise=False).flatten()[0])
    except Exception as e:  # pragma: no cover - exotic model types
        raise NodeInputError(f"model: cannot read its noise schedule ({type(ms).__name__}: {e})") from e
    if math.isclose(noise, 0.5, rel_tol=1e-5) and math.isclose(signal, 1.0, rel_tol=1e-5):
        return "ve"
    if math.isclose(noise, 0.5, rel_tol=1e-5) and math.isclose(signal, 0.5, rel_tol=1e-5):
        return "flow"
    raise NodeInputError(
        f"model: its sampling type {type(ms).__name__} noises latents as {signal:.3g}*x0 + {noise:.3g}*n at "
        "sigma 0.5; DPM Latent supports eps/v-prediction models (x0 + sigma*n) and flow models "
        "((1-sigma)*x0 + sigma*n)")


FAMILY_NAMES = {"ve": "eps/v-prediction, EDM or Cosmos Predict2 (x0 + sigma*n)",
                "flow": "flow (rectified flow, (1-sigma)*x0 + sigma*n)"}


def latent_channels(model) -> int:
    return int(model.get_model_object("latent_format").latent_channels)


def schedule(model, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """Sigmas the way ComfyUI's BasicScheduler / KSampler make them: ``steps``
    steps over the last ``denoise`` fraction of a ``steps/denoise`` schedule."""
    if scheduler not in SCHEDULERS:
        raise NodeInputError(f"scheduler: {scheduler!r} is not one of {SCHEDULERS}")
    if steps < 1:
        raise NodeInputError(f"steps: must be >= 1, got {steps}")
    if not (0.0 < denoise <= 1.0):
        raise NodeInputError(f"denoise: must be in (0, 1], got {denoise}")
    total = steps if denoise >= 1.0 else int(steps / denoise)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, total).cpu()
    return sigmas[-(steps + 1):].to(torch.float64)


def latent_ndim(model) -> int:
    """4 for image models (B, C, H, W), 5 for video models (B, C, T, H, W): the model's latent format decides."""
    return 2 + int(getattr(model.get_model_object("latent_format"), "latent_dimensions", 2))


def describe_shape(ndim: int) -> str:
    return {4: "image latents (B, C, H, W)", 5: "video latents (B, C, T, H, W)"}.get(ndim, f"{ndim}-D latents")


def check_latent(model, samples: torch.Tensor, what: str) -> None:
    want = latent_channels(model)
    if getattr(samples, "is_nested", False):
        raise NodeInputError(f"{what}: nested (audio + video) latents are not supported; pass the video latent alone")
    nd = latent_ndim(model)
    if nd not in (4, 5):
        raise NodeInputError(f"{what}: this model's latents are {nd - 2}-D (audio or 3-D models); DPM Latent "
                             "supports image (B, C, H, W) and video (B, C, T, H, W) latents")
    if samples.ndim != nd:
        fmt = type(model.get_model_object("latent_format")).__name__
        raise NodeInputError(
            f"{what}: has shape {tuple(samples.shape)} ({describe_shape(samples.ndim)}) but this model "
            f"(latent format {fmt}) takes {describe_shape(nd)}. Encode it with this model's VAE.")
    if samples.shape[1] != want:
        raise NodeInputError(
            f"{what}: has {samples.shape[1]} latent channels but the model expects {want}. "
            "Encode the image with this model's VAE (or pick the matching model).")
    if not torch.isfinite(samples).all():
        raise NodeInputError(f"{what}: contains NaN or infinity")


def check_clip_length(conds, shape, name: str, made: str = "the latent") -> None:
    """Image-to-video conditioning (a start frame, e.g. Wan Image To Video's ``concat_latent_image``) made for
    another clip length than ``shape`` (B, C, T, H, W) is refused naming both lengths."""
    if len(shape) != 5:
        return
    for c in conds or []:
        extra = c[1] if len(c) > 1 and isinstance(c[1], dict) else {}
        mask = extra.get("concat_mask")
        mask_frames = mask.shape[2] if isinstance(mask, torch.Tensor) and mask.ndim == 5 else None
        for key in ("concat_latent_image", "concat_mask"):
            t = extra.get(key)
            # shorter is fine for a mask, and for a start frame's latent whose mask spans the clip (HunyuanVideo
            # image-to-video "v1 (concat)": ComfyUI pads it with zeros in time, as in KSampler)
            if isinstance(t, torch.Tensor) and t.ndim == 5 and t.shape[2] != shape[2] and not (
                    t.shape[2] < shape[2] and (key == "concat_mask" or mask_frames == shape[2])):
                # a start frame padded in time is made for its mask's clip length (Hunyuan Image To Video)
                made_for = mask_frames if key == "concat_latent_image" and mask_frames is not None else t.shape[2]
                raise NodeInputError(
                    f"{name}: its image-to-video {key} is for a clip of {made_for} latent frames but {made} has "
                    f"{shape[2]} latent frames (shape {tuple(shape)}); make the conditioning with the clip's "
                    "length (e.g. Wan Image To Video's length) or encode a clip of that length")


def check_conditioning_batch(conds, batch: int, name: str) -> None:
    for c in conds or []:
        t = c[0]
        if isinstance(t, torch.Tensor) and t.shape[0] not in (1, batch):
            raise NodeInputError(
                f"{name}: conditioning has batch {t.shape[0]} but the latent batch is {batch}; "
                "use one prompt (batch 1) or one per image")


def latent_space(model) -> tuple[str, float, str]:
    """(latent format class, its scale factor, model type) of a MODEL, e.g. ("SD15", 0.18215, "SD15 (EPS)")."""
    fmt = model.get_model_object("latent_format")
    base = model.model
    config = type(getattr(base, "model_config", None)).__name__
    mtype = getattr(getattr(base, "model_type", None), "name", None)
    if any(c.__name__ == "X0" for c in type(model.get_model_object("model_sampling")).__mro__):
        mtype = "X0"  # ComfyUI has no X0 model type; x0-prediction lives in its sampling class
    kind = type(base).__name__ if config == "NoneType" else config
    return type(fmt).__name__, float(getattr(fmt, "scale_factor", 1.0)), f"{kind} ({mtype})" if mtype else kind


def stamp_code(model, code: LatentCode) -> LatentCode:
    """The code, marked with the latent space of ``model`` (a new object; the input is not changed)."""
    fmt, scale, mtype = latent_space(model)
    return dataclasses.replace(code, latent_format=fmt, latent_scale_factor=scale, model_type=mtype)


def check_code_for_model(model, code: LatentCode, what: str = "latent_code") -> None:
    fam = family_of(model)
    if code.family != fam:
        raise NodeInputError(
            f"{what}: the code was made for a {FAMILY_NAMES[code.family]} model but this model is "
            f"{FAMILY_NAMES[fam]}; replay it with a model of the same family")
    fmt, scale, mtype = latent_space(model)
    nd = latent_ndim(model)
    if len(code.shape) != nd:
        raise NodeInputError(
            f"{what}: the code is of {describe_shape(len(code.shape))}, shape {code.shape}, made with a "
            f"{code.model_type or 'model'} model (latent format {code.latent_format or 'unknown'}), but this "
            f"model ({mtype}, latent format {fmt}) takes {describe_shape(nd)}; replay it with a model of the "
            "same family")
    if code.latent_format is not None and (
            code.latent_format != fmt or (code.latent_scale_factor is not None and
                                          not math.isclose(code.latent_scale_factor, scale, rel_tol=1e-6))):
        made = f"latent format {code.latent_format}" + (
            f", scale {code.latent_scale_factor:g}" if code.latent_scale_factor is not None else "") + (
            f", {code.shape[2]} latent frames" if len(code.shape) == 5 else "")
        raise NodeInputError(
            f"{what}: the code was made with a {code.model_type or 'model'} model ({made}) but this model is "
            f"{mtype} (latent format {fmt}, scale {scale:g}); their latent spaces differ, so the replay would "
            "be noise. Replay it with a model of the same latent space (e.g. another fine-tune of the same "
            "base), or encode the image again with this model.")
    want = latent_channels(model)
    if code.shape[1] != want:
        raise NodeInputError(
            f"{what}: the code has {code.shape[1]} latent channels but the model expects {want}")
    if code.family == "flow" and float(code.sigmas[0]) > 1.0:
        raise NodeInputError(f"{what}: sigma {float(code.sigmas[0])} > 1 cannot drive a flow model")


NON_FINITE_HINT = ("Try: run the model in fp32 (start ComfyUI with --force-fp32, or load the model with an fp32 "
                   "weight dtype instead of fp16/fp8), a lower cfg, a lower step_size for Langevin, or another "
                   "code file (a code made for another model, or a damaged one, can do this).")


class NonFiniteError(RuntimeError):
    """A node's result (or a step of its sampling chain) became NaN or infinite."""


def check_finite(tensor: torch.Tensor, node: str, what: str, step: Optional[int] = None,
                 steps: Optional[int] = None) -> torch.Tensor:
    """Raise :class:`NonFiniteError` if ``tensor`` holds NaN or infinity; never pass one downstream."""
    if tensor is not None and not bool(torch.isfinite(tensor).all()):
        where = f" at step {step} of {steps}" if step is not None else ""
        raise NonFiniteError(f"{node}: {what} became NaN or infinite{where}. {NON_FINITE_HINT}")
    return tensor


def _finite_steps(callback):
    """A step callback that checks each step's prediction and latent, then calls ``callback``."""
    def check(i, denoised, x, total):
        if not bool(torch.isfinite(denoised).all() & torch.isfinite(x).all()):
            which = "the latent" if not bool(torch.isfinite(x).all()) else "the model's prediction"
            raise NonFiniteError(f"{which} became NaN or infinite at step {i + 1} of {total}. {NON_FINITE_HINT}")
        if callback is not None:
            callback(i, denoised, x, total)
    return check


def make_guider(model, positive, negative, cfg: float) -> comfy.samplers.CFGGuider:
    if not math.isfinite(cfg):
        raise NodeInputError(f"cfg: must be a finite number, got {cfg}")
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def pin_concat_image(model, conds, shape, name: str, denoise_mask=None):
    """Conditioning whose model-side image does not depend on the latent being sampled.

    Where a conditioning has no ``concat_latent_image``, ComfyUI shows a model that concatenates an image
    the latent being sampled instead: the source when encoding, but a placeholder when replaying a code,
    so the replay would not be exact.
    - ``concat_image`` (HunyuanVideo image-to-video; Hunyuan Image To Video sets the start frame on the
      positive prompt only): such a prompt gets an all-zero ``concat_latent_image``, what the model sees
      when KSampler starts from an empty latent, in encode and replay alike.
    - ``masked_image`` (inpainting checkpoints) with a noise mask: the model is meant to see the image
      around the mask, which a zero image would hide, so this is refused with the fix (InpaintModelConditioning
      puts the image on both prompts). Without a noise mask ComfyUI gives it a blank image: nothing to do.
    Returns a new list; the input is not changed. ``name``: the input named in the error."""
    keys = set(getattr(model.model, "concat_keys", ()) or ())
    if not conds or not keys & {"concat_image", "masked_image"}:
        return conds
    out = []
    for c in conds:
        extra = c[1] if len(c) > 1 and isinstance(c[1], dict) else None
        if extra is None or extra.get("concat_latent_image") is not None:
            out.append(c)
        elif "concat_image" in keys:
            out.append([c[0], dict(extra, concat_latent_image=torch.zeros(tuple(shape)))] + list(c[2:]))
        elif denoise_mask is not None:
            raise NodeInputError(
                f"{name}: this inpainting model ({type(model.model).__name__}) reads the masked image from the "
                "conditioning, and this prompt has none, so ComfyUI would show it the latent being sampled, which "
                "a replay does not have. Make the prompts and the masked latent with InpaintModelConditioning "
                "(it puts the image on both prompts), or use a non-inpainting checkpoint with the mask.")
        else:
            out.append(c)
    return out


# work(denoise, x0_model_space, callback, guider) -> latent in model space
Work = Callable[..., torch.Tensor]


class _FunctionSampler(comfy.samplers.Sampler):
    """A ComfyUI Sampler that runs ``work(denoise, x0_model_space, callback, guider)``."""

    def __init__(self, work: Work):
        self.work = work

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        model_options = extra_args.get("model_options", {})
        seed = extra_args.get("seed", None)

        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            s = torch.full((x.shape[0],), float(sigma), device=x.device, dtype=x.dtype)
            return model_wrap(x, s, model_options=model_options, seed=seed)

        x0 = latent_image
        # CFGGuider leaves an all-zero latent unprocessed; keep model space consistent.
        if x0 is not None and torch.count_nonzero(x0) == 0:
            x0 = model_wrap.inner_model.process_latent_in(x0)
        return self.work(denoise, x0, _finite_steps(callback), model_wrap)


def run_in_comfy(model, positive, negative, cfg: float, latent: torch.Tensor, sigmas: torch.Tensor,
                 work: Work, seed: int, steps_for_progress: Optional[int],
                 denoise_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run ``work`` inside ComfyUI's sampling machinery; returns process_latent_out(work(...)).

    ComfyUI hands a sampler only a latent and returns only a latent, so the callers follow one idiom:
    ``latent`` is the input image (process_latent_in is applied to it) or, when the work starts from
    a code, a zero placeholder of the right shape; anything else the work produces (a code, a trained
    direction, a trace) it stores in a dict the caller made, and the caller reads it after this returns.

    ``steps_for_progress`` None: no per-step progress bar (the work reports its own).

    ``denoise_mask`` (the edit mask, 1 = may change) reaches the model's conditioning as KSampler's noise
    mask does (inpainting models, Wan 2.2's and LTX-Video's image-to-video read it); the blending
    itself is the work's (the code's trajectory outside the mask), so the sampler ignores it."""
    positive = pin_concat_image(model, positive, latent.shape, "positive", denoise_mask)
    negative = pin_concat_image(model, negative, latent.shape, "negative", denoise_mask)
    guider = make_guider(model, positive, negative, cfg)
    callback = None if steps_for_progress is None else latent_preview.prepare_callback(model, steps_for_progress)
    noise = torch.zeros_like(latent)
    out = guider.sample(noise, latent, _FunctionSampler(work), sigmas.to(torch.float32), denoise_mask=denoise_mask,
                        callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    return out.to(comfy.model_management.intermediate_device())


def code_error(e: CodeError) -> NodeInputError:
    return NodeInputError(str(e))


def cpu_code(code: LatentCode) -> LatentCode:
    return code.to(device=comfy.model_management.intermediate_device(), dtype=torch.float32)

