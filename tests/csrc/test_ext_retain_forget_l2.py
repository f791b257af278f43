"""unlearn_fast._C.retain_forget_l2_forward against a float64 restatement of its contract.

Runs on the CPU; also on CUDA when a GPU is present and the extension was built with its CUDA kernels.
Skipped (with the reason) when the extension is not built.

Tolerances (extension output vs the fp64 restatement on the *same* input values; both read the same
low-precision numbers, so only the kernel's fp32 arithmetic and the final rounding differ):
- row_sq: fp32 differences summed in fp64 (CPU) or fp32 per lane (CUDA) -> rtol 1e-5; with the norm the
  target's fp32 normalisation adds a few ulps per element -> rtol 5e-5; atol 1e-6.
- grad, stored in the latent's dtype: fp32 rtol 1e-5 (5e-5 with the norm); fp16 rtol 1e-3 (one rounding,
  2^-11); bf16 rtol 8e-3 (2^-7); atol 1e-5.
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch

from tests.helpers import assert_close_report, forget_pattern
from unlearn_fast.kernels.extension import extension_has_cuda, extension_load_error, load_extension

EXT = load_extension()
pytestmark = pytest.mark.skipif(EXT is None, reason=f"unlearn_fast._C not built ({extension_load_error()})")

ROW_SQ_RTOL = {False: 1e-5, True: 5e-5}  # keyed by "norm on"
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
GRAD_RTOL_NORM = {torch.float32: 5e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
ATOL_ROW_SQ, ATOL_GRAD = 1e-6, 1e-5
GRAD_SCALE = 0.37
EPS = 1e-6

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and EXT is not None and extension_has_cuda() else [])


def reference_row_sq_and_grad(latent, retain_table, forget_table, row_is_forget, row_index, weight=None, bias=None,
                              eps=EPS, grad_scale=GRAD_SCALE):
    """The contract, row by row, in float64 on the CPU."""
    n, t, d = latent.shape
    x = latent.detach().cpu().double()
    row_sq = torch.empty(n, dtype=torch.float64)
    grad = torch.empty(n, t, d, dtype=torch.float64)
    for i in range(n):
        table = forget_table if bool(row_is_forget[i]) else retain_table
        if table is None or table.shape[0] == 0:
            y = torch.zeros(t, d, dtype=torch.float64)  # an absent table reads as zeros
        else:
            y = table[int(row_index[i])].cpu().double()
        if weight is not None:
            mu = y.mean(dim=-1, keepdim=True)
            var = (y - mu).pow(2).mean(dim=-1, keepdim=True)  # biased, as LayerNorm
            b = bias.cpu().double() if bias is not None else 0.0
            y = (y - mu) / torch.sqrt(var + eps) * weight.cpu().double() + b
        diff = x[i] - y
        row_sq[i] = diff.pow(2).sum()
        grad[i] = grad_scale * diff
    return row_sq, grad


def make_case(n, t, d, which, layout, latent_dtype, table_dtype, norm, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, t, d, generator=g).to(latent_dtype)
    full_retain = (torch.randn(n, t, d, generator=g) * 1.5 + 0.25).to(table_dtype)
    full_forget = (torch.randn(n, t, d, generator=g) * 0.5 - 0.5).to(table_dtype)
    is_forget = forget_pattern(n, which)
    if layout == "full":
        retain, forget, idx = full_retain, full_forget, torch.arange(n)
    else:  # compact: only the rows of each class, in batch order; index = rank within the class
        retain, forget = full_retain[~is_forget], full_forget[is_forget]
        f = is_forget.long()
        idx = torch.where(is_forget, f.cumsum(0) - 1, (1 - f).cumsum(0) - 1)
        retain = None if retain.shape[0] == 0 else retain
        forget = None if forget.shape[0] == 0 else forget
    w = b = None
    if norm:
        w = torch.randn(d, generator=g) * 0.2 + 1.0
        b = torch.randn(d, generator=g) * 0.1
    to = lambda v: None if v is None else v.to(device)  # noqa: E731
    return to(latent), to(retain), to(forget), to(is_forget), to(idx), to(w), to(b)


def run_ext(latent, retain, forget, is_forget, idx, w=None, b=None, compute_grad=True, eps=EPS):
    return EXT.retain_forget_l2_forward(latent, retain, forget, is_forget, idx, w, b, eps, GRAD_SCALE, compute_grad)


def check_against_reference(case, latent_dtype, norm):
    latent, retain, forget, is_forget, idx, w, b = case
    row_sq, grad = run_ext(*case)
    ref_sq, ref_grad = reference_row_sq_and_grad(latent, retain, forget, is_forget, idx, w, b)
    assert row_sq.dtype == torch.float32 and row_sq.shape == (latent.shape[0],)
    assert row_sq.device == latent.device
    assert grad.dtype == latent_dtype and grad.shape == latent.shape and grad.device == latent.device
    assert_close_report(row_sq, ref_sq, rtol=ROW_SQ_RTOL[norm], atol=ATOL_ROW_SQ, name="row_sq")
    rtol = (GRAD_RTOL_NORM if norm else GRAD_RTOL)[latent_dtype]
    assert_close_report(grad, ref_grad, rtol=rtol, atol=ATOL_GRAD, name="grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("latent_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("layout", ["full", "compact"])
def test_matches_reference_odd_shapes(device, latent_dtype, table_dtype, norm, layout):
    case = make_case(7, 5, 37, "mixed", layout, latent_dtype, table_dtype, norm, device)
    check_against_reference(case, latent_dtype, norm)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["all_forget", "all_retain", "mixed"])
@pytest.mark.parametrize("layout", ["full", "compact"])
@pytest.mark.parametrize("norm", [False, True])
def test_class_patterns_and_layouts(device, which, layout, norm):
    # compact + all_* leaves one table absent (None): the op must not read it
    case = make_case(6, 3, 16, which, layout, torch.float32, torch.float32, norm, device, seed=1)
    check_against_reference(case, torch.float32, norm)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 5, 37), (3, 1, 129), (2, 17, 768), (4, 3, 1000)])
@pytest.mark.parametrize("norm", [False, True])
def test_batch_one_and_awkward_sizes(device, shape, norm):
    # D = 768 / 1000 take the vectorised CUDA path (D % 4 == 0), 37 / 129 / 1 the scalar one
    case = make_case(*shape, "mixed", "compact", torch.float32, torch.float32, norm, device, seed=2)
    check_against_reference(case, torch.float32, norm)


@pytest.mark.parametrize("device", DEVICES)
def test_compute_grad_false_returns_none_and_same_row_sq(device):
    case = make_case(5, 4, 24, "mixed", "full", torch.bfloat16, torch.float32, True, device)
    row_sq, grad = run_ext(*case, compute_grad=False)
    assert grad is None
    row_sq_with, grad_with = run_ext(*case, compute_grad=True)
    assert grad_with is not None
    assert torch.equal(row_sq, row_sq_with)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    case = make_case(9, 13, 96, "mixed", "compact", torch.bfloat16, torch.bfloat16, True, device, seed=3)
    a_sq, a_grad = run_ext(*case)
    b_sq, b_grad = run_ext(*case)
    assert torch.equal(a_sq, b_sq) and torch.equal(a_grad, b_grad)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_table_dtypes_and_bias_default(device):
    # retain bf16, forget fp32: read as fp32; norm_weight without norm_bias means bias 0
    latent, retain, forget, is_forget, idx, w, _ = make_case(6, 4, 20, "mixed", "full", torch.float32,
                                                             torch.float32, True, device, seed=4)
    retain = retain.to(torch.bfloat16)
    row_sq, grad = run_ext(latent, retain, forget, is_forget, idx, w, None)
    ref_sq, ref_grad = reference_row_sq_and_grad(latent, retain, forget, is_forget, idx, w, None)
    assert_close_report(row_sq, ref_sq, rtol=ROW_SQ_RTOL[True], atol=ATOL_ROW_SQ, name="row_sq")
    assert_close_report(grad, ref_grad, rtol=GRAD_RTOL_NORM[torch.float32], atol=ATOL_GRAD, name="grad")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_table_rows_read_zero(device):
    # a retain row with no retain table: target 0 (bias after the norm), as in the Triton kernel and the twin
    latent, _, forget, is_forget, idx, w, b = make_case(4, 2, 8, "mixed", "full", torch.float32, torch.float32,
                                                        True, device, seed=5)
    for weight, bias in ((None, None), (w, b)):
        row_sq, grad = run_ext(latent, None, forget, is_forget, idx, weight, bias)
        ref_sq, ref_grad = reference_row_sq_and_grad(latent, None, forget, is_forget, idx, weight, bias)
        assert_close_report(row_sq, ref_sq, rtol=ROW_SQ_RTOL[True], atol=ATOL_ROW_SQ, name="row_sq")
        assert_close_report(grad, ref_grad, rtol=GRAD_RTOL_NORM[torch.float32], atol=ATOL_GRAD, name="grad")
    empty = latent.new_empty((0,) + tuple(latent.shape[1:]))  # the op layer passes this when a table is absent
    assert torch.equal(run_ext(latent, empty, forget, is_forget, idx)[0], run_ext(latent, None, forget, is_forget,
                                                                                  idx)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_latent_and_int32_index(device):
    latent, retain, forget, is_forget, idx, w, b = make_case(5, 6, 10, "mixed", "full", torch.float32,
                                                             torch.float32, False, device, seed=6)
    latent_t = latent.transpose(0, 1).contiguous().transpose(0, 1)  # same values, not contiguous
    assert not latent_t.is_contiguous()
    row_sq, grad = run_ext(latent_t, retain, forget, is_forget, idx.to(torch.int32))
    ref_sq, ref_grad = reference_row_sq_and_grad(latent, retain, forget, is_forget, idx)
    assert_close_report(row_sq, ref_sq, rtol=ROW_SQ_RTOL[False], atol=ATOL_ROW_SQ, name="row_sq")
    assert_close_report(grad, ref_grad, rtol=GRAD_RTOL[torch.float32], atol=ATOL_GRAD, name="grad")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    latent = torch.empty(0, 3, 8, device=device)
    row_sq, grad = run_ext(latent, None, None, torch.empty(0, dtype=torch.bool, device=device),
                           torch.empty(0, dtype=torch.int64, device=device))
    assert row_sq.shape == (0,) and grad.shape == (0, 3, 8)


def _good_args():
    latent, retain, forget, is_forget, idx, w, b = make_case(4, 3, 8, "mixed", "full", torch.float32, torch.float32,
                                                             True, "cpu")
    return dict(latent=latent, retain_table=retain, forget_table=forget, row_is_forget=is_forget, row_index=idx,
                norm_weight=w, norm_bias=b, eps=EPS, grad_scale=GRAD_SCALE, compute_grad=True)


@pytest.mark.parametrize("change,error,message", [
    (dict(latent=torch.zeros(4, 24)), ValueError, "latent must be [N, T, D]"),
    (dict(latent=torch.zeros(4, 3, 8, dtype=torch.float64)), TypeError, "latent dtype"),
    (dict(retain_table=torch.zeros(4, 3, 9)), ValueError, "retain_table must be [rows, T, D]"),
    (dict(forget_table=torch.zeros(4, 3, 8, dtype=torch.int32)), TypeError, "forget_table dtype"),
    (dict(row_is_forget=torch.zeros(3, dtype=torch.bool)), ValueError, "row_is_forget must be [N]"),
    (dict(row_is_forget=torch.zeros(4, dtype=torch.int64)), TypeError, "row_is_forget must be bool"),
    (dict(row_index=torch.zeros(4, dtype=torch.float32)), TypeError, "row_index must be int64"),
    (dict(row_index=torch.tensor([0, 1, 2, 4])), ValueError, "out of range for retain_table"),
    (dict(row_index=torch.tensor([0, -1, 2, 3])), ValueError, "out of range for forget_table"),
    (dict(norm_weight=torch.ones(7)), ValueError, "norm_weight must be [D]"),
    (dict(norm_weight=None), ValueError, "norm_bias given without norm_weight"),
    (dict(eps=-1.0), ValueError, "eps must be finite and >= 0"),
    (dict(grad_scale=float("nan")), ValueError, "grad_scale must be finite"),
    # sparse / nested arguments: before, torch's "unsupported memory format option Contiguous" (sparse) or
    # "Given dimension 1 is irregular" (nested) from inside the binding
    (dict(latent=torch.zeros(4, 3, 8).to_sparse()), TypeError, "latent must be a dense (strided) tensor, got a Sparse"),
    (dict(retain_table=torch.zeros(4, 3, 8).to_sparse()), TypeError, "retain_table must be a dense (strided)"),
    (dict(forget_table=torch.zeros(4, 3, 8).to_sparse()), TypeError, "forget_table must be a dense (strided)"),
    (dict(row_is_forget=torch.zeros(4, dtype=torch.bool).to_sparse()), TypeError,
     "row_is_forget must be a dense (strided)"),
    (dict(row_index=torch.zeros(4, dtype=torch.int64).to_sparse()), TypeError, "row_index must be a dense (strided)"),
    (dict(norm_weight=torch.ones(8).to_sparse()), TypeError, "norm_weight must be a dense (strided)"),
    (dict(norm_bias=torch.ones(8).to_sparse()), TypeError, "norm_bias must be a dense (strided)"),
    (dict(latent="nested"), TypeError, "latent must be a dense (strided) tensor, got a nested tensor"),
])
def test_bad_inputs_raise_clear_errors(change, error, message):
    args = _good_args()
    args.update(change)
    if isinstance(args["latent"], str):  # made here: torch warns when a nested tensor is created
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            args["latent"] = torch.nested.nested_tensor([torch.zeros(3, 8), torch.zeros(2, 8)])
    with pytest.raises(error, match=re.escape(message)):
        EXT.retain_forget_l2_forward(**args)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the CUDA build of the extension")
def test_cuda_tensors_on_mixed_devices_raise():
    args = _good_args()
    args["latent"] = args["latent"].cuda()
    with pytest.raises(ValueError, match="is on cpu but latent is on cuda"):
        EXT.retain_forget_l2_forward(**args)


@pytest.mark.skipif(EXT is None or extension_has_cuda(), reason="only for a CPU-only build")
def test_cpu_only_build_rejects_cuda_tensors_clearly():
    if not torch.cuda.is_available():
        pytest.skip("no GPU to make a CUDA tensor with")
    args = _good_args()
    args = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in args.items()}
    with pytest.raises(ValueError, match="built without CUDA kernels"):
        EXT.retain_forget_l2_forward(**args)
