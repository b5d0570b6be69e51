# SPDX-License-Identifier: GPL-3.0-or-later
"""The main job: the embedded demo world, run through a real ComfyUI server.

    python3 scripts/comfy_host.py demo [--n 64] [--out demo_output]

It installs the demo models (demo/models/, trained by demo/train.py) into the host's model
folders, starts the host's ComfyUI with this pack, runs the shipped demo workflows
(workflows/demo_*.json and *_demo.json, converted to API form against the live /object_info) on
images of the world, measures what the paper claims with the world's attribute readers, and writes
``<out>/demo_grid.png`` and ``<out>/metrics.json`` / ``metrics.md``.

The workflow files are the source of every graph it runs: it sets each run's inputs (images, batch
sizes, seeds, Langevin iterations, the texts it measures) and adds to the converted prompt only the
branches a measurement needs that the workflow does not carry (baselines, random controls).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))  # dpmtools (never the repository itself: its nodes/ would shadow ComfyUI's)
from dpmtools.comfy_env import load_module  # noqa: E402
from dpmtools.graphs import Graph  # noqa: E402
from dpmtools.workflow import find_node, load_prompt, set_inputs  # noqa: E402


def world():
    """demo/world.py, loaded by path (see above)."""
    return load_module("dpm_latent_demo_world", REPO / "demo" / "world.py")

MODELS = REPO / "demo" / "models"
CKPT_A = "dpm_world_circles.safetensors"
CKPT_B = "dpm_world_squares.safetensors"
CLIP_NAME = "dpm_world_clip"
WORKFLOWS = REPO / "workflows"

# The demo's settings (steps, denoise, eta, CLIP weight, Langevin step size, ...) are the shipped workflows'
# widget values, and their Note nodes say why (e.g. CLIP weight 100 with step 0.001 for the tiny world's
# generator). The demo sets only what a run changes, and the texts whose colour it measures.
LANGEVIN_STEPS = 60
# CLIP-guided editing takes half as many: on the published draw (seed 0, n = 12) 30 steps gave the same blue rate as
# 60 (6/12) and a smaller centroid error (1.5 vs 2.0 px), 20 steps fewer blue (5/12); the row is the demo's dearest
# per step (~1 s on the 2-core machine), so this halves its time without changing its claim. Generation keeps 60:
# at 30 its red rate fell from 11/12 to 8/12, whose interval would overlap the unguided one.
EDIT_LANGEVIN_STEPS = 30
TARGET_COLOUR = "red"
EDIT_COLOUR = "blue"
# Masked translation: the mask is the shape's box grown by this many pixels on each side. One latent
# cell (8 px): the bilinear mask is soft over a cell, and a circle's box must leave room for the square's
# corners (measured on 24 images: square rate 0.62 at 4 px, 0.83 at 8 px, 0.96 at 12 px; unmasked 0.92).
MASK_MARGIN = 8
MASKED_WORKFLOW = "cyclediffusion_masked_edit_demo.json"
MASKED_WORKFLOW_SD15 = "cyclediffusion_masked_edit_sd15.json"
DEMO_WORKFLOWS = {"translate": "demo_translate.json", "clip_generation": "demo_clip_generation.json",
                  "clip_editing": "demo_clip_editing.json"}
PIXEL_DDPM_A = "dpm_world_ddpm_circles"      # demo/models/diffusers/, trained by demo/train.py --parts ddpm
PIXEL_DDPM_B = "dpm_world_ddpm_squares"
PIXEL_SIZE = 32
PIXEL_WORKFLOW = "cyclediffusion_translate_pixel_ddpm.json"
BEST_OF_N_WORKFLOW = "cyclediffusion_best_of_n_demo.json"
# The video row (demo/video.py's models; VIDEO_WORKFLOW holds the image translation row's settings, on clips,
# with shift 3 as the video models were trained (ComfyUI's Wan default is 8)).
VIDEO = {"n": 32}
VIDEO_WORKFLOW = "demo_translate_video.json"


def rate_with_interval(k: int, n: int, z: float = 1.959963984540054) -> dict:
    """``k`` successes in ``n`` trials: the rate with its Wilson score 95 % interval (any z).

    Returns ``{"rate", "k", "n", "low", "high"}``; the interval stays inside [0, 1] and is sound
    for small n and for rates near 0 or 1, where the normal approximation is not."""
    k, n = int(k), int(n)
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    zz = z * z
    denom = 1.0 + zz / n
    centre = (p + zz / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + zz / (4 * n * n)) / denom
    return {"rate": p, "k": k, "n": n, "low": max(0.0, centre - half), "high": min(1.0, centre + half)}


def interval_of(rate: float, n: int) -> dict:
    """``rate_with_interval`` for a rate that is a mean of ``n`` 0/1 outcomes."""
    return rate_with_interval(round(rate * n), n)


def fmt_rate(iv: dict) -> str:
    """'0.69 [0.44, 0.86]' (rate and its 95 % interval)."""
    return f"{iv['rate']:.2f} [{iv['low']:.2f}, {iv['high']:.2f}]"


# ----------------------------------------------------------------------------- the shipped workflows
def shipped(server, name: str, values: dict | None = None):
    """workflows/<name> as an API prompt (converted against the live server's object_info) with ``values``
    set: {node title, class_type or '#<id>': {input: value}} (dpmtools.workflow.set_inputs). Returns a
    Graph over the prompt (for adding branches) and {Save Image filename_prefix: node id}."""
    prompt = set_inputs(load_prompt(WORKFLOWS / name, object_info(server)), values or {})
    return Graph.from_prompt(prompt), save_nodes(prompt)


_OBJECT_INFO: dict = {}


def object_info(server) -> dict:
    """The server's /object_info, fetched once per server (its node list does not change while it runs)."""
    if server.url not in _OBJECT_INFO:
        _OBJECT_INFO[server.url] = server.object_info()
    return _OBJECT_INFO[server.url]


def save_nodes(prompt: dict) -> dict:
    """{filename_prefix: node id} of the prompt's Save Image nodes."""
    return {n["inputs"]["filename_prefix"]: nid for nid, n in prompt.items() if n["class_type"] == "SaveImage"}


def run_prompt(server, prompt: dict) -> tuple[dict, float]:
    """Run an API prompt; its history entry and the seconds it took."""
    t = time.perf_counter()
    entry = server.run(prompt, timeout=3600)
    return entry, time.perf_counter() - t


def read_saved(server, entry, saves: dict, prefix: str) -> dict:
    """{name: images} of every Save Image whose filename_prefix is ``prefix`` + name."""
    return {k[len(prefix):]: read_outputs(server, entry, nid) for k, nid in saves.items() if k.startswith(prefix)}


def node_inputs(prompt: dict, key: str) -> dict:
    """The inputs of the one node of ``prompt`` that ``key`` names (title, class_type or '#<id>')."""
    return prompt[find_node(prompt, key)]["inputs"]


def pixel_ddpm_prompt(server, input_image: str) -> tuple[dict, dict]:
    """The shipped pixel-DDPM translation (encode with A, replay with B) on ``input_image``, plus the
    reconstruction (replay with A), SDEdit with B at the encoder's strength and the pixel VAE round
    trip, saved as dpm_pixel_ddpm/<name>. Returns (prompt, saves)."""
    g, _ = shipped(server, PIXEL_WORKFLOW, {"LoadImage": {"image": input_image}})
    enc = node_inputs(g.nodes, "DPMEncode")
    tr_id = find_node(g.nodes, "ReplayLatentWithPrompt")
    tr = g.nodes[tr_id]["inputs"]
    vae_a = g.nodes[enc["latent_image"][0]]["inputs"]["vae"]        # the VAE Encode's: model A's
    vae_b = next(n["inputs"]["vae"] for n in g.nodes.values()          # the translation's decoder: B's
                 if n["class_type"] == "VAEDecode" and n["inputs"]["samples"] == [tr_id, 0])
    rec = g.node("ReplayLatentWithPrompt", model=enc["model"], positive=enc["positive"], negative=enc["negative"],
                 latent_code=tr["latent_code"], cfg=enc["cfg"])
    sde = g.node("KSampler", model=tr["model"], positive=tr["positive"], negative=tr["negative"],
                 latent_image=enc["latent_image"], seed=enc["seed"], steps=enc["steps"], cfg=tr["cfg"],
                 sampler_name="euler_ancestral", scheduler=enc["scheduler"], denoise=enc["denoise"])
    for key, samples, vae in (("reconstruction", rec.out(0).link, vae_a), ("sdedit_baseline", sde.out(0).link, vae_b),
                              ("vae_roundtrip", enc["latent_image"], vae_a)):
        dec = g.node("VAEDecode", samples=samples, vae=vae)
        g.node("SaveImage", images=dec.out(0), filename_prefix=f"dpm_pixel_ddpm/{key}")
    return g.prompt(), save_nodes(g.prompt())


# ----------------------------------------------------------------------------- running
def install_demo_models(comfy_dir: Path) -> None:
    """Link the demo models into the host's model folders (so `serve` shows them too)."""
    for sub, name in (("checkpoints", CKPT_A), ("checkpoints", CKPT_B), ("clip_energy", CLIP_NAME),
                      ("diffusers", PIXEL_DDPM_A), ("diffusers", PIXEL_DDPM_B)):
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
    for name in video_module().VIDEO_NAMES.values():
        _link(MODELS / "video" / name, Path(comfy_dir) / "models" / "diffusion_models" / name)
    write_sample_inputs(Path(comfy_dir) / "input")
    install_asyrp_directions(Path(comfy_dir) / "input")


def _link(src: Path, dst: Path) -> None:
    """``dst`` -> ``src`` (a user's own file of that name is left alone)."""
    if not src.exists():
        raise SystemExit(f"demo model {src} is missing: run `python demo/train.py` (see demo/models/TRAINING.json)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() and dst.resolve() == src.resolve():
        return
    if dst.exists() and not dst.is_symlink():
        return
    if dst.is_symlink():
        dst.unlink()
    dst.symlink_to(src, target_is_directory=src.is_dir())


def write_sample_inputs(input_dir: Path) -> None:
    """One image per domain, for trying the demo workflows by hand."""
    sample_domain = world().sample_domain

    input_dir.mkdir(parents=True, exist_ok=True)
    for domain, name in (("A", "circles"), ("B", "squares")):
        to_frames(sample_domain(1, 7, domain)[0])[0].save(input_dir / f"dpm_world_{name}.png")
    write_masked_sample(input_dir)
    write_video_sample(input_dir)


def video_latents(clips, vae=None):
    """(n, T, 3, 64, 64) clips -> (the Wan-format video latent, the per-frame SD3 image latents), as ComfyUI's
    samplers take them (the files workflows/demo_translate_video.json loads), and the model-space latent.
    ``vae``: the world's image VAE (demo/video.py's world_vae), loaded when not given."""
    in_process_comfy()
    import comfy.latent_formats

    V = video_module()
    x0 = V.encode_clips(V.world_vae() if vae is None else vae, clips)
    return V.to_raw(x0), comfy.latent_formats.SD3().process_out(V.frames_of(x0)), x0


def write_video_sample(input_dir: Path) -> None:
    """dpm_world_clip_circles.latent / _frames.latent: one clip of a moving circle, for the video workflow by hand."""
    from dpmtools.graphs import write_latent

    clip, frames, _ = video_latents(world().sample_clip_domain(1, 7, "A")[0])
    write_latent(input_dir, "dpm_world_clip_circles", clip)
    write_latent(input_dir, "dpm_world_clip_circles_frames", frames)
    write_example_sets(input_dir)


EXAMPLE_SETS = {"n": 16, "seed": 900}  # Asyrp Direction From Examples: the same scenes in blue and in red


def write_example_sets(input_dir: Path) -> None:
    """The inputs of workflows/asyrp_from_examples_demo.json: 16 blue squares, the same 16 scenes in red
    (multi-frame TIFFs) and a new red square to edit."""
    sample_world = world().sample_world
    for colour in ("blue", "red"):
        imgs, _ = sample_world(EXAMPLE_SETS["n"], EXAMPLE_SETS["seed"], ("square",), (colour,))
        save_batch(input_dir / f"dpm_world_squares_{colour}_batch.tiff", to_frames(imgs))
    to_frames(sample_world(1, 7, ("square",), ("red",))[0])[0].save(input_dir / "dpm_world_red_square.png")


def write_inputs(input_dir: Path, n: int, seed: int, n_edit: int) -> dict:
    """World images as multi-frame TIFFs (ComfyUI's LoadImage loads every frame as a batch):
    ``n`` circles for translation, ``n_edit`` squares for CLIP editing."""
    sample_domain = world().sample_domain

    files = {}
    for domain, name in (("A", "circles"), ("B", "squares")):
        imgs, attrs = sample_domain(n if domain == "A" else n_edit, seed + (0 if domain == "A" else 1000), domain)
        frames = to_frames(imgs)
        tiff = f"dpm_world_{name}_batch.tiff"
        save_batch(input_dir / tiff, frames)
        frames[0].save(input_dir / f"dpm_world_{name}.png")
        files[domain] = (tiff, imgs, attrs)
    return files


def mask_boxes(attrs, margin: float = MASK_MARGIN, size: int = 64):
    """(n, size, size) float masks: 1 on each shape's box grown by ``margin`` pixels, else 0."""
    import torch

    masks = torch.zeros(len(attrs), size, size)
    for i, a in enumerate(attrs):
        half = a["size"] + margin
        x0, x1 = max(0, math.floor(a["box_cx"] - half)), min(size, math.ceil(a["box_cx"] + half))
        y0, y1 = max(0, math.floor(a["box_cy"] - half)), min(size, math.ceil(a["box_cy"] + half))
        masks[i, y0:y1, x0:x1] = 1.0
    return masks


def masked_frames(imgs, masks):
    """RGBA PIL images whose alpha is 0 where the mask is 1 (ComfyUI's Load Image: MASK = 1 - alpha)."""
    import numpy as np
    from PIL import Image

    frames = []
    for im, m in zip(imgs, masks):
        rgb = (im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        alpha = ((1.0 - m.numpy()) * 255).round().astype(np.uint8)
        frames.append(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))
    return frames


def write_masked_sample(input_dir: Path) -> None:
    """dpm_world_circles_masked.png: the sample circle with its mask in the alpha channel."""
    imgs, attrs = world().sample_domain(1, 7, "A")
    masked_frames(imgs, mask_boxes(attrs))[0].save(Path(input_dir) / "dpm_world_circles_masked.png")


def measure_masked(server, files_a, images: dict) -> dict:
    """Masked translation A -> B (mask = the shape's box + MASK_MARGIN px) against ComfyUI's inpainting
    route (KSampler with B on the same Set Latent Noise Mask latent, same denoise). Outside the mask: PSNR
    against the input's VAE round trip over the pixels outside it; inside: the world's attribute reader."""
    import numpy as np

    read_attributes = world().read_attributes
    _tiff, imgs, attrs = files_a
    masks = mask_boxes(attrs)
    name = "dpm_world_circles_masked_batch.tiff"
    save_batch(Path(server.input_dir) / name, masked_frames(imgs, masks))
    g, saves = shipped(server, MASKED_WORKFLOW, {"LoadImage": {"image": name}})
    entry, dt = run_prompt(server, g.prompt())
    out = read_saved(server, entry, saves, "dpm_demo/")
    images.update(out, masks=masks)
    n = len(attrs)
    outside = (masks == 0)[:, None].expand(-1, 3, -1, -1)

    def outside_psnr(a, b):
        return [psnr(a[i][outside[i]], b[i][outside[i]]) for i in range(n)]

    metrics = {"n": n, "mask_margin_px": MASK_MARGIN, "mask_area_fraction": float(masks.mean()), "seconds": dt}
    for key, label in (("masked_translation", "dpm"), ("masked_inpaint_baseline", "inpaint_baseline")):
        pred = read_attributes(out[key])
        ps = outside_psnr(out[key], out["masked_vae_roundtrip"])
        metrics[label] = {
            "outside_psnr_db_min": min(ps), "outside_psnr_db_median": float(np.median(ps)),
            "square_rate": rate_with_interval(sum(p["shape"] == "square" for p in pred), n),
            "colour_kept": rate_with_interval(sum(p["colour"] == a["colour"] for p, a in zip(pred, attrs)), n),
            "centroid_error_px": float(np.mean([math.hypot(p["cx"] - a["cx"], p["cy"] - a["cy"])
                                                for p, a in zip(pred, attrs) if located(p)] or [float("nan")])),
        }
    return metrics


def add_rate_intervals(m: dict) -> None:
    """Beside every rate of the demo rows, ``<key>_interval`` = [low, high] (Wilson 95 %) and the row's ``n``."""
    rows = [(m.get("translation"), m.get("n_images"), ("square_rate", "circle_rate", "colour_kept", "no_shape_rate")),
            (m.get("sdedit_baseline"), m.get("n_images"), ("square_rate", "circle_rate", "colour_kept",
                                                           "no_shape_rate")),
            (m.get("clip_generation"), (m.get("clip_generation") or {}).get("batch"),
             ("unguided", "clip_guided", "unguided_square_rate", "clip_guided_square_rate")),
            (m.get("clip_editing"), (m.get("clip_editing") or {}).get("n"),
             ("target_colour_before", "target_colour_after", "square_kept"))]
    for row, n, keys in rows:
        if not row or not n:
            continue
        row["n"] = n
        for k in keys:
            if isinstance(row.get(k), float) and math.isfinite(row[k]):
                iv = interval_of(row[k], n)
                row[f"{k}_interval"] = [iv["low"], iv["high"]]


def read_outputs(server, entry, node_id):
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for f in entry["outputs"][node_id]["images"]:
        path = Path(server.output_dir) / f.get("subfolder", "") / f["filename"]
        out.append(torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0))
    return torch.stack(out).permute(0, 3, 1, 2)


def to_frames(imgs) -> list:
    """(n, 3, h, w) images in [0, 1] as 8-bit PIL images."""
    import numpy as np
    from PIL import Image

    return [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in imgs]


def save_batch(path: Path, frames) -> None:
    """Frames as one multi-frame TIFF: ComfyUI's LoadImage loads every frame, as one batch."""
    frames[0].save(path, save_all=True, append_images=frames[1:], compression="raw")


def located(p: dict) -> bool:
    """The world's reader found a shape with a centroid in this image."""
    return p["shape"] not in (None, "none") and math.isfinite(p["cx"]) and math.isfinite(p["cy"])


def to_world_size(x):
    """Images of another size (the 32 x 32 pixel DDPMs) bilinearly resized to the world's 64 x 64."""
    import torch.nn.functional as F

    size = world().SIZE
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear",
                                                        align_corners=False).clamp(0, 1)


