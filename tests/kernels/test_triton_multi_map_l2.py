"""unlearn_fast/kernels/multi_map_l2.py against a float64 restatement of its math, and the op on Triton.

Runs on the CPU under TRITON_INTERPRET=1 (see conftest.py), compiled on a GPU when there is one.

Tolerances (kernel output vs the fp64 restatement on the *same* input values):
- row_sq: fp32 partial sums of BLOCK elements, added by torch -> rtol 2e-5, atol 1e-6.
- grad = 2·(s − t): fp32 math, one rounding into the students' dtype -> fp32 rtol 1e-6; fp16 rtol 1e-3
  (2^-11 rounding); bf16 rtol 8e-3, one bf16 ulp (2^-7; triton 3.8's interpreter truncates fp32 -> bf16,
  compiled kernels round to nearest); atol 1e-5. bf16 works under the interpreter (checked here).
- scale kernel: one fp32 product rounded once -> the same per-dtype rtol.
- op losses vs the PyTorch twin / Palette's reference: rtol 1e-5 (fp32 accumulation either way); gradients
  rounded twice (the stored 2(s−t), then the scaled value): fp32 1e-5, fp16 2e-3, bf16 1.6e-2; in fp16 an atol of one
  subnormal step (2^-24): gradients ~2(s−t)/numel_k lie below fp16's normal range.
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close_report

pytest.importorskip("triton")
from unlearn_fast.kernels import multi_map_l2_forward, multi_map_l2_scale  # noqa: E402
from unlearn_fast.kernels import multi_map_l2 as mm  # noqa: E402

GRAD_RTOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
ROW_SQ = dict(rtol=2e-5, atol=1e-6)
ATOL_GRAD = 1e-5
# op gradients are rounded twice (the stored 2(s−t), then the scaled result): two ulps
OP_GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# op gradients are ~1/numel_k: in fp16 they are subnormal, with a fixed spacing of 2^-24
OP_GRAD_ATOL = {torch.float32: 1e-9, torch.float16: 2.0 ** -24, torch.bfloat16: 1e-9}
# Palette's 13 encoder maps (3 at full size, then per level), shrunk, with odd sizes; the first rows span 2 tiles
PALETTE_LIKE_13 = [(4, 33, 35), (4, 9, 9), (4, 9, 9), (4, 5, 5), (8, 5, 5), (8, 5, 5), (8, 3, 3), (16, 3, 3),
                   (16, 3, 3), (16, 2, 2), (32, 1, 1), (32, 1, 1), (3, 5, 7)]


def _maps(n, shapes, dtype, seed, scale=1.0, shift=0.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((n,) + tuple(s), generator=g) * scale + shift).to(dtype).to(device) for s in shapes]


def _row_sq_and_grad64(students, teachers):
    row_sq = torch.stack([(s.cpu().double() - t.cpu().double()).pow(2).flatten(1).sum(1)
                          for s, t in zip(students, teachers)])
    grads = [2.0 * (s.cpu().double() - t.cpu().double()) for s, t in zip(students, teachers)]
    return row_sq, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,shapes", [(3, PALETTE_LIKE_13), (1, PALETTE_LIKE_13), (2, [(3, 5, 7)]),
                                      (1, [(1,)]), (4, [(8, 4, 4), (16, 2, 2)])])  # last: every M_k % 8 == 0
def test_forward_matches_float64(device, dtype, n, shapes):
    students = _maps(n, shapes, dtype, 0, device=device)
    teachers = _maps(n, shapes, dtype, 1, 1.5, 0.25, device=device)
    row_sq, grads = multi_map_l2_forward(students, teachers, 2.0, True)
    ref_sq, ref_grads = _row_sq_and_grad64(students, teachers)
    assert row_sq.shape == (len(shapes), n) and row_sq.dtype == torch.float32
    assert_close_report(row_sq, ref_sq, name="row_sq", **ROW_SQ)
    for k, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == dtype and g.shape == students[k].shape
        assert_close_report(g, r, rtol=GRAD_RTOL[dtype], atol=ATOL_GRAD, name=f"grad {k}")


def test_mixed_student_teacher_dtypes_and_no_grad(device):
    students = _maps(2, PALETTE_LIKE_13[:4], torch.bfloat16, 2, device=device)
    teachers = _maps(2, PALETTE_LIKE_13[:4], torch.float32, 3, device=device)
    row_sq, grads = multi_map_l2_forward(students, teachers, 2.0, compute_grad=False)
    assert grads is None
    assert_close_report(row_sq, _row_sq_and_grad64(students, teachers)[0], name="row_sq", **ROW_SQ)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scale_kernel(device, dtype):
    n = 3
    grads = _maps(n, PALETTE_LIKE_13, dtype, 4, device=device)
    row_scale = (torch.rand(len(grads), n, generator=torch.Generator().manual_seed(5)) * 1.5 + 0.5).to(device)
    outs = multi_map_l2_scale(grads, row_scale)
    for k, (o, g) in enumerate(zip(outs, grads)):
        want = g.cpu().double() * row_scale[k].cpu().double().view(-1, 1, 1, 1)
        assert o.dtype == dtype and o.data_ptr() != g.data_ptr()
        assert_close_report(o, want, rtol=GRAD_RTOL[dtype], atol=1e-8, name=f"scaled {k}")


def test_plan_and_pointer_tables_are_cached(device):
    students = _maps(2, PALETTE_LIKE_13, torch.float32, 6, device=device)
    teachers = _maps(2, PALETTE_LIKE_13, torch.float32, 7, device=device)
    row_elems = tuple(s[0].numel() for s in students)
    plan = mm._plan(torch.device(device), 2, row_elems)
    multi_map_l2_forward(students, teachers)
    assert mm._plan(torch.device(device), 2, row_elems) is plan  # built once per shape signature
    table = mm._pointer_table(students, torch.device(device))
    assert mm._pointer_table(students, torch.device(device)) is table
    assert table.tolist() == [s.data_ptr() for s in students]
    # one tile per (map, row, chunk): the work list covers every element exactly once
    chunks = [-(-m // plan.block) for m in row_elems]
    assert plan.n_tiles == 2 * sum(chunks)
    assert plan.tiles.cpu()[:, 2].max().item() == max(chunks) - 1


def test_bad_inputs(device):
    good = _maps(2, [(3, 5, 7), (2, 2, 2)], torch.float32, 8, device=device)
    with pytest.raises(ValueError, match="non-zero number"):
        multi_map_l2_forward([], [])
    with pytest.raises(ValueError, match="non-zero number"):
        multi_map_l2_forward(good, good[:1])
    with pytest.raises(ValueError, match="map 1"):
        multi_map_l2_forward(good, [good[0], good[1][:, :1]])
    with pytest.raises(ValueError, match="N = 1"):
        multi_map_l2_forward([good[0], good[1][:1]], [good[0], good[1][:1]])
    with pytest.raises(TypeError, match="one dtype"):
        multi_map_l2_forward(good, [good[0], good[1].half()])
    with pytest.raises(TypeError, match="fp32, fp16 or bf16"):
        multi_map_l2_forward([g.double() for g in good], [g.double() for g in good])
    with pytest.raises(ValueError, match="contiguous"):
        multi_map_l2_forward([good[0].transpose(1, 2)], [good[0].transpose(1, 2)])
    with pytest.raises(ValueError, match="row_scale"):
        multi_map_l2_scale(good, torch.ones(2, 3, device=device))


# ---- the op on the Triton backend ---------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,flags", [(4, [True, False, False, True]), (1, [True]), (3, [False] * 3), (2, [True] * 2)])
def test_op_on_triton_matches_twin_and_palette_reference(device, monkeypatch, dtype, n, flags):
    from unlearn_fast.objective.palette_loss import palette_unlearn_loss_terms_reference
    from unlearn_fast.ops import multi_map_retain_forget_l2_loss, multi_map_retain_forget_l2_loss_reference
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    is_forget = torch.tensor(flags, device=device)
    teachers = _maps(n, PALETTE_LIKE_13, dtype, 9, device=device)
    students = [s.requires_grad_(True) for s in _maps(n, PALETTE_LIKE_13, dtype, 10, device=device)]
    r, f = multi_map_retain_forget_l2_loss(students, teachers, is_forget)
    (0.3 * r + 0.7 * f).backward()
    got = [s.grad.clone() for s in students]
    for s in students:
        s.grad = None
    s64 = [s.detach().double().requires_grad_(True) for s in students]
    rr, ff = multi_map_retain_forget_l2_loss_reference(s64, [t.double() for t in teachers], is_forget)
    (0.3 * rr + 0.7 * ff).backward()
    ref = palette_unlearn_loss_terms_reference([s.detach().float() for s in students],
                                               [t.float() for t in teachers], is_forget.cpu(), 0.1)
    assert r.dtype == f.dtype == torch.float32
    assert_close_report(r, rr, rtol=1e-5, atol=1e-7, name="retain")
    assert_close_report(f, ff, rtol=1e-5, atol=1e-7, name="forget")
    assert_close_report(r, ref.retain, rtol=1e-5, atol=1e-7, name="retain vs palette reference")
    assert_close_report(f, ref.forget, rtol=1e-5, atol=1e-7, name="forget vs palette reference")
    for k, (g, s) in enumerate(zip(got, s64)):
        assert g.dtype == dtype
        assert_close_report(g, s.grad, rtol=OP_GRAD_RTOL[dtype], atol=OP_GRAD_ATOL[dtype], name=f"grad {k}")
