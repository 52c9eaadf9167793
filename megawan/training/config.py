"""The run configuration of ``python -m megawan.train``: a YAML file plus dotted command-line overrides.

    python -m megawan.train --config configs/train/tiny_1x.yaml --optim.lr 1e-4 --parallel.tp 2

Every section is a dataclass; loading checks every key and value type before anything starts, so a typo
or a wrong type is refused naming the key. ``--config`` also takes a preset name (``tiny_1x``,
``ti2v5b_1x``, ``ti2v5b_720p``: the files under ``configs/train/``). The resolved config is written
beside the checkpoints (``resolved_config.yaml``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megawan.diffusion import FlowMatchingConfig
from megawan.layers.fp8 import FP8_MODES
from megawan.models.dit_config import RECOMPUTE_GRANULARITIES
from megawan.parallel_state.layout import CP_IMPLS, LayoutError, ParallelLayout

PRESET_DIR = Path(__file__).resolve().parents[1] / "presets" / "train"  # package data; configs/train links here


class ConfigError(ValueError):
    """A run config that megawan refuses before starting: names the key and the rule."""


@dataclass
class RunSection:
    name: str = "run"
    out_dir: str = "outputs/run"  # checkpoints/, logs (tensorboard, metrics.jsonl), resolved_config.yaml
    seed: int = 0
    steps: int = 100  # optimizer steps in all (a resumed run continues to this count)
    exit_after_steps: int = 0  # stop (with a checkpoint) after this many steps in this process; 0 = off


@dataclass
class ModelSection:
    dit: str = "tiny"  # a DiT preset name or a config file (random init), ignored with `init`
    init: str | None = None  # a released Wan 2.2 checkpoint directory (official or diffusers layout)
    state_dim: int = 0  # robot-state conditioning (25 for 1X); 0 = off
    dtype: str = "bfloat16"  # GEMM weights / compute; norms, modulation, embeddings, head stay fp32
    residual_dtype: str = "float32"  # the residual stream: float32 (the release's) | bfloat16 (faster option)
    activation_checkpointing: bool = False
    recompute_granularity: str = "full"  # full | selective (keep attention outputs) | ffn (recompute the FFN only)
    recompute_num_blocks: int | None = None  # only the first N blocks recompute; None = all
    compile_blocks: bool | None = None  # torch.compile each block; None = on with CUDA
    linear_impl: str = "auto"
    attention_backend: str = "auto"
    fp8: str = "off"  # off | native-tensorwise | native-rowwise | te-delayed | te-current (the blocks' GEMMs)
    fp8_bf16_blocks: int = 0  # first and last N blocks kept in `dtype`


@dataclass
class ParallelSection:
    tp: int = 1
    cp: int = 1
    sequence_parallel: bool = True
    # context parallelism's self-attention: ulysses (all-to-all, (heads / tp) % cp == 0) | ring (any cp) |
    # hybrid (Ulysses in groups of ulysses_size CP ranks, ring across them); megawan/parallel_state/layout.py
    cp_impl: str = "ulysses"
    ulysses_size: int | None = None  # hybrid only: divides cp, and (heads / tp) % ulysses_size == 0


@dataclass
class DataSection:
    source: str = "1x"  # 1x (raw 1X split, VAE encode on the fly) | cache (megawan.tools.precompute output)
    root: str = "outputs/sample_1x/train_v2.0_raw"
    clip_frames: int = 17  # 4n + 1
    frame_stride: int = 1
    window_hop: int = 1
    size: list[int] | None = None  # [H, W]; None keeps the source size
    backend: str = "auto"  # video decoder
    batch_size: int = 1  # per data-parallel rank and micro-batch
    num_workers: int = 0
    vae: str = "tiny"  # a preset ("tiny": random), a fitted VAE of the package ("tiny_sample") or a VAE path
    memo_latents: bool = False  # 1X: keep each window's latents in memory after its first encode (small splits)
    empty_prompt: str | None = None  # safetensors with `text_embeds` (e.g. a cache's empty_prompt.safetensors)
    bad_input: str = "skip"


@dataclass
class OptimSection:
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    decay_style: str = "cosine"  # cosine | linear | constant
    clip_grad: float = 1.0  # by the global norm; 0 = off
    grad_accumulation: int = 1
    ema_decay: float = 0.0  # 0 = no EMA
    max_nonfinite_in_a_row: int = 5


@dataclass
class CheckpointSection:
    every: int = 50  # steps; 0 = only at the end and on a signal
    keep: int = 3
    load: str | None = None  # initial load: used only while out_dir holds no complete checkpoint of its own


@dataclass
class ValidationSection:
    every: int = 0  # steps; 0 = off
    root: str | None = None  # the held-out split (1X val or a cache of it); required when every / rollout_every > 0
    num_clips: int = 4
    sigmas: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    seed: int = 1234
    rollout_every: int = 0  # steps between world-model rollouts scored by PSNR / SSIM; 0 = off (needs a 1X split)
    rollout_clips: int = 2
    rollout_steps: int = 20  # sampler steps per rollout
    weights: str = "auto"  # what validation and rollouts score: auto (the EMA when optim.ema_decay > 0) | raw | ema | both
    rollout_conditions: list[str] = field(default_factory=lambda: ["true", "zeroed", "swapped"])  # states per
    # rollout (state-conditioned models): the true ones first; zeroed / swapped / shifted measure their use


@dataclass
class LoggingSection:
    every: int = 10  # one-line summary on rank 0
    tensorboard: bool = True
    progress_bar: bool = True  # a tqdm bar on a terminal; elsewhere (a log file) a plain line every progress_every_s
    progress_every_s: float = 30.0
    peak_tflops: float = 989.0  # per device, for MFU (H100 SXM dense bf16)


@dataclass
class TrainConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    objective: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.residual_dtype": ("float32", "bfloat16"),
    "model.fp8": FP8_MODES,
    "model.recompute_granularity": RECOMPUTE_GRANULARITIES,
    "parallel.cp_impl": CP_IMPLS,
    "data.source": ("1x", "cache"),
    "data.bad_input": ("skip", "raise"),
    "optim.decay_style": ("cosine", "linear", "constant"),
    "validation.weights": ("auto", "raw", "ema", "both"),
}


def _check_value(key: str, value, annotation):
    """``value`` converted to ``annotation`` (int -> float allowed), or ConfigError naming ``key``."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = args[0]
        origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {item.__name__}, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint in (int, float, str) and (not isinstance(value, hint) or isinstance(value, bool) and hint is not bool):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (section {prefix.rstrip('.') or 'top'} has: "
                          f"{', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
            kwargs[name] = _build(hints[name], value, key + ".")
        else:
            kwargs[name] = _check_value(key, value, hints[name])
            if key in _CHOICES and kwargs[name] not in _CHOICES[key]:
                raise ConfigError(f"{key}: must be one of {_CHOICES[key]}, got {kwargs[name]!r}")
    try:
        return cls(**kwargs)
    except ValueError as e:  # a section's own validation (e.g. FlowMatchingConfig)
        raise ConfigError(f"{prefix.rstrip('.')}: {e}") from e


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict:
    """``["--optim.lr", "1e-4", "--parallel.tp=2"]`` -> nested dict; values parsed as YAML scalars."""
    tree: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"expected --section.key VALUE, got {arg!r}")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        if "." not in key:
            raise ConfigError(f"override --{key}: use --section.key (e.g. --optim.lr 1e-4)")
        value = yaml.safe_load(raw)
        if isinstance(value, str):  # YAML reads 1e-4 as a string; numbers with exponents are numbers here
            try:
                value = float(value) if any(c in value for c in ".eE") else value
            except ValueError:
                pass
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.exists():
        return p
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    names = sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a preset ({', '.join(names)})")


