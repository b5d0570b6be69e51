# SPDX-License-Identifier: GPL-3.0-or-later
"""The shipped workflows (workflows/*.json, UI format) run on a real ComfyUI server with tiny models.

Every file in workflows/ is picked up automatically.  Each one is converted to an API prompt
with tools/dpmtools/workflow.py, then adapted to the tiny test models:

* checkpoint names are mapped to tiny checkpoints (``CHECKPOINTS`` below, plus the workflow's own
  ``extra.dpm_latent_test.checkpoints``);
* Load Image reads a generated 64 x 64 PNG, and resize nodes (``RESIZE``) are bypassed so the
  image keeps that size;
* ``steps`` inputs are cut to ``STEPS`` (``LANGEVIN_CHAIN`` in a workflow with a Langevin Latent Sampler,
  whose every iteration runs the chain forward and backward); the sampler's own ``steps`` (Langevin
  iterations) to ``LANGEVIN_STEPS``;
* CLIP Energy reads the tiny CLIP folder (``CLIP_ENERGY`` below, plus the workflow's own
  ``extra.dpm_latent_test.clip_energy``) with at most ``AUGMENTATIONS`` copies; Random Latent Code
  makes ``SIZE`` x ``SIZE`` images;
* CLIP Text Encode is fed by the tiny CLIP-L (SD1.x family), or, for tiny checkpoints without a
  usable text encoder (SD3, SDXL), replaced by the pack's Empty Conditioning.  A zero context does
  not reach these tiny models' outputs the way a text prompt does (SDXL's cross-attention has no
  bias, so zero text is no text), so a *target* prompt (one that feeds a replay's positive input
  but not an encoder's) becomes Empty Conditioning limited to the left half of the image by
  ConditioningSetAreaPercentage: still a conditioning that differs from the source one.

A workflow may add to its ``extra`` dict a key ``"dpm_latent_test"`` with::

    {"checkpoints": {"<ckpt_name in the workflow>": "<tiny checkpoint file>"},
     "clip_energy": {"<clip_name in the workflow>": "<folder in the test's clip_energy dir>"},
     "mode":        {"<node id>": 0 | 2 | 4},             # applied to the UI graph before conversion
     "images":      {"<Load Image node id>": "inverted"}, # that node reads the test image colour-inverted
     "widgets":     {"<node id>": {"<input>": value}}}    # applied to the API prompt after conversion

Then, for every DPM Encode -> Replay Latent with Prompt pair, the test adds two branches to the
same prompt: the replay with the encoder's own model, prompts and cfg (which must give back the
encoded latent, so its decoded PNG must match the VAE round trip of the input within 2/255), and
that VAE round trip itself.  The workflow's own output must differ from the reconstruction.

For every Langevin Latent Sampler whose LATENT is decoded and saved, the test adds the *unguided*
baseline: for a code from DPM Encode, the reconstruction and the VAE round trip as above; for any
other code (Random Latent Code), the replay of the same code with the sampler's own model, prompts
and cfg.  The guided image must differ from that baseline, the sampled latent must be finite and the
energy plot (shown by Save Image or Preview Image) must be a 512 x 320 image.
"""
from __future__ import annotations

import copy
import io
import json
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpmtools.graphs import rel_err, saved_latents, write_latent
from dpmtools.workflow import (FRONTEND_ONLY, api_twin_text, extra_widget_values, is_combo, is_widget, ordered_inputs,
                               output_titles, ui_to_api)

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
API_DIR = REPO / "workflows" / "api"  # the API-format twins, written by scripts/export_api_workflows.py
STEPS = 6
SIZE = 64
LANGEVIN_STEPS = 2     # Langevin iterations in the tests
LANGEVIN_CHAIN = 4     # chain steps where a Langevin sampler runs the chain forward and backward each iteration
AUGMENTATIONS = 2      # CLIP Energy copies per image in the tests
PLOT_SHAPE = (320, 512, 3)  # the Langevin energy plot, as a PNG array
# CLIP Energy clip_name -> folder that the model_dirs fixture builds in the clip_energy model dir
CLIP_ENERGY = {
    "clip-vit-base-patch32": "tiny_clip",
    "clip-vit-b-32": "tiny_clip",
}
RESIZE = {"ImageScaleToTotalPixels", "ImageScale", "ImageScaleBy", "ImageScaleToMaxDimension"}
CHECKPOINTS = {
    "v1-5-pruned-emaonly.safetensors": "tiny_sd15.safetensors",
    "v1-5-pruned-emaonly-fp16.safetensors": "tiny_sd15.safetensors",
    "sd_xl_base_1.0.safetensors": "tiny_sdxl.safetensors",
    "sd3_medium_incl_clips.safetensors": "tiny_sd3.safetensors",
}
# Load Diffusers DDPM model_name -> folder that the model_dirs fixture builds in the diffusers model dir
# (plus the workflow's own ``extra.dpm_latent_test.diffusers``)
DIFFUSERS = {
    "google/ddpm-cifar10-32": "tiny_ddpm_eps",
}
# Video workflows: diffusion-model and VAE files -> the tiny video models the model_dirs fixture builds (plus the
# workflow's own ``extra.dpm_latent_test.diffusion_models`` / ``vae``); Load Video reads a generated SIZE x SIZE
# clip of CLIP_FRAMES frames; a decoded clip is checked on frame CHECK_FRAME (Image From Batch + Save Image)
DIFFUSION_MODELS = {"wan2.1_t2v_1.3B_fp16.safetensors": "tiny_wan21.safetensors"}
VAES = {"wan_2.1_vae.safetensors": "tiny_wan21_vae.safetensors"}
CLIP_FRAMES = 9
CHECK_FRAME = 6
ANIMATED = {"CreateVideo", "SaveAnimatedWEBP", "SaveAnimatedPNG", "SaveWEBM"}
# tiny checkpoint -> how CLIP Text Encode is handled: "clip_l" (tiny CLIP-L) or "empty" (Empty Conditioning)
TEXT = {
    "tiny_sd15.safetensors": "clip_l",
    "tiny_sd15_b.safetensors": "clip_l",
    "tiny_sd3.safetensors": "empty",
    "tiny_sd3_b.safetensors": "empty",
    "tiny_sdxl.safetensors": "empty",
}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


