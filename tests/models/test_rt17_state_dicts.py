"""Red-team (rt17) of loading and saving weights in the official layouts (REFERENCE.md §1.7, §3.4, §11;
../shared/reference-keys): wrapped and prefixed state dicts, another model or image size, tensors that share
memory, meta-built models, non-finite weights, empty files, and the save -> official-load round trip.

Every fault found here first failed as written; the last section pins cases that turned out sound."""
from __future__ import annotations

import argparse
import warnings

import pytest
import torch

from unlearn_fast.models import create_model
from unlearn_fast.models.mage import MICRO_DDCONFIG, load_mage_checkpoint
from unlearn_fast.models.palette import load_palette_checkpoint
from unlearn_fast.models.state_dict_io import CheckpointError, load_state_dict_strict, read_checkpoint
from unlearn_fast.models.vqgan import load_vqgan_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


def _micro_mage(seed=0, **kwargs):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model("mage_micro", **kwargs).eval()


def _meta(name, **kwargs):
    with torch.device("meta"):
        return create_model(name, **kwargs)


def _zeros_like_state(model):
    """A file-sized-nothing fake of ``model``'s state dict: one zero per tensor, expanded to its shape."""
    return {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in model.state_dict().items()}


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- meta-built models: the loaded tensors must be the model's own -----------------------------------------

def test_meta_load_does_not_share_memory_with_a_live_source():
    """assign=True used to hand the caller's tensors to the model: a teacher built on meta and loaded from the
    student's state_dict() *was* the student (an update of one changed the other)."""
    src = _micro_mage(1)
    dst = _meta("mage_micro")
    load_state_dict_strict(dst, src.state_dict(), "student weights")
    before = dst.blocks[0].attn.qkv.weight.detach().clone()
    with torch.no_grad():
        src.blocks[0].attn.qkv.weight.add_(1.0)
    assert torch.equal(dst.blocks[0].attn.qkv.weight, before)
    own = {t.untyped_storage().data_ptr() for t in dst.state_dict().values()}
    theirs = {t.untyped_storage().data_ptr() for t in src.state_dict().values()}
    assert not own & theirs


def test_meta_load_of_tied_or_expanded_file_tensors_gives_trainable_separate_weights(tmp_path):
    """A file whose keys share one storage (tied on save) or whose tensors are expanded views: assigned as they
    were, two parameters stayed one (training one moved the other) and AdamW failed deep inside on the
    zero-stride ones ("more than one element of the written-to tensor refers to a single memory location")."""
    state = _zeros_like_state(_micro_mage())
    shared = torch.full(tuple(state["pos_embed"].shape), 0.5)
    state["pos_embed"] = state["decoder_pos_embed"] = shared  # one tensor under two keys
    path = tmp_path / "tied.pth"
    torch.save({"model": state}, path)
    model = _meta("mage_micro")
    load_mage_checkpoint(model, str(path))
    assert model.pos_embed.data_ptr() != model.decoder_pos_embed.data_ptr()
    assert all(p.is_contiguous() and 0 not in p.stride() for p in model.parameters() if p.dim() and p.numel() > 1)
    trained = [p for p in model.parameters() if p.requires_grad]
    for p in trained:
        p.grad = torch.ones_like(p)
    torch.optim.AdamW(trained, lr=0.1).step()  # raised before
    assert float(model.blocks[0].attn.qkv.weight.detach()[0, 0]) != 0.0
    assert torch.equal(model.pos_embed, torch.full_like(model.pos_embed, 0.5))  # frozen, not moved


def test_meta_built_mae_ends_up_whole_after_a_load():
    """MAE's input_mean / input_std are non-persistent buffers: no file holds them, so a meta-built MAE kept
    them on the meta device after every load and failed at its first forward."""
    src = create_model("mae_micro", input_mean=[0.4, 0.5, 0.6], input_std=[0.2, 0.25, 0.3]).eval()
    dst = _meta("mae_micro", input_mean=[0.4, 0.5, 0.6], input_std=[0.2, 0.25, 0.3])
    load_state_dict_strict(dst, src.state_dict(), "MAE weights")
    assert not [n for n, b in dst.named_buffers() if b.is_meta]
    torch.testing.assert_close(dst.input_mean.flatten(), torch.tensor([0.4, 0.5, 0.6]), rtol=0, atol=0)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    task = src.sample_task(images, torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(dst.eval().forward_encoder_task(images, task),
                                   src.forward_encoder_task(images, task), rtol=0, atol=0)


def test_meta_module_whose_buffers_no_file_can_fill_is_refused_before_loading():
    class WithScratch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)
            self.register_buffer("scale", torch.ones(2), persistent=False)
    with torch.device("meta"):
        m = WithScratch()
    with pytest.raises(ValueError, match=r"non-persistent buffers .*scale.* no checkpoint holds"):
        load_state_dict_strict(m, {"lin." + k: v for k, v in torch.nn.Linear(3, 2).state_dict().items()}, "f")
    assert m.lin.weight.is_meta  # nothing half-loaded


