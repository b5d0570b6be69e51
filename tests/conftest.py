# SPDX-License-Identifier: GPL-3.0-or-later
"""Test fixtures: the pack imported as ComfyUI imports it, ComfyUI in-process, and a real server.

The tests are arranged by layer, and within a layer by what they test:

* ``pure/``     samplers/ and guidance/ (pure torch), the files' layout; ComfyUI is never imported
* ``nodes/``    one file (or a few, by suffix) per node family, named after its file in nodes/:
                in-process through ComfyUI's own loaders, and through a real server
* ``product/``  what a user runs: the shipped workflows, the web frontend in Chromium, the demo job,
                the batch runner, the tiny models themselves

ComfyUI is put on sys.path (on the CPU, fp32) by the conftest of ``nodes/`` and ``product/``; the
fixtures below that need it are used only there.

Run through ``python3 scripts/comfy_host.py test``, which sets DPM_LATENT_COMFYUI
to the ComfyUI folder of the host and uses the host's Python. The shared tools are the
package ``dpmtools`` (tools/dpmtools/, on sys.path through ``pythonpath`` in pyproject.toml).
"""
from __future__ import annotations

import importlib
import sys

import pytest

from dpmtools import comfy_env

@pytest.fixture(scope="session")
def pack():
    return comfy_env.import_pack()


# ---------------------------------------------------------------------------- tiny models + server
@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Tiny checkpoints built with ComfyUI's own classes, in folders the server is pointed at."""
    from dpmtools import tiny_clip, tiny_ddpm, tiny_models

    root = tmp_path_factory.mktemp("models")
    dirs = {k: root / k for k in ("checkpoints", "text_encoders", "clip_energy", "vae", "loras", "diffusion_models")}
    for d in dirs.values():
        d.mkdir()
    tiny_models.make_sd15_checkpoint(dirs["checkpoints"] / "tiny_sd15.safetensors", seed=0)
    tiny_models.make_sd15_checkpoint(dirs["checkpoints"] / "tiny_sd15_b.safetensors", seed=1)
    tiny_models.make_sd3_checkpoint(dirs["checkpoints"] / "tiny_sd3.safetensors", seed=0)
    tiny_models.make_sd3_checkpoint(dirs["checkpoints"] / "tiny_sd3_b.safetensors", seed=1)
    tiny_models.make_sdxl_checkpoint(dirs["checkpoints"] / "tiny_sdxl.safetensors", seed=0)
    tiny_models.make_clip_l_text_encoder(dirs["text_encoders"] / "tiny_clip_l.safetensors", seed=0)
    # video models (Wan 2.1 / 2.2, HunyuanVideo (1.5), LTX-Video, Cosmos Predict2 layouts) and a tiny Wan 2.1 VAE,
    # ~70 MB in all
    tiny_models.make_wan21_diffusion_model(dirs["diffusion_models"] / "tiny_wan21.safetensors", seed=0)
    tiny_models.make_wan21_diffusion_model(dirs["diffusion_models"] / "tiny_wan21_b.safetensors", seed=1)
    tiny_models.make_wan21_diffusion_model(dirs["diffusion_models"] / "tiny_wan22.safetensors", seed=0, wan22=True)
    tiny_models.make_wan21_diffusion_model(dirs["diffusion_models"] / "tiny_wan21_i2v.safetensors", seed=0, i2v=True)
    tiny_models.make_hunyuan_video_diffusion_model(dirs["diffusion_models"] / "tiny_hunyuan_video.safetensors", seed=0)
    tiny_models.make_hunyuan_video_diffusion_model(dirs["diffusion_models"] / "tiny_hunyuan_video_i2v.safetensors",
                                                   seed=0, i2v=True)
    tiny_models.make_ltxv_diffusion_model(dirs["diffusion_models"] / "tiny_ltxv.safetensors", seed=0)
    tiny_models.make_hunyuan_video15_diffusion_model(dirs["diffusion_models"] / "tiny_hunyuan_video15.safetensors",
                                                     seed=0)
    tiny_models.make_cosmos_predict2_diffusion_model(dirs["diffusion_models"] / "tiny_cosmos_predict2.safetensors",
                                                     seed=0)
    tiny_models.make_wan21_vae(dirs["vae"] / "tiny_wan21_vae.safetensors", seed=0)
    tiny_clip.make_tiny_clip_folder(dirs["clip_energy"] / "tiny_clip", seed=0)
    dirs["diffusers"] = root / "diffusers"
    tiny_ddpm.make_ddpm_folder(dirs["diffusers"] / "tiny_ddpm_eps", seed=0, layout="pipeline")
    tiny_ddpm.make_ddpm_folder(dirs["diffusers"] / "tiny_ddpm_eps_b", seed=1, layout="pipeline")
    tiny_ddpm.make_ddpm_folder(dirs["diffusers"] / "tiny_ddpm_v", seed=2, prediction_type="v_prediction",
                               layout="flat")
    tiny_ddpm.make_bad_folders(dirs["diffusers"])
    return dirs


@pytest.fixture(scope="module")
def gn(pack, model_dirs):
    """nodes/clip_guidance.py, with the tiny CLIP's folder on ComfyUI's clip_energy path (in-process tests)."""
    mod = importlib.import_module("dpm_latent.nodes.clip_guidance")
    import folder_paths

    paths = folder_paths.folder_names_and_paths["clip_energy"][0]
    if str(model_dirs["clip_energy"]) not in paths:
        paths.append(str(model_dirs["clip_energy"]))
    return mod


@pytest.fixture(scope="module")
def lc(gn):
    """nodes/latent_codes.py (DPM Encode, Replay, Random Latent Code, ...)."""
    return importlib.import_module("dpm_latent.nodes.latent_codes")


@pytest.fixture(scope="module")
def lr(gn):
    """nodes/bridge/langevin_run.py: the Langevin Latent Sampler's run and memory modes."""
    return importlib.import_module("dpm_latent.nodes.bridge.langevin_run")


@pytest.fixture(scope="session")
def server(model_dirs, tmp_path_factory):
    from dpmtools.server import TEST_PACK_NAME, ComfyServer

    # and the tests' tiny Mochi / Cosmos 1 node (ComfyUI loads those families only at full size from files)
    srv = ComfyServer(comfy_env.comfy_dir(), tmp_path_factory.mktemp("comfy"), python=sys.executable,
                      model_dirs=model_dirs, pack_name=TEST_PACK_NAME,
                      extra_nodes={"dpm-latent-test-models": comfy_env.REPO / "tools/dpmtools/test_server_nodes"})
    srv.start()
    yield srv
    srv.stop()
