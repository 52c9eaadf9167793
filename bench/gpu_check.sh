#!/usr/bin/env bash
# One prepared run for a GPU machine (H100/H200): the checks and timings that need a GPU.
# A lent GPU gives 15 minutes in all (start-up included) and 10 minutes a call: run `quick` first, alone.
#   quick  (at most 8 minutes on one H100/H200; every step has its own time limit, the limits add up to
#          460 s) in this order:
#          1. the suite's CUDA-relevant single-process tests on GPU 0 (cuDNN attention fwd+bwd vs the math
#             kernel, the attention / compile / init choices, fused functions, FP8 GEMMs and blocks, the
#             state-conditioned model, FLOP counts, sampling): QUICK_TESTS below;
#          2. bench_dit_block_gpu.py: one full-width block, compiled, at 5,120 and 27,280 tokens (TFLOP/s,
#             a fresh compile per size);
#          3. bench_train_gpu.py --compile: the full 5B train step at 5,120 tokens, megawan beside diffusers'
#             WanTransformer3DModel, both compiled (s/step, peak GiB);
#          4. bench_dit_fp8_gpu.py: the FP8 block against bf16 at 5,120 and 27,280 tokens (eager);
#          5. bench/quick_table.py: one table of the above, OUT_DIR/quick_table.md (printed at the end).
#          CPU dry run (no CUDA call; the same steps with tiny sizes on CPU, the tests only collected):
#            GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh quick OUT_DIR   (tests/test_gpu_first_contact.py runs it)
#   tests  the test suite on the GPU machine: default (GPU 0 + gloo CPU ranks), then MEGAWAN_TEST_BACKEND=nccl
#          when there are 2+ GPUs; the fast paths on one GPU: TE linears, cuDNN / flash-attn / TE attention
#          vs the local / torch paths (bf16), when those packages are installed;
#   speed  (issue 13) the speed tests that need CUDA; bench_dit_block_gpu.py at 5,120 and 27,280 tokens,
#          eager, compiled and compiled with the bf16 residual stream, with a kernel profile;
#          bench_dit_full_gpu.py: the full 5B, megawan (fp32 and bf16 stream) vs diffusers, compiled,
#          forward + train step; bench_vae_decode_paths.py (fp32 / bf16 / channels-last
#          / compiled vs diffusers, with errors); the VAE decode memory benchmark at full width;
#   fp8    (issue 14) the native FP8 GEMM against brute force and the tiny DiT's FP8 forward + backward vs
#          bf16 on CUDA; bench_dit_fp8_gpu.py: bf16 vs FP8 block at 5,120 / 27,280 tokens and the full 5B,
#          then compiled. Needs torchao: carry its wheel (fetch_wheels.sh torchao==0.18.0);
#   train  (issue 10) bench_train_gpu.py: a full-width 5B train step at 5,120 and 27,280 tokens beside
#          diffusers' WanTransformer3DModel doing the same step, tokens/s, MFU, peak memory.
#   bash bench/gpu_check.sh STAGE [OUT_DIR]      (STAGE: quick | tests | speed | fp8 | train | all; all = the
#                                                  last four, 9-13 minutes each: one loan per stage)
# Not yet run: no session so far had a GPU machine. Wheels first (../shared/device/README.md): the image
# lacks megatron-core, diffusers, PyAV (a core dependency: the sample data and the 1X reader) and torchao:
#   here:  bash ../shared/device/fetch_wheels.sh av torchao==0.18.0   (46 MB of wheels; carry=[".whl"])
#   there: python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:$PWD
#   then:  bash bench/gpu_check.sh quick outputs/gpu_check      (the device tool: timeout_s 540)
# (it has pytest, pytest-xdist, safetensors, einops, transformers, tensorboard, psutil, pyyaml, scikit-image;
# the test extras torchcodec / decord are absent: their decoder tests skip, saying so under -rs)
# Each step has a time limit, logs its output, and the script carries on past a failing step, so one run
# says everything; the exit status is non-zero when any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-all}
OUT=${2:-outputs/gpu_check}
DRY=${GPU_CHECK_DRY_RUN:-0}
case "$STAGE" in quick|tests|speed|fp8|train|all) ;; *) echo "usage: $0 quick|tests|speed|fp8|train|all [OUT_DIR]" >&2; exit 2;; esac
if [ "$DRY" = 1 ] && [ "$STAGE" != quick ]; then echo "GPU_CHECK_DRY_RUN=1: only the quick stage has a CPU dry run" >&2; exit 2; fi
want() { [ "$STAGE" = all ] || [ "$STAGE" = "$1" ]; }
mkdir -p "$OUT"
if [ "$DRY" = 1 ]; then
  echo "DRY RUN on CPU: the quick stage's steps at tiny sizes, tests collected only; no figure is a measurement" | tee "$OUT/gpu.txt"
else
  nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
# Preflight: what the whole run needs, named at once rather than as a failure minutes in.
python - <<'PY' || exit 3
import importlib.util, sys
need = {"megatron.core": "megatron-core", "diffusers": "diffusers", "av": "av (PyAV)", "torchao": "torchao",
        "safetensors": "safetensors", "pytest": "pytest"}