def load_config(config: str | None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """The run config from a YAML file or preset name, with overrides applied, validated."""
    tree: dict = {}
    if config is not None:
        path = preset_path(config)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    if overrides:
        tree = _merge(tree, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    cfg = _build(TrainConfig, tree, "")
    _check_rules(cfg)
    return cfg


def _check_rules(cfg: TrainConfig) -> None:
    positive = {"run.steps": cfg.run.steps, "data.batch_size": cfg.data.batch_size,
                "optim.grad_accumulation": cfg.optim.grad_accumulation, "parallel.tp": cfg.parallel.tp,
                "parallel.cp": cfg.parallel.cp, "checkpoint.keep": cfg.checkpoint.keep,
                "optim.max_nonfinite_in_a_row": cfg.optim.max_nonfinite_in_a_row,
                "validation.num_clips": cfg.validation.num_clips,
                "validation.rollout_clips": cfg.validation.rollout_clips,
                "validation.rollout_steps": cfg.validation.rollout_steps}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    par = cfg.parallel
    try:  # the cp_impl / ulysses_size rules (the world size and the heads are checked at start-up)
        ParallelLayout(world_size=par.tp * par.cp, tp=par.tp, cp=par.cp, cp_impl=par.cp_impl,
                       ulysses_size=par.ulysses_size).validate()
    except LayoutError as e:
        raise ConfigError(f"parallel: {e}") from e
    if (cfg.data.clip_frames - 1) % 4:
        raise ConfigError(f"data.clip_frames must be 4n + 1 (the VAE's causal time compression), "
                          f"got {cfg.data.clip_frames}")
    latent_frames = (cfg.data.clip_frames - 1) // 4 + 1
    if cfg.objective.clean_frames >= latent_frames:
        raise ConfigError(f"objective.clean_frames={cfg.objective.clean_frames} leaves nothing to predict in "
                          f"{latent_frames} latent frames (data.clip_frames={cfg.data.clip_frames})")
    if cfg.data.size is not None and (len(cfg.data.size) != 2 or any(s % 16 for s in cfg.data.size)):
        raise ConfigError(f"data.size must be [H, W] with multiples of 16 (the VAE's spatial factor), "
                          f"got {cfg.data.size}")
    from megawan.evaluation.rollouts import STATE_CONDITIONS

    conditions = cfg.validation.rollout_conditions
    if not conditions or conditions[0] != "true" or len(set(conditions)) != len(conditions) or \
            any(c not in STATE_CONDITIONS for c in conditions):
        raise ConfigError(f"validation.rollout_conditions must start with 'true' and name each of {STATE_CONDITIONS} "
                          f"at most once, got {conditions}")
    if cfg.optim.warmup_steps >= cfg.run.steps:
        raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} must be < run.steps={cfg.run.steps} "
                          "(the LR schedule warms up, then decays over the remaining steps)")
    if not 0.0 <= cfg.optim.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay must lie in [0, 1), got {cfg.optim.ema_decay}")
    if cfg.optim.lr <= 0 or cfg.optim.min_lr < 0 or cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.lr must be > 0 and 0 <= optim.min_lr <= optim.lr "
                          f"(got {cfg.optim.lr}, {cfg.optim.min_lr})")
    for key in ("checkpoint.every", "validation.every", "logging.every", "optim.warmup_steps",
                "run.exit_after_steps", "validation.rollout_every"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 0:
            raise ConfigError(f"{key} must be >= 0")
    val = cfg.validation
    if (val.every or val.rollout_every) and not val.root:
        on = "validation.every" if val.every else "validation.rollout_every"
        raise ConfigError(f"{on}={getattr(val, on.split('.')[1])} needs validation.root, a held-out split (the 1X "
                          f"val split, or a latent cache of held-out clips): the training clips are not held out")
    if val.root and Path(val.root).resolve() == Path(cfg.data.root).resolve():
        raise ConfigError(f"validation.root is the training data ({cfg.data.root}): point it at a held-out split")
    if val.weights in ("ema", "both") and cfg.optim.ema_decay == 0:
        raise ConfigError(f"validation.weights={val.weights} needs an EMA (optim.ema_decay > 0)")


def evaluated_weights(cfg: TrainConfig) -> tuple[str, ...]:
    """Which weights validation and rollouts score: ("raw",), ("ema",) or both, per ``validation.weights``."""
    choice = cfg.validation.weights
    if choice == "auto":
        choice = "ema" if cfg.optim.ema_decay > 0 else "raw"
    return ("raw", "ema") if choice == "both" else (choice,)


# What a resumed run does with a key that differs from the checkpoint's config: the new value is in force
# (the LR schedule is rebuilt for the new run.steps / optim.* and continues from the saved step; a new
# layout reshards; a new batch or accumulation changes the global batch from here on), except for:
REFUSED_ON_RESUME = {  # the checkpoint's data position counts the items these define, in this order
    "run.seed": "the seed orders the data and draws the noise the saved position continues",
    "data.source": "the saved data position counts the items of the old source",
    "data.clip_frames": "the saved data position counts clip windows of the old length",
    "data.frame_stride": "the saved data position counts clip windows of the old stride",
    "data.window_hop": "the saved data position counts clip windows of the old hop",
}
UNUSED_ON_RESUME = {  # honoured trivially: they only matter for a run that starts from nothing
    "model.init": "the weights come from the checkpoint",
    "model.dit": "the weights come from the checkpoint",
}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, cfg: TrainConfig) -> list[tuple[str, object, object]]:
    """(key, checkpoint's value, this run's value) for every key that differs, in config order. Keys the
    checkpoint's config lacks (written by an older megawan) are not reported."""
    old, new = _flatten(saved), _flatten(cfg.to_dict())
    return [(k, old[k], v) for k, v in new.items() if k in old and _normal(old[k]) != _normal(v)]


