# SPDX-License-Identifier: GPL-3.0-or-later
"""Code files that refuse corruption, codes that know their model, and no silent NaN: through the real server."""
from __future__ import annotations

import json
import random

import pytest
import torch

from dpmtools.graphs import Graph, encode_graph, rel_err, saved_latents, write_latent
from dpmtools.server import PromptError

STEPS = 6


def _encode_and_save(server, name, ckpt="tiny_sd15.safetensors", prefix="integrity/code"):
    """Encode a random 4-channel latent with the tiny SD1.5 model and save its code; returns
    (x0, the output-relative file name)."""
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(21))
    lat = write_latent(server.input_dir, name, x0)
    g = Graph()
    *_, enc = encode_graph(g, ckpt, lat, tokens=8, seed=3, steps=STEPS, scheduler="normal", denoise=0.8, eta=0.1,
                           cfg=1.0)
    save = g.node("SaveLatentCode", latent_code=enc.out(0), filename_prefix=prefix)
    entry = server.run(g.prompt())
    rel = entry["outputs"][save.id]["text"][0].split("saved ", 1)[1]
    return x0, rel


def _replay_graph(code_file, ckpt="tiny_sd15.safetensors", prefix="integrity_out"):
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    empty = g.node("EmptyConditioning", model=ck.out(0), tokens=8)
    load = g.node("LoadLatentCode", code_file=code_file)
    rep = g.node("ReplayLatentWithPrompt", model=ck.out(0), positive=empty.out(0), negative=empty.out(0),
                 latent_code=load.out(0), cfg=1.0)
    out = g.node("SaveLatent", samples=rep.out(0), filename_prefix=prefix)
    return g, out


def _options(server):
    spec = server.get("/object_info/LoadLatentCode")["LoadLatentCode"]["input"]["required"]["code_file"]
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


@pytest.fixture(scope="module")
def saved_code(server):
    return _encode_and_save(server, "integrity_src")


def test_save_then_load_from_the_output_folder_without_copying(server, saved_code):
    x0, rel = saved_code
    assert rel.startswith("integrity/") and rel.endswith(".dpmcode.safetensors")
    assert f"{rel} [output]" in _options(server)
    assert not (server.input_dir / rel).exists()
    g, out = _replay_graph(f"{rel} [output]")
    entry = server.run(g.prompt())
    assert rel_err(saved_latents(server, entry, out.id), x0) <= 1e-4
    # a name that climbs out of the output folder is refused before anything runs
    g, _ = _replay_graph("../../etc/passwd [output]")
    with pytest.raises(PromptError, match="outside the folder"):
        server.run(g.prompt())


