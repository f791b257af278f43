"""unlearn_fast/ops/add_layer_norm.py: validation, dispatch (kernel vs twin), autograd of the fused op.

The kernel path runs on CUDA, or on the CPU under Triton's interpreter with UNLEARN_FAST_BACKEND=triton.
Tolerances (|a - b| <= atol + rtol * |b|):
- twin against torch's own autocast path (add, fp32 layer_norm, cast): bit-equal (the same ops).
- fused against the twin, values stored in fp32 (h, gradients): rtol 1e-5, atol 1e-5 (only the order of the
  fp32 sums differs; atol for gradients near 0, where the LayerNorm backward cancels).
- values stored in fp16 / bf16: two ulps relative (2^-9 / 2^-6), atol 1e-5 (each side rounds once, from fp32
  values that differ in the last bits; under the interpreter bf16 is truncated, not rounded).
- gradients of the twin and of the fused op against float64 autograd of the same math (fp32 inputs):
  rtol 1e-5, atol 1e-5.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close_report, record_launcher_calls, triton_kernel_device
from unlearn_fast.ops import backend
from unlearn_fast.ops.add_layer_norm import add_layer_norm, add_layer_norm_reference

EPS = 1e-6
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: dict(rtol=1e-5, atol=1e-5), F16: dict(rtol=2.0 ** -9, atol=1e-5), BF16: dict(rtol=2.0 ** -6, atol=1e-5)}


def _inputs(shape=(2, 5, 24), x_dtype=F32, branch_dtype=BF16, device="cpu", seed=0, param_dtype=F32):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = torch.randn(shape, generator=g)
    branch = None if branch_dtype is None else 0.5 * torch.randn(shape, generator=g)
    if branch is not None and torch.promote_types(x_dtype, branch_dtype) == BF16:
        # multiples of 1/8 below 32 in magnitude: x + branch is exact in bf16, so the interpreter's truncating
        # fp32 -> bf16 cast gives torch's s, and h and the gradients compare with the twin's directly
        x, branch = (torch.round(t * 8).clamp(-120, 120) / 8 for t in (x, branch))
    x = x.to(x_dtype)
    branch = None if branch is None else branch.to(branch_dtype)
    w = (1 + 0.5 * torch.randn(d, generator=g)).to(param_dtype)
    b = (0.5 * torch.randn(d, generator=g)).to(param_dtype)
    return [None if t is None else t.to(device) for t in (x, branch, w, b)]


@pytest.fixture
def kernel_device(monkeypatch):
    """(device, calls): a device the Triton kernels run on with UNLEARN_FAST_BACKEND=triton, and a dict that
    counts launcher calls ("forward", "backward")."""
    pytest.importorskip("triton")
    from unlearn_fast.kernels import add_layer_norm as module
    device = triton_kernel_device(module._add_layer_norm_forward_kernel)
    calls = {"forward": 0, "backward": 0}
    for name in ("forward", "backward"):
        real = getattr(module, f"add_layer_norm_{name}")

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, f"add_layer_norm_{name}", spy)
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    return device, calls


@pytest.fixture
def launcher_calls(monkeypatch):
    """A list that records any launcher call, without forcing a backend."""
    pytest.importorskip("triton")
    from unlearn_fast.kernels import add_layer_norm as module
    return record_launcher_calls(monkeypatch, module, ("add_layer_norm_forward", "add_layer_norm_backward"))


def _torch_autocast_path(x, branch, w, b, out_dtype):
    """What a ViT block computes without the op: the add, fp32 layer_norm (autocast), the next Linear's cast."""
    s = x if branch is None else x + branch
    h = F.layer_norm(s.float(), (x.shape[-1],), None if w is None else w.float(), None if b is None else b.float(),
                     EPS)
    return s, h.to(out_dtype)


def _leaves(tensors, which):
    """Clones of ``tensors`` (x, branch, weight, bias), those named in ``which`` requiring grad."""
    names = ("x", "branch", "weight", "bias")
    return [None if t is None else t.detach().clone().requires_grad_(n in which) for n, t in zip(names, tensors)]


