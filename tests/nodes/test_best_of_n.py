# SPDX-License-Identifier: GPL-3.0-or-later
"""DPM Sweep, the several-cfg replay and Rank Images by CLIP: parsing, shared-encode savings counted
in model calls, ranking against the demo world's readers, and the list wiring through a server."""
from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from dpmtools.comfy_env import REPO, load_module
from dpmtools.graphs import Graph

DEMO_CLIP = REPO / "demo" / "models" / "clip_energy" / "dpm_world_clip"


@pytest.fixture(scope="module")
def mods(pack):
    return (importlib.import_module("dpm_latent.samplers.sweep"), importlib.import_module("dpm_latent.nodes.best_of_n"),
            importlib.import_module("dpm_latent.nodes.latent_codes"))


# ---------------------------------------------------------------------------- parsing and counts
def test_parse_lists_and_errors(mods):
    sw, _n, _c = mods
    assert sw.parse_ints("0-3, 7 9-13:2", "seeds") == [0, 1, 2, 3, 7, 9, 11, 13]
    assert sw.parse_ints("5,5,1", "seeds") == [5, 1]
    assert sw.parse_floats("1; 1.5 2,", "cfg_values", 0, 100) == [1.0, 1.5, 2.0]
    for bad, msg in (("", "at least one"), ("3-1", "empty"), ("a", "not an integer"), ("-1", "not an integer")):
        with pytest.raises(sw.SweepError, match=f"seeds: .*{msg}"):
            sw.parse_ints(bad, "seeds")
    with pytest.raises(sw.SweepError, match="denoise_values: 1.5 is outside"):
        sw.make_sweep("0", "0.5, 1.5", "1")
    s = sw.make_sweep("0-1", "0.5, 0.8", "1, 2, 3")
    assert len(s.candidates) == 12 and len(s.encodes) == 4
    assert s.candidates[:4] == [(0, 0.5, 1.0), (0, 0.5, 2.0), (0, 0.5, 3.0), (0, 0.8, 1.0)]
    assert s.labels()[1] == "seed 0 d 0.5 cfg 2"


def test_paper_protocol_count(mods):
    sw, _n, _c = mods
    c = sw.count_evaluations(sw.paper_sweep(), 100)
    assert c["candidates"] == 540 and c["encodes_shared"] == 90
    # per (seed, skip) with n steps: naive 6n (encodes) + 11n (cfg 1 once, 5 cfg > 1 twice); shared n + 11n
    assert c["ratio"] == pytest.approx(12 / 17) and c["ratio"] <= 0.75


class Counter:
    """Counts denoiser calls and images through them (a unet function wrapper on a model clone)."""

    def __init__(self):
        self.calls = self.images = 0

    def patch(self, model):
        m = model.clone()

        def wrapper(apply, args):
            self.calls += 1
            self.images += int(args["input"].shape[0])
            return apply(args["input"], args["timestep"], **args["c"])

        m.set_model_unet_function_wrapper(wrapper)
        return m


@pytest.fixture(scope="module")
def sd15(model_dirs):
    import comfy.sd

    with torch.inference_mode():
        m, _c, _v, _ = comfy.sd.load_checkpoint_guess_config(
            str(model_dirs["checkpoints"] / "tiny_sd15.safetensors"), output_vae=True, output_clip=False)
    return m


