# SPDX-License-Identifier: GPL-3.0-or-later
"""Plug-and-play guidance nodes: CLIP Energy, Combine Energies, Random Latent Code, Langevin Latent Sampler."""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image

import comfy.model_management
import comfy.utils
import folder_paths

from ..guidance import POLICIES, ClipEnergy, ClipFolderError, CombinedEnergy, load_clip_folder
from ..guidance.langevin import langevin
from ..samplers import CodeError, prior_code, replay
from . import _bridge as B
from . import _clip_management as CM
from . import _plot as P
from ._autograd import UnsupportedWeights, alias_conds, control_modules, gradients_through
from ._types import CATEGORY, EnergyIO, LatentCodeIO

CLIP_FOLDER = "clip_energy"


def _register_clip_folder() -> None:
    default = os.path.join(folder_paths.models_dir, CLIP_FOLDER)
    if CLIP_FOLDER in folder_paths.folder_names_and_paths:
        paths, _ext = folder_paths.folder_names_and_paths[CLIP_FOLDER]
        if default not in paths:
            paths.append(default)
    else:
        folder_paths.folder_names_and_paths[CLIP_FOLDER] = ([default], set())


_register_clip_folder()


def clip_folders() -> dict[str, str]:
    """name -> path of every sub-folder with a config.json under models/clip_energy/."""
    found = {}
    for root in folder_paths.get_folder_paths(CLIP_FOLDER):
        if not os.path.isdir(root):
            continue
        for dirpath, dirs, files in B.walk_dirs(root):
            if "config.json" in files:
                name = os.path.relpath(dirpath, root).replace(os.sep, "/")
                found.setdefault(name, dirpath)
                dirs[:] = []
    return dict(sorted(found.items()))


class CLIPEnergy(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CLIPEnergy",
            display_name="CLIP Energy",
            category=CATEGORY,
            description=(
                "E = weight * mean over augmented copies of (1 - cos(CLIP image embedding, target)), the paper's "
                "CLIP energy for Langevin guidance. CLIP models are folders in models/clip_energy/ "
                "(transformers layout: config.json, model.safetensors, tokenizer files)."),
            inputs=[
                io.Combo.Input("clip_name", options=list(clip_folders()),
                               tooltip="A CLIP folder in models/clip_energy/ (e.g. a saved openai/clip-vit-base-patch32)."),
                io.String.Input("text", multiline=True, default="a photo of a red square",
                                tooltip="Target text. Ignored when an image target is connected."),
                io.Float.Input("weight", default=500.0, min=0.0, max=100000.0, step=1.0,
                               tooltip="lambda, the energy's weight (paper: 500)."),
                io.Int.Input("augmentations", default=8, min=1, max=256,
                             tooltip="L, augmented copies averaged per image (paper: 50; more is smoother and slower)."),
                io.Boolean.Input("color", default=True, tooltip="DiffAugment: random brightness, saturation, contrast."),
                io.Boolean.Input("translation", default=True, tooltip="DiffAugment: random shifts up to 1/8 of the side."),
                io.Boolean.Input("resize", default=True, tooltip="DiffAugment: random zoom 0.8-1.2."),
                io.Boolean.Input("cutout", default=True, tooltip="DiffAugment: a random half-size square set to 0."),
                io.Image.Input("image", optional=True,
                               tooltip="Optional target image: the energy then pulls towards its CLIP embedding."),
            ],
            outputs=[EnergyIO.Output(display_name="energy")],
        )

    @classmethod
    def execute(cls, clip_name, text, weight, augmentations, color, translation, resize, cutout,
                image=None) -> io.NodeOutput:
        folders = clip_folders()
        if clip_name not in folders:
            roots = folder_paths.get_folder_paths(CLIP_FOLDER)
            raise B.NodeInputError(
                f"clip_name: no CLIP folder named {clip_name!r} in {roots}. Put one sub-folder per model there, "
                "each with config.json, model.safetensors and the tokenizer files (save_pretrained layout).")
        policies = tuple(p for p, on in zip(POLICIES, (color, translation, resize, cutout)) if on)
        if image is None and not text.strip():
            raise B.NodeInputError("text: give a target text or connect a target image")
        # Loaded on the offload device, outside inference mode so that its tensors can take part in
        # autograd later; ComfyUI's model management moves it (see _clip_management).
        with torch.inference_mode(False):
            try:
                bundle = load_clip_folder(folders[clip_name], device=CM.offload_device())
            except ClipFolderError as e:
                raise B.NodeInputError(f"clip_name: {e}") from None
        patcher = CM.patcher_for(bundle)
        CM.load([patcher])
        device = CM.model_device(patcher)
        with torch.inference_mode(False):
            target = None
            if image is not None:
                target = image.clone().movedim(-1, 1)[:, :3].to(device)
            energy = ClipEnergy(bundle.at(device), text=None if target is not None else text, image=target,
                                augmentations=augmentations, policies=policies, weight=weight)
            # The output holds the patcher and CPU targets, never a tensor on the GPU.
            energy = energy.on_device(CM.offload_device())
        energy.comfy_patcher = patcher
        return io.NodeOutput(energy)


