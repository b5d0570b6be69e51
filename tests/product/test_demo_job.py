# SPDX-License-Identifier: GPL-3.0-or-later
"""The demo world through a real server with the shipped, trained demo models: the paper's claims, measured.

This is the README's main job at a smaller size (fewer images, fewer Langevin steps); the
thresholds are below the numbers the full demo measures (README table) with room for the
smaller sample.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "demo" / "models"
VIDEO_N = 16   # clips of the video row here (the full demo: 32)
# The video row's claims (docs/demo-world.md, n = 32: square rate 0.21, colour kept 0.86, trajectory 1.2 px): the
# squares model B is undertrained (650 steps; 6 % squares unguided), so the square rate asserted is only above zero.
THRESHOLDS = {"square_rate": 0.05, "colour_kept": 0.7, "trajectory_px": 3.0}


@pytest.fixture(scope="module")
def demo():
    from dpmtools.comfy_env import load_module

    return load_module("dpm_demo_script", REPO / "scripts" / "demo.py")


@pytest.fixture(scope="module")
def demo_server(demo, tmp_path_factory):
    from dpmtools.comfy_env import comfy_dir
    from dpmtools.server import TEST_PACK_NAME, ComfyServer

    for sub, name in (("checkpoints", demo.CKPT_A), ("checkpoints", demo.CKPT_B), ("clip_energy", demo.CLIP_NAME),
                      ("diffusers", demo.PIXEL_DDPM_A), ("diffusers", demo.PIXEL_DDPM_B),
                      *(("asyrp", a["direction"]) for a in demo.ASYRP.values()),
                      *(("asyrp", demo.control_file(a["direction"], c)) for a in demo.ASYRP.values()
                        for c in demo.ASYRP_CONTROLS),
                      *(("video", name) for name in demo.video_module().VIDEO_NAMES.values())):
        assert (MODELS / sub / name).exists(), f"shipped demo model {sub}/{name} is missing"
    srv = ComfyServer(comfy_dir(), tmp_path_factory.mktemp("demo"), python=sys.executable,
                      model_dirs={"checkpoints": MODELS / "checkpoints", "clip_energy": MODELS / "clip_energy",
                                  "diffusers": MODELS / "diffusers", "diffusion_models": MODELS / "video"},
                      pack_name=TEST_PACK_NAME)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def measured(demo, demo_server):
    metrics, images = demo.measure(demo_server, n=24, seed=3, gen_batch=12, edit_batch=12, video_n=VIDEO_N)
    print(demo.metrics_markdown(metrics))
    return metrics, images


def test_reconstruction_is_exact(measured):
    m, _ = measured
    assert m["reconstruction_psnr_vs_vae_roundtrip_db"] >= 40.0


def test_translation_keeps_colour_and_position_and_changes_the_shape(measured):
    m, _ = measured
    t, s = m["translation"], m["sdedit_baseline"]
    assert t["square_rate"] >= 0.6, t
    # the common latent space: colour and position survive the change of model, far better than
    # re-noising and denoising with model B at the same strength (SDEdit)
    assert t["colour_kept"] >= 0.7 and t["colour_kept"] >= s["colour_kept"] + 0.2, (t, s)
    assert t["centroid_error_px"] <= 5.0 and t["centroid_error_px"] < s["centroid_error_px"], (t, s)


def test_clip_guidance_raises_the_target_colour_rate(measured):
    m, _ = measured
    g = m["clip_generation"]
    assert g["clip_guided"] >= g["unguided"] + 0.2, g
    e = m["clip_editing"]
    assert e["target_colour_after"] >= e["target_colour_before"] + 0.2, e


def _baseline():
    import json

    return json.loads((REPO / "docs" / "demo_metrics.json").read_text())


def test_rates_carry_intervals_and_agree_with_the_published_ones(demo, measured):
    """Every rate has its n and Wilson 95 % interval, and each rate measured here agrees with the README's
    (docs/demo_metrics.json) within the spread of both draws: the two intervals overlap. One draw of 12
    Langevin samples differs across CPUs (float reductions); a real regression falls below the baseline's
    interval."""
    m, _ = measured
    base = _baseline()
    rows = {"translation": ("square_rate", "colour_kept"), "sdedit_baseline": ("square_rate", "colour_kept"),
            "clip_generation": ("clip_guided", "unguided"), "clip_editing": ("target_colour_after", "square_kept")}
    for row, keys in rows.items():
        for k in keys:
            lo, hi = m[row][f"{k}_interval"]
            n = m[row]["n"]
            assert 0 <= lo <= m[row][k] <= hi <= 1 and n >= 10, (row, k)
            b = base[row]
            blo, bhi = b.get(f"{k}_interval") or [demo.interval_of(b[k], b.get("n") or b.get("batch") or base["n_images"])[x]
                                                   for x in ("low", "high")]
            assert hi >= blo and lo <= bhi, f"{row}.{k}: {m[row][k]:.2f} [{lo:.2f}, {hi:.2f}] vs published " \
                                            f"{b[k]:.2f} [{blo:.2f}, {bhi:.2f}]"


def test_wilson_interval(demo):
    import math

    iv = demo.rate_with_interval(11, 16)  # the README's earlier 0.69 of n = 16
    assert abs(iv["rate"] - 0.6875) < 1e-12
    # the Wilson bounds are the roots p0 of (p - p0)^2 = z^2 p0 (1 - p0) / n
    z2, p, n = 1.959963984540054 ** 2, 11 / 16, 16
    a, b, c = 1 + z2 / n, -(2 * p + z2 / n), p * p
    roots = sorted((-b + s * math.sqrt(b * b - 4 * a * c)) / (2 * a) for s in (-1, 1))
    assert abs(iv["low"] - roots[0]) < 1e-12 and abs(iv["high"] - roots[1]) < 1e-12
    assert abs(iv["low"] - 0.4440) < 1e-3 and abs(iv["high"] - 0.8584) < 1e-3
    assert demo.rate_with_interval(0, 10)["low"] == 0.0 and abs(demo.rate_with_interval(10, 10)["high"] - 1.0) < 1e-12
    assert 0.0 < demo.rate_with_interval(0, 10)["high"] < 0.35
    with pytest.raises(ValueError):
        demo.rate_with_interval(3, 2)


def test_masked_translation_changes_only_the_masked_region(measured):
    m, images = measured
    k = m["masked_translation"]
    d, b = k["dpm"], k["inpaint_baseline"]
    assert k["n"] == m["n_images"] and 0.05 < k["mask_area_fraction"] < 0.6
    # outside the mask: the input's VAE round trip
    assert d["outside_psnr_db_min"] >= 40.0, d
    # inside: the edit succeeds at the unmasked translation's rate (its rate lies within the masked interval)
    t = m["translation"]
    assert d["square_rate"]["high"] >= t["square_rate"] and d["square_rate"]["rate"] >= 0.6, (d, t)
    assert d["colour_kept"]["rate"] >= 0.7 and d["colour_kept"]["rate"] >= b["colour_kept"]["rate"], (d, b)
    assert images["masked_translation"].shape == images["input_circles"].shape


def test_pixel_ddpm_translation_and_reconstruction(measured):
    """Two pixel-space DDPMs (diffusers) trained independently: encode with A, replay with B."""
    m, _ = measured
    p = m["pixel_ddpm"]
    t, s, rt = p["translation"], p["sdedit_baseline"], p["vae_roundtrip"]
    assert p["reconstruction_psnr_vs_input_db"]["max_abs_error_255"] <= 2.0, p
    assert rt["circle_rate"] >= 0.9, rt            # the readers see the 32 x 32 inputs as circles
    # B turns the circles into squares (n = 64: 0.98, as SDEdit with B does)
    assert t["square_rate"] >= 0.8 and t["circle_rate"] <= rt["circle_rate"] - 0.6, (t, rt)
    # the shared code keeps colour and position far better than SDEdit with B at the same strength
    assert t["colour_kept"] >= 0.7 and t["colour_kept"] >= s["colour_kept"] + 0.3, (t, s)
    assert t["centroid_error_px"] <= 6.0 and t["centroid_error_px"] < 0.5 * s["centroid_error_px"], (t, s)


def test_grid_and_shipped_demo_workflows(demo, measured, tmp_path):
    import json

    _, images = measured
    img = demo.grid(images, rows=4)
    assert img.width > 0 and img.height > 0
    for name in demo.DEMO_WORKFLOWS.values():
        wf = json.loads((REPO / "workflows" / name).read_text())
        assert any(n["type"] == "Note" for n in wf["nodes"])
    for name in (demo.MASKED_WORKFLOW, demo.MASKED_WORKFLOW_SD15):
        wf = json.loads((REPO / "workflows" / name).read_text())
        types = {n["type"] for n in wf["nodes"]}
        assert {"Note", "SetLatentNoiseMask", "DPMEncode", "ReplayLatentWithPrompt", "LoadImage"} <= types


def test_best_of_n_row(demo, measured):
    """Best of N by directional CLIP against the default-setting candidate of the same sweep."""
    m, _ = measured
    b = m["best_of_n"]
    s, d = b["selected"], b["default"]
    assert b["n_images"] == 16 and b["candidates_per_image"] == 9
    assert s["mean_directional_clip"] > d["mean_directional_clip"], b  # the selection does select
    for x in (s, d):
        for k in ("square_rate", "colour_kept", "centroid_error_px"):
            lo, hi = x[k + "_ci95"]
            assert lo <= x[k] <= hi, (k, x)
    # what the selection buys on the world's readers (measured: see README); it must not lose squares
    assert s["square_rate"] >= d["square_rate"] - 0.1 and s["colour_kept"] >= d["colour_kept"] - 0.1, b
    assert s["colour_kept"] >= 0.6 and s["centroid_error_px"] <= 6.0, b
    assert any("best of 9" in line for line in demo.best_of_n_markdown(b))


def test_asyrp_row(demo, measured):
    """Asyrp 'red -> blue' on held-out red shapes (docs/demo-world.md). Strength 0 is the plain replay; Gaussian
    controls of the trained norm move no colour and keep the shapes; the directions from examples (both networks)
    and the DDPM's CLIP-trained one move colour towards blue beyond their network's control and keep the shape and
    background, monotonically in strength; the flow model's composes with a size direction; every row agrees with
    the published draw (docs/demo_metrics.json)."""
    m, images = measured
    a = m["asyrp"]
    pub = _baseline()["asyrp"]
    for which in demo.ASYRP:
        rows = a[which]["rows"]
        zero = rows["trained 0"]
        # strength 0 is the plain replay: the input back
        assert zero["shape_kept"] >= 0.95 and zero["centroid_error_px"] <= 0.5 and zero["n_located"] == zero["n"], zero
        assert zero["outside_change"] <= 0.01 and zero["target_rate"] == 0.0, zero
        for name, r in rows.items():
            for k in ("target_rate", "shape_kept", "colour_shift", "centroid_error_px", "outside_change"):
                lo, hi = r[k + "_ci95"]
                assert lo - 1e-9 <= r[k] <= hi + 1e-9, (which, name, k, r)
            # the same draw as the published one, within the intervals
            p = pub[which]["rows"][name]
            for k in ("target_rate", "shape_kept"):
                assert r[k + "_ci95"][1] >= p[k + "_ci95"][0] and r[k + "_ci95"][0] <= p[k + "_ci95"][1], (which, name, k, r, p)
        # the paper's robustness claim, with a Gaussian delta_h of the trained direction's norm: no blue, colour
        # hardly moved (published 0.04 [0.03, 0.06] on the DDPM, 0.01 on the flow model), shapes kept
        g = rows["gauss_norm 1"]
        assert g["shape_kept"] >= 0.85 and abs(g["target_rate"] - zero["target_rate"]) <= 0.1, g
        assert g["colour_shift"] < 0.1, g
        # strength 0.5 / 1 / 2 move colour monotonically (monotone, not linear: docs/demo-world.md)
        e = [rows[f"examples {v:g}"]["colour_shift"] for v in (0.5, 1.0, 2.0)]
        assert e[0] < e[1] + 0.02 and e[1] < e[2] + 0.02, (which, e)
        assert images[f"asyrp_{which}_examples_1"].shape[0] == a["n_images"]
    # the directions move colour beyond their network's Gaussian control of the trained norm (measured n = 24: DDPM
    # from examples at 1 1.00 blue, CLIP-trained at 1 0.54; flow from examples at 1 0.96)
    u, f = a["ddpm"]["rows"], a["flow"]["rows"]
    for rows, key in ((u, "examples 1"), (u, "trained 1"), (f, "examples 1")):
        r = rows[key]
        assert r["colour_shift"] >= rows["gauss_norm 1"]["colour_shift"] + 0.15 and r["target_rate"] >= 0.15, (key, r)
        assert r["shape_kept"] >= 0.9 and r["outside_change"] <= 0.03, (key, r)
    # issue 17's four criteria at strength 1, met by both networks' directions from examples: the flow model's
    # from paired examples (spread 'where pairs differ'; measured n = 24 on four image sets: blue 0.88-0.96, kept
    # 0.96-1.00, 1.0-1.6 px, outside 0.001-0.004) and the pixel DDPM's after its second up block (spread 'object,
    # centred'; four image sets: blue 1.00, kept 1.00, 0.85-0.96 px, outside 0.021-0.028 against the 8-bit input;
    # docs/asyrp.md)
    for ex in (f["examples 1"], u["examples 1"]):
        assert ex["target_rate"] >= 0.75 and ex["shape_kept"] >= 0.9, ex
        assert ex["centroid_error_px"] <= 3.0 and ex["outside_change"] <= 0.03, ex
    ex = f["examples 1"]
    # the flow model's CLIP-trained direction does not recolour (docs/asyrp.md: its P_t is a yellow blob)
    assert f["trained 1"]["colour_shift"] < 0.15, f["trained 1"]
    # composition: colour + size does both, beyond what either direction does alone (published: size x1.64 vs
    # x1.16 for colour alone; colour shift 0.39 vs 0.12 for size alone)
    c, s1 = f["compose 1"], f["size 1"]
    base = f["trained 0"]["size_ratio"]
    assert c["size_ratio"] >= ex["size_ratio"] + 0.1 and s1["size_ratio"] >= base + 0.1, (c, s1, ex)
    assert c["colour_shift"] >= s1["colour_shift"] + 0.15, (c, s1)
    md = "\n".join(demo.asyrp_markdown(a))
    assert "Gaussian control, trained norm" in md and "plain replay" in md


def test_video_translation_row(demo, measured):
    """The world in motion (issue 19): a clip of a moving circle encoded whole with video model A and replayed with
    video model B becomes a moving square that keeps the colour and the trajectory and flickers less than ComfyUI's
    own video SDEdit (KSampler on the clip with B, same denoise) and than per-frame SDEdit (image model B)."""
    m, images = measured
    v = m["video"]
    r, vs, fs, rt = v["replay"], v["video_sdedit"], v["frame_sdedit"], v["roundtrip"]
    assert v["n_clips"] == VIDEO_N and r["frames"] == VIDEO_N * v["frames"] and v["frames"] >= 8
    assert v["reconstruction_relative_error"] <= 1e-4, v            # the clip's code replayed with A: the clip
    assert rt["frame_shape_rate"] >= 0.95 and rt["flicker"] == 0.0, rt   # the readers see the input clips
    for x in (r, vs, fs):
        for k in ("frame_shape_rate", "frame_colour_kept", "trajectory_error_px", "flicker", "fill_change"):
            lo, hi = x[k + "_ci95"]
            assert lo - 1e-9 <= x[k] <= hi + 1e-9, (k, x)
    # B makes squares of the circles
    assert r["frame_shape_rate"] >= THRESHOLDS["square_rate"], r
    # the shared code keeps colour and trajectory: better than both baselines, beyond their intervals
    assert r["frame_colour_kept"] >= THRESHOLDS["colour_kept"] and r["frame_colour_kept"] > vs["frame_colour_kept"], (r, vs)
    assert r["trajectory_error_px"] <= THRESHOLDS["trajectory_px"], r
    for b in (vs, fs):
        assert r["trajectory_error_px_ci95"][1] < b["trajectory_error_px_ci95"][0], (r, b)
        assert r["flicker"] < b["flicker"] and r["fill_change"] < b["fill_change"], (r, b)
    # it agrees with the published draw (docs/demo_metrics.json): the trajectory intervals overlap
    pub = _baseline()["video"]["replay"]
    lo, hi = r["trajectory_error_px_ci95"]
    assert hi >= pub["trajectory_error_px_ci95"][0] and lo <= pub["trajectory_error_px_ci95"][1], (r, pub)
    assert images["video_replay"].shape == images["video_input"].shape
    img = demo.video_grid(images, clips=2)
    assert img.width > 0 and img.height > 0
    md = "\n".join(demo.video_markdown(v))
    assert "per-frame SDEdit" in md and "trajectory error" in md
