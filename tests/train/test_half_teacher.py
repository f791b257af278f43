"""The bf16-weight teacher copy of the fast step in bf16 mode (train/half_teacher.py): only matrix-product weights
change dtype, the teacher's outputs under bf16 autocast are bit-identical to the fp32 teacher's, the fast step
uses it in bf16 mode only, and its trajectory equals the one with the fp32 teacher bit for bit (CPU)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import unlearn_fast
from tests.helpers import max_param_diff
from unlearn_fast.train.half_teacher import step_teacher, with_half_gemm_weights
from unlearn_fast.train.step_fast import fast_step
from unlearn_fast.train.teacher_guides import teacher_hidden
from unlearn_fast.train.unlearn_setup import build_setup, make_teacher

pytestmark = pytest.mark.usefixtures("single_thread")

MODELS = {"mae_micro": dict(), "mage_micro": dict()}


def _model(name):
    torch.manual_seed(0)
    return unlearn_fast.create_model(name)


def _images(model, n=4):
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or model.config.get("img_size", 256)
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(MODELS))
def test_only_matrix_weights_change_dtype(name):
    teacher = make_teacher(_model(name))
    half = with_half_gemm_weights(teacher)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    for (n, p), (_, q) in zip(teacher.named_parameters(), half.named_parameters()):
        owner = half.get_submodule(n.rsplit(".", 1)[0]) if "." in n else half
        gemm = isinstance(owner, (nn.Linear, nn.Conv2d))
        assert q.dtype == (torch.bfloat16 if gemm else p.dtype), n
        assert not q.requires_grad
        assert torch.equal(q.float(), p.to(q.dtype).float()), n  # the same rounding autocast applies
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())  # the fp32 teacher is untouched


@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_under_bf16_autocast_are_bit_identical(name):
    teacher = make_teacher(_model(name))
    half = with_half_gemm_weights(teacher)
    images = _images(teacher)
    noise = torch.rand_like(images)
    task = teacher.sample_task(images, torch.Generator().manual_seed(2))
    is_forget = torch.tensor([True, False, False, True])
    rows = is_forget.nonzero().flatten()
    outs = []
    for t in (teacher, half):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(teacher_hidden(t, images, noise, None, task, is_forget, rows, share=False))
    assert outs[0].dtype == outs[1].dtype and torch.equal(outs[0], outs[1])


def test_fast_step_uses_the_copy_in_bf16_mode_only_and_keeps_the_trajectory(make_mae_micro):
    model = make_mae_micro()
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    is_forget = torch.tensor([True, False, True, False, False, True])
    ref = build_setup(copy.deepcopy(model), "cpu", lr=1e-3, precision="reference", forget_alpha=0.5)
    fast_step(ref, images, is_forget, 0)
    assert ref.half_teacher is None and step_teacher(ref) is ref.teacher

    runs = []
    for use_copy in (True, False):
        s = build_setup(copy.deepcopy(model), "cpu", lr=1e-3, precision="bf16", forget_alpha=0.5)
        s.half_teacher_weights = use_copy
        for step in range(3):
            fast_step(s, images, is_forget, step)
        assert (s.half_teacher is not None) == use_copy
        runs.append(s.student)
    assert max_param_diff(runs[0], model) > 0 and max_param_diff(*runs) == 0.0


def test_no_copy_is_made_or_refreshed_inside_a_graph_capture(make_mae_micro, monkeypatch):
    """Inside a capture the copy's kernels would only be recorded: a changed teacher there is a clear error."""
    setup = build_setup(make_mae_micro(), "cpu", precision="bf16")
    half = step_teacher(setup)  # made before any capture, as the graphed step does
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert step_teacher(setup) is half  # unchanged teacher: nothing to do, nothing refused
    with torch.no_grad():
        next(setup.teacher.parameters()).add_(1.0)  # weights changed in place
    with pytest.raises(RuntimeError, match="during a CUDA-graph capture"):
        step_teacher(setup)
    setup.teacher = make_teacher(make_mae_micro(seed=1))  # another teacher
    with pytest.raises(RuntimeError, match="during a CUDA-graph capture"):
        step_teacher(setup)
