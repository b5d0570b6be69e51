# SPDX-License-Identifier: GPL-3.0-or-later
"""The Asyrp nodes' work inside ComfyUI: train a direction, edit a code, edit by DDIM inversion.

Each function checks its inputs (a bad one is a :class:`NodeInputError` naming it), patches a
private clone of the model at its h site (``hspace``) and runs the pure-torch Asyrp code of
``samplers.asyrp`` inside ComfyUI's sampling machinery (``sampling.run_in_comfy``).
"""
from __future__ import annotations

import logging
import math

import torch

import comfy.utils

from ...samplers import CodeError
from ...samplers import asyrp as AS
from . import clip_models as CM
from . import plot as P
from . import sampling as B
from .autograd import UnsupportedWeights, alias_conds, gradients_through, vae_decoder
from .conditioning import empty_conditioning
from .hspace import check_direction_for_model, direction_on, model_record, patched


# Direction From Examples: one shift at every position; gated to the object (median contrast); gated to where paired
# examples differ (a linear discriminant of h there)
SPREADS = ("everywhere", "object", "object, centred", "where pairs differ")
OBJECT_SPREADS = ("object", "object, centred")
DELTA_WARN = 0.5  # ||delta_h|| / ||h|| above this: training warns (the measure: 4-5 destroys images)


