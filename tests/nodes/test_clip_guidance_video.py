# SPDX-License-Identifier: GPL-3.0-or-later
"""Langevin Latent Sampler on a video model, in-process with ComfyUI's own loaders: the tiny random Wan 2.1
DiT (UNETLoader's loader) and the tiny Wan 2.1 VAE (VAELoader's), the tiny CLIP. Langevin lowers a per-frame
CLIP energy; the log states the memory choice and what the video VAE's backward measured; a chosen frame
subset decodes a causal prefix, exactly the full decode's first frames."""
from __future__ import annotations

import re

import pytest
import torch

T, H, W = 2, 4, 4   # latent frames and size: 5 pixel frames of 32 x 32


@pytest.fixture(scope="module")
def wan(model_dirs):
    import comfy.sd
    import comfy.utils

    with torch.inference_mode():  # as ComfyUI's executor runs the loaders
        model = comfy.sd.load_diffusion_model(str(model_dirs["diffusion_models"] / "tiny_wan21.safetensors"))
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(model_dirs["vae"] / "tiny_wan21_vae.safetensors")))
    return model, vae


def test_causal_prefix_decode_is_the_full_decodes_first_frames(wan):
    _model, vae = wan
    z = torch.randn(1, 16, 3, H, W, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = vae.first_stage_model.decode(z)
        prefix = vae.first_stage_model.decode(z[:, :, :2])
    assert full.shape[2] == 9 and prefix.shape[2] == 5
    assert torch.allclose(prefix, full[:, :, :5], atol=1e-5, rtol=0)


def test_langevin_lowers_a_per_frame_clip_energy_on_video(wan, gn, lc, lr):
    model, vae = wan
    cond = lc.EmptyConditioning.execute(model, 4).result[0]
    empty = {"samples": torch.zeros(1, 16, T, H, W)}
    drops, gradients = [], []
    for seed in range(3):
        with torch.inference_mode():
            code = lc.RandomLatentCode.execute(model, 32, 32, 1, seed, 3, "simple", 0.3, empty).result[0]
            probe = gn.CLIPEnergy.execute("tiny_clip", "a red square", 1.0, 2, False, False, False, False).result[0]
            ends = {}
            for weight in (0.0, 2000.0):
                energy = gn.CLIPEnergy.execute("tiny_clip", "a red square", weight, 2, False, False, False,
                                               False).result[0]
                _c, lat, plot, trace = lr.run_langevin(model, cond, cond, 1.0, vae, energy, code, 5, 0.05, seed,
                                                       "all components")
                assert lat["samples"].shape == (1, 16, T, H, W) and plot.shape == (1, 320, 512, 3)
                clip = vae.decode(lat["samples"])          # (1, 5, 32, 32, 3): every frame
                frames = clip.reshape(-1, *clip.shape[-3:]).movedim(-1, 1)
                with torch.inference_mode(False):
                    ends[weight] = float(probe(frames.clone()).mean())   # the per-frame CLIP energy, mean
                gradients.append(trace.gradient)
            drops.append(ends[0.0] - ends[2000.0])
    print("per-frame CLIP energy drop (unguided - guided), 3 seeds:", drops)
    print("memory:", gradients[-1])
    assert all(d > 0 for d in drops), drops
    g = gradients[-1]
    assert "the video VAE decode's backward measured" in g and "decoding 2 of 2 latent frames" in g, g
    assert "(the largest item)" in g, g
    assert "every frame" in g
    mb = float(re.search(r"decode's backward measured ([0-9.e+-]+) MB", g).group(1))
    assert 0.0 < mb < 2000.0, g


def test_video_energy_frames_decode_a_prefix_and_are_checked(wan, gn, lc, lr):
    model, vae = wan
    cond = lc.EmptyConditioning.execute(model, 4).result[0]
    with torch.inference_mode():
        code = lc.RandomLatentCode.execute(model, 32, 32, 1, 0, 3, "simple", 0.3,
                                           {"samples": torch.zeros(1, 16, 3, H, W)}).result[0]   # 9 pixel frames
        clip = gn.CLIPEnergy.execute("tiny_clip", "a red square", 500.0, 1, False, False, False, False).result[0]
        first = gn.VideoEnergy.execute(clip, "0, 4", 10.0).result[0]
        new, _lat, _plot, trace = lr.run_langevin(model, cond, cond, 1.0, vae, first, code, 2, 0.05, 0,
                                                  "all components", "low: recompute each step")
        assert "decoding 2 of 3 latent frames" in trace.gradient and "frames 0, 4" in trace.gradient, trace.gradient
        assert "temporal weight 10" in trace.gradient and "estimated" in trace.gradient, trace.gradient
        assert not torch.equal(new.start_noise, code.start_noise)
        late = gn.VideoEnergy.execute(clip, "0-12:4", 0.0).result[0]
        with pytest.raises(Exception, match="reads frame 12 but the clip has 9 frames"):
            lr.run_langevin(model, cond, cond, 1.0, vae, late, code, 1, 0.05, 0, "all components")
    with pytest.raises(Exception, match="frames"):
        gn.VideoEnergy.execute(clip, "a, b", 0.0)
