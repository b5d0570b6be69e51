# SPDX-License-Identifier: GPL-3.0-or-later
"""Tiny, randomly initialised checkpoints that ComfyUI's own loaders accept.

Every builder instantiates ComfyUI's real network classes on the ``meta`` device
(no memory, no init cost) only to learn the parameter names and shapes, then fills
them from a seeded ``torch.Generator`` and writes a ``.safetensors`` file.  The same
seed always yields the same file contents.  Nothing is downloaded.

Weights are random but well scaled: every matrix is drawn with std ``gain/sqrt(fan_in)``
(the zero-initialised output layers of the real models are random too), biases are
small, norm scales are one.  The outputs are therefore finite, not constant, and they
depend on the latent, on sigma and on the conditioning.

Models, and the CONDITIONING each one expects (ComfyUI's list of ``[cond, extras]``):

``make_sd15_checkpoint``  (``comfy.supported_models.SD15``, model_sampling EPS)
    One-level UNet, 320 channels, 8 heads (18.7 M params) + TAESD VAE, 4 latent
    channels (2.4 M); fp32, 85 MB.
    CONDITIONING ``[[tensor(B, T, 768), {}]]`` -- T is any token count (77 from CLIP-L;
    a ``pooled_output`` extra, as CLIPTextEncode adds, is ignored).
    Latent ``(B, 4, h, w)`` with any h, w; the VAE maps h x w to 8h x 8w pixels.

``make_sd3_checkpoint``  (``comfy.supported_models.SD3``, model_sampling CONST / flow)
    One-block MMDiT, width 64, one head, patch 2 (0.2 M params) + TAESD, 16 latent
    channels (2.5 M); fp32, 11 MB.
    CONDITIONING ``[[tensor(B, T, 32), {"pooled_output": tensor(B, 32)}]]``.
    Latent ``(B, 16, h, w)`` with h, w <= 64 (a 32 x 32 grid of 2 x 2 patches).
    It cannot be driven by CLIPTextEncode (its context width is 32, not 4096).

``make_sdxl_checkpoint``  (detected as ``KOALA_700M``, a subclass of ``SDXL``;
    the model is ``comfy.model_base.SDXL``, model_sampling EPS)
    One-level UNet, 320 channels, transformer depths [0, 2, 5] (50.1 M params) + TAESD,
    4 latent channels (2.4 M); fp32, 210 MB.
    CONDITIONING ``[[tensor(B, T, 2048), {"pooled_output": tensor(B, 1280)}]]``; the
    optional ``width``/``height``/``crop_w``/``crop_h``/``target_width``/
    ``target_height`` extras default as in ComfyUI (the ADM vector is 2816 wide).

``make_clip_l_text_encoder``  (a full-size random CLIP-L, ~123.7 M params, fp16)
    Load it with ``comfy.sd.load_clip(..., clip_type=CLIPType.STABLE_DIFFUSION)`` (the
    CLIPLoader node with type ``stable_diffusion``); ``CLIPTextEncode`` then yields
    ``[[tensor(B, 77, 768), {"pooled_output": tensor(B, 768)}]]``, which suits the SD1.5
    checkpoint.  ComfyUI accepts no smaller text encoder: a reduced CLIP would be loaded
    into a full-size one with most weights missing.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

__all__ = [
    "make_sd15_checkpoint",
    "make_sd3_checkpoint",
    "make_sdxl_checkpoint",
    "make_clip_l_text_encoder",
    "make_wan21_diffusion_model",
    "make_hunyuan_video_diffusion_model",
    "make_ltxv_diffusion_model",
    "make_wan21_vae",
    "make_hunyuan_video15_diffusion_model",
    "make_cosmos_predict2_diffusion_model",
    "load_tiny_mochi",
    "load_tiny_cosmos1",
    "SD15_UNET_CONFIG",
    "SDXL_UNET_CONFIG",
    "SD3_MMDIT_CONFIG",
]

# The UNet configurations exactly as ComfyUI's detector reads them back from the
# saved keys (comfy.model_detection.detect_unet_config), before the model class adds
# its head settings.
_UNET_COMMON = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

SD15_UNET_CONFIG = dict(
    _UNET_COMMON,
    adm_in_channels=None,
    num_res_blocks=[1],
    channel_mult=[1],
    transformer_depth=[1],
    transformer_depth_output=[1, 1],
    transformer_depth_middle=-2,  # no middle block at all
    use_linear_in_transformer=False,
    context_dim=768,
)
_SD15_HEADS = {"num_heads": 8, "num_head_channels": -1}

# SDXL proper pins transformer_depth [0, 0, 2, 2, 10, 10]; KOALA-700M (an SDXL
# subclass with the same conditioning) pins [0, 2, 5] and leaves channel_mult free, so
# one level of three res blocks is the smallest UNet that is still an SDXL model.
SDXL_UNET_CONFIG = dict(
    _UNET_COMMON,
    num_classes="sequential",
    adm_in_channels=2816,
    num_res_blocks=[3],
    channel_mult=[1],
    transformer_depth=[0, 2, 5],
    transformer_depth_output=[0, 0, 0, 0],
    transformer_depth_middle=-2,
    use_linear_in_transformer=True,
    context_dim=2048,
)
_SDXL_HEADS = {"num_heads": -1, "num_head_channels": 64}

SD3_MMDIT_CONFIG = {
    "in_channels": 16,
    "patch_size": 2,
    "out_channels": 16,
    "depth": 1,  # width 64 * depth, depth heads of 64
    "input_size": None,
    "adm_in_channels": 32,
    "context_embedder_config": {
        "target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 64}},
    "pos_embed_max_size": 32,
    "num_patches": 32 * 32,
    "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}


# --------------------------------------------------------------------------- helpers

def _meta_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict())


def _fill(shapes: dict[str, torch.Tensor], seed: int, *, gain: float = 1.0,
          gains: dict[str, float] | None = None, special: dict[str, float] | None = None,
          dtype: torch.dtype = torch.float32, prefix: str = "") -> dict[str, torch.Tensor]:
    """Random, well-scaled values for every entry of a (meta) state dict.

    ``gains`` maps a key prefix to the gain of the matrices under it (default
    ``gain``); ``special`` maps a key to a constant.
    """
    special = special or {}
    gains = gains or {}
    gen = torch.Generator().manual_seed(int(seed))
    out: dict[str, torch.Tensor] = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key].shape)
        if key in special:
            t = torch.full(shape, float(special[key]), dtype=torch.float32)
        elif key.endswith("bias"):
            t = torch.empty(shape).normal_(0.0, 0.02, generator=gen)
        elif len(shape) <= 1:
            t = torch.ones(shape)  # norm scales
        elif key.endswith("pos_embed"):
            t = torch.empty(shape).normal_(0.0, 0.5, generator=gen)
        else:
            fan_in = math.prod(shape[1:])
            g = next((v for k, v in gains.items() if key.startswith(k)), gain)
            t = torch.empty(shape).normal_(0.0, g / math.sqrt(fan_in), generator=gen)
        out[prefix + key] = t.to(dtype).contiguous()
    return out


def _taesd_state_dict(latent_channels: int, seed: int) -> dict[str, torch.Tensor]:
    import comfy.taesd.taesd

    with torch.device("meta"):
        vae = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    # These gains keep the ReLU stacks in a useful range: decoded images spread over
    # [0, 1] around mid-grey (the last decoder conv is biased to 0.5, TAESD's centre)
    # without saturating, and encoded latents have a std of roughly 0.5.
    last = f"taesd_decoder.{len(vae.taesd_decoder) - 1}.bias"
    return _fill(_meta_state_dict(vae), seed + 1,
                 gains={"taesd_decoder.": 0.95, "taesd_encoder.": 1.1},
                 special={"vae_scale": 1.0, "vae_shift": 0.0, last: 0.5},
                 prefix="first_stage_model.")


def _unet_state_dict(config: dict, heads: dict, seed: int) -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**config, **heads, device="meta", operations=comfy.ops.disable_weight_init)
    return _fill(_meta_state_dict(unet), seed, prefix="model.diffusion_model.")


def _save(sd: dict[str, torch.Tensor], path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


# -------------------------------------------------------------------------- builders

def make_sd15_checkpoint(path, seed: int = 0, *, with_clip_l: bool = False, inpaint: bool = False) -> Path:
    """Tiny SD1.5 (EPS) UNet + 4-channel TAESD VAE, fp32, as one checkpoint file.

    ``with_clip_l=True`` also embeds the random fp16 CLIP-L of
    :func:`make_clip_l_text_encoder` (same seed), so that CheckpointLoaderSimple
    returns a working CLIP too; the file then grows from 85 MB to 332 MB.
    ``inpaint=True``: the UNet takes 9 input channels (latent, mask, masked image), which ComfyUI's
    detector reads as an inpainting model (``set_inpaint``).
    """
    sd = _unet_state_dict(dict(SD15_UNET_CONFIG, in_channels=9) if inpaint else SD15_UNET_CONFIG, _SD15_HEADS, seed)
    sd.update(_taesd_state_dict(4, seed))
    if with_clip_l:
        sd.update(_clip_l_state_dict(seed, prefix="cond_stage_model.transformer."))
    return _save(sd, path)


def make_sdxl_checkpoint(path, seed: int = 0) -> Path:
    """Tiny SDXL-family (KOALA-700M layout, EPS) UNet + 4-channel TAESD VAE, fp32."""
    sd = _unet_state_dict(SDXL_UNET_CONFIG, _SDXL_HEADS, seed)
    sd.update(_taesd_state_dict(4, seed))
    return _save(sd, path)


def make_sd3_checkpoint(path, seed: int = 0) -> Path:
    """Tiny SD3 (flow, CONST) one-block MMDiT + 16-channel TAESD VAE, fp32."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

    mmdit = OpenAISignatureMMDITWrapper(**SD3_MMDIT_CONFIG, device="meta",
                                        operations=comfy.ops.disable_weight_init)
    sd = _fill(_meta_state_dict(mmdit), seed, prefix="model.diffusion_model.")
    sd.update(_taesd_state_dict(16, seed))
    return _save(sd, path)


