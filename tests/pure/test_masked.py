# SPDX-License-Identifier: GPL-3.0-or-later
"""Masked (local) edits in pure torch: the source chain outside the mask at every step, soft blends,
the mask in the code file, old codes unchanged, masked Langevin."""
from __future__ import annotations

import importlib
import math

import pytest
import torch


@pytest.fixture(scope="module")
def S(pack):
    return pack.samplers


@pytest.fixture(scope="module")
def L(pack):
    return importlib.import_module("dpm_latent.guidance.langevin")


class Net(torch.nn.Module):
    """A small conv x0-predictor; ``shift`` plays a second prompt or a second model."""

    def __init__(self, seed=0, ch=4, shift=0.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = torch.nn.Conv2d(ch, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, ch, 3, padding=1)
        self.shift = shift
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))

    def forward(self, x, sigma):
        h = torch.tanh(self.c1(x / math.sqrt(1 + sigma ** 2)))
        return x / (1 + sigma ** 2) + self.c2(h) + self.shift


VE = torch.tensor([6.0, 3.0, 1.5, 0.7, 0.3, 0.1, 0.0], dtype=torch.float64)
FLOW = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.15, 0.05, 0.0], dtype=torch.float64)


def _half_mask(batch=2, size=16):
    m = torch.zeros(batch, size, size)
    m[:, :, : size // 2] = 1.0  # left half may change (image-sized: 16 px -> 4 latent px here)
    return m


@pytest.mark.parametrize("family,sigmas", [("ve", VE), ("flow", FLOW)])
def test_outside_the_mask_every_step_is_the_source_chain(S, family, sigmas):
    src, tgt = Net(0), Net(0, shift=0.5)
    x0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    seen_enc = []
    code = S.encode(src, x0, sigmas, 0.2, family, seed=3, mask=_half_mask(),
                    callback=lambda i, d, x, n: seen_enc.append(x.clone()))
    assert code.mask.shape == (2, 1, 4, 4) and code.trajectory.shape == (len(sigmas), 2, 4, 4, 4)
    for i, x in enumerate(seen_enc):  # the stored chain is the encoder's
        assert torch.equal(code.trajectory[i], x)
    outside = (code.mask == 0).expand_as(x0)
    inside = (code.mask == 1).expand_as(x0)
    assert outside.any() and inside.any()
    seen = []
    out = S.replay(tgt, code, callback=lambda i, d, x, n: seen.append(x.clone()))
    seen.append(out)
    for i, x in enumerate(seen):
        assert torch.equal(x[outside], code.trajectory[i][outside]), i
    assert torch.equal(out[outside], code.trajectory[-1][outside])
    torch.testing.assert_close(out[outside], x0[outside], rtol=0, atol=1e-5)
    # inside: the plain edit, bit for bit
    plain = S.replay(tgt, code.with_mask(None))
    assert (out[inside] - x0[inside]).abs().max() > 0.05
    # the edit inside sees the source outside (one chain, not two pasted halves)
    assert not torch.equal(out[inside], plain[inside])
    # the same denoiser with the mask retraces the source everywhere
    torch.testing.assert_close(S.replay(src, code), x0, rtol=0, atol=1e-5)


def test_soft_mask_blends_every_step(S):
    src, tgt = Net(0), Net(0, shift=0.5)
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    code = S.encode(src, x0, VE, 0.2, "ve", seed=1)
    ramp = torch.linspace(0, 1, 16).repeat(16, 1)  # 0 on the left, 1 on the right
    soft = code.with_mask(S.latent_mask(ramp, code.shape))
    m = soft.mask
    assert 0 < float(m.min()) or float(m.max()) < 1 or ((m > 0) & (m < 1)).any()
    assert ((m > 0.05) & (m < 0.95)).any()
    # recompute each step by hand: x_{i+1} = m * step(x_i) + (1 - m) * source_{i+1}
    xs = []
    out = S.replay(tgt, soft, callback=lambda i, d, x, n: xs.append(x.clone()))
    xs.append(out)
    for i in range(soft.steps):
        step, _d = S.replay_step(tgt, xs[i], i, code)  # the unmasked step from the same state
        want = m * step + (1 - m) * code.trajectory[i + 1]
        torch.testing.assert_close(xs[i + 1], want, rtol=1e-6, atol=1e-6)
    full = S.replay(tgt, code)
    d_soft, d_full = (out - x0).abs().mean(), (full - x0).abs().mean()
    assert 0 < d_soft < d_full


def test_latent_mask_resizes_like_comfyui(S):
    # ComfyUI (comfy.utils.reshape_mask): bilinear to the latent size, batch repeated to the latent batch
    img = torch.zeros(1, 64, 64)
    img[:, 16:48, 16:48] = 1.0
    m = S.latent_mask(img, (3, 4, 8, 8))
    ref = torch.nn.functional.interpolate(img.reshape(1, 1, 64, 64), size=(8, 8), mode="bilinear").repeat(3, 1, 1, 1)
    assert m.shape == (3, 1, 8, 8) and torch.equal(m, ref)
    assert float(m[0, 0, 0, 0]) == 0.0 and float(m[0, 0, 4, 4]) == 1.0
    with pytest.raises(S.CodeError, match="mask"):
        S.latent_mask(torch.zeros(2, 3, 8, 8), (1, 4, 8, 8))


def test_mask_needs_a_source_chain(S):
    code = S.prior_code((1, 4, 4, 4), VE, 0.2, "ve", seed=0)
    assert code.trajectory is None
    with pytest.raises(S.CodeError, match="Random Latent Code"):
        code.with_mask(torch.ones(1, 1, 4, 4))


def test_mask_and_chain_travel_in_the_file_and_old_files_replay_identically(S, pack, tmp_path):
    fmt = pack.samplers.code_format
    src, tgt = Net(0), Net(1)
    x0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    code = S.encode(src, x0, VE, 0.2, "ve", seed=2, mask=_half_mask())
    back = fmt.load_code(fmt.save_code(code, tmp_path / "m.dpmcode.safetensors"))
    assert torch.equal(back.mask, code.mask) and torch.equal(back.trajectory, code.trajectory)
    assert torch.equal(S.replay(tgt, back), S.replay(tgt, code))
    # a file as the previous version wrote it: no chain, no mask
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = tmp_path / "m.dpmcode.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = {k: v for k, v in load_file(str(path)).items() if k in fmt.TENSOR_NAMES}
    v1_keys = ("format", "family", "eta", "start_scale", "shape", "steps", "sigmas")
    meta = {k: meta[k] for k in v1_keys} | {"format_version": "1"}  # version 1: no checksum, no latent space
    save_file(tensors, str(tmp_path / "old.dpmcode.safetensors"), metadata=meta)
    old = fmt.load_code(tmp_path / "old.dpmcode.safetensors")
    assert old.trajectory is None and old.mask is None
    # replays exactly as the unmasked code does, and as the sampler without the new fields
    plain = S.replay(tgt, code.with_mask(None))
    assert torch.equal(S.replay(tgt, old), plain)
    x = old.x_start()
    for i in range(old.steps):
        d = tgt(x, float(old.sigmas[i]))
        a, b, c = S.step_coefficients(float(old.sigmas[i]), float(old.sigmas[i + 1]), old.eta, old.family)
        x = d + old.residual if c == 0 else a * x + b * d + c * old.noises[i]
    assert torch.equal(x, plain)
    with pytest.raises(S.CodeError, match="older version"):
        old.with_mask(code.mask)


@pytest.mark.parametrize("family,sigmas", [("ve", VE), ("flow", FLOW)])
def test_masked_langevin_moves_only_the_masked_region(S, L, family, sigmas):
    net = Net(0).double()
    x0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    code = S.encode(net, x0, sigmas, 0.3, family, seed=4, mask=_half_mask())
    decode = lambda x: torch.tanh(x[:, :3])  # noqa: E731
    energy = lambda im, g: (im - 0.8).pow(2).flatten(1).sum(1)  # noqa: E731
    # the hand-checkpointed gradient equals autograd through the masked chain
    ref = L.chain_value_and_grad(net, decode, energy, code, code.start_noise, code.noises, checkpoint=False)
    ours = L.chain_value_and_grad(net, decode, energy, code, code.start_noise, code.noises, checkpoint=True)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    outside = (code.mask == 0).expand_as(x0)
    assert float(ours[2][outside].abs().max()) == 0.0 and float(ours[3][:, outside].abs().max()) == 0.0
    assert float(ours[2][~outside].abs().max()) > 0
    new, trace = L.langevin(net, decode, energy, code, steps=5, step_size=0.01, seed=0, update="all")
    assert torch.equal(new.start_noise[outside], code.start_noise[outside])
    assert torch.equal(new.noises[:, outside], code.noises[:, outside])
    out = S.replay(net, new)
    assert torch.equal(out[outside], code.trajectory[-1][outside])
    assert (out[~outside] - x0[~outside]).abs().max() > 1e-3
    assert trace.energy[-1][0] < trace.energy[0][0] + 1e-9 or trace.energy[-1][1] < trace.energy[0][1]


class Net3d(torch.nn.Module):
    """A small 3-D conv x0-predictor over video latents (B, C, T, H, W)."""

    def __init__(self, seed=0, ch=4):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = torch.nn.Conv3d(ch, 8, 3, padding=1)
        self.c2 = torch.nn.Conv3d(8, ch, 3, padding=1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.1

    def forward(self, x, sigma):
        return x / (1 + sigma ** 2) + self.c2(torch.tanh(self.c1(x / math.sqrt(1 + sigma ** 2))))


def test_video_latent_mask_varies_over_time_like_comfyui(S):
    # ComfyUI (comfy.utils.reshape_mask, 3 latent dims): a (T, H, W) mask is one mask per frame, resized
    # trilinearly to (t, h, w); a (H, W) mask is the same in every frame
    frames = torch.zeros(9, 32, 32)
    frames[4:, :, :16] = 1.0  # from frame 4 on, the left half may change
    m = S.latent_mask(frames, (2, 4, 3, 4, 4))
    ref = torch.nn.functional.interpolate(frames.reshape(1, 1, 9, 32, 32), size=(3, 4, 4), mode="trilinear")
    assert m.shape == (2, 1, 3, 4, 4) and torch.equal(m[0:1], ref) and torch.equal(m[1:2], ref)
    assert float(m[0, 0, 0].max()) == 0.0 and float(m[0, 0, 2, 0, 0]) == 1.0 and float(m[0, 0, 2, 0, 3]) == 0.0
    still = S.latent_mask(frames[5], (1, 4, 3, 4, 4))
    assert still.shape == (1, 1, 3, 4, 4) and torch.equal(still[:, :, 0], still[:, :, 2])
    assert S.latent_mask(torch.ones(1, 1, 3, 4, 4), (1, 4, 3, 4, 4)).shape == (1, 1, 3, 4, 4)
    with pytest.raises(S.CodeError, match="mask"):
        S.latent_mask(torch.zeros(1, 1, 3, 4, 4), (1, 4, 8, 8))  # a video mask on image latents


@pytest.mark.parametrize("family,sigmas", [("ve", VE), ("flow", FLOW)])
def test_video_code_replays_exactly_keeps_masked_frames_and_saves_its_frame_count(S, pack, tmp_path, family, sigmas):
    fmt = pack.samplers.code_format
    src, tgt = Net3d(0), Net3d(1)
    x0 = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    frames = torch.zeros(3, 4, 4)
    frames[2] = 1.0  # only the last frame may change
    code = S.encode(src, x0, sigmas, 0.2, family, seed=1, mask=frames)
    assert (S.replay(src, code) - x0).norm() / x0.norm() < 1e-5
    out = S.replay(tgt, code)
    assert torch.equal(out[:, :, :2], x0[:, :, :2]) or torch.allclose(out[:, :, :2], x0[:, :, :2], atol=1e-6)
    assert (out[:, :, 2] - x0[:, :, 2]).norm() / x0[:, :, 2].norm() > 0.01
    path = fmt.save_code(code, tmp_path / "v.dpmcode.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["frames"] == "3"
    back = fmt.load_code(path)
    assert back.shape == (1, 4, 3, 4, 4) and torch.equal(S.replay(tgt, back), out)
