"""Train Wan 2.2 TI2V-5B (or the tiny preset) with flow matching: ``python -m megawan.train``.

    torchrun --nproc-per-node 4 -m megawan.train --config tiny_1x --parallel.tp 2 --parallel.cp 2
    srun python -m megawan.train --config configs/train/ti2v5b_1x.yaml --run.out_dir runs/wm

``--config`` is a YAML file or a preset name (configs/train/); ``--section.key VALUE`` overrides any key.
A rerun with the same ``run.out_dir`` resumes from its newest complete checkpoint, in any layout
(``--checkpoint.load DIR`` is only the starting point of a run folder that has none yet).
SIGTERM, SIGUSR1 or a first Ctrl-C write a checkpoint at the next step boundary and exit 0; a second Ctrl-C
stops at once (exit 130). One run at a time per ``run.out_dir``: a second one is refused, naming the first.
"""

from __future__ import annotations

# Only light imports before main() has installed the signal handlers: importing torch and megatron takes
# seconds (tens under load), and a signal arriving then must not end the process.
import argparse
import logging
import warnings

from megawan.training.signals import StopRequest


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="python -m megawan.train", description=__doc__.split("\n\n")[0],
                                epilog="Any other --section.key VALUE overrides that key of the config.")
    p.add_argument("--config", default="tiny_1x", help="YAML run config or preset name (default: tiny_1x)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--debug", action="store_true", help="show the traceback of a config / start-up error "
                                                         "(or MEGAWAN_DEBUG=1)")
    return p.parse_known_args(argv)


def summary(result: dict, cfg) -> str:
    """The lines a finished (or early-stopped) run ends with: where it stopped, and where everything is."""
    out = cfg.run.out_dir
    what = f"last loss {result['loss']:.4f}" if "loss" in result else "nothing to do: run.steps already reached"
    if result.get("stopped_early"):
        head = (f"stopped early: step {result['step']} of run.steps {cfg.run.steps}, because run.exit_after_steps "
                f"{cfg.run.exit_after_steps} steps were done in this start; {what}; rerun the same command to go on")
    else:
        head = f"done: step {result['step']}, {what}"
    return (f"{head}\n"
            f"  checkpoints: {out}/checkpoints (latest {result['checkpoint']})\n"
            f"  logs:        {out}/logs/metrics.jsonl, TensorBoard: tensorboard --logdir {out}/logs/tensorboard\n"
            f"  config:      {out}/resolved_config.yaml\n"
            + (f"  pictures:    {result['curves']} (loss, validation, rollout scores), {out}/rollouts/ "
               f"(contact sheets)\n" if result.get("curves") else "")
            + f"  sample:      python -m megawan.generate --ckpt {out} --data <a 1X split> "
            f"(evaluate: python -m megawan.evaluate --ckpt {out} --data ...)\n"
            f"  resume/extend: rerun the same command (add --run.steps N to train further)")


def main(argv: list[str] | None = None, *, restore_signals: bool = True) -> dict | None:
    """``restore_signals=False`` (the command line): the handlers stay until the process exits, so a second
    Ctrl-C while it winds down (after the checkpoint of the first) still stops it in one line."""
    stop = StopRequest().install()  # first: a signal during the slow start-up becomes a checkpoint, not a death
    try:
        return _main(argv, stop)
    finally:
        if restore_signals:
            stop.restore()


def _main(argv: list[str] | None, stop: StopRequest) -> dict | None:
    # megatron-core announces its pure-torch fallbacks on every rank at import; they are expected on CPU.
    from megawan.notices import quiet_known_notices

    quiet_known_notices()
    from megawan import parallel_state
    from megawan.parallel_state import LayoutError
    from megawan.parallel_state.launch import launch_env, user_errors
    from megawan.training.config import ConfigError, load_config

    args, overrides = parse_args(argv)
    rank = launch_env()["rank"]
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lists every parameter of every bucket
    with user_errors(ConfigError, rank=rank, debug=args.debug):  # one line from rank 0, exit 3
        cfg = load_config(args.config, overrides)
    if args.print_config:
        from megawan.training.config import dump_config

        if rank == 0:
            print(dump_config(cfg), end="")
        return None
    warnings.filterwarnings("ignore", category=FutureWarning)  # library notices, once per rank otherwise
    from megawan.training.run_lock import RunFolderLocked
    from megawan.training.trainer import MemoryBudgetError, Trainer

    with user_errors(LayoutError, MemoryBudgetError, RunFolderLocked, FileNotFoundError, ValueError, rank=rank,
                     debug=args.debug):
        trainer = Trainer(cfg, stop)
    from megawan.training.checkpointing import CheckpointWriteError

    # the same on every rank (the checkpoint writers agree on failure): one line, exit 3
    with user_errors(CheckpointWriteError, rank=rank, debug=args.debug, what="the run stopped"):
        result = trainer.fit()
    if rank == 0 and not result["preempted"]:  # a preempted run has said so ("preempted: ...")
        print(summary(result, cfg), flush=True)
    parallel_state.destroy()
    return result


if __name__ == "__main__":
    main(restore_signals=False)