def make_clip_l_text_encoder(path, seed: int = 0) -> Path:
    """A random full-size CLIP-L text encoder (fp16, ~247 MB) for CLIPLoader."""
    return _save(_clip_l_state_dict(seed), path)


def _clip_l_state_dict(seed: int, prefix: str = "") -> dict[str, torch.Tensor]:
    import comfy.sd1_clip

    clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16)
    return _fill(_meta_state_dict(clip.transformer), seed + 2, dtype=torch.float16, prefix=prefix)


# ------------------------------------------------------------------- tiny video models
# Diffusion-model files (ComfyUI's ``diffusion_models`` folder, loaded by UNETLoader) with
# the layouts ComfyUI's detector reads back as the real video families, at tiny sizes, and
# a tiny Wan 2.1 VAE (``vae`` folder, VAELoader). Latents are (B, C, T, H, W).

# Wan 2.1 text-to-video (comfy.supported_models.WAN21_T2V, model_base.WAN21, flow, shift 8):
# the detector fixes one head per 128 of width and the text width at 4096 (umT5-XXL).
WAN21_DIT_CONFIG = {"model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "out_dim": 16, "dim": 128,
                    "ffn_dim": 256, "freq_dim": 256, "text_dim": 4096, "num_heads": 1, "num_layers": 3,
                    "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}
# Wan 2.2 TI2V-5B layout (WAN22_T2V, model_base.WAN22, latent format Wan22): 48 channels.
WAN22_DIT_CONFIG = dict(WAN21_DIT_CONFIG, in_dim=48, out_dim=48, num_layers=2)
# HunyuanVideo (comfy.supported_models.HunyuanVideo, flow, shift 7): one head of 128, one double
# and one single block, text width 32, a 768-wide pooled vector (CLIP-L's).
HUNYUAN_VIDEO_DIT_CONFIG = {"in_channels": 16, "out_channels": 16, "patch_size": [1, 2, 2], "vec_in_dim": 768,
                            "context_in_dim": 32, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 1,
                            "depth": 1, "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 256,
                            "qkv_bias": True, "guidance_embed": False, "meanflow": False, "byt5": False,
                            "use_cond_type_embedding": False, "vision_in_dim": None}
# LTX-Video (comfy.supported_models.LTXV, flow, shift 2.37): 32 heads of 4, one block, text width 4096 (T5-XXL;
# the detector fixes it).
LTXV_DIT_CONFIG = {"in_channels": 128, "cross_attention_dim": 128, "attention_head_dim": 4,
                   "num_attention_heads": 32, "caption_channels": 4096, "num_layers": 1}


def _dit_file(module, seed: int, path, gain: float = 1.0) -> Path:
    return _save(_fill(_meta_state_dict(module), seed, gain=gain), path)


def make_wan21_diffusion_model(path, seed: int = 0, *, wan22: bool = False, i2v: bool = False) -> Path:
    """Tiny Wan 2.1 (``wan22=True``: Wan 2.2 5B, 48 latent channels) text-to-video DiT, fp32 (~4 MB).
    ``i2v=True``: Wan 2.1 image-to-video (``WAN21_I2V``): 36 input channels, the clip latent plus Wan
    Image To Video's start-frame latent (16) and its mask (4), and a CLIP-vision embedder.

    CONDITIONING ``[[tensor(B, T, 4096), {}]]`` (what umT5-XXL gives; Empty Conditioning makes it).
    Latent ``(B, 16 or 48, t, h, w)`` with even h, w."""
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    cfg = WAN22_DIT_CONFIG if wan22 else WAN21_DIT_CONFIG
    if i2v:
        cfg = dict(cfg, model_type="i2v", in_dim=36)
    net = WanModel(**cfg, device="meta", operations=comfy.ops.disable_weight_init)
    return _dit_file(net, seed, path)


def make_hunyuan_video_diffusion_model(path, seed: int = 0, *, i2v: bool = False) -> Path:
    """Tiny HunyuanVideo DiT, fp32. CONDITIONING ``[[tensor(B, T, 32), {"pooled_output": tensor(B, 768)}]]``.
    Latent ``(B, 16, t, h, w)`` with even h, w. ``i2v=True``: HunyuanVideo image-to-video
    (``HunyuanVideoI2V``): 33 input channels, the clip plus Hunyuan Image To Video's start-frame latent (16,
    "v1 (concat)") and its inverted mask (1)."""
    import comfy.ops
    from comfy.ldm.hunyuan_video.model import HunyuanVideo

    cfg = dict(HUNYUAN_VIDEO_DIT_CONFIG, in_channels=33) if i2v else HUNYUAN_VIDEO_DIT_CONFIG
    net = HunyuanVideo(image_model="hunyuan_video", **cfg, device="meta",
                       operations=comfy.ops.disable_weight_init)
    return _dit_file(net, seed, path)


def make_ltxv_diffusion_model(path, seed: int = 0) -> Path:
    """Tiny LTX-Video DiT, fp32. CONDITIONING ``[[tensor(B, T, 4096), {}]]``. Latent ``(B, 128, t, h, w)``."""
    import comfy.ops
    from comfy.ldm.lightricks.model import LTXVModel

    net = LTXVModel(**LTXV_DIT_CONFIG, device="meta", operations=comfy.ops.disable_weight_init)
    return _dit_file(net, seed, path)


# HunyuanVideo 1.5 (comfy.supported_models.HunyuanVideo15, model_base.HunyuanVideo15, latent format
# HunyuanVideo15, 32 channels, flow, shift 7): the layout of HunyuanVideo plus the 1.5 parts the detector looks
# for: a SigLIP vision projection (1152 wide, the detector's key for 1.5), the condition-type embedding, no pooled
# vector. 65 input channels as the real model: the clip (32), an image-to-video start frame (32, zeros for
# text-to-video) and its mask (1), which model_base.HunyuanVideo15.concat_cond always appends.
HUNYUAN_VIDEO15_DIT_CONFIG = dict(HUNYUAN_VIDEO_DIT_CONFIG, in_channels=65, out_channels=32, vec_in_dim=None,
                                  use_cond_type_embedding=True, vision_in_dim=1152)
# Cosmos Predict2 (comfy.supported_models.CosmosT2IPredict2, model_base.CosmosPredict2, latent format Wan21,
# sampling FLOW_COSMOS): the detector reads the width from the patch embedder and, for widths other than 2048 /
# 5120, keeps MiniTrainDIT's 10 blocks of 16 heads; its 3-D RoPE (h / w extrapolation 4) needs a head of >= 12.
# T5 tokens 1024 wide (the detector fixes it). 192 wide: 15 M parameters, stored in bf16 (30 MB).
COSMOS_PREDICT2_DIT_CONFIG = {"max_img_h": 240, "max_img_w": 240, "max_frames": 128, "in_channels": 16,
                              "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1,
                              "concat_padding_mask": True, "model_channels": 192, "num_blocks": 10, "num_heads": 16,
                              "crossattn_emb_channels": 1024, "pos_emb_cls": "rope3d", "pos_emb_learnable": True,
                              "pos_emb_interpolation": "crop", "min_fps": 1, "max_fps": 30, "use_adaln_lora": True,
                              "adaln_lora_dim": 256, "extra_per_block_abs_pos_emb": False,
                              "rope_h_extrapolation_ratio": 4.0, "rope_w_extrapolation_ratio": 4.0,
                              "rope_t_extrapolation_ratio": 1.0}


def make_hunyuan_video15_diffusion_model(path, seed: int = 0) -> Path:
    """Tiny HunyuanVideo 1.5 DiT, fp32. CONDITIONING ``[[tensor(B, T, 32), {}]]`` (no pooled vector).
    Latent ``(B, 32, t, h, w)`` with even h, w."""
    import comfy.ops
    from comfy.ldm.hunyuan_video.model import HunyuanVideo

    net = HunyuanVideo(image_model="hunyuan_video", **HUNYUAN_VIDEO15_DIT_CONFIG, device="meta",
                       operations=comfy.ops.disable_weight_init)
    return _dit_file(net, seed, path)


def make_cosmos_predict2_diffusion_model(path, seed: int = 0) -> Path:
    """Tiny Cosmos Predict2 DiT (bf16 file). CONDITIONING ``[[tensor(B, T, 1024), {}]]``.
    Latent ``(B, 16, t, h, w)`` with even h, w (Wan 2.1's latent space)."""
    import comfy.ops
    from comfy.ldm.cosmos.predict2 import MiniTrainDIT

    net = MiniTrainDIT(**COSMOS_PREDICT2_DIT_CONFIG, device="meta", operations=comfy.ops.disable_weight_init)
    return _save(_fill(_meta_state_dict(net), seed, dtype=torch.bfloat16), path)


def make_wan21_vae(path, seed: int = 0, dim: int = 8) -> Path:
    """Tiny Wan 2.1 video VAE (``comfy.ldm.wan.vae.WanVAE``, width ``dim`` instead of 96), fp32.

    16 latent channels; 8x spatial and 4x temporal compression as the real one: 1 + 4k frames of
    H x W pixels <-> 1 + k latent frames of H/8 x W/8."""
    from comfy.ldm.wan.vae import WanVAE

    with torch.device("meta"):
        vae = WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                     temperal_downsample=[False, True, True], dropout=0.0)
    return _save(_fill(_meta_state_dict(vae), seed + 1, gain=1.0), path)


