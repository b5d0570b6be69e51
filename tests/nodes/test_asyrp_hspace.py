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


def _with_site(direction, site):
    """A copy of ``direction`` whose record names another h site."""
    AS = importlib.import_module("dpm_latent.samplers.asyrp")
    return AS.Direction(list(direction.terms), list(direction.coefs), {**direction.meta, "h_site": site})


def _zero_is_exact_and_one_moves(AS, shift, blk, run, plain):
    """With ``blk`` as the direction on an active ``shift``: strength 0 gives ``plain`` bit for bit, strength 1
    moves the output. ``run()`` evaluates the network with the patch."""
    shift.direction = AS.Direction([blk], [1.0], {})
    shift.active, shift.level = True, 0.0
    shift.strengths = torch.zeros(2)
    assert torch.equal(run(), plain)
    shift.strengths = torch.ones(2)
    assert (run() - plain).abs().max() > 1e-4


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
    _zero_is_exact_and_one_moves(AS, shift, blk, lambda: run(True), plain)


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


def _examples_setup(nodes, models, name):
    """The nodes, samplers, model, its empty prompt and a 3-image latent shape for the From Examples tests."""
    cyc, B, _, asy = nodes
    AS = importlib.import_module("dpm_latent.samplers.asyrp")
    FMT = importlib.import_module("dpm_latent.samplers.asyrp_format")
    model = models[name]
    cond = cyc.EmptyConditioning.execute(model, 1).result[0]
    shape = (3, 16, 8, 8) if name == "tiny_sd3" else (3, 3, 16, 16)
    return cyc, B, asy, AS, FMT, model, cond, shape


def _h_on_chains(AN, AS, B, model, rec, cond, with_, without, step):
    """h at ``step`` of the deterministic DDIM chain of each example set, read through the patched model
    independently of the node: {"with": (N, C, H, W), "without": ...}."""
    work, shift = AN.patched(model, rec)
    sigmas = B.schedule(model, "normal", 6, 1.0)
    hs = {}

    def work_fn(denoise_fn, x0, _cb, _guider):
        n = with_["samples"].shape[0]
        for key, lat in (("with", x0[:n]), ("without", x0[n:])):
            x = AS.ddim_invert(denoise_fn, lat.float(), sigmas, rec["family"])
            for i in range(step + 1):
                out = {}
                h = shift.read(lambda: out.setdefault("d", denoise_fn(x, float(sigmas[i])))).float()
                a, b, _c = AS.step_coefficients(float(sigmas[i]), float(sigmas[i + 1]), 0.0, rec["family"])
                x = a * x + b * out["d"]
            hs[key] = h
        return x0
    with torch.inference_mode():
        B.run_in_comfy(work, cond, cond, 1.0, torch.cat([with_["samples"], without["samples"]]), sigmas, work_fn, 0,
                       None)
    return hs


def _code_and_replay(cyc, model, cond, shape, g):
    """DPM Encode (6 steps, eta 0.1) of two random latents of ``shape``'s size, and its plain replay."""
    lat = {"samples": torch.randn(*((2,) + shape[1:]), generator=g)}
    with torch.inference_mode():
        code = cyc.DPMEncode.execute(model, cond, cond, lat, 0, 6, "normal", 1.0, 0.1, 1.0).result[0]
        return code, cyc.ReplayLatentWithPrompt.execute(model, cond, cond, code, 1.0).result[0]["samples"]


