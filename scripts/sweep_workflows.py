# SPDX-License-Identifier: GPL-3.0-or-later
"""The best-of-N graphs (DPM Sweep -> DPM Encode -> Replay at every cfg -> Rank Images by CLIP) and
the shipped workflows made from them:

    python3 scripts/comfy_host.py build && <host python> scripts/sweep_workflows.py
        (re)writes workflows/cyclediffusion_best_of_n_demo.json and ..._sd15.json

The demo graph is also what scripts/demo.py's best-of-N row runs.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

DEMO_CKPT_A = "dpm_world_circles.safetensors"
DEMO_CKPT_B = "dpm_world_squares.safetensors"
DEMO_CLIP = "dpm_world_clip"


def graph_best_of_n_demo(input_image="dpm_world_circles.png", seeds="0-3", denoise="0.6, 0.7, 0.8", cfg="1",
                         chain_steps=28, source_text="a yellow circle", target_text="a yellow square", top_k=1,
                         rank_within="all images"):
    """Translation circles -> squares in the demo world, best of seeds x denoise by directional CLIP.
    chain_steps 28 with denoise 0.7 gives the demo's 20 steps."""
    from graphs import Graph, two_checkpoints_and_image

    g = Graph()
    ck_a, ck_b, img, e_a, e_b, lat = two_checkpoints_and_image(g, DEMO_CKPT_A, DEMO_CKPT_B, input_image)
    sw = g.node("DPMSweep", seeds=seeds, denoise_values=denoise, cfg_values=cfg, chain_steps=chain_steps)
    enc = g.node("DPMEncode", model=ck_a.out(0), positive=e_a.out(0), negative=e_a.out(0), latent_image=lat.out(0),
                 seed=sw.out(0), steps=sw.out(2), scheduler="simple", denoise=sw.out(1), eta=0.1, cfg=1.0)
    rep = g.node("ReplayLatentWithPrompt", model=ck_b.out(0), positive=e_b.out(0), negative=e_b.out(0),
                 latent_code=enc.out(0), cfg=1.0, cfg_values=sw.out(3))
    dec = g.node("VAEDecode", samples=rep.out(0), vae=ck_b.out(2))
    rk = g.node("RankByCLIP", images=dec.out(0), clip_name=DEMO_CLIP, target_text=target_text,
                metric="directional CLIP", top_k=top_k, rank_within=rank_within, source_text=source_text,
                source_image=img.out(0),
                labels=sw.out(4))
    best = g.node("SaveImage", images=rk.out(0), filename_prefix="dpm_demo/best_of_n")
    sheet = g.node("SaveImage", images=rk.out(3), filename_prefix="dpm_demo/best_of_n_sheet")
    titles = {ck_a.id: "Model A: circles", ck_b.id: "Model B: squares", sw.id: "DPM Sweep",
              enc.id: "DPM Encode with A", rep.id: "Replay with B at every cfg", rk.id: "Rank by directional CLIP",
              best.id: "Best candidate", sheet.id: "Contact sheet"}
    return g, {"best": best.id, "sheet": sheet.id, "rank": rk.id, "sweep": sw.id}, titles


def graph_best_of_n_sd15():
    """The paper's protocol on SD1.5: 15 seeds x 6 denoise x 6 cfg, 100-step chain, directional CLIP."""
    from graphs import Graph

    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors")
    img = g.node("LoadImage", image="example.png")
    scale = g.node("ImageScaleToTotalPixels", image=img.out(0), upscale_method="lanczos", megapixels=0.26)
    src = g.node("CLIPTextEncode", clip=ck.out(1), text="a photo of a cat sitting on a sofa")
    tgt = g.node("CLIPTextEncode", clip=ck.out(1), text="a photo of a dog sitting on a sofa")
    neg = g.node("CLIPTextEncode", clip=ck.out(1), text="")
    lat = g.node("VAEEncode", pixels=scale.out(0), vae=ck.out(2))
    sw = g.node("DPMSweep", seeds="0-14", denoise_values="0.85, 0.8, 0.75, 0.7, 0.6, 0.5",
                cfg_values="1, 1.5, 2, 3, 4, 5", chain_steps=100)
    enc = g.node("DPMEncode", model=ck.out(0), positive=src.out(0), negative=neg.out(0), latent_image=lat.out(0),
                 seed=sw.out(0), steps=sw.out(2), scheduler="ddim_uniform", denoise=sw.out(1), eta=0.1, cfg=1.0)
    rep = g.node("ReplayLatentWithPrompt", model=ck.out(0), positive=tgt.out(0), negative=neg.out(0),
                 latent_code=enc.out(0), cfg=3.0, cfg_values=sw.out(3))
    dec = g.node("VAEDecode", samples=rep.out(0), vae=ck.out(2))
    rk = g.node("RankByCLIP", images=dec.out(0), clip_name="clip-vit-base-patch32",
                target_text="a photo of a dog sitting on a sofa", metric="directional CLIP", top_k=1,
                rank_within="all images",
                source_text="a photo of a cat sitting on a sofa", source_image=scale.out(0), labels=sw.out(4))
    best = g.node("SaveImage", images=rk.out(0), filename_prefix="dpm_latent/best_of_n_sd15")
    sheet = g.node("PreviewImage", images=rk.out(3))
    titles = {src.id: "Source prompt (what the image shows)", tgt.id: "Target prompt (the edit)",
              neg.id: "Negative prompt (used when cfg > 1)", sw.id: "DPM Sweep (the paper's 540 candidates)",
              rep.id: "Replay at every cfg (one batch per code)", rk.id: "Rank by directional CLIP",
              best.id: "Best candidate", sheet.id: "Contact sheet"}
    return g, {"best": best.id, "sheet": sheet.id, "rank": rk.id, "sweep": sw.id}, titles


