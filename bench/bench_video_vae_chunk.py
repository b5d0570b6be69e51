# SPDX-License-Identifier: GPL-3.0-or-later
"""The demo's video row decodes 4 x 256 frames and encodes 256 with the world's image VAE (TAESD layout) in the
job's own process. This times the encode and the decode of 256 frames at 256 frames per call against demo/video.py's
CHUNK frames per call, checks that both give the same bits, and prints the ratios. Never fails.

    python3 scripts/comfy_host.py bench video_vae_chunk [--repeats 3]
"""
from __future__ import annotations

import argparse

from _common import REPO, setup, timed_round_robin


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    setup()
    import torch

    from dpmtools.comfy_env import load_module

    V = load_module("dpm_latent_demo_video", REPO / "demo" / "video.py")
    vae = V.world_vae()
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(256, 3, 64, 64, generator=g)
    lat = V.encode_frames(vae, frames)

    def run(chunk, part):
        return V.encode_frames(vae, frames, chunk) if part == "encode" else V.decode_frames(vae, lat, chunk)

    print(f"threads {torch.get_num_threads()}; 256 frames of 64 x 64, best of {args.repeats}")
    for part in ("encode", "decode"):
        same = torch.equal(run(256, part), run(V.CHUNK, part))
        t_whole, t_chunk = timed_round_robin([lambda: run(256, part), lambda: run(V.CHUNK, part)], args.repeats)
        print(f"{part}: {t_whole:.2f} s at 256 frames per call, {t_chunk:.2f} s at {V.CHUNK}; "
              f"time at 256 / time at {V.CHUNK} = {t_whole / t_chunk:.2f}x; same bits: {same}")


if __name__ == "__main__":
    main()
