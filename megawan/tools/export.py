"""Export a training checkpoint to the released Wan layout (official or diffusers safetensors + config.json).

    python -m megawan.tools.export runs/wm/checkpoints/step_00020000 outputs/wm_export --layout diffusers [--ema]
    torchrun --nproc-per-node 4 -m megawan.tools.export CKPT OUT --tp 4   # each rank holds 1/4 of the blocks

The weights written are the distributed optimizer's fp32 master weights (``optimizer.state.param.model.*``):
the model's own tensors of a bf16 run are those rounded to bf16, so an fp32 export of them would hold
rounded weights. ``--ema`` writes the EMA instead (``ema.*``, the average of the master weights). ``--dtype
bf16`` rounds either once, at the end. No Adam moments and no data position are read. The checkpoint may have
been written in any TP / CP / DP layout; it is read in this run's layout (one process: tp = 1). Rank 0 writes
the whole model; the output folder must be new or empty.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from megawan.notices import quiet_known_notices  # noqa: E402

quiet_known_notices()  # megatron-core's import-time notices, once per rank otherwise

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megawan.checkpoint.dit_keys import LAYOUTS  # noqa: E402
from megawan.parallel_state.launch import launch_env, user_errors  # noqa: E402
from megawan.training import checkpointing  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ExportError(ValueError):
    """The checkpoint or output folder cannot be used; the message says why and what to pass instead."""


def check_checkpoint(path) -> Path:
    """``path`` itself when it is a complete ``step_N`` checkpoint folder, else an ExportError saying why."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise ExportError(f"checkpoint {path} is a file, not a checkpoint folder (step_N)")
    if (path / checkpointing.MARKER).exists():
        return path
    if path.name.startswith((checkpointing.TMP_PREFIX, checkpointing.PREFIX)) or (path / "metadata.json").exists():
        good = checkpointing.complete_checkpoints(path.parent)
        hint = f"; the newest complete one beside it is {good[-1]}" if good else ""
        raise ExportError(f"checkpoint {path} is incomplete: it has no {checkpointing.MARKER}, so its write "
                          f"was interrupted{hint}")
    for root in (path, path / "checkpoints"):  # a run folder or its checkpoints folder
        good = checkpointing.complete_checkpoints(root)
        if good:
            raise ExportError(f"{path} holds checkpoints, it is not one: pass one of its step_N folders "
                              f"(newest: {good[-1]})")
    raise ExportError(f"{path} is not a megawan checkpoint folder (a step_N folder with {checkpointing.MARKER}, "
                      f"written by python -m megawan.train)")


def check_output(path) -> Path:
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ExportError(f"output folder {path} is not empty: choose a new folder (nothing is overwritten)")
    return path


MASTER_PREFIX = "optimizer.state.param.model."  # megatron's fully_reshardable key of the fp32 master weights
EMA_PREFIX = "ema."


def check_has(path, prefix: str) -> None:
    """Refuse a checkpoint without the tensors under ``prefix`` (the master weights, or the EMA)."""
    from megatron.core import dist_checkpointing

    if not any(k.startswith(prefix) for k in dist_checkpointing.load_tensors_metadata(str(path))):
        if prefix == EMA_PREFIX:
            raise ExportError(f"checkpoint {path} holds no EMA (it was trained with optim.ema_decay 0): export "
                              f"without --ema")
        raise ExportError(f"checkpoint {path} holds no optimizer master weights ({prefix}*): not a checkpoint "
                          f"written by python -m megawan.train")


def saved_model_config(path):
    """The WanDiTConfig the checkpoint was trained with (its common state's "model_config")."""
    from megatron.core import dist_checkpointing

    from megawan.models.dit_config import WanDiTConfig

    common = dist_checkpointing.load_common_state_dict(str(path)).get("common", {})
    if "model_config" not in common:
        raise ExportError(f"checkpoint {path} has no model_config in its common state: not a megawan train checkpoint")
    return WanDiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in common["model_config"].items()})


