# SPDX-License-Identifier: GPL-3.0-or-later
"""Inputs that several nodes share, each defined once with one tooltip.

Defaults that differ between nodes are parameters; the name and the meaning (the tooltip) never do,
so a shared workflow reads the same on every node."""
from __future__ import annotations

from comfy_api.latest import io

from .clip_models import clip_folders
from .hspace import H_SITES

FROM_DIRECTION = -1.0  # t_edit / t_boost on the edit nodes: use the direction's own value


def clip_name():
    return io.Combo.Input("clip_name", options=list(clip_folders()),
                          tooltip="A CLIP folder in models/clip_energy/ (transformers save_pretrained layout: "
                                  "config.json, model.safetensors, tokenizer files), e.g. a saved "
                                  "openai/clip-vit-base-patch32.")


def source_text(default: str, multiline: bool = False, optional: bool = False):
    return io.String.Input("source_text", default=default, multiline=multiline, optional=optional,
                           tooltip="What the source images show now (the source prompt).")


def target_text(default: str, multiline: bool = False):
    return io.String.Input("target_text", default=default, multiline=multiline,
                           tooltip="What the edit should make of them (the target prompt).")


def strength():
    return io.String.Input("strength", default="1.0",
                           tooltip="Scale of delta_h; negative reverses the edit. A comma-separated list "
                                   "(e.g. -1, 0, 1, 2) gives one image per value in the batch (strength-major: "
                                   "all images at the first value, then the next).")


def ddim_steps(what: str):
    return io.Int.Input("steps", default=40, min=2, max=1000, tooltip=f"DDIM steps of {what} (paper: 40).")


def t_edit_override():
    return io.Float.Input("t_edit", default=FROM_DIRECTION, min=-1.0, max=1.0, step=0.01,
                          tooltip="End of the editing interval as a fraction of the chain (1 = T): steps starting "
                                  "above it are edited; -1 uses the direction's training value.")


def t_boost_override():
    return io.Float.Input("t_boost", default=FROM_DIRECTION, min=-1.0, max=1.0, step=0.01,
                          tooltip="Quality boosting below this fraction (fresh eta = 1 noise; the image is then no "
                                  "longer reproduced exactly). 0 turns it off; -1 uses the direction's value "
                                  "(0 for trained directions).")




def h_site():
    return io.Combo.Input(
        "h_site", options=list(H_SITES), default="middle", optional=True,
        tooltip="Where h is read and shifted. 'middle': the paper's h-space, the U-Net bottleneck (the middle joint "
                "block of SD3 / Flux). 'after first up block' / 'after second up block' (U-Nets only, beyond the "
                "paper): the output of the first / second up level, past its skip joins; use them when the "
                "bottleneck does not carry the attribute (on the demo pixel DDPM it carries layout, not colour; "
                "its colour edit from examples works after the second up block, with spread 'object, centred'). "
                "Edit uses the site the direction records.")
