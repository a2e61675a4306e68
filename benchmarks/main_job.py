"""The main job over several training seeds: the control scale chosen on validation seeds, reported on test seeds.

For each training seed (``seed_everything`` and ``data.seed``: the chains' noise and labels) the config is
fitted once; the fitted model is then evaluated at each control scale gamma on the validation seeds and on
the test seeds (:mod:`ctrl.seeds`). gamma is chosen on validation alone, by one rule: the highest mean
accuracy over the training seeds whose mean Frechet distance is at most ``--max_frechet_ratio`` times the
pretrained model's (on the same seeds); the test rows at that gamma are what is reported.

    python benchmarks/main_job.py --seeds 0 1 2 --gammas 0.8 0.9 1.0 1.1 --threads 2

writes ``<output>/rows.csv`` (every seed, split and gamma) and ``<output>/table.md`` (the choice and the
test figures, mean +- std over seeds, with the machine and thread count). Extra arguments after ``--``
go to ``ctrl fit`` (e.g. ``-- --model.algorithm.alpha 0.15``); a task overlay goes with the config
(``--config configs/digits/control.yaml configs/digits/tasks/compressibility.yaml``), before the per-seed
settings, so each seed keeps its own run folder.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from ctrl.commands import main
from ctrl.seeds import run_seed_args
from ctrl.tuning import choose

METRICS = ("accuracy", "macro_f1", "min_class_accuracy", "frechet", "frechet_floor", "kid", "kl")


def evaluate(cli, split: str, gamma: float, steps: int | None = None) -> dict[str, float]:
    """The fitted model's metrics on ``split`` ("val" or "test") at control scale ``gamma`` (and ``steps`` sampling
    steps; None: the config's), with the pretrained model's Frechet distance on the same seeds and steps."""
    module = cli.model
    module.control_scale = gamma
    if steps is not None:
        module.eval_num_steps = steps  # the pretrained figures are sampled again at these steps (their key)
    run = cli.trainer.validate if split == "val" else cli.trainer.test
    run(module, datamodule=cli.datamodule, verbose=False)
    row = {k: module.last_metrics[k] for k in METRICS}
    row["frechet_pretrained"] = module.baselines[split]["frechet"]
    row["frechet_ratio"] = row["frechet"] / row["frechet_pretrained"]
    return row


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def fit_rows(args, overrides: list[str], out: Path) -> tuple[list[dict], int]:
    """Fit the config once per training seed and score each fit on validation and test seeds at every gamma (and
    every extra step count on test): the rows (one dict per seed, split, steps and gamma; also written to
    ``rows.csv`` after each seed, so a killed run keeps what it has) and the step count the model trained at."""
    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        cli = main(
            [
                "fit",
                *(arg for config in args.config for arg in ("--config", config)),
                *run_seed_args(seed),
                *("--trainer.default_root_dir", str(out / "runs" / f"seed_{seed}"), "--trainer.logger", "false"),
                *("--trainer.enable_progress_bar", "false", "--test_after_fit", "false"),
                *overrides,
            ]
        )
        fit_seconds = round(time.perf_counter() - start, 1)
        trained_steps = cli.model.eval_num_steps
        for split, steps in [("val", trained_steps), ("test", trained_steps)] + [("test", n) for n in args.steps]:
            for gamma in args.gammas:
                scores = {k: round(v, 4) for k, v in evaluate(cli, split, gamma, steps).items()}
                rows.append(dict(seed=seed, split=split, steps=steps, gamma=gamma, fit_seconds=fit_seconds, **scores))
        with open(out / "rows.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows, trained_steps


def table(args, overrides: list[str], rows: list[dict], trained_steps: int) -> list[str]:
    """``table.md``'s lines: the command and machine, every gamma on validation seeds, the gamma the rule keeps, its
    test figures over the training seeds and, with ``--steps``, its accuracy at each step count."""

    def pick(split: str, gamma: float, key: str, steps: int = trained_steps) -> list[float]:
        return [r[key] for r in rows if r["split"] == split and r["gamma"] == gamma and r["steps"] == steps]

    accuracy = [statistics.mean(pick("val", g, "accuracy")) for g in args.gammas]
    ratio = [statistics.mean(pick("val", g, "frechet_ratio")) for g in args.gammas]
    chosen = args.gammas[choose(accuracy, ratio, 1.0, args.max_frechet_ratio)]  # ratios: the base's Frechet is 1
    allowed = [g for g, r in zip(args.gammas, ratio) if r <= args.max_frechet_ratio]
    command = (
        f"python benchmarks/main_job.py --config {' '.join(args.config)} --seeds {' '.join(map(str, args.seeds))} "
        f"--gammas {' '.join(map(str, args.gammas))} --threads {args.threads} --output {args.output}"
        + (f" --steps {' '.join(map(str, args.steps))}" if args.steps else "")
    )
    lines = [
        f"# Main job over training seeds {args.seeds}",
        "",
        f"`{command}`" + (f" `-- {' '.join(overrides)}`" if overrides else ""),
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{args.threads} torch threads. Config: `{' '.join(args.config)}`.",
        "",
        "Validation seeds (choice of gamma: highest mean accuracy with mean Frechet <= "
        f"{args.max_frechet_ratio}x the pretrained model's):",
        "",
        "| gamma | accuracy | macro-F1 | Frechet / pretrained |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {g} | {mean_std(pick('val', g, 'accuracy'))} | {mean_std(pick('val', g, 'macro_f1'))} | "
        f"{mean_std(pick('val', g, 'frechet_ratio'))} |"
        for g in args.gammas
    ]
    lines += [
        "",
        f"Chosen gamma: {chosen}"
        + ("" if allowed else " (no gamma met the Frechet bound: the most accurate is shown)"),
        "",
        f"Test seeds at gamma {chosen} (mean +- std over {len(args.seeds)} training seeds; min over seeds):",
        "",
        "| metric | mean +- std | min | max |",
        "|---|---|---|---|",
    ]
    for key in METRICS + ("frechet_pretrained", "frechet_ratio", "fit_seconds"):
        values = pick("test", chosen, key)
        lines.append(f"| {key} | {mean_std(values)} | {min(values):.3f} | {max(values):.3f} |")
    return lines + (steps_table(rows, chosen, trained_steps, args.steps) if args.steps else [])


def steps_table(rows: list[dict], gamma: float, trained_steps: int, steps: list[int]) -> list[str]:
    """The step-count robustness lines: test accuracy and Frechet ratio at ``gamma`` for each step count."""
    lines = [
        "",
        f"Step-count robustness: trained at {trained_steps} steps, test seeds at gamma {gamma}, each step count "
        "against the pretrained model at the same steps:",
        "",
        "| steps | accuracy | Frechet / pretrained |",
        "|---|---|---|",
    ]
    for n in sorted({trained_steps, *steps}):
        mine = [r for r in rows if r["split"] == "test" and r["gamma"] == gamma and r["steps"] == n]
        accuracy, ratio = [r["accuracy"] for r in mine], [r["frechet_ratio"] for r in mine]
        lines.append(f"| {n} | {mean_std(accuracy)} | {mean_std(ratio)} |")
    return lines


def run(args, overrides: list[str]) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    rows, trained_steps = fit_rows(args, overrides, out)
    lines = table(args, overrides, rows, trained_steps)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def parse(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", nargs="+", default=["configs/digits/control.yaml"], help="a config and the overlays that follow it"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.8, 0.9, 1.0, 1.1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max_frechet_ratio", type=float, default=1.5)
    parser.add_argument("--steps", type=int, nargs="*", default=[], help="also test at these sampling step counts")
    parser.add_argument("--output", default="benchmarks/main_job")
    args, overrides = parser.parse_known_args(argv)
    if len(set(args.seeds)) != len(args.seeds) or not args.gammas:
        parser.error("--seeds must be distinct and --gammas non-empty")
    return args, [o for o in overrides if o != "--"]


if __name__ == "__main__":
    run(*parse())
