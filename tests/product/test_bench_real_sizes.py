# SPDX-License-Identifier: GPL-3.0-or-later
"""bench/bench_real_sizes.py: the full-size architectures are what ComfyUI recognises, and the script's
whole code path (every mode, and the CycleDiffusion comparison) runs on the tiny configuration and
prints a summary with the expected keys and sane values. Nothing here is timed."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpmtools import real_models as RM

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind, cls, params_m", [("sd15", "SD15", 859.5), ("sdxl", "SDXL", 2567.5),
                                                 ("ssd1b", "SSD1B", 1331.3),
                                                 ("sd3", "SD3", 2028.3), ("flux", "Flux", 11901.4)])
def test_full_size_configs_are_the_models_comfyui_detects(kind, cls, params_m):
    import torch

    config = RM.model_config(RM.KINDS[kind])
    assert type(config).__name__ == cls
    with torch.device("meta"):
        net = RM._meta_network(RM.KINDS[kind])
    assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(params_m, abs=0.1)


def test_tiny_run_prints_every_figure(tmp_path):
    out = tmp_path / "summary.json"
    cmd = [sys.executable, str(REPO / "bench" / "bench_real_sizes.py"), "--tiny", "--models", "tiny_sd15", "--cycle",
           "--same-process", "--rounds", "1", "--steps", "2", "--size", "32", "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, cwd=REPO / "bench", capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
    summary = json.loads(out.read_text())
    assert printed == summary
    assert summary["machine"]["device"] == "cpu" and summary["machine"]["threads"] == 1
    row = summary["models"]["tiny_sd15"]
    assert row["failed"] == [] and row["model_class"] == "SD15"
    for key in ("encode_replay_ratio", "ksampler_ratio", "checkpoint_ratio", "full_graph_ratio", "node_step_ratio"):
        assert math.isfinite(row[key]) and 0.2 < row[key] < 20, (key, row[key])
    for key in ("checkpoint_peak_mb", "full_graph_peak_mb", "auto_peak_mb"):
        assert math.isfinite(row[key]) and row[key] >= 0, (key, row[key])
    assert row["process_peak_mb"] > 100
    # memory: auto on a tiny model with gigabytes free keeps the graph, and says what it predicted
    assert row["auto_kept_graph"] is True and "whole chain kept" in row["auto_gradient"]
    assert 0 < row["auto_predicted_chain_mb"] <= row["auto_predicted_mb"] < row["auto_free_mb"] / 2
    cycle = summary["cycle"]
    for which in ("diffusers", "ours"):
        r = cycle[which]
        assert r["model_calls"] == 4 and r["wall_s"] > 0
        assert r["max_abs_error"] < 1e-3, (which, r)  # both reconstruct the input latent
    assert cycle["ours"]["max_abs_error"] < 1e-5  # its weights came from the diffusers U-Net (strict load)
    assert summary["cycle_time_ratio"] > 0
