#!/usr/bin/env bash
# One prepared run for a GPU machine (H100/H200): the checks and timings that need a GPU, in one go.
#   bash bench/gpu_check.sh  [OUT_DIR]        (logs go to OUT_DIR, default outputs/gpu_check)
# 1. the DiT parity/backward tests with NCCL where >= 4 GPUs exist (else the single-GPU parts);
# 2. the fast paths on one GPU: Transformer Engine linears and flash-attn/TE attention vs the
#    local/torch paths (bf16), when those packages are installed;
# 3. the speed tests that need CUDA (cuDNN attention kernel; fused functions compiled for CUDA);
# 4. bench/bench_dit_block_gpu.py at 5,120 and 27,280 tokens, eager and compiled, with a kernel profile;
# 5. bench/bench_dit_full_gpu.py: the full 5B, megawan vs diffusers, compiled, forward + train step
#    (megawan with selective and FFN-only recomputation, diffusers with its full recomputation);
# 6. bench/bench_vae_decode_paths.py: VAE38 decode 121 x 704 x 1280, fp32 / bf16 / channels-last /
#    compiled vs diffusers, with errors against fp32;
# 7. the VAE decode memory benchmark at full width, one GPU.
# Not yet run: no session so far had a GPU machine. Wheels first (../shared/device/README.md):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:$PWD
# Each step has a time limit (about 10 minutes in all), logs its output, and the script carries on past
# a failing step, so one run says everything.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
step() { local name=$1; shift; echo "== $name: $*"; ( "$@" ) > "$OUT/$name.log" 2>&1; echo "== $name exit $?"; tail -n 15 "$OUT/$name.log"; }
# A step with a wall-clock limit (seconds) and a longer tail.
tstep() { local name=$1 limit=$2; shift 2; echo "== $name (limit ${limit}s): $*"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "== $name exit $?"; tail -n 40 "$OUT/$name.log"; }
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 4 ]; then
  step nccl_tests env MEGAWAN_TEST_BACKEND=nccl python -m pytest tests/test_dit_parity.py -q -x
fi
step fast_paths python - <<'PY'
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
for linear, attn in [("local", "cudnn"), ("local", "flash"), ("te", "torch"), ("te", "te")]:
    if (attn == "flash" and not _installed("flash_attn")) or ("te" in (linear, attn) and not _installed("transformer_engine")):
        print(linear, attn, "skipped: package missing"); continue
    m = WanDiT(cfg, groups, DiTRuntime(dtype=torch.bfloat16, linear_impl=linear, attention_backend=attn)).eval()
    missing = m.load_state_dict(ref.state_dict(), strict=False)
    with torch.no_grad():
        out = m(x, t, text)
    print(linear, attn, "rel diff vs local/torch bf16:", ((out - base).norm() / base.norm()).item(), missing)
PY
tstep speed_tests 120 python -m pytest tests/test_dit_speed.py -q -rs -k "cudnn or fused or logged or default"
tstep block_bench 150 python bench/bench_dit_block_gpu.py --tokens 5120 27280 --modes eager compiled --profile
tstep full_dit 300 python bench/bench_dit_full_gpu.py --modes compiled --recompute selective ffn --warmup 1 --iters 2
tstep vae_paths 120 python bench/bench_vae_decode_paths.py
tstep vae_decode 60 python bench/bench_vae_memory.py --frames 121 --height 704 --width 1280 --shards 1