def test_shared_sweep_saves_model_evaluations(mods, sd15):
    sw, nodes, cyc = mods
    cond = cyc.EmptyConditioning.execute(sd15, 4).result[0]
    # a conditioning that differs from the negative one, so that cfg > 1 matters
    pos = [[torch.randn(1, 4, 768, generator=torch.Generator().manual_seed(3)), {}]]
    lat = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    seeds, denoise, steps, cfg_text, labels, count = nodes.DPMSweep.execute("0-1", "0.5, 0.8", "1, 2, 3", 10).result
    assert (seeds, denoise, steps, cfg_text, count) == ([0, 0, 1, 1], [0.5, 0.8, 0.5, 0.8], [5, 8, 5, 8], "1, 2, 3", 12)
    shared, naive = Counter(), Counter()
    ms, mn = shared.patch(sd15), naive.patch(sd15)
    out_shared, out_naive = [], []
    with torch.inference_mode():
        for s, d, n in zip(seeds, denoise, steps):
            code = cyc.DPMEncode.execute(ms, cond, cond, lat, s, n, "normal", d, 0.1, 1.0).result[0]
            out_shared.append(cyc.ReplayLatentWithPrompt.execute(ms, pos, cond, code, 7.0, cfg_values=cfg_text).result[0]["samples"])
            for c in (1.0, 2.0, 3.0):  # the naive product: one encode per candidate
                code_n = cyc.DPMEncode.execute(mn, cond, cond, lat, s, n, "normal", d, 0.1, 1.0).result[0]
                out_naive.append(cyc.ReplayLatentWithPrompt.execute(mn, pos, cond, code_n, c).result[0]["samples"])
    a, b = torch.cat(out_shared), torch.cat(out_naive)
    assert a.shape == b.shape == (12, 4, 8, 8)
    # same candidates in the same order (the batched per-image CFG differs only by rounding)
    assert float((a - b).abs().max()) < 1e-4 * float(b.abs().max())
    assert float((a[1] - a[2]).abs().max()) > 1e-3  # cfg 2 and 3 differ
    # the sweep over a 10-step chain: encodes 5 and 8 steps
    grid = sw.Sweep((0, 1), (0.5, 0.8), (1.0, 2.0, 3.0))
    want = sw.count_evaluations(grid, 10)
    assert naive.images == want["naive"] == 2 * (3 * 13 + 5 * 13)
    assert shared.images == want["shared"] == 2 * (13 + 5 * 13)
    assert shared.images / naive.images == pytest.approx(78 / 104) and shared.images / naive.images <= 0.75
    # the cfg > 1 values run as one batch: per replay and step one call for cfg 1, one for cfg 2 and 3
    assert shared.calls == 2 * (13 + 13 + 13)
    assert naive.calls == 2 * (3 * 13 + 13 + 13 + 13)


def test_replay_cfg_values_errors(mods, sd15):
    _sw, _nodes, cyc = mods
    cond = cyc.EmptyConditioning.execute(sd15, 4).result[0]
    lat = {"samples": torch.randn(1, 4, 8, 8)}
    with torch.inference_mode():
        code = cyc.DPMEncode.execute(sd15, cond, cond, lat, 0, 2, "normal", 0.5, 0.1, 1.0).result[0]
        with pytest.raises(ValueError, match="cfg_values: 'x' is not a number"):
            cyc.ReplayLatentWithPrompt.execute(sd15, cond, cond, code, 1.0, cfg_values="1, x")
        with pytest.raises(ValueError, match="cfg_values: 500 is outside"):
            cyc.ReplayLatentWithPrompt.execute(sd15, cond, cond, code, 1.0, cfg_values="500")


# ---------------------------------------------------------------------------- ranking
def _world():
    return load_module("dpm_latent_demo_world", REPO / "demo" / "world.py")


def test_rank_agrees_with_the_world_readers(pack):
    """The demo CLIP ranks, for 'a red square', every image the readers call a red square above
    every other image; directional CLIP from a red circle does too."""
    from dpm_latent.guidance import load_clip_folder
    from dpm_latent.guidance.clip_rank import clip_scores, rank

    w = _world()
    imgs, _attrs = w.sample_world(48, seed=11)
    read = w.read_attributes(imgs)
    good = [i for i, a in enumerate(read) if a["shape"] == "square" and a["colour"] == "red"]
    assert 2 <= len(good) <= 12, len(good)
    bundle = load_clip_folder(DEMO_CLIP)
    for metric, kw in (("CLIP score", {}),
                       ("directional CLIP", {"source_image": w.render("circle", "red", 32, 32, 12)[0][None],
                                             "source_text": "a red circle"})):
        scores = clip_scores(bundle, imgs, "a red square", metric, **kw)
        order = rank(scores)
        assert set(order[:len(good)]) == set(good), (metric, order[:len(good)], good)


