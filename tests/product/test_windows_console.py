# SPDX-License-Identifier: GPL-3.0-or-later
"""Windows consoles (issue 18.7): nothing the pack prints, logs or raises may fail to encode on a
cp1252 console or log file (the Windows portable build's), where ``print`` raises
UnicodeEncodeError and ``logging`` prints "--- Logging error ---" instead of the message.

Three checks: every source file is cp1252 text, as comfy-test's SYNTAX level demands (it reads every
character, comments and docstrings included); the string literals that reach a console (print,
logging, warnings, raise) are cp1252, listed by AST so a failure names the call; and real code
paths -- the demo job's report and node refusals -- printed and logged to a strict cp1252 stream.
"""
from __future__ import annotations

import ast
import io
import json
import logging
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONSOLE_CALLS = {"print", "debug", "info", "warning", "warn", "error", "exception", "critical", "log", "write"}


def _python_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "*.py"], capture_output=True, text=True,
                             check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        out = []
    files = [REPO / f for f in out] or [p for p in REPO.rglob("*.py") if ".git" not in p.parts]
    return sorted(p for p in files if p.is_file())


def _not_cp1252(text: str) -> list[str]:
    bad = []
    for ch in text:
        try:
            ch.encode("cp1252")
        except UnicodeEncodeError:
            bad.append(ch)
    return bad


def test_every_source_file_is_cp1252_text():
    """comfy-test 0.4.15 SYNTAX: any character of any .py file that cp1252 cannot encode fails it."""
    bad = []
    for path in _python_files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            chars = _not_cp1252(line)
            if chars:
                bad.append(f"{path.relative_to(REPO)}:{n}: {''.join(chars)!a}")
    assert not bad, "characters a Windows cp1252 console cannot show:\n" + "\n".join(bad)


def _console_strings(tree: ast.AST):
    """(line, text) of every string literal inside print / logging / warnings / write calls and raises."""
    roots = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name in CONSOLE_CALLS:
                roots += list(node.args) + [k.value for k in node.keywords]
        elif isinstance(node, ast.Raise) and node.exc is not None:
            roots.append(node.exc)
    for root in roots:
        for sub in ast.walk(root):
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                yield sub.lineno, sub.value


def test_printed_logged_and_raised_literals_are_cp1252():
    bad = []
    count = 0
    for path in _python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for line, text in _console_strings(tree):
            count += 1
            if _not_cp1252(text):
                bad.append(f"{path.relative_to(REPO)}:{line}: {text!a}")
    assert count > 300, count          # the scan sees the pack's messages (about 900 today)
    assert not bad, "\n".join(bad)


class _StrictHandler(logging.StreamHandler):
    """A log handler on a cp1252 file that fails the test where logging would print 'Logging error'."""

    def handleError(self, record):
        raise


def _cp1252_stream():
    return io.TextIOWrapper(io.BytesIO(), encoding="cp1252", errors="strict", newline="\n")


def test_demo_report_prints_on_a_cp1252_console():
    """scripts/demo.py prints its metrics table at the end of a run: on today's numbers
    (docs/demo_metrics.json) it must encode as cp1252 (it held '->' arrows and an infinity sign)."""
    from dpmtools.comfy_env import load_module

    demo = load_module("dpm_demo_script", REPO / "scripts" / "demo.py")
    table = demo.metrics_markdown(json.loads((REPO / "docs" / "demo_metrics.json").read_text(encoding="utf-8")))
    assert "translation A" in table and table.count("\n") > 10
    out = _cp1252_stream()
    print(table, file=out)
    out.flush()
    assert out.buffer.getvalue().decode("cp1252").strip() == table.strip()


def test_node_refusals_log_on_a_cp1252_console(pack, monkeypatch, tmp_path):
    """Node refusals as ComfyUI reports them (its log + the message), on a strict cp1252 log file."""
    import importlib

    import folder_paths

    ddpm = importlib.import_module("dpm_latent.nodes.bridge.diffusers_unet")
    clip = importlib.import_module("dpm_latent.nodes.bridge.clip_models")
    files = importlib.import_module("dpm_latent.nodes.bridge.files")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusers", ([str(tmp_path)], set()))
    stream = _cp1252_stream()
    handler = _StrictHandler(stream)
    log = logging.getLogger("cp1252-console-test")
    log.addHandler(handler)
    log.propagate = False
    refusals = [lambda: ddpm.resolve_folder("../elsewhere"), lambda: ddpm.resolve_folder("missing_model"),
                lambda: clip.clip_folder("no_such_clip"), lambda: files.resolve("../../etc/passwd", "code_file")]
    messages = []
    try:
        for call in refusals:
            with pytest.raises(ddpm.B.NodeInputError) as ei:
                call()
            messages.append(str(ei.value))
            log.error("!!! Exception during processing !!! %s", ei.value)
            print(ei.value, file=stream)
    finally:
        log.removeHandler(handler)
    stream.flush()
    written = stream.buffer.getvalue().decode("cp1252")
    for m in messages:
        assert m.split(":")[0] in ("model_name", "clip_name", "code_file"), m
        assert written.count(m) == 2, m
