# SPDX-License-Identifier: GPL-3.0-or-later
"""Latent-code nodes: DPM Encode, Replay Latent with Prompt, Random Latent Code, Empty Conditioning,
Save / Load Latent Code.  The work is in ``bridge/codes.py``; the file format in
``samplers/code_format.py``."""
from __future__ import annotations

from comfy_api.latest import io

from ..samplers.code_format import load_code, save_code
from .bridge import codes as R
from .bridge import files as F
from .bridge import sampling as B
from .bridge.conditioning import empty_conditioning
from .bridge.types import CATEGORY, LatentCodeIO

SUFFIX = ".dpmcode.safetensors"


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
                io.Latent.Input("latent_image", tooltip="The image (or video clip) to encode, as a latent from VAE "
                                                        "Encode. A noise "
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
        return io.NodeOutput(R.encode_image(model, positive, negative, latent_image, seed, steps, scheduler,
                                            denoise, eta, cfg, sigmas))


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
                              tooltip="Optional edit mask (white = may change), image-sized like any ComfyUI mask (for "
                                      "video: one per frame, (frames, H, W), resized in time as KSampler does); "
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
        return io.NodeOutput({"samples": R.replay_code(model, positive, negative, latent_code, cfg, mask,
                                                       cfg_values)})


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
                io.Latent.Input("latent", optional=True,
                                tooltip="Optional latent whose shape the code takes (overrides width, height and "
                                        "batch_size). Needed for video models: connect an empty video latent "
                                        "(e.g. Empty Hunyuan Latent Video) to give the frame count."),
            ],
            outputs=[LatentCodeIO.Output(display_name="latent_code")],
        )

    @classmethod
    def execute(cls, model, width, height, batch_size, seed, steps, scheduler, eta, latent=None) -> io.NodeOutput:
        return io.NodeOutput(R.random_code(model, width, height, batch_size, seed, steps, scheduler, eta, latent))


class EmptyConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EmptyConditioning",
            display_name="Empty Conditioning",
            category=CATEGORY,
            description=(
                "All-zero conditioning shaped for the model (SD1.x, SDXL, SD3, Flux, Wan, HunyuanVideo, LTX-Video): for unconditional "
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
        return io.NodeOutput(empty_conditioning(model, tokens))


class SaveLatentCode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SaveLatentCode",
            display_name="Save Latent Code",
            category=CATEGORY,
            description=f"Saves a latent code to ComfyUI's output folder as <prefix>_NNNNN_{SUFFIX}, with a "
                        "SHA-256 checksum and the model's latent format. Load Latent Code lists it as "
                        "'<name> [output]'.",
            inputs=[
                LatentCodeIO.Input("latent_code", tooltip="The code to save."),
                io.String.Input("filename_prefix", default="dpm_latent/code",
                                tooltip="File name prefix; may contain sub-folders."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, latent_code, filename_prefix) -> io.NodeOutput:
        return F.save(filename_prefix, SUFFIX, lambda path: save_code(latent_code, path))


class LoadLatentCode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadLatentCode",
            display_name="Load Latent Code",
            category=CATEGORY,
            description=f"Loads a latent code ({SUFFIX}) from ComfyUI's input folder, or from the output folder "
                        "(names ending in ' [output]'); verifies its checksum and checks every field.",
            inputs=[
                io.Combo.Input("code_file", options=F.file_options(SUFFIX),
                               tooltip=f"A {SUFFIX} file in ComfyUI's input folder, or one Save Latent Code wrote "
                                       "to the output folder (listed with ' [output]')."),
            ],
            outputs=[LatentCodeIO.Output(display_name="latent_code")],
        )

    @classmethod
    def validate_inputs(cls, code_file):
        return F.validate(code_file, "code_file")

    @classmethod
    def fingerprint_inputs(cls, code_file):
        return F.fingerprint(code_file, "code_file")

    @classmethod
    def execute(cls, code_file) -> io.NodeOutput:
        return io.NodeOutput(F.load(code_file, "code_file", load_code))
