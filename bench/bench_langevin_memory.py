# SPDX-License-Identifier: GPL-3.0-or-later
"""Peak memory and time per Langevin step against chain length (5, 10, 20, 40 steps).

Each chain length runs in its own process; memory is the peak resident set above what the
process held after loading the models (CPU) or torch's peak allocation (CUDA). Tiny SD1.5 +
tiny CLIP built by the tests' builders. Prints ratios against the 5-step chain; target
peak(40) <= 1.3 x peak(5). With --no-checkpoint the same without activation checkpointing.

    python3 scripts/comfy_host.py bench langevin_memory
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import peak_rss_mb, rss_mb, setup


def one(chain: int, size: int, checkpoint: bool, tmp: str) -> dict:
    setup()
    import torch

    import comfy.model_management
    import comfy.sd
    import folder_paths

    gn = importlib.import_module("dpm_latent.nodes.clip_guidance")
    lc = importlib.import_module("dpm_latent.nodes.latent_codes")
    lr = importlib.import_module("dpm_latent.nodes.bridge.langevin_run")
    folder_paths.folder_names_and_paths["clip_energy"][0].append(f"{tmp}/clip_energy")
    with torch.inference_mode():
        model, _, vae, _ = comfy.sd.load_checkpoint_guess_config(f"{tmp}/sd15.safetensors", output_vae=True,
                                                                 output_clip=False)
        cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), {}]]
        energy = gn.CLIPEnergy.execute("tiny", "a red square", 500.0, 4, True, True, True, True).result[0]
        code = lc.RandomLatentCode.execute(model, size * 8, size * 8, 1, 0, chain, "normal", 0.1).result[0]
        lr.run_langevin(model, cond, cond, 1.0, vae, energy, code, 1, 0.05, 0, "all components", checkpoint)
        cuda = torch.cuda.is_available() and comfy.model_management.get_torch_device().type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / 2 ** 20
        else:
            base = rss_mb()
        steps = 3
        t = time.perf_counter()
        lr.run_langevin(model, cond, cond, 1.0, vae, energy, code, steps, 0.05, 0, "all components", checkpoint)
        dt = (time.perf_counter() - t) / steps
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else peak_rss_mb()
    return {"chain": chain, "peak_mb": peak - base, "s_per_step": dt, "device": "cuda" if cuda else "cpu"}


def main() -> None:
    args = sys.argv[1:]
    checkpoint = "--no-checkpoint" not in args
    size = 32
    if args and args[0] == "--one":
        print(json.dumps(one(int(args[1]), int(args[2]), args[3] == "1", args[4])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        setup()
        from dpmtools import tiny_clip, tiny_models

        tiny_models.make_sd15_checkpoint(f"{tmp}/sd15.safetensors")
        tiny_clip.make_tiny_clip_folder(f"{tmp}/clip_energy/tiny")
        rows = []
        for chain in (5, 10, 20, 40):
            # Large blocks through mmap, returned to the OS when freed: the resident set then follows
            # live tensors instead of glibc heap fragmentation (which otherwise grows with the
            # number of allocations and read as a false 1.4x at 40 steps).
            env = dict(os.environ)
            env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
            out = subprocess.run([sys.executable, __file__, "--one", str(chain), str(size), "1" if checkpoint else "0",
                                  tmp], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(out.stderr[-3000:])
                raise SystemExit(f"chain {chain} failed")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"Langevin on tiny SD1.5, latent 1x4x{size}x{size}, 4 CLIP augmentations, "
          f"checkpointing {'on' if checkpoint else 'off'}, device {rows[0]['device']}")
    base = rows[0]
    for r in rows:
        print(f"  chain {r['chain']:3d}: peak +{r['peak_mb']:8.1f} MB  ratio {r['peak_mb'] / base['peak_mb']:.2f}   "
              f"{r['s_per_step']:.2f} s/step  ({r['s_per_step'] / r['chain'] * 1000:.0f} ms per chain step)")
    print(f"peak(40)/peak(5) = {rows[-1]['peak_mb'] / base['peak_mb']:.2f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
