"""GPU checks of the multi-rank CUDA-graph step (skipped without CUDA): one process in a 1-rank NCCL group
(file store, no launcher) runs the two-graph step (graph A forward + backward into the flat gradient buffer,
the NCCL all-reduce, graph B the update), with the all-reduce between the graphs (default) or captured at the
end of graph A, and must end where the single-process one-graph step ends.

With one rank the all-reduce is an identity (the mean over ranks is checked on CPU with 2 gloo ranks in
tests/train/test_ddp_split_step.py); here the capture, the NCCL calls on and inside the graph, the flat-buffer
views surviving the captured update, the trainer's wiring and the loss read-back are what is exercised.

Tolerances: the two paths run the same kernels on the same values; only the order of atomic adds (index
backward, fused kernels) differs between runs, which AdamW amplifies where a gradient is ~0. As in
test_gpu_fast_path.py: relative L2 per parameter 1e-4 (fp32), 5e-3 (fp16 autocast + GradScaler, the reference
precision), leaving out the key third of each qkv bias (exactly zero true gradient).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import unlearn_fast
from unlearn_fast.train.distributed import DDPStudent, DistContext
from unlearn_fast.train.step_graphed import GraphedUnlearnStep
from unlearn_fast.train.trainer import train_loop
from unlearn_fast.train.unlearn_setup import build_setup

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

N, NF, SHAPE, STEPS, LR, NOISE_SEED = 16, 6, (3, 32, 32), 10, 1e-3, 7
TOL = {"fp32": 1e-4, "reference": 5e-3}


@pytest.fixture(scope="module")
def nccl_one_rank(tmp_path_factory):
    if not dist.is_available() or not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    torch.cuda.set_device(0)
    store = tmp_path_factory.mktemp("nccl_store") / "store"
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield DistContext(rank=0, world_size=1, local_rank=0, backend="nccl")
    finally:
        dist.destroy_process_group()


def _setups(precision, count):
    """``count`` identical setups: the same starting student, a teacher with other weights (so the retain term
    has a real gradient from step 0), forget_alpha 0.5, the fused capturable optimizer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = unlearn_fast.create_model("mae_micro")
        torch.manual_seed(5)
        teacher = unlearn_fast.create_model("mae_micro")
    return [build_setup(copy.deepcopy(student), "cuda", lr=LR, precision=precision, forget_alpha=0.5, fast=True,
                        capturable=True, teacher=copy.deepcopy(teacher)) for _ in range(count)]


def _batches():
    """STEPS batches of N rows with exactly NF forget rows, forget rows first (the graphed step's own order,
    so that the eager fast step draws the same masks per row)."""
    g = torch.Generator().manual_seed(0)
    is_forget = torch.arange(N) < NF
    return [(torch.rand(N, *SHAPE, generator=g), is_forget) for _ in range(STEPS)]


def _comparable(model):
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("attn.qkv.bias"):  # [3D]: the key third has an exactly zero true gradient
            d = p.shape[0] // 3
            yield name, torch.cat([p[:d], p[2 * d:]])
        else:
            yield name, p


def _max_rel_diff(a, b):
    diffs = [((p.float() - q.float()).norm() / q.float().norm().clamp_min(1e-30)).item()
             for (_, p), (_, q) in zip(_comparable(a), _comparable(b))]
    return max(diffs)


def _assert_moved(setup_after, precision):
    """Training moved the weights: relative L2 over all compared weights (~5e-2 after these 10 steps on CPU)."""
    fresh = _setups(precision, 1)[0]
    pairs = list(zip(_comparable(setup_after.student), _comparable(fresh.student)))
    change = torch.cat([(p - q).flatten() for (_, p), (_, q) in pairs]).norm()
    norm = torch.cat([q.flatten() for _, (_, q) in pairs]).norm()
    assert (change / norm).item() > 1e-2


def _assert_flat_path_ran(setup):
    """The student never built DDP (no reducer hooks), and every trainable .grad is a view of one buffer."""
    student = setup.student
    assert isinstance(student, DDPStudent) and student._ddp is None and not student.reducer_active
    storages = {p.grad.untyped_storage().data_ptr() for p in setup.trainable}
    assert len(storages) == 1


@pytest.mark.parametrize("all_reduce_in_graph", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "reference"])
def test_graphed_ddp_matches_single_process_graphed_step(nccl_one_rank, precision, all_reduce_in_graph):
    single, multi = _setups(precision, 2)
    one_graph = GraphedUnlearnStep(single, N, NF, SHAPE, noise_seed=NOISE_SEED, warmup=2)
    multi.student = DDPStudent(multi.student, nccl_one_rank, seed=single.seed)
    multi.student.use_flat_grads()
    two_graphs = GraphedUnlearnStep(multi, N, NF, SHAPE, noise_seed=NOISE_SEED, warmup=2, dist=nccl_one_rank,
                                    all_reduce_in_graph=all_reduce_in_graph)
    for step, (images, is_forget) in enumerate(_batches()):
        multi.student.begin_step(step)
        one_graph(images, is_forget, step, LR)
        two_graphs(images, is_forget, step, LR)
    torch.cuda.synchronize()
    assert one_graph.graph is not None and two_graphs.graph is not None and two_graphs.graph_update is not None
    assert two_graphs.eager_fallbacks == 0 and two_graphs.flat.is_attached()
    assert not two_graphs.flat.buffer.any()  # graph B zeroed it after the last update
    _assert_flat_path_ran(multi)
    diff = _max_rel_diff(multi.student, single.student)
    assert diff <= TOL[precision], diff
    _assert_moved(single, precision)
    sums_one, sums_two = one_graph.read_and_reset(), two_graphs.read_and_reset()  # NCCL mean over 1 rank
    torch.testing.assert_close(sums_two, sums_one, rtol=TOL[precision], atol=0.0)
    if precision == "reference":  # the loss scale (updated inside the graphs) followed the same path
        assert multi.scaler.get_scale() == single.scaler.get_scale()


