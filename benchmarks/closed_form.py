"""Every plugin against the closed forms of the Gaussian world, as one markdown table.

    python benchmarks/closed_form.py --threads 1

For each shipped config (`configs/gaussian/*.yaml`) on the shipped world and on another given on the
command line (the worlds and budgets of tests/test_gaussian.py), the relative errors in mean and covariance
against the optimum of the discrete chain's own family, from the policy's exact chain moments (no sampling
noise) and from the 20,000 validation samples, and from the samples against the continuous-time target
p_pre exp(r / alpha) / Z, with the wall time of the whole `ctrl fit`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ctrl.commands import main
from ctrl.testing import GAUSSIAN_LARGER_ROLLOUT as LARGER_ROLLOUT
from ctrl.testing import GAUSSIAN_OTHER_WORLD as OTHER

ROOT = Path(__file__).resolve().parents[1]

ALGORITHMS = ("direct", "ppo", "raft", "continuous")


def main_(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="/tmp/ctrl-closed-form")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)\n")
    print(
        "| plugin | world | chain optimum, exact moments (mean / cov) | chain optimum, samples | "
        "continuous target, samples | wall time |"
    )
    print("|---|---|---|---|---|---|")
    for algorithm in ALGORITHMS:
        for world in ("shipped", "other"):
            overrides = [] if world == "shipped" else OTHER + LARGER_ROLLOUT.get(algorithm, [])
            start = time.perf_counter()
            cli = main(
                [
                    "fit",
                    "--config",
                    str(ROOT / "configs" / "gaussian" / f"{algorithm}.yaml"),
                    "--trainer.default_root_dir",
                    f"{args.output}/{algorithm}-{world}",
                    "--trainer.logger",
                    "false",
                    "--trainer.enable_progress_bar",
                    "false",
                    *overrides,
                ]
            )
            seconds = time.perf_counter() - start
            m = {k.removeprefix("val/"): float(v) for k, v in cli.trainer.callback_metrics.items()}
            cells = [
                f"{m[f'{name}_mean_rel_err']:.4f} / {m[f'{name}_cov_rel_err']:.4f}"
                for name in ("policy_optimum", "optimum", "target")
            ]
            chains = " (1,024 chains)" if world == "other" and algorithm in LARGER_ROLLOUT else ""
            print(
                f"| {algorithm} | {world}{chains} | {' | '.join(cells)} | {seconds:.0f} s |",
                flush=True,
            )


if __name__ == "__main__":
    main_()
