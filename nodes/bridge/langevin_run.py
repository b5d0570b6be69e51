# SPDX-License-Identifier: GPL-3.0-or-later
"""The Langevin Latent Sampler's work inside ComfyUI: sample a latent code under an energy.

The chain (replay + VAE decode + energy) is differentiated through ComfyUI's loaded models
(``autograd``); the CLIP models of the energy are loaded under model management with them
(``clip_models``); the Langevin loop itself is pure torch (``guidance.langevin``).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

import comfy.model_management
import comfy.utils
import latent_preview

from ...guidance.langevin import langevin
from ...guidance.video import VideoEnergy
from ...samplers import replay
from . import clip_models as CM
from . import plot as P
from . import sampling as B
from .autograd import (UnsupportedWeights, alias_conds, control_modules, gradients_through, latent_frames_for,
                       pixel_frames_of, vae_decoder)


def energy_plot(energy: list[list[float]], prior: list[list[float]], size=P.SIZE) -> torch.Tensor:
    """Energy (top) and prior ||z||^2/dim (bottom) per Langevin step, batch mean, as an IMAGE."""
    e, q = [float(np.mean(v)) for v in energy], [float(np.mean(v)) for v in prior]
    steps = f"step 1 .. {len(e)}"
    return P.paint([P.Panel("energy (weighted)", [("energy", e, (200, 40, 40))], footer=steps),
                    P.Panel("prior |z|^2/dim", [("prior", q, (40, 80, 200))], footer=steps)], size)


MEMORY_MODES = ["auto", "low: recompute each step", "fast: keep the whole chain"]


def _saved_bytes(fn, x: torch.Tensor, params) -> int:
    """Bytes autograd saves for the backward pass of ``fn(x)`` (a chain step, a decode),
    counted by a saved-tensors hook on one probe call; weights (``params``) are not counted.

    The hook hands autograd a placeholder, never the tensor: a saved tensor that is its own node's
    output (sigmoid, SiLU, softmax ...) and is handed back as-is by a pack hook makes a reference cycle
    (tensor -> grad_fn -> saved tensor) through C++ that Python's collector cannot see, so every probe
    kept its whole graph alive for the life of the server (12.5 MB per prompt on the tiny SD1.5). The
    probe holds the saved tensors in a plain list instead, as the graph would (so that a freed
    tensor's address is not reused and counted twice), and drops them on return."""
    weights = {p.data_ptr() for p in params}
    held, seen, total = [], set(), [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else None
        if ptr is not None and ptr not in weights and ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        held.append(t)
        return None

    def unpack(_placeholder):
        raise RuntimeError("the Langevin memory probe's graph is for measuring only; it has no backward pass")

    x = x.detach().requires_grad_(True)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            out = fn(x)
        del out
    finally:
        held.clear()
    return total[0]


def _graph_bytes_of_one_step(denoise_fn, code, params) -> int:
    """Bytes one chain step (the first, at the code's start) keeps for its backward pass."""
    return _saved_bytes(lambda x: denoise_fn(x, float(code.sigmas[0])), code.x_start(), params)


def _graph_bytes_of_decode(decode, code, params) -> int:
    """Bytes one decode (VAE) of the code's start latent keeps for its backward pass: for a video VAE the
    largest item of a Langevin step (every frame's activations at full resolution), held in either mode."""
    return _saved_bytes(decode, code.x_start(), params)


def _keep_whole_chain(memory, denoise_fn, guider, code, need: int, device, decode_bytes: int = 0
                      ) -> tuple[bool, str]:
    """Whether the gradient keeps the chain's whole autograd graph (one forward + one backward per step)
    instead of recomputing each step (memory flat in the chain length, about 1.6x slower on the demo
    model at batch 16). ``auto`` measures what one step keeps for the backward pass (one probe call) and
    keeps the graph when steps x that, plus the decode's estimate, fits in half of the device's free
    memory; if it still runs out of memory the node falls back to recomputing."""
    if isinstance(memory, bool):  # the benchmarks' and tests' use_checkpoint flag
        return (not memory), "fixed by the caller"
    if memory == MEMORY_MODES[1]:
        return False, "memory: low"
    if memory == MEMORY_MODES[2]:
        return True, "memory: fast"
    try:
        per_step = _graph_bytes_of_one_step(denoise_fn, code, guider.inner_model.parameters())
    except Exception as e:  # noqa: BLE001 -- the probe is an optimisation; any failure means "recompute"
        if _is_out_of_memory(e):
            comfy.model_management.soft_empty_cache()
        return False, f"auto: could not measure one step ({type(e).__name__}), recomputing each step"
    graph = code.steps * per_step + need + decode_bytes
    free = comfy.model_management.get_free_memory(device)
    keep = graph < 0.5 * free
    video = ""
    if decode_bytes:
        # held in either mode (one decode per Langevin step); it decides whether anything else fits
        ratio = decode_bytes / max(per_step, 1)
        video = (f"the video VAE decode's backward measured {decode_bytes / 2**20:.3g} MB, "
                 f"{ratio:.3g}x a chain step's ({'the largest item' if ratio >= 1 else 'smaller than a step'}), ")
        if decode_bytes > 0.5 * free:
            video += "more than half the free memory: choose fewer frames with Video Energy, "
    return keep, (f"auto: {video}the whole chain's graph, measured {per_step / 2**20:.3g} MB per step, "
                  f"{graph / 2**20:.0f} MB with the decode, {'fits' if keep else 'does not fit'} in half of "
                  f"{free / 2**20:.0f} MB free")


def _video_decode_bytes(memory, decode, code, vae) -> int:
    """The video decode's backward bytes: measured under ``auto`` (one probe decode), else ComfyUI's estimate."""
    if memory == MEMORY_MODES[0]:
        try:
            return _graph_bytes_of_decode(decode, code, vae.first_stage_model.parameters())
        except Exception as e:  # noqa: BLE001 -- an estimate only
            if _is_out_of_memory(e):
                comfy.model_management.soft_empty_cache()
    try:
        return int(2 * vae.memory_used_decode(tuple(code.shape), vae.vae_dtype))
    except Exception:  # noqa: BLE001
        return 0


def _frames_text(energy) -> str:
    frames = "every frame" if energy.frames is None else "frames " + ", ".join(str(f) for f in energy.frames)
    t = f", temporal weight {energy.temporal_weight:g}" if energy.temporal_weight else ""
    return f"CLIP energy averaged over {frames}{t}"


def _previews_on(model) -> bool:
    """Whether ComfyUI's samplers would send previews for this model: not under ``--preview-method none``
    (ComfyUI's default), nor where it has no previewer for the model's latents (no latent2rgb factors, no
    TAESD file). The previewer's own picture is not needed: each Langevin step has already decoded its
    sample with the VAE, an exact picture at no extra cost."""
    try:
        return latent_preview.get_previewer(model.load_device, model.model.latent_format) is not None
    except Exception as e:  # noqa: BLE001 -- a preview is never worth failing the prompt for
        logging.warning("Langevin Latent Sampler: no previews (%s: %s)", type(e).__name__, e)
        return False


def step_preview(images: torch.Tensor) -> tuple:
    """The first image of a Langevin step as ComfyUI's samplers hand a preview to the progress bar: a JPEG
    the server scales to fit ``--preview-size`` (512 by default), one per step."""
    first = images[0] if images.dim() == 4 else images[0, :, 0]  # a clip (B, 3, F, H, W): its first frame
    pixels = (first.detach().movedim(0, -1).clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return "JPEG", Image.fromarray(pixels), latent_preview.MAX_PREVIEW_RESOLUTION


def _is_out_of_memory(e: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def run_langevin(model, positive, negative, cfg, vae, energy, latent_code, steps, step_size, seed, update,
                 memory="auto"):
    """The Langevin Latent Sampler's work; returns (code, latent dict, plot image, trace).

    ``memory``: one of MEMORY_MODES, or a bool (True: recompute each step, False: keep every
    activation of the chain; the benchmarks' flag). ``trace.gradient`` says what was used."""
    if not isinstance(memory, bool) and memory not in MEMORY_MODES:
        raise B.NodeInputError(f"memory: {memory!r} is not one of {MEMORY_MODES}")
    code = latent_code
    B.check_code_for_model(model, code)
    B.check_conditioning_batch(positive, code.batch_size, "positive")
    B.check_conditioning_batch(negative, code.batch_size, "negative")
    if vae is None or getattr(vae, "first_stage_model", None) is None:
        raise B.NodeInputError("vae: connect the VAE that decodes this model's latents")
    vae_ch = getattr(vae, "latent_channels", None)
    if vae_ch is not None and vae_ch != code.shape[1]:
        raise B.NodeInputError(f"vae: it decodes {vae_ch}-channel latents but the code has {code.shape[1]} channels")
    if update not in ("all components", "start only"):
        raise B.NodeInputError(f"update: {update!r} is not 'all components' or 'start only'")
    mode = "all" if update == "all components" else "start"
    video = len(code.shape) == 5
    if video and not isinstance(energy, VideoEnergy):
        energy = VideoEnergy(energy)  # every frame, averaged; Video Energy chooses frames and a temporal term
    if not video and isinstance(energy, VideoEnergy):
        raise B.NodeInputError("energy: a Video Energy scores decoded clips, but this code is of image latents; "
                               "connect the CLIP Energy directly")
    latent_frames = None
    if video:
        pixels = pixel_frames_of(vae, code.shape[2])
        last = energy.last_frame()
        if last is not None and pixels is not None and last >= pixels:
            raise B.NodeInputError(
                f"energy: Video Energy reads frame {last} but the clip has {pixels} frames ({code.shape[2]} latent "
                f"frames, 0 .. {pixels - 1})")
        latent_frames = code.shape[2] if last is None else latent_frames_for(vae, last, code.shape[2])
    result = {}
    pbar = comfy.utils.ProgressBar(max(steps, 1))
    previews = _previews_on(model)

    def work(denoise_fn, x0, _callback, guider):
        # Keep what sampling loaded (model, ControlNets, patches) and add the VAE; the backward pass
        # needs about twice the forward memory of both.
        shape = tuple(code.shape)
        try:
            need = 2 * (guider.model_patcher.model.memory_required([shape[0] * 2, *shape[1:]]) +
                        vae.memory_used_decode(shape, vae.vae_dtype))
        except Exception:  # an estimate only; some model types estimate from other inputs
            need = 0
        clips = CM.energy_patchers(energy)
        CM.load(clips, memory_required=need,
                others=[guider.model_patcher, *getattr(guider, "loaded_models", []), vae.patcher])
        clip_modules = [p.model for p in clips]
        try:
            with gradients_through(guider.inner_model, vae.first_stage_model, *control_modules(guider.conds),
                                   *clip_modules):
                alias_conds(guider.conds)
                device = x0.device
                dev_code = code.to(device=device, dtype=torch.float32).clone()
                # A device-bound copy: the energy given to the node is a cached output, never changed.
                dev_energy = energy
                if clips and hasattr(energy, "on_device"):
                    dev_energy = energy.on_device(CM.model_device(clips[0]))
                elif hasattr(energy, "on_device"):
                    dev_energy = energy.on_device(device)
                decode = vae_decoder(vae, guider, latent_frames)
                decode_bytes = 0
                if video:
                    decode_bytes = _video_decode_bytes(memory, decode, dev_code, vae)

                def progress(k, images, _e):
                    pbar.update_absolute(k + 1, max(steps, 1), step_preview(images) if previews else None)

                keep, why = _keep_whole_chain(memory, denoise_fn, guider, dev_code, need, device, decode_bytes)
                result["gradient"] = ("whole chain kept" if keep else "recomputed per step") + f" ({why})"
                if video:
                    result["gradient"] += (f"; decoding {latent_frames} of {code.shape[2]} latent frames each step "
                                           f"({_frames_text(energy)})")
                    if memory != MEMORY_MODES[0]:
                        result["gradient"] += f"; the video VAE decode's backward, estimated {decode_bytes / 2**20:.3g} MB"
                logging.info("Langevin Latent Sampler: %d steps on a %d-step chain, batch %d; gradient %s", steps,
                             code.steps, code.batch_size, result["gradient"])

                def chain(keep_graph):
                    return langevin(denoise_fn, decode, dev_energy, dev_code, steps, step_size, seed, update=mode,
                                    checkpoint=not keep_graph, callback=progress,
                                    check=comfy.model_management.throw_exception_if_processing_interrupted)

                try:
                    try:
                        new_code, trace = chain(keep)
                    except Exception as e:  # auto's estimate is a guess: out of memory -> recompute instead
                        if not (keep and memory == MEMORY_MODES[0] and _is_out_of_memory(e)):
                            raise
                        logging.warning("Langevin Latent Sampler: keeping the whole chain ran out of memory (%s); "
                                        "recomputing each step instead", str(e).splitlines()[0][:200])
                        comfy.model_management.soft_empty_cache()
                        result["gradient"] = "recomputed per step (auto: keeping the whole chain ran out of memory)"
                        new_code, trace = chain(False)
                except FloatingPointError as e:
                    dtypes = f"the model's weights are {guider.model_patcher.model_dtype()}, the VAE runs in {vae.vae_dtype}"
                    raise B.NodeInputError(
                        f"energy: {str(e).rstrip('.')} ({dtypes}; in ComfyUI start with --bf16-vae or --fp32-vae, and "
                        f"load the model without --fp16-unet / with weight_dtype default). {B.NON_FINITE_HINT}") from None
                except RuntimeError as e:
                    if "Inference tensors" not in str(e):
                        raise
                    raise B.NodeInputError(
                        "model: a model patch attached to this MODEL was loaded in a way autograd cannot go through "
                        f"({e}). Remove patches other than LoRAs/ControlNets for the Langevin node.") from None
                with torch.no_grad():
                    final = replay(denoise_fn, new_code, callback=_callback)  # _callback checks every step
        except UnsupportedWeights as e:
            raise B.NodeInputError(f"model: {e}") from None
        result["code"], result["trace"] = new_code, trace
        return final.detach()

    placeholder = torch.zeros(code.shape)
    samples = B.run_in_comfy(model, positive, negative, cfg, placeholder, code.sigmas, work, seed, None)
    trace = result["trace"]
    trace.gradient = result["gradient"]
    out_code = B.stamp_code(model, B.cpu_code(result["code"]))
    B.check_finite(out_code.start_noise, "Langevin Latent Sampler", f"the sampled code (step_size {step_size})")
    B.check_finite(out_code.noises, "Langevin Latent Sampler", f"the sampled code (step_size {step_size})")
    B.check_finite(samples, "Langevin Latent Sampler", "the sampled latent", code.steps, code.steps)
    return out_code, {"samples": samples}, energy_plot(trace.energy, trace.prior), trace
