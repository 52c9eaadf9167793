"""What reading the GPU code paths showed would break on CUDA / NCCL / Transformer Engine, checked on CPU.

Each test says what stands in for the GPU:
* "fake TE": tests/_fake_te.py, Transformer Engine's documented signatures, with megatron-core's own TE
  wrappers running on it unchanged, in spawned gloo ranks that report CUDA as available;
* "fake CUDA": ``torch.cuda`` queries monkeypatched to answer as a GPU node does;
* "GPU-side code on stand-ins": a backend built for a CUDA device, so megatron-core takes its GPU code
  paths, which run here on cpu_compat's CPU stand-ins (current device, RNG tracker).
The tests marked ``cuda`` run only on a GPU (``bench/gpu_check.sh quick`` runs them).
"""

from __future__ import annotations

import logging

import pytest
import torch

from megawan.layers import attention_kernels, linear
from megawan.layers.attention_kernels import AttentionKernel, resolve_backend
from megawan.testing import run_distributed
from tests import _te_call

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh quick)")


# ---- Transformer Engine linears (fake TE) ----------------------------------------------------------------

def test_auto_linear_impl_is_local_even_where_te_imports(monkeypatch):
    """docs/dit.md: TE is off unless selected. "auto" used to pick TE wherever it imported on CUDA (fake CUDA)."""
    monkeypatch.setattr(linear, "te_available", lambda: True)
    assert linear.resolve_linear_impl("auto") == "local"
    assert linear.resolve_linear_impl("te") == "te"


@pytest.fixture(scope="module")
def te_rank():
    """One gloo rank building TE's linears through megatron's wrappers over the fake TE."""
    return run_distributed(_te_call.call, 1, "te_single_rank", timeout_s=300, fresh=True)[0]


def test_te_linears_build_including_the_replicated_text_projections(te_rank):
    """The cross-attention k / v on the replicated text are TELinear(parallel_mode="duplicated"): megatron
    asserts tp_group is None for that mode (it failed at model build)."""
    assert te_rank["layers"] == ["TEColumnParallelLinear", "TELinear", "TERowParallelLinear"]


def test_ffn_recompute_under_te_fp8_recomputes_under_the_same_fp8_state(te_rank):
    """recompute "ffn" in a te-* mode goes through TE's checkpoint, which recomputes under the forward's
    FP8 state: output and every gradient equal the run without recomputation. torch's checkpoint
    recomputed in backward, outside fp8_autocast (here: other saved tensors, a CheckpointError)."""
    assert te_rank["te_checkpoint_calls_ffn"] == 1 and te_rank["te_checkpoint_calls_None"] == 0
    (out, gx, grads), (out_r, gx_r, grads_r) = te_rank["no_recompute"], te_rank["ffn_recompute"]
    torch.testing.assert_close(out_r, out, rtol=0, atol=0)
    torch.testing.assert_close(gx_r, gx, rtol=1e-6, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], rtol=1e-6, atol=1e-12, msg=name)
    # FP8 does change the values (the fake rounds GEMM operands through e4m3): the check above is not empty
    off_out, off_gx, _ = te_rank["fp8_off"]
    assert (off_out - out).norm() / out.norm() > 1e-3


def test_compiled_blocks_with_te_modules_are_refused_and_off_by_default(te_rank):
    """TE's forwards break dynamo's graph: compile_blocks=True with TE is an error naming why, and the
    default on a GPU is not to compile such blocks (it stays on for local linears)."""
    assert "TE's forwards break torch.compile's graph" in te_rank["compile_true"]
    assert te_rank["compile_default_on_gpu"] is False
    assert te_rank["compile_default_local_on_gpu"] is True


# ---- initialisation identical in every layout, on every device ---------------------------------------------