def found(mod):
    try:
        return importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:  # a dotted name whose parent is missing
        return False
missing = [pkg for mod, pkg in need.items() if not found(mod)]
if missing:
    sys.exit("gpu_check.sh: missing " + ", ".join(missing) + ": carry them as wheels (see this script's header)")
print("preflight: every package found")
PY
FAILED=0
# A step with a wall-clock limit (seconds): its log, its exit status, the tail of its log.
tstep() {
  local name=$1 limit=$2 rc; shift 2; echo "== $name (limit ${limit}s): $*"
  ( timeout "$limit" "$@" ) > "$OUT/$name.log" 2>&1; rc=$?
  echo "== $name exit $rc"; tail -n 40 "$OUT/$name.log"
  [ "$rc" -eq 0 ] || FAILED=1
}
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
# The quick stage's tests: single-process tests whose models run on GPU 0 (no multi-rank test: those run
# gloo ranks on the CPU and belong to the `tests` stage).
QUICK_TESTS="tests/test_gpu_first_contact.py tests/test_dit_speed.py tests/test_dit_fp8.py tests/test_dit_states.py
  tests/test_budget.py tests/test_sampling_pipeline.py"
QUICK_K="(cudnn or auto_attention or from_pretrained or seeded or fused or default_is_on or logged"
QUICK_K="$QUICK_K or recomputation_gives or fp8_mm or close_to_bf16 or covers or bitwise or states or flops"
QUICK_K="$QUICK_K or cfg_batched or ti2v_first or world_model_keeps) and not tp2 and not parallel_layouts and not refused"
if [ "$STAGE" = quick ]; then
if [ "$DRY" = 1 ]; then
  tstep quick_tests 120 python -m pytest $QUICK_TESTS -q --collect-only -k "$QUICK_K"
  SMOKE="--cpu-smoke --dim 64 --heads 4 --ffn-dim 128 --warmup 0 --iters 1"
  tstep quick_block 120 python bench/bench_dit_block_gpu.py $SMOKE --tokens 16 24 --modes eager --json "$OUT/block.json"
  tstep quick_train 150 python bench/bench_train_gpu.py --tiny --cases 12 --repeats 1 --json "$OUT/train.json"
  tstep quick_fp8 60 python bench/bench_dit_fp8_gpu.py $SMOKE --text-dim 32 --tokens 16 24 --no-model --json "$OUT/fp8.json"
else
  XDIST=$(python -c "import xdist" 2>/dev/null && echo "-n 4" || true)
  tstep quick_tests 120 env OMP_NUM_THREADS=2 python -m pytest $QUICK_TESTS -q -rs $XDIST -k "$QUICK_K"
  tstep quick_block 110 python bench/bench_dit_block_gpu.py --tokens 5120 27280 --modes compiled --warmup 2 --iters 5 --json "$OUT/block.json"
  tstep quick_train 150 python bench/bench_train_gpu.py --cases 5120 --repeats 2 --compile --json "$OUT/train.json"
  tstep quick_fp8 60 python bench/bench_dit_fp8_gpu.py --tokens 5120 27280 --no-model --warmup 2 --iters 5 --json "$OUT/fp8.json"
fi
tstep quick_table 20 python bench/quick_table.py "$OUT"  # its log tail is the table
fi
# The whole suite with single-process tests on GPU 0 and gloo ranks on CPU (the default), then with NCCL
# ranks (tests needing more GPUs than this machine has are skipped, and say so under -rs).
if want tests; then
# pytest-xdist is on the GPU machine's image: 8 workers share its 16 cores (2 threads each); the
# single-process tests share GPU 0, the multi-rank tests run gloo ranks on the CPUs.
XDIST=$(python -c "import xdist" 2>/dev/null && echo "-n 8" || true)
tstep gpu_tests 420 env OMP_NUM_THREADS=2 python -m pytest tests -q -rs -x $XDIST
[ "$NGPU" -ge 2 ] && tstep nccl_tests 300 env MEGAWAN_TEST_BACKEND=nccl python -m pytest tests -q -rs -x
tstep fast_paths 120 python - <<'PY'
import torch
from megawan import parallel_state
from megawan.models.dit import DiTRuntime, WanDiT, WanDiTConfig
from megawan.layers.attention_kernels import _installed
groups = parallel_state.get_groups()
cfg = WanDiTConfig(dim=1536, ffn_dim=4096, num_heads=12, num_layers=2, text_dim=4096)
x = torch.randn(1, 48, 5, 32, 32, device="cuda"); t = torch.full((1,), 700.0, device="cuda")
text = torch.randn(1, 512, 4096, device="cuda")
torch.manual_seed(0)
ref = WanDiT(cfg, groups, DiTRuntime(dtype=torch.bfloat16, linear_impl="local", attention_backend="torch")).eval()
with torch.no_grad():
    base = ref(x, t, text)
