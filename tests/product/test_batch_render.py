# SPDX-License-Identifier: GPL-3.0-or-later
"""scripts/batch_render.py through real ComfyUI servers: a UI workflow and a CSV table, bad rows,
resume after a crash mid-row, rows identified by what they render (edited, inserted, deleted rows),
a runner SIGKILLed mid-run with a relative --models path (its server must die with it), and a local
Ray cluster of two CPU actors (each with its own server) where one server is killed mid-run. Every
row must land in the manifest exactly once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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


def _gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet counts as gone: it holds no memory)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


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
    row4 = out / Path(m[3]["files"][0]).parent
    assert row4.name == f"row_0004_{m[3]['key']}"
    (row4 / "stale.png").write_bytes(b"junk")
    assert br.main([str(job / "wf.json"), str(job / "t.csv"), "--out", str(out), "--server", server.url]) == 0
    m2 = _manifest(out)
    assert [e["row"] for e in m2] == [1, 2, 3, 4]
    assert m2[3]["error"] is None and m2[3]["files"] == m[3]["files"]
    assert sorted(p.name for p in row4.iterdir()) == [Path(m[3]["files"][0]).name]
    assert (out / m[0]["files"][0]).stat().st_mtime_ns == first
    # same row, same settings: the same bits
    assert (out / m2[3]["files"][0]).read_bytes() == (out / m[3]["files"][0]).read_bytes()


def test_row_identity_is_what_it_renders(br, job):
    """Pure: the key follows the cells, the input file's bytes and the workflow, not the row's position
    nor the canvas layout."""
    wf = job / "wf.json"
    sha = br.workflow_digest(wf)
    row = {"Input image.image": "in0.png", "DPM Encode.seed": "1", "Replay.cfg": "1.0"}
    a = br.Job(1, row, wf, sha, job)
    assert br.Job(7, dict(row), wf, sha, job).key == a.key
    assert br.Job(1, {**row, "DPM Encode.seed": "2"}, wf, sha, job).key != a.key
    assert a.files == {"Input image.image": br._file_sha256(job / "in0.png")}
    moved = json.loads(wf.read_text())
    for n in moved["nodes"]:
        n["pos"] = [n["pos"][0] + 100, n["pos"][1]]
    (job / "wf_moved.json").write_text(json.dumps(moved))
    assert br.workflow_digest(job / "wf_moved.json") == sha
    for n in moved["nodes"]:
        if n.get("title") == "Replay":
            n["title"] = "Replay B"
    (job / "wf_edited.json").write_text(json.dumps(moved))
    assert br.workflow_digest(job / "wf_edited.json") != sha
    d = job / "replaced"
    d.mkdir()
    _image(d / "in0.png", 9)  # same name, other pixels
    assert br.Job(1, row, wf, sha, d).key != a.key


def test_edited_inserted_and_deleted_rows(br, server, job, capsys):
    """Edit row 2, insert a row before row 1, delete row 3: only the new and the edited row render;
    row 1's result stays (unshifted, untouched) and the manifest names each file's parameters. A rerun
    of row 1 alone in a fresh folder is bit-identical."""
    out = job / "edit_out"
    run = [str(job / "wf.json"), str(job / "e.csv"), "--out", str(out), "--server", server.url]
    _table(job / "e.csv", [("in0.png", 1, 1.0), ("in1.png", 2, 1.0), ("in2.png", 3, 1.0)])
    assert br.main(run) == 0
    m = _manifest(out)
    assert [e["row"] for e in m] == [1, 2, 3] and all(e["error"] is None for e in m), m
    first = {e["row"]: e for e in m}
    mtime = (out / first[1]["files"][0]).stat().st_mtime_ns

    _table(job / "e.csv", [("in2.png", 7, 1.0), ("in0.png", 1, 1.0), ("in1.png", 5, 1.0)])
    capsys.readouterr()
    assert br.main(run) == 0
    assert "3 rows, 1 already rendered" in capsys.readouterr().err
    m2 = _manifest(out)
    assert len(m2) == 5  # two new lines: the inserted row and the edited one
    new = {e["row"]: e for e in m2[3:]}
    assert sorted(new) == [1, 3]
    assert new[1]["params"] == {"Input image.image": "in2.png", "DPM Encode.seed": "7", "Replay.cfg": "1.0"}
    assert new[3]["params"] == {"Input image.image": "in1.png", "DPM Encode.seed": "5", "Replay.cfg": "1.0"}
    for e in new.values():
        assert e["error"] is None and len(e["files"]) == 1
        assert e["input_files"]["Input image.image"] == br._file_sha256(job / e["params"]["Input image.image"])
        assert e["workflow_sha256"] == br.workflow_digest(job / "wf.json")
    # the edited row is a new render (seed 5, not 2) in its own folder; old row 2's files are kept
    # under their own parameters
    assert (out / new[3]["files"][0]).read_bytes() != (out / first[2]["files"][0]).read_bytes()
    assert (out / first[2]["files"][0]).is_file() and first[2]["params"]["DPM Encode.seed"] == "2"
    # the old row 1 (now row 2) was not rendered again, nor moved
    assert (out / first[1]["files"][0]).stat().st_mtime_ns == mtime
    assert {e["key"] for e in m2} == {e["key"] for e in m} | {e["key"] for e in new.values()}

    # row 1 alone, in a fresh folder: the same bits
    _table(job / "one.csv", [("in0.png", 1, 1.0)])
    assert br.main([str(job / "wf.json"), str(job / "one.csv"), "--out", str(job / "one_out"),
                    "--server", server.url]) == 0
    (alone,) = _manifest(job / "one_out")
    assert alone["key"] == first[1]["key"]
    assert (job / "one_out" / alone["files"][0]).read_bytes() == (out / first[1]["files"][0]).read_bytes()


def test_sigkilled_runner_takes_its_server_along(br, server, job, model_dirs):
    """The runner as a user starts it, from the table's folder with a relative --models path (it was
    written as-is into extra_model_paths.yaml, where ComfyUI read it from its own folder: every row
    failed). SIGKILLed mid-run, as the OOM killer would, its server must die within seconds (it lived
    on as an orphan); the resumed run lands every row once."""
    d = job / "kill"
    d.mkdir()
    for k in range(3):
        _image(d / f"in{k}.png", k)
    (d / "wf.json").write_text((job / "wf.json").read_text())
    _table(d / "t.csv", [("in0.png", 1, 1.0), ("in1.png", 2, 1.0), ("in2.png", 3, 1.0)])
    models = os.path.relpath(model_dirs["checkpoints"].parent, d)
    assert not Path(models).is_absolute()
    cmd = [sys.executable, str(REPO / "scripts" / "batch_render.py"), "wf.json", "t.csv", "--out", "out",
           "--models", models]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    pid_file = d / "out" / ".server" / "0" / "server.pid"
    server_pid = None
    log = open(d / "runner.log", "w")
    runner = subprocess.Popen(cmd, cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 400
        man = d / "out" / "manifest.jsonl"
        while time.time() < deadline and runner.poll() is None:
            if man.is_file() and man.read_text().count("\n") >= 1:
                break
            time.sleep(0.05)
        assert runner.poll() is None, f"the runner ended before a row landed: {(d / 'runner.log').read_text()[-3000:]}"
        server_pid = int(pid_file.read_text())
        assert not _gone(server_pid)
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=30)
        first = _manifest(d / "out")
        assert first[0]["error"] is None, first[0]  # the relative --models folder was found
        t = time.time()
        while not _gone(server_pid) and time.time() - t < 5:
            time.sleep(0.05)
        assert _gone(server_pid), f"the runner's ComfyUI (pid {server_pid}) outlived it"
    finally:
        if runner.poll() is None:
            runner.kill()
        if server_pid and not _gone(server_pid):
            os.killpg(server_pid, signal.SIGKILL)
        log.close()

    # resumed (on the session's server, to spare the suite a second start-up: the rows' keys do not
    # depend on the server), every row lands once
    assert br.main([str(d / "wf.json"), str(d / "t.csv"), "--out", str(d / "out"), "--server", server.url]) == 0
    m = _manifest(d / "out")
    assert sorted(e["row"] for e in m) == [1, 2, 3], m  # each row once
    assert all(e["error"] is None and len(e["files"]) == 1 for e in m), m


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
    # no actor's server outlives the run
    pids = [int(p.read_text()) for p in (out / ".server").glob("actor*_*/server.pid")]
    assert len(pids) >= 2 and all(_gone(p) for p in pids), pids


def test_shipped_example_table_fits_its_workflow(br, server):
    """docs/best-of-n.md's example (demo/batch/table.csv through the best-of-N demo workflow with
    --models demo/models): every column names a node and input of the workflow, every image is there,
    and every model the workflow loads is in demo/models (a renamed node title would fail every row)."""
    info = server.object_info()
    wf = REPO / "workflows" / "cyclediffusion_best_of_n_demo.json"
    table = REPO / "demo" / "batch" / "table.csv"
    base = br.load_workflow(wf, info)
    rows = br.read_table(table)
    assert len(rows) == 3
    uploaded = []
    for row in rows:
        prompt, params = br.row_prompt(base, info, row, table.parent, lambda p: uploaded.append(p) or p.name)
        assert params == row
    assert [p.name for p in uploaded] == ["red_circle.png", "blue_circle.png", "green_circle.png"]
    for node in base.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            assert (REPO / "demo" / "models" / "checkpoints" / node["inputs"]["ckpt_name"]).is_file()
        if node["class_type"] == "RankByCLIP":
            assert (REPO / "demo" / "models" / "clip_energy" / node["inputs"]["clip_name"]).is_dir()
    keys = {br.Job(k, r, wf, br.workflow_digest(wf), table.parent).key for k, r in enumerate(rows, 1)}
    assert len(keys) == 3
