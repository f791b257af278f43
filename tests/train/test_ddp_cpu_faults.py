"""Faults of a multi-process (gloo, CPU) job: unlearn_fast/train/distributed.py.

What must hold, and why it is checked here:
- a busy MASTER_PORT is one ValueError naming the address (torch raises DistNetworkError with a traceback);
- a rank whose peers never join says so on stderr after a while (torch waits 30 minutes in silence);
- ranks started with different flags (a manual launch: torchrun passes one command line) are refused with the
  same ValueError on every rank, naming each differing flag and its values; per-process keys are allowed to differ;
- a rank that is SIGKILLed makes the other fail in its next collective with one PeerProcessError (an OSError, so
  the CLI prints one line and exits non-zero), never a hang: every multi-process check runs under a deadline;
- ``--dist_url tcp://HOST:PORT`` (the reference's flag) is the rendezvous, without MASTER_ADDR / MASTER_PORT;
- ``--dist_on_itp`` (the reference's flag) takes the ranks from Open MPI's variables.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from unlearn_fast.train.distributed import (PER_PROCESS_KEYS, DistContext, PeerProcessError, all_reduce_mean_,
                                            check_same_on_all_ranks, cleanup_distributed, env_ranks,
                                            init_distributed, is_peer_failure, peer_failures_explained)

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEADLINE_S = 60  # any multi-process scenario that is not done by then counts as a hang


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clear_dist_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_dist_on_itp_reads_open_mpi_ranks(monkeypatch):
    _clear_dist_env(monkeypatch)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "0")
    assert env_ranks(dist_on_itp=True) == (2, 3, 0)
    assert env_ranks() == (0, 1, 0)  # without the flag the torchrun variables (unset here) decide
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    with pytest.raises(ValueError, match="OMPI_COMM_WORLD_SIZE is not set"):
        env_ranks(dist_on_itp=True)


def test_busy_master_port_is_one_clear_error(monkeypatch):
    _clear_dist_env(monkeypatch)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        with pytest.raises(ValueError, match=rf"127\.0\.0\.1:{port}: the port is already in use"):
            init_distributed(torch.device("cpu"))
    assert not torch.distributed.is_initialized()


def test_a_rank_waiting_for_absent_peers_says_so():
    """WORLD_SIZE=2 but only rank 0 started: it must say what it waits for (here after 0.5 s), not stay silent."""
    port = _free_port()
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               PYTHONPATH=REPO)
    # the child ends itself after 15 s (torch would wait 30 minutes), so reading its stderr cannot block forever
    code = ("import os, threading, torch; from unlearn_fast.train.distributed import init_distributed; "
            "threading.Timer(15, os._exit, (0,)).start(); "
            "init_distributed(torch.device('cpu'), notice_after_s=0.5)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    try:
        line, end = "", time.monotonic() + DEADLINE_S
        while "waiting" not in line and time.monotonic() < end:  # the process blocks: read until the notice
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stderr.close()
    assert "process 0 of 2 is still waiting for the other processes" in line, line
    assert f"127.0.0.1:{port}" in line and "torchrun" in line


def test_peer_failure_classification():
    gloo_text = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                 "[127.0.0.1]:53654. This is typically caused by a remote worker crashing.")
    assert is_peer_failure(RuntimeError(gloo_text))
    assert not is_peer_failure(RuntimeError("shape mismatch"))  # this rank's own bug keeps its traceback
    ctx = DistContext(rank=1, world_size=2, backend="gloo")
    with pytest.raises(PeerProcessError, match=r"process 1 of 2: .*\(Connection closed by peer \[127\.0\.0\.1\]:53654\)$"):
        with peer_failures_explained(ctx):
            raise RuntimeError(gloo_text)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with peer_failures_explained(ctx):
            raise RuntimeError("shape mismatch")
    assert issubclass(PeerProcessError, OSError)  # the CLI prints OSError as one line, exit code 2


def _fault_worker(rank, world, port, out_dir):
    """One rank of the scenario; writes what it saw to out_dir/rank{r}.json (rank 1 is SIGKILLed at the end)."""
    torch.set_num_threads(1)
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # the tcp:// url alone must be enough
        os.environ.pop(name, None)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    seen = {}
    ctx = init_distributed(torch.device("cpu"), dist_url=f"tcp://127.0.0.1:{port}")
    try:
        seen["ctx"] = [ctx.rank, ctx.world_size, ctx.backend]
        flags = {"seed": 0, "batch_size": 4, "epochs": 2, "output_dir": f"out{rank}", "local_rank": rank,
                 "data_path": f"/mnt/node{rank}/train"}
        check_same_on_all_ranks(flags, ctx)  # only per-process keys differ: accepted
        seen["same_ok"] = True
        try:
            check_same_on_all_ranks(dict(flags, seed=rank, epochs=2 + rank), ctx)
        except ValueError as e:
            seen["differ"] = str(e)
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # a rank lost mid-run
        try:
            with peer_failures_explained(ctx):
                for _ in range(3):  # the first collectives after the peer died (one may still complete)
                    all_reduce_mean_(torch.ones(3), ctx)
                    time.sleep(0.2)
        except PeerProcessError as e:
            seen["peer"] = str(e)
    finally:
        cleanup_distributed(ctx)  # after a lost peer: must neither raise nor hang
        seen["cleaned_up"] = True
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(seen, f)


def _run_ranks_with_deadline(target, *args, world: int = 2):
    """Spawn ``world`` processes ``target(rank, world, *args)``, wait at most DEADLINE_S for all of them (a rank
    still running then is a hang: killed, and the test fails), and return them (for their exit codes)."""
    procs = [mp.get_context("spawn").Process(target=target, args=(r, world, *args)) for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + DEADLINE_S
    for p in procs:
        p.join(timeout=max(1.0, end - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"rank(s) {hung} still running after {DEADLINE_S} s: a hang"
    return procs


def test_two_ranks_flags_mismatch_and_a_killed_peer(tmp_path):
    port = _free_port()
    procs = _run_ranks_with_deadline(_fault_worker, port, str(tmp_path))
    assert procs[1].exitcode == -signal.SIGKILL
    assert procs[0].exitcode == 0
    seen = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(1)]
    r0 = seen[0]
    assert r0["ctx"] == [0, 2, "gloo"] and r0["same_ok"] and r0["cleaned_up"]
    assert r0["differ"] == ("the 2 processes of this job were started with different flags: --epochs: 2 (rank 0), "
                            "3 (rank 1); --seed: 0 (rank 0), 1 (rank 1); every process must run the same command")
    assert r0["peer"].startswith("process 0 of 2: another process of this job stopped")
    assert {"local_rank", "output_dir", "data_path"} <= PER_PROCESS_KEYS


# --- the command line: needs run_unlearn to call check_same_on_all_ranks / peer_failures_explained ------------

def _cli_worker(rank, world, runs, out_dir):
    """One rank: the CLI once per (port, argv per rank) in ``runs`` (one process start-up for all of them)."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    from unlearn_fast.cli.main import main
    rcs = []
    for port, argv_by_rank in runs:
        os.environ["MASTER_PORT"] = str(port)
        rcs.append(main(argv_by_rank[rank]))
    with open(os.path.join(out_dir, f"rc{rank}.json"), "w") as f:
        json.dump(rcs, f)


