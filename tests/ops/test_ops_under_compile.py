"""The public loss / noise ops inside a ``torch.compile``d function: each is a graph break (``torch.compiler.disable``)
and runs eagerly, so the compiled function returns the eager results, forward and gradient, bit for bit. Dynamo
with the ``eager`` backend (no inductor: seconds on the CPU); the GPU test (tests/gpu/test_gpu_compiled_ops.py)
runs the Triton kernels the same way, where tracing into them failed on the H100 (2026-11-27, run 3)."""
from __future__ import annotations

import pytest
import torch

from unlearn_fast.ops import (batch_mean_std, multi_map_retain_forget_l2_loss, retain_forget_l2_loss,
                              retain_forget_l2_loss_compact, sample_batch_noise)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _both(fn, *args):
    return fn(*args), torch.compile(fn, backend="eager")(*args)


def _traced_graphs(fn, *args) -> list:
    """The FX graphs dynamo hands its backend while running ``fn(*args)`` compiled."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch.compile(fn, backend=backend)(*args)
    return graphs


@pytest.mark.parametrize("shape,forget", [((6, 17, 96), [1, 0, 0, 1, 0, 1]), ((1, 5, 7), [0]), ((3, 4, 9), [1, 1, 1])])
def test_loss_and_its_gradient_equal_eager(shape, forget):
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(*shape, generator=g)
    guide, noise_guide = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    is_forget = torch.tensor(forget, dtype=torch.bool)

    def objective(x):
        retain, forget_term = retain_forget_l2_loss(x, guide, noise_guide, is_forget)
        loss = 1.0 * retain + 0.2 * forget_term
        return loss, torch.autograd.grad(loss, x)[0]

    (l0, g0), (l1, g1) = _both(lambda: objective(latent.clone().requires_grad_(True)))
    assert torch.equal(l0, l1) and torch.equal(g0, g1)


def test_compact_loss_equals_eager():
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(5, 3, 8, generator=g)
    is_forget = torch.tensor([True, False, True, False, False])
    rows_r, rows_f = torch.randn(3, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    (r0, f0), (r1, f1) = _both(retain_forget_l2_loss_compact, latent, rows_r, rows_f, is_forget)
    assert torch.equal(r0, r1) and torch.equal(f0, f1)


def test_noise_and_moments_equal_eager():
    images = torch.rand(3, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    a, b = _both(lambda x: sample_batch_noise(x, "normal", seed=7, step=3), images)
    assert torch.equal(a, b)
    (m0, s0), (m1, s1) = _both(batch_mean_std, images)
    assert torch.equal(m0, m1) and torch.equal(s0, s1)


def test_multi_map_loss_equals_eager():
    g = torch.Generator().manual_seed(3)
    student = [torch.randn(4, c, 6, 6, generator=g) for c in (2, 5)]
    teacher = [torch.randn(4, c, 6, 6, generator=g) for c in (2, 5)]
    is_forget = torch.tensor([False, True, True, False])
    (r0, f0), (r1, f1) = _both(multi_map_retain_forget_l2_loss, student, teacher, is_forget)
    assert torch.equal(r0, r1) and torch.equal(f0, f1)


def test_the_op_is_a_graph_break_not_traced():
    """Dynamo traces the arithmetic around the op into graphs and the op itself into none of them."""
    g = torch.Generator().manual_seed(4)
    latent, guide, noise_guide = (torch.randn(4, 3, 8, generator=g) for _ in range(3))
    is_forget = torch.tensor([True, False, True, False])

    def fn(x):
        y = x * 2.0
        retain, forget_term = retain_forget_l2_loss(y, guide, noise_guide, is_forget)
        return (retain + forget_term) * 3.0

    graphs = _traced_graphs(fn, latent)
    assert len(graphs) == 2  # before and after the break
    traced = "\n".join(str(gm.graph) for gm in graphs)
    assert "retain_forget" not in traced and "choose_backend" not in traced
    assert torch.equal(torch.compile(fn, backend="eager")(latent), fn(latent))


_FIRST_CALL_UNDER_COMPILE = """
import sys
import torch
import unlearn_fast
from unlearn_fast.ops import retain_forget_l2_loss
assert "torch._dynamo" not in sys.modules, "import unlearn_fast loaded dynamo"
g = torch.Generator().manual_seed(5)
latent, guide, noise_guide = (torch.randn(4, 3, 8, generator=g) for _ in range(3))
is_forget = torch.tensor([True, False, True, False])
graphs = []

def backend(gm, example_inputs):
    graphs.append(gm)
    return gm.forward

def fn(x):
    retain, forget_term = retain_forget_l2_loss(x * 2.0, guide, noise_guide, is_forget)
    return (retain + forget_term) * 3.0

compiled = torch.compile(fn, backend=backend)(latent)  # the op's first call in this process
assert len(graphs) == 2 and "retain_forget" not in "".join(str(gm.graph) for gm in graphs), graphs
assert torch.equal(compiled, fn(latent))
print("ok")
"""


def test_import_leaves_dynamo_unloaded_and_a_first_call_under_compile_is_a_graph_break():
    """``import unlearn_fast`` does not import dynamo (~1 s); the graph break is made at the op's first call once
    dynamo is loaded, also when that first call is inside a compiled function (a fresh process)."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", _FIRST_CALL_UNDER_COMPILE], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