def psnr(a, b) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def measure(server, n: int = 64, seed: int = 0, langevin_steps: int = LANGEVIN_STEPS, gen_batch: int = 12,
            edit_batch: int = 12, video_n: int = VIDEO["n"],
            edit_langevin_steps: int = EDIT_LANGEVIN_STEPS) -> tuple[dict, dict]:
    import numpy as np

    read_attributes = world().read_attributes

    files = write_inputs(Path(server.input_dir), n, seed, edit_batch)
    metrics: dict = {"n_images": n}
    images: dict = {}

    # 1 + 2: reconstruction and translation (+ SDEdit baseline)
    tiff_a, imgs_a, attrs_a = files["A"]
    g, saves = shipped(server, DEMO_WORKFLOWS["translate"], {"LoadImage": {"image": tiff_a}})
    entry, dt = run_prompt(server, g.prompt())
    out = read_saved(server, entry, saves, "dpm_demo/")
    images.update(input_circles=imgs_a, **out)
    metrics["translate_seconds"] = dt
    metrics["reconstruction_psnr_vs_vae_roundtrip_db"] = min(
        psnr(out["reconstruction"][i], out["vae_roundtrip"][i]) for i in range(n))
    truth = read_attributes(out["vae_roundtrip"])
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

    metrics["clip_generation"] = measure_clip_generation(server, images, seed, langevin_steps, gen_batch)
    metrics["clip_editing"] = measure_clip_editing(server, files["B"], images, seed, edit_langevin_steps)
    metrics["masked_translation"] = measure_masked(server, files["A"], images)
    metrics["pixel_ddpm"], images["pixel_ddpm"] = measure_pixel_ddpm(server, n=n, seed=seed)
    metrics["best_of_n"] = measure_best_of_n(server, files["A"])
    metrics["asyrp"], asyrp_images = measure_asyrp(server, seed=seed)
    images.update(asyrp_images)
    metrics["video"], video_images = measure_video(server, n=video_n, seed=seed)
    images.update(video_images)
    add_rate_intervals(metrics)
    return metrics, images


