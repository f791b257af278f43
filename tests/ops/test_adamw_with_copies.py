"""AdamW with half-precision copies (ops/adamw_with_copies.py): the Triton kernels (interpreter) and the twin
against torch's own AdamW (foreach off) stepping on ``float(grad) * coef``.

Tolerances: weights and moments within 1e-6 relative + 1e-7 absolute of torch's fused AdamW after three updates
(fp32 math in another order: the CPU kernel's moments as lerp, here as the CUDA kernel's ``b * m + (1 - b) * g``,
exp2 for the bias corrections; where the O(0.1) terms of a moment cancel, that shows at ~3e-8); the kernel and
the twin (one formula) within 1e-6 relative + 1e-9 absolute; the copies are the updated fp32 weights rounded to their
dtype, bit for bit (the kernel rounds bf16 by its bits: the interpreter's own fp32 -> bf16 cast truncates); the
sum of squares within 1e-6 relative of the fp64 sum.
"""
from __future__ import annotations

import pytest
import torch

from unlearn_fast.ops import adamw_with_copies as op
from unlearn_fast.ops.adamw_with_copies import (AddressTables, adamw_with_copies_, adamw_with_copies_reference,
                                                grad_sum_of_squares, grad_sum_of_squares_reference)

SHAPES = [(1,), (7,), (2048,), (2049,), (3, 5, 7), (64, 70)]  # one element, a chunk, a chunk and one, odd sizes
GROUPS = [0, 1, 1, 0, 1, 1]
LRS, WDS, BETAS, EPS = (1e-3, 3e-3), (0.0, 0.05), (0.9, 0.95), 1e-8


