# SPDX-License-Identifier: GPL-3.0-or-later
"""Successive halving for best-of-N (DPM Pruned Replay): counted model evaluations and selection quality.

1. The paper's 540-candidate grid (15 seeds x 6 skips x 6 cfg, 100-step chain): model evaluations of
   each halving schedule against the naive product (counted as bench_sweep_evals counts them; survivors
   spread evenly = 'expected', the costliest survivors = 'worst').
2. The demo world (translation circles -> squares, directional CLIP 'a circle' -> 'a square' with the demo
   CLIP, ranked per input image): one full sweep through DPM Pruned Replay with keep 1 at every tenth of
   the chain records every candidate's checkpoint scores; since replay is deterministic, each schedule's
   pick is then exact from those scores. Reported per schedule: evaluations against naive, how often it
   picks the full sweep's candidate, and the world reader's square rate, colour kept, centroid error of
   the picked images with 95 % intervals (Wilson; bootstrap of the mean error), against the full sweep.

    python3 scripts/comfy_host.py bench sweep_halving [--images 32] [--seeds 0-7] [--json PATH]
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import time

from _common import REPO, setup

SCHEDULES = [("0.2", "0.25"), ("0.3", "0.2"), ("0.2, 0.4", "0.25, 0.5"), ("0.2, 0.5", "0.33, 0.33"),
             ("0.1, 0.3", "0.33, 0.33"), ("0.1, 0.2", "0.25, 0.5"), ("0.1", "0.1"), ("0.3, 0.5", "0.25, 0.5")]
RECORD = "0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9"


def wilson(k: int, n: int, z: float = 1.959963984540054) -> list:
    if n == 0:
        return [float("nan")] * 2
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, mid - half), min(1.0, mid + half)]


def bootstrap_mean(values, reps: int = 2000, seed: int = 0) -> list:
    import numpy as np

    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return [float("nan")] * 2
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (reps, v.size))].mean(axis=1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def quality(read, attrs) -> dict:
    import numpy as np

    n = len(read)
    sq = sum(p["shape"] == "square" for p in read)
    col = sum(p["colour"] == a["colour"] for p, a in zip(read, attrs))
    errs = [math.hypot(p["cx"] - a["cx"], p["cy"] - a["cy"]) for p, a in zip(read, attrs)
            if p["shape"] not in (None, "none") and math.isfinite(p["cx"]) and math.isfinite(p["cy"])]
    return {"square_rate": sq / n, "square_rate_ci95": wilson(sq, n), "colour_kept": col / n,
            "colour_kept_ci95": wilson(col, n), "centroid_error_px": float(np.mean(errs)) if errs else float("nan"),
            "centroid_error_px_ci95": bootstrap_mean(errs), "located": len(errs)}


def demo_world(sw, n_images: int, seeds: str, denoise: str, chain_steps: int, world_seed: int) -> dict:
    import torch

    import comfy.sd
    import folder_paths
    from dpmtools.comfy_env import load_module

    nodes = importlib.import_module("dpm_latent.nodes.best_of_n")
    cyc = importlib.import_module("dpm_latent.nodes.latent_codes")
    clip_rank = importlib.import_module("dpm_latent.guidance.clip_rank")
    from dpm_latent.guidance import load_clip_folder

    world = load_module("dpm_latent_demo_world", REPO / "demo" / "world.py")
    models = REPO / "demo" / "models"
    paths = folder_paths.folder_names_and_paths["clip_energy"][0]
    if str(models / "clip_energy") not in paths:
        paths.append(str(models / "clip_energy"))
    imgs, attrs = world.sample_domain(n_images, world_seed, "A")
    imgs = (imgs * 255).round() / 255  # as the demo's 8-bit input frames
    pixels = imgs.permute(0, 2, 3, 1).contiguous()
    with torch.inference_mode():
        load = lambda name: comfy.sd.load_checkpoint_guess_config(  # noqa: E731
            str(models / "checkpoints" / name), output_vae=True, output_clip=False)
        ma, _, va, _ = load("dpm_world_circles.safetensors")
        mb, _, vb, _ = load("dpm_world_squares.safetensors")
        lat = {"samples": va.encode(pixels)}
        ca = cyc.EmptyConditioning.execute(ma, 1).result[0]
        cb = cyc.EmptyConditioning.execute(mb, 1).result[0]
        seed_l, den_l, steps_l, cfg_text, labels, count = nodes.DPMSweep.execute(seeds, denoise, "1", chain_steps).result
        t = time.perf_counter()
        codes = [cyc.DPMEncode.execute(ma, ca, ca, lat, s, k, "simple", d, 0.1, 1.0).result[0]
                 for s, d, k in zip(seed_l, den_l, steps_l)]
        t_enc = time.perf_counter() - t
        t = time.perf_counter()
        out = nodes.DPMPrunedReplay.execute([mb], [cb], [cb], codes, [cfg_text], [vb], ["dpm_world_clip"], ["a square"],
                                            ["directional CLIP"], [RECORD], ["1"], ["each batch index"],
                                            ["a circle"], [pixels]).result
        t_rep = time.perf_counter() - t
    images, record = out[0], out[1]
    allc = torch.cat(images)                                  # candidate j, image b at j * n + b
    n = n_images
    bundle = load_clip_folder(models / "clip_energy" / "dpm_world_clip")
    final = clip_rank.clip_scores(bundle, allc.permute(0, 3, 1, 2), "a square", "directional CLIP",
                                  source_image=pixels.permute(0, 3, 1, 2).repeat(len(images), 1, 1, 1),
                                  source_text="a circle").tolist()
    fractions = [float(f) for f in RECORD.split(",")]
    scores_at = {f: [s[k] for s in record["stage_scores"]] for k, f in enumerate(fractions)}
    groups = [list(range(b, len(final), n)) for b in range(n)]
    sweep = sw.make_sweep(seeds, denoise, "1")
    cand_steps = [sw.steps_for(d, chain_steps) for _s, d, _c in sweep.candidates for _b in range(n)]
    cand_cfg = [c for _s, _d, c in sweep.candidates for _b in range(n)]
    naive = sw.count_evaluations(sweep, chain_steps)["naive"] * n
    encode = sum(sw.steps_for(d, chain_steps) for _s, d in sweep.encodes) * n
    full = sw.Halving((), ())
    rows = {}
    read_all = world.read_attributes(allc.permute(0, 3, 1, 2))
    for cp, keep in [("", "")] + SCHEDULES:
        h = sw.parse_halving(cp, keep)
        picks, stage_of = sw.simulate_halving(scores_at, final, groups, h)
        ev = encode + sw.replay_evaluations(cand_steps, cand_cfg, stage_of, h)
        rows[h.text() or "full"] = {"picks": picks, "evaluations": ev, "ratio_naive": ev / naive,
                                    **quality([read_all[i] for i in picks], attrs)}
    ref = rows["full"]["picks"]
    for r in rows.values():
        same = sum(a == b for a, b in zip(r["picks"], ref))
        r["same_pick"] = same / n
        r["same_pick_ci95"] = wilson(same, n)
        r["mean_directional_clip"] = sum(final[i] for i in r["picks"]) / n
    assert full.text() == ""
    return {"n_images": n, "candidates_per_image": len(sweep.candidates), "seeds": seeds, "denoise": denoise,
            "chain_steps": chain_steps, "world_seed": world_seed, "naive_evaluations": naive,
            "seconds_encode": t_enc, "seconds_record_replay": t_rep, "schedules": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--seeds", default="0-7")
    ap.add_argument("--denoise", default="0.6, 0.7, 0.8")
    ap.add_argument("--chain-steps", type=int, default=28)
    ap.add_argument("--world-seed", type=int, default=7)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    setup()
    sw = importlib.import_module("dpm_latent.samplers.sweep")
    out = {"paper_grid": {}}
    print("The paper's grid: 15 seeds x 6 denoise x 6 cfg = 540 candidates, 100-step chain; "
          "model evaluations / naive product")
    base = sw.count_evaluations(sw.paper_sweep(), 100)
    print(f"  full sweep, shared encodes: {base['ratio']:.3f}")
    for cp, keep in SCHEDULES:
        c = sw.count_halving(sw.paper_sweep(), 100, sw.parse_halving(cp, keep))
        out["paper_grid"][sw.parse_halving(cp, keep).text()] = c
        print(f"  checkpoints {cp:10s} keep {keep:11s}: expected {c['ratio_expected']:.3f}, worst "
              f"{c['ratio_worst']:.3f}, {c['survivors']} finish")
    d = demo_world(sw, args.images, args.seeds, args.denoise, args.chain_steps, args.world_seed)
    out["demo_world"] = d
    print(f"\nDemo world: {d['n_images']} circles, {d['candidates_per_image']} candidates each (seeds {d['seeds']} x "
          f"denoise {d['denoise']}), directional CLIP; encode {d['seconds_encode']:.0f} s, recorded replay "
          f"{d['seconds_record_replay']:.0f} s")
    fmt_iv = lambda v, iv, p=2: f"{v:.{p}f} [{iv[0]:.{p}f}, {iv[1]:.{p}f}]"  # noqa: E731
    for name, r in d["schedules"].items():
        print(f"  {name:18s} evals/naive {r['ratio_naive']:.3f}  same pick {fmt_iv(r['same_pick'], r['same_pick_ci95'])}"
              f"  square {fmt_iv(r['square_rate'], r['square_rate_ci95'])}  colour "
              f"{fmt_iv(r['colour_kept'], r['colour_kept_ci95'])}  centroid "
              f"{fmt_iv(r['centroid_error_px'], r['centroid_error_px_ci95'], 1)} px  dCLIP {r['mean_directional_clip']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
