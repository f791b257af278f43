"""Fixtures of the evaluation tests."""
import warnings

import pytest
import torch

from tests.eval.stand_ins import TinyInceptionScript


@pytest.fixture
def cleanfid_file(tmp_path):
    """A torchscript stand-in saved under clean-fid's Inception file name."""
    torch.manual_seed(0)
    path = str(tmp_path / "inception-2015-12-05.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(TinyInceptionScript().eval()).save(path)
    return path