def test_initialisation_is_the_same_in_every_layout_on_the_gpu_path():
    """Issue 18: off CPU each TP shard was initialised on its own (megatron's GPU init, per-TP-rank RNG
    streams), so the weights (and their variance) changed with TP. GPU-side code on stand-ins for the
    local linears, fake TE for TE's: the TP2 blocks gathered equal the TP1 CPU block exactly."""
    for rank in run_distributed(_te_call.call, 2, "init_in_every_layout", 2, timeout_s=300, fresh=True):
        ref = rank["reference"]
        for layout in ("gpu_local", "te"):
            assert isinstance(rank[layout], dict), (layout, rank[layout])  # else: the build's error
            assert rank[layout].keys() == ref.keys(), layout
            for name, t in ref.items():
                assert torch.equal(rank[layout][name], t), (layout, name)


def test_seeded_build_is_one_model_and_leaves_the_callers_rng_alone():
    from megawan.models.dit import DiTRuntime, WanDiT, WanDiTConfig

    cfg, rt = WanDiTConfig.preset("tiny"), DiTRuntime(linear_impl="local", compile_blocks=False)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = dict(WanDiT(cfg, runtime=rt, seed=7).named_parameters())
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(7)
    b = dict(WanDiT(cfg, runtime=rt).named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- attention kernel selection (fake CUDA) ----------------------------------------------------------------

def _fake_hopper(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3 (fake)")
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91900)
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)


def test_auto_attention_lets_sdpa_choose_on_a_gpu(monkeypatch, caplog):
    """"auto" used to pin cuDNN attention on CUDA with bf16, bypassing torch's own guard (and failing
    at head_dim 12). Fake CUDA: it resolves to SDPA's dispatch, and says so in the log."""
    _fake_hopper(monkeypatch)
    with caplog.at_level(logging.INFO, logger="megawan"):
        assert resolve_backend("auto", torch.device("cuda", 0), torch.bfloat16) == "torch"
    assert "SDPA chooses its kernel" in caplog.text
    assert resolve_backend("cudnn", torch.device("cuda", 0), torch.bfloat16) == "cudnn"  # asked for: kept
    q = torch.randn(8, 1, 2, 12, dtype=torch.bfloat16)
    torch.testing.assert_close(attention_kernels.attention(q, q, q, "auto"), attention_kernels.attention(q, q, q, "torch"))


def test_cudnn_attention_refuses_head_dims_it_cannot_take():
    """cuDNN attention needs head_dim % 8 == 0: refused when the kernel is built, naming the head_dim."""
    with pytest.raises(ValueError, match="multiple of 8, this model's is 12"):
        AttentionKernel("cudnn", 2, 12)
    assert AttentionKernel("cudnn", 2, 128).head_dim == 128


