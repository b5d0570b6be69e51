# SPDX-License-Identifier: GPL-3.0-or-later
"""Asyrp Editing Interval: t_edit and t_boost from measured curves, as the paper chooses them.

The paper (Kwon et al., ICLR 2023, and its official code) measures, on a batch of images, the mean
LPIPS(x0, P_t) and LPIPS(x0, x_t) along the DDIM chain from the DDIM-inverted x_T and takes

* t_edit: the first t (from 0 up) where LPIPS(x0, P_t) >= 0.33 * cos(source_text, target_text);
* t_boost: the first t where LPIPS(x0, x_t) >= 1.2.

LPIPS needs AlexNet weights that the pack never downloads: it is used when the ``lpips`` package is
installed and the torchvision AlexNet file is already in the torch hub cache.  Otherwise the
distance is 1 - cos of the CLIP image embeddings of the decoded images (the ``clip_name`` model),
with thresholds recalibrated as fractions of each curve's own value at T (see the README).
"""
from __future__ import annotations

import math
import os

import torch

import comfy.utils

from ...samplers import CodeError
from ...samplers import asyrp as AS
from . import clip_models as CM
from . import plot as P
from . import sampling as B
from .autograd import vae_decoder
from .conditioning import empty_conditioning

DISTANCES = ("auto", "lpips", "clip")
# The paper's thresholds (official code: --lpips_edit_th 0.33, --lpips_addnoise_th 1.2).
LPIPS_EDIT = 0.33
LPIPS_BOOST = 1.2
# The same thresholds as fractions of the curve's value at T, read off the official repository's
# shipped LPIPS curves for LSUN church (mean of 100 images, 1000 steps): LPIPS(x0, P_T) = 1.341, so
# 0.33 / 1.341 = 0.246; LPIPS(x0, x_t) flattens at 1.333 from t = 700 on, so 1.2 / 1.333 = 0.900.
CLIP_EDIT_FRACTION = 0.25
CLIP_BOOST_FRACTION = 0.90
# torchvision's ImageNet AlexNet, the file lpips' default backbone would download into the hub cache.
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
PLOT_SIZE = (512, 320)

_LPIPS = {}


# ---------------------------------------------------------------- LPIPS, only from files on disk

def alexnet_weights_path() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", ALEXNET_FILE)


def lpips_unavailable() -> str | None:
    """None when LPIPS can run without any download; else why not (a sentence)."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return "the 'lpips' package is not installed"
    lin = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
    if not os.path.isfile(lin):
        return f"the lpips package has no linear-layer weights at {lin}"
    if not os.path.isfile(alexnet_weights_path()):
        return (f"its AlexNet backbone weights are not on disk ({alexnet_weights_path()}); the pack never "
                "downloads weights: put torchvision's alexnet-owt-7be5be79.pth there")
    return None


def load_lpips(device) -> torch.nn.Module:
    """LPIPS (AlexNet, v0.1) built with a random backbone (no download), then given torchvision's
    AlexNet weights from the hub cache; the package's own linear weights load from its folder."""
    key = str(device)
    if key not in _LPIPS:
        import lpips

        with torch.inference_mode(False):
            net = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False)
            state = torch.load(alexnet_weights_path(), map_location="cpu", weights_only=True)
            # the backbone's slices hold torchvision's features[k] under the name sliceN.k
            own = {}
            for name, _p in net.net.named_parameters():
                _slice, k, leaf = name.split(".")
                own[name] = state[f"features.{k}.{leaf}"]
            net.net.load_state_dict(own)
            net = net.eval().requires_grad_(False).to(device)
        _LPIPS[key] = net
    return _LPIPS[key]


# ---------------------------------------------------------------- plot

def interval_plot(curves: AS.IntervalCurves, edit_th: float, boost_th: float, t_edit: float, t_boost: float,
                  label: str, size=PLOT_SIZE) -> torch.Tensor:
    """Two panels (distance to P_t, distance to x_t) against the chain position (1 = T on the left),
    each with its threshold (dashed) and the chosen t (vertical line)."""
    pos = list(curves.positions)
    return P.paint([
        P.Panel(f"{label}(x0, P_t); t_edit = {t_edit:.3f}", [("P_t", curves.to_prediction, (200, 40, 40))], xs=pos,
                x_range=(1.0, 0.0), threshold=edit_th, marker=t_edit),
        P.Panel(f"{label}(x0, x_t); t_boost = {t_boost:.3f}", [("x_t", curves.to_noisy, (40, 80, 200))], xs=pos,
                x_range=(1.0, 0.0), threshold=boost_th, marker=t_boost)],
        size, footer="chain position: 1 = T (left) ... 0 (right)")


# ---------------------------------------------------------------- the measurement

