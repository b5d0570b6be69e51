# SPDX-License-Identifier: GPL-3.0-or-later
"""Asyrp beyond the paper's U-Nets, in-process with ComfyUI's own networks: h-space at the middle joint
block of SD3's MMDiT (patches_replace["dit"]) and of Flux.1, and at the middle block of a diffusers
UNet2DModel pixel DDPM (Load Diffusers DDPM)."""
from __future__ import annotations

import importlib

import pytest
import torch


@pytest.fixture(scope="module")
def AN(pack, model_dirs):
    import folder_paths

    folder_paths.add_model_folder_path("diffusers", str(model_dirs["diffusers"]))
    return importlib.import_module("dpm_latent.nodes.bridge.hspace")


@pytest.fixture(scope="module")
def nodes(pack):
    return (importlib.import_module("dpm_latent.nodes.latent_codes"),
            importlib.import_module("dpm_latent.nodes.bridge.sampling"),
            importlib.import_module("dpm_latent.nodes.diffusers_ddpm"),
            importlib.import_module("dpm_latent.nodes.asyrp"))


@pytest.fixture(scope="module")
def models(model_dirs, nodes):
    import comfy.sd

    out = {}
    with torch.inference_mode():
        for name in ("tiny_sd3", "tiny_sd15"):
            m, _c, vae, _ = comfy.sd.load_checkpoint_guess_config(
                str(model_dirs["checkpoints"] / f"{name}.safetensors"), output_vae=True, output_clip=False)
            out[name] = m
        out["tiny_ddpm_eps"] = nodes[2].LoadDiffusersDDPM.execute("tiny_ddpm_eps").result[0]
    return out


def _random_direction(AN, rec, h_shape, std=0.5, seed=0):
    AS = importlib.import_module("dpm_latent.samplers.asyrp")
    torch.manual_seed(seed)
    blk = AS.DeltaBlock(h_shape[0])
    torch.nn.init.normal_(blk.conv_out.weight, std=std)
    meta = {k: rec[k] for k in ("architecture", "unet", "latent_format", "family", "h_site", "h_block")}
    meta.update(h_shape=list(h_shape), t_edit=0.5, t_boost=0.0)
    return AS.Direction([blk], [1.0], meta)


def test_model_records_name_the_h_site(AN, models):
    sd3 = AN.model_record(models["tiny_sd3"])
    net = models["tiny_sd3"].model.diffusion_model
    assert sd3["h_site"] == AN.DIT_SITE and sd3["h_block"] == len(net.joint_blocks) // 2
    assert sd3["h_channels"] == net.hidden_size and sd3["family"] == "flow"
    sd15 = AN.model_record(models["tiny_sd15"])
    assert sd15["h_site"] == AN.UNET_SITE and sd15["h_block"] is None
    ddpm = AN.model_record(models["tiny_ddpm_eps"])
    unet = models["tiny_ddpm_eps"].model.diffusion_model.unet
    assert ddpm["h_site"] == AN.UNET_SITE and ddpm["h_channels"] == unet.config.block_out_channels[-1]


def test_unsupported_networks_get_an_error_naming_their_type(AN, models):
    m = models["tiny_sd3"].clone()
    real = m.model.diffusion_model
    try:
        m.model.diffusion_model = torch.nn.Linear(2, 2)
        with pytest.raises(Exception, match="Linear") as err:
            AN.model_record(m)
        assert "SD3 MMDiT" in str(err.value) and "model:" in str(err.value)
    finally:
        m.model.diffusion_model = real