@pytest.mark.parametrize("name", ["tiny_sd3", "tiny_ddpm_eps"])
def test_direction_from_examples_is_the_mean_h_difference_and_edits_like_a_trained_one(AN, nodes, models, name,
                                                                                      tmp_path):
    """Asyrp Direction From Examples: delta_h at step i is mean h(with) - mean h(without) along their DDIM
    chains (read through the same patch Edit uses); the same set on both sides is no edit; the direction
    saves, loads, combines and edits (strength 0: the replay, bit for bit)."""
    cyc, _B, asy, AS, FMT, model, cond, shape = _examples_setup(nodes, models, name)
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
    hs = _h_on_chains(AN, AS, _B, model, rec, cond, with_, without, 0)
    means = {k: v.mean(0) for k, v in hs.items()}
    want = (means["with"] - means["without"]).mean(dim=(1, 2))
    assert torch.allclose(term.delta[0].flatten(), want, atol=1e-4 * float(want.abs().max()) + 1e-6)

    path = tmp_path / ("ex" + FMT.SUFFIX)
    FMT.save_direction(d, path)
    back = FMT.load_direction(path)
    assert torch.equal(back.terms[0].delta, term.delta) and back.meta["delta_over_h"] == d.meta["delta_over_h"]
    both = asy.CombineAsyrpDirections.execute(back, 0.5, d, 0.5).result[0]
    code, replay = _code_and_replay(cyc, model, cond, shape, g)
    with torch.inference_mode():
        out = asy.AsyrpEdit.execute(model, cond, cond, 1.0, code, both, "0, 1", -1.0, 0.0, 0).result[0]["samples"]
        one = asy.AsyrpEdit.execute(model, cond, cond, 1.0, code, d, "1", -1.0, 0.0, 0).result[0]["samples"]
        zero = asy.AsyrpEdit.execute(model, cond, cond, 1.0, code, both, "0", -1.0, 0.0, 0).result[0]["samples"]
    assert torch.equal(zero, replay)                            # strength 0: the replay, bit for bit
    assert torch.allclose(out[:2], replay, atol=1e-3) and (out[2:] - replay).abs().max() > 1e-4
    assert torch.allclose(out[2:], one, atol=1e-3)            # 0.5 d + 0.5 d = d
    with pytest.raises(Exception, match="latents_without"):
        asy.AsyrpDirectionFromExamples.execute(model, with_, {"samples": torch.randn(*shape[:2], 4, 4)}, 6, 0.5)


