# SPDX-License-Identifier: GPL-3.0-or-later
"""The bridge: all of the pack's ComfyUI glue that is not a node class.

Node files (``nodes/*.py``) hold schemas and short ``execute`` methods; they import this package,
``guidance`` and ``samplers``, never each other.  Here:

* ``sampling``      model calls through ComfyUI's CFGGuider, schedules, input checks, codes <-> models
* ``autograd``      gradients through models ComfyUI loaded under inference mode; the differentiable decode
* ``clip_models``   the models/clip_energy folder, the one managed CLIP load, CLIP Energy's energy
* ``conditioning``  all-zero conditioning shaped for a model
* ``hspace``        where h is in a network, the record a direction must match, the h-shift patch
* ``codes``         DPM Encode, Replay (one cfg or several), Random Latent Code
* ``langevin_run``  the Langevin Latent Sampler's run and its memory modes
* ``asyrp_run``     Asyrp training and editing; ``interval_run`` the editing interval measurement
* ``ranking``       Rank Images by CLIP; ``halving`` DPM Pruned Replay (successive halving)
* ``diffusers_unet`` diffusers UNet2DModel folders as ComfyUI models
* ``files``, ``plot``, ``types``, ``inputs``  file lists, plots, socket types, shared inputs
"""