@cuda
@pytest.mark.parametrize("tokens,head_dim", [(27280, 128), (5120, 64), (1000, 128)])
def test_cudnn_attention_matches_the_math_kernel_forward_and_backward(tokens, head_dim):
    """The proof a cuDNN choice needs: bf16 cuDNN attention against the fp32 math kernel on the same
    bf16 inputs, forward and all three input gradients, at lengths that are not multiples of 128
    (27,280 = 121 x 704 x 1280 video) and at one that is. One head keeps the math kernel's L x L
    scores within memory. Bound 1e-2 relative: bf16 rounding of the output and of the gradients."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(tokens, 1, 1, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    dout = torch.randn(tokens, 1, 1, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)

    def run(dtype, kernel):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        if kernel == "cudnn":
            out = attention_kernels.attention(*leaves, "cudnn")
        else:
            with sdpa_kernel(SDPBackend.MATH):
                out = attention_kernels.attention(*leaves, "torch")
        out.backward(dout.to(dtype))
        return [out.float()] + [t.grad.float() for t in leaves]

    for name, got, want in zip(("out", "dq", "dk", "dv"), run(torch.bfloat16, "cudnn"), run(torch.float32, "math")):
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-2, (name, tokens, head_dim, err)


# ---- from_pretrained: one source for the dtype ------------------------------------------------------------

def test_from_pretrained_takes_the_dtype_from_one_place(tmp_path):
    from megawan.models.dit import DiTRuntime, WanDiT, WanDiTConfig

    rt = DiTRuntime(linear_impl="local", compile_blocks=False)
    torch.manual_seed(0)
    WanDiT(WanDiTConfig.preset("tiny"), runtime=rt).save_pretrained(tmp_path / "ckpt")
    bf16 = WanDiT.from_pretrained(tmp_path / "ckpt", runtime=DiTRuntime(dtype=torch.bfloat16, linear_impl="local",
                                                                         compile_blocks=False))
    assert bf16.blocks[0].ffn.fc1.weight.dtype == torch.bfloat16  # was float32: the argument's default won
    with pytest.raises(ValueError, match=r"dtype=torch.float32\) disagrees with runtime.dtype=torch.bfloat16"):
        WanDiT.from_pretrained(tmp_path / "ckpt", dtype=torch.float32,
                               runtime=DiTRuntime(dtype=torch.bfloat16, linear_impl="local"))
    assert WanDiT.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16).runtime.dtype == torch.bfloat16
    # dtype= sets the dtype of a runtime that did not set its own (README's usage)
    assert WanDiT.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16,
                                  runtime=rt).blocks[0].ffn.fc1.weight.dtype == torch.bfloat16


# ---- precompute over NCCL ----------------------------------------------------------------------------------

def _precompute_on_an_nccl_vae_group(argv):
    """A rank of ``precompute --vae-shards 2`` whose VAE group behaves as NCCL does for the collectives
    precompute itself issues (all_reduce / broadcast): a CPU tensor is refused. The VAE's own
    collectives (all_gather, P2P) carry tensors on the compute device in a real run and are left alone."""
    import torch.distributed as dist

    from megawan.tools.precompute import main

    def nccl_rule(fn):
        def call(tensor, *args, **kwargs):
            if tensor.device.type == "cpu" and dist.get_world_size(kwargs.get("group")) == 2:
                raise RuntimeError(f"NCCL: {fn.__name__} of a CPU tensor (no CUDA tensor given)")
            return fn(tensor, *args, **kwargs)
        return call

    dist.all_reduce, dist.broadcast = nccl_rule(dist.all_reduce), nccl_rule(dist.broadcast)
    main(argv)


def test_precompute_agrees_on_its_work_without_a_cpu_tensor_collective(tmp_path):
    """precompute all-reduced a CPU flag tensor over the VAE group: NCCL refuses it. The stand-in NCCL rule
    above refuses it too; the to-do agreement is now an object collective, staged by torch on the
    backend's device."""
    from tests.test_precompute import _cli_args
    from megawan.data.text_encoder import save_tiny_umt5
    from megawan.tools.make_sample_data import make_sample_data
    from megawan.vae.model import WanVAE38, WanVAE38Config

    make_sample_data(tmp_path / "data", train_shards=1, val_shards=0, frames_per_shard=40, size=32, gop=8,
                     min_segment=20, max_segment=40, captioned_videos=0, workers=1)
    torch.manual_seed(0)
    WanVAE38(WanVAE38Config.tiny()).eval().save_pretrained(tmp_path / "vae")
    save_tiny_umt5(tmp_path / "umt5")
    argv = _cli_args(tmp_path) + ["--out", str(tmp_path / "cache"), "--vae-shards", "2", "--max-samples", "3"]
    run_distributed(_precompute_on_an_nccl_vae_group, 2, argv, timeout_s=300)
    assert (tmp_path / "cache" / "index.json").exists()


# ---- cpu_compat scoped to megatron-core; NVDEC sees the real GPU (fake CUDA, fake PyNvVideoCodec) -----------