def _normal(v):
    return list(v) if isinstance(v, tuple) else v


def check_resume_changes(changes, checkpoint_step: int, cfg: TrainConfig, where) -> None:
    """ConfigError naming every changed key a resume cannot honour (and a run.steps below the saved step)."""
    refused = [f"{k} {old!r} -> {new!r} ({REFUSED_ON_RESUME[k]})" for k, old, new in changes if k in REFUSED_ON_RESUME]
    if refused:
        raise ConfigError(f"cannot resume {where} with a changed " + "; ".join(refused)
                          + ": keep the checkpoint's value, or start a new run.out_dir")
    if cfg.run.steps < checkpoint_step:
        raise ConfigError(f"run.steps={cfg.run.steps} is below the step of {where} ({checkpoint_step}): a run "
                          f"cannot be shortened after the fact; pass run.steps >= {checkpoint_step}")


def describe_changes(changes) -> str:
    parts = []
    for k, old, new in changes:
        note = f" (not used: {UNUSED_ON_RESUME[k]})" if k in UNUSED_ON_RESUME else ""
        parts.append(f"{k} {old!r} -> {new!r}{note}")
    return ", ".join(parts)


def dump_config(cfg: TrainConfig, header: str | None = None) -> str:
    """The config as YAML; ``header`` (e.g. what a resume changed) leads as comment lines."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    return text
