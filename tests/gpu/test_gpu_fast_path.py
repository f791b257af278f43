"""GPU checks of the fast path (skipped without CUDA): fused kernels against their twins on the device,
the CUDA-graph step against the eager fast step, the fast step against the reference step.

Tolerances: fp32 1e-5 relative (reduction order only), fp16/bf16 latents: the kernel computes in fp32 from
the same low-precision inputs, so 1e-3 relative on the losses and one ulp-ish on gradients (2e-2 rel).
"""
from __future__ import annotations

import copy

import pytest
import torch

import unlearn_fast
from unlearn_fast.ops import (retain_forget_l2_loss, retain_forget_l2_loss_prenorm, retain_forget_l2_loss_reference,
                              sample_batch_noise)
from unlearn_fast.train.step_fast import fast_step
from unlearn_fast.train.step_graphed import GraphedUnlearnStep
from unlearn_fast.train.step_reference import reference_step
from unlearn_fast.train.unlearn_setup import build_setup

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LOSS_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend", ["triton", "cext"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,forget", [((64, 129, 768), "half"), ((1, 5, 37), "all"), ((7, 3, 1000), "none"),
                                          ((33, 50, 1024), "half")])
def test_fused_loss_matches_twin_on_gpu(monkeypatch, backend, dtype, shape, forget):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", backend)
    if backend == "cext":
        from unlearn_fast.kernels.extension import extension_has_cuda, load_extension
        if load_extension() is None or not extension_has_cuda():
            pytest.skip("extension built without CUDA")
    g = torch.Generator(device="cuda").manual_seed(0)
    n = shape[0]
    x = torch.randn(shape, device="cuda", generator=g).to(dtype).requires_grad_(True)
    guide = torch.randn(shape, device="cuda", generator=g)
    ng = torch.randn(shape, device="cuda", generator=g)
    is_forget = {"half": torch.arange(n, device="cuda") % 2 == 0, "all": torch.ones(n, dtype=torch.bool, device="cuda"),
                 "none": torch.zeros(n, dtype=torch.bool, device="cuda")}[forget]
    r, f = retain_forget_l2_loss(x, guide, ng, is_forget)
    (0.3 * r + 0.7 * f).backward()
    gx = x.grad.clone()
    x.grad = None
    rr, ff = retain_forget_l2_loss_reference(x.double(), guide.double(), ng.double(), is_forget)
    (0.3 * rr + 0.7 * ff).backward()
    assert abs(r.item() - rr.item()) <= LOSS_TOL[dtype] * max(abs(rr.item()), 1e-12)
    assert abs(f.item() - ff.item()) <= LOSS_TOL[dtype] * max(abs(ff.item()), 1e-12)
    assert gx.dtype == dtype
    assert _rel(gx, x.grad) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("backend", ["triton", "cext"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prenorm_loss_matches_twin_on_gpu(monkeypatch, backend, dtype):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", backend)
    if backend == "cext":
        from unlearn_fast.kernels.extension import extension_has_cuda, load_extension
        if load_extension() is None or not extension_has_cuda():
            pytest.skip("extension built without CUDA")
    n, t, d = 16, 129, 768
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(n, t, d, device="cuda", generator=g).requires_grad_(True)
    is_forget = torch.arange(n, device="cuda") % 3 == 0
    ln = torch.nn.LayerNorm(d, eps=1e-6).cuda()
    with torch.no_grad():
        ln.weight.normal_(1, 0.1, generator=g)
        ln.bias.normal_(0, 0.1, generator=g)
    hr = torch.randn(int((~is_forget).sum()), t, d, device="cuda", generator=g).to(dtype)
    hf = torch.randn(int(is_forget.sum()), t, d, device="cuda", generator=g).to(dtype)
    r, f = retain_forget_l2_loss_prenorm(x, hr, hf, is_forget, ln.weight, ln.bias, ln.eps)
    guide = torch.zeros(n, t, d, device="cuda")
    guide[~is_forget] = ln(hr.float()).detach()
    ng = torch.zeros(n, t, d, device="cuda")
    ng[is_forget] = ln(hf.float()).detach()
    rr, ff = retain_forget_l2_loss_reference(x, guide, ng, is_forget)
    assert abs(r.item() - rr.item()) <= 1e-4 * rr.item()
    assert abs(f.item() - ff.item()) <= 1e-4 * ff.item()


def test_philox_noise_on_gpu_reproducible_and_normal():
    x = torch.rand(64, 3, 224, 224, device="cuda")
    a = sample_batch_noise(x, seed=3, step=5)
    b = sample_batch_noise(x, seed=3, step=torch.tensor(5, device="cuda"))
    c = sample_batch_noise(x, seed=3, step=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min().item() >= 0.0 and a.max().item() <= 1.0
    wide = torch.randn(1 << 20, device="cuda") * 0.1 + 0.5
    z = sample_batch_noise(wide.view(1, -1), seed=1, step=0, low=-100, high=100)
    assert abs(z.mean().item() - wide.mean().item()) < 1e-3
    assert abs(z.std().item() / wide.std().item() - 1) < 1e-2


def _comparable(model):
    """Parameters to compare between trajectories. The key third of each qkv bias has an exactly zero true
    gradient (softmax is invariant to a per-query constant), so its gradient is pure rounding noise that
    AdamW normalises into lr-sized steps: it is left out."""
    for name, p in model.named_parameters():
        if name.endswith("attn.qkv.bias"):
            d = p.shape[0] // 3
            yield torch.cat([p[:d], p[2 * d:]])
        else:
            yield p


def _mae_setups(precision, fast=True, capturable=True, overlap=(True, True), model="mae_micro"):
    torch.manual_seed(0)
    m = unlearn_fast.create_model(model)
    mk = lambda o: build_setup(copy.deepcopy(m), "cuda", lr=1e-3, precision=precision, forget_alpha=0.5,  # noqa: E731
                               fast=fast, capturable=capturable, overlap_teacher=o)
    return mk(overlap[0]), mk(overlap[1])


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("reference", 5e-3), ("bf16", 2e-2)])
def test_graphed_step_matches_eager_fast_step(precision, tol):
    a, b = _mae_setups(precision)
    n, nf = 16, 8
    graphed = GraphedUnlearnStep(b, n, nf, (3, 32, 32), noise_seed=7, warmup=2)
    g = torch.Generator().manual_seed(0)
    for step in range(8):
        images = torch.rand(n, 3, 32, 32, generator=g)
        is_forget = torch.arange(n) < nf  # already forget-first: same row order in both
        fast_step(a, images, is_forget, step, noise_seed=7)
        graphed(images, is_forget, step, 1e-3)
    assert graphed.graph is not None
    diffs = [_rel(p, q) for p, q in zip(_comparable(a.student), _comparable(b.student))]
    assert max(diffs) <= tol, max(diffs)


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("reference", 5e-3)])
def test_fast_step_matches_reference_step_20_steps(precision, tol):
    a, b = _mae_setups(precision, fast=False, capturable=False)
    b2 = build_setup(b.student, "cuda", lr=1e-3, precision=precision, forget_alpha=0.5, fast=True,
                     teacher=a.teacher)
    g = torch.Generator().manual_seed(0)
    for step in range(20):
        images = torch.rand(16, 3, 32, 32, generator=g)
        is_forget = torch.rand(16, generator=g) < 0.5
        reference_step(a, images, is_forget, step)
        fast_step(b2, images, is_forget, step)
    diffs = [_rel(p, q) for p, q in zip(_comparable(a.student), _comparable(b2.student))]
    assert max(diffs) <= tol, max(diffs)


