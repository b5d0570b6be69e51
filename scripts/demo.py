# SPDX-License-Identifier: GPL-3.0-or-later
"""The main job: the embedded demo world, run through a real ComfyUI server.

    python3 scripts/comfy_host.py demo [--n 64] [--out demo_output]
    python3 scripts/comfy_host.py demo --write-workflows     (regenerate workflows/demo_*.json)

It installs the demo models (demo/models/, trained by demo/train.py) into the host's model
folders, starts the host's ComfyUI with this pack, runs the shipped demo workflows
(workflows/demo_*.json, converted to API form against the live /object_info) on images of the
world, measures what the paper claims with the world's attribute readers, and writes
``<out>/demo_grid.png`` and ``<out>/metrics.json`` / ``metrics.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
# Never put the repository itself on sys.path: its nodes/ folder would shadow ComfyUI's `nodes`.


def world():
    """demo/world.py, loaded by path (see above)."""
    from conftest import load_module

    return load_module("dpm_latent_demo_world", REPO / "demo" / "world.py")

MODELS = REPO / "demo" / "models"
CKPT_A = "dpm_world_circles.safetensors"
CKPT_B = "dpm_world_squares.safetensors"
CLIP_NAME = "dpm_world_clip"
WORKFLOWS = REPO / "workflows"

# Settings of the demo (also the shipped workflows' widget values).
STEPS = 20
DENOISE = 0.7
ETA = 0.1
LANGEVIN_STEPS = 60
CHAIN_STEPS = 10
# The tiny world generator is far rougher in z than a large model: the paper's step 0.05 with
# lambda 500 jumps out of the region where the gradient holds (measured: the energy goes *up*).
# lambda 100 with step 0.001 moves about 0.05 in |z| per step, where it does hold.
CLIP_WEIGHT = 100.0
STEP_SIZE = 0.001
# Editing an encoded image: only the start latent is sampled (its prior is centred on the image;
# the stored step noises keep pulling the chain to it), so it needs a stronger pull.
EDIT_DENOISE = 0.8
EDIT_WEIGHT = 300.0
EDIT_STEP_SIZE = 0.004
TARGET_COLOUR = "red"
EDIT_COLOUR = "blue"


# ----------------------------------------------------------------------------- graphs
def graph_translate(input_image="dpm_world_circles.png"):
    from graphs import Graph

    g = Graph()
    ck_a = g.node("CheckpointLoaderSimple", ckpt_name=CKPT_A)
    ck_b = g.node("CheckpointLoaderSimple", ckpt_name=CKPT_B)
    img = g.node("LoadImage", image=input_image)
    e_a = g.node("EmptyConditioning", model=ck_a.out(0), tokens=1)
    e_b = g.node("EmptyConditioning", model=ck_b.out(0), tokens=1)
    lat = g.node("VAEEncode", pixels=img.out(0), vae=ck_a.out(2))
    enc = g.node("DPMEncode", model=ck_a.out(0), positive=e_a.out(0), negative=e_a.out(0), latent_image=lat.out(0),
                 seed=0, steps=STEPS, scheduler="simple", denoise=DENOISE, eta=ETA, cfg=1.0)
    rec = g.node("ReplayLatentWithPrompt", model=ck_a.out(0), positive=e_a.out(0), negative=e_a.out(0),
                 latent_code=enc.out(0), cfg=1.0)
    tr = g.node("ReplayLatentWithPrompt", model=ck_b.out(0), positive=e_b.out(0), negative=e_b.out(0),
                latent_code=enc.out(0), cfg=1.0)
    sde = g.node("KSampler", model=ck_b.out(0), positive=e_b.out(0), negative=e_b.out(0), latent_image=lat.out(0),
                 seed=0, steps=STEPS, cfg=1.0, sampler_name="euler_ancestral", scheduler="simple", denoise=DENOISE)
    saves = {}
    for key, latent, vae in (("reconstruction", rec, ck_a), ("translation", tr, ck_b), ("sdedit_baseline", sde, ck_b),
                             ("vae_roundtrip", lat, ck_a)):
        dec = g.node("VAEDecode", samples=latent.out(0), vae=vae.out(2))
        saves[key] = g.node("SaveImage", images=dec.out(0), filename_prefix=f"dpm_demo/{key}").id
    titles = {ck_a.id: "Model A: circles", ck_b.id: "Model B: squares", enc.id: "DPM Encode with A",
              rec.id: "Replay with A (reconstruction)", tr.id: "Replay with B (translation)",
              sde.id: "Baseline: SDEdit with B (same strength)"}
    return g, saves, titles


def graph_clip_generation(batch=1, seed=0, colour=TARGET_COLOUR, langevin_steps=LANGEVIN_STEPS):
    from graphs import Graph

    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=CKPT_B)
    e = g.node("EmptyConditioning", model=ck.out(0), tokens=1)
    code = g.node("RandomLatentCode", model=ck.out(0), width=64, height=64, batch_size=batch, seed=seed,
                  steps=CHAIN_STEPS, scheduler="simple", eta=ETA)
    energy = g.node("CLIPEnergy", clip_name=CLIP_NAME, text=f"a {colour} square", weight=CLIP_WEIGHT,
                    augmentations=8, color=False, translation=True, resize=True, cutout=False)
    lv = g.node("LangevinLatentSampler", model=ck.out(0), positive=e.out(0), negative=e.out(0), cfg=1.0,
                vae=ck.out(2), energy=energy.out(0), latent_code=code.out(0), steps=langevin_steps, step_size=STEP_SIZE,
                seed=seed, update="all components")
    free = g.node("ReplayLatentWithPrompt", model=ck.out(0), positive=e.out(0), negative=e.out(0),
                  latent_code=code.out(0), cfg=1.0)
    saves = {}
    for key, src in (("clip_guided", lv), ("unguided", free)):
        dec = g.node("VAEDecode", samples=src.out(1 if src is lv else 0), vae=ck.out(2))
        saves[key] = g.node("SaveImage", images=dec.out(0), filename_prefix=f"dpm_demo/{key}").id
    saves["energy_plot"] = g.node("SaveImage", images=lv.out(2), filename_prefix="dpm_demo/energy_plot").id
    titles = {code.id: "Random Latent Code (prior)", lv.id: "Langevin: CLIP-guided", free.id: "Unguided replay"}
    return g, saves, titles


def graph_clip_editing(input_image="dpm_world_squares.png", seed=0, colour=EDIT_COLOUR,
                       langevin_steps=LANGEVIN_STEPS):
    from graphs import Graph

    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=CKPT_B)
    e = g.node("EmptyConditioning", model=ck.out(0), tokens=1)
    img = g.node("LoadImage", image=input_image)
    lat = g.node("VAEEncode", pixels=img.out(0), vae=ck.out(2))
    enc = g.node("DPMEncode", model=ck.out(0), positive=e.out(0), negative=e.out(0), latent_image=lat.out(0),
                 seed=seed, steps=CHAIN_STEPS, scheduler="simple", denoise=EDIT_DENOISE, eta=ETA, cfg=1.0)
    energy = g.node("CLIPEnergy", clip_name=CLIP_NAME, text=f"a {colour} square", weight=EDIT_WEIGHT,
                    augmentations=8, color=False, translation=True, resize=True, cutout=False)
    lv = g.node("LangevinLatentSampler", model=ck.out(0), positive=e.out(0), negative=e.out(0), cfg=1.0,
                vae=ck.out(2), energy=energy.out(0), latent_code=enc.out(0), steps=langevin_steps, step_size=EDIT_STEP_SIZE,
                seed=seed, update="start only")
    dec = g.node("VAEDecode", samples=lv.out(1), vae=ck.out(2))
    saves = {"clip_edit": g.node("SaveImage", images=dec.out(0), filename_prefix="dpm_demo/clip_edit").id,
             "clip_edit_plot": g.node("SaveImage", images=lv.out(2), filename_prefix="dpm_demo/clip_edit_plot").id}
    titles = {enc.id: f"DPM Encode (denoise {EDIT_DENOISE})", lv.id: f"Langevin: CLIP 'a {colour} square'"}
    return g, saves, titles


NOTES = {
    "translate": (
        "DPM Latent demo: reconstruction and unpaired translation in a toy world\n\n"
        "Two tiny flow models (SD3 layout) were trained independently: A on circles, B on squares "
        "(demo/train.py). DPM Encode turns the input into the stochastic sampler's full code with model A; "
        "replaying it with A gives the input back exactly (compare with the VAE round trip); replaying it with "
        "B gives a square that keeps the colour and position: the two models share the Gaussian latent space.\n"
        "The KSampler branch is the SDEdit baseline: re-noise and denoise with B at the same strength.\n\n"
        "Change: denoise (how much of the chain is encoded, 0.5-0.85), eta (> 0), steps, seed. "
        "Load any 64x64 image of the world (dpm_world_*.png in the input folder)."),
    "clip_generation": (
        "DPM Latent demo: CLIP-guided generation (plug-and-play guidance)\n\n"
        "A code drawn from the prior (Random Latent Code) is sampled with Langevin dynamics under "
        "p(z) * exp(-E_CLIP(G(z))), G = replay chain of the squares model + VAE decode, E_CLIP = 500 * "
        "mean over augmented copies of (1 - cos(CLIP image, CLIP text)). The tiny CLIP was trained on the world "
        "(models/clip_energy/dpm_world_clip). The unguided replay of the same code is shown for comparison.\n\n"
        "Change: the text (e.g. 'a green square'), weight, Langevin steps (paper: 200) and step size. The paper's "
        "step 0.05 with weight 500 suits large models; this tiny world's generator is much rougher in z, so the "
        "demo takes weight 100 and step 0.001 (bigger steps leave the region where the gradient holds and the "
        "energy goes up). Colour and cutout augmentations are off: the tiny CLIP was not trained with them."),
    "clip_editing": (
        "DPM Latent demo: CLIP-guided editing of an encoded image\n\n"
        "DPM Encode (denoise 0.8) keeps the image's structure in the code's start prior N(encoded mean, sigma^2); "
        "Langevin ('start only': the encoded step noises stay, they keep steering the chain to the image) "
        "samples the start latent under a CLIP energy for the text.\n\nChange: the text, weight (300), steps, "
        "step size (0.004 here; see the generation demo's note); denoise of DPM Encode (higher = freer edit)."),
}
TEST_MAP = {"checkpoints": {CKPT_A: "tiny_sd3.safetensors", CKPT_B: "tiny_sd3_b.safetensors"},
            "clip_energy": {CLIP_NAME: "tiny_clip"}}
GRAPHS = {"translate": graph_translate, "clip_generation": graph_clip_generation, "clip_editing": graph_clip_editing}


def write_workflows(server) -> list[Path]:
    from ui_workflow import api_to_ui

    info = server.object_info()
    paths = []
    for name, build in GRAPHS.items():
        g, _saves, titles = build()
        test = dict(TEST_MAP)
        # the workflow test caps Langevin at 2 steps on random tiny models: give it a step that shows
        test["widgets"] = {nid: {"step_size": 0.05} for nid, node in g.prompt().items()
                           if node["class_type"] == "LangevinLatentSampler"}
        wf = api_to_ui(g.prompt(), info, note=NOTES[name], titles=titles, extra={"dpm_latent_test": test})
        path = WORKFLOWS / f"demo_{name}.json"
        path.write_text(json.dumps(wf, indent=1) + "\n")
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- running
def install_demo_models(comfy_dir: Path) -> None:
    """Link the demo models into the host's model folders (so `serve` shows them too)."""
    for sub, name in (("checkpoints", CKPT_A), ("checkpoints", CKPT_B), ("clip_energy", CLIP_NAME)):
        src = MODELS / sub / name
        if not src.exists():
            raise SystemExit(f"demo model {src} is missing: run `python demo/train.py` (see demo/models/TRAINING.json)")
        dst = Path(comfy_dir) / "models" / sub / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            if dst.is_symlink() and dst.resolve() == src.resolve():
                continue
            if not dst.is_symlink():
                continue  # a user's own file of that name: leave it
            dst.unlink()
        dst.symlink_to(src, target_is_directory=src.is_dir())
    write_sample_inputs(Path(comfy_dir) / "input")


