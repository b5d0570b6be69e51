# SPDX-License-Identifier: GPL-3.0-or-later
"""Node behaviour in-process with models loaded by ComfyUI's own loader (no server round trip)."""
from __future__ import annotations

import importlib

import pytest
import torch


@pytest.fixture(scope="module")
def nodes(pack):
    return importlib.import_module("dpm_latent.nodes.latent_codes"), importlib.import_module("dpm_latent.nodes.bridge.sampling")


@pytest.fixture(scope="module")
def models(model_dirs):
    import comfy.sd

    out = {}
    with torch.inference_mode():
        for name in ("tiny_sd15", "tiny_sd3", "tiny_sdxl"):
            m, _c, vae, _ = comfy.sd.load_checkpoint_guess_config(
                str(model_dirs["checkpoints"] / f"{name}.safetensors"), output_vae=True, output_clip=False)
            out[name] = m
    return out


def test_family_detection_follows_model_patches(nodes, models):
    _cyc, B = nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete, ModelSamplingSD3

    assert B.family_of(models["tiny_sd15"]) == "ve"
    assert B.family_of(models["tiny_sd3"]) == "flow"
    v = ModelSamplingDiscrete().patch(models["tiny_sd15"], "v_prediction", False)[0]
    assert B.family_of(v) == "ve"
    shifted = ModelSamplingSD3().patch(models["tiny_sd3"], 6.0)[0]
    assert B.family_of(shifted) == "flow"


def test_empty_conditioning_shapes(nodes, models):
    cyc, _B = nodes
    shapes = {}
    for name, m in models.items():
        c = cyc.EmptyConditioning.execute(m, 5).result[0]
        shapes[name] = (tuple(c[0][0].shape), tuple(c[0][1]["pooled_output"].shape) if c[0][1] else None)
        assert torch.count_nonzero(c[0][0]) == 0
    assert shapes == {"tiny_sd15": ((1, 5, 768), None), "tiny_sd3": ((1, 5, 32), (1, 32)),
                      "tiny_sdxl": ((1, 5, 2048), (1, 1280))}