NOTE_DEMO = (
    "DPM Latent: best-of-N translation in the demo world (CycleDiffusion's selection)\n\n"
    "DPM Sweep lists the distinct encodes (seeds x denoise): DPM Encode runs once per encode with model A "
    "(circles), Replay with B (squares) replays each code at every cfg value as one batch, and Rank Images by "
    "CLIP keeps the candidate with the highest directional CLIP score: the change from the input image in "
    "CLIP space against the change from 'a yellow circle' to 'a yellow square' in text space (the sample input is a yellow circle). The contact sheet "
    "shows every candidate with its rank, score and label.\n\n"
    "Change: seeds ('0-14'), denoise values, the texts (the input's colour), top_k. This tiny world's models "
    "are unconditional, so cfg stays 1 here.")
NOTE_SD15 = (
    "DPM Latent: CycleDiffusion zero-shot editing, best of N (the paper's protocol)\n\n"
    "The paper's SD results are best-of-540: 15 seeds x 6 denoise (skips 15-50 of 100 steps) x 6 cfg (1-5), "
    "keeping the highest directional CLIP score (ViT-B/32). DPM Sweep emits one seed/denoise/steps item per "
    "distinct encode (90 here) and the cfg list for Replay's cfg_values, so each code is encoded once and "
    "replayed at the 6 cfg values as one batch: 70.6 % of the model evaluations of the naive product "
    "(bench/bench_sweep_evals.py). Still about 76k model evaluations: start with a smaller sweep (e.g. seeds "
    "'0-2', cfg '1, 3, 5').\n\n"
    "Needs a CLIP folder in models/clip_energy/clip-vit-base-patch32 (transformers save_pretrained of "
    "openai/clip-vit-base-patch32). Set the source and target prompts in both the text encoders and Rank Images "
    "by CLIP.")


def write(server_info: dict) -> list[Path]:
    from ui_workflow import api_to_ui

    out = []
    demo_test = {"checkpoints": {DEMO_CKPT_A: "tiny_sd3.safetensors", DEMO_CKPT_B: "tiny_sd3_b.safetensors"},
                 "clip_energy": {DEMO_CLIP: "tiny_clip"}}
    for name, build, note, test in (("demo", graph_best_of_n_demo, NOTE_DEMO, demo_test),
                                    ("sd15", graph_best_of_n_sd15, NOTE_SD15, {})):
        g, ids, titles = build()
        # the workflow test runs one encode and two cfg values on a short chain
        test = dict(test, widgets={ids["sweep"]: {"seeds": "0", "denoise_values": "0.7", "cfg_values": "1, 3",
                                                  "chain_steps": 8}})
        wf = api_to_ui(g.prompt(), server_info, note=note, titles=titles, extra={"dpm_latent_test": test})
        path = REPO / "workflows" / f"cyclediffusion_best_of_n_{name}.json"
        path.write_text(json.dumps(wf, indent=1) + "\n")
        out.append(path)
    return out


def main() -> None:
    import conftest
    from comfy_server import ComfyServer

    with tempfile.TemporaryDirectory() as tmp:
        srv = ComfyServer(conftest.comfy_dir(), Path(tmp), python=sys.executable).start()
        try:
            for p in write(srv.object_info()):
                print("wrote", p)
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
