# SPDX-License-Identifier: GPL-3.0-or-later
"""Asyrp nodes through a real ComfyUI server with the tiny SD1.5 / SDXL / SD3 checkpoints and the tiny CLIP."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from dpmtools.graphs import Graph, saved_latents, write_latent
from dpmtools.server import PromptError

NODES = ["AsyrpTrainDirection", "AsyrpEdit", "AsyrpEditDDIM", "CombineAsyrpDirections", "SaveAsyrpDirection", "LoadAsyrpDirection"]
SRC, TRG = "a red circle", "a blue circle"


def test_nodes_registered_with_contract_inputs_and_tooltips(server):
    info = server.object_info()
    for n in NODES:
        assert n in info and info[n]["category"] == "sampling/dpm_latent", n
        for group in ("required", "optional"):
            for name, spec in info[n]["input"].get(group, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), (n, name)
    train = info["AsyrpTrainDirection"]["input"]["required"]
    assert list(train) == ["model", "vae", "latents", "clip_name", "source_text", "target_text", "steps", "t_edit",
                           "iterations", "learning_rate", "clip_weight", "l1_weight", "seed", "kind"]
    assert train["steps"][1]["default"] == 40 and train["clip_weight"][1]["default"] == 1.0
    assert train["l1_weight"][1]["default"] == 3.0
    assert info["AsyrpTrainDirection"]["output"][0] == "ASYRP_DIRECTION"
    edit = info["AsyrpEdit"]["input"]["required"]
    assert list(edit) == ["model", "positive", "negative", "cfg", "latent_code", "direction", "strength", "t_edit",
                          "t_boost"]
    assert info["AsyrpEdit"]["output"] == ["LATENT"]


def _train(g, ckpt, lat, seed, held=None, kind="global direction", steps=6, iterations=2, lr=20.0, l1=0.3):
    # settings measured on the random tiny models: the paper's lr 0.5 / l1 3.0 barely move a random h-space
    extra = {} if held is None else {"validation_latents": held.out(0)}
    return g.node("AsyrpTrainDirection", model=ckpt.out(0), vae=ckpt.out(2), latents=lat.out(0),
                  clip_name="tiny_clip", source_text=SRC, target_text=TRG, steps=steps, t_edit=0.5,
                  iterations=iterations, learning_rate=lr, clip_weight=1.0, l1_weight=l1, seed=seed, kind=kind,
                  **extra)


def _encode(g, ckpt, cond, lat, steps=6):
    return g.node("DPMEncode", model=ckpt.out(0), positive=cond.out(0), negative=cond.out(0),
                  latent_image=lat.out(0), seed=3, steps=steps, scheduler="normal", denoise=1.0, eta=0.1, cfg=1.0)


def _edit(g, ckpt, cond, code, direction, strength, t_boost=0.0):
    return g.node("AsyrpEdit", model=ckpt.out(0), positive=cond.out(0), negative=cond.out(0), cfg=1.0,
                  latent_code=code.out(0), direction=direction.out(0), strength=strength, t_edit=-1.0,
                  t_boost=t_boost, seed=0)


def _saved_direction_meta(server, entry, save_id) -> dict:
    from safetensors import safe_open

    rel = entry["outputs"][save_id]["text"][0].split("saved ", 1)[1]
    with safe_open(str(server.output_dir / rel), framework="pt") as f:
        return json.loads(f.metadata()["direction"])


@pytest.fixture(scope="module")
def latents(server):
    g = torch.Generator().manual_seed(11)
    out = {"train": write_latent(server.input_dir, "asyrp_train", torch.randn(3, 4, 8, 8, generator=g)),
           "held": write_latent(server.input_dir, "asyrp_held", torch.randn(3, 4, 8, 8, generator=g))}
    for seed in (1, 2):
        out[f"train{seed}"] = write_latent(server.input_dir, f"asyrp_train{seed}",
                                           torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(100 + seed)))
    return out


def test_training_lowers_directional_clip_loss_on_held_out_images(server, latents):
    """Three seeds, each with its own training images; held-out images are never trained on. The loss is
    the directional CLIP loss of P_t over [T, t_edit]; before training (delta_h = 0) it is the plain model's."""
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    held = g.node("LoadLatent", latent=latents["held"])
    saves = {}
    for seed in range(3):
        train = g.node("LoadLatent", latent=latents["train" if seed == 0 else f"train{seed}"])
        d = _train(g, ckpt, train, seed, held=held)
        saves[seed] = g.node("SaveAsyrpDirection", direction=d.out(0), filename_prefix=f"asyrp/held{seed}").id
        g.node("PreviewImage", images=d.out(1))
    entry = server.run(g.prompt())
    for seed, sid in saves.items():
        meta = _saved_direction_meta(server, entry, sid)
        before, after = meta["held_out_clip_loss_before"], meta["held_out_clip_loss_after"]
        assert meta["held_out_images"] == 3 and meta["source_text"] == SRC and meta["target_text"] == TRG
        print(f"held-out directional CLIP loss, seed {seed}: {before:.4f} -> {after:.4f}")
        assert after < before - 0.02, (seed, before, after)
        assert meta["clip_loss_curve"][-1] < meta["clip_loss_curve"][0], meta["clip_loss_curve"]
        # ||delta_h|| / ||h|| of the trained direction at each of the 3 edited steps (6 steps, t_edit 0.5)
        assert len(meta["delta_over_h"]) == 3 and all(0.0 < r < 100.0 for r in meta["delta_over_h"]), meta
        assert len(meta["h_norm"]) == 3 and all(v > 0 for v in meta["h_norm"]) and -1 <= meta["text_cosine"] <= 1


