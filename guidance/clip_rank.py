# SPDX-License-Identifier: GPL-3.0-or-later
"""Ranking images by CLIP (pure torch + transformers): the selection step of best-of-N.

* ``"CLIP score"``: cos(E_img(x), E_txt(target)).
* ``"directional CLIP"`` (CycleDiffusion's selection and its D-CLIP metric):
  cos(E_img(x) - E_img(source), E_txt(target) - E_txt(source)): the edit's direction in image
  space against the prompt change's direction in text space.

Images are ``(N, 3, H, W)`` in [0, 1]; they are resized (centre crop) to the model's input size
without augmentation, so a score is a deterministic function of the image.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .clip_energy import ClipBundle

METRICS = ("CLIP score", "directional CLIP")
# rank every candidate together, or (candidates = batches of B images swept together) per batch index
GROUPS = ("all images", "each batch index")


@torch.no_grad()
def image_embeddings(bundle: ClipBundle, images: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, images.shape[0], chunk):
        x = bundle.resize(images[i:i + chunk, :3], center_crop=True)
        out.append(bundle.image_embeds(bundle.normalize(x)))
    return torch.cat(out)


@torch.no_grad()
def clip_scores(bundle: ClipBundle, images: torch.Tensor, target_text: str, metric: str = "CLIP score",
                source_image: Optional[torch.Tensor] = None, source_text: Optional[str] = None) -> torch.Tensor:
    """(N,) float64 scores; higher is better. ``source_image`` is one image ``(1, 3, H, W)``
    or one per candidate ``(N, 3, H, W)``."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    emb = image_embeddings(bundle, images)
    if metric == "CLIP score":
        txt = bundle.text_embeds([target_text])
        return (emb @ txt[0]).double().cpu()
    if source_image is None or source_text is None:
        raise ValueError("directional CLIP needs source_image and source_text")
    src = image_embeddings(bundle, source_image)
    if src.shape[0] not in (1, emb.shape[0]):
        raise ValueError(f"source_image has {src.shape[0]} images; give one, or one per candidate ({emb.shape[0]})")
    txt = bundle.text_embeds([source_text, target_text])
    d_txt = txt[1] - txt[0]
    d_img = emb - src
    return F.cosine_similarity(d_img, d_txt.expand_as(d_img), dim=-1, eps=1e-8).double().cpu()


def rank(scores: torch.Tensor, top_k: Optional[int] = None) -> list[int]:
    """Indices best first (ties keep the input order)."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return order if top_k is None else order[:top_k]


def check_options(metric: str, rank_within: str, target_text: str) -> None:
    """ValueError naming the option when a ranking's metric, grouping or target text is unusable."""
    if metric not in METRICS:
        raise ValueError(f"metric: must be one of {METRICS}, got {metric!r}")
    if rank_within not in GROUPS:
        raise ValueError(f"rank_within: must be one of {GROUPS}, got {rank_within!r}")
    if not (target_text or "").strip():
        raise ValueError("target_text: give the target prompt")


def batch_groups(sizes: Sequence[int], rank_within: str) -> list[list[int]]:
    """The groups of candidate indices ranked separately. ``sizes``: the batch size of each input
    batch, in order (candidate i is image i of their concatenation)."""
    n = sum(sizes)
    if rank_within == GROUPS[0]:
        return [list(range(n))]
    if rank_within != GROUPS[1]:
        raise ValueError(f"must be one of {GROUPS}, got {rank_within!r}")
    if len(set(sizes)) != 1:
        raise ValueError(f"'each batch index' needs batches of one size, got {list(sizes)}")
    bsz = sizes[0]
    return [list(range(b, n, bsz)) for b in range(bsz)]


def rank_groups(scores: torch.Tensor, groups: Sequence[Sequence[int]], names: Sequence[str],
                top_k: int, dropped: Optional[dict] = None) -> tuple[dict, list[int], list[int], list[str]]:
    """Rank each group by score. Returns (rank of every candidate within its group, the top_k of
    each group in group order, the best of each group, one text line per candidate best first).
    ``dropped`` ({candidate: note}, from successive halving): those rank after every finished candidate
    of their group and are never among the top_k (unless nothing in the group finished)."""
    dropped = dropped or {}
    pos, best, bests, lines = {}, [], [], []
    for gi, members in enumerate(groups):
        order = [members[j] for j in rank(scores[list(members)])]
        order = [i for i in order if i not in dropped] + [i for i in order if i in dropped]
        pos.update({i: r for r, i in enumerate(order)})
        done = [i for i in order if i not in dropped] or order
        best.extend(done[:min(int(top_k), len(done))])
        bests.append(done[0])
        head = f"batch index {gi}: " if len(groups) > 1 else ""
        lines += [f"{head}#{r + 1}  {float(scores[i]):.6f}  [{i}] {names[i]}"
                  + (f"  ({dropped[i]})" if i in dropped else "") for r, i in enumerate(order)]
    return pos, best, bests, lines


def contact_sheet(images: torch.Tensor, captions: Sequence[str], columns: Optional[int] = None,
                  cell: int = 128, caption_h: int = 30) -> torch.Tensor:
    """A grid of the images (``(N, H, W, 3)`` in [0, 1]) with two caption lines under each:
    ``(1, rows * (cell + caption_h), columns * cell, 3)``."""
    import math

    import numpy as np
    from PIL import Image, ImageDraw

    n = images.shape[0]
    cols = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    sheet = Image.new("RGB", (cols * cell, rows * (cell + caption_h)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        arr = (images[i, :, :, :3].clamp(0, 1).cpu().float().numpy() * 255).round().astype(np.uint8)
        im = Image.fromarray(arr)
        w, h = im.size
        s = cell / max(w, h)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))),
                       Image.NEAREST if s >= 1 else Image.BICUBIC)
        r, c = divmod(i, cols)
        x0, y0 = c * cell, r * (cell + caption_h)
        sheet.paste(im, (x0 + (cell - im.size[0]) // 2, y0 + (cell - im.size[1]) // 2))
        for j, line in enumerate(str(captions[i]).split("\n")[:2]):
            draw.text((x0 + 3, y0 + cell + 2 + 13 * j), _fit(draw, line, cell - 6), fill=(235, 235, 235))
    return torch.from_numpy(np.asarray(sheet).astype(np.float32) / 255.0)[None]


def _fit(draw, text: str, width: int) -> str:
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "…") > width:
        text = text[:-1]
    return text + "…"
