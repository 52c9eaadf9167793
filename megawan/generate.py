"""Sample videos from a released or trained Wan 2.2 TI2V-5B checkpoint.

    python -m megawan.generate --ckpt Wan2.2-TI2V-5B --prompt "a robot picks up a cup" --image first.png \\
        --out out/cup.mp4                                                   # TI2V, release defaults
    bash launch/torchrun.sh 4 megawan.generate --tp 2 --cp 2 --ckpt ... --prompt ...   # one replica of 4 ranks
    bash launch/torchrun.sh 16 megawan.generate --tp 2 --cp 8 --cp-impl hybrid --ulysses-size 4 ...  # CP beyond heads
    python -m megawan.generate --ckpt trained/ --vae Wan2.2_VAE.pth --no-text --data val_v2.0_raw --clip 3 \\
        --frames 77 --guidance 1 --out out/rollout.mp4                      # 1X world model: 17 frames + states
    python -m megawan.generate --ckpt outputs/tiny_1x --data outputs/sample_1x/val_v2.0_raw --clip 3
                                        # a training run folder (or one step_N): its newest checkpoint, its VAE,
                                        # and its clip length / context / frame size as defaults

Writes OUT.mp4, OUT.png (contact sheet) and OUT.json (seed and every setting). With several prompts
(--prompts-file), DP replicas take prompts i % dp and write OUT_<i>.mp4. Every input is checked before any
model is loaded.
"""

from __future__ import annotations

import argparse
import gc
import json
from dataclasses import replace
from pathlib import Path

from megawan.notices import quiet_known_notices  # noqa: E402

# megatron-core announces its pure-torch fallbacks at import; expected here, and noise before a one-line error
quiet_known_notices()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megawan import parallel_state  # noqa: E402
from megawan.data.transforms import frames_to_video  # noqa: E402
from megawan.models.dit import DiTRuntime, WanDiT  # noqa: E402
from megawan.models.dit_config import WanDiTConfig  # noqa: E402
from megawan.parallel_state.layout import CP_IMPLS  # noqa: E402
from megawan.vae.model import WanVAE38  # noqa: E402
from megawan.parallel_state.launch import user_errors  # noqa: E402
from megawan.pipelines.pipeline import Request, WanSampler, check_request, check_size  # noqa: E402
from megawan.pipelines.release import locate, start_groups  # noqa: E402
from megawan.pipelines.trained import apply_run_defaults, find_trained, load_text_embedding, load_trained_dit, \
    require_ema, saved_model_config, trained_files
from megawan.pipelines.sampling import SamplingConfig  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must be HEIGHTxWIDTH (e.g. 704x1280), got {text!r}") from None
    return h, w


def load_image(path, size=None) -> torch.Tensor:
    """[3, H, W] in [-1, 1]; resized and centre-cropped to ``size`` (h, w) if given, else as stored."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    arr = torch.from_numpy(np.array(Image.open(path).convert("RGB")))
    return frames_to_video(arr[None], size)[:, 0]


def load_clip(path, frames: int, size=None) -> torch.Tensor:
    """The first ``frames`` frames of a video file as [3, T, H, W] in [-1, 1] (fewer if the file is shorter)."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"context clip not found: {path}")
    out = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            out.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
            if len(out) == frames:
                break
    if not out:
        raise ValueError(f"{path} holds no video frames")
    return frames_to_video(torch.stack(out), size)


