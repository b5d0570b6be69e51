# SPDX-License-Identifier: GPL-3.0-or-later
"""Plug-and-play guidance in the latent code: Langevin dynamics on ``z``.

Target density (Wu & De la Torre, ICCV 2023)::

    p(z | C)  proportional to  N(z; 0, I) · exp(-E(G(z) | C))

with ``G`` the replay chain of a ``LatentCode`` followed by a decoder, and
``E`` an energy that already carries its weight lambda.  Each step::

    z <- z - (step / 2) * grad_z [ ½|z|² + E(G(z)) ] + sqrt(step) * w,   w ~ N(0, I)

``z`` is the standardised part of the code: ``start_noise`` (the start latent
is ``start_mean + start_scale * start_noise``, so its prior is
``N(start_mean, start_scale²)``: around the encoded image for a code from DPM
Encode, around 0 for a code from the prior) and, unless only the start is
updated, every per-step noise.  The final residual of an encoded code is not
Gaussian and stays fixed.

Memory: the chain runs forward without a graph, keeping only the latent of
every step; the backward pass then walks the steps in reverse, recomputing one
step at a time with autograd and pulling the gradient through it
(per-step checkpointing done by hand).  Peak memory is one network call plus
``steps`` latents, and the recomputation may batch its model calls differently
from the forward pass (ComfyUI decides that from free memory) without harm,
which ``torch.utils.checkpoint`` would refuse.  The energy's own gradient comes
from its ``value_and_grad`` when it has one (the CLIP energy back-propagates its
augmented copies in chunks).

Masked codes (a mask from DPM Encode's ``noise_mask``): the chain is the masked
replay (every state outside the mask is the source's, see ``samplers.dpm_encoder``),
so the energy's gradient reaches only the masked region, and the components of
``z`` where the mask is exactly 0 are held fixed (they cannot change the image;
they stay the encoded ones, so the code still replays the source there under
any later mask).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from ..samplers.dpm_encoder import LatentCode, blend, step_coefficients
from ..samplers.types import Denoiser
from .clip_energy import energy_value_and_grad

UPDATE_MODES = ("all", "start")

Decoder = Callable[[torch.Tensor], torch.Tensor]
Energy = Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]


def stream_seed(seed: int, stream: int) -> int:
    """A 63-bit seed for random stream ``stream`` of ``seed`` (splitmix64 of both), so that
    Langevin's noise is independent of codes drawn with ``torch.Generator().manual_seed(seed)``."""
    mask = 0xFFFF_FFFF_FFFF_FFFF
    z = (int(seed) * 0x9E3779B97F4A7C15 + (stream + 1) * 0xD1B54A32D192ED03) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & 0x7FFF_FFFF_FFFF_FFFF


def chain_value_and_grad(denoise: Denoiser, decode: Decoder, energy: Energy, code: LatentCode,
                         start_noise: torch.Tensor, noises: torch.Tensor, generator=None,
                         noise_grad: bool = True, checkpoint: bool = True,
                         check: Optional[Callable[[], None]] = None):
    """Energy of ``decode(replay(code with these noises))`` and its gradient w.r.t. the noises.

    Returns ``(energy (B,), images, grad_start_noise, grad_noises or None)``, all detached.
    Per-step checkpointing by hand (see module doc); ``checkpoint=False`` keeps the whole graph.
    ``check()`` is called before every chain step of the forward and of the backward walk (a
    host raises from it to cancel: ComfyUI's interrupt).
    """
    check = check or (lambda: None)
    if not checkpoint:
        with torch.enable_grad():
            zs = start_noise.detach().requires_grad_(True)
            zn = noises.detach().requires_grad_(noise_grad)
            images = decode(replay_differentiable(denoise, code, zs, zn, check))
        e, g_img = _energy_value_and_grad(energy, images, generator)
        wrt = [zs, zn] if noise_grad else [zs]
        grads = torch.autograd.grad(images, wrt, g_img, allow_unused=True)
        grads = [torch.zeros_like(w) if gr is None else gr for gr, w in zip(grads, wrt)]
        if not all(bool(torch.isfinite(gr).all()) for gr in grads):
            raise FloatingPointError("the gradient through the chain became NaN/infinite (the whole chain's graph "
                                     "was kept, so the step is not known: memory 'low' names it)")
        return e, images.detach(), grads[0], (grads[1] if noise_grad else None)
    s = [float(v) for v in code.sigmas]
    steps = len(s) - 1
    coeffs = [step_coefficients(s[i], s[i + 1], code.eta, code.family) for i in range(steps)]
    m = code.mask
    xs = []   # the latent before every step, kept for the backward walk
    with torch.no_grad():
        x = replay_differentiable(denoise, code, start_noise, noises, check, states=xs)
    with torch.enable_grad():
        x_last = x.detach().requires_grad_(True)
        images = decode(x_last)
    e, g_img = _energy_value_and_grad(energy, images, generator)
    (g,) = torch.autograd.grad(images, x_last, g_img)
    g_noises = torch.zeros_like(noises) if noise_grad else None
    mg = None if m is None else m.to(device=g.device, dtype=g.dtype)
    for i in reversed(range(steps)):
        check()
        a, b, c = coeffs[i]
        if mg is not None:  # x_{i+1} = m * step(x_i) + (1 - m) * source
            g = g * mg
        with torch.enable_grad():
            xi = xs[i].detach().requires_grad_(True)
            d = denoise(xi, s[i])
            # x_{i+1} = a x_i + b d(x_i) + c eps_i  (or d + residual on the last step)
            (gd,) = torch.autograd.grad(d, xi, g * (1.0 if c == 0.0 else b))
        if noise_grad and c != 0.0:
            g_noises[i] = c * g
        g = gd if c == 0.0 else a * g + gd
        if not torch.isfinite(g).all():
            raise FloatingPointError(f"the gradient became NaN/infinite at chain step {i + 1} of {steps}")
    if mg is not None:
        g = g * mg
    return e, images.detach(), code.start_scale * g, g_noises