# ---------------------------------------------------------------------------- static checks
def test_there_are_workflows():
    assert len(WORKFLOWS) >= 6, [p.name for p in WORKFLOWS]
    assert {"langevin_clip_guided_generation", "langevin_clip_guided_editing"} <= {p.stem for p in WORKFLOWS}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_well_formed_ui_json(path):
    wf = _load(path)
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"):
        assert key in wf, key
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf["last_node_id"] >= max(nodes)
    assert not wf["links"] or wf["last_link_id"] >= max(link[0] for link in wf["links"])
    notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert any(n["type"] == "Note" for n in notes), "every workflow explains itself in a Note node"
    assert all(len(n["widgets_values"][0]) > 200 for n in notes if n["type"] == "Note")
    for link in wf["links"]:
        lid, src, sslot, dst, dslot, typ = link
        out = nodes[src]["outputs"][sslot]
        assert lid in (out["links"] or []) and out["type"] == typ, link
        inp = nodes[dst]["inputs"][dslot]
        assert inp["link"] == lid and inp["type"] == typ, link
    for n in wf["nodes"]:
        for k in ("id", "type", "pos", "size", "flags", "order", "mode", "properties", "widgets_values"):
            assert k in n, (n["id"], k)
        for inp in n.get("inputs", []):
            assert inp["link"] is None or any(link[0] == inp["link"] for link in wf["links"]), (n["id"], inp)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_nodes_exist_on_the_server(path, object_info):
    wf = _load(path)
    for n in wf["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        assert n["type"] in object_info, f"{path.name}: node {n['id']} type {n['type']} unknown to the server"
        assert n.get("properties", {}).get("Node name for S&R") == n["type"]
    # converts without error; every required input of every node is set
    api = ui_to_api(wf, object_info)
    for nid, node in api.items():
        required = object_info[node["class_type"]]["input"].get("required", {})
        missing = set(required) - set(node["inputs"])
        assert not missing, (path.name, nid, node["class_type"], missing)



# ---------------------------------------------------------------------------- outputs a client can address
def output_problems(wf: dict, object_info: dict) -> list[str]:
    """Why a client could not pick each output of a workflow by its title, one line each: an output
    node without a title of its own, a title another node of the prompt also has, a file name prefix
    another node of the workflow also writes to."""
    problems = []
    api = ui_to_api(wf, object_info)
    titles = [(n.get("_meta") or {}).get("title") for n in api.values()]
    for nid, title in output_titles(wf, object_info).items():
        if not title:
            problems.append(f"output node {nid} has no title of its own")
        elif titles.count(title) > 1:
            problems.append(f"output node {nid}: {titles.count(title)} nodes are titled {title!r}")
    prefixes = [n["inputs"]["filename_prefix"] for n in api.values() if isinstance(n["inputs"].get("filename_prefix"), str)]
    problems += [f"{prefixes.count(p)} nodes save under {p!r}" for p in sorted(set(prefixes)) if prefixes.count(p) > 1]
    return problems


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_output_has_its_own_title_and_file_prefix(path, object_info):
    wf = _load(path)
    assert output_titles(wf, object_info), f"{path.name} has no output node"
    problems = output_problems(wf, object_info)
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


def test_output_problems_are_found(object_info):
    """The check can fail: untitled Save Images (demo_translate before issue 18), a title that a
    non-output node also has, and two Save Images writing to one prefix are each reported."""
    wf = _load(REPO / "workflows" / "demo_translate.json")
    saves = [n for n in wf["nodes"] if n["type"] == "SaveImage"]
    assert len(saves) == 4 and output_problems(wf, object_info) == []
    bad = copy.deepcopy(wf)
    for n in bad["nodes"]:
        if n["type"] == "SaveImage":
            del n["title"]
    assert len(output_problems(bad, object_info)) == 4
    bad = copy.deepcopy(wf)
    enc = next(n for n in bad["nodes"] if n["type"] == "DPMEncode")
    enc["title"] = saves[0]["title"]
    assert output_problems(bad, object_info) == [f"output node {saves[0]['id']}: 2 nodes are titled {saves[0]['title']!r}"]
    bad = copy.deepcopy(wf)
    next(n for n in bad["nodes"] if n["id"] == saves[1]["id"])["widgets_values"][0] = saves[0]["widgets_values"][0]
    assert output_problems(bad, object_info) == [f"2 nodes save under {saves[0]['widgets_values'][0]!r}"]


def test_file_prefixes_differ_between_workflows():
    """Two shipped workflows never write into one file series of ComfyUI's output folder."""
    seen = {}
    for path in WORKFLOWS:
        for n in _load(path)["nodes"]:
            if n["type"] in ("SaveImage", "SaveAsyrpDirection", "SaveLatentCode", "SaveLatent"):
                prefix = n["widgets_values"][0]
                assert prefix not in seen, f"{path.name} and {seen[prefix]} both save under {prefix!r}"
                seen[prefix] = path.name
    assert len(seen) >= 25, seen


def test_api_twins_are_the_converters_output(object_info):
    """workflows/api/<name>.json is exactly what tools/dpmtools/workflow.py makes of workflows/<name>.json
    with this server's /object_info (tests/product/test_browser.py checks that the page queues the same), and
    there is no twin without its UI file. After changing a workflow: python3 scripts/comfy_host.py export-api"""
    twins = {p.name for p in API_DIR.glob("*.json")}
    assert twins == {p.name for p in WORKFLOWS}, (
        f"twins without a UI file {sorted(twins - {p.name for p in WORKFLOWS})}, UI files without a twin "
        f"{sorted({p.name for p in WORKFLOWS} - twins)}: run python3 scripts/comfy_host.py export-api")
    stale = [p.name for p in WORKFLOWS
             if (API_DIR / p.name).read_text(encoding="utf-8") != api_twin_text(ui_to_api(_load(p), object_info))]
    assert not stale, f"stale API twins {stale}: run python3 scripts/comfy_host.py export-api"
    # a twin is a prompt the server takes as it is: every node's class, inputs and title
    for p in WORKFLOWS:
        twin = json.loads((API_DIR / p.name).read_text())
        assert all(set(n) == {"class_type", "inputs", "_meta"} and n["_meta"].get("title") for n in twin.values())


LANGEVIN_WORKFLOWS = [p for p in WORKFLOWS if p.stem.startswith("langevin_")]
CONTROL_MODES = ("fixed", "increment", "decrement", "randomize")


def _widget_names(object_info: dict, class_type: str) -> list[str]:
    return [n for n, s in ordered_inputs(object_info[class_type]) if is_widget(s)]


def test_langevin_node_widgets_are_what_the_workflows_store(object_info):
    """The specs the Langevin workflows' widgets_values are laid out for: a multiline STRING, BOOLEAN
    toggles and an optional IMAGE socket on CLIP Energy; a seed with control_after_generate and a combo
    on Langevin Latent Sampler and Random Latent Code."""
    ce = dict(ordered_inputs(object_info["CLIPEnergy"]))
    assert _widget_names(object_info, "CLIPEnergy") == [
        "clip_name", "text", "weight", "augmentations", "color", "translation", "resize", "cutout"]
    assert is_combo(ce["clip_name"]) and ce["text"][0] == "STRING" and ce["text"][1].get("multiline") is True
    assert all(ce[k][0] == "BOOLEAN" for k in ("color", "translation", "resize", "cutout"))
    assert not is_widget(ce["image"]) and "image" in object_info["CLIPEnergy"]["input"]["optional"]
    assert sum(extra_widget_values(n, ce[n]) for n in ce if is_widget(ce[n])) == 0
    lv = dict(ordered_inputs(object_info["LangevinLatentSampler"]))
    assert _widget_names(object_info, "LangevinLatentSampler") == ["cfg", "steps", "step_size", "seed", "update",
                                                                    "memory"]
    assert extra_widget_values("seed", lv["seed"]) == 1 and is_combo(lv["update"]) and is_combo(lv["memory"])
    assert extra_widget_values("update", lv["update"]) == 0 and extra_widget_values("memory", lv["memory"]) == 0
    assert "memory" in object_info["LangevinLatentSampler"]["input"]["optional"]
    rc = dict(ordered_inputs(object_info["RandomLatentCode"]))
    assert _widget_names(object_info, "RandomLatentCode") == [
        "width", "height", "batch_size", "seed", "steps", "scheduler", "eta"]
    assert extra_widget_values("seed", rc["seed"]) == 1 and extra_widget_values("steps", rc["steps"]) == 0


@pytest.mark.parametrize("path", LANGEVIN_WORKFLOWS, ids=lambda p: p.stem)
def test_langevin_workflow_widgets_convert(path, object_info):
    """Every widget of CLIP Energy, Langevin Latent Sampler and Random Latent Code lands on the right input,
    with the paper's settings (defaults 50 Langevin steps, 8 copies) and a short chain."""
    wf = _load(path)
    api = ui_to_api(wf, object_info)
    by_type: dict[str, list[dict]] = {}
    for n in wf["nodes"]:
        by_type.setdefault(n["type"], []).append(n)
    assert len(by_type.get("CLIPEnergy", [])) == 1 and len(by_type.get("LangevinLatentSampler", [])) == 1

    ce_ui = by_type["CLIPEnergy"][0]
    ce = api[str(ce_ui["id"])]["inputs"]
    v = ce_ui["widgets_values"]
    assert len(v) == 8
    assert ce == {"clip_name": v[0], "text": v[1], "weight": v[2], "augmentations": v[3],
                  "color": v[4], "translation": v[5], "resize": v[6], "cutout": v[7]}
    assert isinstance(ce["text"], str) and ce["text"].strip() and ce["clip_name"] in CLIP_ENERGY
    assert all(ce[k] is True for k in ("color", "translation", "resize", "cutout"))
    assert ce["weight"] == 500.0 and ce["augmentations"] == 8

    lv_ui = by_type["LangevinLatentSampler"][0]
    lv = api[str(lv_ui["id"])]["inputs"]
    v = lv_ui["widgets_values"]
    assert len(v) == 7 and v[4] in CONTROL_MODES
    assert {k: lv[k] for k in ("cfg", "steps", "step_size", "seed", "update", "memory")} == {
        "cfg": v[0], "steps": v[1], "step_size": v[2], "seed": v[3], "update": v[5], "memory": v[6]}
    assert lv["memory"] == "auto"
    assert lv["steps"] == 50 and lv["step_size"] == 0.05
    # an encoded code keeps its wide per-step noises; a prior code samples every component
    want_update = "start only" if api[lv["latent_code"][0]]["class_type"] == "DPMEncode" else "all components"
    assert lv["update"] == want_update
    assert isinstance(lv["seed"], int) and not isinstance(lv["seed"], bool)
    for sock in ("model", "positive", "negative", "vae", "energy", "latent_code"):
        assert isinstance(lv[sock], list), sock
    assert lv["energy"] == [str(ce_ui["id"]), 0]

    code = api[lv["latent_code"][0]]
    assert code["class_type"] in ("RandomLatentCode", "DPMEncode")
    assert 10 <= code["inputs"]["steps"] <= 20, "keep the replayed chain short: 10-20 steps"
    assert code["inputs"]["eta"] == 0.1
    if code["class_type"] == "RandomLatentCode":
        rc_ui = next(n for n in by_type["RandomLatentCode"] if str(n["id"]) == lv["latent_code"][0])
        v = rc_ui["widgets_values"]
        assert len(v) == 8 and v[4] in CONTROL_MODES
        assert code["inputs"] == {"model": code["inputs"]["model"], "width": v[0], "height": v[1], "batch_size": v[2],
                                  "seed": v[3], "steps": v[5], "scheduler": v[6], "eta": v[7]}
        # the unguided comparison replays the same code with the same model, prompts and cfg
        plain = [n["inputs"] for n in api.values()
                 if n["class_type"] == "ReplayLatentWithPrompt" and n["inputs"]["latent_code"] == lv["latent_code"]]
        assert plain, f"{path.name}: no unguided replay of the random code to compare with"
        assert all(p[k] == lv[k] for p in plain for k in ("model", "positive", "negative", "cfg"))
    else:
        assert code["inputs"]["denoise"] == 0.5
        assert (lv["positive"], lv["cfg"]) == (code["inputs"]["positive"], code["inputs"]["cfg"]), (
            "the Langevin chain replays the code with the encoder's prompt and cfg")

    # the optional image socket takes a link when one is connected
    wf2 = copy.deepcopy(wf)
    nid, lid = wf2["last_node_id"] + 1, wf2["last_link_id"] + 1
    wf2["nodes"].append({"id": nid, "type": "LoadImage", "pos": [0, 0], "size": [1, 1], "flags": {}, "order": 0,
                         "mode": 0, "inputs": [], "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [lid]},
                                                              {"name": "MASK", "type": "MASK", "links": None}],
                         "properties": {}, "widgets_values": ["target.png", "image"]})
    ce2 = next(n for n in wf2["nodes"] if n["id"] == ce_ui["id"])
    slot = next(i for i, inp in enumerate(ce2["inputs"]) if inp["name"] == "image")
    ce2["inputs"][slot]["link"] = lid
    wf2["links"].append([lid, nid, 0, ce_ui["id"], slot, "IMAGE"])
    assert ui_to_api(wf2, object_info)[str(ce_ui["id"])]["inputs"]["image"] == [str(nid), 0]


