"""The public API on bad and unusual input: one clear error, or the right numbers on every backend.

Covers the loss ops (full / compact / prenorm / multi-map), sample_batch_noise's seed and step, the objective
helpers that take ``is_forget``, and strict state-dict loading. Tests marked ``op_backend`` run with
UNLEARN_FAST_BACKEND=torch and with the machine's default (the C++ extension on CPU); ``triton_backend`` forces
the Triton kernels (Triton's interpreter on a CPU-only machine, small shapes only).

Tolerances: fp64 results are compared with an fp64 restatement to 1e-12 relative; fp32 results to 1e-5.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from unlearn_fast.models import create_model
from unlearn_fast.models.state_dict_io import load_state_dict_strict
from unlearn_fast.objective import split_token_loss, tile_retain_rows, unlearn_loss_merged_guide, unlearn_loss_pruned
from unlearn_fast.objective.palette_loss import palette_unlearn_loss, weighted_mse_loss
from unlearn_fast.ops import (multi_map_retain_forget_l2_loss, retain_forget_l2_loss, retain_forget_l2_loss_compact,
                              retain_forget_l2_loss_prenorm, retain_forget_l2_loss_reference, sample_batch_noise)

IS_FORGET = torch.tensor([True, False, True, False, False])  # N = 5: 2 forget, 3 retain


def _plain_losses(latent, guide, noise_guide, is_forget):
    """(2/N)·Σ_retain mean((x−g)²), (2/N)·Σ_forget mean((x−n)²): REFERENCE.md §1.3 restated."""
    n = latent.shape[0]
    m = (latent - guide).pow(2).reshape(n, -1).mean(1)
    f = (latent - noise_guide).pow(2).reshape(n, -1).mean(1)
    return 2.0 / n * m[~is_forget].sum(), 2.0 / n * f[is_forget].sum()


def _inputs(dtype=torch.float32, shape=(5, 3, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g).to(dtype) for _ in range(3))


# ---- is_forget ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("labels", [torch.tensor([-1, 1, -1, 1, 1]), torch.tensor([-100, 100, -100, 100, 100])])
def test_signs_or_labels_as_is_forget_are_refused_not_read_as_all_forget(op_backend, labels):
    # int ±1 / ±100 converted with .bool() made every row a forget row (retain loss 0)
    x, g, n = _inputs()
    with pytest.raises(ValueError, match="labels < 100"):
        retain_forget_l2_loss(x, g, n, labels)
    with pytest.raises(ValueError, match="only 0"):
        retain_forget_l2_loss_compact(x, g[:3], n[:2], labels)
    with pytest.raises(ValueError, match="only 0"):
        multi_map_retain_forget_l2_loss([x], [g], labels)
    with pytest.raises(ValueError, match="only 0"):
        weighted_mse_loss(x, g, labels, 0.1)
    with pytest.raises(ValueError, match="only 0"):
        split_token_loss(x[:, 0], torch.ones(5, 7), labels)
    with pytest.raises(ValueError, match="only 0"):
        tile_retain_rows(x, labels)  # ~int is a bitwise not: it indexed rows by -2, 0, ... before
    with pytest.raises(TypeError, match="bool"):
        retain_forget_l2_loss(x, g, n, labels.float())


def test_integer_zero_one_mask_equals_the_bool_mask(op_backend):
    x, g, n = _inputs()
    for a, b in zip(retain_forget_l2_loss(x, g, n, IS_FORGET.long()), retain_forget_l2_loss(x, g, n, IS_FORGET)):
        assert torch.equal(a, b)
    r, f = split_token_loss(x[:, 0], torch.ones(5, 7), IS_FORGET.to(torch.uint8))
    r2, f2 = split_token_loss(x[:, 0], torch.ones(5, 7), IS_FORGET)
    assert torch.equal(r, r2) and torch.equal(f, f2)


# ---- shapes and dtypes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0)])
def test_empty_latent_is_a_value_error(op_backend, shape):
    z = torch.zeros(shape)
    with pytest.raises(ValueError, match="no elements"):
        retain_forget_l2_loss(z, z, z, torch.zeros(shape[0], dtype=torch.bool))


def test_integer_latent_is_a_type_error(op_backend):
    x = torch.ones(5, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="floating point"):
        retain_forget_l2_loss(x, x, x, IS_FORGET)


def test_fp64_runs_on_every_backend_in_fp64(op_backend):
    x, g, n = _inputs(torch.float64)
    want = _plain_losses(x, g, n, IS_FORGET)
    xa = x.clone().requires_grad_()
    r, f = retain_forget_l2_loss(xa, g, n, IS_FORGET)
    assert r.dtype == torch.float64
    torch.testing.assert_close((r, f), want, rtol=1e-12, atol=0)
    (r + 2 * f).backward()
    xb = x.clone().requires_grad_()
    sum(w * t for w, t in zip((1, 2), _plain_losses(xb, g, n, IS_FORGET))).backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=0)
    # fp32 latent with an fp64 guide, and Palette's weighted MSE on fp64 maps
    torch.testing.assert_close(retain_forget_l2_loss(x.float(), g, n, IS_FORGET),
                               tuple(t.float() for t in want), rtol=1e-5, atol=0)
    out = weighted_mse_loss(x, g, IS_FORGET, 0.5)
    torch.testing.assert_close(out.retain, want[0] / 2, rtol=1e-12, atol=0)


def test_fp64_prenorm_and_compact(op_backend):
    x, h, _ = _inputs(torch.float64)
    w, b = torch.rand(7, dtype=torch.float64) + 0.5, torch.randn(7, dtype=torch.float64)
    ln = torch.nn.functional.layer_norm(h, (7,), w, b, 1e-6)
    want = _plain_losses(x, ln, ln, IS_FORGET)
    got = retain_forget_l2_loss_prenorm(x, h[~IS_FORGET], h[IS_FORGET], IS_FORGET, w, b, 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    got = retain_forget_l2_loss_compact(x, h[~IS_FORGET], h[IS_FORGET], IS_FORGET)
    torch.testing.assert_close(got, _plain_losses(x, h, h, IS_FORGET), rtol=1e-12, atol=0)


def test_mixed_table_dtypes_on_triton(triton_backend):
    # the Triton kernel reads both tables with one type: a bf16 guide and an fp16 noise guide were refused
    x, g, n = _inputs(shape=(5, 3, 8))
    got = retain_forget_l2_loss(x, g.bfloat16(), n.half(), IS_FORGET)
    want = _plain_losses(x, g.bfloat16().float(), n.half().float(), IS_FORGET)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_fp64_norm_params_on_triton(triton_backend):
    x, h, _ = _inputs(shape=(5, 3, 8))
    w, b = torch.rand(8, dtype=torch.float64) + 0.5, torch.randn(8, dtype=torch.float64)
    got = retain_forget_l2_loss_prenorm(x, h[~IS_FORGET], h[IS_FORGET], IS_FORGET, w, b, 1e-6)
    ln = torch.nn.functional.layer_norm(h, (8,), w.float(), b.float(), 1e-6)
    torch.testing.assert_close(got, _plain_losses(x, ln, ln, IS_FORGET), rtol=1e-5, atol=0)


def test_beyond_the_triton_row_and_norm_limits_falls_back(triton_backend):
    # N > 65535 rows (grid axis 1) and a fused norm with D > MAX_NORM_D raised ValueError from the kernel
    gen = torch.Generator().manual_seed(1)
    n_rows = 65536 + 3
    x, g, n = (torch.randn(n_rows, 2, generator=gen) for _ in range(3))
    mask = torch.arange(n_rows) % 3 == 0
    with pytest.warns(RuntimeWarning, match="limits"):
        got = retain_forget_l2_loss(x, g, n, mask)
    torch.testing.assert_close(got, _plain_losses(x, g, n, mask), rtol=1e-5, atol=0)
    from unlearn_fast.kernels import MAX_NORM_D
    d = MAX_NORM_D + 1
    x, h = torch.randn(2, 1, d, generator=gen), torch.randn(2, 1, d, generator=gen)
    m2 = torch.tensor([True, False])
    w, b = torch.ones(d), torch.zeros(d)
    got = retain_forget_l2_loss_prenorm(x, h[1:], h[:1], m2, w, b, 1e-6, row_index=torch.tensor([0, 0]))
    ln = torch.nn.functional.layer_norm(h, (d,), w, b, 1e-6)
    torch.testing.assert_close(got, _plain_losses(x, ln, ln, m2), rtol=1e-5, atol=0)


# ---- compact / prenorm arguments -------------------------------------------------------------------------------

def test_compact_row_index_is_checked(op_backend):
    x, g, n = _inputs()
    cases = [(torch.tensor([-1, 0, 0, 1, 2]), ValueError, "negative"),
             (torch.tensor([0.0, 0, 1, 1, 2]), TypeError, "integer"),
             (torch.tensor([[0, 0, 1, 1, 2]]), ValueError, "row_index"),
             (torch.tensor([0, 0, 1]), ValueError, "row_index"),
             ([0, 0, 1, 1, 2], ValueError, "row_index")]
    for idx, err, word in cases:
        with pytest.raises(err, match=word):
            retain_forget_l2_loss_compact(x, g[:3], n[:2], IS_FORGET, row_index=idx)
    with pytest.raises(TypeError, match="guide_rows"):
        retain_forget_l2_loss_compact(x, "abc", n[:2], IS_FORGET)
    with pytest.raises(ValueError, match="norm"):
        retain_forget_l2_loss_prenorm(x, g[:3], n[:2], IS_FORGET, None, None, 1e-6)


def test_compact_guides_that_require_grad_get_gradients(op_backend):
    # the docstring promised the twin for guides that require grad; compact/prenorm detached them silently
    x, h, _ = _inputs()
    rows_r = h[~IS_FORGET].clone().requires_grad_()
    rows_f = (2 * h[IS_FORGET]).clone().requires_grad_()
    r, f = retain_forget_l2_loss_compact(x, rows_r, rows_f, IS_FORGET)
    (r + f).backward()
    full = torch.empty_like(h)
    full[~IS_FORGET], full[IS_FORGET] = h[~IS_FORGET], 2 * h[IS_FORGET]
    ref = full.clone().requires_grad_()
    sum(retain_forget_l2_loss_reference(x, ref, ref, IS_FORGET)).backward()
    torch.testing.assert_close(rows_r.grad, ref.grad[~IS_FORGET], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(rows_f.grad, ref.grad[IS_FORGET], rtol=1e-5, atol=1e-8)
    w, b = torch.rand(7) + 0.5, torch.randn(7)
    rows_r.grad = None
    sum(retain_forget_l2_loss_prenorm(x, rows_r, rows_f.detach(), IS_FORGET, w, b, 1e-6)).backward()
    assert rows_r.grad is not None and rows_r.grad.abs().sum() > 0


# ---- double backward -----------------------------------------------------------------------------------------

def test_double_backward_raises_instead_of_dropping_the_second_derivative(op_backend):
    x, g, n = _inputs()
    xa = x.clone().requires_grad_()
    r, f = retain_forget_l2_loss(xa, g, n, IS_FORGET)
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(r + f, xa, create_graph=True)
    ya = x.clone().requires_grad_()
    r, f = multi_map_retain_forget_l2_loss([ya], [g], IS_FORGET)
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(r + f, ya, create_graph=True)
    # the twin has one: d²/dx² of (2/N)·mean((x−g)²) summed over a retain row is 4/(N·T·D) per element
    xb = x.clone().requires_grad_()
    gx, = torch.autograd.grad(retain_forget_l2_loss_reference(xb, g, n, IS_FORGET)[0], xb, create_graph=True)
    hess_diag, = torch.autograd.grad(gx.sum(), xb)
    torch.testing.assert_close(hess_diag[1], torch.full((3, 7), 4.0 / (5 * 3 * 7)))


# ---- sample_batch_noise: seed and step ---------------------------------------------------------------------

@pytest.mark.parametrize("kw,err", [(dict(seed=-1), ValueError), (dict(seed=2 ** 64), ValueError),
                                    (dict(seed=0, step=-1), ValueError), (dict(seed=0, step=2 ** 32), ValueError),
                                    (dict(seed=1.5), TypeError), (dict(seed="1"), TypeError),
                                    (dict(seed=True), TypeError), (dict(seed=0, step=3.0), TypeError),
                                    (dict(seed=0, step=torch.tensor(3.0)), ValueError),
                                    (dict(seed=0, step=torch.tensor([1, 2])), ValueError)])
def test_seed_and_step_are_checked_as_on_the_gpu(op_backend, kw, err):
    # the CPU path took any of these (floats truncated, seeds and steps wrapped), the GPU kernel refuses them
    with pytest.raises(err, match="seed|step"):
        sample_batch_noise(torch.rand(2, 3, 4, 4), "normal", **kw)


def test_numpy_and_tensor_keys_equal_python_ints(op_backend):
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    want = sample_batch_noise(x, "normal", seed=7, step=3)
    assert torch.equal(sample_batch_noise(x, "normal", seed=np.int64(7), step=np.uint32(3)), want)
    assert torch.equal(sample_batch_noise(x, "normal", seed=7, step=torch.tensor(3)), want)
    top = sample_batch_noise(x, "normal", seed=2 ** 64 - 1, step=2 ** 32 - 1)  # the largest key and counter
    assert top.shape == x.shape and not torch.equal(top, want)


def test_noise_range_and_generator_are_checked():
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="low <= high"):
        sample_batch_noise(x, "normal", seed=0, low=1.0, high=0.0)  # torch.clamp would return all `high`
    with pytest.raises(TypeError, match="torch.Generator"):
        sample_batch_noise(x, "normal", 0)


# ---- objective inputs ----------------------------------------------------------------------------------------

def test_palette_loss_wants_lists_of_maps():
    x, g, _ = _inputs()
    with pytest.raises(TypeError, match="list or tuple"):
        palette_unlearn_loss(x, g, IS_FORGET)  # a bare tensor hit `if not tensor` deep inside
    with pytest.raises(ValueError, match="differ in shape"):
        split_token_loss(x[:, 0], torch.ones(5, 6), IS_FORGET)


def test_final_norm_without_affine_parameters(op_backend):
    # LayerNorm(elementwise_affine=False) has weight None: an AttributeError deep inside before
    x, h, _ = _inputs()
    norm = torch.nn.LayerNorm(7, elementwise_affine=False)
    want = _plain_losses(x, norm(h), norm(h), IS_FORGET)
    got = unlearn_loss_merged_guide(x, h, IS_FORGET, 1.0, 0.5, final_norm=norm)
    torch.testing.assert_close((got.retain, got.forget), want, rtol=1e-5, atol=0)
    got = unlearn_loss_pruned(x, h[~IS_FORGET], h[IS_FORGET], IS_FORGET, 1.0, 0.5, final_norm=norm)
    torch.testing.assert_close((got.retain, got.forget), want, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="final_norm"):
        unlearn_loss_merged_guide(x, h, IS_FORGET, final_norm=torch.nn.LayerNorm(6))


# ---- state dicts -----------------------------------------------------------------------------------------------

def test_meta_model_loads_an_fp16_file_as_its_own_dtype():
    # assign=True kept the file's fp16 tensors: fp16 master weights, unlike a load into a built model
    state = {k: v.half() if v.is_floating_point() else v for k, v in create_model("mae_micro").state_dict().items()}
    with torch.device("meta"):
        model = create_model("mae_micro")
    load_state_dict_strict(model, state, "file")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not model.pos_embed.requires_grad and model.cls_token.requires_grad
    torch.testing.assert_close(model.cls_token, state["cls_token"].float())


def test_state_dict_errors_name_the_problem():
    model = create_model("mae_micro")
    state = model.state_dict()
    with pytest.raises(ValueError, match="module\\."):
        load_state_dict_strict(model, {"module." + k: v for k, v in state.items()}, "ddp file")
    with pytest.raises(ValueError, match="1 unexpected keys \\(1\\)"):  # a non-str key: was a TypeError in join
        load_state_dict_strict(model, {**state, 1: torch.zeros(1)}, "file")


def test_a_seed_passed_in_the_generator_place_names_the_keywords():
    """sample_batch_noise(x, "normal", 3): the third place is a torch.Generator; seed/step are keywords."""
    from unlearn_fast.ops import sample_batch_noise
    with pytest.raises(TypeError, match=r"got int \(the counter-based draw takes keywords: .*seed=\.\.\., step="):
        sample_batch_noise(torch.rand(2, 3, 4, 4), "normal", 3)
