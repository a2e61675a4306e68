"""``ctrl benchmark --config configs/digits/benchmark_<task>.yaml``: every method of a conditional-control task
side by side, at one target, tuned by one rule, reported on test seeds with their spread.

Three kinds of rows, in this order: the pretrained model (the baseline), inference-time methods
(:mod:`ctrl.inference_time`, on the same pretrained model and reward) and fine-tuning rows (``ctrl fit`` runs of
control configs, one per plugin). Whatever a row needs trained (a fine-tuned policy; the conditional model of
classifier-free guidance: ``baseline_models``) is trained here, under ``<output>/runs/``, and reused unless
``retrain`` or its inputs changed (:meth:`FitRun.inputs`); an inference-time method only loads what it is given.
Each row's figures and the first samples of each label are kept in ``<output>/rows/`` (a few kB a row, beside the
tables: commit it), and so is each fine-tuning fit's training time, so a benchmark stopped part way resumes where it
stopped, on this machine or from a clone on another that lacks ``runs/``: every inference-time row (each repeat's,
at the chosen setting) is sampled before the first fit, and every row of a fit (its validation row, its first
repeat's test rows at every control scale and step count) as soon as it is trained, so no row needs a model from
another machine later. A row is sampled anew when its method's settings, the seeds, the first row's config or the
weights it loads (the pretrained model, the reward; a classifier's temperature is not a weight: after recalibrating
one alone, give ``retrain``), or the row's trained model differ, and with ``retrain``. Every method samples the same
labels with the same seeds (the same x_T), and the task's evaluator (the config's; for digits the true labeller of
the label set) scores them all.

The protocol (:mod:`ctrl.tuning`): every method is compared at the fine-tuning rows' KL weight
(``same_target``); a method with several settings (a fine-tuning row's ``sweep``, an inference-time
method's ``inference_sweeps`` entry; at most :data:`ctrl.tuning.MAX_SETTINGS` each) tries them on the
validation seeds and keeps one by the one rule; then every method runs once per training seed
(``training_seeds``: fine-tuning rows are trained with it, and each repeat samples its own set of test
seeds), and the table gives mean +- std over those repeats. A fit that stops itself (its rewards went NaN: it
diverged) is a result, not an error: its rows have no figures and ``diverged`` 1, the rule passes over such a
setting, and a method's means are over the repeats that trained (``diverged``: the share that did not).

Written to ``output``: ``table.md`` (mean +- std), ``results.csv`` (every repeat's row), ``sweep.md`` and
``sweep.csv`` (each setting's validation figures and the choice; only when some method has several),
``samples.png`` (the first repeat: a grid per method, a row per label), ``accuracy_frechet.png`` (every
setting tried, the kept one marked; the test figures with their spread) and ``accuracy_calls.png`` (test
accuracy against denoiser calls per image, counted). The first fine-tuning row is also evaluated at each of
``control_scales``, and when the first row's ``model.eval_num_steps`` lists further step counts
(``[50, 25, 100]``), the pretrained model and every fine-tuning row are also sampled at each (rows
``<method> steps=<n>``): robustness to a step count the model was not trained at.

The labelled-data curve (``labelled_per_class``, :func:`labelled_curve`) runs all of it once per size of the
offline labelled set, the reward classifier and the conditional model of classifier-free guidance learning from
the same images each time (the whole set: the task as configured, in ``output`` itself; a cut to n per class in
``<output>/labelled_<n>``), each method at the setting it kept on the whole set, and adds ``curve.md``,
``curve.csv`` and ``accuracy_labelled.png``.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import inspect
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ActionConfigFile
from PIL import Image, ImageDraw
from torch import Tensor
from tqdm import tqdm

from ctrl import commands, figures
from ctrl.errors import SettingError, located_in, renamed_setting
from ctrl.images import grid_image
from ctrl.inference_time import GuidedSampler
from ctrl.module import RunStopped
from ctrl.parser import CtrlArgumentParser
from ctrl.seeds import TEST, VALIDATION, check_seeds, run_seed_args
from ctrl.tuning import MAX_SETTINGS, choose, mean_std

COLUMNS = (
    "method",
    "accuracy",
    "macro_f1",
    "frechet",
    "frechet_floor",
    "kid",
    "kl",
    "sampling_s_per_image",
    "training_s",
)
#: samples per label that a row keeps for ``samples.png`` (a row's panel)
PANEL_PER_LABEL = 8


@dataclass
class FitRun:
    """A ``ctrl fit --config <config> <args...>`` run of the benchmark.

    Attributes:
        name: the row's name in the table (e.g. the plugin), or, in ``baseline_models``, the class name of
            the inference-time method that loads the trained model.
        config: the fit config (for a fine-tuning row its evaluator, reward and policy define the task).
        args: extra command-line overrides (e.g. ``["--model.algorithm", "PPO"]``).
        sweep: the settings a fine-tuning row tries on validation seeds, each a list of further overrides
            (``[--model.policy.head_lr, "0.004"]``; ``[]`` is the row as configured); None: the row as
            configured, nothing tried.
    """

    name: str
    config: str
    args: list[str] = field(default_factory=list)
    sweep: list[list[str]] | None = None

    def settings(self) -> list[list[str]]:
        """The overrides of each setting the row tries (one, empty, without a sweep)."""
        return [[]] if self.sweep is None else self.sweep

    def cli(self, folder: Path, subcommand: str | None = None, *extra: str) -> commands.CtrlCLI:
        """The run in ``folder``: instantiated only (``subcommand`` None), or run."""
        args = ["--config", self.config, *self.args, "--trainer.default_root_dir", str(folder), *extra]
        return commands.main([subcommand, *args] if subcommand else args, run=subcommand is not None)

    def train(self, folder: Path, retrain: bool, *extra: str, done: Path | None = None, weights: str = ""):
        """Fit in ``folder`` unless a finished run of the same inputs is there (``done``, by default
        ``<folder>/train_seconds.json``, holds its training seconds, :meth:`inputs` and ``weights``, the
        fingerprint of the weights its config loads by name, such as a ``ctrl:`` reward; a mark written before
        marks held either counts as the same): the training seconds, the fit's CLI (None when the finished run was
        reused or diverged) and why it diverged (None if it trained to the end). A fit that stopped itself
        (:class:`ctrl.module.RunStopped`: its rewards went NaN) is finished too: the mark keeps why under
        ``diverged``."""
        done, cli = done or folder / "train_seconds.json", None
        mark = {"inputs": self.inputs(*extra), **({"weights": weights} if weights else {})}
        kept = json.loads(done.read_text()) if done.is_file() else None
        if retrain or kept is None or any(kept.get(k, v) != v for k, v in mark.items()):
            start, stopped = time.perf_counter(), {}
            try:
                cli = self.cli(folder, "fit", "--trainer.enable_progress_bar", "false", *extra)
            except RunStopped as err:
                stopped = {"diverged": str(err)}
                print(f"benchmark: {self.name} {' '.join(extra)} stopped ({err}); its rows are marked diverged")
            kept = {"seconds": time.perf_counter() - start, **mark, **stopped}
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps(kept))
        return kept["seconds"], cli, kept.get("diverged")

    def inputs(self, *extra: str) -> str:
        """What the fit learns from (sha1): the config's text, the overrides and ``extra``, and the bytes of every
        file that ``args`` name (a reward classifier's weights and temperature, say). ``extra`` names the
        fit's own outputs (an export path), whose bytes are not inputs."""
        digest = hashlib.sha1(_fingerprint(self, *extra).encode())
        for arg in self.args:
            if Path(arg).is_file():
                digest.update(Path(arg).read_bytes())
        return digest.hexdigest()[:16]


@dataclass
class RewardClassifier:
    """A reward classifier the labelled-data curve trains anew at each size of the labelled set.

    Attributes:
        name: its folder under ``runs/`` of each size.
        config: the classifier's fit config (its data module takes ``data.labelled_per_class``).
        args: extra command-line overrides.
        setting: the fine-tuning rows' setting that takes the trained classifier's file.
        export: the classifier config's setting that names the file it writes.
    """

    name: str
    config: str
    args: list[str] = field(default_factory=list)
    setting: str = "--model.reward.init_args.path"
    export: str = "--model.export_path"

    def run(self) -> FitRun:
        """The classifier's fit as a :class:`FitRun` (trained into ``runs/<name>`` of each size)."""
        return FitRun(self.name, self.config, self.args)


def _describe(setting) -> str:
    """A setting as the tables name it: its overrides, or "as configured"."""
    if isinstance(setting, dict):
        return " ".join(f"{k}={v}" for k, v in setting.items()) or "as configured"
    return " ".join(setting) or "as configured"


def _settings_of(sampler: GuidedSampler) -> dict:
    """An inference-time method's constructor settings, read back from the instance (an attribute of each name). A
    setting whose default is None and that the instance does not keep (an old name, such as SMC's ``lam``) is left
    out; any other one missing is refused, since rebuilding the method without it would silently take its default."""
    params = [p for p in inspect.signature(type(sampler).__init__).parameters.values() if p.name != "self"]
    params = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    lost = [p.name for p in params if not hasattr(sampler, p.name) and p.default is not None]
    if lost:
        name = type(sampler).__name__
        raise ValueError(
            f"inference_time {name}: ctrl benchmark rebuilds each method from its constructor settings read back "
            f"from the instance, but {name} keeps no attribute '{lost[0]}'; store it as self.{lost[0]} in __init__."
        )
    return {p.name: getattr(sampler, p.name) for p in params if hasattr(sampler, p.name)}


def _variants(sampler: GuidedSampler, sweep: list[dict] | None) -> list[GuidedSampler]:
    """The inference-time method at each setting of its sweep (None: its own settings): a new instance per
    setting, built from its own settings with the setting's values over them (so every value is checked as the
    config's). New even without a sweep: a method with a model of its own (classifier-free guidance) holds the
    model a run loaded, and each size of the labelled-data curve must start without the last size's."""
    return [type(sampler)(**{**_settings_of(sampler), **setting}) for setting in sweep or [{}]]


def _fingerprint(run: FitRun, *extra: str) -> str:
    """What a fit config makes of its samples: its file's text and the overrides (sha1)."""
    text = Path(run.config).read_text() if Path(run.config).is_file() else run.config
    return hashlib.sha1(repr((text, run.args, extra)).encode()).hexdigest()[:16]


def _weights_fingerprint(*modules) -> str:
    """The weights and buffers of ``modules`` (sha1): the pretrained model and the reward a base config loads, so
    a file replaced under the same path is noticed."""
    digest = hashlib.sha1()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _scores(module, images: Tensor, labels: Tensor, kl: Tensor | None = None) -> dict[str, float]:
    """The evaluator's figures and the mean reward of decoded ``images`` sampled for conditions ``labels``."""
    reward_labels = module.policy.reward_labels(labels)
    metrics = module.evaluator.evaluate(images, reward_labels) if module.evaluator else {}
    # the main figures, and per-label-set ones of a multi-task evaluator (``<set>_accuracy``, ``<set>_macro_f1``)
    out = {
        k: float(v)
        for k, v in metrics.items()
        if k in ("accuracy", "macro_f1", "frechet", "frechet_floor", "kid")
        or (k.endswith(("_accuracy", "_macro_f1")) and k != "min_class_accuracy")
    }
    out["reward"] = float(module.policy.score_images(module.reward, images, labels).mean())
    if kl is not None:
        out["kl"] = float(kl)
    return out


@dataclass
class _RowStore:
    """Where a benchmark keeps its rows: ``folder``; ``base``: the fingerprint of the config and weights every row
    shares (:meth:`_Plan.keep_rows`); ``reuse``: read kept rows back (False: sample anew, keep the new, and read
    back only those this run wrote, ``written``)."""

    folder: Path
    base: str
    reuse: bool = True
    written: set[Path] = field(default_factory=set)  # shared by every table's copy (dataclasses.replace)

    def fit_seconds(self, runs: Path, folder: Path) -> Path:
        """Where the training seconds of the fit in ``folder`` (under ``runs``) are kept: the fit's mark of done."""
        return self.folder / "fits" / folder.relative_to(runs).with_suffix(".json")


class _Table:
    """The rows of one benchmark: every method draws the same labels with the same seeds, scored by the
    reference row's (the first fine-tuning row's) reward and evaluator."""

    def __init__(self, base, per_label: int, seed: int, progress: tqdm, rows: _RowStore | None = None, **tags):
        """``per_label`` samples per label from seeds ``seed, seed + 1, ...``; ``tags`` go into every row.
        ``rows``: where each row is kept (:meth:`row`; None: nowhere)."""
        self.base, self.num_steps, self.progress, self.tags = base, base.eval_num_steps, progress, tags
        self.labels = torch.arange(base.policy.num_labels).repeat_interleave(per_label)
        self.seeds = torch.arange(len(self.labels)) + seed
        self.per_row = min(per_label, PANEL_PER_LABEL)
        draws = f"seed_{seed}_per_label_{per_label}_steps_{self.num_steps}_eta_{base.eta:g}"
        self.store = None if rows is None else replace(rows, folder=rows.folder / draws)
        self.rows: list[dict] = []
        self.panels: list[tuple[str, Tensor, Tensor]] = []

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

    def row(self, name: str, key: str, produce: Callable[[], tuple[Tensor, float, dict]], training_s: float, **extra):
        """The row ``name``: ``produce()`` gives its samples ``[N, ...]``, seconds per image and further figures
        (``kl``: the per-chain KL's mean), scored by the evaluator. The figures and the panel (the first
        :data:`PANEL_PER_LABEL` images of each label, 8-bit) are kept in the table's folder under ``key`` (what
        identifies the row's method and settings, the base config and weights, and its trained model) and read back
        from there instead when an earlier run of the benchmark left them. ``extra`` goes into the row."""
        scores, panel = self._kept(key) if self.store is not None else (None, None)
        if scores is None:
            samples, seconds, found = produce()
            images = self.base.policy.decode(samples)
            scores = _scores(self.base, images, self.labels, found.pop("kl", None))
            scores.update(sampling_s_per_image=seconds, found=found)
            panel = torch.cat([images[self.labels == y][: self.per_row] for y in self.labels.unique().tolist()])
            panel = (panel.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
            self._keep(key, scores, panel)
        else:
            self.progress.update(len(self.labels.unique()))
        found = scores.pop("found")
        row = {"method": name, **scores, "training_s": training_s, **self.tags, **found, **extra}
        self.rows.append(row)
        self.panels.append((name, panel.float() / 255, self.labels.unique().repeat_interleave(self.per_row)))
        return row

    def diverged(self, name: str, training_s: float, **extra) -> dict:
        """The row ``name`` of a fit that diverged: nothing to sample, every figure of the table's first row (the
        pretrained model's) NaN, ``diverged`` 1 (0 in the rows of a fit that trained to the end)."""
        figures = {k: math.nan for k, v in self.rows[0].items() if isinstance(v, float) and k != "frechet_floor"}
        row = {"method": name, **figures, "frechet_floor": self.rows[0].get("frechet_floor", math.nan)}
        row.update(training_s=training_s, **self.tags, diverged=1.0, **extra)
        self.rows.append(row)
        self.progress.update(len(self.labels.unique()))
        return row

    def _path(self, key: str) -> tuple[str, Path]:
        key = f"{key} | base {self.store.base}"
        return key, self.store.folder / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.pt"

    def _kept(self, key: str) -> tuple[dict | None, Tensor | None]:
        key, path = self._path(key)
        if (self.store.reuse or path in self.store.written) and path.is_file():
            stored = torch.load(path, weights_only=True)
            if stored["key"] == key:
                return stored["scores"], stored["panel"]
        return None, None

    def _keep(self, key: str, scores: dict, panel: Tensor) -> None:
        if self.store is None:
            return
        key, path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        torch.save({"key": key, "scores": {**scores, "found": dict(scores["found"])}, "panel": panel}, partial)
        partial.replace(path)  # a run stopped while writing leaves no half file behind
        self.store.written.add(path)

    def counted(self, name: str, policy, draw: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, float, dict]:
        """:meth:`draw` with the samples through ``policy``'s denoising network counted by a forward hook (a CFG
        pair counts two): the samples, the seconds per image and ``{denoiser_calls_per_image: ...}`` (empty for a
        policy without networks, :meth:`DiffusionPolicy.networks`). Every call counts, those made only for the KL to
        the pretrained chain too: a policy whose control is inside the network (LoRA, a label embedding) shows two
        per step, a residual head on the pretrained eps one."""
        net, seen = next(iter(policy.networks()), None), []
        hook = net.register_forward_hook(lambda _, args, __: seen.append(len(args[0]))) if net is not None else None
        try:
            samples, seconds = self.draw(name, draw)
        finally:
            if hook is not None:
                hook.remove()
        return samples, seconds, {} if net is None else {"denoiser_calls_per_image": sum(seen) / len(self.labels)}

    def pretrained(self, steps: Sequence[int] = ()) -> dict:
        """The pretrained model (control scale 0) at the evaluation's steps, then at each of ``steps``: the first
        row."""
        rows = []
        for n in [self.num_steps, *steps]:
            name = "pretrained" if n == self.num_steps else f"pretrained steps={n}"
            draw = lambda y, s, n=n: self.base.generate(y, s, 0.0, n).samples  # noqa: E731
            rows.append(self.row(name, name, lambda: self.counted(name, self.base.policy, draw), 0.0))  # noqa: B023
        return rows[0]

    def inference_time(self, sampler: GuidedSampler, training_s: float, **extra) -> dict:
        name, calls = type(sampler).__name__, []

        def draw(y, s):
            guided = sampler.sample(self.base.policy, self.base.reward, y, s, self.num_steps, self.base.eta)
            calls.append(guided.denoiser_calls_per_image * len(y))
            return guided.samples

        def produce():
            if getattr(sampler, "requires_model", False) and not sampler.has_model():
                raise FileNotFoundError(
                    f"benchmark: {name}'s model was trained on another machine (rows/fits/{name}.json keeps its "
                    f"training seconds) and is not under runs/, and a row of it is missing; delete that file to "
                    "train it again."
                )
            samples, seconds = self.draw(name, draw)
            return samples, seconds, {"denoiser_calls_per_image": sum(calls) / len(self.labels)}

        key = f"{name} {sorted(_settings_of(sampler).items())!r} model trained {training_s:.6f} s"
        return self.row(name, key, produce, training_s, **extra)

    def fine_tuned(self, name: str, fitted: _Fitted, scales: list[float], steps=(), **extra) -> dict:
        """The fitted module at its own control scale (None), then at each of ``scales``, then at its own scale with
        each of ``steps`` sampling steps: the first row."""
        rows = []
        variants = [(None, self.num_steps, name)] + [(g, self.num_steps, f"{name} gamma={g:g}") for g in scales]
        variants += [(None, n, f"{name} steps={n}") for n in steps]
        if fitted.diverged is not None:
            return [self.diverged(row, fitted.training_s, **extra) for _, _, row in variants][0]
        for scale, n, row in variants:
            kls = []

            def draw(y, s, scale=scale, n=n, kls=kls):
                module = fitted.module()
                trajectory = module.generate(y, s, module.control_scale if scale is None else scale, n)
                kls.append(trajectory.kl.sum(1))
                return trajectory.samples

            def produce(row=row, draw=draw, kls=kls):
                samples, seconds, calls = self.counted(row, fitted.module().policy, draw)
                return samples, seconds, {**calls, "kl": float(torch.cat(kls).mean())}

            rows.append(self.row(row, f"{row} {fitted.source}", produce, fitted.training_s, diverged=0.0, **extra))
        return rows[0]


@dataclass
class _Fitted:
    """A fine-tuning row's trained model: ``module()`` gives it (a finished run is reloaded only when first asked
    for: rows already kept need no model); ``source`` identifies it (its config's :func:`_fingerprint` and training
    seconds: a model trained anew is another)."""

    module: Callable[[], Any]
    training_s: float
    source: str
    diverged: str | None = None  # why the fit stopped itself: its rows have no figures (:meth:`_Table.diverged`)


def _fitted(run: FitRun, folder: Path, done: Path, retrain: bool, *extra: str, weights: str = "") -> _Fitted:
    """A fine-tuning row trained in ``folder`` unless ``done`` (its training seconds) says it was, with the same
    ``weights`` (:meth:`FitRun.train`)."""
    training_s, cli, why = run.train(folder, retrain, *extra, done=done, weights=weights)
    source = f"config {_fingerprint(run, *extra)} trained {training_s:.6f} s"
    if why is not None:
        return _Fitted(lambda: None, training_s, source, diverged=why)
    if cli is not None:
        module = cli.model.eval()
        return _Fitted(lambda: module, training_s, source)

    @functools.cache
    def reload():
        last = folder / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(
                f"benchmark: {done} says {run.name} was trained in {folder}, but a row of it was not kept and "
                f"its checkpoint {last} is not here (trained on another machine?); delete {done} to train it again."
            )
        validated = run.cli(
            folder, "validate", "--ckpt_path", str(last), "--trainer.enable_progress_bar", "false", *extra
        )
        return validated.model.eval()

    return _Fitted(reload, training_s, source)


def _check_sweep(owner: str, sweep: list | None) -> None:
    if sweep is not None and not sweep:
        raise ValueError(
            f"{owner}: an empty sweep; give at least one setting, or leave it out (the row as configured)."
        )
    if sweep is not None and len(sweep) > MAX_SETTINGS:
        raise ValueError(
            f"{owner}: {len(sweep)} settings; at most {MAX_SETTINGS}, the same tuning budget for every method."
        )


def _check_rows(
    fine_tuning: list[FitRun], inference_time: list[GuidedSampler], baseline_models: list[FitRun], runs: Path
) -> list:
    """Instantiate (and so check) every row before any training; the fine-tuning rows' modules (each row as
    configured, the first setting of its sweep)."""
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
        model.cli(runs / model.name, None, "--model.export_dir", str(runs / model.name / "model"))
    for sampler in inference_time:
        if sampler.requires_model and not sampler.has_model() and type(sampler).__name__ not in trained:
            raise SettingError(
                sampler,
                "pretrained",
                "no model to load: give the directory of a trained one, or a "
                f"baseline_models entry named {type(sampler).__name__} whose config trains it.",
            )
    for row in fine_tuning:
        _check_sweep(f"fine_tuning '{row.name}'.sweep", row.sweep)
    return [row.cli(runs / row.name, None, *row.settings()[0]) for row in fine_tuning]


def _check_target(alpha: float, fine_tuning: list[tuple[str, int, Any]], samplers: list[GuidedSampler]) -> None:
    """Refuse a fine-tuning setting (``(row name, setting index, its module)``) or an inference-time method that
    aims at another target than the tilt at KL weight ``alpha``, in one line naming its setting and the value
    that would match: another KL weight, an algorithm setting whose optimum is not the tilt
    (:meth:`Algorithm.off_target`) or a control scale other than 1; a method's strength that names another
    target (:attr:`GuidedSampler.tilt_setting`)."""
    for name, k, module in fine_tuning:
        other, where = float(module.algorithm.alpha), f"fine_tuning '{name}'" + (f" (setting {k})" if k else "")
        if not math.isclose(other, alpha):
            raise ValueError(
                f"{where}: model.algorithm.alpha={other:g}, but the first row has {alpha:g}; methods "
                f"are compared at one target: add [--model.algorithm.init_args.alpha, '{alpha:g}'] to its args "
                "(or sweep), or set same_target: false."
            )
        reason = module.algorithm.off_target()
        reason = None if reason is None else f"model.algorithm.{reason}"
        if reason is None and not math.isclose(module.control_scale, 1.0):
            reason = (
                f"model.control_scale={module.control_scale:g} samples another tilt than the one trained for; set 1"
            )
        if reason is not None:
            raise ValueError(
                f"{where}: {reason} (methods are compared at one target, the tilt at alpha {alpha:g}; "
                "or set same_target: false)."
            )
    for sampler in samplers:
        target = sampler.target_alpha()
        if target is not None and not math.isclose(target, alpha):
            key = sampler.tilt_setting
            match = 1 / alpha if sampler.tilt_is_scale else alpha
            raise SettingError(
                sampler,
                key,
                f"{getattr(sampler, key):g} aims at another target (KL weight {target:g}) than the fine-tuning "
                f"rows (alpha {alpha:g}); set {key}: {match:g} to compare at one target, or same_target: false.",
            )


@dataclass
class _Plan:
    """What the benchmark runs: each method's settings, where its runs go, and the seeds."""

    fine_tuning: list[FitRun]
    variants: dict[str, list[GuidedSampler]]  # each inference-time method at each of its settings
    sweeps: dict[str, list]  # each method's settings as given (descriptions)
    runs: Path
    retrain: bool
    training_seeds: list[int] | None
    eval_steps: list[int] = field(default_factory=list)  # the first row's further step counts (model.eval_num_steps)
    store: _RowStore | None = None  # where the rows are kept (:meth:`keep_rows`)
    weights: str = ""  # the base module's pretrained model and reward (:func:`_weights_fingerprint`; keep_rows)
    fitted: dict[Path, _Fitted] = field(default_factory=dict)  # this run's fits, by folder (each trains once)

    def folder(self, run: FitRun, setting: int, seed: int | None) -> Path:
        """``runs/<name>[/setting_<i>][/seed_<s>]``: a row without a sweep or seeds keeps ``runs/<name>``."""
        folder = self.runs / run.name
        folder = folder / f"setting_{setting}" if run.sweep is not None else folder
        return folder / f"seed_{seed}" if seed is not None else folder

    def fit(self, run: FitRun, setting: int, seed: int | None) -> _Fitted:
        """The row fitted at ``setting`` with training seed ``seed`` (None: the config's): :func:`_fitted`, once
        per run of the benchmark (with ``retrain`` too)."""
        extra = [*run.settings()[setting], *([] if seed is None else run_seed_args(seed))]
        folder = self.folder(run, setting, seed)
        if folder not in self.fitted:
            done = folder / "train_seconds.json" if self.store is None else self.store.fit_seconds(self.runs, folder)
            self.fitted[folder] = _fitted(run, folder, done, self.retrain, *extra, weights=self.weights)
        return self.fitted[folder]

    def keep_rows(self, base) -> None:
        """Keep the rows and the fits' training seconds in ``<output>/rows`` (:meth:`_Table.row`), keyed by the
        first row's config and the base config's ``base`` module's weights (hashed once here); with ``retrain``
        written but not read."""
        first, self.weights = self.fine_tuning[0], _weights_fingerprint(base.policy, base.reward)
        fingerprint = f"{_fingerprint(first, *first.settings()[0])} {self.weights}"
        self.store = _RowStore(self.runs.parent / "rows", fingerprint, reuse=not self.retrain)

    def tuned(self) -> bool:
        return any(len(v) > 1 for v in self.sweeps.values())


def _tune(plan: _Plan, base, per_label, seed, rule, trained, progress, tests: list[_Table], scales) -> tuple:
    """Each method with several settings tries them on the validation seeds from ``seed``; the index chosen by
    the one rule (:func:`ctrl.tuning.choose`, Frechet at most ``rule`` x the pretrained model's) per method,
    and the sweep's rows (``setting``, ``chosen``). ``trained``: the inference-time methods' model seconds.

    What can be sampled early is, so that the repeats read it back on any machine, with no model: each
    inference-time method at its chosen setting in every repeat's table ``tests`` before any fit, and each fit's
    rows of the first repeat (at ``scales`` for the first row) while it is loaded, whichever setting is chosen."""
    table = _Table(base, per_label, seed, progress, plan.store, split="validation")
    base_frechet = table.pretrained()["frechet"]
    tried: dict[str, list[dict]] = {}
    for name, variants in plan.variants.items():
        if len(variants) > 1:
            tried[name] = [
                table.inference_time(v, trained.get(name, 0.0), setting=_describe(d))
                for v, d in zip(variants, plan.sweeps[name])
            ]
    chosen = _choose(tried, base_frechet, rule)
    for test in tests:
        _inference_rows(test, plan, chosen, trained)
    for run in plan.fine_tuning:
        if len(run.settings()) > 1:
            seed_ = plan.training_seeds[0] if plan.training_seeds else None
            fits = tried[run.name] = []
            for k, setting in enumerate(run.settings()):
                progress.set_postfix_str(f"{run.name}: training setting {k}")
                fitted = plan.fit(run, k, seed_)
                fits.append(table.fine_tuned(run.name, fitted, [], setting=_describe(setting)))
                own = scales if run is plan.fine_tuning[0] else []
                tests[0].fine_tuned(run.name, fitted, own, plan.eval_steps, setting=_describe(setting))
            chosen.update(_choose({run.name: fits}, base_frechet, rule))
    return chosen, [r for rows in tried.values() for r in rows]


def _inference_rows(table: _Table, plan: _Plan, chosen: dict[str, int], trained: dict[str, float]) -> None:
    """Every inference-time method's row of ``table`` at its ``chosen`` setting (``trained``: its model's seconds)."""
    for name, variants in plan.variants.items():
        k = chosen.get(name, 0)
        table.inference_time(variants[k], trained.get(name, 0.0), setting=_describe(plan.sweeps[name][k]))


def _choose(tried: dict[str, list[dict]], base_frechet: float, rule: float) -> dict[str, int]:
    """The setting :func:`ctrl.tuning.choose` keeps for each method of ``tried`` (its validation rows, marked
    with ``chosen``, ``frechet_ratio`` and ``base_frechet``)."""
    chosen = {}
    for name, rows in tried.items():
        chosen[name] = choose([r["accuracy"] for r in rows], [r["frechet"] for r in rows], base_frechet, rule)
        for k, row in enumerate(rows):
            row.update(
                frechet_ratio=row["frechet"] / base_frechet, base_frechet=base_frechet, chosen=k == chosen[name]
            )
    return chosen


def _repeat(plan: _Plan, base, per_label, seed, r, chosen, trained, scales, progress) -> _Table:
    """Repeat ``r`` on the test seeds from ``seed``: every method at its chosen setting, the fine-tuning rows
    trained with the r-th training seed; ``trained`` holds the inference-time methods' model seconds."""
    table = _Table(base, per_label, seed, progress, plan.store, repeat=r)
    table.pretrained(plan.eval_steps)
    _inference_rows(table, plan, chosen, trained)
    for i, run in enumerate(plan.fine_tuning):
        k = chosen.get(run.name, 0)
        progress.set_postfix_str(f"{run.name}: training")
        fitted = plan.fit(run, k, plan.training_seeds[r] if plan.training_seeds else None)
        table.fine_tuned(
            run.name, fitted, scales if i == 0 else [], plan.eval_steps, setting=_describe(run.settings()[k])
        )
    return table


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
    same_target: bool = True,
    training_seeds: list[int] | None = None,
    inference_sweeps: dict[str, list[dict]] | None = None,
    validation_seed: int = VALIDATION.start + 123_456,
    max_frechet_ratio: float = 1.5,
    labelled_per_class: list[int | None] | None = None,
    reward_classifiers: list[RewardClassifier] | None = None,
    tune_each_size: bool = False,
) -> list[dict]:
    """Run every method and write the tables, CSVs and figures (module docstring); the table's rows.

    Args:
        fine_tuning: the fine-tuning rows; the first one's config also gives every row's pretrained model,
            reward, evaluator and sampling settings.
        inference_time: inference-time methods (``class_path: ctrl.inference_time.SMC`` ...).
        baseline_models: a fit config per inference-time method that needs a model trained first (named by
            its class; the model it exports, ``--model.export_dir``, is loaded into the method).
        output: folder of the tables, CSVs, samples.png and the runs (``runs/<name>``).
        per_label: samples per label for every method.
        control_scales: control scales (gamma) at which the first fine-tuning row is also evaluated.
        seed: the first test seed (every method the same x_T; each repeat the next as many seeds).
        retrain: train again even when ``runs/<name>`` holds a finished run.
        guidance, gammas: the old names of ``inference_time`` and ``control_scales`` (work, with a notice).
        same_target: refuse, before anything trains, a setting at another target than the first row's KL
            weight (SMC's ``alpha``, SVDD's ``temperature``, a guidance ``scale`` of 1 / alpha); False: on purpose.
        training_seeds: one repeat per seed (``seed_everything``, ``data.seed`` of each fine-tuning row; its
            own test seeds); mean +- std over them. None: one repeat at the configs' own seeds.
        inference_sweeps: settings an inference-time method tries on validation seeds, by class name
            (``{SMC: [{num_particles: 8}, {num_particles: 16}]}``; ``{}``: as configured).
        validation_seed: the first validation seed of the sweeps (:mod:`ctrl.seeds`).
        max_frechet_ratio: the tuning rule's bound on a setting's Frechet distance, x the pretrained model's.
        labelled_per_class: the labelled-data curve (:func:`labelled_curve`): the whole benchmark once per size
            of the offline labelled set (images per class, in ``<output>/labelled_<size>``; null: the task as
            configured, from all of it, in ``<output>``).
        reward_classifiers: the classifiers the curve trains at each size (their file replaces the fine-tuning
            rows' reward classifier); each of ``baseline_models`` learns from the same cut.
        tune_each_size: the curve tries every method's settings at each size; False: only at the largest, and
            runs each method at the setting kept there at the others.
    """
    curve = ("labelled_per_class", "reward_classifiers", "tune_each_size")
    given = {k: v for k, v in locals().items() if k not in curve}
    if labelled_per_class is not None:
        return labelled_curve(labelled_per_class, reward_classifiers or [], given, tune_each_size)
    for name, value in [("reward_classifiers", reward_classifiers), ("tune_each_size", tune_each_size)]:
        if value:
            raise ValueError(f"{name}: only the labelled-data curve has sizes; give labelled_per_class too.")
    return _benchmark(given)[0]


def _benchmark(b: dict) -> tuple[list[dict], dict[str, int]]:
    """:func:`run_benchmark` on its arguments ``b`` (old names resolved, no curve): the table's rows and the
    setting each method kept (index into its settings; a method with one setting is left out)."""
    plan, base, scales = _checked(b)
    models, rule = b["baseline_models"] or [], b["max_frechet_ratio"]
    tables, sweep_rows, chosen = _measure(
        plan, base, models, b["per_label"], b["seed"], b["validation_seed"], rule, scales
    )
    rows = [row for t in tables for row in t.rows]
    table = aggregate(rows)
    per_row = min(b["per_label"], PANEL_PER_LABEL)
    write_outputs(table, rows, sweep_rows, tables[0].panels, Path(b["output"]), per_row, rule)
    return table, chosen


def _checked(b: dict) -> tuple[_Plan, object, list[float]]:
    """Every check that needs no training, on :func:`run_benchmark`'s arguments ``b`` (old names resolved): the
    plan, the first fine-tuning row's module (whose policy, reward and evaluator every method shares) and the
    control scales."""
    inference_time = renamed_setting("benchmark", "guidance", b["guidance"], "inference_time", b["inference_time"])
    scales = renamed_setting("benchmark", "gammas", b["gammas"], "control_scales", b["control_scales"]) or []
    inference_time, models, runs = inference_time or [], b["baseline_models"] or [], Path(b["output"]) / "runs"
    sweeps = b["inference_sweeps"] or {}
    plan = _plan(b["fine_tuning"], inference_time, models, runs, b["retrain"], b["training_seeds"], sweeps)
    base = _checked_base(plan, inference_time, models, b["same_target"])
    plan.eval_steps = list(base.extra_eval_num_steps)
    plan.keep_rows(base)
    count = base.policy.num_labels * b["per_label"]
    check_seeds("seed", b["seed"], count * len(b["training_seeds"] or [None]), "test")
    if plan.tuned():
        check_seeds("validation_seed", b["validation_seed"], count, "validation")
    return plan, base, scales


def _measure(plan: _Plan, base, baseline_models, per_label, seed, validation_seed, rule, scales) -> tuple:
    """The tables of every repeat (test seeds from ``seed``, each repeat the next ones), the sweep's rows
    (validation seeds from ``validation_seed``) and each tuned method's chosen setting, the inference-time
    methods' models trained first."""
    repeats, count = len(plan.training_seeds or [None]), base.policy.num_labels * per_label
    tries = sum(len(v) for v in plan.sweeps.values() if len(v) > 1) + 1 if plan.tuned() else 0
    fits = [(len(r.settings()), i == 0) for i, r in enumerate(plan.fine_tuning) if len(r.settings()) > 1]
    tries += sum(n * (1 + len(plan.eval_steps) + (len(scales) if first else 0)) for n, first in fits)
    tries += repeats * len(plan.variants) if plan.tuned() else 0  # the inference-time rows sampled early
    rows = len(plan.sweeps) + 1 + len(scales) + len(plan.eval_steps) * (1 + len(plan.fine_tuning))
    total = (tries + repeats * rows) * base.policy.num_labels
    with tqdm(total=total, desc="benchmark", unit="label") as progress:
        trained = _train_baseline_models(plan, baseline_models, progress)
        tests = [_Table(base, per_label, seed + r * count, progress, plan.store) for r in range(repeats)]
        tune = (plan, base, per_label, validation_seed, rule, trained, progress, tests, scales)
        chosen, sweep_rows = _tune(*tune) if plan.tuned() else ({}, [])
        tables = [
            _repeat(plan, base, per_label, seed + r * count, r, chosen, trained, scales, progress)
            for r in range(repeats)
        ]
    return tables, sweep_rows, chosen


def _plan(fine_tuning, inference_time, baseline_models, runs, retrain, training_seeds, inference_sweeps) -> _Plan:
    """Check the sweeps and seeds given and build each method's settings."""
    names = [type(s).__name__ for s in inference_time]
    for name, sweep in inference_sweeps.items():
        if name not in names:
            raise ValueError(f"inference_sweeps: '{name}' is not one of the inference_time methods {names}.")
        _check_sweep(f"inference_sweeps.{name}", sweep)
    if training_seeds is not None and (not training_seeds or len(set(training_seeds)) != len(training_seeds)):
        raise ValueError(f"training_seeds: give distinct seeds, got {training_seeds}; or leave it out (one repeat).")
    variants = {type(s).__name__: _variants(s, inference_sweeps.get(type(s).__name__)) for s in inference_time}
    sweeps = {name: inference_sweeps.get(name, [{}]) for name in variants}
    sweeps.update({r.name: r.settings() for r in fine_tuning})
    return _Plan(fine_tuning, variants, sweeps, runs, retrain, training_seeds)


def _checked_base(plan: _Plan, inference_time: list[GuidedSampler], baseline_models: list[FitRun], same_target: bool):
    """Every row and setting checked (:func:`_check_rows`, :func:`_check_target`): the first row's module, whose
    policy, reward and evaluator every method shares."""
    bases = _check_rows(plan.fine_tuning, inference_time, baseline_models, plan.runs)
    if same_target:
        rows = plan.fine_tuning
        modules = [(r.name, 0, cli.model) for r, cli in zip(rows, bases)]
        modules += [(r.name, k, _setting_module(plan, r, k)) for r in rows for k in range(1, len(r.settings()))]
        alpha = float(bases[0].model.algorithm.alpha)
        _check_target(alpha, modules, [v for vs in plan.variants.values() for v in vs])
    return bases[0].model


def _setting_module(plan: _Plan, run: FitRun, setting: int):
    """A fine-tuning row's module at one of its settings (instantiated with it, nothing trained)."""
    return run.cli(plan.runs / run.name, None, *run.settings()[setting]).model


def _train_baseline_models(plan: _Plan, baseline_models: list[FitRun], progress: tqdm) -> dict[str, float]:
    """Train (or reuse) each inference-time method's model and load it into every setting of the method: the
    training seconds by method."""
    seconds = {}
    for model in baseline_models:
        progress.set_postfix_str(f"{model.name}: training its model")
        folder = plan.runs / model.name
        done = plan.store.fit_seconds(plan.runs, folder) if plan.store is not None else None
        args = ("--model.export_dir", str(folder / "model"))
        seconds[model.name], _, _ = model.train(folder, plan.retrain, *args, done=done)
        if (folder / "model").is_dir():  # else trained on another machine: only rows kept from there need it
            for variant in plan.variants[model.name]:
                variant.load(folder / "model")
    return seconds


def _cut(size: int | None) -> list[str]:
    """The override that cuts a classifier's or conditional model's training split to ``size`` per class."""
    return [] if size is None else ["--data.labelled_per_class", str(size)]


def _size_name(size: int | None) -> str:
    """A curve size as folders and tables name it ("10", or "all" for the whole split)."""
    return "all" if size is None else str(size)


def _check_curve(sizes: list[int | None], classifiers: list[RewardClassifier], benchmark: dict) -> list[float]:
    """Refuse a bad curve before anything trains (the rows and seeds as configured, then every size's cut in
    every classifier and baseline model, in one line naming the size): each size's labelled images per class."""
    if not sizes or len(set(sizes)) != len(sizes):
        raise ValueError(f"labelled_per_class: give distinct sizes (null: all the labelled data), got {sizes}.")
    if not classifiers:
        raise ValueError(
            "labelled_per_class: give reward_classifiers, the config that trains the reward classifier at each size."
        )
    _checked(benchmark)
    models, runs = benchmark["baseline_models"] or [], Path(benchmark["output"]) / "runs"
    names, taken = [c.name for c in classifiers], {r.name for r in benchmark["fine_tuning"]} | {m.name for m in models}
    if len(set(names)) != len(names) or taken & set(names):
        raise ValueError(
            f"reward_classifiers: names {names} must differ from each other and from the rows and baseline models "
            f"{sorted(taken)} (each trains in runs/<name>); rename them."
        )
    per_class = []
    for size in sizes:
        for run in [c.run() for c in classifiers] + list(models):
            try:
                cli = run.cli(runs / run.name, None, *_cut(size))
            except ValueError as err:
                problem = f"{_size_name(size)} is refused by '{run.name}' ({err})"
                raise ValueError(f"labelled_per_class: {problem}") from None
            if run.name == classifiers[0].name:
                per_class.append(float(cli.datamodule.labelled_images_per_class()))
    return per_class


def labelled_curve(
    sizes: list[int | None], classifiers: list[RewardClassifier], benchmark: dict, tune_each_size: bool = False
) -> list[dict]:
    """The labelled-data curve: the whole benchmark (``benchmark``: :func:`run_benchmark`'s other arguments) once
    per size (images per class). None is the task as configured, in ``<output>`` itself (the rows' own reward
    classifier, the baseline models' configs uncut: for the shipped tasks the ``classifiers``' configs trained on
    the whole split). Each other size runs in ``<output>/labelled_<size>``, where each of ``classifiers`` (trained
    once, with its config's seed; file and training seconds kept in that size's ``rows/fits/``) and the
    ``baseline_models`` learn from the same first ``size`` images of each class; the repeats (``training_seeds``)
    vary the methods. The largest size runs first; unless ``tune_each_size``, the setting each method keeps there
    is the only one it runs at the other sizes (no validation sweep there). Writes ``curve.md`` (accuracy by method
    and size), ``curve.csv`` and ``accuracy_labelled.png``; returns every size's table rows, tagged
    ``labelled_per_class``."""
    per_class_images = _check_curve(sizes, classifiers, benchmark)
    out, tables, chosen = Path(benchmark["output"]), {}, None
    for i in sorted(range(len(sizes)), key=lambda i: -math.inf if sizes[i] is None else -sizes[i]):
        given = _at_size(sizes[i], classifiers, benchmark)
        tables[i], kept = _benchmark(given if chosen is None else _only(given, chosen))
        chosen = None if tune_each_size else (kept if chosen is None else chosen)
    rows = [
        {**r, "labelled_per_class": _size_name(size), "labelled_images": per_class}
        for i, (size, per_class) in enumerate(zip(sizes, per_class_images))
        for r in tables[i]
    ]
    _write_curve(rows, per_class_images, out)
    return rows


def _at_size(size: int | None, classifiers: list[RewardClassifier], benchmark: dict) -> dict:
    """The benchmark's arguments at one size of the curve (:func:`labelled_curve`), its classifiers trained."""
    if size is None:
        return dict(benchmark)
    folder = Path(benchmark["output"]) / f"labelled_{_size_name(size)}"
    overrides = []
    for classifier in classifiers:
        kept = folder / "rows" / "fits" / classifier.name  # committed with the rows: they are scored with it
        path = kept / "classifier.safetensors"
        args = (*_cut(size), classifier.export, str(path))
        classifier.run().train(
            folder / "runs" / classifier.name, benchmark["retrain"], *args, done=kept.with_suffix(".json")
        )
        # the fits name the file in their args, so a classifier trained anew (its bytes) trains them again
        overrides += [classifier.setting, str(path)]
    given = dict(benchmark, output=str(folder))
    given["fine_tuning"] = [replace(r, args=[*r.args, *overrides]) for r in benchmark["fine_tuning"]]
    given["baseline_models"] = [replace(m, args=[*m.args, *_cut(size)]) for m in benchmark["baseline_models"] or []]
    return given


def _only(benchmark: dict, chosen: dict[str, int]) -> dict:
    """The benchmark's arguments with each method of ``chosen`` cut to its chosen setting."""
    rows = [
        replace(r, sweep=[r.settings()[chosen[r.name]]]) if r.name in chosen else r for r in benchmark["fine_tuning"]
    ]
    sweeps = benchmark["inference_sweeps"] or {}
    sweeps = {name: [sweep[chosen[name]]] if name in chosen else sweep for name, sweep in sweeps.items()}
    return dict(benchmark, fine_tuning=rows, inference_sweeps=sweeps)


def _write_curve(rows: list[dict], per_class: list[float], out: Path) -> None:
    methods = list(dict.fromkeys(r["method"] for r in rows if " gamma=" not in r["method"]))
    sizes = list(dict.fromkeys(r["labelled_per_class"] for r in rows))
    lines = ["| method | " + " | ".join(f"{s} per class" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        cells = {r["labelled_per_class"]: _cell(r["accuracy"], r.get("accuracy_std")) for r in mine}
        lines.append(f"| {method} | " + " | ".join(cells.get(s, "-") for s in sizes) + " |")
    title = "Test accuracy (mean +- std over the repeats) by labelled images per class."
    (out / "curve.md").write_text(title + "\n\n" + "\n".join(lines) + "\n")
    columns = ["labelled_per_class", "labelled_images", "method", "accuracy", "accuracy_std", "frechet"]
    columns += ["frechet_std", "kid", "denoiser_calls_per_image", "setting"]
    _csv(rows, columns, out / "curve.csv")
    curve = [r for r in rows if r["method"] in methods]
    figures.accuracy_labelled(curve, sorted(per_class), out / "accuracy_labelled.png")
    print("\n".join(lines))
    print(f"wrote {out / 'curve.md'}, {out / 'curve.csv'}, {out / 'accuracy_labelled.png'}")


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per method over its repeats (in first-seen order): every figure's mean, with ``<figure>_std``
    beside it, the other fields of the first repeat, and ``repeats``. A repeat whose fit diverged has no figures:
    the means are over the others (NaN when none is left), and ``diverged`` is the share of repeats that did."""
    methods: dict[str, list[dict]] = {}
    for row in rows:
        methods.setdefault(row["method"], []).append(row)
    table = []
    for group in methods.values():
        out = {k: v for k, v in group[0].items() if not isinstance(v, float) and k != "repeat"}
        trained = [g for g in group if g.get("diverged") != 1.0]
        for key in [k for k, v in group[0].items() if isinstance(v, float)]:
            values = [g[key] for g in (group if key == "diverged" else trained)]
            out[key], out[f"{key}_std"] = mean_std(values) if values else (math.nan, math.nan)
        table.append({**out, "repeats": len(group)})
    return table


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


def _cell(value, std=None) -> str:
    if value is None:
        return "-"
    if not isinstance(value, float):
        return str(value)
    return f"{value:.3f}" if not std else f"{value:.3f} +- {std:.3f}"


def _markdown(rows: list[dict], columns: list[str], spread: bool = False) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    cells = [[_cell(r.get(c), r.get(f"{c}_std") if spread else None) for c in columns] for r in rows]
    return lines + ["| " + " | ".join(c) + " |" for c in cells]


def _csv(rows: list[dict], columns: list[str], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_outputs(table, rows, sweep_rows, panels, out: Path, per_row: int, max_frechet_ratio: float = 1.5) -> None:
    """``table.md`` (``table``: mean +- std per method), ``results.csv`` (every repeat's ``rows``), the sweep's
    ``sweep.md`` and ``sweep.csv`` when there is one, ``samples.png`` (``panels``) and the figures
    ``accuracy_frechet.png`` and ``accuracy_calls.png`` (:mod:`ctrl.figures`)."""
    out.mkdir(parents=True, exist_ok=True)
    keys = [k for k in dict.fromkeys(k for r in table for k in r) if not k.endswith("_std")]
    if not any(r.get("diverged") for r in table):  # a column of zeros: no fit stopped itself
        keys = [k for k in keys if k != "diverged"]
    columns = list(COLUMNS) + sorted(set(keys) - set(COLUMNS))
    _csv(rows, ["repeat", *columns], out / "results.csv")
    lines = _markdown(table, columns, spread=True)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    written = [out / "table.md", out / "results.csv"]
    if sweep_rows:
        sweep = ["method", "setting", "chosen", "accuracy", "frechet", "frechet_ratio", "kid", "kl"]
        sweep += ["diverged"] if any(r.get("diverged") for r in sweep_rows) else []
        _csv(sweep_rows, sweep, out / "sweep.csv")
        rule = (
            f"Settings tried on validation seeds; chosen: the highest accuracy with Frechet <= {max_frechet_ratio:g}x "
            "the pretrained model's on the same seeds (none: the most accurate)."
        )
        (out / "sweep.md").write_text(rule + "\n\n" + "\n".join(_markdown(sweep_rows, sweep)) + "\n")
        written += [out / "sweep.md", out / "sweep.csv"]
    _sheet([p for p in panels if " gamma=" not in p[0]], per_row, out / "samples.png")
    figures.accuracy_frechet(sweep_rows, table, out / "accuracy_frechet.png", max_frechet_ratio)
    figures.accuracy_calls(table, out / "accuracy_calls.png")
    written += [out / "samples.png", out / "accuracy_frechet.png", out / "accuracy_calls.png"]
    print("\n".join(lines))
    print("wrote " + ", ".join(str(p) for p in written))


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
