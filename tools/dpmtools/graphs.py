# SPDX-License-Identifier: GPL-3.0-or-later
"""Small helpers to write API-format prompts and to move latents in and out of a server."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class Graph:
    """Builds an API-format prompt: ``g.node("KSampler", seed=1, model=ckpt.out(0))``."""

    def __init__(self):
        self.nodes: dict[str, dict] = {}

    @classmethod
    def from_prompt(cls, prompt: dict) -> "Graph":
        """A graph that extends (a copy of) an API prompt, e.g. a converted workflow: ``Ref(node_id)``
        names its nodes, and new nodes take the next free ids."""
        g = cls()
        g.nodes = copy.deepcopy(prompt)
        return g

    def node(self, class_type: str, node_id: str | None = None, **inputs) -> "Ref":
        nid = node_id or str(1 + max((int(k) for k in self.nodes if k.isdigit()), default=0))
        self.nodes[nid] = {"class_type": class_type,
                           "inputs": {k: (v.link if isinstance(v, Out) else v) for k, v in inputs.items()}}
        return Ref(nid)

    def prompt(self) -> dict:
        return self.nodes


class Out:
    def __init__(self, nid: str, slot: int):
        self.link = [nid, slot]


class Ref:
    def __init__(self, nid: str):
        self.id = nid

    def out(self, slot: int = 0) -> Out:
        return Out(self.id, slot)


def encode_graph(g: Graph, ckpt_name: str, latent_name: str, tokens: int = 77, **encode):
    """Checkpoint -> Empty Conditioning, Load Latent -> DPM Encode; returns (ckpt, cond, lat, enc)."""
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=ckpt_name)
    cond = g.node("EmptyConditioning", model=ckpt.out(0), tokens=tokens)
    lat = g.node("LoadLatent", latent=latent_name)
    enc = g.node("DPMEncode", model=ckpt.out(0), positive=cond.out(0), negative=cond.out(0),
                 latent_image=lat.out(0), **encode)
    return ckpt, cond, lat, enc


def two_checkpoints_and_image(g: Graph, ckpt_a: str, ckpt_b: str, input_image: str):
    """The start of every two-model demo graph: checkpoints A and B, Load Image, an Empty Conditioning
    (one token) per model and the image VAE-encoded with A. Returns (ck_a, ck_b, img, e_a, e_b, lat)."""
    ck_a = g.node("CheckpointLoaderSimple", ckpt_name=ckpt_a)
    ck_b = g.node("CheckpointLoaderSimple", ckpt_name=ckpt_b)
    img = g.node("LoadImage", image=input_image)
    e_a = g.node("EmptyConditioning", model=ck_a.out(0), tokens=1)
    e_b = g.node("EmptyConditioning", model=ck_b.out(0), tokens=1)
    lat = g.node("VAEEncode", pixels=img.out(0), vae=ck_a.out(2))
    return ck_a, ck_b, img, e_a, e_b, lat


def write_latent(input_dir: Path, name: str, samples: torch.Tensor) -> str:
    """A .latent file as ComfyUI's SaveLatent writes it (LoadLatent reads it back unscaled)."""
    fname = f"{name}.latent"
    save_file({"latent_tensor": samples.float().contiguous(), "latent_format_version_0": torch.tensor([])},
              str(Path(input_dir) / fname))
    return fname


def saved_latents(server, entry: dict, node_id: str) -> torch.Tensor:
    files = entry["outputs"][node_id]["latents"]
    out = []
    for f in files:
        path = Path(server.output_dir) / f.get("subfolder", "") / f["filename"]
        out.append(load_file(str(path))["latent_tensor"])
    return torch.cat(out)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
