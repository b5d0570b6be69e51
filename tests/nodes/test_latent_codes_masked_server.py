# SPDX-License-Identifier: GPL-3.0-or-later
"""Masked edits through a real ComfyUI server (Set Latent Noise Mask -> DPM Encode -> Replay) and
in-process with ComfyUI's loaded models: eps, v and flow, cfg > 1, batch 2, override, soft masks."""
from __future__ import annotations

import importlib

import pytest
import torch

from dpmtools.graphs import Graph, saved_latents, write_latent

SIZE = 64  # image pixels; the tiny models' latents are SIZE // 8


def _half_mask(g, value=1.0):
    """Image-sized MASK: the left half is `value`, the right half 0 (core ComfyUI mask nodes)."""
    base = g.node("SolidMask", value=0.0, width=SIZE, height=SIZE)
    left = g.node("SolidMask", value=value, width=SIZE // 2, height=SIZE)
    return g.node("MaskComposite", destination=base.out(0), source=left.out(0), x=0, y=0, operation="add")


def _text(g, model_ckpt, flow):
    if flow:
        e = g.node("EmptyConditioning", model=model_ckpt, tokens=77)
        tgt = g.node("ConditioningSetAreaPercentage", conditioning=e.out(0), width=0.5, height=1.0, x=0.0, y=0.0,
                     strength=1.0)
        return e, e, tgt
    clip = g.node("CLIPLoader", clip_name="tiny_clip_l.safetensors", type="stable_diffusion")
    src = g.node("CLIPTextEncode", text="a photo of a cat", clip=clip.out(0))
    neg = g.node("CLIPTextEncode", text="blurry", clip=clip.out(0))
    tgt = g.node("CLIPTextEncode", text="an oil painting of a dog", clip=clip.out(0))
    return src, neg, tgt


@pytest.mark.parametrize("kind", ["eps", "v_prediction", "flow"])
def test_masked_edit_through_the_server(server, kind):
    flow = kind == "flow"
    ch = 16 if flow else 4
    x0 = torch.randn(2, ch, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(11))
    name = write_latent(server.input_dir, f"masked_{kind}", x0)
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd3.safetensors" if flow else "tiny_sd15.safetensors")
    model = ckpt.out(0)
    if kind == "v_prediction":
        model = g.node("ModelSamplingDiscrete", model=model, sampling="v_prediction", zsnr=False).out(0)
    if flow:
        model = g.node("ModelSamplingSD3", model=model, shift=3.0).out(0)
    src, neg, tgt = _text(g, model, flow)
    lat = g.node("LoadLatent", latent=name)
    mask = _half_mask(g)
    masked = g.node("SetLatentNoiseMask", samples=lat.out(0), mask=mask.out(0))
    enc = g.node("DPMEncode", model=model, positive=src.out(0), negative=neg.out(0), latent_image=masked.out(0),
                 seed=5, steps=8, scheduler="simple" if flow else "normal", denoise=0.8, eta=0.1, cfg=2.0)
    reps = {
        "same": dict(positive=src.out(0), cfg=2.0),
        "edit": dict(positive=tgt.out(0), cfg=4.0),
        # the Replay mask overrides the code's: the right half may change, the left is kept
        "override": dict(positive=tgt.out(0), cfg=4.0, mask=g.node("InvertMask", mask=mask.out(0)).out(0)),
        # a soft mask everywhere: between the source and the full edit
        "soft": dict(positive=tgt.out(0), cfg=4.0, mask=g.node("SolidMask", value=0.5, width=SIZE,
                                                               height=SIZE).out(0)),
        "full": dict(positive=tgt.out(0), cfg=4.0, mask=g.node("SolidMask", value=1.0, width=SIZE,
                                                               height=SIZE).out(0)),
    }
    ids = {}
    for k, kw in reps.items():
        rep = g.node("ReplayLatentWithPrompt", model=model, negative=neg.out(0), latent_code=enc.out(0), **kw)
        ids[k] = g.node("SaveLatent", samples=rep.out(0), filename_prefix=f"masked_{kind}_{k}").id
    entry = server.run(g.prompt())
    out = {k: saved_latents(server, entry, v) for k, v in ids.items()}
    left = torch.zeros_like(x0, dtype=torch.bool)
    left[..., : SIZE // 16] = True  # latent columns 0-3 of 8
    right = ~left
    # the same prompt and cfg: the image back
    torch.testing.assert_close(out["same"], x0, rtol=0, atol=1e-4)
    # the new prompt changes only the masked (left) half; the right is the source chain's end, bit for bit
    assert torch.equal(out["edit"][right], out["same"][right])
    assert float((out["edit"][left] - x0[left]).abs().mean()) > 0.05
    # override: the inverted mask keeps the left half instead
    assert torch.equal(out["override"][left], out["same"][left])
    assert float((out["override"][right] - x0[right]).abs().mean()) > 0.05
    # a mask of ones is the plain edit; 0.5 lands between the source and the plain edit
    full_change = float((out["full"] - x0).abs().mean())
    soft_change = float((out["soft"] - x0).abs().mean())
    assert 0.02 * full_change < soft_change < 0.9 * full_change, (soft_change, full_change)
    # and the two images of the batch are edited as two images
    assert not torch.equal(out["edit"][0], out["edit"][1])


@pytest.fixture(scope="module")
def sd15(model_dirs):
    import comfy.sd

    with torch.inference_mode():
        m, _c, _vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(model_dirs["checkpoints"] / "tiny_sd15.safetensors"), output_vae=False, output_clip=False)
    return m


def test_every_step_outside_the_mask_is_the_source_chain_in_comfy(pack, sd15):
    """In-process with ComfyUI's model and guider: each replayed state, cfg 3 with a different
    conditioning, equals the encoder's state outside the mask."""
    cyc = importlib.import_module("dpm_latent.nodes.latent_codes")
    B = importlib.import_module("dpm_latent.nodes.bridge.sampling")
    S = pack.samplers
    cond = cyc.EmptyConditioning.execute(sd15, 6).result[0]
    other = [[torch.full_like(cond[0][0], 0.3), {}]]
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 16:48, 8:40] = 1.0
    with torch.inference_mode():
        code = cyc.DPMEncode.execute(sd15, cond, cond, {"samples": x0, "noise_mask": mask}, 3, 6, "normal",
                                     0.9, 0.1, 1.0).result[0]
    assert code.mask.shape == (2, 1, 8, 8)
    assert torch.equal(code.mask[0, 0], S.latent_mask(mask, code.shape)[1, 0])
    seen = []

    def work(denoise_fn, x, _callback, _guider):
        c = code.to(device=x.device)
        return S.replay(denoise_fn, c, callback=lambda i, d, xi, n: seen.append(xi.cpu().clone()))

    with torch.inference_mode():
        out = B.run_in_comfy(sd15, other, cond, 3.0, torch.zeros(code.shape), code.sigmas, work, 0, None)
    outside = (code.mask == 0).expand(code.shape)
    assert len(seen) == code.steps
    for i, x in enumerate(seen):
        assert torch.equal(x[outside], code.trajectory[i][outside]), i
    lat_out = sd15.model.process_latent_out(code.trajectory[-1])
    assert torch.equal(out[outside], lat_out[outside])
    assert float((out[~outside] - x0[~outside]).abs().mean()) > 0.05


