# SPDX-License-Identifier: GPL-3.0-or-later
"""A tiny random CLIPModel folder for tests (no download).

``make_tiny_clip_folder(folder)`` writes what ``load_clip_folder`` expects:
config.json + model.safetensors (a 2-layer, 32-wide CLIP per tower), a
byte-level BPE CLIP tokenizer with a character vocabulary and no merges
(every word becomes its letters; vocab.json, merges.txt, tokenizer.json)
and a preprocessor_config.json.  The weights are random but deterministic
in ``seed``; the global torch RNG is left untouched.
"""
from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Union

import torch

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
HIDDEN = 32
PROJECTION = 16


def _vocab() -> dict[str, int]:
    vocab = {BOS: 0, EOS: 1}
    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    for suffix in ("", "</w>"):
        for ch in chars:
            vocab[ch + suffix] = len(vocab)
    return vocab


def make_tiny_clip_folder(folder: Union[str, Path], seed: int = 0, image_size: int = 32,
                          full_size: bool = False) -> Path:
    """Create (or overwrite) a tiny CLIPModel folder and return its path.

    ``full_size=True``: the ViT-B/32 architecture instead (transformers' default ``CLIPConfig``: 224 px,
    patch 32, 12 layers of 768 in the vision tower, 12 of 512 in the text tower, 49408 token
    embeddings, 151 M parameters, fp32), random weights, with the same character tokenizer; for the
    real-size benchmark (``image_size`` is then 224)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _vocab()
    tower = dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                 num_attention_heads=4, projection_dim=PROJECTION)
    max_tokens = 77 if full_size else 32
    if full_size:
        image_size = 224
        config = CLIPConfig(text_config=dict(bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
                                             pad_token_id=vocab[EOS]))
    else:
        config = CLIPConfig(
            text_config=dict(tower, vocab_size=len(vocab), max_position_embeddings=max_tokens,
                             bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
                             pad_token_id=vocab[EOS]),
            vision_config=dict(tower, image_size=image_size, patch_size=8),
            projection_dim=PROJECTION,
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(folder, safe_serialization=True)

    # Written as files and loaded back, which works on transformers 4 and 5
    # alike; save_pretrained then adds tokenizer.json.
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "bos_token": BOS, "eos_token": EOS,
        "unk_token": EOS, "pad_token": EOS, "model_max_length": max_tokens}), encoding="utf-8")
    AutoTokenizer.from_pretrained(str(folder), local_files_only=True).save_pretrained(folder)

    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    ).save_pretrained(folder)
    return folder


__all__ = ["make_tiny_clip_folder"]
