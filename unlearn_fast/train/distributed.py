"""Multi-process training launched by torchrun (``env://``: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    torchrun --standalone --nproc_per_node 4 -m unlearn_fast unlearn --batch_size 32 ...     # one node
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST --master_port 29500 \\
        -m unlearn_fast unlearn ...                                                           # node 0 of 2

What each rank does:
- builds the same forget/retain/proxy subsets (seeded, rank-independent) and takes its slice of every
  global batch (the samplers are sharded by rank and world size);
- runs the student's trainable forward passes through one ``DistributedDataParallel`` module that
  registers only the trainable parameters: the frozen ones are put on DDP's ignore list, so they are
  neither broadcast nor all-reduced. Gradients are all-reduced (averaged) only on the micro-step that
  updates (``no_sync`` on accumulation micro-steps). The teacher is a plain frozen module, never wrapped;
- draws the task randomness (masks) for the whole global batch from the rank-independent (seed, step)
  stream and keeps its own rows, so row i of a global batch is masked the same way whatever the number
  of ranks. The noise images and dropout are drawn per (seed, rank, step) and the noise takes the
  rank's own batch statistics, as the reference computes them per GPU;
- only rank 0 writes the run directory, checkpoints and logs; logged losses are the mean over ranks.

Faults: every rank must run the same command (:func:`check_same_on_all_ranks` refuses a job whose ranks were
given different flags); a rank that stops (an error, a kill) makes the others fail in their next collective,
which :func:`peer_failures_explained` turns into one :class:`PeerProcessError` line instead of gloo's traceback;
a rank whose peers never join says so after ``JOIN_NOTICE_AFTER_S`` seconds instead of waiting in silence.

The CUDA-graph step cannot capture DDP's reducer (autograd hooks). For it, ``DDPStudent.use_flat_grads()``
runs without a reducer (DDP is built lazily, so it is then never built): the trainable weights are broadcast
from rank 0 as DDP's constructor would, and the step all-reduces one flat gradient buffer itself
(:mod:`flat_grads`).
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .seeding import step_generator


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job. ``backend`` None: a single process, no process group."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    if text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer") from None


def env_ranks(dist_on_itp: bool = False) -> tuple:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when not launched by it.
    ``dist_on_itp`` (the reference's flag): from Open MPI's OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK instead
    (``mpirun``; MASTER_ADDR / MASTER_PORT still name the rendezvous, as in the reference)."""
    if dist_on_itp:
        names = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")
        missing = [n for n in names if os.environ.get(n, "") == ""]
        if missing:
            raise ValueError(f"--dist_on_itp reads Open MPI's {', '.join(names)}, but {', '.join(missing)} "
                             "is not set: launch with mpirun, or drop --dist_on_itp (torchrun sets RANK/WORLD_SIZE)")
        rank, world, local = (_env_int(n, 0) for n in names)
    else:
        world = _env_int("WORLD_SIZE", 1)
        rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return rank, world, local


