"""The package installed non-editably works outside the checkout: presets are shipped as package data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
import megawan
from megawan.models.dit_config import WanDiTConfig
from megawan.vae import WanVAE38Config
assert megawan.__file__.startswith(sys.argv[1]), megawan.__file__
dit, vae = WanDiTConfig.preset("tiny"), WanVAE38Config.preset("tiny")
assert WanDiTConfig.load("tiny") == dit
assert WanDiTConfig.preset("wan2.2-ti2v-5b") == WanDiTConfig()
assert WanVAE38Config.preset("wan2.2-ti2v-5b") == WanVAE38Config()
print(dit.dim, dit.num_heads, dit.num_layers, vae.base_dim, vae.decoder_base_dim)
"""


def test_installed_copy_loads_the_presets(tmp_path):
    # Build from a clean copy of the sources: a stale build/ folder in the checkout could hide a
    # file missing from the package data.
    src, target = tmp_path / "src", tmp_path / "site"
    shutil.copytree(ROOT / "megawan", src / "megawan", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.py", src)
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                            "--no-compile", "--quiet", "--target", str(target), str(src)],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    if build.returncode != 0 and "No module named pip" in build.stderr:
        pytest.skip("pip is not available to build the package")
    assert build.returncode == 0, build.stderr[-3000:]
    assert not (target / "configs").exists()  # run configs stay in the repository
    # A fresh interpreter outside the checkout, with only the installed copy on its path first.
    env = dict(os.environ, PYTHONPATH=str(target), PYTHONNOUSERSITE="1")
    out = subprocess.run([sys.executable, "-c", CHECK, str(target)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["288", "24", "2", "8", "16"]


def test_unknown_preset_names_the_available_ones():
    from megawan.models.dit_config import WanDiTConfig
    from megawan.vae import WanVAE38Config

    with pytest.raises(ValueError, match=r"no vae38 preset 'huge'; available: \['tiny', 'wan2.2-ti2v-5b'\]"):
        WanVAE38Config.preset("huge")
    with pytest.raises(FileNotFoundError, match=r"nor a preset \(\['tiny', 'wan2.2-ti2v-5b'\]\)"):
        WanDiTConfig.load("huge")
