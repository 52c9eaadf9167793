"""World-model rollouts on held-out clips, scored the way the 1X sampling challenge scores them.

For each clip (video [3, T, H, W] in [-1, 1], states [T, state_dim]) the model sees the first
``context_frames`` frames (17: x0..x16) and the states of all T frames, and predicts the rest. Scores, each
beside the copy-last-context-frame baseline (every predicted frame = the true x16):

  psnr_last   PSNR of the last frame (T = 77: frame 77 = x76, 2 s after x16 at 30 Hz: the challenge metric)
  psnr_mean   PSNR averaged over all predicted frames      ssim_mean   SSIM averaged over them
  ssim_last   SSIM of the last frame

on 8-bit frames (megawan.evaluation.metrics); and in latent space, so the DiT is measured apart from the
decoder: the predicted latents against the VAE's encoding of the true clip (the context's latent frames are
pinned, so only the predicted ones count), beside the copy-last-latent baseline (the last context latent
frame repeated):

  latent_mse_last   mean squared error of the last latent frame     latent_mse_mean   over all predicted ones

``conditions`` scores the same model, noise and clips with other states, the measure of how much the model
uses them: "zeroed" (all states 0), "swapped" (the states of another held-out clip), "shifted" (each frame
given the state of ``shift_frames`` frames earlier: the states one frame late). Their scores come as
``<condition>_<metric>``. Clips are split over DP replicas (clip i on replica i % dp) and the per-clip scores
gathered, so every rank returns the same means. The trainer's hook and ``python -m megawan.evaluate`` both
call ``evaluate_rollouts``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megawan.evaluation.metrics import finite_mean, psnr, ssim
from megawan.pipelines.pipeline import WORLD_MODEL_CONTEXT, Request, WanSampler
from megawan.pipelines.sampling import SamplingConfig
from megawan.progress import ProgressLine
from megawan.pipelines.video_out import decode_frames, to_uint8

METRICS = ("psnr_last", "psnr_mean", "ssim_last", "ssim_mean")
LATENT_METRICS = ("latent_mse_last", "latent_mse_mean")
STATE_CONDITIONS = ("true", "zeroed", "swapped", "shifted")
CONDITION_METRICS = METRICS + LATENT_METRICS  # reported per condition as "<condition>_<metric>"
SHEET_PREDICTED = 4  # predicted frames on the contact sheet (ending with the last), after the last context frame
# A world model trained on empty prompts has nothing to guide: one forward per step.
ROLLOUT_SAMPLING = SamplingConfig(guidance=1.0)


def sheet_frames(total: int, context_frames: int, predicted: int = SHEET_PREDICTED) -> list[int]:
    """Frame indices on the contact sheet: the last context frame, then ``predicted`` frames ending with the last."""
    n = total - context_frames
    return sorted({context_frames - 1, *(context_frames - 1 + round(i * n / predicted) for i in range(1, predicted + 1))})


def score_clip(pred_frames, true: torch.Tensor, context_frames: int) -> tuple[dict, list]:
    """Scores of one rollout. pred_frames: iterable of decoded frame groups [3, n, H, W] in [-1, 1] (all T
    frames, context included); true: uint8 [T, H, W, 3]. Returns (scores, predicted uint8 frames kept for
    the contact sheet: ``sheet_frames``: the last context frame and predicted frames ending with the last)."""
    total = true.shape[0]
    last_ctx = true[context_frames - 1]
    sheet_at = set(sheet_frames(total, context_frames))
    p, s, bp, bs, kept = [], [], [], [], {}
    start = 0
    for group in pred_frames:
        frames = to_uint8(group)
        for j in range(frames.shape[0]):
            i = start + j
            if i in sheet_at:
                kept[i] = frames[j]
            if i < context_frames:
                continue
            p.append(psnr(frames[j], true[i]).item())
            s.append(ssim(frames[j], true[i]).item())
            bp.append(psnr(last_ctx, true[i]).item())
            bs.append(ssim(last_ctx, true[i]).item())
        start += frames.shape[0]
    if start != total:
        raise RuntimeError(f"decoded {start} frames, expected {total}")
    scores = {"psnr_last": p[-1], "psnr_mean": finite_mean(p), "ssim_last": s[-1], "ssim_mean": sum(s) / len(s),
              "baseline_psnr_last": bp[-1], "baseline_psnr_mean": finite_mean(bp), "baseline_ssim_last": bs[-1],
              "baseline_ssim_mean": sum(bs) / len(bs)}
    order = sorted(kept)
    sheet_rows = [[true[i] for i in order], [kept[i] for i in order]]
    return scores, sheet_rows


def latent_scores(pred: torch.Tensor, true: torch.Tensor, clean: int) -> dict:
    """Latent-space scores of one rollout: predicted latents [1, C, F, h, w] against the encoded true clip,
    over the latent frames after the ``clean`` context ones, and the copy-last-latent baseline."""
    pred, true = pred.float(), true.float().to(pred.device)
    err = (pred[:, :, clean:] - true[:, :, clean:]).square().mean(dim=(0, 1, 3, 4))
    base = (true[:, :, clean - 1:clean] - true[:, :, clean:]).square().mean(dim=(0, 1, 3, 4))
    return {"latent_mse_last": err[-1].item(), "latent_mse_mean": err.mean().item(),
            "baseline_latent_mse_last": base[-1].item(), "baseline_latent_mse_mean": base.mean().item()}


def condition_states(states: torch.Tensor, condition: str, *, other: torch.Tensor | None = None,
                     shift_frames: int = 1) -> torch.Tensor:
    """The states a rollout gets under ``condition`` (see the module docstring); ``other``: another clip's."""
    if condition == "true":
        return states
    if condition == "zeroed":
        return torch.zeros_like(states)
    if condition == "swapped":
        if other is None or other.shape != states.shape:
            raise ValueError(f"swapped states need another clip's states of shape {tuple(states.shape)}")
        return other
    if condition == "shifted":
        if not 0 < shift_frames < states.shape[0]:
            raise ValueError(f"shift_frames must be in [1, {states.shape[0] - 1}], got {shift_frames}")
        return torch.cat([states[:1].expand(shift_frames, -1), states[:-shift_frames]])
    raise ValueError(f"unknown states condition {condition!r}; one of {STATE_CONDITIONS}")


