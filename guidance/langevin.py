# SPDX-License-Identifier: GPL-3.0-or-later
"""Plug-and-play guidance in the latent code: Langevin dynamics on ``z``.

Target density (Wu & De la Torre, ICCV 2023)::

    p(z | C)  ∝  N(z; 0, I) · exp(-E(G(z) | C))

with ``G`` the replay chain of a ``LatentCode`` followed by a decoder, and
``E`` an energy that already carries its weight λ.  Each step::

    z <- z - (step / 2) * grad_z [ ½‖z‖² + E(G(z)) ] + sqrt(step) * ω,   ω ~ N(0, I)

``z`` is the standardised part of the code: ``start_noise`` (the start latent
is ``start_mean + start_scale * start_noise``, so its prior is
``N(start_mean, start_scale²)``: around the encoded image for a code from DPM
Encode, around 0 for a code from the prior) and, unless only the start is
updated, every per-step noise.  The final residual of an encoded code is not
Gaussian and stays fixed.

Memory: every denoiser call of the chain runs under non-reentrant activation
checkpointing, so the backward pass keeps one latent per step (not the
network's activations) and recomputes each call once; peak memory is one
network call plus ``steps`` latents.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..samplers.dpm_encoder import LatentCode, step_coefficients

UPDATE_MODES = ("all", "start")

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
Decoder = Callable[[torch.Tensor], torch.Tensor]
Energy = Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]


class ScaledEnergy:
    """``weight * energy``; keeps ``components`` for plotting."""

    def __init__(self, energy, weight: float):
        self.energy = energy
        self.weight = float(weight)

    def __call__(self, images, generator=None):
        return self.weight * self.energy(images, generator)

    def components(self, images, generator=None):
        parts = getattr(self.energy, "components", None)
        if parts is None:
            return [("energy", self(images, generator))]
        return [(n, self.weight * v) for n, v in parts(images, generator)]

    def to(self, device=None, dtype=None):
        if hasattr(self.energy, "to"):
            self.energy.to(device, dtype)
        return self


class SumEnergy:
    """Sum of energies, each already weighted."""

    def __init__(self, energies: Sequence):
        if len(energies) < 1:
            raise ValueError("SumEnergy needs at least one energy")
        self.energies = list(energies)

    def __call__(self, images, generator=None):
        return sum(e(images, generator) for e in self.energies)

    def to(self, device=None, dtype=None):
        for e in self.energies:
            if hasattr(e, "to"):
                e.to(device, dtype)
        return self


def replay_differentiable(denoise: Denoiser, code: LatentCode, start_noise: torch.Tensor,
                          noises: torch.Tensor, use_checkpoint: bool = True) -> torch.Tensor:
    """The sampler of ``samplers.replay`` with autograd through every step.

    ``start_noise`` and ``noises`` replace the code's own (they may require grad).
    """
    x = code.start_mean + code.start_scale * start_noise
    s = [float(v) for v in code.sigmas]
    for i in range(len(s) - 1):
        a, b, c = step_coefficients(s[i], s[i + 1], code.eta, code.family)
        sigma = s[i]
        if use_checkpoint and torch.is_grad_enabled() and x.requires_grad:
            d = _checkpoint(lambda t, _s=sigma: denoise(t, _s), x, use_reentrant=False)
        else:
            d = denoise(x, sigma)
        x = d + code.residual if c == 0.0 else a * x + b * d + c * noises[i]
    return x


@dataclass
class LangevinTrace:
    """Per-step values, each a list over steps of per-sample floats."""

    energy: list[list[float]] = field(default_factory=list)
    prior: list[list[float]] = field(default_factory=list)   # ‖z‖² / dim: ≈ 1 in the typical set
    dim: int = 0


def langevin(denoise: Denoiser, decode: Decoder, energy: Energy, code: LatentCode, steps: int,
             step_size: float, seed: int, update: str = "all", use_checkpoint: bool = True,
             callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None
             ) -> tuple[LatentCode, LangevinTrace]:
    """Sample ``z`` from ``N(0, I) exp(-E(G(z)))``; returns the new code and a trace.

    ``callback(step, images, energy)`` is called after each energy evaluation.
    """
    if update not in UPDATE_MODES:
        raise ValueError(f"update must be one of {UPDATE_MODES}, got {update!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not (step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"step_size must be a positive number, got {step_size}")
    gen = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    aug_gen = torch.Generator().manual_seed((int(seed) + 0x9E3779B9) & 0xFFFF_FFFF_FFFF_FFFF)
    z_start = code.start_noise.detach().clone()
    z_noise = code.noises.detach().clone()
    batch = z_start.shape[0]
    dim = z_start[0].numel() + (z_noise[:, 0].numel() if update == "all" else 0)
    trace = LangevinTrace(dim=dim)
    root = math.sqrt(step_size)

    def randn_like(t):
        return torch.randn(t.shape, generator=gen, dtype=torch.float32).to(device=t.device, dtype=t.dtype)

    for k in range(steps):
        with torch.enable_grad():
            zs = z_start.requires_grad_(True)
            zn = z_noise.requires_grad_(update == "all")
            images = decode(replay_differentiable(denoise, code, zs, zn, use_checkpoint))
            e = energy(images, aug_gen)
            if e.shape != (batch,):
                raise ValueError(f"the energy must return one value per image, got shape {tuple(e.shape)}")
            wrt = [zs, zn] if update == "all" else [zs]
            grads = torch.autograd.grad(e.sum(), wrt, allow_unused=True)
        grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
        with torch.no_grad():
            prior = zs.detach().flatten(1).pow(2).sum(1)
            if update == "all":
                prior = prior + zn.detach().transpose(0, 1).flatten(1).pow(2).sum(1)
            trace.energy.append([float(v) for v in e.detach()])
            trace.prior.append([float(v) / dim for v in prior])
            if callback is not None:
                callback(k, images.detach(), e.detach())
            z_start = zs.detach() - 0.5 * step_size * (zs.detach() + grads[0]) + root * randn_like(zs)
            if update == "all":
                z_noise = zn.detach() - 0.5 * step_size * (zn.detach() + grads[1]) + root * randn_like(zn)
            else:
                z_noise = zn.detach()
    new = replace(code, start_noise=z_start.detach(), noises=z_noise.detach())
    return new, trace
