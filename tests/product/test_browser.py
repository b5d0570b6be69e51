# SPDX-License-Identifier: GPL-3.0-or-later
"""The shipped workflows in the real ComfyUI frontend, in headless Chromium, as a person uses them.

One ComfyUI server (the demo models in its model folders, the demo's sample images in its input
folder) serves the frontend it ships (comfyui_frontend_package 1.32.9, pinned in scripts/host-lock.txt;
``python3 scripts/comfy_host.py test-frontend [VERSION]`` runs this file against another one, by default
the newest on the package index, installed beside the host).  The checks hold on both: node ids
are compared as numbers (1.5x frontends give them as strings), and a node the page flags in error
(``has_errors``, which 1.5x sets on a node whose model or image is not installed) is a problem only
when no model or image of it is missing.  One headless Debian
Chromium, driven by playwright, opens the page once; then, for every ``workflows/*.json`` (picked up
by glob, so new workflows are tested too):

* the workflow is loaded with ``app.loadGraphData(json)`` (the code path of a drop) and read back
  from the page's LiteGraph objects (``app.graph``) with ``page.evaluate``;
* no node type is missing (every type is a registered LiteGraph node), and no node is flagged in
  error but for a model or image this server lacks;
* every link of the file is in the page, from the same output to the same input (by name), and
  both ends point at it; the page has no other link;
* every widget shows the value the file stores for it: ``widgets_values`` is laid out by the
  server's ``/object_info`` (inputs in ``input_order``, plus the frontend's control_after_generate
  and upload values) and compared, name by name and in order, with the page's widgets;
* a combo shows one of its options, except where the combo lists the user's own files (model
  files, or input images with an upload button): a workflow for a model or image this server does
  not have keeps its name, as the frontend does (the user installs the model, picks the image); the
  demo workflows' models and images are all on this server, so theirs must resolve;
* every node is at least as large as the page's minimum size for its widgets (computeSize);
* the page raised no uncaught error while loading;
* the API prompt the page queues (the Queue Prompt command, as Run sends it; its POST to /prompt is
  captured and answered by the test, so nothing runs) is the one ``tools/dpmtools/workflow.py`` makes
  from the file, which the workflow tests and the demo run, and the file's shipped API twin
  ``workflows/api/<name>.json``: classes, inputs and titles.

Then a real file drop (a DragEvent with a DataTransfer holding the JSON file, dispatched on the
canvas) loads ``workflows/demo_translate.json``; it is queued with the page's Queue Prompt shortcut
(Ctrl+Enter, the Run button's command), and the test waits for the page to receive and draw every
Save Image output (``app.nodeOutputs`` filled from the websocket, each node's preview ``<img>``
loaded).  The server ran exactly the file's prompt once, the page shows the bytes the server saved,
and the images are what the workflow promises (the replay with model A is the VAE round trip, the
replay with model B is not).

Chromium is Debian's ``chromium`` package (never a downloaded browser).  Without it this test fails
with the install command; ``python3 scripts/comfy_host.py test`` installs it when run as root (CI).
"""
from __future__ import annotations

import base64
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpmtools.workflow import FRONTEND_ONLY, extra_widget_values, is_combo, is_widget, ordered_inputs, ui_to_api

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
MODELS = REPO / "demo" / "models"
CHROMIUM = os.environ.get("DPM_LATENT_CHROMIUM", "/usr/bin/chromium")
INSTALL = "sudo apt-get update && sudo apt-get install -y chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# A returning user: no template browser on first start, no full-detail cut-off when zoomed out (the
# screenshot), no minimap over the graph.
SETTINGS = {"Comfy.TutorialCompleted": True, "LiteGraph.Canvas.MinFontSizeForLOD": 0,
            "Comfy.Minimap.Visible": False}
QUEUED = "demo_translate"          # the workflow dropped as a file and queued from the page
SCREENSHOT = "demo_clip_generation"  # the workflow whose rendered page is saved as a screenshot
PAGE_TIMEOUT_MS = 120_000
RUN_TIMEOUT_MS = 300_000

