"""Model presets shipped inside the package (package data): ``<model>/<name>.json``.

``WanDiTConfig.preset(name)`` and ``WanVAE38Config.preset(name)`` read them, so they work from an
installed wheel as well as from the checkout. Keys starting with "_" are comments. Run configs
(train, generate) live in the repository's ``configs/``, not here.
"""

from __future__ import annotations

import json
from importlib import resources


def names(model: str) -> list[str]:
    """Preset names available for ``model`` ("dit" or "vae38")."""
    folder = resources.files(__name__) / model
    return sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".json"))


def load(model: str, name: str) -> dict:
    """The preset's fields (comments dropped, JSON lists as tuples so frozen configs compare equal)."""
    available = names(model)
    if name not in available:
        raise ValueError(f"no {model} preset {name!r}; available: {available}")
    d = json.loads((resources.files(__name__) / model / f"{name}.json").read_text())
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if not k.startswith("_")}
