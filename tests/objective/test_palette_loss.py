"""Palette losses: the fused feature loss against the reference's masked copies and a plain restatement;
the baselines' losses against plain restatements of REFERENCE.md §3.3. Tolerances: fp32, rtol 1e-5."""
import pytest
import torch
import torch.nn.functional as F

from unlearn_fast.objective.palette_loss import (palette_max_loss, palette_noisy_label_loss,
                                                 palette_random_encoder_loss, palette_random_encoder_targets,
                                                 palette_retain_label_loss, palette_unlearn_loss,
                                                 palette_unlearn_loss_reference, palette_unlearn_loss_terms,
                                                 palette_unlearn_loss_terms_reference, weighted_mse_loss,
                                                 weighted_mse_loss_reference)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # "extension not built" notice on CPU
TOL = dict(rtol=1e-5, atol=1e-7)
MAP_SHAPES = [(5, 7, 7), (3, 4, 4), (16, 3, 2), (1, 1, 1)]  # odd sizes, a 1x1 map


def _maps(n, seed, shapes=MAP_SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((n,) + s, generator=g) for s in shapes]


def _plain(fs_list, ft_list, is_forget, alpha):
    """Σ_k [Σ_{retain} Σ (fs−ft)² + α Σ_{forget} Σ (fs−ft)²] / numel_k, row by row."""
    total = 0.0
    for fs, ft in zip(fs_list, ft_list):
        for i in range(fs.shape[0]):
            sq = (fs[i].double() - ft[i].double()).pow(2).sum()
            total = total + (alpha if is_forget[i] else 1.0) * sq / fs.numel()
    return total.float()


CASES = [
    (4, [True, False, True, False]),
    (3, [False, False, False]),   # all retain
    (3, [True, True, True]),      # all forget
    (1, [True]),                  # N = 1
    (1, [False]),
    (5, [False, True, True, True, False]),
]


@pytest.mark.parametrize("n,flags", CASES)
@pytest.mark.parametrize("alpha", [0.1, 0.0, 1.7])
def test_fast_equals_reference_forward_and_grad(op_backend, n, flags, alpha):
    is_forget = torch.tensor(flags)
    ft = _maps(n, 1)
    fs_a = [x.clone().requires_grad_(True) for x in _maps(n, 2)]
    fs_b = [x.detach().clone().requires_grad_(True) for x in fs_a]
    fast = palette_unlearn_loss(fs_a, ft, is_forget, alpha)
    ref = palette_unlearn_loss_reference(fs_b, ft, is_forget, alpha)
    torch.testing.assert_close(fast, ref, **TOL)
    torch.testing.assert_close(fast, _plain(fs_a, ft, is_forget, alpha), **TOL)
    fast.backward()
    ref.backward()
    w = torch.tensor([alpha if x else 1.0 for x in flags]).view(-1, 1, 1, 1)
    for a, b, t in zip(fs_a, fs_b, ft):
        torch.testing.assert_close(a.grad, b.grad, **TOL)
        torch.testing.assert_close(a.grad, 2 * (a.detach() - t) * w / a.numel(), **TOL)  # d/dF_s


def test_terms_split_and_default_alpha():
    is_forget = torch.tensor([True, False, False])
    fs, ft = _maps(3, 3), _maps(3, 4)
    out = palette_unlearn_loss_terms(fs, ft, is_forget)
    torch.testing.assert_close(out.retain, _plain(fs, ft, is_forget, 0.0), **TOL)
    torch.testing.assert_close(out.forget, _plain(fs, ft, ~is_forget, 0.0), **TOL)
    torch.testing.assert_close(out.loss, out.retain + 0.1 * out.forget, **TOL)  # forget_alpha defaults to 0.1
    assert float(palette_unlearn_loss(ft, ft, is_forget)) == 0.0


def test_reference_twin_is_the_masked_copy_formula():
    # the reference's own words: mse(F_s·w_r, F_t·w_r) + α·mse(F_s·w_f, F_t·w_f) with w = (1 ± s)/2
    s = torch.tensor([1.0, -1.0, -1.0])
    fs, ft = _maps(3, 5), _maps(3, 6)
    want = 0.0
    for a, b in zip(fs, ft):
        wr, wf = ((1 + s) / 2).view(-1, 1, 1, 1), ((1 - s) / 2).view(-1, 1, 1, 1)
        want = want + F.mse_loss(a * wr, b * wr) + 0.3 * F.mse_loss(a * wf, b * wf)
    torch.testing.assert_close(palette_unlearn_loss_reference(fs, ft, s < 0, 0.3), want, **TOL)


