# SPDX-License-Identifier: GPL-3.0-or-later
"""DPM-Encoder (Wu & De la Torre, ICCV 2023) over a sigma-space denoiser.

Everything here is plain torch.  A *denoiser* is any callable
``denoise(x, sigma) -> x0_hat`` where ``x`` is a batch of noisy latents and
``sigma`` a Python float; classifier-free guidance, LoRAs and model patches
live inside it.

Families
--------
A family fixes how a clean latent ``x0`` is noised to level ``sigma``::

    x_sigma = alpha(sigma) * x0 + sigma * n,      n ~ N(0, I)

* ``"ve"``   : alpha = 1           (epsilon- and v-prediction models in
               ComfyUI's sigma space, k-diffusion's convention)
* ``"flow"`` : alpha = 1 - sigma   (rectified-flow models: SD3, Flux, ...)

The stochastic sampler and its forward posterior
------------------------------------------------
Divide by alpha: ``y = x / alpha = x0 + lam * n`` with ``lam = sigma / alpha``.
In ``y`` every family is the variance-exploding process, so DDIM with
parameter eta is the ancestral step of k-diffusion::

    lam_up   = eta * lam_t * sqrt(1 - (lam_t / lam_s)**2)     (<= lam_t)
    lam_down = sqrt(lam_t**2 - lam_up**2)
    y_t = y_s + (lam_down - lam_s) * (y_s - d) / lam_s + lam_up * eps

(``d`` the denoised prediction; ``lam_up`` is DDIM's
``eta * sqrt((1-abar_t)/(1-abar_s) * (1-abar_s/abar_t))`` rewritten with
``abar = 1/(1+lam**2)``).  Multiplying back by ``alpha_t`` gives, for every
family, one linear step::

    x_t = A * x_s + B * d + C * eps
    C = alpha_t * lam_up = eta * sigma_t * sqrt(1 - r**2),  r = lam_t / lam_s
    A = sqrt(sigma_t**2 - C**2) / sigma_s
    B = alpha_t - alpha_s * A

written without ``lam`` so that ``sigma_s = 1`` (``alpha_s = 0``, the start of
a flow chain) needs no special case (``r = 0`` there).  For ``"ve"`` this is
exactly ComfyUI's ``get_ancestral_step(sigma_s, sigma_t, eta)`` Euler step.
For ``"flow"`` it is DDIM-eta of the flow schedule; note that ComfyUI's
``euler_ancestral_RF`` uses another eta convention (same marginals, different
noise split), so eta here means the same thing on every family.

Forward posterior.  If ``x_s ~ q(x_s | x0)`` and we take the step with
``d = x0`` then ``x_t - alpha_t x0 = A (x_s - alpha_s x0) + C eps`` has
variance ``A**2 sigma_s**2 + C**2 = sigma_t**2``: the step with the true x0
*is* a draw from ``q(x_t | x_s, x0)`` that keeps the marginals.  So the
encoder draws ``x_t = A x_s + B x0 + C xi`` and solves the sampler's noise::

    eps = (x_t - A x_s - B d) / C = xi + B (x0 - d) / C

The last step goes to ``sigma = 0``: ``A = 0, B = 1, C = 0``, the sampler
returns ``d`` and there is no noise to solve for; the code carries the
residual ``x0 - d`` instead so that replay lands exactly on ``x0``.

The latent code
---------------
``z = start ⊕ eps_0 ⊕ ... ⊕ eps_{N-2} ⊕ residual`` where the start latent is
``x_start = start_mean + start_scale * start_noise``.  For an encoded image
``start_mean = alpha_0 x0`` and ``start_scale = sigma_0`` (the true marginal
``q(x_start | x0)``); for a code drawn from the prior ``start_mean = 0`` and
``start_scale = sqrt(alpha_0**2 + sigma_0**2)`` (unit-variance data, the same
as ComfyUI's txt2img start).  ``start_noise`` and every ``eps`` are standard
normal under the prior.

The encoder advances with the *replayed* ``x_t = A x_s + B d + C eps``
rather than the posterior draw: the two differ only by rounding, and this
way replay with the same denoiser retraces the encoder's floats exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

FAMILIES = ("ve", "flow")

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
# callback(step_index, denoised, x, total_steps)
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, int], None]


class CodeError(ValueError):
    """A latent code, a schedule or an argument that cannot be used."""


def alpha(sigma: float, family: str) -> float:
    """Signal scale of the family at noise level ``sigma``."""
    if family == "ve":
        return 1.0
    if family == "flow":
        return 1.0 - sigma
    raise CodeError(f"family must be one of {FAMILIES}, got {family!r}")


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise CodeError(f"family must be one of {FAMILIES}, got {family!r}")
    return family


def step_coefficients(sigma_from: float, sigma_to: float, eta: float, family: str) -> tuple[float, float, float]:
    """``(A, B, C)`` of the step ``x_t = A x_s + B d + C eps`` (see module doc)."""
    s, t = float(sigma_from), float(sigma_to)
    if not (t < s):
        raise CodeError(f"sigmas must decrease strictly, got a step from {s} to {t}")
    if t < 0:
        raise CodeError(f"sigmas must be >= 0, got {t}")
    if family == "flow" and s > 1.0 + 1e-6:
        raise CodeError(f"a flow model's sigmas lie in [0, 1], got {s}")
    a_s, a_t = alpha(s, family), alpha(t, family)
    if t == 0.0:
        return 0.0, a_t, 0.0
    r = (t * a_s) / (a_t * s)  # lam_t / lam_s, in [0, 1)
    c = min(t, eta * t * math.sqrt(max(0.0, 1.0 - r * r)))
    a = math.sqrt(max(0.0, t * t - c * c)) / s
    b = a_t - a_s * a
    return a, b, c


def check_schedule(sigmas: torch.Tensor, eta: float, family: str) -> list[float]:
    """Validate a sigma schedule for encoding; returns it as Python floats."""
    check_family(family)
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1:
        raise CodeError("sigmas must be a 1-D tensor")
    s = [float(v) for v in sigmas.detach().cpu().double()]
    if len(s) < 2:
        raise CodeError(
            f"the sigma schedule has {len(s)} value(s); it needs at least 2 (one step). "
            "Raise steps or denoise.")
    if not all(math.isfinite(v) for v in s):
        raise CodeError("the sigma schedule contains NaN or infinity")
    if s[-1] != 0.0:
        raise CodeError(
            f"the sigma schedule must end at 0 so that the chain lands on the image, it ends at {s[-1]:.4g}. "
            "Use a full schedule (BasicScheduler / KSampler-style) rather than a split one.")
    if not (eta > 0.0) or not math.isfinite(eta):
        raise CodeError(
            f"eta must be > 0 for a stochastic sampler (got {eta}); eta = 0 is deterministic DDIM and "
            "leaves no noise to encode. The paper uses eta = 0.1.")
    for i in range(len(s) - 1):
        try:
            _a, _b, c = step_coefficients(s[i], s[i + 1], eta, family)
            if s[i + 1] > 0.0 and not c > 0.0:
                raise CodeError(f"no noise is injected from sigma {s[i]} to {s[i + 1]} (the sigmas are too "
                                "close or eta too small)")
        except CodeError as e:
            hint = (" The scheduler repeated a sigma: use fewer steps or another scheduler."
                    if s[i + 1] == s[i] else "")
            raise CodeError(f"step {i + 1} of {len(s) - 1}: {e}.{hint}") from None
    return s


@dataclass
class LatentCode:
    """The full random code of the stochastic sampler (see module doc).

    Tensors are in the model's latent space (after ``process_latent_in``),
    batch first; ``noises`` is ``(steps - 1, *shape)``.
    """

    sigmas: torch.Tensor          # (steps + 1,) float64, ends at 0
    eta: float
    family: str
    start_mean: torch.Tensor      # shape
    start_scale: float
    start_noise: torch.Tensor     # shape
    noises: torch.Tensor          # (steps - 1, *shape)
    residual: torch.Tensor        # shape
    # The latent space the code lives in (None: unknown, an old code). Replay refuses a model whose
    # latent format differs: e.g. ComfyUI's latent_format class "SD15" with scale_factor 0.18215.
    latent_format: Optional[str] = None
    latent_scale_factor: Optional[float] = None
    model_type: Optional[str] = None  # for messages, e.g. "SD15 (EPS)"

    @property
    def steps(self) -> int:
        return int(self.sigmas.numel()) - 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.start_noise.shape)

    @property
    def batch_size(self) -> int:
        return int(self.start_noise.shape[0])

    def x_start(self) -> torch.Tensor:
        return self.start_mean + self.start_scale * self.start_noise

    def clone(self) -> "LatentCode":
        return replace(
            self, sigmas=self.sigmas.clone(), start_mean=self.start_mean.clone(),
            start_noise=self.start_noise.clone(), noises=self.noises.clone(), residual=self.residual.clone())

    def to(self, device=None, dtype=None) -> "LatentCode":
        mv = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return replace(self, start_mean=mv(self.start_mean), start_noise=mv(self.start_noise),
                       noises=mv(self.noises), residual=mv(self.residual))

    def validate(self) -> "LatentCode":
        check_schedule(self.sigmas, self.eta, self.family)
        shape = self.shape
        if len(shape) < 3:
            raise CodeError(f"latent code tensors must be (batch, channels, ...), got shape {shape}")
        for name in ("start_mean", "residual"):
            if tuple(getattr(self, name).shape) != shape:
                raise CodeError(f"latent code: {name} has shape {tuple(getattr(self, name).shape)}, expected {shape}")
        if tuple(self.noises.shape) != (self.steps - 1, *shape):
            raise CodeError(
                f"latent code: noises have shape {tuple(self.noises.shape)}, expected {(self.steps - 1, *shape)} "
                f"for {self.steps} steps")
        if not (math.isfinite(self.start_scale) and self.start_scale > 0):
            raise CodeError(f"latent code: start_scale must be a positive number, got {self.start_scale}")
        for name in ("start_mean", "start_noise", "noises", "residual"):
            if not torch.isfinite(getattr(self, name)).all():
                raise CodeError(f"latent code: {name} contains NaN or infinity")
        return self


def _randn(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    # Drawn on the CPU so that a seed gives the same bits on every device.
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=like.device, dtype=like.dtype)


def encode(denoise: Denoiser, x0: torch.Tensor, sigmas: torch.Tensor, eta: float, family: str,
           seed: int, callback: Optional[StepCallback] = None) -> LatentCode:
    """Encode clean latents ``x0`` (batch first) into the sampler's latent code."""
    s = check_schedule(sigmas, eta, family)
    if not torch.isfinite(x0).all():
        raise CodeError("the input latent contains NaN or infinity")
    gen = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    steps = len(s) - 1
    a0 = alpha(s[0], family)
    start_mean = a0 * x0
    start_noise = _randn(x0.shape, gen, x0)
    code_x = start_mean + s[0] * start_noise
    noises = x0.new_empty((steps - 1, *x0.shape))
    x = code_x
    residual = None
    for i in range(steps):
        d = denoise(x, s[i])
        a, b, c = step_coefficients(s[i], s[i + 1], eta, family)
        if c == 0.0:  # last step, to sigma = 0
            residual = x0 - d
            x_next = d + residual
        else:
            xi = _randn(x0.shape, gen, x0)
            eps = xi + (b / c) * (x0 - d)
            noises[i] = eps
            x_next = a * x + b * d + c * eps
        if callback is not None:
            callback(i, d, x, steps)
        x = x_next
    return LatentCode(sigmas=torch.tensor(s, dtype=torch.float64), eta=float(eta), family=family,
                      start_mean=start_mean, start_scale=float(s[0]), start_noise=start_noise,
                      noises=noises, residual=residual)


