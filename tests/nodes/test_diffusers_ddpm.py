# SPDX-License-Identifier: GPL-3.0-or-later
"""Load Diffusers DDPM: tiny random UNet2DModel folders (built by diffusers) through the node,
in process against diffusers' own UNet call and in the real server (KSampler, DPM Encode / Replay,
ModelSamplingDiscrete, VAE Encode / Decode, refusals)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dpmtools.graphs import Graph, rel_err, saved_latents, write_latent
from dpmtools.server import PromptError

H = W = 16


def _image(seed: int) -> torch.Tensor:
    """A smooth (1, 3, H, W) image in [-1, 1] (model space of a pixel DDPM)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g) * 2 - 1, size=(H, W),
                                        mode="bilinear", align_corners=False)
    return x.clamp(-0.95, 0.95)


@pytest.fixture(scope="module")
def ddpm_mod(pack):
    import importlib
    return importlib.import_module("dpm_latent.nodes.bridge.diffusers_unet")


def _diffusers_denoised(folder, x, sigma, pred):
    """x0 prediction computed by hand with diffusers only: the reference for the wrapped model."""
    from diffusers import DDPMScheduler, UNet2DModel
    sub = folder / "unet" if (folder / "unet").is_dir() else folder
    unet = UNet2DModel.from_pretrained(str(sub), use_safetensors=True).eval()
    sched_dir = folder / "scheduler" if (folder / "scheduler").is_dir() else folder
    sched = DDPMScheduler.from_pretrained(str(sched_dir))
    ac = sched.alphas_cumprod.double()
    sig_all = ((1 - ac) / ac).sqrt()
    t = int((sig_all.log() - np.log(sigma)).abs().argmin())
    a = float(ac[t])
    xt = x / (1 + sigma ** 2) ** 0.5
    with torch.no_grad():
        out = unet(xt, torch.tensor([t])).sample
    if pred == "epsilon":
        return x - sigma * out
    return a ** 0.5 * xt - (1 - a) ** 0.5 * out


@pytest.mark.parametrize("name,pred", [("tiny_ddpm_eps", "epsilon"), ("tiny_ddpm_v", "v_prediction")])
def test_wrapped_model_is_the_diffusers_unet(ddpm_mod, model_dirs, name, pred):
    folder = model_dirs["diffusers"] / name
    patcher, vae, info = ddpm_mod.load_ddpm(folder, "never")
    assert info["prediction_type"] == pred
    model = patcher.model
    ms = model.model_sampling
    from diffusers import DDPMScheduler
    sched_dir = folder / "scheduler" if (folder / "scheduler").is_dir() else folder
    ac = DDPMScheduler.from_pretrained(str(sched_dir)).alphas_cumprod.double()
    assert torch.allclose(ms.sigmas.double(), ((1 - ac) / ac).sqrt(), rtol=1e-6)
    x = _image(1) + 0.3 * torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(2))
    for t in (10, 400, 900):
        sigma = float(ms.sigmas[t])
        got = model.apply_model(x, torch.tensor([sigma]), c_crossattn=torch.zeros(1, 77, 1))
        want = _diffusers_denoised(folder, x, sigma, pred)
        assert rel_err(got, want) < 1e-5, (t, rel_err(got, want))
    # the latent is the image: pixel-space format, ComfyUI's pixel conversion VAE ([0,1] <-> [-1,1])
    assert model.latent_format.latent_channels == 3 and vae.downscale_ratio == 1
    img = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(3))
    lat = vae.encode(img)
    assert torch.allclose(lat, img.permute(0, 3, 1, 2) * 2 - 1, atol=1e-6)
    assert torch.allclose(vae.decode(lat), img, atol=1e-6)