class CombineEnergies(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CombineEnergies",
            display_name="Combine Energies",
            category=CATEGORY,
            description="Weighted sum of energies: E = w1*E1 + w2*E2 (+ w3*E3 + w4*E4).",
            inputs=[
                EnergyIO.Input("energy_1", tooltip="First energy."),
                io.Float.Input("weight_1", default=1.0, min=-10000.0, max=10000.0, step=0.01,
                               tooltip="Multiplies energy_1 (on top of its own weight)."),
                EnergyIO.Input("energy_2", tooltip="Second energy."),
                io.Float.Input("weight_2", default=1.0, min=-10000.0, max=10000.0, step=0.01,
                               tooltip="Multiplies energy_2."),
                EnergyIO.Input("energy_3", optional=True, tooltip="Optional third energy."),
                io.Float.Input("weight_3", default=1.0, min=-10000.0, max=10000.0, step=0.01, optional=True,
                               tooltip="Multiplies energy_3."),
                EnergyIO.Input("energy_4", optional=True, tooltip="Optional fourth energy."),
                io.Float.Input("weight_4", default=1.0, min=-10000.0, max=10000.0, step=0.01, optional=True,
                               tooltip="Multiplies energy_4."),
            ],
            outputs=[EnergyIO.Output(display_name="energy")],
        )

    @classmethod
    def execute(cls, energy_1, weight_1, energy_2, weight_2, energy_3=None, weight_3=1.0, energy_4=None,
                weight_4=1.0) -> io.NodeOutput:
        pairs = [(energy_1, weight_1), (energy_2, weight_2), (energy_3, weight_3), (energy_4, weight_4)]
        return io.NodeOutput(CombinedEnergy([CombinedEnergy([e], weight=w) for e, w in pairs if e is not None]))


class RandomLatentCode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RandomLatentCode",
            display_name="Random Latent Code",
            category=CATEGORY,
            description="A latent code drawn from its Gaussian prior: generation from scratch with the stochastic "
                        "sampler (replay it, or sample it with Langevin Latent Sampler).",
            inputs=[
                io.Model.Input("model", tooltip="Decides the latent channels, the family and the schedule."),
                io.Int.Input("width", default=512, min=16, max=16384, step=8, tooltip="Image width in pixels."),
                io.Int.Input("height", default=512, min=16, max=16384, step=8, tooltip="Image height in pixels."),
                io.Int.Input("batch_size", default=1, min=1, max=4096, tooltip="Number of codes."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the code."),
                io.Int.Input("steps", default=50, min=1, max=10000, tooltip="Sampler steps of the chain."),
                io.Combo.Input("scheduler", options=B.SCHEDULERS, default="normal", tooltip="Sigma schedule."),
                io.Float.Input("eta", default=0.1, min=0.001, max=1.0, step=0.01,
                               tooltip="DDIM eta of the stochastic sampler (> 0)."),
            ],
            outputs=[LatentCodeIO.Output(display_name="latent_code")],
        )

    @classmethod
    def execute(cls, model, width, height, batch_size, seed, steps, scheduler, eta) -> io.NodeOutput:
        fmt = model.get_model_object("latent_format")
        if getattr(fmt, "latent_dimensions", 2) != 2:
            raise B.NodeInputError("model: Random Latent Code makes image latents; this model's latents are not 2-D")
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
        return io.NodeOutput(code)


def _vae_decoder(vae, model_wrap):
    """model-space latent -> images (B, 3, H, W), differentiable.

    (x + 1) / 2 without VAE Decode's final clamp, so that saturated pixels still pass a
    gradient to the energy (the CLIP energy clamps nothing either)."""
    def decode(x: torch.Tensor) -> torch.Tensor:
        lat = model_wrap.inner_model.process_latent_out(x)
        img = vae.first_stage_model.decode(lat.to(device=vae.device, dtype=vae.vae_dtype))
        img = (img.float() + 1.0) / 2.0
        return img[:, :3].to(x.device)
    return decode


def _plot(energy: list[list[float]], prior: list[list[float]], size=P.SIZE) -> torch.Tensor:
    """Energy (top) and prior ||z||^2/dim (bottom) per Langevin step, batch mean, as an IMAGE."""
    e, q = [float(np.mean(v)) for v in energy], [float(np.mean(v)) for v in prior]
    steps = f"step 1 .. {len(e)}"
    return P.paint([P.Panel("energy (weighted)", [("energy", e, (200, 40, 40))], footer=steps),
                    P.Panel("prior |z|^2/dim", [("prior", q, (40, 80, 200))], footer=steps)], size)


