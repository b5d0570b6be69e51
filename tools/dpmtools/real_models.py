# SPDX-License-Identifier: GPL-3.0-or-later
"""Full-size diffusion models with random weights, built through ComfyUI's own classes (for bench/).

Each builder makes the network on the ``meta`` device only to read its parameter names and shapes,
lets ComfyUI's detector (``comfy.model_detection.model_config_from_unet``) pick the supported-model
class from them exactly as it does for a checkpoint file, builds that class's model
(``model_config.get_model``), fills its weights in place from a seeded generator (std
``1/sqrt(fan_in)``, small biases, unit norm scales) and wraps it in ``ModelPatcher`` the way
``comfy.sd.load_state_dict_guess_config`` does. No state dict of the whole model is ever held beside
it, so the peak memory is the model's own size (SDXL fp32: 10.3 GB).

``KINDS`` lists the models: ``sd15``, ``sdxl``, ``ssd1b`` (SDXL distilled to 1.3 B), ``sd3`` (SD3-medium
MMDiT), ``flux`` (Flux.1-dev, 12 B parameters: only for a machine with the memory), and ``tiny_*``
versions of SD1.5, SDXL and SD3 with the test models' configurations (``tiny_models``) for fast
checks of the same code path.

ComfyUI must be on sys.path and its device chosen (``comfy_env``) before these are called.
"""
from __future__ import annotations

import math

import torch

from . import tiny_models as T

PREFIX = "model.diffusion_model."

_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "model_channels": 320, "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

SD15_UNET = dict(_UNET, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1] * 9 + [0] * 3,
                 transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
                 num_heads=8, num_head_channels=-1)

SDXL_UNET = dict(_UNET, num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2],
                 channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
                 use_linear_in_transformer=True, context_dim=2048, num_heads=-1, num_head_channels=64)

# Segmind's SSD-1B: SDXL distilled to 1.3 B parameters (shallower 1280-channel stacks, no middle block),
# an SDXL-family model ComfyUI supports; the fallback where the full SDXL does not fit in memory.
SSD1B_UNET = dict(SDXL_UNET, transformer_depth=[0, 0, 2, 2, 4, 4],
                  transformer_depth_output=[0, 0, 0, 1, 1, 2, 10, 4, 4], transformer_depth_middle=-1)

SD3_MEDIUM_MMDIT = {
    "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 24, "input_size": None,
    "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
    "pos_embed_max_size": 192, "num_patches": 192 * 192, "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}

FLUX_DEV = {
    "image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
    "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
    "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True,
}

# what ComfyUI's UNet needs beyond the detected keys (heads), per tiny config
_TINY_UNETS = {"tiny_sd15": dict(T.SD15_UNET_CONFIG, **T._SD15_HEADS),
               "tiny_sdxl": dict(T.SDXL_UNET_CONFIG, **T._SDXL_HEADS)}


class Spec:
    """What a bench needs to know about a model kind: its latent channels, its conditioning's shapes, its VAE."""

    def __init__(self, kind, arch, config, latent_channels, context, pooled, vae):
        self.kind, self.arch, self.config = kind, arch, config
        self.latent_channels, self.context, self.pooled, self.vae = latent_channels, context, pooled, vae

    def context_shape(self, tokens: int | None = None) -> tuple:
        return (tokens or self.context[0], self.context[1])

    def conditioning(self, seed: int = 1, batch: int = 1, dtype=torch.float32, tokens: int | None = None) -> list:
        """Random CONDITIONING of the shapes this model's text encoders give (no text encoder needed);
        ``tokens``: another token count (SD3 without T5: 77)."""
        g = torch.Generator().manual_seed(seed)
        extras = {}
        if self.pooled:
            extras["pooled_output"] = torch.randn(batch, self.pooled, generator=g).to(dtype)
        if self.kind.endswith("flux"):
            extras["guidance"] = 3.5
        return [[torch.randn(batch, *self.context_shape(tokens), generator=g).to(dtype), extras]]


KINDS = {
    "sd15": Spec("sd15", "unet", SD15_UNET, 4, (77, 768), None, "kl"),
    "sdxl": Spec("sdxl", "unet", SDXL_UNET, 4, (77, 2048), 1280, "kl"),
    "ssd1b": Spec("ssd1b", "unet", SSD1B_UNET, 4, (77, 2048), 1280, "kl"),
    "sd3": Spec("sd3", "mmdit", SD3_MEDIUM_MMDIT, 16, (154, 4096), 2048, "kl16"),
    "flux": Spec("flux", "flux", FLUX_DEV, 16, (256, 4096), 768, "kl16"),
    "tiny_sd15": Spec("tiny_sd15", "unet", _TINY_UNETS["tiny_sd15"], 4, (77, 768), None, "taesd"),
    "tiny_sdxl": Spec("tiny_sdxl", "unet", _TINY_UNETS["tiny_sdxl"], 4, (77, 2048), 1280, "taesd"),
    "tiny_sd3": Spec("tiny_sd3", "mmdit", T.SD3_MMDIT_CONFIG, 16, (77, 32), 32, "taesd"),
}


def _meta_network(spec: Spec) -> torch.nn.Module:
    import comfy.ops

    ops = comfy.ops.disable_weight_init
    if spec.arch == "unet":
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
        return UNetModel(**spec.config, device="meta", operations=ops)
    if spec.arch == "mmdit":
        from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
        return OpenAISignatureMMDITWrapper(**spec.config, device="meta", operations=ops)
    from comfy.ldm.flux.model import Flux
    return Flux(**spec.config, device="meta", operations=ops)


def model_config(spec: Spec):
    """ComfyUI's supported-model config for this architecture, detected from its keys and shapes."""
    import comfy.model_detection

    with torch.device("meta"):
        net = _meta_network(spec)
    shapes = {PREFIX + k: v for k, v in net.state_dict().items()}
    config = comfy.model_detection.model_config_from_unet(shapes, PREFIX)
    if config is None:
        raise RuntimeError(f"ComfyUI does not recognise the {spec.kind} configuration")
    return config


@torch.no_grad()
def fill_(module: torch.nn.Module, seed: int) -> None:
    """Random, well-scaled values in place for every parameter (and positional-embedding buffer)."""
    gen = torch.Generator().manual_seed(int(seed))
    tensors = list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers()
                                                 if n.endswith("pos_embed") and b is not None]
    for name, t in tensors:
        if not t.is_floating_point():
            continue
        if name.endswith("pos_embed"):
            std = 0.5
        elif name.endswith("bias"):
            std = 0.02
        elif t.dim() <= 1:
            t.fill_(1.0)  # norm scales
            continue
        else:
            std = 1.0 / math.sqrt(math.prod(t.shape[1:]))
        # drawn in fp32 on the CPU (the same values whatever the dtype or device), one slice at a time
        flat = t.view(t.shape[0], -1)
        for i in range(0, flat.shape[0], 256):
            part = torch.empty(flat[i:i + 256].shape).normal_(0.0, std, generator=gen)
            flat[i:i + 256].copy_(part)