def load_states(path) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"states file not found: {path}")
    return torch.from_numpy(np.load(path)).float()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_argument_group("checkpoint (official or diffusers layout, or a trained DiT folder)")
    src.add_argument("--ckpt", help="release folder (Wan2.2-TI2V-5B or its -Diffusers twin), a DiT folder, or a "
                                    "training run folder / step_N checkpoint (megawan.pipelines.trained)")
    src.add_argument("--ema", action="store_true", help="a training checkpoint's EMA weights instead of its weights")
    src.add_argument("--dit", help="DiT folder (default: found in --ckpt)")
    src.add_argument("--vae", help="Wan2.2_VAE.pth or a diffusers vae/ folder (default: found in --ckpt)")
    src.add_argument("--text-encoder", help="models_t5_umt5-xxl-enc-bf16.pth or an HF umT5 folder")
    src.add_argument("--tokenizer", help="umT5 tokenizer folder (default: beside the text encoder)")
    src.add_argument("--no-text", action="store_true", help="no text encoder: empty text (world models)")
    src.add_argument("--state-dim", type=int, help="add zero-initialised state conditioning to a released model")
    inp = p.add_argument_group("inputs")
    inp.add_argument("--prompt", default="")
    inp.add_argument("--prompts-file", help="one prompt per line; DP replicas split them")
    inp.add_argument("--negative-prompt", default="", help="the unconditional branch of CFG")
    inp.add_argument("--image", help="first frame (TI2V)")
    inp.add_argument("--context", help="a video whose first --context-frames frames condition a world model")
    inp.add_argument("--data", help="a 1X split folder: take the context and states of clip --clip")
    inp.add_argument("--clip", type=int, default=0)
    inp.add_argument("--states", help=".npy robot states [frames, state_dim]")
    inp.add_argument("--context-frames", type=int, default=None, help="default 17, or the training run's")
    inp.add_argument("--frames", type=int, default=None, help="default 121, or the training run's clip length")
    inp.add_argument("--size", help="HEIGHTxWIDTH: T2V size, or resize + centre-crop the image / clip to it")
    smp = p.add_argument_group("sampling")
    smp.add_argument("--steps", type=int, default=None, help="default 50, or a training run's rollout steps")
    smp.add_argument("--text-embedding", help="safetensors with text_embeds [L, D] used as the prompt embedding "
                                              "(default: a training run's data.empty_prompt, else no text tokens)")
    smp.add_argument("--shift", type=float, default=5.0)
    smp.add_argument("--guidance", type=float, default=5.0)
    smp.add_argument("--solver", default="unipc", choices=["unipc", "euler"])
    smp.add_argument("--cfg", default="batched", choices=["batched", "sequential"])
    smp.add_argument("--schedule", default="release", choices=["release", "diffusers"])
    smp.add_argument("--seed", type=int, default=0)
    run = p.add_argument_group("run")
    run.add_argument("--out", default="outputs/video.mp4")
    run.add_argument("--fps", type=float, default=24.0)
    run.add_argument("--tp", type=int, default=1)
    run.add_argument("--cp", type=int, default=1)
    run.add_argument("--cp-impl", default="ulysses", choices=list(CP_IMPLS),
                     help="context parallelism of the self-attention: ulysses ((heads / tp) %% cp == 0), ring "
                          "(any cp) or hybrid (Ulysses in groups of --ulysses-size CP ranks, ring across them)")
    run.add_argument("--ulysses-size", type=int, help="hybrid only: the Ulysses group size (divides --cp)")
    run.add_argument("--dtype", default=None, choices=list(DTYPES), help="default bf16, or a training run's dtype")
    run.add_argument("--debug", action="store_true", help="show the traceback of an input error (or MEGAWAN_DEBUG=1)")
    return p