def rank_device(spec: str, local_rank: int, world_size: int) -> torch.device:
    """The device of this rank. With several ranks, 'auto'/'cuda' mean cuda:LOCAL_RANK (one GPU per process)."""
    if world_size > 1 and spec in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible "
                             "(--nproc_per_node must not exceed the GPUs per node)")
        return torch.device("cuda", local_rank)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec!r} is not a device (use cuda, cuda:N, cpu or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: no CUDA GPU is visible here (use --device cpu or auto)")
    if dev.type == "cuda" and world_size > 1:
        raise ValueError(f"--device {spec} with {world_size} processes: use --device cuda or auto "
                         "(each process takes cuda:LOCAL_RANK)")
    return dev


# a rank still in the rendezvous after this long says what it waits for (the process group's own timeout
# is 30 minutes; a peer that was never started, or failed before joining, would otherwise look like a hang)
JOIN_NOTICE_AFTER_S = 30.0


def _rendezvous_address(dist_url: str) -> str:
    if dist_url == "env://":
        return f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    return dist_url


def init_distributed(device: torch.device, dist_url: str = "env://", dist_on_itp: bool = False,
                     notice_after_s: float = JOIN_NOTICE_AFTER_S) -> DistContext:
    """Join the job: nccl on CUDA, gloo on CPU. A single process needs no group. ``dist_url``: the rendezvous
    (``env://`` reads MASTER_ADDR / MASTER_PORT; ``tcp://HOST:PORT`` as the reference's --dist_url);
    ``dist_on_itp``: ranks from Open MPI's variables (see :func:`env_ranks`)."""
    rank, world, local = env_ranks(dist_on_itp)
    if world == 1:
        return DistContext()
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        where = _rendezvous_address(dist_url)
        notice = threading.Timer(notice_after_s, lambda: print(
            f"unlearn_fast: process {rank} of {world} is still waiting for the other processes of the job at "
            f"{where} (WORLD_SIZE={world} is set: every process must be started, e.g. by torchrun; unset RANK and "
            "WORLD_SIZE for a one-process run)", file=sys.stderr, flush=True))
        notice.daemon = True
        notice.start()
        try:
            dist.init_process_group(backend=backend, init_method=dist_url, rank=rank, world_size=world)
        except dist.DistNetworkError as e:
            text = str(e)
            if "EADDRINUSE" in text or "address already in use" in text:
                raise ValueError(f"cannot start the job's rendezvous at {where}: the port is already in use by "
                                 "another program (another run?); choose a free MASTER_PORT (torchrun --standalone "
                                 "picks one)") from None
            raise ValueError(f"cannot join the job's rendezvous at {where}: {_first_line(text)}") from None
        finally:
            notice.cancel()
    return DistContext(rank=rank, world_size=world, local_rank=local, backend=backend)


def cleanup_distributed(ctx: DistContext) -> None:
    """Leave the process group. Errors are dropped: this runs in ``finally`` after a peer was lost, where
    destroying the group may fail, and must not replace the error that stopped the run."""
    if ctx.enabled and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except RuntimeError:
            pass


def _first_line(text: str, limit: int = 240) -> str:
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    return line if len(line) <= limit else line[:limit] + "..."


def _backend_detail(text: str) -> str:
    """The gist of a backend error: gloo's '[.../pair.cc:561] Connection closed by peer [ADDR]:PORT. This is
    typically caused by ...' -> 'Connection closed by peer [ADDR]:PORT'."""
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", _first_line(text))
    return line.split(". This is typically")[0].rstrip(". ")


class PeerProcessError(ConnectionError):
    """Another process of the job stopped (an error, a kill), so this one's collective failed. A ConnectionError
    (an OSError): the CLI prints it as one line; the other process's own error is the cause."""


# how gloo / nccl / the store report a peer that went away (gloo raises a plain RuntimeError)
_PEER_LOST_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                      "remote process exited", "Socket Timeout", "Connection refused", "Timed out waiting")


def is_peer_failure(exc: BaseException) -> bool:
    """True for the error a collective raises when another rank is gone (not for this rank's own faults)."""
    if isinstance(exc, (dist.DistNetworkError, dist.DistStoreError)):  # not DistBackendError: may be our own fault
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _PEER_LOST_MARKERS)


@contextlib.contextmanager
def peer_failures_explained(ctx: DistContext):
    """Inside: a collective that fails because another rank stopped raises :class:`PeerProcessError` with one
    line that names this rank and points at the other's error, instead of the backend's traceback."""
    try:
        yield
    except RuntimeError as e:
        if not (ctx.enabled and is_peer_failure(e)):
            raise
        raise PeerProcessError(f"process {ctx.rank} of {ctx.world_size}: another process of this job stopped (its "
                               "own error, or the launcher's report of it, is the cause); stopping too "
                               f"({_backend_detail(str(e))})") from None


# flags that may differ between the processes of one job: torch.distributed.launch's per-process --local_rank,
# what only rank 0 uses (the run directory), per-process performance settings, and paths (nodes may mount the
# same files at different places)
PER_PROCESS_KEYS = frozenset({"local_rank", "output_dir", "log_dir", "num_workers", "pin_mem", "no_progress",
                              "device", "data_path", "proxy_path", "resume", "teacher", "vqgan_ckpt"})