@pytest.mark.parametrize("name", ["tiny_sd3", "tiny_ddpm_eps"])
def test_direction_where_pairs_differ(AN, nodes, models, name, tmp_path):
    """spread 'where pairs differ': pairs that differ in one patch give a region direction whose delta is the
    mean h difference over the region's positions (read independently here at the first shifted step),
    gated per position; the region is the patch's positions in the model's own token order (row-major for the
    MMDiT). It saves, loads, combines with a per-channel direction and edits (strength 0: the replay, bit for
    bit); unequal counts and identical pairs are refused, naming the input (video:
    test_wan_video_dit_middle_block)."""
    cyc, _B, asy, AS, FMT, model, cond, shape = _examples_setup(nodes, models, name)
    g = torch.Generator().manual_seed(11)
    without = {"samples": torch.randn(*shape, generator=g)}
    w = without["samples"].clone()
    H, W = shape[-2:]
    w[:, :, : H // 4, W // 4: 3 * W // 4] += 2.0             # the attribute: top rows, middle columns
    with_ = {"samples": w}
    with torch.inference_mode():
        d = asy.AsyrpDirectionFromExamples.execute(model, with_, without, 6, 0.5, cond, "middle",
                                                   "where pairs differ", 0.8).result[0]
    term, rec = d.terms[0], AN.model_record(model)
    assert term.kind == "region direction" and d.meta["spread"] == "where pairs differ"
    n_edit, n_skip = AS.edited_steps(6, 0.5), AS.edited_steps(6, 0.8)
    assert float(term.delta[:n_skip].abs().max()) == 0
    assert all(float(term.delta[i].abs().max()) > 0 for i in range(n_skip, n_edit))
    assert float(term.delta[n_skip:n_edit].abs().max()) > 0 and float(term.delta[n_edit:].abs().max()) == 0
    assert d.meta["delta_over_h"][:n_skip] == [0.0] * n_skip and all(0 < r < 10 for r in d.meta["delta_over_h"][n_skip:])

    # h read independently at step n_skip of the DDIM chains; the region: the corner's positions
    hs = _h_on_chains(AN, AS, _B, model, rec, cond, with_, without, n_skip)
    diff = (model.model.process_latent_in(with_["samples"]) - model.model.process_latent_in(without["samples"]))
    region = AS.pair_regions(diff.norm(dim=1, keepdim=True), hs["with"]).unsqueeze(1)
    # by hand: h's grid (gh, gw) over the latent; the patch covers its first gh/4 rows, middle gw/2 columns
    gh, gw = (4, 4) if name == "tiny_sd3" else tuple(hs["with"].shape[-2:])
    assert hs["with"].shape[-2:] == ((16, 1) if name == "tiny_sd3" else (gh, gw))
    by_hand = [r * gw + c for r in range(gh // 4) for c in range(gw // 4, 3 * gw // 4)]
    assert gh % 4 == 0 and gw % 4 == 0 and all(region[k, 0].nonzero().flatten().tolist() == by_hand for k in range(3))
    want = ((hs["with"] - hs["without"]).flatten(2) * region).sum((0, 2)) / region.sum()
    assert torch.allclose(term.delta[n_skip], want, atol=1e-4 * float(want.abs().max()) + 1e-6)

    path = tmp_path / ("pairs" + FMT.SUFFIX)
    FMT.save_direction(d, path)
    back = FMT.load_direction(path)
    assert back.terms[0].kind == "region direction" and torch.equal(back.terms[0].probe, term.probe)
    with torch.inference_mode():
        plain = asy.AsyrpDirectionFromExamples.execute(model, with_, without, 6, 0.5, cond).result[0]
    both = asy.CombineAsyrpDirections.execute(back, 1.0, plain, 0.5).result[0]
    level = float(AS.noise_level(float(d.meta["sigmas"][n_skip]), rec["family"]))
    probe_h = hs["without"][:1]
    assert torch.allclose(both.delta(probe_h, level), d.delta(probe_h, level) + 0.5 * plain.delta(probe_h, level),
                          atol=1e-6)
    both = asy.CombineAsyrpDirections.execute(back, 1.0, plain, 0.0).result[0]
    code, replay = _code_and_replay(cyc, model, cond, shape, g)
    with torch.inference_mode():
        zero = asy.AsyrpEdit.execute(model, cond, cond, 1.0, code, d, "0", -1.0, 0.0, 0).result[0]["samples"]
        one = asy.AsyrpEdit.execute(model, cond, cond, 1.0, code, d, "1", -1.0, 0.0, 0).result[0]["samples"]
        one_back = asy.AsyrpEdit.execute(model, cond, cond, 1.0, code, both, "1", -1.0, 0.0, 0).result[0]["samples"]
    assert torch.equal(zero, replay) and (one - replay).abs().max() > 1e-4
    assert torch.allclose(one_back, one, atol=1e-5)
    with pytest.raises(Exception, match="latents_without: spread 'where pairs differ' takes pairs"):
        asy.AsyrpDirectionFromExamples.execute(model, with_, {"samples": without["samples"][:2]}, 6, 0.5, None,
                                               "middle", "where pairs differ")
    with pytest.raises(Exception, match="latents_without: .* these pairs are identical"):
        asy.AsyrpDirectionFromExamples.execute(model, without, without, 6, 0.5, None, "middle", "where pairs differ")


def test_after_first_up_block_on_comfys_unet(AN):
    """h_site 'after first up block' on ComfyUI's own UNetModel (SD1.5 layout, two levels, tiny random
    weights): the patch shifts h at block ("output", num_res_blocks + 1), the first up level's upsampled
    output; inactive or zero strength changes no bit, strength 1 moves the output; the middle site still
    shifts at ("output", 0)."""
    from types import SimpleNamespace

    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    AS = importlib.import_module("dpm_latent.samplers.asyrp")
    cfg = dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=[1, 1], context_dim=8,
               transformer_depth_middle=1, adm_in_channels=None)
    torch.manual_seed(0)
    net = UNetModel(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=[1, 1],
                    channel_mult=[1, 2], num_head_channels=16, use_spatial_transformer=True, transformer_depth=[1, 1],
                    transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=8, legacy=False,
                    operations=comfy.ops.disable_weight_init)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    base = SimpleNamespace(diffusion_model=net, model_config=SimpleNamespace(unet_config=cfg))
    assert AN.h_site(base)[:2] == (AN.UNET_SITE, None)
    site, k, _layout, channels = AN.h_site(base, "after first up block")
    assert (site, k, channels) == (AN.UNET_UP_SITE, 2, 64)
    with pytest.raises(Exception, match="h_site: 'somewhere'"):
        AN.h_site(base, "somewhere")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ctx = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([500.0, 500.0])
    blk = AS.DeltaBlock(channels)
    torch.nn.init.normal_(blk.conv_out.weight, std=0.5)

    def run(shift):
        opts = {"patches": {"output_block_patch": [shift]}} if shift is not None else {}
        with torch.no_grad():
            return net(x, t, ctx, transformer_options=opts)

    plain = run(None)
    for block, hw in ((("output", k), 8), (("output", 0), 4)):
        shift = AN.HShift()
        shift.block = block
        assert torch.equal(run(shift), plain) and shift.h_shape == (channels, hw, hw)
        _zero_is_exact_and_one_moves(AS, shift, blk, lambda shift=shift: run(shift), plain)
    one_level = SimpleNamespace(diffusion_model=UNetModel(
        image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=[1], channel_mult=[1],
        num_head_channels=16, use_spatial_transformer=True, transformer_depth=[1], transformer_depth_output=[1, 1],
        transformer_depth_middle=-2, context_dim=8, legacy=False, operations=comfy.ops.disable_weight_init),
        model_config=SimpleNamespace(unet_config=dict(cfg, channel_mult=[1], num_res_blocks=[1])))
    with pytest.raises(Exception, match="single up level"):
        AN.h_site(one_level, "after first up block")


def test_after_second_up_block_on_comfys_unet_and_a_diffusers_unet(AN, models):
    """h_site 'after second up block': on ComfyUI's UNetModel (three levels, tiny random weights) the patch
    shifts h at ("output", k2), k2 = the blocks of the first two up levels, the second level's upsampled
    output; a diffusers UNet2DModel of three levels calls the same patch from a hook on up_blocks[1], at
    ("output", the resnets of up_blocks[0] and [1]). Zero strength changes no bit, strength 1 moves the
    output, and a two-level U-Net is refused naming the site to use."""
    from types import SimpleNamespace

    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from diffusers import UNet2DModel

    AS = importlib.import_module("dpm_latent.samplers.asyrp")
    DU = importlib.import_module("dpm_latent.nodes.bridge.diffusers_unet")
    cfg = dict(model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=[1, 1, 1], context_dim=8,
               transformer_depth_middle=1, adm_in_channels=None)
    torch.manual_seed(0)
    net = UNetModel(image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=[1, 1, 1],
                    channel_mult=[1, 2, 2], num_head_channels=16, use_spatial_transformer=True,
                    transformer_depth=[1, 1, 1], transformer_depth_output=[1] * 6, transformer_depth_middle=1,
                    context_dim=8, legacy=False, operations=comfy.ops.disable_weight_init)
    torch.manual_seed(1)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16, 16), norm_num_groups=4, down_block_types=("DownBlock2D",) * 3,
                       up_block_types=("UpBlock2D",) * 3)
    wrapped = DU.DiffusersUNet(unet, 3)
    with torch.no_grad():
        for p in list(net.parameters()) + list(unet.parameters()):
            p.normal_(0, 0.05)
    comfy_base = SimpleNamespace(diffusion_model=net, model_config=SimpleNamespace(unet_config=cfg))
    site, k2, _layout, c_comfy = AN.h_site(comfy_base, "after second up block")
    assert (site, k2, c_comfy) == (AN.UNET_UP2_SITE, 4, 64)
    assert AN.h_site(comfy_base, "after first up block")[1] == 2
    site, kd, _layout, c_diff = AN.h_site(SimpleNamespace(diffusion_model=wrapped), "after second up block")
    assert (site, kd, c_diff) == (AN.UNET_UP2_SITE, 4, 16)   # two resnets in each of the first two up blocks
    g = torch.Generator().manual_seed(2)
    cases = [(lambda opts, x=torch.randn(2, 4, 8, 8, generator=g), c=torch.randn(2, 3, 8, generator=g):
              net(x, torch.tensor([500.0, 500.0]), c, transformer_options=opts), k2, (c_comfy, 8, 8)),
             (lambda opts, x=torch.randn(2, 3, 16, 16, generator=g):
              wrapped(x, torch.tensor([500.0, 500.0]), transformer_options=opts), kd, (c_diff, 16, 16))]
    for call, k, h_shape in cases:
        blk = AS.DeltaBlock(h_shape[0])
        torch.nn.init.normal_(blk.conv_out.weight, std=0.5)

        def run(shift):
            with torch.no_grad():
                return call({"patches": {"output_block_patch": [shift]}} if shift is not None else {})
        plain = run(None)
        shift = AN.HShift()
        shift.block = ("output", k)
        assert torch.equal(run(shift), plain) and shift.h_shape == h_shape
        _zero_is_exact_and_one_moves(AS, shift, blk, lambda shift=shift: run(shift), plain)
    with pytest.raises(Exception, match="h_site: this U-Net has two up blocks, so nothing follows its second; use "
                                        "h_site 'after first up block' or 'middle'"):
        AN.model_record(models["tiny_ddpm_eps"], "after second up block")
    with pytest.raises(Exception, match="h_site: h site 'after second up block' exists on U-Nets only"):
        AN.model_record(models["tiny_sd3"], "after second up block")


