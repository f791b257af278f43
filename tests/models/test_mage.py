"""MAGE ViT: official key layout, the unlearning encoder path vs a plain restatement of the reference,
decoder / MLM head, baseline loss terms, checkpoint loading."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from unlearn_fast.models import TaskDraw, create_model
from unlearn_fast.models.mage import load_mage_checkpoint

from tests.helpers import read_reference_listing



read_listing = read_reference_listing


def listing_of(module):
    return [(k, tuple(t.shape), str(t.dtype).replace("torch.", "")) for k, t in module.state_dict().items()]


@pytest.fixture(scope="module")
def meta_base():
    with torch.device("meta"):
        return create_model("mage_vit_base_patch16")


@pytest.fixture()
def micro():
    torch.manual_seed(0)
    m = create_model("mage_micro")
    for n, p in m.named_parameters():  # non-trivial LN / biases / mlm bias so the restatements are tested
        if not n.startswith("vqgan.") and (n.endswith("bias") or "norm" in n or "LayerNorm" in n or "ln." in n):
            with torch.no_grad():
                p.add_(0.1 * torch.randn_like(p))
    return m


def task_for(model, n, seed=0):
    return model.sample_task(torch.empty(n, 3, 1, 1), torch.Generator().manual_seed(seed))


# ---- a plain restatement of the reference forward (boolean indexing, explicit attention) ------------------
def ref_attention(attn_mod, x):
    n, t, d = x.shape
    h = attn_mod.num_heads
    qkv = F.linear(x, attn_mod.qkv.weight, attn_mod.qkv.bias).reshape(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
    a = (qkv[0] @ qkv[1].transpose(-2, -1)) * (d // h) ** -0.5
    a = (a - a.max(-1, keepdim=True)[0]).softmax(-1)
    return F.linear((a @ qkv[2]).transpose(1, 2).reshape(n, t, d), attn_mod.proj.weight, attn_mod.proj.bias)


def ref_blocks(blocks, x):
    for b in blocks:
        x = x + ref_attention(b.attn, F.layer_norm(x, x.shape[-1:], b.norm1.weight, b.norm1.bias, 1e-6))
        y = F.layer_norm(x, x.shape[-1:], b.norm2.weight, b.norm2.bias, 1e-6)
        x = x + F.linear(F.gelu(F.linear(y, b.mlp.fc1.weight, b.mlp.fc1.bias)), b.mlp.fc2.weight, b.mlp.fc2.bias)
    return x


def ref_encoder(m, ids, drop, all_):
    ids = ids.clone()
    ids[all_.nonzero(as_tuple=True)] = m.mask_token_label
    ids = torch.cat([torch.full((ids.shape[0], 1), m.fake_class_label), ids], 1)
    te = m.token_emb
    x = te.word_embeddings.weight[ids] + te.position_embeddings.weight[: ids.shape[1]]
    x = F.layer_norm(x, x.shape[-1:], te.LayerNorm.weight, te.LayerNorm.bias, 1e-6)
    keep = 1 - torch.cat([torch.zeros(ids.shape[0], 1), drop.float()], 1)
    x = x[keep.nonzero(as_tuple=True)].reshape(ids.shape[0], -1, x.shape[-1])
    x = ref_blocks(m.blocks, x)
    return F.layer_norm(x, x.shape[-1:], m.norm.weight, m.norm.bias, 1e-6)


def ref_decoder(m, latent, drop, all_):
    n = latent.shape[0]
    drop_f = torch.cat([torch.zeros(n, 1), drop.float()], 1)
    all_f = torch.cat([torch.zeros(n, 1), all_.float()], 1)
    x = F.linear(latent, m.decoder_embed.weight, m.decoder_embed.bias)
    pad = x[:, 0:1].repeat(1, all_f.shape[1], 1)
    full = pad.clone()
    full[(1 - drop_f).nonzero(as_tuple=True)] = x.reshape(-1, x.shape[-1])
    full = torch.where(all_f.unsqueeze(-1).bool(), pad, full) + m.decoder_pos_embed_learned
    x = ref_blocks(m.decoder_blocks, full)
    x = F.layer_norm(x, x.shape[-1:], m.decoder_norm.weight, m.decoder_norm.bias, 1e-6)
    h = F.layer_norm(F.gelu(F.linear(x, m.mlm_layer.fc.weight, m.mlm_layer.fc.bias)), x.shape[-1:],
                     m.mlm_layer.ln.weight, m.mlm_layer.ln.bias, 1e-5)
    return h @ m.token_emb.word_embeddings.weight.t() + m.mlm_layer.bias


# ---- key layout and sizes ---------------------------------------------------------------------------------
def test_base_state_dict_equals_official_listing(meta_base):
    assert listing_of(meta_base) == read_listing("mage_vit_base_patch16.txt")


def test_vqgan_part_equals_vqgan_listing(meta_base):
    assert listing_of(meta_base.vqgan) == read_listing("vqgan_jax_strongaug.txt")


def test_encoder_parameters_are_86_81M_and_frozen_flags(meta_base):
    names = set(meta_base.encoder_parameter_names())
    total = sum(p.numel() for n, p in meta_base.named_parameters() if n in names)
    assert total == 86_810_112  # REFERENCE.md §1.1: 86.81 M
    assert all(n.startswith(("token_emb.", "blocks.", "norm.")) for n in names)
    assert len(names) == 4 + 12 * 12 + 2
    frozen = {n for n, p in meta_base.named_parameters() if not p.requires_grad}
    assert frozen == {"pos_embed", "decoder_pos_embed"} | {n for n, _ in meta_base.named_parameters()
                                                          if n.startswith("vqgan.")}
    assert meta_base.encoder_final_norm() is meta_base.norm


def test_ids_layout():
    with torch.device("meta"):
        base = create_model("mage_vit_base_patch16")
        large = create_model("mage_vit_large_patch16")
    assert (base.vocab_size, base.fake_class_label, base.mask_token_label, base.codebook_size) == (2025, 1100, 2024, 1024)
    assert base.token_emb.position_ids.dtype == torch.long and tuple(base.token_emb.position_ids.shape) == (1, 257)
    assert len(large.blocks) == 24 and large.norm.weight.shape[0] == 1024 and len(large.decoder_blocks) == 8
    assert large.mlm_layer.fc.weight.shape == (1024, 1024) and large.blocks[0].attn.num_heads == 16
    m = create_model("mage_micro")
    assert (m.vocab_size, m.fake_class_label, m.mask_token_label, m.num_tokens) == (165, 140, 164, 64)
    with pytest.raises(ValueError, match="fake_class_index"):
        create_model("mage_micro", num_classes=10)


def test_generic_constructor_takes_reference_kwargs():
    m = create_model("mage", img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=48,
                     decoder_depth=1, decoder_num_heads=3, mlp_ratio=2.0, mask_ratio_min=0.25, mask_ratio_max=0.9,
                     mask_ratio_mu=0.5, mask_ratio_std=0.3, ddconfig=dict(create_model("mage_micro").config["ddconfig"]),
                     n_embed=50, embed_dim_vq=32, num_classes=20, fake_class_index=3)
    assert m.vocab_size == 71 and m.fake_class_label == 53 and m.mask_token_label == 70
    assert m.sample_task(torch.empty(2, 3, 32, 32))["num_dropped"] == 16
    with pytest.raises(ValueError, match="must match"):
        create_model("mage_micro", img_size=64, patch_size=8)


# ---- encoder -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3])
def test_encoder_matches_reference_restatement(micro, n):
    micro.eval()
    ids = torch.randint(0, micro.codebook_size, (n, 64))
    task = task_for(micro, n, seed=n)
    got = micro.forward_encoder_task(ids, task)
    want = ref_encoder(micro, ids, task["token_drop_mask"], task["token_all_mask"])
    assert tuple(got.shape) == (n, 1 + 64 - 32, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_prenorm_plus_norm_is_normal_output(micro):
    micro.eval()
    ids = torch.randint(0, 64, (2, 64))
    task = task_for(micro, 2)
    pre = micro.forward_encoder_task(ids, task, prenorm=True)
    torch.testing.assert_close(micro.norm(pre), micro.forward_encoder_task(ids, task), rtol=0, atol=0)


def test_eval_has_no_dropout_train_has(micro):
    ids = torch.randint(0, 64, (2, 64))
    task = task_for(micro, 2)
    micro.eval()
    assert torch.equal(micro.forward_encoder_task(ids, task), micro.forward_encoder_task(ids, task))
    micro.train()
    torch.manual_seed(0)
    a = micro.forward_encoder_task(ids, task)
    b = micro.forward_encoder_task(ids, task)
    assert not torch.allclose(a, b)
    torch.manual_seed(0)
    assert torch.equal(a, micro.forward_encoder_task(ids, task))  # the dropout follows the global seed


def test_forward_encoder_reference_api(micro):
    micro.eval()
    x = torch.rand(2, 3, 32, 32)
    task = task_for(micro, 2)
    latent, gt, drop, all_ = micro.forward_encoder(x, task["token_drop_mask"].float(), task["token_all_mask"])[:4]
    torch.testing.assert_close(latent, micro.forward_encoder_task(micro.prepare_inputs(x), task), rtol=0, atol=0)
    assert torch.equal(gt, micro.prepare_inputs(x)) and gt.dtype == torch.long
    assert tuple(drop.shape) == (2, 65) and drop.dtype == torch.float32 and (drop[:, 0] == 0).all()
    assert torch.equal(all_[:, 1:].bool(), task["token_all_mask"])
    latent2 = micro(x, train_encoder=True)[0]  # masks sampled by the model itself
    assert tuple(latent2.shape) == (2, 33, 64)


def test_inputs_are_frozen_tokenizer_ids(micro):
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    ids = micro.prepare_inputs(x)
    assert ids.dtype == torch.long and tuple(ids.shape) == (2, 64) and not ids.requires_grad
    assert torch.equal(ids, micro.vqgan.tokenize(x.detach()))
    with pytest.raises(ValueError, match="expected VQ ids"):
        micro.forward_encoder_task(ids.float(), task_for(micro, 2))
    with pytest.raises(ValueError, match="do not match"):
        micro.forward_encoder_task(ids, task_for(micro, 3))


def test_masks_without_count_are_counted_and_checked(micro):
    micro.eval()
    ids = torch.randint(0, 64, (2, 64))
    task = task_for(micro, 2)
    bare = TaskDraw(token_drop_mask=task["token_drop_mask"], token_all_mask=task["token_all_mask"])
    torch.testing.assert_close(micro.forward_encoder_task(ids, bare), micro.forward_encoder_task(ids, task))
    uneven = task["token_drop_mask"].clone()
    uneven[0, uneven[0].nonzero()[0]] = False
    with pytest.raises(ValueError, match="same number"):
        micro.forward_encoder_task(ids, TaskDraw(token_drop_mask=uneven, token_all_mask=task["token_all_mask"]))


def test_gradients_reach_only_encoder_parameters(micro):
    micro.train()
    ids = micro.prepare_inputs(torch.rand(2, 3, 32, 32))
    micro.forward_encoder_task(ids, task_for(micro, 2)).square().mean().backward()
    with_grad = {n for n, p in micro.named_parameters() if p.grad is not None}
    assert with_grad == set(micro.encoder_parameter_names())


def test_attention_scores_in_fp32_under_autocast(micro):
    attn = micro.blocks[0].attn
    x = torch.randn(2, 33, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attn(x)
        n, t, d = x.shape
        qkv = attn.qkv(x).reshape(n, t, 3, 4, 16).permute(2, 0, 3, 1, 4)
        with torch.autocast("cpu", enabled=False):  # the reference's scores: autocast off, fp32
            s = (qkv[0].float() @ qkv[1].float().transpose(-2, -1)) * 16 ** -0.5
            a = torch.softmax(s - s.amax(-1, keepdim=True), -1)
        want = attn.proj(((a.bfloat16() @ qkv[2]).transpose(1, 2).reshape(n, t, d)))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)


# ---- decoder / MLM head / baseline terms ------------------------------------------------------------------
def test_forward_outputs_match_reference_decoder(micro):
    micro.eval()
    ids = torch.randint(0, 64, (3, 64))
    task = task_for(micro, 3, seed=7)
    logits = micro.forward_outputs(ids, task)
    latent = ref_encoder(micro, ids, task["token_drop_mask"], task["token_all_mask"])
    want = ref_decoder(micro, latent, task["token_drop_mask"], task["token_all_mask"])
    assert tuple(logits.shape) == (3, 65, 165)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)


def test_mlm_head_output_matrix_is_the_detached_word_table(micro):
    micro.eval()
    ids = torch.randint(0, 64, (2, 64))
    task = task_for(micro, 2)
    latent = micro.forward_encoder_task(ids, task).detach()
    micro.forward_decoder(latent, task).sum().backward()
    # the head multiplies by the word table but sends it no gradient (the reference's .data.detach())
    assert micro.token_emb.word_embeddings.weight.grad is None
    assert micro.mlm_layer.fc.weight.grad.abs().sum() > 0 and micro.mlm_layer.bias.grad is not None
    with torch.no_grad():
        before = micro.forward_decoder(latent, task)
        micro.token_emb.word_embeddings.weight[:64].mul_(2.0)  # ...but the logits follow the table
        after = micro.forward_decoder(latent, task)
    torch.testing.assert_close(after[..., :64] - micro.mlm_layer.bias[..., :64],
                               2 * (before[..., :64] - micro.mlm_layer.bias[..., :64]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after[..., 64:], before[..., 64:], rtol=0, atol=0)


def test_task_loss_terms_is_label_smoothed_ce_on_masked(micro):
    micro.eval()
    ids = torch.randint(0, 64, (2, 64))
    task = task_for(micro, 2, seed=3)
    ce, w = micro.task_loss_terms(ids, task)
    logp = micro.forward_outputs(ids, task)[:, 1:, :64].log_softmax(-1)
    want = 0.9 * -logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1) + 0.1 * -logp.mean(-1)  # timm's formula
    torch.testing.assert_close(ce, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(w, task["token_all_mask"].float())
    assert torch.equal(micro.task_target(ids, task), ids)
    other = torch.randint(0, 64, (2, 64))
    ce2, _ = micro.task_loss_terms(ids, task, target=other)
    assert not torch.allclose(ce2, ce)
    loss, logits, mask = micro(torch.rand(2, 3, 32, 32))
    assert loss.dim() == 0 and tuple(logits.shape) == (2, 65, 165) and tuple(mask.shape) == (2, 65)


def test_noisy_task_target(micro):
    t = torch.tensor([[0, 5, 63, 20], [7, 7, 30, 1]])
    a = micro.noisy_task_target(t, torch.Generator().manual_seed(0))
    b = micro.noisy_task_target(t, torch.Generator().manual_seed(0))
    z = torch.randn(t.shape, generator=torch.Generator().manual_seed(0))
    want = torch.round((z * t.float().std() + t.float().mean()).clamp(0, 63)).long()
    assert a.dtype == torch.long and torch.equal(a, b) and torch.equal(a, want)
    big = micro.noisy_task_target(torch.randint(0, 64, (8, 64)), torch.Generator().manual_seed(1))
    assert int(big.min()) >= 0 and int(big.max()) <= 63


# ---- checkpoints --------------------------------------------------------------------------------------------
def test_micro_save_load_round_trip_with_namespace_args(tmp_path, micro):
    micro.eval()
    path = str(tmp_path / "checkpoint-0.pth")
    torch.save({"model": micro.state_dict(), "epoch": 0, "args": argparse.Namespace(lr=1e-4, model="mage_micro",
                                                                                  mask_ratio_mu=0.55, x=[1, 2])}, path)
    torch.manual_seed(99)
    other = create_model("mage_micro").eval()
    load_mage_checkpoint(other, path)
    x = torch.rand(2, 3, 32, 32)
    task = task_for(micro, 2)
    ids = micro.prepare_inputs(x)
    assert torch.equal(other.prepare_inputs(x), ids)
    assert torch.equal(other.forward_outputs(ids, task), micro.forward_outputs(ids, task))
    assert all(p.requires_grad == q.requires_grad for p, q in zip(micro.parameters(), other.parameters()))


def test_fake_official_checkpoint_loads_strictly(tmp_path):
    rows = read_listing("mage_vit_base_patch16.txt")
    state = {k: torch.zeros((), dtype=getattr(torch, d)).expand(s) for k, s, d in rows}  # tiny file
    path = str(tmp_path / "mage-vitb-1600.pth")
    torch.save({"model": state, "optimizer": {}, "epoch": 1599, "scaler": {},
                "args": argparse.Namespace(model="mage_vit_base_patch16", batch_size=64)}, path)
    with torch.device("meta"):
        m = create_model("mage_vit_base_patch16")
    load_mage_checkpoint(m, path)
    assert not any(t.is_meta for t in m.state_dict().values())
    assert listing_of(m) == rows
    assert not m.vqgan.quantize.embedding.weight.requires_grad and m.blocks[0].attn.qkv.weight.requires_grad

    del state["token_emb.position_ids"]
    state["decoder_pred.weight"] = torch.zeros(3)
    state["module.extra"] = torch.zeros(1)
    torch.save({"model": state}, path)
    with torch.device("meta"):
        m = create_model("mage_vit_base_patch16")
    with pytest.raises(ValueError) as e:
        load_mage_checkpoint(m, path)
    msg = str(e.value)
    assert "token_emb.position_ids" in msg and "module.extra" in msg and "decoder_pred.weight" in msg


# ---- CUDA only: no host syncs in the training path, the fp16 student path ------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_training_path_never_syncs_the_host():
    torch.manual_seed(0)
    m = create_model("mage_micro").cuda().train()
    x = torch.rand(4, 3, 32, 32, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = torch.tensor([0, 2], device="cuda")  # a host->device copy: made before the check starts
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.float16):
            ids = m.prepare_inputs(x)
            task = m.sample_task(x, gen)
            latent = m.forward_encoder_task(ids, task)
            pre = m.forward_encoder_task(ids.index_select(0, rows), task.select(rows), prenorm=True)
            ce, w = m.task_loss_terms(ids, task)
            noisy = m.noisy_task_target(ids, gen)
        (latent.float().square().mean() + (ce * w).sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert latent.dtype == torch.float32 and tuple(latent.shape) == (4, 33, 64) and tuple(pre.shape) == (2, 33, 64)
    assert (task["token_drop_mask"].sum(1) == 32).all() and noisy.dtype == torch.long
    rate = float(task["mask_rate"])
    assert (task["token_all_mask"].sum(1) == math.ceil(64 * rate)).all()


@cuda
def test_cuda_fp16_student_matches_fp32_teacher_up_to_precision():
    torch.manual_seed(0)
    m = create_model("mage_micro").cuda().eval()
    x = torch.rand(3, 3, 32, 32, device="cuda")
    ids = m.prepare_inputs(x)
    task = m.sample_task(x, torch.Generator(device="cuda").manual_seed(1))
    ref = m.forward_encoder_task(ids, task)
    with torch.autocast("cuda", dtype=torch.float16):
        ids16 = m.prepare_inputs(x)
        got = m.forward_encoder_task(ids, task)
    assert ids16.dtype == torch.long and float((ids16 == ids).float().mean()) > 0.5
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)
    cpu = create_model("mage_micro").eval()
    cpu.load_state_dict({k: v.cpu() for k, v in m.state_dict().items()})
    torch.testing.assert_close(cpu.forward_encoder_task(ids.cpu(), task.to("cpu")), ref.cpu(), rtol=1e-4, atol=1e-4)
