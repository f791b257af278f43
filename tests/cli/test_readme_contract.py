"""README.md is a contract: its code blocks run, and the flags, defaults, files, keys, exit codes and paths it
names are what the code has. Each test reads the README itself, so an edit on either side that breaks a claim
fails here. (The demo's long run, the Speed and the Precision figures are checked elsewhere or on a GPU.)"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import make_class_tree, save_random_pretrained
from unlearn_fast.cli.main import USAGE, main

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
# flags of pip and torchrun in the README's command lines, not of unlearn-fast
FOREIGN_FLAGS = {"--no-deps", "--no-build-isolation", "--standalone", "--nproc_per_node", "--nnodes", "--node_rank",
                 "--master_addr", "--master_port"}
SMALL = ["--num_image_per_class", "4", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1",
         "--num_workers", "0", "--no_progress", "--device", "cpu"]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _layout_tree() -> str:
    return re.search(r"```\n(.*?)```", _section("Layout"), flags=re.S).group(1)


def _section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, flags=re.S | re.M)
    assert m, f"README has no section {title!r}"
    return m.group(1)


def _command_lines(prefix: str) -> list[str]:
    """README bash lines starting with ``prefix``, comments dropped, continuations joined."""
    text = "\n".join(_blocks("bash")).replace("\\\n", " ")
    return [line.split("#")[0].strip() for line in text.splitlines() if line.strip().startswith(prefix)]


def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _subcommands() -> list[str]:
    """The commands of ``unlearn-fast``'s usage that take flags (list-models takes none)."""
    return [c for c in re.findall(r"^  ([a-z][a-z-]+)\s", USAGE, flags=re.M) if c != "list-models"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("readme")
    data = make_class_tree(base / "data", ["a", "b", "c", "d", "e"], 8, seed=0)
    return dict(base=base, data=data, pretrained=save_random_pretrained(base / "pretrained.pth"))


# ---------------------------------------------------------------- the Python API block


def test_python_api_block_runs_as_written():
    (block,) = _blocks("python")
    ns: dict = {}
    exec(compile(block, "README.md:python", "exec"), ns)
    latent, images, is_forget = ns["latent"], ns["images"], ns["is_forget"]
    assert latent.dim() == 3 and latent.shape[0] == images.shape[0]  # [N, L, D]
    assert float(ns["retain_loss"]) == 0.0  # the retain guide is the model's own latent
    assert float(ns["forget_loss"]) > 0.0  # the noise guide is not
    grads = [p.grad for p in ns["model"].parameters() if p.requires_grad]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)  # the block's backward reaches the model
    noise = ns["noise"]
    assert noise.shape == images.shape and 0 <= float(noise.min()) and float(noise.max()) <= 1  # clamped
    again = ns["sample_batch_noise"](images, "normal", seed=0, step=0)
    assert torch.equal(noise, again)  # "reproducible per (seed, step)"
    assert not torch.equal(noise, ns["sample_batch_noise"](images, "normal", seed=0, step=1))
    # "both terms divide by the whole batch and carry the factor (1 ± s)": (2/N) sums over each subset
    g = torch.Generator().manual_seed(1)
    guide, noise_guide = (latent.detach() + torch.randn(latent.shape, generator=g) for _ in range(2))
    r, f = ns["retain_forget_l2_loss"](latent, guide, noise_guide, is_forget)
    per_r = ((latent.detach() - guide) ** 2).mean(dim=(1, 2))
    per_f = ((latent.detach() - noise_guide) ** 2).mean(dim=(1, 2))
    n = latent.shape[0]
    torch.testing.assert_close(r.detach(), 2 / n * per_r[~is_forget].sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f.detach(), 2 / n * per_f[is_forget].sum(), rtol=1e-5, atol=1e-6)


def test_python_api_block_runs_for_mage_too():
    (block,) = _blocks("python")
    assert '"mae_micro"' in block and "MAGE" in block
    ns: dict = {}
    exec(compile(block.replace('"mae_micro"', '"mage_micro"'), "README.md:python", "exec"), ns)
    assert ns["latent"].dim() == 3 and ns["latent"].shape[0] == 8


