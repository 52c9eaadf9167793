"""The denoising loop and the generation pipeline: CFG, TI2V / world-model pinning, per-token timesteps,
determinism, TP2 x CP2 = single process, and bad requests refused before any denoising."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megawan.diffusion.solvers import flow_sigmas
from megawan.models.dit import WanDiT
from megawan.pipelines.pipeline import Request, WanSampler, check_request
from megawan.pipelines.sampling import SamplingConfig, denoise, initial_noise
from megawan.testing import run_distributed
from tests import _sampling_workers as workers
from tests.dit_fixtures import TINY, rel_err
from tests.sampling_fixtures import RT, STATE_DIM, tiny_dit, tiny_vae, write_release

FAST = SamplingConfig(steps=3)


class RecordingModel:
    """A stand-in DiT: v = 0.1 x + sum(text) (+ sum(states)); records each call's inputs."""

    def __init__(self, config=TINY):
        self.config = config
        self.calls = []

    def __call__(self, x, t, text, states=None):
        self.calls.append({"x": x.clone(), "t": t.clone(), "text": text.clone(), "states": states})
        v = 0.1 * x + text.sum(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return v if states is None else v + states.sum(dim=(1, 2)).view(-1, 1, 1, 1, 1)

    def eval(self):
        return self


def _text(n, seed):
    return torch.randn(1, n, TINY.text_dim, generator=torch.Generator().manual_seed(seed))


def test_guidance_pinning_and_timesteps_follow_the_release():
    """One Euler step by hand: CFG = uncond + g (cond - uncond); frame 0 pinned; frame-0 tokens at t = 0."""
    model = RecordingModel()
    noise = initial_noise((1, 48, 3, 4, 4), [0])
    cond = torch.randn(1, 48, 1, 4, 4)
    text, null = _text(5, 1), _text(2, 2)
    cfg = SamplingConfig(steps=2, solver="euler", guidance=4.0, cfg="sequential")
    out = denoise(model, noise, text, null, cond_latents=cond, config=cfg)
    sigmas, timesteps = flow_sigmas(2, 5.0)
    x = noise.clone()
    x[:, :, :1] = cond
    for i in range(2):
        c, u = model.calls[2 * i], model.calls[2 * i + 1]
        assert torch.equal(c["x"], x) and torch.equal(c["text"], text) and torch.equal(u["text"], null)
        per_frame = 2 * 2  # (4 / 2) x (4 / 2) tokens per latent frame
        assert torch.equal(c["t"][0, :per_frame], torch.zeros(per_frame))
        assert torch.equal(c["t"][0, per_frame:], torch.full((2 * per_frame,), timesteps[i].item()))
        v = (0.1 * x + null.sum()) + 4.0 * (text.sum() - null.sum())
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        x[:, :, :1] = cond
    assert torch.allclose(out, x, atol=1e-5, rtol=1e-6)


def test_cfg_batched_equals_sequential(device):
    model = tiny_dit()
    noise = initial_noise((2, 48, 3, 4, 6), [0, 1]).to(device)
    text = torch.cat([_text(7, 1), _text(7, 3)]).to(device)
    null = _text(3, 2).to(device)
    cond = torch.randn(2, 48, 1, 4, 6, generator=torch.Generator().manual_seed(4)).to(device)
    a = denoise(model, noise, text, null, cond_latents=cond, config=dataclasses.replace(FAST, cfg="batched"))
    b = denoise(model, noise, text, null, cond_latents=cond, config=dataclasses.replace(FAST, cfg="sequential"))
    assert rel_err(a, b) <= 1e-6
    # and guidance matters: g = 1 differs
    c = denoise(model, noise, text, null, cond_latents=cond, config=dataclasses.replace(FAST, guidance=1.0))
    assert rel_err(a, c) > 1e-3


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp("rel") / "Wan2.2-TI2V-5B", text=False)


@pytest.fixture(scope="module")
def world_release(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp("wm") / "world", state_dim=STATE_DIM, text=False)


def _image(h=64, w=96, seed=5):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_ti2v_first_latent_frame_is_the_image_latent_and_seed_decides(release, device):
    model = WanDiT.from_pretrained(release, runtime=RT)
    vae = tiny_vae().to(device)
    sampler = WanSampler(model, vae, __import__("megawan").parallel_state.get_groups(), FAST)
    req = Request(text=_text(4, 1)[0], image=_image(), frames=9, seed=11)
    null = _text(2, 2)[0]
    a = sampler.sample(req, null, progress=False).cpu()
    assert a.shape == (1, 48, 3, 4, 6)
    assert torch.equal(a[:, :, :1], vae.encode(req.image[None, :, None].to(device)).cpu())
    assert torch.equal(a, sampler.sample(req, null, progress=False).cpu())  # the same seed: the same latents
    other = sampler.sample(dataclasses.replace(req, seed=12), null, progress=False).cpu()
    assert torch.equal(other[:, :, :1], a[:, :, :1]) and rel_err(other, a) > 1e-2


