# SPDX-License-Identifier: GPL-3.0-or-later
"""ComfyUI adapters (V3 schema). One file per node family; the math lives in ../samplers and ../guidance."""
from comfy_api.latest import ComfyExtension, io

from .asyrp import (AsyrpEdit, AsyrpEditDDIM, AsyrpTrainDirection, CombineAsyrpDirections, LoadAsyrpDirection,
                    SaveAsyrpDirection)
from .asyrp_interval import AsyrpInterval
from .code_files import LoadLatentCode, SaveLatentCode
from .cycle import DPMEncode, EmptyConditioning, ReplayLatentWithPrompt
from .diffusers_ddpm import LoadDiffusersDDPM
from .guidance_nodes import CLIPEnergy, CombineEnergies, LangevinLatentSampler, RandomLatentCode
from .sweep import DPMSweep, RankByCLIP


class DPMLatentExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [
            DPMEncode,
            ReplayLatentWithPrompt,
            EmptyConditioning,
            SaveLatentCode,
            LoadLatentCode,
            RandomLatentCode,
            CLIPEnergy,
            CombineEnergies,
            LangevinLatentSampler,
            AsyrpTrainDirection,
            AsyrpEdit,
            AsyrpEditDDIM,
            CombineAsyrpDirections,
            SaveAsyrpDirection,
            LoadAsyrpDirection,
            AsyrpInterval,
            LoadDiffusersDDPM,
            DPMSweep,
            RankByCLIP,
        ]