def measure_clip_generation(server, images: dict, seed: int = 0, langevin_steps: int = LANGEVIN_STEPS,
                            gen_batch: int = 12) -> dict:
    """CLIP-guided generation with model B (workflows/demo_clip_generation.json): the target colour's rate of
    the Langevin samples against the unguided replay of the same codes."""
    import numpy as np

    read_attributes = world().read_attributes
    g, saves = shipped(server, DEMO_WORKFLOWS["clip_generation"], {
        "RandomLatentCode": {"batch_size": gen_batch, "seed": seed},
        "CLIPEnergy": {"text": f"a {TARGET_COLOUR} square"},
        "LangevinLatentSampler": {"steps": langevin_steps, "seed": seed}})
    entry, dt = run_prompt(server, g.prompt())
    gen = read_saved(server, entry, saves, "dpm_demo/")
    images.update(generation_unguided=gen["unguided"], generation_guided=gen["clip_guided"],
                  energy_plot=gen["energy_plot"])
    rates = {}
    for key in ("unguided", "clip_guided"):
        pred = read_attributes(gen[key])
        rates[key] = float(np.mean([p["colour"] == TARGET_COLOUR for p in pred]))
        rates[key + "_square_rate"] = float(np.mean([p["shape"] == "square" for p in pred]))
    return dict(rates, target=f"a {TARGET_COLOUR} square", batch=gen_batch, langevin_steps=langevin_steps, seconds=dt)


def measure_clip_editing(server, files_b, images: dict, seed: int = 0,
                         langevin_steps: int = EDIT_LANGEVIN_STEPS) -> dict:
    """CLIP-guided editing of encoded squares (workflows/demo_clip_editing.json): the edit colour's rate
    before and after, the shape kept and the centroid error."""
    import numpy as np

    read_attributes = world().read_attributes
    tiff_b, imgs_b, attrs_b = files_b
    g, saves = shipped(server, DEMO_WORKFLOWS["clip_editing"], {
        "LoadImage": {"image": tiff_b}, "DPMEncode": {"seed": seed},
        "CLIPEnergy": {"text": f"a {EDIT_COLOUR} square"},
        "LangevinLatentSampler": {"steps": langevin_steps, "seed": seed}})
    entry, dt = run_prompt(server, g.prompt())
    edit = read_outputs(server, entry, saves["dpm_demo/clip_edit"])
    images.update(input_squares=imgs_b, clip_edit=edit)
    pred = read_attributes(edit)
    n_edit = len(pred)
    return {
        "target": f"a {EDIT_COLOUR} square",
        "target_colour_before": float(np.mean([a["colour"] == EDIT_COLOUR for a in attrs_b[:n_edit]])),
        "target_colour_after": float(np.mean([p["colour"] == EDIT_COLOUR for p in pred])),
        "square_kept": float(np.mean([p["shape"] == "square" for p in pred])),
        "centroid_error_px": float(np.mean([math.hypot(p["cx"] - a["cx"], p["cy"] - a["cy"])
                                            for p, a in zip(pred, attrs_b) if located(p)] or [float("nan")])),
        "langevin_steps": langevin_steps,
        "seconds": dt,
        "n": n_edit,
    }


def wilson(k: int, n: int) -> list:
    """Wilson 95 % interval of a rate k / n, as [low, high]."""
    if n == 0:
        return [float("nan"), float("nan")]
    iv = rate_with_interval(k, n)
    return [iv["low"], iv["high"]]


