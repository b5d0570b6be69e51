#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-3.0-or-later
"""Build (once) and use a real ComfyUI host for this pack: test, demo, serve, bench, build.

    python3 scripts/comfy_host.py --help

The logic is tools/dpmtools/host.py (standard library only: this runs on the system Python).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from dpmtools.host import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