def test_module_paths_the_readme_names_import():
    names = set(re.findall(r"`(unlearn_fast(?:\.\w+)+)", README))
    assert "unlearn_fast.train.trainer.train_loop" in names
    for dotted in sorted(names):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                assert hasattr(obj, attr), f"README names {dotted}, but {attr} is missing"
                obj = getattr(obj, attr)
            break
        else:
            raise AssertionError(f"README names {dotted}, which does not import")
    assert "overlap_teacher" in __import__("inspect").signature(
        importlib.import_module("unlearn_fast.train.unlearn_setup").build_setup).parameters


# ---------------------------------------------------------------- flags and defaults


def test_every_flag_the_readme_names_is_a_flag_of_some_command(capsys):
    known = set()
    for command in _subcommands():
        known |= set(re.findall(r"(?<![\w-])--[a-z][\w-]*", _help(capsys, command)))
    named = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", README)) - FOREIGN_FLAGS
    assert named and not named - known, f"README names flags no command has: {sorted(named - known)}"


def test_own_flags_paragraph_lists_flags_of_unlearn(capsys):
    para = README[README.index("unlearn_fast's own flags:"):README.index("Evaluation during training:")]
    flags = set(re.findall(r"(?<![\w-])--[a-z][\w_]*", para))
    assert len(flags) > 20
    unlearn = set(re.findall(r"--[a-z][\w_]*", _help(capsys, "unlearn")))
    baseline = set(re.findall(r"--[a-z][\w_]*", _help(capsys, "baseline")))
    assert not flags - unlearn - baseline, sorted(flags - unlearn - baseline)
    assert flags - unlearn <= {"--baseline_weighting"}  # a baseline flag
    choices = {"--precision": "reference|bf16|fp32", "--step": "auto|reference|fast|graphed",
               "--baseline_weighting": "reference|corrected"}
    help_text = _help(capsys, "unlearn") + _help(capsys, "baseline")
    for flag, values in choices.items():
        assert f"`{flag} {values}`" in README or flag == "--baseline_weighting"
        assert f"{flag} {{{values.replace('|', ',')}}}" in help_text


def test_reference_flags_keep_the_reference_defaults():
    from unlearn_fast.cli.unlearn_args import build_parser
    unlearn = vars(build_parser(baseline=False, prog="x").parse_args([]))
    # the defaults the README spells out ...
    m = re.search(r"\(`(--epochs [^`]*?) \.\.\.`", README)
    stated = dict(re.findall(r"--(\w+) (\S+)", m.group(1)))
    assert stated == {"epochs": "6", "batch_size": "32", "blr": "1e-4", "warmup_epochs": "5", "forget_alpha": "0.0"}
    for k, v in stated.items():
        assert unlearn[k] == type(unlearn[k])(float(v)), k
    assert re.search(r"`--mask_ratio` \(MAE: the fraction of patches hidden, default 0\.75\)", README)
    assert unlearn["mask_ratio"] == 0.75
    assert re.search(r"`--eval_images` \(default 32\)", README) and unlearn["eval_images"] == 32
    assert "`--device` defaults to `auto`" in " ".join(README.split()) and unlearn["device"] == "auto"
    # ... and "every flag of the reference trainer is accepted with its default" (main_unlearn.py)
    reference = dict(epochs=6, accum_iter=1, batch_size=32, model="mage_vit_base_patch16", input_size=256,
                     weight_decay=0.05, lr=None, blr=1e-4, min_lr=0.0, warmup_epochs=5, forget_alpha=0.0,
                     retain_alpha=1.0, noise_type="normal", mask_ratio_min=0.5, mask_ratio_max=1.0, mask_ratio_mu=0.55,
                     mask_ratio_std=0.25, grad_clip=3.0, data_path="../dataset/imagenet1k/train/", use_coco=False,
                     opendata_to_forget_ratio=None, num_image_per_class=120, retainset_ratio=1.0,
                     output_dir="./output_dir", seed=0, resume="", start_epoch=0, num_workers=10, pin_mem=True,
                     world_size=1, local_rank=-1, dist_on_itp=False, dist_url="env://", use_sagemaker=0)
    assert {k: unlearn[k] for k in reference} == reference
    baseline = vars(build_parser(baseline=True, prog="x").parse_args(["--loss_type", "encoder_noise"]))
    assert baseline["batch_size"] == 16 and "noise_type" not in baseline  # main_baseline.py
    assert {"forget_num", "learn_others"} <= set(baseline)


