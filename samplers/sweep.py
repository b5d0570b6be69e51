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
from typing import List, Optional, Sequence, Tuple

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


_LABEL = re.compile(r"^seed (\S+) d (\S+) cfg (\S+)$")


def cfg_count(labels: Sequence[str]) -> Optional[int]:
    """How many cfg values a list of ``Sweep.labels`` sweeps (the cfg cycles fastest: one label per encode
    and cfg), or None when the labels are not a whole sweep's."""
    parts = [_LABEL.match(str(t).strip()) for t in labels]
    if not parts or not all(parts):
        return None
    cfgs = [m.group(3) for m in parts]
    n_cfg = len(dict.fromkeys(cfgs))
    if len(cfgs) % n_cfg or cfgs != cfgs[:n_cfg] * (len(cfgs) // n_cfg):
        return None
    return n_cfg


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


# ---------------------------------------------------------------------------- successive halving
@dataclass(frozen=True)
class Halving:
    """Score every live candidate by the CLIP score of its predicted x0 at each checkpoint (a fraction of
    its own replay's steps) and keep the best ``keep`` fraction of the live ones (at least one per group)."""
    checkpoints: Tuple[float, ...]
    keep: Tuple[float, ...]

    def stage_ends(self, steps: int) -> List[int]:
        """The step after which each checkpoint scores, for a replay of ``steps`` steps (at least 1, at most
        ``steps``; non-decreasing), then ``steps`` (the end of the chain)."""
        ends = [min(steps, max(1, int(round(f * steps)))) for f in self.checkpoints]
        return ends + [steps]

    def kept(self, alive: int, stage: int) -> int:
        return max(1, min(alive, int(math.ceil(self.keep[stage] * alive - 1e-9))))

    def text(self) -> str:
        return ", ".join(f"{fmt(f)}:{fmt(k)}" for f, k in zip(self.checkpoints, self.keep))


def parse_halving(checkpoints: str, keep: str) -> Halving:
    """checkpoints '0.3, 0.6' (fractions of each replay's steps, increasing) and keep '0.25, 0.5' (the fraction
    of the live candidates kept at each); an empty checkpoints list is the full sweep (no pruning)."""
    cps = parse_floats(checkpoints, "checkpoints", 0.0, 1.0) if (checkpoints or "").strip() else []
    if not cps:
        return Halving((), ())
    ks = [float(t) for t in _split_checked(keep, "keep")]
    if len(ks) == 1 and len(cps) > 1:
        ks = ks * len(cps)
    if len(ks) != len(cps):
        raise SweepError(f"keep: {len(ks)} values for {len(cps)} checkpoints; give one keep fraction per "
                         "checkpoint (or one for all)")
    if any(not 0.0 < k <= 1.0 for k in ks):
        raise SweepError("keep: each fraction must be in (0, 1], e.g. '0.25, 0.5'")
    if any(not 0.0 < f < 1.0 for f in cps) or any(b <= a for a, b in zip(cps, cps[1:])):
        raise SweepError("checkpoints: fractions of the chain strictly between 0 and 1, increasing, "
                         "e.g. '0.3, 0.6'")
    return Halving(tuple(cps), tuple(ks))


def _split_checked(text: str, name: str) -> List[str]:
    toks = _split(text or "")
    for t in toks:
        try:
            v = float(t)
        except ValueError:
            raise SweepError(f"{name}: {t!r} is not a number; write e.g. '0.25, 0.5'") from None
        if not math.isfinite(v):
            raise SweepError(f"{name}: {t} is not finite")
    if not toks:
        raise SweepError(f"{name}: give at least one fraction, e.g. '0.25, 0.5'")
    return toks


def prune(scores: Sequence[float], alive: Sequence[int], groups: Sequence[Sequence[int]], n_keep) -> List[int]:
    """The live candidates kept: in each group, the ``n_keep(live in group)`` best by score (ties: input order)."""
    live = set(alive)
    out: List[int] = []
    for g in groups:
        members = [i for i in g if i in live]
        if not members:
            continue
        order = sorted(members, key=lambda i: (-float(scores[i]), i))
        out.extend(order[:n_keep(len(members))])
    return sorted(out)


def count_halving(sweep: Sweep, total_steps: int, halving: Halving, encode_cfg: float = 1.0,
                  group_size: int = 0) -> dict:
    """Model evaluations of the shared sweep with successive halving, against the naive product.

    Survivors are not known before the images are, so two counts: ``expected`` (every candidate equally
    likely to survive: each stage keeps the same fraction of every encode's candidates at every cfg) and
    ``worst`` (each stage keeps the costliest live candidates: cfg != 1 and the longest replays).
    ``group_size`` 0: one group of all candidates (rank_within 'all images')."""
    base = count_evaluations(sweep, total_steps, encode_cfg)
    cands = sweep.candidates
    enc = sum(steps_for(d, total_steps) * evals_per_step(encode_cfg) for _s, d in sweep.encodes)
    per_step = [evals_per_step(c) for _s, _d, c in cands]
    ends = [halving.stage_ends(steps_for(d, total_steps)) for _s, d, _c in cands]

    def seg(i, k):  # evaluations of candidate i in stage k
        lo = 0 if k == 0 else ends[i][k - 1]
        return (ends[i][k] - lo) * per_step[i]

    n = len(cands)
    stages = len(halving.checkpoints)
    # expected: fraction alive in stage k = prod of keep fractions before it (ceil-rounded on the whole group)
    alive_n, expected = n, 0.0
    for k in range(stages + 1):
        frac = alive_n / n
        expected += frac * sum(seg(i, k) for i in range(n))
        if k < stages:
            alive_n = halving.kept(alive_n, k)
    # worst: keep the candidates with the most evaluations left
    alive, worst = list(range(n)), 0
    for k in range(stages + 1):
        worst += sum(seg(i, k) for i in alive)
        if k < stages:
            left = {i: sum(seg(i, j) for j in range(k + 1, stages + 1)) for i in alive}
            alive = prune(left, alive, [list(range(n))], lambda m, k=k: halving.kept(m, k))
    return {"candidates": n, "naive": base["naive"], "shared": base["shared"], "encode": enc,
            "expected": enc + expected, "worst": enc + worst,
            "ratio_expected": (enc + expected) / base["naive"], "ratio_worst": (enc + worst) / base["naive"],
            "survivors": alive_n}


def simulate_halving(scores_at: dict, final: Sequence[float], groups: Sequence[Sequence[int]],
                     halving: Halving) -> Tuple[List[int], List[int]]:
    """What a pruned sweep picks, from a full sweep's scores (replay is deterministic, so pruning changes
    only which candidates finish): ``scores_at[f][i]`` is candidate i's score at checkpoint fraction f,
    ``final[i]`` its final score. Returns (the pick of each group, the checkpoint index where each
    candidate was dropped, -1 for the finished)."""
    n = len(final)
    alive = list(range(n))
    stage_of = [-1] * n
    for k, f in enumerate(halving.checkpoints):
        kept = prune(scores_at[f], alive, groups, lambda m, k=k: halving.kept(m, k))
        for i in set(alive) - set(kept):
            stage_of[i] = k
        alive = kept
    live = set(alive)
    picks = [min((i for i in g if i in live), key=lambda i: (-float(final[i]), i)) for g in groups]
    return picks, stage_of


def replay_evaluations(steps: Sequence[int], cfgs: Sequence[float], stage_of: Sequence[int], halving: Halving) -> int:
    """Replay model evaluations of candidates with these step counts and cfg values, each run up to the
    checkpoint where it was dropped (``stage_of`` -1: to the end)."""
    return sum(halving.stage_ends(n)[k] * evals_per_step(c) for n, c, k in zip(steps, cfgs, stage_of))