# The page's view of the graph: plain data out of the LiteGraph objects.
READ_GRAPH = """() => {
  const g = window.app.graph;
  const values = w => {
    const v = w.options && w.options.values;
    return Array.isArray(v) ? v : (typeof v === 'function' ? v() : null);
  };
  const links = [];
  for (const l of (g.links instanceof Map ? g.links.values() : Object.values(g.links || {}))) {
    if (l) links.push({id: l.id, origin_id: l.origin_id, origin_slot: l.origin_slot,
                       target_id: l.target_id, target_slot: l.target_slot, type: l.type});
  }
  const nodes = g._nodes.map(n => ({
    id: n.id, type: n.type, mode: n.mode,
    registered: !!window.LiteGraph.registered_node_types[n.type], has_errors: !!n.has_errors,
    size: [n.size[0], n.size[1]], min_size: Array.from(n.computeSize()),
    // "$$" widgets are the frontend's own displays (an image preview), never stored in a file
    widgets: (n.widgets || []).filter(w => !String(w.name).startsWith('$$')).map(w => ({name: w.name, type: w.type, value: w.value, options: values(w)})),
    inputs: (n.inputs || []).map(i => ({name: i.name, type: i.type, link: i.link})),
    outputs: (n.outputs || []).map(o => ({name: o.name, type: o.type, links: o.links ? Array.from(o.links) : []})),
  }));
  return {nodes, links};
}"""

DROP_FILE = """([name, text]) => {
  const dt = new DataTransfer();
  dt.items.add(new File([text], name, {type: 'application/json'}));
  const canvas = document.querySelector('canvas#graph-canvas') || document.querySelector('canvas');
  canvas.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
}"""

# Each Save Image's first output as the page shows it: the output record, and the node's preview
# <img> once loaded (its natural size) with its bytes fetched from the same URL.
OUTPUTS_RECEIVED = """(ids) => ids.every(id => {
  const rec = window.app.nodeOutputs[String(id)];
  return !!(rec && rec.images && rec.images.length);
})"""
# ... and shown: LiteGraph makes a node's preview <img> when it draws the node
OUTPUTS_SHOWN = """(ids) => ids.every(id => {
  const node = window.app.graph.getNodeById(Number(id));
  const rec = window.app.nodeOutputs[String(id)];
  const img = node && node.imgs && node.imgs[0];
  return !!(rec && rec.images && rec.images.length && img && img.complete && img.naturalWidth);
})"""
READ_OUTPUTS = """async (ids) => {
  const out = {};
  for (const id of ids) {
    const node = window.app.graph.getNodeById(Number(id));
    const rec = window.app.nodeOutputs[String(id)];
    const img = node && node.imgs && node.imgs[0];
    if (!rec || !rec.images || !rec.images.length || !img || !img.complete || !img.naturalWidth) return null;
    const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
    let bin = '';
    for (const b of bytes) bin += String.fromCharCode(b);
    out[id] = {record: rec.images[0], src: img.src, width: img.naturalWidth, height: img.naturalHeight,
               png: btoa(bin)};
  }
  return out;
}"""


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def api_twin(path: Path) -> dict:
    """The shipped API-format twin of a UI workflow (workflows/api/, scripts/export_api_workflows.py)."""
    twin = path.parent / "api" / path.name
    assert twin.is_file(), f"{twin} is missing: run python3 scripts/comfy_host.py export-api"
    return json.loads(twin.read_text())


def queue_from_page(p) -> dict:
    """What the page POSTs to /prompt when the user queues the loaded workflow (the Queue Prompt
    command, as Run and Ctrl+Enter do), captured on its way out and answered in the server's stead,
    so nothing runs: {"prompt": ..., "client_id": ..., "extra_data": ...}."""
    def answer(route):
        if route.request.method != "POST":
            route.continue_()
            return
        route.fulfill(status=200, content_type="application/json",
                      body=json.dumps({"prompt_id": "captured-by-the-test", "number": 0, "node_errors": {}}))

    p.route("**/prompt", answer)
    try:
        with p.expect_request(lambda r: r.method == "POST" and r.url.split("?")[0].endswith("/prompt")) as req:
            p.evaluate("() => window.app.extensionManager.command.execute('Comfy.QueuePrompt')")
        return req.value.post_data_json
    finally:
        p.unroute("**/prompt", answer)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def demo():
    from dpmtools.comfy_env import load_module

    return load_module("dpm_demo_script", REPO / "scripts" / "demo.py")