def test_after_first_up_block_on_the_pixel_ddpm_edits_and_is_checked(AN, nodes, models):
    """The diffusers UNet2DModel at h_site 'after first up block': the direction records the site,
    Edit at strength 0 is the replay bit for bit and strength 1 moves it, the caller's model carries no
    patch, and a site the model lacks or a mix of sites is refused naming both sites."""
    cyc, B, _, asy = nodes
    model = models["tiny_ddpm_eps"]
    rec = AN.model_record(model, "after first up block")
    unet = model.model.diffusion_model.unet
    assert rec["h_site"] == AN.UNET_UP_SITE and rec["h_block"] == len(unet.up_blocks[0].resnets)
    cond = cyc.EmptyConditioning.execute(model, 1).result[0]
    g = torch.Generator().manual_seed(7)
    ex = {"samples": torch.randn(2, 3, 16, 16, generator=g)}
    lat = {"samples": torch.randn(2, 3, 16, 16, generator=g)}
    with torch.inference_mode():
        d = asy.AsyrpDirectionFromExamples.execute(model, ex, {"samples": ex["samples"] * 0.5}, 6, 0.5, cond,
                                                   "after first up block", "object").result[0]
        mid = asy.AsyrpDirectionFromExamples.execute(model, ex, {"samples": ex["samples"] * 0.5}, 6, 0.5, cond,
                                                     "middle").result[0]
        late = asy.AsyrpDirectionFromExamples.execute(model, ex, {"samples": ex["samples"] * 0.5}, 6, 0.5, cond,
                                                      "after first up block", "object", 0.7).result[0]
        centred = asy.AsyrpDirectionFromExamples.execute(model, ex, {"samples": ex["samples"] * 0.5}, 6, 0.5, cond,
                                                         "after first up block", "object, centred").result[0]
        code = cyc.DPMEncode.execute(model, cond, cond, lat, 0, 6, "normal", 1.0, 0.1, 1.0).result[0]
        replay = cyc.ReplayLatentWithPrompt.execute(model, cond, cond, code, 1.0).result[0]["samples"]
        zero = asy.AsyrpEdit.execute(model, cond, cond, 1.0, code, d, "0", 0.5, 0.0, 0).result[0]["samples"]
        one = asy.AsyrpEdit.execute(model, cond, cond, 1.0, code, d, "1", 0.5, 0.0, 0).result[0]["samples"]
        out_mid = asy.AsyrpEdit.execute(model, cond, cond, 1.0, code, mid, "1", 0.5, 0.0, 0).result[0]["samples"]
    assert d.meta["h_site"] == AN.UNET_UP_SITE and d.meta["h_block"] == rec["h_block"]
    assert d.meta["h_shape"] == [rec["h_channels"], 16, 16] and d.meta["spread"] == "object"
    assert mid.meta["h_site"] == AN.UNET_SITE and mid.meta["h_shape"] == [rec["h_channels"], 8, 8]
    # t_start 0.7 of 6 steps: the steps starting at 1 and 0.83 get no shift, the third (0.67) keeps d's
    assert float(late.terms[0].delta[:2].abs().max()) == 0.0 and late.meta["delta_over_h"][:2] == [0.0, 0.0]
    assert torch.equal(late.terms[0].delta[2], d.terms[0].delta[2]) and late.meta["t_start"] == 0.7
    # centred: the same delta, but the recorded size is the smaller shift left after the picture's mean is taken off
    assert torch.equal(centred.terms[0].delta, d.terms[0].delta) and centred.terms[0].centred
    assert all(0 < c < u for c, u in zip(centred.meta["delta_over_h"], d.meta["delta_over_h"]))
    assert torch.equal(zero, replay) and (one - replay).abs().max() > 1e-4
    assert (one - out_mid).abs().max() > 1e-4                      # another site, another edit
    assert not (model.model_options.get("transformer_options", {}).get("patches", {}) or {}).get("output_block_patch")
    with pytest.raises(Exception, match="direction 2 was trained on h_site 'unet middle block', direction 1 on "
                                        "'unet after first up block'"):
        asy.CombineAsyrpDirections.execute(d, 1.0, mid, 1.0)
    with pytest.raises(Exception, match="direction: it shifts h at site 'unet after first up block', which this "
                                        "model lacks \\(its h is at 'dit middle joint block'\\)"):
        AN.check_direction_for_model(models["tiny_sd3"], d)
    with pytest.raises(Exception, match="h_site: h site 'after first up block' exists on U-Nets only"):
        asy.AsyrpDirectionFromExamples.execute(models["tiny_sd3"], ex, ex, 6, 0.5, None, "after first up block")
    # a direction of a site this two-level U-Net lacks: the error names the sites it has
    second = _with_site(d, AN.UNET_UP2_SITE)
    with pytest.raises(Exception, match="direction: it shifts h at site 'unet after second up block', which this "
                                        "model lacks .* with h_site 'middle' or 'after first up block'$"):
        AN.check_direction_for_model(model, second)
    with pytest.raises(Exception, match="t_start: 0.5 leaves no step"):
        asy.AsyrpDirectionFromExamples.execute(model, ex, ex, 6, 0.5, None, "middle", "everywhere", 0.5)
    with pytest.raises(Exception, match="spread: 'nowhere'"):
        asy.AsyrpDirectionFromExamples.execute(model, ex, ex, 6, 0.5, None, "middle", "nowhere")


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
    with pytest.raises(Exception, match="h_site: h site 'after first up block' exists on U-Nets only"):
        asyrp.AsyrpDirectionFromExamples.execute(model, with_attr, without, 6, 0.5, None, "after first up block")
    with pytest.raises(Exception, match="spread: 'where pairs differ' takes image latents"):
        asyrp.AsyrpDirectionFromExamples.execute(model, with_attr, without, 6, 0.5, None, "middle",
                                                 "where pairs differ")
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
