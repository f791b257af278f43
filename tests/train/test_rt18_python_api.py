"""Red team 18: the Python API as README.md's "Python API" section and the docstrings present it.

A researcher calls ``unlearn_fast.create_model``, ``build_setup`` and ``train_loop`` directly. Each misuse must give
one clear exception that names the argument and what is accepted, raised before any work (a failed call leaves the
model as it was and trains nothing), never a deep torch traceback nor a silent wrong result (labels 0/1 read as
all-forget, images in 0..255 against noise clamped to [0, 1], a negative lr, a bf16 student whose AdamW updates
round away, a partly unlearned model copied as the teacher).
"""
from __future__ import annotations

import os

import pytest
import torch

import unlearn_fast
from unlearn_fast.train.trainer import train_loop
from unlearn_fast.train.unlearn_setup import build_setup

pytestmark = pytest.mark.usefixtures("single_thread")

LABELS = torch.tensor([-100.0, 100.0, -100.0, 100.0])  # the reference's convention: -100 forget, +100 retain


def _images(n=4, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def setup(make_mae_micro):
    return build_setup(make_mae_micro(), "cpu", lr=1e-3, forget_alpha=0.2, precision="fp32")


def _loop(setup, batches, steps=1, **kw):
    kw = dict(dict(epochs=1, lr=1e-3, progress=False), **kw)
    return train_loop(setup, batches if callable(batches) else (lambda epoch: iter(batches)), steps, **kw)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- create_model


def test_create_model_unknown_keyword_lists_what_the_model_accepts():
    with pytest.raises(TypeError) as info:
        unlearn_fast.create_model("mae_micro", depht=2)
    msg = str(info.value)
    assert "create_model('mae_micro')" in msg and "'depht'" in msg  # the argument
    assert "did you mean 'depth'" in msg and "mask_ratio" in msg and "img_size" in msg  # what is accepted
    with pytest.raises(TypeError, match=r"create_model\('mage_micro'\).*'patch'.*accepts:.*patch_size"):
        unlearn_fast.create_model("mage_micro", patch=4)


def test_create_model_unknown_name_suggests_the_close_one():
    with pytest.raises(ValueError, match=r"unknown model 'MAE_MICRO' \(did you mean 'mae_micro'\?\)"):
        unlearn_fast.create_model("MAE_MICRO")


# ---------------------------------------------------------------- build_setup


@pytest.mark.parametrize("device", ["mps", "meta"])
def test_build_setup_takes_cpu_or_cuda_devices_only(make_mae_micro, device):
    model = make_mae_micro()
    with pytest.raises(ValueError, match=rf"device '{device}'.*'cpu' or 'cuda"):
        build_setup(model, device)
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("kwargs,needle", [(dict(lr=0.0), "lr must be finite and > 0, got 0.0"),
                                           (dict(forget_alpha=-0.2), "forget_alpha must be finite and >= 0, got -0.2"),
                                           (dict(retain_alpha=-1.0), "retain_alpha must be finite and >= 0")])
def test_build_setup_refuses_what_the_command_line_refuses(make_mae_micro, kwargs, needle):
    """lr = 0 trains nothing and a negative weight ascends its term: the CLI refuses both, so does the library."""
    with pytest.raises(ValueError, match=needle):
        build_setup(make_mae_micro(), "cpu", **kwargs)


@pytest.mark.parametrize("name,value", [("fold_clip", "no"), ("share_tokenizer", "no"), ("overlap_teacher", "False"),
                                        ("fast", "yes"), ("half_student_weights", None)])
def test_build_setup_switches_are_bools(make_mae_micro, name, value):
    """bool("no") is True: a string switch would silently turn the knob on."""
    with pytest.raises(TypeError, match=rf"{name} must be True or False, got {value!r}"):
        build_setup(make_mae_micro(), "cpu", **{name: value})


@pytest.mark.parametrize("cast,dtype", [("half", "float16"), ("bfloat16", "bfloat16"), ("double", "float64")])
def test_build_setup_refuses_a_model_in_another_dtype_and_leaves_it_untouched(make_mae_micro, cast, dtype):
    """The student's weights are the optimizer's fp32 master copy and ``precision`` sets the compute dtype: an fp16
    model failed deep inside autocast, a bf16 one lost its AdamW updates to rounding, an fp64 one ignored
    ``precision``."""
    model = getattr(make_mae_micro(), cast)()
    trainable = [p.requires_grad for p in model.parameters()]
    with pytest.raises(TypeError, match=rf"model's parameters are torch\.{dtype}: .*precision=.*pass model\.float\(\)"):
        build_setup(model, "cpu")
    assert [p.requires_grad for p in model.parameters()] == trainable and model.training  # nothing frozen
    with pytest.raises(TypeError, match="teacher's parameters are torch"):
        build_setup(make_mae_micro(), "cpu", teacher=getattr(make_mae_micro(), cast)())


def test_build_setup_refuses_a_model_without_values():
    with torch.device("meta"):
        model = unlearn_fast.create_model("mae_micro")
    with pytest.raises(ValueError, match=r"model's weights are on the meta device"):
        build_setup(model, "cpu")


def test_build_setup_sends_palette_to_its_own_trainer():
    with pytest.raises(TypeError, match="build_palette_setup"):
        build_setup(unlearn_fast.create_model("palette_micro"), "cpu")


def test_the_same_model_twice(make_mae_micro):
    """A second build_setup on a model an earlier setup has trained would copy the partly unlearned model as the
    teacher (the official resume's flaw, REFERENCE.md §11): refused unless the teacher is given. Built twice before
    any training, the copy is still the original: allowed."""
    model = make_mae_micro()
    first = build_setup(model, "cpu", lr=1e-3, forget_alpha=0.2, precision="fp32")
    again = build_setup(model, "cpu", lr=1e-3, forget_alpha=0.2, precision="fp32")  # nothing trained yet
    assert again.student is model
    _loop(first, [(_images(), LABELS)])
    with pytest.raises(ValueError, match=r"changed since an earlier build_setup.*teacher=") as info:
        build_setup(model, "cpu", lr=1e-3, forget_alpha=0.2, precision="fp32")
    assert "partly unlearned" in str(info.value)
    third = build_setup(model, "cpu", lr=1e-3, forget_alpha=0.2, precision="fp32", teacher=first.teacher)
    assert third.teacher is first.teacher


# ---------------------------------------------------------------- train_loop: labels


@pytest.mark.parametrize("labels", [torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([1, 0, 1, 0]),
                                    torch.tensor([-1.0, 1.0, -1.0, 1.0]), torch.full((4,), float("nan"))],
                         ids=["float01", "int01", "signs", "nan"])
def test_labels_that_are_not_the_reference_convention_are_refused_before_a_step(setup, labels):
    """`labels < 100` read 0/1 flags, +1 signs and NaN... as forget (0/1, +1) or retain (NaN): silently wrong."""
    before = _weights(setup.student)
    with pytest.raises(ValueError, match=r"epoch_batches\(0\), batch of step 0: labels must be .*-100.*100") as info:
        _loop(setup, [(_images(), labels)])
    assert "\n" not in str(info.value)
    assert _unchanged(setup.student, before)


def test_bool_labels_are_the_forget_mask_and_int_labels_the_float_ones(make_mae_micro):
    images = _images()

    def history(labels):
        s = build_setup(make_mae_micro(), "cpu", lr=1e-3, forget_alpha=0.2, precision="fp32")
        return _loop(s, [(images, labels)])

    want = history(LABELS)
    assert history(LABELS < 100) == want  # True = forget, as every op's is_forget (was: all rows forget)
    assert history(LABELS.long()) == want and history(LABELS.double()) == want


@pytest.mark.parametrize("batch,exc,needle", [
    (lambda im: (im, LABELS.tolist()[:3]), ValueError, r"labels must be .*\[N\] with N = 4 .*, got \(3,\)"),
    (lambda im: (im, LABELS[:, None]), ValueError, r"labels must be .*\[N\] with N = 4 .*, got \(4, 1\)"),
    (lambda im: (im, ["forget"] * 4), TypeError, "labels must be"),
    (lambda im: im, TypeError, r"an \(images, labels\) pair, got Tensor"),
    (lambda im: (im, LABELS, None), TypeError, r"an \(images, labels\) pair, got a tuple of 3"),
    (lambda im: {"images": im, "labels": LABELS}, TypeError, r"an \(images, labels\) pair, got dict"),
], ids=["short", "column", "strings", "bare-images", "triple", "dict"])
def test_malformed_batches_name_the_batch_and_what_is_accepted(setup, batch, exc, needle):
    with pytest.raises(exc, match=needle) as info:
        _loop(setup, [batch(_images())])
    assert "epoch_batches(0), batch of step 0" in str(info.value)


# ---------------------------------------------------------------- train_loop: images


@pytest.mark.parametrize("images,exc,needle", [
    (_images()[0], ValueError, r"images must be a tensor \[N, C, H, W\], got \(3, 32, 32\)"),
    ((_images() * 255).to(torch.uint8), TypeError, r"floating point.*uint8.*/ 255"),
    (_images() * 255, ValueError, r"images hold values in \[0.*, 25\d.*\]; the model takes \[0.0, 1.0\]"),
    (_images() * 2 - 1, ValueError, r"images hold values in \[-1, 1\]; the model takes \[0.0, 1.0\]"),
    (_images().index_fill(0, torch.tensor([1]), float("nan")), ValueError, "images hold NaN"),
], ids=["3d", "uint8", "0-255", "pm1", "nan"])
def test_images_the_model_cannot_take_are_refused_before_a_step(setup, images, exc, needle):
    """0..255 or [-1, 1] images trained silently (the model normalises [0, 1] inputs, the noise is clamped to it)."""
    before = _weights(setup.student)
    labels = LABELS[:1] if images.dim() == 3 else LABELS
    with pytest.raises(exc, match=needle) as info:
        _loop(setup, [(images, labels)])
    assert "epoch_batches(0), batch of step 0" in str(info.value)
    assert _unchanged(setup.student, before)


def test_a_later_batch_the_model_refuses_names_its_epoch_and_step(setup):
    """The model checks image sizes itself (models/); its error on a later batch says where the run stopped."""
    with pytest.raises(ValueError, match=r"expected 32x32 images") as info:
        _loop(setup, [(_images(), LABELS), (torch.rand(4, 3, 64, 64), LABELS)], 2)
    assert "step 1 of epoch 0 (global step 1)" in " ".join(getattr(info.value, "__notes__", []))


# ---------------------------------------------------------------- train_loop: counts, lr, types


@pytest.mark.parametrize("kwargs,exc,needle", [
    (dict(epochs=0), ValueError, r"epochs must be > start_epoch \(0\), got 0: nothing to train"),
    (dict(epochs=-1), ValueError, "nothing to train"),
    (dict(epochs=2, start_epoch=2), ValueError, "nothing to train"),
    (dict(epochs=1.5), TypeError, "epochs must be an int, got 1.5"),
    (dict(steps=1.0), TypeError, "steps_per_epoch must be an int, got 1.0"),
    (dict(lr=-1.0), ValueError, "lr must be finite and > 0, got -1.0"),
    (dict(lr=float("nan")), ValueError, "lr must be finite and > 0, got nan"),
    (dict(lr=0.0), ValueError, "lr must be finite and > 0, got 0.0"),
    (dict(lr="1e-3"), TypeError, "lr must be a number, got '1e-3'"),
    (dict(min_lr=-1e-3), ValueError, "min_lr must be finite and >= 0"),
    (dict(warmup_epochs=-1), ValueError, "warmup_epochs must be finite and >= 0"),
    (dict(readback_every=0), ValueError, "readback_every must be >= 1"),
], ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(f"{k}={v[k]}" for k in v))
def test_loop_arguments_are_checked_before_any_work(setup, kwargs, exc, needle):
    before = _weights(setup.student)
    steps = kwargs.pop("steps", 1)
    with pytest.raises(exc, match=needle):
        _loop(setup, [(_images(), LABELS)], steps, **kwargs)
    assert _unchanged(setup.student, before)


def test_setup_and_batch_source_types(setup, make_mae_micro):
    with pytest.raises(TypeError, match=r"setup must be the UnlearnSetup of build_setup\(model, device, \.\.\.\), "
                                        "got MaskedAutoencoderViT"):
        _loop(make_mae_micro(), [(_images(), LABELS)])
    with pytest.raises(TypeError, match=r"epoch_batches must be a function of the epoch .*got list"):
        train_loop(setup, [(_images(), LABELS)], 1, epochs=1, lr=1e-3, progress=False)
    with pytest.raises(TypeError, match=r"epoch_batches\(0\) returned NoneType"):
        _loop(setup, lambda epoch: None)


# ---------------------------------------------------------------- train_loop: the user's own errors, output_dir


class CorruptImage(Exception):
    """A data error of the user's own pipeline."""


def test_a_data_error_surfaces_as_the_users_own_with_the_epoch_and_step_and_keeps_the_checkpoints(setup, tmp_path):
    images = _images()

    def epoch_batches(epoch):
        for k in range(2):
            if (epoch, k) == (1, 1):
                raise CorruptImage("cannot decode img_7.jpg")
            yield images, LABELS

    with pytest.raises(CorruptImage, match="img_7.jpg") as info:
        _loop(setup, epoch_batches, 2, epochs=2, output_dir=str(tmp_path), save_every_steps=1)
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "epoch_batches(1) raised this for step 1 of epoch 1 (global step 3)" in notes
    assert str(tmp_path) in notes
    kept = {"checkpoint-0.pth", "checkpoint-0.safetensors", "checkpoint-last.pth", "log.txt"}
    assert kept <= set(os.listdir(tmp_path))
    last = torch.load(tmp_path / "checkpoint-last.pth", weights_only=False, map_location="cpu")
    assert last["unlearn_fast"]["global_step"] == 3  # epoch 1's first step, saved before its second batch failed


def test_output_dir_that_is_a_file(setup, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    with pytest.raises(ValueError, match=rf"output_dir {str(path)!r} is a file"):
        _loop(setup, [(_images(), LABELS)], output_dir=str(path))
    assert path.read_text() == "mine"


def test_output_dir_holding_a_run_is_never_overwritten_by_a_new_one(setup, make_mae_micro, tmp_path):
    _loop(setup, [(_images(), LABELS)], epochs=2, output_dir=str(tmp_path))
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    fresh = build_setup(make_mae_micro(seed=1), "cpu", lr=1e-3, forget_alpha=0.2, precision="fp32")
    with pytest.raises(ValueError, match=r"output_dir .* already holds a run \(log.txt, checkpoint-0.pth, "):
        _loop(fresh, [(_images(), LABELS)], output_dir=str(tmp_path))
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before
    # continuing that run (a resume: start_epoch > 0) writes on into its folder
    _loop(setup, [(_images(), LABELS)], epochs=3, start_epoch=2, output_dir=str(tmp_path))
    assert "checkpoint-2.pth" in os.listdir(tmp_path)
    assert len((tmp_path / "log.txt").read_text().splitlines()) == 3