def _fake_nvcodec():
    """PyNvVideoCodec's SimpleDecoder signature; like the real (pybind) one it takes an int gpu_id."""
    import sys
    import types

    opened = []

    class SimpleDecoder:
        def __init__(self, path, gpu_id=0, use_device_memory=True, output_color_type=None):
            if not isinstance(gpu_id, int):
                raise TypeError(f"incompatible function arguments: gpu_id={gpu_id!r}")
            opened.append(gpu_id)

        def __len__(self):
            return 10

    sys.modules["PyNvVideoCodec"] = types.SimpleNamespace(
        SimpleDecoder=SimpleDecoder, OutputColorType=types.SimpleNamespace(RGB="rgb"))
    return opened


def _gloo_rank_on_a_gpu_node():
    """A gloo rank on a GPU node whose own GPU is cuda:1; megatron's SP gather must still run on CPU."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    from megawan import parallel_state
    from megawan.data.bad_input import BadInputError
    from megawan.data.decoders.nvcodec_reader import NvCodecReader

    torch.cuda.is_available = lambda: True
    real_current_device = torch.cuda.current_device = lambda: 1  # what torch answers on this rank
    opened = _fake_nvcodec()
    groups = parallel_state.initialize(tp=2, num_heads=None, backend="gloo")
    gathered = gather_from_sequence_parallel_region(torch.ones(2, 3), group=groups.tp_group)
    try:
        NvCodecReader("clip.mp4")
        reader = "opened"
    except BadInputError as e:
        reader = str(e)
    return {"device": str(groups.device), "gathered": gathered.device.type, "reader": reader, "gpu_ids": opened,
            "current_device_is_real": torch.cuda.current_device is real_current_device}


def test_cpu_stand_ins_stay_inside_megatron_and_nvdec_sees_the_real_gpu(monkeypatch):
    """cpu_compat replaced torch.cuda.current_device process-wide: NVDEC then got a CPU device as its GPU
    id and, with bad_input=skip, every video counted as unreadable. The stand-ins now reach megatron-core
    only (its modules see a view of torch), and megatron's gather still runs on CPU."""
    monkeypatch.setenv("MEGAWAN_TEST_BACKEND", "gloo")
    for rank in run_distributed(_gloo_rank_on_a_gpu_node, 2, timeout_s=300):
        assert rank["device"] == "cpu" and rank["gathered"] == "cpu"
        assert rank["current_device_is_real"]
        assert rank["reader"] == "opened" and rank["gpu_ids"] == [1], rank


# ---- NVDEC in loader workers (fake CUDA) --------------------------------------------------------------------

class _GpuDecodedClips(torch.utils.data.Dataset):
    backend = "pynvvideocodec"

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"video": torch.zeros(2, 3)}


def test_gpu_decoding_workers_use_this_ranks_gpu(monkeypatch):
    """Spawned loader workers start on cuda:0: every rank decoded there. Fake CUDA (this rank's GPU is
    cuda:3): each worker first sets the rank's device."""
    from megawan.data.loader import ClipLoader
    from megawan.data.sampler import DistributedClipSampler

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    set_to = []
    monkeypatch.setattr(torch.cuda, "set_device", set_to.append)
    loader = ClipLoader(_GpuDecodedClips(), DistributedClipSampler(4, dp_rank=0, dp_size=1, seed=0), batch_size=2,
                        num_workers=1)
    assert loader.loader.multiprocessing_context.get_start_method() == "spawn"
    loader.loader.worker_init_fn(0)
    assert set_to == [torch.device("cuda", 3)]
    explicit = ClipLoader(_GpuDecodedClips(), DistributedClipSampler(4, dp_rank=0, dp_size=1, seed=0), batch_size=2,
                          num_workers=1, decode_device=torch.device("cuda", 5))
    explicit.loader.worker_init_fn(0)
    assert set_to[-1] == torch.device("cuda", 5)


class _OnGpu(torch.Tensor):
    """A tensor that says it is on a GPU (fake CUDA); ``.cpu()`` gives the plain tensor."""

    @property
    def is_cuda(self):
        return True

    def cpu(self):
        return self.as_subclass(torch.Tensor)


