"""Score a world model the way the 1X sampling challenge does, beside the copy-last-context-frame baseline.

    python -m megawan.evaluate --dit trained/ --vae Wan2.2_VAE.pth --data 1x/val_v2.0_raw --num-clips 64 \\
        --out eval.json
    bash launch/torchrun.sh 8 megawan.evaluate --tp 2 --cp 2 ...     # 2 replicas share the clips
    python -m megawan.evaluate --ckpt outputs/tiny_1x --data outputs/sample_1x/val_v2.0_raw   # a training run:
        # its newest checkpoint, its recorded VAE, its clip length / context / frame size (megawan.pipelines.trained)

Clips of --frames frames (77) are taken evenly spaced over the split (held out: point it at the val split); the
model gets the first 17 frames and the states of all 77 and predicts the rest. Prints a table and writes the
JSON (means, per-clip scores, settings) plus a labelled contact sheet PNG beside it (truth, prediction and
copy-last-frame rows, and the prediction under each other states condition). ``--conditions`` also rolls the same
model out with the states zeroed / of another clip / one frame late, beside the true states, and latent-space
scores (against the encoded true clip, with the copy-last-latent baseline) sit beside the pixel ones.
See megawan/evaluation/rollouts.py.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from megawan.notices import quiet_known_notices  # noqa: E402

# megatron-core announces its pure-torch fallbacks at import; expected here, and noise before a one-line error
quiet_known_notices()

import torch  # noqa: E402

from megawan import parallel_state  # noqa: E402
from megawan.data.bad_input import BadInputReport  # noqa: E402
from megawan.data.world_model_1x import WorldModel1XConfig, WorldModel1XDataset  # noqa: E402
from megawan.evaluation.rollouts import LATENT_METRICS, METRICS, STATE_CONDITIONS, check_conditions, \
    evaluate_rollouts, write_rollout_sheet  # noqa: E402
from megawan.models.dit import DiTRuntime, WanDiT  # noqa: E402
from megawan.models.dit_config import WanDiTConfig  # noqa: E402
from megawan.parallel_state.launch import launch_env, user_errors  # noqa: E402
from megawan.parallel_state.layout import CP_IMPLS  # noqa: E402
from megawan.vae.model import WanVAE38  # noqa: E402
from megawan.pipelines.pipeline import check_size  # noqa: E402
from megawan.pipelines.release import locate, start_groups  # noqa: E402
from megawan.pipelines.sampling import SamplingConfig  # noqa: E402
from megawan.pipelines.trained import apply_run_defaults, find_trained, load_text_embedding, load_trained_dit, \
    require_ema, saved_model_config, trained_files  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class HeldOutClips:
    """``num_clips`` clips spread evenly over a 1X split, read only when indexed (each DP replica reads its own)."""

    def __init__(self, root, num_clips: int, frames: int = 77, size=None):
        # every rank reads the split and counts what it skips; rank 0 alone names each bad file
        report = BadInputReport(announce=launch_env()["rank"] == 0)
        self.data = WorldModel1XDataset(WorldModel1XConfig(root=str(root), clip_frames=frames, size=size),
                                        report=report)
        n = min(num_clips, len(self.data))
        self.indices = sorted({round(i * (len(self.data) - 1) / max(1, n - 1)) for i in range(n)})

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.data[self.indices[i]]

    def describe(self) -> list[dict]:
        out = []
        for i in self.indices:
            position, first = self.data.index.locate(i)
            out.append({"index": i, "shard": self.data.shards[position].index, "first_frame": int(first)})
        return out


def format_table(result: dict) -> str:
    """Markdown table: one row per metric; the model with the true states, the copy-last baseline (copy-last-latent
    for latent_*), then the model under each other states condition evaluated."""
    others = [c for c in result.get("conditions", {}) if c != "true"]
    rows = ["| metric | model | copy-last-frame | " + " | ".join(f"states {c}" for c in others) + " |",
            "|---|---:|---:|" + "---:|" * len(others)]
    for m in METRICS + LATENT_METRICS:
        if m not in result:
            continue
        cells = [result[m], result["baseline_" + m]] + [result["conditions"][c][m] for c in others]
        rows.append(f"| {m} | " + " | ".join(f"{v:.4g}" if m.startswith("latent") else f"{v:.3f}" for v in cells)
                    + " |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a 1X split folder (val_v2.0_raw, or the sample data's)")
    p.add_argument("--ckpt", help="checkpoint folder (DiT, VAE beside it), or a training run folder / step_N folder")
    p.add_argument("--ema", action="store_true", help="a training checkpoint's EMA weights instead of its weights")
    p.add_argument("--dit")
    p.add_argument("--vae")
    p.add_argument("--state-dim", type=int, help="add zero-initialised state conditioning to a released model")
    p.add_argument("--text-embedding", help="safetensors with text_embeds [L, D]: the prompt embedding the model was "
                                            "trained with, e.g. a latent cache's empty_prompt.safetensors "
                                            "(default: no text tokens)")
    p.add_argument("--num-clips", type=int, default=16)
    p.add_argument("--frames", type=int, default=None, help="default 77, or a training run's clip length")
    p.add_argument("--context-frames", type=int, default=None, help="default 17, or a training run's")
    p.add_argument("--size", type=int, help="square frame size (default: a training run's, else the data's: "
                                            "512 for 1X)")
    p.add_argument("--steps", type=int, default=None, help="default 50, or a training run's rollout steps")
    p.add_argument("--conditions", default=None,
                   help=f"states to roll out with, comma-separated, 'true' first: {','.join(STATE_CONDITIONS)} "
                        f"(default true,zeroed,swapped; true,zeroed with one clip: 'swapped' needs two; "
                        f"state-conditioned models only, others get 'true')")
    p.add_argument("--shift-frames", type=int, default=1, help="delay of the 'shifted' states, in frames")
    p.add_argument("--shift", type=float, default=5.0)
    p.add_argument("--solver", default="unipc", choices=["unipc", "euler"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--cp-impl", default="ulysses", choices=list(CP_IMPLS),
                   help="context parallelism of the self-attention: ulysses ((heads / tp) %% cp == 0), ring "
                        "(any cp) or hybrid (Ulysses in groups of --ulysses-size CP ranks, ring across them)")
    p.add_argument("--ulysses-size", type=int, help="hybrid only: the Ulysses group size (divides --cp)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default bf16, or a training run's")
    p.add_argument("--out", default="outputs/eval.json")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error (or MEGAWAN_DEBUG=1)")
    return p


def _checked_inputs(args):
    """(trained run or None, files, model config, conditions, text, clips): every input found and checked, no
    model built. Raises ValueError / OSError naming the bad input."""
    trained = find_trained(args.ckpt) if args.ckpt and not args.dit else None
    apply_run_defaults(args, trained, {"frames": 77, "context_frames": 17, "dtype": "bf16", "steps": 50},
                       size_arg=lambda hw: hw[0] if hw[0] == hw[1] else None)
    if args.ema:
        require_ema(trained)
    if trained is not None:
        files = trained_files(trained, args.vae)
        config = saved_model_config(trained.checkpoint)
    else:
        files = locate(args.ckpt, dit=args.dit, vae=args.vae, need_text=False)
        config = WanDiTConfig.load(files.dit)
    if args.state_dim is not None:
        config = replace(config, state_dim=args.state_dim)
    conditions = tuple(c.strip() for c in args.conditions.split(",") if c.strip()) if args.conditions else None
    size = (args.size, args.size) if args.size else None
    if size is not None:
        check_size(size, config, given="--size")
    if args.frames < 1 or (args.frames - 1) % 4:
        raise ValueError(f"--frames must be 4n + 1 (e.g. 77; the VAE keeps 1 + 4 frames per latent), got {args.frames}")
    k = args.context_frames
    if k < 1 or (k - 1) % 4 or k >= args.frames:
        raise ValueError(f"--context-frames must be 4n + 1 and fewer than --frames ({args.frames}), got {k}")
    text = load_text_embedding(args.text_embedding, config.text_dim) if args.text_embedding else None
    clips = HeldOutClips(args.data, args.num_clips, args.frames, size)
    if not config.state_dim:
        conditions = ("true",)
    elif conditions is None:  # the default: every condition the clips allow
        conditions = ("true", "zeroed", "swapped") if len(clips) > 1 else ("true", "zeroed")
    check_conditions(conditions, config.state_dim, len(clips))
    return trained, files, config, conditions, text, clips


def main(argv=None, *, command_line: bool = False) -> dict:
    """``command_line``: an input error is one line on stderr and exit 3 (else it raises, as for any caller)."""
    args = build_parser().parse_args(argv)
    with user_errors(ValueError, OSError, debug=args.debug or not command_line):  # before any model is built
        trained, files, config, conditions, text, clips = _checked_inputs(args)
        groups = start_groups(args.tp, args.cp, config.num_heads, args.cp_impl, args.ulysses_size)
    dev = groups.device
    runtime = DiTRuntime(linear_impl="local" if dev.type == "cpu" else "auto")
    if trained is not None:
        model = load_trained_dit(trained, groups, dtype=DTYPES[args.dtype], runtime=runtime, ema=args.ema)
    else:
        model = WanDiT.from_pretrained(files.dit, dtype=DTYPES[args.dtype], groups=groups, state_dim=args.state_dim,
                                       runtime=runtime)
    vae = WanVAE38.from_pretrained(files.vae, device=dev)
    sampling = SamplingConfig(steps=args.steps, shift=args.shift, solver=args.solver, guidance=1.0)
    result = evaluate_rollouts(model, vae, clips, groups, text=text, config=sampling, context_frames=args.context_frames,
                               seed=args.seed, progress=True, conditions=conditions, shift_frames=args.shift_frames,
                               hz=clips.data.hz)
    result["clips"] = clips.describe()
    result["settings"] = {**vars(args), "sampling": sampling.to_dict(),
                          "layout": {"tp": groups.tp, "cp": groups.cp, "dp": groups.dp,
                                     "cp_impl": groups.cp_impl, "ulysses_size": groups.ulysses_size}}
    if torch.distributed.get_rank() == 0:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        sheet = write_rollout_sheet(result, out.with_suffix(".png"))
        result["contact_sheet"] = sheet
        out.write_text(json.dumps(result, indent=2, default=str))
        print(f"{result['num_clips']} clips, {args.frames} frames ({args.context_frames} given), "
              f"{args.steps} steps\n{format_table(result)}\nwrote {out}" + (f" and {sheet}" if sheet else ""))
    else:
        result["contact_sheet"] = None
    parallel_state.destroy()
    return result


if __name__ == "__main__":
    main(command_line=True)