# ------------------------------------------------- video families ComfyUI only detects at full size
# ComfyUI's detector fixes every size of Genmo Mochi (48 blocks of 3072) and of Cosmos 1 (7B: 4096 wide; any
# other width is read as the 14B one: 36 blocks of 40 heads), so no small file loads through UNET Loader as
# either. These build ComfyUI's own model classes (supported_models -> model_base -> the real DiT) at tiny
# sizes in this process and wrap them in ComfyUI's ModelPatcher, as UNET Loader's loader does after detection.

# Genmo Mochi (comfy.supported_models.GenmoMochi, model_base.GenmoMochi, latent format Mochi, 12 channels,
# flow, shift 6): the detector's settings with 2 blocks of width 64 (2 heads of 32) and 64-wide T5 tokens; its
# block asserts an x-MLP of 12288 (1536 * 8), so the MLP ratio is 192.
MOCHI_DIT_CONFIG = {"image_model": "mochi_preview", "depth": 2, "patch_size": 2, "num_heads": 2,
                    "hidden_size_x": 64, "hidden_size_y": 32, "mlp_ratio_x": 192.0, "mlp_ratio_y": 4.0,
                    "learn_sigma": False, "in_channels": 12, "qk_norm": True, "qkv_bias": False, "out_bias": True,
                    "attn_drop": 0.0, "patch_embed_bias": True, "posenc_preserve_area": True,
                    "timestep_mlp_bias": True, "attend_to_padding": False, "timestep_scale": 1000.0,
                    "use_t5": True, "t5_feat_dim": 64, "t5_token_length": 256, "rope_theta": 10000.0}