# Bound: two bf16 runs of the same weights that differ only in kernels (fused vs unfused GEMMs, flash vs
# SDPA) differ by bf16 rounding of the GEMM/attention outputs; 2e-2 is 10x the bf16-vs-fp32 error the CPU
# tests measure (2.0e-3, tests/test_dit_parity.py). Above it, or on any key missing/unexpected, fail.
BOUND = 2e-2
failures = []
for linear, attn in [("local", "cudnn"), ("local", "flash"), ("te", "torch"), ("te", "te")]:
    if (attn == "flash" and not _installed("flash_attn")) or ("te" in (linear, attn) and not _installed("transformer_engine")):
        print(linear, attn, "skipped: package missing"); continue
    m = WanDiT(cfg, groups, DiTRuntime(dtype=torch.bfloat16, linear_impl=linear, attention_backend=attn)).eval()
    # TE layers may add their own extra state (_extra_state): that is the only key allowed to differ.
    keys = m.load_state_dict(ref.state_dict(), strict=False)
    missing = [k for k in keys.missing_keys if not k.endswith("_extra_state")]
    if missing or keys.unexpected_keys:
        failures.append(f"{linear}/{attn}: missing {missing}, unexpected {keys.unexpected_keys}")
        continue
    with torch.no_grad():
        out = m(x, t, text)
    diff = ((out.float() - base.float()).norm() / base.float().norm()).item()
    print(linear, attn, f"rel diff vs local/torch bf16: {diff:.3e} (bound {BOUND})")
    if not diff <= BOUND:  # also catches NaN
        failures.append(f"{linear}/{attn}: rel diff {diff:.3e} > {BOUND}")
if failures:
    raise SystemExit("fast paths FAILED:\n" + "\n".join(failures))
print("fast paths OK")
PY
fi
if want speed; then
tstep speed_tests 120 python -m pytest tests/test_dit_speed.py -q -rs -k "cudnn or fused or logged or default"
tstep block_bench 200 python bench/bench_dit_block_gpu.py --tokens 5120 27280 --modes eager compiled compiled-bf16-stream --profile
tstep full_dit 300 python bench/bench_dit_full_gpu.py --modes compiled --recompute selective --residual-dtypes float32 bfloat16 --warmup 1 --iters 2
tstep vae_paths 120 python bench/bench_vae_decode_paths.py
tstep vae_decode 60 python bench/bench_vae_memory.py --frames 121 --height 704 --width 1280 --shards 1
fi
if want fp8; then
tstep fp8_cuda 120 python - <<'PY'
import torch
from megawan.layers import fp8
from megawan.models.dit import DiTRuntime, WanDiT, WanDiTConfig
dev = torch.device("cuda")
g = torch.Generator(device=dev).manual_seed(0)
def deq(x, dtype, rowwise):
    amax = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax()
    s = torch.exp2(torch.floor(torch.log2(torch.finfo(dtype).max / amax.double())))
    return (x.double() * s).to(dtype).double() / s
for rowwise, gdt in ((False, fp8.E5M2), (True, fp8.E4M3)):
    for m, k, n in ((256, 3072, 9216), (40, 1000, 64)):  # k = 1000: the inner-dim padding
        a = torch.randn(m, k, device=dev, generator=g, dtype=torch.bfloat16)
        b = torch.randn(k, n, device=dev, generator=g, dtype=torch.bfloat16)
        for adt in (fp8.E4M3, gdt):
            out = fp8.fp8_mm(a, b, adt, fp8.E4M3, rowwise, torch.bfloat16).double()
            ref = deq(a.float(), adt, rowwise) @ deq(b.t().float(), fp8.E4M3, rowwise).t()
            print("fp8_mm rowwise" if rowwise else "fp8_mm tensorwise", adt, (m, k, n),
                  "rel diff vs brute force (bf16 output):", ((out - ref).norm() / ref.norm()).item())
cfg = WanDiTConfig.preset("tiny")
x = torch.randn(1, 48, 3, 8, 8, device=dev); t = torch.full((1,), 700.0, device=dev)
text = torch.randn(1, 512, cfg.text_dim, device=dev)
res = {}
for mode in ("off", "native-tensorwise", "native-rowwise"):
    torch.manual_seed(0)
    m = WanDiT(cfg, runtime=DiTRuntime(dtype=torch.bfloat16, linear_impl="local", attention_backend="torch", fp8=mode)).train()
    xx = x.clone().requires_grad_(True)
    out = m(xx, t, text); out.float().square().mean().backward()
    res[mode] = (out.detach().float(), xx.grad.float())
    if mode != "off":
        print(mode, "tiny DiT on CUDA, rel err vs bf16: output", ((res[mode][0] - res["off"][0]).norm() / res["off"][0].norm()).item(),
              "latent grad", ((res[mode][1] - res["off"][1]).norm() / res["off"][1].norm()).item(), "(CPU test bound 0.04)")
PY
tstep fp8_bench 240 python bench/bench_dit_fp8_gpu.py --tokens 5120 27280
# last: compiling every mode at two shapes takes minutes; the eager figures above are already logged
tstep fp8_bench_compiled 200 python bench/bench_dit_fp8_gpu.py --tokens 5120 27280 --no-model --compile --iters 5
fi
if want train; then
tstep train_bench 420 python bench/bench_train_gpu.py --cases 5120 27280
fi
exit $FAILED
