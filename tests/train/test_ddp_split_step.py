"""The split step of the multi-rank CUDA-graph path, run eagerly on CPU (gloo): forward + backward into one
flat gradient buffer, one all-reduce (mean over ranks), then the update (unlearn_fast/train/flat_grads.py).

Checked with 2 spawned gloo ranks, per-rank batch 3 (global 6), 5 steps, fp32, mae_micro, a teacher other
than the starting weights, rank 1 starting from perturbed trainable weights (use_flat_grads() must broadcast
rank 0's, as DDP's constructor does):
- forget_alpha 0: the final weights of both ranks equal the 1-process run with the global batch of 6
  (the noise target uses each rank's own batch statistics, so only the retain term is rank-count
  independent; see tests/train/test_ddp.py) and equal DDP's eager fast step on the same 2 ranks;
- forget_alpha 0.5: equal DDP's eager fast step on the same 2 ranks;
- step 0's exchanged gradient is the 1-process gradient of the global batch (the mean over ranks, as DDP's
  reducer, bit-equal to it; AdamW is nearly blind to a gradient's scale, so the weights alone would not
  tell a sum from a mean);
- control: the same split step with the all-reduce skipped ends far from the 1-process run.
Tolerances (fp32, absolute on the weights, which training moves by ~5e-3): 2e-6 against the 1-process run
(the batch mean is summed in another order; measured 8e-7, the same as DDP's own eager step); the key third of
each qkv bias has an exactly zero true gradient, so AdamW turns rounding noise into lr-sized steps there: 2e-4.
Against DDP on the same ranks the arithmetic is the same (grads x 1/world, then summed; measured bit-equal):
1e-7 everywhere. The control (no all-reduce) ends ~9e-3 away.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import unlearn_fast
from unlearn_fast.train.distributed import DDPStudent, DistContext
from unlearn_fast.train.flat_grads import FlatGrads, split_fast_step, trainable_named_parameters
from unlearn_fast.train.step_fast import fast_step
from unlearn_fast.train.trainer import resolve_step_mode
from unlearn_fast.train.unlearn_setup import build_setup

pytestmark = pytest.mark.usefixtures("single_thread")

WORLD, PER_RANK, STEPS, LR, NOISE_SEED = 2, 3, 5, 1e-3, 7
ATOL, ATOL_KEY_BIAS, ATOL_SAME_RANKS = 2e-6, 2e-4, 1e-7
GRAD_RTOL = 1e-6  # relative L2 error of step 0's exchanged gradient against the 1-process one (measured 1.3e-7)
# forget rows of each global batch of 6 (rank 0 takes rows 0-2, rank 1 rows 3-5): mixed, one rank
# all-retain, one rank all-forget
FORGET = [[1, 0, 0, 0, 1, 0], [0, 0, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 1, 0], [0, 1, 0, 0, 0, 1]]
RUNS = {  # name: (step kind, forget_alpha)
    "split_a0": ("split", 0.0), "ddp_a0": ("ddp", 0.0), "split_a5": ("split", 0.5), "ddp_a5": ("ddp", 0.5),
    "noreduce_a0": ("split_no_all_reduce", 0.0),
}


def _global_batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(WORLD * PER_RANK, 3, 32, 32, generator=g), torch.tensor(f, dtype=torch.bool))
            for f in FORGET]


def _models():
    """(student start, teacher): fixed seeds, independent of the process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = unlearn_fast.create_model("mae_micro")
        torch.manual_seed(5)
        teacher = unlearn_fast.create_model("mae_micro")
    return student, teacher


def _setup(forget_alpha, rank=0, perturb=False):
    student, teacher = _models()
    setup = build_setup(student, "cpu", lr=LR, precision="fp32", forget_alpha=forget_alpha, seed=0, rank=rank,
                        teacher=teacher)
    if perturb:  # a rank that starts elsewhere: only the broadcast from rank 0 makes the runs comparable
        with torch.no_grad():
            for p in setup.trainable:
                p.add_(0.01)
    return setup


