# SPDX-License-Identifier: GPL-3.0-or-later
"""DPM Encode / Replay through a real ComfyUI server with tiny models built by ComfyUI's classes."""
from __future__ import annotations

import pytest
import torch

from dpmtools.graphs import Graph, encode_graph, rel_err, saved_latents, write_latent
from dpmtools.server import PromptError

NODES = ["DPMEncode", "ReplayLatentWithPrompt", "EmptyConditioning", "SaveLatentCode", "LoadLatentCode",
         "RandomLatentCode", "CLIPEnergy", "CombineEnergies", "LangevinLatentSampler"]


def test_pack_nodes_are_registered(server):
    info = server.object_info()
    for n in NODES:
        assert n in info, n
        assert info[n]["category"] == "sampling/dpm_latent"
    enc = info["DPMEncode"]
    assert enc["output"] == ["DPM_LATENT_CODE"]
    req = enc["input"]["required"]
    assert list(req) == ["model", "positive", "negative", "latent_image", "seed", "steps", "scheduler",
                         "denoise", "eta", "cfg"]
    assert req["steps"][1]["default"] == 50 and req["denoise"][1]["default"] == 0.7
    assert req["eta"][1]["default"] == 0.1 and req["cfg"][1]["default"] == 1.0
    assert "sigmas" in enc["input"]["optional"]
    assert info["ReplayLatentWithPrompt"]["input"]["required"]["cfg"][1]["default"] == 3.0
    assert info["ReplayLatentWithPrompt"]["output"] == ["LATENT"]
    # every input has a tooltip
    for n in NODES:
        for group in ("required", "optional"):
            for name, spec in info[n]["input"].get(group, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), (n, name)


def _sd15_text(g, pos_text, neg_text="blurry"):
    clip = g.node("CLIPLoader", clip_name="tiny_clip_l.safetensors", type="stable_diffusion")
    pos = g.node("CLIPTextEncode", text=pos_text, clip=clip.out(0))
    neg = g.node("CLIPTextEncode", text=neg_text, clip=clip.out(0))
    return pos, neg


def _round_trip_branches(g, model, pos, neg, latent_name, prefix, cases):
    """One encode -> replay -> SaveLatent branch per case; returns {case: save node id}."""
    lat = g.node("LoadLatent", latent=latent_name)
    saves = {}
    for k, (denoise, cfg, steps) in enumerate(cases):
        enc = g.node("DPMEncode", model=model, positive=pos.out(0), negative=neg.out(0), latent_image=lat.out(0),
                     seed=100 + k, steps=steps, scheduler="normal", denoise=denoise, eta=0.1, cfg=cfg)
        rep = g.node("ReplayLatentWithPrompt", model=model, positive=pos.out(0), negative=neg.out(0),
                     latent_code=enc.out(0), cfg=cfg)
        saves[(denoise, cfg, steps)] = g.node("SaveLatent", samples=rep.out(0),
                                              filename_prefix=f"{prefix}_{k}").id
    return saves


CASES = [(1.0, 1.0, 8), (0.6, 1.0, 10), (1.0, 4.0, 8), (0.5, 3.0, 12)]


@pytest.mark.parametrize("prediction", ["eps", "v_prediction"])
def test_exact_reconstruction_eps_v(server, prediction):
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    name = write_latent(server.input_dir, f"rt_{prediction}", x0)
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    model = ckpt.out(0)
    if prediction != "eps":
        model = g.node("ModelSamplingDiscrete", model=model, sampling=prediction, zsnr=False).out(0)
    pos, neg = _sd15_text(g, "a photo of a cat")
    saves = _round_trip_branches(g, model, pos, neg, name, f"rt_{prediction}", CASES)
    entry = server.run(g.prompt())
    for case, nid in saves.items():
        rec = saved_latents(server, entry, nid)
        assert rec.shape == x0.shape
        assert rel_err(rec, x0) <= 1e-4, (case, rel_err(rec, x0))


def test_exact_reconstruction_flow(server):
    x0 = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    name = write_latent(server.input_dir, "rt_flow", x0)
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd3.safetensors")
    model = g.node("ModelSamplingSD3", model=ckpt.out(0), shift=3.0).out(0)
    empty = g.node("EmptyConditioning", model=model, tokens=77)
    saves = _round_trip_branches(g, model, empty, empty, name, "rt_flow", CASES)
    entry = server.run(g.prompt())
    for case, nid in saves.items():
        rec = saved_latents(server, entry, nid)
        assert rel_err(rec, x0) <= 1e-4, (case, rel_err(rec, x0))


