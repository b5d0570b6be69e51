# SPDX-License-Identifier: GPL-3.0-or-later
"""The two callable types every sampler here is written over (defined once, imported everywhere)."""
from __future__ import annotations

from typing import Callable

import torch

# denoise(x, sigma) -> the model's prediction of x0 at noise level sigma (a sigma-space denoiser, as in
# k-diffusion); x is (B, ...) and sigma a Python float shared by the batch.
Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
# callback(step_index, denoised, x, total_steps), called after each step of a chain.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, int], None]