def test_only_cpu_tensors_leave_a_loader_worker(monkeypatch):
    """GPU-decoded frames used to travel through the DataLoader's queues as CUDA tensors."""
    from megawan.data.loader import collate_samples

    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # inside a worker
    batch = collate_samples([{"video": torch.ones(2, 3).as_subclass(_OnGpu), "index": i} for i in range(2)])
    assert type(batch["video"]) is torch.Tensor and not batch["video"].is_cuda
    assert batch["video"].shape == (2, 2, 3)


# ---- versions the patches are written for -------------------------------------------------------------------

def test_setup_pins_the_versions_the_patches_are_written_for():
    import re
    from pathlib import Path

    from megawan import compat

    setup = (Path(__file__).parents[1] / "setup.py").read_text()
    for package, version in compat.WRITTEN_FOR.items():
        assert re.search(rf'"{package}=={re.escape(version)}"', setup), package
        assert compat.installed_version(package) == version, package  # what this suite ran against


def test_a_patch_that_no_longer_applies_fails_loudly(monkeypatch):
    """megatron-core / torchao moving a private name used to make a patch silently set a new, unused
    attribute (or fail much later): now the patch refuses (megawan.compat.PatchError, a RuntimeError),
    naming the version it was written for."""
    from megatron.core.tensor_parallel import layers as mlayers
    from megatron.core.tensor_parallel import random as mcore_random
    from torchao.float8 import float8_utils

    from megawan.layers import compile_compat, fp8
    from megawan.parallel_state import cpu_compat

    for name in ("current_device", "current_stream", "default_stream", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, getattr(torch.cuda, name))  # restored afterwards, whatever happens
    monkeypatch.setattr(cpu_compat, "_APPLIED", False)
    monkeypatch.delattr(mcore_random, "initialize_rng_tracker")
    with pytest.raises(RuntimeError, match="initialize_rng_tracker is missing in megatron-core"):
        cpu_compat.apply()

    monkeypatch.setattr(compile_compat, "_INSTALLED", False)
    monkeypatch.delattr(mlayers, "get_tensor_model_parallel_group_if_none")
    with pytest.raises(RuntimeError, match="get_tensor_model_parallel_group_if_none is missing in "
                                           r"megatron-core .*written for megatron-core 0\.16\.1"):
        compile_compat.install()

    def tensor_to_scale(hp_tensor, float8_dtype, granularity=None):  # a renamed keyword
        raise AssertionError("not called")

    monkeypatch.setattr(float8_utils, "tensor_to_scale", tensor_to_scale)
    with pytest.raises(RuntimeError, match="has no parameter scaling_granularity.*torchao 0.18.0"):
        fp8.check_mode("native-tensorwise", "local", "torch", False)


# ---- the memory check keeps room for what the model estimate leaves out (fake CUDA device) ------------------

def test_memory_check_keeps_a_reserve_for_context_nccl_and_the_vae(monkeypatch, caplog):
    """The check compared the model's estimate with the whole device. A layout whose estimate leaves
    0.5 GiB free on an 80 GB GPU is now refused, naming the reserve (CUDA context, NCCL, fragmentation,
    the on-the-fly VAE); the figures are stated in megawan/training/budget.py."""
    import re

    from megawan.training import trainer
    from megawan.training.config import load_config

    cfg = load_config("ti2v5b_1x", {"model": {"init": None, "dit": "wan2.2-ti2v-5b"},
                                    "data": {"source": "1x", "size": [512, 512], "vae": "/released/Wan2.2_VAE.pth"}})
    dit = trainer.model_config(cfg)
    monkeypatch.setattr(trainer, "device_capacity_bytes", lambda device: 10 * 2**40)
    with caplog.at_level(logging.INFO, logger=trainer.logger.name):
        trainer.check_memory(cfg, dit, 8, torch.device("cpu"))
    estimate = float(re.search(r"memory estimate per rank: ([\d.]+) GiB", caplog.text).group(1))
    monkeypatch.setattr(trainer, "device_capacity_bytes", lambda device: (estimate + 0.5) * 2**30)
    with pytest.raises(trainer.MemoryBudgetError, match=r"reserve of [\d.]+ GiB \(cuda context 1\.0, nccl 0\.8, "
                                                        r"fragmentation [\d.]+, vae [\d.]+ GiB\)"):
        trainer.check_memory(cfg, dit, 8, torch.device("cuda"))
    # the released VAE's 704,688,668 fp32 weights alone are 2.6 GiB of the reserve
    assert trainer.memory_reserve(cfg, 8, torch.device("cpu"), 80e9).vae > 704_688_668 * 4


