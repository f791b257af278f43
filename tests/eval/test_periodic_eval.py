"""Evaluation during training: every-N epochs, fixed masks, the forget_gap criterion, keep-best files, and the
plug into train_loop's on_epoch_end hook."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from unlearn_fast.eval.periodic_eval import PeriodicEvaluator, load_best_weights, mae_inpaint_errors
from unlearn_fast.models import TaskDraw

pytestmark = pytest.mark.usefixtures("single_thread")


class StubModel(nn.Module):
    """Per-image error = mean pixel * (forget_scale if the image is bright else retain_scale) * (1 + noise/10):
    the scales are trainable parameters the test sets per 'epoch'; ``frozen`` is not trainable."""

    def __init__(self):
        super().__init__()
        self.forget_scale = nn.Parameter(torch.tensor(1.0))
        self.retain_scale = nn.Parameter(torch.tensor(1.0))
        self.frozen = nn.Parameter(torch.tensor(7.0), requires_grad=False)
        self.tasks_seen = []

    def sample_task(self, images, generator=None):
        return TaskDraw(noise=torch.rand(images.shape[0], 4, generator=generator))

    def set_scales(self, forget, retain):
        with torch.no_grad():
            self.forget_scale.fill_(forget)
            self.retain_scale.fill_(retain)


def stub_score(model, images, task):
    model.tasks_seen.append(task["noise"].clone())
    assert not model.training  # evaluation runs in eval mode
    bright = images.mean(dim=(1, 2, 3)) > 0.5
    scale = torch.where(bright, model.forget_scale, model.retain_scale)
    return images.mean(dim=(1, 2, 3)) * scale * (1 + task["noise"][:, 0] / 10)


def _holdout(n_forget=5, n_retain=6):
    g = torch.Generator().manual_seed(0)
    forget = 0.6 + 0.4 * torch.rand(n_forget, 1, 4, 4, generator=g)  # bright
    retain = 0.1 + 0.3 * torch.rand(n_retain, 1, 4, 4, generator=g)  # dark
    images = torch.cat([retain[:3], forget, retain[3:]])  # interleaved order
    is_forget = torch.tensor([False] * 3 + [True] * n_forget + [False] * (n_retain - 3))
    return images, is_forget


# (forget_scale, retain_scale) after each epoch -> gap = f - r (the before-scales are 1)
SCHEDULE = [(1.5, 1.0), (3.0, 1.2), (2.0, 1.0), (3.5, 1.6), (4.0, 1.1), (1.0, 1.0), (3.5, 1.6)]


def _run(evaluator, model, schedule=SCHEDULE):
    records = []
    for epoch, (f, r) in enumerate(schedule):
        model.set_scales(f, r)
        records.append(evaluator(epoch, {"train_loss": 0.1 * epoch, "epoch": epoch, "note": "x"}))
    return records


def test_every_n_best_epoch_and_files(tmp_path):
    model = StubModel()
    images, is_forget = _holdout()
    ev = PeriodicEvaluator(model, images, is_forget, mask_seed=0, every=2, output_dir=str(tmp_path),
                           score_fn=stub_score, epochs=len(SCHEDULE))
    records = _run(ev, model)
    evaluated = [e for e, r in enumerate(records) if r is not None]
    assert evaluated == [1, 3, 5, 6]  # every 2nd epoch, plus the last
    # gap by hand: the scales multiply every error of a set, so ratios to 'before' are the scales
    gaps = {e: SCHEDULE[e][0] - SCHEDULE[e][1] for e in evaluated}  # {1: 1.8, 3: 1.9, 5: 0.0, 6: 1.9}
    for e in evaluated:  # the stub's errors are fp32: 1e-6 relative
        assert records[e]["forget_gap"] == pytest.approx(gaps[e], rel=1e-6)
        assert records[e]["forget_ratio"] == pytest.approx(SCHEDULE[e][0], rel=1e-6)
        assert records[e]["retain_ratio"] == pytest.approx(SCHEDULE[e][1], rel=1e-6)
    assert [records[e]["best"] for e in evaluated] == [True, True, False, False]  # 6 ties 3: earlier kept
    assert ev.best["epoch"] == 3 and ev.best["score"] == pytest.approx(1.9)
    # eval_log.txt: the 'before' line then one per evaluation
    lines = [json.loads(line) for line in (tmp_path / "eval_log.txt").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [None] + evaluated
    assert lines[0]["phase"] == "before" and lines[0]["forget_mse"] == pytest.approx(ev.before["forget_mse"])
    assert lines[2]["train"] == {"train_loss": pytest.approx(0.3), "epoch": 3}  # numbers only
    # best.pth: epoch 3's trainable parameters only, written atomically
    blob = torch.load(tmp_path / "best.pth", weights_only=True)
    assert blob["epoch"] == 3 and blob["criterion"] == "forget_gap" and blob["score"] == pytest.approx(1.9)
    assert set(blob["model"]) == {"forget_scale", "retain_scale"}
    assert blob["model"]["forget_scale"].item() == pytest.approx(3.5)
    assert blob["model"]["retain_scale"].item() == pytest.approx(1.6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "eval_log.txt"]
    # and it loads back into a model
    fresh = StubModel()
    load_best_weights(fresh, str(tmp_path / "best.pth"))
    assert fresh.forget_scale.item() == pytest.approx(3.5) and fresh.frozen.item() == 7.0


def test_means_and_fixed_masks_by_hand():
    model = StubModel()
    images, is_forget = _holdout()
    ev = PeriodicEvaluator(model, images, is_forget, mask_seed=4, every=1, score_fn=stub_score)
    first = [t.clone() for t in model.tasks_seen]  # retain then forget draws, at construction
    model.set_scales(2.0, 0.5)
    ev(0, {})
    ev(1, None)
    assert model.training  # the mode it had is restored
    assert all(torch.equal(a, b) for a, b in zip(first, model.tasks_seen[2:4]))  # the same masks each time
    assert all(torch.equal(a, b) for a, b in zip(first, model.tasks_seen[4:6]))
    # mean over each set, by hand
    retain_task, forget_task = first
    mean_px = images.mean(dim=(1, 2, 3))
    want_r = (mean_px[~is_forget] * 0.5 * (1 + retain_task[:, 0] / 10)).double().mean().item()
    want_f = (mean_px[is_forget] * 2.0 * (1 + forget_task[:, 0] / 10)).double().mean().item()
    rec = ev.history[-1]
    assert rec["retain_mse"] == pytest.approx(want_r, rel=1e-6) and rec["forget_mse"] == pytest.approx(want_f, rel=1e-6)
    assert ev.best_path is None  # no output_dir: nothing written
    # another seed, other masks; max_per_set keeps the first images of each set
    other = StubModel()
    PeriodicEvaluator(other, images, is_forget, mask_seed=5, every=1, score_fn=stub_score, max_per_set=2)
    assert [t.shape[0] for t in other.tasks_seen] == [2, 2]
    assert not torch.equal(other.tasks_seen[0], first[0][:2])


def test_mae_default_error_matches_a_plain_restatement(make_mae_micro):
    model = make_mae_micro().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g)
    task = model.sample_task(x, g)
    got = mae_inpaint_errors(model, x, task)
    recon = model.reconstruct(x, task)
    _, mask, _ = model.mask_from_task(task)  # [3, 64] over an 8x8 grid of 4x4 patches
    pix = mask.view(3, 1, 8, 8).repeat_interleave(4, 2).repeat_interleave(4, 3).expand(-1, 3, -1, -1)
    want = [((recon[i] - x[i])[pix[i] > 0] ** 2).mean() for i in range(3)]
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-7)


def test_plugs_into_train_loop(make_mae_micro, tmp_path):
    from unlearn_fast.train.trainer import train_loop
    from unlearn_fast.train.unlearn_setup import build_setup
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(4, 3, 32, 32, generator=g), torch.tensor([100.0, -100.0, 100.0, -100.0]))
               for _ in range(2)]
    held = torch.rand(6, 3, 32, 32, generator=g)
    setup = build_setup(make_mae_micro(), "cpu", lr=1e-3, precision="fp32", forget_alpha=0.5)
    ev = PeriodicEvaluator(setup.student, held, torch.tensor([True, False] * 3), mask_seed=0, every=1,
                           output_dir=str(tmp_path))
    train_loop(setup, lambda e: iter(batches), 2, epochs=2, lr=1e-3, step_mode="fast", progress=False,
               on_epoch_end=ev)
    assert [r["epoch"] for r in ev.history] == [0, 1]
    assert ev.history[0]["train"]["epoch"] == 0 and "train_loss" in ev.history[0]["train"]
    blob = torch.load(tmp_path / "best.pth", weights_only=True)
    trainable = {n for n, p in setup.student.named_parameters() if p.requires_grad}
    assert set(blob["model"]) == trainable and blob["epoch"] == ev.best["epoch"]
    if ev.best["epoch"] == 1:  # the last epoch's weights are the student's now
        assert all(torch.equal(v, dict(setup.student.named_parameters())[k]) for k, v in blob["model"].items())


def test_bad_arguments_raise_clear_errors(tmp_path):
    images, is_forget = _holdout()
    model = StubModel()
    kw = dict(mask_seed=0, score_fn=stub_score)
    with pytest.raises(ValueError, match="every"):
        PeriodicEvaluator(model, images, is_forget, every=0, **kw)
    with pytest.raises(ValueError, match="criterion"):
        PeriodicEvaluator(model, images, is_forget, every=1, criterion="fid", **kw)
    with pytest.raises(ValueError, match="no forget images"):
        PeriodicEvaluator(model, images, torch.zeros(len(images), dtype=torch.bool), every=1, **kw)
    with pytest.raises(ValueError, match="bool tensor"):
        PeriodicEvaluator(model, images, is_forget[:-1], every=1, **kw)
    with pytest.raises(ValueError, match="one error per image"):
        PeriodicEvaluator(model, images, is_forget, every=1, mask_seed=0, score_fn=lambda m, x, t: x.mean())
    with pytest.raises(TypeError, match="score_fn"):
        PeriodicEvaluator(model, images, is_forget, every=1, mask_seed=0)
    with pytest.raises(ValueError, match="before training is 0"):
        PeriodicEvaluator(model, images, is_forget, every=1, mask_seed=0,
                          score_fn=lambda m, x, t: torch.zeros(x.shape[0]))
    with pytest.raises(ValueError, match="not a best.pth"):
        torch.save([1, 2], tmp_path / "x.pth")
        load_best_weights(model, str(tmp_path / "x.pth"))


# ---- other families and the reference model ----------------------------------------------------------
def test_mage_default_score_is_the_hidden_token_cross_entropy():
    from unlearn_fast import create_model
    from unlearn_fast.eval.periodic_eval import family_task_errors
    torch.manual_seed(0)
    model = create_model("mage_micro").eval()
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    is_forget = torch.tensor([True, False, True, False, False])
    ev = PeriodicEvaluator(model, images, is_forget, mask_seed=3, every=1)
    assert ev.score_fn is family_task_errors
    # restated: label-smoothed CE of the true ids over the masked positions, per image, under the fixed draws
    images_f, task = ev.sets["forget"]
    ids = model.prepare_inputs(images_f)
    logits = model.forward_outputs(ids, task)[:, 1:, :model.codebook_size]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1),
                                           label_smoothing=0.1, reduction="none").view(ids.shape)
    w = task["token_all_mask"].float()
    expected = ((ce * w).sum(1) / w.sum(1)).mean().item()
    assert ev.before["forget_mse"] == pytest.approx(expected, rel=1e-5)
    assert expected > 0


def test_before_is_measured_on_the_reference_model_when_given():
    trained, original = StubModel(), StubModel()
    trained.set_scales(3.0, 1.5)  # a resumed, partly unlearned student
    images, is_forget = _holdout()
    ev = PeriodicEvaluator(trained, images, is_forget, mask_seed=0, every=1, score_fn=stub_score,
                           reference_model=original)
    plain = PeriodicEvaluator(original, images, is_forget, mask_seed=0, every=1, score_fn=stub_score)
    assert ev.before == plain.before
    rec = ev(0)
    assert rec["forget_ratio"] == pytest.approx(3.0) and rec["retain_ratio"] == pytest.approx(1.5)
    assert trained.training and original.training  # modes restored
