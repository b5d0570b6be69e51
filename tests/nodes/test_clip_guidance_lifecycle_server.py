# SPDX-License-Identifier: GPL-3.0-or-later
"""Langevin through a real server: the CLIP energy's model under ComfyUI's model management
(/free unloads it, the next run reloads it, same bits), cancel mid-run, and half precision."""
from __future__ import annotations

import time

import pytest
import torch

from dpmtools.graphs import Graph, encode_graph, rel_err, saved_latents, write_latent
from dpmtools.server import TEST_PACK_NAME, ComfyServer

CLIP_LOAD = "Requested to load ClipEnergyModel"
LANGEVIN_START = "Langevin Latent Sampler: 500 steps"


def _clip_loads(server) -> int:
    return server.log_path.read_text(errors="replace").count(CLIP_LOAD)


def _langevin_graph(neg_tokens: int, prefix: str, steps: int = 2, chain: int = 3, seed: int = 1):
    """Langevin on tiny SD1.5 at cfg 1. The negative prompt is unused at cfg 1 (ComfyUI skips the
    unconditional pass), so changing its token count re-executes the node with the same arithmetic."""
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    pos = g.node("EmptyConditioning", model=ckpt.out(0), tokens=8)
    neg = g.node("EmptyConditioning", model=ckpt.out(0), tokens=neg_tokens)
    clip = g.node("CLIPEnergy", clip_name="tiny_clip", text="a red square", weight=500.0, augmentations=2,
                  color=True, translation=True, resize=True, cutout=True)
    code = g.node("RandomLatentCode", model=ckpt.out(0), width=64, height=64, batch_size=1, seed=1, steps=chain,
                  scheduler="normal", eta=0.2)
    lv = g.node("LangevinLatentSampler", model=ckpt.out(0), positive=pos.out(0), negative=neg.out(0), cfg=1.0,
                vae=ckpt.out(2), energy=clip.out(0), latent_code=code.out(0), steps=steps, step_size=0.05,
                seed=seed, update="all components")
    save = g.node("SaveLatent", samples=lv.out(1), filename_prefix=prefix)
    return g, save.id


def test_free_unloads_the_clip_energy_and_the_next_run_reloads_it(server):
    server.post("/free", {"unload_models": True, "free_memory": True})
    g, sid = _langevin_graph(8, "mm_a")
    n0 = _clip_loads(server)
    a = saved_latents(server, server.run(g.prompt()), sid)
    n1 = _clip_loads(server)
    assert n1 == n0 + 1  # CLIP Energy asked model management for its model
    # another Langevin run (the energy is a cache hit): the model is still loaded, not requested again
    g, sid = _langevin_graph(7, "mm_b")
    b = saved_latents(server, server.run(g.prompt()), sid)
    assert _clip_loads(server) == n1 and torch.equal(a, b)
    # "free memory": the flag is handled after the next prompt (a fully cached one here)
    server.post("/free", {"unload_models": True})
    server.run(g.prompt())
    g, sid = _langevin_graph(6, "mm_c")
    c = saved_latents(server, server.run(g.prompt()), sid)
    assert _clip_loads(server) == n1 + 1  # unloaded by /free, reloaded by Langevin
    assert torch.equal(a, c)