def write_sample_inputs(input_dir: Path) -> None:
    """One image per domain, for trying the demo workflows by hand."""
    import numpy as np
    from PIL import Image

    sample_domain = world().sample_domain

    input_dir.mkdir(parents=True, exist_ok=True)
    for domain, name in (("A", "circles"), ("B", "squares")):
        img = sample_domain(1, 7, domain)[0][0]
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
            input_dir / f"dpm_world_{name}.png")


def write_inputs(input_dir: Path, n: int, seed: int, n_edit: int) -> dict:
    """World images as multi-frame TIFFs (ComfyUI's LoadImage loads every frame as a batch):
    ``n`` circles for translation, ``n_edit`` squares for CLIP editing."""
    import numpy as np
    from PIL import Image

    sample_domain = world().sample_domain

    files = {}
    for domain, name in (("A", "circles"), ("B", "squares")):
        imgs, attrs = sample_domain(n if domain == "A" else n_edit, seed + (0 if domain == "A" else 1000), domain)
        frames = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in imgs]
        tiff = f"dpm_world_{name}_batch.tiff"
        frames[0].save(input_dir / tiff, save_all=True, append_images=frames[1:], compression="raw")
        frames[0].save(input_dir / f"dpm_world_{name}.png")
        files[domain] = (tiff, imgs, attrs)
    return files


