# SPDX-License-Identifier: GPL-3.0-or-later
"""The UI-to-API workflow converter, now in scripts/workflow_api.py (shared with the batch runner).
Loaded by path: the scripts/ folder is never put on sys.path."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_NAME = "dpm_latent_workflow_api"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        _NAME, Path(__file__).resolve().parent.parent / "scripts" / "workflow_api.py")
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _mod
    _spec.loader.exec_module(_mod)
_api = sys.modules[_NAME]
globals().update({k: v for k, v in vars(_api).items() if not k.startswith("__")})
