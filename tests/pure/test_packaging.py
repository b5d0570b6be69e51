# SPDX-License-Identifier: GPL-3.0-or-later
"""The registry package (issue 18.6), checked on the files themselves: what comfy-cli reads from
pyproject.toml and what ``comfy node pack`` puts in the zip under ``.comfyignore``.

Pure: reads files, imports nothing of the pack or of ComfyUI.  The ``.comfyignore`` matcher here
covers the gitignore syntax the file uses (``/anchored``, ``dir/``, ``*``) and refuses any other,
so that it cannot silently disagree with comfy-cli's pathspec matcher.
"""
from __future__ import annotations

import ast
import re
import struct
import subprocess
import tokenize
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# comfy-cli 1.23.0 (registry/config_parser.py): any other "Environment ::" classifier voids them all
REGISTRY_ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                         "GPU :: Apple Metal"}
# comfy-cli's version check: [operator]major.minor.patch[-suffix], comma-separated
VERSION_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)$")


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _tracked_files() -> list[str]:
    """What ``comfy node pack`` starts from: the git-tracked files (a tree without git: every file)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, check=True)
        files = [f for f in out.stdout.splitlines() if f.strip()]
    except (OSError, subprocess.CalledProcessError):
        files = []
    if not files:
        files = [p.relative_to(REPO).as_posix() for p in REPO.rglob("*") if p.is_file()
                 and ".git" not in p.parts and "__pycache__" not in p.parts]
    return sorted(f for f in files if (REPO / f).is_file())


def _ignore_patterns() -> list[re.Pattern]:
    path = REPO / ".comfyignore"
    assert path.is_file(), ".comfyignore is missing: `comfy node pack` would ship tests/, bench/ and the rest"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not re.search(r"[!?\[\]\\]|\*\*", line), f".comfyignore: {line!r} uses syntax this test does not model"
        anchored, is_dir = line.startswith("/"), line.endswith("/")
        body = line.strip("/")
        rx = "[^/]*".join(re.escape(part) for part in body.split("*"))
        rx = ("" if anchored or "/" in body else "(?:.*/)?") + rx + ("/.*" if is_dir else "(?:/.*)?")
        out.append(re.compile(rx))
    return out


@pytest.fixture(scope="module")
def package():
    """(kept, dropped) file lists of the registry zip."""
    patterns = _ignore_patterns()
    kept, dropped = [], []
    for f in _tracked_files():
        (dropped if any(p.fullmatch(f) for p in patterns) else kept).append(f)
    return kept, dropped


def test_pyproject_says_what_the_registry_needs(pyproject):
    project, comfy = pyproject["project"], pyproject["tool"]["comfy"]
    # the V3 node API: a minimum ComfyUI, in a form comfy-cli keeps (it drops a malformed one with a warning)
    req = comfy.get("requires-comfyui", "")
    assert req, "[tool.comfy] has no requires-comfyui"
    assert all(VERSION_PART.match(part.strip()) for part in req.split(",")), req
    assert req.startswith(">="), req
    # the dependencies are requirements.txt's, diffusers (Load Diffusers DDPM) included, and never torch
    reqs = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    reqs = sorted(r for r in reqs if r)
    assert sorted(project["dependencies"]) == reqs, (project["dependencies"], reqs)
    assert any(d.startswith("diffusers") for d in project["dependencies"])
    assert not any(re.match(r"torch\b", d) for d in project["dependencies"])
    # accelerator classifiers comfy-cli keeps (an unknown one voids them all)
    envs = [c[len("Environment :: "):] for c in project["classifiers"] if c.startswith("Environment ::")]
    assert envs and set(envs) <= REGISTRY_ACCELERATORS, envs


def test_icon_is_a_small_square_png_in_the_repository(pyproject, package):
    icon = pyproject["tool"]["comfy"].get("Icon", "")
    assert icon, "[tool.comfy] Icon is empty"
    repo_url = pyproject["project"]["urls"]["Repository"].rstrip("/")
    raw = repo_url.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    assert icon.startswith(raw) or "://" not in icon, (icon, raw)
    rel = icon[len(raw):] if icon.startswith(raw) else icon
    path = REPO / rel
    assert path.is_file(), f"Icon {icon!r}: no file {rel} in the repository"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", rel
    w, h = struct.unpack(">II", data[16:24])
    assert w == h and 64 <= w <= 512 and len(data) < 50_000, (w, h, len(data))
    assert rel in package[0], f"{rel} is left out of the package"


def test_comfyignore_keeps_what_an_install_runs_and_drops_the_rest(package):
    kept, dropped = package
    kept_set = set(kept)
    for folder in ("tests/", "bench/"):
        assert [f for f in dropped if f.startswith(folder)], f"nothing of {folder} is tracked?"
        assert not [f for f in kept if f.startswith(folder)], f"{folder} is packaged"
    assert "demo/train.py" in dropped
    for must in ("__init__.py", "LICENSE", "README.md", "pyproject.toml", "requirements.txt",
                 "scripts/batch_render.py", "scripts/comfy_host.py",
                 # the demo job writes the demo workflows' input images (dpm_world_*.png) from the world
                 "scripts/demo.py", "demo/world.py"):
        assert must in kept_set, must
    for folder in ("nodes/", "samplers/", "guidance/", "web/", "workflows/", "demo/models/", "tools/dpmtools/"):
        files = [f for f in _tracked_files() if f.startswith(folder)]
        assert files and set(files) <= kept_set, (folder, sorted(set(files) - kept_set))
    # every demo model a shipped workflow names is in the package (its .png / .tiff / .latent inputs are drawn
    # by the demo job: write_sample_inputs, write_video_sample)
    model_files = {Path(f).name: f for f in kept if f.startswith("demo/models/")}
    model_dirs = {part for f in kept if f.startswith("demo/models/") for part in Path(f).parts[3:-1]}
    named = set()
    for wf in sorted((REPO / "workflows").glob("*.json")):
        text = wf.read_text(encoding="utf-8")
        named |= set(re.findall(r'"(dpm_world_[^"/]+?)(?<!\.png)(?<!\.tiff)(?<!\.latent)"', text))
    assert named, "no shipped workflow names a demo model?"
    missing = sorted(n for n in named if n not in model_files and n not in model_dirs)
    assert not missing, f"workflows name demo models the package lacks: {missing}"
    # what a packaged script imports from this repository is packaged too
    for f in kept:
        if not f.endswith(".py") or not f.startswith(("scripts/", "demo/", "tools/")):
            continue
        for node in ast.walk(ast.parse((REPO / f).read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in names:
                top = name.split(".")
                if top[0] not in ("dpmtools", "demo"):
                    continue
                base = ["tools"] if top[0] == "dpmtools" else []
                cands = ["/".join(base + top) + ".py", "/".join(base + top) + "/__init__.py"]
                assert any(c in kept_set for c in cands), f"{f} imports {name}, which is not packaged"


def test_no_source_line_holds_two_statements():
    """comfy-cli's security check (ruff E702/E703) warns on ``a(); b()`` and will refuse it."""
    bad = []
    for f in _tracked_files():
        if not f.endswith(".py"):
            continue
        with open(REPO / f, "rb") as fh:
            for tok in tokenize.tokenize(fh.readline):
                if tok.type == tokenize.OP and tok.string == ";":
                    bad.append(f"{f}:{tok.start[0]}")
    assert not bad, bad