def test_rank_node_in_process(pack):
    """Top-k, scores, best index, the sheet and the errors, with the demo CLIP registered by path."""
    import folder_paths

    nodes = importlib.import_module("dpm_latent.nodes.best_of_n")
    paths, _ = folder_paths.folder_names_and_paths["clip_energy"]
    root = str(DEMO_CLIP.parent)
    if root not in paths:
        paths.append(root)
    w = _world()
    sq, _ = w.render("square", "blue", 30, 30, 10)
    ci, _ = w.render("circle", "blue", 30, 30, 10)
    red, _ = w.render("square", "red", 30, 30, 10)
    batch1 = torch.stack([ci, red]).movedim(1, -1)
    batch2 = sq[None].movedim(1, -1)
    res = nodes.RankByCLIP.execute([batch1, batch2], ["dpm_world_clip"], ["a blue square"], ["CLIP score"], [2], ["all images"],
                                   labels=["circle", "red sq", "blue sq"])
    top, scores, best, sheet, text = res.result
    assert best == 2 and top.shape == (2, 64, 64, 3) and torch.equal(top[0], batch2[0])
    assert scores[0] >= scores[1] and len(scores) == 2
    assert sheet.shape == (1, 2 * (128 + 30), 2 * 128, 3) and float(sheet.std()) > 0.05
    assert text.splitlines()[1].endswith("[2] blue sq")
    with pytest.raises(ValueError, match="directional CLIP needs both"):
        nodes.RankByCLIP.execute([batch1], ["dpm_world_clip"], ["a blue square"], ["directional CLIP"], [1], ["all images"])
    with pytest.raises(ValueError, match="labels: 4 labels for 3 images"):
        nodes.RankByCLIP.execute([batch1, batch2], ["dpm_world_clip"], ["x"], ["CLIP score"], [1], ["all images"], labels=list("abcd"))
    # a batch of 2 input images swept over 2 candidates: the best per input image
    res = nodes.RankByCLIP.execute([torch.stack([ci, red]).movedim(1, -1), torch.stack([sq, ci]).movedim(1, -1)],
                                   ["dpm_world_clip"], ["a square"], ["CLIP score"], [1], ["each batch index"],
                                   labels=["cand A", "cand B"])
    top, scores, best, _sheet, text = res.result
    assert top.shape[0] == 2 and best == 2 and torch.equal(top[0], sq.movedim(0, -1)), text
    assert torch.equal(top[1], red.movedim(0, -1)) and "[2] cand B [0]" in text
    with pytest.raises(ValueError, match="clip_name: no CLIP folder named 'nope'"):
        nodes.RankByCLIP.execute([batch1], ["nope"], ["x"], ["CLIP score"], [1], ["all images"])


def test_rank_groups_replays_at_several_cfg_by_input_image(pack):
    """Replay with cfg_values gives one batch per code holding every cfg for every input image, cfg-major.
    With 'each batch index' and DPM Sweep's labels (which tell the cfg count) Rank ranks per input image
    (position modulo the image count), not per position in that batch; the labels get the image index.
    Without sweep labels the batches stay as they are (a plain batch with 2 sources for 4 images is still
    refused)."""
    import folder_paths

    nodes = importlib.import_module("dpm_latent.nodes.best_of_n")
    paths, _ = folder_paths.folder_names_and_paths["clip_energy"]
    if str(DEMO_CLIP.parent) not in paths:
        paths.append(str(DEMO_CLIP.parent))
    w = _world()
    sq, ci, red = (w.render(s, c, 30, 30, 10)[0].movedim(0, -1) for s, c in
                   (("square", "blue"), ("circle", "blue"), ("square", "red")))
    rank = nodes.RankByCLIP.execute
    # 2 codes x cfg (1, 2) x 2 input images; image 0 is at positions 0, 2 of each batch, image 1 at 1, 3
    code0 = torch.stack([ci, red, sq, ci])   # image 0's best: code 0, cfg 2 (candidate 2)
    code1 = torch.stack([red, ci, ci, sq])   # image 1's best: code 1, cfg 2 (candidate 7)
    _s, _d, _k, _cfg, labels, _n = importlib.import_module("dpm_latent.nodes.best_of_n").DPMSweep.execute(
        "0-1", "0.5", "1, 2", 10).result
    assert labels == ["seed 0 d 0.5 cfg 1", "seed 0 d 0.5 cfg 2", "seed 1 d 0.5 cfg 1", "seed 1 d 0.5 cfg 2"]
    top, _scores, best, _sheet, text = rank([code0, code1], ["dpm_world_clip"], ["a blue square"], ["CLIP score"], [1],
                                            ["each batch index"], labels=labels).result
    assert top.shape[0] == 2 and torch.equal(top[0], sq) and torch.equal(top[1], sq), text
    assert best == 2 and "for each of 2 batch indices" in text, text
    assert "[2] seed 0 d 0.5 cfg 2 [0]" in text and "[7] seed 1 d 0.5 cfg 2 [1]" in text, text
    # with one source image per input image (directional CLIP)
    src = torch.stack([red, red])
    res = rank([code0, code1], ["dpm_world_clip"], ["a blue square"], ["directional CLIP"], [1], ["each batch index"],
               ["a red square"], [src], labels=labels)
    assert res.ui["dpm_rank"][0]["best_indices"] == [2, 7], res.result[4]
    # one input image (B = 1): the sweep's candidates are one group, whatever their cfg
    res = rank([torch.stack([ci, red]), torch.stack([red, sq])], ["dpm_world_clip"], ["a blue square"], ["CLIP score"],
               [1], ["each batch index"], labels=labels)
    assert res.ui["dpm_rank"][0]["best_indices"] == [3] and res.result[0].shape[0] == 1, res.result[4]
    # no sweep labels: a plain batch of 4 input images with 2 sources is refused, as before
    with pytest.raises(ValueError, match=r"source_image: 2 images; give one, one per batch index \(4\)"):
        rank([code0, code1], ["dpm_world_clip"], ["a blue square"], ["directional CLIP"], [1], ["each batch index"],
             ["a red square"], [src])


