"""Held-out files for evaluation: unseen by training, spread over the classes, seeded, clear errors."""
from __future__ import annotations

import os

import pytest

from unlearn_fast.train.data_split import select_unlearning_files
from unlearn_fast.train.holdout_split import select_holdout_files


@pytest.fixture()
def tree(tmp_path):
    counts = {"a": 7, "b": 3, "c": 5, "d": 4}
    for cls, n in counts.items():
        (tmp_path / cls).mkdir()
        for i in range(n):
            (tmp_path / cls / f"{i}.png").write_bytes(b"x")
    return str(tmp_path)


def test_holdout_excludes_training_files_and_spreads_over_classes(tree):
    items = select_unlearning_files(tree, ["a", "b"], ["c", "d"], num_image_per_class=2, seed=5)
    train = {os.path.abspath(p) for p, _ in items}
    held = select_holdout_files(tree, ["a", "b"], ["c", "d"], exclude=[p for p, _ in items], per_set=4, seed=5)
    assert len(held.forget) == 4 and len(held.retain) == 4
    assert not train & {os.path.abspath(p) for p in held.forget + held.retain}
    assert len(set(held.forget)) == 4  # no repeats
    # round robin: 'b' has only 1 unseen file, it is taken; 'a' fills the rest
    assert sum(os.path.basename(os.path.dirname(p)) == "b" for p in held.forget) == 1
    assert {os.path.basename(os.path.dirname(p)) for p in held.retain} == {"c", "d"}
    assert [lab for _, lab in held.items()] == [-100.0] * 4 + [100.0] * 4
    # the same seed gives the same files; another seed usually other ones
    again = select_holdout_files(tree, ["a", "b"], ["c", "d"], exclude=[p for p, _ in items], per_set=4, seed=5)
    assert again == held


def test_holdout_takes_what_there_is_and_fails_clearly_when_nothing_is_left(tree):
    held = select_holdout_files(tree, ["b"], ["c"], exclude=[], per_set=100, seed=0)
    assert len(held.forget) == 3 and len(held.retain) == 5
    everything = [os.path.join(tree, "b", f"{i}.png") for i in range(3)]
    with pytest.raises(ValueError, match="no held-out forget images.*--num_image_per_class"):
        select_holdout_files(tree, ["b"], ["c"], exclude=everything, per_set=4, seed=0)
    with pytest.raises(ValueError, match="per_set"):
        select_holdout_files(tree, ["b"], ["c"], exclude=[], per_set=0)
    with pytest.raises(ValueError, match="does not exist"):
        select_holdout_files(os.path.join(tree, "nope"), ["b"], ["c"], exclude=[], per_set=2)
