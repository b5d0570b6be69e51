# SPDX-License-Identifier: GPL-3.0-or-later
"""Energies for plug-and-play latent-space guidance (pure torch + transformers).

Nothing in this subpackage imports ComfyUI.
"""
from .clip_energy import (
    DEFAULT_AUGMENTATIONS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipBundle,
    ClipEnergy,
    ClipFolderError,
    CombinedEnergy,
    clear_clip_cache,
    load_clip_folder,
)
from .diffaug import POLICIES, diff_augment, parse_policies

__all__ = [
    "DEFAULT_AUGMENTATIONS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "POLICIES",
    "ClipBundle",
    "ClipEnergy",
    "ClipFolderError",
    "CombinedEnergy",
    "clear_clip_cache",
    "diff_augment",
    "load_clip_folder",
    "parse_policies",
]