def _ksampler_graph(neg_tokens: int, prefix: str):
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    pos = g.node("EmptyConditioning", model=ckpt.out(0), tokens=8)
    neg = g.node("EmptyConditioning", model=ckpt.out(0), tokens=neg_tokens)
    empty = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    k = g.node("KSampler", model=ckpt.out(0), positive=pos.out(0), negative=neg.out(0), latent_image=empty.out(0),
               seed=3, steps=3, cfg=1.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    save = g.node("SaveLatent", samples=k.out(0), filename_prefix=prefix)
    return g, save.id


def _history_status(server, pid: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        hist = server.get(f"/history/{pid}")
        if pid in hist and hist[pid].get("status", {}).get("status_str") in ("success", "error"):
            return hist[pid]
        time.sleep(0.1)
    raise TimeoutError(pid)


def test_interrupt_during_langevin(server):
    """/interrupt during a long Langevin run stops it; afterwards KSampler on the same (cached) MODEL
    gives the same bits as before and the server runs the next prompt."""
    g, sid = _ksampler_graph(8, "ks_before")
    before = saved_latents(server, server.run(g.prompt()), sid)
    g, _sid = _langevin_graph(5, "lv_cancel", steps=500, chain=6, seed=2)
    started = server.log_path.read_text(errors="replace").count(LANGEVIN_START)
    pid = server.queue(g.prompt())
    deadline = time.time() + 120
    while server.log_path.read_text(errors="replace").count(LANGEVIN_START) == started:
        assert time.time() < deadline, server.log_tail()
        time.sleep(0.1)
    time.sleep(1.0)  # a few chain steps into its first forward/backward walks
    server.interrupt()
    entry = _history_status(server, pid)
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in kinds, kinds
    assert "execution_error" not in kinds
    assert not entry.get("outputs")  # nothing was saved: it stopped before its 500 steps
    g, sid = _ksampler_graph(9, "ks_after")  # same arithmetic, new cache key: KSampler runs again
    after = saved_latents(server, server.run(g.prompt()), sid)
    assert torch.equal(before, after)
    g, sid = _langevin_graph(4, "lv_next", steps=1)
    out = saved_latents(server, server.run(g.prompt()), sid)
    assert torch.isfinite(out).all() and server.alive()


@pytest.fixture(scope="module")
def half_server(model_dirs, tmp_path_factory):
    import sys

    from dpmtools.comfy_env import comfy_dir

    srv = ComfyServer(comfy_dir(), tmp_path_factory.mktemp("comfy_half"), python=sys.executable,
                      model_dirs=model_dirs, extra_args=["--bf16-unet", "--fp16-vae"], pack_name=TEST_PACK_NAME)
    srv.start()
    yield srv
    srv.stop()


def test_half_precision_unet_and_vae(half_server):
    """bf16 UNet weights (ComfyUI computes in float32 on the CPU: manual cast) and an fp16 VAE:
    encode/replay still exact, Langevin gradients finite through the fp16 VAE decode."""
    srv = half_server
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    name = write_latent(srv.input_dir, "half_src", x0)
    g = Graph()
    ckpt, e, _lat, enc = encode_graph(g, "tiny_sd15.safetensors", name, tokens=8, seed=2, steps=4,
                                      scheduler="normal", denoise=0.6, eta=0.3, cfg=1.0)
    rep = g.node("ReplayLatentWithPrompt", model=ckpt.out(0), positive=e.out(0), negative=e.out(0),
                 latent_code=enc.out(0), cfg=1.0)
    rec = g.node("SaveLatent", samples=rep.out(0), filename_prefix="half_rec")
    clip = g.node("CLIPEnergy", clip_name="tiny_clip", text="a red square", weight=500.0, augmentations=2,
                  color=True, translation=True, resize=True, cutout=True)
    lv = g.node("LangevinLatentSampler", model=ckpt.out(0), positive=e.out(0), negative=e.out(0), cfg=1.0,
                vae=ckpt.out(2), energy=clip.out(0), latent_code=enc.out(0), steps=2, step_size=0.05, seed=0,
                update="start only")
    edit = g.node("SaveLatent", samples=lv.out(1), filename_prefix="half_lv")
    entry = srv.run(g.prompt())
    log = srv.log_path.read_text(errors="replace")
    assert "model weight dtype torch.bfloat16" in log
    assert "dtype: torch.float16" in log  # the VAE
    assert rel_err(saved_latents(srv, entry, rec.id), x0) <= 1e-4
    edited = saved_latents(srv, entry, edit.id)
    assert torch.isfinite(edited).all() and not torch.allclose(edited, x0, atol=1e-4)