# ---- megatron's DDP and optimizer reduce over megawan's groups ---------------------------------------------

def _ddp_over_megawan_groups():
    """Two DP ranks; each also wraps a model built on ``ParallelGroups.single_rank`` (this rank alone)."""
    import torch.distributed as dist

    from megawan import parallel_state
    from megawan.models.dit import DiTRuntime, WanDiT, WanDiTConfig
    from megawan.training.config import OptimSection
    from megawan.training.optim import build_optimizer, finish_grad_sync, wrap_ddp

    groups = parallel_state.initialize(tp=1, num_heads=None, backend="gloo")
    sizes = {}
    for name, g in (("layout", groups), ("single", parallel_state.ParallelGroups.single_rank(groups.device))):
        torch.manual_seed(0)
        model = WanDiT(WanDiTConfig.preset("tiny"), g, DiTRuntime(linear_impl="local", compile_blocks=False))
        ddp = wrap_ddp(model, g)
        optimizer, _ = build_optimizer(ddp, OptimSection(), g, total_steps=10)
        # a gradient that differs per rank: a lone rank's model must keep its own, untouched
        ddp.zero_grad_buffer()
        for p in model.parameters():
            p.main_grad.fill_(float(dist.get_rank() + 1))
        finish_grad_sync(ddp, g)
        inner = optimizer.chained_optimizers  # megatron's ChainedOptimizer: one per param-group kind
        sizes[name] = {"ddp": ddp.dp_cp_group.size(), "opt": {o.grad_stats_parallel_group.size() for o in inner},
                       "grad": next(model.parameters()).main_grad.flatten()[0].item()}
    return sizes


def test_megatron_ddp_and_optimizer_use_megawans_groups():
    """wrap_ddp / build_optimizer let megatron read its global groups: a model on other groups (here one
    rank inside a 2-rank job) had its gradients averaged with the other rank's. megawan's groups now go
    in as megatron-core 0.16.1's pg_collection (its checkpoint helpers take none: see docs/training.md)."""
    for rank, sizes in enumerate(run_distributed(_ddp_over_megawan_groups, 2, timeout_s=300)):
        assert sizes["layout"]["ddp"] == 2 and sizes["layout"]["opt"] == {2}, sizes
        assert sizes["single"] == {"ddp": 1, "opt": {1}, "grad": float(rank + 1)}, sizes


# ---- single-process tests put their inputs where the model is (static check) --------------------------------

_BUILDERS = {"WanDiT", "from_pretrained", "tiny_dit", "WanBlock"}
_INPUTS = {"make_case", "randn", "_block_case", "initial_noise", "_text"}


def _default_device_builds(fn) -> bool:
    """Whether ``fn`` builds a model on the default groups (``get_groups()``: cuda:0 on a GPU node)."""
    import ast

    for node in ast.walk(fn):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name not in _BUILDERS:
            continue
        groups_given = any(k.arg == "groups" for k in node.keywords) or (name == "WanDiT" and len(node.args) >= 2)
        if not groups_given:
            return True
    return False