@pytest.mark.parametrize("model,precision", [("mae_micro", "reference"), ("mage_micro", "reference"),
                                             ("mage_micro", "bf16")])
@pytest.mark.parametrize("graphed", [False, True])
def test_teacher_on_side_stream_equals_sequential_teacher(model, precision, graphed):
    # the same kernels in the same order on each stream: the overlapped step computes what the sequential one does
    a, b = _mae_setups(precision, overlap=(True, False), model=model)
    assert a.overlap_teacher and not b.overlap_teacher
    size = 32
    n, nf = 8, 4
    steppers = [GraphedUnlearnStep(x, n, nf, (3, size, size), noise_seed=7, warmup=2) for x in (a, b)] if graphed \
        else None
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        images = torch.rand(n, 3, size, size, generator=g)
        is_forget = torch.arange(n) < nf
        for i, x in enumerate((a, b)):
            if graphed:
                steppers[i](images, is_forget, step, 1e-3)
            else:
                fast_step(x, images, is_forget, step, noise_seed=7)
    assert a.teacher_stream.concurrent and not b.teacher_stream.concurrent
    diffs = [_rel(p, q) for p, q in zip(_comparable(a.student), _comparable(b.student))]
    assert max(diffs) <= 1e-6, max(diffs)


@pytest.mark.parametrize("model,option", [("mae_micro", "fuse_block_norms"), ("mage_micro", "fuse_block_norms"),
                                          ("mage_micro", "tokenizer_channels_last")])
def test_opt_in_fast_paths_capture_and_keep_the_trajectory(model, option):
    """The opt-in paths (``--fused_block_norms``, ``--channels_last_tokenizer``) capture into the CUDA-graph step,
    and after 6 bf16 steps it ends where the eager fast step without them ends (2e-2, as graphed vs eager bf16)."""
    a, b = _mae_setups("bf16", model=model)
    setattr(b, option, True)
    n, nf = 8, 4
    graphed = GraphedUnlearnStep(b, n, nf, (3, 32, 32), noise_seed=7, warmup=2)
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        images = torch.rand(n, 3, 32, 32, generator=g)
        is_forget = torch.arange(n) < nf
        fast_step(a, images, is_forget, step, noise_seed=7)
        graphed(images, is_forget, step, 1e-3)
    assert graphed.graph is not None
    diffs = [_rel(p, q) for p, q in zip(_comparable(a.student), _comparable(b.student))]
    assert max(diffs) <= 2e-2, max(diffs)
