# SPDX-License-Identifier: GPL-3.0-or-later
"""Asyrp Editing Interval: t_edit and t_boost from measured curves, as the paper chooses them
(the measurement and its thresholds: ``bridge/interval_run.py``)."""
from __future__ import annotations

from comfy_api.latest import io, ui

from .bridge import inputs as I
from .bridge import interval_run as R
from .bridge.interval_run import CLIP_BOOST_FRACTION, CLIP_EDIT_FRACTION, DISTANCES, LPIPS_BOOST, LPIPS_EDIT
from .bridge.types import CATEGORY


class AsyrpInterval(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AsyrpInterval",
            display_name="Asyrp Editing Interval",
            category=CATEGORY,
            description=(
                "Measures, on a batch of images, the paper's two curves along the plain DDIM chain from their "
                "DDIM inversion: distance(x0, P_t) (predicted x0) and distance(x0, x_t). t_edit is the first t "
                "from 0 up where the first reaches edit_threshold * cos(source_text, target_text); t_boost the "
                "first where the second reaches boost_threshold. Distance: LPIPS (AlexNet) when the lpips "
                "package and its weights are on disk, else 1 - cos of CLIP image embeddings with the thresholds "
                "recalibrated as fractions of each curve's value at T. The outputs plug into Asyrp Train "
                "Direction / Asyrp Edit."),
            inputs=[
                io.Model.Input("model", tooltip="The model to edit with (run plainly: no edit, zero conditioning, "
                                                "cfg 1)."),
                io.Vae.Input("vae", tooltip="Decodes the model's latents to pixels for the distance."),
                io.Latent.Input("latents", tooltip="The images to measure on, as a latent batch (VAE Encode); the "
                                                   "paper averages 100."),
                I.clip_name(),
                I.source_text("a photo of a face"),
                I.target_text("a photo of a smiling face"),
                I.ddim_steps("the inversion and of the measured chain"),
                io.Combo.Input("distance", options=list(DISTANCES), default="auto",
                               tooltip="'lpips': LPIPS (AlexNet), an error if the lpips package or its weights "
                                       "are missing (nothing is downloaded). 'clip': 1 - cos of CLIP image "
                                       "embeddings. 'auto': LPIPS when available, else CLIP."),
                io.Float.Input("edit_threshold", default=LPIPS_EDIT, min=0.0, max=10.0, step=0.01,
                               tooltip="LPIPS threshold of t_edit, multiplied by cos(source, target) (paper: "
                                       "0.33). Used with the LPIPS distance."),
                io.Float.Input("boost_threshold", default=LPIPS_BOOST, min=0.0, max=10.0, step=0.01,
                               tooltip="LPIPS threshold of t_boost (paper: 1.2). Used with the LPIPS distance."),
                io.Float.Input("clip_edit_fraction", default=CLIP_EDIT_FRACTION, min=0.0, max=1.0, step=0.01,
                               tooltip="CLIP distance: t_edit threshold = this * cos(source, target) * the "
                                       "distance(x0, P_T) at T (0.25: the paper's 0.33 on its LPIPS curve)."),
                io.Float.Input("clip_boost_fraction", default=CLIP_BOOST_FRACTION, min=0.0, max=1.0, step=0.01,
                               tooltip="CLIP distance: t_boost threshold = this * the distance(x0, x_T) at T "
                                       "(0.90: the paper's 1.2 on its LPIPS curve)."),
            ],
            outputs=[
                io.Float.Output(display_name="t_edit", tooltip="End of the editing interval, a fraction of the "
                                                               "chain (1 = T): for t_edit of Train / Edit."),
                io.Float.Output(display_name="t_boost", tooltip="Quality boosting below this fraction: for "
                                                                "t_boost of Asyrp Edit."),
                io.Image.Output(display_name="plot", tooltip="Both curves with their thresholds and the chosen t."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, latents, clip_name, source_text, target_text, steps, distance, edit_threshold,
                boost_threshold, clip_edit_fraction, clip_boost_fraction) -> io.NodeOutput:
        t_edit, t_boost, plot, text = R.measure(model, vae, latents, clip_name, source_text, target_text, steps,
                                                distance, edit_threshold, boost_threshold, clip_edit_fraction,
                                                clip_boost_fraction)
        return io.NodeOutput(t_edit, t_boost, plot, ui=ui.PreviewText(text))
