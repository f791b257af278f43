"""Red team of the opt-in bf16 student copy (train/half_student.py, ops/adamw_with_copies.py), on the CPU.

Each test of a fault says what was wrong and what is expected; each failed before its fix (session 16) and guards
it now. The other tests record what was checked and found sound.

Comparisons are of ONE fast update with and without ``half_student_weights`` (from the second update on, the
attention's key bias, whose gradient is zero but for rounding, drifts by design): every trainable tensor within
1e-6 relative (the same forward bits, torch's AdamW math in another order; measured ~1e-7). Where the fault shows
in a later step, the copy is made first with ``step_student`` (no update) so that the compared update is still the
first. Default backend (the twin on the CPU) unless a test names Triton (interpreter, tests/conftest.py).
"""
from __future__ import annotations

import copy
import gc
import io
import pickle
import weakref

import pytest
import torch

import unlearn_fast
from unlearn_fast.ops.adamw_with_copies import AddressTables, adamw_with_copies_, adamw_with_copies_reference
from unlearn_fast.train import half_student as hs
from unlearn_fast.train.checkpoint import (load_checkpoint_file, load_model_state, model_state_from,
                                           save_unlearn_checkpoint)
from unlearn_fast.train.step_fast import fast_step
from unlearn_fast.train.unlearn_setup import build_setup

IS_FORGET = torch.tensor([True, False, True, False, False, True])
TOL = 1e-6


@pytest.fixture(scope="module")
def mae():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return unlearn_fast.create_model("mae_micro")


@pytest.fixture(scope="module")
def mage():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return unlearn_fast.create_model("mage_micro")


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(6, 3, 32, 32, generator=g) for _ in range(3)]


def _setup(model, half=True, **kw):
    model = copy.deepcopy(model)
    return build_setup(model, "cpu", lr=1e-3, precision="bf16", forget_alpha=0.5, fast=True,
                       half_student_weights=half, teacher=copy.deepcopy(model), **kw)


def _pair(model, **kw):
    return _setup(model, half=False, **kw), _setup(model, half=True, **kw)


def _distance(a, b) -> float:
    """Largest relative L2 distance over the trainable tensors of two setups' students."""
    pb = dict(b.student.named_parameters())
    return max(((p - pb[n]).norm() / pb[n].norm().clamp_min(1e-30)).item()
               for n, p in a.student.named_parameters() if p.requires_grad)


