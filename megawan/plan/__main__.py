"""python -m megawan.plan: the layouts of a cluster for one video size, ranked by predicted step time.

    python -m megawan.plan --gpus 32 --gpus-per-node 8 --gpu h100 --frames 121 --size 704x1280
    python -m megawan.plan --gpus 32 --frames 121 --size 704x1280 --json > plan.json
    python -m megawan.plan --gpus 32 --frames 121 --size 704x1280 --write-config run.yaml [--row 1]

Memory is the trainer's pre-flight (the same function: a row marked "no" is a layout the trainer refuses, with
these figures); bytes are the analytic figures the gloo tests count; times are predictions (docs/scaling.md says
what was measured and what was not).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megawan.plan import hardware
from megawan.plan.planner import DEFAULT_BASE_CONFIG, PlanError, Problem, Row, explain, plan
from megawan.training.budget import GIB
from megawan.training.config import ConfigError, dump_config

HEADER = ["#", "layout", "recompute", "mbs x acc", "weights", "grads", "optim", "activ", "reserve", "total GiB",
          "fits", "NVLink GiB", "IB GiB", "compute s", "comm s", "step s"]


def row_cells(i: int, row: Row) -> list[str]:
    est, lay, t = row.memory.estimate, row.layout, row.time
    return [str(i), lay.name, lay.recompute or "none", f"{lay.micro_batch} x {lay.accumulation}",
            *(f"{v / GIB:.1f}" for v in (est.weights, est.grads, est.optimizer, est.activations,
                                           row.memory.reserve.total, row.memory.total)),
            "yes" if row.fits else "no", f"{row.link_bytes('nvlink') / GIB:.2f}", f"{row.link_bytes('ib') / GIB:.2f}",
            f"{t.compute:.2f}", f"{t.communication:.2f}", f"{t.total:.2f}"]


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def collective_table(row: Row) -> str:
    cells = [[c.phase, c.name, c.group, c.link, f"{c.wire_bytes / 2**20:,.1f}",
              "counted on gloo" if c.counted else "analytic only"] for c in row.collectives]
    return format_table(cells, ["phase", "collective", "group", "link", "MiB / rank / step", "checked"])


def shown_rows(rows: list[Row], top: int, show_all: bool) -> list[tuple[int, Row]]:
    """The fastest ``top`` rows that fit and the fastest ``top`` that do not (every row with ``show_all``)."""
    numbered = list(enumerate(rows, 1))
    if show_all:
        return numbered
    return [x for x in numbered if x[1].fits][:top] + [x for x in numbered if not x[1].fits][:top]


def config_header(problem: Problem, row: Row, argv: list[str]) -> str:
    t = row.time
    return (f"Written by python -m megawan.plan {' '.join(argv)}\n"
            f"{problem.gpus} x {hardware.GPUS[problem.gpu].name}, {problem.gpus_per_node} per node; "
            f"{problem.frames} x {problem.height} x {problem.width} = {row.memory.tokens:,} tokens per sample; "
            f"global batch {problem.batch}\n"
            f"{row.layout.name}, {row.layout.recompute or 'no'} recomputation, micro-batch {row.layout.micro_batch} x "
            f"{row.layout.accumulation} accumulation\n"
            f"{row.memory.summary()} ({'fits' if row.fits else 'DOES NOT FIT'})\n"
            f"predicted {t.total:.2f} s/step (compute {t.compute:.2f}, exposed communication {t.communication:.2f}, "
            f"optimizer {t.optimizer:.2f}); per step and rank {row.link_bytes('nvlink') / GIB:.2f} GiB on NVLink, "
            f"{row.link_bytes('ib') / GIB:.2f} GiB across nodes\n"
            f"data.root must be a latent cache of {problem.frames}-frame clips at {problem.height} x {problem.width} "
            f"(python -m megawan.tools.precompute); model.init the released checkpoint\n"
            f"Launch on {problem.gpus} ranks (launch/slurm/train.sbatch --config THIS_FILE)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m megawan.plan", description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="h100", help=f"one of {', '.join(hardware.GPUS)}")
    p.add_argument("--frames", type=int, default=121)
    p.add_argument("--size", default="704x1280", help="HxW pixels, multiples of 32")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="micro-batch sizes to consider")
    p.add_argument("--global-batch", type=int, default=None, help="samples per optimizer step (default: --gpus)")
    p.add_argument("--model", default="wan2.2-ti2v-5b", help="a DiT preset or config.json")
    p.add_argument("--eager", action="store_true", help="plan for eager blocks (default: compiled, the CUDA default)")
    p.add_argument("--base-config", default=DEFAULT_BASE_CONFIG,
                   help="the training config the layout is applied to (a preset name or a file)")
    p.add_argument("--top", type=int, default=8, help="rows shown: the fastest N that fit and N that do not")
    p.add_argument("--all", action="store_true", help="show every row")
    p.add_argument("--json", action="store_true", help="every row as JSON on stdout")
    p.add_argument("--write-config", metavar="PATH", help="write the training config of --row to PATH")
    p.add_argument("--row", type=int, default=1, help="the row --write-config writes (1 = the top choice)")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                   help="overrides for the written config, e.g. data.root=cache/720p model.init=ckpt/Wan2.2-TI2V-5B")
    args = p.parse_args(argv)
    try:
        height, width = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        p.error(f"--size must be HxW, e.g. 704x1280; got {args.size!r}")
    problem = Problem(gpus=args.gpus, gpus_per_node=args.gpus_per_node, gpu=args.gpu, frames=args.frames,
                      height=height, width=width, global_batch=args.global_batch, micro_batches=tuple(args.batch),
                      model=args.model, mode="eager" if args.eager else "compiled", base_config=args.base_config)
    try:
        rows = plan(problem)
        if not 1 <= args.row <= len(rows):
            raise PlanError(f"--row {args.row}: the plan has rows 1 to {len(rows)}")
        if args.write_config:
            write_config(problem, rows[args.row - 1], args.write_config, args.set, argv)
    except (PlanError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"problem": {**problem.__dict__, "tokens": rows[0].memory.tokens},
                          "explanation": explain(rows), "rows": [r.to_dict() for r in rows]}, indent=1))
        return 0
    gpu = hardware.GPUS[problem.gpu]
    print(f"{problem.gpus} x {gpu.name} ({problem.gpus_per_node} per node), {problem.frames} x {height} x {width} = "
          f"{rows[0].memory.tokens:,} tokens per sample, global batch {problem.batch}, {problem.mode} blocks: "
          f"{len(rows)} layouts, {sum(r.fits for r in rows)} fit")
    print(format_table([row_cells(i, r) for i, r in shown_rows(rows, args.top, args.all)], HEADER))
    print(f"\nchoice: {explain(rows)}")
    print(f"\nrow {args.row}, bytes per step by collective:")
    print(collective_table(rows[args.row - 1]))
    if args.write_config:
        print(f"\nwrote {args.write_config} (row {args.row})")
    return 0


def write_config(problem: Problem, row: Row, path: str, overrides: list[str], argv: list[str]) -> None:
    """The row's training config, with ``--set`` overrides, read back by the config loader (what the trainer
    refuses is refused here, before the file is left behind)."""
    from megawan.training.config import load_config

    out = Path(path)
    out.write_text(dump_config(row.config))
    try:
        cfg = load_config(str(out), [f"--{o}" for o in overrides])
    except ConfigError:
        out.unlink()
        raise
    out.write_text(dump_config(cfg, header=config_header(problem, row, argv)))


if __name__ == "__main__":
    raise SystemExit(main())
