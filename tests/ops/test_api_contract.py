"""The Python API as a library user calls it (README "Python API"): ops, build_setup, the steps, the registry.

Each test pins one contract found broken by a red-team pass: awkward but valid input gives the reference's
numbers, bad input gives one clear error that names the argument (not a traceback from deep inside, and never
a silently wrong result). Tests marked ``op_backend`` run with UNLEARN_FAST_BACKEND=torch and with the
machine's default (the C++ extension on CPU).

Tolerances: fp32 results against the fp32 plain-PyTorch restatement to rtol 1e-5 / atol 1e-6 (reduction
order only); equal-bits where both sides run the same code.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from tests.helpers import assert_close_report, tol
from unlearn_fast import create_model
from unlearn_fast.ops import (batch_mean_std, forget_mask, group_norm_silu, multi_map_retain_forget_l2_loss,
                              multi_map_retain_forget_l2_loss_reference, retain_forget_l2_loss,
                              retain_forget_l2_loss_compact, retain_forget_l2_loss_prenorm,
                              retain_forget_l2_loss_reference, sample_batch_noise)
from unlearn_fast.train.step_baseline import baseline_step
from unlearn_fast.train.step_fast import fast_step
from unlearn_fast.train.step_graphed import GraphedUnlearnStep
from unlearn_fast.train.step_reference import reference_step
from unlearn_fast.train.unlearn_setup import build_setup

pytestmark = pytest.mark.usefixtures("single_thread")

F32 = tol(torch.float32)


def _plain(latent, guide, noise_guide, is_forget):
    """(2/N)·Σ_retain mean((x−g)²), (2/N)·Σ_forget mean((x−n)²) in fp64: REFERENCE.md §1.3 restated."""
    n = latent.shape[0]
    x, g, q = (t.detach().double().reshape(n, -1) for t in (latent, guide, noise_guide))
    return 2.0 / n * (x - g).pow(2).mean(1)[~is_forget].sum(), 2.0 / n * (x - q).pow(2).mean(1)[is_forget].sum()


def _loss_and_grad(fn, latent):
    x = latent.detach().clone().requires_grad_(True)
    r, f = fn(x)
    (0.3 * r + 0.7 * f).backward()
    return r.detach(), f.detach(), x.grad


# ---- loss ops: compact tables with zero rows, awkward layouts ------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 3, 7), (3, 2, 3, 5)])
@pytest.mark.parametrize("all_forget", [True, False])
def test_compact_and_prenorm_take_a_table_with_zero_rows(op_backend, shape, all_forget):
    # guide[~is_forget] of an all-forget batch is [0, T, D]: its reshape to [0, -1, D] raised before
    g = torch.Generator().manual_seed(1)
    x, guide, noise = (torch.randn(shape, generator=g) for _ in range(3))
    is_forget = torch.full((shape[0],), all_forget)
    want = _plain(x, guide, noise, is_forget)
    r, f = retain_forget_l2_loss_compact(x, guide[~is_forget], noise[is_forget], is_forget)
    assert_close_report(torch.stack([r, f]), torch.stack(want), **F32, name="compact")
    d = shape[-1]
    w, b = torch.randn(d, generator=g), torch.randn(d, generator=g)
    ln = lambda t: torch.nn.functional.layer_norm(t, (d,), w, b, 1e-6)  # noqa: E731
    want = _plain(x, ln(guide), ln(noise), is_forget)
    r, f = retain_forget_l2_loss_prenorm(x, guide[~is_forget], noise[is_forget], is_forget, w, b, 1e-6)
    assert_close_report(torch.stack([r, f]), torch.stack(want), **F32, name="prenorm")


def _layouts():
    g = torch.Generator().manual_seed(2)
    base = [torch.randn(5, 3, 4, 6, generator=g) for _ in range(3)]
    cl = [t.to(memory_format=torch.channels_last) for t in base]
    expanded = [t[:1].expand(5, 3, 4, 6) for t in base]  # stride 0 over the batch
    transposed = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in base]
    return {"channels_last": cl, "expanded": expanded, "transposed": transposed,
            "mixed": [cl[0], expanded[1], transposed[2]]}


@pytest.mark.parametrize("layout", ["channels_last", "expanded", "transposed", "mixed"])
def test_loss_ops_on_strided_inputs_equal_the_reference(op_backend, layout):
    x, guide, noise = _layouts()[layout]
    is_forget = torch.tensor([True, False, False, True, False])
    want = _loss_and_grad(lambda t: retain_forget_l2_loss_reference(t, guide, noise, is_forget), x)
    for name, fn in [("full", lambda t: retain_forget_l2_loss(t, guide, noise, is_forget)),
                     ("compact", lambda t: retain_forget_l2_loss_compact(t, guide[~is_forget], noise[is_forget],
                                                                         is_forget)),
                     ("multi_map", lambda t: multi_map_retain_forget_l2_loss([t], [torch.where(
                         is_forget.view(-1, 1, 1, 1), noise, guide)], is_forget))]:
        got = _loss_and_grad(fn, x)
        scale = 1.0 if name != "multi_map" else 0.5  # mse over one map = (1/2)·the (1±s) form
        for a, e, what in zip(got, want, ("retain", "forget", "grad")):
            assert_close_report(a, e * scale, **F32, name=f"{layout} {name} {what}")


def test_loss_ops_under_torch_compile_equal_eager(op_backend):
    # a graph break is allowed; a crash or a different number is not
    g = torch.Generator().manual_seed(3)
    x, guide, noise = (torch.randn(4, 3, 6, generator=g) for _ in range(3))
    is_forget = torch.tensor([True, False, True, False])
    fn = lambda t: retain_forget_l2_loss_compact(t, guide[~is_forget], noise[is_forget], is_forget)  # noqa: E731
    eager = _loss_and_grad(fn, x)
    torch._dynamo.reset()
    compiled = _loss_and_grad(torch.compile(fn, backend="aot_eager"), x)
    for a, e in zip(compiled, eager):
        assert_close_report(a, e, **F32, name="compiled")


# ---- loss ops: bad arguments ----------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [None, "1e-6", -1.0, float("nan"), float("inf"), True])
def test_prenorm_eps_is_checked_on_every_backend(op_backend, eps):
    # the torch backend returned NaN losses for eps -1 / nan, and None / str died in float()
    x = torch.randn(3, 2, 4)
    is_forget = torch.tensor([True, False, False])
    with pytest.raises(ValueError, match="eps"):
        retain_forget_l2_loss_prenorm(x, x[~is_forget], x[is_forget], is_forget, torch.ones(4), torch.zeros(4), eps)


def test_prenorm_eps_zero_is_a_valid_layer_norm(op_backend):
    x, h = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    is_forget = torch.tensor([False, True, False])
    w, b = torch.ones(4) * 2, torch.zeros(4)
    want = _plain(x, torch.nn.functional.layer_norm(h, (4,), w, b, 0.0),
                  torch.nn.functional.layer_norm(h, (4,), w, b, 0.0), is_forget)
    r, f = retain_forget_l2_loss_prenorm(x, h[~is_forget], h[is_forget], is_forget, w, b, 0)
    assert_close_report(torch.stack([r, f]), torch.stack(want), **F32)


def test_a_meta_bool_mask_is_a_clear_error(op_backend):
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="meta"):
        retain_forget_l2_loss(x, x, x, torch.tensor([True, False], device="meta"))
    with pytest.raises(ValueError, match="meta"):
        forget_mask(torch.tensor([True], device="meta"), 1, "cpu")


def test_multi_map_twin_refuses_unpaired_maps():
    # zip() dropped the unpaired student map: the twin returned a loss over map 0 alone
    s = [torch.randn(2, 3), torch.randn(2, 4)]
    f = torch.tensor([True, False])
    with pytest.raises(ValueError, match="same non-zero number"):
        multi_map_retain_forget_l2_loss_reference(s, s[:1], f)
    with pytest.raises(ValueError, match="same non-zero number"):
        multi_map_retain_forget_l2_loss_reference([], [], f)
    with pytest.raises(ValueError, match="map 1"):
        multi_map_retain_forget_l2_loss_reference(s, [s[0], s[1][:, :2]], f)


def test_noise_and_moments_name_bad_arguments():
    images = torch.rand(2, 3, 4, 4)
    with pytest.raises(TypeError, match="low and high"):
        sample_batch_noise(images, low="0")
    with pytest.raises(TypeError, match="low and high"):
        sample_batch_noise(images, seed=0, high=None)
    with pytest.raises(ValueError, match="non-empty tensor"):
        batch_mean_std([0.5, 0.25])
    with pytest.raises(ValueError, match="non-empty tensor"):
        batch_mean_std(torch.zeros(0, 3))
    # numbers of other types are fine: a numpy float and a 0-d tensor clamp like python floats
    np = pytest.importorskip("numpy")
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    want = sample_batch_noise(images, generator=g(), low=0.25, high=0.75)
    assert torch.equal(sample_batch_noise(images, generator=g(), low=np.float64(0.25), high=torch.tensor(0.75)), want)
    assert float(want.min()) >= 0.25 and float(want.max()) <= 0.75


def test_group_norm_of_a_single_value_is_a_clear_error():
    # torch's own message blamed "training"; the fused kernel would have normalised it to the bias
    with pytest.raises(ValueError, match="one group of one value"):
        group_norm_silu(torch.randn(1, 2, 1, 1), 2, None, None, 1e-6, silu=True)
    out = group_norm_silu(torch.zeros(0, 2, 1, 1), 2, None, None, 1e-6, silu=True)  # empty batch: empty output
    assert out.shape == (0, 2, 1, 1)


# ---- build_setup ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,err,word", [
    (dict(device="gpu0"), ValueError, "device"),
    (dict(device=None), ValueError, "device"),
    (dict(accum_iter=2.5), TypeError, "accum_iter"),
    (dict(lr="1e-4"), TypeError, "--lr"),
    (dict(lr=float("nan")), ValueError, "--lr"),
    (dict(weight_decay=-0.05), ValueError, "weight_decay"),
    (dict(grad_clip=0.0), ValueError, "grad_clip"),
    (dict(grad_clip=-3.0), ValueError, "grad_clip"),  # a negative clip flipped every gradient before
    (dict(forget_alpha="0.2"), TypeError, "forget_alpha"),
    (dict(retain_alpha=float("inf")), ValueError, "retain_alpha"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(rank=-1), ValueError, "rank"),
])
def test_build_setup_names_the_bad_argument(make_mae_micro, kwargs, err, word):
    kwargs = dict(kwargs)
    device = kwargs.pop("device", "cpu")
    with pytest.raises(err, match=word):
        build_setup(make_mae_micro(), device, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_build_setup_on_cuda_without_a_gpu_says_so(make_mae_micro):
    with pytest.raises(ValueError, match="CUDA is not available"):
        build_setup(make_mae_micro(), "cuda")


def test_build_setup_refuses_what_is_not_an_i2i_model(make_mae_micro):
    with pytest.raises(TypeError, match="model must be a model from unlearn_fast.create_model"):
        build_setup(torch.nn.Linear(2, 2), "cpu")
    with pytest.raises(TypeError, match="model must be"):
        build_setup("mae_micro", "cpu")
    with pytest.raises(TypeError, match="teacher must be"):
        build_setup(make_mae_micro(), "cpu", teacher=torch.nn.Linear(2, 2))


def test_build_setup_refuses_the_model_as_its_own_teacher(make_mae_micro):
    m = make_mae_micro()
    with pytest.raises(ValueError, match="teacher is the model itself"):  # said "no trainable parameters" before
        build_setup(m, "cpu", teacher=m)
    with pytest.raises(ValueError, match="differ in architecture"):
        build_setup(m, "cpu", teacher=make_mae_micro(input_size=48))
    setup = build_setup(m, "cpu", teacher=make_mae_micro(seed=1))  # same architecture: fine
    assert not setup.teacher.training and not any(p.requires_grad for p in setup.teacher.parameters())


def test_build_setup_on_a_frozen_encoder_says_what_is_frozen(make_mae_micro):
    m = make_mae_micro().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable encoder parameter"):
        build_setup(m, "cpu")


@pytest.mark.parametrize("precision", ["bf16", "reference"])
def test_a_setup_pickles_and_copies_after_a_step(make_mae_micro, precision):
    # bf16's cached teacher copy held a weakref: pickle / torch.save of the setup failed after the first step
    setup = build_setup(make_mae_micro(), "cpu", precision=precision, forget_alpha=0.2)
    images, is_forget = torch.rand(4, 3, 32, 32), torch.tensor([True, False, True, False])
    fast_step(setup, images, is_forget, 0)
    buf = io.BytesIO()
    torch.save(setup, buf)
    for other in (pickle.loads(pickle.dumps(setup)), copy.deepcopy(setup)):
        assert other.teacher_stream is None and other.half_teacher is None  # caches are remade on first use
        assert torch.equal(other.student.blocks[0].attn.qkv.weight, setup.student.blocks[0].attn.qkv.weight)
        assert other.student.blocks[0].attn.qkv.weight is not setup.student.blocks[0].attn.qkv.weight
        a, b = fast_step(other, images, is_forget, 1), fast_step(copy.deepcopy(setup), images, is_forget, 1)
        assert all(torch.equal(u, v) for u, v in zip(a, b))


# ---- the steps ------------------------------------------------------------------------------------------------

@pytest.fixture
def setup_and_batch(make_mae_micro):
    setup = build_setup(make_mae_micro(), "cpu", forget_alpha=0.2, precision="fp32")
    return setup, torch.rand(4, 3, 32, 32), torch.tensor([True, False, True, False])


@pytest.mark.parametrize("labels", [torch.tensor([-100, 100, -100, 100]), torch.tensor([-1, 1, -1, 1]),
                                    torch.tensor([-100.0, 100.0, -100.0, 100.0])])
@pytest.mark.parametrize("step_fn", [fast_step, reference_step, baseline_step])
def test_steps_refuse_labels_as_is_forget(setup_and_batch, labels, step_fn):
    # fast_step cast them with .to(bool): every row became a forget row and the retain loss was 0
    setup, images, _ = setup_and_batch
    before = [p.detach().clone() for p in setup.trainable]
    with pytest.raises((ValueError, TypeError), match="labels < 100"):
        step_fn(setup, images, labels, 0)
    assert all(torch.equal(p, q) for p, q in zip(setup.trainable, before))  # nothing was trained


@pytest.mark.parametrize("step_fn", [fast_step, reference_step])
def test_steps_name_a_bad_mask_or_batch(setup_and_batch, step_fn):
    setup, images, is_forget = setup_and_batch
    with pytest.raises(ValueError, match="is_forget must be a tensor"):
        step_fn(setup, images, is_forget[:3], 0)  # fast_step failed deep in teacher_guides before
    with pytest.raises(ValueError, match="is_forget must be a tensor"):
        step_fn(setup, images, [True, False, True, False], 0)
    with pytest.raises(ValueError, match="images must be a non-empty tensor"):
        step_fn(setup, list(images), is_forget, 0)
    with pytest.raises(ValueError, match="images must be a non-empty tensor"):
        step_fn(setup, images[:0], is_forget[:0], 0)
    with pytest.raises(ValueError, match="step must be >= 0"):
        step_fn(setup, images, is_forget, -1)
    with pytest.raises(TypeError, match="step must be an int"):
        step_fn(setup, images, is_forget, 1.5)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("step_fn", [fast_step, reference_step])
def test_steps_under_no_grad_say_they_train(setup_and_batch, mode, step_fn):
    setup, images, is_forget = setup_and_batch
    with getattr(torch, mode)(), pytest.raises(RuntimeError, match="needs autograd"):
        step_fn(setup, images, is_forget, 0)


def test_steps_take_an_integer_mask_and_batch_one_like_a_bool_mask(setup_and_batch, make_mae_micro):
    setup, images, is_forget = setup_and_batch
    twin = build_setup(make_mae_micro(), "cpu", forget_alpha=0.2, precision="fp32")
    a = fast_step(setup, images, is_forget.to(torch.uint8), 0)
    b = fast_step(twin, images, is_forget, 0)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    one = fast_step(setup, images[:1], torch.tensor([1]), 1)  # N = 1, forget
    ref = reference_step(twin, images[:1], torch.tensor([True]), 1)
    assert float(one.retain) == 0.0 and float(ref.retain) == 0.0
    assert_close_report(one.forget, ref.forget, rtol=1e-4, atol=1e-6, name="N=1 forget loss")


def test_graphed_step_refuses_the_cpu_and_a_changed_image_shape(setup_and_batch):
    setup, images, is_forget = setup_and_batch
    with pytest.raises(ValueError, match="need a CUDA device.*cpu.*fast_step"):
        GraphedUnlearnStep(setup, 4, 2, (3, 32, 32), noise_seed=0)
    # the per-call check runs before anything touches CUDA: an instance with only its static shape
    graphed = GraphedUnlearnStep.__new__(GraphedUnlearnStep)
    graphed.image_shape = (3, 32, 32)
    assert torch.equal(graphed.check_batch(images, is_forget.long(), 0), is_forget)
    with pytest.raises(ValueError, match=r"changed shape: \(3, 48, 48\).*\(3, 32, 32\)"):
        graphed.check_batch(torch.rand(4, 3, 48, 48), is_forget, 0)  # index_select(out=) resized the buffer
    with pytest.raises(ValueError, match="labels < 100"):
        graphed.check_batch(images, torch.tensor([-100, 100, -100, 100]), 0)
    with pytest.raises(TypeError, match="floating point"):
        graphed.check_batch(images.to(torch.uint8), is_forget, 0)


# ---- the registry -------------------------------------------------------------------------------------------

def test_create_model_names_the_model_a_bad_keyword_was_for():
    with pytest.raises(TypeError, match=r"create_model\('mae_micro'\).*'depthh'"):
        create_model("mae_micro", depthh=3)
    with pytest.raises(ValueError, match="unknown model"):
        create_model(["mae_micro"])  # unhashable: was a TypeError from the dict lookup


def test_create_model_refuses_two_different_sizes():
    """``input_size`` is the reference flag's name for ``img_size``: both, unequal, was one silently dropped."""
    with pytest.raises(ValueError, match="give one"):
        create_model("mae_micro", input_size=32, img_size=64)
    assert create_model("mae_micro", input_size=48, img_size=48).patch_embed.img_size in (48, (48, 48))
