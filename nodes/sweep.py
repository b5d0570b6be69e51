# SPDX-License-Identifier: GPL-3.0-or-later
"""Best-of-N nodes: DPM Sweep and Rank Images by CLIP; and the several-cfg replay of one code."""
from __future__ import annotations


import torch
from comfy_api.latest import io

import comfy.model_management
import folder_paths

from ..guidance import ClipFolderError, load_clip_folder
from ..guidance.clip_rank import METRICS, clip_scores, contact_sheet, rank
from ..samplers import LatentCode, replay
from ..samplers.sweep import SweepError, make_sweep, parse_floats, split_cfg, steps_for
from . import _bridge as B
from ._types import CATEGORY
from .guidance_nodes import CLIP_FOLDER, clip_folders


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

        samples = B.run_in_comfy(m, positive, negative, cfg, placeholder, code.sigmas, work, 0, code.steps)
        for j, i in enumerate(idx):
            out[i] = samples[j * bsz:(j + 1) * bsz]
    return torch.cat(out)


# ---------------------------------------------------------------------------- ranking
def _flat_images(images, name: str) -> list[torch.Tensor]:
    """A list of IMAGE batches -> list of single images (H, W, C)."""
    out = []
    for batch in images or []:
        if batch is None:
            continue
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4 or batch.shape[-1] not in (3, 4):
            raise B.NodeInputError(f"{name}: expected IMAGE batches (B, H, W, 3), got "
                                   f"{getattr(batch, 'shape', type(batch).__name__)}")
        out.extend(batch[i] for i in range(batch.shape[0]))
    return out


def _labels(labels, n: int, sizes: list[int]) -> list[str]:
    """One label per image: given per image, or per list item (then suffixed [b] inside a batch)."""
    if not labels or all(x is None or str(x) == "" for x in labels):
        return [f"#{i}" for i in range(n)]
    items = [str(x) for x in labels]
    if len(items) == 1 and n > 1:
        items = [s.strip() for s in items[0].splitlines() if s.strip()]
    if len(items) == n:
        return items
    if len(items) == len(sizes):
        return [f"{lab} [{b}]" if size > 1 else lab for lab, size in zip(items, sizes) for b in range(size)]
    raise B.NodeInputError(
        f"labels: {len(items)} labels for {n} images; connect DPM Sweep's label output (one per candidate) "
        "or give one line per image")


