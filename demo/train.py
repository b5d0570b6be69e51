# SPDX-License-Identifier: GPL-3.0-or-later
"""Train the tiny models of the DPM Latent demo world on the CPU.

Writes to ``demo/models`` (next to this file):

* ``checkpoints/dpm_world_circles.safetensors`` -- unconditional SD3-layout
  flow model (ComfyUI's MMDiT) trained on domain A (circles), with the VAE;
* ``checkpoints/dpm_world_squares.safetensors`` -- the same for domain B
  (squares), trained independently from another seed;
* ``clip_energy/dpm_world_clip/`` -- a tiny transformers CLIP (+ tokenizer and
  preprocessor config) trained contrastively on world images and captions;
* ``diffusers/dpm_world_ddpm_{circles,squares}/`` -- pixel-space diffusers DDPMs (32x32), A and B;
* ``asyrp/*.asyrp.safetensors`` -- Asyrp directions "red -> blue" for the DDPM A and flow model B,
  and two Gaussian controls of each (at the direction's norm, and at 0.2 ||h||);
* ``video/dpm_world_video_{circles,squares}.safetensors`` -- the world in motion: two unconditional
  video flow models in ComfyUI's Wan 2.1 layout (demo/video.py), A on 8-frame clips of a moving
  circle, B on moving squares, over the image VAE's per-frame latents;
* ``TRAINING.json`` -- seeds, step counts, wall times and quality numbers.

The VAE is ComfyUI's TAESD layout with 16 latent channels (8x downsampling,
64x64 images -> 8x8 latents); its ``vae_scale``/``vae_shift`` parameters are set
so that after the SD3 latent format's ``process_in`` the latents have zero mean
and unit variance.  The flow models are trained through ComfyUI's own
``BaseModel.apply_model`` (CONST / rectified flow, SD3 ``ModelSamplingDiscreteFlow``
with shift 3), i.e. exactly the path used at sampling time, with all-zero
context ``(B, L, CTX_DIM)`` (L drawn from ``CONTEXT_TOKENS``) and all-zero
pooled vector ``(B, ADM_DIM)``.

Usage (the ComfyUI folder comes from --comfyui, DPM_LATENT_COMFYUI or COMFYUI_PATH)::

    python demo/train.py                  # everything: (vae | clip), (flow_a | flow_b), verify
                                          # as 2 single-threaded processes: ~35 min on 2 free
                                          # cores, ~55 min measured on 2 busy shared ones
    python demo/train.py --quick          # a short smoke run (a few minutes)
    python demo/train.py --serial         # the same parts one after another in one process
    python demo/train.py --parts vae      # one part; later parts reuse saved earlier ones
    python demo/train.py --parts verify   # only re-measure the shipped models

Parts: ``vae``, ``flow_a``, ``flow_b``, ``clip``, ``ddpm_a``, ``ddpm_b`` (alias ``ddpm``),
``video_a``, ``video_b`` (alias ``video``: two single-threaded processes; they need the shipped image
checkpoint for its VAE),
``asyrp_ddpm``, ``asyrp_flow`` (alias ``asyrp``: the Asyrp h-space directions of ``asyrp/``, trained
through the pack's own Asyrp Train Direction node on the shipped models, with their Gaussian
controls; ``asyrp_controls`` rewrites only the controls) and ``verify`` (default: all, in order).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tools"))  # dpmtools (never the repository itself: its nodes/ would shadow ComfyUI's)

from dpmtools.comfy_env import load_module  # noqa: E402

W = load_module("dpm_latent_demo_world", HERE / "world.py")

MODELS = HERE / "models"
CKPT_DIR = MODELS / "checkpoints"
CLIP_DIR = MODELS / "clip_energy" / "dpm_world_clip"
WORK_DIR = MODELS / ".work"          # intermediate full-precision weights (not shipped)
CKPT_NAMES = {"A": "dpm_world_circles.safetensors", "B": "dpm_world_squares.safetensors"}

LATENT_CHANNELS = 16
DEPTH = 3                 # MMDiT depth: hidden 192, 3 heads of 64
CTX_DIM = 32              # context_embedder in_features
ADM_DIM = 32              # y_embedder (pooled) in_features
POS_EMBED_MAX = 8         # 8x8 patches of 2x2: latents up to 16x16 (128 px images)
CONTEXT_TOKENS = (1, 2, 4, 8)
SD3_SHIFT = 3.0


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def setup_comfy(path: str | None):
    """ComfyUI (``--comfyui`` or DPM_LATENT_COMFYUI) importable here, on the CPU in fp32."""
    from dpmtools import comfy_env
    try:
        comfy_env.add_comfy_to_path(path)
    except RuntimeError as e:
        raise SystemExit(f"give the ComfyUI folder with --comfyui ({e})") from None
    comfy_env.set_device(cpu=True, force_fp32=True)
    import comfy.model_management  # noqa: F401


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean().detach())


def cosine_lr(step, total, base, warmup=50, final=0.05):
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * p)))


def set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr


# ---------------------------------------------------------------- VAE

def new_taesd():
    import comfy.taesd.taesd as T
    m = T.TAESD(latent_channels=LATENT_CHANNELS)
    for mod in m.modules():         # ComfyUI's ops skip initialisation: do it here
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.Conv2d.reset_parameters(mod)
    return m


def world_pool(n, seed):
    imgs, attrs = W.sample_world(n, seed)
    return imgs, attrs


def train_vae(steps32, steps64, seed, pool_n):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    imgs, _ = world_pool(pool_n, seed + 1)
    log(f"vae: pool of {pool_n} images in {time.time() - t0:.0f}s")
    m = new_taesd()
    enc, dec = m.taesd_encoder, m.taesd_decoder
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    total = steps32 + steps64
    for step in range(total):
        full = step >= steps32
        bs = 16 if full else 32
        idx = torch.randint(0, pool_n, (bs,), generator=g)
        x = imgs[idx]
        flip = torch.rand(bs, generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        if not full:              # random 32x32 crops (aligned to the 8-pixel latent grid)
            oy, ox = (torch.randint(0, 5, (2,), generator=g) * 8).tolist()
            x = x[:, :, oy:oy + 32, ox:ox + 32]
        set_lr(opt, cosine_lr(step, total, 1e-3))
        z = enc(x)
        noise_std = 0.05 if step < 0.7 * total else 0.02
        zn = z + noise_std * torch.randn(z.shape, generator=g)
        y = dec(zn)
        loss = F.mse_loss(y, x) + 0.2 * F.l1_loss(y, x) + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == total - 1:
            log(f"vae step {step}/{total} loss {loss.item():.5f} psnr {psnr(y.clamp(0, 1), x):.2f}")
    # latent statistics -> vae_scale / vae_shift
    with torch.no_grad():
        zs = torch.cat([enc(imgs[i:i + 256]) for i in range(0, min(pool_n, 2048), 256)])
        mu, sd = float(zs.mean()), float(zs.std())
        scale_factor, shift_factor = sd_latent_factors()
        vae_scale = scale_factor * sd
        vae_shift = shift_factor - mu / vae_scale
        m.vae_scale.data.fill_(vae_scale)
        m.vae_shift.data.fill_(vae_shift)
    log(f"vae: raw latent mean {mu:.4f} std {sd:.4f} -> vae_scale {vae_scale:.4f} vae_shift {vae_shift:.4f}")
    return m, {"steps_32px_batch32": steps32, "steps_64px_batch16": steps64, "seed": seed,
               "pool_images": pool_n, "raw_latent_mean": mu, "raw_latent_std": sd,
               "vae_scale": vae_scale, "vae_shift": vae_shift, "wall_s": time.time() - t0}


def sd_latent_factors():
    import comfy.latent_formats
    lf = comfy.latent_formats.SD3()
    return lf.scale_factor, lf.shift_factor


def vae_psnr(m, n=256, seed=12345, half=False):
    """Round trip through TAESD.encode/decode exactly as ComfyUI's VAE calls them."""
    imgs, _ = W.sample_world(n, seed)
    mm = m
    if half:
        mm = new_taesd()
        mm.load_state_dict({k: v.half().float() for k, v in m.state_dict().items()})
    with torch.no_grad():
        out = []
        for i in range(0, n, 64):
            x = imgs[i:i + 64]
            z = mm.encode(x * 2 - 1)
            out.append(((mm.decode(z) + 1) / 2).clamp(0, 1))
        out = torch.cat(out)
    return psnr(out, imgs), out, imgs


