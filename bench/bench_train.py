"""Training step time per parallel layout on CPU gloo ranks (tiny preset), and one step split into its phases.

Every layout runs on the same number of ranks (default 4): TP1 (dp 4), TP2 (dp 2), CP2 (dp 2) and TP2 x CP2
(dp 1), each rank with the tiny preset's micro-batch (so a replica always sees the same work and the global
batch is batch x dp). For each layout:

* "step": the median wall time of ``Trainer.train_step`` (the real step, no extra barriers) after warm-up;
* the split: the same step rebuilt from the Trainer's pieces, with a barrier after each phase so every rank
  times the same phase: data (the next micro-batch, VAE encode included), forward (``Trainer.loss``),
  backward, grad sync (megatron DDP's DP x CP reduction and the TP reduction of SP grads), optimizer
  (distributed Adam step, LR schedule, EMA); medians over the timed steps, slowest rank;
* save: one ``Trainer.save()`` (model, optimizer, EMA, common state; atomic rename).

    python bench/bench_train.py                       # 4 ranks: tp1, tp2, cp2, tp2cp2
    python bench/bench_train.py --ranks 2 --layouts 1x1 2x1 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._table import format_table  # noqa: E402
from megawan.testing import run_distributed  # noqa: E402

PHASES = ("data", "forward", "backward", "grad sync", "optimizer")


def _rank(layout, overrides, warmup, steps):
    import torch.distributed as dist

    from megawan.training.config import load_config
    from megawan.training.optim import finish_grad_sync
    from megawan.training.trainer import Trainer

    tp, cp = layout
    cfg = load_config("tiny_1x", overrides + ["--parallel.tp", str(tp), "--parallel.cp", str(cp)])
    tr = Trainer(cfg)
    batches = tr.data.batches()
    whole = []
    for i in range(warmup + steps):
        micro = [next(batches)]
        dist.barrier()
        t0 = time.perf_counter()
        tr.train_step(micro)
        dist.barrier()
        tr.step += 1
        if i >= warmup:
            whole.append(time.perf_counter() - t0)

    split = {k: [] for k in PHASES}
    for i in range(warmup + steps):  # train_step's pieces, a barrier after each
        stamps = []

        def mark():
            dist.barrier()
            stamps.append(time.perf_counter())

        mark()
        batch = next(batches)
        mark()
        tr.model.train()
        tr.ddp.zero_grad_buffer()
        tr.optimizer.zero_grad()
        loss = tr.loss(batch, tr._generator(tr.step, 0))
        mark()
        (loss * tr.groups.cp).backward()
        mark()
        finish_grad_sync(tr.ddp, tr.groups)
        mark()
        tr.optimizer.step()
        tr.scheduler.step(1)
        if tr.ema is not None:
            tr.ema.update(tr.model)
        mark()
        tr.step += 1
        if i >= warmup:
            for k, a, b in zip(PHASES, stamps, stamps[1:]):
                split[k].append(b - a)
    dist.barrier()
    t0 = time.perf_counter()
    tr.save()
    save = time.perf_counter() - t0
    return {"step": statistics.median(whole), **{k: statistics.median(v) for k, v in split.items()},
            "save": save, "dp": tr.groups.dp, "tokens": tr.tokens, "batch": cfg.data.batch_size}


def _parse(text: str) -> tuple[int, int]:
    tp, cp = (int(v) for v in text.split("x"))
    return tp, cp


def _name(tp: int, cp: int) -> str:
    return "TP1" if tp == cp == 1 else " x ".join(f"{k}{v}" for k, v in (("TP", tp), ("CP", cp)) if v > 1)


def main(argv=None) -> list[list]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "1x2", "2x2"], help="TPxCP")
    p.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--data", help="1X raw folder (default: generated sample data in a temporary folder)")
    p.add_argument("--clip-frames", type=int, default=33)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from megawan.tools.make_sample_data import make_sample_data

            data = str(make_sample_data(Path(tmp) / "data", train_shards=2, val_shards=0, frames_per_shard=120,
                                        size=args.size, gop=16, captioned_videos=0, workers=1)
                       / "train_v2.0_raw")
        rows, base = [], None
        for text in args.layouts:
            tp, cp = _parse(text)
            overrides = ["--data.root", data, "--data.clip_frames", str(args.clip_frames),
                         "--data.size", f"[{args.size},{args.size}]", "--run.out_dir", f"{tmp}/run_{text}",
                         "--run.steps", str(2 * (args.warmup + args.steps) + 2), "--validation.every", "0",
                         "--checkpoint.every", "0", "--logging.tensorboard", "false",
                         "--logging.progress_bar", "false"]
            res = run_distributed(_rank, args.ranks, (tp, cp), overrides, args.warmup, args.steps, timeout_s=1800)
            r = {k: max(x[k] for x in res) for k in ("step", "save", *PHASES)}  # the slowest rank
            r.update(dp=res[0]["dp"], tokens=res[0]["tokens"], batch=res[0]["batch"])
            base = base or r["step"]
            samples = r["batch"] * r["dp"]
            rows.append([_name(tp, cp), r["dp"], f"{r['step'] * 1e3:.0f}", f"{r['step'] / base:.2f}",
                         f"{samples / r['step']:.1f}", *(f"{r[k] * 1e3:.0f}" for k in PHASES),
                         f"{r['save'] * 1e3:.0f}"])
            print(f"{text} done", file=sys.stderr, flush=True)
    header = ["layout", "dp", "step ms", "vs TP1", "samples/s", *(f"{k} ms" for k in PHASES), "save ms"]
    print(f"tiny_1x DiT (dim 288, 2 layers), {r['tokens']} tokens x batch {r['batch']} per replica, "
          f"{args.ranks} gloo ranks, fp32; median of {args.steps} steps after {args.warmup}; slowest rank")
    print(format_table(rows, header, left_columns=1))
    return rows


if __name__ == "__main__":
    main()
