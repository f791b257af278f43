"""README claims a first-time user acts on that tests/cli/test_readme_contract.py does not pin: the training call of
the Python API section, the label convention, the command-line paragraph's data, baseline and launcher facts, the
CUDA-graph step's conditions, the evaluation's file names and optional packages, the demo's cache folder, and the
Speed section's figures against benchmarks/RESULTS.md. Each test reads the README itself."""
from __future__ import annotations

import os
import re
import sys

import pytest
import torch

from unlearn_fast.cli.main import main

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
FLAT = " ".join(README.split())  # sentences wrap anywhere
RESULTS = open(os.path.join(ROOT, "benchmarks", "RESULTS.md"), encoding="utf-8").read()
CALL_1 = "**Call 1** (the defaults of"  # run 3's first call: the table the Speed section's MAE-B row and A/B come from
CALL_2 = "**The steps as they now run by default**"  # run 3's second call: the MAE-L and MAGE-B rows


def _section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, flags=re.S | re.M)
    assert m, f"README has no section {title!r}"
    return m.group(1)


# ---------------------------------------------------------------- Python API: the training call


def _train_line() -> str:
    (line,) = re.findall(r"`(history = train_loop\(.*?\))`", README)
    return line


def _run_train_line(is_forget=None) -> tuple[dict, dict]:
    """The README's python block, then its train_loop line (optionally with another is_forget); the namespace and
    the model's weights before training."""
    (block,) = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    ns: dict = {}
    exec(compile(block, "README.md:python", "exec"), ns)
    from unlearn_fast.train.trainer import train_loop
    from unlearn_fast.train.unlearn_setup import build_setup
    ns.update(build_setup=build_setup, train_loop=train_loop)
    if is_forget is not None:
        ns["is_forget"] = is_forget
    ns["model"].zero_grad(set_to_none=True)  # the block's own backward left gradients behind
    before = {k: v.detach().clone() for k, v in ns["model"].state_dict().items()}
    exec(compile(_train_line(), "README.md:train_loop", "exec"), ns)
    return ns, before


def test_train_loop_line_runs_as_written_and_trains_the_encoder_only():
    assert "continuing the block above" in FLAT and "2 epochs of 1 step" in FLAT
    ns, before = _run_train_line()
    history = ns["history"]
    assert [row["epoch"] for row in history] == [0, 1]  # "returns the per-epoch log rows"
    assert {"train_loss", "train_retain_l2_loss", "train_forget_l2_loss", "train_lr"} <= set(history[0])
    after = ns["model"].state_dict()
    encoder = set(ns["model"].encoder_parameter_names())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= encoder  # "trains the encoder"
    assert any(k.startswith("decoder") for k in before) and not any(k.startswith("decoder") for k in changed)


@pytest.mark.parametrize("which", ["forget", "retain"])
def test_label_convention_minus_100_forget_plus_100_retain(which):
    """"label −100 for a forget row and +100 for a retain row": with every row of one kind the other term is 0
    (at the first step the student is the teacher, so an all-retain batch has retain loss ~0 too)."""
    assert "label −100 for a forget row and +100 for a retain row" in FLAT
    ns, _ = _run_train_line(torch.full((8,), which == "forget"))
    first = ns["history"][0]
    if which == "forget":
        assert first["train_retain_l2_loss"] == 0.0 and first["train_forget_l2_loss"] > 1e-3
    else:
        assert first["train_forget_l2_loss"] == 0.0 and first["train_retain_l2_loss"] < 1e-3


# ---------------------------------------------------------------- the command-line paragraph


def test_list_models_line(capsys):
    assert re.search(r"^unlearn-fast list-models\s+# the values of --model \(MAE, MAGE and Palette families\)$",
                     README, flags=re.M)
    assert main(["list-models"]) == 0
    names = capsys.readouterr().out.split()
    import unlearn_fast
    assert names == list(unlearn_fast.list_models())
    assert any(n.startswith("mae") for n in names) and any(n.startswith("mage") for n in names)
    assert any(n.startswith("palette") for n in names)