def _rank_worker(rank, world, store_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    ctx = DistContext(rank=rank, world_size=world, local_rank=rank, backend="gloo")
    try:
        batches = _global_batches()
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        for name, (kind, alpha) in RUNS.items():
            setup = _setup(alpha, rank=rank, perturb=rank == 1)
            student = DDPStudent(setup.student, ctx, seed=0)
            setup.student = student
            flat = None
            if kind != "ddp":
                student.use_flat_grads()
                flat = FlatGrads(trainable_named_parameters(student))
            for step, (images, is_forget) in enumerate(batches):
                student.begin_step(step)
                x, f = images[rows], is_forget[rows]
                if kind == "ddp":
                    fast_step(setup, x, f, step, noise_seed=NOISE_SEED)
                else:
                    split_fast_step(setup, flat, ctx if kind == "split" else None, x, f, step,
                                    noise_seed=NOISE_SEED)
            if flat is not None:  # no DDP was built; the grads are still the (zeroed) buffer's views
                assert student._ddp is None and flat.is_attached() and not flat.buffer.any()
                with pytest.raises(RuntimeError, match="use_flat_grads"):
                    student.ddp
            else:
                with pytest.raises(RuntimeError, match="after DDP was built"):
                    student.use_flat_grads()
            torch.save(student.module.state_dict(), os.path.join(out_dir, f"{name}-rank{rank}.pt"))
        torch.save(_reduced_grads(ctx, batches[0], rows), os.path.join(out_dir, f"grads-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _reduced_grads(ctx, batch, rows):
    """Step 0's gradient after the exchange, flat: the split step's all-reduced buffer, and DDP's (its reducer
    averages during backward). AdamW is nearly blind to a gradient's scale, so a sum instead of a mean would
    hardly show in the weights: the gradients themselves are compared."""
    images, is_forget = batch[0][rows], batch[1][rows]
    out = {}
    for kind in ("split", "ddp"):
        setup = _setup(0.0, rank=ctx.rank)
        student = setup.student = DDPStudent(setup.student, ctx, seed=0)
        student.begin_step(0)
        if kind == "split":
            student.use_flat_grads()
            flat = FlatGrads(trainable_named_parameters(student))
            split_fast_step(setup, flat, ctx, images, is_forget, 0, update=False, noise_seed=NOISE_SEED)
            out["local"] = flat.buffer.clone()
            flat.all_reduce_mean_(ctx)
            out[kind] = flat.buffer.clone()
        else:
            fast_step(setup, images, is_forget, 0, update=False, noise_seed=NOISE_SEED)
            out[kind] = torch.cat([p.grad.flatten() for p in setup.trainable])
    return out


@pytest.fixture(scope="module")
def two_rank_weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("split_out")
    mp.spawn(_rank_worker, args=(WORLD, str(out / "store"), str(out)), nprocs=WORLD, join=True)
    weights = {(name, r): torch.load(out / f"{name}-rank{r}.pt", weights_only=True)
               for name in RUNS for r in range(WORLD)}
    weights.update({("grads", r): torch.load(out / f"grads-rank{r}.pt", weights_only=True) for r in range(WORLD)})
    return weights


@pytest.fixture(scope="module")
def one_rank_weights():
    """The 1-process fast step on the global batch of 6, forget_alpha 0."""
    setup = _setup(0.0)
    for step, (images, is_forget) in enumerate(_global_batches()):
        fast_step(setup, images, is_forget, step, noise_seed=NOISE_SEED)
    return setup.student.state_dict()


def _max_diffs(got, want):
    """(max |diff| outside the key third of qkv biases, max |diff| inside), over the trainable weights."""
    names = _setup(0.0).student.encoder_parameter_names()
    main = key = 0.0
    for k in names:
        diff = (got[k] - want[k]).abs()
        if k.endswith("attn.qkv.bias"):  # [3D]
            d = diff.shape[0] // 3
            key = max(key, diff[d:2 * d].max().item())
            diff = torch.cat([diff[:d], diff[2 * d:]])
        main = max(main, diff.max().item())
    return main, key


def _moved(weights):
    start = _setup(0.0).student.state_dict()
    return _max_diffs(weights, start)[0]


def test_two_rank_split_step_equals_one_rank_with_the_same_global_batch(two_rank_weights, one_rank_weights):
    assert _moved(one_rank_weights) > 1000 * ATOL  # training moved the weights far more than the tolerance
    for r in range(WORLD):
        main, key = _max_diffs(two_rank_weights[("split_a0", r)], one_rank_weights)
        assert main <= ATOL and key <= ATOL_KEY_BIAS, (r, main, key)
    # the frozen parts: untouched (rank 1 perturbed only trainable weights, which rank 0's broadcast replaced)
    start = _setup(0.0).student.state_dict()
    for k in ("decoder_pred.weight", "mask_token", "pos_embed"):
        assert torch.equal(two_rank_weights[("split_a0", 1)][k], start[k])


def test_all_reduced_gradient_is_the_one_rank_gradient(two_rank_weights):
    """The exchanged gradient is the MEAN over ranks (the 1-process gradient of the global batch), as DDP's."""
    setup = _setup(0.0)
    images, is_forget = _global_batches()[0]
    fast_step(setup, images, is_forget, 0, update=False, noise_seed=NOISE_SEED)
    want = torch.cat([p.grad.flatten() for p in setup.trainable])
    for r in range(WORLD):
        got = two_rank_weights[("grads", r)]
        assert torch.equal(got["split"], got["ddp"])  # same arithmetic as DDP's reducer (x 1/world, then sum)
        rel = ((got["split"] - want).norm() / want.norm()).item()
        assert rel <= GRAD_RTOL, (r, rel)
        local = ((got["local"] - want).norm() / want.norm()).item()  # this rank's half-batch alone
        assert local > 1000 * GRAD_RTOL, (r, local)


@pytest.mark.parametrize("alpha", ["a0", "a5"])
def test_two_rank_split_step_equals_ddp_fast_step(two_rank_weights, alpha):
    for r in range(WORLD):
        main, key = _max_diffs(two_rank_weights[(f"split_{alpha}", r)], two_rank_weights[(f"ddp_{alpha}", r)])
        assert max(main, key) <= ATOL_SAME_RANKS, (alpha, r, main, key)
    main, key = _max_diffs(two_rank_weights[(f"split_{alpha}", 0)], two_rank_weights[(f"split_{alpha}", 1)])
    assert main == key == 0.0  # the ranks hold the same weights after every update


def test_control_without_the_all_reduce_differs(two_rank_weights, one_rank_weights):
    """The all-reduce is what makes the ranks agree: skipped, each rank follows its own half-batch."""
    for r in range(WORLD):
        main, _ = _max_diffs(two_rank_weights[("noreduce_a0", r)], one_rank_weights)
        assert main > 100 * ATOL, (r, main)
    main, _ = _max_diffs(two_rank_weights[("noreduce_a0", 0)], two_rank_weights[("noreduce_a0", 1)])
    assert main > 100 * ATOL


# ---- one process ------------------------------------------------------------------------------------------

class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.b = nn.Linear(3, 1, bias=False)
        self.scale = nn.Parameter(torch.ones(7))
        self.unused = nn.Parameter(torch.zeros(2))

    def forward(self, x):  # x [N, 5]
        return self.b(torch.tanh(self.a(x))).sum() * self.scale.sum()


def test_flat_grads_are_views_that_accumulate(gen):
    m, twin = _Tiny(), _Tiny()
    twin.load_state_dict(m.state_dict())
    named = [(n, p) for n, p in m.named_parameters() if n != "unused"]
    flat = FlatGrads(named)
    assert flat.buffer.numel() == 5 * 3 + 3 + 3 + 7 == sum(p.numel() for _, p in named)
    x1, x2 = torch.randn(4, 5, generator=gen), torch.randn(1, 5, generator=gen)  # batch 1 too
    m(x1).backward()
    m(x2).backward()
    twin(x1).backward()
    twin(x2).backward()
    ptr = flat.buffer.untyped_storage().data_ptr()
    for (name, p), q in zip(named, (dict(twin.named_parameters())[n] for n, _ in named)):
        assert p.grad.untyped_storage().data_ptr() == ptr, name  # autograd added into the view, in place
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    flat.zero_()
    assert all(not p.grad.any() for _, p in named) and flat.is_attached()


def test_flat_grads_reject_bad_parameters():
    m = _Tiny()
    with pytest.raises(ValueError, match="at least one"):
        FlatGrads([])
    m.a.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="'a.weight' does not require a gradient"):
        FlatGrads(m.named_parameters())
    m.a.weight.requires_grad_(True)
    m.b.half()
    with pytest.raises(ValueError, match="one device and dtype"):
        FlatGrads(m.named_parameters())


def test_first_backward_names_an_unused_parameter(gen):
    m = _Tiny()
    flat = FlatGrads(m.named_parameters())
    flat.detach_for_check()
    m(torch.randn(2, 5, generator=gen)).backward()
    with pytest.raises(ValueError, match="without a gradient in the loss: unused"):
        flat.attach_checked()


def _same_weights(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.trainable, b.trainable))


@pytest.mark.parametrize("accum", [1, 2])
def test_split_step_on_one_process_equals_the_fast_step(accum):
    """No process group: the split step is the fast step with the grads in one buffer. The same operations
    on the same values: equal to the last bit (tolerance 0)."""
    a, b = _setup(0.5), _setup(0.5)
    a.accum_iter = b.accum_iter = accum
    flat = FlatGrads(trainable_named_parameters(b.student))
    g = torch.Generator().manual_seed(1)
    for step, n in enumerate([5, 1, 3, 4]):  # batch 1 and odd sizes
        images, is_forget = torch.rand(n, 3, 32, 32, generator=g), torch.rand(n, generator=g) < 0.5
        update = (step + 1) % accum == 0
        out_a = fast_step(a, images, is_forget, step, update=update, noise_seed=NOISE_SEED)
        out_b = split_fast_step(b, flat, None, images, is_forget, step, update=update, noise_seed=NOISE_SEED)
        assert all(torch.equal(x, y) for x, y in zip(out_a, out_b))
        assert _same_weights(a, b) == 0.0, step
    assert max((p - q).abs().max().item() for p, q in zip(a.trainable, _setup(0.5).trainable)) > 1e-3


def test_split_step_refuses_a_student_with_a_reducer():
    setup = _setup(0.0)
    # DDP is built lazily: a DDPStudent is constructible without a process group until its first pass
    student = DDPStudent(setup.student, DistContext(world_size=1, backend="gloo"), seed=0)
    assert student.reducer_active and student._ddp is None
    setup.student = student
    flat = FlatGrads(trainable_named_parameters(student))
    with pytest.raises(ValueError, match="use_flat_grads"):
        split_fast_step(setup, flat, None, torch.rand(2, 3, 32, 32), torch.tensor([True, False]), 0)


def test_graphed_step_is_chosen_with_several_ranks(capsys):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_step_mode("auto", cuda, None, 1, True, world_size=4) == "graphed"
    assert resolve_step_mode("graphed", cuda, None, 1, True, world_size=2) == "graphed"
    assert capsys.readouterr().out == ""
    assert resolve_step_mode("auto", cpu, None, 1, True, world_size=2) == "fast"
    assert resolve_step_mode("graphed", cuda, None, 1, False, world_size=2) == "fast"
    assert "--forget_per_batch" in capsys.readouterr().out
