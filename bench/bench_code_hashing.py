# SPDX-License-Identifier: GPL-3.0-or-later
"""Cost of the SHA-256 check when a latent code is loaded: a 100-step SDXL-sized code (batch 1,
4x128x128 latent, 26 MB). Load time with verification divided by the same reader on the same bytes
without a digest (so nothing is hashed), and by safetensors' own load_file. File in the page cache
(warm), best of ``repeats``, interleaved. Prints ratios, never fails.

    python3 scripts/comfy_host.py bench code_hashing
"""
from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

from _common import setup, timed_round_robin


def main(steps: int = 100, repeats: int = 7) -> None:
    pack = setup()
    import torch
    from safetensors.torch import load_file

    fmt = pack.samplers.code_format
    art = pack.samplers.artifact
    S = pack.samplers
    logging.getLogger("dpm_latent").setLevel(logging.ERROR)  # the undigested copy warns once
    sigmas = torch.cat([torch.linspace(14.6, 0.03, steps), torch.zeros(1)]).double()
    code = S.prior_code((1, 4, 128, 128), sigmas, 0.1, "ve", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = fmt.save_code(code, Path(tmp) / "sdxl100.dpmcode.safetensors")
        save_s = time.perf_counter() - t
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = raw[8:8 + n].replace(b'"sha256":"sha256:', b'"nodgst":"nodgst:')
        bare = Path(tmp) / "bare.safetensors"
        bare.write_bytes(raw[:8] + header + raw[8 + n:])

        def verified():
            art.load_artifact(path, fmt.FORMAT_NAME)

        def unverified():
            art.load_artifact(bare, fmt.FORMAT_NAME)

        def st():  # safetensors maps the file lazily: clone to read every byte, as the other readers do
            for t in load_file(str(path)).values():
                t.clone()

        def full():
            fmt.load_code(path)

        best = timed_round_robin([verified, unverified, st, full], repeats)
    mb = len(raw) / 2 ** 20
    v, u, s, f = best
    print(f"code: {steps} steps, latent 1x4x128x128, file {mb:.1f} MiB; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"save (hash + write):                {save_s * 1e3:8.1f} ms")
    print(f"load, verified (hash while reading): {v * 1e3:8.1f} ms  ({mb / v:.0f} MiB/s)")
    print(f"load, same reader, no digest:        {u * 1e3:8.1f} ms")
    print(f"safetensors load_file + clone:       {s * 1e3:8.1f} ms")
    print(f"load_code (verify + all field checks): {f * 1e3:6.1f} ms")
    print(f"ratio verified / unverified: {v / u:.2f}x;  verified / safetensors: {v / s:.2f}x;  "
          f"hashing adds {(v - u) * 1e3:.0f} ms per {mb:.0f} MiB")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
