# SPDX-License-Identifier: GPL-3.0-or-later
"""A tiny procedural image world: one flat shape on a plain background.

Every image is 64x64 RGB in [0, 1] (tensor layout ``(n, 3, 64, 64)``) and shows
exactly one axis-aligned shape -- ``circle``, ``square`` or ``triangle``
(upright isosceles, base as wide as it is tall) -- in one palette colour at a
random position and size on a light grey background.  Edges are anti-aliased
by 4x4 supersampling.  Everything is a pure function of the seed.

``size`` is the half extent in pixels: the radius of a circle, half the side of
a square, half the base (= half the height) of a triangle.  ``cx, cy`` is the
centroid of the painted area in pixel coordinates (pixel ``i`` covers
``[i, i + 1)``, so its centre is ``i + 0.5``).

Two translation domains share the colour/position/size distribution:
``DOMAINS["A"] = ("circle",)`` and ``DOMAINS["B"] = ("square",)``.

``read_attributes`` recovers shape, colour, centroid and size from any image of
this world, including imperfect model outputs: foreground = pixels far from the
background colour (estimated from the image border), colour = palette colour
nearest to the mean foreground colour, shape = how much of its bounding box the
foreground fills (square ~1, circle ~pi/4, triangle ~1/2) with the corner
occupancy as a tie-breaker.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

SIZE = 64
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
PALETTE: Dict[str, Tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.12, 0.25, 0.90),
    "yellow": (0.95, 0.82, 0.10),
}
COLOURS: Tuple[str, ...] = tuple(PALETTE)
BACKGROUND: Tuple[float, float, float] = (0.88, 0.88, 0.88)
DOMAINS: Dict[str, Tuple[str, ...]] = {"A": ("circle",), "B": ("square",)}

SIZE_RANGE = (7.0, 16.0)   # half extent in pixels
MARGIN = 3.0               # shapes keep this far from the image border
SUPERSAMPLE = 4
# Ideal fill ratio (area / bounding-box area) of each shape.
FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}


def caption(shape: str, colour: str) -> str:
    return f"a {colour} {shape}"


def all_captions(shapes: Sequence[str] = SHAPES, colours: Sequence[str] = COLOURS) -> List[str]:
    return [caption(s, c) for s in shapes for c in colours]


def _coverage(shape: str, cx: float, cy: float, s: float) -> torch.Tensor:
    """Anti-aliased coverage (64, 64) in [0, 1] of one shape with box centre (cx, cy)."""
    k = SUPERSAMPLE
    g = (torch.arange(SIZE * k, dtype=torch.float64) + 0.5) / k
    yy, xx = torch.meshgrid(g, g, indexing="ij")
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= s * s
    elif shape == "square":
        inside = (dx.abs() <= s) & (dy.abs() <= s)
    elif shape == "triangle":
        # apex at (cx, cy - s), base from (cx - s, cy + s) to (cx + s, cy + s)
        t = (dy + s) / (2 * s)            # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (dx.abs() <= s * t)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cov = inside.to(torch.float64).reshape(SIZE, k, SIZE, k).mean(dim=(1, 3))
    return cov


def render(shape: str, colour: str, cx: float, cy: float, size: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """One image (3, 64, 64) float32 and its coverage (64, 64); (cx, cy) is the box centre."""
    cov = _coverage(shape, cx, cy, size)
    fg = torch.tensor(PALETTE[colour], dtype=torch.float64).view(3, 1, 1)
    bg = torch.tensor(BACKGROUND, dtype=torch.float64).view(3, 1, 1)
    img = bg + (fg - bg) * cov
    return img.float(), cov


def sample_world(n: int, seed: int, shapes: Sequence[str] = SHAPES,
                 colours: Sequence[str] = COLOURS) -> Tuple[torch.Tensor, List[dict]]:
    """``n`` images (n, 3, 64, 64) in [0, 1] and their attributes, a pure function of ``seed``.

    Shape and colour are uniform over ``shapes`` / ``colours``; size uniform in
    ``SIZE_RANGE``; the box centre uniform over positions that keep the shape
    ``MARGIN`` pixels inside the image.  The draws of colour, size and position
    do not depend on ``shapes``, so ``sample_world(n, seed, ("circle",))`` and
    ``sample_world(n, seed, ("square",))`` are the same scenes with the shape
    swapped (a paired ground truth for translation).
    """
    for s in shapes:
        if s not in SHAPES:
            raise ValueError(f"unknown shape {s!r}")
    rng = np.random.default_rng(seed)
    u = rng.random((n, 5))
    imgs = torch.empty(n, 3, SIZE, SIZE)
    attrs: List[dict] = []
    g = torch.arange(SIZE, dtype=torch.float64) + 0.5
    for i in range(n):
        shape = shapes[min(int(u[i, 0] * len(shapes)), len(shapes) - 1)]
        colour = colours[min(int(u[i, 1] * len(colours)), len(colours) - 1)]
        size = SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * float(u[i, 2])
        lo, hi = size + MARGIN, SIZE - size - MARGIN
        bx = lo + (hi - lo) * float(u[i, 3])
        by = lo + (hi - lo) * float(u[i, 4])
        img, cov = render(shape, colour, bx, by, size)
        imgs[i] = img
        area = float(cov.sum())
        cx = float((cov.sum(0) * g).sum() / area)
        cy = float((cov.sum(1) * g).sum() / area)
        attrs.append({"shape": shape, "colour": colour, "cx": cx, "cy": cy, "size": size,
                      "box_cx": bx, "box_cy": by, "area": area, "caption": caption(shape, colour)})
    return imgs, attrs


def sample_domain(n: int, seed: int, domain: str) -> Tuple[torch.Tensor, List[dict]]:
    """Images of translation domain ``"A"`` (circles) or ``"B"`` (squares)."""
    return sample_world(n, seed, shapes=DOMAINS[domain])


# ---------------------------------------------------------------- readers

FG_THRESHOLD = 0.25          # RGB distance from the background that counts as foreground
MIN_AREA = 12.0              # fewer foreground pixels than this: no shape


def _as_batch(images) -> torch.Tensor:
    x = torch.as_tensor(images).detach().float().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != 3:
        if x.dim() == 4 and x.shape[-1] == 3:      # ComfyUI IMAGE layout (n, h, w, 3)
            x = x.permute(0, 3, 1, 2)
        else:
            raise ValueError(f"expected (n, 3, h, w) or (n, h, w, 3) images, got {tuple(x.shape)}")
    return x.clamp(0, 1)


def foreground(images) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft foreground weight (n, h, w) in [0, 1] and the estimated background colour (n, 3).

    The background colour is the per-channel median of the 2-pixel image frame;
    the weight ramps from 0 to 1 as the colour distance to it goes from
    ``FG_THRESHOLD / 2`` to ``FG_THRESHOLD * 1.5``.
    """
    x = _as_batch(images)
    n, _, h, w = x.shape
    frame = torch.cat([x[:, :, :2, :].reshape(n, 3, -1), x[:, :, -2:, :].reshape(n, 3, -1),
                       x[:, :, :, :2].reshape(n, 3, -1), x[:, :, :, -2:].reshape(n, 3, -1)], dim=2)
    bg = frame.median(dim=2).values
    dist = (x - bg.view(n, 3, 1, 1)).norm(dim=1)
    lo, hi = 0.5 * FG_THRESHOLD, 1.5 * FG_THRESHOLD
    weight = ((dist - lo) / (hi - lo)).clamp(0, 1)
    return weight, bg