def test_new_prompt_and_second_model_change_the_result(server):
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    name = write_latent(server.input_dir, "edit", x0)
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    ckpt_b = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15_b.safetensors")
    src, neg = _sd15_text(g, "a photo of a cat")
    clip = g.node("CLIPLoader", clip_name="tiny_clip_l.safetensors", type="stable_diffusion")
    tgt = g.node("CLIPTextEncode", text="an oil painting of a dog", clip=clip.out(0))
    lat = g.node("LoadLatent", latent=name)
    enc = g.node("DPMEncode", model=ckpt.out(0), positive=src.out(0), negative=neg.out(0),
                 latent_image=lat.out(0), seed=7, steps=10, scheduler="normal", denoise=0.8, eta=0.1, cfg=1.0)
    same = g.node("ReplayLatentWithPrompt", model=ckpt.out(0), positive=src.out(0), negative=neg.out(0),
                  latent_code=enc.out(0), cfg=1.0)
    edit = g.node("ReplayLatentWithPrompt", model=ckpt.out(0), positive=tgt.out(0), negative=neg.out(0),
                  latent_code=enc.out(0), cfg=3.0)
    trans = g.node("ReplayLatentWithPrompt", model=ckpt_b.out(0), positive=src.out(0), negative=neg.out(0),
                   latent_code=enc.out(0), cfg=1.0)
    ids = {k: g.node("SaveLatent", samples=v.out(0), filename_prefix=f"edit_{k}").id
           for k, v in {"same": same, "edit": edit, "trans": trans}.items()}
    entry = server.run(g.prompt())
    same_l, edit_l, trans_l = (saved_latents(server, entry, ids[k]) for k in ("same", "edit", "trans"))
    assert rel_err(same_l, x0) <= 1e-4
    assert rel_err(edit_l, x0) > 1e-2
    assert rel_err(trans_l, x0) > 1e-2
    assert torch.isfinite(edit_l).all() and torch.isfinite(trans_l).all()


def test_save_load_code_round_trip(server):
    x0 = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    name = write_latent(server.input_dir, "saveload", x0)
    g = Graph()
    ckpt, empty, lat, enc = encode_graph(g, "tiny_sd3.safetensors", name, tokens=77,
                                      seed=1, steps=6, scheduler="simple", denoise=0.7, eta=0.2, cfg=1.0)
    save = g.node("SaveLatentCode", latent_code=enc.out(0), filename_prefix="codes/rt")
    entry = server.run(g.prompt())
    text = entry["outputs"][save.id]["text"][0]
    rel = text.split("saved ", 1)[1]
    saved = server.output_dir / rel
    assert saved.is_file() and saved.name.endswith(".dpmcode.safetensors")
    # the user copies it into the input folder, then loads it in another workflow
    (server.input_dir / "codes").mkdir(exist_ok=True)
    (server.input_dir / "codes" / saved.name).write_bytes(saved.read_bytes())
    info = server.get("/object_info/LoadLatentCode")["LoadLatentCode"]
    spec = info["input"]["required"]["code_file"]
    options = spec[1]["options"] if spec[0] == "COMBO" else spec[0]
    assert f"codes/{saved.name}" in options
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd3.safetensors")
    empty = g.node("EmptyConditioning", model=ckpt.out(0), tokens=77)
    load = g.node("LoadLatentCode", code_file=f"codes/{saved.name}")
    rep = g.node("ReplayLatentWithPrompt", model=ckpt.out(0), positive=empty.out(0), negative=empty.out(0),
                 latent_code=load.out(0), cfg=1.0)
    out = g.node("SaveLatent", samples=rep.out(0), filename_prefix="saveload_out")
    entry = server.run(g.prompt())
    assert rel_err(saved_latents(server, entry, out.id), x0) <= 1e-4


def _expect_error(server, prompt, *needles):
    with pytest.raises(PromptError) as ei:
        server.run(prompt)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, msg
    return msg


