# SPDX-License-Identifier: GPL-3.0-or-later
"""Tools around the DPM Latent pack: what scripts/, bench/, demo/ and tests/ share.

* ``host``        builds (once) and uses the ComfyUI host (``python3 scripts/comfy_host.py ...``);
                  standard library only, so it runs on the system Python.
* ``comfy_env``   ComfyUI on sys.path in this process, the CPU/fp32 switch, the pack imported as
                  ComfyUI imports it.
* ``server``      a real ComfyUI server with the pack, started as a subprocess and driven over HTTP.
* ``graphs``      API-format prompts written in Python, and latents in and out of a server.
* ``workflow``    UI-format workflows (what the frontend saves) to API prompts and back.
* ``tiny_models``, ``tiny_clip``, ``tiny_ddpm``: tiny random models for the tests and benchmarks.

Every entry point puts ``<repository>/tools`` on sys.path (pytest through ``pythonpath`` in
pyproject.toml, a script in one line) and imports ``dpmtools.<module>``.  Never the repository
itself: its ``nodes/`` folder would shadow ComfyUI's top-level ``nodes`` module.
"""
