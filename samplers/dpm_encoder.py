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
``z = start | eps_0 | ... | eps_{N-2} | residual`` (``|``: concatenation) where the start latent is
``x_start = start_mean + start_scale * start_noise``.  For an encoded image
``start_mean = alpha_0 x0`` and ``start_scale = sigma_0`` (the true marginal
``q(x_start | x0)``); for a code drawn from the prior ``start_mean = 0`` and
``start_scale = sqrt(alpha_0**2 + sigma_0**2)`` (unit-variance data, the same
as ComfyUI's txt2img start).  ``start_noise`` and every ``eps`` are standard
normal under the prior.

The encoder advances with the *replayed* ``x_t = A x_s + B d + C eps``
rather than the posterior draw: the two differ only by rounding, and this
way replay with the same denoiser retraces the encoder's floats exactly.

Masked (local) edits
--------------------
An encoded code also stores the encoder's own chain ``trajectory = (x_0, ...,
x_N)`` (``x_N`` the encoded latent), one latent per step.  Replay with a mask
``m`` in [0, 1] (1 = may change, ComfyUI's ``noise_mask`` convention, shape
``(B or 1, 1, h, w)``) blends every state with it::

    x_0     = m * x_start           + (1 - m) * trajectory[0]
    x_{i+1} = m * (A x_i + B d + C eps_i) + (1 - m) * trajectory[i + 1]

Where ``m = 0`` every step is the source's own state bit for bit, with no
second model pass; where ``m = 1`` it is the plain replay; soft masks blend.
The model at every step sees the whole (blended) latent, so the edited region
is generated in the context of the untouched one (as ComfyUI's inpainting
sampler does with its re-noised source).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch

from .types import Denoiser, StepCallback  # noqa: F401  (re-exported)

FAMILIES = ("ve", "flow")



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
    # Optional (see "Masked edits" in the module doc): the encoder's chain and an edit mask.
    trajectory: Optional[torch.Tensor] = None   # (steps + 1, *shape): x_0 .. x_N of the encoder
    mask: Optional[torch.Tensor] = None         # (batch or 1, 1, *spatial) in [0, 1]; 1 = may change

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
        opt = lambda t: None if t is None else t.clone()  # noqa: E731
        return replace(
            self, sigmas=self.sigmas.clone(), start_mean=self.start_mean.clone(),
            start_noise=self.start_noise.clone(), noises=self.noises.clone(), residual=self.residual.clone(),
            trajectory=opt(self.trajectory), mask=opt(self.mask))

    def to(self, device=None, dtype=None) -> "LatentCode":
        mv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return replace(self, start_mean=mv(self.start_mean), start_noise=mv(self.start_noise),
                       noises=mv(self.noises), residual=mv(self.residual), trajectory=mv(self.trajectory),
                       mask=mv(self.mask))

    def tiled(self, k: int) -> "LatentCode":
        """The code repeated ``k`` times along the batch (copy j: images j*B .. j*B+B-1), as a new object.

        Every tensor field is tiled: per-step stacks (noises, trajectory: ``(steps, batch, ...)``) along
        dim 1, batch-first tensors (a per-image mask too) along dim 0; the schedule is shared."""
        if k == 1:
            return self
        return self.rows(list(range(self.batch_size)) * k)

    def rows(self, idx) -> "LatentCode":
        """The code of the batch images ``idx`` (a list of indices, repeats allowed), as a new object:
        per-step stacks indexed along dim 1, batch-first tensors (a per-image mask too) along dim 0."""
        idx = torch.as_tensor(list(idx), dtype=torch.long)
        bsz = self.batch_size
        changes = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, torch.Tensor) or f.name == "sigmas" or v.dim() == 0:
                continue
            if v.dim() == len(self.shape) + 1 and v.shape[1] == bsz and v.shape[2:] == self.shape[1:]:
                changes[f.name] = v.index_select(1, idx.to(v.device))
            elif v.shape[0] == bsz:
                changes[f.name] = v.index_select(0, idx.to(v.device))
        return replace(self, **changes)

    def with_mask(self, mask: Optional[torch.Tensor]) -> "LatentCode":
        """The same code with another edit mask (None: no mask), checked; tensors are shared, not copied."""
        if mask is not None:
            mask = check_mask(mask, self.shape, "mask")
            if self.trajectory is None:
                raise CodeError(
                    "a mask needs the source image's chain, and this code has none: it was drawn from the "
                    "prior (Random Latent Code) or saved by an older version of DPM Latent. Encode the image "
                    "again with DPM Encode")
        return replace(self, mask=mask)

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
        if self.trajectory is not None and tuple(self.trajectory.shape) != (self.steps + 1, *shape):
            raise CodeError(
                f"latent code: trajectory has shape {tuple(self.trajectory.shape)}, expected "
                f"{(self.steps + 1, *shape)} for {self.steps} steps")
        if self.mask is not None:
            check_mask(self.mask, shape, "latent code: mask")
            if self.trajectory is None:
                raise CodeError("latent code: it has a mask but no source trajectory to keep outside it")
        for name in ("start_mean", "start_noise", "noises", "residual", "trajectory"):
            t = getattr(self, name)
            if t is not None and not torch.isfinite(t).all():
                raise CodeError(f"latent code: {name} contains NaN or infinity")
        return self