@pytest.mark.parametrize("into_meta", [False, True], ids=["real", "meta"])
def test_a_state_of_meta_tensors_is_one_clear_error(into_meta):
    """A meta model's state_dict() holds no data: into a real model it was a RuntimeError from deep inside
    load_state_dict; into a meta model it 'loaded' and left the model without weights."""
    dst = _meta("mage_micro") if into_meta else _micro_mage()
    with pytest.raises(ValueError, match=r"hold no data \(meta tensors: cls_token"):
        load_state_dict_strict(dst, _meta("mage_micro").state_dict(), "weights")


def test_palette_loader_materialises_a_meta_network():
    """load_palette_checkpoint copied into a meta Network: 144 'no-op' warnings and a model with no weights."""
    torch.manual_seed(0)
    src = create_model("palette_micro")
    dst = _meta("palette_micro")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_palette_checkpoint(dst, src.state_dict())
    assert not [n for n, t in dst.state_dict().items() if t.is_meta]
    assert _same_weights(dst, src) and dst.num_timesteps == src.num_timesteps


# ---- containers and prefixes -------------------------------------------------------------------------------

def test_a_lightning_style_state_dict_entry_loads(tmp_path):
    src = _micro_mage(1)
    path = tmp_path / "mage.ckpt"
    torch.save({"state_dict": src.state_dict(), "epoch": 3, "global_step": 10}, path)
    dst = _micro_mage(2)
    load_mage_checkpoint(dst, str(path))
    assert _same_weights(dst, src)


@pytest.mark.parametrize("make,named", [
    (lambda sd: {"model_ema": sd, "epoch": 3}, r"its tensors are under 'model_ema'"),
    (lambda sd: {"model": None, "epoch": 1, "args": argparse.Namespace(lr=1.0)}, r"'model' \(NoneType\)"),
    (lambda sd: {"net": {"inner": sd}}, r"'net' \(dict of 1 entries\)"),
], ids=["ema_only", "model_none", "nested"])
def test_a_file_without_a_readable_state_dict_names_what_it_holds(tmp_path, make, named):
    container = make(_micro_mage().state_dict())
    path = tmp_path / "odd.pth"
    torch.save(container, path)
    with pytest.raises(ValueError, match=named) as e:
        load_mage_checkpoint(_micro_mage(), str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("prefix,says", [("_orig_mod.", "torch.compile"),
                                         ("module._orig_mod.", r"DDP \+ torch.compile")])
def test_a_compiled_models_prefix_is_named(prefix, says):
    """A state dict saved from torch.compile(model) has '_orig_mod.' keys: the error listed 139 missing and 139
    unexpected keys without saying why ('module.' alone had a hint)."""
    model = _micro_mage()
    state = {prefix + k: v for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"start with '{prefix}'.*{says}.*strip that prefix"):
        load_state_dict_strict(model, state, "compiled file")


def test_a_mage_checkpoint_given_as_the_vqgan_checkpoint_names_the_prefix(tmp_path):
    """--vqgan_ckpt mage-vitb-1600.pth: was 'not a state dict of tensors'."""
    mage = _micro_mage()
    path = tmp_path / "mage-vitb-1600.pth"
    torch.save({"model": mage.state_dict(), "epoch": 0, "args": argparse.Namespace(model="mage_micro")}, path)
    with pytest.raises(ValueError, match=r"under the prefix 'vqgan\.'.*contains this one"):
        load_vqgan_checkpoint(_micro_mage(1), str(path))


# ---- another model size, another image size ----------------------------------------------------------------

def test_a_vit_large_file_into_vit_base_names_both_sizes():
    """Shape-only at full size: the official MAE-L key set into an MAE-B (meta, zero-stride fakes)."""
    state = _zeros_like_state(_meta("mae_vit_large_patch16"))
    with pytest.raises(ValueError) as e:
        load_state_dict_strict(_meta("mae_vit_base_patch16"), state, "MAE checkpoint")
    msg = str(e.value)
    assert "another model size" in msg
    assert "blocks: 24 in the file, 12 in the model" in msg and "width 1024 in the file, 768 in the model" in msg
    assert "decoder_blocks:" not in msg  # both decoders have 8 blocks


def test_a_deeper_wider_micro_file_names_depth_and_width(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save({"model": _micro_mage(embed_dim=96, depth=3).state_dict()}, path)
    with pytest.raises(ValueError, match=r"another model size \(blocks: 3 in the file, 2 in the model; "
                                         r"width 96 in the file, 64 in the model\)"):
        load_mage_checkpoint(_micro_mage(), str(path))


def test_a_file_for_another_image_size_names_the_token_grid(tmp_path):
    big = _micro_mage(img_size=64, ddconfig=dict(MICRO_DDCONFIG, resolution=64))
    path = tmp_path / "img64.pth"
    torch.save({"model": big.state_dict()}, path)
    with pytest.raises(ValueError, match=r"position tables for 257 = 1\+16x16 tokens in the file, 65 = 1\+8x8 in "
                                         r"the model \(another image or patch size\)"):
        load_mage_checkpoint(_micro_mage(), str(path))


# ---- damaged contents --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_and_named(tmp_path, bad):
    """A diverged run's weights loaded silently (the official loader would too); nothing sensible follows."""
    state = _micro_mage().state_dict()
    state["blocks.1.mlp.fc2.weight"] = state["blocks.1.mlp.fc2.weight"].clone()
    state["blocks.1.mlp.fc2.weight"][3, 5] = bad
    path = tmp_path / "diverged.pth"
    torch.save({"model": state}, path)
    dst = _micro_mage(3)
    before = dst.blocks[0].attn.qkv.weight.detach().clone()
    with pytest.raises(ValueError, match=r"1 tensors hold NaN or inf values \(blocks\.1\.mlp\.fc2\.weight\)"):
        load_mage_checkpoint(dst, str(path))
    assert torch.equal(dst.blocks[0].attn.qkv.weight, before)  # refused before anything was copied


def test_an_empty_file_says_so_and_paths_print_as_paths(tmp_path):
    path = tmp_path / "checkpoint-5.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*: the file is empty \(0 bytes") as e:
        read_checkpoint(path)  # a pathlib.Path
    assert "PosixPath" not in str(e.value) and str(path) in str(e.value)


def test_a_truncated_zip_names_the_problem_without_torchs_advice(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": _micro_mage().state_dict()}, good)
    path = tmp_path / "cut.pth"
    path.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match=r"truncated.*failed finding central directory$"):
        read_checkpoint(str(path))


# ---- sound cases, pinned -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("meta", [False, True], ids=["built", "meta"])
def test_half_precision_files_load_as_fp32_master_weights(tmp_path, dtype, meta):
    src = _micro_mage(1)
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in src.state_dict().items()}
    path = tmp_path / "half.pth"
    torch.save({"model": half}, path)
    dst = _meta("mage_micro") if meta else _micro_mage(2)
    load_mage_checkpoint(dst, str(path))
    got = dst.state_dict()
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in src.state_dict().items()}
    assert all(torch.equal(got[k], half[k].to(got[k].dtype)) for k in got)