def _run(fn, leaves, grad_h, grad_s, out_dtype):
    """Forward with ``fn``, backward of ``sum(h * grad_h) + sum(s * grad_s)``; returns (s, h, grads by name)."""
    s, h = fn(*leaves, EPS, out_dtype)
    loss = (h.float() * grad_h.float()).sum()
    if grad_s is not None:
        loss = loss + (s.float() * grad_s.float()).sum()
    wanted = [(n, t) for n, t in zip(("x", "branch", "weight", "bias"), leaves) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, [t for _, t in wanted]) if wanted else ()
    return s, h, dict(zip([n for n, _ in wanted], grads))


# ---- validation -------------------------------------------------------------------------------------------

def _bad(**changes):
    x, branch, w, b = _inputs()
    args = dict(x=x, branch=branch, weight=w, bias=b, eps=EPS, out_dtype=None)
    args.update(changes)
    return args


BAD = [
    (dict(x=[1.0, 2.0]), TypeError, "x must be a tensor"),
    (dict(x=torch.randn(2, 5, 24).double(), branch=None), TypeError, "x must be fp32, fp16 or bf16"),
    (dict(x=torch.zeros(2, 5, 24, dtype=torch.int32), branch=None), TypeError, "x must be fp32"),
    (dict(x=torch.tensor(1.0), branch=None, weight=None, bias=None), ValueError, r"\[\.\.\., D\] with D >= 1"),
    (dict(x=torch.zeros(3, 0), branch=None, weight=None, bias=None), ValueError, "D >= 1"),
    (dict(branch=torch.randn(2, 5, 23)), ValueError, r"branch must have x's shape \(2, 5, 24\)"),
    (dict(branch=torch.randn(1, 5, 24)), ValueError, "branch must have x's shape"),  # no broadcasting
    (dict(branch=torch.randn(2, 5, 24).double()), TypeError, "branch must be fp32"),
    (dict(branch=[0.0]), TypeError, "branch must be a tensor or None"),
    (dict(branch=torch.randn(2, 5, 24, device="meta")), ValueError, "branch is on meta"),
    (dict(weight=torch.ones(23)), ValueError, r"weight must have shape \(24,\)"),
    (dict(bias=torch.zeros(1, 24)), ValueError, r"bias must have shape \(24,\)"),
    (dict(weight=torch.ones(24, dtype=torch.float64)), TypeError, "weight must be fp32"),
    (dict(bias=[0.0] * 24), TypeError, "bias must be a tensor or None"),
    (dict(bias=torch.zeros(24, device="meta")), ValueError, "bias is on meta"),
    (dict(eps=0.0), ValueError, "eps must be finite and positive"),
    (dict(eps=-1e-6), ValueError, "eps must be finite and positive"),
    (dict(eps=math.nan), ValueError, "eps must be finite and positive"),
    (dict(eps=torch.tensor(1e-6)), TypeError, "eps must be a python number"),
    (dict(eps=True), TypeError, "eps must be a python number"),
    (dict(out_dtype=torch.float64), TypeError, "out_dtype must be"),
    (dict(out_dtype="bfloat16"), TypeError, "out_dtype must be"),
]


@pytest.mark.parametrize("fn", [add_layer_norm, add_layer_norm_reference])
@pytest.mark.parametrize("changes,error,message", BAD)
def test_validation(fn, changes, error, message):
    args = _bad(**changes)
    with pytest.raises(error, match=message):
        fn(args["x"], args["branch"], args["weight"], args["bias"], args["eps"], args["out_dtype"])


# ---- the twin and the CPU path ----------------------------------------------------------------------------

@pytest.mark.parametrize("x_dtype,branch_dtype,out_dtype", [(F32, BF16, BF16), (F32, F32, None), (BF16, BF16, F32),
                                                            (F16, None, None), (F32, F16, F16)])
def test_twin_is_torchs_autocast_path(x_dtype, branch_dtype, out_dtype):
    x, branch, w, b = _inputs(x_dtype=x_dtype, branch_dtype=branch_dtype, seed=1)
    s, h = add_layer_norm_reference(x, branch, w, b, EPS, out_dtype)
    s_ref, h_ref = _torch_autocast_path(x, branch, w, b, out_dtype or s.dtype)
    assert s.dtype == s_ref.dtype and h.dtype == (out_dtype or s_ref.dtype)
    assert torch.equal(s, s_ref) and torch.equal(h, h_ref)
    if s.dtype == F32:  # the fp32 residual stream: CPU autocast keeps layer_norm in fp32 too (CUDA autocast
        with torch.autocast("cpu", dtype=BF16):  # always does; tests/gpu checks it for bf16 s)
            h_ac = F.layer_norm(x if branch is None else x + branch, (x.shape[-1],), w, b, EPS)
        assert h_ac.dtype == F32 and torch.equal(h, h_ac.to(h.dtype))


