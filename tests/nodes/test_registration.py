# SPDX-License-Identifier: GPL-3.0-or-later
"""Every node of the extension's own node list, as the real server registers it: its category, a
description, a tooltip on every input. One test per node, driven by ``DPMLatentExtension``; no
hand-kept list of nodes."""
from __future__ import annotations

import asyncio
import importlib

import pytest

from dpmtools import comfy_env


def _node_classes() -> list:
    comfy_env.import_pack()
    ext = importlib.import_module("dpm_latent.nodes").DPMLatentExtension()
    return asyncio.run(ext.get_node_list())


NODE_IDS = [cls.define_schema().node_id for cls in _node_classes()]


def test_the_node_list_has_every_node_class_of_the_node_files():
    """A node class written in nodes/ but left out of the extension's list would never load."""
    import inspect

    from comfy_api.latest import io

    defined = {}
    for path in sorted(comfy_env.REPO.joinpath("nodes").glob("*.py")):
        if path.stem == "__init__":
            continue
        mod = importlib.import_module(f"dpm_latent.nodes.{path.stem}")
        for _n, c in inspect.getmembers(mod, inspect.isclass):
            if issubclass(c, io.ComfyNode) and c is not io.ComfyNode and c.__module__ == mod.__name__:
                defined[c.define_schema().node_id] = path.name
    assert set(defined) == set(NODE_IDS), sorted(set(defined) ^ set(NODE_IDS))
    assert len(NODE_IDS) == len(set(NODE_IDS))


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_node_is_registered_with_a_description_and_tooltips(server, node_id):
    info = server.object_info()
    assert node_id in info, f"{node_id} is not registered by the server"
    node = info[node_id]
    want_category = "loaders" if node_id == "LoadDiffusersDDPM" else "sampling/dpm_latent"
    assert node["category"] == want_category
    assert len(node.get("description") or "") > 40, node_id
    assert node.get("display_name") and node["display_name"] != node_id
    for group in ("required", "optional"):
        for name, spec in node["input"].get(group, {}).items():
            assert len(spec) > 1 and (spec[1].get("tooltip") or "").strip(), (node_id, name)


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_node_has_a_help_page_the_frontend_serves(server, node_id):
    """The frontend's node info panel fetches /extensions/<pack folder>/docs/<NodeId>.md (WEB_DIRECTORY)."""
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/extensions/{server.pack_name}/docs/{node_id}.md", timeout=30) as r:
        page = r.read().decode("utf-8")
    assert page.lstrip().startswith("#") and len(page) > 300, node_id
    schema = next(c for c in _node_classes() if c.define_schema().node_id == node_id).define_schema()
    for inp in schema.inputs:
        assert f"**{inp.id}**" in page, f"web/docs/{node_id}.md does not describe input {inp.id!r}"
