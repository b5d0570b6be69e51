# SPDX-License-Identifier: GPL-3.0-or-later
"""The CLIP energy of plug-and-play latent-space guidance.

Wu & De la Torre (ICCV 2023) steer a diffusion model's Gaussian latent code
with the gradient of an energy on the decoded image.  The CLIP energy is::

    E_CLIP(x) = 1/L * sum_l ( 1 - cos( CLIP_img(T_l(x)), target ) )

where ``T_l`` are L random differentiable augmentations (``diffaug``) and
``target`` is the normalised CLIP embedding of a text prompt or of target
image(s).  ``1 - cos`` lies in [0, 2].

Everything here is torch + transformers + safetensors; the CLIP model is a
transformers ``CLIPModel`` folder on disk (``load_clip_folder``), loaded
from safetensors only and frozen.

Conventions
-----------
* Images are ``(B, 3, H, W)`` floats in [0, 1] on any device; they are moved
  to the CLIP model's device and the energy is returned on the images'
  device and dtype, shape ``(B,)``.
* Preprocessing is differentiable torch: the image is resized to the model's
  input size (``interpolate``, bicubic with antialiasing; by default the whole
  image is squashed to the square so that every pixel receives a gradient,
  or, with ``center_crop=True``, the shortest side is resized and the centre
  cropped, as CLIP's own processor does), augmented at that size, then
  normalised with the model's mean/std.  Augmenting after the resize makes
  L copies at CLIP resolution instead of L copies of a large decoded image.
* ``generator`` is a CPU ``torch.Generator`` that drives the augmentations;
  the same state gives the same energy.
* An energy object has ``weight`` (its lambda), ``unweighted(images, g)``,
  ``__call__(images, g) = weight * unweighted``, ``components(images, g)``
  (a list of ``(name, weighted (B,) tensor)`` whose sum is ``__call__``) and
  ``value_and_grad(images, g) -> (energy, d energy / d images)``, which for
  ``ClipEnergy`` can back-propagate chunk by chunk (``max_batch``) to bound
  the memory of the L * B CLIP passes.
"""
from __future__ import annotations

import collections
import copy
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .diffaug import POLICIES, PolicySpec, diff_augment, parse_policies

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_AUGMENTATIONS = 50

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class ClipFolderError(ValueError):
    """A CLIP model folder is missing, incomplete or unreadable."""


def _folder_help(folder: Union[str, Path]) -> str:
    return (
        f"Expected a transformers CLIPModel folder at {str(folder)!r} containing:\n"
        f"  - config.json (a CLIPConfig, model_type 'clip')\n"
        f"  - {WEIGHTS_FILE} (or sharded {WEIGHTS_INDEX_FILE} + shards); "
        f"pickled pytorch_model.bin is not loaded\n"
        f"  - tokenizer files: tokenizer.json, or vocab.json + merges.txt "
        f"(with tokenizer_config.json)\n"
        f"  - optional preprocessor_config.json (image_mean / image_std; "
        f"OpenAI CLIP values otherwise)\n"
        f"Make one with transformers:\n"
        f"  CLIPModel.from_pretrained(name).save_pretrained(folder)\n"
        f"  CLIPProcessor.from_pretrained(name).save_pretrained(folder)"
        f"  # tokenizer + preprocessor_config.json"
    )


