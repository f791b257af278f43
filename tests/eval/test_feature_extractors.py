"""Loading the evaluation networks from local files in their real formats, and the missing-file errors."""
import argparse
import os
import warnings

import pytest
import torch
import torch.nn as nn

from unlearn_fast.eval import feature_extractors as fe
from unlearn_fast.eval.feature_extractors import (CleanFIDInception, MissingDependencyError, MissingWeightsError,
                                                  load_cleanfid_inception, load_clip_visual,
                                                  load_places365_resnet50, load_torchvision_inception,
                                                  resolve_weights)


@pytest.fixture(autouse=True)
def no_weight_env(monkeypatch, tmp_path):
    for src in fe.WEIGHT_SOURCES.values():
        monkeypatch.delenv(src.env_var, raising=False)
    monkeypatch.chdir(tmp_path)  # so ./pretrained/ is empty unless a test fills it


class TinyInceptionScript(nn.Module):
    """Same interface as inception-2015-12-05.pt: a `layers` submodule and forward(x, return_features)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 5, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


def assert_same_weights(model, src):
    got, want = model.state_dict(), src.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def save_scripted(module, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(module).save(str(path))


def test_cleanfid_torchscript_loads_and_normalises(tmp_path):
    torch.manual_seed(0)
    tiny = TinyInceptionScript().eval()
    path = tmp_path / "inception-2015-12-05.pt"
    save_scripted(tiny, path)
    model = load_cleanfid_inception(str(path))
    assert isinstance(model, CleanFIDInception)
    x = torch.rand(3, 3, 299, 299) * 255
    with torch.no_grad():
        want = tiny.layers((x - 128) / 128).reshape(3, -1)  # clean-fid: (x - 128) / 128, then `layers`
        torch.testing.assert_close(model(x), want)
        with pytest.raises(ValueError, match="299"):
            model(torch.rand(1, 3, 64, 64))


def test_cleanfid_found_through_env_var_and_pretrained_dir(tmp_path, monkeypatch):
    tiny = TinyInceptionScript().eval()
    env_path = tmp_path / "elsewhere.pt"
    save_scripted(tiny, env_path)
    monkeypatch.setenv("UNLEARN_FAST_CLEANFID_INCEPTION", str(env_path))
    assert resolve_weights("cleanfid") == str(env_path)
    monkeypatch.delenv("UNLEARN_FAST_CLEANFID_INCEPTION")
    os.makedirs("pretrained")
    save_scripted(tiny, os.path.join("pretrained", "inception-2015-12-05.pt"))
    assert resolve_weights("cleanfid") == os.path.join("pretrained", "inception-2015-12-05.pt")
    load_cleanfid_inception()


def test_torchvision_inception_round_trip(tmp_path):
    from torchvision.models import inception_v3
    torch.manual_seed(0)
    src = inception_v3(weights=None, aux_logits=True, init_weights=False).eval()
    state = src.state_dict()
    # torchvision's released file predates BatchNorm's num_batches_tracked buffers.
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "inception_v3_google-0cc3c7bd.pth"
    torch.save(state, path)
    model = load_torchvision_inception(str(path))
    assert not model.training and model.transform_input is False
    assert_same_weights(model, src)  # (a forward pass on CPU would take seconds and prove no more)


def test_places365_tar_with_module_prefix(tmp_path):
    from torchvision.models import resnet50
    torch.manual_seed(0)
    src = resnet50(weights=None, num_classes=365).eval()
    ckpt = {"epoch": 90, "arch": "resnet50", "best_prec1": 54.7,
            "state_dict": {"module." + k: v for k, v in src.state_dict().items()}}
    path = tmp_path / "resnet50_places365.pth.tar"
    torch.save(ckpt, path)
    model = load_places365_resnet50(str(path))
    assert model.fc.out_features == 365 and not model.training
    assert_same_weights(model, src)
    # A checkpoint holding other Python objects needs an explicit opt-in to full unpickling.
    ckpt["args"] = argparse.Namespace(lr=0.1)
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_places365_resnet50(str(path))
    assert_same_weights(load_places365_resnet50(str(path), allow_pickle=True), src)


def test_wrong_checkpoint_contents_give_value_errors(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="missing keys"):
        load_torchvision_inception(str(bad))
    with pytest.raises(ValueError, match="missing keys"):
        load_places365_resnet50(str(bad))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="cannot"):
        load_cleanfid_inception(str(garbage))
    with pytest.raises(ValueError, match="cannot read"):
        load_places365_resnet50(str(garbage))


@pytest.mark.parametrize("name,loader", [("inception", load_torchvision_inception),
                                         ("cleanfid", load_cleanfid_inception),
                                         ("places365", load_places365_resnet50)])
def test_missing_file_error_says_what_where_and_how(name, loader, tmp_path):
    src = fe.WEIGHT_SOURCES[name]
    with pytest.raises(MissingWeightsError) as info:
        loader()
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for part in (src.flag, src.env_var, src.filename, src.url, os.path.join("pretrained", src.filename)):
        assert part in msg
    missing = str(tmp_path / "nope.bin")
    with pytest.raises(MissingWeightsError, match="nope.bin"):
        loader(missing)


def test_env_var_pointing_nowhere_is_named(monkeypatch):
    monkeypatch.setenv("UNLEARN_FAST_PLACES365", "/no/such/file.tar")
    with pytest.raises(MissingWeightsError, match=r"/no/such/file.tar \(given by \$UNLEARN_FAST_PLACES365\)"):
        load_places365_resnet50()
    with pytest.raises(ValueError, match="unknown weights"):
        resolve_weights("vgg")


def test_clip_without_open_clip_or_file_is_a_missing_weights_error(monkeypatch):
    try:
        import open_clip  # noqa: F401
        has_open_clip = True
    except ImportError:
        has_open_clip = False
    with pytest.raises(MissingWeightsError) as info:
        load_clip_visual()
    if has_open_clip:
        assert "UNLEARN_FAST_CLIP_WEIGHTS" in str(info.value)
    else:
        assert isinstance(info.value, MissingDependencyError)
        assert "pip install open-clip-torch" in str(info.value)
