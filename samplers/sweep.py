# SPDX-License-Identifier: GPL-3.0-or-later
"""Best-of-N sweeps: parsing the value lists, the candidate order, and model-evaluation counts.

Pure Python (no torch, no ComfyUI). A sweep is the cartesian product seeds x denoise x cfg.
An encode depends on (seed, denoise) only, so a shared sweep encodes once per (seed, denoise)
and replays that code at every cfg; candidates are ordered seed-major, then denoise, then cfg,
which is the order in which Replay Latent with Prompt (cfg_values) emits them.

Model evaluations are counted per image and step: one evaluation per denoiser call on one image,
two when CFG runs the unconditional branch too (ComfyUI skips it at cfg exactly 1).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import List, Sequence, Tuple

MAX_VALUES = 10000


class SweepError(ValueError):
    """A value list that cannot be parsed; the message names the input."""


def _split(text: str) -> List[str]:
    return [t for t in re.split(r"[,\s;]+", text.strip()) if t]


def parse_ints(text: str, name: str, lo: int = 0, hi: int = 0xFFFFFFFFFFFFFFFF) -> List[int]:
    """"0-14", "1,5,9", "0-6:2" (a range with a step) or a mix; duplicates are dropped, order kept."""
    out: List[int] = []
    for tok in _split(text or ""):
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", tok)
        if not m:
            raise SweepError(f"{name}: {tok!r} is not an integer or a range like 0-14 (or 0-14:2); "
                             "write e.g. '0-14' or '1, 5, 9'")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        step = int(m.group(3)) if m.group(3) is not None else 1
        if b < a or step < 1:
            raise SweepError(f"{name}: the range {tok!r} is empty; write the smaller number first")
        if (b - a) // step + 1 + len(out) > MAX_VALUES:
            raise SweepError(f"{name}: more than {MAX_VALUES} values")
        out.extend(range(a, b + 1, step))
    vals = list(dict.fromkeys(out))
    if not vals:
        raise SweepError(f"{name}: give at least one value, e.g. '0-14' or '1, 5, 9'")
    bad = [v for v in vals if not lo <= v <= hi]
    if bad:
        raise SweepError(f"{name}: {bad[0]} is outside [{lo}, {hi}]")
    return vals


def parse_floats(text: str, name: str, lo: float, hi: float) -> List[float]:
    """"1, 1.5, 2" (commas, spaces or semicolons); duplicates are dropped, order kept."""
    vals: List[float] = []
    for tok in _split(text or ""):
        try:
            v = float(tok)
        except ValueError:
            raise SweepError(f"{name}: {tok!r} is not a number; write e.g. '1, 1.5, 2'") from None
        if not math.isfinite(v) or not lo <= v <= hi:
            raise SweepError(f"{name}: {tok} is outside [{lo}, {hi}]")
        vals.append(v)
    vals = list(dict.fromkeys(vals))
    if not vals:
        raise SweepError(f"{name}: give at least one value, e.g. '1, 1.5, 2'")
    if len(vals) > MAX_VALUES:
        raise SweepError(f"{name}: more than {MAX_VALUES} values")
    return vals


def fmt(v: float) -> str:
    return f"{v:g}"


@dataclass(frozen=True)
class Sweep:
    seeds: Tuple[int, ...]
    denoise: Tuple[float, ...]
    cfg: Tuple[float, ...]

    @property
    def encodes(self) -> List[Tuple[int, float]]:
        """(seed, denoise) of every distinct encode, seed-major."""
        return [(s, d) for s in self.seeds for d in self.denoise]

    @property
    def candidates(self) -> List[Tuple[int, float, float]]:
        """(seed, denoise, cfg) of every candidate, in the order the shared sweep emits them."""
        return [(s, d, c) for s, d in self.encodes for c in self.cfg]

    def labels(self) -> List[str]:
        return [f"seed {s} d {fmt(d)} cfg {fmt(c)}" for s, d, c in self.candidates]

    def cfg_text(self) -> str:
        return ", ".join(fmt(c) for c in self.cfg)


def make_sweep(seeds: str, denoise: str, cfg: str) -> Sweep:
    return Sweep(tuple(parse_ints(seeds, "seeds")), tuple(parse_floats(denoise, "denoise_values", 0.01, 1.0)),
                 tuple(parse_floats(cfg, "cfg_values", 0.0, 100.0)))


def steps_for(denoise: float, total_steps: int) -> int:
    """Steps that an encode/replay at ``denoise`` runs when the full chain has ``total_steps``
    (ComfyUI's denoise: round(total * denoise), at least 1)."""
    return max(1, int(round(total_steps * denoise)))


def evals_per_step(cfg: float) -> int:
    return 1 if math.isclose(cfg, 1.0) else 2


def count_evaluations(sweep: Sweep, total_steps: int, encode_cfg: float = 1.0) -> dict:
    """Model evaluations (per image and step) of the naive product and of the shared sweep."""
    naive = shared = 0
    for _s, d in sweep.encodes:
        n = steps_for(d, total_steps)
        enc = n * evals_per_step(encode_cfg)
        dec = sum(n * evals_per_step(c) for c in sweep.cfg)
        naive += len(sweep.cfg) * enc + dec
        shared += enc + dec
    return {"candidates": len(sweep.candidates), "encodes_naive": len(sweep.candidates),
            "encodes_shared": len(sweep.encodes), "naive": naive, "shared": shared,
            "ratio": shared / naive if naive else float("nan")}


def paper_sweep() -> Sweep:
    """CycleDiffusion's official best-of-N grid (research notes A2): 15 seeds x 6 skips x 6 cfg,
    skips 15..50 of 100 steps -> denoise 0.85..0.5."""
    return Sweep(tuple(range(15)), tuple((100 - s) / 100 for s in (15, 20, 25, 30, 40, 50)),
                 (1.0, 1.5, 2.0, 3.0, 4.0, 5.0))


def split_cfg(values: Sequence[float]) -> Tuple[List[int], List[int]]:
    """Indices of the cfg values at exactly 1 (no unconditional branch) and of the others."""
    ones = [i for i, c in enumerate(values) if math.isclose(c, 1.0)]
    return ones, [i for i in range(len(values)) if i not in ones]
