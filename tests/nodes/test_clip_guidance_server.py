# SPDX-License-Identifier: GPL-3.0-or-later
"""Langevin Latent Sampler through a real server: runs, and leaves ComfyUI's model management correct."""
from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from dpmtools.graphs import Graph, encode_graph, saved_latents, write_latent
from dpmtools.server import PromptError


def _tiny_lora(model_dirs) -> str:
    """A rank-2 LoRA on every attention projection of the tiny SD1.5 UNet."""
    sd = load_file(str(model_dirs["checkpoints"] / "tiny_sd15.safetensors"))
    g = torch.Generator().manual_seed(0)
    lora = {}
    for k, w in sd.items():
        if k.startswith("model.diffusion_model.") and k.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight")):
            base = "diffusion_model." + k[len("model.diffusion_model."):-len(".weight")]
            out_f, in_f = w.shape
            lora[f"{base}.lora_up.weight"] = 0.5 * torch.randn(out_f, 2, generator=g)
            lora[f"{base}.lora_down.weight"] = 0.5 * torch.randn(2, in_f, generator=g)
            lora[f"{base}.alpha"] = torch.tensor(2.0)
    assert lora
    save_file(lora, str(model_dirs["loras"] / "tiny_lora.safetensors"))
    return "tiny_lora.safetensors"


def test_langevin_then_ksampler_with_lora_and_without(server, model_dirs):
    """After Langevin on a LoRA-patched MODEL, KSampler on that MODEL and on the base MODEL give
    bit-for-bit what they gave before any Langevin run (patch/unpatch and weights intact)."""
    lora_name = _tiny_lora(model_dirs)
    server.post("/free", {"unload_models": True, "free_memory": True})

    def base_graph():
        g = Graph()
        ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
        lora = g.node("LoraLoaderModelOnly", model=ckpt.out(0), lora_name=lora_name, strength_model=1.0)
        e = g.node("EmptyConditioning", model=ckpt.out(0), tokens=8)
        return g, ckpt, lora, e

    def ks(g, model, e, latent, prefix):
        k = g.node("KSampler", model=model, positive=e.out(0), negative=e.out(0), latent_image=latent,
                   seed=3, steps=4, cfg=1.0, sampler_name="euler", scheduler="normal", denoise=1.0)
        return g.node("SaveLatent", samples=k.out(0), filename_prefix=prefix).id

    g, ckpt, lora, e = base_graph()
    empty = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    ids = {"lora": ks(g, lora.out(0), e, empty.out(0), "before_lora"),
           "base": ks(g, ckpt.out(0), e, empty.out(0), "before_base")}
    entry = server.run(g.prompt())
    before = {k: saved_latents(server, entry, v) for k, v in ids.items()}
    assert not torch.equal(before["lora"], before["base"])  # the LoRA does something

    g, ckpt, lora, e = base_graph()
    clip = g.node("CLIPEnergy", clip_name="tiny_clip", text="a red square", weight=500.0, augmentations=2,
                  color=True, translation=True, resize=True, cutout=True)
    code = g.node("RandomLatentCode", model=ckpt.out(0), width=64, height=64, batch_size=1, seed=1, steps=3,
                  scheduler="normal", eta=0.2)
    lv = g.node("LangevinLatentSampler", model=lora.out(0), positive=e.out(0), negative=e.out(0), cfg=1.0,
                vae=ckpt.out(2), energy=clip.out(0), latent_code=code.out(0), steps=2, step_size=0.05, seed=0,
                update="all components")
    zero = g.node("LatentMultiply", samples=lv.out(1), multiplier=0.0)  # makes the KSamplers run after it
    ids = {"lora": ks(g, lora.out(0), e, zero.out(0), "after_lora"),
           "base": ks(g, ckpt.out(0), e, zero.out(0), "after_base")}
    g.node("SaveLatent", samples=lv.out(1), filename_prefix="langevin")
    g.node("SaveImage", images=lv.out(2), filename_prefix="langevin_plot")
    entry = server.run(g.prompt())
    after = {k: saved_latents(server, entry, v) for k, v in ids.items()}
    assert torch.equal(after["lora"], before["lora"])
    assert torch.equal(after["base"], before["base"])
    plot = [o for o in entry["outputs"].values() if "images" in o]
    assert plot and plot[0]["images"][0]["filename"].endswith(".png")


def test_langevin_on_an_encoded_image_and_errors(server):
    x0 = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    name = write_latent(server.input_dir, "lv_edit", x0)
    g = Graph()
    ckpt, e, lat, enc = encode_graph(g, "tiny_sd3.safetensors", name, tokens=8,
                                      seed=2, steps=4, scheduler="simple", denoise=0.5, eta=0.3, cfg=1.0)
    c1 = g.node("CLIPEnergy", clip_name="tiny_clip", text="a blue circle", weight=500.0, augmentations=2,
                color=True, translation=True, resize=True, cutout=True)
    c2 = g.node("CLIPEnergy", clip_name="tiny_clip", text="a circle", weight=100.0, augmentations=1,
                color=False, translation=False, resize=False, cutout=False)
    both = g.node("CombineEnergies", energy_1=c1.out(0), weight_1=1.0, energy_2=c2.out(0), weight_2=0.5)
    lv = g.node("LangevinLatentSampler", model=ckpt.out(0), positive=e.out(0), negative=e.out(0), cfg=1.0,
                vae=ckpt.out(2), energy=both.out(0), latent_code=enc.out(0), steps=2, step_size=0.05, seed=0,
                update="start only")
    out = g.node("SaveLatent", samples=lv.out(1), filename_prefix="lv_edit")
    g.node("SaveLatentCode", latent_code=lv.out(0), filename_prefix="lv_edit_code")
    entry = server.run(g.prompt())
    edited = saved_latents(server, entry, out.id)
    assert edited.shape == x0.shape and torch.isfinite(edited).all()
    assert not torch.allclose(edited, x0, atol=1e-4)  # the start moved

    # a missing CLIP folder is refused with the folder's name
    g.nodes[c1.id]["inputs"]["clip_name"] = "no_such_clip"
    try:
        server.run(g.prompt())
        raise AssertionError("expected an error")
    except PromptError as err:
        assert "no_such_clip" in str(err)
    # a VAE of the wrong family
    g.nodes[c1.id]["inputs"]["clip_name"] = "tiny_clip"
    sd15 = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    g.nodes[lv.id]["inputs"]["vae"] = sd15.out(2).link
    try:
        server.run(g.prompt())
        raise AssertionError("expected an error")
    except PromptError as err:
        assert "vae" in str(err) and "4-channel" in str(err)
    assert server.alive()
