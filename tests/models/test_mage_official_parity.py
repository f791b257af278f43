"""MAGE + VQGAN against the official model, given official-layout weights.

The official forward (i2i_mage ``models_mage.py``, MAGE's JAX-port tokenizer ``taming/...``; REFERENCE.md §1.1-§1.2)
is restated here in plain PyTorch over a state dict with the official key names, and compared with our modules
after a strict load of that state dict. The weights are random with the official shapes
(reference-keys/mage_vit_base_patch16.txt), so the official geometry is exercised: 5-level tokenizer with the
nin_shortcut at 128->256 and 256->512, 12 encoder heads of 64, 16 decoder heads of 48, vocab 2025, ids 1100/2024.
Also pinned: the reference's ``forward`` tuples (its engines unpack them), and clear errors for bad inputs.
"""

import pytest
import torch
import torch.nn.functional as F

from unlearn_fast.models import create_model
from unlearn_fast.models.state_dict_io import load_state_dict_strict
from unlearn_fast.models.vqgan import VQGAN, ResnetBlock, swish

from tests.helpers import read_reference_listing



read_listing = read_reference_listing


# ---- the official forward, restated over an official-keyed state dict ---------------------------------------
def ref_swish(x):
    return x * torch.sigmoid(x)  # the tokenizer's nonlinearity, as written there


def ref_group_norm(sd, p, x):
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def ref_resblock(sd, p, x):
    h = F.conv2d(ref_swish(ref_group_norm(sd, p + ".norm1", x)), sd[p + ".conv1.weight"], padding=1)
    h = F.conv2d(ref_swish(ref_group_norm(sd, p + ".norm2", h)), sd[p + ".conv2.weight"], padding=1)
    if p + ".nin_shortcut.weight" in sd:  # width change: the 1x1 maps the block's output h, not x
        return F.conv2d(h, sd[p + ".nin_shortcut.weight"]) + h
    return x + h


def ref_vq_encoder(sd, x, levels=5, blocks_per_level=2):
    e = "vqgan.encoder."
    h = F.conv2d(x, sd[e + "conv_in.weight"], padding=1)
    for i in range(levels):
        for j in range(blocks_per_level):
            h = ref_resblock(sd, f"{e}down.{i}.block.{j}", h)
        if i != levels - 1:
            h = F.avg_pool2d(h, kernel_size=2, stride=2)  # resamp_with_conv=False: no padded strided conv
    h = ref_resblock(sd, e + "mid.block_2", ref_resblock(sd, e + "mid.block_1", h))
    return F.conv2d(ref_swish(ref_group_norm(sd, e + "norm_out", h)), sd[e + "conv_out.weight"], sd[e + "conv_out.bias"])


def ref_vq_ids(sd, z):
    n, c = z.shape[:2]
    zf = z.permute(0, 2, 3, 1).reshape(-1, c)
    emb = sd["vqgan.quantize.embedding.weight"]
    d = zf.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2 * torch.einsum("bd,dn->bn", zf, emb.t())
    return d.argmin(1).reshape(n, -1)


