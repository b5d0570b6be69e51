# SPDX-License-Identifier: GPL-3.0-or-later
"""The pack's costs at real model sizes: SD1.5 U-Net, SD3-medium MMDiT, SDXL U-Net (random weights).

Every model is ComfyUI's own (``dpmtools.real_models``: detected from its keys, built by its
supported-model class, wrapped in ModelPatcher as a loaded checkpoint is) with the matching
full-size VAE at random weights; conditioning is random tensors of the text encoders' shapes; the
CLIP energy is a random ViT-B/32 CLIPModel in a ``models/clip_energy`` folder, loaded by CLIP Energy.
Each model and mode runs in a fresh process (one model in memory at a time), which prints one JSON
line; this script prints the table and a final ``RESULT {json}`` line.

Modes, per model:
  replay      DPM Encode + Replay against the same number of model calls through ComfyUI's own guider
              (a bare sampler) and through KSampler euler_ancestral (target <= 1.05); also the time of
              one call and the per-call overhead (a tiny SD1.5's call at a 2x2 latent)
  checkpoint  the chain's gradient (identity decoder, energy = sum of the latent), recomputing each
              step: time / one replay (about 4 forward-equivalents), peak memory
  full_graph  the same keeping the whole graph (about 3), peak memory
  auto        the Langevin node's step (VAE decode + CLIP energy, 4 augmentations) with ``memory: auto``:
              what it chose, what it predicted, its peak memory, its time / one replay
With --cycle, on the SD1.5 weights (a diffusers UNet2DConditionModel converted for ComfyUI with
ComfyUI's own key map): diffusers' CycleDiffusionPipeline (prompt = source prompt, guidance 1,
strength 1, eta 1) against DPM Encode + Replay, each reconstructing a latent: wall time, peak memory,
max |reconstruction - input|.

Peak memory: CPU, the peak resident set of the process after the peak was reset once the models
were loaded (``/proc/self/clear_refs``), minus the resident set then ("+ MB"), and the whole
process's peak; CUDA, torch.cuda.max_memory_allocated above the allocation after loading.

    python3 scripts/comfy_host.py bench real_sizes [--models sd15,sd3,sdxl] [--steps 4] [--size 256]
        [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--cycle] [--flux] [--tiny] [--same-process]
        [--rounds 2] [--json PATH]

--tiny: the tests' tiny models (tiny_sd15, tiny_sd3, tiny_sdxl), 64 px, 3 steps, a tiny CLIP: checks
the code path in seconds. --flux adds Flux.1-dev (12 B parameters; about 24 GB at bf16 plus
activations: for a CUDA machine with the memory; refused on the CPU below 48 GB of RAM).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

from _common import peak_rss_mb, rss_mb, setup

MODES = ("replay", "checkpoint", "full_graph", "auto")
ETA = 1.0
PROMPT = "a red square on a blue field"


# ----------------------------------------------------------------------------------------- helpers

def _reset_peak() -> bool:
    try:  # Linux: writing 5 resets the process's peak resident set (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mb()


class Memory:
    """Peak memory above a baseline: CUDA allocations, or the CPU's resident set."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def start(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2 ** 20
        else:
            _reset_peak()
            self.base = rss_mb()

    def peak_above(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2 ** 20 - self.base
        return _hwm_mb() - self.base

    def process_peak(self) -> float:
        import torch

        return torch.cuda.max_memory_allocated() / 2 ** 20 if self.cuda else peak_rss_mb()


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _timer(cuda: bool):
    import torch

    def per_call(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t
    return per_call


def _prepare(opts):
    setup(force_fp32=opts.dtype == "fp32")
    import torch

    import comfy.model_management

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    cuda = comfy.model_management.get_torch_device().type == "cuda"
    return torch, cuda


AUTO_WHY = re.compile(r"measured ([0-9.e+\-]+) MB per step, ([0-9.e+\-]+) MB with the decode, (fits|does not fit) "
                      r"in half of ([0-9.e+\-]+) MB free")


# ----------------------------------------------------------------------------------- one model, one mode

def one(kind: str, mode: str, opts) -> dict:
    torch, cuda = _prepare(opts)
    import comfy.samplers
    import folder_paths
    from dpmtools import real_models as RM

    lc = importlib.import_module("dpm_latent.nodes.latent_codes")
    B = importlib.import_module("dpm_latent.nodes.bridge.sampling")
    dtype = _dtype(opts.dtype)
    spec = RM.KINDS[kind]
    side = opts.size // 8
    steps = opts.steps
    per_call = _timer(cuda)
    mem = Memory(cuda)
    res = {"kind": kind, "mode": mode, "device": "cuda" if cuda else "cpu", "dtype": opts.dtype, "steps": steps,
           "latent": [1, spec.latent_channels, side, side], "context": list(spec.context_shape(opts.context_tokens)),
           "threads": torch.get_num_threads(),
           "torch": torch.__version__}
    t0 = time.perf_counter()
    with torch.inference_mode():
        model = RM.build_model(kind, dtype=dtype, seed=0)
        res["params_m"] = sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6
        res["model_class"] = type(model.model.model_config).__name__
        res["manual_cast"] = str(model.model.manual_cast_dtype)  # the dtype the layers compute in, when cast
        res["build_s"] = time.perf_counter() - t0
        cond = spec.conditioning(seed=1, tokens=opts.context_tokens)
        code = lc.RandomLatentCode.execute(model, opts.size, opts.size, 1, 0, steps, "normal", ETA).result[0]

        def replay_node():
            lc.ReplayLatentWithPrompt.execute(model, cond, cond, code, 1.0)

        if mode == "replay":
            latent = {"samples": torch.randn(1, spec.latent_channels, side, side,
                                             generator=torch.Generator().manual_seed(3))}
            guider = comfy.samplers.CFGGuider(model)
            guider.set_conds(cond, cond)
            guider.set_cfg(1.0)
            sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).cpu()

            class Bare(comfy.samplers.Sampler):
                def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
                           denoise_mask=None, disable_pbar=False):
                    x = latent_image + noise * sigmas[0]
                    for s in sigmas[:-1]:
                        out = model_wrap(x, s * x.new_ones([x.shape[0]]), model_options=extra_args["model_options"])
                    return out

            def ours():
                c = lc.DPMEncode.execute(model, cond, cond, latent, 0, steps, "normal", 1.0, ETA, 1.0).result[0]
                lc.ReplayLatentWithPrompt.execute(model, cond, cond, c, 1.0)

            def bare():
                for _ in range(2):
                    guider.sample(torch.randn_like(latent["samples"]), latent["samples"], Bare(), sigmas)

            def ksampler():
                s = comfy.samplers.sampler_object("euler_ancestral")
                for _ in range(2):
                    guider.sample(torch.randn_like(latent["samples"]), latent["samples"], s, sigmas)

            mem.start()
            ours()  # warm-up: loads the model
            bare()
            fns = (ours, bare, ksampler) if opts.ksampler else (ours, bare)
            best = [math.inf] * len(fns)
            for _ in range(opts.rounds):  # interleaved: a busy machine slows all alike
                for k, fn in enumerate(fns):
                    best[k] = min(best[k], per_call(fn))
            res.update(ours_s=best[0], bare_s=best[1], ratio_bare=best[0] / best[1],
                       per_call_s=best[1] / (2 * steps), peak_mb=mem.peak_above())
            if opts.ksampler:
                res.update(ksampler_s=best[2], ratio_ksampler=best[0] / best[2])
            del guider
            # per-call overhead: the same guider path on a tiny SD1.5 at a 2x2 latent (next to no tensor work)
            tiny = RM.build_model("tiny_sd15", dtype=dtype, seed=0)
            tg = comfy.samplers.CFGGuider(tiny)
            tcond = RM.KINDS["tiny_sd15"].conditioning(seed=1)
            tg.set_conds(tcond, tcond)
            tg.set_cfg(1.0)
            tl = torch.zeros(1, 4, 2, 2)
            tsig = comfy.samplers.calculate_sigmas(tiny.get_model_object("model_sampling"), "normal", 8).cpu()
            tg.sample(torch.zeros_like(tl), tl, Bare(), tsig)
            t_tiny = min(per_call(lambda: tg.sample(torch.zeros_like(tl), tl, Bare(), tsig)) for _ in range(3))
            res["tiny_call_s"] = t_tiny / 8
        elif mode in ("checkpoint", "full_graph"):
            L = importlib.import_module("dpm_latent.guidance.langevin")
            replay = importlib.import_module("dpm_latent.samplers").replay
            from dpm_latent.nodes.bridge.autograd import gradients_through

            checkpoint = mode == "checkpoint"
            times = {"replay": [], "grad": []}

            def work(denoise, x0, _cb, guider):
                with gradients_through(guider.inner_model):
                    c = code.to(device=x0.device, dtype=torch.float32).clone()

                    def grad():
                        L.chain_value_and_grad(denoise, lambda x: x, lambda im, g=None: im.flatten(1).sum(1), c,
                                               c.start_noise, c.noises, checkpoint=checkpoint)

                    def rep():
                        with torch.no_grad():
                            replay(denoise, c)

                    rep()  # warm-up
                    mem.start()
                    for _ in range(opts.rounds):
                        times["grad"].append(per_call(grad))
                        times["replay"].append(per_call(rep))
                    res["peak_mb"] = mem.peak_above()
                return x0

            replay_node()  # loads the model
            B.run_in_comfy(model, cond, cond, 1.0, torch.zeros(code.shape), code.sigmas, work, 0, None)
            res.update(step_s=min(times["grad"]), replay_s=min(times["replay"]),
                       ratio=min(times["grad"]) / min(times["replay"]),
                       ratios=[g / r for g, r in zip(times["grad"], times["replay"])])
        elif mode == "auto":
            gn = importlib.import_module("dpm_latent.nodes.clip_guidance")
            lr = importlib.import_module("dpm_latent.nodes.bridge.langevin_run")
            folder_paths.folder_names_and_paths["clip_energy"][0].append(os.path.join(opts.tmp, "clip_energy"))
            vae = RM.build_vae(kind, seed=0, dtype=torch.bfloat16 if dtype == torch.float16 else dtype)
            replay_node()  # loads the model
            energy = gn.CLIPEnergy.execute(opts.clip, PROMPT, 500.0, 4, True, True, True, True).result[0]
            t_replay = per_call(replay_node)
            mem.start()
            out = {}
            t_l = per_call(lambda: out.update(r=lr.run_langevin(model, cond, cond, 1.0, vae, energy, code, 1, 0.05,
                                                                 0, "all components", "auto")))
            res["peak_mb"] = mem.peak_above()
            why = out["r"][3].gradient
            res.update(gradient=why, kept=why.startswith("whole chain kept"), replay_s=t_replay, langevin_s=t_l,
                       step_s=t_l - t_replay, ratio=(t_l - t_replay) / t_replay)
            m = AUTO_WHY.search(why)
            if m:
                res.update(per_step_mb=float(m.group(1)), predicted_mb=float(m.group(2)), free_mb=float(m.group(4)),
                           predicted_chain_mb=float(m.group(1)) * steps)
        else:
            raise SystemExit(f"unknown mode {mode}")
    res["process_peak_mb"] = mem.process_peak()
    res["wall_s"] = time.perf_counter() - t0
    return res


