"""multi_map_retain_forget_l2_loss against its PyTorch twin (in float64) and Palette's reference loss.

Each test runs on the plain-PyTorch contract and on the machine's default backend (the C++ extension on a
CPU machine where it is built; see the ``op_backend`` fixture). The Triton backend is tested under the
interpreter in tests/kernels/test_triton_multi_map_l2.py, the GPU paths in tests/gpu.

Tolerances (fused op vs the float64 twin on the same input values):
- losses: fp32 accumulation of the same low-precision inputs -> rtol 1e-5, atol 1e-7, any input dtype.
- student gradients: rounded twice into the maps' dtype (the stored 2(s−t), then the scaled value):
  fp32 rtol 1e-5, fp16 2e-3, bf16 1.6e-2; fp16 gradients ~2(s−t)/numel are subnormal -> atol 2^-24 (one step).
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close_report
from unlearn_fast.objective.palette_loss import palette_unlearn_loss_terms, palette_unlearn_loss_terms_reference
from unlearn_fast.ops import multi_map_retain_forget_l2_loss, multi_map_retain_forget_l2_loss_reference
from unlearn_fast.ops.backend import extension

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # "extension not built" notice

LOSS = dict(rtol=1e-5, atol=1e-7)
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GRAD_ATOL = {torch.float32: 1e-10, torch.float16: 2.0 ** -24, torch.bfloat16: 1e-10}
ODD = [(3, 5, 7)]
# Palette's 13 encoder maps, shrunk, with odd sizes (the real ones at a tiny scale are tested below)
PALETTE_LIKE_13 = [(4, 33, 35), (4, 9, 9), (4, 9, 9), (4, 5, 5), (8, 5, 5), (8, 5, 5), (8, 3, 3), (16, 3, 3),
                   (16, 3, 3), (16, 2, 2), (32, 1, 1), (32, 1, 1), (3, 5, 7)]
FLAGS = {"mixed": lambda n: torch.arange(n) % 3 == 1, "all_forget": lambda n: torch.ones(n, dtype=torch.bool),
         "all_retain": lambda n: torch.zeros(n, dtype=torch.bool)}


@pytest.fixture(scope="module")
def palette_tiny_shapes():
    """The 13 encoder map shapes (C, H, W) of a real Palette UNet (channel_mults [1, 2, 4, 8], 2 res blocks,
    as Places2) at inner_channel 32 on 24² images: odd sizes 3², 6², 12²."""
    from unlearn_fast import create_model
    from unlearn_fast.models.palette import PaletteBatch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model("palette", unet=dict(inner_channel=32, channel_mults=[1, 2, 4, 8], res_blocks=2,
                                                  attn_res=[], num_head_channels=32, image_size=24),
                             beta_schedule=dict(train=dict(schedule="linear", n_timestep=4, linear_start=1e-4,
                                                           linear_end=0.02)))
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(1, 3, 24, 24, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 24, 24)
    mask[..., 4:12, 2:12] = 1
    batch = PaletteBatch(gt, mask, gt * (1 - mask) + mask * torch.randn(gt.shape, generator=g))
    with torch.no_grad():
        feats = model.forward_encoder_features(batch, model.sample_task(batch, generator=g))
    return [tuple(f.shape[1:]) for f in feats]


def _maps(n, shapes, dtype, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((n,) + tuple(s), generator=g) * scale + shift).to(dtype) for s in shapes]


def _check_against_twin_and_reference(students, teachers, is_forget, dtype):
    """Forward values and student gradients of the fused op vs the float64 twin and Palette's reference."""
    leaves = [s.detach().clone().requires_grad_(True) for s in students]
    r, f = multi_map_retain_forget_l2_loss(leaves, teachers, is_forget)
    (0.3 * r + 1.7 * f).backward()
    s64 = [s.detach().double().requires_grad_(True) for s in students]
    rr, ff = multi_map_retain_forget_l2_loss_reference(s64, [t.double() for t in teachers], is_forget)
    (0.3 * rr + 1.7 * ff).backward()
    ref = palette_unlearn_loss_terms_reference([s.detach().float() for s in students], [t.float() for t in teachers],
                                               is_forget, 0.1)
    assert r.dtype == f.dtype == torch.float32 and r.dim() == f.dim() == 0
    assert_close_report(r, rr, name="retain", **LOSS)
    assert_close_report(f, ff, name="forget", **LOSS)
    assert_close_report(r, ref.retain, name="retain vs palette reference", **LOSS)
    assert_close_report(f, ref.forget, name="forget vs palette reference", **LOSS)
    for k, (a, b) in enumerate(zip(leaves, s64)):
        assert a.grad.dtype == dtype and a.grad.shape == a.shape
        assert_close_report(a.grad, b.grad, rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL[dtype], name=f"grad {k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("which", ["mixed", "all_forget", "all_retain"])
@pytest.mark.parametrize("n,shapes", [(4, PALETTE_LIKE_13), (1, PALETTE_LIKE_13), (3, ODD), (1, ODD)])
def test_matches_twin_and_palette_reference(op_backend, dtype, which, n, shapes):
    is_forget = FLAGS[which](n)
    _check_against_twin_and_reference(_maps(n, shapes, dtype, 1), _maps(n, shapes, dtype, 2, 1.5, 0.25),
                                      is_forget, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_palette_tiny_maps(op_backend, palette_tiny_shapes, dtype):
    assert len(palette_tiny_shapes) == 13
    assert palette_tiny_shapes[0] == (32, 24, 24) and palette_tiny_shapes[-1] == (256, 3, 3)
    n = 3
    _check_against_twin_and_reference(_maps(n, palette_tiny_shapes, dtype, 3),
                                      _maps(n, palette_tiny_shapes, dtype, 4), torch.tensor([False, True, False]),
                                      dtype)


def test_hand_computed_value():
    # map 0 [2, 1]: diffs 1 (retain), 2 (forget); map 1 [2, 2]: diffs (1, 1) retain, (3, 0) forget
    s = [torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0, 1.0], [3.0, 0.0]])]
    t = [torch.zeros(2, 1), torch.zeros(2, 2)]
    r, f = multi_map_retain_forget_l2_loss(s, t, torch.tensor([False, True]))
    assert r.item() == pytest.approx(1 / 2 + 2 / 4)
    assert f.item() == pytest.approx(4 / 2 + 9 / 4)


