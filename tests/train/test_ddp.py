"""DDP on CPU (gloo, 2 ranks spawned with torchrun's environment variables) against 1-rank runs.

What is guaranteed (unlearn_fast/train/distributed.py): the task draws (MAE masks) are made per global
row, so with the reference shuffle sampler a 2-rank run with per-rank batch B sees the same rows and
the same masks as a 1-rank run with batch 2B, and DDP averages the per-rank gradients, which equals the
1-rank gradient because the loss divides by the (equal) batch size. The noise images take each rank's
own batch statistics (as the reference computes them per GPU), so:
- with forget_alpha 0 the final weights equal the 1-rank run (A: reference step; B: fast step with
  accumulation, i.e. no_sync on the first micro-step);
- with forget_alpha > 0 they equal a single-process restatement that runs each rank's half-batch with
  that rank's noise stream and averages the two gradients (C).
Tolerance (fp32): 1e-5 absolute on the weights, whose training moves them by ~2e-3; the key third of each
qkv bias has an exactly zero true gradient, so AdamW turns rounding noise into lr-sized steps there: 1e-4.
"""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import unlearn_fast
from unlearn_fast.cli.main import main
from unlearn_fast.models.adapter import TaskDraw
from unlearn_fast.train.balanced_sampler import ReferenceShuffleBatchSampler
from unlearn_fast.train.data_split import select_unlearning_files
from unlearn_fast.train.image_datasets import UnlearnImageDataset, reference_train_transform
from unlearn_fast.train.lr_schedule import lr_at, set_lr
from unlearn_fast.train.seeding import step_generator
from unlearn_fast.train.step_reference import reference_step
from unlearn_fast.train.unlearn_setup import build_setup

pytestmark = pytest.mark.usefixtures("single_thread")

LR, EPOCHS, N_IMG = 1e-3, 2, 6
ATOL, ATOL_KEY_BIAS = 1e-6, 2e-4


def _cli_args(data, weights, out, batch, *extra):
    pretrained, teacher = weights
    return ["unlearn", "--model", "mae_micro", "--input_size", "32", "--data_path", data,
            "--forget_classes", "cat,dog", "--retain_classes", "bird", "--num_image_per_class", str(N_IMG),
            "--batch_size", str(batch), "--epochs", str(EPOCHS), "--warmup_epochs", "1", "--num_workers", "0",
            "--output_dir", out, "--no_progress", "--device", "cpu", "--resume", pretrained, "--teacher", teacher,
            "--precision", "fp32",
            "--lr", str(LR), *extra]


