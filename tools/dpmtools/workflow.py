# SPDX-License-Identifier: GPL-3.0-or-later
"""Convert a UI-format workflow (what the ComfyUI frontend saves and loads by drag and drop)
into an API-format prompt (what ``POST /prompt`` accepts), using the server's ``/object_info``
(``ui_to_api``, ``load_prompt``), and back (``api_to_ui``, which lays the nodes out).
``find_node`` and ``set_inputs`` name the nodes of a prompt by title or type and change their inputs.
``api_twin_text`` is the text of a shipped workflow's API-format twin (``workflows/api/*.json``, written by
scripts/export_api_workflows.py); ``output_titles`` names a workflow's output nodes.

Rules, as the frontend applies them when it queues a workflow:

* Node inputs are taken in the order of ``input_order`` (required, then optional), or of the
  ``required``/``optional`` dicts when an old server sends no ``input_order``.
* An input is a *widget* when its type is INT, FLOAT, STRING, BOOLEAN or a combo (a list of
  options, or ``"COMBO"`` with ``options`` in V3 object_info), unless it has ``forceInput``.
  ``widgets_values`` holds one value per widget input, in that order, plus extra values the
  frontend stores for helper widgets:

  - after an INT with ``control_after_generate`` (or, when the spec does not say, an INT named
    ``seed``/``noise_seed``), and after a combo with ``control_after_generate: true``: the
    control mode ("fixed", "increment", "decrement", "randomize");
  - after a combo with ``image_upload``/``video_upload``/``audio_upload``: the upload button.

  Workflows saved without those extras (old frontends) are recognised by their length.
* A widget input that is connected by a link takes the link; so does a socket input.
  Links are followed through ``Reroute`` nodes and through bypassed nodes (mode 4: the
  upstream input of the same type is passed on); a link from a muted node (mode 2) or from a
  ``PrimitiveNode`` is dropped (the widget keeps its stored value).
* Nodes with mode 2 (muted, "never") or 4 (bypassed) are left out, as are frontend-only
  nodes (Note, MarkdownNote, Reroute, PrimitiveNode, ...) that have no entry in object_info.
  Any other type missing from object_info is an error.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Node types that exist only in the frontend (never sent to the server).
FRONTEND_ONLY = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode", "Label", "Comment"})
PRIMITIVE_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload")
SEED_NAMES = ("seed", "noise_seed")
MODE_MUTED, MODE_BYPASS = 2, 4


class WorkflowError(ValueError):
    """A UI workflow that cannot be converted (unknown node type, inconsistent links or widgets)."""


def _spec_options(spec) -> dict:
    return spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}


def _spec_type(spec):
    return spec[0] if isinstance(spec, (list, tuple)) and spec else spec


def is_widget(spec) -> bool:
    typ = _spec_type(spec)
    if _spec_options(spec).get("forceInput"):
        return False
    return isinstance(typ, list) or (isinstance(typ, str) and typ in PRIMITIVE_TYPES)


def is_combo(spec) -> bool:
    typ = _spec_type(spec)
    return isinstance(typ, list) or typ == "COMBO"


def extra_widget_values(name: str, spec) -> int:
    """How many helper-widget values the frontend stores right after this widget's value."""
    opts = _spec_options(spec)
    typ = _spec_type(spec)
    n = 0
    if typ == "INT":
        control = opts["control_after_generate"] if "control_after_generate" in opts else name in SEED_NAMES
        n += 1 if control else 0
    elif is_combo(spec):
        n += 1 if opts.get("control_after_generate") else 0
        n += 1 if any(opts.get(f) for f in UPLOAD_FLAGS) else 0
    return n


def ordered_inputs(info: dict) -> list[tuple[str, Any]]:
    """[(name, spec)] of a node's required then optional inputs, in the server's order."""
    groups = info.get("input", {}) or {}
    order = info.get("input_order") or {}
    out = []
    for group in ("required", "optional"):
        specs = groups.get(group, {}) or {}
        names = order.get(group) or list(specs)
        out.extend((n, specs[n]) for n in names if n in specs)
    return out


def _links_by_id(workflow: dict) -> dict[int, tuple[int, int, int, int, str]]:
    links = {}
    for link in workflow.get("links", []) or []:
        if isinstance(link, dict):
            lid, src, sslot = link["id"], link["origin_id"], link["origin_slot"]
            dst, dslot, typ = link["target_id"], link["target_slot"], link.get("type", "*")
        else:
            lid, src, sslot, dst, dslot, typ = link[:6]
        links[int(lid)] = (int(src), int(sslot), int(dst), int(dslot), typ)
    return links


