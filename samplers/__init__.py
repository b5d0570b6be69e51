# SPDX-License-Identifier: GPL-3.0-or-later
"""Pure-torch samplers over a sigma-space denoiser; no ComfyUI import here."""
from .dpm_encoder import (  # noqa: F401
    FAMILIES,
    CodeError,
    LatentCode,
    alpha,
    blend,
    check_mask,
    check_schedule,
    encode,
    latent_mask,
    prior_code,
    replay,
    replay_step,
    step_coefficients,
)
