# SPDX-License-Identifier: GPL-3.0-or-later
"""CLIP energy of plug-and-play guidance: DiffAugment, loading, values and gradients."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from dpmtools.tiny_clip import make_tiny_clip_folder

ALL = ("color", "translation", "resize", "cutout")


@pytest.fixture(scope="module")
def G(pack):
    return pack.guidance


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip_folder(tmp_path_factory.mktemp("clip") / "tiny", seed=0, image_size=32)


@pytest.fixture(scope="module")
def bundle(G, clip_dir):
    return G.load_clip_folder(clip_dir)


@pytest.fixture(scope="module")
def bundle64(G, clip_dir):
    return G.load_clip_folder(clip_dir, dtype=torch.float64)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def images(b=2, h=32, w=32, seed=0, dtype=torch.float32):
    return torch.rand(b, 3, h, w, generator=gen(seed), dtype=dtype)


# ---------------------------------------------------------------- DiffAugment

@pytest.mark.parametrize("policies", [(p,) for p in ALL] + [ALL])
def test_diffaug_gradcheck(G, policies):
    x = images(2, 8, 8, seed=1, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: G.diff_augment(t, policies, gen(3)), (x,))


@pytest.mark.parametrize("policies", [(p,) for p in ALL] + [ALL, "color,cutout"])
def test_diffaug_seeded(G, policies):
    x = images(4, 16, 16, seed=2)
    a = G.diff_augment(x, policies, gen(7))
    b = G.diff_augment(x, policies, gen(7))
    c = G.diff_augment(x, policies, gen(8))
    assert a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_diffaug_per_sample_and_identity(G):
    x = images(1, 16, 16, seed=3).expand(6, -1, -1, -1).contiguous()
    for p in ALL:
        out = G.diff_augment(x, (p,), gen(0))
        distinct = {tuple(o.flatten().tolist()) for o in out}
        assert len(distinct) > 1, p  # parameters are drawn per sample
    assert torch.equal(G.diff_augment(x, (), gen(0)), x)
    assert torch.equal(G.diff_augment(x, None, gen(0)), x)


def test_diffaug_bad_policy(G):
    with pytest.raises(ValueError) as err:
        G.diff_augment(images(), ("color", "rotate"), gen(0))
    msg = str(err.value)
    assert "rotate" in msg and all(p in msg for p in ALL)
    with pytest.raises(ValueError, match="valid policies"):
        G.diff_augment(images(), "color,translate", gen(0))


def test_translation_is_integer_shift_with_zeros(G):
    x = images(8, 8, 8, seed=4) + 1.0  # strictly positive, so zeros are padding
    out = G.diff_augment(x, ("translation",), gen(5))
    for xi, oi in zip(x, out):
        matches = 0
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                ref = torch.zeros_like(xi)
                ys, yd = slice(max(0, -dy), 8 - max(0, dy)), slice(max(0, dy), 8 - max(0, -dy))
                xs, xd = slice(max(0, -dx), 8 - max(0, dx)), slice(max(0, dx), 8 - max(0, -dx))
                ref[:, yd, xd] = xi[:, ys, xs]
                matches += torch.equal(ref, oi)
        assert matches == 1


def test_cutout_zeroes_at_most_half_square(G):
    x = images(8, 16, 16, seed=6) + 1.0
    out = G.diff_augment(x, ("cutout",), gen(9))
    for xi, oi in zip(x, out):
        zero = oi == 0
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])
        n = int(zero[0].sum())
        assert 0 < n <= 64
        rows = zero[0].any(dim=1).nonzero().flatten()
        cols = zero[0].any(dim=0).nonzero().flatten()
        assert int(rows[-1] - rows[0]) + 1 <= 8 and int(cols[-1] - cols[0]) + 1 <= 8
        assert n == len(rows) * len(cols)  # one rectangle
        assert torch.equal(oi[~zero], xi[~zero])


def test_color_and_resize_ranges(G):
    x = torch.full((64, 3, 8, 8), 0.5)
    out = G.diff_augment(x, ("color",), gen(1))
    # Grey constant image: saturation and contrast do nothing, brightness shifts by U[-0.5, 0.5).
    shift = out[:, 0, 0, 0] - 0.5
    assert torch.allclose(out, (0.5 + shift).view(-1, 1, 1, 1).expand_as(out), atol=1e-6)
    assert shift.min() >= -0.5 and shift.max() < 0.5 and shift.std() > 0.2
    ones = torch.ones(64, 1, 20, 20)
    zoom = G.diff_augment(ones, ("resize",), gen(2))
    assert torch.allclose(zoom[:, :, 9:11, 9:11], torch.ones(64, 1, 2, 2))
    border = zoom[:, 0, 0, 0]
    assert (border < 0.5).any() and (border > 0.99).any()  # some zoom out (pad), some zoom in


# ---------------------------------------------------------------- loading

def test_load_bundle_and_cache(G, clip_dir, bundle):
    assert bundle.image_size == (32, 32)
    assert bundle.mean == pytest.approx(G.OPENAI_CLIP_MEAN)
    assert not any(p.requires_grad for p in bundle.model.parameters())
    assert not bundle.model.training
    assert G.load_clip_folder(clip_dir) is bundle
    assert G.load_clip_folder(str(clip_dir), device="cpu") is bundle
    assert bundle.to("cpu") is bundle
    b64 = G.load_clip_folder(clip_dir, dtype=torch.float64)
    assert b64 is not bundle and next(b64.model.parameters()).dtype == torch.float64
    assert bundle.to(dtype=torch.float64) is b64


def test_cache_sees_file_changes(G, clip_dir, tmp_path):
    folder = shutil.copytree(clip_dir, tmp_path / "copy")
    first = G.load_clip_folder(folder)
    assert G.load_clip_folder(folder) is first
    cfg = folder / "preprocessor_config.json"
    data = json.loads(cfg.read_text())
    data["image_mean"] = [0.5, 0.5, 0.5]
    data["image_std"] = [0.25, 0.25, 0.25]
    cfg.write_text(json.dumps(data))
    st = cfg.stat()
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = G.load_clip_folder(folder)
    assert second is not first
    assert second.mean == (0.5, 0.5, 0.5) and second.std == (0.25, 0.25, 0.25)
    (folder / "preprocessor_config.json").unlink()
    third = G.load_clip_folder(folder)
    assert third.std == pytest.approx(G.OPENAI_CLIP_STD)
    G.clear_clip_cache()
    assert G.load_clip_folder(folder) is not third


EXPECTED_WORDS = ("config.json", "model.safetensors", "tokenizer.json", "vocab.json",
                  "merges.txt", "preprocessor_config.json", "save_pretrained")


def _broken(kind, clip_dir, tmp_path):
    folder = tmp_path / f"broken_{kind}"
    if kind == "missing":
        return folder, "does not exist"
    if kind == "empty":
        folder.mkdir()
        return folder, "no config.json"
    shutil.copytree(clip_dir, folder)
    if kind == "bad_json":
        (folder / "config.json").write_text("{not json")
        return folder, "not valid JSON"
    if kind == "not_clip":
        (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
        return folder, "bert"
    if kind == "no_weights":
        (folder / "model.safetensors").unlink()
        return folder, "no model.safetensors"
    if kind == "pickle_only":
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
        return folder, "pickle"
    if kind == "no_tokenizer":
        for name in ("tokenizer.json", "vocab.json"):
            (folder / name).unlink()
        return folder, "no tokenizer"
    if kind == "corrupt_weights":
        (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
        return folder, "could not load the CLIP model"
    if kind == "bad_mean":
        (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5]}))
        return folder, "image_mean"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "empty", "bad_json", "not_clip", "no_weights",
                                  "pickle_only", "no_tokenizer", "corrupt_weights", "bad_mean"])
def test_bad_folders(G, clip_dir, tmp_path, kind):
    folder, problem = _broken(kind, clip_dir, tmp_path)
    with pytest.raises(G.ClipFolderError) as err:
        G.load_clip_folder(folder)
    assert isinstance(err.value, ValueError)
    msg = str(err.value)
    assert str(folder) in msg
    assert problem in msg
    for word in EXPECTED_WORDS:
        assert word in msg, word


def test_guidance_imports_no_comfy():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location(
            "dpm_latent", {os.path.join(root, "__init__.py")!r},
            submodule_search_locations=[{root!r}])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["dpm_latent"] = mod
        spec.loader.exec_module(mod)
        import dpm_latent.guidance
        bad = [m for m in sys.modules
               if m.split(".")[0] in ("comfy", "nodes", "folder_paths", "comfy_api")]
        assert not bad, bad
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd="/", timeout=120)
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------- the energy

def test_target_arguments(G, bundle):
    x = images()
    with pytest.raises(ValueError, match="exactly one"):
        G.ClipEnergy(bundle)
    with pytest.raises(ValueError, match="both"):
        G.ClipEnergy(bundle, text="a cat", image=x)
    with pytest.raises(ValueError, match="augmentations"):
        G.ClipEnergy(bundle, text="a cat", augmentations=0)
    with pytest.raises(ValueError, match="valid policies"):
        G.ClipEnergy(bundle, text="a cat", policies=("colour",))
    with pytest.raises(ValueError, match="3, H, W"):
        G.ClipEnergy(bundle, text="a cat")(torch.rand(1, 4, 32, 32))


def test_energy_range_and_seed(G, bundle):
    x = images(3, 40, 24, seed=11)
    for energy in (G.ClipEnergy(bundle, text="a red apple", augmentations=6),
                   G.ClipEnergy(bundle, image=images(2, 32, 32, seed=12), augmentations=6)):
        e = energy.unweighted(x, gen(1))
        assert e.shape == (3,) and e.dtype == x.dtype
        assert (e >= -1e-6).all() and (e <= 2 + 1e-6).all()
        assert torch.equal(e, energy.unweighted(x, gen(1)))
        assert not torch.equal(e, energy.unweighted(x, gen(2)))
    # 1 - cos spans [0, 2]: a target equal to minus an embedding gives 2.
    e = G.ClipEnergy(bundle, text="x", policies=())
    emb = bundle.image_embeds(bundle.normalize(bundle.resize(x[:1])))
    e.target = e.target_mean = -emb
    assert e.unweighted(x[:1]).item() == pytest.approx(2.0, abs=1e-5)


def test_image_target_equal_to_input_is_zero(G, bundle):
    x = images(2, 48, 40, seed=13)
    per_sample = G.ClipEnergy(bundle, image=x, policies=(), augmentations=50)
    assert per_sample.copies == 1
    assert per_sample(x).abs().max() < 1e-5
    single = G.ClipEnergy(bundle, image=x[1], policies=())
    e = single(x)
    assert abs(e[1].item()) < 1e-5 and e[0].item() > 1e-3
    # With three images and two targets the target is the normalised mean of both.
    mean_t = G.ClipEnergy(bundle, image=x, policies=())
    three = torch.cat([x, x[:1]])
    emb = bundle.image_embeds(bundle.normalize(bundle.resize(three)))
    t = torch.nn.functional.normalize(per_sample.target.sum(0), dim=0)
    assert torch.allclose(mean_t(three), 1 - emb @ t, atol=1e-5)


def test_gradient_matches_finite_differences(G, bundle64):
    x = images(2, 40, 48, seed=14, dtype=torch.float64)
    target = images(1, 32, 32, seed=15, dtype=torch.float64)
    for energy in (G.ClipEnergy(bundle64, text="a small dog", augmentations=3, weight=0.7),
                   G.ClipEnergy(bundle64, image=target, augmentations=2, center_crop=True)):
        def f(t):
            return energy(t, gen(5)).sum()

        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(f(xg), xg)
        assert grad.abs().sum() > 0
        dirs = torch.randn(3, *x.shape, generator=gen(16), dtype=torch.float64)
        h = 1e-6
        for v in dirs:
            fd = (f(x + h * v) - f(x - h * v)).item() / (2 * h)
            an = (grad * v).sum().item()
            assert an == pytest.approx(fd, rel=1e-4, abs=1e-9)


def test_value_and_grad_chunks_match_autograd(G, bundle64):
    x = images(2, 32, 32, seed=17, dtype=torch.float64).requires_grad_(True)
    full = G.ClipEnergy(bundle64, text="a blue car", augmentations=5, weight=1.5)
    e = full(x, gen(3))
    (g,) = torch.autograd.grad(e.sum(), x)
    chunked = G.ClipEnergy(bundle64, text="a blue car", augmentations=5, weight=1.5, max_batch=3)
    assert torch.allclose(chunked(x, gen(3)), e, rtol=1e-10)
    v, g2 = chunked.value_and_grad(x, gen(3))
    assert not v.requires_grad and not g2.requires_grad
    assert torch.allclose(v, e.detach(), rtol=1e-10)
    assert torch.allclose(g2, g, rtol=1e-8, atol=1e-14)


def test_text_gradient_step_lowers_energy(G, bundle):
    energy = G.ClipEnergy(bundle, text="a photo of a cat", augmentations=4)
    x = images(2, 32, 32, seed=18).requires_grad_(True)
    e0 = energy(x, gen(4))
    (g,) = torch.autograd.grad(e0.sum(), x)
    norms = g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    x1 = (x - 0.05 * g / norms).detach()
    e1 = energy(x1, gen(4))
    assert (e1 < e0.detach() - 1e-5).all()


def test_weight_components_and_combined(G, bundle):
    x = images(2, 32, 32, seed=19).requires_grad_(True)
    text = G.ClipEnergy(bundle, text="green grass", augmentations=3, weight=2.5)
    u = text.unweighted(x, gen(6))
    assert torch.allclose(text(x, gen(6)), 2.5 * u)
    (name, val), = text.components(x, gen(6))
    assert name == "clip_text" and torch.allclose(val, 2.5 * u)

    img = G.ClipEnergy(bundle, image=images(1, 32, 32, seed=20), augmentations=2, weight=0.5)
    text2 = G.ClipEnergy(bundle, text="blue sky", augmentations=2)
    g = gen(7)
    separate = text(x, g) + img(x, g) + text2(x, g)
    combo = G.CombinedEnergy([text, img, text2], weight=2.0)
    total = combo(x, gen(7))
    assert torch.allclose(total, 2.0 * separate, atol=1e-6)
    assert torch.allclose(combo.unweighted(x, gen(7)), separate, atol=1e-6)
    comps = combo.components(x, gen(7))
    assert [n for n, _ in comps] == ["clip_text", "clip_image", "clip_text#2"]
    assert torch.allclose(sum(v for _, v in comps), total, atol=1e-6)
    (grad,) = torch.autograd.grad(total.sum(), x)
    v, g2 = combo.value_and_grad(x, gen(7))
    assert torch.allclose(v, total.detach(), atol=1e-6)
    assert torch.allclose(g2, grad, rtol=1e-4, atol=1e-7)
    assert combo.to("cpu") is combo and text.to("cpu") is text


def test_samples_are_independent_and_defaults(G, bundle):
    energy = G.ClipEnergy(bundle, text="a tree")
    assert energy.augmentations == 50 and energy.policies == ALL and energy.copies == 50
    energy = G.ClipEnergy(bundle, text="a tree", augmentations=4)
    a, b, c = images(3, 32, 32, seed=21)
    e1 = energy(torch.stack([a, b]), gen(8))
    e2 = energy(torch.stack([a, c]), gen(8))
    assert e1[0].item() == pytest.approx(e2[0].item(), abs=1e-6)
    assert abs(e1[1].item() - e2[1].item()) > 1e-4