# Cosmos 1 text-to-video (comfy.supported_models.CosmosT2V, model_base.CosmosVideo, latent format
# Cosmos1CV8x8x8, 16 channels, EDM sampling, sigma_data 0.5): the detector's block layout with 2 blocks of
# 8 heads of 12, 1024-wide T5 tokens (as ComfyUI's Cosmos text encoder gives) and a 32-wide adaLN-LoRA.
COSMOS1_DIT_CONFIG = {"image_model": "cosmos", "max_img_h": 240, "max_img_w": 240, "max_frames": 128,
                      "in_channels": 16, "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1,
                      "model_channels": 96, "num_blocks": 2, "num_heads": 8, "block_config": "FA-CA-MLP",
                      "concat_padding_mask": True, "crossattn_emb_channels": 1024, "pos_emb_cls": "rope3d",
                      "pos_emb_learnable": False, "pos_emb_interpolation": "crop", "block_x_format": "THWBD",
                      "affline_emb_norm": True, "use_adaln_lora": True, "adaln_lora_dim": 32,
                      "extra_per_block_abs_pos_emb": True, "extra_per_block_abs_pos_emb_type": "learnable",
                      "rope_h_extrapolation_ratio": 1.0, "rope_w_extrapolation_ratio": 1.0,
                      "rope_t_extrapolation_ratio": 2.0}