MEMORY_MODES = ["auto", "low: recompute each step", "fast: keep the whole chain"]


def _graph_bytes_of_one_step(denoise_fn, code, params) -> int:
    """Bytes autograd saves for the backward pass of one chain step (the first, at the code's start),
    counted by a saved-tensors hook on one probe call; the model's own weights are not counted."""
    weights = {p.data_ptr() for p in params}
    seen, total = set(), [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else None
        if ptr is not None and ptr not in weights and ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t

    x = code.x_start().detach().requires_grad_(True)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = denoise_fn(x, float(code.sigmas[0]))
    del out, x
    return total[0]


def _keep_whole_chain(memory, denoise_fn, guider, code, need: int, device) -> tuple[bool, str]:
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
    graph = code.steps * per_step + need
    free = comfy.model_management.get_free_memory(device)
    keep = graph < 0.5 * free
    return keep, (f"auto: the whole chain's graph, measured {per_step / 2**20:.3g} MB per step, "
                  f"{graph / 2**20:.0f} MB with the decode, {'fits' if keep else 'does not fit'} in half of "
                  f"{free / 2**20:.0f} MB free")


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
    result = {}
    pbar = comfy.utils.ProgressBar(max(steps, 1))

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
                decode = _vae_decoder(vae, guider)

                def progress(k, images, _e):
                    preview = Image.fromarray((images[0].movedim(0, -1).clamp(0, 1).cpu().numpy() * 255).astype(np.uint8))
                    pbar.update_absolute(k + 1, max(steps, 1), ("JPEG", preview, 512))

                keep, why = _keep_whole_chain(memory, denoise_fn, guider, dev_code, need, device)
                result["gradient"] = ("whole chain kept" if keep else "recomputed per step") + f" ({why})"
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
    return out_code, {"samples": samples}, _plot(trace.energy, trace.prior), trace


class LangevinLatentSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LangevinLatentSampler",
            display_name="Langevin Latent Sampler",
            category=CATEGORY,
            description=(
                "Plug-and-play guidance: samples the latent code from N(z; prior) * exp(-E(G(z))) with Langevin "
                "dynamics, G = replay chain + VAE decode, gradients through every step (checkpointed)."),
            inputs=[
                io.Model.Input("model", tooltip="The frozen diffusion model (the generator G)."),
                io.Conditioning.Input("positive", tooltip="Prompt of the replay chain."),
                io.Conditioning.Input("negative", tooltip="Negative prompt; used when cfg > 1."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG of the replay chain."),
                io.Vae.Input("vae", tooltip="Decodes G(z) to pixels for the energy."),
                EnergyIO.Input("energy", tooltip="From CLIP Energy or Combine Energies (carries its weight)."),
                LatentCodeIO.Input("latent_code", tooltip="Start code: Random Latent Code or DPM Encode."),
                io.Int.Input("steps", default=50, min=0, max=10000,
                             tooltip="Langevin steps (paper: 200). Each costs one chain forward and backward."),
                io.Float.Input("step_size", default=0.05, min=0.00001, max=1.0, step=0.001, round=0.00001,
                               tooltip="Langevin step size h (paper: 0.05); the injected noise has std sqrt(h)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the Langevin noise and of the augmentations."),
                io.Combo.Input("update", options=["all components", "start only"], default="all components",
                               tooltip="Sample every noise of the code, or only its start latent (the stored "
                                       "per-step noises stay fixed). Use 'start only' for a code from DPM "
                                       "Encode: at small eta its stored noises are wider than the N(0, I) prior, "
                                       "and pulling them to the prior loses the image."),
                io.Combo.Input("memory", options=MEMORY_MODES, default="auto", optional=True,
                               tooltip="How the gradient goes back through the chain. 'low' recomputes each step "
                                       "(memory flat in the number of steps); 'fast' keeps the whole chain's graph "
                                       "(about 1.6x faster, memory grows with the steps); 'auto' keeps it when "
                                       "that fits in half the free memory (see the log)."),
            ],
            outputs=[
                LatentCodeIO.Output(display_name="latent_code", tooltip="The sampled code."),
                io.Latent.Output(display_name="LATENT", tooltip="The sampled code replayed."),
                io.Image.Output(display_name="energy_plot", tooltip="Energy and prior term per Langevin step."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, vae, energy, latent_code, steps, step_size, seed,
                update, memory="auto") -> io.NodeOutput:
        code, latent, plot, _trace = run_langevin(model, positive, negative, cfg, vae, energy, latent_code, steps,
                                                  step_size, seed, update, memory)
        return io.NodeOutput(code, latent, plot)