def train(model, vae, latents, clip_name, source_text, target_text, steps, t_edit, iterations, learning_rate,
          clip_weight, l1_weight, seed, kind, conditioning=None, validation_latents=None, h_site="middle"):
    """Asyrp Train Direction: returns (direction, loss plot)."""
    samples = latents["samples"]
    val = None
    if validation_latents is not None:
        val = validation_latents["samples"]
        B.check_latent(model, val, "validation_latents")
    rec = model_record(model, h_site)
    B.check_latent(model, samples, "latents")
    if samples.ndim == 5:
        raise B.NodeInputError(
            "latents: Asyrp Train Direction scores decoded images with a directional CLIP loss, which is not "
            "defined for video clips here (it would need a per-frame loss through the video VAE at every "
            "training step). On a video model, make the direction with Asyrp Direction From Examples (clips "
            "with and without the attribute) and apply it with Asyrp Edit")
    if vae is None or getattr(vae, "first_stage_model", None) is None:
        raise B.NodeInputError("vae: connect the VAE that decodes this model's latents")
    if kind not in AS.KINDS:
        raise B.NodeInputError(f"kind: {kind!r} is not one of {AS.KINDS}")
    if not source_text.strip() or not target_text.strip():
        raise B.NodeInputError("source_text / target_text: both texts are needed (the edit is their difference)")
    if source_text.strip() == target_text.strip():
        raise B.NodeInputError("target_text: equals source_text, so there is no direction to learn")
    if AS.edited_steps(steps, t_edit) == 0:
        raise B.NodeInputError(f"t_edit: {t_edit} leaves no step of {steps} to edit; lower it")
    CM.clip_folder(clip_name)  # a missing folder is an input error before anything loads
    sigmas = B.schedule(model, "normal", steps, 1.0)
    family = rec["family"]
    work_model, shift = patched(model, rec)
    if conditioning is not None:
        B.check_conditioning_batch(conditioning, 1, "conditioning")
    cond = empty_conditioning(model) if conditioning is None else conditioning
    result = {}
    pbar = comfy.utils.ProgressBar(1)

    def work(denoise_fn, x0, _callback, guider):
        # The CLIP is loaded by ComfyUI's model management with the model and the VAE, as CLIP Energy's
        # is (so it leaves VRAM when others need it).
        bundle, clip = CM.load_clip(clip_name, others=[guider.model_patcher, vae.patcher])
        device = x0.device
        with torch.inference_mode(False):
            e_src, e_trg = bundle.text_embeds([source_text]).detach(), bundle.text_embeds([target_text]).detach()
            text_dir = e_trg - e_src
            result["text_cosine"] = float(torch.nn.functional.cosine_similarity(e_src, e_trg, dim=-1).mean())
        try:
            with gradients_through(guider.inner_model, vae.first_stage_model, clip.model):
                alias_conds(guider.conds)
                x0 = x0.float().clone()
                with torch.no_grad():
                    denoise_fn(x0[:1], float(sigmas[0]))  # reads h's shape
                h_shape = shift.h_shape
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
                    if kind == "implicit function":
                        module = AS.DeltaBlock(h_shape[0], zero_init=False)  # the official default init
                    else:
                        module = AS.GlobalDelta(h_shape, [AS.noise_level(float(s), family)
                                                          for s in sigmas[:-1]])
                module = module.to(device)
                decode = vae_decoder(vae, guider)

                def embed(lat):
                    return bundle.image_embeds(bundle.normalize(bundle.resize(decode(lat))))

                def edited_with(x, sigma, mod):
                    shift.direction = AS.Direction([mod], [1.0])
                    shift.strengths = torch.ones(x.shape[0])
                    return shift.run(denoise_fn, x, sigma, family)

                def progress(done, total, _loss):
                    pbar.update_absolute(done, total)

                held = None
                if val is not None:
                    held = guider.inner_model.process_latent_in(val.to(device).float()).clone()
                shift.ratios = {}
                try:
                    trace = AS.train_direction(denoise_fn, edited_with, module, x0, sigmas, family, embed,
                                               text_dir, t_edit, iterations, learning_rate, clip_weight,
                                               l1_weight, batch_size=1, seed=seed, progress=progress,
                                               held_out=held, text_cosine=max(result["text_cosine"], 0.0))
                except CodeError as e:
                    raise B.code_error(e) from None
                except RuntimeError as e:
                    if "Inference tensors" not in str(e):
                        raise
                    raise B.NodeInputError(
                        "model: a patch attached to this MODEL cannot be differentiated through "
                        f"({e}); remove patches other than LoRAs for training") from None
        except UnsupportedWeights as e:
            raise B.NodeInputError(f"model: {e}") from None
        module = module.cpu().requires_grad_(False)
        for name, t in module.state_dict().items():
            if not torch.isfinite(t).all():
                raise B.NodeInputError(
                    f"learning_rate: training diverged ({name} of the direction became NaN or infinite at "
                    f"{learning_rate}); lower learning_rate or clip_weight, or train in fp32")
        result["module"], result["trace"], result["h_shape"] = module, trace, h_shape
        # ||delta_h|| / ||h|| per edited step, as the final direction last shifted h there
        levels = [round(AS.noise_level(float(s), family), 6) for s in sigmas[:AS.edited_steps(steps, t_edit)]]
        result["delta_over_h"] = [shift.ratios.get(lv, float("nan")) for lv in levels]
        result["h_norm"] = [shift.norms.get(lv, float("nan")) for lv in levels]
        shift.ratios = None
        return x0

    B.run_in_comfy(work_model, cond, cond, 1.0, samples, sigmas, work, seed, None)
    meta = {k: rec[k] for k in ("architecture", "unet", "latent_format", "family", "h_site", "h_block")}
    meta.update(h_shape=list(result["h_shape"]), sigmas=[float(s) for s in sigmas], steps=int(steps),
                source_text=source_text, target_text=target_text, t_edit=float(t_edit), t_boost=0.0,
                kind=kind, clip_name=clip_name, iterations=int(iterations), learning_rate=float(learning_rate),
                clip_weight=float(clip_weight), l1_weight=float(l1_weight),
                loss_curve=[float(v) for v in result["trace"].losses],
                clip_loss_curve=[float(v) for v in result["trace"].clip_losses],
                text_cosine=result["text_cosine"], delta_over_h=result["delta_over_h"], h_norm=result["h_norm"])
    trace = result["trace"]
    ratio = max((v for v in result["delta_over_h"] if math.isfinite(v)), default=float("nan"))
    title = f"loss per iteration; max ||dh||/||h|| {ratio:.3g}"
    if ratio > DELTA_WARN:
        title += " (large: edits may leave the model's distribution)"
        logging.warning("Asyrp Train Direction: ||delta_h|| / ||h|| reaches %.3g (above %.2g): delta_h this large "
                        "is off the model's distribution and tends to destroy the picture; lower learning_rate or "
                        "raise l1_weight", ratio, DELTA_WARN)
    if trace.held_out_before is not None:
        meta.update(held_out_clip_loss_before=trace.held_out_before, held_out_clip_loss_after=trace.held_out_after,
                    held_out_images=int(val.shape[0]))
        title += f"; held-out CLIP loss {trace.held_out_before:.4f} -> {trace.held_out_after:.4f}"
    direction = AS.Direction([result["module"]], [1.0], meta)
    plot = P.paint([P.Panel(title, [("total", trace.losses, None), ("clip", trace.clip_losses, None),
                                    ("l1", trace.l1_losses, None)], legend=True),
                    P.Panel("||delta_h|| / ||h|| per edited step (final direction)",
                            [("ratio", result["delta_over_h"], None)], threshold=DELTA_WARN)])
    return direction, plot