# ---------------------------------------------------------------------------- running them
def _test_image(path: Path, inverted: bool = False) -> None:
    """The test image; ``inverted``: its colours inverted (a second, different image set)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1)
    disc = ((x - 0.4) ** 2 + (y - 0.55) ** 2 < 0.08).astype(np.float32)
    rgb = np.stack([0.2 + 0.6 * x, 0.3 + 0.5 * y * (1 - disc) + 0.4 * disc, 0.8 - 0.5 * x * y], axis=-1)
    # alpha 0 (Load Image's MASK = 1) on the left 40 columns: the region the masked-edit workflows may change
    alpha = np.full((SIZE, SIZE, 1), 255, dtype=np.uint8)
    alpha[:, :40] = 0
    if inverted:
        rgb = 1.0 - rgb
    rgba = np.concatenate([(rgb.clip(0, 1) * 255).round().astype(np.uint8), alpha], axis=-1)
    Image.fromarray(rgba, "RGBA").save(path)


def clip_name(image_name: str) -> str:
    return image_name.replace(".png", ".mp4")


def _test_clip(path: Path) -> None:
    """The test clip: CLIP_FRAMES frames of SIZE x SIZE, a disc moving left to right over a gradient, H.264."""
    import av

    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        for f in range(CLIP_FRAMES):
            cx = 0.25 + 0.5 * f / (CLIP_FRAMES - 1)
            disc = ((x - cx) ** 2 + (y - 0.5) ** 2 < 0.04).astype(np.float32)
            rgb = np.stack([0.2 + 0.6 * x, 0.3 + 0.5 * y * (1 - disc) + 0.4 * disc, 0.8 - 0.5 * x * y], axis=-1)
            frame = av.VideoFrame.from_ndarray((rgb.clip(0, 1) * 255).round().astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def inverted_name(image_name: str) -> str:
    return image_name.replace(".png", "_inverted.png")


def _adapt(ui: dict, object_info: dict, image_name: str, stem: str, input_dir: Path | None = None):
    """API prompt of a workflow, adapted to the tiny models; plus the branches the checks need."""
    cfg = (ui.get("extra") or {}).get("dpm_latent_test") or {}
    ui = copy.deepcopy(ui)
    modes = {str(k): v for k, v in (cfg.get("mode") or {}).items()}
    for node in ui["nodes"]:
        if node["type"] in RESIZE:
            node["mode"] = 4
        if str(node["id"]) in modes:
            node["mode"] = modes[str(node["id"])]
    api = ui_to_api(ui, object_info)
    for nid, values in (cfg.get("widgets") or {}).items():
        api[str(nid)]["inputs"].update(values)

    ckpt_map = {**CHECKPOINTS, **(cfg.get("checkpoints") or {})}
    clip_map = {**CLIP_ENERGY, **(cfg.get("clip_energy") or {})}
    ddpm_map = {**DIFFUSERS, **(cfg.get("diffusers") or {})}
    chain_steps = STEPS
    if any(n["class_type"] == "LangevinLatentSampler" for n in api.values()):
        chain_steps = LANGEVIN_CHAIN
    next_id = [max(int(k) for k in api) + 1]

    def add(class_type, **inputs) -> str:
        nid = str(next_id[0])
        next_id[0] += 1
        api[nid] = {"class_type": class_type, "inputs": inputs}
        return nid

    tiny = {}
    latent_inputs = {}
    for nid, node in api.items():
        inp = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            name = inp["ckpt_name"]
            assert name in ckpt_map, (
                f"{stem}: no tiny model for checkpoint {name!r}: add it to CHECKPOINTS in this test or to "
                "extra.dpm_latent_test.checkpoints in the workflow")
            inp["ckpt_name"] = tiny[nid] = ckpt_map[name]
        elif node["class_type"] == "LoadDiffusersDDPM":
            name = inp["model_name"]
            assert name in ddpm_map, (
                f"{stem}: no tiny DDPM folder for model_name {name!r}: add it to DIFFUSERS in this test or to "
                "extra.dpm_latent_test.diffusers in the workflow")
            inp["model_name"] = ddpm_map[name]
        elif node["class_type"] == "UNETLoader":
            dmap = {**DIFFUSION_MODELS, **(cfg.get("diffusion_models") or {})}
            assert inp["unet_name"] in dmap, f"{stem}: no tiny model for {inp['unet_name']!r} (see DIFFUSION_MODELS)"
            inp["unet_name"] = dmap[inp["unet_name"]]
        elif node["class_type"] == "VAELoader":
            vmap = {**VAES, **(cfg.get("vae") or {})}
            assert inp["vae_name"] in vmap, f"{stem}: no tiny VAE for {inp['vae_name']!r} (see VAES)"
            inp["vae_name"] = vmap[inp["vae_name"]]
        elif node["class_type"] == "LoadVideo":
            inp["file"] = clip_name(image_name)
        elif node["class_type"] == "LoadLatent":
            # a latent-file workflow (the demo's video twin): a seeded random latent of the shape it declares
            shape = (cfg.get("latents") or {}).get(nid)
            assert shape, f"{stem}: Load Latent {nid} needs its shape in extra.dpm_latent_test.latents"
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(int(nid)))
            inp["latent"] = write_latent(input_dir, f"wf_{stem}_{nid}", x)
            latent_inputs[nid] = x
        elif node["class_type"] == "LoadImage":
            variant = (cfg.get("images") or {}).get(nid)
            assert variant in (None, "inverted"), f"{stem}: unknown test image variant {variant!r}"
            inp["image"] = image_name if variant is None else inverted_name(image_name)
        elif node["class_type"] == "CLIPEnergy":
            name = inp["clip_name"]
            assert name in clip_map, (
                f"{stem}: no tiny CLIP for clip_name {name!r}: add it to CLIP_ENERGY in this test or to "
                "extra.dpm_latent_test.clip_energy in the workflow")
            inp["clip_name"] = clip_map[name]
            inp["augmentations"] = min(inp["augmentations"], AUGMENTATIONS)
        elif node["class_type"] in ("AsyrpTrainDirection", "RankByCLIP", "AsyrpInterval", "DPMPrunedReplay"):
            name = inp["clip_name"]
            assert name in clip_map, f"{stem}: no tiny CLIP for {node['class_type']}'s clip_name {name!r} (see CLIP_ENERGY)"
            inp["clip_name"] = clip_map[name]
        elif node["class_type"] == "RandomLatentCode":
            inp["width"] = inp["height"] = SIZE
        if node["class_type"] == "LangevinLatentSampler":
            inp["steps"] = min(inp["steps"], LANGEVIN_STEPS)
        elif isinstance(inp.get("steps"), int):
            inp["steps"] = min(inp["steps"], chain_steps)

    def linked_from(class_type, input_name):
        return {tuple(n["inputs"][input_name]) for n in api.values()
                if n["class_type"] == class_type and isinstance(n["inputs"].get(input_name), list)}

    encoder_positives = linked_from("DPMEncode", "positive")
    replay_positives = linked_from("ReplayLatentWithPrompt", "positive")
    clip_loader = None
    video = any(n["class_type"] == "UNETLoader" for n in api.values())
    for nid in [k for k, n in api.items() if n["class_type"] == "CLIPTextEncode"]:
        src = api[nid]["inputs"]["clip"]
        if video and isinstance(src, list) and api[src[0]]["class_type"] == "CLIPLoader":
            # a video model's own text encoder (umT5-XXL) has no tiny twin: Empty Conditioning for the model
            # the encoder uses, a target limited to the left half (as for SD3 / SDXL below)
            model = next(n["inputs"]["model"] for n in api.values() if n["class_type"] == "DPMEncode")
        else:
            assert isinstance(src, list) and src[0] in tiny and src[1] == 1, (
                f"{stem}: CLIP Text Encode {nid} is not fed by a checkpoint's CLIP output; extend this test")
            kind = TEXT[tiny[src[0]]]
            if kind == "clip_l":
                if clip_loader is None:
                    clip_loader = add("CLIPLoader", clip_name="tiny_clip_l.safetensors", type="stable_diffusion")
                api[nid]["inputs"]["clip"] = [clip_loader, 0]
                continue
            model = [src[0], 0]
        is_target = (nid, 0) in replay_positives and (nid, 0) not in encoder_positives
        if is_target:
            empty = add("EmptyConditioning", model=model, tokens=77)
            api[nid] = {"class_type": "ConditioningSetAreaPercentage",
                        "inputs": {"conditioning": [empty, 0], "width": 0.5, "height": 1.0, "x": 0.0, "y": 0.0,
                                   "strength": 1.0}}
            if video:  # ComfyUI's video twin of the node: every frame, the left half
                api[nid] = {"class_type": "ConditioningSetAreaPercentageVideo",
                            "inputs": {"conditioning": [empty, 0], "width": 0.5, "height": 1.0, "temporal": 1.0,
                                       "x": 0.0, "y": 0.0, "z": 0.0, "strength": 1.0}}
        else:
            api[nid] = {"class_type": "EmptyConditioning", "inputs": {"model": model, "tokens": 77}}

    used = {tuple(v)[0] for n in api.values() for v in n["inputs"].values() if isinstance(v, list) and len(v) == 2}
    for nid in [k for k, n in api.items() if n["class_type"] == "CLIPLoader" and k not in used]:
        del api[nid]  # a video model's text encoder, no longer used

    def frame(images):
        """A decoded clip's frame CHECK_FRAME (so Save Image writes one picture); an image as it is."""
        return [add("ImageFromBatch", image=images, batch_index=CHECK_FRAME, length=1), 0] if video else images

    def reconstruction(eid, vae):
        """Save Image ids of the replay with the encoder's own settings and of the VAE round trip."""
        enc = api[eid]["inputs"]
        same = add("ReplayLatentWithPrompt", model=enc["model"], positive=enc["positive"],
                   negative=enc["negative"], latent_code=[eid, 0], cfg=enc["cfg"])
        rec = add("SaveImage", images=frame([add("VAEDecode", samples=[same, 0], vae=vae), 0]),
                  filename_prefix=f"wf_test/{stem}_reconstruction")
        rt = add("SaveImage", images=frame([add("VAEDecode", samples=enc["latent_image"], vae=vae), 0]),
                 filename_prefix=f"wf_test/{stem}_vae_round_trip")
        return rec, rt

    # the checks' branches: replay with the encoder's own settings, and the VAE round trip
    checks = []
    for rid in [k for k, n in api.items() if n["class_type"] == "ReplayLatentWithPrompt"]:
        rep = api[rid]["inputs"]
        eid = rep["latent_code"][0]
        if api[eid]["class_type"] != "DPMEncode":
            continue
        enc_in = api[eid]["inputs"]
        if all(rep[k] == enc_in[k] for k in ("model", "positive", "negative", "cfg")):
            continue  # the workflow's own reconstruction branch: checked as such below, not as an edit
        for did in [k for k, n in api.items()
                    if n["class_type"] == "VAEDecode" and n["inputs"]["samples"] == [rid, 0]]:
            # the decoded replay, saved directly or as the best of a Rank Images by CLIP
            feeds = [[did, 0]] + [[k, 0] for k, n in api.items()
                                  if n["class_type"] == "RankByCLIP" and n["inputs"]["images"] == [did, 0]]
            outs = [k for k, n in api.items() if n["class_type"] == "SaveImage" and n["inputs"]["images"] in feeds]
            if video and not outs:  # a clip saved as an animated file: check one frame of it
                assert any(n["class_type"] in ANIMATED and n["inputs"].get("images") == [did, 0] for n in api.values()), (
                    f"{stem}: the decoded clip {did} is not saved as an animated file")
                outs = [add("SaveImage", images=frame([did, 0]), filename_prefix=f"wf_test/{stem}_frame")]
            assert outs, f"{stem}: the decoded replay {did} is not saved"
            vae = api[did]["inputs"]["vae"]
            rec, rt = reconstruction(eid, vae)
            checks.append({"output": outs[0], "reconstruction": rec, "round_trip": rt})

    # latent-file workflows: a replay saved as a latent against the replay with the encoder's own settings,
    # which must give the loaded latent back
    for rid in [k for k, n in api.items() if n["class_type"] == "ReplayLatentWithPrompt"]:
        rep = api[rid]["inputs"]
        eid = rep["latent_code"][0]
        src = api[eid]["inputs"]["latent_image"] if api[eid]["class_type"] == "DPMEncode" else None
        if not src or api[src[0]]["class_type"] != "LoadLatent":
            continue
        if all(rep[k] == api[eid]["inputs"][k] for k in ("model", "positive", "negative", "cfg")):
            continue
        outs = [k for k, n in api.items() if n["class_type"] == "SaveLatent" and n["inputs"]["samples"] == [rid, 0]]
        assert outs, f"{stem}: the replay {rid} of a loaded latent is not saved"
        enc = api[eid]["inputs"]
        same = add("ReplayLatentWithPrompt", model=enc["model"], positive=enc["positive"], negative=enc["negative"],
                   latent_code=[eid, 0], cfg=enc["cfg"])
        checks.append({"kind": "latent", "output": outs[0], "input": latent_inputs[src[0]],
                       "reconstruction": add("SaveLatent", samples=[same, 0], filename_prefix=f"wf_test/{stem}_rec")})

    # Langevin: the guided image against the same code without guidance
    for lid in [k for k, n in api.items() if n["class_type"] == "LangevinLatentSampler"]:
        lv = api[lid]["inputs"]
        plots = [k for k, n in api.items()
                 if n["class_type"] in ("SaveImage", "PreviewImage") and n["inputs"]["images"] == [lid, 2]]
        assert plots, f"{stem}: the energy plot of Langevin Latent Sampler {lid} is not shown"
        for did in [k for k, n in api.items()
                    if n["class_type"] == "VAEDecode" and n["inputs"]["samples"] == [lid, 1]]:
            outs = [k for k, n in api.items() if n["class_type"] == "SaveImage" and n["inputs"]["images"] == [did, 0]]
            assert outs, f"{stem}: the decoded Langevin sample {did} is not saved"
            vae = api[did]["inputs"]["vae"]
            src = lv["latent_code"][0]
            check = {"output": outs[0], "plots": plots,
                     "latent": add("SaveLatent", samples=[lid, 1], filename_prefix=f"wf_test/{stem}_langevin")}
            if api[src]["class_type"] == "DPMEncode":
                check["reconstruction"], check["round_trip"] = reconstruction(src, vae)
            else:
                plain = add("ReplayLatentWithPrompt", model=lv["model"], positive=lv["positive"],
                            negative=lv["negative"], latent_code=lv["latent_code"], cfg=lv["cfg"])
                check["reconstruction"] = add("SaveImage", images=[add("VAEDecode", samples=[plain, 0], vae=vae), 0],
                                              filename_prefix=f"wf_test/{stem}_unguided")
            checks.append(check)
    # Asyrp: the edited image against the reconstruction of the code it edits; the loss plot is shown
    # (and the plot of an Asyrp Editing Interval, also 512 x 320)
    asyrp_plots = {(k, 1) for k, n in api.items() if n["class_type"] == "AsyrpTrainDirection"}
    asyrp_plots |= {(k, 2) for k, n in api.items() if n["class_type"] == "AsyrpInterval"}
    for aid in [k for k, n in api.items() if n["class_type"] == "AsyrpEdit"]:
        src = api[aid]["inputs"]["latent_code"][0]
        train = api[aid]["inputs"]["direction"][0]
        plots = [k for k, n in api.items()
                 if n["class_type"] in ("SaveImage", "PreviewImage") and n["inputs"]["images"] == [train, 1]]
        plots += [k for k, n in api.items() if n["class_type"] in ("SaveImage", "PreviewImage")
                  and isinstance(n["inputs"]["images"], list) and tuple(n["inputs"]["images"]) in asyrp_plots
                  and k not in plots]
        for did in [k for k, n in api.items()
                    if n["class_type"] == "VAEDecode" and n["inputs"]["samples"] == [aid, 0]]:
            outs = [k for k, n in api.items() if n["class_type"] == "SaveImage" and n["inputs"]["images"] == [did, 0]]
            assert outs and api[src]["class_type"] == "DPMEncode", f"{stem}: Asyrp Edit {aid} is not checkable"
            check = {"output": outs[0], "plots": plots}
            check["reconstruction"], check["round_trip"] = reconstruction(src, api[did]["inputs"]["vae"])
            checks.append(check)
    return api, checks


