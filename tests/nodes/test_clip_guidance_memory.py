# SPDX-License-Identifier: GPL-3.0-or-later
"""Langevin under ComfyUI's rules, in-process with ComfyUI's own loaders: the CLIP energy is a managed
model, and no node output (all of them are cached and shared) is changed by running Langevin."""
from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch


@pytest.fixture(scope="module")
def sd15(model_dirs):
    import comfy.sd

    with torch.inference_mode():  # as ComfyUI's executor runs the loader
        model, _clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(model_dirs["checkpoints"] / "tiny_sd15.safetensors"), output_vae=True, output_clip=False)
    return model, vae


def _loaded(patcher) -> bool:
    import comfy.model_management as mm

    return any(lm.model is patcher for lm in mm.current_loaded_models)


def _snapshot(obj, path="out", seen=None) -> dict[str, tuple]:
    """Every tensor reachable from a node output, by path: (id of the tensor object, device, dtype, clone).

    Walks lists, tuples, dicts, dataclasses (LatentCode), the pack's own objects (energies, CLIP
    bundles), torch modules (state dict) and ComfyUI's MODEL (ModelPatcher) and VAE."""
    seen = set() if seen is None else seen
    out: dict[str, tuple] = {}
    if id(obj) in seen:
        return out
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out[path] = (id(obj), obj.device, obj.dtype, obj.detach().clone())
    elif isinstance(obj, torch.nn.Module):
        for k, v in obj.state_dict(keep_vars=True).items():
            out.update(_snapshot(v, f"{path}.{k}", seen))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_snapshot(v, f"{path}[{i}]", seen))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_snapshot(v, f"{path}[{k!r}]", seen))
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            out.update(_snapshot(getattr(obj, f.name), f"{path}.{f.name}", seen))
    elif type(obj).__name__ == "ModelPatcher" or hasattr(obj, "first_stage_model"):
        inner = obj.model if hasattr(obj, "patches") else obj.first_stage_model
        out.update(_snapshot(inner, f"{path}.model", seen))
    elif type(obj).__module__.startswith("dpm_latent"):
        for k, v in vars(obj).items():
            out[f"{path}.{k}#id"] = (id(v), None, None, None)
            out.update(_snapshot(v, f"{path}.{k}", seen))
    return out


def _assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys(), set(before) ^ set(after)
    for k, (ident, dev, dt, t) in before.items():
        ident2, dev2, dt2, t2 = after[k]
        assert ident == ident2, f"{k}: replaced by another object"
        if t is not None:
            assert (dev, dt) == (dev2, dt2), f"{k}: moved from {dev}/{dt} to {dev2}/{dt2}"
            assert torch.equal(t, t2), f"{k}: values changed"


def test_clip_energy_is_a_managed_model(gn, lc, lr, sd15):
    """The CLIP of the energy is loaded through ComfyUI's model management by the Langevin node, unloaded
    by unload_all_models (what /free does), reloaded by the next run with the same bits."""
    import comfy.model_management as mm

    cm = importlib.import_module("dpm_latent.nodes.bridge.clip_models")
    model, vae = sd15
    cond = [[torch.zeros(1, 8, 768), {}]]
    with torch.inference_mode():
        energy = gn.CLIPEnergy.execute("tiny_clip", "a red square", 500.0, 2, True, True, True, True).result[0]
        code = lc.RandomLatentCode.execute(model, 32, 32, 1, 0, 3, "normal", 0.2).result[0]
    patcher = energy.comfy_patcher
    assert cm.energy_patchers(gn.CombineEnergies.execute(energy, 1.0, energy, 2.0).result[0]) == [patcher]
    assert patcher.model.clip is energy.bundle.model
    # the output holds no tensor on the load device: targets stay on the offload device
    assert energy.target.device == cm.offload_device() and energy.target_mean.device == cm.offload_device()
    mm.unload_all_models()
    assert not _loaded(patcher)
    with torch.inference_mode():
        first = lr.run_langevin(model, cond, cond, 1.0, vae, energy, code, 2, 0.05, 0, "all components")
    assert _loaded(patcher)
    mm.unload_all_models()
    assert not _loaded(patcher)
    assert patcher.model.device == cm.offload_device()
    with torch.inference_mode():
        again = lr.run_langevin(model, cond, cond, 1.0, vae, energy, code, 2, 0.05, 0, "all components")
    assert _loaded(patcher)
    assert torch.equal(first[1]["samples"], again[1]["samples"])
    assert torch.equal(first[0].start_noise, again[0].start_noise)
    # a second CLIP Energy on the same folder shares the one patcher (two would fight over the weights)
    with torch.inference_mode():
        other = gn.CLIPEnergy.execute("tiny_clip", "a blue circle", 100.0, 1, False, False, False, False).result[0]
    assert other.comfy_patcher is patcher