@pytest.fixture(scope="module")
def ui_server(demo, tmp_path_factory):
    """A server with the demo models and the demo's sample images, as after the README's demo command."""
    from dpmtools.comfy_env import comfy_dir
    from dpmtools.server import TEST_PACK_NAME, ComfyServer

    for sub, name in (("checkpoints", demo.CKPT_A), ("checkpoints", demo.CKPT_B), ("clip_energy", demo.CLIP_NAME)):
        assert (MODELS / sub / name).exists(), f"shipped demo model {sub}/{name} is missing"
    work = tmp_path_factory.mktemp("ui")
    (work / "user" / "default").mkdir(parents=True)
    (work / "user" / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS))
    srv = ComfyServer(comfy_dir(), work, python=sys.executable,
                      model_dirs={"checkpoints": MODELS / "checkpoints", "clip_energy": MODELS / "clip_energy",
                                  "diffusion_models": MODELS / "video"},
                      pack_name=TEST_PACK_NAME)
    srv.start()
    demo.write_sample_inputs(Path(srv.input_dir))  # images, and the video twin's clip latents
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def object_info(ui_server):
    return ui_server.object_info()


@pytest.fixture(scope="module")
def model_files(ui_server):
    """{folder: set of names a model combo may list}: files, and the folders they are in."""
    out = {}
    for folder in ui_server.get("/models"):
        names = set()
        for f in ui_server.get(f"/models/{folder}"):
            parts = f.replace("\\", "/").split("/")
            names.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        out[folder] = names
    return out


class Page:
    """The one browser page of this module, and the uncaught errors it raised."""

    def __init__(self, page):
        self.page = page
        self.errors: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    def read_graph(self) -> dict:
        return self.page.evaluate(READ_GRAPH)


@pytest.fixture(scope="module")
def chromium():
    """Debian's chromium and playwright, or a failure that says how to get them (never a skip)."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: the browser test needs Debian's chromium. Install it with\n"
                    f"    {INSTALL}\n(`python3 scripts/comfy_host.py test` does this itself when run as root)",
                    pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing in the host's Python: pip install playwright==1.65.2 "
                    "(the host built by scripts/comfy_host.py has it; never run `playwright install`, "
                    "the test uses Debian's chromium)", pytrace=False)
    return sync_playwright


@pytest.fixture(scope="module")
def page(chromium, ui_server, tmp_path_factory):
    sync_playwright = chromium

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1600, "height": 1000})
        try:
            p = ctx.pages[0] if ctx.pages else ctx.new_page()
            p.set_default_timeout(PAGE_TIMEOUT_MS)
            wrapped = Page(p)
            p.goto(ui_server.url + "/")
            p.wait_for_function("() => window.app && window.app.graph && window.app.vueAppReady && "
                                "window.LiteGraph && Object.keys(window.LiteGraph.registered_node_types).length > 0")
            yield wrapped
        finally:
            ctx.close()


# ---------------------------------------------------------------------------- what the file should show
def helper_widgets(name: str, spec) -> list[str]:
    """Names of the widgets the frontend adds after an input's widget (their values are stored too)."""
    opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    names = []
    if is_combo(spec):
        if opts.get("control_after_generate"):
            names.append("control_after_generate")
        if any(opts.get(f) for f in ("image_upload", "video_upload", "audio_upload")):
            names.append("upload")
    elif extra_widget_values(name, spec):
        names.append("control_after_generate")
    assert len(names) == extra_widget_values(name, spec), (name, spec)
    return names


