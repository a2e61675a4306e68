"""``ctrl benchmark --config configs/digits/benchmark_<task>.yaml``: every method of a conditional-control task
side by side, judged the same way.

Fine-tuning rows are ``ctrl fit`` runs of control configs (one per plugin); inference-time rows are
guided samplers (``ctrl.guidance``) on the same pretrained model and reward (classifier-free guidance
trains its own conditional model first: :meth:`GuidedSampler.prepare`); the pretrained model is the
baseline. Trained rows are kept under ``<output>/runs`` and reused unless ``retrain``. Every method
samples the same labels with the same seeds (the same x_T), and the task's evaluator (the config's; for
digits the true labeller of the label set) scores them all. Written to ``output``: ``table.md``
(markdown), ``results.csv`` and ``samples.png`` (a grid per method: a row per label). A guidance-strength
sweep (gamma) of the first fine-tuning row is included.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ctrl.guidance import GuidedSampler
from ctrl.seeds import TEST, check_seeds

COLUMNS = ("method", "accuracy", "macro_f1", "frechet", "kl", "sampling_s_per_image", "training_s")


@dataclass
class FineTuningRow:
    """A fine-tuning method: ``ctrl fit --config <config> <args...>``.

    Attributes:
        name: the row's name in the table (e.g. the plugin).
        config: the control config (its evaluator, reward and policy define the task).
        args: extra command-line overrides (e.g. ``["--model.algorithm", "PPO"]``).
    """

    name: str
    config: str
    args: list[str] = field(default_factory=list)


def _cli(row: FineTuningRow, root: Path, subcommand: str | None, *extra: str):
    from ctrl.cli import main

    args = ["--config", row.config, *row.args, "--trainer.default_root_dir", str(root / row.name), *extra]
    return main([subcommand, *args] if subcommand else args, run=subcommand is not None)


def _scores(module, images, labels, kl=None) -> dict[str, float]:
    """The evaluator's figures and the mean reward of decoded ``images`` sampled for conditions ``labels``."""
    reward_labels = module.policy.reward_labels(labels)
    metrics = module.evaluator.evaluate(images, reward_labels) if module.evaluator else {}
    # the main figures, and per-label-set ones of a multi-task evaluator (``<set>_accuracy``, ``<set>_macro_f1``)
    out = {k: float(v) for k, v in metrics.items() if k in ("accuracy", "macro_f1", "frechet")
           or (k.endswith(("_accuracy", "_macro_f1")) and k != "min_class_accuracy")}
    out["reward"] = float(module.reward(images, reward_labels).mean())
    if kl is not None:
        out["kl"] = float(kl)
    return out