def parse_strengths(text) -> list[float]:
    if isinstance(text, (int, float)):
        vals = [float(text)]
    else:
        parts = [p.strip() for p in str(text).replace(";", ",").split(",") if p.strip()]
        if not parts:
            raise B.NodeInputError("strength: give a number (e.g. 1.0) or a comma-separated list (e.g. -1, 0, 1, 2)")
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise B.NodeInputError(f"strength: {text!r} is not a number or a comma-separated list of numbers "
                                   "(e.g. 0.5, 1, 2)") from None
    if not all(math.isfinite(v) for v in vals):
        raise B.NodeInputError(f"strength: {text!r} contains a non-finite value")
    return vals


def resolve_interval(direction: AS.Direction, t_edit: float, t_boost: float) -> tuple[float, float]:
    te = float(direction.meta.get("t_edit", 0.5)) if t_edit < 0 else float(t_edit)
    tb = float(direction.meta.get("t_boost", 0.0)) if t_boost < 0 else float(t_boost)
    for name, v in (("t_edit", te), ("t_boost", tb)):
        if not (0.0 <= v <= 1.0):
            raise B.NodeInputError(f"{name}: must be a fraction of the chain in [0, 1] (or -1 for the "
                                   f"direction's value), got {v}")
    return te, tb


def step_rescale(direction: AS.Direction, steps: int, t_edit: float) -> float:
    """The official strength rescaling: edited steps the direction was made with / edited steps now, so
    the same direction moves an image by about as much at 40 steps as at 20 (1 for directions that do
    not record their steps)."""
    meta = direction.meta
    if "steps" not in meta or "t_edit" not in meta:
        return 1.0
    now = AS.edited_steps(int(steps), float(t_edit))
    made = AS.edited_steps(int(meta["steps"]), float(meta["t_edit"]))
    return made / now if now > 0 and made > 0 else 1.0


