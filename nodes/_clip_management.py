# SPDX-License-Identifier: GPL-3.0-or-later
"""The CLIP energy's model under ComfyUI's model management.

A CLIP model loaded from ``models/clip_energy/`` lives on ComfyUI's offload
device (the CPU unless ``--highvram``) and is wrapped in a
``comfy.model_patcher.ModelPatcher``.  Whoever evaluates the energy asks
``comfy.model_management.load_models_gpu`` for it first, like for any model: it
then counts in ComfyUI's memory planning, leaves VRAM when another model needs
the room, and "free memory" (``/free`` with ``unload_models``,
``unload_all_models``) sends it back to the offload device.  A CLIP Energy
output keeps the patcher and CPU targets only, so a cached output never pins
anything on the GPU.

One patcher per loaded CLIP model (keyed on the loader's bundle): two patchers
around the same weights would fight over where they live.
"""
from __future__ import annotations

import threading
import weakref

import torch

import comfy.model_management
import comfy.model_patcher


class ClipEnergyModel(torch.nn.Module):
    """Holds a transformers CLIPModel for a ModelPatcher.

    ModelPatcher writes ``model.device``, which transformers models expose as a
    read-only property; this plain module carries it instead."""

    def __init__(self, clip: torch.nn.Module, device: torch.device):
        super().__init__()
        self.clip = clip
        self.device = device


_patchers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def offload_device() -> torch.device:
    return comfy.model_management.unet_offload_device()


def patcher_for(bundle) -> comfy.model_patcher.ModelPatcher:
    """The one ModelPatcher of this CLIP bundle (made on first use)."""
    with _lock:
        patcher = _patchers.get(bundle)
        if patcher is None:
            holder = ClipEnergyModel(bundle.model, bundle.device)
            patcher = comfy.model_patcher.ModelPatcher(
                holder, load_device=comfy.model_management.get_torch_device(), offload_device=offload_device())
            _patchers[bundle] = patcher
        return patcher


def energy_patchers(energy) -> list:
    """Every CLIP patcher an energy (or a combination of energies) evaluates through."""
    found, stack, seen = [], [energy], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        p = getattr(e, "comfy_patcher", None)
        if p is not None and all(p is not q for q in found):
            found.append(p)
        stack.extend(getattr(e, "energies", None) or [])
    return found


def model_device(patcher) -> torch.device:
    """Where the CLIP weights are now (after loading)."""
    for p in patcher.model.parameters():
        return p.device
    return patcher.load_device


def _on(t: torch.Tensor, dev: torch.device) -> bool:
    return t.device.type == dev.type and (dev.index is None or t.device.index == dev.index)


def ensure_full_load(patchers) -> None:
    """After ``load_models_gpu``: make every weight of each CLIP live on its load device.

    ComfyUI moves leaf modules one by one and lets its own ops stream the rest (low-VRAM mode); a
    transformers model has no such ops and keeps a few parameters on non-leaf modules (CLIP's class
    embedding), so a CLIP that was loaded only in part is moved whole, and its patcher is told so
    (unloading then moves all of it back)."""
    for p in patchers:
        dev = p.load_device
        if p.offload_device == dev:
            continue
        tensors = list(p.model.parameters()) + list(p.model.buffers())
        if all(_on(t, dev) for t in tensors):
            continue
        p.model.to(dev)
        p.model.device = dev
        p.model.model_loaded_weight_memory = p.model_size()


def load(patchers, memory_required: int = 0, others=()) -> None:
    """Load CLIP patchers (with ``others``, the models the caller needs at the same time)."""
    comfy.model_management.load_models_gpu([*others, *patchers], memory_required=memory_required)
    ensure_full_load(patchers)
