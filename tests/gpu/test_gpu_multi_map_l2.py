"""GPU checks of the multi-map feature loss (skipped without CUDA): the op on Triton and on the extension's
CUDA kernels against its float64 twin and Palette's reference loss, on Places2's 13 map shapes and on
awkward ones (odd sizes, N = 1, more maps than one CUDA launch takes).

Tolerances: losses rtol 1e-5 (fp32 accumulation of the same inputs, whatever their dtype; 1e-4 on the
Places2 shapes, whose rows sum 4M elements in fp32 partials); gradients, rounded twice into the maps' dtype,
elementwise relative error fp32 1e-5, fp16/bf16 1e-2, plus two steps of the dtype's subnormal grid
(Places2-sized fp16 gradients are subnormal).
"""
from __future__ import annotations

import pytest
import torch

from unlearn_fast.objective.palette_loss import palette_unlearn_loss_terms, palette_unlearn_loss_terms_reference
from unlearn_fast.ops import multi_map_retain_forget_l2_loss, multi_map_retain_forget_l2_loss_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GRAD_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
PLACES2_13 = ([(64, 256, 256)] * 3 + [(64, 128, 128)] + [(128, 128, 128)] * 2 + [(128, 64, 64)]
              + [(256, 64, 64)] * 2 + [(256, 32, 32)] + [(512, 32, 32)] * 3)
ODD_13 = [(5, 33, 35), (4, 9, 9), (4, 9, 9), (4, 5, 5), (8, 5, 5), (8, 5, 5), (8, 3, 3), (16, 3, 3), (16, 3, 3),
          (16, 2, 2), (32, 1, 1), (32, 1, 1), (3, 5, 7)]


def _use(monkeypatch, backend):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", backend)
    if backend == "cext":
        from unlearn_fast.kernels.extension import extension_has_cuda, load_extension
        ext = load_extension()
        if ext is None or not extension_has_cuda() or not hasattr(ext, "multi_map_l2_forward"):
            pytest.skip("extension built without CUDA multi-map kernels")


def _maps(n, shapes, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn((n,) + s, device="cuda", generator=g).to(dtype) for s in shapes]


@pytest.mark.parametrize("backend", ["triton", "cext"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,shapes,forget", [(4, ODD_13, "half"), (1, ODD_13, "all"), (3, [(3, 5, 7)], "none"),
                                             (2, [(2, 3)] * 40, "half"), (2, PLACES2_13, "half")])
def test_op_matches_twin_on_gpu(monkeypatch, backend, dtype, n, shapes, forget):
    _use(monkeypatch, backend)
    is_forget = {"half": torch.arange(n, device="cuda") % 2 == 0, "all": torch.ones(n, dtype=torch.bool, device="cuda"),
                 "none": torch.zeros(n, dtype=torch.bool, device="cuda")}[forget]
    students = [s.requires_grad_(True) for s in _maps(n, shapes, dtype, 0)]
    teachers = _maps(n, shapes, dtype, 1)
    r, f = multi_map_retain_forget_l2_loss(students, teachers, is_forget)
    (0.3 * r + 0.7 * f).backward()
    grads = [s.grad for s in students]
    s64 = [s.detach().double().requires_grad_(True) for s in students]
    rr, ff = multi_map_retain_forget_l2_loss_reference(s64, [t.double() for t in teachers], is_forget)
    (0.3 * rr + 0.7 * ff).backward()
    loss_tol = 1e-4 if shapes is PLACES2_13 else 1e-5
    assert abs(r.item() - rr.item()) <= loss_tol * max(abs(rr.item()), 1e-12)
    assert abs(f.item() - ff.item()) <= loss_tol * max(abs(ff.item()), 1e-12)
    for g, s in zip(grads, s64):
        assert g.dtype == dtype
        assert _within_dtype_rounding(g, s.grad, GRAD_TOL[dtype])


def _within_dtype_rounding(got, exact, tol):
    """Elementwise |got - exact| <= tol |exact| + 2 subnormal steps of got's dtype: Places2-sized maps give
    fp16 gradients of ~1e-7, inside fp16's subnormal range, where a relative bound alone cannot hold (the
    float64 twin's gradient rounded into fp16 already misses it by ~10 %)."""
    finfo = torch.finfo(got.dtype)
    floor = 2 * finfo.smallest_normal * finfo.eps  # two steps of the subnormal grid (rounded twice)
    err = (got.double() - exact).abs()
    bound = tol * exact.abs() + floor
    return bool((err <= bound).all())


@pytest.mark.parametrize("backend", ["triton", "cext"])
def test_palette_terms_match_reference_and_are_deterministic(monkeypatch, backend):
    _use(monkeypatch, backend)
    n, is_forget = 3, torch.tensor([True, False, False], device="cuda")
    students = [s.requires_grad_(True) for s in _maps(n, ODD_13, torch.float32, 2)]
    teachers = _maps(n, ODD_13, torch.float32, 3)
    fast = palette_unlearn_loss_terms(students, teachers, is_forget, 0.1)
    again = palette_unlearn_loss_terms(students, teachers, is_forget, 0.1)
    ref = palette_unlearn_loss_terms_reference(students, teachers, is_forget, 0.1)
    assert torch.equal(fast.loss, again.loss)  # fixed reduction order, no atomics
    torch.testing.assert_close(fast.loss, ref.loss, rtol=1e-5, atol=1e-8)
    g_fast = torch.autograd.grad(fast.loss, students)
    g_ref = torch.autograd.grad(ref.loss, students)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)
