# SPDX-License-Identifier: GPL-3.0-or-later
"""Load Diffusers DDPM: an unconditional pixel-space ``UNet2DModel`` folder as a ComfyUI MODEL + VAE
(the loader and the ComfyUI <-> diffusers conventions: ``bridge/diffusers_unet.py``)."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from .bridge.diffusers_unet import CLIP_CHOICES, list_folders, load_ddpm, resolve_folder


class LoadDiffusersDDPM(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadDiffusersDDPM",
            display_name="Load Diffusers DDPM",
            category="loaders",
            description=(
                "Loads an unconditional pixel-space DDPM in the diffusers format (UNet2DModel + scheduler config, "
                "e.g. google/ddpm-*) from models/diffusers/ as a MODEL that samples images directly, plus the "
                "pixel-space VAE that turns IMAGE into its latent and back. Conditioning is ignored: feed it "
                "Empty Conditioning (or Conditioning Zero Out of any text encoder) and use cfg 1."),
            inputs=[
                io.Combo.Input("model_name", options=list_folders(),
                               tooltip="A folder in models/diffusers/: either a DDPMPipeline folder (unet/ + "
                                       "scheduler/) or a flat one (config.json + diffusion_pytorch_model."
                                       "safetensors + scheduler_config.json). Safetensors weights only."),
                io.Combo.Input("clip_sample", options=CLIP_CHOICES, default=CLIP_CHOICES[0], optional=True,
                               tooltip="Clamp the predicted clean image to [-1, 1] at every step: as the "
                                       "scheduler config says (clip_sample), always, or never."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The DDPM as a ComfyUI model (pixel space)."),
                     io.Vae.Output(display_name="VAE",
                                   tooltip="Pixel-space conversion VAE: IMAGE [0, 1] <-> latent [-1, 1], "
                                           "same resolution.")],
        )

    @classmethod
    def execute(cls, model_name, clip_sample=CLIP_CHOICES[0]) -> io.NodeOutput:
        patcher, vae, info = load_ddpm(resolve_folder(model_name), clip_sample)
        logging.info("Load Diffusers DDPM: %s %s", model_name, info)
        return io.NodeOutput(patcher, vae)