def _grid(panels: list[tuple[str, torch.Tensor, torch.Tensor]], per_row: int, path: Path, scale: int = 3) -> None:
    """One PNG: a panel per method (rows: labels, ``per_row`` samples each), its name above it."""
    import numpy as np
    from PIL import Image, ImageDraw

    from ctrl.module import image_grid

    tiles = []
    for name, images, labels in panels:
        rows = [images[labels == y][:per_row] for y in labels.unique().tolist()]
        grid = image_grid(torch.cat(rows), len(rows))
        pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        tile = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).convert("RGB")
        tile = tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)
        framed = Image.new("RGB", (tile.width + 8, tile.height + 16), "white")
        framed.paste(tile, (4, 14))
        ImageDraw.Draw(framed).text((4, 1), name, fill="black")
        tiles.append(framed)
    sheet = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)), "white")
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def run_benchmark(
    fine_tuning: list[FineTuningRow],
    guidance: list[GuidedSampler] | None = None,
    output: str = "benchmarks/results",
    per_label: int = 50,
    gammas: list[float] | None = None,
    seed: int = TEST.start + 123_456,
    retrain: bool = False,
) -> list[dict]:
    """Run every method and write the table, CSV and figure (module docstring).

    Args:
        fine_tuning: the fine-tuning rows; the first one's config also provides the pretrained model,
            reward, evaluator and sampling settings of the guidance rows and the baseline.
        guidance: inference-time samplers (``class_path: ctrl.guidance.SMC`` ...).
        output: folder of table.md, results.csv, samples.png and the runs (``runs/<name>``).
        per_label: samples per label for every method.
        gammas: guidance strengths at which the first fine-tuning row is also evaluated.
        seed: the evaluation seeds are ``seed, seed + 1, ...`` (the same x_T for every method), test seeds
            (:mod:`ctrl.seeds`): the table reports, nothing is chosen on them.
        retrain: train again even when ``runs/<name>`` holds a finished run.
    """
    guidance = guidance or []
    if not fine_tuning:
        raise ValueError("fine_tuning: give at least one fine-tuning row (its config defines the task).")
    names = [r.name for r in fine_tuning] + [type(g).__name__ for g in guidance]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark: method names must be unique, got {names}; rename the fine-tuning rows.")
    out = Path(output)
    runs = out / "runs"
    # Everything is instantiated (and so checked) before any training starts.
    bases = [_cli(row, runs, None) for row in fine_tuning]
    for sampler in guidance:
        sampler.check(runs / type(sampler).__name__)
    base = bases[0].model
    labels = torch.arange(base.policy.num_labels).repeat_interleave(per_label)
    check_seeds("seed", seed, len(labels), "test")
    seeds = torch.arange(len(labels)) + seed
    num_steps = base.eval_num_steps
    results, panels = [], []
    progress = tqdm(total=(2 + len(guidance) + len(fine_tuning) + len(gammas or [])) * base.policy.num_labels,
                    desc="benchmark", unit="label")

    def each_label(name: str, draw) -> tuple[torch.Tensor, float]:
        """``draw(labels, seeds)`` for each label in turn (the bar names the method and label): the samples
        in ``labels``' order and the seconds per image. Every chain's x_T comes from its own seed, so the
        split changes nothing but the bar."""
        out, seconds = [], 0.0
        for y in labels.unique().tolist():
            progress.set_postfix_str(f"{name}: label {y}")
            pick = labels == y
            start = time.perf_counter()
            out.append(draw(labels[pick], seeds[pick]))
            seconds += time.perf_counter() - start
            progress.update()
        return torch.cat(out), seconds / len(labels)

    def record(name, samples, kl, sampling_s, training_s, **extra):
        images = base.policy.decode(samples)
        row = {"method": name, **_scores(base, images, labels, kl), "sampling_s_per_image": sampling_s,
               "training_s": training_s, **extra}
        results.append(row)
        panels.append((name, images.cpu(), labels))

    samples, sampling_s = each_label("pretrained", lambda y, s: base.generate(y, s, 0.0, num_steps).samples)
    record("pretrained", samples, None, sampling_s, 0.0)
    for sampler in guidance:
        name = type(sampler).__name__
        progress.set_postfix_str(f"{name}: preparing")
        training_s = sampler.prepare(runs / name, retrain)
        calls = []

        def draw(y, s):
            guided = sampler.sample(base.policy, base.reward, y, s, num_steps, base.eta)
            calls.append(guided.denoiser_calls_per_image * len(y))
            return guided.samples

        samples, sampling_s = each_label(name, draw)
        record(name, samples, None, sampling_s, training_s, denoiser_calls_per_image=sum(calls) / len(labels))
    for i, row in enumerate(fine_tuning):
        progress.set_postfix_str(f"{row.name}: training")
        done = runs / row.name / "train_seconds.json"
        last = runs / row.name / "checkpoints" / "last.ckpt"
        if retrain or not (done.is_file() and last.is_file()):
            start = time.perf_counter()
            module = _cli(row, runs, "fit", "--trainer.enable_progress_bar", "false").model
            training_s = time.perf_counter() - start
            done.write_text(json.dumps({"seconds": training_s}))
        else:
            module = _cli(row, runs, "validate", "--ckpt_path", str(last), "--trainer.enable_progress_bar",
                          "false").model
            training_s = json.loads(done.read_text())["seconds"]
        module.eval()
        for gamma in ([module.guidance] + (gammas or []) if i == 0 else [module.guidance]):
            name = row.name if gamma == module.guidance else f"{row.name} gamma={gamma:g}"
            kls = []

            def draw(y, s):
                traj = module.generate(y, s, gamma, num_steps)
                kls.append(traj.kl.sum(1))
                return traj.samples

            samples, sampling_s = each_label(name, draw)
            record(name, samples, torch.cat(kls).mean(), sampling_s, training_s)
    progress.close()
    write_outputs(results, panels, out, min(per_label, 8))
    return results


def write_outputs(results: list[dict], panels, out: Path, per_row: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    extra = sorted({k for r in results for k in r} - set(COLUMNS))
    columns = list(COLUMNS) + extra
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(results)

    def cell(value):
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in results]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    _grid([p for p in panels if " gamma=" not in p[0]], per_row, out / "samples.png")
    print("\n".join(lines))
    print(f"wrote {out / 'table.md'}, {out / 'results.csv'} and {out / 'samples.png'}")


def parse(args: list[str] | None = None) -> dict:
    """The arguments of :func:`run_benchmark` from ``--config`` (and overrides), samplers instantiated."""
    from jsonargparse import ActionConfigFile

    from ctrl.cli import CtrlArgumentParser

    parser = CtrlArgumentParser(prog="ctrl benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(run_benchmark)
    init = parser.instantiate_classes(parser.parse_args(args))
    init.pop("config", None)
    return init


def main(args: list[str] | None = None) -> list[dict]:
    """Parse ``--config`` (and overrides) and run the benchmark."""
    return run_benchmark(**parse(args))