def _prepare_asyrp_directions(server, api: dict, image_name: str, stem: str) -> None:
    """Load Asyrp Direction reads a file from the input folder: train one on the tiny checkpoint of the
    node that uses it and put it there under the workflow's name (a short run, as the workflows' tests do)."""
    import shutil

    from dpmtools.graphs import Graph

    for nid, node in api.items():
        if node["class_type"] != "LoadAsyrpDirection":
            continue
        target = Path(server.input_dir) / node["inputs"]["direction_file"]
        users = [n for n in api.values() if n["class_type"] in ("AsyrpEdit", "AsyrpEditDDIM")
                 and n["inputs"].get("direction") == [nid, 0]]
        assert users, f"{stem}: Load Asyrp Direction {nid} feeds no Asyrp Edit"
        loader = api[users[0]["inputs"]["model"][0]]
        g = Graph()
        if loader["class_type"] == "CheckpointLoaderSimple":
            m = g.node("CheckpointLoaderSimple", ckpt_name=loader["inputs"]["ckpt_name"])
            model, vae = m.out(0), m.out(2)
        else:
            assert loader["class_type"] == "LoadDiffusersDDPM", f"{stem}: extend _prepare_asyrp_directions"
            m = g.node("LoadDiffusersDDPM", model_name=loader["inputs"]["model_name"], clip_sample="scheduler config")
            model, vae = m.out(0), m.out(1)
        lat = g.node("VAEEncode", pixels=g.node("LoadImage", image=image_name).out(0), vae=vae)
        d = g.node("AsyrpTrainDirection", model=model, vae=vae, latents=lat.out(0), clip_name="tiny_clip",
                   source_text="a red circle", target_text="a blue circle", steps=STEPS, t_edit=0.5, iterations=2,
                   learning_rate=20.0, clip_weight=1.0, l1_weight=0.3, seed=0, kind="global direction")
        save = g.node("SaveAsyrpDirection", direction=d.out(0), filename_prefix=f"wf_test/{stem}_direction")
        entry = server.run(g.prompt(), timeout=300)
        rel = entry["outputs"][save.id]["text"][0].split("saved ", 1)[1]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(server.output_dir) / rel, target)