@pytest.mark.parametrize("forced", [None, "torch", "cext"])
def test_cpu_runs_the_twin_without_warnings(monkeypatch, launcher_calls, forced):
    if forced is None:
        monkeypatch.delenv("UNLEARN_FAST_BACKEND", raising=False)
    else:
        monkeypatch.setenv("UNLEARN_FAST_BACKEND", forced)
    monkeypatch.setattr(backend, "_said", set())  # a warning said earlier in the session would hide this one
    x, branch, w, b = _inputs(seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s, h = add_layer_norm(x, branch, w, b, EPS, BF16)
        leaves = _leaves((x, branch, w, b), ("x", "branch", "weight", "bias"))
        _, _, grads = _run(add_layer_norm, leaves, torch.ones_like(h), None, BF16)
    assert not launcher_calls
    s_ref, h_ref = add_layer_norm_reference(x, branch, w, b, EPS, BF16)
    assert torch.equal(s, s_ref) and torch.equal(h, h_ref)
    assert set(grads) == {"x", "branch", "weight", "bias"}


@pytest.mark.parametrize("grad", [False, True])
def test_s_is_x_without_a_branch_on_the_twin(grad):
    x, _, w, b = _inputs(seed=3)
    x.requires_grad_(grad)
    s, h = add_layer_norm(x, None, w, b)
    assert s is x and h.dtype == F32


def test_twin_gradients_match_float64():
    x, branch, w, b = _inputs(x_dtype=F32, branch_dtype=F32, seed=4)
    g = torch.Generator().manual_seed(5)
    grad_h, grad_s = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    leaves = _leaves((x, branch, w, b), ("x", "branch", "weight", "bias"))
    _, _, grads = _run(add_layer_norm_reference, leaves, grad_h, grad_s, F32)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, branch, w, b)]
    s64 = leaves64[0] + leaves64[1]
    h64 = F.layer_norm(s64, (x.shape[-1],), leaves64[2], leaves64[3], EPS)
    grads64 = torch.autograd.grad((h64 * grad_h.double()).sum() + (s64 * grad_s.double()).sum(), leaves64)
    for name, g64 in zip(("x", "branch", "weight", "bias"), grads64):
        assert_close_report(grads[name], g64, **TOL[F32], name=name)


# ---- the fused path (Triton; the interpreter on the CPU) --------------------------------------------------

REQUIRES = [("x", "branch", "weight", "bias"), ("x",), ("branch",), ("x", "branch"), ("weight", "bias"),
            ("weight",), ("bias",), ("x", "bias")]


@pytest.mark.parametrize("which", REQUIRES)
@pytest.mark.parametrize("x_dtype,branch_dtype,out_dtype", [(F32, BF16, BF16), (F32, F32, F32), (BF16, BF16, BF16)])
def test_fused_matches_the_twin(kernel_device, which, x_dtype, branch_dtype, out_dtype):
    device, calls = kernel_device
    tensors = _inputs((3, 7, 40), x_dtype, branch_dtype, device, seed=6)
    g = torch.Generator().manual_seed(7)
    grad_h = torch.randn(tensors[0].shape, generator=g).to(out_dtype).to(device)
    s_dtype = torch.promote_types(x_dtype, branch_dtype)  # s's gradient arrives in s's dtype
    grad_s = torch.randn(tensors[0].shape, generator=g).to(s_dtype).to(device)
    s, h, grads = _run(add_layer_norm, _leaves(tensors, which), grad_h, grad_s, out_dtype)
    assert calls == {"forward": 1, "backward": 1}
    s_ref, h_ref = add_layer_norm_reference(*tensors, EPS, out_dtype)
    assert s.dtype == s_ref.dtype and h.dtype == h_ref.dtype == out_dtype and s.requires_grad
    assert torch.equal(s, s_ref)  # (bf16 sums are exact here, see _inputs)
    assert_close_report(h, h_ref, **TOL[out_dtype], name="h")
    # gradients: the twin's on fp32 copies of x and branch (g_s + the norm's part summed in fp32, then rounded
    # once to each dtype, as the op specifies; torch's autograd through a bf16 add would round each part first)
    fp32_tensors = [t if i >= 2 or t is None else t.float() for i, t in enumerate(tensors)]
    _, _, grads_ref = _run(add_layer_norm_reference, _leaves(fp32_tensors, which), grad_h, grad_s, out_dtype)
    assert set(grads) == set(which)
    for name, grad in grads.items():
        ref = grads_ref[name]
        expected_dtype = dict(zip(("x", "branch", "weight", "bias"), tensors))[name].dtype
        assert grad.dtype == expected_dtype and grad.shape == ref.shape, name
        assert_close_report(grad, ref, **TOL[grad.dtype], name=f"grad {name}")


