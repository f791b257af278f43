"""The training steps on mae_micro (CPU): fast vs reference trajectories, baselines, accumulation,
the frozen teacher, non-finite losses; plus the knobs they are built from (setup, precision, seeding).

Tolerance for the trajectory check: max |Δw| <= 1e-6 after 20 AdamW steps at lr 1e-3. The fast step differs
from the reference step only by the order of floating-point reductions (pruned teacher rows, LayerNorm
applied inside the fused loss); on CPU they agree bitwise today, so 1e-6 leaves room for other kernels
while still catching any change of semantics (one different step moves weights by ~lr = 1e-3).
"""
from __future__ import annotations

import copy
import re

import pytest
import torch

from tests.helpers import max_param_diff
from unlearn_fast.objective import LOSS_TYPES
from unlearn_fast.train import precision as prec
from unlearn_fast.train.seeding import derive_seed, seed_step_globals, step_generator, philox_noise_key
from unlearn_fast.train.step_baseline import baseline_step
from unlearn_fast.train.step_fast import fast_step, forget_row_indices, tokenizer_shared_exactly
from unlearn_fast.train.step_reference import NonFiniteLossError, optimizer_update, reference_step
from unlearn_fast.train.unlearn_setup import build_setup, make_teacher

TRAJECTORY_TOL = 1e-6
N_STEPS = 20

pytestmark = pytest.mark.usefixtures("single_thread")


def _batches(n_steps, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    patterns = [[True, False, False, True, False, True], [False] * n, [True] * n]
    out = []
    for s in range(n_steps):
        labels = torch.tensor(patterns[0] if s % 5 else patterns[(s // 5) % 3])  # some all-retain / all-forget
        out.append((torch.rand(n, 3, 32, 32, generator=g), labels))
    return out


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run_pair(model, precision, optimizer="adamw", loss_rtol=1e-6, visible_patch_embed=True):
    ref = build_setup(copy.deepcopy(model), "cpu", lr=1e-3, precision=precision, forget_alpha=0.5)
    fast = build_setup(copy.deepcopy(model), "cpu", lr=1e-3, precision=precision, forget_alpha=0.5,
                       visible_patch_embed=visible_patch_embed)
    if optimizer == "sgd":  # plain SGD does not amplify rounding noise (see the module docstring)
        for s in (ref, fast):
            s.optimizer = torch.optim.SGD(s.trainable, lr=1.0)
    for step, (images, is_forget) in enumerate(_batches(N_STEPS)):
        a = reference_step(ref, images, is_forget, step)
        b = fast_step(fast, images, is_forget, step)
        for x, y, what in zip(a, b, ("loss", "retain", "forget")):
            assert abs(x.item() - y.item()) <= loss_rtol * max(1e-3, abs(x.item())), \
                f"step {step} {what}: reference {x.item()} vs fast {y.item()}"
    moved = max_param_diff(ref.student, model)
    assert moved > 1e-3, "the run did not train: the comparison would be vacuous"
    return max_param_diff(ref.student, fast.student), moved


@pytest.mark.parametrize("precision", ["fp32", "reference"])
def test_fast_and_reference_trajectories_agree(make_mae_micro, monkeypatch, precision):
    """20 AdamW steps with the PyTorch twin of the fused loss: the fast step's pruned teacher, in-loss
    LayerNorm and shared front end must not change the trajectory (<= 1e-6; bitwise on CPU today). The
    embedding of the visible patches alone sums in another order (a GEMM, not the conv): it is checked with
    SGD in the next test, since AdamW turns its ulp-level gradient noise into O(lr) steps."""
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "torch")
    diff, moved = _run_pair(make_mae_micro(), precision, visible_patch_embed=False)
    assert diff <= TRAJECTORY_TOL, f"fast and reference weights differ by {diff:.3g} after {N_STEPS} steps " \
                                   f"(movement {moved:.3g})"


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-6), ("reference", 5e-3)])
def test_fast_and_reference_trajectories_agree_on_default_backend(make_mae_micro, precision, tol):
    """Same with the machine's default backend (the C++ extension on CPU when built). Its LayerNorm and
    sums reduce in another order than PyTorch's, so guides differ by ~1 fp32 ulp. AdamW turns that noise
    into O(lr) updates where the true gradient is ~0 (the attention key bias gets an exactly zero
    gradient), so the weights are compared after 20 *SGD* steps (lr 1): fp32 <= 1e-6 absolute; with
    the bf16 student ("reference" on CPU) gradients are stored in bf16, one-ulp flips (0.4%) are
    expected, so <= 5e-3 relative to the largest weight movement (~0.3)."""
    diff, moved = _run_pair(make_mae_micro(), precision, "sgd", loss_rtol=1e-5 if precision == "fp32" else 1e-2)
    bound = tol if precision == "fp32" else tol * moved
    assert diff <= bound, f"fast and reference weights differ by {diff:.3g} (bound {bound:.3g}, movement {moved:.3g})"


