# SPDX-License-Identifier: GPL-3.0-or-later
"""The tiny checkpoints of tiny_models.py load through ComfyUI's real loaders and behave."""
from __future__ import annotations

import hashlib
import logging

import pytest
import torch

from dpmtools import tiny_models

UNET_PREFIX = "model.diffusion_model."


# ------------------------------------------------------------------------- fixtures

# The session's model_dirs fixture (conftest) already builds these files with these seeds.
@pytest.fixture(scope="session")
def sd15_path(model_dirs):
    return model_dirs["checkpoints"] / "tiny_sd15.safetensors"


@pytest.fixture(scope="session")
def sd3_path(model_dirs):
    return model_dirs["checkpoints"] / "tiny_sd3.safetensors"


@pytest.fixture(scope="session")
def sdxl_path(model_dirs):
    return model_dirs["checkpoints"] / "tiny_sdxl.safetensors"


@pytest.fixture(scope="session")
def clip_l_path(model_dirs):
    return model_dirs["text_encoders"] / "tiny_clip_l.safetensors"


@pytest.fixture(scope="session")
def clip_l(clip_l_path):
    import comfy.sd

    return comfy.sd.load_clip(ckpt_paths=[str(clip_l_path)],
                              clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)


KINDS = {
    # kind: (model config class, model class, sampling base, latent channels,
    #        context shape, pooled width or None, detected unet config)
    "sd15": ("SD15", "BaseModel", "EPS", 4, (77, 768), None, tiny_models.SD15_UNET_CONFIG),
    "sd3": ("SD3", "SD3", "CONST", 16, (7, 32), 32, tiny_models.SD3_MMDIT_CONFIG),
    "sdxl": ("KOALA_700M", "SDXL", "EPS", 4, (77, 2048), 1280, tiny_models.SDXL_UNET_CONFIG),
}


def _path(request, kind):
    return request.getfixturevalue(f"{kind}_path")


def _load(path, output_clip=False):
    import comfy.sd

    return comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=True, output_clip=output_clip, embedding_directory=None)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- tests

@pytest.mark.parametrize("kind", sorted(KINDS))
def test_detection_reads_back_the_built_config(request, kind):
    import comfy.model_detection
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(_path(request, kind)))
    assert comfy.model_detection.detect_unet_config(sd, UNET_PREFIX) == KINDS[kind][6]
    assert all(v.dtype == torch.float32 for v in sd.values())


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_checkpoint_loads_as_expected_model(request, kind):
    import comfy.model_base
    import comfy.model_sampling
    import comfy.supported_models

    config_name, model_name, sampling_name, channels = KINDS[kind][:4]
    model, clip, vae, _ = _load(_path(request, kind))
    base = model.model
    assert type(base.model_config).__name__ == config_name
    assert type(base) is getattr(comfy.model_base, model_name)
    if kind == "sdxl":
        assert isinstance(base.model_config, comfy.supported_models.SDXL)
    assert isinstance(base.model_sampling, getattr(comfy.model_sampling, sampling_name))
    assert base.get_dtype() == torch.float32
    assert clip is None

    assert vae.latent_channels == channels
    latent = torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(0))
    image = vae.decode(latent)
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(image).all()
    assert image.std() > 0.05  # neither flat nor constant
    back = vae.encode(image)
    assert back.shape == (1, channels, 8, 8)
    assert torch.isfinite(back).all() and back.std() > 0


def _prediction(base, x, sigma, context, pooled):
    """The raw network output (eps for EPS, velocity for CONST) through apply_model."""
    extras = {"pooled_output": pooled} if pooled is not None else {}
    conds = base.extra_conds(cross_attn=context, noise=x, device=x.device, **extras)
    kwargs = {k: v.cond for k, v in conds.items()}
    with torch.no_grad():
        denoised = base.apply_model(x, sigma, **kwargs)
    s = sigma.reshape(-1, 1, 1, 1)
    return (x - denoised) / s


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_forward_depends_on_latent_sigma_and_conditioning(request, kind):
    _, _, sampling_name, channels, ctx_shape, pooled_width, _ = KINDS[kind]
    model, _, _, _ = _load(_path(request, kind))
    base = model.model
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, channels, 8, 8, generator=g)
    ctx = torch.randn(1, *ctx_shape, generator=g)
    pooled = torch.randn(1, pooled_width, generator=g) if pooled_width else None
    sigma = torch.tensor([0.6]) if sampling_name == "CONST" else torch.tensor([3.0])

    ref = _prediction(base, x, sigma, ctx, pooled)
    assert ref.shape == x.shape and ref.dtype == torch.float32
    assert torch.isfinite(ref).all()
    assert 0.05 < ref.std() < 20
    assert torch.equal(ref, _prediction(base, x, sigma, ctx, pooled))  # deterministic

    # One batched call (cheap on a busy CPU): row 0 is the reference, then one row
    # each with another latent, another sigma, another context, another pooled vector.
    rows = [(x, sigma, ctx, pooled),
            (x + torch.randn(x.shape, generator=g), sigma, ctx, pooled),
            (x, sigma * 0.5, ctx, pooled),
            (x, sigma, torch.randn(ctx.shape, generator=g), pooled)]
    if pooled is not None:
        rows.append((x, sigma, ctx, torch.randn(pooled.shape, generator=g)))
    out = _prediction(base, *(torch.cat(col) if col[0] is not None else None
                              for col in zip(*rows)))
    assert torch.allclose(out[:1], ref, rtol=1e-4, atol=1e-5)
    moved = (out[1:] - out[:1]).abs().mean(dim=(1, 2, 3)) / ref.abs().mean()
    assert (moved > 1e-2).all(), moved


