# SPDX-License-Identifier: GPL-3.0-or-later
"""Asyrp (Kwon, Jeong & Uh, ICLR 2023): editing in a diffusion model's h-space.

Pure torch over two sigma-space denoisers (no ComfyUI here):

* ``plain(x, sigma) -> d``   the frozen model;
* ``edited(x, sigma) -> P``  the same model with its bottleneck activation
  ``h`` (the U-Net middle-block output) shifted to ``h + delta_h``.

The asymmetric reverse step
---------------------------
In sigma space (``x = alpha * x0 + sigma * n``, see ``dpm_encoder``) the
DDIM-eta step is ``x_t = A x_s + B d + C eps``.  Writing the plain model's
noise prediction ``e = (x_s - alpha_s d) / sigma_s`` it is
``x_t = alpha_t d + sqrt(sigma_t^2 - C^2) e + C eps``.  Asyrp replaces only
the predicted-x0 term ``d`` (P_t) by the edited model's prediction ``P`` and
keeps the direction term (D_t) of the plain model, so::

    x_t = (A x_s + B d + C eps) + alpha_t (P - d)

i.e. the plain step plus ``alpha_t (P - d)``.  It is used only for the steps
inside the editing interval [T, t_edit]; after it the plain step runs.

Positions on the chain are fractions: step ``i`` of ``N`` starts at position
``1 - i/N`` (1 = the first step, T).  Step ``i`` is edited when its start
position is above ``t_edit`` and boosted when its start position is at or
below ``t_boost`` (``t_boost = 0``: never).  A boosted step takes the DDIM
step with eta = 1 and fresh seeded noise (the paper's quality boosting); it
replaces the code's stored noise, so a boosted replay no longer lands on the
encoded image.

Directions
----------
``DeltaBlock`` is the implicit function ``f_t(h, t)``: a 1x1 conv, plus a
projection of the noise-level embedding, GroupNorm, SiLU and a 1x1 conv
(zero-initialised by default, so an untrained block is no edit; Asyrp
Train Direction starts from PyTorch's default init, as the official code).  ``GlobalDelta``
is one learned ``delta_h`` per training step (looked up by the nearest noise
level).  ``Direction`` is a linear combination of such terms plus the record
of what they were trained on; scaling and adding directions is exact
(``delta_h`` is linear in the coefficients).

The noise level fed to ``f_t`` is ``log(sigma / alpha)`` (the log
noise-to-signal ratio), so a direction trained on one schedule reads sensibly
on another of the same model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dpm_encoder import CodeError, LatentCode, alpha, blend, check_family, replay_step, step_coefficients
from .types import Denoiser

KINDS = ("implicit function", "global direction")


# ---------------------------------------------------------------- schedule helpers

def noise_level(sigma: float, family: str) -> float:
    """log(sigma / alpha): the level ``f_t`` is conditioned on (finite at flow's sigma = 1)."""
    a = max(alpha(float(sigma), family), 1e-4)
    return math.log(max(float(sigma), 1e-8) / a)


def check_fraction(value: float, name: str) -> float:
    v = float(value)
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise CodeError(f"{name} must be a fraction of the chain in [0, 1], got {value}")
    return v


def edited_steps(steps: int, t_edit: float) -> int:
    """How many leading steps of an ``steps``-step chain lie in [T, t_edit]."""
    t_edit = check_fraction(t_edit, "t_edit")
    return sum(1 for i in range(steps) if 1.0 - i / steps > t_edit + 1e-9)


def is_boosted(i: int, steps: int, t_boost: float) -> bool:
    t_boost = check_fraction(t_boost, "t_boost")
    return t_boost > 0.0 and 1.0 - i / steps <= t_boost + 1e-9


# ---------------------------------------------------------------- f_t and global directions

def level_embedding(level: float, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of a noise level, ``(dim,)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(100.0) * torch.arange(half, dtype=torch.float64) / max(half, 1))
    ang = float(level) * freqs
    emb = torch.cat([torch.sin(ang), torch.cos(ang)])
    return emb.to(device=device, dtype=dtype)


class DeltaBlock(nn.Module):
    """f_t(h, t) -> delta_h, same shape as h (any spatial size)."""

    kind = "implicit function"

    def __init__(self, channels: int, emb_dim: int = 64, hidden: Optional[int] = None, zero_init: bool = True):
        super().__init__()
        hidden = int(hidden or channels)
        groups = math.gcd(hidden, 32) or 1
        self.channels, self.emb_dim, self.hidden = int(channels), int(emb_dim), hidden
        self.conv_in = nn.Conv2d(channels, hidden, 1)
        self.emb = nn.Linear(emb_dim, hidden)
        self.norm = nn.GroupNorm(groups, hidden)
        self.conv_out = nn.Conv2d(hidden, channels, 1)
        if zero_init:  # an untrained block is no edit; training starts from PyTorch's default init (official)
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def config(self) -> dict:
        return {"kind": self.kind, "channels": self.channels, "emb_dim": self.emb_dim, "hidden": self.hidden}

    def forward(self, h: torch.Tensor, level: float) -> torch.Tensor:
        w = self.conv_in.weight
        x = self.conv_in(h.to(w.dtype))
        e = self.emb(F.silu(level_embedding(level, self.emb_dim, w.device, w.dtype)))
        x = F.silu(self.norm(x + e.view(1, -1, 1, 1)))
        return self.conv_out(x).to(h.dtype)


class GlobalDelta(nn.Module):
    """One learned delta_h per training step, picked by the nearest noise level."""

    kind = "global direction"

    def __init__(self, h_shape: Sequence[int], levels: Sequence[float]):
        super().__init__()
        self.h_shape = tuple(int(v) for v in h_shape)
        self.register_buffer("levels", torch.tensor([float(v) for v in levels], dtype=torch.float64))
        self.delta = nn.Parameter(torch.zeros(len(levels), *self.h_shape))

    def config(self) -> dict:
        return {"kind": self.kind, "h_shape": list(self.h_shape), "levels": [float(v) for v in self.levels]}

    def index(self, level: float) -> int:
        return int(torch.argmin((self.levels - float(level)).abs()))

    @property
    def position_free(self) -> bool:
        """One delta per channel (stored as (C, 1, 1)): it applies at every position of any h size."""
        return len(self.h_shape) == 3 and self.h_shape[1:] == (1, 1)

    def forward(self, h: torch.Tensor, level: float) -> torch.Tensor:
        if self.position_free and h.dim() == 4 and h.shape[1] == self.h_shape[0]:
            return self.delta[self.index(level)].to(h.dtype).unsqueeze(0).expand_as(h)
        if tuple(h.shape[1:]) != self.h_shape:
            raise CodeError(f"this global direction was trained on h of shape {list(self.h_shape)}, the model's h "
                            f"here is {list(h.shape[1:])}: use the image size it was trained at, or an "
                            "implicit-function direction")
        return self.delta[self.index(level)].to(h.dtype).unsqueeze(0).expand_as(h)


def _object_deviation(h: torch.Tensor, fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h - background, object mask)``: background is h's per-channel median over positions (the object
    covers less than half of the picture); the object is where ``||h - background||`` reaches ``fraction``
    of its maximum in that image. h: (B, C, H, W); the mask is (B, 1, H, W), 0 or 1."""
    h = h.float()
    dev = h - h.flatten(2).median(dim=2).values[..., None, None]
    size = dev.norm(dim=1, keepdim=True)
    mask = (size >= fraction * size.flatten(1).amax(dim=1).view(-1, 1, 1, 1)).to(h.dtype)
    return dev, mask


def object_stats(h: torch.Tensor, fraction: float = 0.5) -> torch.Tensor:
    """(B, C + 1): per image, the mean of ``h - background`` over the object's positions, and, last, the
    object's position count (to size the edit). See ``_object_deviation`` for background and object."""
    dev, mask = _object_deviation(h, fraction)
    count = mask.flatten(2).sum(2)
    return torch.cat([(dev * mask).flatten(2).sum(2) / count.clamp_min(1.0), count], dim=1)


