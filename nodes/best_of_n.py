# SPDX-License-Identifier: GPL-3.0-or-later
"""Best-of-N nodes: DPM Sweep and Rank Images by CLIP (the ranking: ``bridge/ranking.py`` over
``guidance/clip_rank.py``; the several-cfg replay: ``bridge/codes.py``)."""
from __future__ import annotations

from comfy_api.latest import io

from ..guidance.clip_rank import GROUPS, METRICS
from ..samplers.sweep import SweepError, make_sweep, steps_for
from .bridge import inputs as I
from .bridge import sampling as B
from .bridge.halving import pruned_replay
from .bridge.ranking import rank_images
from .bridge.types import CATEGORY, LatentCodeIO, PruningIO


class DPMSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DPMSweep",
            display_name="DPM Sweep",
            category=CATEGORY,
            description=(
                "Best-of-N sweep (CycleDiffusion: 15 seeds x 6 denoise x 6 cfg). seed, denoise and steps are "
                "LISTS with one item per distinct encode (seed x denoise): connect them to DPM Encode, which then "
                "runs once per encode, never once per cfg. cfg is the cfg list as text: connect it to Replay "
                "Latent with Prompt's cfg_values, which replays each code at every cfg as one batch. label has "
                "one item per candidate, in the order the replays emit them (seed, then denoise, then cfg): "
                "connect it to Rank Images by CLIP."),
            inputs=[
                io.String.Input("seeds", default="0-14",
                                tooltip="Seeds of the encodes: '0-14', '1, 5, 9' or '0-28:2' (a range with a step)."),
                io.String.Input("denoise_values", default="0.85, 0.8, 0.75, 0.7, 0.6, 0.5",
                                tooltip="Denoise values (0.01-1), comma separated; the paper's skips 15-50 of 100."),
                io.String.Input("cfg_values", default="1, 1.5, 2, 3, 4, 5",
                                tooltip="Replay cfg values (0-100), comma separated (the paper's decoder scales)."),
                io.Int.Input("chain_steps", default=100, min=1, max=10000,
                             tooltip="Steps of the whole chain. The steps output is round(chain_steps x denoise) "
                                     "per encode, as in the paper (100 over the chain); leave DPM Encode's steps "
                                     "unconnected to use one step count for all."),
            ],
            outputs=[
                io.Int.Output(display_name="seed", is_output_list=True,
                              tooltip="One seed per distinct encode (to DPM Encode's seed)."),
                io.Float.Output(display_name="denoise", is_output_list=True,
                                tooltip="One denoise per distinct encode (to DPM Encode's denoise)."),
                io.Int.Output(display_name="steps", is_output_list=True,
                              tooltip="round(chain_steps x denoise) per distinct encode (to DPM Encode's steps)."),
                io.String.Output(display_name="cfg",
                                 tooltip="The cfg values as text (to Replay Latent with Prompt's cfg_values)."),
                io.String.Output(display_name="label", is_output_list=True,
                                 tooltip="One label per candidate (to Rank Images by CLIP's labels)."),
                io.Int.Output(display_name="count", tooltip="Number of candidates (seeds x denoise x cfg)."),
            ],
        )

    @classmethod
    def execute(cls, seeds, denoise_values, cfg_values, chain_steps) -> io.NodeOutput:
        try:
            sw = make_sweep(seeds, denoise_values, cfg_values)
        except SweepError as e:
            raise B.NodeInputError(str(e)) from None
        enc = sw.encodes
        return io.NodeOutput([s for s, _ in enc], [d for _, d in enc], [steps_for(d, chain_steps) for _, d in enc],
                             sw.cfg_text(), sw.labels(), len(sw.candidates))