def measure(model, vae, latents, clip_name, source_text, target_text, steps, distance, edit_threshold,
            boost_threshold, clip_edit_fraction, clip_boost_fraction):
    """Asyrp Editing Interval: returns (t_edit, t_boost, plot, text)."""
    samples = latents["samples"]
    B.check_latent(model, samples, "latents")
    if samples.ndim == 5:
        raise B.NodeInputError(
            "latents: Asyrp Editing Interval measures LPIPS / CLIP distances between decoded images, which are "
            "not defined for video clips here; on a video model set t_edit and t_boost by hand (Asyrp Edit)")
    if vae is None or getattr(vae, "first_stage_model", None) is None:
        raise B.NodeInputError("vae: connect the VAE that decodes this model's latents")
    if not str(source_text).strip() or not str(target_text).strip():
        raise B.NodeInputError("source_text / target_text: both texts are needed (their CLIP cosine scales "
                               "the edit threshold)")
    if not isinstance(steps, int) or steps < 2:
        raise B.NodeInputError(f"steps: need at least 2 DDIM steps, got {steps}")
    if distance not in DISTANCES:
        raise B.NodeInputError(f"distance: {distance!r} is not one of {DISTANCES}")
    for name, v, hi in (("edit_threshold", edit_threshold, None), ("boost_threshold", boost_threshold, None),
                        ("clip_edit_fraction", clip_edit_fraction, 1.0),
                        ("clip_boost_fraction", clip_boost_fraction, 1.0)):
        if not (math.isfinite(float(v)) and float(v) > 0.0 and (hi is None or float(v) <= hi)):
            raise B.NodeInputError(f"{name}: must be a number > 0{' and <= 1' if hi else ''}, got {v}")
    why = lpips_unavailable()
    if distance == "lpips" and why is not None:
        raise B.NodeInputError(f"distance: 'lpips' was chosen but {why}. Choose 'clip' (or 'auto') to use the "
                               "CLIP image distance with its recalibrated thresholds.")
    used = "lpips" if distance == "lpips" or (distance == "auto" and why is None) else "clip"
    CM.clip_folder(clip_name)  # a missing folder is an input error before anything loads
    family = B.family_of(model)
    sigmas = B.schedule(model, "normal", steps, 1.0)
    cond = empty_conditioning(model)
    result = {}
    pbar = comfy.utils.ProgressBar(steps)

    def work(denoise_fn, x0, _callback, guider):
        bundle, _clip = CM.load_clip(clip_name, others=[guider.model_patcher, vae.patcher])
        cos = float((bundle.text_embeds([source_text]) * bundle.text_embeds([target_text])).sum())
        decode = vae_decoder(vae, guider)
        x0 = x0.float().clone()

        def pixels(lat):
            return decode(lat).clamp(0.0, 1.0)

        if used == "clip":
            def embed(lat):
                return bundle.image_embeds(bundle.normalize(bundle.resize(pixels(lat))))
            ref = {"x0": embed(x0)}

            def dist(a, b):
                ea = ref["x0"] if a is x0 else embed(a)
                return 1.0 - (ea * embed(b)).sum(-1)
        else:
            net = load_lpips(x0.device)

            def dist(a, b):
                return net(pixels(a) * 2.0 - 1.0, pixels(b) * 2.0 - 1.0).flatten()

        def progress(i, _d, _x, n):
            pbar.update_absolute(i + 1, n)

        try:
            result["curves"] = AS.interval_curves(denoise_fn, x0, sigmas, family, dist, callback=progress)
        except CodeError as e:
            raise B.code_error(e) from None
        result["cos"] = cos
        return x0

    B.run_in_comfy(model, cond, cond, 1.0, samples, sigmas, work, 0, None)
    curves, cos = result["curves"], result["cos"]
    if not all(math.isfinite(v) for v in curves.to_prediction + curves.to_noisy):
        raise B.NodeInputError("latents: the measured distances are not finite (NaN in the model or VAE "
                               "output); check the model and the latents")
    if used == "lpips":
        def thresholds(c):
            return float(edit_threshold) * cos, float(boost_threshold)
        edit_th, boost_th = thresholds(curves)
        rule = (f"edit threshold {edit_threshold:g} x cos {cos:.3f} = {edit_th:.4g}; "
                f"boost threshold {boost_threshold:g}")
        label = "LPIPS"
    else:
        def thresholds(c):
            return (float(clip_edit_fraction) * cos * c.to_prediction[0],
                    float(clip_boost_fraction) * c.to_noisy[0])
        at_t_p, at_t_x = curves.to_prediction[0], curves.to_noisy[0]
        edit_th, boost_th = thresholds(curves)
        rule = (f"edit threshold {clip_edit_fraction:g} x cos {cos:.3f} x {at_t_p:.4g} (value at T) = "
                f"{edit_th:.4g}; boost threshold {clip_boost_fraction:g} x {at_t_x:.4g} (value at T) = "
                f"{boost_th:.4g}")
        label = "CLIP"
    t_edit, t_boost, notes = AS.interval_from_curves(curves, edit_th, boost_th)
    spread = ""
    if curves.n >= 2:
        b = AS.bootstrap_interval(curves, thresholds, reps=1000, seed=0)
        spread = (f"95 % bootstrap intervals over the images ({b['reps']} resamples of n = {b['n']}): "
                  f"t_edit [{b['t_edit'][0]:.3f}, {b['t_edit'][1]:.3f}], "
                  f"t_boost [{b['t_boost'][0]:.3f}, {b['t_boost'][1]:.3f}].\n")
    name = ("LPIPS (AlexNet, v0.1)" if used == "lpips" else
            f"CLIP image distance 1 - cos(E(x0), E(.)) with {clip_name}"
            + ("" if distance == "clip" else f" (LPIPS unavailable: {why})"))
    text = (f"distance: {name}; n = {curves.n} images, {curves.steps} steps.\n{rule}.\n"
            f"t_edit = {t_edit:.4f}, t_boost = {t_boost:.4f} (fractions of the chain, 1 = T).\n{spread}"
            f"{label}(x0, P_t) from T: " + ", ".join(f"{v:.3g}" for v in curves.to_prediction) + "\n"
            f"{label}(x0, x_t) from T: " + ", ".join(f"{v:.3g}" for v in curves.to_noisy)
            + "".join(f"\nnote: {n}" for n in notes))
    plot = interval_plot(curves, edit_th, boost_th, t_edit, t_boost, label)
    return t_edit, t_boost, plot, text