@pytest.mark.parametrize("name", ["tiny_sd3", "tiny_ddpm_eps"])
def test_patch_sees_h_and_zero_strength_is_bit_exact(AN, nodes, models, name):
    """The patched clone computes exactly what the model computes until the shift is active; an active
    shift changes the output; the caller's model never carries the patch."""
    cyc, B, _, _ = nodes
    model = models[name]
    work, shift = AN.patched(model)
    opts = model.model_options.get("transformer_options", {})   # the caller's model carries no patch
    assert "dit" not in opts.get("patches_replace", {}) and not opts.get("patches", {}).get("output_block_patch")
    ours = work.model_options["transformer_options"]
    assert ("dit" in ours.get("patches_replace", {})) == (name == "tiny_sd3")
    cond = cyc.EmptyConditioning.execute(model, 1).result[0]
    x = torch.randn(2, *((16, 8, 8) if name == "tiny_sd3" else (3, 16, 16)), generator=torch.Generator().manual_seed(0))
    family = B.family_of(model)
    sigmas = B.schedule(model, "normal", 4, 1.0)
    out = {}

    def work_fn(denoise_fn, x0, _cb, _g):
        s = float(sigmas[1])
        out["plain"] = denoise_fn(x0, s)
        rec = AN.model_record(model)
        shift.direction = _random_direction(AN, rec, shift.h_shape)
        shift.strengths = torch.zeros(x0.shape[0])
        out["zero"] = shift.run(denoise_fn, x0, s, family)
        shift.strengths = torch.tensor([1.0, -1.0])
        out["edit"] = shift.run(denoise_fn, x0, s, family)
        out["after"] = denoise_fn(x0, s)
        return x0

    with torch.inference_mode():
        B.run_in_comfy(work, cond, cond, 1.0, x, sigmas, work_fn, 0, None)
    if name == "tiny_sd3":
        net = model.model.diffusion_model
        tokens = (8 // 2) * (8 // 2)
        assert shift.h_shape == (net.hidden_size, tokens, 1)
    assert torch.equal(out["zero"], out["plain"]) and torch.equal(out["after"], out["plain"])
    d_plus, d_minus = out["edit"][0] - out["plain"][0], out["edit"][1] - out["plain"][1]
    assert d_plus.abs().max() > 1e-4 and d_minus.abs().max() > 1e-4


@pytest.mark.parametrize("name", ["tiny_sd3", "tiny_ddpm_eps"])
def test_asyrp_edit_strength_zero_is_the_replay_and_directions_check_the_site(AN, nodes, models, name):
    cyc, B, _, _ = nodes
    model = models[name]
    cond = cyc.EmptyConditioning.execute(model, 1).result[0]
    shape = (2, 16, 8, 8) if name == "tiny_sd3" else (2, 3, 16, 16)
    lat = {"samples": torch.randn(*shape, generator=torch.Generator().manual_seed(1))}
    rec = AN.model_record(model)
    h_shape = (rec["h_channels"], 16, 1) if name == "tiny_sd3" else (rec["h_channels"], 4, 4)
    direction = _random_direction(AN, rec, h_shape, std=0.02)   # small: the linear regime, where -1 reverses
    with torch.inference_mode():
        code = cyc.DPMEncode.execute(model, cond, cond, lat, 0, 6, "normal", 1.0, 0.1, 1.0).result[0]
        replay = cyc.ReplayLatentWithPrompt.execute(model, cond, cond, code, 1.0).result[0]["samples"]
        zero = nodes[3].AsyrpEdit.execute(model, cond, cond, 1.0, code, direction, "0", 0.5, 0.0, 0).result[0]["samples"]
        both = nodes[3].AsyrpEdit.execute(model, cond, cond, 1.0, code, direction, "1, -1", 0.5, 0.0, 0).result[0]["samples"]
    assert torch.equal(zero, replay)
    plus, minus = both[:2] - replay, both[2:] - replay
    assert plus.abs().max() > 1e-5 and float((plus * minus).sum()) < 0   # -1 moves the other way
    # a direction of another h site / model is refused by name
    other = models["tiny_sd15"]
    with pytest.raises(Exception, match="direction: it was trained on a model with (model type|network layout)"):
        AN.check_direction_for_model(other, direction)


def test_flux_double_block_patch(AN):
    """Flux.1's own network (ComfyUI's flux/model.py, tiny random weights): the patch at the middle double
    block sees the image tokens as (hidden, tokens, 1) and an inactive or zero shift changes no bit."""
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    torch.manual_seed(0)
    net = Flux(in_channels=4, out_channels=4, vec_in_dim=8, context_in_dim=8, hidden_size=32, mlp_ratio=2.0,
               num_heads=2, depth=3, depth_single_blocks=1, axes_dim=[4, 6, 6], theta=10000, patch_size=2,
               qkv_bias=True, guidance_embed=False, operations=comfy.ops.disable_weight_init)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    assert AN.h_site(type("Base", (), {"diffusion_model": net})())[:2] == (AN.DIT_SITE, 1)
    shift = AN.HShift()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ctx = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(3))
    y = torch.randn(2, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0.5, 0.5])

    def run(patch):
        opts = {"patches_replace": {"dit": {("double_block", 1): shift.dit_block}}} if patch else {}
        with torch.no_grad():
            return net(x, t, ctx, y=y, transformer_options=opts)

    plain, inactive = run(False), run(True)
    assert shift.h_shape == (32, 16, 1) and torch.equal(plain, inactive)
    AS = importlib.import_module("dpm_latent.samplers.asyrp")
    blk = AS.DeltaBlock(32)
    torch.nn.init.normal_(blk.conv_out.weight, std=0.5)
    shift.direction = AS.Direction([blk], [1.0], {})
    shift.active, shift.level = True, 0.0
    shift.strengths = torch.zeros(2)
    assert torch.equal(run(True), plain)
    shift.strengths = torch.ones(2)
    assert (run(True) - plain).abs().max() > 1e-4