def test_output_block_patch_sees_the_mid_block(ddpm_mod, model_dirs):
    patcher, _, _ = ddpm_mod.load_ddpm(model_dirs["diffusers"] / "tiny_ddpm_eps", "never")
    x = _image(4)
    sigma = torch.tensor([float(patcher.model.model_sampling.sigmas[500])])
    plain = patcher.model.apply_model(x, sigma)
    seen = []

    def patch(h, hsp, opts):
        seen.append((opts.get("block"), tuple(h.shape)))
        return h + 0.5, hsp

    m2 = patcher.clone()
    m2.set_model_output_block_patch(patch)
    to = m2.model_options["transformer_options"]
    edited = m2.model.apply_model(x, sigma, transformer_options=to)
    # as in ComfyUI's U-Net, the patch is called per output block with its id: the mid-block output at
    # ("output", 0), and (h_site "after first up block") up_blocks[0]'s output at ("output", its resnet count)
    k = len(patcher.model.diffusion_model.unet.up_blocks[0].resnets)
    assert seen == [(("output", 0), (1, 16, H // 2, W // 2)), (("output", k), (1, 16, H, W))]
    assert rel_err(edited, plain) > 1e-3
    # the original patcher is untouched: no patch, same output
    again = patcher.model.apply_model(x, sigma, transformer_options=patcher.model_options["transformer_options"])
    assert torch.equal(again, plain) and len(seen) == 2


def _ksampler_reference(ddpm_mod, folder, noise_seed, steps, clip):
    """Euler over ComfyUI's 'normal' sigmas with the x0 prediction computed by diffusers by hand."""
    import comfy.samplers
    patcher, _, info = ddpm_mod.load_ddpm(folder)
    ms = patcher.model.model_sampling
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", steps).double()
    g = torch.manual_seed(noise_seed)
    noise = torch.randn((1, 3, H, W), generator=g)
    x = noise.double() * (1 + float(sigmas[0]) ** 2) ** 0.5       # max_denoise at the top sigma
    for i in range(steps):
        s, s1 = float(sigmas[i]), float(sigmas[i + 1])
        d0 = _diffusers_denoised(folder, x.float(), s, info["prediction_type"]).double()
        if clip:
            d0 = d0.clamp(-1, 1)
        x = d0 if s1 == 0 else x + (s1 - s) * (x - d0) / s
    return x.float()


def test_ksampler_and_model_sampling_discrete_in_the_server(server, ddpm_mod, model_dirs):
    info = server.object_info()
    node = info["LoadDiffusersDDPM"]
    assert node["output"] == ["MODEL", "VAE"] and node["display_name"] == "Load Diffusers DDPM"
    names = node["input"]["required"]["model_name"][0]
    if not isinstance(names, list):
        names = node["input"]["required"]["model_name"][1]["options"]
    assert {"tiny_ddpm_eps", "tiny_ddpm_v", "tiny_ddpm_eps_b"} <= set(names), names
    for group in ("required", "optional"):
        for k, spec in node["input"].get(group, {}).items():
            assert spec[1].get("tooltip"), k

    g = Graph()
    load = g.node("LoadDiffusersDDPM", model_name="tiny_ddpm_eps")
    cond = g.node("EmptyConditioning", model=load.out(0), tokens=1)
    empty = g.node("LoadLatent", latent=write_latent(server.input_dir, "ddpm_zero", torch.zeros(1, 3, H, W)))
    ks = dict(seed=5, steps=6, cfg=1.0, sampler_name="euler", scheduler="normal", denoise=1.0,
              positive=cond.out(0), negative=cond.out(0), latent_image=empty.out(0))
    s1 = g.node("KSampler", model=load.out(0), **ks)
    msd = g.node("ModelSamplingDiscrete", model=load.out(0), sampling="eps", zsnr=False)
    s2 = g.node("KSampler", model=msd.out(0), **ks)
    save1 = g.node("SaveLatent", samples=s1.out(0), filename_prefix="ddpm_ks")
    save2 = g.node("SaveLatent", samples=s2.out(0), filename_prefix="ddpm_ks_msd")
    img = g.node("SaveImage", images=g.node("VAEDecode", samples=s1.out(0), vae=load.out(1)).out(0),
                 filename_prefix="ddpm_ks_img")
    # generation from a prior code: pixel space, so width x height is the latent size
    code = g.node("RandomLatentCode", model=load.out(0), width=W, height=H, batch_size=2, seed=1, steps=4,
                  scheduler="normal", eta=0.1)
    gen = g.node("SaveLatent", samples=g.node("ReplayLatentWithPrompt", model=load.out(0), positive=cond.out(0),
                                              negative=cond.out(0), latent_code=code.out(0), cfg=1.0).out(0),
                 filename_prefix="ddpm_prior")
    entry = server.run(g.prompt())
    prior = saved_latents(server, entry, gen.id)
    assert prior.shape == (2, 3, H, W) and bool(prior.isfinite().all()) and float(prior.std()) > 0.05
    out = saved_latents(server, entry, save1.id)
    assert out.shape == (1, 3, H, W) and bool(out.isfinite().all())
    want = _ksampler_reference(ddpm_mod, model_dirs["diffusers"] / "tiny_ddpm_eps", 5, 6, clip=True)
    assert rel_err(out, want) < 1e-4, rel_err(out, want)
    assert float(out.abs().max()) <= 1.0 + 1e-6          # clip_sample from the scheduler config
    # ModelSamplingDiscrete rebuilds the same schedule from the mapped sampling settings
    assert rel_err(saved_latents(server, entry, save2.id), out) < 1e-4
    f = entry["outputs"][img.id]["images"][0]
    png = np.asarray(Image.open(server.output_dir / f.get("subfolder", "") / f["filename"])).astype(np.float32)
    assert png.shape == (H, W, 3)
    assert np.abs(png / 255 - ((out[0].permute(1, 2, 0).numpy() + 1) / 2)).max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("name", ["tiny_ddpm_eps", "tiny_ddpm_v"])
def test_encode_replay_reconstructs(server, name):
    x = _image(11)
    lat_name = write_latent(server.input_dir, f"ddpm_src_{name}", x)
    g = Graph()
    load = g.node("LoadDiffusersDDPM", model_name=name, clip_sample="never")
    cond = g.node("EmptyConditioning", model=load.out(0), tokens=1)
    lat = g.node("LoadLatent", latent=lat_name)
    saves = {}
    for k, (denoise, steps) in enumerate([(1.0, 8), (0.6, 10)]):
        enc = g.node("DPMEncode", model=load.out(0), positive=cond.out(0), negative=cond.out(0),
                     latent_image=lat.out(0), seed=3 + k, steps=steps, scheduler="normal", denoise=denoise,
                     eta=0.1, cfg=1.0)
        rep = g.node("ReplayLatentWithPrompt", model=load.out(0), positive=cond.out(0), negative=cond.out(0),
                     latent_code=enc.out(0), cfg=1.0)
        saves[denoise] = g.node("SaveLatent", samples=rep.out(0), filename_prefix=f"ddpm_rec_{name}_{k}").id
    # the same code replayed by another model changes the image
    other = g.node("LoadDiffusersDDPM", model_name="tiny_ddpm_eps_b", clip_sample="never")
    enc = g.node("DPMEncode", model=load.out(0), positive=cond.out(0), negative=cond.out(0),
                 latent_image=lat.out(0), seed=3, steps=8, scheduler="normal", denoise=1.0, eta=0.1, cfg=1.0)
    rep_b = g.node("ReplayLatentWithPrompt", model=other.out(0), positive=cond.out(0), negative=cond.out(0),
                   latent_code=enc.out(0), cfg=1.0)
    save_b = g.node("SaveLatent", samples=rep_b.out(0), filename_prefix=f"ddpm_other_{name}")
    entry = server.run(g.prompt())
    for denoise, nid in saves.items():
        err = rel_err(saved_latents(server, entry, nid), x)
        assert err <= 1e-4, (name, denoise, err)
    assert rel_err(saved_latents(server, entry, save_b.id), x) > 1e-2


@pytest.mark.parametrize("folder,needles", [
    ("bad_pickled", ["model_name", "pickled", "diffusion_pytorch_model.bin", "safetensors"]),
    ("bad_conditional", ["model_name", "UNet2DConditionModel", "conditional", "unconditional"]),
    ("bad_no_scheduler", ["model_name", "scheduler config", "scheduler/scheduler_config.json"]),
    ("bad_class_conditional", ["model_name", "class-conditional", "num_class_embeds"]),
    ("no_such_folder", ["model_name", "no_such_folder"]),
])
def test_refusals_are_clear(server, folder, needles):
    g = Graph()
    load = g.node("LoadDiffusersDDPM", model_name=folder)
    g.node("SaveImage", images=g.node("VAEDecode", samples=g.node(
        "VAEEncode", pixels=g.node("EmptyImage", width=8, height=8, batch_size=1, color=0).out(0),
        vae=load.out(1)).out(0), vae=load.out(1)).out(0), filename_prefix="ddpm_bad")
    with pytest.raises(PromptError) as ei:
        server.run(g.prompt())
    msg = str(ei.value)
    for n in needles:
        assert n in msg, (n, msg)
    # the server is still alive and the folder listing is unaffected
    assert "LoadDiffusersDDPM" in server.object_info()


def test_folder_layouts_and_schedule_mapping(ddpm_mod, model_dirs, tmp_path):
    from dpmtools import tiny_ddpm
    root = model_dirs["diffusers"]
    unet_dir, sched = ddpm_mod.find_parts(root / "tiny_ddpm_eps")
    assert unet_dir.name == "unet" and sched.parent.name == "scheduler"
    unet_dir, sched = ddpm_mod.find_parts(root / "tiny_ddpm_v")
    assert unet_dir == root / "tiny_ddpm_v" and sched.name == "scheduler_config.json"
    # every diffusers beta schedule ComfyUI knows is mapped so that ComfyUI rebuilds the same sigmas
    import comfy.model_sampling

    class Cfg:
        pass

    for sched_name in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        f = tiny_ddpm.make_ddpm_folder(tmp_path / sched_name, layout="flat", beta_schedule=sched_name,
                                       beta_start=0.00085, beta_end=0.012)
        ac, pred, clip, settings = ddpm_mod.schedule_from_config(f / "scheduler_config.json")
        cfg = Cfg()
        cfg.sampling_settings = settings
        ms = comfy.model_sampling.ModelSamplingDiscrete(cfg)
        # diffusers computes betas in float32: the smallest sigmas agree to ~3e-4 relative
        assert torch.allclose(ms.sigmas.double(), ((1 - ac) / ac).sqrt(), rtol=1e-3), sched_name
        assert pred == "epsilon" and clip == 1.0
    cfg_path = tmp_path / "linear" / "scheduler_config.json"
    raw = json.loads(cfg_path.read_text())
    raw["prediction_type"] = "flow"
    cfg_path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        ddpm_mod.schedule_from_config(cfg_path)


def _link_outside(root, name, tmp_path_factory, seed=0):
    """A DDPM folder built on "another disk" (a temporary folder outside ``root``), linked into ``root``
    as ``name``: what ``comfy_host.py demo`` installs and what users with model folders elsewhere do."""
    from dpmtools import tiny_ddpm
    real = tiny_ddpm.make_ddpm_folder(tmp_path_factory.mktemp("other_disk") / name, seed=seed, layout="pipeline")
    link = root / name
    if not link.is_symlink():
        link.symlink_to(real, target_is_directory=True)
    assert link.resolve() == real.resolve() and not str(real.resolve()).startswith(str(root.resolve()))
    return link, real


def test_symlinked_folder_resolves_and_escapes_are_refused(ddpm_mod, tmp_path_factory, monkeypatch):
    import folder_paths
    root = tmp_path_factory.mktemp("diffusers_links")
    link, real = _link_outside(root, "linked_ddpm", tmp_path_factory)
    # a linked parent folder too: models/diffusers/shelf -> a folder of models elsewhere
    shelf_model = _link_outside(tmp_path_factory.mktemp("shelf_parent"), "shelved_ddpm", tmp_path_factory, 1)[1]
    (root / "shelf").symlink_to(shelf_model.parent, target_is_directory=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusers", ([str(root)], set()))
    listed = ddpm_mod.list_folders()
    assert {"linked_ddpm", "shelf/shelved_ddpm"} <= set(listed), listed
    for name in ("linked_ddpm", "shelf/shelved_ddpm"):
        folder = ddpm_mod.resolve_folder(name)
        assert folder == root / name
        _patcher, _vae, info = ddpm_mod.load_ddpm(folder, "never")
        assert info["prediction_type"] == "epsilon"
    # names that leave the folder are refused, with a message naming the input and the fix
    for bad in ("../linked_ddpm", "linked_ddpm/../../x", "shelf/../../other", str(real), "/etc",
                "..\\x", "C:\\models\\x", "C:x"):
        with pytest.raises(ddpm_mod.B.NodeInputError) as ei:
            ddpm_mod.resolve_folder(bad)
        msg = str(ei.value)
        assert msg.startswith("model_name:") and repr(bad) in msg, msg
        assert "absolute paths and '..'" in msg and "symbolic link" in msg, msg


def test_symlinked_folder_runs_in_the_server(server, model_dirs, tmp_path_factory):
    """Issue 18.1: a folder linked into models/diffusers/ from elsewhere (as ``comfy_host.py demo``
    installs the demo's DDPM) loads in the server and is the same model as its twin built in place."""
    _link_outside(model_dirs["diffusers"], "tiny_ddpm_linked", tmp_path_factory, seed=0)
    assert "tiny_ddpm_linked" in server.object_info()["LoadDiffusersDDPM"]["input"]["required"]["model_name"][1][
        "options"]
    g = Graph()
    empty = g.node("LoadLatent", latent=write_latent(server.input_dir, "ddpm_zero_link", torch.zeros(1, 3, H, W)))
    saves = {}
    for name in ("tiny_ddpm_linked", "tiny_ddpm_eps"):     # same seed: the same weights
        load = g.node("LoadDiffusersDDPM", model_name=name)
        cond = g.node("EmptyConditioning", model=load.out(0), tokens=1)
        s = g.node("KSampler", model=load.out(0), seed=5, steps=3, cfg=1.0, sampler_name="euler",
                   scheduler="normal", denoise=1.0, positive=cond.out(0), negative=cond.out(0),
                   latent_image=empty.out(0))
        saves[name] = g.node("SaveLatent", samples=s.out(0), filename_prefix=f"ddpm_link_{name}").id
    entry = server.run(g.prompt())
    a, b = (saved_latents(server, entry, saves[n]) for n in ("tiny_ddpm_linked", "tiny_ddpm_eps"))
    assert a.shape == (1, 3, H, W) and float(a.std()) > 0.01
    assert torch.equal(a, b)
