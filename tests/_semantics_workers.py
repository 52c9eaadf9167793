"""Rank functions for tests/test_train_semantics.py and tests/test_ema.py (spawned by run_distributed).

Every function returns a report from EVERY rank (not rank 0 only), so the tests compare each TP rank, CP rank
and DP replica against the reference. Full tensors are keyed by parameter name (the TP slices gathered).
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from megawan import parallel_state
from megawan.training.config import load_config
from megawan.training.optim import gather_model_space, master_shards
from megawan.training.trainer import Trainer


def full_tensor(t: torch.Tensor, param, groups) -> torch.Tensor:
    """The whole tensor from this rank's TP slice ``t`` of ``param`` (its parts, e.g. q / k / v of the fused
    qkv, each gathered along the partition dim); collective over TP."""
    t = t.detach().float().cpu()
    if not getattr(param, "tensor_model_parallel", False) or groups.tp == 1:
        return t.clone()
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    parts = []
    for part in t.chunk(stride, dim=0):
        slices = [torch.empty_like(part) for _ in range(groups.tp)]
        dist.all_gather(slices, part.contiguous(), group=groups.tp_group)
        parts.append(torch.cat(slices, dim=dim))
    return torch.cat(parts, dim=0)


def full_by_name(trainer, tensors: dict) -> dict:
    params = dict(trainer.model.named_parameters())
    return {n: full_tensor(tensors[n], params[n], trainer.groups) for n in params}


def full_weights(trainer) -> dict:
    return full_by_name(trainer, dict(trainer.model.named_parameters()))


def full_master(trainer) -> dict:
    """The distributed optimizer's fp32 master weights, gathered over DP x CP and TP."""
    slices = {s.name: s.main for s in master_shards(trainer.optimizer, trainer.model)}
    return full_by_name(trainer, gather_model_space(trainer.optimizer, trainer.model, slices))


def full_ema(trainer) -> dict | None:
    return None if trainer.ema is None else full_by_name(trainer, trainer.ema.full_tensors())