# ------------------------------------------------------------------------ diffusers' CycleDiffusion

def _text_encoder(tmp: str, dtype, device):
    """A one-layer random CLIP text encoder of width 768 and a character tokenizer (the same in both
    processes: seeded); CycleDiffusionPipeline needs one for its source prompt."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dpmtools import tiny_clip

    folder = os.path.join(tmp, "cycle_tokenizer")
    if not os.path.isdir(folder):
        tiny_clip.make_tiny_clip_folder(folder, seed=0, full_size=True)
    tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        enc = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=1,
                                           num_attention_heads=12, max_position_embeddings=77,
                                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                           pad_token_id=tok.pad_token_id))
    return tok, enc.to(device=device, dtype=dtype).eval()


def cycle(which: str, opts) -> dict:
    torch, cuda = _prepare(opts)
    from dpmtools import real_models as RM

    kind = "tiny_sd15" if opts.tiny else "sd15"
    dtype = _dtype(opts.dtype)
    side = opts.size // 8
    mem = Memory(cuda)
    per_call = _timer(cuda)
    device = torch.device("cuda" if cuda else "cpu")
    res = {"kind": kind, "mode": f"cycle_{which}", "device": device.type, "dtype": opts.dtype, "steps": opts.steps}
    x0 = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        tok, enc = _text_encoder(opts.tmp, dtype, device)
        ids = tok(PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        cond = enc(ids.to(device))[0].float().cpu()  # what the pipeline's encode_prompt gives
        net = RM.diffusers_sd15_unet(kind, seed=0)
        if which == "diffusers":
            from diffusers import AutoencoderKL, CycleDiffusionPipeline, DDIMScheduler

            sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
            vae = AutoencoderKL(latent_channels=4)  # unused: the image given is the latent itself
            pipe = CycleDiffusionPipeline(vae=vae, text_encoder=enc, tokenizer=tok, unet=net.to(device, dtype),
                                          scheduler=sched, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
            pipe = pipe.to(device)  # its (unused) VAE too: the pipeline takes its device from its modules
            pipe.set_progress_bar_config(disable=True)
            out = {}

            def run():
                out["x"] = pipe(PROMPT, source_prompt=PROMPT, image=x0.to(device, dtype), strength=1.0,
                                num_inference_steps=opts.steps, guidance_scale=1.0, source_guidance_scale=1.0,
                                eta=ETA, generator=torch.Generator(device).manual_seed(0), output_type="latent",
                                ).images
            run()  # warm-up
            mem.start()
            res["wall_s"] = per_call(run)
            rec = out["x"].float().cpu()
            res["model_calls"] = 2 * opts.steps  # one batch of 2 (source, target) per step
        else:
            lc = importlib.import_module("dpm_latent.nodes.latent_codes")
            model = RM.comfy_model_from_diffusers(kind, net, dtype=dtype)
            del net
            out = {}

            def run():
                c = lc.DPMEncode.execute(model, [[cond, {}]], [[cond, {}]], {"samples": x0}, 0, opts.steps, "normal",
                                         1.0, ETA, 1.0).result[0]
                out["x"] = lc.ReplayLatentWithPrompt.execute(model, [[cond, {}]], [[cond, {}]], c, 1.0).result[0]
            run()  # warm-up: loads the model
            mem.start()
            res["wall_s"] = per_call(run)
            rec = out["x"]["samples"].float().cpu()
            res["model_calls"] = 2 * opts.steps  # one per step to encode, one per step to replay
        res["peak_mb"] = mem.peak_above()
        res["max_abs_error"] = float((rec - x0).abs().max())
        res["rel_error"] = float((rec - x0).norm() / x0.norm())
    res["process_peak_mb"] = mem.process_peak()
    return res


# ---------------------------------------------------------------------------------------------- driver

def prepare(opts) -> dict:
    """The CLIP Energy's folder: a random ViT-B/32 CLIPModel (the tiny CLIP with --tiny)."""
    from dpmtools import tiny_clip

    folder = tiny_clip.make_tiny_clip_folder(os.path.join(opts.tmp, "clip_energy", opts.clip), seed=0,
                                             full_size=not opts.tiny)
    return {"clip_folder": str(folder)}