def test_data_tree_extensions_and_default_split(tmp_path):
    from unlearn_fast.cli.unlearn_command import class_lists
    from unlearn_fast.train.data_split import IMAGE_EXTENSIONS, imagenet_r_wnids, reference_class_split
    stated = re.search(r"`DIR/<class>/<image>`: ([^)]*), any case\)", FLAT).group(1)
    assert set(re.findall(r"\.\w+", stated)) == set(IMAGE_EXTENSIONS)
    # "the 200 ImageNet-R classes, the first 100 (sorted) forgotten and the other 100 retained"
    assert "the 200 ImageNet-R classes, the first 100 (sorted) forgotten and the other 100 retained" in FLAT
    wnids = imagenet_r_wnids()
    forget, retain = reference_class_split()
    assert len(wnids) == 200 and wnids == sorted(wnids) and forget == wnids[:100] and retain == wnids[100:]
    from types import SimpleNamespace
    with pytest.raises(ValueError, match="give both --forget_classes and --retain_classes"):  # "(both or neither)"
        class_lists(SimpleNamespace(forget_classes="a", retain_classes=None, data_path=str(tmp_path)))
    with pytest.raises(ValueError, match="ImageNet"):  # neither, and no ImageNet tree: named, not guessed
        class_lists(SimpleNamespace(forget_classes=None, retain_classes=None, data_path=str(tmp_path)))


def test_baseline_loss_types_names_and_step():
    from unlearn_fast.cli.unlearn_args import build_parser
    from unlearn_fast.objective.baselines import LOSS_TYPES
    from unlearn_fast.train.trainer import STEP_MODES, resolve_step_mode
    stated = re.search(r"`--loss_type ([\w|]+)` \(the paper's ([^)]*)\)", FLAT)
    assert tuple(stated.group(1).split("|")) == LOSS_TYPES
    help_text = " ".join(build_parser(baseline=True, prog="x").format_help().split())
    for loss_type, paper in zip(LOSS_TYPES, stated.group(2).split(", ")):
        assert f"{loss_type} ({paper})" in help_text
    assert "defaults to `--batch_size 16` as `main_baseline.py`, and always runs the reference-semantics step" in FLAT
    for mode in STEP_MODES:  # "always runs the reference-semantics step"
        assert resolve_step_mode(mode, torch.device("cpu"), "encoder_noise", 1, True) == "reference"


def test_baseline_weighting_sentence_matches_its_help():
    from unlearn_fast.cli.unlearn_args import build_parser
    assert ("`reference` keeps the official code's (1+s) weighting, which puts the forget term of `encoder_noise` "
            "and `learn_others` on the retain rows; `corrected` puts it on the forget rows") in FLAT
    help_text = " ".join(build_parser(baseline=True, prog="x").format_help().split())
    assert ("reference: the official (1+s) weighting of encoder_noise / learn_others (forget term on retain rows); "
            "corrected: forget term on forget rows") in help_text


def test_flags_accepted_without_effect_and_the_launcher_rank(monkeypatch):
    """`--early_epochs` parses; torch.distributed.launch's `--local-rank=N` before the command is accepted."""
    from unlearn_fast.cli.unlearn_args import build_parser
    assert "as is `--early_epochs` (parsed and never read" in FLAT
    assert "the `--local-rank=N` it passes before the command is accepted" in FLAT
    parser = build_parser(baseline=False, prog="x")
    assert vars(parser.parse_args(["--early_epochs", "3"]))["epochs"] == 6
    import unlearn_fast.cli.unlearn_command as uc
    seen = []
    monkeypatch.setattr(uc, "run_unlearn", lambda args, baseline=False: seen.append(args) or 0)
    assert main(["--local-rank=0", "unlearn", "--model", "mae_micro", "--forget_alpha", "0.2"]) == 0
    assert seen and seen[0].forget_alpha == 0.2 and seen[0].model == "mae_micro"


