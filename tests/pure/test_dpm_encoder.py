# SPDX-License-Identifier: GPL-3.0-or-later
"""The DPM-Encoder's math, checked against closed forms and an independent DDIM-eta."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats


@pytest.fixture(scope="module")
def S(pack):
    return pack.samplers


def gaussian_denoiser(family: str, m: float, v: float):
    """Exact E[x0 | x_sigma] for x0 ~ N(m, v) per coordinate and x = alpha x0 + sigma n."""
    def denoise(x, sigma):
        a = 1.0 if family == "ve" else 1.0 - sigma
        prec = a * a / (sigma * sigma) + 1.0 / v
        return (a * x / (sigma * sigma) + m / v) / prec
    return denoise


def posterior_var(family, sigma, v):
    a = 1.0 if family == "ve" else 1.0 - sigma
    return 1.0 / (a * a / (sigma * sigma) + 1.0 / v)


VE_SIGMAS = torch.tensor([14.6, 6.0, 3.0, 1.5, 0.8, 0.4, 0.2, 0.05, 0.0], dtype=torch.float64)
FLOW_SIGMAS = torch.tensor([1.0, 0.9, 0.75, 0.6, 0.4, 0.25, 0.1, 0.03, 0.0], dtype=torch.float64)


@pytest.mark.parametrize("family,sigmas", [("ve", VE_SIGMAS), ("flow", FLOW_SIGMAS)])
def test_step_keeps_marginals(S, family, sigmas):
    for eta in (0.05, 0.1, 0.5, 1.0):
        for s, t in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            a, b, c = S.step_coefficients(s, t, eta, family)
            # x_t - alpha_t x0 = A (x_s - alpha_s x0) + C eps  must have std sigma_t
            assert math.isclose(a * a * s * s + c * c, t * t, rel_tol=1e-12, abs_tol=1e-15)
            assert math.isclose(b, S.alpha(t, family) - S.alpha(s, family) * a, rel_tol=1e-12, abs_tol=1e-15)
            assert (c > 0) == (t > 0)


def test_ve_step_is_comfy_ancestral_step(S):
    # k-diffusion/ComfyUI: sigma_up = min(t, eta*sqrt(t^2 (s^2 - t^2) / s^2)), Euler to sigma_down
    for s, t, eta in [(14.6, 6.0, 0.1), (3.0, 1.5, 1.0), (0.4, 0.2, 0.5)]:
        up = min(t, eta * math.sqrt(t * t * (s * s - t * t) / (s * s)))
        down = math.sqrt(t * t - up * up)
        a, b, c = S.step_coefficients(s, t, eta, "ve")
        assert math.isclose(c, up, rel_tol=1e-12)
        assert math.isclose(a, down / s, rel_tol=1e-12)
        assert math.isclose(b, 1 - down / s, rel_tol=1e-12)


def ddim_alphabar_posterior(x_vp, x0, abar_t, abar_prev, eta, xi):
    """DDIM-eta written from the paper's formulas in alpha-bar (VP) form."""
    sig = eta * math.sqrt((1 - abar_prev) / (1 - abar_t)) * math.sqrt(1 - abar_t / abar_prev)
    e_t = (x_vp - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)
    return math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev - sig ** 2) * e_t + sig * xi, sig


def ddim_alphabar_noise(x_prev_vp, x_vp, eps_hat, abar_t, abar_prev, eta):
    sig = eta * math.sqrt((1 - abar_prev) / (1 - abar_t)) * math.sqrt(1 - abar_t / abar_prev)
    x0_hat = (x_vp - math.sqrt(1 - abar_t) * eps_hat) / math.sqrt(abar_t)
    mean = math.sqrt(abar_prev) * x0_hat + math.sqrt(1 - abar_prev - sig ** 2) * eps_hat
    return (x_prev_vp - mean) / sig


