# SPDX-License-Identifier: GPL-3.0-or-later
"""Video latents (B, C, T, H, W) through a real ComfyUI server: DPM Encode -> Replay is exact for every video
family of the host's ComfyUI (tiny random Wan 2.1, Wan 2.2, HunyuanVideo, HunyuanVideo 1.5, LTX-Video and Cosmos
Predict2 DiTs built with ComfyUI's classes, loaded by UNETLoader; Mochi and Cosmos 1, which ComfyUI detects only
at full size, built in the server by the tests' Tiny Video Model node); codes record frames and latent format
and are refused by another family; masks vary over time; Random Latent Code takes a video latent's shape;
image-to-video start frames pass through, and conditioning made for another clip length is refused naming both
lengths."""
from __future__ import annotations

import pytest
import torch

from dpmtools.graphs import Graph, rel_err, saved_latents, write_latent
from dpmtools.server import PromptError

# family: (diffusion model file, latent channels, (T, H, W) of the test latent, latent format the code records)
FAMILIES = {
    "wan21": ("tiny_wan21.safetensors", 16, (3, 4, 4), "Wan21"),
    "wan22": ("tiny_wan22.safetensors", 48, (2, 4, 4), "Wan22"),
    "hunyuan_video": ("tiny_hunyuan_video.safetensors", 16, (3, 4, 4), "HunyuanVideo"),
    "hunyuan_video15": ("tiny_hunyuan_video15.safetensors", 32, (3, 4, 4), "HunyuanVideo15"),
    "ltxv": ("tiny_ltxv.safetensors", 128, (2, 2, 2), "LTXV"),
    # Cosmos Predict2 samples in Wan 2.1's latent space (its VAE) with its own sigma parametrisation (x0 + sigma*n)
    "cosmos_predict2": ("tiny_cosmos_predict2.safetensors", 16, (3, 4, 4), "Wan21"),
    # ComfyUI loads Mochi and Cosmos 1 files only at full size: the tests' Tiny Video Model node builds them
    "mochi": ("tiny:mochi", 12, (3, 4, 4), "Mochi"),
    "cosmos1": ("tiny:cosmos1", 16, (3, 4, 4), "Cosmos1CV8x8x8"),
}
CASES = [(1.0, 1.0, 6), (0.6, 3.0, 8)]  # (denoise, cfg, steps)


def _model(g, fname):
    if fname.startswith("tiny:"):  # dpmtools/test_server_nodes: ComfyUI's classes at tiny sizes, in the server
        return g.node("DPMTestTinyVideoModel", family=fname[5:], seed=0)
    return g.node("UNETLoader", unet_name=fname, weight_dtype="default")


