"""AdamW on fp32 weights from half-precision gradients, writing a half-precision copy of each updated weight.

``adamw_with_copies_`` is one AdamW update (torch's fused AdamW math, ``amsgrad`` and ``maximize`` off) of T fp32
weights (each dense: contiguous, channels_last or a transpose; its moments, gradient and copy laid out alike) whose
gradients are bf16 / fp16 / fp32 tensors, scaled by the clip's coefficient on the way in, that also
writes ``copies[i] = params[i]`` rounded to the copies' dtype. ``grad_sum_of_squares`` is the clip's squared norm
of those gradients, accumulated in fp32. Why: a student whose matmul weights are such copies runs its bf16 forward
and backward without autocast's casts, and the update reads each gradient once (kernels/adamw_copy.py, bytes).

The tensors stay separate allocations: the Triton kernels reach them through a table of device addresses,
:class:`AddressTables`, made once for a fixed list of shapes and rewritten when an address changes (one small
host-to-device copy, without a sync). Inside a CUDA-graph capture the new addresses cannot be copied: they are
kept and written by :meth:`AddressTables.write_pending` right after the capture, before the graph is replayed (the
captured kernels read the table when replayed); a graph needs its own tables.

Dispatch: the Triton kernels for CUDA tensors (or any device with ``UNLEARN_FAST_BACKEND=triton``, e.g. the CPU
under TRITON_INTERPRET=1); the plain PyTorch twin, ``adamw_with_copies_reference``, otherwise.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from .backend import choose_triton_or_twin, triton_kernels

_OP = "adamw_with_copies"
_HALF_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ROLES = ("param", "exp_avg", "exp_avg_sq", "step", "grad", "copy")  # the address table's rows (kernels' order)
CHUNK = 2048  # elements per program of the kernels (16 per thread at 4 warps): the chunk table's spacing


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class AddressTables:
    """The device tables the kernels read for a fixed list of tensor sizes ``numels`` in parameter groups
    ``groups`` (one int per tensor): a chunk table (program -> tensor, first element), and the addresses of each
    role's tensors, rewritten by :meth:`point_at` when they change."""

    def __init__(self, numels: Sequence[int], groups: Sequence[int], device):
        numels, groups = [int(n) for n in numels], [int(g) for g in groups]
        if len(numels) != len(groups):
            raise ValueError(f"{len(numels)} tensor sizes but {len(groups)} group indices")
        if any(n < 1 for n in numels) or any(g < 0 for g in groups):
            raise ValueError("tensor sizes must be >= 1 and group indices >= 0")
        self.device = torch.device(device)
        chunks = [(t, start) for t, n in enumerate(numels) for start in range(0, n, CHUNK)]
        self.chunk_tensor = torch.tensor([t for t, _ in chunks], dtype=torch.int32, device=self.device)
        self.chunk_start = torch.tensor([s for _, s in chunks], dtype=torch.int64, device=self.device)
        self.numels = torch.tensor(numels, dtype=torch.int64, device=self.device)
        self.groups = torch.tensor(groups, dtype=torch.int32, device=self.device)
        self.sizes, self.group_list = tuple(numels), tuple(groups)
        self.addresses = torch.zeros(len(_ROLES), len(numels), dtype=torch.int64, device=self.device)
        self._written: Dict[str, tuple] = {}
        self._pending: Dict[str, tuple] = {}

    def point_at(self, role: str, tensors: Sequence[torch.Tensor]) -> None:
        """Row ``role`` holds the addresses of ``tensors`` (T of them, the sizes given at construction)."""
        ptrs = tuple(t.data_ptr() for t in tensors)
        if ptrs == self._pending.get(role, self._written.get(role)):
            return
        if len(ptrs) != len(self.sizes):
            raise ValueError(f"{role}: {len(ptrs)} tensors, the tables are for {len(self.sizes)}")
        if _capturing(self.device):  # no host-to-device copy in a capture: written after it
            self._pending[role] = ptrs
            return
        self._write(role, ptrs)

    def _write(self, role: str, ptrs: tuple) -> None:
        row = torch.tensor(ptrs, dtype=torch.int64)
        if self.device.type == "cuda":
            row = row.pin_memory()  # an asynchronous copy: no wait for the GPU
        self.addresses[_ROLES.index(role)].copy_(row, non_blocking=True)
        self._written[role] = ptrs

    def write_pending(self) -> None:
        """After a CUDA-graph capture: write the addresses the captured kernels will read."""
        for role, ptrs in list(self._pending.items()):
            self._write(role, ptrs)
            del self._pending[role]

    def aligned(self, roles: Sequence[str]) -> bool:
        """Every address of ``roles`` (as last given) is a multiple of 16 bytes (vector accesses)."""
        return all(p % 16 == 0 for r in roles for p in self._pending.get(r, self._written.get(r, (1,))))