def object_contrast(h: torch.Tensor, fraction: float = 0.5) -> torch.Tensor:
    """(B, C): ``object_stats`` without the count."""
    return object_stats(h, fraction)[:, :-1]


class ObjectDelta(nn.Module):
    """One shift per channel and step, applied where h looks like the object the examples show.

    At step i, ``delta_h = delta[i] * g`` with the per-position gate
    ``g = clamp(<h - background, probe[i]> / ||probe[i]||^2, 0, 1)``: background is h's per-channel
    median over positions, ``probe[i]`` the examples' mean object-minus-background h (``object_contrast``
    of the images without the attribute). So g is about 1 on the object, 0 on the background, and the
    edit follows the object wherever it is, at any image size; the rest of the picture is not shifted.

    ``centred``: the gated shift minus its mean over each image's positions, per channel, so the edit
    moves the object's h against the rest of the picture but leaves the picture's mean h (what the
    group norms after the site normalise by) where it was. Without it, on the demo pixel DDPM's h after
    its second up level, the shifted mean reaches every position through those norms and tints the
    whole background (docs/asyrp.md measures both)."""

    kind = "object direction"

    def __init__(self, channels: int, levels: Sequence[float], gain: float = 1.0, centred: bool = False):
        super().__init__()
        self.channels = int(channels)
        self.gain = float(gain)
        self.centred = bool(centred)
        self.register_buffer("levels", torch.tensor([float(v) for v in levels], dtype=torch.float64))
        self.delta = nn.Parameter(torch.zeros(len(levels), self.channels))
        self.probe = nn.Parameter(torch.zeros(len(levels), self.channels))

    def config(self) -> dict:
        c = {"kind": self.kind, "channels": self.channels, "levels": [float(v) for v in self.levels],
             "gain": self.gain}
        if self.centred:   # only then, so directions saved before it existed keep their exact record
            c["centred"] = True
        return c

    def index(self, level: float) -> int:
        return int(torch.argmin((self.levels - float(level)).abs()))

    def gate(self, h: torch.Tensor, level: float) -> torch.Tensor:
        u = self.probe[self.index(level)].to(device=h.device, dtype=torch.float32).view(1, -1, 1, 1)
        hf = h.float()
        bg = hf.flatten(2).median(dim=2).values[..., None, None]
        proj = ((hf - bg) * u).sum(1, keepdim=True) / u.pow(2).sum().clamp_min(1e-12)
        return (self.gain * proj).clamp(0.0, 1.0)

    def forward(self, h: torch.Tensor, level: float) -> torch.Tensor:
        if h.dim() != 4 or h.shape[1] != self.channels:
            raise CodeError(f"this object direction has {self.channels} channels, the model's h here is "
                            f"{list(h.shape[1:])}")
        d = self.delta[self.index(level)].to(device=h.device, dtype=torch.float32).view(1, -1, 1, 1)
        shift = d * self.gate(h, level)
        if self.centred:
            shift = shift - shift.mean(dim=(2, 3), keepdim=True)
        return shift.to(h.dtype)


REGION_FRACTION = 0.7   # a position is in a pair's region when its pooled difference reaches this share of the max


def position_grid(latent_hw: Sequence[int], h: torch.Tensor) -> tuple[tuple[int, int], Optional[int]]:
    """The 2-D grid of h's positions over a latent of spatial size ``latent_hw``, and the DiT patch size (None
    for a map). A U-Net's h is already a map ``(B, C, H', W')``; a DiT's is ``(B, C, L, 1)``, L tokens of p x p
    latent patches in row-major order, the latent padded up to a multiple of p (SD3, Flux), so the grid is
    ``(ceil(H/p), ceil(W/p))`` for the p that gives L tokens."""
    H, W = int(latent_hw[0]), int(latent_hw[1])
    if h.shape[-1] != 1 or h.shape[-2] == 1:
        return (int(h.shape[-2]), int(h.shape[-1])), None
    L = int(h.shape[-2])
    for p in range(1, max(H, W) + 1):
        if math.ceil(H / p) * math.ceil(W / p) == L:
            return (math.ceil(H / p), math.ceil(W / p)), p
    raise CodeError(f"h has {L} positions, which is no patch grid of a {H}x{W} latent (reference latents in the "
                    "conditioning add tokens); use spread 'everywhere' there")


def pair_regions(diff: torch.Tensor, h: torch.Tensor, fraction: float = REGION_FRACTION) -> torch.Tensor:
    """(B, positions) 0/1: where a pair of examples differs, on h's positions. ``diff`` (B, 1, H, W) is
    ``||z_with - z_without||`` over the latent's channels; it is averaged over each position's share of the
    latent (a DiT token's p x p patch, the last row and column of patches clipped to the latent), and a
    position is in the region when that reaches ``fraction`` of the image's largest value."""
    grid, p = position_grid(diff.shape[-2:], h)
    d = diff.float()
    pooled = (F.adaptive_avg_pool2d(d, grid) if p is None else F.avg_pool2d(d, p, ceil_mode=True)).flatten(1)
    top = pooled.amax(dim=1, keepdim=True)
    return ((pooled >= fraction * top) & (top > 0)).to(torch.float32)


