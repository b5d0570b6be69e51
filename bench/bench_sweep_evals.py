# SPDX-License-Identifier: GPL-3.0-or-later
"""Model evaluations of a best-of-N sweep: naive product vs shared encodes (DPM Sweep + Replay's
cfg_values). Counts, never times: an evaluation is one image through the denoiser at one step
(two where CFG adds the unconditional branch; none at cfg exactly 1).

1. The paper's protocol (research notes A2): 15 seeds x 6 skips (15..50 of 100 steps) x 6 cfg
   (1..5) = 540 candidates, encode at cfg 1, round(100 x denoise) steps per encode.
2. A reduced grid run for real through the nodes on the tiny SD1.5 with a counting unet wrapper,
   to show that the count model is what the nodes do.

    python3 scripts/comfy_host.py bench sweep_evals
"""
from __future__ import annotations

import importlib

from _common import setup


def main() -> None:
    setup()
    import tempfile

    import torch

    import comfy.sd
    from dpmtools import tiny_models

    sw = importlib.import_module("dpm_latent.samplers.sweep")
    nodes = importlib.import_module("dpm_latent.nodes.best_of_n")
    cyc = importlib.import_module("dpm_latent.nodes.latent_codes")

    c = sw.count_evaluations(sw.paper_sweep(), 100)
    print("CycleDiffusion best-of-N protocol: 15 seeds x 6 denoise x 6 cfg, 100-step chain")
    print(f"  candidates {c['candidates']}, encodes naive {c['encodes_naive']} / shared {c['encodes_shared']}")
    print(f"  model evaluations naive {c['naive']:,}  shared {c['shared']:,}  ratio {c['ratio']:.3f} (target <= 0.75)")

    grid = ("0-2", "0.5, 0.8", "1, 2, 3")
    seeds, denoise, steps, cfg_text, _labels, count = nodes.DPMSweep.execute(*grid, 10).result
    want = sw.count_evaluations(sw.make_sweep(*grid), 10)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        path = tiny_models.make_sd15_checkpoint(f"{tmp}/sd15.safetensors")
        model, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=False)
        cond = [[torch.zeros(1, 4, 768), {}]]
        pos = [[torch.randn(1, 4, 768, generator=torch.Generator().manual_seed(3)), {}]]
        lat = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
        counts = {}
        for mode in ("naive", "shared"):
            n = {"calls": 0, "images": 0}
            m = model.clone()

            def wrapper(apply, args, n=n):
                n["calls"] += 1
                n["images"] += int(args["input"].shape[0])
                return apply(args["input"], args["timestep"], **args["c"])

            m.set_model_unet_function_wrapper(wrapper)
            for s, d, k in zip(seeds, denoise, steps):
                if mode == "shared":
                    code = cyc.DPMEncode.execute(m, cond, cond, lat, s, k, "normal", d, 0.1, 1.0).result[0]
                    cyc.ReplayLatentWithPrompt.execute(m, pos, cond, code, 1.0, cfg_values=cfg_text)
                else:
                    for cfg in sw.parse_floats(cfg_text, "cfg", 0, 100):
                        code = cyc.DPMEncode.execute(m, cond, cond, lat, s, k, "normal", d, 0.1, 1.0).result[0]
                        cyc.ReplayLatentWithPrompt.execute(m, pos, cond, code, cfg)
            counts[mode] = n
    print(f"\nMeasured on the tiny SD1.5 (seeds {grid[0]}, denoise {grid[1]}, cfg {grid[2]}, 10-step chain, "
          f"{count} candidates):")
    for mode in ("naive", "shared"):
        print(f"  {mode:6s}: {counts[mode]['images']:5d} image evaluations (model says {want[mode]}), "
              f"{counts[mode]['calls']:4d} denoiser calls")
    print(f"  ratio shared/naive: evaluations {counts['shared']['images'] / counts['naive']['images']:.3f}, "
          f"calls {counts['shared']['calls'] / counts['naive']['calls']:.3f}")


if __name__ == "__main__":
    main()
