"""apply_in_chunks: every row once, in order, in eval mode, on the model's device; the mode is restored."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from unlearn_fast.eval.chunked import apply_in_chunks
from unlearn_fast.models import TaskDraw


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.seen = []

    def fn(self, model, x, task):
        assert model is self and not model.training
        self.seen.append((x.shape[0], task["id"].tolist()))
        return x.sum(dim=(1, 2, 3)) * model.w + task["id"]


@pytest.mark.parametrize("n, chunk", [(1, 4), (7, 3), (6, 3), (5, 10)])
def test_chunks_cover_every_row_in_order(n, chunk):
    m = Recorder().train()
    x = torch.rand(n, 1, 2, 2)
    task = TaskDraw(id=torch.arange(n, dtype=torch.float32), rate=0.5)
    out = torch.cat(apply_in_chunks(m, x, task, m.fn, chunk))
    torch.testing.assert_close(out, x.sum(dim=(1, 2, 3)) + torch.arange(n, dtype=torch.float32))
    assert [s for s, _ in m.seen] == [min(chunk, n - lo) for lo in range(0, n, chunk)]
    assert m.training  # restored


def test_mode_restored_after_an_error():
    m = Recorder().train()

    def boom(model, x, task):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        apply_in_chunks(m, torch.rand(2, 1, 2, 2), TaskDraw(id=torch.zeros(2)), boom, 1)
    assert m.training