def check_same_on_all_ranks(values: dict, ctx: DistContext, what: str = "flags",
                            ignore=PER_PROCESS_KEYS) -> None:
    """Raise the same ValueError on every rank when ``values`` (e.g. ``vars(args)``) differ between ranks
    (except the keys in ``ignore``): a job whose ranks run different seeds, batch sizes or epochs would train
    on inconsistent data, or stop with one rank waiting in a collective. Collective: every rank calls it."""
    if not ctx.enabled:
        return
    mine = {k: v for k, v in values.items() if k not in ignore}
    every = [None] * ctx.world_size
    dist.all_gather_object(every, mine)
    keys = sorted(set().union(*every), key=str)
    differing = [k for k in keys if any(v.get(k, "<unset>") != every[0].get(k, "<unset>") for v in every[1:])]
    if differing:
        shown = "; ".join(f"--{k}: " + ", ".join(f"{v.get(k, '<unset>')!r} (rank {r})" for r, v in enumerate(every))
                          for k in differing[:4])
        more = f" and {len(differing) - 4} more" if len(differing) > 4 else ""
        raise ValueError(f"the {ctx.world_size} processes of this job were started with different {what}: {shown}"
                         f"{more}; every process must run the same command")


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's ``obj`` on every rank (e.g. the run directory name, which holds a timestamp)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean_(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """In place: the mean of ``tensor`` over ranks (on the rank's device: nccl needs CUDA tensors)."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(ctx.world_size)
    return tensor


def broadcast_parameters_(named_params, ctx: DistContext) -> None:
    """In place: rank 0's values of ``named_params`` (``[(name, tensor)]``) on every rank, as DDP's constructor
    does for the parameters it registers. First checks that all ranks hold the same number of parameters and
    elements (a mismatch would otherwise hang or fail deep inside the collective)."""
    if not ctx.enabled:
        return
    named = list(named_params)
    if not named:
        raise ValueError("broadcast_parameters_: no parameters")
    dev = named[0][1].device
    sizes = torch.tensor([len(named), sum(p.numel() for _, p in named)], dtype=torch.int64, device=dev)
    lo, hi = sizes.clone(), sizes.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise ValueError(f"ranks hold different trainable parameters (count, elements) from {lo.tolist()} to "
                         f"{hi.tolist()}: every rank must build the same model")
    with torch.no_grad():
        for _, p in named:
            if p.is_contiguous():
                dist.broadcast(p.detach(), src=0)
            else:
                tmp = p.detach().contiguous()
                dist.broadcast(tmp, src=0)
                p.copy_(tmp)