# ---------------------------------------------------------------------------- through a server
def sweep_graph(image: str, clip: str = "tiny_clip", seeds="0-1", denoise="0.5, 0.8", cfg="1, 2", chain=6):
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    cl = g.node("CLIPLoader", clip_name="tiny_clip_l.safetensors", type="stable_diffusion")
    src_t = g.node("CLIPTextEncode", clip=cl.out(0), text="a photo of a disc")
    tgt_t = g.node("CLIPTextEncode", clip=cl.out(0), text="a photo of a square")
    img = g.node("LoadImage", image=image)
    lat = g.node("VAEEncode", pixels=img.out(0), vae=ck.out(2))
    sw = g.node("DPMSweep", seeds=seeds, denoise_values=denoise, cfg_values=cfg, chain_steps=chain)
    enc = g.node("DPMEncode", model=ck.out(0), positive=src_t.out(0), negative=src_t.out(0), latent_image=lat.out(0),
                 seed=sw.out(0), steps=sw.out(2), scheduler="normal", denoise=sw.out(1), eta=0.1, cfg=1.0)
    rep = g.node("ReplayLatentWithPrompt", model=ck.out(0), positive=tgt_t.out(0), negative=src_t.out(0),
                 latent_code=enc.out(0), cfg=1.0, cfg_values=sw.out(3))
    dec = g.node("VAEDecode", samples=rep.out(0), vae=ck.out(2))
    rk = g.node("RankByCLIP", images=dec.out(0), clip_name=clip, target_text="a photo of a square",
                metric="directional CLIP", top_k=1, rank_within="all images", source_text="a photo of a disc",
                source_image=img.out(0),
                labels=sw.out(4))
    best = g.node("SaveImage", images=rk.out(0), filename_prefix="sweep/best")
    sheet = g.node("SaveImage", images=rk.out(3), filename_prefix="sweep/sheet")
    return g, rk.id, best.id, sheet.id


def test_sweep_graph_runs_through_the_server(server):
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    arr = torch.stack([x, y, 1 - x * y], -1)
    Image.fromarray((arr.numpy() * 255).astype("uint8")).save(Path(server.input_dir) / "sweep_in.png")
    g, rk, best, sheet = sweep_graph("sweep_in.png")
    entry = server.run(g.prompt(), timeout=300)
    info = entry["outputs"][rk]["dpm_rank"][0]
    assert len(info["scores"]) == 8 and all(math.isfinite(s) for s in info["scores"])
    assert info["best_score"] == max(info["scores"]) and info["scores"][info["best_index"]] == info["best_score"]
    labels = [f"seed {s} d {d} cfg {c}" for s in (0, 1) for d in ("0.5", "0.8") for c in (1, 2)]
    assert info["best_label"] == labels[info["best_index"]]
    f = entry["outputs"][sheet]["images"][0]
    with Image.open(Path(server.output_dir) / f["subfolder"] / f["filename"]) as im:
        assert im.size == (3 * 128, 3 * (128 + 30))
    assert len(entry["outputs"][best]["images"]) == 1


def test_schema_lists_and_tooltips(server):
    info = server.object_info()
    sw, rk = info["DPMSweep"], info["RankByCLIP"]
    assert sw["output_is_list"] == [True, True, True, False, True, False]
    assert rk["output_is_list"] == [False, True, False, False, False]
    assert rk["output_node"] is True
    assert "cfg_values" in info["ReplayLatentWithPrompt"]["input"]["optional"]
    for n in ("DPMSweep", "RankByCLIP", "ReplayLatentWithPrompt"):
        for group in ("required", "optional"):
            for name, spec in info[n]["input"].get(group, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), (n, name)


