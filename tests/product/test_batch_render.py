# SPDX-License-Identifier: GPL-3.0-or-later
"""scripts/batch_render.py through real ComfyUI servers: a UI workflow and a CSV table, bad rows,
resume after a crash mid-row, and a local Ray cluster of two CPU actors (each with its own server)
where one server is killed mid-run. Every row must land in the manifest exactly once."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpmtools.comfy_env import REPO, load_module
from dpmtools.graphs import Graph
from dpmtools.workflow import api_to_ui


@pytest.fixture(scope="module")
def br():
    return load_module("dpm_latent_batch_render", REPO / "scripts" / "batch_render.py")


def _workflow(object_info) -> dict:
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name="tiny_sd15.safetensors")
    e = g.node("EmptyConditioning", model=ck.out(0), tokens=4)
    img = g.node("LoadImage", image="placeholder.png")
    lat = g.node("VAEEncode", pixels=img.out(0), vae=ck.out(2))
    enc = g.node("DPMEncode", model=ck.out(0), positive=e.out(0), negative=e.out(0), latent_image=lat.out(0),
                 seed=0, steps=3, scheduler="normal", denoise=0.6, eta=0.1, cfg=1.0)
    rep = g.node("ReplayLatentWithPrompt", model=ck.out(0), positive=e.out(0), negative=e.out(0),
                 latent_code=enc.out(0), cfg=1.0)
    dec = g.node("VAEDecode", samples=rep.out(0), vae=ck.out(2))
    rk = g.node("RankByCLIP", images=dec.out(0), clip_name="tiny_clip", target_text="a photo", metric="CLIP score",
                top_k=1, rank_within="all images")
    g.node("SaveImage", images=rk.out(0), filename_prefix="batch/out")
    titles = {img.id: "Input image", enc.id: "DPM Encode", rep.id: "Replay"}
    return api_to_ui(g.prompt(), object_info, titles=titles)


def _image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:32] / 31.0
    arr = np.stack([x, y, rng.random() * np.ones_like(x)], -1)
    Image.fromarray((arr * 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def job(server, tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    (d / "wf.json").write_text(json.dumps(_workflow(server.object_info())))
    for k in range(3):
        _image(d / f"in{k}.png", k)
    return d


def _table(path: Path, rows: list[tuple]) -> None:
    lines = ["Input image.image,DPM Encode.seed,Replay.cfg"] + [",".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def _manifest(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


def test_bad_rows_and_resume_after_a_crash(br, server, job):
    _table(job / "t.csv", [("in0.png", 1, 1.0), ("missing.png", 2, 1.0), ("in1.png", "abc", 1.0),
                           ("in2.png", 3, 1.5)])
    out = job / "out"
    assert br.main([str(job / "wf.json"), str(job / "t.csv"), "--out", str(out), "--server", server.url]) == 0
    m = _manifest(out)
    assert [e["row"] for e in m] == [1, 2, 3, 4]
    assert "Input image.image" in m[1]["error"] and "no file" in m[1]["error"]
    assert "DPM Encode.seed: 'abc' is not a valid INT" in m[2]["error"]
    for e in (m[0], m[3]):
        assert e["error"] is None and len(e["files"]) == 1 and isinstance(e["score"], float)
        with Image.open(out / e["files"][0]) as im:
            assert im.size == (32, 32)
    assert m[0]["params"] == {"Input image.image": "in0.png", "DPM Encode.seed": "1", "Replay.cfg": "1.0"}
    assert (out / "contact_sheet.png").is_file()

    # a crash mid-row 4: its line was torn and its folder half written; rows 1-3 are not redone
    first = (out / m[0]["files"][0]).stat().st_mtime_ns
    lines = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])
    (out / "row_0004" / "stale.png").write_bytes(b"junk")
    assert br.main([str(job / "wf.json"), str(job / "t.csv"), "--out", str(out), "--server", server.url]) == 0
    m2 = _manifest(out)
    assert [e["row"] for e in m2] == [1, 2, 3, 4]
    assert m2[3]["error"] is None and m2[3]["files"] == m[3]["files"]
    assert sorted(p.name for p in (out / "row_0004").iterdir()) == [Path(m[3]["files"][0]).name]
    assert (out / m[0]["files"][0]).stat().st_mtime_ns == first
    # same row, same settings: the same bits
    assert (out / m2[3]["files"][0]).read_bytes() == (out / m[3]["files"][0]).read_bytes()


def test_ray_actor_server_killed_mid_run(br, job, model_dirs, capsys):
    pytest.importorskip("ray")
    rows = [(f"in{k % 3}.png", k, 1.0) for k in range(6)]
    _table(job / "r.csv", rows)
    out = job / "ray_out"
    killed = {}

    def killer():
        deadline = time.time() + 400
        pid_file = out / ".server" / "actor0.pid"
        while time.time() < deadline and not killed:
            man = out / "manifest.jsonl"
            if pid_file.is_file() and man.is_file() and man.read_text().count("\n") >= 1:
                pid = int(pid_file.read_text())
                os.killpg(pid, signal.SIGKILL)
                killed["pid"] = pid
                return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    code = br.main([str(job / "wf.json"), str(job / "r.csv"), "--out", str(out), "--ray", "--actors", "2",
                    "--ray-cpus", "2", "--object-store-mb", "100", "--models", str(model_dirs["checkpoints"].parent)])
    t.join(timeout=5)
    assert code == 0 and killed, killed
    m = _manifest(out)
    assert sorted(e["row"] for e in m) == [1, 2, 3, 4, 5, 6]  # each row exactly once
    assert all(e["error"] is None and len(e["files"]) == 1 for e in m), m
    assert "goes to another actor" in capsys.readouterr().err
