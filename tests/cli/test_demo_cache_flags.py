"""`unlearn-fast demo --cache_dir X` keeps every cache file under X; `--no_cache` reads and writes none.

HOME, $UNLEARN_FAST_CACHE and the working folder point at empty temporary folders that must stay empty."""
from __future__ import annotations

import pytest

from unlearn_fast.cli import demo
from unlearn_fast.eval import digit_classifier as dc
from unlearn_fast.train import digits as dg
from tests.helpers import files_under as _files, needs_digits


TINY = ["--pretrain_steps", "2", "--unlearn_steps", "2", "--holdout_per_class", "10", "--no_progress"]


class Stop(Exception):
    """Raised by a stub to end the demo at a chosen point."""


def _args(tmp_path, *flags):
    return demo.build_parser().parse_args(TINY + ["--output_dir", str(tmp_path / "out"), *flags])


@pytest.mark.parametrize("flags, want", [
    ([], (None, True)),
    (["--cache_dir", "{c}"], ("{c}", True)),
    (["--no_cache"], (None, False)),
    (["--no_cache", "--cache_dir", "{c}"], ("{c}", False)),
])
def test_cache_flags_reach_the_digits_loader(tmp_path, monkeypatch, flags, want):
    seen = []

    def record(cache_dir=None, *, use_cache=True):
        seen.append((cache_dir, use_cache))
        raise Stop
    monkeypatch.setattr(demo, "load_digits_5k", record)
    c = str(tmp_path / "c")
    with pytest.raises(Stop):
        demo.run_demo(_args(tmp_path, *[f.format(c=c) for f in flags]))
    assert seen == [(want[0] and want[0].format(c=c), want[1])]


def _stop_at_pretraining(monkeypatch):
    seen = []

    def pretrain(config, images, cache_dir=None, **kw):
        seen.append(cache_dir)
        raise Stop
    monkeypatch.setattr(demo, "load_or_pretrain_mae", pretrain)
    return seen


@needs_digits
def test_cache_dir_puts_the_digits_cache_there_only(tmp_path, elsewhere, monkeypatch):
    seen = _stop_at_pretraining(monkeypatch)
    with pytest.raises(Stop):
        demo.run_demo(_args(tmp_path, "--cache_dir", str(tmp_path / "c")))
    assert _files(tmp_path / "c") == ["mnist_5k_v1.npz"] and seen == [str(tmp_path / "c")]
    assert all(_files(p) == [] for p in elsewhere.values())
    assert not (tmp_path / "out").exists()


@needs_digits
def test_no_cache_reads_and_writes_no_digits_cache(tmp_path, elsewhere, monkeypatch):
    dg.load_digits_5k()  # a valid default cache, which must not be read either
    assert _files(elsewhere["env_cache"]) == ["mnist_5k_v1.npz"]
    monkeypatch.setattr(dg.np, "load", lambda *a, **k: pytest.fail("a cache file was read"))
    seen = _stop_at_pretraining(monkeypatch)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(Stop):
        demo.run_demo(_args(tmp_path, "--no_cache"))
    assert seen == [None]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


# The whole demo (tiny budget, the digit classifier's training stubbed: ~5 s): the digit classifier reads the
# digits through the demo's cache flags too (it once wrote $UNLEARN_FAST_CACHE/mnist_5k_v1.npz whatever they said).
@needs_digits
@pytest.mark.parametrize("flag", ["--cache_dir", "--no_cache"])
def test_whole_demo_writes_caches_only_where_told(tmp_path, elsewhere, monkeypatch, flag):
    monkeypatch.setattr(dc, "train_digit_classifier", lambda config, x, y, device="cpu":
                        dc.DigitClassifier(config.embed_dim).eval())
    flags = ["--cache_dir", str(tmp_path / "c")] if flag == "--cache_dir" else ["--no_cache"]
    demo.run_demo(_args(tmp_path, *flags))
    assert _files(tmp_path / "out") == ["grid.png", "metrics.json"]
    assert all(_files(p) == [] for p in elsewhere.values()), {k: _files(p) for k, p in elsewhere.items()}
    if flag == "--cache_dir":
        names = _files(tmp_path / "c")
        assert "mnist_5k_v1.npz" in names and len(names) == 3  # + the pretrained MAE and the digit classifier
        assert any(n.startswith("pretrain_mae_micro_") for n in names)
        assert any(n.startswith("digit_classifier_") for n in names)
    else:
        assert not (tmp_path / "c").exists()