def test_bad_inputs_give_clear_errors_and_the_server_keeps_serving(server, pack):
    # wrong channels: a 4-channel latent into a 16-channel flow model
    name = write_latent(server.input_dir, "four", torch.randn(1, 4, 8, 8))
    g = Graph()
    ckpt, empty, lat, enc = encode_graph(g, "tiny_sd3.safetensors", name, tokens=77,
                                      seed=1, steps=4, scheduler="simple", denoise=1.0, eta=0.1, cfg=1.0)
    g.node("SaveLatentCode", latent_code=enc.out(0), filename_prefix="never")
    _expect_error(server, g.prompt(), "latent_image", "4 latent channels", "expects 16")

    # NaN in the input latent
    bad = torch.randn(1, 16, 8, 8)
    bad[0, 0, 0, 0] = float("nan")
    g.nodes["3"]["inputs"]["latent"] = write_latent(server.input_dir, "nan", bad)
    _expect_error(server, g.prompt(), "NaN")

    # eta = 0 is refused before anything runs
    g.nodes["3"]["inputs"]["latent"] = write_latent(server.input_dir, "ok16", torch.randn(1, 16, 8, 8))
    g.nodes[enc.id]["inputs"]["eta"] = 0.0
    _expect_error(server, g.prompt(), "eta")

    # family mismatch: a flow code replayed by an eps model
    g.nodes[enc.id]["inputs"]["eta"] = 0.1
    sd15 = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    e15 = g.node("EmptyConditioning", model=sd15.out(0), tokens=77)
    rep = g.node("ReplayLatentWithPrompt", model=sd15.out(0), positive=e15.out(0), negative=e15.out(0),
                 latent_code=enc.out(0), cfg=1.0)
    g.node("SaveLatent", samples=rep.out(0), filename_prefix="never")
    _expect_error(server, g.prompt(), "latent_code", "flow", "eps/v-prediction")

    # a corrupt code file
    (server.input_dir / "broken.dpmcode.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    g = Graph()
    sd15 = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    e15 = g.node("EmptyConditioning", model=sd15.out(0), tokens=77)
    load = g.node("LoadLatentCode", code_file="broken.dpmcode.safetensors")
    rep = g.node("ReplayLatentWithPrompt", model=sd15.out(0), positive=e15.out(0), negative=e15.out(0),
                 latent_code=load.out(0), cfg=1.0)
    g.node("SaveLatent", samples=rep.out(0), filename_prefix="never")
    _expect_error(server, g.prompt(), "code_file", "broken.dpmcode.safetensors")

    # a code file whose tensors disagree in size (e.g. edited by another tool)
    fmt = pack.samplers.code_format
    from safetensors.torch import save_file

    sig = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    good = {"sigmas": sig, "start_mean": torch.zeros(1, 16, 8, 8), "start_noise": torch.zeros(1, 16, 8, 8),
            "noises": torch.zeros(1, 1, 16, 8, 8), "residual": torch.zeros(1, 16, 6, 6)}
    meta = {"format": fmt.FORMAT_NAME, "format_version": "1", "family": "flow", "eta": "0.1", "start_scale": "1.0",
            "shape": "[1, 16, 8, 8]", "steps": "2", "sigmas": "[1.0, 0.5, 0.0]"}
    save_file(good, str(server.input_dir / "sizes.dpmcode.safetensors"), metadata=meta)
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd3.safetensors")
    e = g.node("EmptyConditioning", model=ckpt.out(0), tokens=8)
    load = g.node("LoadLatentCode", code_file="sizes.dpmcode.safetensors")
    rep = g.node("ReplayLatentWithPrompt", model=ckpt.out(0), positive=e.out(0), negative=e.out(0),
                 latent_code=load.out(0), cfg=1.0)
    g.node("SaveLatent", samples=rep.out(0), filename_prefix="never")
    _expect_error(server, g.prompt(), "code_file", "residual has shape (1, 16, 6, 6)", "expected (1, 16, 8, 8)")

    # after all these errors the server still runs a good prompt
    assert server.alive()
    g = Graph()
    fine = write_latent(server.input_dir, "fine", torch.randn(1, 16, 8, 8))
    ckpt, empty, lat, enc = encode_graph(g, "tiny_sd3.safetensors", fine, tokens=77,
                                      seed=1, steps=4, scheduler="simple", denoise=1.0, eta=0.1, cfg=1.0)
    rep = g.node("ReplayLatentWithPrompt", model=ckpt.out(0), positive=empty.out(0), negative=empty.out(0),
                 latent_code=enc.out(0), cfg=1.0)
    out = g.node("SaveLatent", samples=rep.out(0), filename_prefix="after_errors")
    entry = server.run(g.prompt())
    assert saved_latents(server, entry, out.id).shape == (1, 16, 8, 8)


def test_cancel_stops_a_long_encode(server):
    """POST /interrupt (the UI's Cancel) ends DPM Encode at its next step: the prompt is
    interrupted and produces nothing, and the server takes the next prompt."""
    import time

    name = write_latent(server.input_dir, "long", torch.randn(1, 4, 8, 8))
    g = Graph()
    ckpt, empty, lat, enc = encode_graph(g, "tiny_sd15.safetensors", name, tokens=8,
                                      seed=11, steps=900, scheduler="normal", denoise=1.0, eta=0.1, cfg=1.0)
    save = g.node("SaveLatentCode", latent_code=enc.out(0), filename_prefix="cancelled")
    pid = server.queue(g.prompt())
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until it is running
        if server.get("/queue")["queue_running"]:
            break
        time.sleep(0.05)
    time.sleep(1.0)
    server.interrupt()
    hist = None
    while time.time() < deadline:
        h = server.get(f"/history/{pid}")
        if pid in h and h[pid].get("status", {}).get("completed") is not None:
            hist = h[pid]
            break
        time.sleep(0.1)
    assert hist is not None, "the interrupted prompt never finished"
    kinds = [m[0] for m in hist["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    assert save.id not in hist.get("outputs", {})
    assert server.alive()
