# SPDX-License-Identifier: GPL-3.0-or-later
"""The demo world in motion: tiny Wan-layout video flow models and the per-frame video VAE.

Shared by ``demo/train.py`` (which trains the models, ``--parts video``) and ``scripts/demo.py``
(which measures the video translation row).  Needs ComfyUI importable (``comfy.*``) on the CPU.

* Two unconditional rectified-flow models in ComfyUI's Wan 2.1 layout
  (``comfy.supported_models.WAN21_T2V`` -> ``model_base.WAN21`` -> ``comfy.ldm.wan.model.WanModel``),
  A trained on clips of moving circles, B on moving squares (``world.sample_clip_domain``).
  Their dimensions obey ComfyUI's own Wan detection (heads = dim / 128, freq_dim 256, text_dim 4096),
  so the files in ``models/video/`` also load with ComfyUI's ``UNETLoader``.  They expect all-zero
  context ``(B, 1, 4096)``.
* The video VAE is the world's image VAE (TAESD layout, ``checkpoints/dpm_world_circles.safetensors``)
  applied to each frame; a clip (T, 3, 64, 64) becomes a latent (16, T, 8, 8).  Why that is
  equivalent here: the world's clips have no motion blur and no temporal structure inside a frame,
  a video VAE that compresses time (Wan's 4x) would only merge frames the readers measure one by one,
  and the per-frame round trip is the image VAE's (37 dB), so every difference the row shows comes
  from the samplers, not from the autoencoder.
* Model space: the models work on the SD3 latent format's ``process_in`` of the per-frame latents
  (zero mean, unit variance: the numbers the image flow models see).  The *raw* video latent that a
  ComfyUI sampler receives is ``Wan21.process_out`` of them, so that ComfyUI's WAN21 ``process_in``
  gives the model space back (``to_raw`` / ``from_raw``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"
VIDEO_DIR = MODELS / "video"
VIDEO_NAMES = {"A": "dpm_world_video_circles.safetensors", "B": "dpm_world_video_squares.safetensors"}
IMAGE_CKPT = MODELS / "checkpoints" / "dpm_world_circles.safetensors"   # holds the world's image VAE

LATENT_CHANNELS = 16
DIM = 128                 # 1 head of 128 (ComfyUI's Wan detection: heads = dim // 128)
FFN = 256
LAYERS = 4
TEXT_DIM = 4096           # ComfyUI's Wan detection assumes umT5's width; the context is all zeros
SHIFT = 3.0               # sigma warp for training and sampling (as the image flow models)


def unet_config() -> dict:
    return {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": LATENT_CHANNELS,
            "dim": DIM, "ffn_dim": FFN, "freq_dim": 256, "text_dim": TEXT_DIM,
            "out_dim": LATENT_CHANNELS, "num_heads": DIM // 128, "num_layers": LAYERS,
            "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}


def new_model(init: bool = True):
    """(model config, ComfyUI ``model_base.WAN21``) at the tiny dimensions, fp32; initialised when ``init``
    (ComfyUI's ops leave weights uninitialised)."""
    import comfy.supported_models
    cfg = comfy.supported_models.WAN21_T2V(unet_config())
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    if init:
        _initialise(model.diffusion_model)
    return cfg, model


def _initialise(dm) -> None:
    for name, mod in dm.named_modules():
        if isinstance(mod, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(mod.weight)
            if mod.bias is not None:
                torch.nn.init.zeros_(mod.bias)
        elif isinstance(mod, torch.nn.Conv3d):
            torch.nn.init.xavier_uniform_(mod.weight.view(mod.weight.shape[0], -1))
            torch.nn.init.zeros_(mod.bias)
        elif getattr(mod, "weight", None) is not None and "norm" in name.rsplit(".", 1)[-1]:
            torch.nn.init.ones_(mod.weight)
            if getattr(mod, "bias", None) is not None:
                torch.nn.init.zeros_(mod.bias)
    with torch.no_grad():
        for name, p in dm.named_parameters():
            if name.endswith("modulation"):
                p.copy_(torch.randn(p.shape) / DIM ** 0.5)
        torch.nn.init.zeros_(dm.time_projection[1].weight)
        torch.nn.init.zeros_(dm.time_projection[1].bias)
        torch.nn.init.normal_(dm.time_embedding[0].weight, std=0.02)
        torch.nn.init.zeros_(dm.head.head.weight)
        torch.nn.init.zeros_(dm.head.head.bias)


def load_model(domain: str):
    """The shipped video flow model of ``domain`` ("A" circles, "B" squares) as a ComfyUI WAN21 model,
    fp16 weights widened to fp32, in eval mode without gradients."""
    from safetensors.torch import load_file
    path = VIDEO_DIR / VIDEO_NAMES[domain]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: train it with `python demo/train.py --parts video`")
    _, model = new_model(init=False)
    sd = load_file(str(path))
    model.diffusion_model.load_state_dict({k: v.float() for k, v in sd.items()})
    model.diffusion_model.eval()
    for p in model.diffusion_model.parameters():
        p.requires_grad_(False)
    return model


def metadata(domain: str) -> dict:
    from safetensors import safe_open
    with safe_open(str(VIDEO_DIR / VIDEO_NAMES[domain]), "pt") as f:
        return json.loads(f.metadata()["dpm_latent_demo"])


def new_taesd():
    import comfy.taesd.taesd as T
    return T.TAESD(latent_channels=LATENT_CHANNELS)


def world_vae():
    """The world's image VAE (TAESD layout) from the shipped image checkpoint, fp32, eval."""
    from safetensors.torch import load_file
    sd = load_file(str(IMAGE_CKPT))
    vae = new_taesd()
    vae.load_state_dict({k[len("first_stage_model."):]: v.float() for k, v in sd.items()
                         if k.startswith("first_stage_model.")})
    for p in vae.parameters():
        p.requires_grad_(False)
    return vae.eval()


def _sd3_factors():
    import comfy.latent_formats
    lf = comfy.latent_formats.SD3()
    return lf.scale_factor, lf.shift_factor


# frames per VAE call: on the CPU, TAESD over 16 frames of 64 x 64 at a time is faster than over 256 and gives the
# same bits (bench/bench_video_vae_chunk.py prints both; docs/benchmarks.md has the measured ratios)
CHUNK = 16


def encode_frames(vae, frames: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """(N, 3, 64, 64) images in [0, 1] -> model-space latents (N, 16, 8, 8) (TAESD, SD3 process_in), ``chunk``
    frames per VAE call."""
    scale, shift = _sd3_factors()
    with torch.no_grad():
        return torch.cat([(vae.encode(frames[i:i + chunk] * 2 - 1) - shift) * scale
                          for i in range(0, len(frames), chunk)])


def decode_frames(vae, lat: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Model-space latents (N, 16, 8, 8) -> images (N, 3, 64, 64) in [0, 1], ``chunk`` frames per VAE call."""
    scale, shift = _sd3_factors()
    with torch.no_grad():
        out = torch.cat([vae.decode(lat[i:i + chunk] / scale + shift) for i in range(0, len(lat), chunk)])
    return ((out + 1) / 2).clamp(0, 1)


def encode_clips(vae, clips: torch.Tensor) -> torch.Tensor:
    """(n, T, 3, 64, 64) clips in [0, 1] -> model-space video latents (n, 16, T, 8, 8), frame by frame."""
    n, t = clips.shape[:2]
    z = encode_frames(vae, clips.reshape(n * t, *clips.shape[2:]))
    return z.reshape(n, t, *z.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()


def decode_clips(vae, lat: torch.Tensor) -> torch.Tensor:
    """Model-space video latents (n, 16, T, 8, 8) -> clips (n, T, 3, 64, 64) in [0, 1]."""
    n, c, t = lat.shape[:3]
    out = decode_frames(vae, lat.permute(0, 2, 1, 3, 4).reshape(n * t, c, *lat.shape[3:]))
    return out.reshape(n, t, *out.shape[1:])


def frames_of(lat: torch.Tensor) -> torch.Tensor:
    """(n, C, T, h, w) -> (n * T, C, h, w): the clip's frames as an image batch."""
    n, c, t = lat.shape[:3]
    return lat.permute(0, 2, 1, 3, 4).reshape(n * t, c, *lat.shape[3:])


def clips_of(frames: torch.Tensor, t: int) -> torch.Tensor:
    """Inverse of :func:`frames_of`."""
    nt, c = frames.shape[:2]
    return frames.reshape(nt // t, t, c, *frames.shape[2:]).permute(0, 2, 1, 3, 4).contiguous()


def to_raw(lat: torch.Tensor) -> torch.Tensor:
    """Model space -> the raw video latent a ComfyUI sampler of a WAN21 model takes (Wan21 process_out)."""
    import comfy.latent_formats
    return comfy.latent_formats.Wan21().process_out(lat)


def from_raw(raw: torch.Tensor) -> torch.Tensor:
    import comfy.latent_formats
    return comfy.latent_formats.Wan21().process_in(raw)


def zero_context(batch: int) -> torch.Tensor:
    return torch.zeros(batch, 1, TEXT_DIM)


def denoiser(model):
    """sigma-space denoiser ``D(x, sigma) -> x0_hat`` of a WAN21 model on model-space latents, zero context
    (the form ``samplers.dpm_encoder`` takes)."""
    cache: dict = {}

    def denoise(x, sigma):
        b = x.shape[0]
        if b not in cache:
            cache[b] = zero_context(b)
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1).expand(b)
        with torch.no_grad():
            return model.apply_model(x, s, c_crossattn=cache[b])
    return denoise


def flow_sigmas(steps: int, shift: float = SHIFT) -> torch.Tensor:
    """``steps + 1`` sigmas from 1 to 0, uniform in t, warped by ``shift`` (SD3's time shift)."""
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def sample(model, n: int, seed: int, frames: int, steps: int = 20) -> torch.Tensor:
    """Unguided Euler samples (n, 16, frames, 8, 8) in model space, zero context."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, LATENT_CHANNELS, frames, 8, 8, generator=g)
    D = denoiser(model)
    sig = flow_sigmas(steps)
    for i in range(steps):
        d = D(x, float(sig[i]))
        x = d + (x - d) * float(sig[i + 1] / sig[i])
    return x
