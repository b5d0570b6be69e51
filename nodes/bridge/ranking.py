# SPDX-License-Identifier: GPL-3.0-or-later
"""Rank Images by CLIP inside ComfyUI: candidates from IMAGE batches (or lists of them), the CLIP
loaded under model management, and the ranking of ``guidance.clip_rank``."""
from __future__ import annotations

import torch

from ...guidance.clip_rank import batch_groups, check_options, clip_scores, contact_sheet, rank_groups
from ...samplers.sweep import cfg_count
from . import clip_models as CM
from . import sampling as B
from .halving import pruning_notes
from .lists import clip_pixels, first, flat_images


def _label_items(labels, n: int) -> list[str]:
    """The labels as a list ([] when none are given); one text of several lines is one label per line."""
    if not labels or all(x is None or str(x) == "" for x in labels):
        return []
    items = [str(x) for x in labels]
    if len(items) == 1 and n > 1:
        items = [s.strip() for s in items[0].splitlines() if s.strip()]
    return items


def _labels(labels, n: int, sizes: list[int]) -> list[str]:
    """One label per image: given per image, or per list item (then suffixed [b] inside a batch)."""
    items = _label_items(labels, n)
    if not items:
        return [f"#{i}" for i in range(n)]
    if len(items) == n:
        return items
    if len(items) == len(sizes):
        return [f"{lab} [{b}]" if size > 1 else lab for lab, size in zip(items, sizes) for b in range(size)]
    raise B.NodeInputError(
        f"labels: {len(items)} labels for {n} images; connect DPM Sweep's label output (one per candidate) "
        "or give one line per image")


def _cfg_slices(sizes: list[int], labels) -> list[int]:
    """The batches as Rank sees them. Replay with cfg_values returns, per code, one batch holding every cfg
    for every input image, cfg-major (cfg i: images i*B .. i*B+B-1), so its batch index is the position
    modulo B, the number of input images, not the position in the batch. When DPM Sweep's labels (one per
    code and cfg) tell the cfg count C, each batch is cut into its C slices of B = size / C images;
    otherwise (other labels, none, or batches C does not divide) the batches stay."""
    n_cfg = cfg_count(_label_items(labels, sum(sizes)))
    if n_cfg is None or n_cfg == 1 or len(set(sizes)) != 1 or sizes[0] % n_cfg:
        return sizes
    per = sizes[0] // n_cfg
    return [per] * (sum(sizes) // per)


def rank_images(images, clip_name, target_text, metric, top_k, rank_within, source_text=None, source_image=None,
                labels=None, pruning=None):
    """Rank Images by CLIP (its inputs arrive as lists): returns (top images, their scores, best index,
    contact sheet, ranking text, info for the UI)."""
    clip_name, target_text, metric, top_k = first(clip_name), first(target_text), first(metric), first(top_k)
    rank_within, source_text = first(rank_within), first(source_text, "")
    cands = flat_images(images, "images")
    if not cands:
        raise B.NodeInputError("images: no image to rank")
    sizes = [int(b.shape[0]) for b in images if b is not None]
    n = len(cands)
    src = flat_images(source_image, "source_image")
    record = first(pruning)
    if record is not None:  # the pruned replay's candidates are batches of its input images, whatever the lists
        sizes = [int(record["batch"])] * (n // int(record["batch"]))
    else:
        sizes = _cfg_slices(sizes, labels)
    names = _labels(labels, n, sizes)
    try:
        check_options(metric, rank_within, target_text)
    except ValueError as e:
        raise B.NodeInputError(str(e)) from None
    dropped = pruning_notes(record, n) if record is not None else {}
    bsz = sizes[0]
    try:
        groups = batch_groups(sizes, rank_within)
    except ValueError as e:
        raise B.NodeInputError(f"rank_within: {e}") from None
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
    bundle, _patcher = CM.load_clip(clip_name)

    src_t = clip_pixels(bundle, src) if metric == "directional CLIP" else None
    try:
        scores = clip_scores(bundle, clip_pixels(bundle, cands), target_text, metric, source_image=src_t,
                             source_text=source_text)
    except ValueError as e:
        raise B.NodeInputError(str(e)) from None
    pos, best, bests, lines = rank_groups(scores, groups, names, int(top_k), dropped)
    shapes = {tuple(cands[i].shape) for i in best}
    if len(shapes) > 1:
        raise B.NodeInputError(f"images: the best images differ in size {sorted(shapes)}; use top_k 1 "
                               "or candidates of one size")
    top = torch.stack([cands[i] for i in best]).clone()
    caps = [f"#{pos[i] + 1}  {float(scores[i]):.4f}\n{names[i]}" if i not in dropped
            else f"#{pos[i] + 1} {dropped[i]}\n{names[i]}" for i in range(n)]
    sheet = contact_sheet(torch.stack([c[..., :3] for c in cands]) if len({tuple(c.shape) for c in cands}) == 1
                          else _padded(cands), caps)
    text = f"{metric}, best of {len(groups[0])}" + (f" for each of {len(groups)} batch indices" if len(groups) > 1
                                                     else "") + ":\n" + "\n".join(lines)
    info = {"metric": metric, "best_index": int(bests[0]), "best_label": names[bests[0]],
            "best_score": float(scores[bests[0]]), "scores": [float(x) for x in scores],
            "best_indices": [int(i) for i in bests], "dropped": sorted(dropped)}
    return top, [float(scores[i]) for i in best], int(bests[0]), sheet, text, info


def _padded(cands: list[torch.Tensor]) -> torch.Tensor:
    h = max(c.shape[0] for c in cands)
    w = max(c.shape[1] for c in cands)
    out = torch.zeros(len(cands), h, w, 3)
    for i, c in enumerate(cands):
        out[i, :c.shape[0], :c.shape[1]] = c[..., :3]
    return out
