# SPDX-License-Identifier: GPL-3.0-or-later
"""Langevin sampling of the latent code: pure-torch checks, then through ComfyUI's real models in-process."""
from __future__ import annotations

import gc
import importlib
import math
import weakref

import pytest
import torch


@pytest.fixture(scope="module")
def L(pack):
    return importlib.import_module("dpm_latent.guidance.langevin")


class TinyDenoiser(torch.nn.Module):
    """A small conv net used as an x0 predictor (sigma enters as a scale)."""

    def __init__(self, ch=4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1 = torch.nn.Conv2d(ch, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, ch, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))

    def forward(self, x, sigma):
        h = torch.tanh(self.c1(x / math.sqrt(1 + sigma ** 2)))
        return x / (1 + sigma ** 2) + self.c2(h)


def _code(pack, family="ve", steps=6, batch=2, ch=4, hw=6, seed=0):
    S = pack.samplers
    sig = torch.linspace(3.0, 0.1, steps, dtype=torch.float64) if family == "ve" else \
        torch.linspace(0.95, 0.05, steps, dtype=torch.float64)
    sigmas = torch.cat([sig, torch.zeros(1, dtype=torch.float64)])
    return S.prior_code((batch, ch, hw, hw), sigmas, 0.3, family, seed)


@pytest.mark.parametrize("family", ["ve", "flow"])
def test_checkpointed_gradient_equals_plain_gradient(pack, L, family):
    """The hand-made per-step checkpointing gives autograd's gradient through the whole chain."""
    net = TinyDenoiser().double()
    code = _code(pack, family).to(dtype=torch.float64)
    code.residual = 0.1 * torch.randn(code.residual.shape, generator=torch.Generator().manual_seed(1),
                                      dtype=torch.float64)
    den = lambda x, s: net(x, s)  # noqa: E731
    decode = lambda x: torch.tanh(x[:, :3])  # noqa: E731
    energy = lambda im, g: (im - 0.3).pow(2).flatten(1).sum(1) + im.sin().flatten(1).sum(1)  # noqa: E731
    ref = L.chain_value_and_grad(den, decode, energy, code, code.start_noise, code.noises, checkpoint=False)
    ours = L.chain_value_and_grad(den, decode, energy, code, code.start_noise, code.noises, checkpoint=True)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    assert ours[3].abs().sum() > 0 and ours[2].abs().sum() > 0
    # and the chain is the sampler of samplers.replay
    x = L.replay_differentiable(den, code, code.start_noise, code.noises)
    torch.testing.assert_close(x, pack.samplers.replay(den, code), rtol=1e-12, atol=1e-12)
    # a NaN gradient is reported, not sampled with
    bad = lambda im, g: im.flatten(1).sum(1) * float("nan")  # noqa: E731
    with pytest.raises(FloatingPointError):
        L.chain_value_and_grad(den, decode, bad, code, code.start_noise, code.noises)


def test_langevin_lowers_the_energy_and_keeps_the_prior_typical(pack, L):
    net = TinyDenoiser()
    target = torch.full((2, 4, 6, 6), 0.7)

    def energy_fn(weight):
        return lambda images, gen: weight * (images - target).pow(2).flatten(1).mean(1)

    finals = {}
    for weight in (0.0, 50.0):
        vals = []
        for seed in range(3):
            code = _code(pack, "ve", seed=seed)
            new, trace = L.langevin(lambda x, s: net(x, s), lambda x: x, energy_fn(weight), code, steps=30,
                                    step_size=0.05, seed=seed)
            with torch.no_grad():
                out = pack.samplers.replay(lambda x, s: net(x, s), new)
            vals.append(float((out - target).pow(2).mean()))
            assert len(trace.energy) == 30 and len(trace.prior) == 30
            # ||z||^2 / dim stays in the typical set of N(0, I) at every step: 1 +- a few sqrt(2/dim)
            # (the code and the Langevin noise use the same seed here on purpose: their streams differ)
            dim = trace.dim
            for step_prior in trace.prior:
                for p in step_prior:
                    assert abs(p - 1) < 6 * math.sqrt(2 / dim), (p, dim)
            # the update touched every component
            assert not torch.equal(new.noises, code.noises) and not torch.equal(new.start_noise, code.start_noise)
            torch.testing.assert_close(new.residual, code.residual)
        finals[weight] = vals
    for guided, free in zip(finals[50.0], finals[0.0]):
        assert guided < 0.7 * free, finals