def read_outputs(server, entry, node_id):
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for f in entry["outputs"][node_id]["images"]:
        path = Path(server.output_dir) / f.get("subfolder", "") / f["filename"]
        out.append(torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0))
    return torch.stack(out).permute(0, 3, 1, 2)


def run_graph(server, build, overrides=None, **kw):
    """Convert the shipped UI workflow back to API form and run it (so the shipped file is what runs)."""
    from ui_workflow import ui_to_api

    g, saves, _titles = build(**kw)
    name = next(k for k, v in GRAPHS.items() if v is build)
    path = WORKFLOWS / f"demo_{name}.json"
    prompt = ui_to_api(json.loads(path.read_text()), server.object_info())
    for nid, node in g.prompt().items():  # the built graph gives this run's values (files, batch, seeds)
        for k, v in node["inputs"].items():
            if not isinstance(v, list):
                prompt[nid]["inputs"][k] = v
    for nid, values in (overrides or {}).items():
        prompt[nid]["inputs"].update(values)
    t = time.perf_counter()
    entry = server.run(prompt, timeout=3600)
    return entry, saves, time.perf_counter() - t


def psnr(a, b) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def measure(server, n: int = 64, seed: int = 0, langevin_steps: int = LANGEVIN_STEPS, gen_batch: int = 16,
            edit_batch: int = 16) -> tuple[dict, dict]:
    import numpy as np

    read_attributes = world().read_attributes

    files = write_inputs(Path(server.input_dir), n, seed, edit_batch)
    metrics: dict = {"n_images": n}
    images: dict = {}

    # 1 + 2: reconstruction and translation (+ SDEdit baseline)
    tiff_a, imgs_a, attrs_a = files["A"]
    entry, saves, dt = run_graph(server, graph_translate, input_image=tiff_a)
    out = {k: read_outputs(server, entry, v) for k, v in saves.items()}
    images.update(input_circles=imgs_a, **out)
    metrics["translate_seconds"] = dt
    metrics["reconstruction_psnr_vs_vae_roundtrip_db"] = min(
        psnr(out["reconstruction"][i], out["vae_roundtrip"][i]) for i in range(n))
    truth = read_attributes(out["vae_roundtrip"])
    def located(p):
        return p["shape"] not in (None, "none") and math.isfinite(p["cx"]) and math.isfinite(p["cy"])

    for key in ("translation", "sdedit_baseline"):
        pred = read_attributes(out[key])
        found = [p for p in pred if located(p)]
        metrics[key] = {
            "square_rate": float(np.mean([p["shape"] == "square" for p in pred])),
            "circle_rate": float(np.mean([p["shape"] == "circle" for p in pred])),
            "colour_kept": float(np.mean([p["colour"] == a["colour"] for p, a in zip(pred, attrs_a)])),
            "centroid_error_px": float(np.mean([math.hypot(p["cx"] - a["cx"], p["cy"] - a["cy"])
                                                for p, a in zip(pred, attrs_a) if located(p)]))
            if found else float("nan"),
            "no_shape_rate": float(np.mean([not located(p) for p in pred])),
        }
    metrics["vae_roundtrip_shape_read_ok"] = float(np.mean([t["shape"] == "circle" for t in truth]))

    # 3: CLIP-guided generation, model B, target colour
    entry, saves, dt = run_graph(server, graph_clip_generation, batch=gen_batch, seed=seed,
                                 langevin_steps=langevin_steps)
    gen = {k: read_outputs(server, entry, v) for k, v in saves.items()}
    images.update(generation_unguided=gen["unguided"], generation_guided=gen["clip_guided"],
                  energy_plot=gen["energy_plot"])
    rates = {}
    for key in ("unguided", "clip_guided"):
        pred = read_attributes(gen[key])
        rates[key] = float(np.mean([p["colour"] == TARGET_COLOUR for p in pred]))
        rates[key + "_square_rate"] = float(np.mean([p["shape"] == "square" for p in pred]))
    metrics["clip_generation"] = dict(rates, target=f"a {TARGET_COLOUR} square", batch=gen_batch,
                                      langevin_steps=langevin_steps, seconds=dt)

    # 4: CLIP-guided editing of encoded squares
    tiff_b, imgs_b, attrs_b = files["B"]
    entry, saves, dt = run_graph(server, graph_clip_editing, input_image=tiff_b, seed=seed,
                                 langevin_steps=langevin_steps)
    edit = read_outputs(server, entry, saves["clip_edit"])
    images.update(input_squares=imgs_b, clip_edit=edit)
    pred = read_attributes(edit)
    n_edit = len(pred)
    metrics["clip_editing"] = {
        "target": f"a {EDIT_COLOUR} square",
        "target_colour_before": float(np.mean([a["colour"] == EDIT_COLOUR for a in attrs_b[:n_edit]])),
        "target_colour_after": float(np.mean([p["colour"] == EDIT_COLOUR for p in pred])),
        "square_kept": float(np.mean([p["shape"] == "square" for p in pred])),
        "centroid_error_px": float(np.mean([math.hypot(p["cx"] - a["cx"], p["cy"] - a["cy"])
                                            for p, a in zip(pred, attrs_b) if located(p)] or [float("nan")])),
        "seconds": dt,
    }
    metrics["best_of_n"] = measure_best_of_n(server, files["A"])
    return metrics, images


