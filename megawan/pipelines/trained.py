"""Sampling from a training run: its folder alone (newest checkpoint + resolved config + recorded VAE).

    python -m megawan.generate --ckpt outputs/tiny_1x --data outputs/sample_1x/val_v2.0_raw --clip 3
    python -m megawan.evaluate --ckpt outputs/tiny_1x/checkpoints/step_00000400 --data ...

``--ckpt`` may be a run folder (``run.out_dir``: its newest complete ``checkpoints/step_N``) or one ``step_N``
folder. The DiT is read from the training checkpoint by ``megawan.tools.export.load_model`` (the same reader as
the export, in any TP layout; ``--ema`` reads the EMA), the VAE is the one the run recorded
(``megawan.vae.pretrained.record_vae``), and the run's resolved config gives the world-model defaults
(clip length, context frames, frame size, the empty-prompt embedding).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

RESOLVED_CONFIG = "resolved_config.yaml"


@dataclass(frozen=True)
class TrainedCheckpoint:
    checkpoint: Path          # a complete step_N folder
    run_dir: Path | None      # the run folder holding it (resolved_config.yaml, vae/), if it is one

    @property
    def train_config(self):
        """The run's TrainConfig (resolved_config.yaml), or None when the step folder sits outside a run."""
        from megawan.training.config import load_config

        if self.run_dir is None or not (self.run_dir / RESOLVED_CONFIG).is_file():
            return None
        return load_config(str(self.run_dir / RESOLVED_CONFIG))

    def vae(self) -> Path | None:
        from megawan.vae.pretrained import recorded_vae

        return recorded_vae(self.run_dir) if self.run_dir is not None else None

    def world_model_defaults(self) -> dict:
        """Settings the run trained with: frames, context_frames, size (square side or None), text_embedding."""
        cfg = self.train_config
        if cfg is None:
            return {}
        out = {"frames": cfg.data.clip_frames, "context_frames": 4 * (cfg.objective.clean_frames - 1) + 1,
               "steps": cfg.validation.rollout_steps}
        if cfg.data.size:
            h, w = cfg.data.size
            out["size"] = (h, w)
        if cfg.data.empty_prompt:
            out["text_embedding"] = cfg.data.empty_prompt
        return out


def find_trained(path) -> TrainedCheckpoint | None:
    """The training checkpoint ``path`` names (a run folder or a step_N folder), or None when ``path`` is not
    one (a released or exported DiT folder). A run folder without a complete checkpoint, or an incomplete
    step_N folder, is an error naming what is there."""
    from megawan.tools.export import check_checkpoint
    from megawan.training import checkpointing

    path = Path(path)
    if not path.is_dir():
        return None
    if (path / checkpointing.MARKER).exists() or path.name.startswith((checkpointing.PREFIX, checkpointing.TMP_PREFIX)):
        ckpt = check_checkpoint(path)  # raises for an interrupted write, naming a good one
        parent = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
        return TrainedCheckpoint(ckpt, parent if parent is not None and (parent / RESOLVED_CONFIG).is_file() else None)
    if (path / RESOLVED_CONFIG).is_file() or (path / "checkpoints").is_dir():
        good = checkpointing.complete_checkpoints(path / "checkpoints")
        if not good:
            raise FileNotFoundError(f"run folder {path} holds no complete checkpoint yet (checkpoints/step_N with "
                                    f"{checkpointing.MARKER}): train first, or pass a released DiT folder")
        return TrainedCheckpoint(Path(good[-1]), path)
    return None


def load_trained_dit(trained: TrainedCheckpoint, groups, *, dtype: torch.dtype = torch.float32, runtime=None,
                     ema: bool = False):
    """The run's WanDiT in this rank's TP slice, read by the export's reader (fp32 master copy of the weights,
    or the EMA), then held in ``dtype`` with ``runtime``'s settings (collective over the job's ranks)."""
    from dataclasses import replace

    from megawan.models.dit import DiTRuntime, WanDiT
    from megawan.tools.export import load_model

    loaded = load_model(trained.checkpoint, groups, ema=ema)
    runtime = replace(runtime or DiTRuntime(), dtype=dtype, init_weights=False)
    if runtime == loaded.runtime:
        return loaded
    model = WanDiT(loaded.config, groups, runtime)
    model.load_state_dict(loaded.state_dict())  # casts into the runtime's dtypes (norms etc. stay fp32)
    return model.eval()


def require_ema(trained: TrainedCheckpoint | None) -> None:
    """Refuse ``--ema`` early (before any process group or model) when there is no EMA to read."""
    from megawan.tools.export import EMA_PREFIX, ExportError, check_has

    if trained is None:
        raise ValueError("--ema reads a training checkpoint's EMA: --ckpt must be a run folder or a step_N folder")
    try:
        check_has(trained.checkpoint, EMA_PREFIX)
    except ExportError:
        raise ValueError(f"--ema: checkpoint {trained.checkpoint} holds no EMA (trained with optim.ema_decay 0): "
                         f"run without --ema") from None


def saved_model_config(checkpoint):
    """The WanDiTConfig a training checkpoint was trained with."""
    from megawan.tools.export import saved_model_config as read

    return read(checkpoint)


def trained_files(trained: TrainedCheckpoint, vae=None):
    """CheckpointFiles of a training run: the step_N folder as the DiT, ``vae`` or the run's recorded VAE."""
    from megawan.pipelines.release import CheckpointFiles

    if vae is not None:
        path = Path(vae)
        if not path.exists():
            raise FileNotFoundError(f"VAE checkpoint not found: {path}")
    else:
        path = trained.vae()
        if path is None:
            raise FileNotFoundError(f"{trained.run_dir or trained.checkpoint} records no VAE (runs record theirs in "
                                    f"<run>/vae/ since issue 21; a step_N folder outside its run has none): pass --vae")
    return CheckpointFiles(trained.checkpoint, path, None, None)


_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16"}


def apply_run_defaults(args, trained: TrainedCheckpoint | None, fallbacks: dict, size_arg=None) -> None:
    """Fill the CLI arguments left at None: from the training run (``world_model_defaults`` and its model dtype)
    when there is one, then from ``fallbacks``. ``size_arg`` turns the run's (h, w) into the CLI's --size value."""
    run = trained.world_model_defaults() if trained is not None else {}
    cfg = trained.train_config if trained is not None else None
    if cfg is not None:
        run["dtype"] = _DTYPE_NAMES.get(cfg.model.dtype, "bf16")
    if "size" in run and size_arg is not None:
        run["size"] = size_arg(run["size"])
    else:
        run.pop("size", None)
    for key in set(run) | set(fallbacks):
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, run.get(key, fallbacks.get(key)))


def load_text_embedding(path, text_dim: int) -> torch.Tensor:
    """[L, D] from a safetensors file's ``text_embeds`` (trailing all-zero padding rows dropped)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text embedding file not found: {path}")
    emb = load_file(str(path)).get("text_embeds")
    if emb is None or emb.ndim != 2 or emb.shape[1] != text_dim:
        raise ValueError(f"{path} must hold text_embeds [L, {text_dim}], got "
                         f"{None if emb is None else tuple(emb.shape)}")
    nonzero = emb.abs().sum(1).nonzero()
    return emb[: int(nonzero.max()) + 1 if len(nonzero) else 0].float()