def _model_names(fn) -> set:
    """Names bound to a built model in ``fn`` (``model = WanDiT(...)``, ``x = tiny_dit().eval()``, ...)."""
    import ast

    names = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and _default_device_builds(node):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def test_single_process_tests_take_the_device_fixture():
    """On a GPU node single-process models live on cuda:0 and CPU inputs are refused: test_budget,
    test_dit_speed, test_dit_states and the sampling CFG test passed CPU inputs. Every function of the
    suite that builds a model on the default groups and makes inputs for it takes ``device`` (the
    conftest fixture) or runs it through ``tests.dit_fixtures.model_output``."""
    import ast
    from pathlib import Path

    offenders = []
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef) or not _default_device_builds(fn):
                continue
            calls = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
                     for n in ast.walk(fn) if isinstance(n, ast.Call)}
            params = {a.arg for a in fn.args.args}
            runs = {"sample", "denoise"} & calls or any(
                isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _model_names(fn)
                for n in ast.walk(fn))
            if runs and calls & _INPUTS and "device" not in params and "model_output" not in calls:
                offenders.append(f"{path.name}::{fn.name}")
    assert not offenders, offenders


# ---- bench/gpu_check.sh quick: its CPU dry run, and the benches' compile / seed discipline ------------------

def test_gpu_check_quick_dry_run_passes_and_writes_the_table(tmp_path):
    """The quick stage's steps on CPU at tiny sizes (tests collected, not run): every step exits 0 and the
    one table holds a row from each step, none marked as not measured."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", "bench/gpu_check.sh", "quick", str(tmp_path / "out")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    table = (tmp_path / "out" / "quick_table.md").read_text()
    assert "not measured" not in table, table
    for row in ("tests collected", "block eager, 16 tokens", "train step, 12 tokens", "FP8 block native-rowwise"):
        assert row in table, (row, table)
    # a GPU run without its JSON (a step that failed) says so instead of showing a figure
    (tmp_path / "out" / "train.json").unlink()
    from bench.quick_table import main as quick_table

    assert "not measured: the step failed or ran out of time (see quick_train.log)" in quick_table([str(tmp_path / "out")])
    # only the quick stage has a dry run
    refused = subprocess.run(["bash", "bench/gpu_check.sh", "tests", str(tmp_path / "x")], cwd=root, env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "only the quick stage has a CPU dry run" in refused.stderr


def test_block_benches_compile_afresh_for_each_size_and_seed_through_the_model(monkeypatch):
    """The block and FP8 benches reset dynamo once per mode, so their second size ran a dynamic-shape
    recompile; and they seeded with torch.manual_seed, which on CUDA left megatron's RNG tracker out (other
    weights per mode). Now: one dynamo reset per (mode, size), and the model's own seeded initialisation."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    resets, seeds = [], []
    for name, argv in (("bench_dit_block_gpu", ["--modes", "compiled", "compiled-bf16-stream"]),
                       ("bench_dit_fp8_gpu", ["--compile", "--no-model", "--text-dim", "32",
                                              "--modes", "off", "native-tensorwise"])):
        spec = importlib.util.spec_from_file_location(name, root / "bench" / f"{name}.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        real_wandit = bench.WanDiT

        def wandit(*args, seed=None, **kw):
            seeds.append(seed)
            return real_wandit(*args, **kw) if seed is None else real_wandit(*args, seed=seed, **kw)

        monkeypatch.setattr(bench, "WanDiT", wandit)
        monkeypatch.setattr(bench, "compile_blocks", lambda blocks: None)  # the reset discipline, not inductor
        monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(name))
        bench.main(["--cpu-smoke", "--dim", "64", "--heads", "4", "--ffn-dim", "128", "--tokens", "16", "24",
                    "--warmup", "0", "--iters", "1"] + argv)
    assert resets.count("bench_dit_block_gpu") == 4 and resets.count("bench_dit_fp8_gpu") == 4, resets
    assert seeds == [0, 0, 0], seeds
