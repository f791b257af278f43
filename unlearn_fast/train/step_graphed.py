"""A CUDA-graph captured training step: the whole micro-step and update replayed with one launch.

Static shapes come from a balanced sampler (a fixed number F of forget rows per batch of N). Each batch
is copied into static buffers with its forget rows first, so the row split is a constant. Per step,
only small things happen outside the graph: the H2D copy of the images, the task draw (masks, from the
(seed, rank, step) generator) copied into static buffers, the lr written into the optimizer's lr tensor
and the step counter the fused Philox noise reads. Inside the graph: student forward (autocast),
pruned teacher, fused noise, fused loss, backward, unscale, clip, fused AdamW (skipped on inf/NaN
grads), scaler update, and the loss sums the trainer reads back every N steps. No host sync.

The first ``warmup`` steps run the same body eagerly on a side stream (real training steps; CUDA needs
them before capture), so the trajectory is that of the fast eager step. Batches that do not have
exactly F forget rows run the eager fast step instead, with a one-time notice.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..objective import unlearn_loss_pruned
from ..ops import sample_batch_noise
from .lr_schedule import set_lr
from .precision import student_autocast, teacher_autocast
from .seeding import seed_step_globals, step_generator
from .step_fast import fast_step, tokenizer_shared_exactly
from .step_reference import StepOutput, optimizer_update
from .unlearn_setup import UnlearnSetup


class GraphedUnlearnStep:
    """Callable ``(images_cpu, is_forget_cpu, step, lr) -> None``; sums in :attr:`loss_sums`."""

    def __init__(self, setup: UnlearnSetup, batch_size: int, num_forget: int, image_shape, noise_seed: int,
                 warmup: int = 3):
        if setup.device.type != "cuda":
            raise ValueError("CUDA-graph steps need a CUDA device")
        if setup.accum_iter != 1:
            raise ValueError("CUDA-graph steps need --accum_iter 1 (gradient accumulation runs eagerly)")
        if setup.loss_type is not None:
            raise ValueError("CUDA-graph steps run the paper's objective, not the baselines")
        opt = setup.optimizer
        if not torch.is_tensor(opt.param_groups[0]["lr"]):
            raise ValueError("CUDA-graph steps need an optimizer built with capturable=True (tensor lr)")
        self.setup, self.n, self.f = setup, batch_size, num_forget
        dev = setup.device
        self.x = torch.zeros((batch_size,) + tuple(image_shape), device=dev)  # [N, C, H, W], forget rows first
        self.is_forget = torch.arange(batch_size, device=dev) < num_forget
        self.retain_rows = torch.arange(num_forget, batch_size, device=dev)
        self.forget_rows = torch.arange(num_forget, device=dev)
        self.step_t = torch.zeros((), dtype=torch.int64, device=dev)
        self.noise_seed = int(noise_seed)
        self.task = None
        self.loss_sums = torch.zeros(3, device=dev)  # loss, retain, forget summed since the last read
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.warmup, self.done_warmup = warmup, 0
        self.side = torch.cuda.Stream(device=dev)
        self.eager_fallbacks = 0

    # the body that is run eagerly during warmup and captured afterwards
    def _body(self, capturing: bool):
        s = self.setup
        student, teacher, dev = s.student, s.teacher, s.device
        with student_autocast(s.precision, dev, cache_enabled=not capturing):
            inputs = student.prepare_inputs(self.x)
            latent = student.forward_encoder_task(inputs, self.task)  # [N, L, D]
        share = s.share_tokenizer or tokenizer_shared_exactly(s)
        lo, hi = student.image_range
        with torch.no_grad(), teacher_autocast(s.precision, dev, cache_enabled=not capturing):
            hidden_r = hidden_f = None
            if self.f < self.n:
                t_in = inputs.index_select(0, self.retain_rows) if share and torch.is_tensor(inputs) \
                    else teacher.prepare_inputs(self.x.index_select(0, self.retain_rows))
                hidden_r = teacher.forward_encoder_task(t_in, self.task.select(self.retain_rows), prenorm=True)
            if self.f > 0:
                noise = sample_batch_noise(self.x, s.noise_type, seed=self.noise_seed, step=self.step_t, low=lo,
                                           high=hi)
                t_in = teacher.prepare_inputs(noise.index_select(0, self.forget_rows))
                hidden_f = teacher.forward_encoder_task(t_in, self.task.select(self.forget_rows), prenorm=True)
        out = unlearn_loss_pruned(latent, hidden_r, hidden_f, self.is_forget, s.retain_alpha, s.forget_alpha,
                                  final_norm=teacher.encoder_final_norm())
        s.scaler.scale(out.loss).backward()
        optimizer_update(s)
        self.loss_sums.add_(torch.stack([out.loss.detach(), out.retain.detach(), out.forget.detach()]))

    def _load_batch(self, images_cpu: torch.Tensor, is_forget_cpu: torch.Tensor, step: int) -> None:
        f = is_forget_cpu.to("cpu", torch.bool)
        order = torch.cat([f.nonzero().squeeze(1), (~f).nonzero().squeeze(1)])  # forget rows first
        dev = self.x.device
        staged = images_cpu.to(dev, non_blocking=True)  # pinned host memory -> async copy
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

    def __call__(self, images_cpu: torch.Tensor, is_forget_cpu: torch.Tensor, step: int, lr: float) -> None:
        s = self.setup
        if images_cpu.shape[0] != self.n or int(is_forget_cpu.sum()) != self.f:
            if not self.eager_fallbacks:
                print(f"unlearn_fast: batch of {images_cpu.shape[0]} rows / {int(is_forget_cpu.sum())} forget "
                      f"does not fit the captured graph ({self.n}/{self.f}); running it eagerly")
            self.eager_fallbacks += 1
            set_lr(s.optimizer, lr)
            out = fast_step(s, images_cpu, is_forget_cpu, step, noise_seed=self.noise_seed)
            self.loss_sums.add_(torch.stack(list(out)))
            return
        set_lr(s.optimizer, lr)
        self._load_batch(images_cpu, is_forget_cpu, step)
        if self.graph is not None:
            self.graph.replay()
            return
        if self.done_warmup < self.warmup:
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                self._body(capturing=False)
            torch.cuda.current_stream().wait_stream(self.side)
            self.done_warmup += 1
            return
        s.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._body(capturing=True)
        self.graph.replay()  # capture records only: run this step for real

    def read_and_reset(self) -> torch.Tensor:
        """Summed (loss, retain, forget) since the last call, on the host (one sync)."""
        out = self.loss_sums.to("cpu", copy=True)
        self.loss_sums.zero_()
        return out