def test_dit_patch_keeps_a_patch_already_on_its_block(AN, nodes, models):
    """Another pack's replace patch on the same joint block still runs (first), and the shift applies after it."""
    cyc, B, _, _ = nodes
    model = models["tiny_sd3"]
    rec = AN.model_record(model)
    calls = []

    def other(args, extra):
        calls.append(1)
        out = extra["original_block"](args)
        return {"txt": out["txt"], "img": out["img"] * 1.5}

    patched_by_other = model.clone()
    patched_by_other.set_model_patch_replace(other, "dit", "double_block", rec["h_block"])
    work, shift = AN.patched(patched_by_other)
    assert shift.inner is other
    cond = cyc.EmptyConditioning.execute(model, 1).result[0]
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = B.schedule(model, "normal", 4, 1.0)
    out = {}

    def work_fn(denoise_fn, x0, _cb, _g):
        out["with"] = denoise_fn(x0, float(sigmas[1]))
        return x0

    def plain_fn(denoise_fn, x0, _cb, _g):
        out["plain"] = denoise_fn(x0, float(sigmas[1]))
        return x0

    with torch.inference_mode():
        B.run_in_comfy(work, cond, cond, 1.0, x, sigmas, work_fn, 0, None)
        B.run_in_comfy(patched_by_other, cond, cond, 1.0, x, sigmas, plain_fn, 0, None)
    assert calls and torch.equal(out["with"], out["plain"])   # inactive shift: exactly the other patch's result