def test_a_file_saved_from_cuda_loads_on_a_cpu_only_machine(tmp_path, monkeypatch):
    import torch.serialization as ser
    path = tmp_path / "cuda.pth"
    monkeypatch.setattr(ser, "location_tag", lambda storage: "cuda:0")  # tag the storages as saved on a GPU
    torch.save({"model": {"w": torch.arange(3.0)}}, path)
    monkeypatch.undo()
    got = read_checkpoint(str(path))["model"]["w"]
    assert got.device.type == "cpu" and torch.equal(got, torch.arange(3.0))


def test_what_we_save_loads_in_the_official_way_with_the_same_keys_shapes_and_dtypes(tmp_path):
    """save_unlearn_checkpoint's 'model' -> the official loader (torch.load then strict load_state_dict)."""
    from unlearn_fast.train.checkpoint import save_unlearn_checkpoint
    src = _micro_mage(1)
    opt = torch.optim.AdamW([p for p in src.parameters() if p.requires_grad])
    path = save_unlearn_checkpoint(str(tmp_path), 0, src, opt, torch.amp.GradScaler("cpu", enabled=False),
                                   argparse.Namespace(model="mage_micro"), [], safetensors=False)
    saved = torch.load(path, map_location="cpu", weights_only=True)["model"]
    assert [(k, tuple(v.shape), v.dtype) for k, v in saved.items()] == \
        [(k, tuple(v.shape), v.dtype) for k, v in src.state_dict().items()]
    fresh = _micro_mage(2)
    fresh.load_state_dict(saved, strict=True)
    assert _same_weights(fresh, src)


def test_a_whole_model_as_safetensors_loads_like_the_pth(tmp_path):
    from safetensors.torch import save_file
    src = _micro_mage(1)
    path = tmp_path / "mage_micro.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    for dst in (_micro_mage(2), _meta("mage_micro")):
        load_mage_checkpoint(dst, str(path))
        assert _same_weights(dst, src)


def test_the_ddp_prefix_still_explains_itself():
    model = _micro_mage()
    with pytest.raises(ValueError, match=r"start with 'module\.' \(saved from a DDP-wrapped model\)"):
        load_state_dict_strict(model, {"module." + k: v for k, v in model.state_dict().items()}, "ddp file")


def test_a_checkpoint_from_a_newer_torch_says_so(tmp_path):
    """A zip checkpoint whose format version is beyond this torch's: named as written by a newer torch, not as
    truncated or empty."""
    import zipfile
    src, dst = tmp_path / "now.pth", tmp_path / "newer.pth"
    torch.save({"model": {"w": torch.ones(2)}}, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            zout.writestr(item, b"99\n" if item.filename.endswith("/version") else data)
    with pytest.raises(CheckpointError, match="written by a newer torch than this one") as err:
        read_checkpoint(str(dst))
    assert "truncated" not in str(err.value)