def _swap_partner(i: int, n: int) -> int:
    """The held-out clip whose states clip i gets when swapped: half the list away (another segment, usually)."""
    return (i + max(1, n // 2)) % n


def check_conditions(conditions: tuple[str, ...], state_dim: int, num_clips: int) -> None:
    """The states conditions ``evaluate_rollouts`` can roll out for this model and number of clips."""
    if not conditions or conditions[0] != "true" or len(set(conditions)) != len(conditions) or \
            any(c not in STATE_CONDITIONS for c in conditions):
        raise ValueError(f"conditions must start with 'true' and name each of {STATE_CONDITIONS} at most once, "
                         f"got {conditions}")
    if len(conditions) > 1 and not state_dim:
        raise ValueError(f"state conditions {conditions[1:]} need a state-conditioned model (config state_dim > 0)")
    if "swapped" in conditions and num_clips < 2:
        raise ValueError("the 'swapped' condition needs at least two clips (it gives each the states of another)")


def evaluate_rollouts(model, vae, clips, groups, *, text: torch.Tensor | None = None,
                      config: SamplingConfig = ROLLOUT_SAMPLING, context_frames: int = WORLD_MODEL_CONTEXT,
                      seed: int = 0, null_text: torch.Tensor | None = None, progress=False,
                      conditions=("true",), shift_frames: int = 1, hz: float = 30.0) -> dict:
    """Roll the world model out on ``clips`` and score it against the truth and the copy-last-frame baseline.

    Args:
        model: a WanDiT (state-conditioned for the 1X set-up), in any TP x CP layout; put in eval mode here.
        vae: WanVAE38; encodes the context and the true clip, decodes sharded over ``groups.vae_group``.
        clips: the SAME sequence on every rank (a list, or anything with len() and [i], read lazily): dicts
            with "video" [3, T, H, W] in [-1, 1] and "states" [T, D] (e.g. items of WorldModel1XDataset with
            clip_frames=77). Clip i runs on DP replica i % dp; only its replica reads it.
        groups: the run's ParallelGroups.
        text: [Lt, text_dim] prompt embedding used for every clip (default: no prompt, zeros [0, text_dim]).
        config: sampling settings (default: release UniPC, 50 steps, shift 5, no guidance).
        seed: clip i's noise seed is seed + i (independent of the layout), the same under every condition.
        conditions: which states to roll out with, "true" first (see ``STATE_CONDITIONS``); others need a
            state-conditioned model ("swapped" also two clips or more).
        shift_frames: the delay of the "shifted" condition, in video frames.
        hz: frames per second of the clips, for the contact sheet's column labels.
        progress: True for rank 0's progress (megawan.progress.ProgressLine: a bar on a terminal, a timed line
            elsewhere), or a function of the number of rollouts on this rank returning the ProgressLine to use
            (the trainer's, set up like its training progress).
    Returns (same on every rank): {metric: mean over clips} for METRICS, LATENT_METRICS and their "baseline_"
        twins; "<condition>_<metric>" for every other condition; "num_clips"; "per_clip" [{metric: value}]
        (true states); "conditions" {condition: {metric: mean}}; and "contact_sheet": uint8 [3, H', W'], the
        labelled sheet of clip 0 (rows: truth, prediction, copy-last-frame baseline, then the prediction under
        each other condition; columns: the last context frame and predicted frames), or None if no clip.
    """
    conditions = tuple(conditions)
    cfg = model.config
    check_conditions(conditions, cfg.state_dim, len(clips))
    was_training = model.training
    sampler = WanSampler(model, vae, groups, config)
    text = torch.zeros(0, cfg.text_dim) if text is None else text
    clean = (context_frames - 1) // 4 + 1
    mine = list(range(groups.dp_rank, len(clips), groups.dp))
    results, sheet = {}, None
    total = len(mine) * len(conditions)
    if callable(progress):
        bar = progress(total)
    else:
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        bar = ProgressLine(total, desc="rollouts", unit="rollout", enabled=bool(progress) and rank0, start_line=True)
    try:
        for n, i in enumerate(mine):
            clip = clips[i]
            video, states = clip["video"], clip.get("states")
            true_uint8 = to_uint8(video)
            with torch.no_grad():  # the whole true clip: its first `clean` latent frames are the context's
                true_latents = vae.encode(video[None].to(groups.device), groups.vae_group, gather_output=True).float()
            other = clips[_swap_partner(i, len(clips))]["states"] if "swapped" in conditions else None
            per_condition, rows = {}, {}
            for c, condition in enumerate(conditions):
                cond_states = None
                if cfg.state_dim:
                    cond_states = condition_states(states, condition, other=other, shift_frames=shift_frames)
                req = Request(text=text, context=video, states=cond_states, frames=video.shape[1],
                              context_frames=context_frames, seed=seed + i)
                latents = sampler.sample(req, null_text, progress=False, cond_latents=true_latents[:, :, :clean])
                scores, sheet_rows = score_clip(decode_frames(vae, latents, groups.vae_group), true_uint8,
                                                context_frames)
                scores.update(latent_scores(latents, true_latents, clean))
                per_condition[condition] = scores
                rows[condition] = sheet_rows
                bar.update(n * len(conditions) + c + 1)
            results[i] = per_condition
            if i == 0:
                sheet = _labelled_sheet(rows, true_uint8, context_frames, hz)
    finally:
        bar.close()
        model.train(was_training)
    if dist.is_initialized() and groups.dp > 1:
        every = [None] * groups.dp
        dist.all_gather_object(every, (results, sheet), group=groups.dp_group)
        for r, s in every:
            results.update(r)
            sheet = s if s is not None else sheet
    per_clip = [results[i]["true"] for i in sorted(results)]
    out = {"num_clips": len(per_clip), "per_clip": per_clip, "contact_sheet": sheet, "conditions": {}}
    for condition in conditions:
        scores = [results[i][condition] for i in sorted(results)]
        means = {key: finite_mean(c[key] for c in scores) for key in (scores[0] if scores else ())}
        out["conditions"][condition] = means
        if condition == "true":
            out.update(means)
        else:
            out.update({f"{condition}_{m}": means[m] for m in CONDITION_METRICS if m in means})
    return out


def _labelled_sheet(rows: dict, true_uint8: torch.Tensor, context_frames: int, hz: float) -> torch.Tensor:
    """uint8 [3, H', W']: truth, prediction and copy-last-frame rows (then one per other condition), columns
    labelled with the frame index and its time after the last context frame."""
    from megawan.evaluation.pictures import rollout_sheet

    at = sheet_frames(true_uint8.shape[0], context_frames)
    truth, predicted = rows["true"]
    grid = [truth, predicted, [true_uint8[context_frames - 1]] * len(at)]
    labels = ["truth", "prediction", "copy last frame"]
    for condition, (_, pred) in rows.items():
        if condition != "true":
            grid.append(pred)
            labels.append(f"prediction, states {condition}")
    cols = [f"frame {i}{' (context)' if i < context_frames else ''}\n+{(i - context_frames + 1) / hz:.2f} s"
            for i in at]
    return rollout_sheet(grid, labels, cols).permute(2, 0, 1).contiguous()


def log_to_tensorboard(writer, result: dict, step: int, prefix: str = "eval") -> None:
    """Write ``evaluate_rollouts``' means as scalars (model, the copy baseline and the model under other state
    conditions side by side under one tag each) and its contact sheet as an image. ``writer``: a
    torch.utils.tensorboard SummaryWriter (call on one rank)."""
    for m in METRICS + LATENT_METRICS:
        if m not in result:
            continue
        values = {"model": result[m], "copy_last_frame": result["baseline_" + m]}
        values.update({f"states_{c}": result[f"{c}_{m}"] for c in STATE_CONDITIONS[1:] if f"{c}_{m}" in result})
        writer.add_scalars(f"{prefix}/{m}", values, step)
    if result.get("contact_sheet") is not None:
        writer.add_image(f"{prefix}/rollout", result["contact_sheet"], step)  # uint8 CHW


def write_rollout_sheet(result: dict, path) -> str | None:
    """Save ``result["contact_sheet"]`` as a PNG at ``path``; returns the path written (None without a sheet)."""
    from megawan.pipelines.video_out import save_png

    if result.get("contact_sheet") is None:
        return None
    return str(save_png(path, result["contact_sheet"].permute(1, 2, 0).contiguous()))