def test_bad_masks_give_clear_errors(server):
    from dpmtools.server import PromptError

    x0 = torch.randn(1, 16, 8, 8)
    write_latent(server.input_dir, "masked_err", x0)
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd3.safetensors")
    e = g.node("EmptyConditioning", model=ckpt.out(0), tokens=8)
    code = g.node("RandomLatentCode", model=ckpt.out(0), width=SIZE, height=SIZE, batch_size=1, seed=0, steps=4,
                  scheduler="simple", eta=0.1)
    m = g.node("SolidMask", value=1.0, width=SIZE, height=SIZE)
    rep = g.node("ReplayLatentWithPrompt", model=ckpt.out(0), positive=e.out(0), negative=e.out(0),
                 latent_code=code.out(0), cfg=1.0, mask=m.out(0))
    g.node("SaveLatent", samples=rep.out(0), filename_prefix="never")
    with pytest.raises(PromptError) as ei:
        server.run(g.prompt())
    assert "mask" in str(ei.value) and "Random Latent Code" in str(ei.value) and "DPM Encode" in str(ei.value)
    assert server.alive()


@pytest.mark.parametrize("memory", ["low: recompute each step", "fast: keep the whole chain"])
def test_masked_langevin_with_comfy_models_moves_only_the_masked_region(pack, model_dirs, memory):
    """Langevin Latent Sampler's work on a masked code from DPM Encode, tiny SD3 (flow) + tiny CLIP:
    outside the mask the result and the code stay the source's, inside the energy moves them (both
    gradient paths)."""
    import comfy.sd
    import folder_paths

    cyc = importlib.import_module("dpm_latent.nodes.latent_codes")
    gn = importlib.import_module("dpm_latent.nodes.clip_guidance")
    lr = importlib.import_module("dpm_latent.nodes.bridge.langevin_run")
    paths = folder_paths.folder_names_and_paths["clip_energy"][0]
    if str(model_dirs["clip_energy"]) not in paths:
        paths.append(str(model_dirs["clip_energy"]))
    with torch.inference_mode():
        model, _clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(model_dirs["checkpoints"] / "tiny_sd3.safetensors"), output_vae=True, output_clip=False)
    cond = [[torch.zeros(1, 8, 32), {"pooled_output": torch.zeros(1, 32)}]]
    x0 = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(9))
    mask = torch.zeros(1, 32, 32)
    mask[:, :, :16] = 1.0
    with torch.inference_mode():
        code = cyc.DPMEncode.execute(model, cond, cond, {"samples": x0, "noise_mask": mask}, 1, 4, "simple", 0.8,
                                     0.3, 1.0).result[0]
        energy = gn.CLIPEnergy.execute("tiny_clip", "a red square", 2000.0, 2, False, False, False,
                                       False).result[0]
        new, lat, _plot, trace = lr.run_langevin(model, cond, cond, 1.0, vae, energy, code, 3, 0.05, 0,
                                                 "all components", memory)
    out = lat["samples"]
    outside = (code.mask == 0).expand(code.shape)
    assert outside.any() and (~outside).any()
    src_end = model.model.process_latent_out(code.trajectory[-1])
    assert torch.equal(out[outside], src_end[outside])
    assert float((out[~outside] - x0[~outside]).abs().max()) > 1e-3
    assert torch.equal(new.start_noise[outside], code.start_noise[outside])
    assert torch.equal(new.noises[:, outside], code.noises[:, outside])
    assert not torch.equal(new.start_noise[~outside], code.start_noise[~outside])
    assert new.mask is not None and torch.equal(new.trajectory, code.trajectory)
    assert len(trace.energy) == 3