def _types_match(a, b) -> bool:
    if a in ("*", "", None) or b in ("*", "", None):
        return True
    sa, sb = set(str(a).split(",")), set(str(b).split(","))
    return bool(sa & sb)


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt ``{node_id: {"class_type", "inputs", "_meta"}}`` of a UI workflow."""
    if "nodes" not in workflow:
        raise WorkflowError("not a UI-format workflow (no 'nodes' list); API-format prompts need no conversion")
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError("workflows with subgraphs are not supported by this converter")
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = _links_by_id(workflow)

    for n in nodes.values():
        if n["type"] not in object_info and n["type"] not in FRONTEND_ONLY:
            raise WorkflowError(
                f"node {n['id']} has type {n['type']!r}, which the server does not know "
                "(missing custom node pack, or a node that was renamed)")

    def resolve(link_id, seen=()):
        """[str(node), slot] feeding through link_id, or None when nothing real feeds it."""
        if link_id is None:
            return None
        if link_id not in links:
            raise WorkflowError(f"link {link_id} is used by a node but missing from 'links'")
        if link_id in seen:
            raise WorkflowError(f"link {link_id} is part of a cycle through reroutes or bypassed nodes")
        src_id, src_slot, _dst, _dslot, typ = links[link_id]
        src = nodes.get(src_id)
        if src is None:
            raise WorkflowError(f"link {link_id} comes from node {src_id}, which is not in the workflow")
        mode = src.get("mode", 0)
        if src["type"] == "Reroute":
            ins = src.get("inputs") or []
            return resolve(ins[0].get("link"), (*seen, link_id)) if ins else None
        if src["type"] == "PrimitiveNode" or mode == MODE_MUTED:
            return None
        if src["type"] in FRONTEND_ONLY:
            return None
        if mode == MODE_BYPASS:
            outs = src.get("outputs") or []
            out_type = outs[src_slot]["type"] if src_slot < len(outs) else typ
            ins = src.get("inputs") or []
            candidates = []
            if src_slot < len(ins):
                candidates.append(ins[src_slot])
            candidates.extend(ins)
            for inp in candidates:
                if inp.get("link") is not None and _types_match(inp.get("type"), out_type):
                    return resolve(inp["link"], (*seen, link_id))
            return None
        return [str(src_id), src_slot]

    prompt: dict[str, dict] = {}
    for nid, node in nodes.items():
        typ = node["type"]
        if typ not in object_info or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASS):
            continue
        specs = ordered_inputs(object_info[typ])
        linked: dict[str, Any] = {}
        for inp in node.get("inputs") or []:
            # a widget shown as a socket names its widget under "widget"
            w = inp.get("widget")
            key = w["name"] if isinstance(w, dict) and w.get("name") else inp["name"]
            if linked.get(key) is None:
                linked[key] = inp.get("link")

        values = node.get("widgets_values")
        if values is None:
            values = []
        widget_specs = [(n, s) for n, s in specs if is_widget(s)]
        by_name: dict[str, Any] = {}
        if isinstance(values, dict):  # some packs save {name: value}
            by_name = {n: values[n] for n, _ in widget_specs if n in values}
        else:
            base = len(widget_specs)
            extras = sum(extra_widget_values(n, s) for n, s in widget_specs)
            if len(values) == base + extras:
                with_extras = True
            elif len(values) == base:
                with_extras = False
            else:
                raise WorkflowError(
                    f"node {nid} ({typ}): {len(values)} widget values, but the server's inputs need "
                    f"{base + extras} ({base} widgets and {extras} helper values such as "
                    "control_after_generate): the node's definition changed since the workflow was saved")
            i = 0
            for n, s in widget_specs:
                by_name[n] = values[i]
                i += 1 + (extra_widget_values(n, s) if with_extras else 0)

        inputs: dict[str, Any] = {}
        for name, spec in specs:
            src = resolve(linked.get(name)) if linked.get(name) is not None else None
            if src is not None:
                inputs[name] = src
            elif name in by_name:
                inputs[name] = by_name[name]
        entry = {"class_type": typ, "inputs": inputs}
        title = node.get("title")
        entry["_meta"] = {"title": title or object_info[typ].get("display_name") or typ}
        prompt[str(nid)] = entry
    return prompt


def api_to_ui(prompt: dict, object_info: dict, note: str | None = None, titles: dict | None = None,
              extra: dict | None = None) -> dict:
    """A UI-format workflow for an API-format prompt (the inverse of ``ui_to_api``).

    Node ids are kept (they must be integers); nodes are laid out left to right by their
    depth in the graph; ``note`` adds a Note node at the left; ``titles`` maps node ids to
    titles shown on the nodes.
    """
    titles = titles or {}
    ids = sorted(prompt, key=int)
    depth: dict[str, int] = {}

    def node_depth(nid: str) -> int:
        if nid not in depth:
            depth[nid] = 0
            ups = [v[0] for v in prompt[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((node_depth(str(u)) for u in ups), default=-1)
        return depth[nid]

    for nid in ids:
        node_depth(nid)
    rows: dict[int, int] = {}  # column -> next free y
    nodes, links = [], []
    pending = []
    for nid in sorted(ids, key=lambda n: (depth[n], int(n))):
        node = prompt[nid]
        cls = node["class_type"]
        if cls not in object_info:
            raise WorkflowError(f"node {nid}: type {cls!r} is not known to this server")
        info = object_info[cls]
        inputs, widgets = [], []
        for name, spec in ordered_inputs(info):
            value = node["inputs"].get(name)
            if is_widget(spec):
                if isinstance(value, list):  # a widget fed by a link: a socket that names its widget
                    typ = _spec_type(spec)
                    entry = {"name": name, "type": typ if isinstance(typ, str) else "COMBO",
                             "widget": {"name": name}, "link": None}
                    pending.append((str(value[0]), int(value[1]), nid, len(inputs), entry))
                    inputs.append(entry)
                    value = None
                if value is None:
                    value = _spec_options(spec).get("default")
                widgets.append(value)
                extras = extra_widget_values(name, spec)
                if extras:
                    opts = _spec_options(spec)
                    if _spec_type(spec) == "INT" or opts.get("control_after_generate"):
                        widgets.append("fixed")
                        extras -= 1
                    widgets.extend(["image"] * extras)
            else:
                typ = _spec_type(spec)
                entry = {"name": name, "type": typ if isinstance(typ, str) else "COMBO", "link": None}
                if isinstance(value, list):
                    pending.append((str(value[0]), int(value[1]), nid, len(inputs), entry))
                inputs.append(entry)
        outs = [{"name": (info.get("output_name") or info["output"])[k], "type": t, "links": [], "slot_index": k}
                for k, t in enumerate(info.get("output", []))]
        col = depth[nid]
        # tall enough for every socket and widget (the frontend draws ~24 px per row)
        height = 46 + 24 * (max(len(inputs), len(outs)) + len(widgets))
        if cls in ("LoadImage", "SaveImage", "PreviewImage"):
            height = max(height, 330)
        top = rows.get(col, 0)
        rows[col] = top + height + 60
        ui = {"id": int(nid), "type": cls, "pos": [col * 380, top], "size": [340, height], "flags": {},
              "order": len(nodes), "mode": 0, "inputs": inputs, "outputs": outs,
              "properties": {"Node name for S&R": cls}, "widgets_values": widgets}
        if nid in titles:
            ui["title"] = titles[nid]
        nodes.append(ui)
    by_id = {str(n["id"]): n for n in nodes}
    for k, (src, slot, dst, dslot, entry) in enumerate(pending, start=1):
        typ = by_id[src]["outputs"][slot]["type"]
        entry["link"] = k
        by_id[src]["outputs"][slot]["links"].append(k)
        links.append([k, int(src), slot, int(dst), dslot, typ])
    for n in nodes:
        for o in n["outputs"]:
            if not o["links"]:
                o["links"] = None
    last = max(int(i) for i in ids)
    if note:
        last += 1
        nodes.insert(0, {"id": last, "type": "Note", "pos": [-520, 0], "size": [480, 640], "flags": {},
                         "order": 0, "mode": 0, "inputs": [], "outputs": [], "properties": {},
                         "widgets_values": [note], "title": "Read me", "color": "#432", "bgcolor": "#653"})
    return {"last_node_id": last, "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": dict(extra or {}, ds={"scale": 0.8, "offset": [560, 80]}), "version": 0.4}


def load_prompt(path: str | Path, object_info: dict) -> dict:
    """The API prompt of a workflow file: a UI-format workflow is converted, an API-format one kept."""
    wf = json.loads(Path(path).read_text(encoding="utf-8"))
    return ui_to_api(wf, object_info) if "nodes" in wf else wf


def api_twin_text(prompt: dict) -> str:
    """The file text of an API-format prompt as shipped in ``workflows/api/``: nodes in id order, one
    stable layout, so that a converter change shows up as a diff of the twins."""
    ordered = {nid: prompt[nid] for nid in sorted(prompt, key=int)}
    return json.dumps(ordered, indent=2, ensure_ascii=False) + "\n"


def output_titles(workflow: dict, object_info: dict) -> dict[int, str | None]:
    """{node id: title} of a UI workflow's output nodes (``output_node`` in /object_info), as saved
    (None where the node keeps its type's name). Muted and bypassed nodes are left out."""
    return {int(n["id"]): n.get("title") for n in workflow["nodes"]
            if n["type"] in object_info and object_info[n["type"]].get("output_node")
            and n.get("mode", 0) not in (MODE_MUTED, MODE_BYPASS)}


def find_node(prompt: dict, key: str) -> str:
    """The id of the one node of an API prompt that ``key`` names: its title (``_meta.title``), its
    class_type, or ``#<id>``. A key that names no node, or several, is an error."""
    if key.startswith("#") and key[1:] in prompt:
        return key[1:]
    hits = [nid for nid, n in prompt.items() if key in ((n.get("_meta") or {}).get("title"), n["class_type"])]
    if len(hits) != 1:
        raise WorkflowError(f"{key!r} names {len(hits)} nodes of the prompt ({', '.join(hits) or 'none'}), not one")
    return hits[0]


def set_inputs(prompt: dict, values: dict[str, dict]) -> dict:
    """Set inputs in place: ``values`` maps a node key (see ``find_node``) to ``{input: value}``. Returns ``prompt``."""
    for key, inputs in values.items():
        prompt[find_node(prompt, key)]["inputs"].update(inputs)
    return prompt