def expected_widgets(node: dict, object_info: dict) -> list[tuple[str, object]]:
    """[(widget name, value)] in the order the page should show them, from the file and /object_info."""
    values = node.get("widgets_values") or []
    if node["type"] not in object_info:  # a frontend-only node: its own widgets, by position
        return [(None, v) for v in values]
    widget_specs = [(n, s) for n, s in ordered_inputs(object_info[node["type"]]) if is_widget(s)]
    if isinstance(values, dict):
        return [(n, values[n]) for n, _ in widget_specs if n in values]
    extras = sum(extra_widget_values(n, s) for n, s in widget_specs)
    assert len(values) == len(widget_specs) + extras, (
        f"node {node['id']} ({node['type']}): {len(values)} widget values, the server's inputs need "
        f"{len(widget_specs) + extras}")
    out, i = [], 0
    for name, spec in widget_specs:
        out.append((name, values[i]))
        i += 1
        for helper in helper_widgets(name, spec):
            out.append((helper, values[i]))
            i += 1
    return out


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def check_graph(path: Path, wf: dict, shown: dict, object_info: dict, model_files: dict) -> list[str]:
    """Every difference between the file and what the page shows, as readable lines."""
    problems = []
    file_nodes = {int(n["id"]): n for n in wf["nodes"]}
    page_nodes = {int(n["id"]): n for n in shown["nodes"]}
    if set(file_nodes) != set(page_nodes):
        problems.append(f"nodes in the file {sorted(file_nodes)} but in the page {sorted(page_nodes)}")
    model_names = set().union(*model_files.values()) if model_files else set()
    model_names.add("pixel_space")  # VAE Loader lists it beside the VAE files on every server

    for nid, fn in file_nodes.items():
        pn = page_nodes.get(nid)
        if pn is None:
            continue
        where = f"node {nid} ({fn['type']})"
        if pn["type"] != fn["type"]:
            problems.append(f"{where}: the page made it a {pn['type']}")
        if fn["type"] not in FRONTEND_ONLY and fn["type"] not in object_info:
            problems.append(f"{where}: the server does not know this node type")
        if not pn["registered"]:
            problems.append(f"{where}: missing node type in the page (not a registered LiteGraph node)")
        if pn["mode"] != fn.get("mode", 0):
            problems.append(f"{where}: mode {fn.get('mode', 0)} in the file, {pn['mode']} in the page")

        # widgets: name by name, in order
        want = expected_widgets(fn, object_info)
        got = [(w["name"], w["value"]) for w in pn["widgets"]]
        if len(want) != len(got):
            problems.append(f"{where}: widgets {[n for n, _ in got]} in the page, the file stores "
                            f"{len(want)} values for {[n for n, _ in want]}")
        for (wname, wval), w in zip(want, pn["widgets"]):
            if wname is not None and w["name"] != wname:
                problems.append(f"{where}: the page shows widget {w['name']!r} where /object_info puts {wname!r}")
            if not _same(w["value"], wval):
                problems.append(f"{where}: widget {w['name']!r} shows {w['value']!r}, the file stores {wval!r}")
        specs = dict(ordered_inputs(object_info[fn["type"]])) if fn["type"] in object_info else {}
        not_installed = []  # the user's own files this node names and this server does not have
        for w in pn["widgets"]:
            spec = specs.get(w["name"])
            if spec is None or not is_combo(spec) or w["options"] is None or w["value"] in w["options"]:
                continue
            opts = set(map(str, w["options"]))
            # the user's own files: a model combo (it lists model files) or an input image (upload)
            user_file = not w["options"] or opts <= model_names or bool(helper_widgets(w["name"], spec)[-1:] == ["upload"])
            if not user_file or path.stem.startswith("demo_"):
                problems.append(f"{where}: combo {w['name']!r} shows {w['value']!r}, not one of its options "
                                f"{sorted(opts)[:8]}")
            else:
                not_installed.append(w["name"])
        # Newer frontends (1.5x) flag a node whose model or image is not installed (has_errors); that
        # is the user's to install, as above.  A node in error for any other reason is a problem.
        if pn["has_errors"] and not not_installed:
            problems.append(f"{where}: the page flags the node in error (has_errors), and not for a model "
                            "or image this server lacks")

        # size: the node has room for its widgets
        if pn["size"][0] + 1 < pn["min_size"][0] or pn["size"][1] + 1 < pn["min_size"][1]:
            problems.append(f"{where}: size {fn.get('size')} is smaller than the page's minimum "
                            f"{[round(x) for x in pn['min_size']]} for its widgets")

    # links: the file's links by (node, output name) -> (node, input name), both ends pointing at them
    def by_name(nodes, link):
        src, dst = nodes.get(int(link[1])), nodes.get(int(link[3]))
        if src is None or dst is None:
            return None
        outs, ins = src.get("outputs") or [], dst.get("inputs") or []
        if link[2] >= len(outs) or link[4] >= len(ins):
            return None
        return (int(link[1]), outs[link[2]]["name"], int(link[3]), ins[link[4]]["name"])

    file_links = {}
    for link in wf["links"]:
        lid = link[0] if isinstance(link, list) else link["id"]
        row = link if isinstance(link, list) else [link["id"], link["origin_id"], link["origin_slot"],
                                                   link["target_id"], link["target_slot"], link.get("type")]
        file_links[int(lid)] = by_name(file_nodes, row)
    page_links = {}
    for link in shown["links"]:
        row = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link["type"]]
        key = by_name(page_nodes, row)
        page_links[int(link["id"])] = key
        if key is None:
            problems.append(f"link {link['id']}: dangling in the page ({row})")
            continue
        src, dst = page_nodes[int(link["origin_id"])], page_nodes[int(link["target_id"])]
        if dst["inputs"][link["target_slot"]]["link"] != link["id"]:
            problems.append(f"link {link['id']}: input {key[3]!r} of node {key[2]} does not point at it")
        if link["id"] not in src["outputs"][link["origin_slot"]]["links"]:
            problems.append(f"link {link['id']}: output {key[1]!r} of node {key[0]} does not list it")
    if sorted(filter(None, file_links.values())) != sorted(filter(None, page_links.values())):
        problems.append(f"links differ: file only {set(file_links.values()) - set(page_links.values())}, "
                        f"page only {set(page_links.values()) - set(file_links.values())}")
    for nid, pn in page_nodes.items():
        for inp in pn["inputs"]:
            if inp["link"] is not None and int(inp["link"]) not in page_links:
                problems.append(f"node {nid}: input {inp['name']!r} points at link {inp['link']}, which is not in the graph")
    return problems