def test_world_model_keeps_the_context_latents_and_uses_the_states(world_release, device):
    model = WanDiT.from_pretrained(world_release, runtime=RT)
    vae = tiny_vae().to(device)
    sampler = WanSampler(model, vae, __import__("megawan").parallel_state.get_groups(), FAST)
    g = torch.Generator().manual_seed(0)
    clip = torch.rand(3, 25, 32, 32, generator=g) * 2 - 1
    states = torch.randn(25, STATE_DIM, generator=g)
    req = Request(text=torch.zeros(0, TINY.text_dim), context=clip, states=states, frames=25, context_frames=17)
    a = sampler.sample(req, progress=False).cpu()
    ctx = vae.encode(clip[None, :, :17].to(device)).cpu()
    assert ctx.shape[2] == 5 and torch.equal(a[:, :, :5], ctx)
    b = sampler.sample(dataclasses.replace(req, states=states + 1), progress=False).cpu()
    assert rel_err(a[:, :, 5:], b[:, :, 5:]) > 1e-3


def test_tp2_cp2_sampling_equals_single_process(release, world_release):
    """Denoising over a TP2 x CP2 replica and the VAE decode sharded over its 4 ranks reproduce one process:
    TI2V with batched CFG, and a world-model rollout (5 clean latent frames, states; 7 latent frames of
    2 x 3 tokens = 42 tokens, padded to 44: each rank's 11 tokens cut through frames)."""
    null = _text(2, 2)[0]
    g = torch.Generator().manual_seed(9)
    world = Request(text=torch.zeros(0, TINY.text_dim), context=torch.rand(3, 17, 64, 96, generator=g) * 2 - 1,
                    states=torch.randn(25, STATE_DIM, generator=g), frames=25, context_frames=17, seed=4)
    jobs = [(release, [Request(text=_text(4, 1)[0], image=_image(), frames=9, seed=3)]), (world_release, [world])]
    single = workers.sample_layout(jobs, 1, 1, null, FAST)
    dist4 = run_distributed(workers.sample_layout, 4, jobs, 2, 2, null, FAST)
    for rank_out in dist4:  # every rank of the replica holds the same result
        for job, job1 in zip(rank_out, single):
            for (lat, frames), (lat1, frames1) in zip(job, job1):
                assert rel_err(lat, lat1) <= 1e-5
                assert (frames.int() - frames1.int()).abs().max() <= 1  # uint8 rounding of near-equal floats
    for j in range(2):
        assert torch.equal(dist4[0][j][0][0], dist4[3][j][0][0])


# ---- bad requests ------------------------------------------------------------------------------------------

def _req(**kw):
    base = dict(text=torch.zeros(0, TINY.text_dim), image=_image(), frames=9)
    base.update(kw)
    return Request(**base)


@pytest.mark.parametrize("kw,match", [
    (dict(image=_image(48, 64)), r"input is 48x64 \(HxW\); height and width must be multiples of 32"),
    (dict(frames=10), r"frames must be 4n \+ 1"),
    (dict(image=None, context=torch.zeros(3, 16, 32, 32), frames=25), r"context clip has 16 frames; at least 17"),
    (dict(text=torch.zeros(3, 7)), r"text must be \[<= 512, 64\]"),
    (dict(states=torch.zeros(9, STATE_DIM)), r"states were given but the model has no state conditioning"),
])
def test_bad_requests_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        check_request(_req(**kw), TINY)


def test_world_model_states_must_have_the_right_shape():
    cfg = dataclasses.replace(TINY, state_dim=STATE_DIM)
    ctx = torch.zeros(3, 17, 32, 32)
    with pytest.raises(ValueError, match=r"states must be \[frames, state_dim\] = \[25, 25\].*got \(24, 25\)"):
        check_request(_req(image=None, context=ctx, frames=25, states=torch.zeros(24, STATE_DIM)), cfg)
    with pytest.raises(ValueError, match=r"needs states \[25, 25\]"):
        check_request(_req(image=None, context=ctx, frames=25), cfg)


def test_sampler_checks_before_denoising():
    model = RecordingModel()
    sampler = WanSampler(model, tiny_vae(), None, FAST)
    with pytest.raises(ValueError, match="multiples of 32"):
        sampler.sample(_req(image=_image(40, 64)))
    assert model.calls == []


def test_progress_prints_steps_and_eta_on_rank0(capsys):
    from megawan.pipelines.sampling import Progress

    bar = Progress(10, "decode", every=3)
    for done in (1, 5, 9, 10):  # frame groups arrive 4 at a time after the first
        bar.update(done)
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[1] for ln in lines] == ["5/10", "9/10", "10/10"] and all("ETA" in ln for ln in lines)


def test_the_video_is_streamed_to_the_mp4_a_frame_group_at_a_time(tmp_path, monkeypatch):
    """write_video hands the encoder 1 frame, then groups of 4: the whole video is never assembled."""
    import megawan.pipelines.video_out as vo

    seen = []
    orig = vo.Mp4Writer.write
    monkeypatch.setattr(vo.Mp4Writer, "write", lambda self, frames: (seen.append(frames.shape[0]), orig(self, frames)))
    vae = tiny_vae()
    latents = torch.randn(1, 48, 4, 2, 3, generator=torch.Generator().manual_seed(0))
    info = vo.write_video(vae, latents, tmp_path / "v.mp4")
    assert seen == [1, 4, 4, 4] and info["frames"] == 13 and (info["height"], info["width"]) == (32, 48)
    whole = torch.cat([vo.to_uint8(f) for f in vo.decode_frames(vae, latents)])
    assert torch.equal(whole, vo.to_uint8(vae.decode(latents)[0]))
