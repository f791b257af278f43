"""Red-team checks of the bf16-weight teacher copy (train/half_teacher.py): it follows the teacher when its weights
are loaded in place or the teacher is replaced (a stale copy would guide the student with the old model), it
shares the non-matrix tensors instead of copying them, and normal steps never refresh it."""
from __future__ import annotations

import pytest
import torch

import unlearn_fast
import unlearn_fast.train.half_teacher as half_teacher_mod
from unlearn_fast.train.half_teacher import step_teacher
from unlearn_fast.train.step_fast import fast_step
from unlearn_fast.train.unlearn_setup import build_setup, make_teacher

pytestmark = pytest.mark.usefixtures("single_thread")


def _setup(name="mae_micro"):
    torch.manual_seed(0)
    return build_setup(unlearn_fast.create_model(name), "cpu", precision="bf16", forget_alpha=0.5)


def _qkv(m):
    return m.blocks[0].attn.qkv.weight


def test_copy_follows_weights_loaded_in_place():
    s = _setup()
    half = step_teacher(s)
    torch.manual_seed(7)
    s.teacher.load_state_dict(unlearn_fast.create_model("mae_micro").state_dict())
    again = step_teacher(s)
    assert again is half  # refreshed in place: a captured graph keeps reading the same tensors
    assert torch.equal(_qkv(again), _qkv(s.teacher).to(torch.bfloat16))


def test_copy_follows_a_replaced_teacher():
    s = _setup()
    step_teacher(s)
    torch.manual_seed(7)
    s.teacher = make_teacher(unlearn_fast.create_model("mae_micro"))
    half = step_teacher(s)
    assert torch.equal(_qkv(half), _qkv(s.teacher).to(torch.bfloat16))
    assert half.pos_embed is s.teacher.pos_embed


@pytest.mark.parametrize("name", ["mae_micro", "mage_micro"])
def test_non_matrix_tensors_are_shared_and_steps_do_not_refresh(name, monkeypatch):
    s = _setup(name)
    refreshes = []
    real = half_teacher_mod._refresh
    monkeypatch.setattr(half_teacher_mod, "_refresh", lambda h: refreshes.append(1) or real(h))
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for step in range(2):
        fast_step(s, images, torch.tensor([True, False, True, False]), step)
    half = s.half_teacher
    assert step_teacher(s) is half and refreshes == []
    teacher_tensors = {id(t) for t in list(s.teacher.parameters()) + list(s.teacher.buffers())}
    for n, p in half.named_parameters():
        assert (p.dtype == torch.bfloat16) != (id(p) in teacher_tensors), n  # bf16 copies, or the teacher's own
    assert all(id(b) in teacher_tensors for b in half.buffers())
