# SPDX-License-Identifier: GPL-3.0-or-later
"""Asyrp h-space editing nodes: train a direction, edit with the asymmetric reverse process,
combine, save and load directions.  The work is in ``bridge/asyrp_run.py`` and ``bridge/hspace.py``;
the file format in ``samplers/asyrp_format.py``."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..samplers import asyrp as AS
from ..samplers.asyrp_format import SUFFIX, load_direction, save_direction
from .bridge import asyrp_run as R
from .bridge import files as F
from .bridge import inputs as I
from .bridge.types import CATEGORY, AsyrpDirectionIO, LatentCodeIO


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
                "asymmetric step (h shifted only in the predicted x0) is scored by directional CLIP + L1 (against "
                "a separate plain chain's predicted x0, weighted by the texts' cosine; StepLR) and takes one SGD "
                "step; gradients never cross timesteps. The model is run unconditionally (zero conditioning, cfg "
                "1). The direction records ||delta_h|| / ||h|| per step; above 0.5 training warns."),
            inputs=[
                io.Model.Input("model", tooltip="A U-Net model (SD1.x, SD2, SDXL; eps or v). Stays frozen."),
                io.Vae.Input("vae", tooltip="Decodes the model's latents to pixels for CLIP."),
                io.Latent.Input("latents", tooltip="Training images as a latent batch (VAE Encode of an image "
                                                   "batch); the paper uses about 100."),
                I.clip_name(),
                I.source_text("a photo of a face"),
                I.target_text("a photo of a smiling face"),
                I.ddim_steps("the inversion and of training"),
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
                I.h_site(),
            ],
            outputs=[
                AsyrpDirectionIO.Output(display_name="direction", tooltip="The trained h-space direction."),
                io.Image.Output(display_name="loss_plot", tooltip="Mean loss per iteration (total, CLIP, L1) and "
                                                                 "||delta_h|| / ||h|| per edited step."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, latents, clip_name, source_text, target_text, steps, t_edit, iterations,
                learning_rate, clip_weight, l1_weight, seed, kind, conditioning=None,
                validation_latents=None, h_site="middle") -> io.NodeOutput:
        return io.NodeOutput(*R.train(model, vae, latents, clip_name, source_text, target_text, steps, t_edit,
                                      iterations, learning_rate, clip_weight, l1_weight, seed, kind, conditioning,
                                      validation_latents, h_site))


class AsyrpDirectionFromExamples(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AsyrpDirectionFromExamples",
            display_name="Asyrp Direction From Examples",
            category=CATEGORY,
            description=(
                "An h-space direction without training (beyond the paper, as in Haas et al. 2023): both image "
                "sets are inverted with deterministic DDIM, and at each step of [T, t_edit] delta_h is the mean "
                "h of the images that show the attribute minus the mean h of those that do not (averaged over "
                "h's positions too, so it applies wherever the object is). Seconds, not minutes; strength 1 "
                "moves h by the mean difference. Feeds Asyrp Edit, Combine and Save like a trained direction."),
            inputs=[
                io.Model.Input("model", tooltip="The model to edit with (any model Asyrp Train Direction takes). "
                                                "Stays frozen."),
                io.Latent.Input("latents_with", tooltip="Images that show the attribute (VAE Encode of an image "
                                                        "batch), e.g. blue shapes; paired with latents_without "
                                                        "or not."),
                io.Latent.Input("latents_without", tooltip="Images that do not show it (the edit's source), e.g. "
                                                           "red shapes; the same image size as latents_with."),
                I.ddim_steps("the inversion, and the steps the direction has a delta_h for"),
                io.Float.Input("t_edit", default=0.5, min=0.0, max=0.99, step=0.01,
                               tooltip="End of the editing interval as a fraction of the chain: steps starting "
                                       "above it get a delta_h (and Asyrp Edit's t_edit -1 uses this)."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="Optional prompt the model runs under while h is measured "
                                              "(use the one you will edit with). Unconnected: zero "
                                              "conditioning, the paper's unconditional setting."),
                I.h_site(),
                io.Combo.Input("spread", options=list(R.SPREADS), default="everywhere", optional=True,
                               tooltip="'everywhere': delta_h is one shift per channel, applied at every position "
                                       "(the mean difference averaged over positions). 'object' (beyond Haas et "
                                       "al.): the difference of the examples' object-minus-background h, applied "
                                       "only where h looks like the object (a per-position gate from the images "
                                       "without the attribute), so the background is not shifted; for pictures "
                                       "of one object on a plain background (measured on the demo pixel DDPM "
                                       "with h_site 'after first up block', docs/asyrp.md). 'object, centred': "
                                       "the same, minus the shift's mean over the picture, so the picture's "
                                       "mean h stays put; use it at a U-Net's 'after second up block', where "
                                       "'object' tints the whole background (demo pixel DDPM). 'where pairs "
                                       "differ': the two sets are pairs, image k of both the same scene with and "
                                       "without the attribute (the same count, in order); delta_h is the mean "
                                       "difference of h over the positions where each pair's latents differ, "
                                       "applied where h looks like such a position (a linear discriminant from "
                                       "the images without it). Recommended for paired examples (measured on the "
                                       "demo flow model, docs/asyrp.md)."),
                io.Float.Input("t_start", default=1.0, min=0.01, max=1.0, step=0.01, optional=True,
                               tooltip="Start of the shifted steps as a fraction of the chain: steps starting "
                                       "above it get no delta_h (1: from T, as training). Lower it when the edit "
                                       "moves the layout, which the first, noisiest steps set (demo pixel DDPM: "
                                       "0.6; demo flow model, paired: 0.5)."),
            ],
            outputs=[AsyrpDirectionIO.Output(display_name="direction",
                                             tooltip="The mean-difference direction; its record holds "
                                                     "||delta_h|| / ||h|| per step.")],
        )

    @classmethod
    def execute(cls, model, latents_with, latents_without, steps, t_edit, conditioning=None,
                h_site="middle", spread="everywhere", t_start=1.0) -> io.NodeOutput:
        return io.NodeOutput(R.from_examples(model, latents_with, latents_without, steps, t_edit, conditioning,
                                             h_site, spread, t_start))


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
                I.strength(),
                I.t_edit_override(),
                I.t_boost_override(),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, optional=True,
                             tooltip="Seed of the quality-boosting noise (unused when t_boost is 0)."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="The edited latents.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, latent_code, direction, strength, t_edit, t_boost,
                seed=0) -> io.NodeOutput:
        return io.NodeOutput({"samples": R.edit(model, positive, negative, cfg, latent_code, direction, strength,
                                                t_edit, t_boost, seed)})


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
                I.strength(),
                I.ddim_steps("inversion and generation"),
                I.t_edit_override(),
                I.t_boost_override(),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the quality-boosting noise."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="The edited latents.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, latent_image, direction, strength, steps, t_edit, t_boost,
                seed) -> io.NodeOutput:
        samples, text = R.edit_ddim(model, positive, negative, cfg, latent_image, direction, strength, steps,
                                    t_edit, t_boost, seed)
        return io.NodeOutput({"samples": samples}, ui=ui.PreviewText(text))


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
        return io.NodeOutput(R.combine([direction_1, direction_2, direction_3, direction_4],
                                       [coefficient_1, coefficient_2, coefficient_3, coefficient_4]))


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
