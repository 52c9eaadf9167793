"""One table from ``bench/gpu_check.sh quick``'s steps: OUT_DIR/quick_table.md (also printed).

Reads what the steps left in OUT_DIR: quick_tests.log (pytest's summary line), block.json
(bench_dit_block_gpu.py), train.json (bench_train_gpu.py), fp8.json (bench_dit_fp8_gpu.py). A step that
failed or ran out of time leaves no JSON: its row says so and names its log, so the table never shows a
figure that was not measured in this run.

    python bench/quick_table.py OUT_DIR
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._table import format_table  # noqa: E402


def _json(out: Path, name: str):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _missing(step: str) -> str:
    return f"not measured: the step failed or ran out of time (see quick_{step}.log)"


def _tests(out: Path) -> list[list[str]]:
    log = out / "quick_tests.log"
    lines = log.read_text().splitlines() if log.exists() else []
    summary = [ln for ln in lines if re.search(r"\b(passed|failed|error|errors|tests? collected|skipped)\b", ln)]
    return [["CUDA-relevant tests, one GPU", summary[-1].strip(" =") if summary else _missing("tests")]]


def _block(out: Path) -> list[list[str]]:
    data = _json(out, "block")
    if data is None:
        return [["block, compiled", _missing("block")]]
    return [[f"block {r['mode']}, {r['tokens']} tokens",
             f"fwd+bwd {r['fwd+bwd TFLOP/s']} TFLOP/s, fwd {r['fwd TFLOP/s']} TFLOP/s, peak {r['peak GiB']} GiB"]
            for r in data["rows"]]


def _train(out: Path) -> list[list[str]]:
    data = _json(out, "train")
    if data is None:
        return [["5B train step vs diffusers", _missing("train")]]
    by = {}
    for r in data["rows"]:
        by.setdefault(r["tokens"], {})[r["model"]] = r
    rows = []
    for tokens, pair in by.items():
        ours, theirs = pair.get("megawan"), pair.get("diffusers")
        ratio = float(theirs["s/step"]) / float(ours["s/step"]) if ours and theirs else float("nan")
        compiled = "compiled" if data.get("compiled") else "eager"
        rows.append([f"train step, {tokens} tokens ({compiled}, both)",
                     f"megawan {ours['s/step']} s / {ours['peak GiB']} GiB; diffusers {theirs['s/step']} s / "
                     f"{theirs['peak GiB']} GiB; diffusers / megawan time {ratio:.2f}; "
                     f"velocity rel diff {data.get('v_rel', {}).get(str(tokens), 'n/a')}"])
    return rows


def _fp8(out: Path) -> list[list[str]]:
    data = _json(out, "fp8")
    if data is None:
        return [["FP8 block vs bf16", _missing("fp8")]]
    return [[f"FP8 block {r['fp8']}, {r['tokens']} tokens",
             f"fwd+bwd {r['fwd+bwd TFLOP/s']} TFLOP/s, speedup vs bf16 {r['fwd+bwd speedup vs off']}, "
             f"rel err vs bf16 {r['rel err vs off']}"] for r in data["rows"]]


def main(argv=None) -> str:
    out = Path((argv or sys.argv[1:])[0])
    device = (out / "gpu.txt").read_text().strip().replace("\n", "; ") if (out / "gpu.txt").exists() else "?"
    rows = _tests(out) + _block(out) + _train(out) + _fp8(out)
    table = f"gpu_check.sh quick on: {device}\n\n" + format_table(rows, ["check", "result"], left_columns=2) + "\n"
    (out / "quick_table.md").write_text(table)
    print(table)
    return table


if __name__ == "__main__":
    main()