def _weights(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _torch_adamw(params, betas=BETAS):
    groups = [{"params": [p for p, gi in zip(params, GROUPS) if gi == i], "lr": LRS[i], "weight_decay": WDS[i]}
              for i in range(2)]
    return torch.optim.AdamW(groups, betas=betas, eps=EPS, fused=True)  # the fused kernel (its CPU form)


class _Run:
    """One set of weights, moments and step counts updated by ``adamw_with_copies_`` (kernel or twin)."""

    def __init__(self, params, copy_dtype, first_steps):
        self.params = [p.clone() for p in params]
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.steps = [torch.tensor(float(s)) for s in first_steps]
        self.copies = [torch.empty(p.shape, dtype=copy_dtype) for p in params]
        self.tables = AddressTables([p.numel() for p in params], GROUPS, "cpu")

    def update(self, grads, coef, twin=False, betas=BETAS):
        args = (self.params, self.m, self.v, self.steps, grads, self.copies, GROUPS, torch.tensor(LRS),
                torch.tensor(WDS), betas, EPS, coef)
        if twin:
            adamw_with_copies_reference(*args)
        else:
            adamw_with_copies_(*args, tables=self.tables)


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("copy_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("coef", [1.0, 0.37])
def test_kernel_and_twin_match_torch_adamw(monkeypatch, grad_dtype, copy_dtype, coef):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    start = _weights(0)
    kernel, twin = _Run(start, copy_dtype, [0] * 6), _Run(start, copy_dtype, [0] * 6)
    ref = [p.clone() for p in start]
    adamw = _torch_adamw(ref)
    g = torch.Generator().manual_seed(1)
    coef_t = torch.tensor(coef)
    for _ in range(3):
        grads = [torch.randn(s, generator=g).to(grad_dtype) for s in SHAPES]
        kernel.update(grads, coef_t)
        twin.update(grads, coef_t, twin=True)
        for p, gr in zip(ref, grads):
            p.grad = gr.float() * coef_t
        adamw.step()
    for run in (kernel, twin):
        for i, p in enumerate(ref):
            st = adamw.state[p]
            torch.testing.assert_close(run.params[i], p, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(run.m[i], st["exp_avg"], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(run.v[i], st["exp_avg_sq"], rtol=1e-6, atol=1e-7)
            assert run.steps[i].item() == st["step"].item() == 3.0
            assert torch.equal(run.copies[i], run.params[i].to(copy_dtype))  # round to nearest even, bit for bit
    for mine, twins in ((kernel.params, twin.params), (kernel.m, twin.m), (kernel.v, twin.v)):
        for x, y in zip(mine, twins):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)


def test_step_counts_are_per_tensor_and_beta_zero_works(monkeypatch):
    """Bias corrections read each tensor's own step count (a tensor restored at step 5 beside new ones), and
    beta1 = 0 (log2 0 = -inf: beta^t = 0) is torch's AdamW too."""
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    start = _weights(2)
    betas = (0.0, 0.95)
    run = _Run(start, torch.bfloat16, [5, 0, 0, 2, 0, 0])
    ref = [p.clone() for p in start]
    adamw = _torch_adamw(ref, betas)
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(s, generator=g).to(torch.bfloat16) for s in SHAPES]
    for p, gr, s in zip(ref, grads, [5, 0, 0, 2, 0, 0]):
        adamw.state[p].update(step=torch.tensor(float(s)), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        p.grad = gr.float()
    run.update(grads, torch.tensor(1.0), betas=betas)
    adamw.step()
    for mine, p in zip(run.params, ref):
        torch.testing.assert_close(mine, p, rtol=1e-6, atol=1e-7)


def test_nan_gradient_gives_nan_weights_and_nan_copies(monkeypatch):
    """As torch's AdamW without loss scaling: a NaN gradient makes the weight NaN; the bf16 copy is a NaN too
    (the rounding by bits must not turn a NaN into an infinity)."""
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    run = _Run(_weights(4), torch.bfloat16, [0] * 6)
    grads = [torch.ones(s, dtype=torch.bfloat16) for s in SHAPES]
    grads[3][5] = float("nan")
    run.update(grads, torch.tensor(1.0))
    assert torch.isnan(run.params[3][5]) and torch.isnan(run.copies[3][5].float())
    assert torch.isfinite(run.params[3][:5]).all() and torch.isfinite(run.copies[2].float()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sum_of_squares_matches_fp64(monkeypatch, dtype):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
    tables = AddressTables([t.numel() for t in grads], GROUPS, "cpu")
    want = sum(t.double().pow(2).sum() for t in grads)
    for got in (grad_sum_of_squares(grads, tables), grad_sum_of_squares_reference(grads)):
        assert got.dtype == torch.float32 and got.dim() == 0
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def test_tables_follow_new_tensors_and_defer_writes_in_a_capture(monkeypatch):
    """New gradient tensors each step (as autograd makes them) are pointed at before the kernel reads them; inside a
    CUDA-graph capture (simulated) the row is kept and written only by write_pending."""
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    grads = [torch.ones(s) for s in SHAPES]
    tables = AddressTables([t.numel() for t in grads], GROUPS, "cpu")
    assert grad_sum_of_squares(grads, tables).item() == sum(t.numel() for t in grads)
    twice = [2 * t for t in grads]
    assert grad_sum_of_squares(twice, tables).item() == 4 * sum(t.numel() for t in grads)
    row = op._ROLES.index("grad")
    monkeypatch.setattr(op, "_capturing", lambda device: True)
    thrice = [3 * t for t in grads]
    tables.point_at("grad", thrice)
    assert tables.addresses[row].tolist() == [t.data_ptr() for t in twice]  # not written during the capture
    tables.write_pending()
    assert tables.addresses[row].tolist() == [t.data_ptr() for t in thrice]


def test_bad_arguments_are_named(monkeypatch):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    run = _Run(_weights(6), torch.bfloat16, [0] * 6)
    good = [torch.zeros(s, dtype=torch.bfloat16) for s in SHAPES]
    with pytest.raises(ValueError, match="grads: 5 tensors for 6 weights"):
        run.update(good[:5], torch.tensor(1.0))
    with pytest.raises(TypeError, match="grads must be one dtype"):
        run.update(good[:-1] + [torch.zeros(SHAPES[-1])], torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"grads\[5\] has strides \(1, 64\), its weight \(70, 1\)"):
        run.update(good[:-1] + [torch.zeros(SHAPES[-1][::-1], dtype=torch.bfloat16).t()], torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"grads\[5\] must be dense"):
        run.update(good[:-1] + [torch.zeros(64, 140, dtype=torch.bfloat16)[:, ::2]], torch.tensor(1.0))
    with pytest.raises(ValueError, match="coef must be a 0-d fp32 tensor"):
        run.update(good, torch.tensor([1.0]))
    run.steps[0] = torch.tensor(0, dtype=torch.int64)
    with pytest.raises(ValueError, match="steps must be one 0-d fp32 tensor per weight"):
        run.update(good, torch.tensor(1.0))
    with pytest.raises(ValueError, match="tensor sizes must be >= 1"):
        AddressTables([3, 0], [0, 0], "cpu")
    tables = AddressTables([4], [0], "cpu")
    with pytest.raises(ValueError, match="other tensor sizes"):
        grad_sum_of_squares([torch.ones(5)], tables)
