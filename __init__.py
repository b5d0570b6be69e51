# SPDX-License-Identifier: GPL-3.0-or-later
"""DPM Latent: a Gaussian latent space for diffusion models, as ComfyUI nodes.

ComfyUI loads this folder as a custom node pack and calls ``comfy_entrypoint``.
The node modules are imported there, not at import time, so that the pure-torch
subpackages ``samplers`` and ``guidance`` can be used without ComfyUI.
"""


async def comfy_entrypoint():
    from .nodes import DPMLatentExtension

    return DPMLatentExtension()

# Per-node help pages (web/docs/<NodeId>.md), shown by the frontend's node info panel.
WEB_DIRECTORY = "./web"
