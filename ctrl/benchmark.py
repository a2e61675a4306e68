"""``ctrl benchmark --config configs/digits/benchmark_<task>.yaml``: every method of a conditional-control task
side by side, judged the same way.

Three kinds of rows, in this order: the pretrained model (the baseline), inference-time methods
(:mod:`ctrl.inference_time`, on the same pretrained model and reward) and fine-tuning rows (``ctrl fit`` runs
of control configs, one per plugin). Whatever a row needs trained (a fine-tuned policy; the conditional model
of classifier-free guidance: ``baseline_models``) is trained here, under ``<output>/runs/<name>``, and reused
unless ``retrain``; an inference-time method only loads what it is given. Every method samples the same
labels with the same seeds (the same x_T), and the task's evaluator (the config's; for digits the true
labeller of the label set) scores them all. Written to ``output``: ``table.md`` (markdown), ``results.csv``
and ``samples.png`` (a grid per method: a row per label). The first fine-tuning row is also evaluated at
each of ``control_scales``.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jsonargparse import ActionConfigFile
from PIL import Image, ImageDraw
from torch import Tensor
from tqdm import tqdm

from ctrl import commands
from ctrl.errors import SettingError, located_in, renamed_setting
from ctrl.images import grid_image
from ctrl.inference_time import GuidedSampler
from ctrl.parser import CtrlArgumentParser
from ctrl.seeds import TEST, check_seeds

COLUMNS = ("method", "accuracy", "macro_f1", "frechet", "kl", "sampling_s_per_image", "training_s")


@dataclass
class FitRun:
    """A ``ctrl fit --config <config> <args...>`` run of the benchmark.

    Attributes:
        name: the row's name in the table (e.g. the plugin), or, in ``baseline_models``, the class name of
            the inference-time method that loads the trained model.
        config: the fit config (for a fine-tuning row its evaluator, reward and policy define the task).
        args: extra command-line overrides (e.g. ``["--model.algorithm", "PPO"]``).
    """

    name: str
    config: str
    args: list[str] = field(default_factory=list)

    def cli(self, root: Path, subcommand: str | None = None, *extra: str) -> commands.CtrlCLI:
        """The run under ``root/<name>``: instantiated only (``subcommand`` None), or run."""
        args = ["--config", self.config, *self.args, "--trainer.default_root_dir", str(root / self.name), *extra]
        return commands.main([subcommand, *args] if subcommand else args, run=subcommand is not None)

    def train(self, root: Path, retrain: bool, *extra: str) -> tuple[float, commands.CtrlCLI | None]:
        """Fit under ``root/<name>`` unless a finished run is there: the training seconds and the fit's CLI
        (None when the finished run was reused)."""
        done, cli = root / self.name / "train_seconds.json", None
        if retrain or not done.is_file():
            start = time.perf_counter()
            cli = self.cli(root, "fit", "--trainer.enable_progress_bar", "false", *extra)
            done.write_text(json.dumps({"seconds": time.perf_counter() - start}))
        return json.loads(done.read_text())["seconds"], cli


def _scores(module, images: Tensor, labels: Tensor, kl: Tensor | None = None) -> dict[str, float]:
    """The evaluator's figures and the mean reward of decoded ``images`` sampled for conditions ``labels``."""
    reward_labels = module.policy.reward_labels(labels)
    metrics = module.evaluator.evaluate(images, reward_labels) if module.evaluator else {}
    # the main figures, and per-label-set ones of a multi-task evaluator (``<set>_accuracy``, ``<set>_macro_f1``)
    out = {
        k: float(v)
        for k, v in metrics.items()
        if k in ("accuracy", "macro_f1", "frechet")
        or (k.endswith(("_accuracy", "_macro_f1")) and k != "min_class_accuracy")
    }
    out["reward"] = float(module.policy.score_images(module.reward, images, labels).mean())
    if kl is not None:
        out["kl"] = float(kl)
    return out


