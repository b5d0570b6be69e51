# SPDX-License-Identifier: GPL-3.0-or-later
"""Socket types of this pack (one definition each, shared by all node files)."""
from comfy_api.latest import io

# A samplers.LatentCode; outputs are cached and shared: never mutate one, clone it.
LatentCodeIO = io.Custom("DPM_LATENT_CODE")
# A guidance energy: callable(images (B,3,H,W) in [0,1], generator) -> (B,) weighted energy.
EnergyIO = io.Custom("DPM_ENERGY")

CATEGORY = "sampling/dpm_latent"
# An Asyrp h-space direction (samplers.asyrp.Direction); shared like every output: never modify one.
AsyrpDirectionIO = io.Custom("ASYRP_DIRECTION")
# Which candidates of a DPM Pruned Replay finished and where the others were dropped (a dict; never modify it).
PruningIO = io.Custom("DPM_PRUNING")
