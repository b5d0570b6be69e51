# SPDX-License-Identifier: GPL-3.0-or-later
"""Autograd through models that ComfyUI loaded under ``torch.inference_mode()``.

ComfyUI runs every node under inference mode, so the weights its loaders
create and the CONDITIONING tensors are *inference tensors*: autograd may not
save them for backward.  Cloning them would double the model in memory.

Instead, for the duration of a gradient computation, every inference-tensor
parameter and buffer of a module is replaced by an *alias*: an ordinary tensor
made outside inference mode on the same storage (``Tensor.set_``), so no byte
is copied.  Weights keep ``requires_grad=False``; only the input gets a
gradient.  On exit the original Parameter objects are put back, so ComfyUI's
model management (offloading, LoRA patch/unpatch by key, weight backups) sees
exactly the objects it created.  Conditioning is handled the same way on the
guider's per-run copies.
"""
from __future__ import annotations

import contextlib

import torch


class UnsupportedWeights(ValueError):
    """Weights that cannot be aliased (quantized or wrapped tensor subclasses)."""


def alias(t: torch.Tensor) -> torch.Tensor:
    """A non-inference tensor sharing ``t``'s storage (no copy). Call outside inference mode."""
    if not (isinstance(t, torch.Tensor) and t.is_inference()):
        return t
    plain = t.data if isinstance(t, torch.nn.Parameter) else t
    if type(plain) is not torch.Tensor:
        raise UnsupportedWeights(
            f"weights of type {type(plain).__name__} (quantized or wrapped) cannot be differentiated through; "
            "load the model in fp16/bf16/fp32 for the Langevin node")
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    out.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    return out


@contextlib.contextmanager
def gradients_through(*modules: torch.nn.Module):
    """Within: grad enabled, inference mode off, inference params/buffers aliased."""
    swapped = []
    with torch.inference_mode(False), torch.enable_grad():
        try:
            for root in modules:
                if root is None:
                    continue
                for mod in root.modules():
                    for name, p in list(mod._parameters.items()):
                        if p is not None and p.is_inference():
                            mod._parameters[name] = torch.nn.Parameter(alias(p), requires_grad=False)
                            swapped.append((mod._parameters, name, p))
                    for name, b in list(mod._buffers.items()):
                        if b is not None and b.is_inference():
                            mod._buffers[name] = alias(b)
                            swapped.append((mod._buffers, name, b))
            yield
        finally:
            for store, name, original in reversed(swapped):
                store[name] = original


def control_modules(conds: dict) -> list[torch.nn.Module]:
    """The networks of ControlNets / T2I adapters attached to a guider's conds."""
    found, seen = [], set()
    for entries in conds.values():
        for entry in entries or []:
            ctrl = entry.get("control")
            while ctrl is not None and id(ctrl) not in seen:
                seen.add(id(ctrl))
                for attr in ("control_model", "t2i_model"):
                    mod = getattr(ctrl, attr, None)
                    if isinstance(mod, torch.nn.Module):
                        found.append(mod)
                ctrl = getattr(ctrl, "previous_controlnet", None)
    return found


def alias_conds(conds: dict) -> None:
    """Replace inference tensors in a guider's processed conds (its own per-run copies)."""
    for key, entries in list(conds.items()):
        if entries is None:
            continue
        for entry in entries:
            for k, v in list(entry.items()):
                if isinstance(v, torch.Tensor):
                    entry[k] = alias(v)
            mc = entry.get("model_conds")
            if isinstance(mc, dict):
                new = {}
                for name, c in mc.items():
                    t = getattr(c, "cond", None)
                    if isinstance(t, torch.Tensor) and t.is_inference() and hasattr(c, "_copy_with"):
                        c = c._copy_with(alias(t))
                    new[name] = c
                entry["model_conds"] = new


def vae_decoder(vae, model_wrap, latent_frames=None):
    """model-space latent -> images (B, 3, H, W), or clips (B, 3, F, H, W) for video latents, differentiable.

    (x + 1) / 2 without VAE Decode's final clamp, so that saturated pixels still pass a
    gradient to the energy (the CLIP energy clamps nothing either). ``latent_frames``: decode only
    the first that many latent frames of a video latent (a causal video VAE gives exactly the first
    frames of the full decode; see ``guidance.video``)."""
    fmt = None

    def decode(x: torch.Tensor) -> torch.Tensor:
        nonlocal fmt
        if latent_frames is not None and x.dim() == 5:
            x = x[:, :, :latent_frames]
        if fmt is None:
            fmt = aliased_latent_format(model_wrap.inner_model.latent_format)
        lat = fmt.process_out(x)
        img = vae.first_stage_model.decode(lat.to(device=vae.device, dtype=vae.vae_dtype))
        img = (img.float() + 1.0) / 2.0
        return img[:, :3].to(x.device)
    return decode


def aliased_latent_format(fmt):
    """A shallow copy of a ComfyUI latent format whose tensors (Wan's / Mochi's per-channel mean and std,
    made under inference mode when the model loaded) are aliases autograd may save. Call outside
    inference mode; the model's own latent format is not changed."""
    import copy

    tensors = {k: v for k, v in vars(fmt).items() if isinstance(v, torch.Tensor) and v.is_inference()}
    if not tensors:
        return fmt
    out = copy.copy(fmt)
    for k, v in tensors.items():
        setattr(out, k, alias(v))
    return out


def latent_frames_for(vae, pixel_frame: int, latent_frames: int) -> int:
    """How many latent frames (a prefix) a video VAE must decode to reach pixel frame ``pixel_frame``: the
    smallest n whose decode has more than ``pixel_frame`` frames (ComfyUI's ``vae.upscale_ratio[0]``, e.g.
    Wan: 1 + 4 (n - 1)). All of them when the VAE does not say."""
    ratio = getattr(vae, "upscale_ratio", None)
    up = ratio[0] if isinstance(ratio, (tuple, list)) and ratio else None
    if not callable(up):
        return latent_frames
    for n in range(1, latent_frames + 1):
        if int(up(n)) > pixel_frame:
            return n
    return latent_frames


def pixel_frames_of(vae, latent_frames: int):
    """Pixel frames a video VAE decodes from ``latent_frames`` (None when the VAE does not say)."""
    ratio = getattr(vae, "upscale_ratio", None)
    up = ratio[0] if isinstance(ratio, (tuple, list)) and ratio else None
    return int(up(latent_frames)) if callable(up) else None
