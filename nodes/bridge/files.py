# SPDX-License-Identifier: GPL-3.0-or-later
"""Saved artifacts in ComfyUI's folders, shared by every Save / Load node pair of the pack.

Save nodes write to the output folder with ComfyUI's numbered ``<prefix>_NNNNN_<suffix>`` names.
Load nodes list the input folder (plain names) and the output folder (names annotated ``" [output]"``
as LoadImage annotates its names), so a file a Save node wrote loads without copying it.
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable

from comfy_api.latest import io, ui

import folder_paths

from ...samplers import CodeError
from . import sampling as B


def files_in(root: str, suffix: str) -> list[str]:
    """Files under ``root`` whose names end in ``suffix``, as sorted '/'-separated relative paths."""
    found = []
    if not os.path.isdir(root):
        return found
    for dirpath, _dirs, files in B.walk_dirs(root):
        for f in files:
            if f.endswith(suffix):
                found.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(found)


def file_options(suffix: str) -> list[str]:
    """The input folder's files (plain names), then the output folder's, annotated ' [output]'."""
    return (files_in(folder_paths.get_input_directory(), suffix) +
            [f"{name} [output]" for name in files_in(folder_paths.get_output_directory(), suffix)])


def resolve(choice: str, input_name: str) -> str:
    """The absolute path of a listed (possibly annotated) name; refuses anything outside its folder."""
    name, base = folder_paths.annotated_filepath(choice.strip())
    root = os.path.abspath(base if base is not None else folder_paths.get_input_directory())
    path = os.path.abspath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise B.NodeInputError(f"{input_name}: {choice!r} is outside the folder {root}")
    return path


def validate(choice: str, input_name: str):
    """``validate_inputs`` of a Load node: True, or a message naming the input and where to put the file."""
    try:
        path = resolve(choice, input_name)
    except B.NodeInputError as e:
        return str(e)
    if not os.path.isfile(path):
        return (f"{input_name}: {choice!r} is not in the input folder {folder_paths.get_input_directory()} "
                f"(or, named '... [output]', in the output folder {folder_paths.get_output_directory()})")
    return True


def fingerprint(choice: str, input_name: str) -> str:
    """``fingerprint_inputs`` of a Load node: the file's SHA-256, so a changed file is loaded again."""
    try:
        with open(resolve(choice, input_name), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except (OSError, B.NodeInputError):
        return choice


def load(choice: str, input_name: str, reader: Callable[[str], object]):
    """``reader(path)`` of a listed file; a CodeError (corrupt, wrong kind) becomes a node error naming the input."""
    try:
        return reader(resolve(choice, input_name))
    except CodeError as e:
        raise B.NodeInputError(f"{input_name}: {e}") from None


def save(filename_prefix: str, suffix: str, writer: Callable[[str], object]) -> io.NodeOutput:
    """``writer(path)`` to the next numbered name in the output folder; shows the saved name on the node."""
    out_dir = folder_paths.get_output_directory()
    full_dir, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
    fname = f"{name}_{counter:05}_{suffix}"
    try:
        writer(os.path.join(full_dir, fname))
    except CodeError as e:
        raise B.code_error(e) from None
    return io.NodeOutput(ui=ui.PreviewText(f"saved {os.path.join(subfolder, fname)}"))
