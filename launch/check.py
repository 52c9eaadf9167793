"""Check a launch before any rank starts (used by launch/run.sh and launch/slurm/*.sbatch).

    python launch/check.py --world N train CONFIG [--section.key VALUE ...]
    python launch/check.py --world N module MODULE TP CP

train: the run config loads with its overrides (the trainer's own loader, so the same keys and rules) and
its parallel.tp * parallel.cp divides the N ranks. module: MODULE can be imported from this checkout and
TP * CP divides N. Prints "tp=T cp=C dp=D" and exits 0, or prints the problem and exits 2.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's megawan, whatever else is installed


def module_exists(name: str) -> bool:
    """megawan.* is looked up in this checkout's files (an editable install elsewhere may also answer)."""
    if name.split(".")[0] == "megawan":
        base = ROOT.joinpath(*name.split("."))
        return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def layout(world: int, tp: int, cp: int, names: str = "tp * cp") -> str:
    if tp < 1 or cp < 1:
        fail(f"{names} must be >= 1 each (got {tp}, {cp})")
    if world % (tp * cp):
        fail(f"{names} = {tp} * {cp} = {tp * cp} does not divide the {world} ranks "
             f"(nodes x ranks per node); pick a layout whose product divides it")
    return f"tp={tp} cp={cp} dp={world // (tp * cp)}"


def main(argv: list[str]) -> str:
    if len(argv) < 4 or argv[0] != "--world" or argv[2] not in ("train", "module"):
        fail("usage: check.py --world N train CONFIG [overrides] | --world N module MODULE TP CP")
    try:
        world = int(argv[1])
    except ValueError:
        fail(f"--world must be an integer, got {argv[1]!r}")
    if argv[2] == "train":
        # the launchers print this script's output as the layout line: megatron-core's notice of its
        # pure-torch fallbacks (imported with the config's sections) must not end up inside it
        from megawan.notices import quiet_known_notices

        quiet_known_notices()
        from megawan.training.config import ConfigError, load_config

        try:
            cfg = load_config(argv[3], argv[4:])
        except ConfigError as e:
            fail(str(e))
        return layout(world, cfg.parallel.tp, cfg.parallel.cp, "parallel.tp * parallel.cp")
    if len(argv) != 6:
        fail("usage: check.py --world N module MODULE TP CP")
    module = argv[3]
    try:
        tp, cp = int(argv[4]), int(argv[5])
    except ValueError:
        fail(f"--tp and --cp need integers, got {argv[4]!r} and {argv[5]!r}")
    if not module_exists(module):
        fail(f"python module {module} is not in this checkout")
    return layout(world, tp, cp)


if __name__ == "__main__":
    print(main(sys.argv[1:]))