def is_dense(t: torch.Tensor) -> bool:
    """``t``'s elements fill one run of memory without gaps or overlaps, in some order of its dimensions
    (contiguous, channels_last, a transpose): a kernel can walk its ``numel`` elements from ``data_ptr``."""
    if t.is_contiguous():  # the common case, without walking the strides in Python
        return True
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _check_list(name: str, tensors, like: List[torch.Tensor], dtypes) -> torch.dtype:
    """Each tensor shaped, placed and laid out as its weight (the kernels walk the same memory order in all of
    them), one dtype of ``dtypes``."""
    if len(tensors) != len(like):
        raise ValueError(f"{name}: {len(tensors)} tensors for {len(like)} weights")
    dtype = None
    for i, (t, p) in enumerate(zip(tensors, like)):
        if not torch.is_tensor(t):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
        if t.shape != p.shape or t.device != p.device:
            raise ValueError(f"{name}[{i}] is {tuple(t.shape)} on {t.device}, its weight {tuple(p.shape)} on "
                             f"{p.device}")
        if t.dtype not in dtypes or (dtype is not None and t.dtype != dtype):
            raise TypeError(f"{name} must be one dtype of {', '.join(str(d) for d in dtypes)}; {name}[{i}] is "
                            f"{t.dtype}")
        if not is_dense(t):
            raise ValueError(f"{name}[{i}] must be dense (no gaps or overlaps: the kernels walk it as one run)")
        if t.stride() != p.stride() and t.numel() > 1:
            raise ValueError(f"{name}[{i}] has strides {t.stride()}, its weight {p.stride()}: they must match")
        dtype = t.dtype
    return dtype