# ----------------------------------------------------------------------------- best of N
BEST_OF_N = {"seeds": "0-2", "denoise": "0.6, 0.7, 0.8", "cfg": "1", "chain_steps": 28, "n_images": 16}
DEFAULT_CANDIDATE = (0, 0.7)  # the single default-setting run: seed 0, denoise 0.7 (28 x 0.7 = the demo's 20 steps)


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """Wilson score 95 % interval of a rate k/n."""
    if n == 0:
        return [float("nan"), float("nan")]
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, c - h), min(1.0, c + h)]


def bootstrap_mean(values, reps: int = 2000, seed: int = 0) -> list[float]:
    """Percentile bootstrap 95 % interval of a mean (fixed resampling seed)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return [float("nan"), float("nan")]
    idx = np.random.default_rng(seed).integers(0, v.size, size=(reps, v.size))
    means = v[idx].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def measure_best_of_n(server, circles, n_images: int = BEST_OF_N["n_images"]) -> dict:
    """Translation circles -> squares: N candidates per image (seeds x denoise) ranked by directional CLIP
    ('a circle' -> 'a square') with the demo CLIP, through the shipped best-of-N workflow; the selected
    candidate against the default-setting candidate (seed 0, denoise 0.7) of the same sweep."""
    import numpy as np
    from PIL import Image

    from conftest import load_module
    from ui_workflow import ui_to_api

    sweeps = load_module("dpm_latent_sweep_workflows", REPO / "scripts" / "sweep_workflows.py")
    _tiff, imgs, attrs = circles
    imgs, attrs = imgs[:n_images], attrs[:n_images]
    frames = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in imgs]
    name = "dpm_world_circles_best_of_n.tiff"
    frames[0].save(Path(server.input_dir) / name, save_all=True, append_images=frames[1:], compression="raw")
    c = BEST_OF_N
    g, ids, _titles = sweeps.graph_best_of_n_demo(name, seeds=c["seeds"], denoise=c["denoise"], cfg=c["cfg"],
                                                  chain_steps=c["chain_steps"], source_text="a circle",
                                                  target_text="a square", rank_within="each batch index")
    prompt = ui_to_api(json.loads((WORKFLOWS / "cyclediffusion_best_of_n_demo.json").read_text()),
                       server.object_info())
    for nid, node in g.prompt().items():  # the shipped workflow, with this run's values
        prompt[nid]["inputs"].update({k: v for k, v in node["inputs"].items() if not isinstance(v, list)})
    rank_in = prompt[ids["rank"]]["inputs"]
    every = str(max(int(k) for k in prompt) + 1)  # also save every candidate, for the default-setting run
    prompt[every] = {"class_type": "SaveImage", "inputs": {"images": rank_in["images"],
                                                           "filename_prefix": "dpm_demo/best_of_n_all"}}
    t = time.perf_counter()
    entry = server.run(prompt, timeout=3600)
    dt = time.perf_counter() - t
    allc = read_outputs(server, entry, every)  # candidate-major: candidate j, image b at j * n + b
    info = entry["outputs"][ids["rank"]]["dpm_rank"][0]
    n = len(imgs)
    sweep = load_module("dpm_latent_sweep_plan", REPO / "samplers" / "sweep.py").make_sweep(
        c["seeds"], c["denoise"], c["cfg"])
    assert allc.shape[0] == len(sweep.candidates) * n, (allc.shape, len(sweep.candidates), n)
    j_default = next(j for j, (s, d, _c) in enumerate(sweep.candidates) if (s, d) == DEFAULT_CANDIDATE)
    picks = {"selected": [int(i) for i in info["best_indices"]],
             "default": [j_default * n + b for b in range(n)]}
    read_attributes = world().read_attributes
    out = {"n_images": n, "candidates_per_image": len(sweep.candidates), "seeds": c["seeds"],
           "denoise": c["denoise"], "metric": "directional CLIP ('a circle' -> 'a square', demo CLIP)",
           "seconds": dt}
    for key, idx in picks.items():
        pred = read_attributes(allc[idx])
        sq = sum(p["shape"] == "square" for p in pred)
        col = sum(p["colour"] == a["colour"] for p, a in zip(pred, attrs))
        errs = [math.hypot(p["cx"] - a["cx"], p["cy"] - a["cy"]) for p, a in zip(pred, attrs)
                if p["shape"] not in (None, "none") and math.isfinite(p["cx"]) and math.isfinite(p["cy"])]
        out[key] = {"square_rate": sq / n, "square_rate_ci95": wilson(sq, n),
                    "colour_kept": col / n, "colour_kept_ci95": wilson(col, n),
                    "centroid_error_px": float(np.mean(errs)) if errs else float("nan"),
                    "centroid_error_px_ci95": bootstrap_mean(errs), "located": len(errs),
                    "mean_directional_clip": float(np.mean([info["scores"][i] for i in idx]))}
    return out


def grid(images: dict, rows: int = 8):
    """Columns: input | VAE round trip | replay A | replay B | SDEdit B || unguided | CLIP-guided || square | CLIP-edit."""
    import numpy as np
    from PIL import Image, ImageDraw

    cols = [("input", "input_circles"), ("VAE", "vae_roundtrip"), ("replay A", "reconstruction"),
            ("replay B", "translation"), ("SDEdit B", "sdedit_baseline"), None,
            ("unguided", "generation_unguided"), (f"CLIP {TARGET_COLOUR}", "generation_guided"), None,
            ("input", "input_squares"), (f"CLIP {EDIT_COLOUR}", "clip_edit")]
    cell, gap, head = 64, 12, 16
    width = sum(cell if c else gap for c in cols)
    canvas = Image.new("RGB", (width, head + rows * cell), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for c in cols:
        if c is None:
            x += gap
            continue
        label, key = c
        draw.text((x + 2, 2), label, fill=(0, 0, 0))
        batch = images[key]
        for r in range(min(rows, batch.shape[0])):
            arr = (batch[r].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            canvas.paste(Image.fromarray(arr), (x, head + r * cell))
        x += cell
    return canvas.resize((canvas.width * 2, canvas.height * 2), Image.NEAREST)


def metrics_markdown(m: dict) -> str:
    t, s = m["translation"], m["sdedit_baseline"]
    g, e = m["clip_generation"], m["clip_editing"]
    return "\n".join([
        f"| measure (n = {m['n_images']} world images) | DPM Latent | baseline |",
        "|---|---|---|",
        f"| reconstruction PSNR vs the VAE round trip (worst image) | {m['reconstruction_psnr_vs_vae_roundtrip_db']:.1f} dB | – |",
        f"| translation A→B: square rate | {t['square_rate']:.2f} | SDEdit {s['square_rate']:.2f} |",
        f"| translation A→B: colour kept | {t['colour_kept']:.2f} | SDEdit {s['colour_kept']:.2f} |",
        f"| translation A→B: centroid error | {t['centroid_error_px']:.1f} px | SDEdit {s['centroid_error_px']:.1f} px |",
        f"| CLIP-guided generation: '{g['target']}' colour rate | {g['clip_guided']:.2f} | unguided {g['unguided']:.2f} |",
        f"| CLIP-guided editing: '{e['target']}' colour rate | {e['target_colour_after']:.2f} | before {e['target_colour_before']:.2f} |",
        f"| CLIP-guided editing: square kept / centroid error | {e['square_kept']:.2f} / {e['centroid_error_px']:.1f} px | – |",
        *best_of_n_markdown(m.get("best_of_n")),
    ])


def best_of_n_markdown(b) -> list[str]:
    if not b:
        return []
    s, d = b["selected"], b["default"]

    def ci(x, k, fmt="{:.2f}"):
        lo, hi = x[k + "_ci95"]
        return f"{fmt.format(x[k])} [{fmt.format(lo)}, {fmt.format(hi)}]"

    head = f"best of {b['candidates_per_image']} by directional CLIP (n = {b['n_images']}, 95 % CI)"
    return [
        f"| translation {head}: square rate | {ci(s, 'square_rate')} | default run {ci(d, 'square_rate')} |",
        f"| translation {head}: colour kept | {ci(s, 'colour_kept')} | default run {ci(d, 'colour_kept')} |",
        f"| translation {head}: centroid error (px) | {ci(s, 'centroid_error_px', '{:.1f}')} | "
        f"default run {ci(d, 'centroid_error_px', '{:.1f}')} |",
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="world images for the reconstruction/translation metrics")
    ap.add_argument("--out", default=str(REPO / "demo_output"), help="where the grid and metrics go")
    ap.add_argument("--write-workflows", action="store_true", help="regenerate workflows/demo_*.json and exit")
    args = ap.parse_args(argv)

    import conftest  # noqa: F401  (ComfyUI's location from DPM_LATENT_COMFYUI)
    from comfy_server import ComfyServer

    comfy_dir = conftest.comfy_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    install_demo_models(comfy_dir)
    work = out / "server"
    work.mkdir(exist_ok=True)
    server = ComfyServer(comfy_dir, work, python=sys.executable,
                         model_dirs={"checkpoints": MODELS / "checkpoints", "clip_energy": MODELS / "clip_energy"})
    print(f"starting ComfyUI from {comfy_dir} ...", flush=True)
    server.start()
    try:
        if args.write_workflows:
            for p in write_workflows(server):
                print("wrote", p.relative_to(REPO))
            return 0
        t = time.perf_counter()
        metrics, images = measure(server, n=args.n)
        metrics["total_seconds"] = time.perf_counter() - t
    finally:
        server.stop()
    grid(images).save(out / "demo_grid.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    table = metrics_markdown(metrics)
    (out / "metrics.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {out / 'demo_grid.png'}, {out / 'metrics.json'}, {out / 'metrics.md'}")
    print("\nTry it by hand: `python3 scripts/comfy_host.py serve`, open http://127.0.0.1:8188/ and drag "
          "workflows/demo_translate.json (or demo_clip_generation.json, demo_clip_editing.json) into the page; "
          "the demo models and dpm_world_*.png inputs are installed in that ComfyUI.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