# ---------------------------------------------------------------- flow models

def unet_config():
    return {
        "in_channels": LATENT_CHANNELS, "patch_size": 2, "out_channels": LATENT_CHANNELS,
        "depth": DEPTH, "input_size": None, "adm_in_channels": ADM_DIM,
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": CTX_DIM, "out_features": 64 * DEPTH}},
        "num_patches": POS_EMBED_MAX ** 2, "pos_embed_max_size": POS_EMBED_MAX,
        "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
    }


def sincos_2d(dim, grid):
    """Fixed 2-D sine/cosine position table (grid*grid, dim): half the channels per axis."""
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (np.arange(quarter, dtype=np.float64) / quarter))
    pos = np.arange(grid, dtype=np.float64)
    ang = pos[:, None] * freqs[None, :]                      # (grid, quarter)
    axis = np.concatenate([np.sin(ang), np.cos(ang)], axis=1)  # (grid, dim/2)
    yy, xx = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    table = np.concatenate([axis[yy.reshape(-1)], axis[xx.reshape(-1)]], axis=1)
    return torch.from_numpy(table).float()


def new_sd3_model():
    """A ComfyUI ``model_base.SD3`` built from the SD3 model config, freshly initialised."""
    import comfy.supported_models
    cfg = comfy.supported_models.SD3(unet_config())
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    dm = model.diffusion_model
    for name, mod in dm.named_modules():
        if isinstance(mod, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(mod.weight)
            if mod.bias is not None:
                torch.nn.init.zeros_(mod.bias)
        elif isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.xavier_uniform_(mod.weight.view(mod.weight.shape[0], -1))
            torch.nn.init.zeros_(mod.bias)
        elif isinstance(mod, torch.nn.LayerNorm) and mod.weight is not None:
            torch.nn.init.ones_(mod.weight)
            torch.nn.init.zeros_(mod.bias)
    for name, mod in dm.named_modules():
        if name.endswith("adaLN_modulation"):
            lin = mod[-1]
            torch.nn.init.zeros_(lin.weight)
            torch.nn.init.zeros_(lin.bias)
        if name.startswith("t_embedder.mlp") and isinstance(mod, torch.nn.Linear):
            torch.nn.init.normal_(mod.weight, std=0.02)
    torch.nn.init.zeros_(dm.final_layer.linear.weight)
    torch.nn.init.zeros_(dm.final_layer.linear.bias)
    dm.pos_embed.copy_(sincos_2d(dm.hidden_size, POS_EMBED_MAX).unsqueeze(0))
    return cfg, model


def encode_latents(vae, imgs, model):
    """Model-space latents: ComfyUI VAE.encode (TAESD) then the SD3 ``process_in``."""
    out = []
    with torch.no_grad():
        for i in range(0, len(imgs), 128):
            z = vae.encode(imgs[i:i + 128] * 2 - 1)
            out.append(model.process_latent_in(z))
    return torch.cat(out)


def _step_with_ema(opt, params, ema, loss, step, steps, lr, ema_decay):
    """One optimiser step of a diffusion model (cosine lr with warm-up, clipped gradients) and its EMA update
    (decay warmed up as (1 + step) / (10 + step))."""
    set_lr(opt, cosine_lr(step, steps, lr, warmup=100, final=0.1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    d = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema, params):
            e.lerp_(p.detach(), 1 - d)


def train_flow(domain, vae, steps, seed, n_images, batch=128, lr=6e-4, ema_decay=0.999):
    t0 = time.time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    cfg, model = new_sd3_model()
    imgs, _ = W.sample_domain(n_images, seed + 1, domain)
    imgs = torch.cat([imgs, imgs.flip(3)])           # the world is mirror symmetric
    lat = encode_latents(vae, imgs, model)
    log(f"flow {domain}: {len(lat)} latents {tuple(lat.shape[1:])} mean {lat.mean():.3f} "
        f"std {lat.std():.3f} in {time.time() - t0:.0f}s")
    ms = model.model_sampling
    dm = model.diffusion_model
    dm.train()
    params = [p for p in dm.parameters()]
    for p in params:
        p.requires_grad_(True)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    shift = ms.shift
    for step in range(steps):
        idx = torch.randint(0, len(lat), (batch,), generator=g)
        x0 = lat[idx]
        n = torch.randn(x0.shape, generator=g)
        # sigma: half from the sampling schedule's time warp (shift 3 on uniform t),
        # half logit-normal in t, warped the same way
        u = torch.rand(batch, generator=g)
        ln = torch.sigmoid(torch.randn(batch, generator=g))
        t = torch.where(torch.rand(batch, generator=g) < 0.5, u, ln)
        sigma = (shift * t / (1 + (shift - 1) * t)).clamp(1e-3, 1.0)
        s4 = sigma.view(-1, 1, 1, 1)
        x = (1 - s4) * x0 + s4 * n                       # CONST noise_scaling
        L = CONTEXT_TOKENS[int(torch.randint(0, len(CONTEXT_TOKENS), (1,), generator=g))]
        ctx = torch.zeros(batch, L, CTX_DIM)
        pooled = torch.zeros(batch, ADM_DIM)
        denoised = model.apply_model(x, sigma, c_crossattn=ctx, y=pooled)
        v_err = (denoised - x0) / s4                      # = v_target - v_pred
        loss = v_err.pow(2).mean()
        _step_with_ema(opt, params, ema, loss, step, steps, lr, ema_decay)
        if step % 200 == 0 or step == steps - 1:
            log(f"flow {domain} step {step}/{steps} loss {loss.item():.4f}")
        if step % 50 == 49 and (WORK_DIR / "stop_flow").exists():
            log(f"flow {domain}: stop file found, ending after {step + 1} steps")
            steps = step + 1
            break
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    dm.eval()
    return model, {"domain": domain, "shapes": list(W.DOMAINS[domain]), "seed": seed,
                   "steps": steps, "batch": batch, "lr": lr, "ema_decay": ema_decay,
                   "train_images": int(len(lat)), "wall_s": time.time() - t0}


def checkpoint_state_dict(model, vae, half=True):
    sd = {}
    for k, v in model.diffusion_model.state_dict().items():
        sd["model.diffusion_model." + k] = v
    for k, v in vae.state_dict().items():
        sd["first_stage_model." + k] = v
    out = {}
    for k, v in sd.items():
        v = v.detach().contiguous()
        if half and v.dtype == torch.float32 and v.dim() > 0 and not k.endswith("pos_embed"):
            v = v.half()
        out[k] = v.contiguous()
    return out


def save_checkpoint(model, vae, domain, info):
    from safetensors.torch import save_file
    CKPT_DIR.mkdir(parents=True, exist_ok=True)
    path = CKPT_DIR / CKPT_NAMES[domain]
    meta = {"dpm_latent_demo": json.dumps({
        "domain": domain, "shapes": list(W.DOMAINS[domain]), "image_size": W.SIZE,
        "latent": [LATENT_CHANNELS, W.SIZE // 8, W.SIZE // 8],
        "context_shape": [1, 1, CTX_DIM], "pooled_shape": [1, ADM_DIM],
        "trained_context_tokens": list(CONTEXT_TOKENS), "seed": info["seed"], "steps": info["steps"]}),
        "license": "GPL-3.0-or-later"}
    save_file(checkpoint_state_dict(model, vae), str(path), metadata=meta)
    return path


# ---------------------------------------------------------------- CLIP

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
CLIP_IMAGE_SIZE = 32
CLIP_MEAN = [0.5, 0.5, 0.5]
CLIP_STD = [0.25, 0.25, 0.25]


def clip_vocab():
    words = ["a", "an", "the", "photo", "of", "image", "picture", "shape", "shapes", "and", "on",
             "background", "grey", "gray", "plain", "colour", "color", "coloured", "colored",
             "circle", "square", "triangle", "circles", "squares", "triangles", "disc", "box",
             "round", "red", "green", "blue", "yellow"]
    return SPECIALS + sorted(set(words) - set(SPECIALS), key=words.index)


def build_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(clip_vocab())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>",
        special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=16,
                                   padding_side="right")


def build_clip(seed):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(seed)
    vocab = clip_vocab()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3),
        vision_config=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                           num_attention_heads=3, image_size=CLIP_IMAGE_SIZE, patch_size=4,
                           num_channels=3),
        projection_dim=64)
    return CLIPModel(cfg)


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) images in [0, 1] -> CLIP pixel_values, differentiably (torch resize + normalise)."""
    x = F.interpolate(images, size=(CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE), mode="bilinear",
                      antialias=True, align_corners=False)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def prompt_sets():
    full = [W.caption(s, c) for s in W.SHAPES for c in W.COLOURS]
    colour = [f"a {c} shape" for c in W.COLOURS]
    shape = [f"a {s}" for s in W.SHAPES]
    return full, colour, shape


def text_features(model, tokenizer, prompts):
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    f = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    f = getattr(f, "pooler_output", f)
    return F.normalize(f, dim=-1)


def image_features(model, images):
    f = model.get_image_features(pixel_values=clip_pixels(images))
    f = getattr(f, "pooler_output", f)
    return F.normalize(f, dim=-1)


def augment(x, g):
    """Robustness to imperfect decoder/model outputs: noise, blur, small colour shifts."""
    n = x.shape[0]
    x = x + 0.04 * torch.rand(n, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    x = x + 0.05 * torch.randn(n, 3, 1, 1, generator=g)
    blur = torch.rand(n, generator=g) < 0.3
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :]) / 16
        xb = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
        x = torch.where(blur.view(-1, 1, 1, 1), xb, x)
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    return x.clamp(0, 1)


def clip_zero_shot(model, tokenizer, imgs, attrs):
    full, colour, shape = prompt_sets()
    with torch.no_grad():
        fi = image_features(model, imgs)
        pf = (fi @ text_features(model, tokenizer, full).T).argmax(1)
        pc = (fi @ text_features(model, tokenizer, colour).T).argmax(1)
        ps = (fi @ text_features(model, tokenizer, shape).T).argmax(1)
    nC = len(W.COLOURS)
    ci = torch.tensor([W.COLOURS.index(a["colour"]) for a in attrs])
    si = torch.tensor([W.SHAPES.index(a["shape"]) for a in attrs])
    return {"full_caption_exact": float(((pf // nC == si) & (pf % nC == ci)).float().mean()),
            "colour_via_full_captions": float((pf % nC == ci).float().mean()),
            "shape_via_full_captions": float((pf // nC == si).float().mean()),
            "colour_via_colour_prompts": float((pc == ci).float().mean()),
            "shape_via_shape_prompts": float((ps == si).float().mean())}


def train_clip(steps, seed, pool_n, batch=192, lr=1e-3):
    t0 = time.time()
    g = torch.Generator().manual_seed(seed)
    imgs, attrs = W.sample_world(pool_n, seed + 1)
    ci = torch.tensor([W.COLOURS.index(a["colour"]) for a in attrs])
    si = torch.tensor([W.SHAPES.index(a["shape"]) for a in attrs])
    nC = len(W.COLOURS)
    tokenizer = build_tokenizer()
    model = build_clip(seed)
    model.train()
    full, colour, shape = prompt_sets()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    for step in range(steps):
        idx = torch.randint(0, pool_n, (batch,), generator=g)
        x = augment(imgs[idx], g)
        fi = image_features(model, x)
        scale = model.logit_scale.exp().clamp(max=100)
        tf_full = text_features(model, tokenizer, full)
        tf_col = text_features(model, tokenizer, colour)
        tf_shp = text_features(model, tokenizer, shape)
        target_full = si[idx] * nC + ci[idx]
        lf = scale * fi @ tf_full.T
        loss = F.cross_entropy(lf, target_full)
        # text -> image direction: each caption against the images of the batch
        onehot = F.one_hot(target_full, len(full)).float().T      # (captions, batch)
        present = onehot.sum(1) > 0
        lt = lf.T[present]
        logp = lt.log_softmax(1)
        loss = loss + (-(onehot[present] * logp).sum(1) / onehot[present].sum(1)).mean()
        loss = loss + F.cross_entropy(scale * fi @ tf_col.T, ci[idx])
        loss = loss + F.cross_entropy(scale * fi @ tf_shp.T, si[idx])
        set_lr(opt, cosine_lr(step, steps, lr, warmup=50))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"clip step {step}/{steps} loss {loss.item():.4f} scale {float(scale):.1f}")
    model.eval()
    test_imgs, test_attrs = W.sample_world(600, 777)
    acc = clip_zero_shot(model, tokenizer, test_imgs, test_attrs)
    log(f"clip zero-shot: {acc}")
    CLIP_DIR.mkdir(parents=True, exist_ok=True)
    model.half()
    model.save_pretrained(str(CLIP_DIR), safe_serialization=True)
    model.float()
    tokenizer.save_pretrained(str(CLIP_DIR))
    pre = {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
           "size": {"shortest_edge": CLIP_IMAGE_SIZE}, "do_center_crop": True,
           "crop_size": {"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_convert_rgb": True, "resample": 2}
    (CLIP_DIR / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    # re-measure from the saved (fp16) files, loaded as fp32
    from transformers import AutoTokenizer, CLIPModel
    m2 = CLIPModel.from_pretrained(str(CLIP_DIR), dtype=torch.float32)
    t2 = AutoTokenizer.from_pretrained(str(CLIP_DIR))
    acc_saved = clip_zero_shot(m2, t2, test_imgs, test_attrs)
    log(f"clip zero-shot from saved fp16: {acc_saved}")
    return {"seed": seed, "steps": steps, "batch": batch, "lr": lr, "pool_images": pool_n,
            "image_size": CLIP_IMAGE_SIZE, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
            "zero_shot_600_fp32": acc, "zero_shot_600_saved": acc_saved,
            "wall_s": time.time() - t0}


# ---------------------------------------------------------------- verification through ComfyUI

def zero_conditioning(tokens=1):
    return [[torch.zeros(1, tokens, CTX_DIM), {"pooled_output": torch.zeros(1, ADM_DIM)}]]


def sample_checkpoint(path, n=64, seed=0, steps=20, tokens=1):
    import comfy.sample
    import comfy.sd
    model, _, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=False)[:4]
    latent = torch.zeros(n, LATENT_CHANNELS, W.SIZE // 8, W.SIZE // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    cond = zero_conditioning(tokens)
    with torch.no_grad():
        samples = comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond, cond,
                                      latent, disable_pbar=True, seed=seed)
        images = vae.decode(samples)
    return model, vae, images


def verify(results):
    out = {}
    for domain in ("A", "B"):
        path = CKPT_DIR / CKPT_NAMES[domain]
        if not path.exists():
            continue
        t0 = time.time()
        model, vae, images = sample_checkpoint(path)
        attrs = W.read_attributes(images)
        want = W.DOMAINS[domain][0]
        summ = W.summarize(attrs)
        ms = model.model.model_sampling
        info = {"model_class": type(model.model).__name__, "model_type": str(model.model.model_type),
                "model_sampling": type(ms).__name__, "shift": float(ms.shift),
                "unet_dtype": str(model.model.get_dtype()),
                "vae_class": type(vae.first_stage_model).__name__,
                "vae_latent_channels": vae.latent_channels,
                "samples": len(attrs), "sampler": "euler/simple/20 steps/cfg 1",
                "domain_shape_rate": summ["shape"][want], "shape_hist": summ["shape"],
                "colour_hist": summ["colour"],
                "colours_present": sum(v > 0 for v in summ["colour"].values()),
                "mean_colour_distance": float(np.mean([a["colour_distance"] for a in attrs
                                                       if a["colour"] is not None] or [float("nan")])),
                "mean_size": float(np.nanmean([a["size"] for a in attrs])),
                "cx_std": float(np.nanstd([a["cx"] for a in attrs])),
                "cy_std": float(np.nanstd([a["cy"] for a in attrs]))}
        # other token counts give the same kind of samples
        _, _, im4 = sample_checkpoint(path, n=32, seed=1, tokens=4)
        info["domain_shape_rate_4_context_tokens"] = W.summarize(W.read_attributes(im4))["shape"][want]
        # VAE round trip through ComfyUI's VAE object
        imgs, _ = W.sample_world(128, 4242)
        with torch.no_grad():
            rec = vae.decode(vae.encode(imgs.permute(0, 2, 3, 1)))
        info["vae_roundtrip_psnr_comfy"] = psnr(rec.permute(0, 3, 1, 2), imgs)
        try:   # the CLIP energy model agrees with the readers on generated images?
            from transformers import AutoTokenizer, CLIPModel
            cm = CLIPModel.from_pretrained(str(CLIP_DIR), dtype=torch.float32).eval()
            ct = AutoTokenizer.from_pretrained(str(CLIP_DIR))
            keep = [i for i, a in enumerate(attrs) if a["colour"] is not None]
            if keep:
                acc = clip_zero_shot(cm, ct, images.permute(0, 3, 1, 2)[keep].contiguous(),
                                     [attrs[i] for i in keep])
                info["clip_vs_readers_on_samples"] = acc
        except Exception as e:  # pragma: no cover
            log("clip check skipped:", e)
        info["wall_s"] = time.time() - t0
        out[domain] = info
        try:
            from PIL import Image
            grid = images[:64].reshape(8, 8, W.SIZE, W.SIZE, 3).permute(0, 2, 1, 3, 4).reshape(8 * W.SIZE, 8 * W.SIZE, 3)
            WORK_DIR.mkdir(parents=True, exist_ok=True)
            Image.fromarray((grid.numpy() * 255).round().astype(np.uint8)).save(WORK_DIR / f"samples_{domain}.png")
        except Exception as e:  # pragma: no cover
            log("grid save failed", e)
        log(f"verify {domain}: {json.dumps(info)}")
    results["verify"] = out
    sizes = {str(p.relative_to(MODELS)): p.stat().st_size for p in MODELS.rglob("*")
             if p.is_file() and ".work" not in p.parts}
    results["files_bytes"] = sizes
    results["total_bytes"] = sum(sizes.values())


# ---------------------------------------------------------------- pixel-space DDPMs (diffusers)

DDPM_DIR = MODELS / "diffusers"
DDPM_NAMES = {"A": "dpm_world_ddpm_circles", "B": "dpm_world_ddpm_squares"}
DDPM_SIZE = 32            # the world's 64x64 images, 2x2 area-downsampled


def ddpm_unet(seed):
    """A small diffusers ``UNet2DModel`` for 32x32 RGB: 3 resolutions (16, 32, 64 channels), no attention."""
    from diffusers import UNet2DModel
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=DDPM_SIZE, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32, 64), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"))


def ddpm_scheduler():
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                         beta_end=0.02, prediction_type="epsilon", clip_sample=True)


def ddpm_images(n, seed, domain):
    """Domain images at DDPM_SIZE in [-1, 1] (area downsampling of the 64x64 renders)."""
    imgs, _ = W.sample_domain(n, seed, domain)
    return F.avg_pool2d(imgs, W.SIZE // DDPM_SIZE) * 2 - 1


def ddpm_sample_check(unet, sched_config, n=64, seed=0, steps=50):
    """Sample with diffusers' DDIM (eta 0) and read the attributes at 64x64."""
    from diffusers import DDIMScheduler
    sch = DDIMScheduler.from_config(sched_config)
    sch.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, DDPM_SIZE, DDPM_SIZE, generator=g)
    with torch.no_grad():
        for t in sch.timesteps:
            x = sch.step(unet(x, t).sample, t, x).prev_sample
    img = F.interpolate(((x + 1) / 2).clamp(0, 1), size=(W.SIZE, W.SIZE), mode="bilinear",
                        align_corners=False)
    return W.read_attributes(img), img