def bootstrap_mean(values, reps: int = 2000, seed: int = 0) -> list:
    """Percentile bootstrap 95 % interval of a mean (seeded)."""
    import numpy as np

    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return [float("nan"), float("nan")]
    idx = np.random.default_rng(seed).integers(0, len(v), size=(reps, len(v)))
    means = v[idx].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def measure_pixel_ddpm(server, n: int = 64, seed: int = 0) -> tuple[dict, dict]:
    """Pixel-space DDPMs (diffusers, 32 x 32): translation A -> B vs SDEdit with B, and reconstruction.

    Inputs are world circles area-downsampled to 32 x 32; outputs are read by the world's readers
    after a bilinear upsampling to 64 x 64 (centroids in 64-pixel units, like the flow demo)."""
    import numpy as np
    import torch.nn.functional as F

    W = world()
    imgs, attrs = W.sample_domain(n, seed + 2000, "A")
    small = F.avg_pool2d(imgs, W.SIZE // PIXEL_SIZE)
    tiff = "dpm_world_circles_32_batch.tiff"
    save_batch(Path(server.input_dir) / tiff, to_frames(small))
    prompt, saves = pixel_ddpm_prompt(server, tiff)
    entry, dt = run_prompt(server, prompt)
    out = read_saved(server, entry, saves, "dpm_pixel_ddpm/")
    big = {k: to_world_size(v) for k, v in out.items()}
    enc = node_inputs(prompt, "DPMEncode")
    m: dict = {"n_images": n, "image_size": PIXEL_SIZE, "steps": enc["steps"], "denoise": enc["denoise"],
               "eta": enc["eta"], "seconds": dt}
    m["reconstruction_psnr_vs_input_db"] = {
        "worst": min(psnr(out["reconstruction"][i], out["vae_roundtrip"][i]) for i in range(n)),
        "max_abs_error_255": float((out["reconstruction"] - out["vae_roundtrip"]).abs().max() * 255)}

    for key in ("translation", "sdedit_baseline", "vae_roundtrip"):
        pred = W.read_attributes(big[key])
        sq = sum(p["shape"] == "square" for p in pred)
        col = sum(p["colour"] == a["colour"] for p, a in zip(pred, attrs))
        circ = sum(p["shape"] == "circle" for p in pred)
        errs = [math.hypot(p["cx"] - a["cx"], p["cy"] - a["cy"]) for p, a in zip(pred, attrs) if located(p)]
        m[key] = {"square_rate": sq / n, "square_rate_ci95": wilson(sq, n),
                  "circle_rate": circ / n, "circle_rate_ci95": wilson(circ, n),
                  "colour_kept": col / n, "colour_kept_ci95": wilson(col, n),
                  "centroid_error_px": float(np.mean(errs)) if errs else float("nan"),
                  "centroid_error_px_ci95": bootstrap_mean(errs, seed=seed),
                  "no_shape_rate": float(np.mean([not located(p) for p in pred]))}
    images = {"input_small": small, **out}
    return m, images


# ----------------------------------------------------------------------------- the world in motion (video)

def video_module():
    """demo/video.py (the tiny Wan-layout video models and the per-frame VAE), loaded by path."""
    return load_module("dpm_latent_demo_video", REPO / "demo" / "video.py")


def in_process_comfy():
    """ComfyUI importable in this process, on the CPU in fp32 (the video row runs its models here)."""
    from dpmtools import comfy_env

    comfy_env.add_comfy_to_path()
    if "comfy.model_management" not in sys.modules:
        comfy_env.set_device(cpu=True, force_fp32=True)


def clip_measures(clips, attrs, shape: str) -> dict:
    """Per-frame reads of (n, T, 3, 64, 64) clips against the input clips' attributes.

    square rate / colour kept: per frame (n * T frames, Wilson) and per clip (every frame; n, Wilson);
    trajectory error: the mean over frames of the centroid error, per clip (bootstrap over clips);
    flicker: the share of consecutive frame pairs whose read shape or colour differs (per clip, bootstrap),
    and the mean frame-to-frame change of the read fill ratio and of the mean foreground colour (RGB)."""
    import numpy as np

    W = world()
    reads = W.read_clips(clips)
    n, t = len(reads), len(reads[0])
    sq = np.array([[f["shape"] == shape for f in r] for r in reads])
    col = np.array([[f["colour"] == a["colour"] for f in r] for r, a in zip(reads, attrs)])
    traj, flick, shape_flick, colour_flick, dfill, drgb = [], [], [], [], [], []
    for r, a in zip(reads, attrs):
        errs = [math.hypot(f["cx"] - cx, f["cy"] - cy) for f, cx, cy in zip(r, a["cx"], a["cy"]) if located(f)]
        if errs:
            traj.append(float(np.mean(errs)))
        pairs = list(zip(r[:-1], r[1:]))
        shape_flick.append(float(np.mean([p["shape"] != q["shape"] for p, q in pairs])))
        colour_flick.append(float(np.mean([p["colour"] != q["colour"] for p, q in pairs])))
        flick.append(float(np.mean([p["shape"] != q["shape"] or p["colour"] != q["colour"] for p, q in pairs])))
        dfill.append(float(np.mean([abs(p["fill"] - q["fill"]) for p, q in pairs])))
        rgb = [p for p in pairs if "rgb" in p[0] and "rgb" in p[1]]
        if rgb:
            drgb.append(float(np.mean([np.linalg.norm(np.subtract(p["rgb"], q["rgb"])) for p, q in rgb])))
    k_sq, k_col = int(sq.sum()), int(col.sum())
    return {
        "frames": n * t, "n": n,
        "frame_shape_rate": k_sq / (n * t), "frame_shape_rate_ci95": wilson(k_sq, n * t),
        "clip_shape_rate": float(sq.all(1).mean()), "clip_shape_rate_ci95": wilson(int(sq.all(1).sum()), n),
        "frame_colour_kept": k_col / (n * t), "frame_colour_kept_ci95": wilson(k_col, n * t),
        "trajectory_error_px": float(np.mean(traj)) if traj else float("nan"),
        "trajectory_error_px_ci95": bootstrap_mean(traj), "n_located": len(traj),
        "flicker": float(np.mean(flick)), "flicker_ci95": bootstrap_mean(flick),
        "shape_flicker": float(np.mean(shape_flick)), "colour_flicker": float(np.mean(colour_flick)),
        "fill_change": float(np.mean(dfill)), "fill_change_ci95": bootstrap_mean(dfill),
        "rgb_change": float(np.mean(drgb)) if drgb else float("nan"),
        "rgb_change_ci95": bootstrap_mean(drgb),
    }


def measure_video(server, n: int = VIDEO["n"], seed: int = 0) -> tuple[dict, dict]:
    """Video translation circles -> squares on clips of the world in motion (demo/video.py's models), through the
    server with the shipped workflows/demo_translate_video.json: DPM Encode of the whole clip with video model A
    and replay with video model B, against ComfyUI's own video SDEdit (KSampler with video model B on the clip at
    the same denoise) and per-frame SDEdit (KSampler with the image flow model B on each frame, each frame its own
    noise). The clips are encoded and the results decoded here, frame by frame with the world's image VAE (the
    video VAE of these models, demo/video.py); the latents travel as .latent files (LoadLatent / SaveLatent)."""
    import torch

    in_process_comfy()
    import comfy.latent_formats
    from dpmtools.graphs import saved_latents, write_latent

    W, V = world(), video_module()
    t0 = time.perf_counter()
    clips, attrs = W.sample_clip_domain(n, seed + 3000, "A")
    frames = clips.shape[1]
    vae = V.world_vae()
    raw_clips, raw_frames, x0 = video_latents(clips, vae)         # x0: model space (n, 16, T, 8, 8)
    sd3 = comfy.latent_formats.SD3()
    clip_file = write_latent(Path(server.input_dir), f"dpm_video_clips_{n}_{seed}", raw_clips)
    frame_file = write_latent(Path(server.input_dir), f"dpm_video_frames_{n}_{seed}", raw_frames)
    seeded = {k: {"seed": seed} for k in ("DPM Encode the clip with A", "Baseline: ComfyUI video SDEdit with B",
                                          "Baseline: per-frame SDEdit with image B")}
    g, _ = shipped(server, VIDEO_WORKFLOW, {"Clip (video latent)": {"latent": clip_file},
                                            "Frames (image latents)": {"latent": frame_file}, **seeded})
    prompt = g.prompt()
    saves = {nd["inputs"]["filename_prefix"]: nid for nid, nd in prompt.items() if nd["class_type"] == "SaveLatent"}
    entry, dt = run_prompt(server, prompt)
    raw = {k[len("dpm_video/"):]: saved_latents(server, entry, nid) for k, nid in saves.items()
           if k.startswith("dpm_video/")}
    lat = {k: V.from_raw(raw[k]) for k in ("reconstruction", "translation", "video_sdedit")}
    lat["frame_sdedit"] = V.clips_of(sd3.process_in(raw["frame_sdedit"]), frames)
    out = {"roundtrip": V.decode_clips(vae, x0), "replay": V.decode_clips(vae, lat["translation"]),
           "video_sdedit": V.decode_clips(vae, lat["video_sdedit"]),
           "frame_sdedit": V.decode_clips(vae, lat["frame_sdedit"])}
    enc = node_inputs(prompt, "DPMEncode")
    ks = node_inputs(prompt, "Baseline: ComfyUI video SDEdit with B")
    m: dict = {"n_clips": n, "frames": frames, "steps": enc["steps"], "denoise": enc["denoise"], "eta": enc["eta"],
               "scheduler": enc["scheduler"], "baseline_sampler": ks["sampler_name"],
               "shift": sorted({nd["inputs"]["shift"] for nd in prompt.values() if nd["class_type"] == "ModelSamplingSD3"}),
               "reconstruction_relative_error": float((lat["reconstruction"] - x0).norm() / x0.norm()),
               "seconds": {"server": dt}}
    for key in ("replay", "video_sdedit", "frame_sdedit", "roundtrip"):
        m[key] = clip_measures(out[key], attrs, "circle" if key == "roundtrip" else "square")
    m["seconds"]["total"] = time.perf_counter() - t0
    images = {"video_input": clips, **{f"video_{k}": v for k, v in out.items()}}
    return m, images



# ----------------------------------------------------------------------------- Asyrp (h-space)
ASYRP = {  # per h-space: the CLIP-trained direction demo/train.py --parts asyrp ships (demo/models/asyrp/), its
    # Gaussian controls, and the settings of the direction made from examples inside the graph (chosen on other
    # held-out images, docs/asyrp.md; grid_strength: the grid's second example column, 2 to show strength past 1).
    # The DDPM's CLIP-trained direction (and its controls) shifts h after the first up block, its direction from
    # examples after the second, with spread 'object, centred' (docs/asyrp.md, 'The pixel DDPM after its second
    # up block': there a CLIP-trained direction destroys the picture and random delta_h tints the background)
    "ddpm": {"title": "pixel DDPM A (U-Net; CLIP-trained and controls: h after the first up block; from examples: "
                      "h after the second up block)",
             "loader": "diffusers",
             "model": PIXEL_DDPM_A, "domain": "A", "shape": "circle", "scheduler": "normal",
             "direction": "dpm_world_ddpm_red_to_blue.asyrp.safetensors",
             "examples": {"t_edit": 0.2, "t_start": 0.6, "h_site": "after second up block",
                          "spread": "object, centred"},
             "example_strengths": [0.5, 1.0, 2.0], "grid_strength": 2.0},
    "flow": {"title": "flow model B (SD3 MMDiT; h = image tokens of the middle joint block)", "loader": "checkpoint",
             "model": CKPT_B, "domain": "B", "shape": "square", "scheduler": "simple",
             "direction": "dpm_world_flow_red_to_blue.asyrp.safetensors",
             "examples": {"t_edit": 0.2, "t_start": 0.5, "h_site": "middle", "spread": "where pairs differ"},
             "example_strengths": [0.5, 1.0, 1.5, 2.0], "grid_strength": 2.0,
             # the size direction of the composition: its example sets are not pairs
             "size_examples": {"t_edit": 0.2, "t_start": 0.7, "h_site": "middle", "spread": "everywhere"}},
}
ASYRP_STEPS = 20
ASYRP_WORKFLOW = "asyrp_demo.json"
ASYRP_EXAMPLES = {"n": 16, "seed": 900}   # the same scenes in blue ("with") and in red ("without")
# branch -> strengths; "trained" at 0 is the plain replay (the baseline of every row); the direction from
# examples runs at its network's "example_strengths" (the settings were chosen on other held-out images,
# docs/asyrp.md)
ASYRP_CONTROLS = {"gauss_norm": "Gaussian control, trained norm",   # files demo/train.py writes beside each
                  "gauss_0.2": "Gaussian control, 0.2 ||h||"}        # direction -> their row label
ASYRP_BRANCHES = {"trained": [0.0, 1.0], **{control: [1.0] for control in ASYRP_CONTROLS}}


def asyrp_branches(which: str) -> dict:
    """Branch -> strengths of the network ``which`` (in the order the workflow saves them)."""
    b = {"trained": ASYRP_BRANCHES["trained"], "examples": ASYRP[which]["example_strengths"]}
    b.update((k, v) for k, v in ASYRP_BRANCHES.items() if k not in b)
    if which == ASYRP_COMPOSE:
        b.update(size=[1.0], compose=[1.0])
    return b
ASYRP_COMPOSE = "flow"   # composition (red -> blue plus small -> large, both from examples) on this network
ASYRP_SIZES = {"large": (13.0, 16.0), "small": (7.0, 9.0)}   # half extents of the size example sets


def strength_list(values) -> str:
    """Asyrp Edit's strength input: one image per value ('0, 0.5, 1, 2')."""
    return ", ".join(f"{v:g}" for v in values)


def control_file(direction: str, control: str) -> str:
    return direction.replace(".asyrp.", f"_{control}.asyrp.")


def asyrp_example_images(which: str) -> dict:
    """The example sets of a network's shape: 'blue' / 'red' (the same scenes in both colours) and, for the
    composition, 'large' / 'small' red shapes at places drawn independently for each set (unpaired, as Asyrp
    Direction From Examples allows). Name -> (n, 3, 64, 64)."""
    import torch

    W = world()
    shape = ASYRP[which]["shape"]
    n, seed = ASYRP_EXAMPLES["n"], ASYRP_EXAMPLES["seed"]
    sets = {c: W.sample_world(n, seed, (shape,), (c,))[0] for c in ("blue", "red")}
    if which == ASYRP_COMPOSE:
        g = torch.Generator().manual_seed(seed + 1)
        for name, (lo, hi) in ASYRP_SIZES.items():
            imgs = []
            for _ in range(n):
                c = 17.0 + 30.0 * torch.rand(2, generator=g)
                size = lo + (hi - lo) * float(torch.rand(1, generator=g))
                imgs.append(W.render(shape, "red", float(c[0]), float(c[1]), size)[0])
            sets[name] = torch.stack(imgs)
    return sets


def asyrp_prompt(server, which: str, input_image: str, example_tiffs: dict) -> tuple[dict, dict]:
    """The shipped Asyrp demo workflow (DPM Encode, then Asyrp Edit with the shipped CLIP-trained direction)
    for the network ``which`` of ASYRP, plus one branch per ASYRP_BRANCHES entry: the direction made by Asyrp
    Direction From Examples from ``example_tiffs`` (blue / red scenes), the Gaussian controls, and (on
    ASYRP_COMPOSE) the colour direction combined with a size direction. The workflow is made for the pixel
    DDPM's U-Net; the flow row runs it with model B's checkpoint in place of the DDPM loader and its resize.
    Saves dpm_asyrp/<which>_<branch>. Returns (prompt, saves)."""
    a = ASYRP[which]
    g, _ = shipped(server, ASYRP_WORKFLOW, {
        "LoadImage": {"image": input_image}, "DPMEncode": {"steps": ASYRP_STEPS, "scheduler": a["scheduler"]},
        "LoadAsyrpDirection": {"direction_file": a["direction"]},
        "AsyrpEdit": {"strength": strength_list(ASYRP_BRANCHES["trained"])},
        "SaveImage": {"filename_prefix": f"dpm_asyrp/{which}_trained"}})
    edit = node_inputs(g.nodes, "AsyrpEdit")
    loader = edit["model"][0]
    scale = find_node(g.nodes, "ImageScale")
    resize = dict(g.nodes[scale]["inputs"])
    if a["loader"] == "diffusers":
        g.nodes[loader]["inputs"]["model_name"] = a["model"]
    else:
        use_checkpoint(g.nodes, loader, a["model"], scale)
        resize = None
    vae = node_inputs(g.nodes, "VAEDecode")["vae"]

    def latents(tiff):
        img = g.node("LoadImage", image=tiff).out(0)
        if resize is not None:
            img = g.node("ImageScale", **dict(resize, image=img)).out(0)
        return g.node("VAEEncode", pixels=img, vae=vae).out(0)

    def branch(name, direction, values):
        ed = g.node("AsyrpEdit", **dict(edit, direction=direction, strength=strength_list(values)))
        dec = g.node("VAEDecode", samples=ed.out(0), vae=vae)
        g.node("SaveImage", images=dec.out(0), filename_prefix=f"dpm_asyrp/{which}_{name}")

    def from_examples(with_, without, settings):
        return g.node("AsyrpDirectionFromExamples", model=edit["model"], latents_with=latents(example_tiffs[with_]),
                      latents_without=latents(example_tiffs[without]), steps=ASYRP_STEPS,
                      conditioning=edit["positive"], **settings).out(0)

    colour = from_examples("blue", "red", a["examples"])
    branch("examples", colour, a["example_strengths"])
    for control in ASYRP_CONTROLS:
        branch(control, g.node("LoadAsyrpDirection", direction_file=control_file(a["direction"], control)).out(0),
               ASYRP_BRANCHES[control])
    if which == ASYRP_COMPOSE:
        size = from_examples("large", "small", a["size_examples"])
        branch("size", size, [1.0])
        both = g.node("CombineAsyrpDirections", direction_1=colour, coefficient_1=1.0, direction_2=size,
                      coefficient_2=1.0)
        branch("compose", both.out(0), [1.0])
    return g.prompt(), save_nodes(g.prompt())


def use_checkpoint(prompt: dict, loader: str, ckpt_name: str, resize: str) -> None:
    """In place: the Load Diffusers DDPM node ``loader`` becomes Load Checkpoint ``ckpt_name`` (its VAE is
    output 2, the DDPM loader's output 1), and the node ``resize`` (to the DDPM's size) is left out."""
    prompt[loader] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}}
    source = prompt.pop(resize)["inputs"]["image"]
    for node in prompt.values():
        for k, v in node["inputs"].items():
            if v == [loader, 1]:
                node["inputs"][k] = [loader, 2]
            elif v == [resize, 0]:
                node["inputs"][k] = source