def _variants(raw: bytes, seed: int = 2026):
    """(label, bytes) corruptions of a valid code file."""
    rng = random.Random(seed)
    n = int.from_bytes(raw[:8], "little")
    out = []
    for k in range(8):  # the length prefix
        out.append((f"prefix byte {k}", k))
    for _ in range(16):  # the JSON header
        out.append(("header byte", 8 + rng.randrange(n)))
    for _ in range(16):  # the tensor data
        out.append(("data byte", 8 + n + rng.randrange(len(raw) - 8 - n)))
    files = []
    for label, pos in out:
        b = bytearray(raw)
        b[pos] ^= rng.randrange(1, 256)
        files.append((f"{label} {pos}", bytes(b)))
    header = raw[8:8 + n]
    # flips that keep the JSON valid and the layout consistent
    for old, new in [(b'"eta":"0.1"', b'"eta":"0.2"'), (b'"family":"ve"', b'"family":"vf"'),
                     (b'"latent_format":"SD15"', b'"latent_format":"SD16"'), (b'"sha256":"', b'"sha255":"')]:
        assert header.count(old) == 1, old
        files.append((f"valid-JSON edit {old!r}", raw[:8] + header.replace(old, new) + raw[8 + n:]))
    pad = header.rstrip(b" ")
    if len(pad) < len(header):
        files.append(("padding space to tab", raw[:8 + len(pad)] + b"\t" + raw[9 + len(pad):]))
    for cut in (0, 4, 8, 8 + n // 2, 8 + n, len(raw) - 3):
        files.append((f"truncated at {cut}", raw[:cut]))
    import pickle

    files.append(("renamed pickle", pickle.dumps({"noises": list(range(64))})))
    hdr = json.loads(header)
    hdr["noises"]["shape"] = [2 ** 40, 2 ** 30, 4, 8, 8]
    hb = json.dumps(hdr).encode()
    files.append(("huge shape", len(hb).to_bytes(8, "little") + hb + raw[8 + n:]))
    return files


def test_fuzz_every_corrupted_code_is_refused_and_the_server_serves_on(server, saved_code):
    x0, rel = saved_code
    raw = (server.output_dir / rel).read_bytes()
    variants = _variants(raw)
    assert len(variants) >= 50
    accepted = []
    for k, (label, data) in enumerate(variants):
        fname = f"fuzz_{k:03d}.dpmcode.safetensors"
        (server.input_dir / fname).write_bytes(data)
        g, _ = _replay_graph(fname, prefix="fuzz_never")
        try:
            server.run(g.prompt())
            accepted.append(label)
        except PromptError as e:
            msg = str(e)
            assert fname in msg and "LoadLatentCode" in msg, (label, msg)
            assert "corrupt" in msg or "not a DPM latent code" in msg, (label, msg)
    assert not accepted, f"{len(accepted)} of {len(variants)} corrupted codes loaded: {accepted}"
    assert server.alive()
    print(f"fuzz: {len(variants)} corrupted codes, all refused")
    # a valid code still reconstructs exactly afterwards
    g, out = _replay_graph(f"{rel} [output]", prefix="fuzz_after")
    entry = server.run(g.prompt())
    assert rel_err(saved_latents(server, entry, out.id), x0) <= 1e-4


def test_codes_know_their_latent_space(server, saved_code, pack):
    x0, rel = saved_code
    # SD1.5 code on SDXL: both 4-channel eps, different latent spaces -> a clear node error naming both
    g, _ = _replay_graph(f"{rel} [output]", ckpt="tiny_sdxl.safetensors")
    with pytest.raises(PromptError) as ei:
        server.run(g.prompt())
    msg = str(ei.value)
    for needle in ("latent_code", "SD15", "0.18215", "SDXL", "0.13025", "latent spaces differ"):
        assert needle in msg, msg
    # Langevin Latent Sampler refuses it the same way, before any chain step
    g = Graph()
    xl = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sdxl.safetensors")
    e = g.node("EmptyConditioning", model=xl.out(0), tokens=8)
    clip = g.node("CLIPEnergy", clip_name="tiny_clip", text="a red square", weight=100.0, augmentations=1,
                  color=False, translation=False, resize=False, cutout=False)
    load = g.node("LoadLatentCode", code_file=f"{rel} [output]")
    lv = g.node("LangevinLatentSampler", model=xl.out(0), positive=e.out(0), negative=e.out(0), cfg=1.0,
                vae=xl.out(2), energy=clip.out(0), latent_code=load.out(0), steps=1, step_size=0.01, seed=0,
                update="start only")
    g.node("SaveLatent", samples=lv.out(1), filename_prefix="never_lv_xl")
    with pytest.raises(PromptError) as ei:
        server.run(g.prompt())
    assert "LangevinLatentSampler" in str(ei.value) and "latent spaces differ" in str(ei.value), str(ei.value)
    # a second SD1.5 (a fine-tune: same latent space) still translates
    g, out = _replay_graph(f"{rel} [output]", ckpt="tiny_sd15_b.safetensors", prefix="integrity_b")
    trans = saved_latents(server, server.run(g.prompt()), out.id)
    assert torch.isfinite(trans).all() and rel_err(trans, x0) > 1e-2
    # the file records the latent space
    code = pack.samplers.code_format.load_code(server.output_dir / rel)
    assert (code.latent_format, code.latent_scale_factor, code.model_type) == ("SD15", 0.18215, "SD15 (EPS)")
    # a version-1 file (no digest, no latent format) from before still loads and reconstructs exactly
    from safetensors.torch import save_file

    fmt = pack.samplers.code_format
    meta = {k: v for k, v in fmt.code_metadata(code).items()
            if k not in ("latent_format", "latent_scale_factor", "model_type")}
    meta["format_version"] = "1"
    save_file({k: v for k, v in fmt.code_tensors(code).items()}, str(server.input_dir / "old_v1.dpmcode.safetensors"),
              metadata=meta)
    g, out = _replay_graph("old_v1.dpmcode.safetensors", prefix="integrity_v1")
    assert rel_err(saved_latents(server, server.run(g.prompt()), out.id), x0) <= 1e-4


def _nan_late_positive(g, model, start=0.5):
    """A conditioning whose strength is NaN from ``start`` of the model's schedule on: the model's
    prediction turns NaN at one step in the middle of the chain."""
    empty = g.node("EmptyConditioning", model=model, tokens=8)
    nan = g.node("ConditioningSetAreaStrength", conditioning=empty.out(0), strength=float("nan"))
    late = g.node("ConditioningSetTimestepRange", conditioning=nan.out(0), start=start, end=1.0)
    pos = g.node("ConditioningCombine", conditioning_1=late.out(0), conditioning_2=empty.out(0))
    return empty, pos


def _first_nan_step(steps: int, start: float = 0.5) -> int:
    import comfy.model_sampling
    import comfy.samplers

    ms = comfy.model_sampling.ModelSamplingDiscrete()
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", steps)
    thr = float(ms.percent_to_sigma(start))
    return 1 + next(i for i, s in enumerate(sigmas.tolist()) if s <= thr)


def test_nan_at_one_step_is_a_node_error_naming_the_step(server):
    steps = 8
    want = _first_nan_step(steps)
    assert 1 < want < steps
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    empty, pos = _nan_late_positive(g, ck.out(0))
    code = g.node("RandomLatentCode", model=ck.out(0), width=64, height=64, batch_size=1, seed=0, steps=steps,
                  scheduler="normal", eta=0.1)
    rep = g.node("ReplayLatentWithPrompt", model=ck.out(0), positive=pos.out(0), negative=empty.out(0),
                 latent_code=code.out(0), cfg=1.0)
    g.node("SaveLatent", samples=rep.out(0), filename_prefix="nan_never")
    with pytest.raises(PromptError) as ei:
        server.run(g.prompt())
    msg = str(ei.value)
    assert "ReplayLatentWithPrompt" in msg and f"at step {want} of {steps}" in msg, msg
    assert "fp32" in msg and "step_size" in msg and "another" in msg, msg

    # DPM Encode: the same forced NaN while encoding
    lat = write_latent(server.input_dir, "nan_src", torch.randn(1, 4, 8, 8))
    g2 = Graph()
    ck = g2.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    empty, pos = _nan_late_positive(g2, ck.out(0))
    li = g2.node("LoadLatent", latent=lat)
    enc = g2.node("DPMEncode", model=ck.out(0), positive=pos.out(0), negative=empty.out(0), latent_image=li.out(0),
                  seed=0, steps=steps, scheduler="normal", denoise=1.0, eta=0.1, cfg=1.0)
    g2.node("SaveLatentCode", latent_code=enc.out(0), filename_prefix="nan_never")
    with pytest.raises(PromptError) as ei:
        server.run(g2.prompt())
    assert "DPMEncode" in str(ei.value) and f"at step {want} of {steps}" in str(ei.value), str(ei.value)
    # nothing was saved, and the server serves on
    assert not list(server.output_dir.glob("nan_never*"))
    assert server.alive()


@pytest.mark.parametrize("memory", ["low: recompute each step", "auto"])
def test_nan_in_the_langevin_chain_names_the_chain_step(server, memory):
    """Both gradient paths (recompute per step; keep the chain, which auto picks for the tiny model)."""
    steps = 8
    want = _first_nan_step(steps)
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    empty, pos = _nan_late_positive(g, ck.out(0))
    clip = g.node("CLIPEnergy", clip_name="tiny_clip", text="a red square", weight=100.0, augmentations=1,
                  color=False, translation=False, resize=False, cutout=False)
    code = g.node("RandomLatentCode", model=ck.out(0), width=64, height=64, batch_size=1, seed=0, steps=steps,
                  scheduler="normal", eta=0.1)
    lv = g.node("LangevinLatentSampler", model=ck.out(0), positive=pos.out(0), negative=empty.out(0), cfg=1.0,
                vae=ck.out(2), energy=clip.out(0), latent_code=code.out(0), steps=2, step_size=0.01, seed=0,
                update="all components", memory=memory)
    g.node("SaveLatent", samples=lv.out(1), filename_prefix="nan_never_lv")
    with pytest.raises(PromptError) as ei:
        server.run(g.prompt())
    msg = str(ei.value)
    assert "LangevinLatentSampler" in msg and "Langevin step 1" in msg, msg
    assert f"chain step {want} of {steps}" in msg and "step_size" in msg and "fp32" in msg, msg
    assert server.alive()