class _Table:
    """The rows of one benchmark: every method draws the same labels with the same seeds, scored by the
    reference row's (the first fine-tuning row's) reward and evaluator."""

    def __init__(self, base, per_label: int, seed: int, total_methods: int):
        self.base, self.num_steps = base, base.eval_num_steps
        self.labels = torch.arange(base.policy.num_labels).repeat_interleave(per_label)
        check_seeds("seed", seed, len(self.labels), "test")
        self.seeds = torch.arange(len(self.labels)) + seed
        self.rows: list[dict] = []
        self.panels: list[tuple[str, Tensor, Tensor]] = []
        self.progress = tqdm(total=total_methods * base.policy.num_labels, desc="benchmark", unit="label")

    def draw(self, name: str, draw: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, float]:
        """``draw(labels, seeds)`` for each label in turn (the bar names the method and label): the samples
        in ``labels``' order and the seconds per image. Every chain's x_T comes from its own seed, so the
        split changes nothing but the bar."""
        out, seconds = [], 0.0
        for y in self.labels.unique().tolist():
            self.progress.set_postfix_str(f"{name}: label {y}")
            pick = self.labels == y
            start = time.perf_counter()
            out.append(draw(self.labels[pick], self.seeds[pick]))
            seconds += time.perf_counter() - start
            self.progress.update()
        return torch.cat(out), seconds / len(self.labels)

    def record(self, name: str, samples: Tensor, sampling_s: float, training_s: float, kl=None, **extra) -> None:
        images = self.base.policy.decode(samples)
        self.rows.append(
            {
                "method": name,
                **_scores(self.base, images, self.labels, kl),
                "sampling_s_per_image": sampling_s,
                "training_s": training_s,
                **extra,
            }
        )
        self.panels.append((name, images.cpu(), self.labels))

    def pretrained(self) -> None:
        samples, seconds = self.draw("pretrained", lambda y, s: self.base.generate(y, s, 0.0).samples)
        self.record("pretrained", samples, seconds, 0.0)

    def inference_time(self, sampler: GuidedSampler, training_s: float) -> None:
        name, calls = type(sampler).__name__, []

        def draw(y, s):
            guided = sampler.sample(self.base.policy, self.base.reward, y, s, self.num_steps, self.base.eta)
            calls.append(guided.denoiser_calls_per_image * len(y))
            return guided.samples

        samples, seconds = self.draw(name, draw)
        self.record(name, samples, seconds, training_s, denoiser_calls_per_image=sum(calls) / len(self.labels))

    def fine_tuned(self, name: str, module, training_s: float, scales: list[float]) -> None:
        """The fitted ``module`` at its own control scale, then at each of ``scales``."""
        for scale in [module.control_scale, *scales]:
            row = name if scale == module.control_scale else f"{name} gamma={scale:g}"
            kls = []

            def draw(y, s, scale=scale, kls=kls):
                trajectory = module.generate(y, s, scale, self.num_steps)
                kls.append(trajectory.kl.sum(1))
                return trajectory.samples

            samples, seconds = self.draw(row, draw)
            self.record(row, samples, seconds, training_s, kl=torch.cat(kls).mean())


def _fitted(run: FitRun, runs: Path, retrain: bool):
    """The module of a fine-tuning row, trained (or reloaded from its finished run), and its training seconds."""
    training_s, cli = run.train(runs, retrain)
    if cli is None:
        last = runs / run.name / "checkpoints" / "last.ckpt"
        cli = run.cli(runs, "validate", "--ckpt_path", str(last), "--trainer.enable_progress_bar", "false")
    return cli.model.eval(), training_s


def _check_rows(
    fine_tuning: list[FitRun], inference_time: list[GuidedSampler], baseline_models: list[FitRun], runs: Path
) -> list:
    """Instantiate (and so check) every row before any training; the fine-tuning rows' modules."""
    if not fine_tuning:
        raise ValueError("fine_tuning: give at least one fine-tuning row (its config defines the task).")
    names = [r.name for r in fine_tuning] + [type(g).__name__ for g in inference_time]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark: method names must be unique, got {names}; rename the fine-tuning rows.")
    trained = {m.name for m in baseline_models}
    for model in baseline_models:
        if model.name not in names[len(fine_tuning) :]:
            raise ValueError(
                f"baseline_models: '{model.name}' is not one of the inference_time methods "
                f"{names[len(fine_tuning) :]}; name the method whose model the config trains."
            )
        model.cli(runs, None, "--model.export_dir", str(runs / model.name / "model"))
    for sampler in inference_time:
        if sampler.requires_model and not sampler.has_model() and type(sampler).__name__ not in trained:
            raise SettingError(
                sampler,
                "pretrained",
                "no model to load: give the directory of a trained one, or a "
                f"baseline_models entry named {type(sampler).__name__} whose config trains it.",
            )
    return [row.cli(runs) for row in fine_tuning]


