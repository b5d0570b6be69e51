# SPDX-License-Identifier: GPL-3.0-or-later
"""Encode + replay overhead: wall time of DPM Encode + Replay divided by the time of the same
number of model calls made through ComfyUI's own guider (bare) and through KSampler
(euler_ancestral). Tiny SD1.5 built by the tests' builder, CPU. Prints ratios, never fails.

    python3 scripts/comfy_host.py bench encode_replay
"""
from __future__ import annotations

import importlib
import sys
import tempfile

from _common import peak_rss_mb, setup, timed_round_robin


def main(steps: int = 12, size: int = 24, batch: int = 1, repeats: int = 3) -> None:
    setup()
    import torch

    import comfy.sample
    import comfy.samplers
    import comfy.sd
    from dpmtools import tiny_models

    cyc = importlib.import_module("dpm_latent.nodes.latent_codes")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        path = tiny_models.make_sd15_checkpoint(f"{tmp}/sd15.safetensors")
        model, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=False)
        cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), {}]]
        latent = {"samples": torch.randn(batch, 4, size, size)}
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(cond, cond)
        guider.set_cfg(1.0)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).cpu()

        def ours():
            code = cyc.DPMEncode.execute(model, cond, cond, latent, 0, steps, "normal", 1.0, 0.1, 1.0).result[0]
            cyc.ReplayLatentWithPrompt.execute(model, cond, cond, code, 1.0)

        class Bare(comfy.samplers.Sampler):
            def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                       disable_pbar=False):
                x = latent_image + noise * sigmas[0]
                for s in sigmas[:-1]:  # the same input each time: no feedback, no drift into denormals
                    out = model_wrap(x, s * x.new_ones([x.shape[0]]), model_options=extra_args["model_options"])
                return out

        def bare():  # the same 2 * steps model calls, through the same guider, no sampler arithmetic
            for _ in range(2):
                guider.sample(torch.randn_like(latent["samples"]), latent["samples"], Bare(), sigmas)

        def ksampler():
            s = comfy.samplers.sampler_object("euler_ancestral")
            for _ in range(2):
                guider.sample(torch.randn_like(latent["samples"]), latent["samples"], s, sigmas)

        ours()  # warm-up
        bare()
        t_ours, t_bare, t_ks = timed_round_robin([ours, bare, ksampler], repeats)
    print(f"tiny SD1.5, latent {batch}x4x{size}x{size}, {steps} steps, best of {repeats} (interleaved)")
    print(f"  encode + replay          {t_ours:8.3f} s")
    print(f"  2x{steps} bare guider calls  {t_bare:8.3f} s   ratio {t_ours / t_bare:.3f}  (target <= 1.05)")
    print(f"  2x KSampler euler_a      {t_ks:8.3f} s   ratio {t_ours / t_ks:.3f}")
    print(f"  peak RSS of this process {peak_rss_mb():8.1f} MB")


if __name__ == "__main__":
    main(*[int(a) for a in sys.argv[1:]])