def test_builders_are_deterministic(tmp_path, sd15_path, sd3_path):
    assert _digest(tiny_models.make_sd3_checkpoint(tmp_path / "a.safetensors")) == _digest(sd3_path)
    assert _digest(tiny_models.make_sd3_checkpoint(tmp_path / "b.safetensors", seed=1)) != _digest(sd3_path)
    assert _digest(tiny_models.make_sd15_checkpoint(tmp_path / "c.safetensors")) == _digest(sd15_path)


def _encode(clip, text):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return cond, pooled


def test_clip_l_loads_without_missing_keys_and_encodes(clip_l_path, caplog):
    import comfy.sd

    with caplog.at_level(logging.WARNING):
        clip = comfy.sd.load_clip(ckpt_paths=[str(clip_l_path)],
                                  clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    assert not [r for r in caplog.records if "missing" in r.getMessage()]
    cat, cat_pooled = _encode(clip, "a photo of a cat")
    dog, dog_pooled = _encode(clip, "a painting of a dog")
    assert cat.shape == (1, 77, 768) and cat_pooled.shape == (1, 768)
    assert torch.isfinite(cat).all() and torch.isfinite(dog).all()
    assert (cat - dog).abs().mean() > 1e-2
    assert (cat_pooled - dog_pooled).abs().mean() > 1e-2
    assert torch.equal(cat, _encode(clip, "a photo of a cat")[0])


def test_sd15_with_embedded_clip_l(tmp_path, clip_l, caplog):
    path = tiny_models.make_sd15_checkpoint(tmp_path / "sd15_clip.safetensors", with_clip_l=True)
    with caplog.at_level(logging.WARNING):
        model, clip, vae, _ = _load(path, output_clip=True)
    assert not [r for r in caplog.records if "missing" in r.getMessage()]
    assert clip is not None and vae.latent_channels == 4
    cond, _ = _encode(clip, "a photo of a cat")
    # the embedded encoder is the standalone one of the same seed
    assert torch.allclose(cond, _encode(clip_l, "a photo of a cat")[0])
    # and its conditioning drives the UNet
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    eps = _prediction(model.model, x, torch.tensor([2.0]), cond, None)
    assert torch.isfinite(eps).all()


# ------------------------------------------------------------------------- tiny video models
VIDEO = {  # file -> (ComfyUI config class, model class, latent format, latent channels)
    "tiny_wan21.safetensors": ("WAN21_T2V", "WAN21", "Wan21", 16),
    "tiny_wan22.safetensors": ("WAN22_T2V", "WAN22", "Wan22", 48),
    "tiny_wan21_i2v.safetensors": ("WAN21_I2V", "WAN21", "Wan21", 16),
    "tiny_hunyuan_video.safetensors": ("HunyuanVideo", "HunyuanVideo", "HunyuanVideo", 16),
    "tiny_ltxv.safetensors": ("LTXV", "LTXV", "LTXV", 128),
    "tiny_hunyuan_video_i2v.safetensors": ("HunyuanVideoI2V", "HunyuanVideoI2V", "HunyuanVideo", 16),
    "tiny_hunyuan_video15.safetensors": ("HunyuanVideo15", "HunyuanVideo15", "HunyuanVideo15", 32),
    "tiny_cosmos_predict2.safetensors": ("CosmosT2IPredict2", "CosmosPredict2", "Wan21", 16),
}


@pytest.mark.parametrize("name", list(VIDEO))
def test_video_diffusion_models_load_as_their_family_without_missing_keys(model_dirs, name, caplog):
    import comfy.sd

    config, base, fmt, ch = VIDEO[name]
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        m = comfy.sd.load_diffusion_model(str(model_dirs["diffusion_models"] / name))
    assert not [r for r in caplog.records if "missing" in r.getMessage().lower()
                and "torchaudio" not in r.getMessage()], caplog.text
    assert type(m.model.model_config).__name__ == config and type(m.model).__name__ == base
    lf = m.get_model_object("latent_format")
    assert type(lf).__name__ == fmt and lf.latent_channels == ch and lf.latent_dimensions == 3
    # I2V: 3.2 M (CLIP-vision MLP); Cosmos Predict2: 15.3 M (the detector keeps 10 blocks of 16 heads >= 12 wide)
    limit = 16_000_000 if "cosmos" in name else 4_000_000
    assert sum(p.numel() for p in m.model.diffusion_model.parameters()) < limit


def test_tiny_wan_vae_maps_clips_to_wan_latents_and_back(model_dirs):
    import comfy.sd
    import comfy.utils

    with torch.inference_mode():
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(model_dirs["vae"] / "tiny_wan21_vae.safetensors")))
        frames = torch.rand(9, 32, 48, 3, generator=torch.Generator().manual_seed(0))
        z = vae.encode(frames)
        back = vae.decode(z)
    assert z.shape == (1, 16, 3, 4, 6) and torch.isfinite(z).all() and float(z.std()) > 0.01
    assert back.shape == (1, 9, 32, 48, 3) and float(back.std()) > 0.01
