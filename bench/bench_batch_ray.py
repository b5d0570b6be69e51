# SPDX-License-Identifier: GPL-3.0-or-later
"""Batch-runner throughput: rows/minute with 1 and with 2 Ray actors (each with its own ComfyUI
server) on a local Ray cluster, tiny SD1.5 workflow. The rate is taken between the first and the
last row's manifest commit, so server start-up is not counted. Prints the ratio, never fails.
On CPU the actors share the machine's cores: expect a ratio near min(2, cores / threads per server).

    python3 scripts/comfy_host.py bench batch_ray [--rows 10] [--steps 8]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import REPO, setup


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    setup()
    import numpy as np
    from PIL import Image

    from dpmtools import tiny_clip, tiny_models
    from dpmtools.comfy_env import comfy_dir, load_module
    from dpmtools.graphs import Graph
    from dpmtools.server import TEST_PACK_NAME, ComfyServer
    from dpmtools.workflow import api_to_ui

    br = load_module("dpm_latent_batch_render", REPO / "scripts" / "batch_render.py")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = tmp / "models"
        (models / "checkpoints").mkdir(parents=True)
        tiny_models.make_sd15_checkpoint(models / "checkpoints" / "tiny_sd15.safetensors", seed=0)
        tiny_clip.make_tiny_clip_folder(models / "clip_energy" / "tiny_clip", seed=0)
        g = Graph()
        ck = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
        e = g.node("EmptyConditioning", model=ck.out(0), tokens=4)
        img = g.node("LoadImage", image="x.png")
        lat = g.node("VAEEncode", pixels=img.out(0), vae=ck.out(2))
        enc = g.node("DPMEncode", model=ck.out(0), positive=e.out(0), negative=e.out(0), latent_image=lat.out(0),
                     seed=0, steps=args.steps, scheduler="normal", denoise=0.7, eta=0.1, cfg=1.0)
        rep = g.node("ReplayLatentWithPrompt", model=ck.out(0), positive=e.out(0), negative=e.out(0),
                     latent_code=enc.out(0), cfg=1.0)
        dec = g.node("VAEDecode", samples=rep.out(0), vae=ck.out(2))
        g.node("SaveImage", images=dec.out(0), filename_prefix="bench/out")
        srv = ComfyServer(comfy_dir(), tmp / "info", model_dirs={"checkpoints": models / "checkpoints"},
                          pack_name=TEST_PACK_NAME)
        srv.start()
        try:
            wf = api_to_ui(g.prompt(), srv.object_info(), titles={img.id: "Input image", enc.id: "DPM Encode"})
        finally:
            srv.stop()
        (tmp / "wf.json").write_text(json.dumps(wf))
        rng = np.random.default_rng(0)
        Image.fromarray((rng.random((args.size, args.size, 3)) * 255).astype(np.uint8)).save(tmp / "in.png")
        (tmp / "t.csv").write_text("Input image.image,DPM Encode.seed\n"
                                   + "".join(f"in.png,{k}\n" for k in range(args.rows)))
        rates = {}
        for actors in (1, 2):
            out = tmp / f"out{actors}"
            t = time.perf_counter()
            br.main([str(tmp / "wf.json"), str(tmp / "t.csv"), "--out", str(out), "--ray", "--actors", str(actors),
                     "--ray-cpus", str(max(2, actors)), "--object-store-mb", "100", "--models", str(models)])
            wall = time.perf_counter() - t
            ends = sorted(json.loads(x)["finished"] for x in (out / "manifest.jsonl").read_text().splitlines())
            rates[actors] = 60.0 * (len(ends) - 1) / (ends[-1] - ends[0])
            print(f"{actors} actor(s): {len(ends)} rows, {rates[actors]:.1f} rows/minute after start-up "
                  f"(wall {wall:.1f} s with start-up)", flush=True)
        print(f"ratio 2 actors / 1 actor: {rates[2] / rates[1]:.2f}")


if __name__ == "__main__":
    main()
