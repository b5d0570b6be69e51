# SPDX-License-Identifier: GPL-3.0-or-later
"""An energy over decoded video clips: an image energy per frame, and an optional temporal term.

A decoded clip is ``(B, 3, F, H, W)`` in [0, 1] (a video VAE's output layout).  ``VideoEnergy``::

    E(clip) = mean over the chosen frames f of E_image(clip[:, :, f])
              + temporal_weight * mean over f of mean((clip[:, :, f+1] - clip[:, :, f])**2)

Frames are pixel frames of the clip, chosen as a list of indices (``None``: every frame).  The
temporal term (frame-to-frame squared change, over the frames decoded) pulls the clip towards
consistency in time; 0 leaves it out.

A chosen subset lets a long clip be guided without decoding all of it each step: video VAEs of
the host (Wan 2.1 / 2.2, HunyuanVideo, LTX-Video's causal encoder-decoders) are causal in time,
so the first n latent frames decode to exactly the first frames of the full decode.  The caller
(the Langevin node) decodes only the latent prefix that reaches the last chosen frame:
``last_frame()`` says which frame that is.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch

from .clip_energy import energy_value_and_grad


def parse_frames(text: str) -> Optional[list[int]]:
    """``"all"`` / ``""`` -> None; ``"0, 8, 16"`` -> [0, 8, 16]; ``"0-16:4"`` -> [0, 4, 8, 12, 16] (range with
    step); raises ValueError naming the bad part."""
    text = (text or "").strip().lower()
    if text in ("", "all"):
        return None
    out: list[int] = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                span, _, step = part.partition(":")
                a, b = (int(v) for v in span.split("-", 1))
                s = int(step) if step else 1
                if s < 1 or b < a:
                    raise ValueError
                out.extend(range(a, b + 1, s))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"frames: {part!r} is not a frame number (0, 1, ...) or a range like 0-16:4; "
                             "write 'all', '0, 8, 16' or '0-16:4'") from None
    if not out or min(out) < 0:
        raise ValueError("frames: frame numbers start at 0; write 'all', '0, 8, 16' or '0-16:4'")
    return sorted(set(out))


class VideoEnergy:
    """Per-frame image energy averaged over chosen frames, plus ``temporal_weight`` x the mean squared
    frame-to-frame change (see module doc). Takes clips ``(B, 3, F, H, W)``; returns ``(B,)``."""

    def __init__(self, energy, frames: Optional[Sequence[int]] = None, temporal_weight: float = 0.0):
        self.energy = energy
        self.frames = None if frames is None else sorted(set(int(f) for f in frames))
        self.temporal_weight = float(temporal_weight)

    def last_frame(self) -> Optional[int]:
        """The last pixel frame the energy reads (None: the whole clip)."""
        return None if self.frames is None else self.frames[-1]

    def chosen(self, clip_frames: int) -> list[int]:
        if self.frames is None:
            return list(range(clip_frames))
        if self.frames[-1] >= clip_frames:
            raise ValueError(f"frames: frame {self.frames[-1]} was chosen but the decoded clip has {clip_frames} "
                             f"frames (0 .. {clip_frames - 1})")
        return list(self.frames)

    def to(self, device=None, dtype=None) -> "VideoEnergy":
        if hasattr(self.energy, "to"):
            self.energy.to(device, dtype)
        return self

    def on_device(self, device) -> "VideoEnergy":
        inner = self.energy.on_device(device) if hasattr(self.energy, "on_device") else self.energy
        if inner is self.energy:
            return self
        out = copy.copy(self)
        out.energy = inner
        return out

    @staticmethod
    def _check(clip: torch.Tensor) -> None:
        if clip.dim() != 5 or clip.shape[1] != 3:
            raise ValueError(f"video energy expects decoded clips (B, 3, frames, H, W), got shape {tuple(clip.shape)}")

    def _frames_flat(self, clip: torch.Tensor, idx: list[int]) -> torch.Tensor:
        sel = clip[:, :, idx]                                   # (B, 3, k, H, W)
        return sel.permute(0, 2, 1, 3, 4).reshape(-1, 3, *clip.shape[-2:])

    def temporal(self, clip: torch.Tensor) -> torch.Tensor:
        """Mean squared frame-to-frame change per clip, (B,) (0 for a one-frame clip)."""
        if clip.shape[2] < 2:
            return clip.new_zeros(clip.shape[0])
        return (clip[:, :, 1:] - clip[:, :, :-1]).pow(2).mean(dim=(1, 2, 3, 4))

    def per_frame(self, clip: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The image energy of every chosen frame, (B, k)."""
        self._check(clip)
        idx = self.chosen(clip.shape[2])
        return self.energy(self._frames_flat(clip, idx), generator).view(clip.shape[0], len(idx))

    def __call__(self, clip: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        e = self.per_frame(clip, generator).mean(dim=1)
        if self.temporal_weight:
            e = e + self.temporal_weight * self.temporal(clip)
        return e

    def value_and_grad(self, clip: torch.Tensor, generator: Optional[torch.Generator] = None):
        """``(E (B,), dE.sum()/d clip)``, detached; the image energy's gradient frame batch by frame batch."""
        self._check(clip)
        x = clip.detach()
        b, k_all = x.shape[0], x.shape[2]
        idx = self.chosen(k_all)
        k = len(idx)
        v, g = energy_value_and_grad(self.energy, self._frames_flat(x, idx), generator)
        value = v.view(b, k).mean(dim=1)
        grad = torch.zeros_like(x)
        g = g.view(b, k, 3, *x.shape[-2:]).permute(0, 2, 1, 3, 4) / k
        grad.index_add_(2, torch.tensor(idx, device=x.device), g.to(grad.dtype))
        if self.temporal_weight and k_all > 1:
            with torch.enable_grad():
                xt = x.requires_grad_(True)
                t = self.temporal(xt)
                (gt,) = torch.autograd.grad(t.sum(), xt)
            value = value + self.temporal_weight * t.detach()
            grad = grad + self.temporal_weight * gt
        return value, grad