def _names(setup):
    return [n for n, p in setup.student.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------------------------
# Faults found by the red team (each failed before its fix)
# ----------------------------------------------------------------------------------------------------------------

def test_a_weight_frozen_after_the_copy_was_made_is_not_trained(mae, batches):
    """FAULT: ``requires_grad_(False)`` on student weights after the half student exists (freezing a block mid-run)
    does not stop the kernel from training them: the bf16 copies are leaves that still require grad, get gradients,
    and ``half_student_update`` applies them to the frozen fp32 masters. ``HalfStudent.follows`` does not look at
    the masters' ``requires_grad``. Expected: as without the knob, a frozen weight gets no gradient and no update
    (e.g. rebuild the copy, or mirror ``requires_grad`` onto the copies, when the flags change)."""
    plain, half = _pair(mae)
    hs.step_student(half)  # the copy exists (as after a first step), no update yet
    before = {}
    for s in (plain, half):
        for p in s.student.blocks[0].parameters():
            p.requires_grad_(False)
        before[id(s)] = [p.detach().clone() for p in s.student.blocks[0].parameters()]
        fast_step(s, batches[0], IS_FORGET, 0)
    assert all(torch.equal(b, p) for b, p in zip(before[id(plain)], plain.student.blocks[0].parameters()))
    changed = [n for (n, p), b in zip(half.student.blocks[0].named_parameters(), before[id(half)])
               if not torch.equal(b, p)]
    assert not changed, f"frozen weights trained through their bf16 copies: {changed}"


def test_zero_grad_after_a_step_without_update_clears_the_copies_gradients(mae, batches):
    """FAULT: ``fast_step(update=False)`` leaves the GEMM weights' gradients on the hidden bf16 copies, where
    ``optimizer.zero_grad()`` (and ``student.zero_grad()``, the trainer's zero_grad at an epoch start) cannot reach
    them; the next step's backward adds to them (in bf16) and the update applies both steps' gradients. Without the
    knob the zero_grad drops them. Root cause: the copies are not in the optimizer; nothing clears them but
    ``half_student_update``. Expected: the update after zero_grad uses only the new step's gradients (e.g. refuse
    ``update=False`` while the copy is active, or hand the copies' gradients to the masters' ``.grad``)."""
    plain, half = _pair(mae)
    try:
        fast_step(half, batches[0], IS_FORGET, 0, update=False)
    except ValueError as e:  # a clear refusal is a fix too
        assert "half_student" in str(e), str(e)
        return
    for s in (plain, half):
        if s is plain:
            fast_step(s, batches[0], IS_FORGET, 0, update=False)
        s.optimizer.zero_grad(set_to_none=True)
        fast_step(s, batches[1], IS_FORGET, 1)
    d = _distance(plain, half)
    assert d <= TOL, d


def test_a_stale_gradient_on_a_master_is_not_applied_as_a_second_adamw_step(mae, batches):
    """FAULT: a gradient already on a student weight before a fast step (a ``reference_step(update=False)``, a
    user's own backward through the student, ``restore_accumulated_grads`` on resume) is applied by the plain
    ``opt.step()`` that ``half_student_update`` runs for the "other" parameters, after the kernel already updated
    that weight: two AdamW steps in one update, ``state['step']`` 2 after one step. Without the knob the old
    gradient is summed with the new one into one step. Expected: one update per step (state step 1), the masters'
    pending gradients folded into the kernel's gradient (or the masters' ``.grad`` cleared/refused before
    ``opt.step()``)."""
    plain, half = _pair(mae)
    for s in (plain, half):
        w = s.student.blocks[0].mlp.fc1.weight
        w.grad = torch.full_like(w, 1e-3)
        try:
            fast_step(s, batches[0], IS_FORGET, 0)
        except ValueError as e:  # refused before any work, naming the knob: a fix too
            assert s is half and "half_student" in str(e) and w.grad is not None, str(e)
            return
    w = half.student.blocks[0].mlp.fc1.weight
    assert half.optimizer.state[w]["step"].item() == 1.0, "two AdamW steps in one update"
    d = _distance(plain, half)
    assert d <= TOL, d


@pytest.mark.parametrize("layout", ["transposed_linear", "channels_last_conv"])
def test_a_non_contiguous_weight_trains_or_the_knob_is_declined_up_front(mae, batches, layout):
    """FAULT: a student weight that is not contiguous (a ``channels_last`` student, whose patch-embed conv weight
    is NHWC; a Linear weight made from a transpose) makes the update raise ``ValueError: params[i] must be
    contiguous`` from ops/adamw_with_copies.py ``_check_list`` (reached from half_student.py
    ``half_student_update``), after the forward and backward, leaving the bf16 gradients on the copies (the next
    step would add to them). Without the knob torch's AdamW trains it. ``half_student_blocker`` /
    ``HalfStudent`` do not look at layouts. Expected: the step trains as without the knob (the moments and the
    copy keep the master's strides, so the kernel could run over the storage when all strides agree; or such
    weights go to torch's step), or the knob is declined with a notice before any work."""
    model = copy.deepcopy(mae)
    if layout == "channels_last_conv":
        model = model.to(memory_format=torch.channels_last)
    else:
        lin = model.blocks[0].mlp.fc1
        lin.weight = torch.nn.Parameter(lin.weight.detach().t().contiguous().t())  # [out, in], strides (1, out)
    plain, half = _pair(model)
    fast_step(plain, batches[0], IS_FORGET, 0)
    try:
        fast_step(half, batches[0], IS_FORGET, 0)
    except ValueError as e:
        pytest.fail(f"the step with the knob raised after its backward: {e}")
    d = _distance(plain, half)
    assert d <= TOL, d


def test_a_parameter_group_added_after_the_copy_was_made(mae, batches):
    """FAULT: ``optimizer.add_param_group`` after the half student exists makes the next step fail with
    ``IndexError: index 2 is out of bounds`` at half_student.py ``half_student_update`` (``half.lrs[i]``: the lr /
    weight-decay arrays are sized at construction). ``HalfStudent.follows`` checks only the optimizer's identity,
    so ``half.groups`` and ``half.others`` (the clip's non-GEMM set) would also be stale: parameters unfrozen and
    added later would be stepped by ``opt.step()`` without being clipped. Expected: the step runs as without the
    knob (rebuild the copy when the optimizer's groups change, e.g. compare the param ids per group)."""
    plain, half = _pair(mae)
    hs.step_student(half)
    for s in (plain, half):
        s.optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(5))], "lr": 1e-3,
                                     "weight_decay": 0.0})
        fast_step(s, batches[0], IS_FORGET, 0)
    d = _distance(plain, half)
    assert d <= TOL, d


