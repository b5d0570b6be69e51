# SPDX-License-Identifier: GPL-3.0-or-later
"""Plug-and-play guidance nodes: CLIP Energy, Combine Energies, Video Energy, Langevin Latent Sampler
(the Langevin run: ``bridge/langevin_run.py``; the CLIP model load: ``bridge/clip_models.py``)."""
from __future__ import annotations

from comfy_api.latest import io

from ..guidance import POLICIES, CombinedEnergy
from ..guidance.video import VideoEnergy as VideoEnergyTerm
from ..guidance.video import parse_frames
from .bridge import clip_models as CM
from .bridge import inputs as I
from .bridge.langevin_run import MEMORY_MODES, run_langevin
from .bridge.sampling import NodeInputError
from .bridge.types import CATEGORY, EnergyIO, LatentCodeIO


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
                I.clip_name(),
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
        policies = tuple(p for p, on in zip(POLICIES, (color, translation, resize, cutout)) if on)
        return io.NodeOutput(CM.clip_energy(clip_name, text, weight, augmentations, policies, image))


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


class VideoEnergy(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoEnergy",
            display_name="Video Energy",
            category=CATEGORY,
            description=(
                "Makes an image energy (CLIP Energy, Combine Energies) score a video clip for Langevin Latent "
                "Sampler: averaged over every frame or over chosen frames, plus an optional temporal-consistency "
                "term. Without it, a video code's energy is averaged over every frame."),
            inputs=[
                EnergyIO.Input("energy", tooltip="The per-frame energy (CLIP Energy or Combine Energies)."),
                io.String.Input("frames", default="all",
                                tooltip="Pixel frames the energy reads: 'all', a list '0, 8, 16' or a range "
                                        "'0-16:4' (from 0 to 16 every 4). Each Langevin step decodes only the "
                                        "clip's start up to the last chosen frame (the video VAEs are causal: "
                                        "those frames are exact), so early frames are cheaper on a long clip."),
                io.Float.Input("temporal_weight", default=0.0, min=0.0, max=100000.0, step=1.0,
                               tooltip="Weight of the temporal-consistency energy: the mean squared change between "
                                       "consecutive decoded frames (pixels in [0, 1]). 0 leaves it out."),
            ],
            outputs=[EnergyIO.Output(display_name="energy")],
        )

    @classmethod
    def execute(cls, energy, frames, temporal_weight) -> io.NodeOutput:
        try:
            chosen = parse_frames(frames)
        except ValueError as e:
            raise NodeInputError(str(e)) from None
        return io.NodeOutput(VideoEnergyTerm(energy, chosen, temporal_weight))


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
