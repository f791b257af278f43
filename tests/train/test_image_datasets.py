"""UnlearnImageDataset and the seeded reference transforms: torchvision oracle, determinism, bad files."""
import os

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from unlearn_fast.train.image_datasets import (BadImageError, SeededTrainTransform, UnlearnImageDataset,
                                               eval_transform, item_generator, random_resized_crop_params,
                                               reference_train_transform, verify_images)

# (width, height): ordinary, portrait, 1x1, and 100x5 whose crops never fit (the centred fallback)
SHAPES = [(40, 30), (23, 57), (1, 1), (100, 5)]


def noise_image(width, height, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


@pytest.fixture
def items(tmp_path):
    out = []
    for k, (w, h) in enumerate(SHAPES):
        path = str(tmp_path / f"img{k}.png")
        noise_image(w, h, k).save(path)
        out.append((path, -100.0 if k % 2 == 0 else 100.0))
    gray = str(tmp_path / "gray.jpg")
    noise_image(31, 29, 9).convert("L").save(gray)  # not RGB on disk
    out.append((gray, 100.0))
    return out


@pytest.mark.parametrize("width,height", SHAPES)
@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.2, 0.5)])
def test_crop_params_match_torchvision_rule(width, height, scale):
    ratio = (3 / 4, 4 / 3)
    for seed in range(25):
        torch.manual_seed(seed)
        expected = T.RandomResizedCrop.get_params(Image.new("RGB", (width, height)), list(scale), list(ratio))
        got = random_resized_crop_params(width, height, scale, ratio, torch.Generator().manual_seed(seed))
        assert got == expected


@pytest.mark.parametrize("use_coco", [False, True])
@pytest.mark.parametrize("size", [16, 7])
def test_train_transform_equals_torchvision_pipeline_with_same_seed(size, use_coco):
    scale = (0.2, 0.5) if use_coco else (0.2, 1.0)
    oracle = T.Compose([T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
                        T.RandomHorizontalFlip(), T.ToTensor()])
    ours = reference_train_transform(size, use_coco=use_coco)
    for k, (w, h) in enumerate(SHAPES):
        image = noise_image(w, h, k)
        for seed in range(8):
            torch.manual_seed(seed)
            expected = oracle(image)
            got = ours(image, torch.Generator().manual_seed(seed))
            assert got.shape == (3, size, size) and got.dtype == torch.float32
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_train_transform_leaves_global_rng_alone():
    state = torch.get_rng_state()
    reference_train_transform(8)(noise_image(20, 20), torch.Generator().manual_seed(3))
    assert torch.equal(state, torch.get_rng_state())


def test_eval_transform_equals_torchvision_pipeline():
    oracle = T.Compose([T.Resize(12, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(12), T.ToTensor()])
    for k, (w, h) in enumerate(SHAPES):
        image = noise_image(w, h, k)
        torch.testing.assert_close(eval_transform(12)(image), oracle(image), rtol=0, atol=0)


def test_dataset_items_shapes_labels_and_range(items):
    ds = UnlearnImageDataset(items, reference_train_transform(16), seed=0)
    assert len(ds) == len(items) and ds.labels == [lab for _, lab in items]
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert isinstance(label, float) and label == items[i][1]


def test_dataset_randomness_is_a_function_of_seed_epoch_index(items):
    items = items[:1] * 6  # the same file at 6 indices (as the forget oversampling makes)
    a = UnlearnImageDataset(items, reference_train_transform(16), seed=5)
    b = UnlearnImageDataset(items, reference_train_transform(16), seed=5)
    first = [a[i][0] for i in range(6)]
    assert all(torch.equal(first[i], b[i][0]) for i in range(6))       # same (seed, epoch, index)
    assert all(torch.equal(first[i], a[i][0]) for i in range(6))       # repeatable
    assert torch.equal(a[-1][0], first[5])                              # negative index = same item
    assert sum(torch.equal(first[0], first[i]) for i in range(1, 6)) == 0  # copies get different crops
    a.set_epoch(1)
    assert sum(torch.equal(first[i], a[i][0]) for i in range(6)) == 0  # a new epoch, new crops
    b.set_epoch(1)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(6))        # "resumed" at epoch 1 = same
    c = UnlearnImageDataset(items, reference_train_transform(16), seed=6)
    assert sum(torch.equal(first[i], c[i][0]) for i in range(6)) == 0


def test_item_generator_is_stable():
    x = torch.rand(4, generator=item_generator(1, 2, 3))
    assert torch.equal(x, torch.rand(4, generator=item_generator(1, 2, 3)))
    for other in [(0, 2, 3), (1, 0, 3), (1, 2, 0)]:
        assert not torch.equal(x, torch.rand(4, generator=item_generator(*other)))


def test_worker_count_does_not_change_the_batches(items):
    ds = UnlearnImageDataset(items * 2, reference_train_transform(8), seed=1)
    ds.set_epoch(3)
    batches = [[0, 5, 2], [7, 1, 4], [3, 6, 8]]

    def run(workers):
        loader = DataLoader(ds, batch_sampler=batches, num_workers=workers)
        return [(x.clone(), y.clone()) for x, y in loader]

    for (x0, y0), (x2, y2) in zip(run(0), run(2)):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
        assert y0.dtype == torch.float64  # as the reference after collation


def test_plain_callable_and_no_transform(items):
    plain = UnlearnImageDataset(items, T.Compose([T.Resize((5, 6)), T.ToTensor()]))
    assert plain[0][0].shape == (3, 5, 6)
    raw = UnlearnImageDataset(items)
    image, _ = raw[1]
    assert image.shape == (3, SHAPES[1][1], SHAPES[1][0])
    assert raw[len(items) - 1][0].shape[0] == 3  # grey file converted to RGB


def test_bad_images_raise_named_errors(tmp_path, items):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    truncated = tmp_path / "truncated.jpg"
    noise_image(64, 64).save(truncated, format="JPEG")
    truncated.write_bytes(truncated.read_bytes()[:300])
    missing = str(tmp_path / "missing.png")
    ds = UnlearnImageDataset(items + [(str(corrupt), 100.0), (str(truncated), 100.0), (missing, -100.0)],
                             reference_train_transform(8))
    for index, path in [(-3, corrupt), (-2, truncated), (-1, missing)]:
        with pytest.raises(BadImageError, match=os.path.basename(str(path))):
            ds[index]
    assert issubclass(BadImageError, ValueError)
    verify_images(items)  # good files pass
    with pytest.raises(BadImageError, match=r"3 of 8 images cannot be read") as info:
        verify_images(ds.items + ds.items[:2], num_threads=3)  # duplicates are checked once
    message = str(info.value)
    assert "corrupt.jpg" in message and "truncated.jpg" in message and "missing.png" in message


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one"):
        UnlearnImageDataset([])
    with pytest.raises(ValueError, match="input_size"):
        reference_train_transform(0)
    with pytest.raises(ValueError, match="input_size"):
        eval_transform(2.5)
    with pytest.raises(ValueError, match="crop scale"):
        SeededTrainTransform(8, scale=(0.5, 0.2))
