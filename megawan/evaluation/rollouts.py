"""World-model rollouts on held-out clips, scored the way the 1X sampling challenge scores them.

For each clip (video [3, T, H, W] in [-1, 1], states [T, state_dim]) the model sees the first
``context_frames`` frames (17: x0..x16) and the states of all T frames, and predicts the rest. Scores, each
beside the copy-last-context-frame baseline (every predicted frame = the true x16):

  psnr_last   PSNR of the last frame (T = 77: frame 77 = x76, 2 s after x16 at 30 Hz: the challenge metric)
  psnr_mean   PSNR averaged over all predicted frames      ssim_mean   SSIM averaged over them
  ssim_last   SSIM of the last frame

on 8-bit frames (megawan.evaluation.metrics). Clips are split over DP replicas (clip i on replica i % dp) and
the per-clip scores gathered, so every rank returns the same means. The trainer's hook and
``python -m megawan.evaluate`` both call ``evaluate_rollouts``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megawan.evaluation.metrics import finite_mean, psnr, ssim
from megawan.pipelines.pipeline import WORLD_MODEL_CONTEXT, Request, WanSampler
from megawan.pipelines.sampling import Progress, SamplingConfig
from megawan.pipelines.video_out import contact_sheet, decode_frames, to_uint8

METRICS = ("psnr_last", "psnr_mean", "ssim_last", "ssim_mean")
# A world model trained on empty prompts has nothing to guide: one forward per step.
ROLLOUT_SAMPLING = SamplingConfig(guidance=1.0)


def score_clip(pred_frames, true: torch.Tensor, context_frames: int) -> tuple[dict, list]:
    """Scores of one rollout. pred_frames: iterable of decoded frame groups [3, n, H, W] in [-1, 1] (all T
    frames, context included); true: uint8 [T, H, W, 3]. Returns (scores, predicted uint8 frames kept for
    the contact sheet: the last context frame, and 3 predicted frames ending with the last)."""
    total = true.shape[0]
    last_ctx = true[context_frames - 1]
    sheet_at = {context_frames - 1, *(context_frames - 1 + round(i * (total - context_frames) / 3) for i in (1, 2, 3))}
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


def evaluate_rollouts(model, vae, clips, groups, *, text: torch.Tensor | None = None,
                      config: SamplingConfig = ROLLOUT_SAMPLING, context_frames: int = WORLD_MODEL_CONTEXT,
                      seed: int = 0, null_text: torch.Tensor | None = None, progress: bool = False) -> dict:
    """Roll the world model out on ``clips`` and score it against the truth and the copy-last-frame baseline.

    Args:
        model: a WanDiT (state-conditioned for the 1X set-up), in any TP x CP layout; put in eval mode here.
        vae: WanVAE38; encodes the context and decodes sharded over ``groups.vae_group``.
        clips: the SAME sequence on every rank (a list, or anything with len() and [i], read lazily): dicts
            with "video" [3, T, H, W] in [-1, 1] and "states" [T, D] (e.g. items of WorldModel1XDataset with
            clip_frames=77). Clip i runs on DP replica i % dp; only its replica reads it.
        groups: the run's ParallelGroups.
        text: [Lt, text_dim] prompt embedding used for every clip (default: no prompt, zeros [0, text_dim]).
        config: sampling settings (default: release UniPC, 50 steps, shift 5, no guidance).
        seed: clip i's noise seed is seed + i (independent of the layout).
    Returns (same on every rank): {metric: mean over clips} for METRICS and "baseline_" + METRICS,
        "num_clips", "per_clip" [{metric: value}], and "contact_sheet": uint8 [3, H', W'] (rows: truth,
        prediction; columns: last context frame and three predicted frames) of clip 0, or None if no clip.
    """
    was_training = model.training
    sampler = WanSampler(model, vae, groups, config)
    cfg = model.config
    text = torch.zeros(0, cfg.text_dim) if text is None else text
    mine = list(range(groups.dp_rank, len(clips), groups.dp))
    results, sheet = {}, None
    bar = Progress(len(mine), "rollouts", enabled=progress)
    try:
        for n, i in enumerate(mine):
            clip = clips[i]
            video, states = clip["video"], clip.get("states")
            req = Request(text=text, context=video, states=states if cfg.state_dim else None,
                          frames=video.shape[1], context_frames=context_frames, seed=seed + i)
            latents = sampler.sample(req, null_text, progress=False)
            scores, rows = score_clip(decode_frames(vae, latents, groups.vae_group), to_uint8(video), context_frames)
            results[i] = scores
            if i == 0:
                sheet = contact_sheet(rows).permute(2, 0, 1).contiguous()
            bar.update(n + 1)
    finally:
        model.train(was_training)
    if dist.is_initialized() and groups.dp > 1:
        every = [None] * groups.dp
        dist.all_gather_object(every, (results, sheet), group=groups.dp_group)
        for r, s in every:
            results.update(r)
            sheet = s if s is not None else sheet
    per_clip = [results[i] for i in sorted(results)]
    out = {"num_clips": len(per_clip), "per_clip": per_clip, "contact_sheet": sheet}
    for key in per_clip[0] if per_clip else ():
        out[key] = finite_mean(c[key] for c in per_clip)
    return out


def log_to_tensorboard(writer, result: dict, step: int, prefix: str = "eval") -> None:
    """Write ``evaluate_rollouts``' means as scalars (model and baseline side by side under one tag each) and
    its contact sheet as an image. ``writer``: a torch.utils.tensorboard SummaryWriter (call on one rank)."""
    for m in METRICS:
        writer.add_scalars(f"{prefix}/{m}", {"model": result[m], "copy_last_frame": result["baseline_" + m]}, step)
    if result.get("contact_sheet") is not None:
        writer.add_image(f"{prefix}/rollout", result["contact_sheet"], step)  # uint8 CHW
