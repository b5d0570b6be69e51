# SPDX-License-Identifier: GPL-3.0-or-later
"""Load Diffusers DDPM: an unconditional pixel-space ``UNet2DModel`` folder as a ComfyUI MODEL + VAE.

The network is built and loaded by diffusers itself (``UNet2DModel.from_pretrained`` on a local
folder, safetensors only).  ComfyUI sees an ordinary ``comfy.model_base.BaseModel`` whose
``diffusion_model`` is a thin wrapper around the diffusers UNet, with a ``ModelSamplingDiscrete``
built from the scheduler config's betas, so KSampler, the pack's DPM Encode / Replay / Langevin
and ModelSamplingDiscrete patches all run on it unchanged.

Conventions (ComfyUI <-> diffusers):

* sigma_t = sqrt((1 - alphabar_t) / alphabar_t); ComfyUI feeds the model x / sqrt(sigma^2 + 1),
  which is the DDPM's x_t, and its ``timestep(sigma)`` is the integer index t of the training
  schedule: exactly the ``timesteps`` argument of ``UNet2DModel.forward``;
* ``prediction_type`` epsilon / v_prediction / sample -> ComfyUI's EPS / V_PREDICTION / X0;
* the latent is the image itself in [-1, 1] (3 channels, no downscaling); the VAE is ComfyUI's
  pixel-space conversion VAE (IMAGE [0, 1] <-> latent [-1, 1]);
* ``clip_sample`` clamps the denoised image to [-clip_sample_range, clip_sample_range] after CFG,
  as diffusers' schedulers clamp their x0 prediction.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.sd
import comfy.supported_models_base
import folder_paths

from . import sampling as B

FOLDER_KEY = "diffusers"
WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLED = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
CLIP_CHOICES = ["scheduler config", "always", "never"]
# diffusers beta_schedule -> ComfyUI make_beta_schedule name (used by the ModelSamplingDiscrete node)
COMFY_SCHEDULES = {"linear": "sqrt_linear", "scaled_linear": "linear", "squaredcos_cap_v2": "cosine"}


class PixelSpace(comfy.latent_formats.LatentFormat):
    """The image itself in [-1, 1]: 3 channels, full resolution, identity scaling."""
    latent_channels = 3
    spacial_downscale_ratio = 1

    def __init__(self):
        self.latent_rgb_factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        self.latent_rgb_factors_bias = [0.0, 0.0, 0.0]

    def process_in(self, latent):
        return latent

    def process_out(self, latent):
        return latent


class DiffusersDDPMConfig(comfy.supported_models_base.BASE):
    # context_dim 1: the pack's Empty Conditioning gives (1, tokens, 1) zeros; any context is ignored
    unet_config = {"disable_unet_model_creation": True, "context_dim": 1}
    unet_extra_config = {}
    latent_format = PixelSpace
    memory_usage_factor = 1.0


class DiffusersUNet(torch.nn.Module):
    """ComfyUI's ``diffusion_model`` calling convention around a diffusers ``UNet2DModel``.

    ``forward(x, t, context=..., transformer_options=...)``: x is the DDPM's x_t, t the schedule
    index.  Conditioning (``context``, ``y``, ``control``) is ignored: the UNet is unconditional.
    ``transformer_options["patches"]["output_block_patch"]`` is applied to the mid-block output
    (the U-Net's h-space) with ``transformer_options["block"] = ("output", 0)``, as ComfyUI's own
    U-Net does before its first output block, and to the output of ``up_blocks[0]`` with
    ``("output", k)``, k = that block's resnet count: ComfyUI's U-Net numbers one output block per
    resnet, so k is where the second up level starts there too.  A patch's change to ``hsp`` is not
    used (diffusers joins the skips inside its up blocks).
    """

    def __init__(self, unet, out_channels: int):
        super().__init__()
        self.unet = unet
        self.out_channels = out_channels
        self._options = None
        self.up_block_index = len(unet.up_blocks[0].resnets) if len(unet.up_blocks) else 0
        self.up_block2_index = self.up_block_index + (len(unet.up_blocks[1].resnets) if len(unet.up_blocks) > 1
                                                      else 0)
        unet.mid_block.register_forward_hook(self._mid_block_hook)
        if len(unet.up_blocks) > 1:
            unet.up_blocks[0].register_forward_hook(self._up_block_hook)
        if len(unet.up_blocks) > 2:
            unet.up_blocks[1].register_forward_hook(self._up_block2_hook)

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype

    def _patched(self, h, hsp, block):
        options = self._options
        patches = (options or {}).get("patches", {}).get("output_block_patch")
        if not patches:
            return None
        options["block"] = block
        for p in patches:
            h, hsp = p(h, hsp, options)
        return h

    def _mid_block_hook(self, _module, args, output):
        return self._patched(output, args[0], ("output", 0))

    def _up_hook(self, output, hsp, index):
        # UpBlock2D / AttnUpBlock2D return the hidden states; the skip variants (hidden, skip_sample)
        if isinstance(output, tuple):
            h = self._patched(output[0], hsp, ("output", index))
            return None if h is None else (h, *output[1:])
        return self._patched(output, hsp, ("output", index))

    def _up_block_hook(self, _module, args, output):
        return self._up_hook(output, args[0], self.up_block_index)

    def _up_block2_hook(self, _module, args, output):
        return self._up_hook(output, args[0], self.up_block2_index)

    def forward(self, x, timesteps, context=None, y=None, control=None, transformer_options={}, **kwargs):
        self._options = transformer_options
        try:
            out = self.unet(x, timesteps.to(x.device)).sample
        finally:
            self._options = None
        return out[:, :self.out_channels]


# ---------------------------------------------------------------------------- the folder

def list_folders() -> list[str]:
    """Folders under models/diffusers/ that hold a UNet config (unet/config.json or config.json)."""
    out = set()
    for root in folder_paths.get_folder_paths(FOLDER_KEY):
        if not os.path.isdir(root):
            continue
        for dirpath, dirs, files in B.walk_dirs(root):
            rel = os.path.relpath(dirpath, root)
            if rel == ".":
                continue
            here = Path(dirpath)
            if (here / "unet" / "config.json").is_file() or (
                    "config.json" in files and "unet" in _class_name(here / "config.json").lower()):
                out.add(rel.replace(os.sep, "/"))
                if os.path.basename(dirpath) != "unet":
                    dirs[:] = [d for d in dirs if d not in ("unet", "scheduler")]
    return sorted(out)


def _class_name(path: Path) -> str:
    try:
        return str(json.loads(path.read_text()).get("_class_name", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def resolve_folder(name: str) -> Path:
    """The folder of a listed model name: ``<root>/<name>`` for the first diffusers root holding it.

    As ComfyUI's own folder listing (and ``list_folders``) does, a name may be, or lie under, a
    symbolic link to another disk; only names that leave the folder (absolute, ``..``) are refused.
    The check is on the path as written, never on where its links point.
    """
    if not isinstance(name, str) or not name:
        raise B.NodeInputError("model_name: pick a folder from models/diffusers/")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name[:1] in ("/", "\\") or ":" in parts[0] or ".." in parts:
        raise B.NodeInputError(
            f"model_name: {name!r} is not a folder name inside models/diffusers/ (absolute paths and '..' "
            "are refused); pick a folder from the list. To use a model stored elsewhere, put a symbolic "
            "link to it in models/diffusers/")
    for root in folder_paths.get_folder_paths(FOLDER_KEY):
        path = Path(root) / name
        if path.is_dir():
            return path
    raise B.NodeInputError(
        f"model_name: no folder {name!r} under models/diffusers/ "
        f"({', '.join(folder_paths.get_folder_paths(FOLDER_KEY))}); put the diffusers model folder there "
        "and refresh (R)")


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise B.NodeInputError(f"model_name: {what} {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise B.NodeInputError(f"model_name: {what} {path} is not a JSON object")
    return data


def find_parts(folder: Path) -> tuple[Path, Path]:
    """(UNet folder, scheduler config file) of a diffusers pipeline folder or a flat model folder.

    Layouts: ``unet/config.json`` + ``unet/diffusion_pytorch_model.safetensors`` +
    ``scheduler/scheduler_config.json`` (DDPMPipeline.save_pretrained), or ``config.json`` +
    ``diffusion_pytorch_model.safetensors`` + ``scheduler_config.json`` at the top.
    """
    if (folder / "unet" / "config.json").is_file():
        unet_dir = folder / "unet"
    elif (folder / "config.json").is_file():
        unet_dir = folder
    else:
        raise B.NodeInputError(
            f"model_name: {folder.name!r} has no UNet config: expected unet/config.json (a diffusers pipeline "
            "folder) or config.json (a flat UNet2DModel folder)")
    for cand in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json",
                 unet_dir / "scheduler_config.json"):
        if cand.is_file():
            return unet_dir, cand
    raise B.NodeInputError(
        f"model_name: {folder.name!r} has no scheduler config: expected scheduler/scheduler_config.json or "
        "scheduler_config.json next to the UNet. It holds the noise schedule (betas, prediction_type); copy it "
        "from the model's repository")


def check_unet_folder(unet_dir: Path) -> dict:
    config = _read_json(unet_dir / "config.json", "UNet config")
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        kind = "a text-conditional model" if "Condition" in cls else "not a UNet2DModel"
        raise B.NodeInputError(
            f"model_name: {unet_dir} holds a {cls} ({kind}); Load Diffusers DDPM loads unconditional "
            "pixel-space UNet2DModel folders only (for Stable Diffusion folders use ComfyUI's DiffusersLoader)")
    if config.get("class_embed_type") is not None or config.get("num_class_embeds"):
        raise B.NodeInputError(
            f"model_name: {unet_dir} is a class-conditional UNet2DModel (class_embed_type="
            f"{config.get('class_embed_type')!r}, num_class_embeds={config.get('num_class_embeds')!r}); "
            "only unconditional models are supported")
    cin, cout = int(config.get("in_channels", 3)), int(config.get("out_channels", 3))
    if cin != 3 or cout not in (3, 6):
        raise B.NodeInputError(
            f"model_name: {unet_dir} has in_channels={cin}, out_channels={cout}; a pixel-space RGB DDPM has 3 "
            "(or 6 with learned variance, whose variance half is ignored)")
    files = [p.name for p in unet_dir.iterdir() if p.is_file()]
    has_st = WEIGHTS in files or (WEIGHTS + ".index.json") in files
    if not has_st:
        pickled = [f for f in files if f.endswith(PICKLED)]
        if pickled:
            raise B.NodeInputError(
                f"model_name: {unet_dir} has only pickled weights ({', '.join(sorted(pickled))}); pickles can run "
                f"code when loaded, so they are refused. Convert once to safetensors (diffusers: "
                f"UNet2DModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)) to get "
                f"{WEIGHTS}")
        raise B.NodeInputError(f"model_name: {unet_dir} has no weights file {WEIGHTS}")
    return config


def _diffusers():
    """The diffusers package, or a node error that says how to install it."""
    try:
        import diffusers
    except ImportError:
        raise B.NodeInputError(
            "model_name: Load Diffusers DDPM needs the diffusers package, which this ComfyUI lacks; install it "
            "into ComfyUI's Python with `pip install -r custom_nodes/dpm-latent/requirements.txt`") from None
    return diffusers


def schedule_from_config(sched_path: Path):
    """(alphas_cumprod float64, prediction_type, clip range or None, ComfyUI sampling_settings)."""
    DDPMScheduler = _diffusers().DDPMScheduler
    raw = _read_json(sched_path, "scheduler config")
    pred = raw.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction", "sample"):
        raise B.NodeInputError(
            f"model_name: prediction_type {pred!r} in {sched_path} is not supported (epsilon, v_prediction, sample)")
    known = {k: v for k, v in raw.items() if not k.startswith("_")}
    try:
        sched = DDPMScheduler.from_config(known)
    except Exception as e:  # bad values in the file
        raise B.NodeInputError(f"model_name: cannot build the noise schedule from {sched_path}: {e}") from None
    ac = sched.alphas_cumprod.to(torch.float64)
    if ac.numel() < 2 or not bool(torch.isfinite(ac).all()) or float(ac.min()) <= 0 or float(ac.max()) >= 1:
        raise B.NodeInputError(
            f"model_name: the schedule in {sched_path} has alphas_cumprod outside (0, 1) "
            "(zero-terminal-SNR schedules have an infinite last sigma and are not supported)")
    clip = float(raw.get("clip_sample_range", 1.0)) if raw.get("clip_sample", False) else None
    if raw.get("thresholding"):
        logging.warning("Load Diffusers DDPM: %s asks for dynamic thresholding; it is not applied", sched_path)
    settings = {"timesteps": int(ac.numel())}
    name = raw.get("beta_schedule", "linear")
    if raw.get("trained_betas") is None and name in COMFY_SCHEDULES:
        settings.update(beta_schedule=COMFY_SCHEDULES[name], linear_start=float(raw.get("beta_start", 1e-4)),
                        linear_end=float(raw.get("beta_end", 0.02)))
    else:
        logging.warning("Load Diffusers DDPM: schedule %r has no ComfyUI equivalent; a ModelSamplingDiscrete node "
                        "would replace it by ComfyUI's default schedule", name)
    return ac, pred, clip, settings


def _sampling_class(pred: str):
    kind = {"epsilon": comfy.model_sampling.EPS, "v_prediction": comfy.model_sampling.V_PREDICTION,
            "sample": comfy.model_sampling.X0}[pred]

    class ModelSamplingDiffusers(comfy.model_sampling.ModelSamplingDiscrete, kind):
        pass

    return ModelSamplingDiffusers


def load_ddpm(folder: Path, clip_mode: str = CLIP_CHOICES[0]):
    """(ModelPatcher, VAE, info dict) for a diffusers UNet2DModel folder."""
    unet_dir, sched_path = find_parts(folder)
    config = check_unet_folder(unet_dir)
    ac, pred, clip, settings = schedule_from_config(sched_path)
    if clip_mode == "always":
        clip = clip or 1.0
    elif clip_mode == "never":
        clip = None
    elif clip_mode != CLIP_CHOICES[0]:
        raise B.NodeInputError(f"clip_sample: {clip_mode!r} is not one of {CLIP_CHOICES}")

    UNet2DModel = _diffusers().UNet2DModel
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    dtype = comfy.model_management.unet_dtype(supported_dtypes=[torch.float16, torch.bfloat16, torch.float32])
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=True, local_files_only=True,
                                           torch_dtype=dtype)
    except Exception as e:
        raise B.NodeInputError(f"model_name: diffusers could not load {unet_dir}: {e}") from None
    unet.eval().requires_grad_(False)

    model_config = DiffusersDDPMConfig(dict(DiffusersDDPMConfig.unet_config))
    model_config.sampling_settings.update(settings)
    model_type = comfy.model_base.ModelType.V_PREDICTION if pred == "v_prediction" else comfy.model_base.ModelType.EPS
    model = comfy.model_base.BaseModel(model_config, model_type=model_type, device=offload_device)
    model.diffusion_model = DiffusersUNet(unet, out_channels=3).to(offload_device)
    sampling = _sampling_class(pred)(model_config)
    sampling.set_sigmas(((1 - ac) / ac).sqrt())      # the file's own betas, not a re-derivation
    model.model_sampling = sampling
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    if clip is not None:
        lo, hi = -float(clip), float(clip)
        patcher.set_model_sampler_post_cfg_function(lambda args: args["denoised"].clamp(lo, hi))
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    info = {"prediction_type": pred, "clip_sample": clip, "timesteps": int(ac.numel()),
            "sample_size": config.get("sample_size"), "unet": str(unet_dir), "scheduler": str(sched_path)}
    return patcher, vae, info
