# SPDX-License-Identifier: GPL-3.0-or-later
"""A ComfyUI custom node for the test server only (``ComfyServer(extra_nodes=...)``, tests/conftest.py):
tiny Genmo Mochi and Cosmos 1 models as MODEL outputs.

ComfyUI's detector reads Mochi and Cosmos 1 files only at their full sizes, so UNET Loader cannot load a
tiny one. This node builds them in the server with ComfyUI's own classes (``dpmtools.tiny_models``:
supported_models -> model_base -> the real DiT, wrapped in ComfyUI's ModelPatcher, as UNET Loader wraps a
detected file), so the pack's nodes meet them through the real server as they would meet a loaded model.
It is never part of the pack."""
from __future__ import annotations

import sys
from pathlib import Path

_TOOLS = str(Path(__file__).resolve().parents[2])
if _TOOLS not in sys.path:
    sys.path.append(_TOOLS)

from dpmtools import tiny_models  # noqa: E402

LOADERS = {"mochi": tiny_models.load_tiny_mochi, "cosmos1": tiny_models.load_tiny_cosmos1}


class TinyVideoModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(LOADERS),), "seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, family, seed):
        return (LOADERS[family](seed),)


NODE_CLASS_MAPPINGS = {"DPMTestTinyVideoModel": TinyVideoModel}
