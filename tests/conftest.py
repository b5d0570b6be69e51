# SPDX-License-Identifier: GPL-3.0-or-later
"""Test fixtures: the pack imported as ComfyUI imports it, ComfyUI in-process, and a real server.

Run through ``python3 scripts/comfy_host.py test``, which sets DPM_LATENT_COMFYUI
to the ComfyUI folder of the host and uses the host's Python.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
PACK_MODULE = "dpm_latent"


def comfy_dir() -> Path:
    path = os.environ.get("DPM_LATENT_COMFYUI") or os.environ.get("COMFYUI_PATH")
    if not path:
        raise RuntimeError(
            "DPM_LATENT_COMFYUI is not set: run the tests with `python3 scripts/comfy_host.py test`")
    return Path(path)


def _setup_comfy_imports() -> None:
    """Make ComfyUI importable in this process, configured for the CPU."""
    cdir = str(comfy_dir())
    if cdir not in sys.path:
        sys.path.insert(0, cdir)
    import comfy.options  # noqa: F401  (ComfyUI parses no argv unless asked)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.force_fp32 = True


def import_pack():
    """Import the repository as the package ``dpm_latent``, the way ComfyUI loads a pack."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = mod
    spec.loader.exec_module(mod)


    for sub in ("samplers", "samplers.code_format", "guidance"):
        if (REPO / sub.replace(".", "/")).exists() or (REPO / (sub.replace(".", "/") + ".py")).exists():
            importlib.import_module(f"{PACK_MODULE}.{sub}")
    return mod


if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
_setup_comfy_imports()


@pytest.fixture(scope="session")
def pack():
    return import_pack()