def test_graphed_ddp_eager_fallback_with_a_batch_that_does_not_fit(nccl_one_rank):
    """A batch with another forget count runs the eager split step (all-reduce included) and the graphs go on;
    with the all-reduce inside the graph it is an error (every rank must replay the graph)."""
    single, multi = _setups("fp32", 2)
    one_graph = GraphedUnlearnStep(single, N, NF, SHAPE, noise_seed=NOISE_SEED, warmup=2)
    multi.student = DDPStudent(multi.student, nccl_one_rank, seed=single.seed)
    multi.student.use_flat_grads()
    two_graphs = GraphedUnlearnStep(multi, N, NF, SHAPE, noise_seed=NOISE_SEED, warmup=2, dist=nccl_one_rank)
    batches = _batches()
    odd = (batches[0][0], torch.arange(N) < NF + 1)  # one forget row more
    for step, (images, is_forget) in enumerate(batches[:4] + [odd] + batches[4:7]):
        multi.student.begin_step(step)
        one_graph(images, is_forget, step, LR)
        two_graphs(images, is_forget, step, LR)
    torch.cuda.synchronize()
    assert one_graph.eager_fallbacks == two_graphs.eager_fallbacks == 1 and two_graphs.flat.is_attached()
    assert _max_rel_diff(multi.student, single.student) <= TOL["fp32"]
    s = _setups("fp32", 1)[0]
    s.student = DDPStudent(s.student, nccl_one_rank, seed=s.seed)
    s.student.use_flat_grads()
    strict = GraphedUnlearnStep(s, N, NF, SHAPE, noise_seed=NOISE_SEED, dist=nccl_one_rank, all_reduce_in_graph=True)
    s.student.begin_step(0)
    with pytest.raises(ValueError, match="every rank must replay"):
        strict(odd[0], odd[1], 0, LR)


def test_graphed_step_refuses_a_student_with_a_reducer(nccl_one_rank):
    s = _setups("fp32", 1)[0]
    s.student = DDPStudent(s.student, nccl_one_rank, seed=s.seed)
    with pytest.raises(ValueError, match="use_flat_grads"):
        GraphedUnlearnStep(s, N, NF, SHAPE, noise_seed=NOISE_SEED, dist=nccl_one_rank)


def _labels(is_forget):
    return torch.where(is_forget, torch.tensor(-100.0), torch.tensor(100.0))  # forget < 100, as the reference


@pytest.mark.parametrize("all_reduce_in_graph", [False, True])
def test_trainer_runs_the_graphed_step_under_ddp(nccl_one_rank, all_reduce_in_graph):
    """train_loop(step_mode='graphed', dist=...) wires the two-graph path (no DDP reducer), and ends where the
    single-process graphed run and the eager DDP fast step (reducer, NCCL) end; the logged losses agree."""
    precision = "fp32"
    single, multi, eager = _setups(precision, 3)
    batches = [(images, _labels(f)) for images, f in _batches()]
    common = dict(epochs=1, lr=LR, progress=False, noise_seed=NOISE_SEED, forget_per_batch=NF, batch_size=N,
                  image_shape=SHAPE, readback_every=4)
    h_single = train_loop(single, lambda e: iter(batches), STEPS, step_mode="graphed", **common)
    multi.student = DDPStudent(multi.student, nccl_one_rank, seed=multi.seed)
    h_multi = train_loop(multi, lambda e: iter(batches), STEPS, step_mode="graphed", dist=nccl_one_rank,
                         all_reduce_in_graph=all_reduce_in_graph, **common)
    eager.student = DDPStudent(eager.student, nccl_one_rank, seed=eager.seed)
    h_eager = train_loop(eager, lambda e: iter(batches), STEPS, step_mode="fast", dist=nccl_one_rank, **common)
    torch.cuda.synchronize()
    _assert_flat_path_ran(multi)
    assert eager.student._ddp is not None  # the eager DDP step did use the reducer
    assert _max_rel_diff(multi.student, single.student) <= TOL[precision]
    assert _max_rel_diff(multi.student, eager.student) <= TOL[precision]
    _assert_moved(single, precision)
    for key in ("train_loss", "train_retain_l2_loss", "train_forget_l2_loss"):
        assert h_multi[0][key] == pytest.approx(h_single[0][key], rel=TOL[precision])
        assert h_multi[0][key] == pytest.approx(h_eager[0][key], rel=TOL[precision])


def test_graphed_ddp_names_half_student_weights_off_and_runs(nccl_one_rank, capsys):
    """The bf16 student copies act on one process: the multi-rank graphed step names the knob off (one line)
    and trains as without it, where it raised before."""
    from unlearn_fast.train import unlearn_setup
    unlearn_setup._knobs_said.clear()
    s = _setups("bf16", 1)[0]
    s.half_student_weights = True
    s.student = DDPStudent(s.student, nccl_one_rank, seed=s.seed)
    s.student.use_flat_grads()
    step = GraphedUnlearnStep(s, N, NF, SHAPE, noise_seed=NOISE_SEED, dist=nccl_one_rank)
    assert "half_student_weights is off for this run: it acts on one process" in capsys.readouterr().out
    assert s.half_student is None and step.copy_tables is None
