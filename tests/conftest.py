"""Test session setup (offline, Triton interpreter without a GPU, one thread) and the shared ``arch`` fixture.

Helpers live in importable modules beside this file (``lm_fixtures``, ``image_fixtures``, ``vlm_fixtures``,
``utils_stats``, ``family_contract``); a conftest is not a module to import from."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU interpreter without a GPU

import pytest  # noqa: E402
import torch  # noqa: E402

# The suite runs as `pytest -n 2` on 2 cores: one thread per worker avoids oversubscription, which makes
# the tiny models of these tests many times slower.
torch.set_num_threads(1)

from lm_fixtures import ARCHS  # noqa: E402


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Commands under test may set torch's thread count (``--threads`` and its default): restore it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
