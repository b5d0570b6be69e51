# SPDX-License-Identifier: GPL-3.0-or-later
"""Cost of one Langevin step divided by one replay of the same chain, with peak memory beside it.

A Langevin step runs the chain forward without a graph, then walks it backwards recomputing each
step with autograd: forward + recompute + backward, about 4 forward-equivalents (target <= 4.5x).
Keeping the whole graph of the forward pass instead (no recompute, memory grows with the chain) is
the cheaper exact gradient: about 3 forward-equivalents. Both are measured, each in its own process
(peak memory = peak resident set above the models, or torch's peak allocation on CUDA).

Two ratios per mode:
  chain   the gradient of the chain alone (identity decoder, energy = sum of the latent) / replay
  node    the Langevin Latent Sampler's step (VAE decode, CLIP energy with 4 augmentations, backward
          through both) / replay
Per-step times are differences (steps 3 minus steps 1, over 2) so that loading and the final replay
drop out; best of 2 rounds. Tiny SD1.5 + tiny CLIP built by the tests' builders.

    python3 scripts/comfy_host.py bench langevin_speed [chain_steps] [latent_side]
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


def one(mode: str, chain: int, size: int, tmp: str) -> dict:
    setup()
    import torch

    import comfy.model_management
    import comfy.sd
    import folder_paths

    gn = importlib.import_module("dpm_latent.nodes.clip_guidance")
    lc = importlib.import_module("dpm_latent.nodes.latent_codes")
    lr = importlib.import_module("dpm_latent.nodes.bridge.langevin_run")
    cyc = importlib.import_module("dpm_latent.nodes.latent_codes")
    B = importlib.import_module("dpm_latent.nodes.bridge.sampling")
    L = importlib.import_module("dpm_latent.guidance.langevin")
    folder_paths.folder_names_and_paths["clip_energy"][0].append(f"{tmp}/clip_energy")
    cuda = torch.cuda.is_available() and comfy.model_management.get_torch_device().type == "cuda"
    rounds = 2

    def sync():
        if cuda:
            torch.cuda.synchronize()

    with torch.inference_mode():
        model, _, vae, _ = comfy.sd.load_checkpoint_guess_config(f"{tmp}/sd15.safetensors", output_vae=True,
                                                                 output_clip=False)
        cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), {}]]
        energy = gn.CLIPEnergy.execute("tiny", "a red square", 500.0, 4, True, True, True, True).result[0]
        code = lc.RandomLatentCode.execute(model, size * 8, size * 8, 1, 0, chain, "normal", 0.1).result[0]

        def replay_once():
            cyc.ReplayLatentWithPrompt.execute(model, cond, cond, code, 1.0)

        def node_steps(n: int, checkpoint: bool):
            lr.run_langevin(model, cond, cond, 1.0, vae, energy, code, n, 0.05, 0, "all components", checkpoint)

        def chain_steps(n: int, checkpoint: bool):
            def work(denoise, x0, _cb, guider):
                from dpm_latent.nodes.bridge.autograd import gradients_through

                with gradients_through(guider.inner_model):
                    c = code.to(device=x0.device, dtype=torch.float32).clone()  # not inference tensors
                    for _ in range(n):
                        L.chain_value_and_grad(denoise, lambda x: x, lambda im, g=None: im.flatten(1).sum(1), c,
                                               c.start_noise, c.noises, checkpoint=checkpoint)
                return x0
            B.run_in_comfy(model, cond, cond, 1.0, torch.zeros(code.shape), code.sigmas, work, 0, None)

        def per_call(fn) -> float:
            sync()
            t = time.perf_counter()
            fn()
            sync()
            return time.perf_counter() - t

        replay_once()  # warm-up: loads the models
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / 2 ** 20
        else:
            base = rss_mb()
        checkpoint = mode == "checkpoint"
        res = {}
        for name, fn in (("chain", chain_steps), ("node", node_steps)):
            fn(1, checkpoint)  # warm-up
            ratios, steps_s, replays_s = [], [], []
            # replay and Langevin interleaved, so that a busy machine slows both alike
            for _ in range(rounds):
                r = per_call(replay_once)
                t1 = per_call(lambda: fn(1, checkpoint))
                t3 = per_call(lambda: fn(3, checkpoint))
                step = (t3 - t1) / 2
                ratios.append(step / r)
                steps_s.append(step)
                replays_s.append(r)
            res[f"{name}_ratio"] = min(ratios)
            res[f"{name}_ratios"] = ratios
            res[f"{name}_step_s"] = min(steps_s)
            res[f"{name}_replay_s"] = min(replays_s)
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else peak_rss_mb()
    res.update(mode=mode, peak_mb=peak - base, device="cuda" if cuda else "cpu")
    return res


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] == "--one":
        print(json.dumps(one(args[1], int(args[2]), int(args[3]), args[4])))
        return
    chain = int(args[0]) if args else 8
    size = int(args[1]) if len(args) > 1 else 16
    with tempfile.TemporaryDirectory() as tmp:
        setup()
        from dpmtools import tiny_clip, tiny_models

        tiny_models.make_sd15_checkpoint(f"{tmp}/sd15.safetensors")
        tiny_clip.make_tiny_clip_folder(f"{tmp}/clip_energy/tiny")
        rows = {}
        for mode in ("checkpoint", "full_graph"):
            env = dict(os.environ)
            env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # resident set follows live tensors
            out = subprocess.run([sys.executable, __file__, "--one", mode, str(chain), str(size), tmp],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(out.stderr[-3000:])
                raise SystemExit(f"{mode} failed")
            rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            print(mode, json.dumps(rows[mode]), flush=True)
    dev = rows["checkpoint"]["device"]
    print(f"Langevin speed on tiny SD1.5, latent 1x4x{size}x{size}, chain of {chain} steps, device {dev}; "
          f"ratios = one Langevin step / one replay of the chain, best of {len(rows['checkpoint']['chain_ratios'])} "
          "interleaved rounds")
    for mode, label in (("checkpoint", "per-step recompute (default)"), ("full_graph", "whole graph kept")):
        r = rows[mode]
        print(f"  {label}: peak +{r['peak_mb']:.1f} MB")
        for name, what in (("chain", "chain gradient"), ("node", "node step (VAE + CLIP)")):
            print(f"    {what:24s} {r[name + '_step_s'] * 1000:8.1f} ms vs replay {r[name + '_replay_s'] * 1000:8.1f} ms"
                  f"  ratio {r[name + '_ratio']:.2f}x  (rounds {', '.join(f'{x:.2f}' for x in r[name + '_ratios'])})")
    print(f"chain ratio (default) = {rows['checkpoint']['chain_ratio']:.2f}  (target <= 4.5); "
          f"whole graph kept = {rows['full_graph']['chain_ratio']:.2f}")


if __name__ == "__main__":
    main()
