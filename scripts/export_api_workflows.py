#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-3.0-or-later
"""Write the API-format twins of the shipped workflows: workflows/api/<name>.json for every
workflows/<name>.json (UI format, the source of truth).

    python3 scripts/comfy_host.py export-api            write the twins
    python3 scripts/comfy_host.py export-api --check    exit 1 when a twin is missing, stale or extra

A twin is what ``POST /prompt`` accepts (``{"prompt": twin}``), the prompt the frontend queues for
the UI file (tests/product/test_browser.py compares them). It is made by tools/dpmtools/workflow.py's
``ui_to_api`` with the ``/object_info`` of a real ComfyUI server started with this pack only (no
models are needed: the conversion reads the nodes' input lists, never the model files).
Every output node keeps its title in ``_meta.title``, so a client can pick an output by title.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))  # dpmtools (never the repository itself: its nodes/ would shadow ComfyUI's)
from dpmtools.workflow import api_twin_text, ui_to_api  # noqa: E402

WORKFLOWS = REPO / "workflows"
API_DIR = WORKFLOWS / "api"


def twins(object_info: dict) -> dict[str, str]:
    """{file name: text} of every twin, from the UI files."""
    return {p.name: api_twin_text(ui_to_api(json.loads(p.read_text(encoding="utf-8")), object_info))
            for p in sorted(WORKFLOWS.glob("*.json"))}


def differences(wanted: dict[str, str], api_dir: Path = API_DIR) -> list[str]:
    """What differs between the twins on disk and ``wanted``, one line each."""
    have = {p.name for p in api_dir.glob("*.json")} if api_dir.is_dir() else set()
    out = [f"{api_dir.name}/{n}: no UI workflow workflows/{n} (remove it)" for n in sorted(have - set(wanted))]
    for name, text in wanted.items():
        path = api_dir / name
        if not path.is_file():
            out.append(f"{api_dir.name}/{name}: missing")
        elif path.read_text(encoding="utf-8") != text:
            out.append(f"{api_dir.name}/{name}: stale (workflows/{name} or the converter changed)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a twin is missing, stale or extra")
    args = ap.parse_args(argv)

    from dpmtools.comfy_env import comfy_dir
    from dpmtools.server import ComfyServer

    with tempfile.TemporaryDirectory(prefix="dpm-export-api-") as tmp:
        srv = ComfyServer(comfy_dir(), Path(tmp), python=sys.executable, pack_name="dpm-latent-export")
        srv.start()
        try:
            object_info = srv.object_info()
        finally:
            srv.stop()
    wanted = twins(object_info)
    problems = differences(wanted)
    if args.check:
        for line in problems:
            print(line, file=sys.stderr)
        print(f"{len(wanted)} twins, {len(problems)} out of date" + (
            ": run python3 scripts/comfy_host.py export-api" if problems else ""))
        return 1 if problems else 0
    API_DIR.mkdir(exist_ok=True)
    for p in API_DIR.glob("*.json"):
        if p.name not in wanted:
            p.unlink()
    for name, text in wanted.items():
        (API_DIR / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(wanted)} twins to {API_DIR.relative_to(REPO)}/ ({len(problems)} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
