# SPDX-License-Identifier: GPL-3.0-or-later
"""CLIP models for the pack's nodes: the ``models/clip_energy`` folder, and one managed load.

CLIP folders (transformers ``save_pretrained`` layout) live in ``models/clip_energy/``; this module
registers that folder with ComfyUI when it is first imported (every node file that lists CLIP
folders imports it), and :func:`load_clip` is the one sequence that reads a folder and loads it
under ComfyUI's model management.

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

import os
import threading
import weakref

import torch

import comfy.model_management
import comfy.model_patcher
import folder_paths

from ...guidance import ClipEnergy, ClipFolderError, load_clip_folder
from .sampling import NodeInputError, walk_dirs

CLIP_FOLDER = "clip_energy"


def _register_clip_folder() -> None:
    default = os.path.join(folder_paths.models_dir, CLIP_FOLDER)
    if CLIP_FOLDER in folder_paths.folder_names_and_paths:
        paths, _ext = folder_paths.folder_names_and_paths[CLIP_FOLDER]
        if default not in paths:
            paths.append(default)
    else:
        folder_paths.folder_names_and_paths[CLIP_FOLDER] = ([default], set())


_register_clip_folder()


def clip_folders() -> dict[str, str]:
    """name -> path of every sub-folder with a config.json under models/clip_energy/."""
    found = {}
    for root in folder_paths.get_folder_paths(CLIP_FOLDER):
        if not os.path.isdir(root):
            continue
        for dirpath, dirs, files in walk_dirs(root):
            if "config.json" in files:
                name = os.path.relpath(dirpath, root).replace(os.sep, "/")
                found.setdefault(name, dirpath)
                dirs[:] = []
    return dict(sorted(found.items()))


def clip_folder(clip_name: str) -> str:
    """The folder of a listed CLIP model, or a node error that says where CLIP folders go."""
    folders = clip_folders()
    if clip_name not in folders:
        raise NodeInputError(
            f"clip_name: no CLIP folder named {clip_name!r} in {folder_paths.get_folder_paths(CLIP_FOLDER)}. Put "
            "one sub-folder per model there, each with config.json, model.safetensors and the tokenizer files "
            "(save_pretrained layout).")
    return folders[clip_name]


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
        stack.append(getattr(e, "energy", None))  # a VideoEnergy wraps one
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


def load_clip(clip_name: str, memory_required: int = 0, others=()):
    """The one managed-load sequence: read the folder onto the offload device (outside inference mode,
    so that its tensors can take part in autograd), wrap it in its patcher, load it with ``others``
    (the models the caller needs at the same time). Returns (bundle on its device, patcher)."""
    return _load_managed(clip_folder(clip_name), memory_required, others)


def _load_managed(folder: str, memory_required: int = 0, others=()):
    with torch.inference_mode(False):
        try:
            bundle = load_clip_folder(folder, device=offload_device())
        except ClipFolderError as e:
            raise NodeInputError(f"clip_name: {e}") from None
    patcher = patcher_for(bundle)
    load([patcher], memory_required=memory_required, others=others)
    return bundle.at(model_device(patcher)), patcher


def clip_energy(clip_name: str, text: str, weight: float, augmentations: int, policies: tuple, image=None):
    """CLIP Energy's output: an energy towards ``text`` (or the target ``image``) that holds its CLIP's
    patcher and CPU targets only, so a cached output never pins anything on the GPU."""
    folder = clip_folder(clip_name)
    if image is None and not text.strip():
        raise NodeInputError("text: give a target text or connect a target image")
    bundle, patcher = _load_managed(folder)
    with torch.inference_mode(False):
        target = None
        if image is not None:
            target = image.clone().movedim(-1, 1)[:, :3].to(bundle.device)
        energy = ClipEnergy(bundle, text=None if target is not None else text, image=target,
                            augmentations=augmentations, policies=policies, weight=weight)
        energy = energy.on_device(offload_device())
    energy.comfy_patcher = patcher
    return energy
