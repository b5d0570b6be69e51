# SPDX-License-Identifier: GPL-3.0-or-later
"""Inputs of list nodes (``is_input_list``): ComfyUI hands such a node every input as a list, one item
per upstream list item; these helpers read them the same way in every such node."""
from __future__ import annotations

import torch

from . import sampling as B


def first(value, default=None):
    """The first item of a list input (``default`` for an empty list); a value that is not a list as is."""
    if isinstance(value, list):
        return value[0] if value else default
    return value


def flat_images(images, name: str) -> list[torch.Tensor]:
    """A list of IMAGE batches -> list of single images (H, W, C); ``name`` is the input named in errors."""
    out = []
    for batch in images or []:
        if batch is None:
            continue
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4 or batch.shape[-1] not in (3, 4):
            raise B.NodeInputError(f"{name}: expected IMAGE batches (B, H, W, 3), got "
                                   f"{getattr(batch, 'shape', type(batch).__name__)}")
        out.extend(batch[i] for i in range(batch.shape[0]))
    return out


def clip_pixels(bundle, images) -> torch.Tensor:
    """Single images (H, W, C) -> one batch in the CLIP bundle's input size (centre crop), on the CPU."""
    return torch.cat([bundle.resize(im[None, :, :, :3].movedim(-1, 1), center_crop=True).cpu() for im in images])