@pytest.mark.parametrize("family", ["ve", "flow"])
def test_posterior_and_noise_match_independent_ddim(S, family):
    """On SD's discrete schedule (ve) and a flow schedule, the encoder's posterior draw and
    solved noise equal DDIM-eta computed in alpha-bar form, to float64 precision."""
    g = torch.Generator().manual_seed(3)
    if family == "ve":
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        abar = torch.cumprod(1 - betas, 0)
        ts = list(range(999, 0, -100))
        sig = [math.sqrt((1 - float(abar[t])) / float(abar[t])) for t in ts]
    else:
        sig = [1.0, 0.85, 0.6, 0.4, 0.2, 0.08]
    eta = 0.3
    x0 = torch.randn(64, generator=g, dtype=torch.float64)
    for s, t in zip(sig[:-1], sig[1:]):
        a_s, a_t = S.alpha(s, family), S.alpha(t, family)
        abar_s, abar_t = a_s ** 2 / (a_s ** 2 + s ** 2), a_t ** 2 / (a_t ** 2 + t ** 2)
        x_s = a_s * x0 + s * torch.randn(64, generator=g, dtype=torch.float64)
        xi = torch.randn(64, generator=g, dtype=torch.float64)
        A, Bc, C = S.step_coefficients(s, t, eta, family)
        ours = A * x_s + Bc * x0 + C * xi
        ref_vp, _ = ddim_alphabar_posterior(x_s / math.sqrt(a_s ** 2 + s ** 2), x0, abar_s, abar_t, eta, xi)
        torch.testing.assert_close(ours / math.sqrt(a_t ** 2 + t ** 2), ref_vp, rtol=1e-10, atol=1e-10)
        if a_s == 0.0:
            continue  # the alpha-bar form cannot express x0_hat at sigma = 1 (abar = 0)
        # solved noise for an arbitrary model prediction d
        d = x0 + 0.3 * torch.randn(64, generator=g, dtype=torch.float64)
        eps_ours = (ours - A * x_s - Bc * d) / C
        eps_hat = (x_s - a_s * d) / s  # the model's noise prediction that goes with d
        ref_eps = ddim_alphabar_noise(ref_vp, x_s / math.sqrt(a_s ** 2 + s ** 2), eps_hat, abar_s, abar_t, eta)
        torch.testing.assert_close(eps_ours, ref_eps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family,sigmas", [("ve", VE_SIGMAS), ("flow", FLOW_SIGMAS)])
def test_exact_reconstruction_and_batch(S, family, sigmas):
    den = gaussian_denoiser(family, 0.2, 0.7)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    code = S.encode(den, x0, sigmas, 0.1, family, seed=5)
    rec = S.replay(den, code)
    assert (rec - x0).abs().max().item() < 1e-5
    assert code.noises.shape == (len(sigmas) - 2, 3, 4, 8, 8)
    # each image gets its own noises
    assert not torch.allclose(code.noises[:, 0], code.noises[:, 1])
    # same seed, same bits; other seed, other code
    again = S.encode(den, x0, sigmas, 0.1, family, seed=5)
    assert torch.equal(again.noises, code.noises) and torch.equal(again.start_noise, code.start_noise)
    other = S.encode(den, x0, sigmas, 0.1, family, seed=6)
    assert not torch.equal(other.noises, code.noises)
    # a different denoiser (an "edit") gives a different result
    edited = S.replay(gaussian_denoiser(family, -0.5, 0.7), code)
    assert (edited - x0).abs().mean().item() > 0.05


@pytest.mark.parametrize("family,sigmas", [("ve", VE_SIGMAS), ("flow", FLOW_SIGMAS)])
def test_encoded_noise_variance_is_the_closed_form(S, family, sigmas):
    """With the exact denoiser of Gaussian data the solved noise is exactly
    N(0, 1 + B^2 Var[x0|x_s] / C^2): standard normal only when that excess is small."""
    m, v, eta = 0.3, 0.5, 0.1
    den = gaussian_denoiser(family, m, v)
    x0 = m + math.sqrt(v) * torch.randn(20000, 1, 2, 2, generator=torch.Generator().manual_seed(2),
                                        dtype=torch.float64)
    code = S.encode(den, x0, sigmas, eta, family, seed=9)
    s = sigmas.tolist()
    for i in range(len(s) - 2):
        _, b, c = S.step_coefficients(s[i], s[i + 1], eta, family)
        want = math.sqrt(1 + b * b * posterior_var(family, s[i], v) / (c * c))
        got = code.noises[i].std().item()
        assert abs(got / want - 1) < 0.02, (i, got, want)
        assert abs(code.noises[i].mean().item()) < 0.03 * want


@pytest.mark.parametrize("family", ["ve", "flow"])
def test_encoded_noise_is_standard_normal_for_a_fine_ddpm_chain(S, family):
    """The paper's claim: encoding data from a (near-)perfect model gives z ~ N(0, I).
    Exact denoiser, eta = 1 (DDPM), 400 log-spaced steps: mean 0, std 1, KS test,
    no correlation across steps."""
    m, v = 0.3, 0.5
    den = gaussian_denoiser(family, m, v)
    if family == "ve":
        sig = torch.exp(torch.linspace(math.log(14.6), math.log(0.03), 400, dtype=torch.float64))
    else:
        lam = torch.exp(torch.linspace(math.log(50.0), math.log(0.03), 400, dtype=torch.float64))
        sig = lam / (1 + lam)  # flow sigma with sigma/(1-sigma) = lam
    sigmas = torch.cat([sig, torch.zeros(1, dtype=torch.float64)])
    x0 = m + math.sqrt(v) * torch.randn(2000, 1, 1, 1, generator=torch.Generator().manual_seed(4),
                                        dtype=torch.float64)
    code = S.encode(den, x0, sigmas, 1.0, family, seed=11)
    z = code.noises.flatten()
    assert abs(z.mean().item()) < 0.01
    assert abs(z.std().item() - 1) < 0.02
    sample = z[torch.randperm(z.numel(), generator=torch.Generator().manual_seed(0))[:20000]].numpy()
    assert stats.kstest(sample, "norm").pvalue > 0.01
    # the start noise is exactly the q(x_start|x0) draw
    assert abs(code.start_noise.std().item() - 1) < 0.05
    # no correlation between consecutive steps' noises
    n = code.noises.reshape(code.noises.shape[0], -1)
    r = torch.stack([torch.corrcoef(n[k:k + 2])[0, 1] for k in range(0, n.shape[0] - 1, 7)])
    assert r.abs().mean().item() < 0.05
    assert r.abs().max().item() < 0.15


def _nan_image():
    bad = torch.zeros(1, 4, 2, 2)
    bad[0, 0, 0, 0] = float("nan")
    return bad


REFUSED_ENCODES = {  # case: (encode arguments after the denoiser, what the error says)
    "eta zero": (lambda: (torch.zeros(1, 4, 2, 2), VE_SIGMAS, 0.0, "ve"), "eta must be > 0"),
    "nan image": (lambda: (_nan_image(), VE_SIGMAS, 0.1, "ve"), "NaN"),
    "schedule not ending at 0": (lambda: (torch.zeros(1, 4, 2, 2), VE_SIGMAS[:-1], 0.1, "ve"), "must end at 0"),
    "schedule increasing": (lambda: (torch.zeros(1, 4, 2, 2), torch.tensor([1.0, 2.0, 0.0]), 0.1, "ve"),
                            "decrease strictly"),
    "flow sigma above 1": (lambda: (torch.zeros(1, 4, 2, 2), torch.tensor([2.0, 0.5, 0.0]), 0.1, "flow"),
                           "lie in \\[0, 1\\]"),
    "unknown family": (lambda: (torch.zeros(1, 4, 2, 2), VE_SIGMAS, 0.1, "edm"), "family"),
}


@pytest.mark.parametrize("case", list(REFUSED_ENCODES))
def test_encode_refuses(S, case):
    make_args, message = REFUSED_ENCODES[case]
    x0, sigmas, eta, family = make_args()
    with pytest.raises(S.CodeError, match=message):
        S.encode(gaussian_denoiser("ve", 0.0, 1.0), x0, sigmas, eta, family, seed=0)


def test_prior_code_scale(S):
    code = S.prior_code((2, 4, 8, 8), VE_SIGMAS, 0.1, "ve", seed=1)
    assert math.isclose(code.start_scale, math.sqrt(1 + 14.6 ** 2))
    assert torch.count_nonzero(code.residual) == 0 and torch.count_nonzero(code.start_mean) == 0
    code.validate()
    flow = S.prior_code((2, 16, 4, 4), FLOW_SIGMAS, 0.1, "flow", seed=1)
    assert math.isclose(flow.start_scale, 1.0)


def test_code_file_round_trip_and_corruption(pack, S, tmp_path):
    from safetensors.torch import save_file

    fmt = pack.samplers.code_format
    den = gaussian_denoiser("flow", 0.0, 1.0)
    code = S.encode(den, torch.randn(2, 16, 4, 4), FLOW_SIGMAS, 0.1, "flow", seed=3)
    path = fmt.save_code(code, tmp_path / "a.dpmcode.safetensors")
    back = fmt.load_code(path)
    for k in ("start_mean", "start_noise", "noises", "residual", "sigmas"):
        assert torch.equal(getattr(back, k), getattr(code, k).to(getattr(back, k).dtype))
    assert back.family == "flow" and back.eta == code.eta and back.start_scale == code.start_scale
    torch.testing.assert_close(S.replay(den, back), S.replay(den, code))

    raw = path.read_bytes()
    (tmp_path / "trunc.dpmcode.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(S.CodeError, match="trunc.dpmcode.safetensors: the file is corrupt"):
        fmt.load_code(tmp_path / "trunc.dpmcode.safetensors")
    (tmp_path / "junk.dpmcode.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(S.CodeError):
        fmt.load_code(tmp_path / "junk.dpmcode.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "something"})
    with pytest.raises(S.CodeError, match="not a DPM latent code"):
        fmt.load_code(tmp_path / "other.safetensors")
    meta = fmt.code_metadata(code)
    tensors = {"sigmas": code.sigmas, "start_mean": code.start_mean, "start_noise": code.start_noise,
               "noises": code.noises[:-1].contiguous(), "residual": code.residual}
    fmt.save_artifact(tmp_path / "short.safetensors", tensors, meta)  # a sound file, inconsistent content
    with pytest.raises(S.CodeError, match="noises have shape"):
        fmt.load_code(tmp_path / "short.safetensors")
    meta2 = dict(meta, format_version="7")
    tensors["noises"] = code.noises
    fmt.save_artifact(tmp_path / "v7.safetensors", tensors, meta2)
    with pytest.raises(S.CodeError, match="version 7"):
        fmt.load_code(tmp_path / "v7.safetensors")
