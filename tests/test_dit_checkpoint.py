"""Checkpoint layouts: official == diffusers, bit-exact round trips, TP-sliced loading, clear errors."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megawan.checkpoint.safetensors_dir import CheckpointError
from megawan.models.dit import DiTRuntime, WanDiT
from megawan.models.dit_config import WanDiTConfig
from megawan.testing import run_distributed
from megawan.tools.convert_checkpoint import convert
from tests.dit_fixtures import make_case, make_diffusers_reference, model_output

RT = DiTRuntime(linear_impl="local")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    make_diffusers_reference().save_pretrained(root / "diffusers")
    # official layout, written by the converter, in 3 shards like the release
    convert(root / "diffusers", root / "official", to="official", max_shard_bytes=4 * 2**20)
    return root


def _state(path):
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_official_and_diffusers_loads_are_identical(ckpts):
    assert len(list((ckpts / "official").glob("*.safetensors"))) >= 3
    index = json.loads((ckpts / "official" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert "blocks.0.self_attn.norm_q.weight" in index["weight_map"] and "head.head.weight" in index["weight_map"]
    a = WanDiT.from_pretrained(ckpts / "official", runtime=RT)
    b = WanDiT.from_pretrained(ckpts / "diffusers", runtime=RT)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na
    x, t, text = make_case(3, 6, 8, True)
    assert torch.equal(model_output(a, (x, t, text)), model_output(b, (x, t, text)))


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_export_import_round_trip_is_bit_exact(ckpts, tmp_path, layout):
    model = WanDiT.from_pretrained(ckpts / "diffusers", runtime=RT)
    model.save_pretrained(tmp_path / layout, layout=layout)
    src = _state(ckpts / ("diffusers" if layout == "diffusers" else "official"))
    out = _state(tmp_path / layout)
    assert set(src) == set(out)
    assert all(torch.equal(src[k], out[k]) for k in src)
    again = WanDiT.from_pretrained(tmp_path / layout, runtime=RT)
    for (n, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n


def test_converter_round_trip_and_bf16(ckpts, tmp_path):
    convert(ckpts / "official", tmp_path / "back", to="diffusers")
    a, b = _state(ckpts / "diffusers"), _state(tmp_path / "back")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    convert(ckpts / "official", tmp_path / "bf16", to="official", dtype="bf16")
    m = WanDiT.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16, runtime=RT)
    ref = _state(ckpts / "official")["blocks.0.cross_attn.q.weight"].to(torch.bfloat16)
    assert torch.equal(m.blocks[0].cross_attn.q.weight.cpu(), ref)  # the model sits on GPU 0 on a GPU node


def _load_tp_slices(path):
    from megawan import parallel_state

    groups = parallel_state.initialize(2, 1)
    m = WanDiT.from_pretrained(path, groups=groups, runtime=RT)
    return groups.tp_rank, {n: p.detach().clone() for n, p in m.named_parameters()}


def test_each_tp_rank_reads_its_slice(ckpts):
    full = _state(ckpts / "official")
    results = run_distributed(_load_tp_slices, 2, ckpts / "official")
    for rank, params in results:
        qkv = params["blocks.0.self_attn.qkv.weight"]  # fused column-parallel: [q_r; k_r; v_r]
        assert torch.equal(qkv, torch.cat([full[f"blocks.0.self_attn.{p}.weight"].chunk(2, 0)[rank] for p in "qkv"]))
        q = params["blocks.0.cross_attn.q.weight"]  # column-parallel: rows split
        assert torch.equal(q, full["blocks.0.cross_attn.q.weight"].chunk(2, 0)[rank])
        o = params["blocks.0.self_attn.o.weight"]  # row-parallel: columns split
        assert torch.equal(o, full["blocks.0.self_attn.o.weight"].chunk(2, 1)[rank])
        nq = params["blocks.0.self_attn.norm_q.weight"]  # q/k norm weight follows q's split
        assert torch.equal(nq, full["blocks.0.self_attn.norm_q.weight"].chunk(2, 0)[rank])
        assert torch.equal(params["blocks.0.ffn.fc2.bias"], full["blocks.0.ffn.2.bias"])  # replicated


def test_truncated_shard_is_reported(ckpts, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpts / "official", bad)
    shard = sorted(bad.glob("*-00002-of-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        WanDiT.from_pretrained(bad, runtime=RT)


def test_missing_shard_is_reported(ckpts, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpts / "official", bad)
    shard = sorted(bad.glob("*-00001-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        WanDiT.from_pretrained(bad, runtime=RT)


def test_wrong_shape_is_reported(ckpts, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpts / "diffusers", bad)
    f = bad / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    state["blocks.1.attn2.to_k.weight"] = state["blocks.1.attn2.to_k.weight"][:, :-4].contiguous()
    save_file(state, f)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn2\.to_k\.weight.*shape"):
        WanDiT.from_pretrained(bad, runtime=RT)


def test_missing_and_unexpected_keys_are_reported(ckpts, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpts / "diffusers", bad)
    f = bad / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    state["blocks.0.extra.weight"] = state.pop("blocks.0.norm2.bias")
    save_file(state, f)
    with pytest.raises(CheckpointError, match=r"missing keys \[blocks\.0\.norm2\.bias\].*blocks\.0\.extra\.weight"):
        WanDiT.from_pretrained(bad, runtime=RT)


def test_save_refuses_to_overwrite(ckpts):
    model = WanDiT.from_pretrained(ckpts / "diffusers", runtime=RT)
    with pytest.raises(FileExistsError):
        model.save_pretrained(ckpts / "diffusers", layout="diffusers")


def test_official_key_names_are_the_released_ones():
    """The released TI2V-5B checkpoint has 27 keys per block + 15 others (825 at 30 blocks)."""
    from megawan.checkpoint.dit_keys import diffusers_to_official, official_keys, official_to_diffusers
    from tests.dit_fixtures import TINY

    model = WanDiT(TINY, runtime=RT)
    keys = {k for n, _ in model.named_parameters() for k in official_keys(n)}
    block = {k[len("blocks.0."):] for k in keys if k.startswith("blocks.0.")}
    released_block = ({"modulation", "norm3.weight", "norm3.bias", "ffn.0.weight", "ffn.0.bias", "ffn.2.weight",
                       "ffn.2.bias"}
                      | {f"{a}.{p}.{w}" for a in ("self_attn", "cross_attn") for p in "qkvo" for w in ("weight", "bias")}
                      | {f"{a}.norm_{p}.weight" for a in ("self_attn", "cross_attn") for p in "qk"})
    assert block == released_block and len(block) == 27
    top = {k for k in keys if not k.startswith("blocks.")}
    assert top == {"patch_embedding.weight", "patch_embedding.bias", "head.head.weight", "head.head.bias",
                   "head.modulation", "time_projection.1.weight", "time_projection.1.bias"} | {
        f"{m}.{i}.{w}" for m in ("text_embedding", "time_embedding") for i in (0, 2) for w in ("weight", "bias")}
    assert len(keys) == 27 * TINY.num_layers + 15
    assert all(diffusers_to_official(official_to_diffusers(k)) == k for k in keys)


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_save_from_tp2_gathers_every_slice(ckpts, tmp_path, layout):
    """TP > 1 saving: each split tensor is all-gathered over TP and only rank 0 writes, after which
    every rank passes the barrier. The written files must equal the source, bit for bit."""
    from tests import _dit_workers as workers

    tp_ranks = run_distributed(workers.save_from_layout, 4, ckpts / "diffusers", tmp_path / layout, 2, 2, layout)
    assert sorted(tp_ranks) == [0, 0, 1, 1]
    assert len(list((tmp_path / layout).glob("*.safetensors"))) >= 2  # max_shard_bytes=1 MiB: sharded
    src, out = _state(ckpts / layout), _state(tmp_path / layout)
    assert set(out) == set(src)
    for k in src:
        assert out[k].shape == src[k].shape and torch.equal(out[k], src[k]), k
    assert WanDiTConfig.load(tmp_path / layout) == WanDiTConfig.load(ckpts / layout)


# (layout, key, a value the released TI2V-5B does not have)
UNSUPPORTED_RELEASE_VALUES = [
    ("official", "qk_norm", False), ("official", "cross_attn_norm", False), ("official", "window_size", [256, 256]),
    ("diffusers", "qk_norm", "rms_norm"), ("diffusers", "qk_norm", None), ("diffusers", "cross_attn_norm", False),
    ("diffusers", "image_dim", 1280), ("diffusers", "added_kv_proj_dim", 5120),
    ("diffusers", "pos_embed_seq_len", 514),
]


@pytest.mark.parametrize("layout, key, value", UNSUPPORTED_RELEASE_VALUES)
def test_release_config_with_other_behaviour_is_refused(ckpts, tmp_path, layout, key, value):
    config = json.loads((ckpts / layout / "config.json").read_text())
    assert WanDiTConfig.load(ckpts / layout).dim == 288  # the written (released) values load
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(f"config.json: {key}={value!r} is not supported")):
        WanDiTConfig.load(tmp_path)
