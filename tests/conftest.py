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
    """Import the repository as the package ``dpm_latent``, the way ComfyUI loads a pack."""
    mod = load_module(PACK_MODULE, REPO / "__init__.py", package=True)
    for sub in ("samplers", "samplers.code_format", "guidance"):
        importlib.import_module(f"{PACK_MODULE}.{sub}")
    return mod


if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
_setup_comfy_imports()


@pytest.fixture(scope="session")
def pack():
    return import_pack()


# ---------------------------------------------------------------------------- tiny models + server
@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Tiny checkpoints built with ComfyUI's own classes, in folders the server is pointed at."""
    import tiny_models

    root = tmp_path_factory.mktemp("models")
    dirs = {k: root / k for k in ("checkpoints", "text_encoders", "clip_energy", "vae", "loras")}
    for d in dirs.values():
        d.mkdir()
    tiny_models.make_sd15_checkpoint(dirs["checkpoints"] / "tiny_sd15.safetensors", seed=0)
    tiny_models.make_sd15_checkpoint(dirs["checkpoints"] / "tiny_sd15_b.safetensors", seed=1)
    tiny_models.make_sd3_checkpoint(dirs["checkpoints"] / "tiny_sd3.safetensors", seed=0)
    tiny_models.make_sd3_checkpoint(dirs["checkpoints"] / "tiny_sd3_b.safetensors", seed=1)
    tiny_models.make_sdxl_checkpoint(dirs["checkpoints"] / "tiny_sdxl.safetensors", seed=0)
    tiny_models.make_clip_l_text_encoder(dirs["text_encoders"] / "tiny_clip_l.safetensors", seed=0)
    import tiny_clip

    tiny_clip.make_tiny_clip_folder(dirs["clip_energy"] / "tiny_clip", seed=0)
    import tiny_ddpm

    dirs["diffusers"] = root / "diffusers"
    tiny_ddpm.make_ddpm_folder(dirs["diffusers"] / "tiny_ddpm_eps", seed=0, layout="pipeline")
    tiny_ddpm.make_ddpm_folder(dirs["diffusers"] / "tiny_ddpm_eps_b", seed=1, layout="pipeline")
    tiny_ddpm.make_ddpm_folder(dirs["diffusers"] / "tiny_ddpm_v", seed=2, prediction_type="v_prediction",
                               layout="flat")
    tiny_ddpm.make_bad_folders(dirs["diffusers"])
    return dirs


@pytest.fixture(scope="module")
def gn(pack, model_dirs):
    """nodes/guidance_nodes.py, with the tiny CLIP's folder on ComfyUI's clip_energy path (in-process tests)."""
    mod = importlib.import_module("dpm_latent.nodes.guidance_nodes")
    import folder_paths

    paths = folder_paths.folder_names_and_paths["clip_energy"][0]
    if str(model_dirs["clip_energy"]) not in paths:
        paths.append(str(model_dirs["clip_energy"]))
    return mod


@pytest.fixture(scope="session")
def server(model_dirs, tmp_path_factory):
    from comfy_server import ComfyServer

    srv = ComfyServer(comfy_dir(), tmp_path_factory.mktemp("comfy"), python=sys.executable,
                      model_dirs=model_dirs)
    srv.start()
    yield srv
    srv.stop()
