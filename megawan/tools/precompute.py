"""Encode clips with the (spatially sharded) VAE and prompts with umT5 into a latent cache.

    # 1X world model (empty prompt), 8 GPUs, VAE sharded over 2 GPUs -> 4 encode groups
    torchrun --nproc-per-node 8 -m megawan.tools.precompute --source 1x \\
        --data data/worldmodel_raw/train_v2.0_raw --out cache/1x_train \\
        --vae ckpt/Wan2.2-TI2V-5B --text-encoder ckpt/Wan2.2-TI2V-5B-Diffusers/text_encoder \\
        --tokenizer ckpt/Wan2.2-TI2V-5B-Diffusers/tokenizer --clip-frames 77 --window-hop 77 --vae-shards 2
    # under SLURM: srun python -m megawan.tools.precompute ... (ranks come from SLURM_PROCID/NTASKS)

Work is split in cache shards of ``--samples-per-shard`` consecutive clips. Ranks form groups of
``--vae-shards`` consecutive ranks; a group encodes one batch together (each rank one band of rows) and
groups take disjoint cache shards (shard k goes to group k mod groups). The group's first rank writes. A
rerun skips shards already written, so an interrupted job resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from megawan.notices import quiet_known_notices

quiet_known_notices()  # before megatron-core and torchao are imported: their notices would come once per rank

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

from megawan import parallel_state  # noqa: E402
from megawan.data.bad_input import BadInputReport  # noqa: E402
from megawan.data.captioned_folder import CaptionedFolderConfig, CaptionedVideoFolder  # noqa: E402
from megawan.data.latent_cache import (EMPTY_PROMPT, check_or_write_config, save_tensors_atomic,  # noqa: E402
                                       shard_name, write_index)
from megawan.data.text_encoder import UMT5TextEncoder  # noqa: E402
from megawan.data.world_model_1x import WorldModel1XConfig, WorldModel1XDataset  # noqa: E402
from megawan.vae import WanVAE38  # noqa: E402

logger = logging.getLogger("megawan.precompute")


def build_source(args, report: BadInputReport | None = None):
    if args.source == "1x":
        return WorldModel1XDataset(WorldModel1XConfig(
            root=args.data, clip_frames=args.clip_frames, frame_stride=args.frame_stride,
            window_hop=args.window_hop, size=args.size, backend=args.backend, bad_input=args.bad_input), report)
    return CaptionedVideoFolder(CaptionedFolderConfig(
        root=args.data, size=args.size or (704, 1280), clip_frames=args.clip_frames,
        frame_stride=args.frame_stride, backend=args.backend, bad_input=args.bad_input), report)


def _stack(samples: list[dict], key: str) -> torch.Tensor:
    values = [s[key] for s in samples]
    return torch.stack(values) if torch.is_tensor(values[0]) else torch.tensor(values)


def encode_shard(samples: list[dict], vae, vae_group, device, batch_size: int, text_encoder) -> tuple[dict, dict]:
    """Tensors (and safetensors metadata) of one cache shard; the VAE call is collective over vae_group."""
    latents = []
    for start in range(0, len(samples), batch_size):
        video = _stack(samples[start:start + batch_size], "video").to(device)
        latents.append(vae.encode(video, group=vae_group, gather_output=True).cpu())
    tensors = {"latents": torch.cat(latents)}
    for key in ("states", "shard", "first_frame", "segment_id", "index"):
        if key in samples[0]:
            tensors[key] = _stack(samples, key)
    metadata = {}
    if "caption" in samples[0] and text_encoder is not None:
        captions = [s["caption"] for s in samples]
        embeds = text_encoder.encode(captions)
        tensors["text_embeds"] = torch.cat(embeds)
        tensors["text_lengths"] = torch.tensor([e.shape[0] for e in embeds])
        metadata["captions"] = json.dumps(captions)
    return tensors, metadata


def precompute(dataset, out, *, vae, text_encoder=None, samples_per_shard: int = 64, batch_size: int = 1,
               max_samples: int | None = None, vae_group=None, rank: int = 0, world_size: int = 1,
               vae_shards: int = 1, device="cpu", config: dict | None = None, progress: bool = True) -> dict | None:
    """Fill ``out`` with cache shards for ``dataset`` (clip order = dataset order); returns the index on
    rank 0. Every rank calls this; ranks rank // vae_shards form one encode group."""
    out = Path(out)
    num_samples = min(len(dataset), max_samples or len(dataset))
    num_shards = math.ceil(num_samples / samples_per_shard)
    groups, group = world_size // vae_shards, rank // vae_shards
    leader = rank % vae_shards == 0
    text_mode = "per_sample" if isinstance(dataset, CaptionedVideoFolder) else "shared"
    distributed = dist.is_initialized() and world_size > 1
    if rank == 0:
        check_or_write_config(out, {**(config or {}), "num_samples": num_samples,
                                    "samples_per_shard": samples_per_shard, "text": text_mode})
        if text_mode == "shared" and not (out / EMPTY_PROMPT).exists():
            if text_encoder is None:
                raise ValueError("the world-model cache needs a text encoder for its empty-prompt embedding")
            save_tensors_atomic(out / EMPTY_PROMPT, {"text_embeds": text_encoder.encode([""])[0]})
    if distributed:
        dist.barrier()  # the config check passed (or raised) before anyone writes shards

    mine = [k for k in range(num_shards) if k % groups == group]
    todo = [k for k in mine if not (out / shard_name(k)).exists()]
    if distributed and vae_group is not None:  # a group agrees on its to-do list: all join every encode
        # An object collective: torch stages it on the backend's device (the rank's GPU under NCCL, which
        # refuses CPU tensors; the CPU under gloo).
        lists = [None] * dist.get_world_size(vae_group)
        dist.all_gather_object(lists, todo, group=vae_group)
        todo = [k for k in mine if any(k in other for other in lists)]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"precompute group {group}/{groups}",
               unit="shard", disable=not (progress and leader))
    for k in todo:
        clips = range(k * samples_per_shard, min((k + 1) * samples_per_shard, num_samples))
        samples = [dataset[c] for c in clips]
        tensors, metadata = encode_shard(samples, vae, vae_group, device, batch_size,
                                         text_encoder if leader else None)
        if leader:
            save_tensors_atomic(out / shard_name(k), tensors, metadata)
        bar.update(1)
    bar.close()
    skipped = getattr(getattr(dataset, "report", None), "counts", {})
    if skipped:
        logger.warning("rank %d skipped bad input: %s", rank, dict(skipped))
    if distributed:
        dist.barrier()
    return write_index(out, num_shards, text_mode) if rank == 0 else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", choices=["1x", "folder"], required=True)
    p.add_argument("--data", required=True, help="1X split folder, or captioned video folder")
    p.add_argument("--out", required=True)
    p.add_argument("--vae", required=True, help="Wan2.2_VAE.pth, a diffusers VAE folder, or a model repo root")
    p.add_argument("--text-encoder", required=True, help="local HF-layout umT5 encoder folder")
    p.add_argument("--tokenizer", default=None, help="local tokenizer folder (default: --text-encoder)")
    p.add_argument("--clip-frames", type=int, default=77)
    p.add_argument("--frame-stride", type=int, default=1)
    p.add_argument("--window-hop", type=int, default=77, help="1X: frames between clip starts")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--backend", default="auto")
    p.add_argument("--bad-input", choices=["skip", "raise"], default="skip")
    p.add_argument("--samples-per-shard", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--vae-shards", type=int, default=1, help="ranks that shard one VAE encode spatially")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                   help="VAE / text encoder compute dtype (latents are stored in it)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    env = parallel_state.launch_env()
    # rank 0 tells what happens; the others only what goes wrong on them
    logging.basicConfig(level=logging.INFO if env["rank"] == 0 else logging.WARNING)
    if env["rank"] != 0:  # transformers' weight-loading bar, the same on every rank
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    vae_group, device = None, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if env["world_size"] > 1:
        groups = parallel_state.initialize(1, 1, vae_shards=args.vae_shards, num_heads=None)
        vae_group, device = (groups.vae_group if args.vae_shards > 1 else None), groups.device
    elif args.vae_shards != 1:
        raise ValueError("--vae-shards > 1 needs several ranks (torchrun or srun)")
    dtype = getattr(torch, args.dtype)
    # every rank runs the same construction checks: rank 0 names each bad file (once); every rank's counts
    # come in its closing line
    dataset = build_source(args, BadInputReport(args.bad_input, announce=env["rank"] == 0))
    vae = WanVAE38.from_pretrained(args.vae, dtype=dtype, device=device)
    text_encoder = UMT5TextEncoder(args.text_encoder, args.tokenizer, dtype=dtype, device=device)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "max_samples", "batch_size", "backend")}
    config["size"] = list(args.size) if args.size else None
    index = precompute(dataset, args.out, vae=vae, text_encoder=text_encoder,
                       samples_per_shard=args.samples_per_shard, batch_size=args.batch_size,
                       max_samples=args.max_samples, vae_group=vae_group, rank=env["rank"],
                       world_size=env["world_size"], vae_shards=args.vae_shards, device=device, config=config)
    if index is not None:
        print(f"cache {args.out}: {index['num_samples']} samples in {len(index['shards'])} shards")
    if dist.is_initialized():
        parallel_state.destroy()


if __name__ == "__main__":
    main()