def test_fast_step_philox_noise_path_is_reproducible(make_mae_micro):
    model = make_mae_micro()
    runs = []
    for _ in range(2):
        s = build_setup(copy.deepcopy(model), "cpu", lr=1e-3, precision="fp32", forget_alpha=1.0)
        for step, (images, is_forget) in enumerate(_batches(3)):
            fast_step(s, images, is_forget, step, noise_seed=123)
        runs.append(s.student)
    assert max_param_diff(*runs) == 0.0 and max_param_diff(runs[0], model) > 0


def test_teacher_never_changes_and_is_frozen(make_mae_micro):
    model = make_mae_micro()
    setup = build_setup(model, "cpu", lr=1e-2, precision="fp32", forget_alpha=1.0)
    before = _state(setup.teacher)
    assert not setup.teacher.training and not any(p.requires_grad for p in setup.teacher.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(setup.teacher.parameters(), setup.student.parameters()))
    for step, (images, is_forget) in enumerate(_batches(3)):
        reference_step(setup, images, is_forget, step)
        fast_step(setup, images, is_forget, step + 3)
    after = _state(setup.teacher)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert max_param_diff(setup.student, setup.teacher) > 0


def test_paper_objective_trains_the_encoder_only(make_mae_micro):
    model = make_mae_micro()
    setup = build_setup(model, "cpu", lr=1e-2, precision="fp32", forget_alpha=1.0)
    enc = set(model.encoder_parameter_names())
    trainable = {n for n, p in setup.student.named_parameters() if p.requires_grad}
    assert trainable == enc
    before = _state(setup.student)
    for step, (images, is_forget) in enumerate(_batches(2)):
        fast_step(setup, images, is_forget, step)
    for n, p in setup.student.named_parameters():
        assert torch.equal(p, before[n]) != (n in enc), n


@pytest.mark.parametrize("weighting", ["reference", "corrected"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_baseline_step_changes_only_the_intended_parameters(make_mae_micro, loss_type, weighting):
    model = make_mae_micro()
    setup = build_setup(model, "cpu", lr=1e-2, precision="fp32", forget_alpha=0.5, loss_type=loss_type,
                        baseline_weighting=weighting)
    teacher_before = _state(setup.teacher)
    before = _state(setup.student)
    enc = set(model.encoder_parameter_names())
    for step, (images, is_forget) in enumerate(_batches(2)):
        out = baseline_step(setup, images, is_forget, step)
        assert all(torch.isfinite(v) for v in out)
    changed = {n for n, p in setup.student.named_parameters() if not torch.equal(p, before[n])}
    assert "pos_embed" not in changed and "decoder_pos_embed" not in changed  # fixed sin-cos
    trainable = {n for n, p in setup.student.named_parameters() if p.requires_grad}
    if loss_type == "encoder_noise":
        assert changed == enc and trainable == enc
    else:
        assert any(n.startswith("decoder_") for n in changed), f"{loss_type} must train the decoder too"
        assert any(n.startswith("blocks.") for n in changed)
    assert all(torch.equal(v, teacher_before[k]) for k, v in setup.teacher.state_dict().items())


def test_accumulation_updates_every_second_step(make_mae_micro):
    model = make_mae_micro()
    acc = build_setup(copy.deepcopy(model), "cpu", lr=1e-3, precision="fp32", forget_alpha=0.5, accum_iter=2)
    one = build_setup(copy.deepcopy(model), "cpu", lr=1e-3, precision="fp32", forget_alpha=0.5, accum_iter=1)
    batches = _batches(4)
    history = []
    for step, (images, is_forget) in enumerate(batches):
        update = (step + 1) % acc.accum_iter == 0  # what the trainer passes
        snapshot = _state(acc.student)
        reference_step(acc, images, is_forget, step, update=update)
        history.append(max_param_diff_state(acc.student, snapshot))
        if step == 0:
            # no update yet; the gradient is the micro-step's gradient / accum_iter
            reference_step(one, images, is_forget, step, update=False)
            for (n, p), q in zip(acc.student.named_parameters(), one.student.parameters()):
                if p.requires_grad:
                    torch.testing.assert_close(p.grad, q.grad / 2, rtol=1e-6, atol=1e-12, msg=n)
    assert history[0] == 0.0 and history[2] == 0.0
    assert history[1] > 0.0 and history[3] > 0.0
    state = acc.optimizer.state[acc.trainable[0]]
    assert int(state["step"]) == 2


def max_param_diff_state(model, state):
    return max((p.detach() - state[n]).abs().max().item() for n, p in model.named_parameters())


@pytest.mark.parametrize("which", ["reference", "baseline"])
def test_nan_input_raises_non_finite_loss_error(make_mae_micro, which):
    model = make_mae_micro()
    setup = build_setup(model, "cpu", lr=1e-3, precision="fp32", forget_alpha=0.5,
                        loss_type="encoder_noise" if which == "baseline" else None)
    images = torch.rand(4, 3, 32, 32)
    images[1] = float("nan")  # a whole image: a NaN in a hidden patch alone never reaches an MAE encoder
    before = _state(setup.student)
    fn = baseline_step if which == "baseline" else reference_step
    with pytest.raises(NonFiniteLossError) as info:
        fn(setup, images, torch.tensor([True, False, True, False]), 7)
    msg = str(info.value)
    assert re.search(r"loss is nan at step 7", msg) and "checkpoint" in msg.lower()
    assert all(torch.equal(p, before[n]) for n, p in setup.student.named_parameters())  # nothing was applied


def test_optimizer_update_clips_before_stepping(make_mae_micro):
    setup = build_setup(make_mae_micro(), "cpu", lr=1e-3, precision="fp32", grad_clip=0.5)
    for p in setup.trainable:
        p.grad = torch.ones_like(p)  # global norm = sqrt(#params) >> 0.5
    seen = []
    real_step = setup.optimizer.step

    def spy(*a, **k):
        seen.append(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in setup.trainable)).item())
        return real_step(*a, **k)
    setup.optimizer.step = spy
    optimizer_update(setup)
    assert seen and seen[0] == pytest.approx(0.5, rel=1e-5)
    assert all(p.grad is None for p in setup.trainable)  # zero_grad(set_to_none)


