"""CLIP cosine: the paired mean, embedding with the BGR convention, pairing by name, embedding files."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unlearn_fast.eval.clip_cosine import (clip_cosine_for_pairs, embed_images, load_embeddings,
                                           paired_cosine_mean, save_embeddings)
from unlearn_fast.eval.layout import ImagePair


@pytest.mark.parametrize("n,d", [(1, 7), (5, 3), (33, 1024)])
def test_paired_cosine_mean_matches_torch(n, d):
    g, o = torch.randn(n, d, dtype=torch.float64) * 3, torch.randn(n, d, dtype=torch.float64)
    want = F.cosine_similarity(g, o, dim=1).mean().item()
    assert paired_cosine_mean(g, o) == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert paired_cosine_mean(g.numpy(), g.numpy() * 2) == pytest.approx(1.0, abs=1e-12)
    gn, on = F.normalize(g, dim=1), F.normalize(o, dim=1)
    assert paired_cosine_mean(gn, on, normalize=False) == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_paired_cosine_errors():
    with pytest.raises(ValueError, match="one shape"):
        paired_cosine_mean(np.ones((2, 3)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="all zeros"):
        paired_cosine_mean(np.zeros((1, 3)), np.ones((1, 3)))
    with pytest.raises(ValueError, match="no embedding"):
        paired_cosine_mean(np.ones((0, 3)), np.ones((0, 3)))


class TinyVisual(torch.nn.Module):
    """A stand-in for the CLIP visual tower: [N, 3, 8, 8] -> [N, 6]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3 * 8 * 8, 6)

    def forward(self, x):
        return self.proj(x.flatten(1))


def preprocess_with_mean(img):
    """Like CLIP's preprocess, with a per-channel normalisation (so flip order matters)."""
    x = torch.from_numpy(np.array(img.resize((8, 8), Image.BILINEAR))).permute(2, 0, 1).float() / 255
    return (x - torch.tensor([0.1, 0.5, 0.9])[:, None, None]) / 0.25


def preprocess_plain(img):
    return torch.from_numpy(np.array(img.resize((8, 8), Image.BILINEAR))).permute(2, 0, 1).float() / 255


def save_png(path, arr):
    Image.fromarray(arr).save(path, format="PNG")
    return str(path)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    out = []
    for i in range(5):
        rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        orig = save_png(tmp_path / f"ILSVRC2012_val_{i:08d}.JPEG", rgb)
        gen = save_png(tmp_path / f"center_0.5_ILSVRC2012_val_{i:08d}.JPEG", rgb[..., ::-1].copy())  # BGR on disk
        out.append((orig, gen, rgb))
    return out


def test_embed_images_flip_after_preprocess_like_the_reference(images):
    model = TinyVisual()
    gen_paths = [g for _, g, _ in images]
    emb = embed_images(gen_paths, model, preprocess_with_mean, bgr_on_disk=True, batch_size=2)
    assert emb.shape == (5, 6) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    with torch.no_grad():
        as_read = torch.stack([preprocess_with_mean(Image.open(g).convert("RGB")) for g in gen_paths])
        want = F.normalize(model(as_read[:, [2, 1, 0]]), dim=1).numpy()
        rgb = torch.stack([preprocess_with_mean(Image.fromarray(a)) for _, _, a in images])
        want_before = F.normalize(model(rgb), dim=1).numpy()
    np.testing.assert_allclose(emb, want, atol=1e-6)
    before = embed_images(gen_paths, model, preprocess_with_mean, bgr_on_disk=True, flip_after_preprocess=False)
    np.testing.assert_allclose(before, want_before, atol=1e-6)
    assert not np.allclose(before, emb, atol=1e-3)  # the quirk changes numbers when the mean is per channel


def test_cosine_for_pairs_is_one_for_perfect_bgr_copies(images):
    model = TinyVisual()
    pairs = [ImagePair(g, o, "n0", o.rsplit("/", 1)[1]) for o, g, _ in images]
    cos, gen, orig = clip_cosine_for_pairs(pairs, model, preprocess_plain, batch_size=3)
    assert cos == pytest.approx(1.0, abs=1e-6)
    assert gen.shape == orig.shape == (5, 6)
    wrong, _, _ = clip_cosine_for_pairs(pairs, model, preprocess_plain, generated_bgr=False)
    assert wrong < 0.999
    # Given original embeddings are used as they are (rows in pair order).
    cos2, _, _ = clip_cosine_for_pairs(pairs, model, preprocess_plain, original_embeddings=-orig)
    assert cos2 == pytest.approx(-1.0, abs=1e-6)
    with pytest.raises(ValueError, match="no image pairs"):
        clip_cosine_for_pairs([], model, preprocess_plain)
    with pytest.raises(FileNotFoundError, match="missing"):
        embed_images(["/no/such.png"], model, preprocess_plain, bgr_on_disk=False)


@pytest.mark.parametrize("ext", ["txt", "npy"])
def test_embedding_files_round_trip(tmp_path, ext):
    emb = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    path = str(tmp_path / f"center_8_forget_clip_norm_5k.{ext}")
    save_embeddings(path, emb, names=["a", "b", "c", "d"])
    np.testing.assert_array_equal(load_embeddings(path), emb.astype(np.float64))  # %.18e keeps float32 exact
    assert open(path + ".names").read() == "a\nb\nc\nd\n"
    with pytest.raises(ValueError, match="names"):
        save_embeddings(path, emb, names=["a"])
    with pytest.raises(FileNotFoundError):
        load_embeddings(str(tmp_path / "none.npy"))
