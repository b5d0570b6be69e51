# SPDX-License-Identifier: GPL-3.0-or-later
"""The demo's video row decodes 4 x 256 frames and encodes 256 with the world's image VAE (TAESD layout) in the
job's own process. This times one 256-frame decode and encode over 256 frames per call against demo/video.py's
CHUNK, checks that both give the same bits, and prints the ratio. Never fails.

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

    def run(chunk):
        saved, V.CHUNK = V.CHUNK, chunk
        try:
            return V.encode_frames(vae, frames), V.decode_frames(vae, lat)
        finally:
            V.CHUNK = saved

    whole, chunked = run(256), run(V.CHUNK)
    same = all(torch.equal(a, b) for a, b in zip(whole, chunked))
    t_whole, t_chunk = timed_round_robin([lambda: run(256), lambda: run(V.CHUNK)], args.repeats)
    print(f"threads {torch.get_num_threads()}; encode + decode of 256 frames: {t_whole:.2f} s at 256 per call, "
          f"{t_chunk:.2f} s at {V.CHUNK} per call; ratio {t_whole / t_chunk:.2f}x; same bits: {same}")


if __name__ == "__main__":
    main()