def _extent(profile: np.ndarray, min_count: float) -> Tuple[int, int]:
    idx = np.nonzero(profile >= min_count)[0]
    if len(idx) == 0:
        return 0, -1
    return int(idx[0]), int(idx[-1])


def read_attributes(images) -> List[dict]:
    """Attributes of each image: shape, colour, centroid, size and the raw measurements.

    Works on any (n, 3, h, w) or ComfyUI-layout (n, h, w, 3) image batch in
    [0, 1].  Keys: ``shape`` (one of SHAPES, or ``"none"`` when there is no
    foreground), ``colour`` (palette name or None), ``cx, cy`` (centroid of the
    foreground in pixels), ``size`` (half extent of the bounding box),
    ``area`` (foreground pixels), ``fill`` (area / bounding-box area),
    ``top_corners`` / ``bottom_corners`` (foreground share of the bounding box's
    corner cells), ``colour_distance`` (distance of the mean foreground colour to
    the chosen palette colour), ``rgb`` (that mean foreground colour).
    """
    x = _as_batch(images)
    weight, bg = foreground(x)
    n, _, h, w = x.shape
    pal = torch.tensor([PALETTE[c] for c in COLOURS])
    gy = np.arange(h) + 0.5
    gx = np.arange(w) + 0.5
    out: List[dict] = []
    for i in range(n):
        m = weight[i].numpy().astype(np.float64)
        area = float(m.sum())
        if area < MIN_AREA:
            out.append({"shape": "none", "colour": None, "cx": float("nan"), "cy": float("nan"),
                        "size": 0.0, "area": area, "fill": 0.0, "top_corners": 0.0,
                        "bottom_corners": 0.0, "colour_distance": float("inf")})
            continue
        strong = torch.from_numpy(m >= 0.99)
        if int(strong.sum()) < 4:
            strong = torch.from_numpy(m > 0.5)
        mean_col = x[i][:, strong].mean(dim=1)
        d = (pal - mean_col).norm(dim=1)
        j = int(d.argmin())
        # coverage: projection of (pixel - background) onto (mean colour - background);
        # exact for the anti-aliased edges of a clean image
        axis = mean_col - bg[i]
        cov = torch.einsum("chw,c->hw", x[i] - bg[i].view(3, 1, 1), axis) / axis.dot(axis).clamp_min(1e-6)
        cov = (cov.clamp(0, 1) * torch.from_numpy(m > 0).float()).numpy().astype(np.float64)
        area = float(cov.sum())
        if area < MIN_AREA:
            cov, area = m, float(m.sum())
        cx = float((cov.sum(0) * gx).sum() / area)
        cy = float((cov.sum(1) * gy).sum() / area)
        binary = cov > 0.5
        # bounding box of the binarised coverage from rows/columns holding at least
        # two pixels (stray pixels of a model output do not stretch it)
        y0, y1 = _extent(binary.sum(1), 2)
        x0, x1 = _extent(binary.sum(0), 2)
        if y1 < y0 or x1 < x0:
            y0, y1, x0, x1 = 0, h - 1, 0, w - 1
        bw, bh = x1 - x0 + 1, y1 - y0 + 1
        box = binary[y0:y1 + 1, x0:x1 + 1].astype(np.float64)
        fill = float(box.sum() / (bw * bh))
        cw, ch = max(1, bw // 4), max(1, bh // 4)
        top = 0.5 * (box[:ch, :cw].mean() + box[:ch, -cw:].mean())
        bottom = 0.5 * (box[-ch:, :cw].mean() + box[-ch:, -cw:].mean())
        corners = 0.5 * (top + bottom)
        if fill > 0.9 or (fill > 0.82 and corners > 0.75):
            shape = "square"
        elif fill < 0.64 or (bottom - top > 0.5 and fill < 0.72):
            shape = "triangle"
        else:
            shape = "circle"
        out.append({"shape": shape, "colour": COLOURS[j], "cx": cx, "cy": cy,
                    "size": 0.25 * (bw + bh), "area": area, "fill": fill,
                    "top_corners": float(top), "bottom_corners": float(bottom),
                    "colour_distance": float(d[j]), "rgb": [float(v) for v in mean_col]})
    return out


def accuracy(pred: List[dict], truth: List[dict], key: str) -> float:
    return float(np.mean([p[key] == t[key] for p, t in zip(pred, truth)]))


def summarize(attrs: List[dict]) -> dict:
    """Shape and colour histograms of read attributes (fractions)."""
    n = max(1, len(attrs))
    shapes = {s: sum(a["shape"] == s for a in attrs) / n for s in SHAPES + ("none",)}
    colours = {c: sum(a["colour"] == c for a in attrs) / n for c in COLOURS}
    return {"shape": shapes, "colour": colours}


# ---------------------------------------------------------------- the world in motion

FRAMES = 8                   # frames of a demo clip
SPEED_RANGE = (1.0, 3.0)     # pixels per frame


def sample_clips(n: int, seed: int, shapes: Sequence[str] = SHAPES, colours: Sequence[str] = COLOURS,
                 frames: int = FRAMES) -> Tuple[torch.Tensor, List[dict]]:
    """``n`` clips (n, frames, 3, 64, 64) in [0, 1] and their attributes, a pure function of ``seed``.

    Each clip shows one shape of constant colour and size moving along a straight line at a
    constant speed (uniform in ``SPEED_RANGE`` pixels per frame, uniform direction), kept
    ``MARGIN`` pixels inside the image on every frame.  As for :func:`sample_world`, the draws
    do not depend on ``shapes``: ``("circle",)`` and ``("square",)`` give the same motions with
    the shape swapped.  Attributes: ``shape``, ``colour``, ``size``, ``speed`` and per frame
    ``cx`` / ``cy`` (painted centroid) lists.
    """
    for s in shapes:
        if s not in SHAPES:
            raise ValueError(f"unknown shape {s!r}")
    if frames < 2:
        raise ValueError(f"frames must be at least 2, got {frames}")
    rng = np.random.default_rng(seed)
    u = rng.random((n, 7))
    clips = torch.empty(n, frames, 3, SIZE, SIZE)
    attrs: List[dict] = []
    g = torch.arange(SIZE, dtype=torch.float64) + 0.5
    for i in range(n):
        shape = shapes[min(int(u[i, 0] * len(shapes)), len(shapes) - 1)]
        colour = colours[min(int(u[i, 1] * len(colours)), len(colours) - 1)]
        size = SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * float(u[i, 2])
        lo, hi = size + MARGIN, SIZE - size - MARGIN
        angle = 2 * math.pi * float(u[i, 3])
        speed = SPEED_RANGE[0] + (SPEED_RANGE[1] - SPEED_RANGE[0]) * float(u[i, 4])
        speed = min(speed, 0.9 * (hi - lo) / (frames - 1))        # the whole path fits
        dx, dy = speed * (frames - 1) * math.cos(angle), speed * (frames - 1) * math.sin(angle)
        x0 = (lo - min(0.0, dx)) + ((hi - max(0.0, dx)) - (lo - min(0.0, dx))) * float(u[i, 5])
        y0 = (lo - min(0.0, dy)) + ((hi - max(0.0, dy)) - (lo - min(0.0, dy))) * float(u[i, 6])
        cxs, cys = [], []
        for f in range(frames):
            a = f / (frames - 1)
            img, cov = render(shape, colour, x0 + a * dx, y0 + a * dy, size)
            clips[i, f] = img
            area = float(cov.sum())
            cxs.append(float((cov.sum(0) * g).sum() / area))
            cys.append(float((cov.sum(1) * g).sum() / area))
        attrs.append({"shape": shape, "colour": colour, "size": size, "speed": speed,
                      "cx": cxs, "cy": cys, "caption": caption(shape, colour)})
    return clips, attrs


def sample_clip_domain(n: int, seed: int, domain: str, frames: int = FRAMES) -> Tuple[torch.Tensor, List[dict]]:
    """Clips of translation domain ``"A"`` (moving circles) or ``"B"`` (moving squares)."""
    return sample_clips(n, seed, shapes=DOMAINS[domain], frames=frames)


def read_clips(clips) -> List[List[dict]]:
    """:func:`read_attributes` of every frame of (n, frames, 3, h, w) clips: one list per clip."""
    x = torch.as_tensor(clips)
    if x.dim() != 5:
        raise ValueError(f"expected (n, frames, 3, h, w) clips, got {tuple(x.shape)}")
    n, t = x.shape[:2]
    flat = read_attributes(x.reshape(n * t, *x.shape[2:]))
    return [flat[i * t:(i + 1) * t] for i in range(n)]
