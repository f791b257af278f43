"""unlearn_fast._C.multi_map_l2_forward against a float64 restatement of its contract.

Runs on the CPU; also on CUDA when a GPU is present and the extension was built with its CUDA kernels.
Skipped (with the reason) when the extension is not built.

Tolerances (extension output vs the fp64 restatement on the *same* input values):
- row_sq: fp32 differences summed in fp64 per chunk (CPU) or fp32 per block (CUDA) -> rtol 1e-5, atol 1e-6.
- grad = grad_scale·(s − t), one rounding into the students' dtype: fp32 rtol 1e-6, fp16 1e-3 (2^-11),
  bf16 8e-3 (2^-7); atol 1e-5.
- the op on this backend vs Palette's reference: see tests/ops/test_multi_map_retain_forget_l2.py (same numbers).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from tests.helpers import assert_close_report
from unlearn_fast.kernels.extension import extension_has_cuda, extension_load_error, load_extension

EXT = load_extension()
pytestmark = pytest.mark.skipif(EXT is None or not hasattr(EXT, "multi_map_l2_forward"),
                                reason="unlearn_fast._C (with multi_map_l2_forward) not built "
                                       f"({extension_load_error()})")

GRAD_RTOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
ROW_SQ = dict(rtol=1e-5, atol=1e-6)
ATOL_GRAD = 1e-5
GRAD_SCALE = 0.37
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and EXT is not None and extension_has_cuda() else [])
# Palette's 13 encoder maps, shrunk, odd sizes; map 0's rows (16800 elements) span two CPU chunks and 5 CUDA tiles
PALETTE_LIKE_13 = [(3, 80, 70), (4, 9, 9), (4, 9, 9), (4, 5, 5), (8, 5, 5), (8, 5, 5), (8, 3, 3), (16, 3, 3),
                   (16, 3, 3), (16, 2, 2), (32, 1, 1), (32, 1, 1), (3, 5, 7)]
ALIGNED = [(8, 4, 4), (16, 2, 2), (64, 70)]  # every row a multiple of 8 elements: the vector path on CUDA


def _maps(n, shapes, dtype, seed, device, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((n,) + tuple(s), generator=g) * scale + shift).to(dtype).to(device) for s in shapes]


def _reference(students, teachers, grad_scale=GRAD_SCALE):
    row_sq = torch.stack([(s.cpu().double() - t.cpu().double()).pow(2).flatten(1).sum(1)
                          for s, t in zip(students, teachers)])
    return row_sq, [grad_scale * (s.cpu().double() - t.cpu().double()) for s, t in zip(students, teachers)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("student_dtype,teacher_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                                         (torch.bfloat16, torch.bfloat16),
                                                         (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("n,shapes", [(3, PALETTE_LIKE_13), (1, PALETTE_LIKE_13), (2, [(3, 5, 7)]), (1, [(1,)]),
                                      (5, ALIGNED), (2, [(2, 3)] * 40)])  # last: more maps than one CUDA launch
def test_matches_float64(device, student_dtype, teacher_dtype, n, shapes):
    students = _maps(n, shapes, student_dtype, 0, device)
    teachers = _maps(n, shapes, teacher_dtype, 1, device, 1.5, 0.25)
    row_sq, grads = EXT.multi_map_l2_forward(students, teachers, GRAD_SCALE, True)
    ref_sq, ref_grads = _reference(students, teachers)
    assert row_sq.shape == (len(shapes), n) and row_sq.dtype == torch.float32 and row_sq.device.type == device
    assert_close_report(row_sq, ref_sq, name="row_sq", **ROW_SQ)
    assert len(grads) == len(shapes)
    for k, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == student_dtype and g.shape == students[k].shape
        assert_close_report(g, r, rtol=GRAD_RTOL[student_dtype], atol=ATOL_GRAD, name=f"grad {k}")


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_and_non_contiguous_input(device):
    base_s = _maps(3, [(7, 5, 3)], torch.float32, 2, device)[0]
    base_t = _maps(3, [(7, 5, 3)], torch.float32, 3, device)[0]
    s, t = [base_s.transpose(1, 3)], [base_t.transpose(1, 3)]  # the binding makes them contiguous
    row_sq, grads = EXT.multi_map_l2_forward(s, t, 2.0, False)
    assert grads == []
    assert_close_report(row_sq, _reference(s, t)[0], name="row_sq", **ROW_SQ)


def test_cpu_result_does_not_depend_on_thread_count():
    students = _maps(4, PALETTE_LIKE_13, torch.float32, 4, "cpu")
    teachers = _maps(4, PALETTE_LIKE_13, torch.float32, 5, "cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, g1 = EXT.multi_map_l2_forward(students, teachers, 2.0, True)
        torch.set_num_threads(max(2, before))
        many, g2 = EXT.multi_map_l2_forward(students, teachers, 2.0, True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_bad_inputs():
    s = _maps(2, [(3, 5, 7), (2, 2, 2)], torch.float32, 6, "cpu")
    t = _maps(2, [(3, 5, 7), (2, 2, 2)], torch.float32, 7, "cpu")
    with pytest.raises(ValueError, match="non-zero number"):
        EXT.multi_map_l2_forward([], [], 2.0, True)
    with pytest.raises(ValueError, match="non-zero number"):
        EXT.multi_map_l2_forward(s, t[:1], 2.0, True)
    with pytest.raises(ValueError, match="map 1"):
        EXT.multi_map_l2_forward(s, [t[0], t[1][:, :1]], 2.0, True)
    with pytest.raises(ValueError, match="N = 1"):
        EXT.multi_map_l2_forward([s[0], s[1][:1]], [t[0], t[1][:1]], 2.0, True)
    with pytest.raises(ValueError, match="no elements"):
        EXT.multi_map_l2_forward([s[0][:, :0]], [t[0][:, :0]], 2.0, True)
    with pytest.raises(TypeError, match="one dtype"):
        EXT.multi_map_l2_forward(s, [t[0], t[1].half()], 2.0, True)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        EXT.multi_map_l2_forward([x.double() for x in s], [x.double() for x in t], 2.0, True)
    with pytest.raises(ValueError, match="finite"):
        EXT.multi_map_l2_forward(s, t, float("nan"), True)


@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("map_index", [0, 1])
def test_sparse_maps_raise_a_clear_type_error(which, map_index):
    # before: torch's "unsupported memory format option Contiguous" from inside the binding
    s = _maps(2, [(3, 5), (2, 2, 2)], torch.float32, 8, "cpu")
    t = _maps(2, [(3, 5), (2, 2, 2)], torch.float32, 9, "cpu")
    (s if which == "student" else t)[map_index] = (s if which == "student" else t)[map_index].to_sparse()
    with pytest.raises(TypeError, match=rf"multi_map_l2_forward: map {map_index}: the {which} must be a dense "
                                        r"\(strided\) tensor, got a Sparse tensor"):
        EXT.multi_map_l2_forward(s, t, 2.0, True)


def test_nested_map_raises_a_clear_type_error():
    # before: "Internal error: NestedTensorImpl doesn't support sizes. Please file an issue."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nested tensors are a prototype: torch warns on creation
        nested = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(3, 3)])
    with pytest.raises(TypeError, match=r"map 0: the student must be a dense \(strided\) tensor, got a nested"):
        EXT.multi_map_l2_forward([nested], [nested.clone()], 2.0, True)