CONFIGS = {  # name: (per-rank batch, extra flags); the 1-rank run uses 2x the batch
    # A also evaluates every epoch on held-out files (4 of the 6 per class train): rank 0 alone evaluates
    "A": (4, ["--step", "reference", "--forget_alpha", "0", "--num_image_per_class", "4", "--eval_every", "1"]),
    "B": (2, ["--step", "fast", "--forget_alpha", "0", "--accum_iter", "2"]),
    "C": (4, ["--step", "reference", "--forget_alpha", "0.5"]),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, world, ports, data, weights, out_root):
    """One rank: the environment torchrun would set, then the CLI, once per config."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    from unlearn_fast.train.distributed import DDPStudent, DistContext, init_distributed, cleanup_distributed
    for name, (batch, extra) in CONFIGS.items():
        os.environ["MASTER_PORT"] = str(ports[name])
        rc = main(_cli_args(data, weights, os.path.join(out_root, name), batch, *extra))
        assert rc == 0, f"rank {rank}, config {name}: exit code {rc}"
    # DDP registers exactly the trainable (encoder) parameters, never the frozen ones
    os.environ["MASTER_PORT"] = str(ports["unit"])
    ctx = init_distributed(torch.device("cpu"))
    try:
        model = unlearn_fast.create_model("mae_micro")
        setup = build_setup(model, "cpu", precision="fp32")
        student = DDPStudent(model, ctx, seed=0)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        frozen = {f"model.{n}" for n, p in model.named_parameters() if not p.requires_grad}
        assert student.ddp_parameter_names() == trainable == list(model.encoder_parameter_names())
        assert frozen and frozen <= student.ddp.parameters_to_ignore
        assert not isinstance(setup.teacher, torch.nn.parallel.DistributedDataParallel)
        assert isinstance(ctx, DistContext) and ctx.world_size == world and ctx.backend == "gloo"
        # accumulation micro-steps skip the all-reduce (no_sync): 4 micro-steps with accum_iter 2 send as many
        # buckets as 2 steps without accumulation (without no_sync the sums would match but cost twice)
        assert _all_reduce_calls(ctx, accum=2, steps=4) == _all_reduce_calls(ctx, accum=1, steps=2) > 0
    finally:
        cleanup_distributed(ctx)


def _all_reduce_calls(ctx, accum, steps):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from unlearn_fast.train.distributed import DDPStudent
    from unlearn_fast.train.trainer import train_loop
    model = unlearn_fast.create_model("mae_micro")
    setup = build_setup(model, "cpu", precision="fp32", accum_iter=accum, forget_alpha=0.5, rank=ctx.rank)
    setup.student = DDPStudent(model, ctx, seed=0)
    calls = []

    def counting(state, bucket):
        calls.append(1)
        return allreduce_hook(state, bucket)
    setup.student.ddp.register_comm_hook(None, counting)
    g = torch.Generator().manual_seed(ctx.rank)
    batches = [(torch.rand(2, 3, 32, 32, generator=g), torch.tensor([100.0, -100.0])) for _ in range(steps)]
    train_loop(setup, lambda e: iter(batches), steps, epochs=1, lr=1e-4, progress=False, step_mode="fast", dist=ctx)
    return len(calls)


@pytest.fixture(scope="module")
def data_and_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_data") / "train"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "bird", "fish"):
        (root / c).mkdir(parents=True)
        for i in range(N_IMG):
            Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    # a teacher other than the starting weights: the retain term has a real gradient from step 0 (with
    # teacher == student it is exactly 0 in fp32, or pure rounding noise that AdamW blows up to lr-sized steps)
    folder = tmp_path_factory.mktemp("ddp_ckpt")
    paths = (str(folder / "pretrained.pth"), str(folder / "teacher.pth"))
    with torch.random.fork_rng(devices=[]):
        for seed, path in enumerate(paths):
            torch.manual_seed(seed)
            torch.save({"model": unlearn_fast.create_model("mae_micro").state_dict()}, path)
    return str(root), paths


@pytest.fixture(scope="module")
def two_rank_runs(data_and_weights, tmp_path_factory):
    """The three 2-rank CLI runs (one spawn, to pay the process start-up once)."""
    data, weights = data_and_weights
    out = tmp_path_factory.mktemp("ddp_out")
    ports = {name: _free_port() for name in list(CONFIGS) + ["unit"]}
    mp.spawn(_rank_worker, args=(2, ports, data, weights, str(out)), nprocs=2, join=True)
    return str(out)


def _final_model(out_dir):
    runs = os.listdir(out_dir)
    assert len(runs) == 1, f"expected one run directory (rank 0 only writes), got {runs}"
    run = os.path.join(out_dir, runs[0])
    return torch.load(os.path.join(run, f"checkpoint-{EPOCHS - 1}.pth"), weights_only=True)["model"], run


def _assert_weights_match(got, want, pretrained):
    for k, v in want.items():
        diff = (got[k] - v).abs()
        if k.endswith("attn.qkv.bias"):  # [3D]: the key third has zero true gradient (see module docstring)
            d = v.shape[0] // 3
            assert diff[d:2 * d].max().item() <= ATOL_KEY_BIAS, k
            diff = torch.cat([diff[:d], diff[2 * d:]])
        assert diff.max().item() <= ATOL, f"{k}: max |2-rank - reference| = {diff.max().item():.3g}"
    changed = max((want[k] - pretrained[k]).abs().max().item() for k in want)
    assert changed > 1000 * ATOL  # the comparison is far tighter than what training moved
    for k in ("decoder_pred.weight", "decoder_embed.weight", "mask_token"):  # frozen parts untouched
        assert torch.equal(got[k], pretrained[k])


@pytest.mark.parametrize("name", ["A", "B"])
def test_two_ranks_equal_one_rank_with_the_same_global_batch(two_rank_runs, data_and_weights, tmp_path, name):
    data, weights = data_and_weights
    pretrained = weights[0]
    batch, extra = CONFIGS[name]
    assert main(_cli_args(data, weights, str(tmp_path), 2 * batch, *extra)) == 0
    one, one_run = _final_model(str(tmp_path))
    two, two_run = _final_model(os.path.join(two_rank_runs, name))
    _assert_weights_match(two, one, torch.load(pretrained, weights_only=True)["model"])
    # logged losses are the mean over ranks: the retain term equals the 1-rank value
    import json
    log1 = [json.loads(x) for x in open(os.path.join(one_run, "log.txt"))]
    log2 = [json.loads(x) for x in open(os.path.join(two_run, "log.txt"))]
    assert [x["epoch"] for x in log2] == list(range(EPOCHS))
    for a, b in zip(log1, log2):
        assert b["train_retain_l2_loss"] == pytest.approx(a["train_retain_l2_loss"], rel=1e-4, abs=1e-9)
        assert b["train_lr"] == pytest.approx(a["train_lr"], rel=1e-12)
    if name == "A":  # --eval_every under DDP: one log (rank 0), the same held-out numbers as the 1-rank run
        ev1 = [json.loads(x) for x in open(os.path.join(one_run, "eval_log.txt"))]
        ev2 = [json.loads(x) for x in open(os.path.join(two_run, "eval_log.txt"))]
        assert [x["epoch"] for x in ev2] == [None] + list(range(EPOCHS))
        assert ev2[0] == ev1[0]  # before: the same teacher, files and masks
        for a, b in zip(ev1[1:], ev2[1:]):
            assert b["forget_mse"] == pytest.approx(a["forget_mse"], rel=1e-4)
            assert b["retain_mse"] == pytest.approx(a["retain_mse"], rel=1e-4)
        assert os.path.isfile(os.path.join(two_run, "best.pth"))
    args = torch.load(os.path.join(two_run, f"checkpoint-{EPOCHS - 1}.pth"), weights_only=True)["args"]
    assert args["world_size"] == 2 and args["eff_batch_size"] == 2 * batch * (2 if name == "B" else 1)


class _RankRows:
    """The oracle's stand-in for rank r: the plain model, with rank r's rows of the global task draw."""

    def __init__(self, model, rank, world, seed, step):
        self.model, self.rank, self.world, self.seed, self.step = model, rank, world, seed, step

    def __getattr__(self, name):
        return getattr(self.model, name)

    def sample_task(self, images, generator=None):
        n = images.shape[0]
        noise = torch.rand(self.world * n, self.model.num_patches,
                           generator=step_generator(self.seed, 0, self.step, "task", "cpu"))
        return TaskDraw(noise=noise[self.rank * n:(self.rank + 1) * n])


def test_two_ranks_with_forget_term_equal_the_per_rank_average(two_rank_runs, data_and_weights):
    """C: forget_alpha 0.5. Oracle: one process, each step runs rank 0's then rank 1's half-batch (their
    own noise streams and batch statistics) with accum_iter 2, i.e. the average of the two gradients."""
    data, (pretrained, teacher_path) = data_and_weights
    batch, world = CONFIGS["C"][0], 2
    model, teacher = unlearn_fast.create_model("mae_micro"), unlearn_fast.create_model("mae_micro")
    model.load_state_dict(torch.load(pretrained, weights_only=True)["model"])
    teacher.load_state_dict(torch.load(teacher_path, weights_only=True)["model"])
    setup = build_setup(model, "cpu", lr=LR, precision="fp32", forget_alpha=0.5, accum_iter=world, seed=0,
                        teacher=teacher)
    items = select_unlearning_files(data, ["cat", "dog"], ["bird"], N_IMG, 1.0, None, None, 0)
    dataset = UnlearnImageDataset(items, reference_train_transform(32), seed=0)
    samplers = [ReferenceShuffleBatchSampler(len(items), batch, seed=0, rank=r, world_size=world)
                for r in range(world)]
    steps = samplers[0].steps_per_epoch
    for epoch in range(EPOCHS):
        dataset.set_epoch(epoch)
        for s in samplers:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in samplers]
        for it in range(steps):
            step = epoch * steps + it
            set_lr(setup.optimizer, lr_at(it / steps + epoch, LR, 0.0, 1, EPOCHS))
            for r in range(world):
                rows = [dataset[i] for i in per_rank[r][it]]
                images = torch.stack([x for x, _ in rows])
                labels = torch.tensor([y for _, y in rows])
                setup.rank, setup.student = r, _RankRows(model, r, world, 0, step)
                reference_step(setup, images, labels < 100, step, update=r == world - 1)
    two, _ = _final_model(os.path.join(two_rank_runs, "C"))
    _assert_weights_match(two, model.state_dict(), torch.load(pretrained, weights_only=True)["model"])
