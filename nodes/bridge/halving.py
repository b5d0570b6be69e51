# SPDX-License-Identifier: GPL-3.0-or-later
"""DPM Pruned Replay inside ComfyUI: a sweep's codes replayed at every cfg with successive halving.

Every candidate (code x cfg x batch image) is replayed up to the first checkpoint; there the model's
predicted x0 of its last step (no extra model call) is decoded with the VAE and scored by CLIP as Rank
Images by CLIP scores; the best ``keep`` fraction of each group goes on to the next checkpoint, the
others stop. Replay is deterministic given the code, so a survivor's final image is the one the full sweep
makes (up to the rounding of another batch composition): pruning changes which candidates finish,
never what they look like.

Output layout is Replay (cfg_values) + VAE Decode's: one IMAGE batch per code, cfg-major; a dropped
candidate's image is its decoded predicted x0 at the checkpoint where it stopped. The ``pruning``
record tells Rank Images by CLIP which candidates finished (only they can be picked) and where each
of the others was dropped (shown on the contact sheet).
"""
from __future__ import annotations

import torch

from ...guidance.clip_rank import batch_groups, check_options, clip_scores
from ...samplers import blend, replay_step
from ...samplers.sweep import Halving, SweepError, evals_per_step, parse_halving, prune, split_cfg
from . import clip_models as CM
from . import sampling as B
from .codes import _per_image_cfg, parse_cfg_values
from .lists import clip_pixels, first, flat_images


def halving_of(checkpoints: str, keep: str) -> Halving:
    try:
        return parse_halving(checkpoints, keep)
    except SweepError as e:
        raise B.NodeInputError(str(e)) from None


