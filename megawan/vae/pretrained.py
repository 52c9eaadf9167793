"""VAEs by name: the config presets (random weights), the fitted VAEs shipped as package data, or a file.

    load_vae("tiny")          the tiny preset, randomly initialised (seed 0: the same on every rank and run)
    load_vae("tiny_sample")   the tiny VAE38 fitted to the sample world (package data: 2.7 M parameters, 5.2 MiB
                              in fp16; made by ``python -m megawan.tools.fit_vae``; its fit.json records the
                              held-out reconstruction PSNR and every stage's command, docs/vae.md the stages)
    load_vae(path)            Wan2.2_VAE.pth, a diffusers vae/ folder, or a folder written by save_pretrained
"""

from __future__ import annotations

from pathlib import Path

import torch

from megawan import presets
from megawan.vae.model import WanVAE38, WanVAE38Config

FITTED_DIR = Path(__file__).resolve().parents[1] / "presets" / "vae38"  # package data: <name>/config.json + weights
FIT_REPORT = "fit.json"


def fitted_names() -> list[str]:
    """Names of the fitted VAEs shipped with the package."""
    return sorted(p.name for p in FITTED_DIR.iterdir() if (p / "config.json").is_file())


def packaged_vae(path, device="cpu") -> WanVAE38:
    """A VAE folder read in fp32 (the shipped weights are fp16), in eval mode without gradients."""
    return WanVAE38.from_pretrained(path, dtype=torch.float32, device=device)


def vae_source(name: str) -> Path | None:
    """The folder or file ``name`` loads from; None for a config preset (random weights)."""
    if name in presets.names("vae38"):
        return None
    if name in fitted_names():
        return FITTED_DIR / name
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(f"VAE {name!r} not found: give a preset ({', '.join(presets.names('vae38'))}: random "
                                f"weights), a fitted VAE of the package ({', '.join(fitted_names())}), or the "
                                f"path of Wan2.2_VAE.pth / a diffusers vae folder")
    return path


def vae_config(name: str) -> WanVAE38Config:
    """The architecture of the VAE ``name`` names, without reading its weights: a preset's, a fitted VAE's or a
    diffusers folder's config.json; a weights file without one (the release's ``Wan2.2_VAE.pth``), or a path not
    on this machine (a config planned elsewhere), is taken to be the release's architecture."""
    from megawan.checkpoint.vae_io import locate_checkpoint
    from megawan.vae.model import config_from_diffusers

    if name in presets.names("vae38"):
        return WanVAE38Config.preset(name)
    if name in fitted_names():
        source = FITTED_DIR / name
    elif Path(name).exists():
        source = Path(name)
    else:
        return WanVAE38Config.preset("wan2.2-ti2v-5b")
    _, diffusers_config = locate_checkpoint(source)
    return config_from_diffusers(diffusers_config) if diffusers_config else WanVAE38Config.preset("wan2.2-ti2v-5b")


def load_vae(name: str, device="cpu") -> WanVAE38:
    """The VAE ``name`` names (see the module docstring), fp32, in eval mode."""
    source = vae_source(name)
    if source is None:
        torch.manual_seed(0)  # the same random VAE on every rank and every run
        return WanVAE38(WanVAE38Config.preset(name)).to(device).eval()
    return packaged_vae(source, device).eval()


# ---- the VAE a training run used, kept in its run folder -----------------------------------------------
RUN_VAE = "vae"                      # <run>/vae/: a VAE folder (diffusers layout), read by generate / evaluate
RUN_VAE_SOURCE = "vae_source.json"   # <run>/vae_source.json: the absolute path of a VAE file not copied


def record_vae(name: str, run_dir, vae: WanVAE38 | None = None) -> Path:
    """Keep the VAE ``name`` (``data.vae``) with the run in ``run_dir``, so the run folder alone can sample and be
    evaluated. Small VAEs are written into ``<run>/vae/`` (a preset's random weights from ``vae`` or rebuilt;
    a fitted VAE of the package copied); a VAE file given by path (the release's 2.8 GB) is not copied: its
    absolute path goes into ``<run>/vae_source.json``. Returns what was written (one process calls it)."""
    import json
    import shutil

    from megawan.utils import atomic_path

    run_dir = Path(run_dir)
    source = vae_source(name)
    if source is not None and source.resolve().parent != FITTED_DIR.resolve():
        with atomic_path(run_dir / RUN_VAE_SOURCE) as tmp:
            tmp.write_text(json.dumps({"vae": str(source.resolve()), "data.vae": name}) + "\n")
        return run_dir / RUN_VAE_SOURCE
    target = run_dir / RUN_VAE
    target.mkdir(parents=True, exist_ok=True)
    if source is None:  # random weights exist only in memory: write them (fp32)
        (vae if vae is not None else load_vae(name)).save_pretrained(target, layout="diffusers")
    else:
        for f in sorted(source.iterdir()):
            if f.is_file():
                with atomic_path(target / f.name) as tmp:
                    shutil.copyfile(f, tmp)
    return target


def recorded_vae(run_dir) -> Path | None:
    """The VAE a run recorded with ``record_vae`` (a folder or a file), or None if it recorded none."""
    import json

    run_dir = Path(run_dir)
    if (run_dir / RUN_VAE / "config.json").is_file():
        return run_dir / RUN_VAE
    pointer = run_dir / RUN_VAE_SOURCE
    if pointer.is_file():
        path = Path(json.loads(pointer.read_text())["vae"])
        if not path.exists():
            raise FileNotFoundError(f"{pointer} names the VAE this run trained with, {path}, which no longer exists: "
                                    f"pass --vae")
        return path
    return None


def export_recorded_vae(checkpoint, out, layout: str = "diffusers") -> Path | None:
    """Write the VAE recorded by the run that holds ``checkpoint`` (a step_N folder) beside an exported DiT in
    ``out``: ``out/vae/`` (diffusers: the recorded folder's files as they are) or ``out/Wan2.2_VAE.pth``
    (official keys, fp32), where ``megawan.generate`` looks. A VAE the run only points to (a release file) is
    not copied. Returns what was written, or None."""
    import shutil

    checkpoint = Path(checkpoint)
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    if run_dir is None or not (run_dir / RUN_VAE / "config.json").is_file():
        return None
    if layout == "official":
        return packaged_vae(run_dir / RUN_VAE).save_pretrained(Path(out), layout="official")
    target = Path(out) / RUN_VAE
    shutil.copytree(run_dir / RUN_VAE, target)
    return target