def replay_step(denoise: Denoiser, x: torch.Tensor, i: int, code: LatentCode,
                noise: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None):
    """One step of the sampler with the code's noise; returns ``(x_next, denoised)``."""
    s = code.sigmas
    s_from, s_to = float(s[i]), float(s[i + 1])
    d = denoise(x, s_from)
    a, b, c = step_coefficients(s_from, s_to, code.eta, code.family)
    if c == 0.0:
        return d + (code.residual if residual is None else residual), d
    eps = code.noises[i] if noise is None else noise
    return a * x + b * d + c * eps, d


def replay(denoise: Denoiser, code: LatentCode, callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Run the stochastic sampler with the code's noises; returns the final latent."""
    x = code.x_start()
    steps = code.steps
    for i in range(steps):
        x_next, d = replay_step(denoise, x, i, code)
        if callback is not None:
            callback(i, d, x, steps)
        x = x_next
    return x


def prior_code(shape, sigmas: torch.Tensor, eta: float, family: str, seed: int,
               device=None, dtype=torch.float32) -> LatentCode:
    """A code drawn from its prior: generation from scratch."""
    s = check_schedule(sigmas, eta, family)
    gen = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    like = torch.empty((), device=device, dtype=dtype)
    shape = tuple(int(v) for v in shape)
    start_noise = _randn(shape, gen, like)
    noises = _randn((len(s) - 2, *shape), gen, like)
    a0 = alpha(s[0], family)
    zeros = torch.zeros(shape, device=device, dtype=dtype)
    return LatentCode(sigmas=torch.tensor(s, dtype=torch.float64), eta=float(eta), family=family,
                      start_mean=zeros, start_scale=math.sqrt(a0 * a0 + s[0] * s[0]),
                      start_noise=start_noise, noises=noises, residual=zeros.clone())