# ---- setup, precision, seeding ----------------------------------------------------------------------------

def test_build_setup_validates_its_arguments(make_mae_micro):
    m = make_mae_micro()
    for kwargs, word in [(dict(precision="fp8"), "precision"), (dict(noise_type="pink"), "noise_type"),
                         (dict(loss_type="max_loss"), "loss_type"), (dict(baseline_weighting="x"), "weighting"),
                         (dict(accum_iter=0), "accum_iter")]:
        with pytest.raises(ValueError, match=word):
            build_setup(m, "cpu", **kwargs)


def test_make_teacher_is_a_frozen_copy(make_mae_micro):
    m = make_mae_micro().train()
    t = make_teacher(m)
    assert not t.training and m.training
    assert all(not p.requires_grad for p in t.parameters()) and all(p.requires_grad for p in m.blocks.parameters())
    with torch.no_grad():
        m.norm.weight.add_(1.0)
    assert not torch.equal(t.norm.weight, m.norm.weight)


def test_precision_modes_on_cpu():
    cpu = torch.device("cpu")
    assert prec.student_dtype("fp32", cpu) is None
    assert prec.student_dtype("reference", cpu) == torch.bfloat16  # fp16 autocast is not useful on CPU
    assert prec.student_dtype("reference", torch.device("cuda")) == torch.float16
    assert prec.student_dtype("bf16", torch.device("cuda")) == torch.bfloat16
    assert not prec.uses_loss_scaling("reference", cpu) and prec.uses_loss_scaling("reference", torch.device("cuda"))
    assert not prec.make_grad_scaler("reference", cpu).is_enabled()
    with pytest.raises(ValueError, match="valid: reference, bf16, fp32"):
        prec.check_precision("fp16")
    lin = torch.nn.Linear(4, 4)
    with prec.student_autocast("reference", cpu):
        assert lin(torch.rand(2, 4)).dtype == torch.bfloat16
        with prec.teacher_autocast("reference", cpu):
            assert lin(torch.rand(2, 4)).dtype == torch.float32  # teacher in fp32, as the reference
    with prec.student_autocast("fp32", cpu):
        assert lin(torch.rand(2, 4)).dtype == torch.float32


def test_tokenizer_sharing_rule():
    class S:
        def __init__(self, p, dev):
            self.precision, self.device = p, torch.device(dev)
    assert tokenizer_shared_exactly(S("fp32", "cpu")) and tokenizer_shared_exactly(S("bf16", "cuda"))
    assert not tokenizer_shared_exactly(S("reference", "cuda"))  # fp16 student vs fp32 teacher


def test_forget_row_indices():
    f = forget_row_indices(torch.tensor([True, False, False, True, True]), "cpu")
    assert f.tolist() == [0, 3, 4]
    assert forget_row_indices(torch.tensor([0, 0]), "cpu").tolist() == []


