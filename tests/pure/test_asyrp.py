# SPDX-License-Identifier: GPL-3.0-or-later
"""Asyrp's math in pure torch, with a toy U-Net-like denoiser that exposes its bottleneck h."""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F


@pytest.fixture(scope="module")
def A(pack):
    return importlib.import_module("dpm_latent.samplers.asyrp")


@pytest.fixture(scope="module")
def S(pack):
    return pack.samplers


VE_SIGMAS = torch.tensor([14.6, 6.0, 3.0, 1.5, 0.8, 0.4, 0.2, 0.05, 0.0], dtype=torch.float64)
FLOW_SIGMAS = torch.tensor([1.0, 0.9, 0.75, 0.6, 0.4, 0.25, 0.1, 0.03, 0.0], dtype=torch.float64)


class ToyUNet(nn.Module):
    """x -> down conv -> h (the bottleneck) [+ delta_h] -> up conv, with a skip that never sees delta_h."""

    def __init__(self, family: str, channels: int = 4, hidden: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.family = family
        self.down = nn.Conv2d(channels + 1, hidden, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.up = nn.ConvTranspose2d(hidden, channels, 4, stride=2, padding=1)
        self.skip = nn.Conv2d(channels, channels, 1)
        self.requires_grad_(False)
        self.hook = None  # callable(h, sigma) -> delta_h

    def forward(self, x, sigma):
        a = 1.0 if self.family == "ve" else 1.0 - sigma
        scale = 1.0 / math.sqrt(a * a + sigma * sigma)
        xin = x * scale
        lvl = torch.full_like(xin[:, :1], math.log(sigma + 1e-3))
        h = torch.tanh(self.mid(torch.tanh(self.down(torch.cat([xin, lvl], 1)))))
        if self.hook is not None:
            h = h + self.hook(h, sigma)
        out = self.up(h) + self.skip(xin)
        # a valid-looking x0 prediction: shrink towards the data as sigma grows
        return (a * x * scale * scale) + 0.3 * out * sigma * scale

    def plain(self, x, sigma):
        self.hook = None
        return self(x, float(sigma))

    def edited_by(self, direction, strength=1.0):
        def run(x, sigma):
            self.hook = lambda h, s: strength * direction.delta(h, math.log(s) if s > 0 else -10.0)
            try:
                return self(x, float(sigma))
            finally:
                self.hook = None
        return run


def _code(S, net, family, sigmas, seed=0, batch=2):
    x0 = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return x0, S.encode(net.plain, x0, sigmas, 0.1, family, seed=seed)


def _block_direction(A, seed=0, channels=8, family="ve"):
    torch.manual_seed(seed)
    blk = A.DeltaBlock(channels)
    nn.init.normal_(blk.conv_out.weight, std=0.3)
    return A.Direction([blk], [1.0], {"family": family, "architecture": "toy", "latent_format": "toy",
                                      "h_shape": [channels, 4, 4]})


@pytest.mark.parametrize("family,sigmas", [("ve", VE_SIGMAS), ("flow", FLOW_SIGMAS)])
def test_strength_zero_without_boost_is_replay_bit_for_bit(A, S, family, sigmas):
    net = ToyUNet(family)
    x0, code = _code(S, net, family, sigmas)
    plain = S.replay(net.plain, code)
    out = A.asyrp_replay(net.plain, None, code, t_edit=0.4, t_boost=0.0)
    assert torch.equal(out, plain)
    assert (out - x0).abs().max() < 1e-4  # and replay lands on the encoded image
    # a zero-scaled direction is no edit either (h + 0 * delta_h == h exactly)
    zero = _block_direction(A).scaled(0.0)
    assert torch.equal(A.asyrp_replay(net.plain, net.edited_by(zero), code, 0.4), plain)


@pytest.mark.parametrize("family,sigmas", [("ve", VE_SIGMAS), ("flow", FLOW_SIGMAS)])
def test_asymmetric_step_uses_edited_x0_and_plain_direction(A, S, family, sigmas):
    net = ToyUNet(family)
    _x0, code = _code(S, net, family, sigmas)
    direction = _block_direction(A, family=family)
    edited = net.edited_by(direction)
    t_edit = 0.5
    n_edit = A.edited_steps(code.steps, t_edit)
    assert n_edit == 4  # positions 1, 7/8, 6/8, 5/8 > 0.5; 4/8 is not
    # independent re-derivation in epsilon form: x_t = alpha_t P + sqrt(sigma_t^2 - C^2) e + C eps
    x = code.x_start()
    for i in range(code.steps):
        s, t = float(code.sigmas[i]), float(code.sigmas[i + 1])
        d = net.plain(x, s)
        p = edited(x, s) if i < n_edit else d
        a_s, a_t = S.alpha(s, family), S.alpha(t, family)
        e = (x - a_s * d) / s
        if t == 0.0:
            x = p + code.residual
        else:
            _a, _b, c = S.step_coefficients(s, t, code.eta, family)
            x = a_t * p + math.sqrt(t * t - c * c) * e + c * code.noises[i]
    out = A.asyrp_replay(net.plain, edited, code, t_edit)
    assert torch.allclose(out, x, atol=1e-5, rtol=1e-5)
    assert (out - S.replay(net.plain, code)).abs().max() > 1e-3  # the edit did something


def test_edit_only_inside_interval(A, S):
    net = ToyUNet("ve")
    _x0, code = _code(S, net, "ve", VE_SIGMAS)
    calls = []
    direction = _block_direction(A)
    inner = net.edited_by(direction)

    def edited(x, sigma):
        calls.append(sigma)
        return inner(x, sigma)

    A.asyrp_replay(net.plain, edited, code, t_edit=0.6)
    assert calls == [float(v) for v in VE_SIGMAS[:4]]
    calls.clear()
    assert torch.equal(A.asyrp_replay(net.plain, edited, code, t_edit=1.0), S.replay(net.plain, code))
    assert calls == []
    with pytest.raises(A.CodeError, match="t_edit"):
        A.asyrp_replay(net.plain, edited, code, t_edit=1.5)


def test_boosting_is_seeded_and_breaks_exact_reconstruction(A, S):
    net = ToyUNet("ve")
    x0, code = _code(S, net, "ve", VE_SIGMAS)
    b1 = A.asyrp_replay(net.plain, None, code, t_edit=0.5, t_boost=0.3, seed=5)
    b2 = A.asyrp_replay(net.plain, None, code, t_edit=0.5, t_boost=0.3, seed=5)
    b3 = A.asyrp_replay(net.plain, None, code, t_edit=0.5, t_boost=0.3, seed=6)
    assert torch.equal(b1, b2) and not torch.equal(b1, b3)
    assert (b1 - x0).abs().max() > 1e-3
    # boosted steps are exactly those starting at position <= t_boost
    assert [A.is_boosted(i, 8, 0.3) for i in range(8)] == [False] * 6 + [True] * 2
    assert not any(A.is_boosted(i, 8, 0.0) for i in range(8))


def test_linearity_of_directions(A):
    d1, d2 = _block_direction(A, seed=1), _block_direction(A, seed=2)
    h = torch.randn(3, 8, 4, 4)
    for lvl in (-2.0, 0.5, 2.7):
        base1, base2 = d1.delta(h, lvl), d2.delta(h, lvl)
        assert torch.allclose(d1.scaled(-1.0).delta(h, lvl), -base1)
        assert torch.allclose(d1.scaled(2.0).delta(h, lvl), 2 * base1)
        both = A.combine([d1, d2], [0.5, -1.5])
        assert torch.allclose(both.delta(h, lvl), 0.5 * base1 - 1.5 * base2, atol=1e-6)
    other = A.Direction(d2.terms, d2.coefs, dict(d2.meta, architecture="other"))
    with pytest.raises(A.CodeError, match="architecture"):
        A.combine([d1, other], [1.0, 1.0])


def test_global_direction_is_per_step_and_checks_shape(A):
    levels = [math.log(s) for s in (14.6, 6.0, 3.0)]
    g = A.GlobalDelta((8, 4, 4), levels)
    with torch.no_grad():
        g.delta[1] = 1.0
    h = torch.zeros(2, 8, 4, 4)
    assert torch.equal(g(h, math.log(5.5)), torch.ones_like(h))
    assert torch.equal(g(h, math.log(14.0)), torch.zeros_like(h))
    with pytest.raises(A.CodeError, match="shape"):
        g(torch.zeros(2, 8, 8, 8), 0.0)


@pytest.mark.parametrize("family,top", [("ve", 14.6), ("flow", 1.0)])
def test_ddim_inversion_reconstructs_and_improves_with_steps(A, S, family, top):
    net = ToyUNet(family)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    errs = []
    for n in (5, 20, 80):
        if family == "ve":
            sig = torch.cat([torch.exp(torch.linspace(math.log(top), math.log(0.03), n)), torch.zeros(1)])
        else:
            sig = torch.cat([torch.linspace(top, 0.02, n), torch.zeros(1)])
        sig = sig.double()
        x_T = A.ddim_invert(net.plain, x0, sig, family)
        rec = A.asyrp_sample(net.plain, None, x_T, sig, family, t_edit=1.0)
        errs.append(float((rec - x0).norm() / x0.norm()))
    assert errs[2] < errs[1] < errs[0], errs
    assert errs[2] < 0.05, errs


def _toy_clip(dim=16, seed=0):
    proj = torch.randn(4 * 8 * 8, dim, generator=torch.Generator().manual_seed(100 + seed))

    def embed(lat):
        return F.normalize(torch.tanh(lat).flatten(1) @ proj, dim=-1)
    text_dir = torch.randn(dim, generator=torch.Generator().manual_seed(200 + seed))
    return embed, text_dir


@torch.no_grad()
def _held_out_loss(A, net, direction, x0, sigmas, embed, text_dir, t_edit):
    x_T = A.ddim_invert(net.plain, x0, sigmas, "ve")
    edited = None if direction is None else net.edited_by(direction)
    out = A.asyrp_sample(net.plain, edited, x_T, sigmas, "ve", t_edit=t_edit)
    return float(A.directional_clip_loss(embed(out), embed(x0), text_dir).mean())


@pytest.mark.parametrize("kind", ["implicit function", "global direction"])
def test_training_lowers_held_out_directional_loss(A, kind):
    sigmas = torch.cat([torch.exp(torch.linspace(math.log(14.6), math.log(0.05), 10)), torch.zeros(1)]).double()
    for seed in range(3):
        net = ToyUNet("ve", seed=seed)
        embed, text_dir = _toy_clip(seed=seed)
        g = torch.Generator().manual_seed(seed)
        train, held = torch.randn(6, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
        if kind == "implicit function":
            torch.manual_seed(seed)
            module = A.DeltaBlock(8)
        else:
            module = A.GlobalDelta((8, 4, 4), [A.noise_level(float(s), "ve") for s in sigmas[:-1]])
        seen_detached = []

        def edited_with(x, sigma, mod):
            seen_detached.append(x.grad_fn is None and not x.requires_grad)
            net.hook = lambda h, s: mod(h, A.noise_level(s, "ve"))
            try:
                return net(x, float(sigma))
            finally:
                net.hook = None

        direction = A.Direction([module], [1.0], {"h_shape": [8, 4, 4]})
        before = _held_out_loss(A, net, direction, held, sigmas, embed, text_dir, 0.5)
        trace = A.train_direction(net.plain, edited_with, module, train, sigmas, "ve", embed, text_dir,
                                  t_edit=0.5, iterations=4, learning_rate=0.5, batch_size=2, seed=seed)
        after = _held_out_loss(A, net, direction, held, sigmas, embed, text_dir, 0.5)
        assert all(seen_detached)  # every asymmetric step starts from a detached x_t
        assert len(trace.losses) == 4 and trace.clip_losses[-1] < trace.clip_losses[0], trace.clip_losses
        assert after < before - 0.05, (kind, seed, before, after)


@pytest.mark.parametrize("family,sigmas", [("ve", VE_SIGMAS), ("flow", FLOW_SIGMAS)])
def test_masked_code_edits_only_inside_the_mask(A, S, family, sigmas):
    """A code with an edit mask: outside the mask every step stays the source chain, with or without an
    edit, and a strength list tiles the mask and the chain with the code."""
    net = ToyUNet(family)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :4] = 1.0
    code = S.encode(net.plain, x0, sigmas, 0.1, family, seed=3, mask=mask)
    d = _block_direction(A, family=family)
    steps = []
    out = A.asyrp_replay(net.plain, net.edited_by(d, 2.0), code, t_edit=0.3,
                         callback=lambda i, dn, x, n: steps.append(x.clone()))
    keep = (mask == 0).expand_as(out)
    for i, x in enumerate(steps):
        assert torch.equal(x[keep], code.trajectory[i][keep]), i
    assert torch.equal(out[keep], code.trajectory[-1][keep])
    plain = A.asyrp_replay(net.plain, None, code, t_edit=0.3)
    assert torch.equal(plain, S.replay(net.plain, code))
    assert (out - plain)[~keep].abs().max() > 1e-3  # the edit does act inside the mask
    tiled = code.tiled(3)
    assert tiled.trajectory.shape[1] == 6 and tiled.batch_size == 6
    many = A.asyrp_replay(net.plain, net.edited_by(d, 2.0), tiled, t_edit=0.3)
    assert torch.equal(many[:2], out) and torch.equal(many[4:], out)


# ---------------------------------------------------------------- directions from examples

def test_example_direction_is_the_mean_difference_and_applies_at_every_position(A):
    levels = [math.log(14.6), math.log(3.0), math.log(0.4)]
    g = torch.Generator().manual_seed(0)
    h_with = [torch.randn(8, 4, 4, generator=g) for _ in range(2)]
    h_without = [torch.randn(8, 4, 4, generator=g) for _ in range(2)]
    d = A.example_direction(h_with, h_without, levels, {"h_shape": [8, 4, 4]})
    h = torch.randn(3, 8, 4, 4, generator=g)
    for i in range(2):
        want = (h_with[i] - h_without[i]).mean(dim=(1, 2), keepdim=True).expand(8, 4, 4)
        assert torch.allclose(d.delta(h, levels[i]), want.expand(3, 8, 4, 4))
    assert torch.equal(d.delta(h, levels[2]), torch.zeros_like(h))   # past the examples' steps: no edit
    # position-free: the same per-channel shift on h of another size
    big = torch.randn(1, 8, 6, 2, generator=g)
    assert torch.allclose(d.delta(big, levels[0])[0, :, 5, 1], (h_with[0] - h_without[0]).mean(dim=(1, 2)))
    # per position: exactly the difference map; strength scales it linearly
    p = A.example_direction(h_with, h_without, levels, per_position=True)
    assert torch.allclose(p.scaled(2.0).delta(h, levels[1]), 2.0 * (h_with[1] - h_without[1]).expand(3, 8, 4, 4))
    with pytest.raises(A.CodeError, match="one image size"):
        A.example_direction(h_with, [torch.zeros(8, 2, 2)] * 2, levels)


@pytest.mark.parametrize("family,sigmas", [("ve", VE_SIGMAS), ("flow", FLOW_SIGMAS)])
def test_mean_h_along_chain_reads_h_at_each_step_of_the_inverted_chain(A, family, sigmas):
    """The means are of the h the model passes through on the plain DDIM chain from the DDIM-inverted x_T,
    batch by batch: the same as one image at a time."""
    net = ToyUNet(family)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    seen = []

    def read_h(call):
        net.hook = lambda h, s: (seen.append(h.clone()), torch.zeros_like(h))[1]
        try:
            call()
        finally:
            net.hook = None
        return seen[-1]
    def plain(x, sigma):  # net.plain would clear the hook read_h sets
        return net(x, float(sigma))
    means, norms = A.mean_h_along_chain(plain, read_h, x0, sigmas, family, 4, batch_size=2)
    assert len(means) == 4 and means[0].shape == (8, 4, 4)
    one = [A.mean_h_along_chain(plain, read_h, x0[k:k + 1], sigmas, family, 4) for k in range(3)]
    for i in range(4):
        assert torch.allclose(means[i], sum(o[0][i] for o in one) / 3, atol=1e-6)
        assert math.isclose(norms[i], sum(o[1][i] for o in one) / 3, rel_tol=1e-5)
    # step 0 is at x_T: h of the model at sigma_0 on the inverted latents
    x_T = A.ddim_invert(net.plain, x0, sigmas, family)
    seen.clear()
    net.hook = lambda h, s: (seen.append(h.clone()), torch.zeros_like(h))[1]
    net(x_T, float(sigmas[0]))
    net.hook = None
    assert torch.allclose(means[0], seen[0].mean(0), atol=1e-6)


def test_training_l1_target_is_the_source_chain(A):
    """With only the L1 term, a direction that keeps drifting the chain has a larger loss against the source
    chain's P_t than against the plain prediction at the drifted x_t: the official target sees drift."""
    sigmas = torch.cat([torch.exp(torch.linspace(math.log(14.6), math.log(0.05), 8)), torch.zeros(1)]).double()
    net = ToyUNet("ve", seed=1)
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(2, 4, 8, 8, generator=g) * 14.6
    module = A.GlobalDelta((8, 4, 4), [A.noise_level(float(s), "ve") for s in sigmas[:-1]])
    with torch.no_grad():
        module.delta.normal_(0.0, 0.3, generator=g)

    def edited_with(x, sigma, mod):
        net.hook = lambda h, s: mod(h, A.noise_level(s, "ve"))
        try:
            return net(x, float(sigma))
        finally:
            net.hook = None
    s = [float(v) for v in sigmas]
    zero = torch.zeros(2, 3)
    _tot, _clip, l1 = A._chain(net.plain, edited_with, module, x_T, zero, s, "ve", 6, lambda p: torch.ones(p.shape[0], 3),
                               torch.ones(3), 0.0, 1.0)
    # the same steps scored against the plain prediction at the edited chain's own x_t
    x, drifted = x_T, []
    with torch.no_grad():
        for i in range(6):
            a, b, _c = A.step_coefficients(s[i], s[i + 1], 0.0, "ve")
            d = net.plain(x, s[i])
            p = edited_with(x, s[i], module)
            drifted.append(float((p - d).abs().mean()))
            x = A._edit_term(a * x + b * d, p, d, s[i + 1], "ve")
    assert l1 > sum(drifted) / 6 * 1.05, (l1, sum(drifted) / 6)


def test_gaussian_control_has_the_directions_norm_per_step(A):
    sig = [1.0, 0.75, 0.5, 0.25, 0.0]
    meta = {"h_shape": [8, 4, 4], "sigmas": sig, "family": "flow", "h_norm": [10.0, 20.0],
            "delta_over_h": [0.1, 0.3]}
    d = A.Direction([A.GlobalDelta((8, 1, 1), [A.noise_level(s, "flow") for s in sig[:-1]])], [1.0], meta)
    h = torch.zeros(1, 8, 4, 4)
    for rel, want in ((None, [1.0, 6.0]), (0.2, [2.0, 4.0])):
        c = A.gaussian_control(d, seed=3, relative=rel)
        for i, w in enumerate(want):
            delta = c.delta(h, A.noise_level(sig[i], "flow"))
            assert math.isclose(float(delta.norm()), w, rel_tol=1e-5) and float(delta.std()) > 0
        assert float(c.delta(h, A.noise_level(sig[2], "flow")).abs().max()) == 0.0   # outside the records
    a, b = A.gaussian_control(d, seed=3), A.gaussian_control(d, seed=4)
    assert not torch.equal(a.terms[0].delta, b.terms[0].delta)
    with pytest.raises(A.CodeError, match="h_norm"):
        A.gaussian_control(A.Direction(d.terms, [1.0], {k: v for k, v in meta.items() if k != "h_norm"}))


def _scene(g, channels=6, size=8, at=(2, 3), obj=None, bg=None):
    """h of one object (a 2x2 patch of ``obj``) on a plain ``bg``, plus a little noise: (C, H, W)."""
    bg = torch.randn(channels, generator=g) if bg is None else bg
    h = bg.view(-1, 1, 1).expand(channels, size, size).clone() + 0.01 * torch.randn(channels, size, size, generator=g)
    y, x = at
    h[:, y:y + 2, x:x + 2] += obj.view(-1, 1, 1)
    return h


def _red_blue_examples():
    """Three blue-object scenes and three red-object scenes on one background, objects at other places:
    (generator, C, levels, bg, red, blue, with_, without)."""
    g = torch.Generator().manual_seed(0)
    C, levels = 6, [math.log(14.6), math.log(3.0)]
    bg, red = torch.randn(C, generator=g), torch.zeros(C)
    red[0], blue = 3.0, torch.zeros(C)
    blue[0], blue[1] = 3.0, 2.0
    with_ = torch.stack([_scene(g, C, at=(k, 5 - k), obj=blue, bg=bg) for k in range(3)])
    without = torch.stack([_scene(g, C, at=(5 - k, k), obj=red, bg=bg) for k in range(3)])
    return g, C, levels, bg, red, blue, with_, without


def test_object_direction_shifts_the_object_wherever_it_is_and_leaves_the_background(A):
    """spread 'object': delta is the examples' object contrast with minus without (made orthogonal to the
    probe, so the object's strength stays), applied through a gate that is 1 on a held-out object at a
    new position and 0 on the background."""
    g, C, levels, bg, red, blue, with_, without = _red_blue_examples()
    ca, cb = A.object_contrast(with_).mean(0), A.object_contrast(without).mean(0)
    assert torch.allclose(cb, red, atol=0.05) and torch.allclose(ca, blue, atol=0.05)
    stats = A.object_stats(without)
    assert stats.shape == (3, C + 1) and torch.all(stats[:, -1] == 4)      # the 2x2 object's positions
    d = A.object_direction([ca], [cb], levels, {"h_shape": [C, 8, 8]})
    term = d.terms[0]
    assert abs(float(term.delta[0] @ term.probe[0])) < 1e-4                # orthogonal to the probe
    assert torch.allclose(term.delta[0], blue - red, atol=0.05)           # here blue - red is already orthogonal
    held = _scene(g, C, at=(6, 1), obj=red, bg=bg).unsqueeze(0)            # a position no example had
    out = d.delta(held, levels[0])
    assert torch.allclose(out[0, :, 6, 1], term.delta[0], atol=0.05)       # the object is shifted fully
    assert float(out[0, :, :4, 4:].abs().max()) < 0.02                      # the background is not
    assert torch.equal(d.delta(held, levels[1]), torch.zeros_like(held))   # past the examples' steps: no edit
    assert torch.allclose(d.scaled(2.0).delta(held, levels[0]), 2 * out)
    back = A.make_term(term.config())
    back.load_state_dict(term.state_dict())
    assert torch.equal(back(held, levels[0]), term(held, levels[0]))
    with pytest.raises(A.CodeError, match="channels"):
        d.delta(torch.zeros(1, C + 1, 4, 4), levels[0])


def test_centred_object_direction_keeps_the_pictures_mean_h(A):
    """spread 'object, centred': the gated shift minus its mean over each image's positions, per channel, so
    the mean h of every picture is unchanged while the object still moves against the background by the
    full delta; the record says so and survives a save, and a record without the key (files from before it
    existed) is not centred."""
    g, C, levels, bg, red, blue, with_, without = _red_blue_examples()
    ca, cb = A.object_contrast(with_).mean(0), A.object_contrast(without).mean(0)
    plain = A.object_direction([ca], [cb], levels, {"h_shape": [C, 8, 8]})
    centred = A.object_direction([ca], [cb], levels, {"h_shape": [C, 8, 8]}, centred=True)
    held = torch.stack([_scene(g, C, at=(6, 1), obj=red, bg=bg), _scene(g, C, at=(2, 3), obj=red, bg=bg)])
    p, c = plain.delta(held, levels[0]), centred.delta(held, levels[0])
    assert float(p.mean(dim=(2, 3)).abs().max()) > 0.05                  # the plain shift moves the mean h
    assert float(c.mean(dim=(2, 3)).abs().max()) < 1e-6                  # the centred one does not
    assert torch.allclose(c, p - p.mean(dim=(2, 3), keepdim=True), atol=1e-6)
    # the object against the background: the full delta either way
    obj_minus_bg = c[0, :, 6, 1] - c[0, :, 0, 7]
    assert torch.allclose(obj_minus_bg, centred.terms[0].delta[0], atol=0.05)
    assert centred.terms[0].config()["centred"] is True and "centred" not in plain.terms[0].config()
    back = A.make_term(centred.terms[0].config())
    back.load_state_dict(centred.terms[0].state_dict())
    assert torch.equal(back(held, levels[0]), c)
    old = dict(centred.terms[0].config())
    del old["centred"]
    assert A.make_term(old).centred is False
    assert torch.equal(centred.delta(held, levels[1]), torch.zeros_like(held))   # past the examples' steps
    # the size the node records (||delta_h|| / ||h||): the shift's norm on a picture with the examples' object
    k = float(A.object_stats(without)[:, -1].mean())
    for d, is_centred in ((plain, False), (centred, True)):
        size = float(d.terms[0].delta[0].norm()) * A.object_shift_scale(k, 8 * 8, is_centred)
        for i in range(2):
            assert abs(float(d.delta(held, levels[0])[i].norm()) - size) < 0.01 * size   # uncentred sqrt(k): 3 % off
    assert A.object_shift_scale(4, 64, True) < A.object_shift_scale(4, 64, False) == 2.0


def test_pair_regions_map_where_a_pair_differs_onto_h_positions(A):
    """A U-Net's h grid is its own map; a DiT's L tokens are the latent's p x p patches (row-major, the latent
    padded up to a multiple of p); a position is in the region when its pooled difference reaches 0.7 of its
    own image's largest; identical pairs have none."""
    diff = torch.zeros(3, 1, 8, 8)
    diff[0, 0, 0:2, 4:6] = 1.0                     # image 0 differs in one 2x2 patch: token (0, 2) of a 4x4 grid
    diff[2, 0, 6:8, 0:2] = 0.3                     # image 2 less, elsewhere: its own max counts
    h_dit = torch.zeros(3, 5, 16, 1)
    assert A.position_grid((8, 8), h_dit) == ((4, 4), 2)
    assert A.position_grid((8, 8), torch.zeros(1, 5, 2, 2)) == ((2, 2), None)
    assert A.position_grid((9, 7), torch.zeros(1, 5, 20, 1)) == ((5, 4), 2)     # padded: ceil, not floor
    r = A.pair_regions(diff, h_dit)
    assert r.shape == (3, 16) and r[0].nonzero().flatten().tolist() == [2] and float(r[1].sum()) == 0.0
    assert r[2].nonzero().flatten().tolist() == [12]
    assert A.pair_regions(diff, torch.zeros(3, 5, 2, 2))[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    graded = torch.zeros(1, 1, 2, 8)
    graded[0, 0, :, 0:2], graded[0, 0, :, 2:4], graded[0, 0, :, 4:6] = 1.0, 0.75, 0.6
    assert A.pair_regions(graded, torch.zeros(1, 5, 4, 1))[0].tolist() == [1.0, 1.0, 0.0, 0.0]
    # a latent 5 high: the last token row covers latent row 4 alone (not rows 3-4)
    odd = torch.zeros(1, 1, 5, 2)
    odd[0, 0, 2:4] = 1.0
    assert A.pair_regions(odd, torch.zeros(1, 5, 3, 1))[0].tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(A.CodeError, match="no patch grid"):
        A.position_grid((8, 8), torch.zeros(1, 5, 7, 1))


def test_region_direction_shifts_the_region_wherever_it_is_and_leaves_the_rest(A):
    """spread 'where pairs differ': delta is the mean h over the pairs' regions with minus without; the gate,
    Fisher's discriminant of region against rest on the images without, is 1 on a held-out object at a new
    position and 0 on the background, even where the background's own h varies more than the object's."""
    g = torch.Generator().manual_seed(0)
    C, levels = 6, [math.log(14.6), math.log(3.0), math.log(0.5)]
    bg, red = torch.randn(C, generator=g), torch.zeros(C)
    red[0], blue = 3.0, torch.zeros(C)
    blue[0], blue[1] = 3.0, 2.0
    places = [(k, 5 - k) for k in range(3)]
    with_ = torch.stack([_scene(g, C, at=p, obj=blue, bg=bg) for p in places])
    without = torch.stack([_scene(g, C, at=p, obj=red, bg=bg) for p in places])
    # a background texture along the object's own channel 0 (and channel 3): a probe of the class means alone
    # would see it as object; the discriminant cancels it through channel 3
    texture = 1.5 * torch.randn(3, 8, 8, generator=g)
    for h in (with_, without):
        h[:, 0] += texture
        h[:, 3] += texture
    diff = (with_ - without)[:, :2].norm(dim=1, keepdim=True)            # "latents": the same maps here

    def stats(h, scatter, diff=diff):
        parts = iter([h[:2], h[2:]])             # two batches, summed into one step's stats

        def read(call):
            call()
            return next(parts)
        out, norms = A.region_stats_along_chain(lambda x, s: torch.zeros_like(x), read, torch.zeros(3, 1, 8, 8),
                                                diff, torch.tensor([2.0, 1.0, 0.0]), "ve", 1, scatter=scatter,
                                                batch_size=2)
        assert norms[0] == pytest.approx(float(h.flatten(1).norm(dim=1).mean()), rel=1e-5)
        return out
    sw, so = stats(with_, False), stats(without, True)
    assert so[0].n_region == 12 and so[0].n_images == 3 and sw[0].scatter is None
    # the scatter about the first batch's mean, summed over both batches
    flat = without.double().permute(0, 2, 3, 1).reshape(-1, C)
    ref = without[:2].double().mean((0, 2, 3))
    want = (flat - ref).T @ (flat - ref)
    assert torch.allclose(so[0].ref, ref) and torch.allclose(so[0].scatter, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    step = A.region_step(sw[0], so[0])
    d = A.region_direction([step, None], levels, {"h_shape": [C, 8, 8]})
    term = d.terms[0]
    assert torch.allclose(term.delta[0], blue - red, atol=0.05)
    # the probe is Fisher's discriminant with the pooled within-class covariance
    inside = A.pair_regions(diff, without).bool().flatten()
    mr, mb = flat[inside].mean(0), flat[~inside].mean(0)
    within = torch.cat([flat[inside] - mr, flat[~inside] - mb])
    cov = within.T @ within / flat.shape[0]
    u = torch.linalg.solve(cov + 1e-3 * cov.diagonal().mean() * torch.eye(C, dtype=cov.dtype), mr - mb)
    got = term.probe[0].double()     # the texture makes S nearly singular: compare direction and size
    assert float(torch.nn.functional.cosine_similarity(got, u, dim=0)) > 0.99999
    assert float(got.norm() / u.norm()) == pytest.approx(1.0, rel=1e-3)
    assert term.bounds[0].tolist() == pytest.approx([float(got @ mb), float(got @ mr)], rel=1e-4)
    held = _scene(g, C, at=(6, 1), obj=red, bg=bg).unsqueeze(0)           # a position no example had
    t = 1.5 * torch.randn(8, 8, generator=g)
    held[:, 0] += t
    held[:, 3] += t
    out = d.delta(held, levels[0])
    assert torch.allclose(out[0, :, 6, 1], term.delta[0], atol=0.1)       # the object is shifted fully
    strong = _scene(g, C, at=(6, 1), obj=2 * red, bg=bg).unsqueeze(0)     # beyond the region's mean: gate 1 exactly
    strong[:, 0] += t
    strong[:, 3] += t
    assert torch.equal(d.delta(strong, levels[0])[0, :, 6, 1], term.delta[0])
    assert float(out[0, :, :4, 4:].abs().max()) < 0.05                     # the background is not
    assert torch.equal(d.delta(held, levels[1]), torch.zeros_like(held))  # a step without stats: no edit
    assert torch.allclose(d.scaled(2.0).delta(held, levels[0]), 2 * out)
    back = A.make_term(term.config())
    back.load_state_dict(term.state_dict())
    assert torch.equal(back(held, levels[0]), term(held, levels[0]))
    same = stats(without, True, torch.zeros_like(diff))                   # identical pairs: no region
    with pytest.raises(A.CodeError, match="do not differ anywhere"):
        A.region_step(same[0], same[0])
    everywhere = stats(without, True, torch.ones_like(diff))               # every position in the region
    with pytest.raises(A.CodeError, match="every one of h's 64 positions per image"):
        A.region_step(everywhere[0], everywhere[0])


def test_direction_files_without_an_h_site_read_as_the_unet_middle_block(A, pack):
    FMT = importlib.import_module("dpm_latent.samplers.asyrp_format")
    meta = {"architecture": "SD15", "unet": "{}", "latent_format": "SD15", "family": "eps", "h_shape": [8, 1, 1],
            "sigmas": [1.0, 0.0], "source_text": "a", "target_text": "b", "t_edit": 0.5, "t_boost": 0.0}
    d = A.example_direction([torch.ones(8, 2, 2)], [torch.zeros(8, 2, 2)], [0.0], meta)
    tensors, header = FMT.direction_tensors(d)
    assert FMT.direction_from_tensors(tensors, header, "old").meta["h_site"] == "unet middle block"
    d.meta["h_site"] = "unet after first up block"
    tensors, header = FMT.direction_tensors(d)
    up = FMT.direction_from_tensors(tensors, header, "new")
    assert up.meta["h_site"] == "unet after first up block"
    with pytest.raises(A.CodeError, match="h_site 'unet after first up block', direction 1 on 'unet middle"):
        A.combine([FMT.direction_from_tensors(*FMT.direction_tensors(A.Direction(d.terms, [1.0], dict(
            meta, h_site="unet middle block"))), "a"), up], [1.0, 1.0])