@pytest.mark.parametrize("name", ["tiny_sd3", "tiny_ddpm_eps"])
def test_direction_from_examples_is_the_mean_h_difference_and_edits_like_a_trained_one(AN, nodes, models, name,
                                                                                      tmp_path):
    """Asyrp Direction From Examples: delta_h at step i is mean h(with) - mean h(without) along their DDIM
    chains (read through the same patch Edit uses); the same set on both sides is no edit; the direction
    saves, loads, combines and edits (strength 0: the replay, bit for bit)."""
    cyc, _B, _, asy = nodes
    AS = importlib.import_module("dpm_latent.samplers.asyrp")
    FMT = importlib.import_module("dpm_latent.samplers.asyrp_format")
    model = models[name]
    cond = cyc.EmptyConditioning.execute(model, 1).result[0]
    shape = (3, 16, 8, 8) if name == "tiny_sd3" else (3, 3, 16, 16)
    g = torch.Generator().manual_seed(5)
    with_ = {"samples": torch.randn(*shape, generator=g)}
    without = {"samples": torch.randn(*shape, generator=g) * 0.5}
    with torch.inference_mode():
        d = asy.AsyrpDirectionFromExamples.execute(model, with_, without, 6, 0.5, cond).result[0]
        same = asy.AsyrpDirectionFromExamples.execute(model, with_, with_, 6, 0.5).result[0]
    rec = AN.model_record(model)
    assert d.meta["h_site"] == rec["h_site"] and d.meta["kind"] == "from examples"
    n_edit = AS.edited_steps(6, 0.5)
    assert len(d.meta["delta_over_h"]) == n_edit and all(0 < r < 10 for r in d.meta["delta_over_h"])
    term = d.terms[0]
    assert term.h_shape == (rec["h_channels"], 1, 1)           # one shift per channel, every position
    assert float(term.delta[:n_edit].abs().max()) > 0 and float(term.delta[n_edit:].abs().max()) == 0
    assert float(same.terms[0].delta.abs().max()) == 0.0

    # h read independently: the patched model on the DDIM chain of each set, step 0 (x_T)
    work, shift = AN.patched(model, rec)
    sigmas = _B.schedule(model, "normal", 6, 1.0)
    means = {}

    def work_fn(denoise_fn, x0, _cb, _guider):
        for key, lat in (("with", x0[:3]), ("without", x0[3:])):
            x_T = AS.ddim_invert(denoise_fn, lat.float(), sigmas, rec["family"])
            means[key] = shift.read(lambda: denoise_fn(x_T, float(sigmas[0]))).float().mean(0)
        return x0
    with torch.inference_mode():
        _B.run_in_comfy(work, cond, cond, 1.0, torch.cat([with_["samples"], without["samples"]]), sigmas, work_fn, 0, None)
    want = (means["with"] - means["without"]).mean(dim=(1, 2))
    assert torch.allclose(term.delta[0].flatten(), want, atol=1e-4 * float(want.abs().max()) + 1e-6)

    path = tmp_path / ("ex" + FMT.SUFFIX)
    FMT.save_direction(d, path)
    back = FMT.load_direction(path)
    assert torch.equal(back.terms[0].delta, term.delta) and back.meta["delta_over_h"] == d.meta["delta_over_h"]
    both = asy.CombineAsyrpDirections.execute(back, 0.5, d, 0.5).result[0]
    lat = {"samples": torch.randn(*((2,) + shape[1:]), generator=g)}
    with torch.inference_mode():
        code = cyc.DPMEncode.execute(model, cond, cond, lat, 0, 6, "normal", 1.0, 0.1, 1.0).result[0]
        replay = cyc.ReplayLatentWithPrompt.execute(model, cond, cond, code, 1.0).result[0]["samples"]
        out = asy.AsyrpEdit.execute(model, cond, cond, 1.0, code, both, "0, 1", -1.0, 0.0, 0).result[0]["samples"]
        one = asy.AsyrpEdit.execute(model, cond, cond, 1.0, code, d, "1", -1.0, 0.0, 0).result[0]["samples"]
        zero = asy.AsyrpEdit.execute(model, cond, cond, 1.0, code, both, "0", -1.0, 0.0, 0).result[0]["samples"]
    assert torch.equal(zero, replay)                            # strength 0: the replay, bit for bit
    assert torch.allclose(out[:2], replay, atol=1e-3) and (out[2:] - replay).abs().max() > 1e-4
    assert torch.allclose(out[2:], one, atol=1e-3)            # 0.5 d + 0.5 d = d
    with pytest.raises(Exception, match="latents_without"):
        asy.AsyrpDirectionFromExamples.execute(model, with_, {"samples": torch.randn(*shape[:2], 4, 4)}, 6, 0.5)