def test_fused_gradients_match_float64(kernel_device):
    device, _ = kernel_device
    x, branch, w, b = _inputs((2, 3, 33), F32, F32, device, seed=8)
    g = torch.Generator().manual_seed(9)
    grad_h, grad_s = torch.randn(x.shape, generator=g).to(device), torch.randn(x.shape, generator=g).to(device)
    _, _, grads = _run(add_layer_norm, _leaves((x, branch, w, b), ("x", "branch", "weight", "bias")), grad_h,
                       grad_s, F32)
    leaves64 = [t.detach().cpu().double().requires_grad_(True) for t in (x, branch, w, b)]
    s64 = leaves64[0] + leaves64[1]
    h64 = F.layer_norm(s64, (x.shape[-1],), leaves64[2], leaves64[3], EPS)
    grads64 = torch.autograd.grad((h64 * grad_h.cpu().double()).sum() + (s64 * grad_s.cpu().double()).sum(),
                                  leaves64)
    for name, g64 in zip(("x", "branch", "weight", "bias"), grads64):
        assert_close_report(grads[name], g64, **TOL[F32], name=name)
    assert torch.equal(grads["x"], grads["branch"])  # one gradient for both, as torch's add gives


def test_fused_without_a_branch_returns_x_and_adds_its_gradient(kernel_device):
    # s is x itself; s's gradient reaches x by autograd, h's through the kernel
    device, calls = kernel_device
    x, _, w, b = _inputs((4, 9, 20), F32, None, device, seed=10)
    g = torch.Generator().manual_seed(11)
    grad_h, grad_s = torch.randn(x.shape, generator=g).to(device), torch.randn(x.shape, generator=g).to(device)
    leaves = _leaves((x, None, w, b), ("x", "weight"))
    s, h, grads = _run(add_layer_norm, leaves, grad_h, grad_s, BF16)
    assert s is leaves[0] and h.dtype == BF16 and calls == {"forward": 1, "backward": 1}
    _, h_ref, grads_ref = _run(add_layer_norm_reference, _leaves((x, None, w, b), ("x", "weight")), grad_h, grad_s,
                               BF16)
    assert_close_report(h, h_ref, **TOL[BF16], name="h")
    for name in ("x", "weight"):
        assert_close_report(grads[name], grads_ref[name], **TOL[F32], name=name)
    with torch.no_grad():
        s, _ = add_layer_norm(x, None, w, b, EPS, BF16)
    assert s is x


def test_only_one_output_used(kernel_device):
    # h unused: s's gradient passes through the add (no launch), the weight gets none; s unused: h's alone
    device, calls = kernel_device
    x, branch, w, b = _inputs((3, 16), F32, BF16, device, seed=12)
    xs, bs, ws = (t.detach().clone().requires_grad_(True) for t in (x, branch, w))
    s, h = add_layer_norm(xs, bs, ws, b, EPS, BF16)
    gx, gb, gw = torch.autograd.grad((s * 3.0).sum(), (xs, bs, ws), retain_graph=True, allow_unused=True)
    assert gx.dtype == F32 and gb.dtype == BF16 and gw is None
    assert torch.equal(gx, torch.full_like(x, 3.0)) and torch.equal(gb, torch.full_like(branch, 3.0))
    assert calls["backward"] == 0
    gx, gw = torch.autograd.grad(h.float().sum(), (xs, ws))
    assert calls["backward"] == 1
    leaves = _leaves((x, branch, w, b), ("x", "weight"))
    gx_ref, gw_ref = torch.autograd.grad(add_layer_norm_reference(*leaves, EPS, BF16)[1].float().sum(),
                                         (leaves[0], leaves[2]))
    assert_close_report(gx, gx_ref, **TOL[F32], name="grad x")
    assert_close_report(gw, gw_ref, **TOL[F32], name="grad weight")


