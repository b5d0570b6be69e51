# SPDX-License-Identifier: GPL-3.0-or-later
"""The video energy in pure torch: per-frame energy averaged over chosen frames, the temporal term, its
gradient against autograd, and the frames syntax."""
from __future__ import annotations

import importlib

import pytest
import torch


@pytest.fixture(scope="module")
def V(pack):
    return importlib.import_module("dpm_latent.guidance.video")


def _image_energy(images, generator=None):
    # a smooth energy of (N, 3, H, W): distance of each frame's mean colour from red
    target = torch.tensor([1.0, 0.0, 0.0]).view(1, 3)
    return (images.mean(dim=(2, 3)) - target).pow(2).sum(dim=1) * 10.0


def test_frames_syntax(V):
    assert V.parse_frames("all") is None and V.parse_frames("") is None
    assert V.parse_frames("8, 0, 16, 8") == [0, 8, 16]
    assert V.parse_frames("0-16:4") == [0, 4, 8, 12, 16] and V.parse_frames("2-4") == [2, 3, 4]
    for bad in ("x", "4-2", "0-8:0", "-1"):
        with pytest.raises(ValueError, match="frames"):
            V.parse_frames(bad)


@pytest.mark.parametrize("frames,temporal", [(None, 0.0), ([0, 3], 0.0), ([1], 50.0), (None, 5.0)])
def test_value_and_grad_match_autograd(V, frames, temporal):
    clip = torch.rand(2, 3, 5, 6, 6, generator=torch.Generator().manual_seed(0))
    e = V.VideoEnergy(_image_energy, frames, temporal)
    v, g = e.value_and_grad(clip)
    x = clip.clone().requires_grad_(True)
    ref = e(x)
    (gr,) = torch.autograd.grad(ref.sum(), x)
    assert torch.allclose(v, ref.detach(), atol=1e-6) and torch.allclose(g, gr, atol=1e-6)
    per = torch.stack([_image_energy(clip[:, :, f]) for f in (frames or range(5))], dim=1).mean(1)
    tmp = (clip[:, :, 1:] - clip[:, :, :-1]).pow(2).mean(dim=(1, 2, 3, 4))
    assert torch.allclose(v, per + temporal * tmp, atol=1e-6)
    if frames is not None and not temporal:  # frames not chosen get no gradient
        others = [f for f in range(5) if f not in frames]
        assert float(g[:, :, others].abs().max()) == 0.0


def test_frames_past_the_clip_are_refused_naming_both(V):
    e = V.VideoEnergy(_image_energy, [0, 9])
    assert e.last_frame() == 9
    with pytest.raises(ValueError, match="frame 9 .* 5 frames"):
        e(torch.rand(1, 3, 5, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 3, frames, H, W\)"):
        e(torch.rand(1, 3, 4, 4))