def check_mask(mask: torch.Tensor, shape, what: str = "mask") -> torch.Tensor:
    """A latent-resolution edit mask for latents of ``shape``: ``(batch or 1, 1, *spatial)``, values in [0, 1]."""
    if not isinstance(mask, torch.Tensor) or not mask.dtype.is_floating_point:
        raise CodeError(f"{what}: must be a floating-point tensor")
    want = (1, *shape[2:])
    if mask.ndim != len(shape) or tuple(mask.shape[1:]) != want or mask.shape[0] not in (1, shape[0]):
        raise CodeError(f"{what}: has shape {tuple(mask.shape)}, expected ({shape[0]} or 1, *{want}) for latents "
                        f"of shape {tuple(shape)}")
    if not torch.isfinite(mask).all() or float(mask.min()) < 0.0 or float(mask.max()) > 1.0:
        raise CodeError(f"{what}: values must lie in [0, 1]")
    return mask


def latent_mask(mask: torch.Tensor, shape) -> torch.Tensor:
    """An image- or video-sized mask (1 = may change) resized to latents of ``shape`` as ComfyUI resizes a
    LATENT's ``noise_mask`` for KSampler, kept at one channel, float32, clamped to [0, 1].

    Image latents ``(B, C, h, w)``: a mask ``(H, W)``, ``(B, H, W)`` or ``(B, 1, H, W)``, resized bilinearly, the
    batch repeated or cut to the latent batch; returns ``(batch, 1, h, w)``.

    Video latents ``(B, C, t, h, w)``: a mask ``(H, W)`` (the same in every frame), ``(T, H, W)`` or
    ``(T, 1, H, W)`` (one per frame, T pixel or latent frames) or ``(B, 1, T, H, W)`` (ComfyUI's video noise
    masks), resized trilinearly to ``(t, h, w)``; returns ``(batch, 1, t, h, w)``."""
    if not isinstance(mask, torch.Tensor) or mask.ndim < 2:
        raise CodeError("mask: expected an image mask (height, width) or a batch of them")
    if len(shape) not in (4, 5):
        raise CodeError(f"mask: masks are supported for image (B, C, H, W) and video (B, C, T, H, W) latents, "
                        f"not shape {tuple(shape)}")
    video = len(shape) == 5
    if mask.ndim == 4 and mask.shape[1] != 1:
        raise CodeError(f"mask: has {mask.shape[1]} channels, expected 1")
    if mask.ndim > 5 or (mask.ndim == 5 and (not video or mask.shape[1] != 1)):
        raise CodeError(f"mask: has shape {tuple(mask.shape)}; expected (height, width), (batch or frames, height, "
                        "width)" + (" or (batch, 1, frames, height, width)" if video else ""))
    if video:
        m = mask.detach().float()
        m = m.reshape(1, 1, -1, m.shape[-2], m.shape[-1]) if m.ndim < 5 else m
        mode = "trilinear"
    else:
        m = mask.detach().float().reshape(-1, 1, mask.shape[-2], mask.shape[-1])
        mode = "bilinear"
    if not torch.isfinite(m).all():
        raise CodeError("mask: contains NaN or infinity")
    m = torch.nn.functional.interpolate(m, size=tuple(int(v) for v in shape[2:]), mode=mode)
    batch = int(shape[0])
    if m.shape[0] > batch:
        m = m[:batch]
    elif m.shape[0] < batch:
        m = m.repeat(math.ceil(batch / m.shape[0]), *([1] * (m.ndim - 1)))[:batch]
    return m.clamp(0.0, 1.0).contiguous()