def _png(server, entry: dict, nid: str) -> np.ndarray:
    images = entry["outputs"][nid]["images"]
    assert len(images) == 1, images
    f = images[0]
    if f.get("type", "output") != "output":  # Preview Image: a temp file, fetched as the frontend does
        query = urllib.parse.urlencode({"filename": f["filename"], "subfolder": f.get("subfolder", ""),
                                        "type": f["type"]})
        with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=30) as r:
            with Image.open(io.BytesIO(r.read())) as im:
                return np.asarray(im.convert("RGB")).astype(np.int16)
    path = Path(server.output_dir) / f.get("subfolder", "") / f["filename"]
    assert path.is_file(), path
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_and_reconstructs(path, server, object_info):
    image_name = f"wf_{path.stem}.png"
    _test_image(Path(server.input_dir) / image_name)
    _test_image(Path(server.input_dir) / inverted_name(image_name), inverted=True)
    _test_clip(Path(server.input_dir) / clip_name(image_name))
    api, checks = _adapt(_load(path), object_info, image_name, path.stem, Path(server.input_dir))
    assert checks, (f"{path.name}: no DPM Encode -> Replay -> VAE Decode -> Save Image chain "
                    "and no Langevin Latent Sampler -> VAE Decode -> Save Image chain")
    _prepare_asyrp_directions(server, api, image_name, path.stem)
    entry = server.run(api, timeout=300)

    plots = {p for c in checks for p in c.get("plots", ())}
    sheets = {k for k, n in api.items() if n["class_type"] in ("SaveImage", "PreviewImage")
              and api.get(str(n["inputs"]["images"][0]), {}).get("class_type") == "RankByCLIP"
              and n["inputs"]["images"][1] == 3}
    for nid, node in api.items():
        if node["class_type"] in ("SaveImage", "PreviewImage"):
            img = _png(server, entry, nid)
            if nid in plots:
                assert img.shape == PLOT_SHAPE, (nid, img.shape)
            elif nid in sheets:  # Rank Images by CLIP's contact sheet: 128 px cells with captions
                assert img.shape[0] % (128 + 30) == 0 and img.shape[1] % 128 == 0, (nid, img.shape)
            else:
                assert img.shape == (SIZE, SIZE, 3), (nid, img.shape)
            assert img.std() > 1.0, f"{path.name}: {node['class_type']} {nid} is (nearly) constant"
        if node["class_type"] == "SaveLatentCode":
            rel = entry["outputs"][nid]["text"][0].split("saved ", 1)[1]
            saved = Path(server.output_dir) / rel
            assert saved.is_file() and saved.name.endswith(".dpmcode.safetensors"), saved

    for c in checks:
        if c.get("kind") == "latent":  # replay of a loaded latent: exact with the encoder's settings, an edit else
            rec, out = saved_latents(server, entry, c["reconstruction"]), saved_latents(server, entry, c["output"])
            assert rel_err(rec, c["input"]) <= 1e-4, f"{path.name}: replay off the loaded latent by {rel_err(rec, c['input'])}"
            assert rel_err(out, c["input"]) > 1e-3, f"{path.name}: the edit did not change the latent"
            continue
        out, rec = _png(server, entry, c["output"]), _png(server, entry, c["reconstruction"])
        if "round_trip" in c:
            err = int(np.abs(rec - _png(server, entry, c["round_trip"])).max())
            assert err <= 2, f"{path.name}: replay with the source settings is off the VAE round trip by {err}/255"
        if "latent" in c:
            lat = saved_latents(server, entry, c["latent"])
            assert lat.shape[-2:] == (SIZE // 8, SIZE // 8) and bool(lat.isfinite().all()), lat.shape
        change = float(np.abs(out - rec).mean())
        assert change > 2.0, (f"{path.name}: the workflow's output barely differs from the "
                              f"{'input' if 'round_trip' in c else 'unguided replay'} ({change:.2f}/255)")


# ---------------------------------------------------------------------------- the converter itself
OBJECT_INFO = {
    "Loader": {"input": {"required": {"name": [["a.ckpt", "b.ckpt"], {}]}}, "input_order": {"required": ["name"]},
               "output": ["MODEL", "IMAGE"]},
    "Sampler": {"input": {"required": {"model": ["MODEL", {}],
                                       "seed": ["INT", {"default": 0, "control_after_generate": True}],
                                       "steps": ["INT", {"default": 20}],
                                       "mode": ["COMBO", {"options": ["x", "y"]}]},
                          "optional": {"strength": ["FLOAT", {"default": 1.0}],
                                       "extra": ["IMAGE", {}]}},
                "input_order": {"required": ["model", "seed", "steps", "mode"], "optional": ["strength", "extra"]},
                "output": ["IMAGE"]},
    "OldSeed": {"input": {"required": {"noise_seed": ["INT", {}], "value": ["INT", {"forceInput": True}],
                                       "pick": [["p", "q"], {"control_after_generate": True}]}},
                "output": ["INT"]},
    "Upload": {"input": {"required": {"image": [["i.png"], {"image_upload": True}],
                                      "flag": ["BOOLEAN", {"default": False}]}},
               "input_order": {"required": ["image", "flag"]}, "output": ["IMAGE"]},
    "Filter": {"input": {"required": {"image": ["IMAGE", {}], "amount": ["FLOAT", {}]}},
               "input_order": {"required": ["image", "amount"]}, "output": ["IMAGE"]},
    "Save": {"input": {"required": {"images": ["IMAGE", {}], "prefix": ["STRING", {}]}}, "output": []},
}


def _ui(nodes, links):
    """A minimal UI workflow: nodes as (id, type, widgets_values, {input: link}, mode)."""
    out = []
    for nid, typ, values, inputs, mode in nodes:
        out.append({"id": nid, "type": typ, "mode": mode, "widgets_values": values,
                    "inputs": [{"name": k, "type": "*", "link": v} for k, v in inputs.items()],
                    "outputs": [{"name": t, "type": t, "links": []}
                                for t in OBJECT_INFO.get(typ, {}).get("output", ["*"])]})
    return {"nodes": out, "links": links}


def test_ui_to_api_widgets_links_and_control_values():
    from dpmtools.workflow import ui_to_api

    wf = _ui([(1, "Loader", ["b.ckpt"], {}, 0),
              (2, "Sampler", [7, "fixed", 12, "y", 0.5], {"model": 1}, 0),
              (3, "Save", ["out"], {"images": 2}, 0),
              (4, "Note", ["hello"], {}, 0)],
             [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "IMAGE"]])
    api = ui_to_api(wf, OBJECT_INFO)
    assert set(api) == {"1", "2", "3"}
    assert api["1"]["inputs"] == {"name": "b.ckpt"}
    assert api["2"]["inputs"] == {"model": ["1", 0], "seed": 7, "steps": 12, "mode": "y", "strength": 0.5}
    assert api["3"] == {"class_type": "Save", "inputs": {"images": ["2", 0], "prefix": "out"},
                        "_meta": {"title": "Save"}}
    # saved by an old frontend without the control value
    wf["nodes"][1]["widgets_values"] = [7, 12, "y", 0.5]
    assert ui_to_api(wf, OBJECT_INFO)["2"]["inputs"]["steps"] == 12
    # a count that fits neither layout
    wf["nodes"][1]["widgets_values"] = [7, "fixed", 12]
    with pytest.raises(ValueError, match="widget values"):
        ui_to_api(wf, OBJECT_INFO)
    # dict-style widgets_values
    wf["nodes"][1]["widgets_values"] = {"seed": 3, "steps": 4, "mode": "x", "strength": 1.0}
    assert ui_to_api(wf, OBJECT_INFO)["2"]["inputs"]["seed"] == 3