def test_readme_help_line_runs():
    (line,) = _command_lines("python -m unlearn_fast")
    result = subprocess.run([sys.executable, *line.split()[1:]], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--forget_alpha" in result.stdout, result.stderr[-2000:]


# ---------------------------------------------------------------- files and folders the README names


def test_paths_the_readme_names_exist():
    named = set(re.findall(r"`((?:unlearn_fast|benchmarks|tests|csrc)/[\w./-]+|setup\.py|CMakeLists\.txt)`", README))
    named |= set(re.findall(r"\(((?:unlearn_fast|benchmarks|tests)/[\w/]+\.(?:py|md))\)", README))
    assert {"unlearn_fast/ops/retain_forget_l2_loss.py", "benchmarks/RESULTS.md", "setup.py"} <= named
    layout = _layout_tree()
    for line in layout.splitlines():
        head = line.split("  ")[0].strip()
        first, *more = [p.strip() for p in head.split(",")]
        named.add(first)
        named |= {os.path.join(os.path.dirname(first.rstrip("/")), p) for p in more}
    named |= {"unlearn_fast/models/adapter.py"}  # "(models/adapter.py)"
    missing = sorted(p for p in named if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f"README names paths that do not exist: {missing}"
    listed = {p.rstrip("/") for p in named}
    packages = {f"unlearn_fast/{d}" for d in os.listdir(os.path.join(ROOT, "unlearn_fast"))
                if os.path.isdir(os.path.join(ROOT, "unlearn_fast", d)) and not d.startswith(("_", "."))}
    assert not packages - listed, f"Layout misses {sorted(packages - listed)}"
    for bench in _command_lines("bash benchmarks/"):
        assert os.path.isfile(os.path.join(ROOT, bench.split()[1]))
    assert all(os.path.isdir(os.path.join(ROOT, p)) for p in ("benchmarks", "tests/gpu"))


def test_layout_kernels_line_matches_the_kernel_files():
    kernels = set(os.listdir(os.path.join(ROOT, "unlearn_fast", "kernels")))
    concept_file = {"retain/forget L2": "retain_forget_l2.py", "Philox noise": "batch_noise.py",
                    "GroupNorm + SiLU": "group_norm_silu.py", "residual add + LayerNorm": "add_layer_norm.py",
                    "residual add + 2x2 average pool": "residual_avg_pool.py", "multi-map L2": "multi_map_l2.py"}
    layout = " ".join(_layout_tree().split())
    for concept, file in concept_file.items():
        assert concept in layout and file in kernels, concept


def test_reference_default_checkpoint_paths(tmp_path, monkeypatch):
    """"no --resume and pretrained/mage-vitb-1600.pth present (baseline: mage-vitb-1600.pth): that file is used"."""
    from types import SimpleNamespace

    from unlearn_fast.cli.unlearn_command import apply_reference_resume_default
    sentence = " ".join(README.split())
    assert "no `--resume` and `pretrained/mage-vitb-1600.pth` present (`baseline`: `mage-vitb-1600.pth`)" in sentence
    monkeypatch.chdir(tmp_path)
    for baseline, path in ((False, "pretrained/mage-vitb-1600.pth"), (True, "mage-vitb-1600.pth")):
        args = SimpleNamespace(resume="", model="mage_vit_base_patch16")
        apply_reference_resume_default(args, baseline)
        assert args.resume == ""  # not there: nothing is downloaded, nothing chosen
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        open(path, "wb").close()
        apply_reference_resume_default(args, baseline)
        assert args.resume == path
        other = SimpleNamespace(resume="", model="mae_micro")
        apply_reference_resume_default(other, baseline)
        assert other.resume == ""


# ---------------------------------------------------------------- the command lines, run small


@pytest.fixture(scope="module")
def readme_run(tree, tmp_path_factory):
    """The README's mae_micro command line with DIR filled in, small (later flags win), with --eval_every."""
    (line,) = [x for x in _command_lines("unlearn-fast unlearn") if "--model mae_micro" in x]
    argv = line.replace("DIR", tree["data"]).split()[1:]
    out = tmp_path_factory.mktemp("readme_out")
    rc = main([*argv, *SMALL, "--resume", tree["pretrained"], "--output_dir", str(out), "--eval_every", "1",
               "--eval_images", "2", "--save_every_steps", "1", "--forget_alpha", "0.2"])
    assert rc == 0
    (name,) = os.listdir(out)
    return os.path.join(out, name)


def test_unlearn_outputs_are_the_ones_the_readme_lists(readme_run):
    run = readme_run
    assert re.fullmatch(r"class_img1k__numimg_4_None_55_ra_1_fa_20_l2wd_0\.05_dr_ratio_1\.0_open_None_normal_"
                        r"\d{8}-\d{6}", os.path.basename(run))  # "named like the reference's"
    files = set(os.listdir(run))
    assert {"opt.yaml", "log.txt", "checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-0.safetensors",
            "checkpoint-1.safetensors", "checkpoint-last.pth", "eval_log.txt", "best.pth"} <= files
    assert not [f for f in files if f.startswith("events.out.tfevents")]  # "no TensorBoard event files"
    json.load(open(os.path.join(run, "opt.yaml")))
    lines = [json.loads(x) for x in open(os.path.join(run, "log.txt"))]
    assert [x["epoch"] for x in lines] == [0, 1]  # one JSON line per epoch
    keys = re.search(r"`checkpoint-\{epoch\}\.pth` with keys `([^`]*)` \(and `(\w+)`", " ".join(README.split()))
    stated = {k.strip() for k in keys.group(1).split(",")} | {keys.group(2)}
    for name in ("checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-last.pth"):
        ckpt = torch.load(os.path.join(run, name), weights_only=True)  # args as a plain dict
        assert set(ckpt) == stated and isinstance(ckpt["args"], dict)
        assert ckpt["args"]["teacher_checkpoint"]  # "recorded in the run's args (teacher_checkpoint)"
    from safetensors.torch import load_file
    trained = load_file(os.path.join(run, "checkpoint-1.safetensors"))
    model = torch.load(os.path.join(run, "checkpoint-1.pth"), weights_only=True)["model"]
    assert trained and set(trained) < set(model)  # the trained parameters alone
    assert all(torch.equal(trained[k], model[k]) for k in trained)
    records = [json.loads(x) for x in open(os.path.join(run, "eval_log.txt"))]
    assert records[0]["phase"] == "before" and [r["epoch"] for r in records[1:]] == [0, 1]
    for r in records[1:]:  # forget_gap = forget error/before - retain error/before
        assert r["forget_gap"] == pytest.approx(r["forget_mse"] / records[0]["forget_mse"]
                                                - r["retain_mse"] / records[0]["retain_mse"], rel=1e-9, abs=1e-12)
    best = torch.load(os.path.join(run, "best.pth"), weights_only=True)
    assert best["criterion"] == "forget_gap" and set(best["model"]) == set(trained)  # the encoder


def test_audit_and_report_lines_run(readme_run, capsys):
    for line in (_command_lines("unlearn-fast audit") + _command_lines("unlearn-fast report")):
        argv = line.replace("RUN_DIR", readme_run).split()[1:]
        assert main(argv + (["--images", "2"] if argv[0] == "audit" else [])) == 0
    audit = json.load(open(os.path.join(readme_run, "forget_audit.json")))
    text = json.dumps(audit)
    assert "auc" in text and "retain" in text  # the retain classes are audited too, as a control
    page = open(os.path.join(readme_run, "report.html"), encoding="utf-8").read()
    assert "<svg" in page and page.count("<table") >= 2  # log curves, eval table, audit table
    capsys.readouterr()


def test_unlearn_model_palette_is_palette_unlearn(monkeypatch):
    """"`unlearn-fast unlearn --model palette -c CONFIG ...` is the same command"."""
    assert "`unlearn-fast unlearn --model palette -c CONFIG ...` is the same command" in " ".join(README.split())
    import unlearn_fast.cli.palette_command as pc
    seen = []
    monkeypatch.setattr(pc, "palette_unlearn_main", lambda argv: seen.append(argv) or 0)
    assert main(["unlearn", "--model", "palette", "-c", "cfg.json", "--fix_decoder", "1"]) == 0
    assert main(["unlearn", "-c", "cfg.json", "--model=palette"]) == 0
    assert seen == [["-c", "cfg.json", "--fix_decoder", "1"], ["-c", "cfg.json"]]


# ---------------------------------------------------------------- exit codes and refusals


def test_exit_codes_the_readme_lists(tree, tmp_path, monkeypatch, capsys):
    stated = re.search(r"Exit codes: 0 done, 2 bad input .*?, 3 a non-finite loss, 1 out of memory .*?, "
                       r"130 / 143 Ctrl-C / SIGTERM\.", " ".join(README.split()))
    assert stated
    base = ["unlearn", "--model", "mae_micro", "--input_size", "32", "--forget_classes", "a,b", "--retain_classes",
            "c,d", *SMALL, "--output_dir", str(tmp_path / "out")]
    # 2: bad input, one message naming the file
    assert main([*base, "--data_path", str(tmp_path / "nowhere"), "--resume", tree["pretrained"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0] and not (tmp_path / "out").exists()
    # 3: a non-finite loss (a forget weight that overflows fp32); the run directory without a checkpoint is removed
    assert main([*base, "--data_path", tree["data"], "--resume", tree["pretrained"], "--forget_alpha", "1e39"]) == 3
    assert "non-finite" in capsys.readouterr().err and not (tmp_path / "out").exists()  # it made out/: removed
    # NaN weights given to --resume are bad input (2), refused before a run directory exists
    sd = torch.load(tree["pretrained"], weights_only=True)
    sd["model"]["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    assert main([*base, "--data_path", tree["data"], "--resume", str(tmp_path / "nan.pth")]) == 2
    assert "NaN or inf" in capsys.readouterr().err and not (tmp_path / "out").exists()

    # 1: out of memory, with what to lower; 130 / 143: Ctrl-C / SIGTERM
    import unlearn_fast.cli.unlearn_command as uc

    def raising(exc):
        def run(args, baseline=False):
            raise exc
        return run
    for exc, rc, says in ((torch.OutOfMemoryError("CUDA out of memory."), 1, "--batch_size"),
                          (MemoryError(), 1, "--batch_size"), (KeyboardInterrupt(), 130, "interrupted"),
                          (uc.RunStopped(15), 143, "terminated")):
        monkeypatch.setattr(uc, "run_unlearn", raising(exc))
        assert main([*base, "--data_path", tree["data"]]) == rc
        assert says in capsys.readouterr().err


def test_refused_setups_of_the_differs_list(tree, tmp_path, capsys):
    """forget-only training, a proxy folder holding a forget class's folder, a retain folder linked to a forget
    class: one error (exit 2) each, before a run directory exists."""
    text = " ".join(_section("Where unlearn_fast deliberately differs from the official code").split())
    assert ("forget-only training (`--retainset_ratio 0` without a proxy), a proxy folder that contains a forget "
            "class's folder") in text and "symlink to a forget class" in text
    data = tree["data"]
    linked = tmp_path / "linked"
    linked.mkdir()
    for c in ("a", "b", "c"):
        os.symlink(os.path.join(data, c), linked / c)
    os.symlink(os.path.join(data, "a"), linked / "f")
    base = ["unlearn", "--model", "mae_micro", "--input_size", "32", "--resume", tree["pretrained"], *SMALL]
    cases = [
        (["--data_path", data, "--forget_classes", "a,b", "--retain_classes", "c", "--retainset_ratio", "0"],
         "retain set is empty"),
        (["--data_path", data, "--forget_classes", "a,b", "--retain_classes", "c", "--use_coco", "--proxy_path", data,
          "--opendata_to_forget_ratio", "0.5"], "contains forget-class images"),
        (["--data_path", str(linked), "--forget_classes", "a,b", "--retain_classes", "f,c"], "symlink"),
    ]
    for i, (flags, says) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main([*base, *flags, "--output_dir", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
        assert not out.exists() or os.listdir(out) == []


def test_sixteen_bit_grey_png_is_reduced_to_eight_bits(tmp_path):
    assert "16-bit grey PNGs are reduced to 8 bits" in " ".join(README.split())
    from unlearn_fast.train.image_datasets import load_rgb_image
    grey = (np.arange(48 * 40).reshape(48, 40) * 34).astype(np.uint16)  # 0 .. 65246
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    rgb = np.asarray(load_rgb_image(str(tmp_path / "g16.png")))
    assert rgb.shape == (48, 40, 3) and rgb.min() == 0 and rgb.max() == 254  # not all white
    np.testing.assert_array_equal(rgb[..., 0], (grey >> 8).astype(np.uint8))