# ---------------------------------------------------------------------------- successive halving
def test_halving_schedule_parsing_and_counts(mods):
    sw, _n, _c = mods
    h = sw.parse_halving("0.2, 0.4", "0.25, 0.5")
    assert h.stage_ends(85) == [17, 34, 85] and h.stage_ends(2) == [1, 1, 2]
    assert h.kept(540, 0) == 135 and h.kept(135, 1) == 68 and h.kept(1, 0) == 1
    assert sw.parse_halving("", "").checkpoints == () and sw.parse_halving("0.3, 0.6", "0.5").keep == (0.5, 0.5)
    for cp, keep, msg in (("0.6, 0.3", "0.5", "checkpoints: .*increasing"), ("1", "0.5", "checkpoints"),
                          ("0.3", "0", "keep: each fraction"), ("0.3, 0.6", "0.5, 0.5, 0.5", "keep: 3 values for 2"),
                          ("0.3", "x", "keep: 'x' is not a number")):
        with pytest.raises(sw.SweepError, match=msg):
            sw.parse_halving(cp, keep)
    # the paper's 540 grid at a two-checkpoint schedule (0.2 keeping 0.25, 0.4 keeping 0.5): <= 0.35 of the naive evaluations even if the costliest
    # candidates survive (encodes 90 x n; 135 candidates to 40 %, 68 to the end)
    c = sw.count_halving(sw.paper_sweep(), 100, h)
    assert c["naive"] == 107100 and c["survivors"] == 68
    assert c["ratio_expected"] == pytest.approx(0.269, abs=5e-4) and c["ratio_worst"] == pytest.approx(0.295, abs=5e-4)
    assert c["ratio_worst"] <= 0.35
    # simulation: two groups of three; the 0.5 checkpoint keeps 2 of 3, the pick is the best finished one
    picks, stage_of = sw.simulate_halving({0.5: [3, 1, 2, 0, 5, 4]}, [0, 9, 1, 2, 0, 1], [[0, 1, 2], [3, 4, 5]],
                                          sw.parse_halving("0.5", "0.6"))
    assert stage_of == [-1, 0, -1, 0, -1, -1] and picks == [2, 5]
    assert sw.replay_evaluations([10, 10], [1.0, 2.0], [0, -1], sw.parse_halving("0.5", "0.6")) == 5 + 20