def test_ui_to_api_seed_names_combo_control_force_input_and_upload():
    from dpmtools.workflow import ui_to_api

    wf = _ui([(1, "OldSeed", [5, "randomize", "q", "fixed"], {}, 0),
              (2, "Upload", ["i.png", "image", True], {}, 0)], [])
    api = ui_to_api(wf, OBJECT_INFO)
    assert api["1"]["inputs"] == {"noise_seed": 5, "pick": "q"}  # forceInput "value" is a socket
    assert api["2"]["inputs"] == {"image": "i.png", "flag": True}
    # an explicit control_after_generate: False on a seed-named input means no control value
    info = copy.deepcopy(OBJECT_INFO)
    info["OldSeed"]["input"]["required"]["noise_seed"] = ["INT", {"control_after_generate": False}]
    wf = _ui([(1, "OldSeed", [5, "q", "fixed"], {}, 0)], [])
    assert ui_to_api(wf, info)["1"]["inputs"] == {"noise_seed": 5, "pick": "q"}


def test_ui_to_api_bypass_mute_reroute_primitive_and_widget_links():
    from dpmtools.workflow import WorkflowError, ui_to_api

    nodes = [(1, "Upload", ["i.png", "image", False], {}, 0),
             (2, "Reroute", [], {"": 1}, 0),
             (3, "Filter", [0.3], {"image": 2}, 4),           # bypassed: passes its image through
             (4, "Filter", [0.7], {"image": 3}, 0),
             (5, "Save", ["a"], {"images": 4}, 0),
             (6, "Filter", [0.1], {"image": 1}, 2),           # muted: left out, like its consumer's link
             (7, "Sampler", [1, "fixed", 2, "x", 1.0], {"model": None, "extra": 6, "steps": 8}, 0),
             (8, "PrimitiveNode", [2], {}, 0),
             (9, "OldSeed", [4, "fixed", "p", "fixed"], {}, 0)]
    links = [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"],
             [4, 4, 0, 5, 0, "IMAGE"], [5, 1, 0, 6, 0, "IMAGE"], [6, 6, 0, 7, 5, "IMAGE"],
             [8, 8, 0, 7, 2, "INT"]]
    wf = _ui(nodes, links)
    api = ui_to_api(wf, OBJECT_INFO)
    assert set(api) == {"1", "4", "5", "7", "9"}
    assert api["4"]["inputs"] == {"image": ["1", 0], "amount": 0.7}
    assert api["5"]["inputs"]["images"] == ["4", 0]
    assert "extra" not in api["7"]["inputs"] and api["7"]["inputs"]["steps"] == 2  # primitive: widget value
    # a widget shown as a socket and linked to a real node takes the link
    wf["nodes"][6]["inputs"].append({"name": "seed", "type": "INT", "link": 9, "widget": {"name": "seed"}})
    wf["links"].append([9, 9, 0, 7, 6, "INT"])
    assert ui_to_api(wf, OBJECT_INFO)["7"]["inputs"]["seed"] == ["9", 0]
    # unknown node types are an error that names the type
    wf["nodes"].append({"id": 10, "type": "SomePackNode", "mode": 0, "inputs": [], "outputs": []})
    with pytest.raises(WorkflowError, match="SomePackNode"):
        ui_to_api(wf, OBJECT_INFO)