def _tiny_model_patcher(config_class: str, unet_config: dict, seed: int):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    model_config = getattr(comfy.supported_models, config_class)(dict(unet_config))
    model_config.set_inference_dtype(torch.float32, None)
    with torch.device("meta"):
        shapes = _meta_state_dict(model_config.get_model({}, device=torch.device("meta")).diffusion_model)
    model = model_config.get_model({}, device=mm.unet_offload_device())
    model.load_model_weights(_fill(shapes, seed), "")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def load_tiny_mochi(seed: int = 0):
    """A tiny Genmo Mochi as a ComfyUI MODEL (ModelPatcher), fp32.
    CONDITIONING ``[[tensor(B, T, 64), {"attention_mask": ones(B, T)}]]``. Latent ``(B, 12, t, h, w)``, even h, w."""
    return _tiny_model_patcher("GenmoMochi", MOCHI_DIT_CONFIG, seed)


def load_tiny_cosmos1(seed: int = 0):
    """A tiny Cosmos 1 text-to-video DiT as a ComfyUI MODEL (ModelPatcher), fp32.
    CONDITIONING ``[[tensor(B, T, 1024), {}]]``. Latent ``(B, 16, t, h, w)`` with even h, w."""
    return _tiny_model_patcher("CosmosT2V", COSMOS1_DIT_CONFIG, seed)