def test_seeding_is_stable_and_separates_purposes():
    # fixed values: a resumed run with a newer version must draw what the original run drew
    assert derive_seed(0, 0, 0, "noise") == 2330793410376514636
    assert derive_seed(42, 1, 7, "task") == 3532192226701174030
    assert 0 <= derive_seed(2 ** 70, "x") < 2 ** 63
    seeds = {derive_seed(0, r, s, p) for r in range(2) for s in range(3) for p in ("task", "noise", "dropout")}
    assert len(seeds) == 18
    a = torch.rand(5, generator=step_generator(3, 0, 9, "task", "cpu"))
    assert torch.equal(a, torch.rand(5, generator=step_generator(3, 0, 9, "task", "cpu")))
    assert not torch.equal(a, torch.rand(5, generator=step_generator(3, 0, 10, "task", "cpu")))
    assert not torch.equal(a, torch.rand(5, generator=step_generator(3, 1, 9, "task", "cpu")))
    with pytest.raises(ValueError, match="purpose"):
        step_generator(0, 0, 0, "weights", "cpu")
    seed_step_globals(1, 0, 5)
    x = torch.rand(3)
    seed_step_globals(1, 0, 5)
    assert torch.equal(x, torch.rand(3))


def test_derive_seed_treats_numpy_integers_like_ints():
    """BUG (reported): parts are hashed through repr(), and repr(np.int64(5)) is 'np.int64(5)' under numpy 2
    ('5' under numpy 1), so a step or rank that comes out of numpy arithmetic draws another stream than the
    same python int, and the stream changes with the numpy version."""
    import numpy as np
    assert derive_seed(0, np.int64(0), np.int64(5), "noise") == derive_seed(0, 0, 5, "noise")


def test_reference_step_is_reproducible(make_mae_micro):
    # seeded from (seed, rank, step): two identical runs give identical weights (no wall-clock reseed)
    model = make_mae_micro()
    a = build_setup(copy.deepcopy(model), "cpu", lr=1e-3, precision="fp32", forget_alpha=0.5)
    b = build_setup(copy.deepcopy(model), "cpu", lr=1e-3, precision="fp32", forget_alpha=0.5)
    for step, (images, is_forget) in enumerate(_batches(2)):
        reference_step(a, images, is_forget, step)
        torch.manual_seed(12345 + step)  # global state must not leak into the step
        reference_step(b, images, is_forget, step)
    assert max_param_diff(a.student, b.student) == 0.0


def test_philox_noise_keys_differ_between_ranks():
    # the graphed step's counter-based noise: one key per rank, so ranks draw independent noise
    from unlearn_fast.ops import sample_batch_noise
    keys = [philox_noise_key(0, r) for r in range(4)]
    assert len(set(keys)) == 4 and all(0 <= k < 2 ** 63 for k in keys)
    assert philox_noise_key(0, 1) == philox_noise_key(0, 1)  # stable: a resumed run draws the same
    x = torch.rand(2, 3, 8, 8)
    a, b = (sample_batch_noise(x, "normal", seed=k, step=5) for k in keys[:2])
    assert not torch.equal(a, b)


@pytest.mark.parametrize("rank", [0, 1])
def test_trainer_gives_the_eager_fast_step_the_ranks_philox_key(make_mae_micro, monkeypatch, rank):
    """The eager fast step draws its fused noise with the rank's key, as the graphed step does (both once
    took the raw seed or the rank key: the eager and graphed DDP runs then drew different noise)."""
    import unlearn_fast.train.trainer as trainer_mod
    seen = []
    real = trainer_mod.fast_step

    def spy(setup, images, is_forget, step, update=True, noise_seed=None):
        seen.append(noise_seed)
        return real(setup, images, is_forget, step, update, noise_seed=noise_seed)
    monkeypatch.setattr(trainer_mod, "fast_step", spy)
    setup = build_setup(make_mae_micro(), "cpu", lr=1e-3, precision="fp32", forget_alpha=0.5, rank=rank)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(2, 3, 32, 32, generator=g), torch.tensor([100.0, -100.0])) for _ in range(2)]
    trainer_mod.train_loop(setup, lambda e: iter(batches), 2, epochs=1, lr=1e-3, progress=False, noise_seed=7)
    assert seen == [philox_noise_key(7, rank)] * 2 and philox_noise_key(7, 0) != philox_noise_key(7, 1)
    seen.clear()
    trainer_mod.train_loop(setup, lambda e: iter(batches), 2, epochs=1, lr=1e-3, progress=False)
    assert seen == [None, None]  # no noise seed: the reference's per-(seed, rank, step) generator