def test_reference_twin_adds_maps_in_the_reference_order():
    """Bit for bit ``Network.forward``: ``loss = 0; loss += retain_k + α·(1 − 2·max_loss)·forget_k`` map by map, each
    term from the masked copies ``t·(labels + 1)·0.5`` / ``t·(1 − labels)·0.5`` (not Σ retain + α·Σ forget, whose
    rounding differs for some of these draws)."""
    labels = torch.tensor([1.0, -1.0, -1.0]).view(-1, 1, 1, 1)
    for seed in range(8):
        fs, ft = _maps(3, 2 * seed + 5), _maps(3, 2 * seed + 6)
        want = 0
        for a, b in zip(fs, ft):
            r = F.mse_loss(a * (labels + 1.0) * 0.5, b * (labels + 1.0) * 0.5)
            f = (1 - 2.0 * 0) * F.mse_loss(a * (1.0 - labels) * 0.5, b * (1.0 - labels) * 0.5)
            want += r + 0.3 * f
        got = palette_unlearn_loss_terms_reference(fs, ft, labels.view(-1) < 0, 0.3)
        assert torch.equal(got.loss, want), seed
        torch.testing.assert_close(got.loss, got.retain + 0.3 * got.forget, **TOL)


def test_weighted_mse_on_2d_and_1d(op_backend):
    is_forget = torch.tensor([False, True, True, False, True])
    a, b = torch.randn(5, 9), torch.randn(5, 9)
    torch.testing.assert_close(weighted_mse_loss(a, b, is_forget, 0.4).loss,
                               weighted_mse_loss_reference(a, b, is_forget, 0.4).loss, **TOL)
    a1, b1 = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(weighted_mse_loss(a1, b1, is_forget, 0.4).loss,
                               weighted_mse_loss_reference(a1, b1, is_forget, 0.4).loss, **TOL)


def test_bad_inputs():
    fs, ft = _maps(2, 1), _maps(2, 2)
    with pytest.raises(TypeError, match="bool"):
        palette_unlearn_loss(fs, ft, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="is_forget"):
        palette_unlearn_loss(fs, ft, torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="number of student and teacher maps"):
        palette_unlearn_loss(fs, ft[:-1], torch.tensor([True, False]))
    with pytest.raises(ValueError, match="map 1"):
        palette_unlearn_loss(fs, [ft[0], ft[0]] + ft[2:], torch.tensor([True, False]))


# ---- baselines ------------------------------------------------------------------------------------------
def _denoise_inputs(n=4, seed=0, hw=(6, 5)):
    g = torch.Generator().manual_seed(seed)
    eps_hat = torch.randn((n, 3) + hw, generator=g).requires_grad_(True)
    eps = torch.randn((n, 3) + hw, generator=g)
    mask = (torch.rand((n, 1) + hw, generator=g) > 0.4).float()
    return eps_hat, eps, mask


def _masked_mse_terms(eps_hat, eps, mask, is_forget):
    """(retain, forget) = mse over the whole batch of mask·(ε − ε̂), one class's rows at a time."""
    s = torch.where(is_forget, -1.0, 1.0).view(-1, 1, 1, 1)
    wr, wf = (1 + s) / 2, (1 - s) / 2
    a, b = mask * eps, mask * eps_hat
    return F.mse_loss(a * wr, b * wr), F.mse_loss(a * wf, b * wf)


@pytest.mark.parametrize("flags", [[True, False, False, True], [False] * 4, [True] * 4])
def test_max_loss_is_retain_minus_alpha_forget(op_backend, flags):
    is_forget = torch.tensor(flags)
    eps_hat, eps, mask = _denoise_inputs()
    out = palette_max_loss(eps_hat, eps, mask, is_forget, 0.1)
    r, f = _masked_mse_terms(eps_hat, eps, mask, is_forget)
    want = r + 0.1 * (1 - 2 * 1) * f  # forget term × (1 − 2·max_loss)
    torch.testing.assert_close(out.loss, want, **TOL)
    g1, = torch.autograd.grad(out.loss, eps_hat)
    g2, = torch.autograd.grad(want, eps_hat)
    torch.testing.assert_close(g1, g2, **TOL)
    if any(flags):
        assert float(out.forget.detach()) > 0