class RegionDelta(nn.Module):
    """One shift per channel and step, applied where h looks like the examples' region.

    At step i, ``delta_h = delta[i] * g`` with the per-position gate
    ``g = clamp((<h, probe[i]> - lo[i]) / (hi[i] - lo[i]), 0, 1)``: ``probe`` is the linear discriminant
    (Fisher's LDA) of h at the region's positions against h elsewhere, on the images without the attribute,
    and ``lo`` / ``hi`` the two classes' mean projections. So g is 1 on a typical region position, 0 on a
    typical other one; the edit follows the region wherever it is, at any image size, and the rest of the
    picture is not shifted. Steps whose delta is zero are no edit."""

    kind = "region direction"

    def __init__(self, channels: int, levels: Sequence[float]):
        super().__init__()
        self.channels = int(channels)
        self.register_buffer("levels", torch.tensor([float(v) for v in levels], dtype=torch.float64))
        n = len(levels)
        self.delta = nn.Parameter(torch.zeros(n, self.channels))
        self.probe = nn.Parameter(torch.zeros(n, self.channels))
        self.bounds = nn.Parameter(torch.zeros(n, 2))   # (lo, hi) per step

    def config(self) -> dict:
        return {"kind": self.kind, "channels": self.channels, "levels": [float(v) for v in self.levels]}

    def index(self, level: float) -> int:
        return int(torch.argmin((self.levels - float(level)).abs()))

    def gate(self, h: torch.Tensor, level: float) -> torch.Tensor:
        i = self.index(level)
        u = self.probe[i].to(device=h.device, dtype=torch.float32)
        lo, hi = (float(v) for v in self.bounds[i].detach())
        proj = torch.einsum("bc...,c->b...", h.float(), u).unsqueeze(1)
        return ((proj - lo) / max(hi - lo, 1e-12)).clamp(0.0, 1.0)

    def forward(self, h: torch.Tensor, level: float) -> torch.Tensor:
        if h.dim() != 4 or h.shape[1] != self.channels:
            raise CodeError(f"this region direction has {self.channels} channels, the model's h here is "
                            f"{list(h.shape[1:])}")
        d = self.delta[self.index(level)].to(device=h.device, dtype=torch.float32)
        if not bool(d.any()):
            return torch.zeros_like(h)
        return (d.view(1, -1, 1, 1) * self.gate(h, level)).to(h.dtype)


def make_term(config: dict) -> nn.Module:
    kind = config.get("kind")
    if kind == RegionDelta.kind:
        return RegionDelta(int(config["channels"]), config["levels"])
    if kind == ObjectDelta.kind:
        return ObjectDelta(int(config["channels"]), config["levels"], float(config.get("gain", 1.0)),
                           bool(config.get("centred", False)))
    if kind == DeltaBlock.kind:
        return DeltaBlock(int(config["channels"]), int(config["emb_dim"]), int(config["hidden"]))
    if kind == GlobalDelta.kind:
        return GlobalDelta(config["h_shape"], config["levels"])
    raise CodeError(f"unknown direction kind {kind!r}; expected one of "
                    f"{[*KINDS, ObjectDelta.kind, RegionDelta.kind]}")


@dataclass
class Direction:
    """sum_k coef_k * term_k(h, level) plus the record of its training.

    ``meta`` keys: family, architecture, latent_format, h_shape (C, H, W),
    sigmas (training schedule), source_text, target_text, t_edit, t_boost.
    Terms are shared, never modified after training: scaling or combining
    makes a new Direction around the same modules.
    """

    terms: list
    coefs: list
    meta: dict = field(default_factory=dict)

    def delta(self, h: torch.Tensor, level: float) -> torch.Tensor:
        out = None
        for term, c in zip(self.terms, self.coefs):
            if c == 0.0:
                continue
            d = float(c) * term(h, level)
            out = d if out is None else out + d
        return torch.zeros_like(h) if out is None else out

    def scaled(self, k: float) -> "Direction":
        return Direction(list(self.terms), [float(c) * float(k) for c in self.coefs], dict(self.meta))

    @property
    def h_channels(self) -> int:
        return int(self.meta["h_shape"][0])


def combine(directions: Sequence[Direction], coefficients: Sequence[float]) -> Direction:
    """sum_i c_i * direction_i; all must come from the same model (family, architecture, h channels)."""
    if not directions:
        raise CodeError("combine needs at least one direction")
    first = directions[0].meta
    terms, coefs = [], []
    for k, (d, c) in enumerate(zip(directions, coefficients)):
        for key in ("family", "architecture", "latent_format", "unet", "h_site", "h_block"):
            if key in ("unet", "h_site", "h_block") and (key not in d.meta or key not in first):
                continue  # toy directions and files from before h sites existed carry no such record
            if d.meta.get(key) != first.get(key):
                raise CodeError(f"direction {k + 1} was trained on {key} {d.meta.get(key)!r}, direction 1 on "
                                f"{first.get(key)!r}: only directions of the same model combine")
        if d.h_channels != directions[0].h_channels:
            raise CodeError(f"direction {k + 1} has h with {d.h_channels} channels, direction 1 "
                            f"{directions[0].h_channels}")
        terms += list(d.terms)
        coefs += [float(c) * float(x) for x in d.coefs]
    meta = dict(first)
    meta["source_text"] = " + ".join(str(d.meta.get("source_text", "")) for d in directions)
    meta["target_text"] = " + ".join(f"{float(c):g}*({d.meta.get('target_text', '')})"
                                     for d, c in zip(directions, coefficients))
    return Direction(terms, coefs, meta)


# ---------------------------------------------------------------- sampling

def _edit_term(x_next: torch.Tensor, p: torch.Tensor, d: torch.Tensor, sigma_to: float, family: str) -> torch.Tensor:
    return x_next + alpha(sigma_to, family) * (p - d)


