# SPDX-License-Identifier: GPL-3.0-or-later
"""Writes workflows/asyrp_sd15.json and workflows/asyrp_sdxl.json (UI format) from API graphs.

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
    return paths


if __name__ == "__main__":
    import os
    import tempfile

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