def test_strength_zero_is_replay_bit_for_bit_and_the_patch_never_leaks(server, model_dirs, latents):
    copy = model_dirs["checkpoints"] / "tiny_sd15_asyrp_copy.safetensors"
    if not copy.exists():
        shutil.copyfile(model_dirs["checkpoints"] / "tiny_sd15.safetensors", copy)
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    twin = g.node("CheckpointLoaderSimple", ckpt_name=copy.name)
    cond = g.node("EmptyConditioning", model=ckpt.out(0), tokens=77)
    train = g.node("LoadLatent", latent=latents["train"])
    held = g.node("LoadLatent", latent=latents["held"])
    code = _encode(g, ckpt, cond, held)
    d = _train(g, ckpt, train, 0, held=held)
    rep = g.node("ReplayLatentWithPrompt", model=ckpt.out(0), positive=cond.out(0), negative=cond.out(0),
                 latent_code=code.out(0), cfg=1.0)
    zero = _edit(g, ckpt, cond, code, d, "0")
    s_zero = g.node("SaveLatent", samples=zero.out(0), filename_prefix="asyrp_z")
    edit = _edit(g, ckpt, cond, code, d, "0, 1, -1")
    boost = _edit(g, ckpt, cond, code, d, "0", t_boost=0.3)
    s_rep = g.node("SaveLatent", samples=rep.out(0), filename_prefix="asyrp_rep")
    s_edit = g.node("SaveLatent", samples=edit.out(0), filename_prefix="asyrp_e")
    s_boost = g.node("SaveLatent", samples=boost.out(0), filename_prefix="asyrp_b")
    # KSampler after the Asyrp run (its latent input is the edit's output) on the same MODEL object,
    # and on an identical checkpoint that Asyrp never touched
    ks = {}
    for name, m in (("same", ckpt), ("twin", twin)):
        k = g.node("KSampler", model=m.out(0), positive=cond.out(0), negative=cond.out(0), latent_image=edit.out(0),
                   seed=5, steps=4, cfg=1.0, sampler_name="euler", scheduler="normal", denoise=0.6)
        ks[name] = g.node("SaveLatent", samples=k.out(0), filename_prefix=f"asyrp_ks_{name}").id
    entry = server.run(g.prompt())
    r = saved_latents(server, entry, s_rep.id)
    e = saved_latents(server, entry, s_edit.id)
    assert e.shape[0] == 3 * r.shape[0]
    n = r.shape[0]
    assert torch.equal(saved_latents(server, entry, s_zero.id), r)  # strength 0, no boosting: replay, bit for bit
    # in a list the batch is 3x larger, so the model's batched arithmetic may round differently
    assert torch.allclose(e[:n], r, atol=1e-3, rtol=0)
    plus, minus = e[n:2 * n] - r, e[2 * n:] - r
    assert plus.abs().max() > 1e-4 and minus.abs().max() > 1e-4
    assert float((plus * minus).sum()) < 0  # -1 moves the other way
    b = saved_latents(server, entry, s_boost.id)
    assert not torch.equal(b, r)  # boosting replaces the code's noise
    assert torch.equal(saved_latents(server, entry, ks["same"]), saved_latents(server, entry, ks["twin"]))