class _StudentForward(nn.Module):
    """The student's trainable forward passes as one ``forward(method, *args)``, so DDP sees each of them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, method: str, *args, **kwargs):
        return getattr(self.model, method)(*args, **kwargs)


class DDPStudent:
    """Stands in for the student in :class:`UnlearnSetup` on a multi-rank run.

    The trainable passes (``forward_encoder_task``, ``task_loss_terms``, ``forward_outputs``) go through
    DDP; ``sample_task`` draws the global batch's task (see the module docstring) for the step set with
    :meth:`begin_step`; everything else (``prepare_inputs``, ``state_dict``, ``named_parameters``, ...)
    is the plain model's.

    The DDP module is built on first use (a trainable pass, :meth:`no_sync` or :attr:`ddp`): its constructor
    is collective, and every rank reaches that point at the same step. :meth:`use_flat_grads`, called before
    that, keeps it unbuilt (no reducer hooks) for steps that all-reduce the gradients themselves.
    """

    _WRAPPED = ("forward_encoder_task", "task_loss_terms", "forward_outputs")

    def __init__(self, model: nn.Module, ctx: DistContext, seed: int, find_unused_parameters: bool = False):
        if not ctx.enabled:
            raise ValueError("DDPStudent needs an initialised process group (DistContext.enabled)")
        self.module = model
        self.ctx = ctx
        self.find_unused_parameters = find_unused_parameters
        self._ddp = None
        self._flat_grads = False
        self.rank, self.world_size, self.seed = ctx.rank, ctx.world_size, int(seed)
        self._step: Optional[int] = None

    def __getattr__(self, name):
        if name in ("module", "ddp", "_ddp", "_flat_grads") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.module, name)

    @property
    def ddp(self):
        """The ``DistributedDataParallel`` module (built now if not yet: a collective call)."""
        if self._flat_grads:
            raise RuntimeError("this DDPStudent runs without DDP's reducer (use_flat_grads() was called): the step "
                               "all-reduces its flat gradient buffer itself")
        if self._ddp is None:
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = self.module
            forward = _StudentForward(model)
            # frozen weights and the buffers (constants such as input mean/std) are neither DDP parameters
            # nor broadcast: every rank loaded the same checkpoint
            ignored = [f"model.{n}" for n, p in model.named_parameters() if not p.requires_grad]
            ignored += [f"model.{n}" for n, _ in model.named_buffers()]
            DDP._set_params_and_buffers_to_ignore_for_model(forward, ignored)
            self._ddp = DDP(forward, device_ids=None, find_unused_parameters=self.find_unused_parameters)
        return self._ddp

    @property
    def reducer_active(self) -> bool:
        """True while gradients are all-reduced by DDP's hooks during backward (not after use_flat_grads)."""
        return not self._flat_grads

    def use_flat_grads(self) -> None:
        """Run without DDP: the trainable passes call the plain model and the caller all-reduces the
        gradients (:class:`~unlearn_fast.train.flat_grads.FlatGrads`). Broadcasts the trainable weights from
        rank 0, as DDP's constructor does; buffers and frozen weights are left as they are (as under DDP:
        every rank loaded the same checkpoint). Collective: every rank calls it at the same point."""
        if self._flat_grads:
            return
        if self._ddp is not None:
            raise RuntimeError("use_flat_grads() after DDP was built: its reducer hooks are registered on the "
                               "parameters; call it before the first step")
        self._flat_grads = True
        broadcast_parameters_([(n, p) for n, p in self.module.named_parameters() if p.requires_grad], self.ctx)

    def ddp_parameter_names(self) -> list:
        """Names (in the plain model) of the parameters DDP synchronises."""
        ignored = self.ddp.parameters_to_ignore
        return [n for n, p in self.module.named_parameters()
                if p.requires_grad and f"model.{n}" not in ignored]

    def begin_step(self, step: int) -> None:
        self._step = int(step)

    def no_sync(self):
        """Skip the gradient all-reduce (accumulation micro-steps); the next synced backward sends the sum.
        Without a reducer (use_flat_grads) there is nothing to skip: the step all-reduces on updates only."""
        if self._flat_grads:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def sample_task(self, images: torch.Tensor, generator: Optional[torch.Generator] = None):
        """This rank's rows of the global batch's task draw (``generator`` is ignored: the draw comes from
        the rank-independent (seed, step) stream, the one a 1-rank run uses)."""
        if self._step is None:
            raise RuntimeError("DDPStudent.begin_step(step) must be called before each step")
        n = images.shape[0]
        g = step_generator(self.seed, 0, self._step, "task", images.device)
        whole = images[:1].expand(n * self.world_size, *images.shape[1:])  # shape only: no copy
        task = self.module.sample_task(whole, g)
        rows = torch.arange(self.rank * n, (self.rank + 1) * n, device=images.device)
        return task.select(rows)

    def _trainable_pass(self, method: str, *args, **kwargs):
        if self._flat_grads:
            return getattr(self.module, method)(*args, **kwargs)
        return self.ddp(method, *args, **kwargs)

    def forward_encoder_task(self, inputs, task, prenorm: bool = False):
        return self._trainable_pass("forward_encoder_task", inputs, task, prenorm=prenorm)

    def task_loss_terms(self, inputs, task, target=None):
        return self._trainable_pass("task_loss_terms", inputs, task, target)

    def forward_outputs(self, inputs, task):
        return self._trainable_pass("forward_outputs", inputs, task)


__all__ = ["DistContext", "DDPStudent", "env_ranks", "rank_device", "init_distributed", "cleanup_distributed",
           "broadcast_object", "all_reduce_mean_", "broadcast_parameters_", "PeerProcessError", "is_peer_failure",
           "peer_failures_explained", "check_same_on_all_ranks", "PER_PROCESS_KEYS", "JOIN_NOTICE_AFTER_S"]
