# SPDX-License-Identifier: GPL-3.0-or-later
"""Asyrp's editing interval by measure, in pure torch: the curves on a denoiser whose answer is known,
and the choice of t_edit / t_boost on hand-built curves."""
from __future__ import annotations

import importlib

import pytest
import torch


@pytest.fixture(scope="module")
def A(pack):
    return importlib.import_module("dpm_latent.samplers.asyrp")


VE_SIGMAS = torch.tensor([14.6, 6.0, 3.0, 1.5, 0.8, 0.4, 0.2, 0.05, 0.0], dtype=torch.float64)
FLOW_SIGMAS = torch.tensor([1.0, 0.9, 0.75, 0.6, 0.4, 0.25, 0.1, 0.03, 0.0], dtype=torch.float64)


def binary_denoiser(family):
    """The exact posterior mean for data with every entry -1 or +1 (equally likely)."""
    def plain(x, sigma):
        a = 1.0 if family == "ve" else 1.0 - sigma
        return torch.tanh(a * x / (sigma * sigma))
    return plain


def mse(a, b):
    return (a - b).pow(2).flatten(1).mean(1)


@pytest.mark.parametrize("family,sigmas", [("ve", VE_SIGMAS), ("flow", FLOW_SIGMAS)])
def test_curves_fall_towards_the_image_along_the_chain(A, family, sigmas):
    x0 = torch.randint(0, 2, (3, 4, 8, 8), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    seen = []
    c = A.interval_curves(binary_denoiser(family), x0, sigmas, family, mse, callback=lambda i, *_: seen.append(i))
    n = len(sigmas) - 1
    assert seen == list(range(n)) and c.steps == n and c.n == 3
    assert c.positions == pytest.approx([1 - i / n for i in range(n)])
    p, x = c.to_prediction, c.to_noisy
    # P_t: far from the image at T (the posterior mean of near-noise is near 0: distance ~1), exact at the end
    assert p[0] > 0.5 and p[-1] < 1e-3
    assert all(b <= a + 1e-6 for a, b in zip(p, p[1:])), p
    # x_t forward-noised, in variance-preserving scale: pure noise at T (distance ~2 = |x0|^2 + |n|^2)
    assert x[0] > 1.5 and x[-1] < 0.05
    assert all(b <= a + 1e-6 for a, b in zip(x, x[1:])), x
    # the per-image rows average to the curves
    assert [sum(r) / 3 for r in c.per_image_prediction] == pytest.approx(p)
    # bit-reproducible: the x_t noise comes from the seed, on the CPU
    again = A.interval_curves(binary_denoiser(family), x0, sigmas, family, mse)
    assert again.to_noisy == x and again.to_prediction == p
    assert A.interval_curves(binary_denoiser(family), x0, sigmas, family, mse, seed=1).to_noisy != x


def test_vp_scale(A):
    assert A.vp_scale(0.0, "ve") == 1.0 and A.vp_scale(3.0, "ve") == pytest.approx(1 / 10 ** 0.5)
    assert A.vp_scale(0.7, "flow") == 1.0


def _curves(A, p, x):
    n = len(p)
    return A.IntervalCurves([1 - i / n for i in range(n)], list(p), list(x))


def test_thresholds_pick_the_first_crossing_from_t0_upward(A):
    c = _curves(A, [0.9, 0.2, 0.5, 0.3, 0.1], [1.4, 1.3, 1.25, 1.1, 0.5])
    assert A.first_reaching(c.to_prediction, 0.4) == 2   # not step 0 or 1: scanning starts at t = 0
    t_edit, t_boost, notes = A.interval_from_curves(c, 0.4, 1.2)
    assert t_edit == pytest.approx(0.4) and t_boost == pytest.approx(0.4) and notes == []
    # the crossing step and every step above it are edited; the steps below the crossing are boosted
    assert A.edited_steps(5, t_edit) == 3
    assert [A.is_boosted(i, 5, t_boost) for i in range(5)] == [False, False, False, True, True]
    # a crossing at the last step: edit the whole chain, boost nothing (t_boost 0 is "off")
    assert A.interval_from_curves(_curves(A, [0.9, 0.8, 0.7], [2, 2, 2]), 0.1, 1.2)[:2] == (0.0, 0.0)
    # a threshold reached only at T: one step edited, all but the first boosted
    t_edit, t_boost, _ = A.interval_from_curves(c, 0.95 - 0.06, 1.35)
    assert (t_edit, t_boost) == (pytest.approx(0.8), pytest.approx(0.8)) and A.edited_steps(5, t_edit) == 1


def test_never_reached_is_said_and_stays_in_range(A):
    c = _curves(A, [0.3, 0.2, 0.1], [0.5, 0.4, 0.1])
    t_edit, t_boost, notes = A.interval_from_curves(c, 0.5, 1.2)
    assert (t_edit, t_boost) == (0.0, 1.0) and len(notes) == 2
    assert "t_edit = 0" in notes[0] and "t_boost = 1" in notes[1]
    with pytest.raises(A.CodeError, match="empty"):
        A.interval_from_curves(_curves(A, [], []), 0.5, 1.2)


def test_outputs_are_fractions_for_every_crossing(A):
    for n in (2, 5, 40):
        for i in range(n):
            vals = [1.0 if k <= i else 0.0 for k in range(n)]
            t_edit, t_boost, _ = A.interval_from_curves(_curves(A, vals, vals), 0.5, 0.5)
            assert 0.0 <= t_edit < 1.0 and 0.0 <= t_boost < 1.0
            assert A.edited_steps(n, t_edit) == i + 1


def test_lpips_only_from_weights_on_disk(pack, tmp_path, monkeypatch):
    """Runs where the lpips package is installed (not on the test host): the backbone comes from an
    AlexNet file in the torch hub cache and nothing is downloaded. The file here holds a seeded random
    AlexNet in torchvision's format, so the check is that every backbone weight is the file's."""
    pytest.importorskip("lpips")
    import torchvision

    node = importlib.import_module("dpm_latent.nodes.bridge.interval_run")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(node, "_LPIPS", {})

    def no_download(*a, **k):
        raise AssertionError("LPIPS tried to download weights")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    assert "not on disk" in node.lpips_unavailable()
    torch.manual_seed(0)
    state = torchvision.models.alexnet().state_dict()
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / node.ALEXNET_FILE)
    assert node.lpips_unavailable() is None
    net = node.load_lpips("cpu")
    loaded = dict(net.net.named_parameters())
    assert len(loaded) == 10  # five convolutions, weight and bias
    for name, p in loaded.items():
        _s, k, leaf = name.split(".")
        assert torch.equal(p, state[f"features.{k}.{leaf}"]), name
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    same, diff = net(x, x).flatten(), net(x, y).flatten()
    assert same.abs().max() < 1e-6 and bool((diff > 0).all())