def test_teacher_requiring_grad_falls_back_and_reaches_teacher(op_backend):
    n, is_forget = 3, torch.tensor([True, False, True])
    s = [x.requires_grad_(True) for x in _maps(n, ODD + [(2, 2, 2)], torch.float32, 5)]
    t = [x.requires_grad_(True) for x in _maps(n, ODD + [(2, 2, 2)], torch.float32, 6)]
    r, f = multi_map_retain_forget_l2_loss(s, t, is_forget)
    (r + f).backward()
    for a, b in zip(s, t):
        assert b.grad is not None
        torch.testing.assert_close(b.grad, -a.grad)  # d/dt (s − t)² = −d/ds


def test_non_contiguous_maps_and_integer_labels(op_backend):
    n = 4
    base_s = _maps(n, [(7, 5, 3)], torch.float32, 7)[0]
    base_t = _maps(n, [(7, 5, 3)], torch.float32, 8)[0]
    s = [base_s.transpose(1, 3).requires_grad_(True)]  # non-contiguous [4, 3, 5, 7]
    t = [base_t.transpose(1, 3)]
    r, f = multi_map_retain_forget_l2_loss(s, t, torch.tensor([0, 1, 1, 0]))
    rr, ff = multi_map_retain_forget_l2_loss_reference(s, t, torch.tensor([False, True, True, False]))
    assert_close_report(r, rr, name="retain", **LOSS)
    assert_close_report(f, ff, name="forget", **LOSS)
    r.backward()
    assert s[0].grad.shape == s[0].shape


