# SPDX-License-Identifier: GPL-3.0-or-later
"""ComfyUI in this process, and the pack imported the way ComfyUI imports it.

Nothing happens at import: a caller puts ComfyUI on sys.path (``add_comfy_to_path``), chooses the
device (``set_device``; before anything imports ``comfy.model_management``), then imports the pack
(``import_pack``).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK_MODULE = "dpm_latent"


def comfy_dir() -> Path:
    """The ComfyUI folder: $DPM_LATENT_COMFYUI (set by scripts/comfy_host.py), else $COMFYUI_PATH."""
    path = os.environ.get("DPM_LATENT_COMFYUI") or os.environ.get("COMFYUI_PATH")
    if not path:
        raise RuntimeError(
            "DPM_LATENT_COMFYUI is not set: run this through `python3 scripts/comfy_host.py` (test, demo, bench)")
    return Path(path)


def add_comfy_to_path(path: str | Path | None = None) -> Path:
    """Put the ComfyUI folder (``path``, else ``comfy_dir()``) first on sys.path and import its
    argument parser without parsing argv. Returns the folder."""
    cdir = Path(path) if path else comfy_dir()
    if str(cdir) not in sys.path:
        sys.path.insert(0, str(cdir))
    import comfy.options  # noqa: F401  (ComfyUI parses no argv unless asked)
    import comfy.cli_args  # noqa: F401
    return cdir


def set_device(cpu: bool = True, force_fp32: bool = True) -> None:
    """ComfyUI's ``--cpu`` and ``--force-fp32`` for this process (the tests: both). Call it after
    ``add_comfy_to_path`` and before ``comfy.model_management`` is imported: that module reads them once."""
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    comfy.cli_args.args.force_fp32 = force_fp32


def load_module(name: str, path: Path, package: bool = False):
    """Import ``path`` as module ``name`` (once). By path, because the repository itself must
    never be on sys.path: its nodes/ folder would shadow ComfyUI's top-level ``nodes``."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(path.parent)] if package else None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def import_pack():
    """Import the repository as the package ``dpm_latent``, the way ComfyUI loads a pack.
    ComfyUI must be on sys.path already (``add_comfy_to_path``)."""
    mod = load_module(PACK_MODULE, REPO / "__init__.py", package=True)
    for sub in ("samplers", "samplers.code_format", "guidance"):
        importlib.import_module(f"{PACK_MODULE}.{sub}")
    return mod