@torch.no_grad()
def load_model(path, groups, *, ema: bool = False):
    """A WanDiT (fp32, this rank's TP slices) holding the checkpoint's fp32 master weights, or its EMA
    (collective)."""
    from megatron.core import dist_checkpointing

    from megawan.models.dit import WanDiT
    from megawan.models.dit_config import DiTRuntime

    path = check_checkpoint(path)
    prefix = EMA_PREFIX if ema else MASTER_PREFIX
    check_has(path, prefix)
    model = WanDiT(saved_model_config(path), groups, DiTRuntime(dtype=torch.float32, init_weights=False))
    sd = checkpointing.tensors_sharded_state_dict(model.named_parameters(), prefix, groups)
    loaded = dist_checkpointing.load(sd, str(path))
    for name, p in model.named_parameters():
        p.copy_(loaded[name])
    return model.eval()


def export_notes(config, layout: str) -> list[str]:
    """What a user loading the export elsewhere must know (printed by the CLI beside the folder it names)."""
    notes = []
    if layout == "diffusers":
        notes.append("diffusers: WanTransformer3DModel.from_pretrained(OUT) needs the accelerate package besides "
                     "diffusers (pip install accelerate; megawan's [diffusers] extra), as for the released Wan 2.2 "
                     "checkpoints")
    if config.state_dim:
        notes.append(f"this is a world model (state_dim {config.state_dim}): diffusers' WanTransformer3DModel and the "
                     f"official Wan code have no robot-state input and drop its state-embedding weights (diffusers "
                     f"lists them as unused); only megawan (WanDiT.from_pretrained, python -m megawan.generate "
                     f"--ckpt OUT) conditions on states")
    return notes


def export(ckpt, out, layout: str = "official", *, ema: bool = False, dtype: str = "fp32", tp: int = 1) -> Path:
    """Collective over all ranks of the job (one process is a job of one): write ``ckpt`` to ``out``."""
    from megawan import parallel_state

    if layout not in LAYOUTS:
        raise ExportError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    ckpt, out = check_checkpoint(ckpt), check_output(out)
    check_has(ckpt, EMA_PREFIX if ema else MASTER_PREFIX)
    if not dist.is_initialized() and launch_env()["world_size"] == 1:
        # one process needs no rendezvous (and must not collide with another job's port)
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    groups = parallel_state.initialize(tp, 1)
    model = load_model(ckpt, groups, ema=ema)
    if dtype != "fp32":
        model.to(DTYPES[dtype])  # in place: the parameters keep their TP attributes for the gather
    model.save_pretrained(out, layout=layout)
    if dist.get_rank() == 0:  # the run's recorded VAE beside the DiT, so generate / evaluate need nothing else
        from megawan.vae.pretrained import export_recorded_vae

        export_recorded_vae(ckpt, out, layout)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m megawan.tools.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a step_N folder written by python -m megawan.train")
    p.add_argument("out", help="output folder (new or empty)")
    p.add_argument("--layout", choices=LAYOUTS, default="official", help="key layout to write (default official)")
    p.add_argument("--ema", action="store_true", help="export the EMA of the weights instead of the fp32 master "
                                                       "weights")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="tensor dtype written (default fp32)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks to read over (default 1)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error (or MEGAWAN_DEBUG=1)")
    args = p.parse_args(argv)
    rank = launch_env()["rank"]
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # megatron's torch.distributed.checkpoint calls
    from megawan import parallel_state
    from megawan.parallel_state import LayoutError

    with user_errors(ExportError, LayoutError, FileExistsError, rank=rank, debug=args.debug):
        out = export(args.checkpoint, args.out, args.layout, ema=args.ema, dtype=args.dtype, tp=args.tp)
    if rank == 0:
        print(json.dumps({"checkpoint": args.checkpoint, "out": str(out), "layout": args.layout,
                          "weights": "ema" if args.ema else "model", "dtype": args.dtype}), flush=True)
        for note in export_notes(saved_model_config(args.checkpoint), args.layout):
            print(f"note: {note}", file=sys.stderr, flush=True)
    parallel_state.destroy()


if __name__ == "__main__":
    main()