def _dispatch(kind: str, mode: str, opts) -> dict:
    if kind == "prepare":
        return prepare(opts)
    return cycle(mode, opts) if kind == "cycle" else one(kind, mode, opts)


def _run_child(args: list[str], opts) -> dict:
    if opts.same_process:
        return _dispatch(args[0], args[1], argparse.Namespace(**vars(opts)))
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # freed large blocks go back to the OS: RSS follows tensors
    if opts.device == "cuda":
        env["DPM_LATENT_BENCH_CUDA"] = "1"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *args, *opts.passthrough]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        tail = out.stderr[-2500:]
        print(tail, file=sys.stderr)
        return {"failed": True, "returncode": out.returncode, "error": tail.strip().splitlines()[-1] if tail else ""}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(v, spec=".2f", none="-"):
    return none if v is None else format(v, spec)


def report(results: dict, opts) -> dict:
    summary = {"machine": results.pop("_machine"), "models": {}}
    print()
    m = summary["machine"]
    print(f"Real-size benchmark: device {m['device']}, {m['dtype']}, torch {m['torch']}, {m['threads']} thread(s), "
          f"{m['cpus']} CPU(s), latent {opts.size // 8}x{opts.size // 8} ({opts.size} px), {opts.steps} steps, "
          "batch 1, "
          f"best of {opts.rounds}")
    hdr = (f"{'model':10s} {'params':>7s} {'call s':>7s} {'enc+rep':>8s} {'ks_a':>6s} {'ckpt x':>7s} {'graph x':>7s} "
           f"{'ckpt +MB':>9s} {'graph +MB':>9s} {'node x':>7s} {'auto':>6s} {'pred MB':>8s} {'used MB':>8s} "
           f"{'peak MB':>8s}")
    print(hdr)
    for kind, modes in results.items():
        if kind == "cycle":
            continue
        rp, ck, fg, au = (modes.get(k, {}) for k in MODES)
        row = {
            "params_m": rp.get("params_m") or ck.get("params_m"),
            "model_class": rp.get("model_class") or ck.get("model_class"),
            "latent": rp.get("latent") or ck.get("latent"), "context": rp.get("context") or ck.get("context"),
            "manual_cast": rp.get("manual_cast") or ck.get("manual_cast"),
            "call_s": rp.get("per_call_s"), "tiny_call_s": rp.get("tiny_call_s"),
            "encode_replay_ratio": rp.get("ratio_bare"), "ksampler_ratio": rp.get("ratio_ksampler"),
            "checkpoint_ratio": ck.get("ratio"), "full_graph_ratio": fg.get("ratio"),
            "checkpoint_peak_mb": ck.get("peak_mb"), "full_graph_peak_mb": fg.get("peak_mb"),
            "node_step_ratio": au.get("ratio"), "auto_kept_graph": au.get("kept"), "auto_gradient": au.get("gradient"),
            "auto_predicted_mb": au.get("predicted_mb"), "auto_predicted_chain_mb": au.get("predicted_chain_mb"),
            "auto_free_mb": au.get("free_mb"), "auto_peak_mb": au.get("peak_mb"),
            "process_peak_mb": max((v.get("process_peak_mb") or 0) for v in modes.values()),
            "failed": sorted(k for k, v in modes.items() if v.get("failed")),
        }
        if row["call_s"] and row["tiny_call_s"]:
            row["overhead_fraction"] = row["tiny_call_s"] / row["call_s"]
        summary["models"][kind] = row
        auto = "-" if row["auto_kept_graph"] is None else ("graph" if row["auto_kept_graph"] else "recomp")
        print(f"{kind:10s} {_fmt(row['params_m'], '7.0f')}M {_fmt(row['call_s'], '7.3f')} "
              f"{_fmt(row['encode_replay_ratio'], '8.3f')} {_fmt(row['ksampler_ratio'], '6.3f')} "
              f"{_fmt(row['checkpoint_ratio'], '7.2f')} {_fmt(row['full_graph_ratio'], '7.2f')} "
              f"{_fmt(row['checkpoint_peak_mb'], '9.0f')} {_fmt(row['full_graph_peak_mb'], '9.0f')} "
              f"{_fmt(row['node_step_ratio'], '7.2f')} {auto:>6s} {_fmt(row['auto_predicted_mb'], '8.0f')} "
              f"{_fmt(row['auto_peak_mb'], '8.0f')} {_fmt(row['process_peak_mb'], '8.0f')}")
        if row["failed"]:
            print(f"  {kind}: failed modes {row['failed']}: " +
                  "; ".join(str(modes[k].get("error")) for k in row["failed"]))
    if "cycle" in results:
        cy = results["cycle"]
        summary["cycle"] = cy
        print("CycleDiffusionPipeline vs DPM Encode + Replay on the same SD1.5 weights "
              f"({cy.get('ours', {}).get('kind')}, {opts.steps} steps, eta {ETA}, guidance 1):")
        for which in ("diffusers", "ours"):
            r = cy.get(which, {})
            if r.get("failed"):
                print(f"  {which:9s} failed: {r.get('error')}")
                continue
            print(f"  {which:9s} {r['wall_s']:8.3f} s  peak +{r['peak_mb']:8.1f} MB  "
                  f"max |rec - x0| {r['max_abs_error']:.2e}  rel {r['rel_error']:.2e}")
        if all(not cy.get(w, {}).get("failed") for w in ("diffusers", "ours")) and "ours" in cy:
            summary["cycle_time_ratio"] = cy["ours"]["wall_s"] / cy["diffusers"]["wall_s"]
            print(f"  time ours / diffusers = {summary['cycle_time_ratio']:.3f}")
    print("ratios: enc+rep = encode + replay / the same calls through ComfyUI's guider (target <= 1.05); ks_a = / "
          "KSampler euler_a; ckpt x, graph x = one Langevin chain-gradient step / one replay, recomputing (about 4) "
          "and "
          "keeping the graph (about 3); node x = the Langevin node's step (VAE + CLIP) / one replay; +MB = peak above "
          "the loaded models; pred MB = auto's prediction (chain graph + decode), used MB = the node step's peak")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="comma-separated: sd15,sd3,sdxl (default; SDXL last), flux, tiny_*")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (latent side = size / 8)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    ap.add_argument("--no-ksampler", dest="ksampler", action="store_false",
                    help="replay mode: skip the KSampler euler_ancestral comparison (saves a third of its time)")
    ap.add_argument("--context-tokens", type=int, default=None,
                    help="conditioning tokens instead of the model's usual (SD3: 154 with T5, 77 without)")
    ap.add_argument("--cycle", action="store_true", help="compare with diffusers' CycleDiffusionPipeline (SD1.5)")
    ap.add_argument("--flux", action="store_true", help="add Flux.1-dev (needs about 24 GB at bf16 + activations)")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny models: checks the code path in seconds")
    ap.add_argument("--same-process", action="store_true", help="no subprocess per model/mode (memory then shared)")
    ap.add_argument("--json", default=None, help="also write the summary here")
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--clip", default=None, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.steps is None:
        opts.steps = 3 if opts.tiny else 4
    if opts.size is None:
        opts.size = 64 if opts.tiny else 256
    opts.clip = opts.clip or ("tiny" if opts.tiny else "vit_b_32")
    if opts.child:
        print(json.dumps(_dispatch(*opts.child, opts)))
        return
    models = (opts.models.split(",") if opts.models else
              (["tiny_sd15", "tiny_sd3", "tiny_sdxl"] if opts.tiny else ["sd15", "sd3", "sdxl"]))
    if opts.flux:
        import psutil

        if opts.device == "cpu" and psutil.virtual_memory().total < 48 * 2 ** 30:
            print(f"Flux.1: skipped: 12 B parameters are about 24 GB at bf16 before activations; this machine has "
                  f"{psutil.virtual_memory().total / 2 ** 30:.0f} GB of RAM. Run with --device cuda on a GPU with "
                  "the memory.")
        else:
            models.append("flux")
    modes = opts.modes.split(",")
    if opts.device == "cuda":  # read by _common.setup in this process (--same-process) and in every child
        os.environ["DPM_LATENT_BENCH_CUDA"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        opts.tmp = tmp
        opts.passthrough = ["--tmp", tmp, "--steps", str(opts.steps), "--size", str(opts.size), "--rounds",
                            str(opts.rounds), "--dtype", opts.dtype, "--device", opts.device, "--clip", opts.clip] + \
            (["--tiny"] if opts.tiny else []) + ([] if opts.ksampler else ["--no-ksampler"]) + \
            ([] if opts.context_tokens is None else ["--context-tokens", str(opts.context_tokens)])
        if "auto" in modes:  # the CLIP Energy's folder, built once for every model (in a child: this stays small)
            if _run_child(["prepare", "clip"], opts).get("failed"):
                raise SystemExit("could not build the CLIP Energy's folder")
        results = {}
        for kind in models:
            if opts.cycle and kind.endswith("sdxl") and "cycle" not in results:
                results["cycle"] = {w: _run_child(["cycle", w], opts) for w in ("diffusers", "ours")}
            results[kind] = {}
            for mode in modes:
                t = time.perf_counter()
                r = _run_child([kind, mode], opts)
                results[kind][mode] = r
                print(f"{kind} {mode} ({time.perf_counter() - t:.0f} s): {json.dumps(r)}", flush=True)
        if opts.cycle and "cycle" not in results:
            results["cycle"] = {w: _run_child(["cycle", w], opts) for w in ("diffusers", "ours")}
        if "cycle" in results:
            for w, r in results["cycle"].items():
                print(f"cycle {w}: {json.dumps(r)}", flush=True)
    first = next((r for modes_ in results.values() for r in modes_.values() if "torch" in r), {})
    results["_machine"] = {"device": first.get("device", opts.device), "dtype": opts.dtype,
                           "torch": first.get("torch"), "threads": first.get("threads"), "cpus": os.cpu_count()}
    summary = report(results, opts)
    summary.update(steps=opts.steps, size=opts.size, rounds=opts.rounds, tiny=opts.tiny)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(summary, f, indent=1)
    print("RESULT " + json.dumps(summary))


if __name__ == "__main__":
    main()