def asyrp_replay(plain: Denoiser, edited: Optional[Denoiser], code: LatentCode, t_edit: float,
                 t_boost: float = 0.0, seed: int = 0, callback=None) -> torch.Tensor:
    """Replay a latent code with the asymmetric step inside [T, t_edit].

    ``edited`` None means no edit (strength 0): with ``t_boost = 0`` this is
    ``replay`` bit for bit.  Boosted steps use eta = 1 and noise drawn from
    ``seed`` (on the CPU, so the same bits on every device)."""
    steps = code.steps
    n_edit = edited_steps(steps, t_edit)
    check_fraction(t_boost, "t_boost")
    gen = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    # A masked code (see dpm_encoder's "Masked edits"): the step and its edit are made unmasked, then
    # blended once with the source chain, so outside the mask every step stays the source's.
    unmasked = replace(code, mask=None)
    boosted_code = replace(unmasked, eta=1.0)
    x = code.x_start()
    if code.mask is not None:
        x = blend(code.mask, x, code.trajectory[0])
    for i in range(steps):
        s_from, s_to = float(code.sigmas[i]), float(code.sigmas[i + 1])
        if is_boosted(i, steps, t_boost):
            fresh = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.device, x.dtype)
            x_next, d = replay_step(plain, x, i, boosted_code, noise=fresh, residual=torch.zeros_like(x))
        else:
            x_next, d = replay_step(plain, x, i, unmasked)
        if edited is not None and i < n_edit:
            x_next = _edit_term(x_next, edited(x, s_from), d, s_to, code.family)
        if code.mask is not None:
            x_next = blend(code.mask, x_next, code.trajectory[i + 1])
        if callback is not None:
            callback(i, d, x, steps)
        x = x_next
    return x


def ddim_invert(plain: Denoiser, x0: torch.Tensor, sigmas: torch.Tensor, family: str,
                callback=None) -> torch.Tensor:
    """Deterministic DDIM inversion (eta = 0): clean ``x0`` -> ``x_T`` at ``sigmas[0]``.

    Each step up the chain evaluates the model where it stands (at the lower
    level) and moves along its noise prediction; the step off sigma = 0 uses
    the model at the first level above it on ``alpha * x0``."""
    check_family(family)
    s = [float(v) for v in sigmas]
    if len(s) < 2 or s[-1] != 0.0 or any(not (a > b) for a, b in zip(s, s[1:])):
        raise CodeError("DDIM inversion needs a strictly decreasing sigma schedule that ends at 0")
    x = x0
    n = len(s) - 1
    for k, i in enumerate(range(n - 1, -1, -1)):  # from s[i+1] up to s[i]
        lo, hi = s[i + 1], s[i]
        if lo == 0.0:
            probe = alpha(hi, family) * x
            d = plain(probe, hi)
            e = (probe - alpha(hi, family) * d) / hi
            d = x
        else:
            d = plain(x, lo)
            e = (x - alpha(lo, family) * d) / lo
        x = alpha(hi, family) * d + hi * e
        if callback is not None:
            callback(k, d, x, n)
    return x


