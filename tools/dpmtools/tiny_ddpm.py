# SPDX-License-Identifier: GPL-3.0-or-later
"""Tiny random pixel-space DDPM folders built with diffusers' own classes (no download).

``make_ddpm_folder`` writes either the DDPMPipeline layout (``model_index.json``, ``unet/``,
``scheduler/``) or the flat layout (``config.json``, ``diffusion_pytorch_model.safetensors``,
``scheduler_config.json``); ``make_bad_folders`` writes the folders the loader must refuse.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def _free_the_diffusers_name() -> None:
    """pytest's importlib mode names this repository's package after its folder; a checkout in a
    folder called ``diffusers`` would then shadow the diffusers library.  Drop that alias."""
    mod = sys.modules.get("diffusers")
    if mod is not None and Path(getattr(mod, "__file__", "") or "").resolve() == REPO / "__init__.py":
        del sys.modules["diffusers"]


_free_the_diffusers_name()


def tiny_unet(seed: int, conditional: bool = False):
    torch.manual_seed(seed)
    if conditional:
        from diffusers import UNet2DConditionModel
        return UNet2DConditionModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                                    block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
                                    attention_head_dim=4,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    from diffusers import UNet2DModel
    m = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                    block_out_channels=(8, 16), norm_num_groups=4,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
    with torch.no_grad():   # diffusers zero-initialises nothing that matters here, but make outputs lively
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 7)))
    return m


def tiny_scheduler(prediction_type: str = "epsilon", clip_sample: bool = True, **kw):
    from diffusers import DDPMScheduler
    return DDPMScheduler(**{"num_train_timesteps": 1000, "beta_schedule": "linear", **kw},
                         prediction_type=prediction_type, clip_sample=clip_sample)


def make_ddpm_folder(path: Path, seed: int = 0, prediction_type: str = "epsilon", layout: str = "pipeline",
                     clip_sample: bool = True, **sched_kw) -> Path:
    path = Path(path)
    unet = tiny_unet(seed)
    sched = tiny_scheduler(prediction_type, clip_sample, **sched_kw)
    if layout == "pipeline":
        from diffusers import DDPMPipeline
        DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(str(path), safe_serialization=True)
    elif layout == "flat":
        unet.save_pretrained(str(path), safe_serialization=True)
        sched.save_config(str(path))
    else:
        raise ValueError(layout)
    return path


def make_bad_folders(root: Path) -> dict[str, Path]:
    """Folders that Load Diffusers DDPM must refuse, by reason."""
    root = Path(root)
    out = {}
    # pickled weights only
    p = make_ddpm_folder(root / "bad_pickled", seed=3, layout="flat")
    unet_sd = {k: v.clone() for k, v in tiny_unet(3).state_dict().items()}
    torch.save(unet_sd, p / "diffusion_pytorch_model.bin")
    (p / "diffusion_pytorch_model.safetensors").unlink()
    out["pickled"] = p
    # a text-conditional UNet
    p = root / "bad_conditional"
    tiny_unet(4, conditional=True).save_pretrained(str(p / "unet"), safe_serialization=True)
    tiny_scheduler().save_config(str(p / "scheduler"))
    out["conditional"] = p
    # no scheduler config
    p = make_ddpm_folder(root / "bad_no_scheduler", seed=5, layout="pipeline")
    shutil.rmtree(p / "scheduler")
    out["no_scheduler"] = p
    # class-conditional UNet2DModel (config says so)
    p = make_ddpm_folder(root / "bad_class_conditional", seed=6, layout="flat")
    cfg = json.loads((p / "config.json").read_text())
    cfg.update(num_class_embeds=10)
    (p / "config.json").write_text(json.dumps(cfg))
    out["class_conditional"] = p
    return out