def test_teacher_style_no_grad_uses_the_forward_kernel_only(kernel_device):
    device, calls = kernel_device
    x, branch, w, b = _inputs((2, 5, 24), BF16, BF16, device, seed=13)
    w.requires_grad_(True)  # a frozen teacher's parameters may still require grad: no_grad decides
    with torch.no_grad():
        s, h = add_layer_norm(x, branch, w, b, EPS, BF16)
    with torch.inference_mode():
        s_inf, h_inf = add_layer_norm(x, branch, w, b, EPS, F32)
    s_plain, h_plain = add_layer_norm(x, branch, w.detach(), b, EPS)  # grad mode on, nothing requires grad
    assert calls == {"forward": 3, "backward": 0}
    assert not (s.requires_grad or h.requires_grad or h_plain.requires_grad)
    s_ref, h_ref = add_layer_norm_reference(x, branch, w.detach(), b, EPS, F32)
    for got_s, got_h in ((s, h), (s_inf, h_inf), (s_plain, h_plain)):
        assert_close_report(got_s, s_ref, **TOL[BF16], name="s")
        assert_close_report(got_h, h_ref, **TOL[got_h.dtype], name=f"h {got_h.dtype}")


def test_double_backward_is_refused(kernel_device):
    device, _ = kernel_device
    x, branch, w, b = _inputs((2, 8), F32, F32, device, seed=14)
    x.requires_grad_(True)
    _, h = add_layer_norm(x, branch, w, b)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad((h ** 2).sum(), x, create_graph=True)
    xr = x.detach().clone().requires_grad_(True)  # the twin has one
    (gx,) = torch.autograd.grad((add_layer_norm_reference(xr, branch, w, b)[1] ** 2).sum(), xr, create_graph=True)
    assert gx.requires_grad


def test_strided_inputs_and_awkward_shapes(kernel_device):
    device, calls = kernel_device
    x, branch, w, b = _inputs((4, 6, 10), F32, F32, device, seed=15)
    xt, bt = x.transpose(0, 1), branch.transpose(0, 1)  # [6, 4, 10] views, not contiguous
    s, h = add_layer_norm(xt, bt, w, b)
    s_ref, h_ref = add_layer_norm_reference(xt, bt, w, b)
    assert torch.equal(s, s_ref) and s.shape == (6, 4, 10)
    assert_close_report(h, h_ref, **TOL[F32])
    for shape in ((1,), (1, 1, 1), (5, 1), (3, 7)):  # one element, D = 1, one row
        x, branch, w, b = _inputs(shape, F32, F32, device, seed=16)
        s, h = add_layer_norm(x, branch, w, b)
        assert_close_report(h, add_layer_norm_reference(x, branch, w, b)[1], **TOL[F32], name=f"{shape}")
    assert calls["forward"] == 5


def test_empty_and_too_wide_inputs_use_the_twin(kernel_device, monkeypatch):
    device, calls = kernel_device
    x, branch, w, b = _inputs((0, 3, 16), F32, BF16, device)
    s, h = add_layer_norm(x, branch, w, b, EPS, BF16)
    assert s.shape == h.shape == (0, 3, 16) and h.dtype == BF16
    monkeypatch.setattr(backend, "_said", set())
    x, branch, w, b = _inputs((2, 8193), F32, None, device, seed=17)
    with pytest.warns(RuntimeWarning, match="beyond the Triton kernel's limit of 8192"):
        s, h = add_layer_norm(x, branch, w, b)
    assert calls["forward"] == 0 and s is x
    assert torch.equal(h, add_layer_norm_reference(x, branch, w, b)[1])
