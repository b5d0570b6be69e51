# SPDX-License-Identifier: GPL-3.0-or-later
"""Soak: how much one ComfyUI server's resident memory grows per prompt, for DPM Encode + Replay and
for the Langevin Latent Sampler in each memory mode (issue 18: ``auto`` grew it by 12.5 MB a prompt).

One real server (``main.py --cpu``, the tiny SD1.5 and tiny CLIP built in code, image 64 x 64),
then for each kind in turn: WARMUP prompts, then N prompts (each a new seed, so ComfyUI's cache
never answers), the server's VmRSS read after each. Prints the least-squares slope in MB per
prompt over the N, its n, and the spread (the slopes of the first and second half of the run).

    python3 scripts/comfy_host.py bench soak [--n 30] [--warmup 3]
"""
from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
from pathlib import Path

from _common import setup

LANGEVIN_MODES = {"langevin low": "low: recompute each step", "langevin fast": "fast: keep the whole chain",
                  "langevin auto": "auto"}


def server_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for process {pid}")


def slope(ys: list[float]) -> float:
    """Least-squares growth per step of a series (MB per prompt)."""
    n = len(ys)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2.0, statistics.fmean(ys)
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sum((i - mx) ** 2 for i in range(n))


def prompt(kind: str, seed: int, latent_name: str) -> dict:
    from dpmtools.graphs import Graph, encode_graph

    g = Graph()
    if kind == "encode/replay":
        ckpt, e, _lat, enc = encode_graph(g, "tiny_sd15.safetensors", latent_name, tokens=8, seed=seed, steps=3,
                                          scheduler="normal", denoise=0.6, eta=0.3, cfg=1.0)
        rep = g.node("ReplayLatentWithPrompt", model=ckpt.out(0), positive=e.out(0), negative=e.out(0),
                     latent_code=enc.out(0), cfg=1.0)
        g.node("SaveLatent", samples=rep.out(0), filename_prefix="soak_replay")
        return g.prompt()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    e = g.node("EmptyConditioning", model=ckpt.out(0), tokens=8)
    clip = g.node("CLIPEnergy", clip_name="tiny_clip", text="a red square", weight=500.0, augmentations=2,
                  color=True, translation=True, resize=True, cutout=True)
    code = g.node("RandomLatentCode", model=ckpt.out(0), width=64, height=64, batch_size=1, seed=seed, steps=3,
                  scheduler="normal", eta=0.2)
    lv = g.node("LangevinLatentSampler", model=ckpt.out(0), positive=e.out(0), negative=e.out(0), cfg=1.0,
                vae=ckpt.out(2), energy=clip.out(0), latent_code=code.out(0), steps=3, step_size=0.05, seed=seed,
                update="all components", memory=LANGEVIN_MODES[kind])
    g.node("SaveLatent", samples=lv.out(1), filename_prefix="soak_langevin")
    return g.prompt()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30, help="measured prompts per kind (default 30)")
    ap.add_argument("--warmup", type=int, default=3, help="prompts per kind before measuring (default 3)")
    ap.add_argument("--kinds", default="encode/replay," + ",".join(LANGEVIN_MODES),
                    help="comma-separated, in the order run")
    args = ap.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    setup()
    import torch

    from dpmtools import tiny_clip, tiny_models
    from dpmtools.comfy_env import comfy_dir
    from dpmtools.graphs import write_latent
    from dpmtools.server import TEST_PACK_NAME, ComfyServer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = {"checkpoints": root / "checkpoints", "clip_energy": root / "clip_energy"}
        for d in dirs.values():
            d.mkdir()
        tiny_models.make_sd15_checkpoint(dirs["checkpoints"] / "tiny_sd15.safetensors", seed=0)
        tiny_clip.make_tiny_clip_folder(dirs["clip_energy"] / "tiny_clip", seed=0)
        # a SIGTERM (a timeout) unwinds through the finally below, so the server never outlives the run
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        srv = ComfyServer(comfy_dir(), root / "server", python=sys.executable, model_dirs=dirs,
                          pack_name=TEST_PACK_NAME).start()
        try:
            latent = write_latent(srv.input_dir, "soak_src",
                                  torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
            seed = 0
            rows = []
            start = server_rss_mb(srv.proc.pid)
            for kind in kinds:
                series = []
                for k in range(args.warmup + args.n):
                    seed += 1
                    srv.run(prompt(kind, seed, latent))
                    if k >= args.warmup:
                        series.append(server_rss_mb(srv.proc.pid))
                half = len(series) // 2
                rows.append((kind, slope(series), slope(series[:half]), slope(series[half:]), series[0], series[-1]))
                print(f"  {kind:14s} {rows[-1][1]:+7.2f} MB/prompt", flush=True)
            end = server_rss_mb(srv.proc.pid)
        finally:
            srv.stop()
    print(f"\nOne ComfyUI server (CPU), tiny SD1.5 at 64 x 64, 3-step chain, Langevin 3 steps; {args.warmup} "
          f"warm-up + n = {args.n} prompts per kind, in this order; server RSS {start:.0f} -> {end:.0f} MB")
    print(f"  {'kind':14s} {'MB/prompt':>10s} {'1st half':>9s} {'2nd half':>9s}   RSS first -> last measured")
    for kind, s, s1, s2, a, b in rows:
        print(f"  {kind:14s} {s:+10.2f} {s1:+9.2f} {s2:+9.2f}   {a:7.1f} -> {b:7.1f} MB")
    print("MB/prompt: least-squares slope of the server's resident set over the n prompts (target: about 0; "
          "issue 18 measured auto at +12.5)")


if __name__ == "__main__":
    main()
