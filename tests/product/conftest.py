# SPDX-License-Identifier: GPL-3.0-or-later
"""Product tests (workflows, browser, demo, batch runner): ComfyUI importable in this process, on the CPU in fp32, before any test imports the pack."""
from dpmtools import comfy_env

comfy_env.add_comfy_to_path()
comfy_env.set_device(cpu=True, force_fp32=True)