def test_save_load_round_trip_and_refusals(server, latents):
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    cond = g.node("EmptyConditioning", model=ckpt.out(0), tokens=77)
    train = g.node("LoadLatent", latent=latents["train"])
    held = g.node("LoadLatent", latent=latents["held"])
    d = _train(g, ckpt, train, 0, held=held)
    save = g.node("SaveAsyrpDirection", direction=d.out(0), filename_prefix="asyrp/dir")
    entry = server.run(g.prompt())
    rel = entry["outputs"][save.id]["text"][0].split("saved ", 1)[1]
    saved = server.output_dir / rel
    assert saved.name.endswith(".asyrp.safetensors")
    (server.input_dir / "asyrp").mkdir(exist_ok=True)
    (server.input_dir / "asyrp" / saved.name).write_bytes(saved.read_bytes())

    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    cond = g.node("EmptyConditioning", model=ckpt.out(0), tokens=77)
    train = g.node("LoadLatent", latent=latents["train"])
    held = g.node("LoadLatent", latent=latents["held"])
    code = _encode(g, ckpt, cond, held)
    mem = _train(g, ckpt, train, 0, held=held)
    disk = g.node("LoadAsyrpDirection", direction_file=f"asyrp/{saved.name}")
    both = g.node("CombineAsyrpDirections", direction_1=mem.out(0), coefficient_1=0.5, direction_2=disk.out(0),
                  coefficient_2=0.5)
    outs = {k: g.node("SaveLatent", samples=_edit(g, ckpt, cond, code, dd, "1").out(0), filename_prefix=f"rt_{k}").id
            for k, dd in (("mem", mem), ("disk", disk), ("both", both))}
    entry = server.run(g.prompt())
    mem_l, disk_l, both_l = (saved_latents(server, entry, outs[k]) for k in ("mem", "disk", "both"))
    assert torch.equal(mem_l, disk_l)
    assert torch.allclose(both_l, mem_l, atol=1e-5)  # 0.5 d + 0.5 d = d

    # a flipped byte is refused with the file named
    raw = bytearray(saved.read_bytes())
    raw[-3] ^= 0x40
    (server.input_dir / "asyrp" / "flipped.asyrp.safetensors").write_bytes(bytes(raw))
    g = Graph()
    load = g.node("LoadAsyrpDirection", direction_file="asyrp/flipped.asyrp.safetensors")
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    cond = g.node("EmptyConditioning", model=ckpt.out(0), tokens=77)
    held = g.node("LoadLatent", latent=latents["held"])
    code = _encode(g, ckpt, cond, held)
    g.node("SaveLatent", samples=_edit(g, ckpt, cond, code, load, "1").out(0), filename_prefix="never")
    with pytest.raises(PromptError) as ei:
        server.run(g.prompt())
    assert "flipped.asyrp.safetensors" in str(ei.value) and "corrupt" in str(ei.value)

    # a strength that is not a number names the input and the expected form
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    cond = g.node("EmptyConditioning", model=ckpt.out(0), tokens=77)
    held = g.node("LoadLatent", latent=latents["held"])
    code = _encode(g, ckpt, cond, held)
    load = g.node("LoadAsyrpDirection", direction_file=f"asyrp/{saved.name}")
    g.node("SaveLatent", samples=_edit(g, ckpt, cond, code, load, "1, x").out(0), filename_prefix="never")
    with pytest.raises(PromptError) as ei:
        server.run(g.prompt())
    assert "strength" in str(ei.value) and "comma-separated" in str(ei.value)

    # an SD1.5 (U-Net) direction on an SDXL model, and on an SD3 model (h in its MMDiT), are node errors
    for ckpt_name, needles in (("tiny_sdxl.safetensors", ("direction", "model type", "SDXL")),
                               ("tiny_sd3.safetensors", ("direction", "model type", "SD3"))):
        g = Graph()
        sd15 = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
        c15 = g.node("EmptyConditioning", model=sd15.out(0), tokens=77)
        train = g.node("LoadLatent", latent=latents["train"])
        held = g.node("LoadLatent", latent=latents["held"])
        d = _train(g, sd15, train, 0, held=held)
        other = g.node("CheckpointLoaderSimple", ckpt_name=ckpt_name)
        oc = g.node("EmptyConditioning", model=other.out(0), tokens=77)
        code = _encode(g, sd15, c15, held)
        g.node("SaveLatent", samples=_edit(g, other, oc, code, d, "1").out(0), filename_prefix="never")
        with pytest.raises(PromptError) as ei:
            server.run(g.prompt())
        for n in needles:
            assert n in str(ei.value), str(ei.value)
    assert server.alive()


def test_ddim_inversion_route_reports_its_reconstruction(server, latents):
    from safetensors.torch import load_file

    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    cond = g.node("EmptyConditioning", model=ckpt.out(0), tokens=77)
    train = g.node("LoadLatent", latent=latents["train"])
    held = g.node("LoadLatent", latent=latents["held"])
    d = _train(g, ckpt, train, 0, held=held)
    edit = g.node("AsyrpEditDDIM", model=ckpt.out(0), positive=cond.out(0), negative=cond.out(0), cfg=1.0,
                  latent_image=held.out(0), direction=d.out(0), strength="0, 1", steps=6, t_edit=-1.0, t_boost=0.0,
                  seed=0)
    save = g.node("SaveLatent", samples=edit.out(0), filename_prefix="asyrp_ddim")
    entry = server.run(g.prompt())
    out = saved_latents(server, entry, save.id)
    x0 = load_file(str(server.input_dir / latents["held"]))["latent_tensor"]
    assert out.shape[0] == 2 * x0.shape[0]
    n = x0.shape[0]
    assert (out[n:] - out[:n]).abs().max() > 1e-4  # strength 1 edits
    text = entry["outputs"][edit.id]["text"][0]
    reported = float(text.split("by ", 1)[1].split(" ", 1)[0])
    # the reported error is that of the strength-0 image (same chain, batch rounding aside)
    measured = float(((out[:n] - x0).flatten(1).norm(dim=1) / x0.flatten(1).norm(dim=1)).mean())
    assert reported == pytest.approx(measured, rel=1e-2), (text, measured)