def test_noisy_label_loss_is_retain_plus_alpha_forget():
    is_forget = torch.tensor([True, False, True, False])
    eps_hat, eps, mask = _denoise_inputs(seed=3)
    out = palette_noisy_label_loss(eps_hat, eps, mask, is_forget, 0.25)
    r, f = _masked_mse_terms(eps_hat, eps, mask, is_forget)
    torch.testing.assert_close(out.loss, r + 0.25 * f, **TOL)
    torch.testing.assert_close(torch.autograd.grad(out.loss, eps_hat)[0],
                               torch.autograd.grad(r + 0.25 * f, eps_hat)[0], **TOL)


def test_retain_label_pulls_forget_rows_to_tiled_retain_outputs():
    is_forget = torch.tensor([True, False, True, True, False])
    g = torch.Generator().manual_seed(7)
    student = torch.randn(5, 3, 4, 3, generator=g).requires_grad_(True)
    teacher = torch.randn(5, 3, 4, 3, generator=g)
    out = palette_retain_label_loss(student, teacher, is_forget, 0.1)
    retain_rows = [1, 4]
    updated = torch.stack([teacher[retain_rows[i % 2]] for i in range(5)])  # retain outputs tiled to B
    s = torch.where(is_forget, -1.0, 1.0).view(-1, 1, 1, 1)
    wr, wf = (1 + s) / 2, (1 - s) / 2
    want = F.mse_loss(student * wr, teacher * wr) + 0.1 * F.mse_loss(student * wf, updated * wf)
    torch.testing.assert_close(out.loss, want, **TOL)
    torch.testing.assert_close(torch.autograd.grad(out.loss, student)[0],
                               torch.autograd.grad(want, student)[0], **TOL)


def test_random_encoder_targets_and_loss():
    is_forget = torch.tensor([False, True, True])
    ft = _maps(3, 8)
    targets = palette_random_encoder_targets(ft, is_forget, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    for t, f in zip(targets, ft):
        z = torch.randn(f.shape, generator=g)  # one full-map draw per map, in map order
        noise = z * f.std() + f.mean()  # scalar stats over the whole batch's map (unbiased std)
        assert torch.equal(t[0], f[0])  # retain row keeps the teacher map
        torch.testing.assert_close(t[1:], noise[1:], rtol=0, atol=0)
    fs = [x.requires_grad_(True) for x in _maps(3, 9)]
    out = palette_random_encoder_loss(fs, ft, is_forget, 0.1, torch.Generator().manual_seed(4))
    torch.testing.assert_close(out.loss, palette_unlearn_loss_reference(fs, targets, is_forget, 0.1), **TOL)


def test_random_encoder_names_a_bad_map_argument():
    """A tensor instead of the list of maps: one message naming the argument, before any draw (it used to iterate
    the tensor's rows as maps and complain about is_forget)."""
    fs, ft = _maps(4, 1), _maps(4, 2)
    is_forget = torch.tensor([True, False, True, False])
    with pytest.raises(TypeError, match="features_student must be a list or tuple"):
        palette_random_encoder_loss(fs[0], ft[0], is_forget, 0.1)
    with pytest.raises(TypeError, match="features_teacher must be a list or tuple"):
        palette_random_encoder_targets(ft[0], is_forget)
    with pytest.raises(ValueError, match="number of student and teacher maps"):
        palette_random_encoder_loss(fs, ft[:2], is_forget, 0.1)


def test_random_encoder_targets_are_constants_of_the_teacher_maps():
    """A teacher map that requires grad (a direct caller's) gets no gradient through the random targets' draw or
    statistics: the reference computes the teacher under no_grad."""
    from unlearn_fast.objective.palette_loss import palette_random_encoder_targets
    ft = torch.randn(3, 2, 4, 4, requires_grad=True)
    is_forget = torch.tensor([True, False, True])
    (target,) = palette_random_encoder_targets([ft], is_forget, torch.Generator().manual_seed(0))
    assert not target.requires_grad
    assert torch.equal(target[1], ft.detach()[1])  # the retain row keeps the teacher's map