GROUPS = ("all images", "each batch index")


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
                io.Combo.Input("clip_name", options=list(clip_folders()),
                               tooltip="A CLIP folder in models/clip_energy/ (as CLIP Energy lists them)."),
                io.String.Input("target_text", multiline=True, default="a photo of a cat",
                                tooltip="What the edit should show (the target prompt)."),
                io.Combo.Input("metric", options=list(METRICS), default="directional CLIP",
                               tooltip="CLIP score: similarity to target_text. directional CLIP (the paper's "
                                       "selection): needs source_image and source_text."),
                io.Int.Input("top_k", default=1, min=1, max=4096,
                             tooltip="How many of the best images to output (fewer if there are fewer)."),
                io.Combo.Input("rank_within", options=list(GROUPS), default="all images",
                               tooltip="all images: one ranking. each batch index: when every candidate is a batch "
                                       "of B input images swept together, the best per input image (index b of "
                                       "every batch); outputs top_k per input image, input image first."),
                io.String.Input("source_text", multiline=True, default="", optional=True,
                                tooltip="What the source image shows (the source prompt); for directional CLIP."),
                io.Image.Input("source_image", optional=True,
                               tooltip="The input image before the edit; for directional CLIP."),
                io.String.Input("labels", optional=True, force_input=True,
                                tooltip="One label per candidate (DPM Sweep's label output), shown on the sheet."),
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
                source_image=None, labels=None) -> io.NodeOutput:
        first = lambda v, d=None: v[0] if isinstance(v, list) and v else (d if isinstance(v, list) else v)  # noqa: E731
        clip_name, target_text, metric, top_k = first(clip_name), first(target_text), first(metric), first(top_k)
        rank_within, source_text = first(rank_within), first(source_text, "")
        cands = _flat_images(images, "images")
        if not cands:
            raise B.NodeInputError("images: no image to rank")
        sizes = [int(b.shape[0]) for b in images if b is not None]
        n = len(cands)
        names = _labels(labels, n, sizes)
        if metric not in METRICS:
            raise B.NodeInputError(f"metric: must be one of {METRICS}, got {metric!r}")
        if rank_within not in GROUPS:
            raise B.NodeInputError(f"rank_within: must be one of {GROUPS}, got {rank_within!r}")
        if not (target_text or "").strip():
            raise B.NodeInputError("target_text: give the target prompt")
        bsz = sizes[0]
        if rank_within == "each batch index":
            if len(set(sizes)) != 1:
                raise B.NodeInputError(f"rank_within: 'each batch index' needs batches of one size, got {sizes}")
            groups = [list(range(b, n, bsz)) for b in range(bsz)]
        else:
            groups = [list(range(n))]
        src = _flat_images(source_image, "source_image")
        if metric == "directional CLIP":
            if not src or not (source_text or "").strip():
                raise B.NodeInputError(
                    "source_image / source_text: directional CLIP needs both (the image before the edit and what "
                    "it shows); connect them, or choose metric 'CLIP score'")
            if len(src) == n:
                pass
            elif len(src) == 1:
                src = src * n
            elif len(set(sizes)) == 1 and len(src) == bsz:
                src = [src[i % bsz] for i in range(n)]  # one source per batch index
            else:
                raise B.NodeInputError(f"source_image: {len(src)} images; give one, one per batch index ({bsz}) "
                                       f"or one per candidate ({n})")
        folders = clip_folders()
        if clip_name not in folders:
            raise B.NodeInputError(
                f"clip_name: no CLIP folder named {clip_name!r} in {folder_paths.get_folder_paths(CLIP_FOLDER)}")
        try:
            bundle = load_clip_folder(folders[clip_name], device=comfy.model_management.get_torch_device())
        except ClipFolderError as e:
            raise B.NodeInputError(f"clip_name: {e}") from None

        def pixels(ims):
            return torch.cat([bundle.resize(im[None, :, :, :3].movedim(-1, 1), center_crop=True).cpu() for im in ims])

        src_t = pixels(src) if metric == "directional CLIP" else None
        try:
            scores = clip_scores(bundle, pixels(cands), target_text, metric, source_image=src_t,
                                 source_text=source_text)
        except ValueError as e:
            raise B.NodeInputError(str(e)) from None
        pos, best, bests, lines = {}, [], [], []
        for gi, members in enumerate(groups):
            order = [members[j] for j in rank(scores[members])]
            pos.update({i: r for r, i in enumerate(order)})
            best.extend(order[:min(int(top_k), len(order))])
            bests.append(order[0])
            head = f"batch index {gi}: " if len(groups) > 1 else ""
            lines += [f"{head}#{r + 1}  {float(scores[i]):.6f}  [{i}] {names[i]}" for r, i in enumerate(order)]
        shapes = {tuple(cands[i].shape) for i in best}
        if len(shapes) > 1:
            raise B.NodeInputError(f"images: the best images differ in size {sorted(shapes)}; use top_k 1 "
                                   "or candidates of one size")
        top = torch.stack([cands[i] for i in best]).clone()
        caps = [f"#{pos[i] + 1}  {float(scores[i]):.4f}\n{names[i]}" for i in range(n)]
        sheet = contact_sheet(torch.stack([c[..., :3] for c in cands]) if len({tuple(c.shape) for c in cands}) == 1
                              else _padded(cands), caps)
        text = f"{metric}, best of {len(groups[0])}" + (f" for each of {len(groups)} batch indices" if len(groups) > 1
                                                         else "") + ":\n" + "\n".join(lines)
        info = {"metric": metric, "best_index": int(bests[0]), "best_label": names[bests[0]],
                "best_score": float(scores[bests[0]]), "scores": [float(x) for x in scores],
                "best_indices": [int(i) for i in bests]}
        return io.NodeOutput(top, [float(scores[i]) for i in best], int(bests[0]), sheet, text,
                             ui={"text": [text], "dpm_rank": [info]})


def _padded(cands: list[torch.Tensor]) -> torch.Tensor:
    h = max(c.shape[0] for c in cands)
    w = max(c.shape[1] for c in cands)
    out = torch.zeros(len(cands), h, w, 3)
    for i, c in enumerate(cands):
        out[i, :c.shape[0], :c.shape[1]] = c[..., :3]
    return out