def test_exit_code_3_for_a_non_finite_loss(tmp_path, capsys):
    """"3 a non-finite loss" (a loss that overflows in training; NaN weights given to --resume are refused up front,
    exit 2: bad input) and "a run directory without any checkpoint is removed"."""
    from tests.helpers import make_class_tree, save_random_pretrained
    assert "3 a non-finite loss" in FLAT and "a run directory without any checkpoint is removed" in FLAT
    data = make_class_tree(tmp_path / "data", ["a", "b", "c", "d"], 4, seed=0)
    pretrained = save_random_pretrained(tmp_path / "pretrained.pth")
    base = ["unlearn", "--model", "mae_micro", "--input_size", "32", "--data_path", data, "--forget_classes", "a,b",
            "--retain_classes", "c,d", "--num_image_per_class", "4", "--batch_size", "4", "--epochs", "1",
            "--warmup_epochs", "0", "--num_workers", "0", "--no_progress", "--device", "cpu"]
    out = tmp_path / "out"
    assert main([*base, "--resume", pretrained, "--forget_alpha", "1e39", "--output_dir", str(out)]) == 3
    assert "non-finite" in capsys.readouterr().err and not (out.exists() and os.listdir(out))
    sd = torch.load(pretrained, weights_only=True)
    sd["model"]["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    assert main([*base, "--resume", str(tmp_path / "nan.pth"), "--output_dir", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nan.pth" in err[0]


def test_cuda_graph_step_conditions():
    """"`auto` on a GPU with `--forget_per_batch` and `--accum_iter 1`": graphed; otherwise the fast eager step."""
    from unlearn_fast.train.trainer import resolve_step_mode
    assert "`auto` on a GPU with `--forget_per_batch` and `--accum_iter 1`" in FLAT
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # only the device type is read
    assert resolve_step_mode("auto", cuda, None, 1, True) == "graphed"
    assert resolve_step_mode("auto", cuda, None, 2, True) == "fast"
    assert resolve_step_mode("auto", cuda, None, 1, False) == "fast"
    assert resolve_step_mode("auto", cpu, None, 1, True) == "fast"


# ---------------------------------------------------------------- evaluation and the demo


def test_eval_csv_names_the_readme_lists():
    from unlearn_fast.eval import csv_rows
    assert ("(`fid_is_eval_{task}.csv`, `clip_cosine_{task}.csv`; Palette: `fid_is_eval.csv`, `clip_cosine.csv`)"
            in FLAT)
    assert csv_rows.fid_is_csv_name("inpaint") == "fid_is_eval_inpaint.csv"
    assert csv_rows.clip_cosine_csv_name("outpaint") == "clip_cosine_outpaint.csv"
    assert (csv_rows.fid_is_csv_name(None), csv_rows.clip_cosine_csv_name(None)) == ("fid_is_eval.csv",
                                                                                     "clip_cosine.csv")


def test_clip_without_open_clip_is_named(monkeypatch):
    """"`--clip` also needs the open_clip package (`pip install open-clip-torch` ...), and a missing one is named"."""
    assert "`--clip` also needs the open_clip package (`pip install open-clip-torch`" in FLAT
    from unlearn_fast.eval import feature_extractors
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    with pytest.raises(Exception, match="open-clip-torch") as e:
        feature_extractors.load_clip_visual("/nonexistent/clip.bin")
    assert len(str(e.value).splitlines()) == 1


def test_demo_cache_folder(monkeypatch, tmp_path):
    from unlearn_fast.cli.demo import build_parser
    from unlearn_fast.train.digits import cache_dir
    assert "cached under `~/.cache/unlearn_fast`, or `$UNLEARN_FAST_CACHE` / `--cache_dir`" in FLAT
    monkeypatch.delenv("UNLEARN_FAST_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "unlearn_fast"
    monkeypatch.setenv("UNLEARN_FAST_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(str(tmp_path / "flag")) == tmp_path / "flag"  # --cache_dir wins
    assert build_parser().parse_args([]).cache_dir is None  # no flag: the two defaults above
    # "digits 0–4 are forgotten and 5–9 retained ... writes demo_output/metrics.json and demo_output/grid.png"
    args = build_parser().parse_args([])
    assert args.forget_digits == "0,1,2,3,4" and os.path.normpath(args.output_dir) == "demo_output"


# ---------------------------------------------------------------- Speed: the figures RESULTS.md has


def _results_table(heading: str) -> dict:
    """{(model, variant's first word): '× ref' figure} of the RESULTS.md table after ``heading``."""
    text = RESULTS[RESULTS.index(heading):]
    rows, model, started = {}, "", False
    for line in text.splitlines()[1:]:
        if not line.startswith("|"):
            if started:
                break
            continue
        started = True
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == "model" or re.fullmatch(r"-+", cells[0]):  # the header and its rule
            continue
        model = cells[0] or model
        ratio = [c.strip("*") for c in cells[2:] if re.fullmatch(r"\**\d+\.\d+\**", c)][0]
        rows[(model, cells[1].split()[0])] = ratio
    return rows


def _line_of(heading: str) -> str:
    start = RESULTS.index(heading)
    return RESULTS[start:RESULTS.index("\n", start)]


def test_speed_table_rows_are_results_figures():
    speed = _section("Speed")
    table = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^\| (MAE ViT-B/16|MAE ViT-L/16|MAGE ViT-B \+ VQGAN), \d+² \| "
        r"([\d.]+)× \(([\d.]+) ms vs ([\d.]+) ms\)¹? \| ([\d.]+)× \(([\d.]+) ms\) \|$", speed, flags=re.M)}
    assert set(table) == {"MAE ViT-B/16", "MAE ViT-L/16", "MAGE ViT-B + VQGAN"}
    call2 = _results_table(CALL_2)
    call1 = _results_table(CALL_1)
    for model, key in (("MAE ViT-L/16", "MAE ViT-L/16, 224²"), ("MAGE ViT-B + VQGAN", "MAGE ViT-B + VQGAN, 256²")):
        ratio, fast_ms, ref_ms, bf16_ratio, bf16_ms = table[model]
        assert call2[(key, "fast")] == ratio and call2[(key, "fast_bf16")] == bf16_ratio
        assert f"{ref_ms} ms" in _line_of(CALL_2)  # "(reference 183.2 ms ..."
        assert f"| {fast_ms} ms |" in RESULTS and f"| {bf16_ms} ms |" in RESULTS
    ratio, fast_ms, ref_ms, bf16_ratio, bf16_ms = table["MAE ViT-B/16"]  # ¹: call 1; bf16 = the fused add + LN
    assert call1[("MAE ViT-B/16", "fast")] == ratio and call1[("MAE ViT-B/16", "fast_bf16_addnorm")] == bf16_ratio
    assert f"reference {ref_ms} /" in _line_of(CALL_1) and f"| {fast_ms} ms | {ratio} |" in RESULTS
    assert f"| {bf16_ms} ms | {bf16_ratio} |" in RESULTS


def test_speed_ab_sentence_names_the_right_variants():
    """MAGE in call 1 (NCHW default, unfused block norms): NCHW = `fast`, without fused tokenizer norms =
    `fast_unfused`, channels_last = `fast_cl`, each at equal numerics / bf16."""
    call1 = _results_table(CALL_1)
    m = re.search(r"equal numerics / bf16: ([\d.]+)× / ([\d.]+)× with the VQGAN in NCHW, ([\d.]+)× / ([\d.]+)× in "
                  r"NCHW without the fused tokenizer norms, ([\d.]+)× / ([\d.]+)× in channels_last", FLAT)
    assert m
    mage = "MAGE ViT-B + VQGAN"
    expected = [call1[(mage, v)] for v in ("fast", "fast_bf16", "fast_unfused", "fast_bf16_unfused", "fast_cl",
                                           "fast_bf16_cl")]
    assert list(m.groups()) == expected


def test_speed_and_precision_decimals_all_come_from_results():
    speed = _section("Speed").split("Benchmarks:")[0] + _section("Precision")
    decimals = set(re.findall(r"(?<![\w.])\d+\.\d+(?:e-\d+)?(?![\w.])", speed))
    assert len(decimals) > 40
    assert not sorted(d for d in decimals if d not in RESULTS)
