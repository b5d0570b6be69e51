# SPDX-License-Identifier: GPL-3.0-or-later
"""Save Latent Code / Load Latent Code: safetensors files in ComfyUI's output and input folders."""
from __future__ import annotations

from comfy_api.latest import io

from ..samplers.code_format import load_code, save_code
from . import _files as F
from ._types import CATEGORY, LatentCodeIO

SUFFIX = ".dpmcode.safetensors"


class SaveLatentCode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SaveLatentCode",
            display_name="Save Latent Code",
            category=CATEGORY,
            description=f"Saves a latent code to ComfyUI's output folder as <prefix>_NNNNN_{SUFFIX}, with a "
                        "SHA-256 checksum and the model's latent format. Load Latent Code lists it as "
                        "'<name> [output]'.",
            inputs=[
                LatentCodeIO.Input("latent_code", tooltip="The code to save."),
                io.String.Input("filename_prefix", default="dpm_latent/code",
                                tooltip="File name prefix; may contain sub-folders."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, latent_code, filename_prefix) -> io.NodeOutput:
        return F.save(filename_prefix, SUFFIX, lambda path: save_code(latent_code, path))


class LoadLatentCode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadLatentCode",
            display_name="Load Latent Code",
            category=CATEGORY,
            description=f"Loads a latent code ({SUFFIX}) from ComfyUI's input folder, or from the output folder "
                        "(names ending in ' [output]'); verifies its checksum and checks every field.",
            inputs=[
                io.Combo.Input("code_file", options=F.file_options(SUFFIX),
                               tooltip=f"A {SUFFIX} file in ComfyUI's input folder, or one Save Latent Code wrote "
                                       "to the output folder (listed with ' [output]')."),
            ],
            outputs=[LatentCodeIO.Output(display_name="latent_code")],
        )

    @classmethod
    def validate_inputs(cls, code_file):
        return F.validate(code_file, "code_file")

    @classmethod
    def fingerprint_inputs(cls, code_file):
        return F.fingerprint(code_file, "code_file")

    @classmethod
    def execute(cls, code_file) -> io.NodeOutput:
        return io.NodeOutput(F.load(code_file, "code_file", load_code))