def test_a_submodule_switched_to_eval_is_followed(mage, batches):
    """FAULT: ``step_student`` syncs only the top-level ``training`` flag (half_student.py: ``half.module.training
    != setup.student.training``). A submodule switched after the copy was made (MAGE's ``token_emb`` to eval, to
    turn off its 0.1 dropout) keeps its old mode in the copy: the fast step still applies the dropout, and the loss
    and the update differ from the run without the knob. Expected: the copy runs every module in the student's
    mode (compare the modules' flags pairwise; the copy is a deepcopy with the same module tree)."""
    plain, half = _pair(mage)
    hs.step_student(half)
    for s in (plain, half):
        s.student.token_emb.eval()
    loss_plain = fast_step(plain, batches[0], IS_FORGET, 0).loss
    loss_half = fast_step(half, batches[0], IS_FORGET, 0).loss
    assert torch.equal(loss_plain, loss_half), (loss_plain.item(), loss_half.item())


def test_a_forward_hook_registered_on_the_student_runs_in_the_fast_step(mae, batches):
    """FAULT: the fast step runs a deepcopy of the student made on first use; forward hooks (and pre-hooks)
    registered on the student's modules after that (activation logging, a regulariser) are never called again
    while the knob is on, silently. Without the knob the hook runs every step. ``follows`` does not see hooks.
    Expected: the hook runs once per step as without the knob (e.g. the copy shares the student's modules' hook
    dicts, or is rebuilt when they change)."""
    calls = {}
    plain, half = _pair(mae)
    hs.step_student(half)
    for name, s in (("plain", plain), ("half", half)):
        calls[name] = 0

        def hook(module, inputs, output, name=name):
            calls[name] += 1
        s.student.blocks[0].register_forward_hook(hook)
        fast_step(s, batches[0], IS_FORGET, 0)
    assert calls == {"plain": 1, "half": 1}, calls