def blend(mask: Optional[torch.Tensor], x: torch.Tensor, source: Optional[torch.Tensor]) -> torch.Tensor:
    """``mask * x + (1 - mask) * source``; exactly ``source`` where the mask is 0 and ``x`` where it is 1."""
    if mask is None:
        return x
    m = mask.to(device=x.device, dtype=x.dtype)
    return torch.where(m == 0, source, torch.where(m == 1, x, m * x + (1 - m) * source))


def _randn(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    # Drawn on the CPU so that a seed gives the same bits on every device.
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=like.device, dtype=like.dtype)


def encode(denoise: Denoiser, x0: torch.Tensor, sigmas: torch.Tensor, eta: float, family: str,
           seed: int, callback: Optional[StepCallback] = None, mask: Optional[torch.Tensor] = None) -> LatentCode:
    """Encode clean latents ``x0`` (batch first) into the sampler's latent code.

    ``mask`` (optional, any size, see ``latent_mask``): the edit mask stored in the code; the
    encoder's chain is stored either way, so a mask can also be given at replay."""
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
    trajectory = x0.new_empty((steps + 1, *x0.shape))
    x = code_x
    trajectory[0] = x
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
        trajectory[i + 1] = x
    code = LatentCode(sigmas=torch.tensor(s, dtype=torch.float64), eta=float(eta), family=family,
                      start_mean=start_mean, start_scale=float(s[0]), start_noise=start_noise,
                      noises=noises, residual=residual, trajectory=trajectory)
    if mask is not None:
        code = code.with_mask(latent_mask(mask, x0.shape).to(device=x0.device, dtype=x0.dtype))
    return code


def replay_step(denoise: Denoiser, x: torch.Tensor, i: int, code: LatentCode,
                noise: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None):
    """One step of the sampler with the code's noise; returns ``(x_next, denoised)``."""
    s = code.sigmas
    s_from, s_to = float(s[i]), float(s[i + 1])
    d = denoise(x, s_from)
    a, b, c = step_coefficients(s_from, s_to, code.eta, code.family)
    if c == 0.0:
        x_next = d + (code.residual if residual is None else residual)
    else:
        eps = code.noises[i] if noise is None else noise
        x_next = a * x + b * d + c * eps
    if code.mask is not None:
        x_next = blend(code.mask, x_next, code.trajectory[i + 1])
    return x_next, d


def replay(denoise: Denoiser, code: LatentCode, callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Run the stochastic sampler with the code's noises; returns the final latent.

    With a mask in the code, every state outside it is the encoder's own (module doc).  This is the
    reference replay: ``asyrp.asyrp_replay`` with no edit and no boosting, and
    ``guidance.langevin.replay_differentiable``, are tested to give its result."""
    x = code.x_start()
    if code.mask is not None:
        x = blend(code.mask, x, code.trajectory[0])
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
