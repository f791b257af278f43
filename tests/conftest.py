"""Shared fixtures for the whole suite.

On a machine without a GPU, Triton kernels can only run in its interpreter, and triton fixes that mode when
it is first imported: so TRITON_INTERPRET=1 is set here, before any test module imports it. Ops choose
Triton only for CUDA tensors, so CPU tests still run on the machine's real default backend.
"""
from __future__ import annotations

import os
import sys

# OpenMP threads that wait sleep instead of spinning (read once, when torch loads OpenMP: so before its import):
# a test that uses two threads (the demo's) while another process runs was up to 6x slower with spinning waiters
# (mae_micro pretraining step beside one busy process: 2037 / 597 ms spinning, 332 ms sleeping, 467 ms on one thread).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread for the suite and the processes it starts: its models are tiny, and while another process
# runs (its own CLI subprocesses, DDP ranks, DataLoader workers) two OpenMP threads on a 2-core machine spin at
# barriers: a 2080x64x256 matmul took 16.4 ms with two threads against 1.7 ms with one. Set UNLEARN_FAST_TEST_THREADS
# to keep another count.
_THREADS = int(os.environ.get("UNLEARN_FAST_TEST_THREADS", "1"))
os.environ["OMP_NUM_THREADS"] = str(_THREADS)
torch.set_num_threads(_THREADS)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `pytest` (not `python -m pytest`) from anywhere, without an install
    sys.path.insert(0, REPO_ROOT)


@pytest.fixture(params=["torch", "default"])
def op_backend(request, monkeypatch):
    """Run the test once with ``UNLEARN_FAST_BACKEND=torch`` and once with the machine's default choice.

    backend.py caches the *lookup* of the kernels/extension with lru_cache, but reads the env var on
    every call, so setting it per test is enough.
    """
    if request.param == "torch":
        monkeypatch.setenv("UNLEARN_FAST_BACKEND", "torch")
    else:
        monkeypatch.delenv("UNLEARN_FAST_BACKEND", raising=False)
    return request.param


@pytest.fixture
def single_thread():
    """One intra-op thread for the test (restored after). Tiny models gain nothing from more threads, and
    on a loaded 2-core machine OpenMP spin-waiting makes them several times slower.
    Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def gen():
    """A fresh CPU generator seeded with 0."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def make_mae_micro():
    """``make_mae_micro(seed=0, **kwargs)`` -> a freshly initialised ``mae_micro`` (same seed, same weights)."""
    from unlearn_fast.models import create_model

    def make(seed: int = 0, **kwargs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return create_model("mae_micro", **kwargs)
    return make


@pytest.fixture
def reference_keys_dir():
    """The official key listings: $UNLEARN_FAST_REFERENCE_KEYS or ../shared/reference-keys of the repo root.
    Skips the test when neither exists."""
    candidates = [os.environ.get("UNLEARN_FAST_REFERENCE_KEYS", ""),
                  os.path.join(REPO_ROOT, "..", "shared", "reference-keys")]
    for c in candidates:
        if c and os.path.isfile(c):  # the variable may name one listing file
            c = os.path.dirname(c)
        if c and os.path.isdir(c):
            return os.path.abspath(c)
    pytest.skip("reference key listings not found (set UNLEARN_FAST_REFERENCE_KEYS)")


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """HOME, $UNLEARN_FAST_CACHE and the working folder pointed at empty folders (a test asserts they stay so)."""
    places = {name: tmp_path / name for name in ("home", "env_cache", "cwd")}
    for p in places.values():
        p.mkdir()
    monkeypatch.setenv("HOME", str(places["home"]))
    monkeypatch.setenv("UNLEARN_FAST_CACHE", str(places["env_cache"]))
    monkeypatch.chdir(places["cwd"])
    return places