def edit(model, positive, negative, cfg, latent_code, direction, strength, t_edit, t_boost, seed=0):
    """Asyrp Edit: the code replayed with the asymmetric step; returns the latent samples."""
    code = latent_code
    rec = check_direction_for_model(model, direction)
    B.check_code_for_model(model, code)
    if code.family != rec["family"]:
        raise B.NodeInputError("latent_code: made for another model family than this model")
    strengths = parse_strengths(strength)
    te, tb = resolve_interval(direction, t_edit, t_boost)
    B.check_conditioning_batch(positive, code.batch_size, "positive")
    B.check_conditioning_batch(negative, code.batch_size, "negative")
    full = code.tiled(len(strengths))
    per_latent = (torch.tensor(strengths, dtype=torch.float32) * step_rescale(direction, code.steps, te)
                  ).repeat_interleave(code.batch_size)
    any_edit = any(v != 0.0 for v in strengths) and AS.edited_steps(code.steps, te) > 0
    work_model, shift = patched(model, rec)
    placeholder = torch.zeros(full.shape)

    def work(denoise_fn, x0, callback, _guider):
        dev_code = full.to(device=x0.device, dtype=torch.float32)
        edited = None
        if any_edit:
            shift.direction = direction_on(direction, x0.device)
            shift.strengths = per_latent

            def edited(x, sigma):
                return shift.run(denoise_fn, x, sigma, code.family)
        try:
            return AS.asyrp_replay(denoise_fn, edited, dev_code, te, tb, seed=seed, callback=callback)
        except CodeError as e:
            raise B.code_error(e) from None

    samples = B.run_in_comfy(work_model, positive, negative, cfg, placeholder, code.sigmas, work, seed,
                             code.steps)
    B.check_finite(samples, "Asyrp Edit", "the edited latent", code.steps, code.steps)
    return samples


def edit_ddim(model, positive, negative, cfg, latent_image, direction, strength, steps, t_edit, t_boost, seed):
    """Asyrp Edit (DDIM Inversion): returns (latent samples, text on the reconstruction error)."""
    rec = check_direction_for_model(model, direction)
    samples = latent_image["samples"]
    B.check_latent(model, samples, "latent_image")
    strengths = parse_strengths(strength)
    te, tb = resolve_interval(direction, t_edit, t_boost)
    B.check_conditioning_batch(positive, samples.shape[0], "positive")
    B.check_conditioning_batch(negative, samples.shape[0], "negative")
    family = rec["family"]
    sigmas = B.schedule(model, "normal", steps, 1.0)
    n = samples.shape[0]
    per_latent = (torch.tensor(strengths, dtype=torch.float32) * step_rescale(direction, steps, te)
                  ).repeat_interleave(n)
    work_model, shift = patched(model, rec)
    result = {}

    def work(denoise_fn, x0, callback, _guider):
        x0 = x0[:n].float()  # the latent handed in is the input tiled once per strength
        try:
            x_T = AS.ddim_invert(denoise_fn, x0, sigmas, family)
            plain = AS.asyrp_sample(denoise_fn, None, x_T, sigmas, family, te, tb, seed=seed)
            shift.direction = direction_on(direction, x0.device)
            shift.strengths = per_latent
            big = x_T.repeat(len(strengths), *([1] * (x_T.dim() - 1)))

            def edited(x, sigma):
                return shift.run(denoise_fn, x, sigma, family)
            out = AS.asyrp_sample(denoise_fn, edited, big, sigmas, family, te, tb, seed=seed, callback=callback)
        except CodeError as e:
            raise B.code_error(e) from None
        err = ((plain - x0).flatten(1).norm(dim=1) / x0.flatten(1).norm(dim=1).clamp_min(1e-12)).tolist()
        result["err"] = err
        return out

    placeholder = samples.repeat(len(strengths), *([1] * (samples.dim() - 1)))
    out = B.run_in_comfy(work_model, positive, negative, cfg, placeholder, sigmas, work, seed, steps)
    err = result["err"]
    text = (f"DDIM inversion, {steps} steps: plain reconstruction off the input by "
            f"{sum(err) / len(err):.4g} (mean relative L2 in latent space; max {max(err):.4g}, n = {len(err)})")
    B.check_finite(out, "Asyrp Edit (DDIM Inversion)", "the edited latent", steps, steps)
    return out, text


def combine(directions, coefficients):
    """Combine Asyrp Directions: sum_k c_k d_k of the connected directions."""
    pairs = [(d, c) for d, c in zip(directions, coefficients) if d is not None]
    try:
        return AS.combine([d for d, _ in pairs], [c for _, c in pairs])
    except CodeError as e:
        raise B.NodeInputError(f"direction: {e}") from None