def asyrp_sample(plain: Denoiser, edited: Optional[Denoiser], x_start: torch.Tensor, sigmas: torch.Tensor,
                 family: str, t_edit: float, t_boost: float = 0.0, seed: int = 0, callback=None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from ``x_start`` with the asymmetric step inside [T, t_edit];
    boosted steps (start position <= t_boost) use eta = 1 with seeded noise."""
    s = [float(v) for v in sigmas]
    steps = len(s) - 1
    n_edit = edited_steps(steps, t_edit)
    gen = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    x = x_start
    for i in range(steps):
        boosted = is_boosted(i, steps, t_boost)
        a, b, c = step_coefficients(s[i], s[i + 1], 1.0 if boosted else 0.0, family)
        d = plain(x, s[i])
        x_next = a * x + b * d
        if c > 0.0:
            x_next = x_next + c * torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.device, x.dtype)
        if edited is not None and i < n_edit:
            x_next = _edit_term(x_next, edited(x, s[i]), d, s[i + 1], family)
        if callback is not None:
            callback(i, d, x, steps)
        x = x_next
    return x


# ---------------------------------------------------------------- directions from examples

@torch.no_grad()
def h_along_chain(plain: Denoiser, read_h: Callable[[Callable[[], torch.Tensor]], torch.Tensor],
                  x0: torch.Tensor, sigmas: torch.Tensor, family: str, n_steps: int, batch_size: int = 8):
    """Yields ``(first, i, h)`` for each step ``i < n_steps`` and, within a step, each batch of ``x0`` (images
    ``first ..``) of the deterministic DDIM chain that starts at the DDIM inversion of the images: h at that
    step's level, ``(B, C, H, W)``, detached, float32. Steps are the outer loop, so a step's batches all come
    before the next step (the inverted latents of every batch are kept meanwhile).

    ``read_h(call) -> h`` runs ``call()`` (one plain model evaluation) and returns the h that evaluation
    passed through; the chain is the one the edit replays, so h is read at the same levels and site as
    training and editing."""
    s = [float(v) for v in sigmas]
    step = max(int(batch_size), 1)
    xs = [(first, ddim_invert(plain, x0[first:first + step], sigmas, family))
          for first in range(0, x0.shape[0], step)]
    for i in range(n_steps):
        a, b, _c = step_coefficients(s[i], s[i + 1], 0.0, family)
        for k, (first, x) in enumerate(xs):
            out = {}

            def call(x=x, i=i):
                out["d"] = plain(x, s[i])
                return out["d"]
            yield first, i, read_h(call).detach().float()
            xs[k] = (first, a * x + b * out["d"])


def mean_h_along_chain(plain: Denoiser, read_h: Callable[[Callable[[], torch.Tensor]], torch.Tensor],
                       x0: torch.Tensor, sigmas: torch.Tensor, family: str, n_steps: int,
                       batch_size: int = 8, reduce: Optional[Callable] = None) -> tuple[list, list]:
    """Per step ``i < n_steps`` of ``h_along_chain``, the mean over the images of h (a list of ``(C, H, W)``
    tensors) and the mean over the images of ||h|| (a list of floats). ``reduce(h) -> (B, ...)``: what is
    averaged instead of h itself (e.g. ``object_contrast``)."""
    sums, norms = [None] * n_steps, [0.0] * n_steps
    for _first, i, h in h_along_chain(plain, read_h, x0, sigmas, family, n_steps, batch_size):
        norms[i] += float(h.flatten(1).norm(dim=1).sum())
        h = (h if reduce is None else reduce(h)).sum(0)
        sums[i] = h if sums[i] is None else sums[i] + h
    return [v / x0.shape[0] for v in sums], [v / x0.shape[0] for v in norms]


@dataclass
class RegionStats:
    """One step's sums over the positions of a set of images, split by ``pair_regions``: h summed over the
    region and over the rest, the two position counts, the image count, and (for the discriminant) the
    scatter of h about ``ref`` (the first batch's mean h) summed over every position,
    ``sum (h - ref)(h - ref)^T``. Sums are float64 on the CPU."""

    region: torch.Tensor
    rest: torch.Tensor
    n_region: float
    n_rest: float
    n_images: int
    ref: Optional[torch.Tensor] = None
    scatter: Optional[torch.Tensor] = None


@dataclass
class RegionStep:
    """One step of a region direction: ``delta`` (C), the gate's ``probe`` (C) and its bounds ``lo`` < ``hi``,
    and the mean region size per image (positions)."""

    delta: torch.Tensor
    probe: torch.Tensor
    lo: float
    hi: float
    region_size: float


def region_stats_along_chain(plain: Denoiser, read_h: Callable[[Callable[[], torch.Tensor]], torch.Tensor],
                             x0: torch.Tensor, diff: torch.Tensor, sigmas: torch.Tensor, family: str,
                             n_steps: int, scatter: bool = False, first_step: int = 0, batch_size: int = 8,
                             finish: Optional[Callable[[int, RegionStats], object]] = None) -> tuple[list, list]:
    """Per step ``i < n_steps`` of ``h_along_chain``, the ``RegionStats`` of ``x0``'s images (None for steps
    before ``first_step``) and the mean ||h||. ``diff`` (N, 1, H, W): per image, how much its pair differs
    (``pair_regions``). ``scatter`` also sums the scatter about the first batch's mean h (C x C, float64,
    on the CPU; the products are taken in float32 on h's device after centring). ``finish(i, stats)``, when
    given, replaces a step's stats by what it returns as soon as the step is complete, so only one step's
    scatter is held at a time."""
    stats: list = [None] * n_steps
    norms = [0.0] * n_steps
    n = x0.shape[0]
    for first, i, h in h_along_chain(plain, read_h, x0, sigmas, family, n_steps, batch_size):
        norms[i] += float(h.flatten(1).norm(dim=1).sum())
        last = first + h.shape[0] >= n
        if i < first_step:
            continue
        m = pair_regions(diff[first:first + h.shape[0]].to(h.device), h).unsqueeze(1)   # (B, 1, P)
        t = h.flatten(2)                                                                  # (B, C, P)
        part = RegionStats((t * m).sum((0, 2)).cpu().double(), (t * (1 - m)).sum((0, 2)).cpu().double(),
                           float(m.sum()), float((1 - m).sum()), h.shape[0])
        old = stats[i]
        if scatter:
            part.ref = old.ref if old is not None else t.mean((0, 2)).cpu().double()
            c = t.permute(0, 2, 1).reshape(-1, t.shape[1]) - part.ref.to(device=t.device, dtype=t.dtype)
            part.scatter = (c.T @ c).cpu().double()
        if old is not None:
            old.region += part.region
            old.rest += part.rest
            old.n_region, old.n_rest = old.n_region + part.n_region, old.n_rest + part.n_rest
            old.n_images += part.n_images
            if scatter:
                old.scatter += part.scatter
            part = old
        stats[i] = finish(i, part) if (last and finish is not None) else part
    return stats, [v / n for v in norms]


def region_step(with_: RegionStats, without: RegionStats, step: int = 0, shrinkage: float = 1e-3) -> RegionStep:
    """One step of a region direction from paired examples' ``RegionStats``: delta is the mean h over the
    pairs' regions with the attribute minus without (strength 1 moves the region's h by the mean
    difference); the gate's probe is Fisher's discriminant of region against rest on the images without it,
    ``u = S^-1 (m_region - m_rest)``, S the pooled within-class covariance plus ``shrinkage`` times its mean
    variance on the diagonal; ``lo`` / ``hi`` the two classes' mean projections."""
    if min(with_.n_region, without.n_region) == 0:
        raise CodeError("the example pairs do not differ anywhere on h's positions: they must show the same "
                        "scenes with and without the attribute")
    if without.n_rest == 0:
        raise CodeError(f"every one of h's {int(without.n_region / max(without.n_images, 1))} positions per image "
                        "lies where a pair differs, so nothing tells the region from the rest: use larger images, or "
                        "spread 'everywhere'")
    m_r, m_b = without.region / without.n_region, without.rest / without.n_rest
    n = without.n_region + without.n_rest
    cr, cb = m_r - without.ref, m_b - without.ref
    cov = (without.scatter - without.n_region * torch.outer(cr, cr) - without.n_rest * torch.outer(cb, cb)) / n
    ridge = shrinkage * max(float(cov.diagonal().mean()), 1e-12)
    try:
        u = torch.linalg.solve(cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype), m_r - m_b)
    except RuntimeError as e:
        raise CodeError(f"h at step {step + 1} does not separate the region from the rest ({e})") from None
    lo, hi = float(u @ m_b), float(u @ m_r)
    if not (bool(torch.isfinite(u).all()) and math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise CodeError(f"h at step {step + 1} does not separate the region from the rest (not finite, or the "
                        "region does not project above the rest): check the model's output for NaN, or use "
                        "spread 'everywhere'")
    return RegionStep((with_.region / with_.n_region - m_r).float(), u.float(), lo, hi,
                      without.n_region / max(without.n_images, 1))


def region_direction(steps: Sequence[Optional[RegionStep]], levels: Sequence[float],
                     meta: Optional[dict] = None) -> Direction:
    """A ``RegionDelta`` direction from one ``RegionStep`` per step (None: no edit there)."""
    if len(steps) > len(levels):
        raise CodeError(f"{len(steps)} steps of h for {len(levels)} levels")
    first = next((v for v in steps if v is not None), None)
    if first is None:
        raise CodeError("no step of h to make a region direction from")
    term = RegionDelta(int(first.delta.numel()), levels)
    with torch.no_grad():
        for i, st in enumerate(steps):
            if st is not None:
                term.delta[i], term.probe[i] = st.delta, st.probe
                term.bounds[i, 0], term.bounds[i, 1] = st.lo, st.hi
    term.requires_grad_(False)
    return Direction([term], [1.0], dict(meta or {}))


def example_direction(h_with: Sequence[torch.Tensor], h_without: Sequence[torch.Tensor],
                      levels: Sequence[float], meta: Optional[dict] = None,
                      per_position: bool = False) -> Direction:
    """A global direction whose delta_h at step ``i`` is ``h_with[i] - h_without[i]`` (the mean h of the
    images that show the attribute minus the mean h of those that do not, Haas et al. 2023): strength 1
    moves h by the mean difference. Steps past the lists get no edit (their delta is zero).

    ``per_position`` False (the default) also averages the difference over h's positions: one shift per
    channel, applied at every position, so it does not carry where the examples' objects were (a
    per-position mean pulls an edited object towards the examples' average layout) and it applies at
    any image size."""
    if len(h_with) != len(h_without) or not h_with:
        raise CodeError("the two example sets give a different (or no) number of steps of h")
    if len(h_with) > len(levels):
        raise CodeError(f"{len(h_with)} steps of h for {len(levels)} levels")
    shape = tuple(h_with[0].shape)
    term = GlobalDelta(shape if per_position else (shape[0], 1, 1), levels)
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(h_with, h_without)):
            if tuple(a.shape) != shape or tuple(b.shape) != shape:
                raise CodeError(f"h has shape {list(a.shape)} / {list(b.shape)} at step {i + 1}, {list(shape)} "
                                "at step 1: both example sets must be at one image size")
            diff = (a - b).float()
            if not per_position:
                diff = diff.mean(dim=tuple(range(1, diff.dim())), keepdim=True)
            term.delta[i] = diff.to(term.delta.dtype)
    term.requires_grad_(False)
    return Direction([term], [1.0], dict(meta or {}))


