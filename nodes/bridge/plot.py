# SPDX-License-Identifier: GPL-3.0-or-later
"""The one painter behind the pack's plot outputs (Langevin energy, Asyrp loss, Asyrp interval curves):
panels stacked top to bottom, each with line series, an optional dashed threshold and a vertical marker,
returned as a ComfyUI IMAGE (1, H, W, 3) in [0, 1]."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

SIZE = (512, 320)
COLOURS = [(200, 40, 40), (40, 80, 200), (40, 160, 60)]


@dataclass
class Panel:
    title: str
    series: Sequence[tuple]                      # (label, ys, colour or None): one line each
    xs: Optional[Sequence[float]] = None         # x of each point (default 0, 1, ...)
    x_range: Optional[tuple] = None              # (x at the left edge, x at the right edge)
    threshold: Optional[float] = None            # dashed horizontal line
    marker: Optional[float] = None               # vertical line at this x
    footer: str = ""                             # under the panel, left
    legend: bool = False                         # series labels under the panel


def paint(panels: Sequence[Panel], size=SIZE, footer: str = "") -> torch.Tensor:
    w, h = size
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    gap = 12
    ph = (h - 8 - (16 if footer else 0) - gap * (len(panels) - 1)) // max(len(panels), 1)
    for k, p in enumerate(panels):
        top = 8 + k * (ph + gap)
        left, right, bottom = 60, w - 10, top + ph - 14
        d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
        first = p.series[0][2] if p.series and p.series[0][2] else (0, 0, 0)
        d.text((left + 4, top + 2), p.title, fill=first if len(p.series) == 1 else (0, 0, 0))
        vals = [float(v) for _l, ys, _c in p.series for v in ys if math.isfinite(float(v))]
        if p.threshold is not None and math.isfinite(p.threshold):
            vals.append(float(p.threshold))
        if vals:
            lo, hi = min(vals), max(vals)
            if hi - lo < 1e-12:
                lo, hi = lo - 0.5, hi + 0.5
            d.text((2, top), f"{hi:.4g}", fill=(0, 0, 0))
            d.text((2, bottom - 10), f"{lo:.4g}", fill=(0, 0, 0))
            inner_top = top + 14   # below the title

            n_max = max((len(ys) for _l, ys, _c in p.series), default=1)
            xs_all = list(p.xs) if p.xs is not None else list(range(n_max))
            x0, x1 = p.x_range if p.x_range is not None else (xs_all[0], xs_all[-1] if len(xs_all) > 1 else 1)
            span = (x1 - x0) or 1.0

            def px(x):
                return left + (right - left) * (x - x0) / span

            def py(v):
                return bottom - (bottom - inner_top) * (v - lo) / (hi - lo)

            if p.threshold is not None and math.isfinite(p.threshold):
                ty = py(p.threshold)
                for x in range(left, right, 8):
                    d.line([(x, ty), (min(x + 4, right), ty)], fill=(90, 90, 90))
            if p.marker is not None:
                d.line([(px(p.marker), top), (px(p.marker), bottom)], fill=(30, 150, 60), width=2)
            for j, (_label, ys, colour) in enumerate(p.series):
                colour = colour or COLOURS[j % len(COLOURS)]
                pts = [(px(x), py(float(y))) for x, y in zip(xs_all, ys) if math.isfinite(float(y))]
                if len(pts) > 1:
                    d.line(pts, fill=colour, width=2)
                if len(pts) <= 25:  # dots on short series (and on a single point), a plain line on long ones
                    for x, y in pts:
                        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        if p.legend:
            for j, (label, _ys, colour) in enumerate(p.series):
                d.text((left + 8 + 150 * j, bottom + 2), label, fill=colour or COLOURS[j % len(COLOURS)])
        elif p.footer:
            d.text((left + 4, bottom + 1), p.footer, fill=(0, 0, 0))
    if footer:
        d.text((60, h - 16), footer, fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