def install_asyrp_directions(input_dir: Path) -> None:
    """The demo's trained directions (and their Gaussian controls) into ComfyUI's input folder."""
    import shutil

    src = MODELS / "asyrp"
    if not src.is_dir():
        raise SystemExit(f"{src} is missing: run `python demo/train.py --parts asyrp`")
    input_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.asyrp.safetensors")):
        dst = input_dir / f.name
        if not dst.exists() or dst.read_bytes() != f.read_bytes():
            shutil.copyfile(f, dst)


def colour_shift(pred, base, source: str, target: str) -> list:
    """Per image, the move of the mean foreground colour along source -> target palette colour, in units of
    that distance (0: unchanged, 1: a full source-to-target move), against the same image's plain replay."""
    import numpy as np

    W = world()
    axis = np.array(W.PALETTE[target]) - np.array(W.PALETTE[source])
    out = [float((np.array(p["rgb"]) - np.array(b["rgb"])) @ axis / (axis @ axis))
           for p, b in zip(pred, base) if "rgb" in p and "rgb" in b]
    return [x for x in out if math.isfinite(x)]   # an image whose reader found no solid colour has none


def outside_change(out, src, attrs, margin: float = 3.0) -> list:
    """Per image, the mean absolute change (0-1 pixel values, averaged over channels) outside the source
    shape's box grown by ``margin`` px: what an edit of the shape's colour should leave alone."""
    import torch

    vals = []
    size = out.shape[-1]
    for k, t in enumerate(attrs):
        keep = torch.ones(size, size, dtype=torch.bool)
        r = t["size"] + margin
        x0, x1 = max(0, math.floor(t["box_cx"] - r)), min(size, math.ceil(t["box_cx"] + r))
        y0, y1 = max(0, math.floor(t["box_cy"] - r)), min(size, math.ceil(t["box_cy"] + r))
        keep[y0:y1, x0:x1] = False
        vals.append(float((out[k] - src[k]).abs().mean(0)[keep].mean()))
    return vals


