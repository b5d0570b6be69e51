# SPDX-License-Identifier: GPL-3.0-or-later
"""Video codes in-process: the tiny Mochi and Cosmos 1 models (``dpmtools.tiny_models``: ComfyUI's own classes at
tiny sizes; their exact reconstruction through the server is in test_latent_codes_video_server.py) get the
conditioning their forward needs from Empty Conditioning and are really used (a replay with another model moves
the result); HunyuanVideo 1.5's start-frame conditioning passes through."""
from __future__ import annotations

import importlib

import pytest
import torch

# family: (loader, latent channels, latent format, model class)
FAMILIES = {
    "mochi": ("load_tiny_mochi", 12, "Mochi", "GenmoMochi"),
    "cosmos1": ("load_tiny_cosmos1", 16, "Cosmos1CV8x8x8", "CosmosVideo"),
}


@pytest.fixture(scope="module")
def cyc(pack):
    return importlib.import_module("dpm_latent.nodes.latent_codes")


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_mochi_and_cosmos1_codes_use_the_model(cyc, family):
    from dpmtools import tiny_models

    loader, ch, fmt, base = FAMILIES[family]
    model, other = getattr(tiny_models, loader)(0), getattr(tiny_models, loader)(1)
    assert type(model.model).__name__ == base
    assert type(model.get_model_object("latent_format")).__name__ == fmt
    cond = cyc.EmptyConditioning.execute(model, 4).result[0]
    assert torch.count_nonzero(cond[0][0]) == 0 and cond[0][1]["attention_mask"].shape == (1, 4)
    x0 = torch.randn(1, ch, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        code = cyc.DPMEncode.execute(model, cond, cond, {"samples": x0}, 7, 5, "simple", 0.8, 0.1, 1.0).result[0]
        same = cyc.ReplayLatentWithPrompt.execute(model, cond, cond, code, 1.0).result[0]["samples"]
        moved = cyc.ReplayLatentWithPrompt.execute(other, cond, cond, code, 1.0).result[0]["samples"]
    assert code.latent_format == fmt
    assert _rel(same, x0) <= 1e-4 and _rel(moved, x0) > 0.05, (_rel(same, x0), _rel(moved, x0))


def test_hunyuan_video15_start_frame_conditioning_passes_through(cyc, model_dirs):
    """HunyuanVideo 1.5 image-to-video: the conditioning HunyuanVideo 1.5 Image To Video makes (a clip-length
    concat_latent_image holding the start frame's latent, and a concat_mask that is 0 on it; built here as that
    node builds it, since the node needs HunyuanVideo 1.5's VAE, which has no tiny build) reaches the tiny
    HunyuanVideo 1.5 model (65 input channels) through the guider: encode and replay are exact with it, and a
    replay under another start frame differs."""
    import comfy.sd
    import node_helpers

    model = comfy.sd.load_diffusion_model(str(model_dirs["diffusion_models"] / "tiny_hunyuan_video15.safetensors"))
    cond = cyc.EmptyConditioning.execute(model, 4).result[0]
    T, H, W = 3, 4, 4
    x0 = torch.randn(1, 32, T, H, W, generator=torch.Generator().manual_seed(6))

    def start_frame(seed):
        image = torch.zeros(1, 32, T, H, W)
        image[:, :, :1] = torch.randn(1, 32, 1, H, W, generator=torch.Generator().manual_seed(seed))
        mask = torch.ones(1, 1, T, H, W)
        mask[:, :, :1] = 0.0
        return node_helpers.conditioning_set_values(cond, {"concat_latent_image": image, "concat_mask": mask})

    a, b = start_frame(1), start_frame(2)
    with torch.inference_mode():
        code = cyc.DPMEncode.execute(model, a, a, {"samples": x0}, 2, 5, "simple", 1.0, 0.1, 2.0).result[0]
        same = cyc.ReplayLatentWithPrompt.execute(model, a, a, code, 2.0).result[0]["samples"]
        other = cyc.ReplayLatentWithPrompt.execute(model, b, b, code, 2.0).result[0]["samples"]
    assert _rel(same, x0) <= 1e-4, _rel(same, x0)
    assert _rel(other, x0) > 1e-3, _rel(other, x0)