def object_direction(c_with: Sequence[torch.Tensor], c_without: Sequence[torch.Tensor],
                     levels: Sequence[float], meta: Optional[dict] = None, orthogonal: bool = True,
                     gain: float = 1.0, centred: bool = False) -> Direction:
    """An ``ObjectDelta`` direction from the examples' mean ``object_contrast`` per step: delta is the
    contrast of the images with the attribute minus that of those without (strength 1 moves the
    object's h by the mean difference), the gate's probe the contrast of those without; ``centred``
    as ``ObjectDelta``."""
    if len(c_with) != len(c_without) or not c_with:
        raise CodeError("the two example sets give a different (or no) number of steps of h")
    if len(c_with) > len(levels):
        raise CodeError(f"{len(c_with)} steps of h for {len(levels)} levels")
    term = ObjectDelta(int(c_with[0].numel()), levels, gain, centred)
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(c_with, c_without)):
            d, u = (a - b).float().flatten(), b.float().flatten()
            if orthogonal:
                d = d - (d @ u) / (u @ u).clamp_min(1e-12) * u
            term.delta[i] = d
            term.probe[i] = u
    term.requires_grad_(False)
    return Direction([term], [1.0], dict(meta or {}))


def object_shift_scale(count: float, positions: int, centred: bool = False) -> float:
    """||shift|| / ||delta|| of an object direction on a picture whose gate is 1 on ``count`` of its
    ``positions`` and 0 elsewhere: sqrt(count). Centred, the object's positions move by delta (1 - k/P) and
    the other P - k by -delta k/P, so ||shift||^2 = ||delta||^2 (k (1 - k/P)^2 + (P - k)(k/P)^2)
    = ||delta||^2 k (1 - k/P)."""
    k, n = max(float(count), 0.0), max(int(positions), 1)
    return math.sqrt(k * max(1.0 - k / n, 0.0)) if centred else math.sqrt(k)


def relative_norms(deltas: Sequence[torch.Tensor], h_norms: Sequence[float]) -> list:
    """Per step ||delta_h|| / ||h|| (``h_norms``: the mean ||h|| of single images at that step), the
    size of an edit relative to the activation it shifts."""
    return [float(d.float().norm()) / max(float(n), 1e-12) for d, n in zip(deltas, h_norms)]


def gaussian_control(direction: Direction, seed: int = 0, relative: Optional[float] = None) -> Direction:
    """The random control of a direction: per edited step a Gaussian delta_h over the whole h (every
    position and channel), scaled to the direction's own ||delta_h|| there (``relative`` None) or to
    ``relative * ||h||``. Needs the direction's records ``h_shape``, ``sigmas``, ``family``, ``h_norm``
    and ``delta_over_h`` (trained and example directions carry them)."""
    meta = direction.meta
    for key in ("h_shape", "sigmas", "family", "h_norm", "delta_over_h"):
        if key not in meta:
            raise CodeError(f"the direction does not record {key!r}; make it again with this version to get a "
                            "Gaussian control")
    h_shape = tuple(int(v) for v in meta["h_shape"])
    levels = [noise_level(float(s), meta["family"]) for s in meta["sigmas"][:-1]]
    term = GlobalDelta(h_shape, levels)
    gen = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    with torch.no_grad():
        for i, (hn, r) in enumerate(zip(meta["h_norm"], meta["delta_over_h"])):
            z = torch.randn(h_shape, generator=gen, dtype=torch.float64)
            size = float(hn) * (float(r) if relative is None else float(relative))
            term.delta[i] = (z / z.norm() * size).to(term.delta.dtype)
    term.requires_grad_(False)
    what = "the direction's norm" if relative is None else f"{relative:g} ||h||"
    return Direction([term], [1.0], dict(meta, source_text="control",
                                         target_text=f"Gaussian delta_h at {what} (seed {seed})",
                                         kind="gaussian control"))


# ---------------------------------------------------------------- training

def directional_clip_loss(img_emb: torch.Tensor, src_img_emb: torch.Tensor, text_dir: torch.Tensor) -> torch.Tensor:
    """-log((1 + cos)/2) per image, cos between (E(edit) - E(source)) and the text direction."""
    img_dir = F.normalize(img_emb - src_img_emb, dim=-1)
    cos = (img_dir * F.normalize(text_dir, dim=-1)).sum(-1)
    return -torch.log(((1.0 + cos) / 2.0).clamp_min(1e-6))


@dataclass
class TrainTrace:
    losses: list = field(default_factory=list)       # mean total loss per iteration
    clip_losses: list = field(default_factory=list)  # mean directional CLIP loss per iteration
    l1_losses: list = field(default_factory=list)
    held_out_before: Optional[float] = None          # mean directional CLIP loss on held-out images
    held_out_after: Optional[float] = None


