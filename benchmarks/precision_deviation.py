"""How far ``--precision bf16`` moves from reference precision (fp16/bf16-autocast student, fp32 teacher).

    python benchmarks/precision_deviation.py --device cuda --model mae_vit_base_patch16 --steps 20 --out dev.json

From one initial model and the same batches and seeds, runs the fast step for ``--steps`` steps at
reference precision, at bf16, and at fp32, and reports relative differences (‖a−b‖/‖b‖) of the first-step
losses, of the teacher guide, and of the weight change after the last step. The reference-vs-fp32
numbers are the yardstick: the reference itself already differs from exact fp32 by that much. ``--device cuda``
without a GPU says so in one line and exits 1.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys

import torch

import unlearn_fast
from unlearn_fast.train.precision import teacher_autocast
from unlearn_fast.train.step_fast import fast_step
from unlearn_fast.train.unlearn_setup import build_setup


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run(model_name: str, device: str, steps: int, batch: int):
    torch.manual_seed(0)
    base = unlearn_fast.create_model(model_name)
    size = base.config.get("img_size", 256)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(batch, 3, size, size, generator=g), torch.arange(batch) % 2 == 0) for _ in range(steps)]
    results, weights, losses, guides = {}, {}, {}, {}
    for prec in ("fp32", "reference", "bf16"):
        s = build_setup(copy.deepcopy(base), device, lr=1e-4, precision=prec, forget_alpha=0.2, fast=True)
        init = [p.detach().clone() for p in s.trainable]
        x0 = batches[0][0].to(device)
        task = s.student.sample_task(x0, torch.Generator(device=device).manual_seed(0))
        with torch.no_grad(), teacher_autocast(prec, torch.device(device)):
            guides[prec] = s.teacher.forward_encoder_task(s.teacher.prepare_inputs(x0), task).float()
        for step, (x, f) in enumerate(batches):
            out = fast_step(s, x, f, step)
            if step == 0:
                losses[prec] = torch.stack([out.retain, out.forget]).float().cpu()
        weights[prec] = torch.cat([(p.detach() - i).flatten() for p, i in zip(s.trainable, init)]).cpu()
    for a, b in (("reference", "fp32"), ("bf16", "fp32"), ("bf16", "reference")):
        results[f"{a}_vs_{b}"] = {"first_step_losses_rel": rel(losses[a], losses[b]),
                                  "teacher_guide_rel": rel(guides[a], guides[b]),
                                  "weight_update_rel_after_steps": rel(weights[a], weights[b])}
    return {"model": model_name, "device": device, "steps": steps, "batch": batch,
            "card": torch.cuda.get_device_name() if device == "cuda" else "cpu", "results": results}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    ap.add_argument("--model", default="mae_vit_base_patch16", help="an MAE or MAGE model")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    models = [m for m in unlearn_fast.list_models() if m.startswith(("mae", "mage"))]  # build_setup's families
    if a.model not in models:
        ap.error(f"unknown --model {a.model!r}; an MAE or MAGE model: {', '.join(models)}")
    if a.steps < 1 or a.batch < 1:
        ap.error(f"--steps and --batch must be at least 1 (got --steps {a.steps} --batch {a.batch})")
    if a.device == "cuda" and not torch.cuda.is_available():
        print("precision_deviation: --device cuda needs a CUDA GPU and this machine has none (--device cpu runs "
              "here)", file=sys.stderr)
        return 1
    res = run(a.model, a.device, a.steps, a.batch)
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