def _records(out_dir) -> list[dict]:
    path = os.path.join(out_dir, "logs", "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def report(trainer, **extra) -> dict:
    g = trainer.groups
    return {"rank": dist.get_rank(), "tp_rank": g.tp_rank, "cp_rank": g.cp_rank, "dp_rank": g.dp_rank,
            "weights": full_weights(trainer), "master": full_master(trainer), "ema": full_ema(trainer),
            "ema_numel": trainer.ema.numel() if trainer.ema is not None else 0,
            "local_param_numel": sum(p.numel() for p in trainer.model.parameters()),
            "resume_note": trainer.resume_note, "step": trainer.step, **extra}


def train(overrides: dict) -> dict:
    """Run (or resume) a training run; every rank reports its full weights, master weights, EMA and the
    run's metrics records."""
    trainer = Trainer(load_config("tiny_1x", overrides))
    result = trainer.fit()
    dist.barrier()  # rank 0 has written metrics.jsonl
    out = report(trainer, result=result, records=_records(overrides["run"]["out_dir"]))
    parallel_state.destroy()
    return out


def resume_only(overrides: dict) -> dict:
    """Load the newest checkpoint of the run folder into this layout and report, without training."""
    trainer = Trainer(load_config("tiny_1x", overrides))
    path = trainer.resume()
    out = report(trainer, path=str(path))
    parallel_state.destroy()
    return out


def ema_trajectory(overrides: dict, steps: int) -> dict:
    """``steps`` optimizer steps by hand; after each, the full master weights, bf16 (model) weights and EMA."""
    trainer = Trainer(load_config("tiny_1x", overrides))
    batches = trainer.data.batches()
    masters, weights, emas = [full_master(trainer)], [full_weights(trainer)], [full_ema(trainer)]
    for _ in range(steps):
        trainer.train_step([next(batches) for _ in range(trainer.cfg.optim.grad_accumulation)])
        trainer.step += 1
        masters.append(full_master(trainer))
        weights.append(full_weights(trainer))
        emas.append(full_ema(trainer))
    out = report(trainer, masters=masters, bf16_weights=weights, emas=emas)
    parallel_state.destroy()
    return out


def evaluate_with_ema(overrides: dict, steps: int) -> dict:
    """Train ``steps`` steps, then validate and roll out with the trained and the EMA weights; the weights
    before and after the EMA swaps (bit for bit the same) and the validation loss and rollouts of a model that
    holds the EMA by hand."""
    trainer = Trainer(load_config("tiny_1x", overrides))
    batches = trainer.data.batches()
    for _ in range(steps):
        trainer.train_step([next(batches) for _ in range(trainer.cfg.optim.grad_accumulation)])
        trainer.step += 1
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    master_before = full_master(trainer)
    raw, ema = trainer.validate("raw"), trainer.validate("ema")
    again = trainer.validate("raw")
    rollout_raw, rollout_ema = trainer.rollouts("raw"), trainer.rollouts("ema")
    unchanged = all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    master_unchanged = all(torch.equal(master_before[n], t) for n, t in full_master(trainer).items())
    # by hand: put the gathered EMA into this rank's parameters (its TP slice) and validate
    ema_full = trainer.ema.full_tensors()
    with torch.no_grad():
        for n, p in trainer.model.named_parameters():
            p.copy_(ema_full[n])
    by_hand, rollout_by_hand = trainer.validate("raw"), trainer.rollouts("raw")
    out = {"rank": dist.get_rank(), "raw": raw, "ema": ema, "raw_again": again, "by_hand": by_hand,
           "rollout_raw": rollout_raw, "rollout_ema": rollout_ema, "rollout_by_hand": rollout_by_hand,
           "weights_unchanged": unchanged, "master_unchanged": master_unchanged}
    parallel_state.destroy()
    return out


def _val_clips(trainer, count: int) -> list[tuple[int, dict]]:
    """(item, raw clip) of the held-out split, read directly with the 1X reader (not through the trainer)."""
    from megawan.data.world_model_1x.dataset import WorldModel1XConfig, WorldModel1XDataset
    from megawan.training.data import validation_clips

    d = trainer.cfg.data
    ds = WorldModel1XDataset(WorldModel1XConfig(root=trainer.cfg.validation.root, clip_frames=d.clip_frames,
                                                frame_stride=d.frame_stride, window_hop=d.window_hop,
                                                size=tuple(d.size) if d.size else None))
    return [(i, ds[i]) for i in validation_clips(len(ds), count)]


def validate_by_hand(overrides: dict, steps: int = 1) -> dict:
    """``Trainer.validate()`` after ``steps`` training steps, beside the same number computed here from its
    definition: each held-out clip encoded, x_t = (1 - s) x0 + s noise with the first K latent frames clean
    (timestep 0 there, 1000 s elsewhere), the mean squared velocity error over the noised frames, averaged
    over clips, per fixed sigma. The noise of (clip, sigma j) is the one validation fixes: seeded by
    (validation.seed, item, j). Every rank reports both."""
    import numpy as np

    trainer = Trainer(load_config("tiny_1x", overrides))  # builds megatron DDP: not under no_grad
    batches = trainer.data.batches()
    for _ in range(steps):
        trainer.train_step([next(batches)])
        trainer.step += 1
    got = trainer.validate()
    torch.set_grad_enabled(False)
    cfg, model, vae = trainer.cfg, trainer.model.eval(), trainer.data.vae
    k = cfg.objective.clean_frames
    pt, ph, pw = model.config.patch_size
    sums = torch.zeros(len(cfg.validation.sigmas))
    clips = _val_clips(trainer, cfg.validation.num_clips)
    for item, clip in clips:
        group = trainer.groups.vae_group if trainer.groups.tp * trainer.groups.cp > 1 else None
        x0 = vae.encode(clip["video"][None], group, gather_output=True).float()
        f, h, w = x0.shape[2:]
        scored = torch.arange(f) >= k
        for j, s in enumerate(cfg.validation.sigmas):
            seed = int(np.random.SeedSequence([cfg.validation.seed, item, j]).generate_state(1)[0])
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
            x_t = torch.where(scored[None, None, :, None, None], (1 - s) * x0 + s * noise, x0)
            t = torch.where(scored, 1000.0 * s, 0.0).float().repeat_interleave((h // ph) * (w // pw))[None]
            v = model(x_t, t, trainer.data.empty_text[None], states=clip["states"][None])
            sums[j] += (v.float() - (noise - x0))[:, :, scored].square().mean()
    per_sigma = (sums / len(clips)).tolist()
    out = {"rank": dist.get_rank(), "validate": got, "by_hand": {
        **{f"loss_sigma_{s:g}": v for s, v in zip(cfg.validation.sigmas, per_sigma)},
        "loss": sum(per_sigma) / len(per_sigma)}}
    parallel_state.destroy()
    return out


PLANTS = ("none", "context_frames", "states_shifted", "baseline_frame")


def rollout_plants(overrides: dict) -> dict:
    """The trainer's rollout scores as wired, and with one known off-by-one planted at a time, beside a
    reference wired here from the 1X definition: the context is the 4 (K - 1) + 1 video frames of the K clean
    latent frames, the states are the clip's own (one row per frame), the baseline repeats the last context
    frame; PSNR by scikit-image. The state embedding gets random weights first so that the states matter
    (it starts at zero)."""
    from skimage.metrics import peak_signal_noise_ratio

    from megawan.evaluation import rollouts as rollouts_module
    from megawan.pipelines.pipeline import Request, WanSampler
    from megawan.pipelines.sampling import SamplingConfig
    from megawan.pipelines.video_out import decode_frames, to_uint8

    trainer = Trainer(load_config("tiny_1x", overrides))  # builds megatron DDP: not under no_grad
    torch.set_grad_enabled(False)
    cfg = trainer.cfg
    gen = torch.Generator().manual_seed(5)
    for p in trainer.model.state_embedding.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    # reference
    context = 4 * (cfg.objective.clean_frames - 1) + 1
    sampler = WanSampler(trainer.model, trainer.data.vae, trainer.groups,
                         SamplingConfig(steps=cfg.validation.rollout_steps, guidance=1.0))
    ref_model, ref_base = [], []
    for i, (_, clip) in enumerate(_val_clips(trainer, cfg.validation.rollout_clips)):
        video, states = clip["video"], clip["states"]
        latents = sampler.sample(Request(text=trainer.data.empty_text, context=video, states=states,
                                         frames=video.shape[1], context_frames=context, seed=cfg.validation.seed + i),
                                 progress=False)
        pred = to_uint8(torch.cat(list(decode_frames(trainer.data.vae, latents, trainer.groups.vae_group)), dim=1))
        true = to_uint8(video)
        ref_model.append([peak_signal_noise_ratio(true[t].numpy(), pred[t].numpy(), data_range=255)
                          for t in range(context, video.shape[1])])
        ref_base.append([peak_signal_noise_ratio(true[t].numpy(), true[context - 1].numpy(), data_range=255)
                         for t in range(context, video.shape[1])])
    reference = {"psnr_mean": sum(sum(c) / len(c) for c in ref_model) / len(ref_model),
                 "psnr_last": sum(c[-1] for c in ref_model) / len(ref_model),
                 "baseline_psnr_mean": sum(sum(c) / len(c) for c in ref_base) / len(ref_base),
                 "baseline_psnr_last": sum(c[-1] for c in ref_base) / len(ref_base)}

    scores = {}
    original_score_clip = rollouts_module.score_clip
    for plant in PLANTS:
        trainer._rollout_clips = None
        if plant == "context_frames":  # one latent frame too many kept clean: 4 K + 1 frames
            trainer.rollout_context_frames = lambda: 4 * cfg.objective.clean_frames + 1
        if plant == "states_shifted":  # frame t conditioned on the state of frame t + 1
            trainer.rollouts("raw")  # reads the clips
            for clip in trainer._rollout_clips:
                clip["states"] = torch.cat([clip["states"][1:], clip["states"][-1:]])
        if plant == "baseline_frame":  # the copy-last-frame baseline repeats the frame before the last context one
            def score_clip(pred_frames, true, context_frames):
                wrong = true.clone()
                wrong[context_frames - 1] = true[context_frames - 2]
                return original_score_clip(pred_frames, wrong, context_frames)
            rollouts_module.score_clip = score_clip
        try:
            result = trainer.rollouts("raw")
        finally:
            rollouts_module.score_clip = original_score_clip
            trainer.__dict__.pop("rollout_context_frames", None)
        scores[plant] = {k: result[k] for k in reference}
    out = {"rank": dist.get_rank(), "reference": reference, "scores": scores}
    parallel_state.destroy()
    return out