def measure_asyrp(server, n: int = 24, seed: int = 0) -> tuple[dict, dict]:
    """Asyrp edits 'red -> blue' of ``n`` held-out RED shapes (encoded with DPM Encode) on the pixel DDPM's U-Net
    and on the flow model's MMDiT: the shipped CLIP-trained direction (strength 0 = the plain replay, 1), the
    direction from examples at its network's example_strengths, Gaussian controls (the trained norm; 0.2 ||h||)
    and, on ASYRP_COMPOSE, the colour direction combined with a small -> large one (composition). "Outside" is
    measured against the input image, so it includes the VAE's and the resize's own error (the replay row)."""
    import numpy as np

    W = world()
    install_asyrp_directions(Path(server.input_dir))
    out_m: dict = {"n_images": n, "steps": ASYRP_STEPS, "source": "red",
                   "target": "blue", "examples": dict(ASYRP_EXAMPLES)}
    images = {}
    for which, a in ASYRP.items():
        imgs, attrs = W.sample_world(n, seed + 4000, (a["shape"],), ("red",))
        tiff = f"dpm_world_asyrp_{which}_batch.tiff"
        save_batch(Path(server.input_dir) / tiff, to_frames(imgs))
        example_tiffs = {}
        for name, ex in asyrp_example_images(which).items():
            example_tiffs[name] = f"dpm_world_asyrp_{which}_examples_{name}.tiff"
            save_batch(Path(server.input_dir) / example_tiffs[name], to_frames(ex))
        prompt, saves = asyrp_prompt(server, which, tiff, example_tiffs)
        entry, dt = run_prompt(server, prompt)
        branches = asyrp_branches(which)
        outs, rows = {}, {}
        images[f"asyrp_{which}_input"] = imgs
        for key, values in branches.items():
            out = to_world_size(read_outputs(server, entry, saves[f"dpm_asyrp/{which}_{key}"]))
            for k, v in enumerate(values):
                outs[(key, v)] = out[k * n:(k + 1) * n]
                images[f"asyrp_{which}_{key}_{v:g}"] = outs[(key, v)]
                rows[(key, v)] = W.read_attributes(outs[(key, v)])
        base = rows[("trained", 0.0)]

        def row(key, v):
            pred, truth = rows[(key, v)], attrs
            blue = sum(p["colour"] == "blue" for p in pred)
            kept = sum(p["shape"] == a["shape"] for p in pred)
            errs = [math.hypot(p["cx"] - t["cx"], p["cy"] - t["cy"]) for p, t in zip(pred, truth) if located(p)]
            grow = [p["size"] / t["size"] for p, t in zip(pred, truth) if located(p) and p.get("size")]
            shift = colour_shift(pred, base, "red", "blue")
            outside = outside_change(outs[(key, v)], imgs, attrs)
            return {"branch": key, "strength": v, "n": n, "n_located": len(errs), "n_coloured": len(shift),
                    "target_rate": blue / n, "target_rate_ci95": wilson(blue, n),
                    "shape_kept": kept / n, "shape_kept_ci95": wilson(kept, n),
                    "centroid_error_px": float(np.mean(errs)) if errs else float("nan"),
                    "centroid_error_px_ci95": bootstrap_mean(errs, seed=seed),
                    "outside_change": float(np.mean(outside)), "outside_change_ci95": bootstrap_mean(outside, seed=seed),
                    "colour_shift": float(np.mean(shift)) if shift else float("nan"),
                    "colour_shift_ci95": bootstrap_mean(shift, seed=seed),
                    "size_ratio": float(np.mean(grow)) if grow else float("nan"),
                    "size_ratio_ci95": bootstrap_mean(grow, seed=seed)}

        m = {"title": a["title"], "seconds": dt, "examples": a["examples"], "branches": branches, "rows": {}}
        for key, values in branches.items():
            for v in values:
                m["rows"][f"{key} {v:g}"] = row(key, v)
        out_m[which] = m
    return out_m, images


ASYRP_LABELS = {"trained 0": "strength 0: the plain replay (baseline)", "trained 1": "CLIP-trained, 1",
                "examples 0.5": "from examples, 0.5", "examples 1": "from examples, 1",
                "examples 1.5": "from examples, 1.5", "examples 2": "from examples, 2", "examples 3": "from examples, 3",
                "size 1": "small -> large from examples, 1", "compose 1": "red -> blue + small -> large, 1 + 1",
                **{f"{control} 1": label for control, label in ASYRP_CONTROLS.items()}}