def from_examples(model, latents_with, latents_without, steps, t_edit, conditioning=None, h_site="middle",
                  spread="everywhere", t_start=1.0):
    """Asyrp Direction From Examples: per step, the mean h along the DDIM chains of ``latents_with``
    minus that of ``latents_without`` (no training), at ``h_site``. ``spread`` "everywhere": one shift per
    channel at every position (``AS.example_direction``); "object": the difference of the examples' object
    contrasts, applied where h looks like the object (``AS.object_direction``); "object, centred": the same,
    minus the shift's mean over the picture (``AS.ObjectDelta``'s ``centred``); "where pairs differ": the
    examples are pairs (the same scene with and without the attribute), the mean difference over the positions
    where each pair's latents differ, applied where h looks like such a position (``AS.region_direction``).
    Steps starting above
    ``t_start`` get no delta_h (1: from T, as training). Returns the direction."""
    rec = model_record(model, h_site)
    if spread not in SPREADS:
        raise B.NodeInputError(f"spread: {spread!r} is not one of {list(SPREADS)}")
    a, b = latents_with["samples"], latents_without["samples"]
    B.check_latent(model, a, "latents_with")
    B.check_latent(model, b, "latents_without")
    if tuple(a.shape[1:]) != tuple(b.shape[1:]):
        raise B.NodeInputError(f"latents_without: its images are {list(b.shape[1:])} latents, latents_with's "
                               f"{list(a.shape[1:])}; both sets must be at one image size (h is compared per "
                               "position)")
    paired = spread == "where pairs differ"
    if paired and a.shape[0] != b.shape[0]:
        raise B.NodeInputError(f"latents_without: spread 'where pairs differ' takes pairs (image k of both sets is "
                               f"the same scene with and without the attribute), but it has {b.shape[0]} images "
                               f"and latents_with {a.shape[0]}; give both sets the same scenes in the same order, "
                               "or use spread 'everywhere'")
    if paired and a.dim() != 4:
        raise B.NodeInputError(f"spread: 'where pairs differ' takes image latents [B, C, H, W]; these are "
                               f"{list(a.shape)}; use 'everywhere' for video")
    if paired and torch.equal(a, b):
        raise B.NodeInputError("latents_without: with spread 'where pairs differ' each pair must show the same scene "
                               "with and without the attribute, but these pairs are identical; connect the images "
                               "without it, or use spread 'everywhere'")
    n_edit = AS.edited_steps(steps, t_edit)
    if n_edit == 0:
        raise B.NodeInputError(f"t_edit: {t_edit} leaves no step of {steps} to edit; lower it")
    n_skip = AS.edited_steps(steps, float(t_start)) if float(t_start) < 1.0 else 0
    if not (0.0 < float(t_start) <= 1.0) or n_skip >= n_edit:
        raise B.NodeInputError(f"t_start: {t_start} leaves no step of {steps} between it and t_edit {t_edit}; "
                               "t_start must lie in (t_edit, 1] (1: from T)")
    if conditioning is not None:
        B.check_conditioning_batch(conditioning, 1, "conditioning")
    cond = empty_conditioning(model) if conditioning is None else conditioning
    sigmas = B.schedule(model, "normal", steps, 1.0)
    family = rec["family"]
    work_model, shift = patched(model, rec)
    result = {}
    n_a = a.shape[0]
    pbar = comfy.utils.ProgressBar(2)

    def work(denoise_fn, x0, _callback, guider):
        x0 = x0.float()
        parts = (x0[:n_a], x0[n_a:])
        diff = (parts[0] - parts[1]).norm(dim=1, keepdim=True) if paired else None
        try:
            if paired:   # the without-set also gives the gate's discriminant, finished one step at a time
                with_stats, norms = AS.region_stats_along_chain(denoise_fn, shift.read, parts[0], diff, sigmas,
                                                                family, n_edit, first_step=n_skip)
                pbar.update_absolute(1, 2)
                means = [(with_stats, norms), AS.region_stats_along_chain(
                    denoise_fn, shift.read, parts[1], diff, sigmas, family, n_edit, scatter=True, first_step=n_skip,
                    finish=lambda i, st: AS.region_step(with_stats[i], st, i))]
                pbar.update_absolute(2, 2)
            else:
                means = []
                for k, part in enumerate(parts):
                    means.append(AS.mean_h_along_chain(denoise_fn, shift.read, part, sigmas, family, n_edit,
                                                       reduce=AS.object_stats if spread in OBJECT_SPREADS else None))
                    pbar.update_absolute(k + 1, 2)
        except CodeError as e:
            raise B.code_error(e) from None
        (result["with"], norms_a), (result["without"], norms_b) = means
        result["norms"] = [(u * n_a + v * (x0.shape[0] - n_a)) / x0.shape[0] for u, v in zip(norms_a, norms_b)]
        return x0

    B.run_in_comfy(work_model, cond, cond, 1.0, torch.cat([a, b]), sigmas, work, 0, None)
    levels = [AS.noise_level(float(s), family) for s in sigmas[:-1]]
    h_shape = tuple(shift.h_shape)  # the last h the patch saw
    meta = {k: rec[k] for k in ("architecture", "unet", "latent_format", "family", "h_site", "h_block")}
    meta.update(h_shape=list(h_shape), sigmas=[float(s) for s in sigmas], steps=int(steps),
                source_text="examples without the attribute", target_text="examples with the attribute",
                t_edit=float(t_edit), t_boost=0.0, kind="from examples", examples_with=int(n_a),
                examples_without=int(b.shape[0]))
    try:
        if paired:
            meta.update(spread=spread, region_fraction=AS.REGION_FRACTION)
            direction = AS.region_direction(result["without"], levels, meta)
            # ||delta_h|| where the gate is about 1: delta on an example's region positions
            size = [0.0 if v is None else v.region_size for v in result["without"]]
            deltas = [direction.terms[0].delta[i] * size[i] ** 0.5 for i in range(n_edit)]
        elif spread in OBJECT_SPREADS:
            # each step's stats: the object contrast (C) and the object's position count (1)
            ca, cb = [d.cpu()[:-1] for d in result["with"]], [d.cpu()[:-1] for d in result["without"]]
            count = [0.5 * float(u[-1] + v[-1]) for u, v in zip(result["with"], result["without"])]
            meta.update(spread=spread)
            centred = spread == "object, centred"
            direction = AS.object_direction(ca, cb, levels, meta, centred=centred)
            # ||delta_h|| of the shift on a picture whose gate is 1 on the examples' object positions (centred:
            # what is left after the shift's mean over the picture is taken off)
            positions = math.prod(int(v) for v in h_shape[1:])
            deltas = [direction.terms[0].delta[i] * AS.object_shift_scale(count[i], positions, centred)
                      for i in range(n_edit)]
        else:
            direction = AS.example_direction([d.cpu() for d in result["with"]], [d.cpu() for d in result["without"]],
                                             levels, meta)
            probe = torch.zeros(1, *h_shape)
            deltas = [direction.delta(probe, lv)[0] for lv in levels[:n_edit]]
        with torch.no_grad():
            direction.terms[0].delta[:n_skip] = 0.0   # steps starting above t_start: no shift
        deltas = [torch.zeros_like(d) if i < n_skip else d for i, d in enumerate(deltas)]
    except CodeError as e:
        raise B.code_error(e) from None
    direction.meta["t_start"] = float(t_start)
    direction.meta["delta_over_h"] = AS.relative_norms(deltas, result["norms"])
    direction.meta["h_norm"] = [float(v) for v in result["norms"]]
    return direction