def _requests(args, model_config: WanDiTConfig) -> list[Request]:
    """Every request of this run, checked against the model config (text filled in later)."""
    size = _parse_size(args.size)
    if size is not None:
        check_size(size, model_config, given="--size")
    image = load_image(args.image, size) if args.image else None
    context, states = None, load_states(args.states) if args.states else None
    if args.context:
        context = load_clip(args.context, args.context_frames, size)
    elif args.data:
        from megawan.data.world_model_1x import WorldModel1XConfig, WorldModel1XDataset

        clip = WorldModel1XDataset(WorldModel1XConfig(root=args.data, clip_frames=args.frames, size=size))[args.clip]
        context = clip["video"]
        states = states if states is not None else clip["states"]
    if args.data and not args.states and not model_config.state_dim:
        states = None  # a model without state conditioning ignores the clip's states
    prompts = ([line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
               if args.prompts_file else [args.prompt])
    h, w = size if size and image is None and context is None else (None, None)
    reqs = []
    for i, prompt in enumerate(prompts):
        req = Request(text=torch.zeros(0, model_config.text_dim), image=image, context=context, states=states,
                      frames=args.frames, height=h, width=w, context_frames=args.context_frames, seed=args.seed + i,
                      meta={"prompt": prompt, "negative_prompt": args.negative_prompt, "index": i,
                            "inputs": {k: getattr(args, k) for k in ("image", "context", "data", "clip", "states")}})
        check_request(req, model_config)
        reqs.append(req)
    return reqs


def _checked_inputs(args):
    """(trained run or None, files, model config, requests): every input of this run found and checked, no
    model built. Raises ValueError / OSError naming the bad input."""
    trained = find_trained(args.ckpt) if args.ckpt and not args.dit else None
    apply_run_defaults(args, trained, {"frames": 121, "context_frames": 17, "dtype": "bf16", "steps": 50},
                       size_arg=lambda hw: f"{hw[0]}x{hw[1]}")
    if trained is not None and args.text_encoder is None:
        args.no_text = True  # a trained world model: its prompt embedding (if any) comes from the run
    if args.ema:
        require_ema(trained)
    if trained is not None:
        files = trained_files(trained, args.vae)
        config = saved_model_config(trained.checkpoint)
    else:
        files = locate(args.ckpt, dit=args.dit, vae=args.vae, text_encoder=args.text_encoder,
                       tokenizer=args.tokenizer, need_text=not args.no_text)
        config = WanDiTConfig.load(files.dit)
    if args.state_dim is not None:
        config = replace(config, state_dim=args.state_dim)
    requests = _requests(args, config)
    if args.text_embedding:
        prompt = load_text_embedding(args.text_embedding, config.text_dim)
        for r in requests:
            r.text = prompt
    return trained, files, config, requests


def main(argv=None, *, command_line: bool = False) -> list[dict]:
    """``command_line``: an input error is one line on stderr and exit 3 (else it raises, as for any caller)."""
    args = build_parser().parse_args(argv)
    # every input error surfaces here, before any model is loaded
    with user_errors(ValueError, OSError, debug=args.debug or not command_line):
        trained, files, config, requests = _checked_inputs(args)
        groups = start_groups(args.tp, args.cp, config.num_heads, args.cp_impl, args.ulysses_size)
    sampling = SamplingConfig(steps=args.steps, shift=args.shift, guidance=args.guidance, solver=args.solver,
                              cfg=args.cfg, schedule=args.schedule)
    dev = groups.device
    mine = [r for i, r in enumerate(requests) if i % groups.dp == groups.dp_rank]
    null = None  # no text encoder: empty text on both branches, so nothing to guide
    if files.text_encoder is not None:  # encode once, then free the encoder before the DiT is built
        from megawan.data.text_encoder import UMT5TextEncoder

        encoder = UMT5TextEncoder(files.text_encoder, files.tokenizer, device=dev)
        embs = encoder.encode([r.meta["prompt"] for r in mine] + [args.negative_prompt])
        for r, e in zip(mine, embs):
            r.text = e.float()
        null = embs[-1].float()
        del encoder, embs
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    runtime = DiTRuntime(linear_impl="local" if dev.type == "cpu" else "auto")
    if trained is not None:
        model = load_trained_dit(trained, groups, dtype=DTYPES[args.dtype], runtime=runtime, ema=args.ema)
    else:
        model = WanDiT.from_pretrained(files.dit, dtype=DTYPES[args.dtype], groups=groups, runtime=runtime,
                                       state_dim=args.state_dim)
    vae = WanVAE38.from_pretrained(files.vae, device=dev)
    sampler = WanSampler(model, vae, groups, sampling)
    out = Path(args.out)
    infos = []
    for r in mine:
        path = out if len(requests) == 1 else out.with_name(f"{out.stem}_{r.meta['index']}{out.suffix}")
        infos.append(sampler.generate(r, path, null, fps=args.fps))
    if groups.tp_rank == 0 and groups.cp_rank == 0:
        for info in infos:
            print(json.dumps({k: info[k] for k in ("video", "contact_sheet", "frames", "height", "width", "seed")}))
    parallel_state.destroy()
    return infos


if __name__ == "__main__":
    main(command_line=True)