def test_only_students_requiring_grad_get_one_and_backward_twice(op_backend):
    n, is_forget = 2, torch.tensor([False, True])
    s = _maps(n, [(3, 4, 5), (2, 3, 3)], torch.float32, 9)
    s[1].requires_grad_(True)
    t = _maps(n, [(3, 4, 5), (2, 3, 3)], torch.float32, 10)
    r, f = multi_map_retain_forget_l2_loss(s, t, is_forget)
    (r + f).backward(retain_graph=True)
    first = s[1].grad.clone()
    (r + f).backward()  # the stored 2(s−t) is not scaled in place
    torch.testing.assert_close(s[1].grad, 2 * first)
    assert s[0].grad is None


def test_float64_maps_use_the_twin_math(op_backend):
    s = [x.requires_grad_(True) for x in _maps(2, ODD, torch.float64, 11)]
    t = _maps(2, ODD, torch.float64, 12)
    r, f = multi_map_retain_forget_l2_loss(s, t, torch.tensor([True, False]))
    rr, ff = multi_map_retain_forget_l2_loss_reference(s, t, torch.tensor([True, False]))
    assert r.dtype == torch.float64
    torch.testing.assert_close(r, rr)
    torch.testing.assert_close(f, ff)


def test_palette_terms_make_one_fused_call(monkeypatch):
    """palette_unlearn_loss_terms runs the extension's multi-map kernel once for all 13 maps, not per map."""
    ext = extension()
    if ext is None or not hasattr(ext, "multi_map_l2_forward"):
        pytest.skip("unlearn_fast._C with multi_map_l2_forward is not built")
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "cext")
    calls = []
    real = ext.multi_map_l2_forward

    def spy(students, teachers, *args):
        calls.append(len(students))
        return real(students, teachers, *args)

    def per_map(*args, **kwargs):
        raise AssertionError("per-map op called")

    monkeypatch.setattr(ext, "multi_map_l2_forward", spy)
    monkeypatch.setattr(ext, "retain_forget_l2_forward", per_map)
    s = [x.requires_grad_(True) for x in _maps(2, PALETTE_LIKE_13, torch.float32, 13)]
    out = palette_unlearn_loss_terms(s, _maps(2, PALETTE_LIKE_13, torch.float32, 14), torch.tensor([True, False]))
    out.loss.backward()
    assert calls == [13]


def test_bad_inputs():
    s = _maps(2, [(3, 5, 7), (2, 2, 2)], torch.float32, 15)
    t = _maps(2, [(3, 5, 7), (2, 2, 2)], torch.float32, 16)
    f = torch.tensor([True, False])
    with pytest.raises(ValueError, match="non-zero number"):
        multi_map_retain_forget_l2_loss([], [], f)
    with pytest.raises(ValueError, match="non-zero number"):
        multi_map_retain_forget_l2_loss(s, t[:1], f)
    with pytest.raises(ValueError, match="map 1"):
        multi_map_retain_forget_l2_loss(s, [t[0], t[1][:, :1]], f)
    with pytest.raises(ValueError, match="N = 1"):
        multi_map_retain_forget_l2_loss([s[0], s[1][:1]], [t[0], t[1][:1]], f)
    with pytest.raises(TypeError, match="one dtype"):
        multi_map_retain_forget_l2_loss([s[0], s[1].half()], [t[0], t[1].half()], f)
    with pytest.raises(TypeError, match="one dtype"):
        multi_map_retain_forget_l2_loss(s, [t[0], t[1].bfloat16()], f)
    with pytest.raises(TypeError, match="floating point"):
        multi_map_retain_forget_l2_loss([x.long() for x in s], [x.long() for x in t], f)
    with pytest.raises(ValueError, match="no elements"):
        multi_map_retain_forget_l2_loss([s[0][:, :0]], [t[0][:, :0]], f)
    with pytest.raises(TypeError, match="list or tuple"):
        multi_map_retain_forget_l2_loss(s[0], t[0], f)
    with pytest.raises(TypeError, match="must be tensors"):
        multi_map_retain_forget_l2_loss([s[0], 1.0], [t[0], 1.0], f)
    with pytest.raises(ValueError, match="is_forget"):
        multi_map_retain_forget_l2_loss(s, t, torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="is_forget"):
        multi_map_retain_forget_l2_loss(s, t, [True, False])
    with pytest.raises(TypeError, match="bool"):
        multi_map_retain_forget_l2_loss(s, t, torch.tensor([1.0, -1.0]))