def asyrp_markdown(a) -> list[str]:
    if not a:
        return []

    def ci(x, k, fmt="{:.2f}"):
        lo, hi = x[k + "_ci95"]
        return f"{fmt.format(x[k])} [{fmt.format(lo)}, {fmt.format(hi)}]"

    lines = [f"| Asyrp 'red -> blue' of red shapes (n = {a['n_images']} held out; 95 % CI) | blue rate | shape kept "
             "| centroid error (px) | change outside the box | colour shift | size ratio |",
             "|---|---|---|---|---|---|---|"]
    for which in ASYRP:
        m = a[which]
        lines.append(f"| **{m['title']}** | | | | | | |")
        for name, r in m["rows"].items():
            miss = "" if r["n_located"] == r["n"] else f" (n = {r['n_located']} with a shape)"
            lines.append(f"| {ASYRP_LABELS.get(name, name)} | {ci(r, 'target_rate')} | {ci(r, 'shape_kept')} | "
                         f"{ci(r, 'centroid_error_px', '{:.1f}')}{miss} | {ci(r, 'outside_change', '{:.3f}')} | "
                         f"{ci(r, 'colour_shift')} | {ci(r, 'size_ratio')} |")
    return lines


# ----------------------------------------------------------------------------- best of N
BEST_OF_N = {"seeds": "0-2", "denoise": "0.6, 0.7, 0.8", "cfg": "1", "chain_steps": 28, "n_images": 16}
DEFAULT_CANDIDATE = (0, 0.7)  # the single default-setting run: seed 0, denoise 0.7 (28 x 0.7 = the demo's 20 steps)


def measure_best_of_n(server, circles, n_images: int = BEST_OF_N["n_images"]) -> dict:
    """Translation circles -> squares: N candidates per image (seeds x denoise) ranked by directional CLIP
    ('a circle' -> 'a square') with the demo CLIP, through the shipped best-of-N workflow; the selected
    candidate against the default-setting candidate (seed 0, denoise 0.7) of the same sweep."""
    import numpy as np

    _tiff, imgs, attrs = circles
    imgs, attrs = imgs[:n_images], attrs[:n_images]
    name = "dpm_world_circles_best_of_n.tiff"
    save_batch(Path(server.input_dir) / name, to_frames(imgs))
    c = BEST_OF_N
    g, _ = shipped(server, BEST_OF_N_WORKFLOW, {  # the shipped workflow, with this run's values
        "LoadImage": {"image": name},
        "DPMSweep": {"seeds": c["seeds"], "denoise_values": c["denoise"], "cfg_values": c["cfg"],
                     "chain_steps": c["chain_steps"]},
        "RankByCLIP": {"source_text": "a circle", "target_text": "a square", "rank_within": "each batch index"}})
    rank = find_node(g.nodes, "RankByCLIP")
    # also save every candidate, for the default-setting run
    every = g.node("SaveImage", images=g.nodes[rank]["inputs"]["images"], filename_prefix="dpm_demo/best_of_n_all").id
    entry, dt = run_prompt(server, g.prompt())
    allc = read_outputs(server, entry, every)  # candidate-major: candidate j, image b at j * n + b
    info = entry["outputs"][rank]["dpm_rank"][0]
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
        errs = [math.hypot(p["cx"] - a["cx"], p["cy"] - a["cy"]) for p, a in zip(pred, attrs) if located(p)]
        out[key] = {"square_rate": sq / n, "square_rate_ci95": wilson(sq, n),
                    "colour_kept": col / n, "colour_kept_ci95": wilson(col, n),
                    "centroid_error_px": float(np.mean(errs)) if errs else float("nan"),
                    "centroid_error_px_ci95": bootstrap_mean(errs), "located": len(errs),
                    "mean_directional_clip": float(np.mean([info["scores"][i] for i in idx]))}
    return out


