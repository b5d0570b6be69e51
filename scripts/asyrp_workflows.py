# SPDX-License-Identifier: GPL-3.0-or-later
"""Writes workflows/asyrp_sd15.json, asyrp_sdxl.json, asyrp_interval_sd15.json and asyrp_load_sd15.json
(UI format) from API graphs.

    python3 scripts/asyrp_workflows.py      (starts a host ComfyUI with the tiny test models for object_info)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
WORKFLOWS = REPO / "workflows"

NOTE = (
    "Asyrp h-space editing ({family})\n\n"
    "1. Asyrp Train Direction learns an edit of the U-Net's bottleneck h from two texts on a batch of images "
    "(VAE Encode of Load Image here; batch more images with Image Batch, the paper uses ~100). It inverts them "
    "with deterministic DDIM and, at each step of [T, t_edit], scores one asymmetric step (h + delta_h only in "
    "the predicted x0) with directional CLIP + L1. CLIP models are folders in models/clip_energy/.\n"
    "2. DPM Encode turns the image to edit into a latent code (exact replay).\n"
    "3. Asyrp Edit replays the code with h + strength * delta_h inside [T, t_edit]. strength 0 = the image "
    "back exactly; negative reverses; '-1, 0, 1, 2' gives one image per value. t_boost > 0 adds the paper's "
    "quality boosting (fresh noise below it: the unedited parts are then no longer exact).\n"
    "Asyrp Edit (DDIM Inversion) is the paper's own route: deterministic DDIM inversion, not exact; it shows "
    "how far its plain reconstruction lands from the input.\n"
    "Save Asyrp Direction keeps the direction (copy it to the input folder to load it).")


def graph(ckpt: str, family: str):
    from graphs import Graph

    g = Graph()
    m = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    img = g.node("LoadImage", image="example.png")
    lat = g.node("VAEEncode", pixels=img.out(0), vae=m.out(2))
    empty = g.node("EmptyConditioning", model=m.out(0), tokens=77)
    train = g.node("AsyrpTrainDirection", model=m.out(0), vae=m.out(2), latents=lat.out(0),
                   clip_name="clip-vit-base-patch32", source_text="a photo of a person",
                   target_text="a photo of a smiling person", steps=40, t_edit=0.5, iterations=5,
                   learning_rate=0.5, clip_weight=1.0, l1_weight=3.0, seed=0, kind="implicit function")
    g.node("PreviewImage", images=train.out(1))
    g.node("SaveAsyrpDirection", direction=train.out(0), filename_prefix="dpm_latent/asyrp")
    enc = g.node("DPMEncode", model=m.out(0), positive=empty.out(0), negative=empty.out(0), latent_image=lat.out(0),
                 seed=0, steps=40, scheduler="normal", denoise=1.0, eta=0.1, cfg=1.0)
    edit = g.node("AsyrpEdit", model=m.out(0), positive=empty.out(0), negative=empty.out(0), cfg=1.0,
                  latent_code=enc.out(0), direction=train.out(0), strength="1.0", t_edit=-1.0, t_boost=0.0, seed=0)
    dec = g.node("VAEDecode", samples=edit.out(0), vae=m.out(2))
    g.node("SaveImage", images=dec.out(0), filename_prefix="dpm_latent/asyrp_edit")
    ddim = g.node("AsyrpEditDDIM", model=m.out(0), positive=empty.out(0), negative=empty.out(0), cfg=1.0,
                  latent_image=lat.out(0), direction=train.out(0), strength="1.0", steps=40, t_edit=-1.0,
                  t_boost=0.0, seed=0)
    g.node("SaveImage", images=g.node("VAEDecode", samples=ddim.out(0), vae=m.out(2)).out(0),
           filename_prefix="dpm_latent/asyrp_edit_ddim")
    titles = {train.id: "Asyrp Train Direction (loss plot below)", edit.id: "Asyrp Edit (exact code)",
              ddim.id: "Asyrp Edit (DDIM inversion, the paper's route)"}
    # the workflow test runs random tiny models: settings under which a few iterations visibly edit
    test = {"widgets": {train.id: {"learning_rate": 20.0, "l1_weight": 0.3, "iterations": 2,
                                   "kind": "global direction"},
                        edit.id: {"strength": "3"}}}
    return g, titles, test, NOTE.format(family=family)


INTERVAL_NOTE = (
    "Asyrp: editing interval by measure, multi-attribute editing (SD1.5)\n\n"
    "1. Asyrp Editing Interval measures the paper's two curves on the images (VAE Encode of Load Image; batch "
    "more with Image Batch, the paper averages 100): distance(x0, P_t) along the DDIM chain from their DDIM "
    "inversion, and distance(x0, x_t) of the noised image. t_edit is where the first reaches 0.33 x cos(source, "
    "target), t_boost where the second reaches 1.2 (LPIPS, when the lpips package and its AlexNet weights are on "
    "disk). Without LPIPS it uses 1 - cos of CLIP image embeddings and says so in its text, with the thresholds "
    "recalibrated as fractions of each curve's value at T (clip_edit_fraction, clip_boost_fraction). "
    "Its t_edit feeds both trainings and the edit; its t_boost the edit.\n"
    "2. Two Asyrp Train Direction nodes learn two attributes; Combine Asyrp Directions adds them with "
    "coefficients (h-space is linear enough that edits add); Save Asyrp Direction writes the sum.\n"
    "3. DPM Encode + Asyrp Edit apply the combined direction to the image.\n"
    "CLIP models are folders in models/clip_energy/.")

LOAD_NOTE = (
    "Asyrp: apply a saved direction (SD1.5)\n\n"
    "Load Asyrp Direction reads a .asyrp.safetensors file from ComfyUI's input folder (copy one there) or one "
    "that Save Asyrp Direction wrote to the output folder (listed with ' [output]'). It checks the file's digest "
    "and every field and never unpickles; a direction trained on another model family is a clear error.\n"
    "Asyrp Edit replays a DPM Encode code with h + strength * delta_h inside [T, t_edit] (-1: the direction's "
    "own t_edit); negative reverses it, and a list such as '-1, 1' gives both edits side by side. "
    "Asyrp Edit (DDIM Inversion) is the paper's own route (not exact; it reports how far its plain reconstruction lands).")

DIRECTION_FILE = "asyrp_example.asyrp.safetensors"


def graph_interval(ckpt: str = "v1-5-pruned-emaonly.safetensors"):
    from graphs import Graph

    g = Graph()
    m = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    img = g.node("LoadImage", image="example.png")
    lat = g.node("VAEEncode", pixels=img.out(0), vae=m.out(2))
    empty = g.node("EmptyConditioning", model=m.out(0), tokens=77)
    interval = g.node("AsyrpInterval", model=m.out(0), vae=m.out(2), latents=lat.out(0),
                      clip_name="clip-vit-base-patch32", source_text="a photo of a person",
                      target_text="a photo of a smiling person", steps=40, distance="auto", edit_threshold=0.33,
                      boost_threshold=1.2, clip_edit_fraction=0.25, clip_boost_fraction=0.9)
    g.node("PreviewImage", images=interval.out(2))
    trains = []
    for target in ("a photo of a smiling person", "a photo of a person with glasses"):
        trains.append(g.node("AsyrpTrainDirection", model=m.out(0), vae=m.out(2), latents=lat.out(0),
                             clip_name="clip-vit-base-patch32", source_text="a photo of a person",
                             target_text=target, steps=40, t_edit=interval.out(0), iterations=5,
                             learning_rate=0.5, clip_weight=1.0, l1_weight=3.0, seed=0, kind="implicit function"))
        g.node("PreviewImage", images=trains[-1].out(1))
    combined = g.node("CombineAsyrpDirections", direction_1=trains[0].out(0), coefficient_1=1.0,
                      direction_2=trains[1].out(0), coefficient_2=0.7)
    g.node("SaveAsyrpDirection", direction=combined.out(0), filename_prefix="dpm_latent/asyrp_combined")
    enc = g.node("DPMEncode", model=m.out(0), positive=empty.out(0), negative=empty.out(0), latent_image=lat.out(0),
                 seed=0, steps=40, scheduler="normal", denoise=1.0, eta=0.1, cfg=1.0)
    edit = g.node("AsyrpEdit", model=m.out(0), positive=empty.out(0), negative=empty.out(0), cfg=1.0,
                  latent_code=enc.out(0), direction=combined.out(0), strength="1.0", t_edit=interval.out(0),
                  t_boost=interval.out(1), seed=0)
    dec = g.node("VAEDecode", samples=edit.out(0), vae=m.out(2))
    g.node("SaveImage", images=dec.out(0), filename_prefix="dpm_latent/asyrp_combined_edit")
    titles = {interval.id: "Asyrp Editing Interval (t_edit, t_boost, plot)", trains[0].id: "Train: smiling",
              trains[1].id: "Train: glasses", combined.id: "Combine: smiling + 0.7 glasses",
              edit.id: "Asyrp Edit (combined direction, measured interval)"}
    # the workflow test runs random tiny models: settings under which a few iterations visibly edit
    fast = {"learning_rate": 20.0, "l1_weight": 0.3, "iterations": 2, "kind": "global direction"}
    test = {"widgets": {trains[0].id: fast, trains[1].id: dict(fast, seed=1), edit.id: {"strength": "3"}}}
    return g, titles, test, INTERVAL_NOTE


def graph_load(ckpt: str = "v1-5-pruned-emaonly.safetensors"):
    from graphs import Graph

    g = Graph()
    m = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    img = g.node("LoadImage", image="example.png")
    lat = g.node("VAEEncode", pixels=img.out(0), vae=m.out(2))
    empty = g.node("EmptyConditioning", model=m.out(0), tokens=77)
    load = g.node("LoadAsyrpDirection", direction_file=DIRECTION_FILE)
    enc = g.node("DPMEncode", model=m.out(0), positive=empty.out(0), negative=empty.out(0), latent_image=lat.out(0),
                 seed=0, steps=40, scheduler="normal", denoise=1.0, eta=0.1, cfg=1.0)
    edit = g.node("AsyrpEdit", model=m.out(0), positive=empty.out(0), negative=empty.out(0), cfg=1.0,
                  latent_code=enc.out(0), direction=load.out(0), strength="1.0", t_edit=-1.0, t_boost=0.0, seed=0)
    g.node("SaveImage", images=g.node("VAEDecode", samples=edit.out(0), vae=m.out(2)).out(0),
           filename_prefix="dpm_latent/asyrp_loaded_edit")
    ddim = g.node("AsyrpEditDDIM", model=m.out(0), positive=empty.out(0), negative=empty.out(0), cfg=1.0,
                  latent_image=lat.out(0), direction=load.out(0), strength="1.0", steps=40, t_edit=-1.0,
                  t_boost=0.0, seed=0)
    g.node("SaveImage", images=g.node("VAEDecode", samples=ddim.out(0), vae=m.out(2)).out(0),
           filename_prefix="dpm_latent/asyrp_loaded_edit_ddim")
    titles = {load.id: "Load Asyrp Direction (copy a .asyrp.safetensors into input/)",
              edit.id: "Asyrp Edit (loaded direction)"}
    test = {"widgets": {edit.id: {"strength": "3"}}}
    return g, titles, test, LOAD_NOTE


def write(object_info: dict) -> list[Path]:
    from ui_workflow import api_to_ui

    paths = []
    for name, ckpt, family in (("asyrp_sd15", "v1-5-pruned-emaonly.safetensors", "SD1.5"),
                               ("asyrp_sdxl", "sd_xl_base_1.0.safetensors", "SDXL")):
        g, titles, test, note = graph(ckpt, family)
        wf = api_to_ui(g.prompt(), object_info, note=note, titles=titles, extra={"dpm_latent_test": test})
        path = WORKFLOWS / f"{name}.json"
        path.write_text(json.dumps(wf, indent=1) + "\n")
        paths.append(path)
    for name, build in (("asyrp_interval_sd15", graph_interval), ("asyrp_load_sd15", graph_load)):
        g, titles, test, note = build()
        wf = api_to_ui(g.prompt(), object_info, note=note, titles=titles, extra={"dpm_latent_test": test})
        path = WORKFLOWS / f"{name}.json"
        path.write_text(json.dumps(wf, indent=1) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    import os
    import tempfile

    import conftest  # noqa: F401  (puts ComfyUI on sys.path, as the tiny models need it)
    from comfy_server import ComfyServer

    import tiny_clip
    import tiny_models

    root = Path(tempfile.mkdtemp())
    dirs = {k: root / k for k in ("checkpoints", "clip_energy")}
    for d in dirs.values():
        d.mkdir()
    tiny_models.make_sd15_checkpoint(dirs["checkpoints"] / "tiny_sd15.safetensors")
    tiny_clip.make_tiny_clip_folder(dirs["clip_energy"] / "tiny_clip")
    srv = ComfyServer(Path(os.environ["DPM_LATENT_COMFYUI"]), root / "comfy", python=sys.executable, model_dirs=dirs)
    srv.start()
    try:
        for p in write(srv.object_info()):
            print("wrote", p)
    finally:
        srv.stop()