def _op_args(groups, lrs, coef=None, steps=None):
    shapes = [(5,), (7, 3)]
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g).bfloat16() for s in shapes]
    return dict(params=params, exp_avgs=[torch.zeros(s) for s in shapes], exp_avg_sqs=[torch.zeros(s) for s in shapes],
                steps=steps if steps is not None else [torch.tensor(0.0) for _ in shapes], grads=grads,
                copies=[torch.empty(s, dtype=torch.bfloat16) for s in shapes], groups=groups, lrs=lrs,
                weight_decays=torch.zeros_like(lrs), betas=(0.9, 0.95), eps=1e-8,
                coef=coef if coef is not None else torch.tensor(1.0),
                tables=AddressTables([p.numel() for p in params], groups, "cpu"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_group_index_outside_the_lr_array_is_refused(monkeypatch, backend):
    """FAULT (misuse of the public op): ``adamw_with_copies_`` does not check ``max(groups) < len(lrs)`` (nor
    ``len(weight_decays) == len(lrs)``) in ops/adamw_with_copies.py ``_check_update_args``. The Triton kernel then
    reads lr and weight decay past the end of the arrays (``lr_ptr + group``, kernels/adamw_copy.py) and updates
    the weights with whatever memory holds, silently; the twin fails with a bare ``IndexError`` from
    ``lrs[group]``. Expected: one ValueError naming groups / lrs before any launch, on both backends."""
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", backend)
    args = _op_args([0, 2], torch.tensor([1e-3, 1e-3]))
    with pytest.raises(ValueError, match="group"):
        adamw_with_copies_(**args)


@pytest.mark.parametrize("which", ["coef", "steps"])
def test_python_numbers_for_coef_or_steps_get_a_clear_message(which):
    """FAULT (misuse of the public op): ``coef=1.0`` or ``steps=[0.0, 0.0]`` (Python numbers, where torch's
    optimizers accept floats) fail with ``AttributeError: 'float' object has no attribute 'dim'`` from inside
    ``_check_update_args``. Expected: a TypeError / ValueError naming the argument (the other checks there do)."""
    kw = {"coef": 1.0} if which == "coef" else {"steps": [0.0, 0.0]}
    args = _op_args([0, 1], torch.tensor([1e-3, 1e-3]), **kw)
    with pytest.raises((TypeError, ValueError), match=which):
        adamw_with_copies_(**args)


def test_the_capture_refusal_for_the_student_copy_names_the_student(monkeypatch, mae):
    """FAULT (message): making or re-rounding the student copy inside a CUDA-graph capture raises through
    half_teacher.py ``refuse_in_capture``, whose text says "the teacher changed after the graphed step was
    built" (written for the teacher copy). For the student copy that points the user at the wrong model.
    Expected: a message about the student's weights / optimizer (e.g. let the caller pass the reason).
    (Simulated on the CPU: the capture query is patched to say "capturing".)"""
    setup = _setup(mae)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError) as err:
        hs.step_student(setup)
    assert "teacher" not in str(err.value) and "student" in str(err.value), str(err.value)


# ----------------------------------------------------------------------------------------------------------------
# Checked and sound (these pass)
# ----------------------------------------------------------------------------------------------------------------

def _tie_linears(model):
    model.blocks[1].mlp.fc1.weight = model.blocks[0].mlp.fc1.weight  # GEMM <-> GEMM: one copy, one master


def _tie_bias_to_norm(model):
    model.blocks[0].norm2.weight = model.blocks[0].attn.proj.bias  # GEMM bias <-> LayerNorm: stays fp32, shared


VARIANTS = {
    "lr_per_group": dict(groups=lambda o: [o.param_groups[0].update(lr=5e-3), o.param_groups[1].update(lr=2e-4)]),
    "lr_tensor": dict(groups=lambda o: [g.update(lr=torch.tensor(2e-3)) for g in o.param_groups]),
    "grad_clip_none": dict(setup=dict(grad_clip=None)),
    "clip_active": dict(setup=dict(grad_clip=1e-3)),
    "student_eval": dict(student=lambda m: m.eval()),
    "tied_linears": dict(model=_tie_linears),
    "tied_bias_and_norm": dict(model=_tie_bias_to_norm),
    "fused_cpu_adamw": dict(optimizer=lambda o: torch.optim.AdamW(o.param_groups, betas=(0.9, 0.95), fused=True)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_step_matches_the_step_without_the_knob(mae, batches, variant):
    """Sound: per-group lr, lr as a tensor, no clip, an active clip, an eval() student, weights tied between two
    Linears or between a Linear bias and a LayerNorm, torch's fused CPU AdamW: one update within 1e-6 relative of
    the update without the knob, and the copies are the masters rounded to bf16."""
    v = VARIANTS[variant]
    model = copy.deepcopy(mae)
    if "model" in v:
        v["model"](model)
    plain, half = _pair(model, **v.get("setup", {}))
    for s in (plain, half):
        if "optimizer" in v:
            s.optimizer = v["optimizer"](s.optimizer)
        if "groups" in v:
            v["groups"](s.optimizer)
        if "student" in v:
            v["student"](s.student)
        fast_step(s, batches[0], IS_FORGET, 0)
    assert half.half_student is not None
    d = _distance(plain, half)
    assert d <= TOL, d
    hm = half.half_student
    assert all(torch.equal(c, m.to(torch.bfloat16)) for m, c in zip(hm.masters, hm.copies))
    assert hm.module.training == half.student.training


def test_checkpoint_after_a_step_and_an_exact_resume(mae, batches, tmp_path):
    """Sound: after one step with the knob the optimizer state_dict has the same param_groups, state keys,
    per-entry dtypes, devices, shapes, strides and step values as without it; saved with
    ``save_unlearn_checkpoint`` and resumed as the CLI resumes (``load_model_state`` into a fresh model, then
    ``restore_optimizer``), the next step is bit for bit the uninterrupted run's; a checkpoint written without the
    knob resumes with it."""
    from unlearn_fast.cli.unlearn_command import restore_optimizer
    plain, half = _pair(mae)
    through = _setup(mae)
    for s in (plain, half, through):
        fast_step(s, batches[0], IS_FORGET, 0)
    sp, sh = plain.optimizer.state_dict(), half.optimizer.state_dict()
    assert sp["param_groups"] == sh["param_groups"] and set(sp["state"]) == set(sh["state"])
    for k, entry in sp["state"].items():
        assert entry.keys() == sh["state"][k].keys()
        for key, x in entry.items():
            y = sh["state"][k][key]
            assert (x.dtype, x.device, x.shape, x.stride()) == (y.dtype, y.device, y.shape, y.stride()), (k, key)
        assert entry["step"].item() == sh["state"][k]["step"].item() == 1.0
    fast_step(through, batches[1], IS_FORGET, 1)
    for source, tag in ((half, "half"), (plain, "plain")):
        path = save_unlearn_checkpoint(str(tmp_path), 0, source.student, source.optimizer, source.scaler, {},
                                       _names(source), {"next_epoch": 1}, tag=tag)
        ckpt = load_checkpoint_file(path)
        model = copy.deepcopy(mae)
        load_model_state(model, model_state_from(ckpt, path), path)
        resumed = build_setup(model, "cpu", lr=1e-3, precision="bf16", forget_alpha=0.5, fast=True,
                              half_student_weights=True, teacher=copy.deepcopy(mae))
        restore_optimizer(resumed, ckpt, path)
        fast_step(resumed, batches[1], IS_FORGET, 1)
        assert resumed.half_student is not None
        assert all(st["step"].item() == 2.0 for st in resumed.optimizer.state.values())
        if tag == "half":
            ref = dict(through.student.named_parameters())
            assert all(torch.equal(p, ref[n]) for n, p in resumed.student.named_parameters())


def test_deepcopy_and_pickle_of_a_setup_holding_a_copy(mae, batches):
    """Sound: a deepcopy of a setup after a step drops the copy (``__getstate__``), makes its own for its own
    student, and continues bit for bit as the original; torch.save / pickle of such a setup work."""
    a = _setup(mae)
    fast_step(a, batches[0], IS_FORGET, 0)
    b = copy.deepcopy(a)
    assert b.half_student is None
    fast_step(a, batches[1], IS_FORGET, 1)
    fast_step(b, batches[1], IS_FORGET, 1)
    assert b.half_student.source() is b.student and b.half_student.module is not a.half_student.module
    assert _distance(a, b) == 0.0
    buf = io.BytesIO()
    torch.save(a, buf)
    assert pickle.loads(pickle.dumps(a)).half_student is None and buf.tell() > 0


def test_a_replaced_copy_is_freed_at_once(mae, batches):
    """Sound: a new optimizer makes a new copy and the old one (module, bf16 weights) is freed without waiting
    for the garbage collector (no reference cycle keeps it; weak references to student and optimizer)."""
    s = _setup(mae)
    fast_step(s, batches[0], IS_FORGET, 0)
    old_module, old_half = weakref.ref(s.half_student.module), weakref.ref(s.half_student)
    old_copy = weakref.ref(s.half_student.copies[0])
    gc.disable()
    try:
        s.optimizer = torch.optim.AdamW(s.optimizer.param_groups, lr=1e-3)
        fast_step(s, batches[1], IS_FORGET, 1)
        assert old_module() is None and old_half() is None and old_copy() is None
    finally:
        gc.enable()


def test_triton_tables_follow_reloaded_moments_and_reused_addresses(mae, batches, monkeypatch):
    """Sound: with the Triton kernel (interpreter), after ``optimizer.load_state_dict`` with new moment tensors
    the next update writes the new tensors (not the freed/old ones, whatever addresses the allocator reuses) and
    ends bit for bit where the run that kept its tensors ends (the existing test of a reload runs the twin).
    """
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    a, b = _setup(mae), _setup(mae)
    for s in (a, b):
        fast_step(s, batches[0], IS_FORGET, 0)
    old = {id(p): (st["exp_avg"].clone(), st["exp_avg"]) for p, st in b.optimizer.state.items()}
    b.optimizer.load_state_dict(copy.deepcopy(b.optimizer.state_dict()))
    for s in (a, b):
        fast_step(s, batches[1], IS_FORGET, 1)
    assert _distance(a, b) == 0.0
    for p, st in b.optimizer.state.items():
        before, old_tensor = old[id(p)]
        assert torch.equal(old_tensor, before)  # the old moments were not written
        assert torch.equal(st["exp_avg"], a.optimizer.state[dict(zip(b.trainable, a.trainable))[p]]["exp_avg"])


def test_op_tables_after_tensors_are_freed_and_reallocated(monkeypatch):
    """Sound: one AddressTables used for one set of tensors, then (after they are freed) for new ones of the
    same sizes (the CPU allocator often hands back the same addresses): both updates match the twin exactly in
    the copies and within 1e-6 in the weights."""
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    tables = AddressTables([5, 21], [0, 1], "cpu")
    for _ in range(2):
        args = _op_args([0, 1], torch.tensor([1e-3, 2e-3]))
        del args["tables"]
        twin = copy.deepcopy(args)
        adamw_with_copies_(**args, tables=tables)
        adamw_with_copies_reference(**twin)
        for x, y in zip(args["params"], twin["params"]):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)
        assert all(torch.equal(x, y) for x, y in zip(args["copies"], twin["copies"]))
        del args, twin  # freed: the next tensors may take their addresses
    with pytest.raises(ValueError, match="tensors"):
        tables.point_at("param", [torch.zeros(5)])


def test_blocker_refuses_mixed_betas_and_tensor_betas(mae):
    """Sound: parameter groups with different betas, or betas given as tensors, keep the knob off with a reason
    (the kernel takes one (betas, eps) as floats)."""
    s = _setup(mae)
    s.optimizer.param_groups[1]["betas"] = (0.9, 0.999)
    assert "betas" in hs.half_student_blocker(s)
    s.optimizer.param_groups[1]["betas"] = (torch.tensor(0.9), torch.tensor(0.95))
    assert "betas" in hs.half_student_blocker(s)