def test_wan_video_dit_middle_block(AN, nodes, model_dirs):
    """Wan 2.1's own video DiT (tiny, random; UNETLoader's loader): h is the video-token output of the middle
    block (patches_replace["dit"]), one token per latent frame x 2 x 2 patch; AsyrpEdit at strength 0 is the
    replay bit for bit, a direction moves it (the other way at -1), another model's direction is refused."""
    import comfy.sd

    cyc, B, _, asyrp = nodes
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model(str(model_dirs["diffusion_models"] / "tiny_wan21.safetensors"))
    rec = AN.model_record(model)
    net = model.model.diffusion_model
    assert rec["h_site"] == AN.DIT_SITE and rec["h_block"] == len(net.blocks) // 2 == 1
    assert rec["h_channels"] == net.dim and rec["family"] == "flow" and rec["latent_format"] == "Wan21"
    cond = cyc.EmptyConditioning.execute(model, 4).result[0]
    T, H, W = 3, 4, 4
    lat = {"samples": torch.randn(2, 16, T, H, W, generator=torch.Generator().manual_seed(1))}
    work, shift = AN.patched(model)
    sigmas = B.schedule(model, "simple", 4, 1.0)
    with torch.inference_mode():
        B.run_in_comfy(work, cond, cond, 1.0, lat["samples"], sigmas,
                       lambda d, x0, _c, _g: d(x0, float(sigmas[1])), 0, None)
    assert shift.h_shape == (net.dim, T * (H // 2) * (W // 2), 1)
    direction = _random_direction(AN, rec, shift.h_shape, std=0.02)
    with torch.inference_mode():
        code = cyc.DPMEncode.execute(model, cond, cond, lat, 0, 6, "simple", 1.0, 0.1, 1.0).result[0]
        replay = cyc.ReplayLatentWithPrompt.execute(model, cond, cond, code, 1.0).result[0]["samples"]
        zero = asyrp.AsyrpEdit.execute(model, cond, cond, 1.0, code, direction, "0", 0.5, 0.0, 0).result[0]["samples"]
        both = asyrp.AsyrpEdit.execute(model, cond, cond, 1.0, code, direction, "1, -1", 0.5, 0.0, 0).result[0]["samples"]
    assert (replay - lat["samples"]).norm() / lat["samples"].norm() <= 1e-4
    assert torch.equal(zero, replay)
    plus, minus = both[:2] - replay, both[2:] - replay
    assert plus.abs().max() > 1e-5 and float((plus * minus).sum()) < 0
    # a direction from example clips (no CLIP) applies too; CLIP training on clips is refused with the reason
    g = torch.Generator().manual_seed(2)
    with_attr = {"samples": torch.randn(2, 16, T, H, W, generator=g) + 0.5}
    without = {"samples": torch.randn(2, 16, T, H, W, generator=g) - 0.5}
    with torch.inference_mode():
        ex = asyrp.AsyrpDirectionFromExamples.execute(model, with_attr, without, 6, 0.5).result[0]
        moved = asyrp.AsyrpEdit.execute(model, cond, cond, 1.0, code, ex, "1", -1.0, 0.0, 0).result[0]["samples"]
    assert ex.meta["h_site"] == AN.DIT_SITE and (moved - replay).abs().max() > 1e-4
    with pytest.raises(Exception, match="not defined for video clips"):
        asyrp.AsyrpTrainDirection.execute(model, None, lat, "tiny_clip", "a", "b", 4, 0.5, 1, 1.0, 1.0, 1.0, 0,
                                          "global direction")
    interval = importlib.import_module("dpm_latent.nodes.bridge.interval_run")
    with pytest.raises(Exception, match="not defined for video clips"):
        interval.measure(model, None, lat, "tiny_clip", "a", "b", 4, "clip", 0.3, 0.2, 0.5, 0.5)
    with torch.inference_mode():
        sd3 = comfy.sd.load_checkpoint_guess_config(str(model_dirs["checkpoints"] / "tiny_sd3.safetensors"),
                                                   output_vae=False, output_clip=False)[0]
    with pytest.raises(Exception, match="direction: it was trained on a model with model type"):
        AN.check_direction_for_model(sd3, direction)