def ref_layer_norm(sd, p, x, eps):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def ref_blocks(sd, prefix, x, depth, heads):
    for i in range(depth):
        p = f"{prefix}.{i}."
        n, t, d = x.shape
        y = ref_layer_norm(sd, p + "norm1", x, 1e-6)
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(n, t, 3, heads, d // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = (q.float() @ k.float().transpose(-2, -1)) * (d // heads) ** -0.5
        a = (a - a.max(-1, keepdim=True)[0]).softmax(-1)
        x = x + F.linear((a @ v).transpose(1, 2).reshape(n, t, d), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        y = ref_layer_norm(sd, p + "norm2", x, 1e-6)
        y = F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        x = x + F.linear(y, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return x


def ref_mage_encoder(sd, ids, drop_raw, all_raw, depth=12, heads=12, cls_id=1100, mask_id=2024):
    """Returns (latent, token_drop_mask, token_all_mask, token_indices) as the official forward_encoder."""
    n = ids.shape[0]
    ids = ids.clone()
    ids[all_raw.nonzero(as_tuple=True)] = mask_id
    ids = torch.cat([torch.zeros(n, 1), ids], 1)  # float, as there; the class column is set next
    ids[:, 0] = cls_id
    ids = ids.long()
    drop = torch.cat([torch.zeros(n, 1), drop_raw.float()], 1)
    all_ = torch.cat([torch.zeros(n, 1), all_raw.float()], 1)
    pos = sd["token_emb.position_ids"][:, : ids.shape[1]]
    x = sd["token_emb.word_embeddings.weight"][ids] + sd["token_emb.position_embeddings.weight"][pos]
    x = ref_layer_norm(sd, "token_emb.LayerNorm", x, 1e-6)
    x = x[(1 - drop).nonzero(as_tuple=True)].reshape(n, -1, x.shape[-1])
    x = ref_blocks(sd, "blocks", x, depth, heads)
    return ref_layer_norm(sd, "norm", x, 1e-6), drop, all_, ids


def ref_mage_decoder(sd, latent, drop, all_, depth=8, heads=16):
    x = F.linear(latent, sd["decoder_embed.weight"], sd["decoder_embed.bias"])
    pad = x[:, 0:1].repeat(1, all_.shape[1], 1)  # pad_with_cls_token
    full = pad.clone()
    full[(1 - drop).nonzero(as_tuple=True)] = x.reshape(-1, x.shape[-1])
    full = torch.where(all_.unsqueeze(-1).bool(), pad, full) + sd["decoder_pos_embed_learned"]
    x = ref_layer_norm(sd, "decoder_norm", ref_blocks(sd, "decoder_blocks", full, depth, heads), 1e-6)
    h = F.gelu(F.linear(x, sd["mlm_layer.fc.weight"], sd["mlm_layer.fc.bias"]))
    h = ref_layer_norm(sd, "mlm_layer.ln", h, 1e-5)  # torch's default eps there
    return h @ sd["token_emb.word_embeddings.weight"].t() + sd["mlm_layer.bias"]


# ---- official-shape random weights ---------------------------------------------------------------------------
def official_random_state(rows, seed=0):
    """Random values of the listed shapes: weights ~ 1/sqrt(fan_in), norms ~ 1, biases and embeddings small.
    The tokenizer's decoder and the unused patch/pixel heads are stride-0 zeros (cheap; still loaded strictly)."""
    g = torch.Generator().manual_seed(seed)
    skip = ("vqgan.decoder.", "patch_embed.", "decoder_pred.", "pos_embed", "decoder_pos_embed", "cls_token",
            "mask_token")
    state = {}
    for key, shape, dtype in rows:
        parts = key.split(".")
        if dtype == "int64":
            state[key] = torch.arange(shape[-1]).reshape(shape)  # position_ids
        elif key.startswith(skip) and not key.startswith("decoder_pos_embed_learned"):
            state[key] = torch.zeros((), dtype=getattr(torch, dtype)).expand(shape)
        elif parts[-1] == "weight" and len(parts) > 1 and ("norm" in parts[-2].lower() or parts[-2] == "ln"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif parts[-1] == "bias":
            state[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) >= 2 and "embedding" not in key and key != "decoder_pos_embed_learned":
            fan_in = torch.Size(shape[1:]).numel()
            state[key] = torch.randn(shape, generator=g) / fan_in ** 0.5
        else:  # word / position embeddings, the codebook
            state[key] = torch.randn(shape, generator=g) * (0.5 if "quantize" in key else 0.02)
    return state


@pytest.fixture(scope="module")
def official():
    rows = read_listing("mage_vit_base_patch16.txt")
    state = official_random_state(rows)
    with torch.device("meta"):
        model = create_model("mage_vit_base_patch16")
    load_state_dict_strict(model, state, "official-layout random state")  # strict: every key and shape
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == [(k, s) for k, s, _ in rows]
    return model.eval(), state


def test_official_tokenizer_matches_restatement(official):
    model, sd = official
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))  # fully convolutional: 48² -> 3x3
    with torch.no_grad():
        z = model.vqgan.encoder(x)
        z_ref = ref_vq_encoder(sd, x)
        ids = model.vqgan.quantize.nearest_ids(z)
    assert tuple(z.shape) == (2, 256, 3, 3) and float(z.std()) > 0.1
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, ref_vq_ids(sd, z_ref))  # also row-major over the latent grid
    assert ids.unique().numel() > 4  # the random codebook is not degenerate


def test_official_encoder_decoder_and_head_match_restatement(official):
    model, sd = official
    n = 2
    ids = torch.randint(0, 1024, (n, 256), generator=torch.Generator().manual_seed(2))
    task = model.sample_task(torch.empty(n, 3, 1, 1), torch.Generator().manual_seed(3))
    with torch.no_grad():
        latent = model.forward_encoder_task(ids, task)
        want, drop, all_, _ = ref_mage_encoder(sd, ids, task["token_drop_mask"], task["token_all_mask"])
        assert tuple(latent.shape) == (n, 129, 768)  # 1 class token + 256 - 128 dropped
        torch.testing.assert_close(latent, want, rtol=1e-5, atol=1e-5)
        logits = model.forward_decoder(latent[:1], task.select(torch.tensor([0])))
        want_logits = ref_mage_decoder(sd, want[:1], drop[:1], all_[:1])
    assert tuple(logits.shape) == (1, 257, 2025)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)


