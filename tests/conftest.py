import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# On a GPU node, cuDNN would run fp32 convolutions in TF32 by default: the fp32 tolerances (1e-5) assume exact fp32.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the single-process tests' models live: ``parallel_state.get_groups().device`` (cuda:0 on a GPU
    node, the CPU elsewhere). Every test that runs a single-process model takes this fixture, builds its
    inputs there and brings results back to the CPU to compare (tests/test_gpu_first_contact.py checks
    that each such test module uses it). A test that measures with the CPU profiler builds on the CPU."""
    from megawan import parallel_state

    return parallel_state.get_groups().device


@pytest.fixture(scope="session")
def sample_1x(tmp_path_factory):
    """The default sample data (training and held-out 1X splits) with a prompt embedding beside it
    (``tests._train_workers.tiny_overrides`` points ``data.empty_prompt`` there): made once per session and
    only read by the training tests."""
    from megawan.tools.make_sample_data import make_sample_data
    from tests import _train_workers as w

    root = tmp_path_factory.mktemp("sample_1x")
    make_sample_data(root)
    w.write_prompt(root / "prompt.safetensors")
    return root