def _energy_value_and_grad(energy: Energy, images: torch.Tensor, generator):
    e, g_img = energy_value_and_grad(energy, images, generator)
    if not torch.isfinite(e).all() or not torch.isfinite(g_img).all():
        raise FloatingPointError("the energy or its gradient is NaN/infinite")
    return e, g_img


def replay_differentiable(denoise: Denoiser, code: LatentCode, start_noise: torch.Tensor,
                          noises: torch.Tensor, check: Optional[Callable[[], None]] = None,
                          states: Optional[list] = None) -> torch.Tensor:
    """The sampler of ``samplers.replay`` as a function of the noises. Under grad, autograd goes through
    every step (keeps every activation: the reference that ``chain_value_and_grad`` is tested against, and
    its path when the whole graph is kept); under no_grad it is the forward pass of the checkpointed path,
    which collects the latent before each step in ``states``. ``check()`` runs before every step; a NaN
    prediction names its step."""
    m, traj = code.mask, code.trajectory
    x = blend(m, code.start_mean + code.start_scale * start_noise, None if m is None else traj[0])
    s = [float(v) for v in code.sigmas]
    steps = len(s) - 1
    for i in range(steps):
        if check is not None:
            check()
        if states is not None:
            states.append(x)
        a, b, c = step_coefficients(s[i], s[i + 1], code.eta, code.family)
        d = denoise(x, s[i])
        if not bool(torch.isfinite(d.detach()).all()):
            raise FloatingPointError(f"the model's prediction became NaN/infinite at chain step {i + 1} of {steps}")
        x = d + code.residual if c == 0.0 else a * x + b * d + c * noises[i]
        x = blend(m, x, None if m is None else traj[i + 1])
    return x


@dataclass
class LangevinTrace:
    """Per-step values, each a list over steps of per-sample floats."""

    energy: list[list[float]] = field(default_factory=list)
    prior: list[list[float]] = field(default_factory=list)   # |z|² / dim: about 1 in the typical set
    dim: int = 0
    gradient: str = ""   # how the host took the gradient through the chain (recomputed or kept), for the log


def langevin(denoise: Denoiser, decode: Decoder, energy: Energy, code: LatentCode, steps: int,
             step_size: float, seed: int, update: str = "all", checkpoint: bool = True,
             callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
             check: Optional[Callable[[], None]] = None) -> tuple[LatentCode, LangevinTrace]:
    """Sample ``z`` from ``N(0, I) exp(-E(G(z)))``; returns the new code and a trace.

    ``callback(step, images, energy)`` is called after each energy evaluation; ``check()``
    before every chain step, forward and backward (raise from it to cancel).  Neither ``code``
    nor ``energy`` is modified.
    """
    if update not in UPDATE_MODES:
        raise ValueError(f"update must be one of {UPDATE_MODES}, got {update!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not (step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"step_size must be a positive number, got {step_size}")
    # Streams of their own: a code drawn or encoded with the same seed must not share its
    # noise with the Langevin noise (the first step would then add the code to itself).
    gen = torch.Generator().manual_seed(stream_seed(seed, 1))
    aug_gen = torch.Generator().manual_seed(stream_seed(seed, 2))
    z_start = code.start_noise.detach().clone()
    z_noise = code.noises.detach().clone()
    batch = z_start.shape[0]
    dim = z_start[0].numel() + (z_noise[:, 0].numel() if update == "all" else 0)
    trace = LangevinTrace(dim=dim)
    root = math.sqrt(step_size)
    # components where the mask is 0 cannot move the image: keep them (module doc)
    frozen = None if code.mask is None else (code.mask == 0).to(z_start.device)

    def randn_like(t):
        return torch.randn(t.shape, generator=gen, dtype=torch.float32).to(device=t.device, dtype=t.dtype)

    for k in range(steps):
        try:
            e, images, g_start, g_noise = chain_value_and_grad(
                denoise, decode, energy, code, z_start, z_noise, aug_gen, noise_grad=(update == "all"),
                checkpoint=checkpoint, check=check)
        except FloatingPointError as err:
            raise FloatingPointError(
                f"Langevin step {k + 1}: {err}. The model or VAE probably overflowed in half precision; "
                "run them in float32/bfloat16 or lower the energy's weight or the step size.") from None
        if e.shape != (batch,):
            raise ValueError(f"the energy must return one value per image, got shape {tuple(e.shape)}")
        with torch.no_grad():
            prior = z_start.flatten(1).pow(2).sum(1)
            if update == "all":
                prior = prior + z_noise.transpose(0, 1).flatten(1).pow(2).sum(1)
            trace.energy.append([float(v) for v in e])
            trace.prior.append([float(v) / dim for v in prior])
            if callback is not None:
                callback(k, images, e)
            new_start = z_start - 0.5 * step_size * (z_start + g_start) + root * randn_like(z_start)
            z_start = new_start if frozen is None else torch.where(frozen, z_start, new_start)
            if update == "all":
                new_noise = z_noise - 0.5 * step_size * (z_noise + g_noise) + root * randn_like(z_noise)
                z_noise = new_noise if frozen is None else torch.where(frozen, z_noise, new_noise)
    new = replace(code, start_noise=z_start.detach(), noises=z_noise.detach())
    return new, trace