def test_start_only_keeps_the_noises(pack, L):
    net = TinyDenoiser()
    code = _code(pack)
    new, _ = L.langevin(lambda x, s: net(x, s), lambda x: x, lambda im, g: im.flatten(1).sum(1), code, steps=3,
                        step_size=0.05, seed=0, update="start")
    assert torch.equal(new.noises, code.noises)
    assert not torch.equal(new.start_noise, code.start_noise)
    with pytest.raises(ValueError, match="update"):
        L.langevin(lambda x, s: x, lambda x: x, lambda im, g: im.sum(), code, 1, 0.05, 0, update="some")
    with pytest.raises(ValueError, match="step_size"):
        L.langevin(lambda x, s: x, lambda x: x, lambda im, g: im.sum(), code, 1, 0.0, 0)


# ------------------------------------------------------------------ through ComfyUI's real models
@pytest.fixture(scope="module")
def comfy_models(model_dirs):
    import comfy.sd

    with torch.inference_mode():  # exactly how ComfyUI's executor runs the loader nodes
        model, _clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(model_dirs["checkpoints"] / "tiny_sd3.safetensors"), output_vae=True, output_clip=False)
    return model, vae


def test_langevin_node_under_inference_mode_lowers_clip_energy(comfy_models, gn, lc, lr):
    """The hard part: autograd through models loaded under inference mode, run under inference mode."""
    model, vae = comfy_models
    cond = [[torch.zeros(1, 8, 32), {"pooled_output": torch.zeros(1, 32)}]]
    before = {n: (id(p), p.detach().clone()) for n, p in model.model.named_parameters()}
    drops = []
    for seed in range(3):
        with torch.inference_mode():
            code = lc.RandomLatentCode.execute(model, 32, 32, 2, seed, 4, "simple", 0.3).result[0]
            ends = {}
            for weight in (0.0, 2000.0):
                energy = gn.CLIPEnergy.execute("tiny_clip", "a red square", weight, 2, False, False, False,
                                               False).result[0]
                probe = gn.CLIPEnergy.execute("tiny_clip", "a red square", 1.0, 2, False, False, False,
                                              False).result[0]
                _c, lat, plot, trace = lr.run_langevin(model, cond, cond, 1.0, vae, energy, code, 12, 0.05, seed,
                                                       "all components")
                img = vae.decode(lat["samples"]).movedim(-1, 1)
                with torch.inference_mode(False):
                    ends[weight] = float(probe(img.clone()).mean())
                assert plot.shape == (1, 320, 512, 3)
            drops.append(ends[0.0] - ends[2000.0])
    assert all(d > 0 for d in drops), drops
    # ComfyUI's model is untouched: same Parameter objects, same values, still inference tensors
    for n, p in model.model.named_parameters():
        assert id(p) == before[n][0], n
        assert p.is_inference()
        assert torch.equal(p, before[n][1])


def test_memory_modes_give_the_same_sample(comfy_models, gn, lc, lr):
    """'low' (recompute each step) and 'fast' (keep the whole chain) take the same gradient, so the same
    Langevin sample up to float rounding; 'auto' keeps the chain of a tiny model, and a bad mode is refused."""
    model, vae = comfy_models
    cond = [[torch.zeros(1, 8, 32), {"pooled_output": torch.zeros(1, 32)}]]
    with torch.inference_mode():
        code = lc.RandomLatentCode.execute(model, 32, 32, 2, 0, 4, "simple", 0.3).result[0]
        energy = gn.CLIPEnergy.execute("tiny_clip", "a red square", 500.0, 2, False, False, False, False).result[0]
        out = {}
        for mode in lr.MEMORY_MODES:
            new, lat, _plot, trace = lr.run_langevin(model, cond, cond, 1.0, vae, energy, code, 3, 0.05, 0,
                                                     "all components", mode)
            out[mode] = (new.start_noise, lat["samples"], trace.gradient)
    low, fast, auto = (out[m] for m in ("low: recompute each step", "fast: keep the whole chain", "auto"))
    assert low[2].startswith("recomputed per step") and fast[2].startswith("whole chain kept"), (low[2], fast[2])
    assert auto[2].startswith("whole chain kept (auto: the whole chain's graph, measured"), auto[2]
    import re
    per_step = float(re.search(r"measured ([0-9.e+-]+) MB per step", auto[2]).group(1))
    assert 0.0 < per_step < 500.0, auto[2]   # a tiny SD3 step at 32 x 32 keeps something, and not gigabytes
    assert not torch.equal(low[0], code.start_noise)          # it moved
    assert torch.allclose(low[0], fast[0], atol=1e-4, rtol=0) and torch.allclose(low[1], fast[1], atol=1e-4, rtol=0)
    with pytest.raises(Exception, match="memory: 'huge' is not one of"):
        lr.run_langevin(model, cond, cond, 1.0, vae, energy, code, 1, 0.05, 0, "all components", "huge")


