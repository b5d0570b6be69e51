# SPDX-License-Identifier: GPL-3.0-or-later
"""Asyrp Editing Interval through a real ComfyUI server with the tiny SD1.5 checkpoint and the tiny CLIP."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from PIL import Image

from dpmtools.graphs import Graph, write_latent
from dpmtools.server import PromptError

STEPS = 6


@pytest.fixture(scope="module")
def latent(server):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    return write_latent(server.input_dir, "interval", x)


def _interval(g, latent, **over):
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    lat = g.node("LoadLatent", latent=latent)
    inputs = dict(model=ckpt.out(0), vae=ckpt.out(2), latents=lat.out(0), clip_name="tiny_clip",
                  source_text="a red circle", target_text="a blue circle", steps=STEPS, distance="clip",
                  edit_threshold=0.33, boost_threshold=1.2, clip_edit_fraction=0.25, clip_boost_fraction=0.9)
    inputs.update(over)
    return g.node("AsyrpInterval", **inputs)


def test_registered_with_inputs_outputs_and_tooltips(server):
    info = server.object_info()["AsyrpInterval"]
    req = info["input"]["required"]
    assert list(req) == ["model", "vae", "latents", "clip_name", "source_text", "target_text", "steps", "distance",
                         "edit_threshold", "boost_threshold", "clip_edit_fraction", "clip_boost_fraction"]
    assert all(len(spec) > 1 and spec[1].get("tooltip") for spec in req.values())
    assert req["steps"][1]["default"] == 40
    assert req["edit_threshold"][1]["default"] == 0.33 and req["boost_threshold"][1]["default"] == 1.2
    assert info["output"] == ["FLOAT", "FLOAT", "IMAGE"] and info["category"] == "sampling/dpm_latent"


def _parse(text):
    lines = text.splitlines()
    curve = {k: [float(v) for v in next(ln for ln in lines if ln.startswith(k)).split(": ", 1)[1].split(", ")]
             for k in ("CLIP(x0, P_t)", "CLIP(x0, x_t)")}
    te = float(text.split("t_edit = ", 1)[1].split(",", 1)[0])
    tb = float(text.split("t_boost = ", 1)[1].split(" ", 1)[0])
    th_e = float(text.split("edit threshold ", 1)[1].split("= ", 1)[1].split(";", 1)[0])
    th_b = float(text.split("boost threshold ", 1)[1].split("= ", 1)[1].split(".\n", 1)[0])
    return curve, te, tb, th_e, th_b


def test_clip_fallback_measures_and_chooses_by_its_stated_thresholds(server, latent, pack):
    A = importlib.import_module("dpm_latent.samplers.asyrp")
    g = Graph()
    node = _interval(g, latent, distance="auto")
    save = g.node("SaveImage", images=node.out(2), filename_prefix="interval_plot")
    entry = server.run(g.prompt())
    text = entry["outputs"][node.id]["text"][0]
    # the host has no lpips: auto falls back to CLIP and says so, with n and the thresholds
    assert "CLIP image distance" in text and "LPIPS unavailable" in text and "n = 2 images" in text
    curve, te, tb, th_e, th_b = _parse(text)
    p, x = curve["CLIP(x0, P_t)"], curve["CLIP(x0, x_t)"]
    assert len(p) == len(x) == STEPS
    # the thresholds are the stated fractions of the curves' values at T (cos of the texts <= 1)
    assert th_b == pytest.approx(0.9 * x[0], rel=2e-3) and abs(th_e) <= 0.25 * p[0] * 1.001
    # the choice is the one the rule gives on the reported curves
    c = A.IntervalCurves([1 - i / STEPS for i in range(STEPS)], p, x)
    want_e, want_b, _ = A.interval_from_curves(c, th_e, th_b)
    assert (te, tb) == (pytest.approx(want_e, abs=1e-4), pytest.approx(want_b, abs=1e-4))
    assert 0.0 <= te < 1.0 and 0.0 <= tb <= 1.0
    # the spread over the images (n = 2) is stated with the point estimates
    boot = text.split("95 % bootstrap intervals over the images (1000 resamples of n = 2): ", 1)[1].split("\n")[0]
    lo_e, hi_e = (float(v) for v in boot.split("t_edit [", 1)[1].split("]")[0].split(", "))
    lo_b, hi_b = (float(v) for v in boot.split("t_boost [", 1)[1].split("]")[0].split(", "))
    assert 0.0 <= lo_e <= hi_e < 1.0 and 0.0 <= lo_b <= hi_b <= 1.0
    # x_t is pure noise at T and the image at the last step: the x_t curve falls
    assert x[0] > x[-1] and x[-1] < 0.5 * x[0]
    f = entry["outputs"][save.id]["images"][0]
    with Image.open(server.output_dir / f.get("subfolder", "") / f["filename"]) as im:
        img = np.asarray(im.convert("RGB"))
    assert img.shape == (320, 512, 3) and img.std() > 1.0


def test_lpips_without_the_package_and_bad_inputs_are_node_errors(server, latent):
    for over, needles in (({"distance": "lpips"}, ("distance", "lpips", "not installed", "clip")),
                          ({"clip_edit_fraction": 0.0}, ("clip_edit_fraction", "> 0")),
                          ({"source_text": "  "}, ("source_text",)),
                          ({"clip_name": "nope"}, ("clip_name",))):
        g = Graph()
        node = _interval(g, latent, **over)
        g.node("PreviewImage", images=node.out(2))
        with pytest.raises(PromptError) as ei:
            server.run(g.prompt())
        for n in needles:
            assert n in str(ei.value), (over, str(ei.value)[:600])
    assert server.alive()