def _run_rows(model, positive, negative, code, rows, x, i0, i1, values, bsz, count):
    """Steps i0..i1-1 of the candidate rows ``rows`` of ``code`` from states ``x``; returns (x, last denoised).
    cfg-1 rows run as one batch without the unconditional branch, the others with a per-image scale
    (once per value when the model already has a custom CFG function, to keep that patch)."""
    ones, others = split_cfg([values[r // bsz] for r in rows])
    custom = "sampler_cfg_function" in model.model_options
    groups = [ones] if ones else []
    if others and custom:
        by_value: dict = {}
        for j in others:
            by_value.setdefault(values[rows[j] // bsz], []).append(j)
        groups += list(by_value.values())
    elif others:
        groups.append(others)
    x_out, d_out = x.clone(), x.clone()
    for js in groups:
        sub = code.rows([rows[j] % bsz for j in js])  # row r is cfg r // bsz of the code's image r % bsz
        scales = [values[rows[j] // bsz] for j in js]
        m, cfg = model, scales[0]
        if len(set(scales)) > 1:
            m, cfg = _per_image_cfg(model, torch.tensor(scales, dtype=torch.float32)), max(scales)
        held = {}

        def work(denoise_fn, x0, _callback, _guider, sub=sub, start=x[js]):
            c = sub.to(device=x0.device, dtype=torch.float32)
            xi, d = start.to(device=x0.device, dtype=torch.float32), None
            for i in range(i0, i1):
                xi, d = replay_step(denoise_fn, xi, i, c)
            held["x"], held["d"] = xi.cpu(), d.cpu()
            return x0

        B.run_in_comfy(m, positive, negative, cfg, torch.zeros(sub.shape), code.sigmas, work, 0, None)
        x_out[js], d_out[js] = held["x"], held["d"]
        count["replay"] += (i1 - i0) * len(js) * evals_per_step(cfg)
    return x_out, d_out


def pruned_replay(model, positive, negative, codes, cfg_values, vae, clip_name, target_text, metric, source_text,
                  source_image, checkpoints, keep, rank_within):
    """Returns (one IMAGE batch per code, the pruning record, a text report)."""
    model, positive, negative, vae = first(model), first(positive), first(negative), first(vae)
    cfg_values, clip_name, target_text, metric = first(cfg_values), first(clip_name), first(target_text), first(metric)
    source_text, checkpoints, keep, rank_within = first(source_text, ""), first(checkpoints), first(keep), \
        first(rank_within)
    codes = [c for c in (codes if isinstance(codes, list) else [codes]) if c is not None]
    if not codes:
        raise B.NodeInputError("latent_code: no code to replay; connect DPM Encode (driven by DPM Sweep)")
    halving = halving_of(checkpoints, keep)
    values = parse_cfg_values(cfg_values) if (cfg_values or "").strip() else [1.0]
    try:
        check_options(metric, rank_within, target_text)
    except ValueError as e:
        raise B.NodeInputError(str(e)) from None
    bsz = codes[0].batch_size
    for k, code in enumerate(codes):
        B.check_code_for_model(model, code, f"latent_code (item {k})")
        if code.batch_size != bsz:
            raise B.NodeInputError(f"latent_code: item {k} has batch {code.batch_size}, item 0 has {bsz}; "
                                   "encode every candidate from the same images")
    for conds, name in ((positive, "positive"), (negative, "negative")):
        for c in conds or []:
            if isinstance(c[0], torch.Tensor) and c[0].shape[0] != 1:
                raise B.NodeInputError(f"{name}: DPM Pruned Replay needs one prompt (conditioning batch 1); "
                                       "it replays a changing subset of the images")
    src = flat_images(source_image, "source_image")
    if metric == "directional CLIP":
        if not src or not (source_text or "").strip():
            raise B.NodeInputError("source_image / source_text: directional CLIP needs both (the image before the "
                                   "edit and what it shows); connect them, or choose metric 'CLIP score'")
        if len(src) not in (1, bsz):
            raise B.NodeInputError(f"source_image: {len(src)} images; give one, or one per batch index ({bsz})")
    nv, per_code = len(values), len(values) * bsz
    n = len(codes) * per_code
    groups = batch_groups([bsz] * (n // bsz), rank_within)
    # candidate rows of a code are cfg-major (row r: cfg r // bsz, image r % bsz); the code is never tiled
    # (a sweep's codes, once per cfg, would not fit in memory at SD sizes): each run picks its rows
    states = [torch.cat([_start(c).cpu().float()] * nv) for c in codes]
    ends = [halving.stage_ends(c.steps) for c in codes]
    fmt = model.get_model_object("latent_format")
    count = {"replay": 0}
    full = sum(c.steps * sum(evals_per_step(v) for v in values) * bsz for c in codes)
    alive = list(range(n))
    stage_of = [-1] * n                      # -1: finished; k: dropped at checkpoint k
    stage_scores = [[None] * len(halving.checkpoints) for _ in range(n)]
    images: list = [[None] * per_code for _ in codes]
    bundle, last = None, {}
    for k in range(len(halving.checkpoints) + 1):
        for ci, code in enumerate(codes):
            rows = [i - ci * per_code for i in alive if ci * per_code <= i < (ci + 1) * per_code]
            if not rows:
                continue
            i0 = 0 if k == 0 else ends[ci][k - 1]
            i1 = ends[ci][k]
            if i1 > i0:
                x, d = _run_rows(model, positive, negative, code, rows, states[ci][rows], i0, i1, values, bsz, count)
                states[ci][rows] = x
                last.update({ci * per_code + r: d[j] for j, r in enumerate(rows)})
        if k == len(halving.checkpoints):
            break
        pics = vae.decode(fmt.process_out(torch.stack([last[i] for i in alive]))).cpu().float()
        pics = pics.reshape(-1, *pics.shape[-3:])
        if bundle is None:
            bundle, _patcher = CM.load_clip(clip_name)
        src_t = None
        if metric == "directional CLIP":
            srcs = [src[0] if len(src) == 1 else src[i % bsz] for i in alive]
            src_t = clip_pixels(bundle, srcs)
        scores = clip_scores(bundle, clip_pixels(bundle, list(pics)), target_text, metric, source_image=src_t, source_text=source_text)
        score_of = {i: float(s) for i, s in zip(alive, scores)}
        for i in alive:
            stage_scores[i][k] = score_of[i]
        kept = prune(score_of_all(score_of, n), alive, groups, lambda m, k=k: halving.kept(m, k))
        for j, i in enumerate(alive):
            if i not in kept:
                stage_of[i] = k
                images[i // per_code][i % per_code] = pics[j]
        alive = kept
    outs = []
    for ci, code in enumerate(codes):
        rows = [r for r in range(per_code) if stage_of[ci * per_code + r] == -1]
        if rows:
            lat = fmt.process_out(states[ci][rows])
            B.check_finite(lat, "DPM Pruned Replay", "the replayed latent", code.steps, code.steps)
            dec = vae.decode(lat).cpu().float()
            dec = dec.reshape(-1, *dec.shape[-3:])
            for j, r in enumerate(rows):
                images[ci][r] = dec[j]
        outs.append(torch.stack(images[ci]))
    record = {"n": n, "batch": bsz, "checkpoints": list(halving.checkpoints), "keep": list(halving.keep),
              "stage_of": stage_of, "stage_scores": stage_scores, "finished": [i for i in range(n) if stage_of[i] < 0],
              "replay_evaluations": count["replay"], "full_replay_evaluations": full}
    text = (f"successive halving {halving.text() or 'off'}: {len(record['finished'])} of {n} candidates finished; "
            f"replay model evaluations {count['replay']:,} of {full:,} "
            f"({count['replay'] / full:.3f} of the full sweep's replays)")
    return outs, record, text


def _start(code):
    """The replay's first state (a masked code starts from the encoder's chain outside the mask, as replay does)."""
    x = code.x_start()
    return x if code.mask is None else blend(code.mask, x, code.trajectory[0])


def score_of_all(score_of: dict, n: int) -> list:
    out = [float("-inf")] * n
    for i, s in score_of.items():
        out[i] = s
    return out


def pruning_notes(record, n: int) -> dict:
    """Rank Images by CLIP's view of a pruning record: {candidate: 'dropped at 30% (0.4123)'} for every
    dropped candidate. A record for another number of candidates is an input error."""
    if not isinstance(record, dict) or "stage_of" not in record:
        raise B.NodeInputError("pruning: connect DPM Pruned Replay's pruning output")
    if int(record["n"]) != n:
        raise B.NodeInputError(f"pruning: the record is for {record['n']} candidates but {n} images arrived; "
                               "connect the images of the same DPM Pruned Replay")
    notes = {}
    for i, k in enumerate(record["stage_of"]):
        if k >= 0:
            notes[i] = f"dropped at {record['checkpoints'][k]:.0%} ({record['stage_scores'][i][k]:.4f})"
    return notes