def test_cli_refuses_ranks_with_different_seeds_and_a_bad_image_stops_both_cleanly(tmp_path, capfd):
    from tests.helpers import make_class_tree, micro_unlearn_argv, save_random_pretrained
    data = make_class_tree(tmp_path / "data", ["cat", "dog", "bird"], 4, seed=0)
    with open(os.path.join(data, "cat", "1.png"), "wb") as f:  # read in epoch 0 by one rank only
        f.write(b"not a png")
    pre = save_random_pretrained(tmp_path / "pre.pth")
    out = tmp_path / "out"
    base = micro_unlearn_argv(data, pre, out, batch=2)
    runs = [(_free_port(), [base + ["--seed", "0"], base + ["--seed", "1"]]),  # refused before any image is read
            (_free_port(), [base, base])]
    _run_ranks_with_deadline(_cli_worker, runs, str(tmp_path))
    rcs = [json.load(open(tmp_path / f"rc{r}.json")) for r in range(2)]
    err = capfd.readouterr().err
    assert rcs == [[2, 2], [2, 2]], err
    assert err.count("started with different flags: --seed: 0 (rank 0), 1 (rank 1)") == 2, err
    # the bad image: the rank that reads it names the file, the other stops with one line; neither hangs
    assert err.count("cannot read image") == 1 and err.count("another process of this job stopped") == 1, err
    assert "Traceback" not in err
    assert not out.exists() or not os.listdir(out)  # nothing written: refused, then removed without a checkpoint


def test_resuming_with_another_number_of_processes_is_warned_about():
    """The effective batch and the lr from --blr scale with the processes: a 2-process checkpoint continued by
    1 process trains at half the lr, which the warning must say (the same count: no warning)."""
    from types import SimpleNamespace
    from unlearn_fast.cli.unlearn_command import _changed_trajectory_flags
    ckpt = {"unlearn_fast": {}, "args": {"world_size": 2, "batch_size": 4, "blr": 1e-4}}
    assert _changed_trajectory_flags(ckpt, SimpleNamespace(world_size=1, batch_size=4, blr=1e-4)) == [
        "2 processes (now 1)"]
    assert _changed_trajectory_flags(ckpt, SimpleNamespace(world_size=2, batch_size=4, blr=1e-4)) == []