def test_pruned_replay_against_the_full_sweep(mods, model_dirs, gn):
    """On a small grid (2 images x 4 encodes x cfg 1, 2 = 16 candidates, ranked per image) the pruned replay's
    survivors are the full sweep's images (to rounding), its pick is what the full sweep's own checkpoint scores
    predict, the dropped are never picked, and the model evaluations are the counted ones."""
    import comfy.sd

    sw, nodes, cyc = mods
    with torch.inference_mode():
        model, _c, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(model_dirs["checkpoints"] / "tiny_sd15.safetensors"), output_vae=True, output_clip=False)
        cond = cyc.EmptyConditioning.execute(model, 4).result[0]
        pos = [[torch.randn(1, 4, 768, generator=torch.Generator().manual_seed(3)), {}]]
        src = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(1))
        lat = {"samples": vae.encode(src)}
        seeds, den, steps, cfg_text, _labels, _count = nodes.DPMSweep.execute("0-1", "0.5, 0.8", "1, 2", 10).result
        codes = [cyc.DPMEncode.execute(model, cond, cond, lat, s, k, "normal", d, 0.1, 1.0).result[0]
                 for s, d, k in zip(seeds, den, steps)]
        ref = torch.cat([vae.decode(cyc.ReplayLatentWithPrompt.execute(model, pos, cond, c, 1.0, cfg_values=cfg_text)
                                    .result[0]["samples"]) for c in codes])

        def run(cp, keep, m=model):
            return nodes.DPMPrunedReplay.execute(
                [m], [pos], [cond], codes, [cfg_text], [vae], ["tiny_clip"], ["a photo of a square"],
                ["directional CLIP"], [cp], [keep], ["each batch index"], ["a photo of a disc"], [src]).result

        full_imgs, full_rec, _ = run("", "")
        rec_imgs, rec, _ = run("0.3, 0.6", "1")
        counter = Counter()
        imgs, pr, report = run("0.3, 0.6", "0.5", counter.patch(model))
    full, recd, pruned = torch.cat(full_imgs), torch.cat(rec_imgs), torch.cat(imgs)
    n = 16
    assert full.shape == (n, 64, 64, 3) and full_rec["finished"] == list(range(n)) and rec["finished"] == list(range(n))
    assert float((full - ref).abs().max()) < 1e-4 and torch.equal(full, recd)
    groups = [list(range(b, n, 2)) for b in range(2)]
    scores_at = {f: [s[k] for s in rec["stage_scores"]] for k, f in enumerate((0.3, 0.6))}
    rank = lambda images, pruning=None: nodes.RankByCLIP.execute(  # noqa: E731
        list(images.split(4)), ["tiny_clip"], ["a photo of a square"], ["directional CLIP"], [1], ["each batch index"],
        ["a photo of a disc"], [src], pruning=pruning)
    final = rank(full, [full_rec]).ui["dpm_rank"][0]["scores"]
    want_picks, want_stage = sw.simulate_halving(scores_at, final, groups, sw.parse_halving("0.3, 0.6", "0.5"))
    assert pr["stage_of"] == want_stage
    assert sum(k == -1 for k in pr["stage_of"]) == 4 and sum(k == 0 for k in pr["stage_of"]) == 8  # 8 -> 4 -> 2 per image
    fin = pr["finished"]
    # survivors are the full sweep's images (other batch compositions: rounding only)
    assert float((pruned[fin] - full[fin]).abs().max()) < 1e-4
    top, _s, best, sheet, text = rank(pruned, [pr]).result
    assert best == want_picks[0] and torch.equal(top[0], pruned[want_picks[0]]) and torch.equal(top[1], pruned[want_picks[1]])
    assert "dropped at 30%" in text and "dropped at 60%" in text and sheet.shape[0] == 1
    # evaluations: counted by a wrapper on the model, against the record and the count model
    cand_steps = [k for k in steps for _c in (1, 2) for _b in range(2)]
    cand_cfg = [c for _k in steps for c in (1.0, 2.0) for _b in range(2)]
    want = sw.replay_evaluations(cand_steps, cand_cfg, pr["stage_of"], sw.parse_halving("0.3, 0.6", "0.5"))
    assert counter.images == pr["replay_evaluations"] == want
    assert pr["full_replay_evaluations"] == sum(k * 3 * 2 for k in steps) == 78 * 2
    assert want / pr["full_replay_evaluations"] < 0.7 and "4 of 16 candidates finished" in report
    with pytest.raises(ValueError, match="pruning: the record is for 16 candidates but 8 images"):
        rank(full[:8], [pr])



def test_halving_metrics_claims(mods):
    """docs/best-of-n.md's successive-halving figures (docs/halving_metrics.json, from bench_sweep_halving):
    the 540 grid under the target, and on the demo world (n = 16) the default schedule's picked images
    inside the full sweep's intervals; the table in the docs is the JSON's."""
    import json

    sw, _n, _c = mods
    m = json.loads((REPO / "docs" / "halving_metrics.json").read_text())
    default = sw.parse_halving("0.2, 0.5", "0.33, 0.33").text()  # DPM Pruned Replay's default schedule
    assert default == "0.2:0.33, 0.5:0.33"
    grid = m["paper_grid"][default]
    again = sw.count_halving(sw.paper_sweep(), 100, sw.parse_halving("0.2, 0.5", "0.33, 0.33"))
    assert grid["ratio_worst"] == pytest.approx(again["ratio_worst"]) and grid["ratio_worst"] <= 0.35
    d = m["demo_world"]
    assert d["n_images"] == 16 and d["candidates_per_image"] == 18
    full, pr = d["schedules"]["full"], d["schedules"][default]
    assert full["same_pick"] == 1.0 and pr["ratio_naive"] < 0.7
    for k in ("square_rate", "colour_kept", "centroid_error_px"):
        lo, hi = full[k + "_ci95"]
        assert lo <= pr[k] <= hi, (k, pr[k], full[k + "_ci95"])
        assert pr[k + "_ci95"][0] <= pr[k] <= pr[k + "_ci95"][1]
    assert pr["same_pick_ci95"][0] <= pr["same_pick"] <= pr["same_pick_ci95"][1]
    assert abs(pr["mean_directional_clip"] - full["mean_directional_clip"]) < 0.01
    doc = (REPO / "docs" / "best-of-n.md").read_text()
    assert (f"| {default} | {pr['ratio_naive']:.3f} | {pr['same_pick']:.2f} [{pr['same_pick_ci95'][0]:.2f}, "
            f"{pr['same_pick_ci95'][1]:.2f}] | {pr['square_rate']:.2f}") in doc
    assert f"**{grid['ratio_expected']:.3f}, {grid['ratio_worst']:.3f}**" in doc