def test_official_module_constants(official):
    model, _ = official
    assert (model.vocab_size, model.fake_class_label, model.mask_token_label) == (2025, 1100, 2024)
    assert model.token_emb.LayerNorm.eps == 1e-6 and model.token_emb.dropout.p == 0.1
    assert model.token_emb.position_embeddings.num_embeddings == 257
    for blk, heads in [(b, 12) for b in model.blocks] + [(b, 16) for b in model.decoder_blocks]:
        assert blk.norm1.eps == blk.norm2.eps == 1e-6 and blk.attn.qkv.bias is not None
        assert blk.attn.num_heads == heads and blk.attn.scale == (768 // heads) ** -0.5
        assert blk.mlp.act.approximate == "none"  # exact erf GELU (nn.GELU), not tanh
    assert model.norm.eps == model.decoder_norm.eps == 1e-6 and model.mlm_layer.ln.eps == 1e-5
    assert model.mlm_layer.gelu.approximate == "none"
    gns = [m for m in model.vqgan.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert gns and all(m.num_groups == 32 and m.eps == 1e-6 for m in gns)


# ---- the tokenizer's swish is x * sigmoid(x), rounding included ----------------------------------------------
def test_swish_rounds_as_the_reference():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4
    assert torch.equal(swish(x), x * torch.sigmoid(x))  # bitwise; F.silu differs by an ulp in ~25% here
    xg = x.clone().requires_grad_(True)
    y = swish(xg)
    y.sum().backward()
    assert torch.equal(y.detach(), x * torch.sigmoid(x))
    s = torch.sigmoid(x)
    torch.testing.assert_close(xg.grad, s + x * s * (1 - s), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cin,cout", [(32, 32), (32, 64)])
def test_resblock_is_bitwise_the_reference(cin, cout):
    torch.manual_seed(0)
    blk = ResnetBlock(cin, cout, groups=32).eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 1.0))
    sd = {"b." + k: v for k, v in blk.state_dict().items()}
    x = torch.randn(1, cin, 9, 7)  # odd sizes
    with torch.no_grad():
        assert torch.equal(blk(x), ref_resblock(sd, "b", x))  # same ops, same rounding: exact


# ---- the reference's forward surface (engine_unlearn / engine_baseline unpack these) --------------------------
@pytest.fixture()
def micro():
    torch.manual_seed(0)
    return create_model("mage_micro").eval()


def test_train_encoder_returns_the_reference_seven_tuple(micro):
    x = torch.rand(3, 3, 32, 32)
    torch.manual_seed(5)
    latent, gt, drop, all_, token_indices, drop_raw, all_raw = micro(x, train_encoder=True)
    assert tuple(latent.shape) == (3, 33, 64) and gt.dtype == torch.long and torch.equal(gt, micro.prepare_inputs(x))
    assert drop_raw.dtype == all_raw.dtype == torch.float32 and tuple(drop_raw.shape) == (3, 64)
    assert (drop_raw.sum(1) == 32).all() and (drop_raw <= all_raw).all()  # drop ⊆ all
    assert torch.equal(drop, F.pad(drop_raw, (1, 0))) and torch.equal(all_, F.pad(all_raw, (1, 0)))
    ref_latent, _, _, ref_indices = ref_mage_encoder(micro.state_dict(), gt, drop_raw, all_raw, depth=2, heads=4,
                                                     cls_id=140, mask_id=164)
    assert token_indices.dtype == torch.long and torch.equal(token_indices, ref_indices)
    torch.testing.assert_close(latent, ref_latent, rtol=1e-5, atol=2e-5)
    # the teacher call of engine_unlearn: the student's raw masks in, the same positions dropped and masked
    guide, *_, d2, a2 = micro(x, train_encoder=True, token_drop_mask_raw=drop_raw, token_all_mask_raw=all_raw)
    assert d2 is drop_raw and a2 is all_raw
    torch.testing.assert_close(guide, latent, rtol=0, atol=0)
    with pytest.raises(ValueError, match="both"):
        micro(x, train_encoder=True, token_drop_mask_raw=drop_raw)


def test_return_logits_and_labelled_baseline_losses(micro):
    x = torch.rand(4, 3, 32, 32)
    task = micro.sample_task(x, torch.Generator().manual_seed(1))
    d, a = task["token_drop_mask"].float(), task["token_all_mask"].float()
    logits, d_out, a_out = micro(x, return_logits=True, token_drop_mask_raw=d, token_all_mask_raw=a)
    ids = micro.prepare_inputs(x)
    torch.testing.assert_close(logits, micro.forward_outputs(ids, task), rtol=0, atol=0)
    assert d_out is d and a_out is a

    labels = torch.tensor([100.0, -100.0, 100.0, -100.0])  # the datasets' retain / forget labels
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None]
    logp = logits[:, 1:, :64].log_softmax(-1)

    def ce(target):  # timm's LabelSmoothingCrossEntropy(0.1)
        return 0.9 * -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) + 0.1 * -logp.mean(-1)
    loss, _, mask, retain, forget = micro(x, labels=labels, forget_alpha=0.3, token_drop_mask_raw=d,
                                          token_all_mask_raw=a)
    want_r = (ce(ids) * a * (1 + sign) * 0.5).sum() / a.sum()
    want_f = (ce(ids) * a * (1 - sign) * 0.5).sum() / a.sum()
    torch.testing.assert_close(retain, want_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(forget, want_f, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, want_r - 0.3 * want_f, rtol=1e-5, atol=1e-6)  # MAX LOSS: retain - a*forget
    assert torch.equal(mask, F.pad(a, (1, 0)))

    torch.manual_seed(11)
    loss_n, _, _, retain_n, forget_n = micro(x, labels=labels, forget_alpha=0.3, use_noise=True,
                                             token_drop_mask_raw=d, token_all_mask_raw=a)
    torch.manual_seed(11)
    z = torch.randn(ids.shape)  # NOISY LABEL: round(clamp(randn * std(ids) + mean(ids), 0, 1023 here 63))
    noisy = torch.round((z * ids.float().std() + ids.float().mean()).clamp(0, 63)).long()
    want_fn = (ce(noisy) * a * (1 - sign) * 0.5).sum() / a.sum()
    torch.testing.assert_close(retain_n, want_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(forget_n, want_fn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_n, want_r + 0.3 * want_fn, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ratio"):
        micro(x, ratio=0.5)


# ---- bad inputs: one clear message ---------------------------------------------------------------------------
def test_bad_images_and_ids_explain(micro):
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(TypeError, match="floating-point"):
        micro.prepare_inputs((x * 255).to(torch.uint8))
    assert torch.equal(micro.prepare_inputs(x.double()), micro.prepare_inputs(x))  # cast to the weights' dtype
    task = micro.sample_task(x, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"\[0, 165\)"):
        micro.forward_encoder_task(torch.full((2, 64), 165), task)
    with pytest.raises(ValueError, match=r"\[0, 165\)"):
        micro.forward_encoder_task(torch.full((2, 64), -1), task)
    micro.forward_encoder_task(torch.full((2, 64), 164), task)  # [MASK] ids are valid (generation feeds them)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        micro.vqgan.decode_ids(torch.full((1, 64), 64))
    with pytest.raises(ValueError, match="expected images"):
        VQGAN(micro.config["ddconfig"], 64, 32).tokenize(torch.rand(1, 3, 16, 16))