def _chain(plain: Denoiser, edited_with, module: nn.Module, x_T: torch.Tensor, src_emb: torch.Tensor,
           sigmas: list, family: str, n_edit: int, embed_images, text_dir, clip_weight: float, l1_weight: float,
           opt=None, step_done=None) -> tuple[float, float, float]:
    """Run the first ``n_edit`` steps from ``x_T`` with the asymmetric step; at each one the loss of
    P_t (and, with ``opt``, one optimiser step). Returns mean (total, clip, l1) over the steps.

    The L1 target is the official one: P_t of a separate plain (source) chain from the same x_T,
    so drift the edited chain has already accumulated is penalised too."""
    x, x_src = x_T, x_T
    tot = cl = l1s = 0.0
    for i in range(n_edit):
        a, b, _c = step_coefficients(sigmas[i], sigmas[i + 1], 0.0, family)
        xs = x.detach()
        with torch.no_grad():
            d = plain(xs, sigmas[i])
            d_src = d if i == 0 else plain(x_src, sigmas[i])
        with torch.set_grad_enabled(opt is not None):
            p = edited_with(xs, sigmas[i], module)
            clip_l = directional_clip_loss(embed_images(p), src_emb, text_dir).mean()
            l1 = (p - d_src).abs().mean()
            loss = clip_weight * clip_l + l1_weight * l1
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            x = _edit_term(a * xs + b * d, p.detach(), d, sigmas[i + 1], family)
            x_src = a * x_src + b * d_src
        tot, cl, l1s = tot + float(loss.detach()), cl + float(clip_l.detach()), l1s + float(l1.detach())
        if step_done is not None:
            step_done(float(loss.detach()))
    return tot / n_edit, cl / n_edit, l1s / n_edit


def evaluate_direction(plain: Denoiser, edited_with, module: nn.Module, x0: torch.Tensor, sigmas: torch.Tensor,
                       family: str, embed_images, text_dir: torch.Tensor, t_edit: float) -> float:
    """Mean directional CLIP loss of P_t over [T, t_edit] on images ``x0`` (DDIM-inverted), no update.

    With an untrained (zero) direction this is the loss of the plain model's P_t: the baseline."""
    s = [float(v) for v in sigmas]
    n_edit = edited_steps(len(s) - 1, t_edit)
    with torch.no_grad():
        x_T = ddim_invert(plain, x0, sigmas, family)
        src = embed_images(x0)
        return _chain(plain, edited_with, module, x_T, src, s, family, n_edit, embed_images, text_dir, 1.0, 0.0)[1]


def train_direction(plain: Denoiser, edited_with: Callable[[torch.Tensor, float, nn.Module], torch.Tensor],
                    module: nn.Module, x0: torch.Tensor, sigmas: torch.Tensor, family: str,
                    embed_images: Callable[[torch.Tensor], torch.Tensor], text_dir: torch.Tensor,
                    t_edit: float, iterations: int, learning_rate: float, clip_weight: float = 1.0,
                    l1_weight: float = 3.0, batch_size: int = 1, seed: int = 0,
                    progress: Optional[Callable[[int, int, float], None]] = None,
                    held_out: Optional[torch.Tensor] = None, text_cosine: float = 1.0,
                    lr_step: int = 3, lr_gamma: float = 0.1) -> TrainTrace:
    """Train ``module`` (f_t or a global delta) the way Asyrp does.

    ``embed_images(latents) -> (B, D)`` unit CLIP image embeddings of the
    decoded latents (differentiable).  The training latents are inverted with
    deterministic DDIM; then, per iteration and per image batch, the chain is
    run from x_T: at each step inside [T, t_edit] one asymmetric step on the
    detached x_t gives P_t (with gradient into ``module`` only) and the plain
    step gives d; the loss ``clip_weight * -log((1+cos)/2) + l1_weight *
    text_cosine * |P_t - P_t(source chain)|`` takes one SGD step, and the chain
    goes on from the detached asymmetric result, so no gradient crosses
    timesteps.  As the official code: the L1 target is the P_t of a separate
    plain chain from the same x_T, the L1 is weighted by ``text_cosine`` (the
    cosine of the two texts' embeddings: a small edit keeps more), and the
    learning rate falls by ``lr_gamma`` every ``lr_step`` iterations (StepLR).
    ``held_out`` latents, if given, are scored with ``evaluate_direction``
    before and after."""
    if iterations < 1:
        raise CodeError(f"iterations must be >= 1, got {iterations}")
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise CodeError(f"learning_rate must be > 0, got {learning_rate}")
    s = [float(v) for v in sigmas]
    steps = len(s) - 1
    n_edit = edited_steps(steps, t_edit)
    if n_edit == 0:
        raise CodeError(f"t_edit {t_edit} leaves no step to edit; lower it (the paper edits about half the chain)")
    trace = TrainTrace()
    if held_out is not None:
        trace.held_out_before = evaluate_direction(plain, edited_with, module, held_out, sigmas, family,
                                                   embed_images, text_dir, t_edit)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=float(learning_rate))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(int(lr_step), 1), gamma=float(lr_gamma))
    l1_weight = float(l1_weight) * float(text_cosine)
    with torch.no_grad():
        x_T = ddim_invert(plain, x0, sigmas, family)
        src_emb = embed_images(x0).detach()
    order_gen = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    n_batches = math.ceil(x0.shape[0] / batch_size)
    total, done = iterations * n_edit * n_batches, [0]

    def step_done(loss):
        done[0] += 1
        if progress is not None:
            progress(done[0], total, loss)

    for _it in range(iterations):
        perm = torch.randperm(x0.shape[0], generator=order_gen).tolist()
        sums = [0.0, 0.0, 0.0]
        for start in range(0, len(perm), batch_size):
            idx = perm[start:start + batch_size]
            res = _chain(plain, edited_with, module, x_T[idx], src_emb[idx], s, family, n_edit, embed_images,
                         text_dir, clip_weight, l1_weight, opt=opt, step_done=step_done)
            sums = [a + b for a, b in zip(sums, res)]
        trace.losses.append(sums[0] / n_batches)
        trace.clip_losses.append(sums[1] / n_batches)
        trace.l1_losses.append(sums[2] / n_batches)
        sched.step()
    if held_out is not None:
        trace.held_out_after = evaluate_direction(plain, edited_with, module, held_out, sigmas, family,
                                                  embed_images, text_dir, t_edit)
    return trace


