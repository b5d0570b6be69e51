# SPDX-License-Identifier: GPL-3.0-or-later
"""Differentiable, seeded image augmentations (the DiffAugment policy set).

Plug-and-play guidance (Wu & De la Torre, ICCV 2023) averages its CLIP energy
over L randomly augmented copies of the image so that the gradient follows
what CLIP "sees" rather than adversarial pixel patterns.  The augmentations
are those of DiffAugment (Zhao et al., NeurIPS 2020), re-implemented here:

``color``
    brightness ``x + (u - 0.5)``, then saturation ``m_c + (x - m_c) * 2u``
    (``m_c`` the per-pixel channel mean), then contrast
    ``m + (x - m) * (u + 0.5)`` (``m`` the per-image mean); each ``u`` is
    uniform on [0, 1) and drawn per sample.
``translation``
    an integer shift of up to ``round(0.125 * side)`` pixels on each axis,
    the vacated border filled with zeros.
``resize``
    zoom about the image centre by a factor uniform on [0.8, 1.2], then pad
    with zeros (zoom out) or keep the centre (zoom in) so the size is
    unchanged; bilinear, done with ``grid_sample``.
``cutout``
    a zeroed rectangle of half the height and half the width whose centre is
    uniform over the image (it may be clipped at the border).

Images are ``(B, C, H, W)`` floats in [0, 1]; nothing is clamped, so every
map is differentiable with respect to the image (the random parameters do
not depend on it).  Every random number is drawn per sample, on the CPU,
from the generator passed in, and only then moved to the image's device:
the same generator state gives the same augmentation on every device.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

POLICIES = ("color", "translation", "resize", "cutout")

TRANSLATION_RATIO = 0.125
RESIZE_RANGE = (0.8, 1.2)
CUTOUT_RATIO = 0.5

PolicySpec = Union[str, Sequence[str], None]


def parse_policies(policies: PolicySpec) -> tuple[str, ...]:
    """Normalise a policy spec to a tuple of names, validating each one.

    Accepts a comma-separated string (``"color,translation"``), a sequence of
    names, or ``None``/``""`` for no augmentation.  Unknown names raise
    ``ValueError`` listing the valid ones.
    """
    if policies is None:
        return ()
    if isinstance(policies, str):
        names: Iterable[str] = policies.split(",")
    else:
        names = policies
    out = []
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"augmentation policy names must be strings, got {name!r}")
        key = name.strip().lower()
        if not key:
            continue
        if key not in POLICIES:
            raise ValueError(
                f"unknown augmentation policy {name!r}; valid policies are: {', '.join(POLICIES)}")
        out.append(key)
    return tuple(out)


def _uniform(n: int, generator: Optional[torch.Generator], x: torch.Tensor) -> torch.Tensor:
    """n draws from U[0, 1) on the CPU, moved to x's device and dtype."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return u.to(device=x.device, dtype=x.dtype)


def _randint(low: int, high: int, n: int, generator: Optional[torch.Generator],
             device: torch.device) -> torch.Tensor:
    """n integers uniform on [low, high) drawn on the CPU, then moved."""
    return torch.randint(low, high, (n,), generator=generator).to(device)


def _color(x: torch.Tensor, g: Optional[torch.Generator]) -> torch.Tensor:
    b = x.shape[0]
    shape = (b, 1, 1, 1)
    brightness = (_uniform(b, g, x) - 0.5).view(shape)
    x = x + brightness
    saturation = (_uniform(b, g, x) * 2.0).view(shape)
    m = x.mean(dim=1, keepdim=True)
    x = m + (x - m) * saturation
    contrast = (_uniform(b, g, x) + 0.5).view(shape)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return m + (x - m) * contrast


def _translation(x: torch.Tensor, g: Optional[torch.Generator]) -> torch.Tensor:
    b, c, h, w = x.shape
    sy = int(h * TRANSLATION_RATIO + 0.5)
    sx = int(w * TRANSLATION_RATIO + 0.5)
    dev = x.device
    ty = _randint(-sy, sy + 1, b, g, dev)
    tx = _randint(-sx, sx + 1, b, g, dev)
    # Output pixel (i, j) reads input (i - ty, j - tx); out-of-range reads are zero.
    src_y = torch.arange(h, device=dev).view(1, h) - ty.view(b, 1)          # (b, h)
    src_x = torch.arange(w, device=dev).view(1, w) - tx.view(b, 1)          # (b, w)
    valid_y = (src_y >= 0) & (src_y < h)
    valid_x = (src_x >= 0) & (src_x < w)
    iy = src_y.clamp(0, h - 1)
    ix = src_x.clamp(0, w - 1)
    bi = torch.arange(b, device=dev).view(b, 1, 1)
    # Advanced indexing on dims 0, 2, 3 -> (b, h, w, c); differentiable (index backward).
    picked = x.permute(0, 2, 3, 1)[bi, iy.view(b, h, 1), ix.view(b, 1, w)]
    mask = (valid_y.view(b, h, 1) & valid_x.view(b, 1, w)).to(x.dtype).unsqueeze(-1)
    return (picked * mask).permute(0, 3, 1, 2)


def _resize(x: torch.Tensor, g: Optional[torch.Generator]) -> torch.Tensor:
    b = x.shape[0]
    lo, hi = RESIZE_RANGE
    scale = lo + (hi - lo) * _uniform(b, g, x)
    # grid_sample maps each output coordinate to an input coordinate: a zoom by
    # `scale` about the centre reads input at output / scale.
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = 1.0 / scale
    theta[:, 1, 1] = 1.0 / scale
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _cutout(x: torch.Tensor, g: Optional[torch.Generator]) -> torch.Tensor:
    b, c, h, w = x.shape
    ch = int(h * CUTOUT_RATIO + 0.5)
    cw = int(w * CUTOUT_RATIO + 0.5)
    dev = x.device
    cy = _randint(0, h, b, g, dev)
    cx = _randint(0, w, b, g, dev)
    y0 = (cy - ch // 2).view(b, 1)
    x0 = (cx - cw // 2).view(b, 1)
    ys = torch.arange(h, device=dev).view(1, h)
    xs = torch.arange(w, device=dev).view(1, w)
    in_y = (ys >= y0) & (ys < y0 + ch)                                        # (b, h)
    in_x = (xs >= x0) & (xs < x0 + cw)                                        # (b, w)
    keep = ~(in_y.view(b, 1, h, 1) & in_x.view(b, 1, 1, w))
    return x * keep.to(x.dtype)


_OPS = {
    "color": _color,
    "translation": _translation,
    "resize": _resize,
    "cutout": _cutout,
}


def diff_augment(x: torch.Tensor, policies: PolicySpec,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Apply the named augmentations, in the order given, to a batch of images.

    ``x``: ``(B, C, H, W)`` floating tensor (images in [0, 1]).
    ``policies``: names from ``POLICIES`` (sequence or comma-separated
    string); empty means the identity.
    ``generator``: a CPU ``torch.Generator`` (``None`` uses torch's global
    CPU generator).  Each policy draws its parameters for all B samples
    from it, in policy order, so the output is a function of the generator
    state alone.

    Returns a tensor of the same shape, differentiable with respect to ``x``.
    """
    names = parse_policies(policies)
    if x.dim() != 4:
        raise ValueError(f"diff_augment expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"diff_augment expects a floating tensor, got {x.dtype}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("diff_augment draws on the CPU: pass a CPU torch.Generator")
    for name in names:
        x = _OPS[name](x, generator)
    return x


__all__ = ["POLICIES", "diff_augment", "parse_policies"]
