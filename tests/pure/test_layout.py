# SPDX-License-Identifier: GPL-3.0-or-later
"""The shape docs/development.md describes, checked on the files themselves
(pure: reads source text, imports nothing of the pack or of ComfyUI)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NODE_FILES = sorted(p for p in (REPO / "nodes").glob("*.py") if p.name != "__init__.py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(level, dotted name) of every import in a file; names of ``from . import x`` count as ``x``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(0, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.module:
                out.append((node.level, node.module))
            else:
                out += [(node.level, a.name) for a in node.names]
    return out


@pytest.mark.parametrize("path", NODE_FILES, ids=lambda p: p.name)
def test_a_node_file_imports_no_other_node_file(path):
    siblings = {p.stem for p in NODE_FILES}
    bad = [name for level, name in _imports(path) if level == 1 and name.split(".")[0] in siblings]
    assert not bad, f"{path.name} imports node file(s) {bad}; shared code belongs in nodes/bridge/"


@pytest.mark.parametrize("folder", ["samplers", "guidance"])
def test_pure_torch_packages_never_import_comfyui(folder):
    for path in sorted((REPO / folder).glob("*.py")):
        bad = [name for level, name in _imports(path)
               if (level == 0 and name.split(".")[0] in {"comfy", "comfy_api", "folder_paths", "nodes",
                                                           "latent_preview", "comfy_extras"})
               or (level == 2 and name.split(".")[0] == "nodes")]
        assert not bad, f"{folder}/{path.name} imports {bad}"


@pytest.mark.parametrize("folder", ["nodes", "samplers", "guidance"])
def test_the_pack_never_imports_the_tools(folder):
    """The tools package (tests' server, tiny models) is on the test server's path (its test-only node adds
    it), never on a user's: pack code importing it would pass every server test and fail for users."""
    for path in sorted((REPO / folder).rglob("*.py")):
        bad = [name for level, name in _imports(path) if level == 0 and name.split(".")[0] in {"dpmtools", "tools"}]
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def _python_files_outside_tests():
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] in ("tests", ".git") or "__pycache__" in rel.parts:
            continue
        yield rel, path


def test_nothing_outside_tests_imports_tests():
    test_modules = {p.stem for p in (REPO / "tests").rglob("*.py")}
    for rel, path in _python_files_outside_tests():
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"sys\.path.*['\"/]tests\b|REPO\s*/\s*['\"]tests['\"]", text), rel
        bad = [name for level, name in _imports(path) if level == 0 and name.split(".")[0] in test_modules]
        assert not bad, f"{rel} imports test module(s) {bad}"


def test_readme_is_the_front_door():
    size = (REPO / "README.md").stat().st_size
    assert size <= 10 * 1024, f"README.md is {size} bytes; the rest belongs in docs/"