def train_ddpm(domain, steps, seed, n_images, batch=32, lr=2e-3, ema_decay=0.999, stop_after=None):
    """Standard DDPM training (epsilon MSE, uniform t) of a diffusers UNet2DModel on one domain.

    The learning rate follows a cosine over ``steps``; ``stop_after`` ends the run earlier on the
    same schedule (what a stop file does by hand, reproducibly)."""
    t0 = time.time()
    steps_planned = steps
    g = torch.Generator().manual_seed(seed)
    unet = ddpm_unet(seed)
    sched = ddpm_scheduler()
    data = ddpm_images(n_images, seed + 1, domain)
    data = torch.cat([data, data.flip(3)])
    abar = sched.alphas_cumprod
    log(f"ddpm {domain}: {len(data)} images {tuple(data.shape[1:])}, "
        f"{sum(p.numel() for p in unet.parameters())} parameters, in {time.time() - t0:.0f}s")
    params = list(unet.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    unet.train()
    for step in range(steps):
        x0 = data[torch.randint(0, len(data), (batch,), generator=g)]
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(unet(xt, t).sample, eps)
        _step_with_ema(opt, params, ema, loss, step, steps, lr, ema_decay)
        if step % 100 == 0 or step == steps - 1:
            log(f"ddpm {domain} step {step}/{steps} loss {loss.item():.4f}")
        if stop_after is not None and step + 1 >= stop_after:
            log(f"ddpm {domain}: stopping after {step + 1} of {steps} steps (--ddpm-stop-after)")
            steps_planned, steps = steps, step + 1
            break
        if step % 50 == 49 and (WORK_DIR / "stop_ddpm").exists():
            log(f"ddpm {domain}: stop file found, ending after {step + 1} of {steps} steps")
            steps_planned, steps = steps, step + 1
            break
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    unet.eval()
    wall = time.time() - t0
    return unet, sched, {"domain": domain, "shapes": list(W.DOMAINS[domain]), "seed": seed,
                         "steps": steps, "lr_schedule_steps": steps_planned, "batch": batch, "lr": lr,
                         "ema_decay": ema_decay, "train_images": int(len(data)), "image_size": DDPM_SIZE,
                         "wall_s": wall}


def save_ddpm(unet, sched, domain):
    """Save as a diffusers DDPMPipeline folder (model_index.json, unet/, scheduler/), fp16 weights."""
    from diffusers import DDPMPipeline
    out = DDPM_DIR / DDPM_NAMES[domain]
    unet = unet.to(torch.float16)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(str(out), safe_serialization=True)
    unet.to(torch.float32)
    return out


def ddpm_part(domain, args, common):
    steps = 60 if args.quick else args.ddpm_steps
    n_images = 300 if args.quick else args.ddpm_images
    off = {"A": 500, "B": 600}[domain]
    unet, sched, info = train_ddpm(domain, steps, args.seed + off, n_images, stop_after=args.ddpm_stop_after)
    out = save_ddpm(unet, sched, domain)
    from diffusers import UNet2DModel
    saved = UNet2DModel.from_pretrained(str(out / "unet"), use_safetensors=True,
                                        torch_dtype=torch.float32).eval()
    attrs, img = ddpm_sample_check(saved, sched.config)
    want = W.DOMAINS[domain][0]
    summ = W.summarize(attrs)
    info.update({"sampler_check": "diffusers DDIM eta 0, 50 steps, 64 samples, fp16 weights",
                 "domain_shape_rate": summ["shape"][want], "shape_hist": summ["shape"],
                 "colour_hist": summ["colour"],
                 "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()), **common})
    log(f"ddpm {domain}: {json.dumps(info)}")
    try:
        from PIL import Image
        grid = img[:64].permute(0, 2, 3, 1).reshape(8, 8, W.SIZE, W.SIZE, 3).permute(0, 2, 1, 3, 4)
        WORK_DIR.mkdir(parents=True, exist_ok=True)
        Image.fromarray((grid.reshape(8 * W.SIZE, 8 * W.SIZE, 3).numpy() * 255).round()
                        .astype(np.uint8)).save(WORK_DIR / f"ddpm_samples_{domain}.png")
    except Exception as e:  # pragma: no cover
        log("grid save failed", e)
    save_part(f"ddpm_{domain}", info)


# ---------------------------------------------------------------- Asyrp directions (h-space)

ASYRP_DIR = MODELS / "asyrp"
# One direction per h-space the demo measures: a pixel U-Net DDPM's and the SD3-layout flow model's
# (h = image tokens of the middle joint block), both trained with Asyrp Train Direction's defaults;
# held-out images are never trained on.
ASYRP_RUNS = {
    # DDPM: Asyrp Train Direction's defaults (the paper's recipe; 20 steps, not 40) on 8 red circles, at h_site
    # "after first up block": the paper's middle block of this tiny U-Net carries layout, not colour (docs/asyrp.md).
    "ddpm": {"file": "dpm_world_ddpm_red_to_blue", "loader": "diffusers", "model": "dpm_world_ddpm_circles",
             "domain": "A", "shape": "circle", "steps": 20, "t_edit": 0.5, "iterations": 5,
             "learning_rate": 0.5, "l1_weight": 3.0, "n_train": 8, "h_site": "after first up block"},
    # flow: Asyrp Train Direction's own defaults, 20 steps (the paper's recipe: lr 0.5, l1 3 x text cosine against the
    # source chain, StepLR, 5 iterations, t_edit 0.5) on 8 training images. It does not turn squares blue: this
    # model's P_t decodes to a yellow blob until late in the chain, so directional CLIP on P_t cannot see the
    # edit (docs/asyrp.md, "What the demo measures").
    "flow": {"file": "dpm_world_flow_red_to_blue", "loader": "checkpoint", "model": "dpm_world_squares.safetensors",
             "domain": "B", "shape": "square", "steps": 20, "t_edit": 0.5, "iterations": 5,
             "learning_rate": 0.5, "l1_weight": 3.0, "n_train": 8},
}
ASYRP_SUFFIX = ".asyrp.safetensors"  # samplers/asyrp_format.py SUFFIX


def _pack(comfyui=None):
    """The pack imported as ComfyUI imports it (dpmtools.comfy_env), on the CPU in fp32, plus the demo's
    model folders."""
    setup_comfy(comfyui)
    import importlib

    from dpmtools import comfy_env
    comfy_env.import_pack()
    import folder_paths
    folder_paths.add_model_folder_path("clip_energy", str(MODELS / "clip_energy"))
    folder_paths.add_model_folder_path("diffusers", str(DDPM_DIR))
    mods = {k: importlib.import_module(f"dpm_latent.nodes.{k}") for k in ("asyrp", "latent_codes", "diffusers_ddpm")}
    mods["asyrp_format"] = importlib.import_module("dpm_latent.samplers.asyrp_format")
    return mods


def asyrp_model(run, nodes):
    """(MODEL, VAE, image -> model input resize) of a demo Asyrp run, loaded by ComfyUI / the pack."""
    if run["loader"] == "diffusers":
        model, vae = nodes["diffusers_ddpm"].LoadDiffusersDDPM.execute(run["model"]).result
        return model, vae, lambda imgs: F.avg_pool2d(imgs, W.SIZE // DDPM_SIZE)
    import comfy.sd
    model, _clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(CKPT_DIR / run["model"]), output_vae=True,
                                                                 output_clip=False)
    return model, vae, lambda imgs: imgs


# The random controls of a trained direction (the paper's robustness claim): a Gaussian delta_h over the whole
# h at the direction's own norm per step, and one at 0.2 ||h|| (samplers/asyrp.gaussian_control).
ASYRP_CONTROLS = {"gauss_norm": None, "gauss_0.2": 0.2}


def write_asyrp_controls(which, FMT, direction=None, seed=None):
    """The Gaussian controls of a trained direction, ``<file>_<control>.asyrp.safetensors``; from the saved
    direction and the seed its part recorded when they are not given (``--parts asyrp_controls``)."""
    from dpm_latent.samplers.asyrp import gaussian_control

    run = ASYRP_RUNS[which]
    if direction is None:
        direction = FMT.load_direction(ASYRP_DIR / (run["file"] + ASYRP_SUFFIX))
        seed = json.loads((WORK_DIR / f"part_asyrp_{which}.json").read_text())["seed"]
    for old in list(ASYRP_DIR.glob(run["file"] + "_random*" + ASYRP_SUFFIX)) + \
            list(ASYRP_DIR.glob(run["file"] + "_gauss*" + ASYRP_SUFFIX)):
        old.unlink()
    for k, (name, rel) in enumerate(ASYRP_CONTROLS.items()):
        FMT.save_direction(gaussian_control(direction, seed + k, rel), ASYRP_DIR / f"{run['file']}_{name}{ASYRP_SUFFIX}")


def asyrp_part(which, args, common):
    run = ASYRP_RUNS[which]
    nodes = _pack(args.comfyui)
    AN, CY, FMT = nodes["asyrp"], nodes["latent_codes"], nodes["asyrp_format"]
    t0 = time.time()
    model, vae, resize = asyrp_model(run, nodes)
    seed = args.seed + {"ddpm": 700, "flow": 800}[which]
    # red shapes only: the edit is "a red <shape>" -> "a blue <shape>"
    train, _ = W.sample_world(run["n_train"], seed, (run["shape"],), ("red",))
    held, _ = W.sample_world(16, seed + 1, (run["shape"],), ("red",))
    with torch.inference_mode():
        lat = {"samples": vae.encode(resize(train).permute(0, 2, 3, 1))}
        val = {"samples": vae.encode(resize(held).permute(0, 2, 3, 1))}
        cond = CY.EmptyConditioning.execute(model, 1).result[0]
    src, trg = f"a red {run['shape']}", f"a blue {run['shape']}"
    direction, _plot = AN.AsyrpTrainDirection.execute(
        model, vae, lat, "dpm_world_clip", src, trg, run["steps"], run["t_edit"], run["iterations"],
        run["learning_rate"], 1.0, run["l1_weight"], 0, "implicit function", conditioning=cond,
        validation_latents=val, h_site=run.get("h_site", "middle")).result
    wall = time.time() - t0
    ASYRP_DIR.mkdir(parents=True, exist_ok=True)
    FMT.save_direction(direction, ASYRP_DIR / (run["file"] + ASYRP_SUFFIX))
    write_asyrp_controls(which, FMT, direction, seed)
    m = direction.meta
    info = {**{k: v for k, v in run.items()}, "seed": seed, "source_text": src, "target_text": trg,
            "h_site": m["h_site"], "h_shape": m["h_shape"], "held_out_images": 16,
            "held_out_clip_loss_before": m["held_out_clip_loss_before"],
            "held_out_clip_loss_after": m["held_out_clip_loss_after"], "loss_curve": m["loss_curve"],
            "delta_over_h": m["delta_over_h"], "h_norm": m["h_norm"], "text_cosine": m["text_cosine"],
            "wall_s": wall, **common}
    log(f"asyrp {which}: {json.dumps(info)}")
    save_part(f"asyrp_{which}", info)


# ---------------------------------------------------------------- video flow models (the world in motion)
#
# Two unconditional rectified-flow models in ComfyUI's Wan 2.1 layout, A on clips of moving circles, B on
# moving squares; the video VAE is the world's image VAE per frame (demo/video.py says why that is
# equivalent here).  The model, the VAE and the latent conventions live in demo/video.py, which the demo
# job shares.


def _video():
    return load_module("dpm_latent_demo_video", HERE / "video.py")


def clip_quality(clips, domain):
    """Per-frame shape rate of the domain's shape, colour constancy and line fit of unguided clips."""
    want = W.DOMAINS[domain][0]
    reads = W.read_clips(clips)
    shape_rate = float(np.mean([[f["shape"] == want for f in r] for r in reads]))
    const_colour = float(np.mean([len({f["colour"] for f in r}) == 1 for r in reads]))
    res = []
    for r in reads:
        cx = np.array([f["cx"] for f in r])
        cy = np.array([f["cy"] for f in r])
        if np.isnan(cx).any():
            continue
        tt = np.arange(len(r))
        for c in (cx, cy):
            p = np.polyfit(tt, c, 1)
            res.append(float(np.abs(np.polyval(p, tt) - c).mean()))
    return {"frame_shape_rate": shape_rate, "constant_colour_rate": const_colour,
            "line_fit_error_px": float(np.mean(res)) if res else float("nan"), "n": len(reads)}


def train_video(domain, vae, steps, seed, n_clips, batch=16, lr=8e-4, ema_decay=0.999):
    t0 = time.time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    V = _video()
    cfg, model = V.new_model()
    clips, _ = W.sample_clip_domain(n_clips, seed + 1, domain)
    lat = V.encode_clips(vae, clips)                 # 0.05 s of CPU a frame: the clip count is the budget
    del clips
    lat = torch.cat([lat, lat.flip(2)])              # time reversal (exact on per-frame latents): also a straight line
    log(f"video {domain}: {len(lat)} latents {tuple(lat.shape[1:])} mean {lat.mean():.3f} "
        f"std {lat.std():.3f} in {time.time() - t0:.0f}s")
    dm = model.diffusion_model
    dm.train()
    params = [p for p in dm.parameters()]
    for p in params:
        p.requires_grad_(True)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    ctx = V.zero_context(batch)
    shift = V.SHIFT
    for step in range(steps):
        idx = torch.randint(0, len(lat), (batch,), generator=g)
        x0 = lat[idx]
        n = torch.randn(x0.shape, generator=g)
        u = torch.rand(batch, generator=g)
        ln = torch.sigmoid(torch.randn(batch, generator=g))
        t = torch.where(torch.rand(batch, generator=g) < 0.5, u, ln)
        sigma = (shift * t / (1 + (shift - 1) * t)).clamp(1e-3, 1.0)
        s5 = sigma.view(-1, 1, 1, 1, 1)
        x = (1 - s5) * x0 + s5 * n
        denoised = model.apply_model(x, sigma, c_crossattn=ctx)
        loss = ((denoised - x0) / s5).pow(2).mean()
        _step_with_ema(opt, params, ema, loss, step, steps, lr, ema_decay)
        if step % 100 == 0 or step == steps - 1:
            log(f"video {domain} step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if step % 250 == 249 or (step % 50 == 49 and (WORK_DIR / "stop_video").exists()):
            torch.save({"ema": [e.clone() for e in ema], "step": step + 1}, WORK_DIR / f"video_{domain}_ema.pt")
            if (WORK_DIR / "stop_video").exists():
                log(f"video {domain}: stop file found, ending after {step + 1} steps")
                steps = step + 1
                break
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    dm.eval()
    for p in params:
        p.requires_grad_(False)
    return model, {"domain": domain, "shapes": list(W.DOMAINS[domain]), "seed": seed, "steps": steps,
                   "batch": batch, "lr": lr, "ema_decay": ema_decay, "frames": W.FRAMES,
                   "train_clips": int(len(lat)), "config": {k: list(v) if isinstance(v, tuple) else v
                                                           for k, v in V.unet_config().items()},
                   "params": int(sum(p.numel() for p in params)), "wall_s": time.time() - t0}


def save_video_model(model, domain, info):
    from safetensors.torch import save_file
    V = _video()
    V.VIDEO_DIR.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.half() if v.dtype == torch.float32 else v).contiguous()
          for k, v in model.diffusion_model.state_dict().items()}
    meta = {"dpm_latent_demo": json.dumps({
        "domain": domain, "shapes": list(W.DOMAINS[domain]), "frames": W.FRAMES, "image_size": W.SIZE,
        "latent": [LATENT_CHANNELS, W.FRAMES, W.SIZE // 8, W.SIZE // 8],
        "vae": "the world image VAE per frame (checkpoints/dpm_world_circles.safetensors), SD3 process_in",
        "context_shape": [1, 1, V.TEXT_DIM], "shift": V.SHIFT, "seed": info["seed"],
        "steps": info["steps"]}), "license": "GPL-3.0-or-later"}
    path = V.VIDEO_DIR / V.VIDEO_NAMES[domain]
    save_file(sd, str(path), metadata=meta)
    return path


def video_part(domain, args, common):
    V = _video()
    vae = V.world_vae()
    off = {"A": 500, "B": 600}[domain]
    model, info = train_video(domain, vae, args.video_steps, args.seed + off, args.video_clips)
    torch.save(model.diffusion_model.state_dict(), WORK_DIR / f"video_{domain}_fp32.pt")
    save_video_model(model, domain, info)
    t0 = time.time()
    model = V.load_model(domain)              # measure what ships (fp16 weights)
    lat = V.sample(model, 32, seed=7, frames=W.FRAMES)
    q = clip_quality(V.decode_clips(vae, lat), domain)
    info.update({"unguided_32_clips_euler_20": q, "check_wall_s": time.time() - t0,
                 "bytes": (V.VIDEO_DIR / V.VIDEO_NAMES[domain]).stat().st_size, **common})
    log(f"video {domain}: unguided {q}")
    save_part(f"video_{domain}", info)


# ---------------------------------------------------------------- main

def save_part(name, info):
    """Each part writes its own record (parts may run in parallel processes)."""
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    (WORK_DIR / f"part_{name}.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def merge_json(extra=None):
    """TRAINING.json = previous file, updated by every part record and ``extra``."""
    p = MODELS / "TRAINING.json"
    results = json.loads(p.read_text()) if p.exists() else {}
    results.setdefault("wall_s", {})
    for f in sorted(WORK_DIR.glob("part_*.json")):
        name = f.stem[len("part_"):]
        info = json.loads(f.read_text())
        results[name] = info
        if "wall_s" in info:
            results["wall_s"][name] = info["wall_s"]
    results.update(extra or {})
    p.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results


def run_parallel(args, ap, stages=None):
    """The default full run on two cores: (vae | clip), then (flow_a | flow_b), then verify.

    Each part runs in its own single-threaded process with the same options, so
    the result equals running the parts one by one with ``--parts``.
    """
    import subprocess
    base = [sys.executable, str(Path(__file__).resolve())]
    for name in ("comfyui", "seed", "threads", "vae_steps32", "vae_steps64", "flow_steps",
                 "flow_images", "clip_steps", "ddpm_steps", "ddpm_images", "ddpm_stop_after", "video_steps", "video_clips"):
        val = getattr(args, name)
        if val is not None and val != ap.get_default(name):
            base += ["--" + name.replace("_", "-"), str(val)]
    if args.quick:
        base.append("--quick")

    def stage(parts):
        procs = [subprocess.Popen(base + ["--parts", p]) for p in parts]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"parts {parts} failed: exit codes {codes}")

    t0 = time.time()
    if stages is not None:
        for parts in stages:
            stage(parts)
        merge_json()
        log(f"parts {stages} done in {time.time() - t0:.0f}s")
        return
    stage(["vae", "clip"])
    stage(["flow_a", "flow_b"])
    stage(["ddpm_a", "ddpm_b"])
    stage(["asyrp_ddpm", "asyrp_flow"])
    stage(["video_a", "video_b"])
    stage(["verify"])
    log(f"all parts done in {time.time() - t0:.0f}s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default=None)
    ap.add_argument("--parts", default="vae,flow_a,flow_b,clip,ddpm_a,ddpm_b,asyrp_ddpm,asyrp_flow,video_a,video_b,verify")
    ap.add_argument("--quick", action="store_true", help="short smoke-test training")
    ap.add_argument("--seed", type=int, default=20231)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is fastest on busy shared cores")
    ap.add_argument("--vae-steps32", type=int, default=1400)
    ap.add_argument("--vae-steps64", type=int, default=250)
    ap.add_argument("--flow-steps", type=int, default=3096)
    ap.add_argument("--flow-images", type=int, default=3000)
    ap.add_argument("--clip-steps", type=int, default=1500)
    ap.add_argument("--ddpm-steps", type=int, default=4000)
    ap.add_argument("--ddpm-images", type=int, default=1000)
    ap.add_argument("--video-steps", type=int, default=1200)
    ap.add_argument("--video-clips", type=int, default=300)
    ap.add_argument("--ddpm-stop-after", type=int, default=None,
                    help="end the DDPM runs after this many steps of the --ddpm-steps schedule")
    ap.add_argument("--serial", action="store_true",
                    help="run every part in this process instead of two worker processes")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.serial and args.parts == ap.get_default("parts"):
        return run_parallel(args, ap)
    if not args.serial and args.parts == "ddpm":
        return run_parallel(args, ap, stages=[["ddpm_a", "ddpm_b"]])
    if not args.serial and args.parts == "video":
        return run_parallel(args, ap, stages=[["video_a", "video_b"]])
    if not args.serial and args.parts == "asyrp":
        return run_parallel(args, ap, stages=[["asyrp_ddpm", "asyrp_flow"]])
    if args.quick:
        args.vae_steps32, args.vae_steps64 = 60, 10
        args.flow_steps, args.flow_images = 60, 300
        args.clip_steps = 40
        args.video_steps, args.video_clips = 30, 100
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    parts = [q for p in parts for q in (("ddpm_a", "ddpm_b") if p == "ddpm" else ("video_a", "video_b") if p == "video" else
                                         tuple(f"asyrp_{w}" for w in ASYRP_RUNS) if p == "asyrp" else (p,))]
    if any(not p.startswith(("ddpm_", "asyrp_")) for p in parts):   # (video_* need it too)   # these need no ComfyUI set-up here
        setup_comfy(args.comfyui)
    common = {"base_seed": args.seed, "quick": args.quick, "torch": torch.__version__,
              "threads": args.threads}
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    vae_path = WORK_DIR / "vae_fp32.pt"
    flow_paths = {d: WORK_DIR / f"flow_{d}_fp32.pt" for d in ("A", "B")}
    vae = None
    if "vae" in parts:
        vae, info = train_vae(args.vae_steps32, args.vae_steps64, args.seed + 100,
                              pool_n=800 if args.quick else 4000)
        p32, _, _ = vae_psnr(vae)
        p16, _, _ = vae_psnr(vae, half=True)
        info.update({"psnr_fp32_256_images": p32, "psnr_fp16_weights_256_images": p16, **common})
        log(f"vae psnr fp32 {p32:.2f} dB, fp16 weights {p16:.2f} dB")
        torch.save(vae.state_dict(), vae_path)
        save_part("vae", info)
    if vae is None and any(p in parts for p in ("flow_a", "flow_b", "repack")):
        vae = new_taesd()
        vae.load_state_dict(torch.load(vae_path))
    for domain, part, off in (("A", "flow_a", 200), ("B", "flow_b", 300)):
        if part not in parts:
            continue
        model, info = train_flow(domain, vae, args.flow_steps, args.seed + off,
                                 n_images=args.flow_images)
        info.update(common)
        torch.save(model.diffusion_model.state_dict(), flow_paths[domain])
        save_checkpoint(model, vae, domain, info)
        save_part(f"flow_{domain}", info)
    if "repack" in parts:        # rewrite the checkpoints from the saved fp32 weights
        for domain in ("A", "B"):
            _, model = new_sd3_model()
            model.diffusion_model.load_state_dict(torch.load(flow_paths[domain]))
            rec = json.loads((WORK_DIR / f"part_flow_{domain}.json").read_text())
            save_checkpoint(model, vae, domain, rec)
    for domain, part in (("A", "ddpm_a"), ("B", "ddpm_b")):
        if part in parts:
            ddpm_part(domain, args, common)
    for which in ASYRP_RUNS:
        if f"asyrp_{which}" in parts:
            asyrp_part(which, args, common)
    if "asyrp_controls" in parts:   # rewrite the random controls of the shipped directions, no training
        nodes = _pack(args.comfyui)
        for which in ASYRP_RUNS:
            write_asyrp_controls(which, nodes["asyrp_format"])
    for domain, part in (("A", "video_a"), ("B", "video_b")):
        if part in parts:
            video_part(domain, args, common)
    if "clip" in parts:
        info = train_clip(args.clip_steps, args.seed + 400, pool_n=1000 if args.quick else 4000)
        info.update(common)
        save_part("clip", info)
    if "verify" in parts:
        results = {}
        verify(results)
        merge_json(results)
    else:
        merge_json()
    log("done")


if __name__ == "__main__":
    main()