def prompt_differences(page_prompt: dict, api: dict) -> list[str]:
    """Where the API prompt the page queues differs from another (tools/dpmtools/workflow.py's conversion,
    a shipped API twin): node classes, titles and inputs."""
    problems = []
    if set(page_prompt) != set(api):
        problems.append(f"the page would queue nodes {sorted(page_prompt, key=int)}, the converter {sorted(api, key=int)}")
    for nid in sorted(set(page_prompt) & set(api), key=int):
        a, b = page_prompt[nid], api[nid]
        if a["class_type"] != b["class_type"]:
            problems.append(f"node {nid}: {a['class_type']} in the page's prompt, {b['class_type']} converted")
            continue
        ta, tb = (a.get("_meta") or {}).get("title"), (b.get("_meta") or {}).get("title")
        if ta != tb:  # clients pick nodes (outputs) by this title
            problems.append(f"node {nid} ({a['class_type']}): titled {ta!r} in the page's prompt, {tb!r} converted")
        for name in sorted(set(a["inputs"]) | set(b["inputs"])):
            va, vb = a["inputs"].get(name, "<missing>"), b["inputs"].get(name, "<missing>")
            if isinstance(va, list) and isinstance(vb, list):
                same = [str(va[0]), int(va[1])] == [str(vb[0]), int(vb[1])]
            else:
                same = _same(va, vb)
            if not same:
                problems.append(f"node {nid} ({a['class_type']}) input {name!r}: the page queues {va!r}, "
                                f"the converter {vb!r}")
    return problems


def _load_in_page(page: Page, wf: dict) -> dict:
    page.page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", wf)
    return page.read_graph()


# ---------------------------------------------------------------------------- the tests
def test_every_shipped_workflow_is_tested():
    assert len(WORKFLOWS) >= 9 and QUEUED in {p.stem for p in WORKFLOWS} and SCREENSHOT in {p.stem for p in WORKFLOWS}


def test_the_page_is_the_frontend_under_test(page):
    """The page runs the comfyui-frontend-package this Python imports (the host's pin, or the one
    ``comfy_host.py test-frontend`` put first on PYTHONPATH, which it names in DPM_LATENT_FRONTEND)."""
    from importlib.metadata import version

    served = page.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || null")
    assert served == version("comfyui-frontend-package"), served
    assert served == os.environ.get("DPM_LATENT_FRONTEND", served), (served, os.environ["DPM_LATENT_FRONTEND"])


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_in_the_frontend(path, page, object_info, model_files, tmp_path):
    wf = _load(path)
    errors_before = len(page.errors)
    shown = _load_in_page(page, wf)
    problems = check_graph(path, wf, shown, object_info, model_files)
    problems += [f"uncaught error in the page while loading: {e}" for e in page.errors[errors_before:]]
    assert not problems, f"{path.name} in the frontend:\n  " + "\n  ".join(problems)
    # the prompt the page sends when queued is the one the other tests and the demo send for this file,
    # and the file's shipped API twin (titles included: clients pick outputs by title)
    page_prompt = queue_from_page(page.page)["prompt"]
    problems = prompt_differences(page_prompt, ui_to_api(wf, object_info))
    assert not problems, f"{path.name}: the page's prompt and tools/dpmtools/workflow.py differ:\n  " + "\n  ".join(problems)
    problems = prompt_differences(page_prompt, api_twin(path))
    assert not problems, f"{path.name}: the page queues another prompt than workflows/api/{path.name}:\n  " + "\n  ".join(problems)
    if path.stem == SCREENSHOT:
        page.page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        page.page.wait_for_timeout(300)
        shot = Path(os.environ.get("DPM_LATENT_SCREENSHOT_DIR", tmp_path)) / f"{path.stem}.png"
        page.page.screenshot(path=str(shot))
        with Image.open(shot) as im:
            # the canvas drew the graph (node bodies, widget text, links), not an empty page
            assert im.size == (1600, 1000) and len(im.convert("RGB").getcolors(1 << 20)) > 200


