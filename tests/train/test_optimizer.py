"""AdamW(0.9, 0.95), eps 1e-8, wd only on >=2-D non-bias trainable params (REFERENCE.md §1.5)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers import assert_close_report
from unlearn_fast.train.optimizer import BETAS, build_adamw, param_groups_weight_decay


class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)                    # weight decays, bias not
        self.norm = nn.LayerNorm(4)                   # 1-D weight: no decay
        self.table = nn.Parameter(torch.ones(2, 3))   # 2-D: decays
        self.proj = nn.Module()
        self.proj.bias = nn.Parameter(torch.ones(2, 2))  # 2-D but named .bias: no decay
        self.scale = nn.Parameter(torch.ones(()))     # 0-D: decays (timm 0.3.2 tests len(shape) == 1)
        self.frozen = nn.Parameter(torch.ones(3, 3), requires_grad=False)  # left out


def _ids(ps):
    return {id(p) for p in ps}


def test_param_groups_rules():
    m = _Odd()
    groups = param_groups_weight_decay(m.named_parameters(), 0.05)
    no_decay, decay = groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    assert _ids(decay["params"]) == _ids([m.lin.weight, m.table, m.scale])
    assert _ids(no_decay["params"]) == _ids([m.lin.bias, m.norm.weight, m.norm.bias, m.proj.bias])
    assert id(m.frozen) not in _ids(decay["params"]) | _ids(no_decay["params"])


def test_param_groups_on_mae(make_mae_micro):
    m = make_mae_micro()
    no_decay, decay = param_groups_weight_decay(m.named_parameters(), 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert "blocks.0.attn.qkv.weight" in decayed and "patch_embed.proj.weight" in decayed
    assert "cls_token" in decayed and "mask_token" in decayed  # 3-D tokens decay (timm 0.3.2 rule)
    assert all(n.endswith(".bias") or "norm" in n for n in not_decayed)
    assert "pos_embed" not in decayed | not_decayed  # frozen
    assert len(decayed) + len(not_decayed) == sum(p.requires_grad for p in m.parameters())


def test_build_adamw_settings_and_first_step():
    m = _Odd()
    opt = build_adamw(m.named_parameters(), lr=0.1, weight_decay=0.5, device=torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert g["betas"] == BETAS == (0.9, 0.95) and g["eps"] == 1e-8 and g["lr"] == 0.1
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    grads = {}
    for n, p in m.named_parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 0.5)
            grads[n] = p.grad.clone()
    opt.step()
    # AdamW's first step: p <- p·(1 - lr·wd) - lr · g / (|g| + eps)  (bias-corrected moments equal g, g^2)
    for n, p in m.named_parameters():
        if n not in grads:
            assert torch.equal(p, before[n])
            continue
        wd = 0.5 if n in ("lin.weight", "table", "scale") else 0.0
        expected = before[n] * (1 - 0.1 * wd) - 0.1 * grads[n] / (grads[n].abs() + 1e-8)
        assert_close_report(p, expected, rtol=1e-6, atol=1e-7, name=n)


def test_no_trainable_parameters_is_an_error():
    m = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_adamw(m.named_parameters(), 1e-3, 0.05, torch.device("cpu"))


def test_device_by_name_and_unnamed_params():
    m = _Odd()
    opt = build_adamw(m.named_parameters(), 1e-3, 0.05, "cpu")  # a device name works like a torch.device
    assert [len(g["params"]) for g in opt.param_groups] == [4, 3]
    with pytest.raises(TypeError, match="named_parameters"):
        build_adamw(m.parameters(), 1e-3, 0.05, torch.device("cpu"))  # bare tensors: no names to group by