class RankByCLIP(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RankByCLIP",
            display_name="Rank Images by CLIP",
            category=CATEGORY,
            description=(
                "Scores every image (a batch, or a list of batches from a sweep) with CLIP and returns the "
                "best first, their scores, the index of the best and a contact sheet of all candidates in "
                "their input order with rank, score and label under each. 'directional CLIP' is "
                "CycleDiffusion's selection: cos(E(image) - E(source image), E(target text) - E(source text))."),
            is_input_list=True,
            is_output_node=True,
            inputs=[
                io.Image.Input("images", tooltip="The candidates: an IMAGE batch or a list of them (from a sweep)."),
                I.clip_name(),
                I.target_text("a photo of a cat", multiline=True),
                io.Combo.Input("metric", options=list(METRICS), default="directional CLIP",
                               tooltip="CLIP score: similarity to target_text. directional CLIP (the paper's "
                                       "selection): needs source_image and source_text."),
                io.Int.Input("top_k", default=1, min=1, max=4096,
                             tooltip="How many of the best images to output (fewer if there are fewer)."),
                io.Combo.Input("rank_within", options=list(GROUPS), default="all images",
                               tooltip="all images: one ranking. each batch index: when every candidate is a batch "
                                       "of B input images swept together, the best per input image (index b of "
                                       "every batch; a Replay batch at several cfg is cut per cfg when DPM Sweep's "
                                       "labels are connected); outputs top_k per input image, input image "
                                       "first."),
                I.source_text("", multiline=True, optional=True),
                io.Image.Input("source_image", optional=True,
                               tooltip="The input image before the edit; for directional CLIP."),
                io.String.Input("labels", optional=True, force_input=True,
                                tooltip="One label per candidate (DPM Sweep's label output), shown on the sheet."),
                PruningIO.Input("pruning", optional=True,
                                tooltip="From DPM Pruned Replay: only the candidates that finished can be picked; "
                                        "the sheet shows where each of the others was dropped."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="The top_k images, best first."),
                io.Float.Output(display_name="scores", is_output_list=True, tooltip="Their scores, best first."),
                io.Int.Output(display_name="best_index",
                              tooltip="Index of the best image among all candidates (0-based, input order; with "
                                      "'each batch index', the best for input image 0)."),
                io.Image.Output(display_name="contact_sheet",
                                tooltip="All candidates in input order, with rank, score and label under each."),
                io.String.Output(display_name="ranking", tooltip="One line per image, best first: rank, score, label."),
            ],
        )

    @classmethod
    def execute(cls, images, clip_name, target_text, metric, top_k, rank_within, source_text=None,
                source_image=None, labels=None, pruning=None) -> io.NodeOutput:
        top, scores, best, sheet, text, info = rank_images(images, clip_name, target_text, metric, top_k,
                                                           rank_within, source_text, source_image, labels, pruning)
        return io.NodeOutput(top, scores, best, sheet, text, ui={"text": [text], "dpm_rank": [info]})


class DPMPrunedReplay(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DPMPrunedReplay",
            display_name="DPM Pruned Replay (successive halving)",
            category=CATEGORY,
            description=(
                "Replay Latent with Prompt (cfg_values) + VAE Decode for a whole sweep, with successive halving: "
                "every candidate is replayed to the first checkpoint, scored by CLIP on its predicted x0 there, "
                "and only the best 'keep' fraction goes on (then the next checkpoint, and so on). Survivors "
                "finish exactly as in the full sweep. Connect images and pruning to Rank Images by CLIP (same "
                "CLIP, texts and metric). Empty checkpoints: the full sweep."),
            is_input_list=True,
            inputs=[
                io.Model.Input("model", tooltip="The replay model (as for Replay Latent with Prompt)."),
                io.Conditioning.Input("positive", tooltip="The target prompt (batch 1)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (batch 1)."),
                LatentCodeIO.Input("latent_code", tooltip="The sweep's codes (DPM Encode driven by DPM Sweep)."),
                io.String.Input("cfg_values", default="1", force_input=True,
                                tooltip="DPM Sweep's cfg output: every code is replayed at each value."),
                io.Vae.Input("vae", tooltip="Decodes the predicted x0 at the checkpoints and the finished images."),
                I.clip_name(),
                I.target_text("a photo of a cat", multiline=True),
                io.Combo.Input("metric", options=list(METRICS), default="directional CLIP",
                               tooltip="The CLIP score of the checkpoints (use Rank Images by CLIP's)."),
                io.String.Input("checkpoints", default="0.2, 0.5",
                                tooltip="Where to score, as fractions of each replay's steps, increasing "
                                        "(empty: no pruning)."),
                io.String.Input("keep", default="0.33, 0.33",
                                tooltip="The fraction of the live candidates kept at each checkpoint (at least "
                                        "one per group)."),
                io.Combo.Input("rank_within", options=list(GROUPS), default="all images",
                               tooltip="Groups pruned separately (as Rank Images by CLIP's rank_within)."),
                I.source_text("", multiline=True, optional=True),
                io.Image.Input("source_image", optional=True,
                               tooltip="The input image before the edit; for directional CLIP."),
            ],
            outputs=[
                io.Image.Output(display_name="images", is_output_list=True,
                                tooltip="One batch per code, cfg-major (as Replay + VAE Decode); a dropped "
                                        "candidate shows its predicted x0 where it stopped."),
                PruningIO.Output(display_name="pruning", tooltip="To Rank Images by CLIP's pruning input."),
                io.String.Output(display_name="report",
                                 tooltip="Candidates finished and replay model evaluations against the full sweep."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_code, cfg_values, vae, clip_name, target_text, metric,
                checkpoints, keep, rank_within, source_text=None, source_image=None) -> io.NodeOutput:
        images, record, text = pruned_replay(model, positive, negative, latent_code, cfg_values, vae, clip_name,
                                             target_text, metric, source_text, source_image, checkpoints, keep,
                                             rank_within)
        return io.NodeOutput(images, record, text, ui={"text": [text]})