def test_check_graph_finds_what_it_should(page, object_info, model_files):
    """The comparisons can fail: a shifted widget value, a dropped link, a missing node type, a bad combo
    value, a node too small, and a prompt that differs from the converter's are each reported."""
    path = REPO / "workflows" / f"{QUEUED}.json"
    wf = _load(path)
    shown = _load_in_page(page, wf)
    assert check_graph(path, wf, shown, object_info, model_files) == []

    bad = json.loads(json.dumps(shown))
    enc = next(n for n in bad["nodes"] if n["type"] == "DPMEncode")
    steps = next(w for w in enc["widgets"] if w["name"] == "steps")
    steps["value"] += 1
    assert any("'steps' shows" in p for p in check_graph(path, wf, bad, object_info, model_files))

    bad = json.loads(json.dumps(shown))
    gone = bad["links"].pop()
    probs = check_graph(path, wf, bad, object_info, model_files)
    assert any(f"link {gone['id']}" in p or "links differ" in p for p in probs), probs

    bad = json.loads(json.dumps(shown))
    first_node = next(n for n in bad["nodes"] if n["type"] == "DPMEncode")
    first_node["registered"] = False
    assert any("missing node type" in p for p in check_graph(path, wf, bad, object_info, model_files))

    # the page's prompt against the API twin: a title that differs is reported (clients pick outputs by title)
    renamed = json.loads(json.dumps(api_twin(path)))
    save_id = next(k for k, n in renamed.items() if n["class_type"] == "SaveImage")
    renamed[save_id]["_meta"]["title"] = "Save Image"
    probs = prompt_differences(ui_to_api(wf, object_info), renamed)
    assert probs == [f"node {save_id} (SaveImage): titled {api_twin(path)[save_id]['_meta']['title']!r} in the "
                     "page's prompt, 'Save Image' converted"], probs

    bad = json.loads(json.dumps(shown))
    ks = next(n for n in bad["nodes"] if n["type"] == "KSampler")
    next(w for w in ks["widgets"] if w["name"] == "sampler_name")["value"] = "no_such_sampler"
    wf_bad = json.loads(json.dumps(wf))
    ks_file = next(n for n in wf_bad["nodes"] if n["type"] == "KSampler")
    ks_file["widgets_values"][4] = "no_such_sampler"
    assert any("not one of its options" in p for p in check_graph(path, wf_bad, bad, object_info, model_files))

    bad = json.loads(json.dumps(shown))
    enc = next(n for n in bad["nodes"] if n["type"] == "DPMEncode")
    enc["min_size"] = [enc["size"][0], enc["size"][1] + 40]
    assert any("smaller than the page's minimum" in p for p in check_graph(path, wf, bad, object_info, model_files))

    # the page's prompt against the converter's: a changed value and a moved link are reported
    page_prompt = page.page.evaluate("async () => (await window.app.graphToPrompt()).output")
    api = ui_to_api(wf, object_info)
    assert prompt_differences(page_prompt, api) == []
    enc_id = next(k for k, n in api.items() if n["class_type"] == "DPMEncode")
    api[enc_id]["inputs"]["steps"] += 1
    api[enc_id]["inputs"]["model"] = [next(k for k, n in api.items() if n["class_type"] == "LoadImage"), 0]
    probs = prompt_differences(page_prompt, api)
    assert len(probs) == 2 and "'steps'" in probs[0] + probs[1] and "'model'" in probs[0] + probs[1], probs

    # a model this server does not have is the user's to install: named, not an error, outside the demo
    other = path.with_name("my_translation.json")
    bad = json.loads(json.dumps(shown))
    wf_other = json.loads(json.dumps(wf))
    for n_page, n_file in ((n, next(m for m in wf_other["nodes"] if int(m["id"]) == int(n["id"]))) for n in bad["nodes"]
                           if n["type"] == "CheckpointLoaderSimple"):
        n_page["widgets"][0]["value"] = n_file["widgets_values"][0] = "v1-5-pruned-emaonly.safetensors"
        n_page["has_errors"] = True  # as frontend 1.5x flags it
    assert check_graph(other, wf_other, bad, object_info, model_files) == []
    assert any("not one of its options" in p for p in check_graph(path, wf_other, bad, object_info, model_files))
    # ... but a node in error with its files all there is reported, as is an unregistered one
    bad = json.loads(json.dumps(shown))
    next(n for n in bad["nodes"] if n["type"] == "DPMEncode")["has_errors"] = True
    probs = check_graph(other, wf, bad, object_info, model_files)
    assert len(probs) == 1 and "flags the node in error" in probs[0], probs


