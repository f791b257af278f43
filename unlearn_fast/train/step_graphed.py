"""A CUDA-graph captured training step: the whole micro-step and update replayed with one launch.

Static shapes come from a balanced sampler (a fixed number F of forget rows per batch of N). Each batch
is copied into static buffers with its forget rows first, so the row split is a constant. Per step,
only small things happen outside the graph: the H2D copy of the images, the task draw (masks, from the
(seed, rank, step) generator) copied into static buffers, the lr written into the optimizer's lr tensor
and the step counter the fused Philox noise reads. Inside the graph: student forward (autocast),
pruned teacher and fused noise (on a side stream: a parallel branch of the graph), fused loss, backward,
unscale, clip, fused AdamW (skipped on inf/NaN grads under fp16 loss scaling), scaler update, and the loss
sums the trainer reads back every N steps. No host sync.

The first ``warmup`` steps run the same body eagerly on a side stream (real training steps; CUDA needs
them before capture), so the trajectory is that of the fast eager step. Batches that do not have
exactly F forget rows, or not N rows, run the eager fast step instead, with a one-time notice; images of another
shape than the graph's ``image_shape`` are refused (build a new step for them).

Several ranks (``dist``): DDP's reducer hooks cannot be captured, so the student runs without them
(``DDPStudent.use_flat_grads()``) and the gradients live in one flat buffer (:mod:`flat_grads`). The step
is two graphs: A = forward + backward into the buffer, B = unscale, clip, fused AdamW, scaler update, zero
the buffer; between them one all-reduce (mean over ranks) of the buffer, eager by default or captured at the
end of A (``all_reduce_in_graph``: NCCL >= 2.9.6, and every rank must replay the graph, so a batch that does
not fit is an error there instead of an eager fallback). Same arithmetic as the eager DDP fast step.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..objective import unlearn_loss_merged_guide
from ..ops import sample_batch_noise
from .distributed import DistContext, all_reduce_mean_
from .flat_grads import FlatGrads, flat_grads_update, split_fast_step, trainable_named_parameters
from .fast_update import fast_optimizer_update
from .half_student import ONE_PROCESS_ONLY, step_student
from .half_teacher import step_teacher
from .lr_schedule import set_lr
from .seeding import seed_step_globals, step_generator
from .step_fast import fast_step, student_and_teacher
from .teacher_guides import front_ends_match
from .teacher_stream import teacher_stream_for
from .step_reference import check_step_inputs
from .unlearn_setup import UnlearnSetup, say_knob_off


class GraphedUnlearnStep:
    """Callable ``(images_cpu, is_forget_cpu, step, lr) -> None``; sums in :attr:`loss_sums`.

    ``dist``: several ranks (the student a ``DDPStudent`` after ``use_flat_grads()``, nccl): :attr:`graph` is
    then graph A and :attr:`graph_update` graph B, the gradients are :attr:`flat` (a :class:`FlatGrads`).
    ``all_reduce_in_graph``: capture the all-reduce at the end of A instead of running it between A and B.
    """

    def __init__(self, setup: UnlearnSetup, batch_size: int, num_forget: int, image_shape, noise_seed: int,
                 warmup: int = 3, dist: Optional[DistContext] = None, all_reduce_in_graph: bool = False):
        if setup.device.type != "cuda":
            raise ValueError(f"CUDA-graph steps need a CUDA device, the setup is on {setup.device}; use fast_step "
                             "(step_fast.py) there")
        if not 0 <= num_forget <= batch_size or batch_size < 1:
            raise ValueError(f"need 0 <= num_forget <= batch_size and batch_size >= 1, got num_forget={num_forget}, "
                             f"batch_size={batch_size}")
        dist = dist if dist is not None and dist.enabled else None
        if all_reduce_in_graph and dist is None:
            raise ValueError("all_reduce_in_graph needs a process group (dist): a single process has no all-reduce")
        if dist is not None:
            _check_graph_ddp(setup, dist, all_reduce_in_graph)
        if setup.accum_iter != 1:
            raise ValueError("CUDA-graph steps need --accum_iter 1 (gradient accumulation runs eagerly)")
        if setup.loss_type is not None:
            raise ValueError("CUDA-graph steps run the paper's objective, not the baselines")
        opt = setup.optimizer
        if not torch.is_tensor(opt.param_groups[0]["lr"]):
            raise ValueError("CUDA-graph steps need an optimizer built with capturable=True (tensor lr)")
        self.setup, self.n, self.f = setup, batch_size, num_forget
        dev = setup.device
        self.image_shape = tuple(int(v) for v in image_shape)  # [C, H, W]: the captured graph's, fixed
        self.x = torch.zeros((batch_size,) + self.image_shape, device=dev)  # [N, C, H, W], forget rows first
        self.is_forget = torch.arange(batch_size, device=dev) < num_forget
        self.forget_rows = torch.arange(num_forget, device=dev)
        self.step_t = torch.zeros((), dtype=torch.int64, device=dev)
        self.noise_seed = int(noise_seed)
        self.task = None
        self.loss_sums = torch.zeros(3, device=dev)  # loss, retain, forget summed since the last read
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.warmup, self.done_warmup = warmup, 0
        self.side = torch.cuda.Stream(device=dev)
        teacher_stream_for(setup)  # made now, never during a capture
        step_teacher(setup)  # likewise the bf16-weight teacher copy: its casts must run, not be captured
        if dist is not None and setup.half_student_weights:  # named off, as every opt-in form that cannot act
            say_knob_off(setup, "half_student_weights", ONE_PROCESS_ONLY)
            setup.half_student_weights = False
        step_student(setup)  # and the bf16-weight student copy, with the graph's own address tables
        self.copy_tables = setup.half_student.new_tables() if setup.half_student is not None else None
        front_ends_match(setup.student, setup.teacher)  # and the frozen-weight comparison (host syncs)
        self.eager_fallbacks = 0
        # several ranks: graph A (forward + backward) and graph B (update) around the gradient all-reduce
        self.dist, self.all_reduce_in_graph = dist, bool(all_reduce_in_graph)
        self.flat = FlatGrads(trainable_named_parameters(setup.student)) if dist is not None else None
        self.graph_update: Optional[torch.cuda.CUDAGraph] = None

    # the body that is run eagerly during warmup and captured afterwards (one graph on a single process)
    def _body(self, capturing: bool):
        self._forward_backward(capturing)
        # the graph's own address tables (written after the capture); the eager warmup steps use the copy's
        fast_optimizer_update(self.setup, self.copy_tables if capturing else None)

    def _forward_backward(self, capturing: bool):
        s = self.setup
        lo, hi = s.student.image_range

        def draw_noise() -> torch.Tensor:
            return sample_batch_noise(self.x, s.noise_type, seed=self.noise_seed, step=self.step_t, low=lo, high=hi)

        latent, hidden = student_and_teacher(s, self.x, self.task, self.is_forget, self.forget_rows, draw_noise,
                                             cache_enabled=not capturing)
        out = unlearn_loss_merged_guide(latent, hidden, self.is_forget, s.retain_alpha, s.forget_alpha,
                                        final_norm=s.teacher.encoder_final_norm())
        s.scaler.scale(out.loss).backward()
        self.loss_sums.add_(torch.stack([out.loss.detach(), out.retain.detach(), out.forget.detach()]))
        if capturing and self.all_reduce_in_graph:
            self.flat.all_reduce_mean_(self.dist)

    def _split_body(self) -> None:
        """Several ranks, eagerly (warmup): A, the all-reduce, B; the first backward checks for unused params."""
        first = not self.flat.checked
        if first:
            self.flat.detach_for_check()
        self._forward_backward(capturing=False)
        if first:
            self.flat.attach_checked()
        self.flat.all_reduce_mean_(self.dist)
        flat_grads_update(self.setup, self.flat)

    def _replay_split(self) -> None:
        self.graph.replay()
        if not self.all_reduce_in_graph:
            self.flat.all_reduce_mean_(self.dist)
        self.graph_update.replay()

    def _load_batch(self, images_cpu: torch.Tensor, is_forget_cpu: torch.Tensor, step: int) -> None:
        f = is_forget_cpu.to("cpu", torch.bool)
        order = torch.cat([f.nonzero().squeeze(1), (~f).nonzero().squeeze(1)])  # forget rows first
        dev = self.x.device
        staged = images_cpu.to(dev, self.x.dtype, non_blocking=True)  # pinned host memory -> async copy
        torch.index_select(staged, 0, order.to(dev, non_blocking=True), out=self.x)
        s = self.setup
        seed_step_globals(s.seed, s.rank, step)
        task = s.student.sample_task(self.x, step_generator(s.seed, s.rank, step, "task", s.device))
        if self.task is None:
            self.task = task
        else:
            for k, v in task.items():
                if torch.is_tensor(v):
                    self.task[k].copy_(v)
        self.step_t.fill_(step)

    def check_batch(self, images_cpu: torch.Tensor, is_forget_cpu: torch.Tensor, step: int) -> torch.Tensor:
        """``is_forget_cpu`` as bool; an image shape other than the graph's is an error (its buffers are static:
        a copy into them would resize them under the graph), another batch size runs eagerly."""
        is_forget_cpu = check_step_inputs(images_cpu, is_forget_cpu, step)
        if tuple(images_cpu.shape[1:]) != self.image_shape:
            raise ValueError(f"the images changed shape: {tuple(images_cpu.shape[1:])} per image, the captured graph "
                             f"has {self.image_shape}; build a new GraphedUnlearnStep for the new shape")
        if not images_cpu.is_floating_point():
            raise TypeError(f"images must be floating point, got {images_cpu.dtype}")
        return is_forget_cpu

    def __call__(self, images_cpu: torch.Tensor, is_forget_cpu: torch.Tensor, step: int, lr: float) -> None:
        s = self.setup
        is_forget_cpu = self.check_batch(images_cpu, is_forget_cpu, step)
        if images_cpu.shape[0] != self.n or int(is_forget_cpu.sum()) != self.f:
            self._eager_fallback(images_cpu, is_forget_cpu, step, lr)
            return
        set_lr(s.optimizer, lr)
        self._load_batch(images_cpu, is_forget_cpu, step)
        if self.graph is not None:
            if self.flat is None:
                self.graph.replay()
            else:
                self._replay_split()
            return
        if self.done_warmup < self.warmup:
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                if self.flat is None:
                    self._body(capturing=False)
                else:
                    self._split_body()
            torch.cuda.current_stream().wait_stream(self.side)
            self.done_warmup += 1
            return
        if self.flat is None:
            s.optimizer.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._body(capturing=True)
            if self.copy_tables is not None:
                self.copy_tables.write_pending()  # the addresses the captured update kernels read
            self.graph.replay()  # capture records only: run this step for real
            return
        # several ranks: the grads stay the flat buffer's views (zeroed by the last update)
        torch.cuda.synchronize()  # no collective in flight while capturing
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._forward_backward(capturing=True)
        graph_update = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph_update, pool=graph.pool()):  # replayed after A, never concurrently
            flat_grads_update(s, self.flat)
        self.graph, self.graph_update = graph, graph_update
        self._replay_split()  # capture records only: run this step for real

    def _eager_fallback(self, images_cpu, is_forget_cpu, step: int, lr: float) -> None:
        s = self.setup
        if self.all_reduce_in_graph:
            raise ValueError(f"batch of {images_cpu.shape[0]} rows / {int(is_forget_cpu.sum())} forget does not fit "
                             f"the captured graph ({self.n}/{self.f}); with the all-reduce inside the graph every "
                             "rank must replay it (use a balanced sampler, --forget_per_batch)")
        if not self.eager_fallbacks:
            print(f"unlearn_fast: batch of {images_cpu.shape[0]} rows / {int(is_forget_cpu.sum())} forget "
                  f"does not fit the captured graph ({self.n}/{self.f}); running it eagerly")
        self.eager_fallbacks += 1
        set_lr(s.optimizer, lr)
        if self.flat is None:
            out = fast_step(s, images_cpu, is_forget_cpu, step, noise_seed=self.noise_seed)
        else:
            out = split_fast_step(s, self.flat, self.dist, images_cpu, is_forget_cpu, step,
                                  noise_seed=self.noise_seed)
        self.loss_sums.add_(torch.stack(list(out)))

    def read_and_reset(self) -> torch.Tensor:
        """Summed (loss, retain, forget) since the last call, on the host (one sync); the mean over ranks
        with several (a collective: every rank calls it at the same step)."""
        out = self.loss_sums.clone()
        self.loss_sums.zero_()
        if self.dist is not None:
            all_reduce_mean_(out, self.dist)
        return out.to("cpu")


def _check_graph_ddp(setup: UnlearnSetup, dist: DistContext, all_reduce_in_graph: bool) -> None:
    if getattr(setup.student, "reducer_active", False):
        raise ValueError("the multi-rank CUDA-graph step needs the student without DDP's reducer (its hooks cannot "
                         "be captured): call DDPStudent.use_flat_grads() first")
    if dist.backend != "nccl":
        raise ValueError(f"the multi-rank CUDA-graph step needs the nccl backend, not {dist.backend!r}")
    if all_reduce_in_graph:
        version = torch.cuda.nccl.version()
        if isinstance(version, int):  # old encodings: 2.8.3 -> 2803, 2.9.6 -> 20906
            version = (version // 10000, version // 100 % 100, version % 100) if version >= 10000 else \
                (version // 1000, version // 100 % 10, version % 100)
        version = tuple(int(v) for v in version[:3])
        if version < (2, 9, 6):
            raise ValueError(f"capturing the all-reduce in a CUDA graph needs NCCL >= 2.9.6, this torch has "
                             f"{'.'.join(map(str, version))} (use all_reduce_in_graph=False)")