def _i2v_parts(g, fname):
    """An image-to-video model, the tiny Wan 2.1 VAE (for the start frame) and an empty prompt."""
    model = _model(g, fname)
    vae = g.node("VAELoader", vae_name="tiny_wan21_vae.safetensors")
    return model, vae, g.node("EmptyConditioning", model=model.out(0), tokens=4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exact_video_reconstruction(server, family):
    from safetensors import safe_open

    fname, ch, thw, fmt = FAMILIES[family]
    x0 = torch.randn(2, ch, *thw, generator=torch.Generator().manual_seed(3))
    name = write_latent(server.input_dir, f"video_{family}", x0)
    g = Graph()
    model = _model(g, fname)
    cond = g.node("EmptyConditioning", model=model.out(0), tokens=4)
    lat = g.node("LoadLatent", latent=name)
    saves = {}
    for k, (denoise, cfg, steps) in enumerate(CASES):
        enc = g.node("DPMEncode", model=model.out(0), positive=cond.out(0), negative=cond.out(0),
                     latent_image=lat.out(0), seed=7 + k, steps=steps, scheduler="simple", denoise=denoise, eta=0.1,
                     cfg=cfg)
        rep = g.node("ReplayLatentWithPrompt", model=model.out(0), positive=cond.out(0), negative=cond.out(0),
                     latent_code=enc.out(0), cfg=cfg)
        saves[k] = g.node("SaveLatent", samples=rep.out(0), filename_prefix=f"video_{family}_{k}").id
        if k == 0:
            g.node("SaveLatentCode", latent_code=enc.out(0), filename_prefix=f"video_codes/{family}")
    entry = server.run(g.prompt())
    for k, nid in saves.items():
        rec = saved_latents(server, entry, nid)
        assert rec.shape == x0.shape, (family, rec.shape)
        assert rel_err(rec, x0) <= 1e-4, (family, CASES[k], rel_err(rec, x0))
    # the code records the clip's frame count and the family's latent format
    files = sorted((server.output_dir / "video_codes").glob(f"{family}_*.dpmcode.safetensors"))
    assert files, family
    with safe_open(str(files[-1]), "pt") as fh:
        meta = fh.metadata()
    assert meta["frames"] == str(thw[0]) and meta["latent_format"] == fmt, (family, meta)


def test_video_code_file_records_frames_and_family_and_is_refused_elsewhere(server):
    from safetensors import safe_open

    x0 = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    name = write_latent(server.input_dir, "video_file", x0)
    g = Graph()
    model = _model(g, "tiny_wan21.safetensors")
    cond = g.node("EmptyConditioning", model=model.out(0), tokens=4)
    lat = g.node("LoadLatent", latent=name)
    enc = g.node("DPMEncode", model=model.out(0), positive=cond.out(0), negative=cond.out(0), latent_image=lat.out(0),
                 seed=1, steps=5, scheduler="simple", denoise=0.8, eta=0.1, cfg=1.0)
    save = g.node("SaveLatentCode", latent_code=enc.out(0), filename_prefix="video/wan")
    entry = server.run(g.prompt())
    files = sorted((server.output_dir / "video").glob("wan_*.dpmcode.safetensors"))
    assert files, entry["outputs"][save.id]
    with safe_open(str(files[-1]), "pt") as fh:
        meta = fh.metadata()
    assert meta["frames"] == "3" and meta["latent_format"] == "Wan21" and meta["shape"] == "[1, 16, 3, 4, 4]", meta

    # load it back and replay: exact; replay with HunyuanVideo (same 16 channels, other latent space): refused
    code_name = f"video/{files[-1].name} [output]"
    g = Graph()
    model = _model(g, "tiny_wan21.safetensors")
    cond = g.node("EmptyConditioning", model=model.out(0), tokens=4)
    load = g.node("LoadLatentCode", code_file=code_name)
    rep = g.node("ReplayLatentWithPrompt", model=model.out(0), positive=cond.out(0), negative=cond.out(0),
                 latent_code=load.out(0), cfg=1.0)
    sv = g.node("SaveLatent", samples=rep.out(0), filename_prefix="video_file_rt")
    entry = server.run(g.prompt())
    assert rel_err(saved_latents(server, entry, sv.id), x0) <= 1e-4

    for other, words in (("tiny_hunyuan_video.safetensors", ["Wan21", "HunyuanVideo"]),
                         ("tiny_wan22.safetensors", ["Wan21", "Wan22"]),
                         # same latent space (Wan 2.1's VAE), other noise parametrisation
                         ("tiny_cosmos_predict2.safetensors",
                          ["(1-sigma)*x0 + sigma*n", "Cosmos Predict2 (x0 + sigma*n)"])):
        g = Graph()
        model = _model(g, other)
        cond = g.node("EmptyConditioning", model=model.out(0), tokens=4)
        load = g.node("LoadLatentCode", code_file=code_name)
        rep = g.node("ReplayLatentWithPrompt", model=model.out(0), positive=cond.out(0), negative=cond.out(0),
                     latent_code=load.out(0), cfg=1.0)
        g.node("SaveLatent", samples=rep.out(0), filename_prefix="video_refused")
        with pytest.raises(PromptError) as ei:
            server.run(g.prompt())
        msg = str(ei.value)
        assert all(w in msg for w in words), msg

    # an image model refuses a video code (and names both kinds of latent)
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd3.safetensors")
    cond = g.node("EmptyConditioning", model=ck.out(0), tokens=4)
    load = g.node("LoadLatentCode", code_file=code_name)
    rep = g.node("ReplayLatentWithPrompt", model=ck.out(0), positive=cond.out(0), negative=cond.out(0),
                 latent_code=load.out(0), cfg=1.0)
    g.node("SaveLatent", samples=rep.out(0), filename_prefix="video_refused_img")
    with pytest.raises(PromptError) as ei:
        server.run(g.prompt())
    assert "Wan21" in str(ei.value) and "SD3" in str(ei.value) and "video latents" in str(ei.value), str(ei.value)


def test_time_varying_mask_keeps_the_source_outside_it(server):
    """A (T, H, W) mask: frame 0 kept whole, frames 1-2 may change on their left half. Replayed with a second
    Wan model (a translation), the kept region is the source bit for bit, the masked region changes."""
    T, H, W = 3, 4, 4
    x0 = torch.randn(1, 16, T, H, W, generator=torch.Generator().manual_seed(5))
    name = write_latent(server.input_dir, "video_masked", x0)
    g = Graph()
    model = _model(g, "tiny_wan21.safetensors")
    other = _model(g, "tiny_wan21_b.safetensors")
    cond = g.node("EmptyConditioning", model=model.out(0), tokens=4)
    lat = g.node("LoadLatent", latent=name)
    # per-frame masks as a MASK batch (frames, 32, 32 pixels): 0 everywhere, then the left half of frames 1, 2
    zero = g.node("SolidMask", value=0.0, width=8 * W, height=8 * H)
    left = g.node("SolidMask", value=1.0, width=4 * W, height=8 * H)
    half = g.node("MaskComposite", destination=zero.out(0), source=left.out(0), x=0, y=0, operation="add")
    m01 = g.node("MaskComposite", destination=zero.out(0), source=zero.out(0), x=0, y=0, operation="add")
    frames = g.node("ImageToMask", image=g.node("ImageBatch", image1=g.node("MaskToImage", mask=m01.out(0)).out(0),
                                                 image2=g.node("ImageBatch",
                                                               image1=g.node("MaskToImage", mask=half.out(0)).out(0),
                                                               image2=g.node("MaskToImage", mask=half.out(0)).out(0)
                                                               ).out(0)).out(0), channel="red")
    enc = g.node("DPMEncode", model=model.out(0), positive=cond.out(0), negative=cond.out(0), latent_image=lat.out(0),
                 seed=2, steps=6, scheduler="simple", denoise=0.8, eta=0.1, cfg=1.0)
    same = g.node("ReplayLatentWithPrompt", model=model.out(0), positive=cond.out(0), negative=cond.out(0),
                  latent_code=enc.out(0), cfg=1.0, mask=frames.out(0))
    edit = g.node("ReplayLatentWithPrompt", model=other.out(0), positive=cond.out(0), negative=cond.out(0),
                  latent_code=enc.out(0), cfg=1.0, mask=frames.out(0))
    full = g.node("ReplayLatentWithPrompt", model=other.out(0), positive=cond.out(0), negative=cond.out(0),
                  latent_code=enc.out(0), cfg=1.0)
    s_same = g.node("SaveLatent", samples=same.out(0), filename_prefix="vm_same")
    s_edit = g.node("SaveLatent", samples=edit.out(0), filename_prefix="vm_edit")
    s_full = g.node("SaveLatent", samples=full.out(0), filename_prefix="vm_full")
    entry = server.run(g.prompt())
    rec = saved_latents(server, entry, s_same.id)
    ed = saved_latents(server, entry, s_edit.id)
    fu = saved_latents(server, entry, s_full.id)
    assert rel_err(rec, x0) <= 1e-4
    # frame 0 and the right halves: the source exactly; the left halves of frames 1-2 moved
    # (up to the float rounding of the Wan latent format's process_latent_in / out)
    assert torch.allclose(ed[:, :, 0], x0[:, :, 0], atol=1e-5, rtol=0)
    assert torch.allclose(ed[:, :, 1:, :, W // 2 + 1:], x0[:, :, 1:, :, W // 2 + 1:], atol=1e-5, rtol=0)
    moved = rel_err(ed[:, :, 1:, :, :W // 2 - 1], x0[:, :, 1:, :, :W // 2 - 1])
    assert moved > 0.05, moved
    assert rel_err(fu, x0) > 0.05


def test_random_video_code_takes_the_latent_shape(server):
    g = Graph()
    model = _model(g, "tiny_hunyuan_video.safetensors")
    cond = g.node("EmptyConditioning", model=model.out(0), tokens=4)
    empty = g.node("EmptyHunyuanLatentVideo", width=32, height=48, length=9, batch_size=2)
    code = g.node("RandomLatentCode", model=model.out(0), width=512, height=512, batch_size=1, seed=3, steps=4,
                  scheduler="simple", eta=0.5, latent=empty.out(0))
    rep = g.node("ReplayLatentWithPrompt", model=model.out(0), positive=cond.out(0), negative=cond.out(0),
                 latent_code=code.out(0), cfg=1.0)
    sv = g.node("SaveLatent", samples=rep.out(0), filename_prefix="video_random")
    entry = server.run(g.prompt())
    out = saved_latents(server, entry, sv.id)
    assert out.shape == (2, 16, 3, 6, 4) and torch.isfinite(out).all() and out.std() > 0.01

    g = Graph()
    model = _model(g, "tiny_hunyuan_video.safetensors")
    g.node("SaveLatentCode", latent_code=g.node("RandomLatentCode", model=model.out(0), width=64, height=64,
                                                 batch_size=1, seed=3, steps=4, scheduler="simple",
                                                 eta=0.5).out(0), filename_prefix="video_random_refused")
    with pytest.raises(PromptError, match="frame count"):
        server.run(g.prompt())


def test_image_to_video_conditioning_passes_through_and_another_length_is_refused(server):
    """Wan Image To Video's start frame passes through as in KSampler: with the tiny Wan 2.1 image-to-video
    model (36 input channels: the clip, the start frame's latent and its mask), encode and replay are exact
    with it, and a replay under another start frame differs; conditioning made for another clip length is
    refused naming both lengths."""
    T, H, W = 3, 4, 4
    x0 = torch.randn(1, 16, T, H, W, generator=torch.Generator().manual_seed(6))
    name = write_latent(server.input_dir, "video_i2v", x0)

    def graph(length, other_colour=None):
        g = Graph()
        model, vae, cond = _i2v_parts(g, "tiny_wan21_i2v.safetensors")

        def i2v(colour):
            start = g.node("EmptyImage", width=8 * W, height=8 * H, batch_size=1, color=colour)
            return g.node("WanImageToVideo", positive=cond.out(0), negative=cond.out(0), vae=vae.out(0),
                          width=8 * W, height=8 * H, length=length, batch_size=1, start_image=start.out(0))

        a = i2v(0x808080)
        lat = g.node("LoadLatent", latent=name)
        enc = g.node("DPMEncode", model=model.out(0), positive=a.out(0), negative=a.out(1),
                     latent_image=lat.out(0), seed=2, steps=5, scheduler="simple", denoise=1.0, eta=0.1, cfg=2.0)
        rep = g.node("ReplayLatentWithPrompt", model=model.out(0), positive=a.out(0), negative=a.out(1),
                     latent_code=enc.out(0), cfg=2.0)
        saves = [g.node("SaveLatent", samples=rep.out(0), filename_prefix=f"video_i2v_{length}")]
        if other_colour is not None:
            b = i2v(other_colour)
            rep_b = g.node("ReplayLatentWithPrompt", model=model.out(0), positive=b.out(0), negative=b.out(1),
                           latent_code=enc.out(0), cfg=2.0)
            saves.append(g.node("SaveLatent", samples=rep_b.out(0), filename_prefix=f"video_i2v_other_{length}"))
        return g, saves

    g, (same, other) = graph(4 * (T - 1) + 1, other_colour=0xFF2020)
    entry = server.run(g.prompt())
    assert rel_err(saved_latents(server, entry, same.id), x0) <= 1e-4
    moved = rel_err(saved_latents(server, entry, other.id), x0)
    assert moved > 1e-3, moved   # the start frame reaches the model
    g, _ = graph(4 * (T + 1) + 1)
    with pytest.raises(PromptError) as ei:
        server.run(g.prompt())
    msg = str(ei.value)
    assert "5 latent frames" in msg and "3 latent frames" in msg, msg


def test_hunyuan_video_image_to_video_start_frame_passes_through(server):
    """Hunyuan Image To Video's start frame ("v1 (concat)": concat_latent_image + concat_mask) on the tiny
    HunyuanVideo image-to-video model (33 input channels): encode and replay are exact with it, and a replay
    under another start frame differs (the frame reaches the model). The node only encodes the frame with the
    VAE it is given: the tiny Wan 2.1 VAE has HunyuanVideo's 16 channels and 8x / 4x compression."""
    T, H, W = 3, 4, 4
    x0 = torch.randn(1, 16, T, H, W, generator=torch.Generator().manual_seed(8))
    name = write_latent(server.input_dir, "video_hy_i2v", x0)
    g = Graph()
    model, vae, cond = _i2v_parts(g, "tiny_hunyuan_video_i2v.safetensors")

    def i2v(colour):
        start = g.node("EmptyImage", width=8 * W, height=8 * H, batch_size=1, color=colour)
        return g.node("HunyuanImageToVideo", positive=cond.out(0), vae=vae.out(0), width=8 * W, height=8 * H,
                      length=4 * (T - 1) + 1, batch_size=1, guidance_type="v1 (concat)", start_image=start.out(0))

    a, b = i2v(0x808080), i2v(0xFF2020)
    lat = g.node("LoadLatent", latent=name)
    enc = g.node("DPMEncode", model=model.out(0), positive=a.out(0), negative=cond.out(0), latent_image=lat.out(0),
                 seed=2, steps=5, scheduler="simple", denoise=1.0, eta=0.1, cfg=2.0)
    same = g.node("ReplayLatentWithPrompt", model=model.out(0), positive=a.out(0), negative=cond.out(0),
                  latent_code=enc.out(0), cfg=2.0)
    other = g.node("ReplayLatentWithPrompt", model=model.out(0), positive=b.out(0), negative=cond.out(0),
                   latent_code=enc.out(0), cfg=2.0)
    s_same = g.node("SaveLatent", samples=same.out(0), filename_prefix="video_hy_i2v")
    s_other = g.node("SaveLatent", samples=other.out(0), filename_prefix="video_hy_i2v_other")
    entry = server.run(g.prompt())
    assert rel_err(saved_latents(server, entry, s_same.id), x0) <= 1e-4
    moved = rel_err(saved_latents(server, entry, s_other.id), x0)
    assert moved > 1e-3, moved


@pytest.mark.parametrize("family", ["wan22", "ltxv", "cosmos_predict2"])
def test_start_frame_noise_mask_reconstructs_and_keeps_the_frame(server, family):
    """Wan 2.2 TI2V (Wan22 Image To Video Latent), LTX-Video (LTXV Img To Video) and Cosmos Predict2
    image-to-video keep the start frame with a video noise mask that is 0 on the first latent frame, and their
    models read it (per-token timesteps). With such a mask on the latent, encode and replay are exact and the
    first frame is the source's. (The nodes themselves need those families' VAEs, which have no tiny builds.)"""
    fname, ch, (T, H, W), _fmt = FAMILIES[family]
    x0 = torch.randn(1, ch, T, H, W, generator=torch.Generator().manual_seed(9))
    name = write_latent(server.input_dir, f"video_start_{family}", x0)
    g = Graph()
    model = _model(g, fname)
    cond = g.node("EmptyConditioning", model=model.out(0), tokens=4)
    keep = g.node("MaskToImage", mask=g.node("SolidMask", value=0.0, width=W, height=H).out(0))
    free = g.node("MaskToImage", mask=g.node("SolidMask", value=1.0, width=W, height=H).out(0))
    frames = keep
    for _ in range(T - 1):
        frames = g.node("ImageBatch", image1=frames.out(0), image2=free.out(0))
    lat = g.node("SetLatentNoiseMask", samples=g.node("LoadLatent", latent=name).out(0),
                 mask=g.node("ImageToMask", image=frames.out(0), channel="red").out(0))
    enc = g.node("DPMEncode", model=model.out(0), positive=cond.out(0), negative=cond.out(0), latent_image=lat.out(0),
                 seed=3, steps=5, scheduler="simple", denoise=1.0, eta=0.1, cfg=2.0)
    rep = g.node("ReplayLatentWithPrompt", model=model.out(0), positive=cond.out(0), negative=cond.out(0),
                 latent_code=enc.out(0), cfg=2.0)
    sv = g.node("SaveLatent", samples=rep.out(0), filename_prefix=f"video_start_{family}")
    entry = server.run(g.prompt())
    rec = saved_latents(server, entry, sv.id)
    assert rel_err(rec, x0) <= 1e-4, (family, rel_err(rec, x0))
    assert torch.allclose(rec[:, :, 0], x0[:, :, 0], atol=1e-5, rtol=0), family
