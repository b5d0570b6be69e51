# SPDX-License-Identifier: GPL-3.0-or-later
"""Save Latent Code / Load Latent Code: safetensors files in ComfyUI's output and input folders."""
from __future__ import annotations

import hashlib
import os

from comfy_api.latest import io, ui

import folder_paths

from ..samplers import CodeError
from ..samplers.code_format import load_code, save_code
from . import _bridge as B
from ._types import CATEGORY, LatentCodeIO

SUFFIX = ".dpmcode.safetensors"


def _code_files_in(root: str) -> list[str]:
    found = []
    if not os.path.isdir(root):
        return found
    for dirpath, _dirs, files in B.walk_dirs(root):
        for f in files:
            if f.endswith(SUFFIX):
                found.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(found)


def _code_file_options() -> list[str]:
    """Codes in the input folder (plain names), then those in the output folder, annotated " [output]"
    as LoadImage annotates its names, so that a code Save Latent Code wrote loads without copying."""
    return (_code_files_in(folder_paths.get_input_directory()) +
            [f"{name} [output]" for name in _code_files_in(folder_paths.get_output_directory())])


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
        out_dir = folder_paths.get_output_directory()
        full_dir, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
        fname = f"{name}_{counter:05}_{SUFFIX}"
        try:
            save_code(latent_code, os.path.join(full_dir, fname))
        except CodeError as e:
            raise B.code_error(e) from None
        return io.NodeOutput(ui=ui.PreviewText(f"saved {os.path.join(subfolder, fname)}"))


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
                io.Combo.Input("code_file", options=_code_file_options(),
                               tooltip=f"A {SUFFIX} file in ComfyUI's input folder, or one Save Latent Code wrote "
                                       "to the output folder (listed with ' [output]')."),
            ],
            outputs=[LatentCodeIO.Output(display_name="latent_code")],
        )

    @classmethod
    def _path(cls, code_file: str) -> str:
        name, base = folder_paths.annotated_filepath(code_file.strip())
        if base is None:
            base = folder_paths.get_input_directory()
        root = os.path.abspath(base)
        path = os.path.abspath(os.path.join(root, name))
        if os.path.commonpath([root, path]) != root:
            raise B.NodeInputError(f"code_file: {code_file!r} is outside the folder {root}")
        return path

    @classmethod
    def validate_inputs(cls, code_file):
        try:
            path = cls._path(code_file)
        except B.NodeInputError as e:
            return str(e)
        if not os.path.isfile(path):
            return (f"code_file: {code_file!r} is not in the input folder {folder_paths.get_input_directory()} "
                    f"(or, named '... [output]', in the output folder {folder_paths.get_output_directory()})")
        return True

    @classmethod
    def fingerprint_inputs(cls, code_file):
        try:
            with open(cls._path(code_file), "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
        except (OSError, B.NodeInputError):
            return code_file

    @classmethod
    def execute(cls, code_file) -> io.NodeOutput:
        try:
            code = load_code(cls._path(code_file))
        except CodeError as e:
            raise B.NodeInputError(f"code_file: {e}") from None
        return io.NodeOutput(code)