def test_same_seed_same_bits_other_seed_other_code(nodes, models):
    cyc, _B = nodes
    m = models["tiny_sdxl"]
    cond = cyc.EmptyConditioning.execute(m, 4).result[0]
    lat = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    with torch.inference_mode():
        a = cyc.DPMEncode.execute(m, cond, cond, lat, 5, 4, "karras", 0.8, 0.2, 1.0).result[0]
        b = cyc.DPMEncode.execute(m, cond, cond, lat, 5, 4, "karras", 0.8, 0.2, 1.0).result[0]
        c = cyc.DPMEncode.execute(m, cond, cond, lat, 6, 4, "karras", 0.8, 0.2, 1.0).result[0]
        rec = cyc.ReplayLatentWithPrompt.execute(m, cond, cond, a, 1.0).result[0]["samples"]
    for k in ("start_noise", "noises", "residual", "start_mean"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert not torch.equal(a.noises, c.noises)
    assert float((rec - lat["samples"]).norm() / lat["samples"].norm()) < 1e-5


def test_sigmas_input_overrides_the_schedule(nodes, models):
    cyc, B = nodes
    m = models["tiny_sd3"]
    cond = cyc.EmptyConditioning.execute(m, 4).result[0]
    lat = {"samples": torch.randn(1, 16, 8, 8)}
    sig = torch.tensor([0.9, 0.6, 0.3, 0.0])
    with torch.inference_mode():
        code = cyc.DPMEncode.execute(m, cond, cond, lat, 0, 50, "simple", 0.7, 0.1, 1.0, sigmas=sig).result[0]
    assert code.steps == 3 and torch.allclose(code.sigmas.float(), sig)
    with pytest.raises(B.NodeInputError, match="end at 0"):
        with torch.inference_mode():
            cyc.DPMEncode.execute(m, cond, cond, lat, 0, 50, "simple", 0.7, 0.1, 1.0, sigmas=sig[:-1])


def _refused_encode(cyc, B, m, cond, lat, three):
    """Each refusal a node makes of bad input, with the words its message must say."""
    return {
        "positive batch": (lambda: cyc.DPMEncode.execute(m, three, cond, lat, 0, 4, "normal", 1.0, 0.1, 1.0),
                           "positive: conditioning has batch 3 but the latent batch is 2"),
        "eta zero": (lambda: cyc.DPMEncode.execute(m, cond, cond, lat, 0, 4, "normal", 1.0, 0.0, 1.0),
                     "eta must be > 0"),
        "video latent": (lambda: cyc.DPMEncode.execute(m, cond, cond, {"samples": torch.randn(1, 4, 2, 8, 8)}, 0, 4,
                                                       "normal", 1.0, 0.1, 1.0), "takes image latents"),
        "negative batch": (lambda: cyc.ReplayLatentWithPrompt.execute(
            m, cond, three, cyc.DPMEncode.execute(m, cond, cond, lat, 0, 4, "normal", 1.0, 0.1, 1.0).result[0], 1.0),
            "negative: conditioning has batch 3 but the latent batch is 2"),
        "denoise zero": (lambda: B.schedule(m, "normal", 4, 0.0), "steps: must be >= 1|denoise"),
    }


@pytest.mark.parametrize("case", ["positive batch", "eta zero", "video latent", "negative batch", "denoise zero"])
def test_node_errors_name_the_input(nodes, models, case):
    cyc, B = nodes
    m = models["tiny_sd15"]
    cond = cyc.EmptyConditioning.execute(m, 4).result[0]
    lat = {"samples": torch.randn(2, 4, 8, 8)}
    three = [[torch.zeros(3, 4, 768), {}]]
    call, message = _refused_encode(cyc, B, m, cond, lat, three)[case]
    with torch.inference_mode():
        with pytest.raises(B.NodeInputError, match=message):
            call()


def test_clip_folders_follow_links_and_survive_loops(pack, tmp_path):
    """Model folders are often symbolic links (the demo installs its CLIP as one)."""
    import os

    import folder_paths

    cm = importlib.import_module("dpm_latent.nodes.bridge.clip_models")
    real = tmp_path / "store" / "my_clip"
    real.mkdir(parents=True)
    (real / "config.json").write_text("{}")
    root = tmp_path / "clip_energy"
    root.mkdir()
    os.symlink(real, root / "linked_clip")
    os.symlink(root, root / "loop")  # a link loop must not hang /object_info
    paths = folder_paths.folder_names_and_paths["clip_energy"][0]
    paths.append(str(root))
    try:
        found = cm.clip_folders()
    finally:
        paths.remove(str(root))
    assert "linked_clip" in found


def test_inpainting_model_with_a_mask_needs_its_image_on_both_prompts(nodes, tmp_path):
    """An inpainting checkpoint (9 input channels) with a noise mask reads the masked image from the
    conditioning; a prompt without it would be shown the latent being sampled (the source when encoding, a
    placeholder when replaying), so DPM Encode refuses it naming the prompt and InpaintModelConditioning.
    With the image on both prompts, as that node makes them, encode -> masked replay is exact."""
    import comfy.sd
    from dpmtools import tiny_models

    cyc, _B = nodes
    path = tiny_models.make_sd15_checkpoint(tmp_path / "tiny_sd15_inpaint.safetensors", seed=0, inpaint=True)
    with torch.inference_mode():
        model, _c, _vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=False)
    assert set(model.model.concat_keys) == {"mask", "masked_image"}
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 8, 8, generator=g)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    latent = {"samples": x0, "noise_mask": mask}
    with torch.inference_mode():
        bare = cyc.EmptyConditioning.execute(model, 4).result[0]
        with pytest.raises(ValueError, match="positive: this inpainting model .*InpaintModelConditioning"):
            cyc.DPMEncode.execute(model, bare, bare, latent, 1, 6, "normal", 0.7, 0.1, 2.0)
        # what InpaintModelConditioning gives: the masked image latent and the mask on both prompts
        extra = {"concat_latent_image": x0 * (1 - mask), "concat_mask": mask}
        both = [[bare[0][0], dict(bare[0][1], **extra)]]
        code = cyc.DPMEncode.execute(model, both, both, latent, 1, 6, "normal", 0.7, 0.1, 2.0).result[0]
        rec = cyc.ReplayLatentWithPrompt.execute(model, both, both, code, 2.0).result[0]["samples"]
    assert float((rec - x0).norm() / x0.norm()) <= 1e-4
    assert "concat_latent_image" not in bare[0][1]   # the input conditioning is not changed
