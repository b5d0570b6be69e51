# SPDX-License-Identifier: GPL-3.0-or-later
"""Langevin previews as a websocket client sees them (issue 18): they follow ``--preview-method`` and
``--preview-size`` the way KSampler's do, so a client that reads binary frames as outputs (as
comfy-api-simplified does) is not flooded with previews under ComfyUI's default ``none``."""
from __future__ import annotations

import io
import sys

import pytest
from PIL import Image

from dpmtools.graphs import Graph
from dpmtools.server import TEST_PACK_NAME, ComfyServer

STEPS = 3


def _ksampler(width, height):
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    e = g.node("EmptyConditioning", model=ckpt.out(0), tokens=8)
    empty = g.node("EmptyLatentImage", width=width, height=height, batch_size=1)
    k = g.node("KSampler", model=ckpt.out(0), positive=e.out(0), negative=e.out(0), latent_image=empty.out(0),
               seed=3, steps=STEPS, cfg=1.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    g.node("SaveLatent", samples=k.out(0), filename_prefix="preview_ks")
    return g.prompt()


def _langevin(width, height, seed):
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    e = g.node("EmptyConditioning", model=ckpt.out(0), tokens=8)
    clip = g.node("CLIPEnergy", clip_name="tiny_clip", text="a red square", weight=500.0, augmentations=2,
                  color=True, translation=True, resize=True, cutout=True)
    code = g.node("RandomLatentCode", model=ckpt.out(0), width=width, height=height, batch_size=1, seed=seed,
                  steps=2, scheduler="normal", eta=0.2)
    lv = g.node("LangevinLatentSampler", model=ckpt.out(0), positive=e.out(0), negative=e.out(0), cfg=1.0,
                vae=ckpt.out(2), energy=clip.out(0), latent_code=code.out(0), steps=STEPS, step_size=0.05,
                seed=seed, update="all components")
    g.node("SaveImage", images=lv.out(2), filename_prefix="preview_lv_plot")
    return g.prompt()


def _previews(frames) -> list[tuple[int, int]]:
    """Sizes of the preview pictures among a client's binary frames (event 1: 4-byte image type + JPEG/PNG)."""
    assert all(kind == 1 for kind, _ in frames), [kind for kind, _ in frames]
    return [Image.open(io.BytesIO(payload[4:])).size for _kind, payload in frames]


def test_langevin_previews_match_ksampler_under_latent2rgb(server):
    """The suite's server runs ``--preview-method latent2rgb`` (default ``--preview-size`` 512): one preview
    per step for each, at the size KSampler's previews have (a 64 x 48 image: 512 x 384)."""
    entry, ks_frames = server.run_watched(_ksampler(64, 48))
    assert entry["status"]["status_str"] == "success"
    entry, lv_frames = server.run_watched(_langevin(64, 48, seed=11))
    assert entry["status"]["status_str"] == "success"
    ks, lv = _previews(ks_frames), _previews(lv_frames)
    assert ks == [(512, 384)] * STEPS, ks
    assert lv == ks, lv


@pytest.fixture(scope="module")
def quiet_server(model_dirs, tmp_path_factory):
    """ComfyUI as it starts by default: ``--preview-method none``."""
    from dpmtools.comfy_env import comfy_dir

    srv = ComfyServer(comfy_dir(), tmp_path_factory.mktemp("comfy_quiet"), python=sys.executable,
                      model_dirs=model_dirs, extra_args=["--preview-method", "none"], pack_name=TEST_PACK_NAME)
    srv.start()
    yield srv
    srv.stop()


def test_no_langevin_previews_under_preview_method_none(quiet_server):
    """Before the fix every Langevin step sent a 512 px JPEG here: a client reading binary frames got 3
    previews per Langevin node and took them for the workflow's images."""
    entry, frames = quiet_server.run_watched(_langevin(64, 64, seed=12))
    assert entry["status"]["status_str"] == "success"
    assert any(o.get("images") for o in entry["outputs"].values())   # the saved image is in the history
    assert frames == [], f"{len(frames)} binary frames sent"
    entry, frames = quiet_server.run_watched(_ksampler(64, 64))      # KSampler is quiet here as well
    assert frames == [], f"{len(frames)} binary frames sent by KSampler"