def grid(images: dict, rows: int = 8):
    """Columns: input | VAE round trip | replay A | replay B | SDEdit B || masked replay B | masked KSampler B
    || unguided | CLIP-guided || square | CLIP-edit || Asyrp per network (DDPM U-Net, flow MMDiT): red input, plain
    replay, CLIP-trained at 1, from examples at 1 and at its grid_strength, Gaussian control (flow: + large, the
    composition)."""
    import numpy as np
    from PIL import Image, ImageDraw

    cols = [("input", "input_circles"), ("VAE", "vae_roundtrip"), ("replay A", "reconstruction"),
            ("replay B", "translation"), ("SDEdit B", "sdedit_baseline"), None,
            ("mask B", "masked_translation"), ("inpaint B", "masked_inpaint_baseline"), None,
            ("unguided", "generation_unguided"), (f"CLIP {TARGET_COLOUR}", "generation_guided"), None,
            ("input", "input_squares"), (f"CLIP {EDIT_COLOUR}", "clip_edit")]
    for which, label in (("ddpm", "U-Net"), ("flow", "MMDiT")):  # Asyrp: input, replay, each direction at 1
        cols.append(None)
        top = ASYRP[which]["grid_strength"]
        cols += [(f"{label} red", f"asyrp_{which}_input"), ("replay", f"asyrp_{which}_trained_0"),
                 ("CLIP-trained", f"asyrp_{which}_trained_1"), ("examples", f"asyrp_{which}_examples_1"),
                 (f"examples x{top:g}", f"asyrp_{which}_examples_{top:g}"),
                 ("Gaussian", f"asyrp_{which}_gauss_norm_1")]
        if which == ASYRP_COMPOSE:
            cols.append(("+ large", f"asyrp_{which}_compose_1"))
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
        if key not in images:
            continue
        draw.text((x + 2, 2), label, fill=(0, 0, 0))
        batch = images[key]
        for r in range(min(rows, batch.shape[0])):
            arr = (batch[r].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            canvas.paste(Image.fromarray(arr), (x, head + r * cell))
        x += cell
    return canvas.resize((canvas.width * 2, canvas.height * 2), Image.NEAREST)


def _r(row: dict, key: str) -> str:
    """A rate with its 95 % interval when the row has one ('0.69 [0.44, 0.86]')."""
    iv = row.get(f"{key}_interval")
    return f"{row[key]:.2f}" if iv is None else f"{row[key]:.2f} [{iv[0]:.2f}, {iv[1]:.2f}]"


def metrics_markdown(m: dict) -> str:
    t, s = m["translation"], m["sdedit_baseline"]
    g, e = m["clip_generation"], m["clip_editing"]
    lines = [
        "| measure (n; rates with their Wilson 95 % interval) | DPM Latent | baseline |",
        "|---|---|---|",
        f"| reconstruction PSNR vs the VAE round trip (worst of n = {m['n_images']}) | {m['reconstruction_psnr_vs_vae_roundtrip_db']:.1f} dB | – |",
        f"| translation A->B: square rate (n = {m['n_images']}) | {_r(t, 'square_rate')} | SDEdit {_r(s, 'square_rate')} |",
        f"| translation A->B: colour kept (n = {m['n_images']}) | {_r(t, 'colour_kept')} | SDEdit {_r(s, 'colour_kept')} |",
        f"| translation A->B: centroid error | {t['centroid_error_px']:.1f} px | SDEdit {s['centroid_error_px']:.1f} px |",
        f"| CLIP-guided generation: '{g['target']}' colour rate (n = {g['batch']}) | {_r(g, 'clip_guided')} | unguided {_r(g, 'unguided')} |",
        f"| CLIP-guided editing: '{e['target']}' colour rate (n = {e.get('n', '?')}) | {_r(e, 'target_colour_after')} | before {_r(e, 'target_colour_before')} |",
        f"| CLIP-guided editing: square kept / centroid error | {_r(e, 'square_kept')} / {e['centroid_error_px']:.1f} px | – |",
    ]
    if "masked_translation" in m:
        k = m["masked_translation"]
        d, b = k["dpm"], k["inpaint_baseline"]
        lines += [
            f"| masked translation A->B (mask = shape box + {k['mask_margin_px']} px, {100 * k['mask_area_fraction']:.0f} % of the image): "
            f"PSNR outside the mask vs the VAE round trip (worst / median of n = {k['n']}) | "
            f"{d['outside_psnr_db_min']:.1f} / {d['outside_psnr_db_median']:.1f} dB | "
            f"ComfyUI inpainting {b['outside_psnr_db_min']:.1f} / {b['outside_psnr_db_median']:.1f} dB |",
            f"| masked translation A->B: square rate (n = {k['n']}; unmasked {t['square_rate']:.2f}) | "
            f"{fmt_rate(d['square_rate'])} | ComfyUI inpainting {fmt_rate(b['square_rate'])} |",
            f"| masked translation A->B: colour kept / centroid error | {fmt_rate(d['colour_kept'])} / "
            f"{d['centroid_error_px']:.1f} px | ComfyUI inpainting {fmt_rate(b['colour_kept'])} / "
            f"{b['centroid_error_px']:.1f} px |",
        ]
    if "pixel_ddpm" in m:
        lines += pixel_ddpm_markdown(m["pixel_ddpm"])
    lines += best_of_n_markdown(m.get("best_of_n"))
    lines += video_markdown(m.get("video"))
    asyrp = asyrp_markdown(m.get("asyrp"))
    if asyrp:
        lines += [""] + asyrp
    return "\n".join(lines)


def video_markdown(v) -> list[str]:
    """Rows of the video translation (circles -> squares on clips): replay vs ComfyUI's video SDEdit vs per-frame SDEdit."""
    if not v:
        return []
    r, vs, fs = v["replay"], v["video_sdedit"], v["frame_sdedit"]

    def rate(x, k):
        return f"{x[k]:.2f} [{x[k + '_ci95'][0]:.2f}, {x[k + '_ci95'][1]:.2f}]"

    def px(x, k, unit=" px"):
        return f"{x[k]:.2f}{unit} [{x[k + '_ci95'][0]:.2f}, {x[k + '_ci95'][1]:.2f}]"

    n, f = v["n_clips"], v["frames"]
    return [
        "",
        f"| video translation A->B ({n} clips of {f} frames; per-frame rates: Wilson over the {n * f} frames; "
        "per-clip measures: bootstrap over clips) | DPM Latent (encode the clip with video A, replay with video B) "
        "| ComfyUI video SDEdit (KSampler, video B, same denoise) | per-frame SDEdit (KSampler, image B, each frame) |",
        "|---|---|---|---|",
        f"| per-frame square rate | {rate(r, 'frame_shape_rate')} | {rate(vs, 'frame_shape_rate')} | {rate(fs, 'frame_shape_rate')} |",
        f"| clips square on every frame (n = {n}) | {rate(r, 'clip_shape_rate')} | {rate(vs, 'clip_shape_rate')} | {rate(fs, 'clip_shape_rate')} |",
        f"| per-frame colour kept | {rate(r, 'frame_colour_kept')} | {rate(vs, 'frame_colour_kept')} | {rate(fs, 'frame_colour_kept')} |",
        f"| trajectory error (mean per-frame centroid error) | {px(r, 'trajectory_error_px')} | {px(vs, 'trajectory_error_px')} | {px(fs, 'trajectory_error_px')} |",
        f"| flicker: consecutive frames whose shape or colour differs | {px(r, 'flicker', '')} | {px(vs, 'flicker', '')} | {px(fs, 'flicker', '')} |",
        f"| flicker: frame-to-frame change of fill ratio / of colour (RGB) | {r['fill_change']:.3f} / {r['rgb_change']:.3f} "
        f"| {vs['fill_change']:.3f} / {vs['rgb_change']:.3f} | {fs['fill_change']:.3f} / {fs['rgb_change']:.3f} |",
        f"| reconstruction (replay with video A): relative error of the latent | {v['reconstruction_relative_error']:.1e} | – | – |",
    ]


def video_grid(images: dict, clips: int = 4):
    """Rows: for each of ``clips`` clips, input / replay B / video SDEdit B / per-frame SDEdit B; columns: frames."""
    import numpy as np
    from PIL import Image, ImageDraw

    rows = [("input", "video_input"), ("replay B", "video_replay"), ("video SDEdit", "video_video_sdedit"),
            ("frame SDEdit", "video_frame_sdedit")]
    rows = [r for r in rows if r[1] in images]
    if not rows:
        return None
    t = images[rows[0][1]].shape[1]
    cell, gap, label_w = 64, 8, 84
    k = min(clips, images[rows[0][1]].shape[0])
    canvas = Image.new("RGB", (label_w + t * cell, k * (len(rows) * cell + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for c in range(k):
        for label, key in rows:
            draw.text((2, y + 2), label, fill=(0, 0, 0))
            for f in range(t):
                arr = (images[key][c, f].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
                canvas.paste(Image.fromarray(arr), (label_w + f * cell, y))
            y += cell
        y += gap
    return canvas.resize((canvas.width * 2, canvas.height * 2), Image.NEAREST)


def pixel_ddpm_markdown(p: dict) -> list:
    t, s = p["translation"], p["sdedit_baseline"]

    def ci(x):
        return f"[{x[0]:.2f}, {x[1]:.2f}]"

    rec = p["reconstruction_psnr_vs_input_db"]
    worst = f"{rec['worst']:.1f} dB" if math.isfinite(rec["worst"]) else "inf (identical 8-bit images)"
    return [
        f"| pixel DDPMs (diffusers, {p['image_size']}²; n = {p['n_images']}): reconstruction vs input, worst PSNR / "
        f"max error | {worst} / {rec['max_abs_error_255']:.0f}/255 | – |",
        f"| pixel DDPMs A->B: square rate (95 % CI) | {t['square_rate']:.2f} {ci(t['square_rate_ci95'])} "
        f"| SDEdit {s['square_rate']:.2f} {ci(s['square_rate_ci95'])} |",
        f"| pixel DDPMs A->B: colour kept (95 % CI) | {t['colour_kept']:.2f} {ci(t['colour_kept_ci95'])} "
        f"| SDEdit {s['colour_kept']:.2f} {ci(s['colour_kept_ci95'])} |",
        f"| pixel DDPMs A->B: centroid error (95 % CI) | {t['centroid_error_px']:.1f} px {ci(t['centroid_error_px_ci95'])} "
        f"| SDEdit {s['centroid_error_px']:.1f} px {ci(s['centroid_error_px_ci95'])} |",
    ]


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
    args = ap.parse_args(argv)

    from dpmtools.comfy_env import comfy_dir as find_comfy_dir
    from dpmtools.server import ComfyServer

    comfy_dir = find_comfy_dir()  # DPM_LATENT_COMFYUI, set by scripts/comfy_host.py
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "server"
    work.mkdir(exist_ok=True)
    server = ComfyServer(comfy_dir, work, python=sys.executable,
                         model_dirs={"checkpoints": MODELS / "checkpoints", "clip_energy": MODELS / "clip_energy",
                                     "diffusers": MODELS / "diffusers", "diffusion_models": MODELS / "video"},
                         pack_name="dpm-latent-demo")
    print(f"starting ComfyUI from {comfy_dir} ...", flush=True)
    # The server's start (its own process importing ComfyUI) and the install (this process importing ComfyUI to
    # encode the sample clip, drawing the sample inputs) are independent: the server reads the models from
    # model_dirs and its inputs from its own work folder. Each is mostly one core, so they overlap.
    with ThreadPoolExecutor(max_workers=1) as pool:
        installed = pool.submit(install_demo_models, comfy_dir)
        server.start()
        try:
            installed.result()  # a missing model stops the job here
        except BaseException:
            server.stop()
            raise
    try:
        t = time.perf_counter()
        metrics, images = measure(server, n=args.n)
        metrics["total_seconds"] = time.perf_counter() - t
    finally:
        server.stop()
    grid(images).save(out / "demo_grid.png")
    vg = video_grid(images)
    if vg is not None:
        vg.save(out / "demo_video.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    table = metrics_markdown(metrics)
    (out / "metrics.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"\nwrote {out / 'demo_grid.png'}, {out / 'metrics.json'}, {out / 'metrics.md'}")
    print("\nTry it by hand: `python3 scripts/comfy_host.py serve`, open http://127.0.0.1:8188/ and drag "
          "workflows/demo_translate.json (or demo_clip_generation.json, demo_clip_editing.json) into the page; "
          "the demo models and dpm_world_*.png inputs are installed in that ComfyUI.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