def test_drop_demo_workflow_file_and_run_it_from_the_page(page, ui_server, object_info, model_files):
    path = REPO / "workflows" / f"{QUEUED}.json"
    wf = _load(path)
    text = path.read_text()
    p = page.page
    p.evaluate("() => window.app.graph.clear()")
    errors_before = len(page.errors)
    p.evaluate(DROP_FILE, [path.name, text])
    p.wait_for_function("(n) => window.app.graph._nodes.length === n", arg=len(wf["nodes"]))
    shown = page.read_graph()
    problems = check_graph(path, wf, shown, object_info, model_files)
    assert not problems, "\n".join(problems)

    saves = sorted(str(n["id"]) for n in wf["nodes"] if n["type"] == "SaveImage")
    assert len(saves) == 4, saves
    # Queue as a user does: the "Queue Prompt" shortcut, the same command as the Run button.  (A click
    # on Run is not used: after a drop the frontend's busy overlay sometimes stays in front of it in
    # headless Chromium, a frontend issue unrelated to the workflow.)
    p.keyboard.press("Control+Enter")
    p.wait_for_function(OUTPUTS_RECEIVED, arg=saves, timeout=RUN_TIMEOUT_MS, polling=250)
    p.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    p.wait_for_function(OUTPUTS_SHOWN, arg=saves, polling=250)
    if os.environ.get("DPM_LATENT_SCREENSHOT_DIR"):
        p.screenshot(path=str(Path(os.environ["DPM_LATENT_SCREENSHOT_DIR"]) / f"{QUEUED}_after_run.png"))
    history = ui_server.get("/history")
    assert len(history) == 1, f"the page queued {len(history)} prompts"
    entry = next(iter(history.values()))
    assert entry["status"]["status_str"] == "success", entry["status"]
    queued = entry["prompt"][2]  # what the server ran: the file's own settings, nothing changed by the page
    assert prompt_differences(queued, ui_to_api(wf, object_info)) == []
    assert prompt_differences(queued, api_twin(path)) == []
    outs = p.evaluate(READ_OUTPUTS, saves)
    assert page.errors[errors_before:] == []
    pngs = {}
    for nid in saves:
        o = outs[nid]
        rec = o["record"]
        assert rec["type"] == "output" and rec["filename"].endswith(".png"), rec
        assert (o["width"], o["height"]) == (64, 64), o
        disk = Path(ui_server.output_dir) / rec.get("subfolder", "") / rec["filename"]
        assert disk.is_file(), disk
        assert base64.b64decode(o["png"]) == disk.read_bytes(), f"node {nid}: the page shows other bytes than {disk}"
        with Image.open(io.BytesIO(base64.b64decode(o["png"]))) as im:
            pngs[nid] = np.asarray(im.convert("RGB")).astype(np.int16)
        assert pngs[nid].std() > 5, f"node {nid}: a flat image"
    # the page ran the workflow it showed: the replay with model A is the VAE round trip (exact
    # reconstruction), the replay with model B is not
    titled = {wf_node["widgets_values"][0].split("/")[-1]: str(wf_node["id"])
              for wf_node in wf["nodes"] if wf_node["type"] == "SaveImage"}
    rec, rt, tr = (pngs[titled[k]] for k in ("reconstruction", "vae_roundtrip", "translation"))
    assert np.abs(rec - rt).max() <= 2
    assert np.abs(tr - rt).mean() > 2