def test_clip_normalisation_cache_survives_a_no_grad_first_caller(pack, tmp_path):
    """Asyrp Editing Interval embeds images under inference mode; an Asyrp training run after it reuses
    the same cached CLIP bundle and must still differentiate through its normalisation."""
    from dpmtools.tiny_clip import make_tiny_clip_folder

    guidance = importlib.import_module("dpm_latent.guidance")
    bundle = guidance.load_clip_folder(make_tiny_clip_folder(tmp_path / "clip"), device="cpu")
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        bundle.normalize(bundle.resize(img))
    x = img.clone().requires_grad_(True)
    bundle.image_embeds(bundle.normalize(bundle.resize(x))).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_bootstrap_interval_over_images(A):
    # 4 images: two cross 0.5 at step 1, two at step 3; the mean crosses at step 2 (mean 0.55 there)
    early = [0.9, 0.6, 0.3, 0.1, 0.0]
    late = [0.9, 0.9, 0.8, 0.6, 0.1]
    rows = [list(v) for v in zip(early, early, late, late)]
    c = A.IntervalCurves([1 - i / 5 for i in range(5)], [sum(r) / 4 for r in rows], [sum(r) / 4 for r in rows],
                         rows, rows)
    assert A.interval_from_curves(c, 0.5, 0.5)[0] == pytest.approx(0.4)
    b = A.bootstrap_interval(c, lambda _c: (0.5, 0.5), reps=400, seed=0)
    # all-early resamples pick step 1 (t = 0.6), all-late step 3 (t = 0.2): the interval spans them
    assert b["t_edit"] == [pytest.approx(0.2), pytest.approx(0.6)] and b["t_boost"] == b["t_edit"]
    assert b["n"] == 4 and b["reps"] == 400
    # identical images: no spread
    same = A.IntervalCurves(c.positions, early, early, [[v, v] for v in early], [[v, v] for v in early])
    assert A.bootstrap_interval(same, lambda _c: (0.5, 0.5), reps=50)["t_edit"] == [pytest.approx(0.6)] * 2
    with pytest.raises(A.CodeError, match="at least 2"):
        A.bootstrap_interval(_curves(A, early, early), lambda _c: (0.5, 0.5))