def run_benchmark(
    fine_tuning: list[FitRun],
    inference_time: list[GuidedSampler] | None = None,
    baseline_models: list[FitRun] | None = None,
    output: str = "benchmarks/results",
    per_label: int = 50,
    control_scales: list[float] | None = None,
    seed: int = TEST.start + 123_456,
    retrain: bool = False,
    guidance: list[GuidedSampler] | None = None,
    gammas: list[float] | None = None,
) -> list[dict]:
    """Run every method and write the table, CSV and figure (module docstring).

    Args:
        fine_tuning: the fine-tuning rows; the first one's config also provides the pretrained model,
            reward, evaluator and sampling settings of the inference-time rows and the baseline.
        inference_time: inference-time methods (``class_path: ctrl.inference_time.SMC`` ...).
        baseline_models: what an inference-time method needs trained first (classifier-free guidance's
            conditional model): a fit config per method, named by the method's class name; the model it
            exports (``--model.export_dir``) is loaded into the method.
        output: folder of table.md, results.csv, samples.png and the runs (``runs/<name>``).
        per_label: samples per label for every method.
        control_scales: control scales (gamma) at which the first fine-tuning row is also evaluated.
        seed: the evaluation seeds are ``seed, seed + 1, ...`` (the same x_T for every method), test seeds
            (:mod:`ctrl.seeds`): the table reports, nothing is chosen on them.
        retrain: train again even when ``runs/<name>`` holds a finished run.
        guidance: the old name of ``inference_time`` (works, with a notice).
        gammas: the old name of ``control_scales`` (works, with a notice).
    """
    inference_time = renamed_setting("benchmark", "guidance", guidance, "inference_time", inference_time) or []
    control_scales = renamed_setting("benchmark", "gammas", gammas, "control_scales", control_scales) or []
    baseline_models = baseline_models or []
    out = Path(output)
    runs = out / "runs"
    bases = _check_rows(fine_tuning, inference_time, baseline_models, runs)
    table = _Table(bases[0].model, per_label, seed, 2 + len(inference_time) + len(fine_tuning) + len(control_scales))
    table.pretrained()
    models = {m.name: m for m in baseline_models}
    for sampler in inference_time:
        name = type(sampler).__name__
        training_s = 0.0
        if name in models:
            table.progress.set_postfix_str(f"{name}: training its model")
            training_s, _ = models[name].train(runs, retrain, "--model.export_dir", str(runs / name / "model"))
            sampler.load(runs / name / "model")
        table.inference_time(sampler, training_s)
    for i, run in enumerate(fine_tuning):
        table.progress.set_postfix_str(f"{run.name}: training")
        module, training_s = _fitted(run, runs, retrain)
        table.fine_tuned(run.name, module, training_s, control_scales if i == 0 else [])
    table.progress.close()
    write_outputs(table.rows, table.panels, out, min(per_label, 8))
    return table.rows


def _sheet(panels: list[tuple[str, Tensor, Tensor]], per_row: int, path: Path, scale: int = 3) -> None:
    """One PNG: a panel per method (rows: labels, ``per_row`` samples each), its name above it."""
    tiles = []
    for name, images, labels in panels:
        rows = [images[labels == y][:per_row] for y in labels.unique().tolist()]
        tile = grid_image(torch.cat(rows), len(rows), scale).convert("RGB")
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
    _sheet([p for p in panels if " gamma=" not in p[0]], per_row, out / "samples.png")
    print("\n".join(lines))
    print(f"wrote {out / 'table.md'}, {out / 'results.csv'} and {out / 'samples.png'}")


def build_parser() -> CtrlArgumentParser:
    """The parser of ``ctrl benchmark``: ``--config`` and every argument of :func:`run_benchmark`."""
    parser = CtrlArgumentParser(prog="ctrl benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(run_benchmark)
    return parser


def parse(args: list[str] | None = None) -> dict:
    """The arguments of :func:`run_benchmark` from ``--config`` (and overrides), methods instantiated."""
    parser = build_parser()
    config = parser.parse_args(args)
    with located_in(config):
        init = parser.instantiate_classes(config)
    init.pop("config", None)
    return init


def main(args: list[str] | None = None) -> list[dict]:
    """Parse ``--config`` (and overrides) and run the benchmark."""
    return run_benchmark(**parse(args))
