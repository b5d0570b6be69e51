# SPDX-License-Identifier: GPL-3.0-or-later
"""Shared set-up for the benchmarks: ComfyUI in-process on the CPU (or CUDA when present)."""
from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))  # dpmtools (never the repository itself: its nodes/ would shadow ComfyUI's)


def setup(force_fp32: bool = True):
    """ComfyUI on sys.path (DPM_LATENT_COMFYUI), fp32 on the CPU (CUDA with DPM_LATENT_BENCH_CUDA=1); the pack.
    ``force_fp32=False`` lets a benchmark choose fp16/bf16 weights itself."""
    from dpmtools import comfy_env

    comfy_env.add_comfy_to_path()
    comfy_env.set_device(cpu=os.environ.get("DPM_LATENT_BENCH_CUDA") != "1", force_fp32=force_fp32)
    return comfy_env.import_pack()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def timed_round_robin(fns, repeats: int) -> list[float]:
    """Best of ``repeats`` seconds for each function, interleaved so that a busy machine hurts all alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best
