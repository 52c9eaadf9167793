"""World-model state conditioning: zero at a released checkpoint, exact under TP x CP, per-frame grouping."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megawan.models.dit import DiTRuntime, WanDiT
from megawan.testing import run_distributed
from tests import _dit_workers as workers
from tests.dit_fixtures import TINY, make_case, make_diffusers_reference, rel_err

RT = DiTRuntime(linear_impl="local")
STATE_DIM = 25


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit") / "diffusers"
    make_diffusers_reference().save_pretrained(path)
    return path


def _states(case, seed=2):
    x = case[0]
    frames = 4 * (x.shape[2] - 1) + 1
    return torch.randn(x.shape[0], frames, STATE_DIM, generator=torch.Generator().manual_seed(seed)).to(x.device)


def _case(device, *args):
    return tuple(t.to(device) for t in make_case(*args))


def test_released_checkpoint_is_unchanged_by_zero_initialised_states(released, device):
    plain = WanDiT.from_pretrained(released, runtime=RT).eval()
    world = WanDiT.from_pretrained(released, runtime=RT, state_dim=STATE_DIM).eval()
    assert torch.count_nonzero(world.state_embedding.linear_2.weight) == 0
    case = _case(device, 3, 6, 8, True)
    with torch.no_grad():
        assert torch.equal(plain(*case), world(*case, states=_states(case)))


def test_states_reach_each_latent_frame_through_its_video_frames():
    emb = WanDiT(dataclasses.replace(TINY, state_dim=STATE_DIM), runtime=RT).state_embedding
    states = torch.arange(2 * 9 * STATE_DIM, dtype=torch.float32).view(2, 9, STATE_DIM)  # 3 latent frames
    grouped = emb.group_frames(states, 3)
    assert grouped.shape == (2, 3, 4 * STATE_DIM)
    assert torch.equal(grouped[:, 0], states[:, 0].repeat(1, 4))  # latent frame 0 <- video frame 0 alone
    assert torch.equal(grouped[:, 1], states[:, 1:5].flatten(1))
    assert torch.equal(grouped[:, 2], states[:, 5:9].flatten(1))


def _trained_world_model(path):
    """A state-conditioned checkpoint with a non-zero embedder, written in the official layout."""
    torch.manual_seed(0)
    model = WanDiT(dataclasses.replace(TINY, state_dim=STATE_DIM), runtime=RT)
    with torch.no_grad():
        for p in model.state_embedding.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(path, layout="official")
    return model


def test_states_change_the_output_and_round_trip_through_the_checkpoint(tmp_path, device):
    model = _trained_world_model(tmp_path / "wm").eval()
    again = WanDiT.from_pretrained(tmp_path / "wm", runtime=RT).eval()
    assert again.config.state_dim == STATE_DIM
    case = _case(device, 3, 6, 8, True)
    s = _states(case)
    with torch.no_grad():
        a, b = model(*case, states=s), again(*case, states=s)
        assert torch.equal(a, b)
        assert rel_err(model(*case, states=s + 1), a) > 1e-3
        # a sample's frame-f output depends on the states of frame f (tokens) through adaLN
        s2 = s.clone()
        s2[:, 5:9] += 1.0  # latent frame 2 only
        d = (model(*case, states=s2) - a).abs().amax(dim=(0, 1, 3, 4))
    assert d[2] > 0  # ... every frame may move through attention, but frame 2 certainly does


def test_tp2_cp2_with_states_matches_single_process(tmp_path, device):
    _trained_world_model(tmp_path / "wm")
    case = make_case(3, 6, 6, True)  # 27 tokens: padded at TP2 x CP2
    s = _states(case)
    weight = torch.randn(case[0].shape, generator=torch.Generator().manual_seed(5))
    per_rank = run_distributed(workers.backward_layouts, 4, tmp_path / "wm", case, weight, [(2, 2, True, False)], s)
    single = WanDiT.from_pretrained(tmp_path / "wm", runtime=RT)
    x = case[0].to(device).requires_grad_(True)
    ref = single(x, case[1].to(device), case[2].to(device), states=s.to(device))
    (ref * weight.to(device)).sum().backward()
    ref, x_grad_ref = ref.detach().cpu(), x.grad.cpu()
    one_grads = {n: p.grad.cpu() for n, p in single.named_parameters()}
    assert {"state_embedding.linear_1.weight", "state_embedding.linear_2.weight"} <= set(one_grads)
    for rank, results in enumerate(per_rank):  # every rank holds the whole output and every whole gradient
        out, x_grad, grads = results[(2, 2, True, False)]
        assert rel_err(out, ref) <= 1e-5, rank
        assert rel_err(x_grad, x_grad_ref) <= 1e-5, rank
        assert set(grads) == set(one_grads), rank
        for name, g in grads.items():
            assert rel_err(g, one_grads[name]) <= 1e-5, (rank, name, rel_err(g, one_grads[name]))


def test_bad_states_are_refused(released, device):
    plain = WanDiT.from_pretrained(released, runtime=RT)
    world = WanDiT.from_pretrained(released, runtime=RT, state_dim=STATE_DIM)
    case = _case(device, 3, 6, 8, True)
    with pytest.raises(ValueError, match="no state conditioning"):
        plain(*case, states=_states(case))
    with pytest.raises(ValueError, match=r"states must be \[B, T, state_dim\] = \[2, 9, 25\]"):
        world(*case, states=_states(case)[:, :8])