# ---------------------------------------------------------------- the editing interval by measure

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class IntervalCurves:
    """The two curves the paper picks its interval from, one value per step of the chain.

    ``positions[i] = 1 - i/N`` is where step ``i`` starts (1 = T).  ``to_prediction[i]`` is the
    mean distance(x0, P_t) with P_t the plain model's predicted x0 at the start of step ``i`` of the
    deterministic DDIM chain from the DDIM-inverted x_T; ``to_noisy[i]`` the mean distance(x0, x_t)
    with x_t = alpha x0 + sigma n the forward-noised image at the level where that step starts (fresh
    seeded noise n: the quantity is how much noise x_t holds, which quality boosting is about; the
    DDIM-inverted chain keeps x0's structure in its "noise" and is not monotone), taken in
    variance-preserving scale (the paper's
    ``sqrt(abar) x0 + sqrt(1 - abar) n``: ``x / sqrt(1 + sigma^2)`` for the ``ve`` family, ``x`` itself
    for ``flow``), so that x_T compares as pure noise, not as noise of size sigma_max.
    ``per_image_*`` keep the per-image values (one row of n per step)."""

    positions: list
    to_prediction: list
    to_noisy: list
    per_image_prediction: list = field(default_factory=list)
    per_image_noisy: list = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.positions)

    @property
    def n(self) -> int:
        return len(self.per_image_prediction[0]) if self.per_image_prediction else 0


def vp_scale(sigma: float, family: str) -> float:
    """Factor that brings a latent at ``sigma`` to variance-preserving scale (signal + noise ~ 1)."""
    check_family(family)
    return 1.0 / math.sqrt(1.0 + float(sigma) ** 2) if family == "ve" else 1.0


def interval_curves(plain: Denoiser, x0: torch.Tensor, sigmas: torch.Tensor, family: str, distance: Distance,
                    callback=None, seed: int = 0) -> IntervalCurves:
    """Measure distance(x0, P_t) along the plain DDIM chain (eta = 0) that starts at the DDIM
    inversion of ``x0``, and distance(x0, x_t) for x_t forward-noised with noise drawn from ``seed``
    (on the CPU: the same bits on every device).  ``distance(a, b) -> (B,)`` compares two batches
    of latents (e.g. LPIPS of their decoded images); no edit is applied anywhere."""
    s = [float(v) for v in sigmas]
    steps = len(s) - 1
    gen = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(x0.device, x0.dtype)
    with torch.no_grad():
        x = ddim_invert(plain, x0, sigmas, family)
        pos, to_p, to_x, per_p, per_x = [], [], [], [], []
        for i in range(steps):
            d = plain(x, s[i])
            dp = distance(x0, d).detach().float().flatten().cpu()
            x_t = (alpha(s[i], family) * x0 + s[i] * noise) * vp_scale(s[i], family)
            dx = distance(x0, x_t).detach().float().flatten().cpu()
            pos.append(1.0 - i / steps)
            to_p.append(float(dp.mean()))
            to_x.append(float(dx.mean()))
            per_p.append(dp.tolist())
            per_x.append(dx.tolist())
            a, b, _c = step_coefficients(s[i], s[i + 1], 0.0, family)
            x = a * x + b * d
            if callback is not None:
                callback(i, d, x, steps)
    return IntervalCurves(pos, to_p, to_x, per_p, per_x)


def first_reaching(values: Sequence[float], threshold: float) -> Optional[int]:
    """Index ``i`` of the step where the curve first reaches ``threshold`` scanning from t = 0 upward
    (i.e. from the last step back to the first), or None if it never does."""
    for i in range(len(values) - 1, -1, -1):
        if float(values[i]) >= float(threshold):
            return i
    return None


def interval_from_curves(curves: IntervalCurves, edit_threshold: float,
                         boost_threshold: float) -> tuple[float, float, list]:
    """(t_edit, t_boost, notes) as fractions in this module's convention.

    The paper edits every t >= t_edit and boosts every t < t_boost, where t_edit (t_boost) is the
    first t, scanning up from 0, where distance(x0, P_t) (distance(x0, x_t)) reaches its threshold.
    With the crossing at step ``i`` both come out as ``1 - (i + 1)/N``, the end of that step: step
    ``i`` is then edited (start above t_edit) and not boosted, every later step is boosted.
    A curve that never reaches its threshold gives t_edit = 0 (edit the whole chain) and
    t_boost = 1 (boost the whole chain), with a note saying so."""
    n = curves.steps
    if n < 1:
        raise CodeError("the curves are empty: at least one step is needed")
    notes = []
    i = first_reaching(curves.to_prediction, edit_threshold)
    if i is None:
        t_edit = 0.0
        notes.append(f"distance(x0, P_t) never reaches {edit_threshold:.4g} (max {max(curves.to_prediction):.4g}): "
                     "t_edit = 0 edits the whole chain")
    else:
        t_edit = 1.0 - (i + 1) / n
    j = first_reaching(curves.to_noisy, boost_threshold)
    if j is None:
        t_boost = 1.0
        notes.append(f"distance(x0, x_t) never reaches {boost_threshold:.4g} (max {max(curves.to_noisy):.4g}): "
                     "t_boost = 1 boosts the whole chain; set t_boost 0 in Asyrp Edit to keep it off")
    else:
        t_boost = 1.0 - (j + 1) / n
    return t_edit, t_boost, notes


def bootstrap_interval(curves: IntervalCurves, thresholds: Callable[[IntervalCurves], tuple[float, float]],
                       reps: int = 1000, seed: int = 0) -> dict:
    """95 % percentile-bootstrap intervals of t_edit and t_boost over the images.

    Each replicate resamples the n images with replacement, averages their per-image curves,
    recomputes the thresholds with ``thresholds(curves) -> (edit, boost)`` (they may depend on the
    curves, e.g. on their value at T) and picks t as ``interval_from_curves`` does."""
    per_p = torch.tensor(curves.per_image_prediction, dtype=torch.float64)  # (steps, n)
    per_x = torch.tensor(curves.per_image_noisy, dtype=torch.float64)
    n = per_p.shape[1] if per_p.dim() == 2 else 0
    if n < 2:
        raise CodeError("a bootstrap over images needs at least 2 images")
    gen = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    edits, boosts = [], []
    for _ in range(int(reps)):
        idx = torch.randint(0, n, (n,), generator=gen)
        c = IntervalCurves(list(curves.positions), per_p[:, idx].mean(1).tolist(), per_x[:, idx].mean(1).tolist())
        te, tb, _ = interval_from_curves(c, *thresholds(c))
        edits.append(te)
        boosts.append(tb)

    def ci(v):
        s = sorted(v)
        return [s[int(0.025 * (len(s) - 1))], s[int(round(0.975 * (len(s) - 1)))]]
    return {"t_edit": ci(edits), "t_boost": ci(boosts), "reps": int(reps), "n": n}