def _fail(folder: Union[str, Path], problem: str) -> ClipFolderError:
    return ClipFolderError(f"{problem}\n{_folder_help(folder)}")


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise _fail(folder, f"CLIP folder {str(folder)!r} does not exist.")
    if not folder.is_dir():
        raise _fail(folder, f"CLIP folder {str(folder)!r} is not a directory.")
    config = folder / "config.json"
    if not config.is_file():
        raise _fail(folder, f"CLIP folder {str(folder)!r} has no config.json.")
    try:
        with open(config, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError) as exc:
        raise _fail(folder, f"config.json in {str(folder)!r} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict) or cfg.get("model_type") != "clip":
        kind = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise _fail(folder, f"config.json in {str(folder)!r} is not a CLIPModel config "
                            f"(model_type {kind!r}, expected 'clip').")
    if not ((folder / WEIGHTS_FILE).is_file() or (folder / WEIGHTS_INDEX_FILE).is_file()):
        pickled = [n for n in PICKLED_WEIGHTS if (folder / n).is_file()]
        extra = (f" Found {', '.join(pickled)}, which is a pickle and is refused; "
                 f"convert it to safetensors (load it once in a trusted environment and "
                 f"save_pretrained with safe_serialization).") if pickled else ""
        raise _fail(folder, f"CLIP folder {str(folder)!r} has no {WEIGHTS_FILE}.{extra}")
    has_tokenizer = (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
    if not has_tokenizer:
        raise _fail(folder, f"CLIP folder {str(folder)!r} has no tokenizer files "
                            f"(tokenizer.json or vocab.json + merges.txt).")


def _read_mean_std(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError) as exc:
        raise _fail(folder, f"preprocessor_config.json in {str(folder)!r} is not valid JSON: {exc}") from exc

    def triple(key: str, default: tuple[float, ...]) -> tuple[float, ...]:
        value = cfg.get(key) if isinstance(cfg, dict) else None
        if value is None:
            return default
        if isinstance(value, (int, float)):
            value = [value] * 3
        try:
            out = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            out = ()
        if len(out) != 3:
            raise _fail(folder, f"preprocessor_config.json in {str(folder)!r}: {key} must be "
                                f"three numbers, got {value!r}.")
        return out

    mean = triple("image_mean", OPENAI_CLIP_MEAN)
    std = triple("image_std", OPENAI_CLIP_STD)
    if any(s <= 0 for s in std):
        raise _fail(folder, f"preprocessor_config.json in {str(folder)!r}: image_std must be positive.")
    return mean, std


def _image_size(config: Any) -> tuple[int, int]:
    size = config.vision_config.image_size
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[-1])
    return int(size), int(size)


def _pooled(out: Any) -> torch.Tensor:
    """The pooled output of a CLIP tower, whatever container transformers returns."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        pooled = out[1]
    return pooled


@dataclass(eq=False)
class ClipBundle:
    """A frozen CLIPModel with its tokenizer and image preprocessing constants."""

    model: Any
    tokenizer: Any
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    dtype: torch.dtype
    folder: Optional[Path] = None
    _stats: dict = field(default_factory=dict, repr=False)

    @property
    def compute_dtype(self) -> torch.dtype:
        """Dtype of the pixel pipeline: float64 for a float64 model, else float32."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "ClipBundle":
        """This bundle on another device/dtype (through the cache when it came from a folder)."""
        device = torch.device(device) if device is not None else self.device
        dtype = dtype or self.dtype
        if device == self.device and dtype == self.dtype:
            return self
        if self.folder is not None:
            return load_clip_folder(self.folder, device=device, dtype=dtype)
        model = copy.deepcopy(self.model).to(device=device, dtype=dtype)
        return ClipBundle(model, self.tokenizer, self.image_size, self.mean, self.std,
                          device, dtype, None)

    def at(self, device) -> "ClipBundle":
        """This bundle with inputs sent to ``device``; shares the model and moves nothing.

        For a caller that manages where the model lives (ComfyUI's model management):
        it loads the model on ``device`` first, then evaluates through ``at(device)``."""
        device = torch.device(device)
        if device == self.device:
            return self
        return ClipBundle(self.model, self.tokenizer, self.image_size, self.mean, self.std,
                          device, self.dtype, self.folder)

    def _mean_std(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (str(device), dtype)
        if key not in self._stats:
            # cached for every later caller: made outside inference mode, or a first call from a node that
            # needs no gradient would hand inference tensors to a later one that trains through them
            with torch.inference_mode(False):
                mean = torch.tensor(self.mean, dtype=dtype, device=device).view(1, 3, 1, 1)
                std = torch.tensor(self.std, dtype=dtype, device=device).view(1, 3, 1, 1)
            self._stats[key] = (mean, std)
        return self._stats[key]

    def resize(self, images: torch.Tensor, center_crop: bool = False) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> model device, compute dtype, model input size (differentiable)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIP energy expects (B, 3, H, W) images, got shape {tuple(images.shape)}")
        x = images.to(device=self.device, dtype=self.compute_dtype)
        th, tw = self.image_size
        h, w = x.shape[-2:]
        if center_crop:
            s = max(th / h, tw / w)
            nh, nw = max(th, round(h * s)), max(tw, round(w * s))
        else:
            nh, nw = th, tw
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        if (nh, nw) != (th, tw):
            top, left = (nh - th) // 2, (nw - tw) // 2
            x = x[:, :, top:top + th, left:left + tw]
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._mean_std(x.device, x.dtype)
        return (x - mean) / std

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit CLIP image embeddings of normalised pixels ``(N, 3, S, S)`` -> ``(N, D)``."""
        out = self.model.vision_model(pixel_values=pixels.to(self.dtype))
        emb = self.model.visual_projection(_pooled(out))
        return F.normalize(emb.to(self.compute_dtype), dim=-1)

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit CLIP text embeddings ``(N, D)`` (no gradient)."""
        max_len = int(self.model.config.text_config.max_position_embeddings)
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < max_len:
            max_len = tok_max
        texts = list(texts)
        enc = self.tokenizer(texts, padding=len(texts) > 1, truncation=True, max_length=max_len,
                             return_tensors="pt")
        ids = enc["input_ids"].to(self.device)
        mask = enc.get("attention_mask")
        mask = mask.to(self.device) if mask is not None else None
        out = self.model.text_model(input_ids=ids, attention_mask=mask)
        emb = self.model.text_projection(_pooled(out))
        return F.normalize(emb.to(self.compute_dtype), dim=-1)


# ---------------------------------------------------------------- loading + cache

_CACHE_SIZE = 2
_cache: "collections.OrderedDict[tuple, ClipBundle]" = collections.OrderedDict()
_cache_lock = threading.Lock()


def _folder_stamp(folder: Path) -> tuple:
    stamp = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file():
            st = entry.stat()
            stamp.append((entry.name, st.st_mtime_ns, st.st_size))
    return tuple(stamp)


def clear_clip_cache() -> None:
    """Forget every cached CLIP model."""
    with _cache_lock:
        _cache.clear()


def load_clip_folder(folder: Union[str, os.PathLike], device=None,
                     dtype: torch.dtype = torch.float32) -> ClipBundle:
    """Load (or fetch from the cache) a frozen CLIPModel folder.

    ``folder`` holds a transformers ``CLIPModel`` saved with
    ``save_pretrained``: config.json, model.safetensors, tokenizer files and
    optionally preprocessor_config.json.  Only local files are read and only
    safetensors weights are accepted.  Raises ``ClipFolderError`` (a
    ``ValueError``) naming the folder and what it must contain.

    The result is cached on (absolute folder, file mtimes and sizes, device,
    dtype): loading the same unchanged folder again returns the same object.
    """
    path = Path(folder).expanduser().absolute()
    device = torch.device(device) if device is not None else torch.device("cpu")
    _check_folder(path)
    key = (str(path), _folder_stamp(path), str(device), dtype)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    mean, std = _read_mean_std(path)

    from transformers import AutoTokenizer, CLIPModel  # deferred: slow import

    try:
        model = CLIPModel.from_pretrained(str(path), use_safetensors=True, local_files_only=True)
    except Exception as exc:  # transformers raises many kinds; report them uniformly
        raise _fail(path, f"could not load the CLIP model in {str(path)!r}: "
                          f"{type(exc).__name__}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise _fail(path, f"could not load the tokenizer in {str(path)!r}: "
                          f"{type(exc).__name__}: {exc}") from exc
    model = model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    bundle = ClipBundle(model, tokenizer, _image_size(model.config), mean, std,
                        device, dtype, path)
    with _cache_lock:
        for old in [k for k in _cache if k[0] == key[0] and k[2:] == key[2:]]:
            del _cache[old]  # same folder/device/dtype, files changed since
        _cache[key] = bundle
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return bundle


# ---------------------------------------------------------------- energies

class ClipEnergy:
    """``weight * E_CLIP`` towards a text prompt or target image(s).

    ``bundle``: a ``ClipBundle`` from ``load_clip_folder``.
    ``text`` / ``image``: exactly one.  ``image`` is ``(B_t, 3, H, W)`` in
    [0, 1] (or ``(3, H, W)``): when called on a batch of the same size
    B = B_t > 1 each sample has its own target, otherwise the target is the
    normalised mean of the B_t unit embeddings.
    ``augmentations``: L >= 1 augmented copies per sample (paper: 50).  With
    no policy the copies would be identical, so one is used.
    ``policies``: augmentation names from ``diffaug.POLICIES`` (sequence or
    comma-separated string).
    ``weight``: lambda; ``__call__`` returns ``weight * unweighted``.
    ``max_batch``: at most this many images per CLIP call (``None``: all
    B * L at once).  ``value_and_grad`` also back-propagates per chunk, so
    its peak memory is that of ``max_batch`` CLIP passes.
    ``center_crop``: preprocessing (see the module docstring).
    """

    def __init__(self, bundle: ClipBundle, text: Optional[str] = None,
                 image: Optional[torch.Tensor] = None, *,
                 augmentations: int = DEFAULT_AUGMENTATIONS,
                 policies: PolicySpec = POLICIES,
                 weight: float = 1.0,
                 max_batch: Optional[int] = None,
                 center_crop: bool = False,
                 name: Optional[str] = None):
        if (text is None) == (image is None):
            raise ValueError("ClipEnergy needs exactly one target: pass text=... (a prompt) "
                             "or image=... (a (B, 3, H, W) tensor in [0, 1]), not "
                             + ("both" if text is not None else "neither"))
        if text is not None and not isinstance(text, str):
            raise ValueError(f"ClipEnergy text must be a str, got {type(text).__name__}")
        if image is not None and not isinstance(image, torch.Tensor):
            raise ValueError(f"ClipEnergy image must be a tensor, got {type(image).__name__}")
        if isinstance(augmentations, bool) or not isinstance(augmentations, int) or augmentations < 1:
            raise ValueError(f"augmentations must be an integer >= 1, got {augmentations!r}")
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"max_batch must be None or an integer >= 1, got {max_batch!r}")
        self.bundle = bundle
        self.text = text
        self.policies = parse_policies(policies)
        self.augmentations = augmentations
        self.weight = float(weight)
        self.max_batch = max_batch
        self.center_crop = bool(center_crop)
        self.name = name or ("clip_text" if text is not None else "clip_image")
        if text is not None:
            self.target = bundle.text_embeds([text])                    # (1, D)
        else:
            if image.dim() == 3:
                image = image.unsqueeze(0)
            with torch.no_grad():
                pixels = bundle.normalize(bundle.resize(image.detach(), self.center_crop))
                self.target = bundle.image_embeds(pixels)               # (B_t, D)
        self.target_mean = F.normalize(self.target.mean(dim=0, keepdim=True), dim=-1)

    # -- plumbing

    @property
    def copies(self) -> int:
        """Augmented copies actually evaluated per sample."""
        return self.augmentations if self.policies else 1

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "ClipEnergy":
        """Move the model (through the loader's cache) and the targets; returns self."""
        self.bundle = self.bundle.to(device, dtype)
        cd = self.bundle.compute_dtype
        self.target = self.target.to(device=self.bundle.device, dtype=cd)
        self.target_mean = self.target_mean.to(device=self.bundle.device, dtype=cd)
        return self

    def on_device(self, device) -> "ClipEnergy":
        """A shallow copy whose inputs and targets are on ``device``; ``self`` is left as it is.

        The model is shared and not moved (see ``ClipBundle.at``): energies are shared
        between callers (ComfyUI caches node outputs), so evaluation never mutates them."""
        device = torch.device(device)
        if device == self.bundle.device and self.target.device == device:
            return self
        out = copy.copy(self)
        out.bundle = self.bundle.at(device)
        out.target = self.target.to(device)
        out.target_mean = self.target_mean.to(device)
        return out

    def _targets(self, b: int) -> torch.Tensor:
        """(B, D) targets for a batch of B images."""
        if self.target.shape[0] > 1 and self.target.shape[0] == b:
            return self.target
        return self.target_mean.expand(b, -1)

    def _augmented(self, images: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Normalised CLIP inputs of the L copies, ``(B * L, 3, S, S)``, sample-major."""
        x = self.bundle.resize(images, self.center_crop)
        b, c, h, w = x.shape
        n = self.copies
        if n > 1:
            x = x.unsqueeze(1).expand(b, n, c, h, w).reshape(b * n, c, h, w)
        x = diff_augment(x, self.policies, generator)
        return self.bundle.normalize(x)

    def _cos_losses(self, pixels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``1 - cos`` per row, in chunks of ``max_batch``."""
        step = self.max_batch or pixels.shape[0]
        parts = []
        for i in range(0, pixels.shape[0], step):
            emb = self.bundle.image_embeds(pixels[i:i + step])
            parts.append(1.0 - (emb * targets[i:i + step]).sum(dim=-1))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    # -- energy API

    def unweighted(self, images: torch.Tensor,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """E_CLIP per sample, ``(B,)`` on the images' device and dtype, in [0, 2]."""
        b = images.shape[0]
        pixels = self._augmented(images, generator)
        targets = self._targets(b).repeat_interleave(self.copies, dim=0)
        losses = self._cos_losses(pixels, targets)
        energy = losses.view(b, self.copies).mean(dim=1)
        return energy.to(device=images.device, dtype=images.dtype)

    def __call__(self, images: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.weight * self.unweighted(images, generator)

    def components(self, images: torch.Tensor,
                   generator: Optional[torch.Generator] = None) -> list[tuple[str, torch.Tensor]]:
        return [(self.name, self(images, generator))]

    def value_and_grad(self, images: torch.Tensor, generator: Optional[torch.Generator] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight * E (B,), d(sum weight * E)/d images)``, both detached.

        Equal to autograd through ``__call__`` with the same generator state;
        with ``max_batch`` each chunk of CLIP passes is back-propagated on its
        own, so memory does not grow with B * L.
        """
        b = images.shape[0]
        x = images.detach().requires_grad_(True)
        with torch.enable_grad():
            pixels = self._augmented(x, generator)
            targets = self._targets(b).repeat_interleave(self.copies, dim=0)
            step = self.max_batch or pixels.shape[0]
            losses = torch.empty(pixels.shape[0], device=pixels.device, dtype=pixels.dtype)
            grad_pixels = torch.empty_like(pixels)
            scale = self.weight / self.copies
            for i in range(0, pixels.shape[0], step):
                chunk = pixels[i:i + step].detach().requires_grad_(True)
                emb = self.bundle.image_embeds(chunk)
                loss = 1.0 - (emb * targets[i:i + step]).sum(dim=-1)
                (g,) = torch.autograd.grad(loss.sum() * scale, chunk)
                losses[i:i + step] = loss.detach()
                grad_pixels[i:i + step] = g
            (grad,) = torch.autograd.grad(pixels, x, grad_pixels)
        energy = self.weight * losses.view(b, self.copies).mean(dim=1)
        return energy.to(device=images.device, dtype=images.dtype), grad


def energy_value_and_grad(energy, images: torch.Tensor, generator: Optional[torch.Generator] = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E (B,), dE.sum()/d images)``, detached; the energy's own ``value_and_grad`` when it has one."""
    vg = getattr(energy, "value_and_grad", None)
    if vg is not None:
        e, g = vg(images, generator)
        return e.detach(), g.detach()
    with torch.enable_grad():
        x = images.detach().requires_grad_(True)
        e = energy(x, generator)
        (g,) = torch.autograd.grad(e.sum(), x)
    return e.detach(), g.detach()


class CombinedEnergy:
    """A sum of energies, each carrying its own weight.

    ``energies``: objects with ``__call__(images, generator) -> (B,)`` that
    already include their lambda (``ClipEnergy(weight=...)``); optional
    ``components`` and ``value_and_grad`` are used when present.
    ``weight``: an overall factor on the sum (default 1).  So
    ``__call__ = weight * sum(e(images))``, ``unweighted`` is the plain sum
    of the (individually weighted) members, and ``components`` lists every
    member's components, multiplied by ``weight``, under distinct names
    (``"clip_text"``, ``"clip_text#2"``, ...): they sum to ``__call__``.
    Members draw from the one generator in list order.
    """

    def __init__(self, energies: Sequence[Any], weight: float = 1.0):
        self.energies = list(energies)
        if not self.energies:
            raise ValueError("CombinedEnergy needs at least one energy")
        self.weight = float(weight)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "CombinedEnergy":
        for e in self.energies:
            if hasattr(e, "to"):
                e.to(device, dtype)
        return self

    def on_device(self, device) -> "CombinedEnergy":
        """A copy whose members are ``on_device(device)`` where they have it; ``self`` is unchanged."""
        members = [e.on_device(device) if hasattr(e, "on_device") else e for e in self.energies]
        if all(a is b for a, b in zip(members, self.energies)):
            return self
        out = copy.copy(self)
        out.energies = members
        return out

    def unweighted(self, images: torch.Tensor,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
        total = None
        for e in self.energies:
            v = e(images, generator)
            total = v if total is None else total + v
        return total

    def __call__(self, images: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.weight * self.unweighted(images, generator)

    def components(self, images: torch.Tensor,
                   generator: Optional[torch.Generator] = None) -> list[tuple[str, torch.Tensor]]:
        out: list[tuple[str, torch.Tensor]] = []
        used: set[str] = set()
        for i, e in enumerate(self.energies):
            if hasattr(e, "components"):
                parts = e.components(images, generator)
            else:
                parts = [(getattr(e, "name", None) or f"energy{i}", e(images, generator))]
            for name, value in parts:
                unique, k = name, 1
                while unique in used:
                    k += 1
                    unique = f"{name}#{k}"
                used.add(unique)
                out.append((unique, self.weight * value))
        return out

    def value_and_grad(self, images: torch.Tensor, generator: Optional[torch.Generator] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(__call__ (B,), its gradient w.r.t. images)``, member by member, detached."""
        total_v = total_g = None
        for e in self.energies:
            v, g = energy_value_and_grad(e, images, generator)
            total_v = v if total_v is None else total_v + v
            total_g = g if total_g is None else total_g + g
        return self.weight * total_v, self.weight * total_g


__all__ = [
    "ClipBundle",
    "ClipEnergy",
    "ClipFolderError",
    "CombinedEnergy",
    "DEFAULT_AUGMENTATIONS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "clear_clip_cache",
    "energy_value_and_grad",
    "load_clip_folder",
]