def test_auto_memory_falls_back_to_recomputing_when_keeping_the_chain_runs_out_of_memory(comfy_models, gn, lc, lr):
    """The device runs out of memory on the first model call of the kept chain (a UNet function wrapper, the
    way ComfyUI lets packs wrap the model, raises torch's own OutOfMemoryError there): auto frees the cache,
    recomputes each step instead, and gives the sample the 'low' mode gives."""
    model, vae = comfy_models
    cond = [[torch.zeros(1, 8, 32), {"pooled_output": torch.zeros(1, 32)}]]
    grad_calls = [0]

    def wrapper(apply_model, args):
        if torch.is_grad_enabled() and args["input"].requires_grad:
            grad_calls[0] += 1
            if grad_calls[0] == 2:   # 1: auto's one-step probe; 2: the first step of the kept chain
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (test)")
        return apply_model(args["input"], args["timestep"], **args["c"])

    short = model.clone()
    short.set_model_unet_function_wrapper(wrapper)
    with torch.inference_mode():
        code = lc.RandomLatentCode.execute(model, 32, 32, 2, 0, 4, "simple", 0.3).result[0]
        energy = gn.CLIPEnergy.execute("tiny_clip", "a red square", 500.0, 2, False, False, False, False).result[0]
        new, lat, _p, trace = lr.run_langevin(short, cond, cond, 1.0, vae, energy, code, 2, 0.05, 0,
                                              "all components", "auto")
        ref, ref_lat, _p, _t = lr.run_langevin(model, cond, cond, 1.0, vae, energy, code, 2, 0.05, 0,
                                               "all components", "low: recompute each step")
    assert grad_calls[0] > 2, grad_calls          # the recomputing pass ran after the failure
    assert trace.gradient == "recomputed per step (auto: keeping the whole chain ran out of memory)", trace.gradient
    assert torch.allclose(new.start_noise, ref.start_noise, atol=1e-5, rtol=0)
    assert torch.allclose(lat["samples"], ref_lat["samples"], atol=1e-5, rtol=0)


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter))


def test_auto_memory_probe_leaves_no_graph_behind(pack, lr):
    """issue 18: the ``auto`` probe's saved-tensors hook handed autograd each tensor back as-is, so an
    op that saves its own output (here tanh) made a cycle through C++ that the collector cannot free:
    every probe's graph lived as long as the server (+12.5 MB per prompt on tiny SD1.5). Nothing the
    probe made may outlive it (before the fix the tanh output, the conv input and x stayed: 3 tensors
    per probe), and the count is still what the graph saves (conv input + tanh output)."""
    net = TinyDenoiser()
    code = _code(pack)
    outs = []

    def den(x, s):
        y = net(x, s)
        outs.append(weakref.ref(y))
        return y

    before = _live_tensors()
    counted = lr._graph_bytes_of_one_step(den, code, list(net.parameters()))
    assert len(outs) == 1
    assert outs[0]() is None, "the probe's graph outlived the probe"
    assert _live_tensors() == before
    b, c, h, w = code.shape
    assert counted == 4 * b * h * w * (c + 16), counted   # float32 conv input (B,4,6,6) + tanh output (B,16,6,6)


def test_auto_memory_runs_leave_no_tensors_behind(comfy_models, gn, lc, lr):
    """The same through ComfyUI's real model: a third ``auto`` run ends with as many live tensors as the
    second (before the fix each run left its probe's graph behind: +214 tensors a prompt on tiny SD1.5)."""
    model, vae = comfy_models
    cond = [[torch.zeros(1, 8, 32), {"pooled_output": torch.zeros(1, 32)}]]
    counts = []
    with torch.inference_mode():
        code = lc.RandomLatentCode.execute(model, 32, 32, 1, 0, 3, "simple", 0.3).result[0]
        energy = gn.CLIPEnergy.execute("tiny_clip", "a red square", 500.0, 2, False, False, False, False).result[0]
        for seed in range(3):
            out = lr.run_langevin(model, cond, cond, 1.0, vae, energy, code, 1, 0.05, seed, "all components", "auto")
            assert out[3].gradient.startswith("whole chain kept (auto"), out[3].gradient
            del out
            counts.append(_live_tensors())
    assert counts[2] == counts[1], counts
