"""unlearn_fast._C.batch_mean_std against float64 torch.mean / torch.std (unbiased), and the loader's fallback.

Tolerances (vs the fp64 moments of the *same* input values): the CPU path accumulates in fp64 -> rtol 1e-6
(the only rounding is the final fp32 store); the CUDA path runs fp32 Welford per thread and fp64 Chan
combinations -> rtol 1e-5. atol 1e-6 on the mean (its expected value can be ~0).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from unlearn_fast.kernels.extension import extension_has_cuda, extension_load_error, load_extension

EXT = load_extension()
needs_ext = pytest.mark.skipif(EXT is None, reason=f"unlearn_fast._C not built ({extension_load_error()})")

RTOL = {"cpu": 1e-6, "cuda": 1e-5}
ATOL_MEAN = 1e-6
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and EXT is not None and extension_has_cuda() else [])
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _check(x, device):
    mean, std = EXT.batch_mean_std(x)
    assert mean.shape == () and std.shape == () and mean.dtype == torch.float32 and std.dtype == torch.float32
    assert mean.device == x.device and std.device == x.device
    ref = x.detach().cpu().double()
    ref_mean, ref_std = ref.mean().item(), ref.std().item()
    assert abs(mean.item() - ref_mean) <= ATOL_MEAN + RTOL[device] * abs(ref_mean), (mean.item(), ref_mean)
    assert abs(std.item() - ref_std) <= RTOL[device] * ref_std, (std.item(), ref_std)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2,), (3, 5, 7), (4, 3, 33, 31), (1, 3, 224, 224)])
def test_matches_float64_moments(device, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.rand(shape, generator=g) * 0.8 + 0.1).to(dtype).to(device)  # image-like values in [0.1, 0.9]
    _check(x, device)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_stable_with_a_large_offset(device):
    # a naive sum / sum-of-squares in fp32 loses the variance entirely at this offset
    g = torch.Generator().manual_seed(0)
    x = (1.0e4 + torch.randn(200_003, generator=g, dtype=torch.float64)).to(torch.float32).to(device)
    _check(x, device)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_many_chunks_deterministic_and_non_contiguous(device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, 301, 97, generator=g).to(device).transpose(1, 3)  # > several CPU chunks / GPU blocks
    assert not x.is_contiguous()
    _check(x, device)
    a, b = EXT.batch_mean_std(x), EXT.batch_mean_std(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_one_and_zero_elements(device):
    mean, std = EXT.batch_mean_std(torch.tensor([2.5], device=device))
    assert mean.item() == 2.5 and torch.isnan(std)  # unbiased std of one value is undefined, as torch.std
    mean, std = EXT.batch_mean_std(torch.empty(0, 3, device=device))
    assert torch.isnan(mean) and torch.isnan(std)
    mean, std = EXT.batch_mean_std(torch.full((5, 4), 0.3, device=device))
    assert abs(mean.item() - 0.3) < 1e-7 and std.item() == 0.0


@needs_ext
@pytest.mark.parametrize("bad,error,message", [
    (torch.zeros(3, dtype=torch.int64), TypeError, "x dtype must be float32, float64, float16 or bfloat16"),
    (torch.zeros(3, dtype=torch.bool), TypeError, "x dtype must be"),
])
def test_bad_inputs_raise_clear_errors(bad, error, message):
    with pytest.raises(error, match=message):
        EXT.batch_mean_std(bad)


def _not_dense(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns when a CSR or nested tensor is made (beta)
        if kind == "nested":
            return torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)])
        return torch.randn(5, 3).to_sparse() if kind == "Sparse" else torch.randn(5, 3).to_sparse_csr()


@needs_ext
@pytest.mark.parametrize("kind", ["Sparse", "SparseCsr", "nested"])
def test_sparse_or_nested_input_raises_a_clear_type_error(kind):
    # before: sparse raised torch's "unsupported memory format option Contiguous", nested was read as one
    # flat buffer and returned moments of it
    with pytest.raises(TypeError, match=rf"batch_mean_std: x must be a dense \(strided\) tensor, got a {kind} tensor"):
        EXT.batch_mean_std(_not_dense(kind))


def _run_python(code: str, **env):
    full_env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_loader_fallback_when_disabled():
    # a fresh interpreter, so the loader's cache starts empty
    proc = _run_python("""
        import warnings
        warnings.simplefilter("error")  # disabling on purpose must not warn
        from unlearn_fast.kernels.extension import extension_has_cuda, extension_load_error, load_extension
        assert load_extension() is None
        assert load_extension() is None
        assert extension_has_cuda() is False
        print("reason:", extension_load_error())
    """, UNLEARN_FAST_DISABLE_EXT="1")
    assert proc.returncode == 0, proc.stderr
    assert "reason: disabled by UNLEARN_FAST_DISABLE_EXT=1" in proc.stdout


def test_loader_warns_once_and_never_raises_when_import_fails():
    # make the import fail as a missing build would, and check: no exception, one warning with the fix
    proc = _run_python("""
        import sys, warnings
        sys.modules["unlearn_fast._C"] = None  # import of it now raises ImportError
        from unlearn_fast.kernels.extension import extension_has_cuda, extension_load_error, load_extension
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert load_extension() is None and load_extension() is None and not extension_has_cuda()
        ours = [w for w in caught if "unlearn_fast._C" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        print(ours[0].category.__name__, ours[0].message)
        print("reason:", extension_load_error())
    """, UNLEARN_FAST_DISABLE_EXT="0")
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" in proc.stdout
    assert "pip install --no-build-isolation -e ." in proc.stdout
    assert "reason: ModuleNotFoundError" in proc.stdout


@needs_ext
def test_loader_returns_the_cached_module():
    assert load_extension() is EXT
    assert isinstance(extension_has_cuda(), bool)
    assert extension_load_error() is None
