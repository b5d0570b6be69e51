# SPDX-License-Identifier: GPL-3.0-or-later
"""ComfyUI nodes (V3 schema): node classes only, one file per node family.

A node file imports ``bridge`` (the ComfyUI glue), ``guidance`` and ``samplers``, never another node
file; the math lives in ../samplers and ../guidance."""
from comfy_api.latest import ComfyExtension, io

from .asyrp import (AsyrpDirectionFromExamples, AsyrpEdit, AsyrpEditDDIM, AsyrpTrainDirection,
                    CombineAsyrpDirections, LoadAsyrpDirection, SaveAsyrpDirection)
from .asyrp_interval import AsyrpInterval
from .best_of_n import DPMPrunedReplay, DPMSweep, RankByCLIP
from .clip_guidance import CLIPEnergy, CombineEnergies, LangevinLatentSampler, VideoEnergy
from .diffusers_ddpm import LoadDiffusersDDPM
from .latent_codes import (DPMEncode, EmptyConditioning, LoadLatentCode, RandomLatentCode, ReplayLatentWithPrompt,
                           SaveLatentCode)


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
            VideoEnergy,
            LangevinLatentSampler,
            AsyrpTrainDirection,
            AsyrpDirectionFromExamples,
            AsyrpEdit,
            AsyrpEditDDIM,
            CombineAsyrpDirections,
            SaveAsyrpDirection,
            LoadAsyrpDirection,
            AsyrpInterval,
            LoadDiffusersDDPM,
            DPMSweep,
            RankByCLIP,
            DPMPrunedReplay,
        ]