def _check_update_args(params, exp_avgs, exp_avg_sqs, steps, grads, copies, groups, lrs, weight_decays,
                       coef) -> None:
    for name, t in (("lrs", lrs), ("weight_decays", weight_decays), ("coef", coef)):
        if not torch.is_tensor(t):
            raise TypeError(f"{name} must be a tensor (read on the device), got {type(t).__name__}")
    if any(not torch.is_tensor(s) for s in steps):
        raise TypeError("steps must be tensors (torch's AdamW state['step']), got "
                        f"{type(next(s for s in steps if not torch.is_tensor(s))).__name__}")
    if len(groups) != len(params):
        raise ValueError(f"groups: {len(groups)} group indices for {len(params)} weights")
    if weight_decays.shape != lrs.shape:
        raise ValueError(f"weight_decays is {tuple(weight_decays.shape)}, lrs {tuple(lrs.shape)}: one per group")
    bad = [int(g) for g in groups if not 0 <= int(g) < lrs.numel()]
    if bad:
        raise ValueError(f"group index {bad[0]} outside lrs / weight_decays ({lrs.numel()} groups)")
    if not params:
        return
    for i, p in enumerate(params):
        if not torch.is_tensor(p):
            raise TypeError(f"params[{i}] must be a tensor, got {type(p).__name__}")
    _check_list("params", params, params, (torch.float32,))
    _check_list("exp_avgs", exp_avgs, params, (torch.float32,))
    _check_list("exp_avg_sqs", exp_avg_sqs, params, (torch.float32,))
    _check_list("grads", grads, params, _HALF_DTYPES)
    _check_list("copies", copies, params, _HALF_DTYPES)
    dev = params[0].device
    if len(steps) != len(params) or any(s.dim() != 0 or s.dtype != torch.float32 or s.device != dev for s in steps):
        raise ValueError(f"steps must be one 0-d fp32 tensor per weight on {dev} (torch's fused / capturable AdamW "
                         "keeps them so)")
    for name, t in (("lrs", lrs), ("weight_decays", weight_decays)):
        if t.dim() != 1 or t.dtype != torch.float32 or t.device != dev:
            raise ValueError(f"{name} must be fp32 [G] on {dev}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    if coef.dim() != 0 or coef.dtype != torch.float32 or coef.device != dev:
        raise ValueError(f"coef must be a 0-d fp32 tensor on {dev}")


def grad_sum_of_squares_reference(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Plain PyTorch twin: ``sum_i ||float(grads[i])||^2`` as a 0-d fp32 tensor."""
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    return torch.stack([g.float().pow(2).sum() for g in grads]).sum()


def adamw_with_copies_reference(params, exp_avgs, exp_avg_sqs, steps, grads, copies, groups: Sequence[int], lrs,
                                weight_decays, betas, eps: float, coef: torch.Tensor) -> None:
    """Plain PyTorch twin of :func:`adamw_with_copies_`, the same math and order in fp32 (the test oracle)."""
    beta1, beta2 = (float(b) for b in betas)
    if steps:
        torch._foreach_add_(list(steps), 1.0)
    for p, m, v, step, g, c, group in zip(params, exp_avgs, exp_avg_sqs, steps, grads, copies, groups):
        lr, wd = lrs[group], weight_decays[group]
        g = g.float() * coef
        p.sub_(lr * wd * p)
        m.copy_(beta1 * m + (1.0 - beta1) * g)
        v.copy_(beta2 * v + (1.0 - beta2) * g * g)
        bias_correction1 = 1.0 - torch.pow(torch.tensor(beta1, dtype=torch.float32, device=p.device), step)
        bias_correction2_sqrt = torch.sqrt(1.0 - torch.pow(torch.tensor(beta2, dtype=torch.float32, device=p.device),
                                                           step))
        p.sub_((lr / bias_correction1) * m / (v.sqrt() / bias_correction2_sqrt + eps))
        c.copy_(p)


def grad_sum_of_squares(grads: Sequence[torch.Tensor], tables: Optional[AddressTables] = None) -> torch.Tensor:
    """0-d fp32: the sum of the squares of ``grads`` (one dtype, each dense), for the clip's global norm.
    ``tables``: the :class:`AddressTables` of these tensors' sizes (the Triton path needs them)."""
    grads = list(grads)
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    dtype = _check_list("grads", grads, grads, _HALF_DTYPES)
    if choose_triton_or_twin(grads[0].device, _OP) == "torch" or tables is None:
        return grad_sum_of_squares_reference(grads)
    if tables.sizes != tuple(g.numel() for g in grads):
        raise ValueError("the address tables were made for other tensor sizes")
    tables.point_at("grad", grads)
    k = triton_kernels()
    return k.grad_sum_of_squares(tables.addresses, tables.numels, tables.chunk_tensor, tables.chunk_start, CHUNK,
                                 k.ADAMW_KINDS[dtype], tables.aligned(("grad",)))


def adamw_with_copies_(params, exp_avgs, exp_avg_sqs, steps, grads, copies, groups: Sequence[int],
                       lrs: torch.Tensor, weight_decays: torch.Tensor, betas, eps: float, coef: torch.Tensor,
                       tables: Optional[AddressTables] = None) -> None:
    """One AdamW update in place (module docstring): advances every ``steps[i]`` by one, then updates
    ``params[i]`` (fp32), ``exp_avgs[i]``, ``exp_avg_sqs[i]`` from ``grads[i] * coef`` and writes ``copies[i]``.
    ``groups[i]`` indexes ``lrs`` / ``weight_decays`` (fp32 ``[G]`` on the weights' device, read on the device:
    a CUDA graph replays the current lr). ``tables``: made for these sizes and groups (the Triton path)."""
    params = list(params)
    exp_avgs, exp_avg_sqs, steps, grads, copies = (list(x) for x in (exp_avgs, exp_avg_sqs, steps, grads, copies))
    _check_update_args(params, exp_avgs, exp_avg_sqs, steps, grads, copies, list(groups), lrs, weight_decays, coef)
    if not params:
        return
    if choose_triton_or_twin(params[0].device, _OP) == "torch" or tables is None:
        adamw_with_copies_reference(params, exp_avgs, exp_avg_sqs, steps, grads, copies, groups, lrs, weight_decays,
                                    betas, eps, coef)
        return
    if tables.sizes != tuple(p.numel() for p in params) or tables.group_list != tuple(int(g) for g in groups):
        raise ValueError("the address tables were made for other tensor sizes or parameter groups")
    torch._foreach_add_(steps, 1.0)
    for role, tensors in zip(_ROLES, (params, exp_avgs, exp_avg_sqs, steps, grads, copies)):
        tables.point_at(role, tensors)
    k = triton_kernels()
    k.adamw_copy_update(tables.addresses, tables.numels, tables.groups, tables.chunk_tensor, tables.chunk_start, CHUNK,
                        lrs, weight_decays, coef, betas, eps, k.ADAMW_KINDS[grads[0].dtype],
                        k.ADAMW_KINDS[copies[0].dtype], tables.aligned(("param", "exp_avg", "exp_avg_sq", "grad",
                                                                         "copy")))


__all__ = ["AddressTables", "is_dense", "adamw_with_copies_", "adamw_with_copies_reference", "grad_sum_of_squares",
           "grad_sum_of_squares_reference"]