def test_find_node_set_inputs_and_graph_from_prompt():
    """How the demo runs a shipped workflow: nodes named by title, class_type or '#id', inputs set in place,
    and branches added to the converted prompt under fresh ids."""
    from dpmtools.graphs import Graph
    from dpmtools.workflow import WorkflowError, find_node, set_inputs

    prompt = {"3": {"class_type": "LoadImage", "inputs": {"image": "a.png"}, "_meta": {"title": "Input"}},
              "7": {"class_type": "Filter", "inputs": {"image": ["3", 0], "amount": 0.5}, "_meta": {"title": "Filter"}},
              "9": {"class_type": "Filter", "inputs": {"image": ["7", 0], "amount": 0.1}, "_meta": {"title": "Soft"}}}
    assert find_node(prompt, "Input") == find_node(prompt, "LoadImage") == find_node(prompt, "#3") == "3"
    assert find_node(prompt, "Soft") == "9"
    with pytest.raises(WorkflowError, match="2 nodes"):
        find_node(prompt, "Filter")  # a title that is also another node's class_type: ambiguous
    with pytest.raises(WorkflowError, match="none"):
        find_node(prompt, "Missing")
    set_inputs(prompt, {"LoadImage": {"image": "b.png"}, "#9": {"amount": 0.2}})
    assert prompt["3"]["inputs"]["image"] == "b.png" and prompt["9"]["inputs"]["amount"] == 0.2
    g = Graph.from_prompt(prompt)
    save = g.node("SaveImage", images=["9", 0], filename_prefix="x")
    assert save.id == "10" and g.prompt()["10"]["inputs"]["images"] == ["9", 0] and "10" not in prompt
    assert Graph().node("A").id == "1"