def test_langevin_changes_no_cached_output(gn, lc, lr, sd15):
    """Run the nodes of a Langevin graph, snapshot every tensor of every output (MODEL and VAE weights,
    conditioning, DPM_LATENT_CODE, DPM_ENERGY with its CLIP), run Langevin twice on those same outputs
    (as cache hits do) and compare object identity, device, dtype and bits."""
    model, vae = sd15
    with torch.inference_mode():
        cond = [[torch.randn(1, 8, 768, generator=torch.Generator().manual_seed(3)), {}]]
        clip = gn.CLIPEnergy.execute("tiny_clip", "a red square", 500.0, 2, True, True, True, True).result[0]
        both = gn.CombineEnergies.execute(clip, 1.0, clip, 0.5).result[0]
        code = lc.RandomLatentCode.execute(model, 32, 32, 2, 4, 3, "normal", 0.2).result[0]
    outputs = {"model": model, "vae": vae, "cond": cond, "clip_energy": clip, "combined": both, "code": code}
    before = _snapshot(outputs)
    assert any(k.startswith("out['code'].noises") for k in before)
    assert any(".bundle.model." in k for k in before)  # the CLIP weights are walked too
    results = []
    for _ in range(2):
        with torch.inference_mode():
            new, lat, plot, _t = lr.run_langevin(model, cond, cond, 1.0, vae, both, code, 2, 0.05, 1,
                                                 "all components")
        results.append((new, lat["samples"], plot))
        _assert_same(before, _snapshot(outputs))
    # the run's own outputs are fresh objects and the same bits both times
    assert results[0][0] is not code and not torch.equal(results[0][0].noises, code.noises)
    for a, b in zip(results[0][1:], results[1][1:]):
        assert torch.equal(a, b)
    # the helper can fail: an in-place change is caught
    with torch.inference_mode(False):
        clip.target_mean = clip.target_mean.clone()
    with pytest.raises(AssertionError, match="replaced"):
        _assert_same(before, _snapshot(outputs))


class _Stop(Exception):
    pass


@pytest.mark.parametrize("stop_at", [3, 9, 16])
def test_a_cancel_is_honoured_within_one_chain_step(pack, stop_at):
    """The host's cancel check runs before every chain step of the forward and the backward walk: a
    request made during model call k (k = 3: forward, 9: backward of the first Langevin step, 16: the
    second step's forward) stops the run before any further model call."""
    L = importlib.import_module("dpm_latent.guidance.langevin")
    S = pack.samplers
    sigmas = torch.cat([torch.linspace(3.0, 0.2, 6, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    code = S.prior_code((1, 2, 4, 4), sigmas, 0.3, "ve", 0)
    calls, flag = [0], [False]

    def denoise(x, sigma):
        calls[0] += 1
        if calls[0] == stop_at:
            flag[0] = True
        return torch.tanh(x) / (1 + sigma)

    def check():
        if flag[0]:
            raise _Stop()

    with pytest.raises(_Stop):
        L.langevin(denoise, lambda x: x, lambda im, g=None: im.flatten(1).pow(2).sum(1), code, 3, 0.05, 0,
                   check=check)
    assert calls[0] == stop_at