def build_model(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0, fill: bool = True):
    """A ModelPatcher around ComfyUI's model for ``kind`` (see KINDS), random weights in ``dtype``
    (``fill=False``: left as allocated, for a caller that loads weights into it)."""
    import comfy.model_management as mm
    import comfy.model_patcher

    spec = KINDS[kind]
    config = model_config(spec)
    load_device = mm.get_torch_device()
    manual_cast = mm.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes)
    config.set_inference_dtype(dtype, manual_cast)
    model = config.get_model({}, PREFIX, device=torch.device("cpu"))
    model.diffusion_model.to(dtype)
    if fill:
        fill_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def vae_state_dict(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The random state dict of this model's VAE: the real KL autoencoder (SD1.5/SDXL: 4 latent channels;
    SD3/Flux: 16, no quant convs), or TAESD for the tiny kinds."""
    vae = KINDS[kind].vae
    if vae == "taesd":
        return {k[len("first_stage_model."):]: v
                for k, v in T._taesd_state_dict(KINDS[kind].latent_channels, seed).items()}
    from comfy.ldm.models.autoencoder import AutoencoderKL

    z = 16 if vae == "kl16" else 4
    ddconfig = {"double_z": True, "z_channels": z, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        net = AutoencoderKL(ddconfig=ddconfig, embed_dim=z)
    shapes = {k: v for k, v in net.state_dict().items() if not (vae == "kl16" and "quant_conv" in k)}
    return T._fill(shapes, seed + 1)


def build_vae(kind: str, seed: int = 0, dtype: torch.dtype | None = None):
    """ComfyUI's VAE object for this model kind (``comfy.sd.VAE``, detected from the state dict)."""
    import comfy.sd

    return comfy.sd.VAE(sd=vae_state_dict(kind, seed), dtype=dtype)


# ------------------------------------------------------------------- diffusers <-> ComfyUI (SD1.5 layout)

def diffusers_sd15_unet(kind: str = "sd15", seed: int = 0):
    """A diffusers ``UNet2DConditionModel`` with the layout of ComfyUI's ``kind`` U-Net (``sd15`` or
    ``tiny_sd15``), random weights from ``seed`` (filled as ``fill_`` does)."""
    from diffusers import UNet2DConditionModel

    if kind == "sd15":
        net = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768,
                                   attention_head_dim=8, layers_per_block=2,
                                   block_out_channels=(320, 640, 1280, 1280))
    elif kind == "tiny_sd15":
        net = UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, cross_attention_dim=768,
                                   attention_head_dim=8, layers_per_block=1, block_out_channels=(320,),
                                   down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                                   mid_block_type=None)
    else:
        raise ValueError(f"no diffusers layout for {kind!r}")
    fill_(net, seed)
    return net.eval()


def diffusers_to_comfy(kind: str, diffusers_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers U-Net state dict renamed for ComfyUI's U-Net with ComfyUI's own key map
    (``comfy.utils.unet_to_diffusers``); every key must be mapped."""
    import comfy.utils

    key_map = comfy.utils.unet_to_diffusers(KINDS[kind].config)
    out = {key_map[k]: v for k, v in diffusers_state.items() if k in key_map}
    missing = sorted(set(diffusers_state) - set(key_map))
    if missing:
        raise KeyError(f"diffusers keys ComfyUI's map does not name: {missing[:5]} ...")
    return out


def comfy_model_from_diffusers(kind: str, net, dtype: torch.dtype = torch.float32):
    """ComfyUI's model for ``kind`` holding the weights of the diffusers U-Net ``net`` (strict load)."""
    patcher = build_model(kind, dtype=dtype, fill=False)
    patcher.model.diffusion_model.load_state_dict(diffusers_to_comfy(kind, net.state_dict()), strict=True)
    return patcher
