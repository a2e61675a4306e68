"""Time to reward against trl 0.23.1: how long each trainer takes to raise the reward by a stated amount on the
workload of benchmarks/vs_trl.py, not only its seconds per epoch.

    python benchmarks/time_to_reward.py --trl-python V/bin/python --rise 2.0 --minutes 30 --seeds 1 2 3

(V: the venv with trl that vs_trl.py's docstring makes.) For each seed, in turn: trl's AlignPropTrainer and
ctrl's DirectBackprop (``--workloads alignprop``), and/or trl's DDPOTrainer and ctrl's PPO (``ddpo``), plus any
``--ctrl-extra PLUGIN:ARGS`` row (ctrl's best plugin with its settings) and ``--trl-extra TRAINER:ARGS`` row
(trl's trainer with trl_peer.py's further settings, e.g. ``alignprop:--truncation last``), each in its own
process on the same tiny pipeline with the same settings and learning rates as vs_trl.py, trained until the epoch
that passes ``--minutes`` of training time (the same rule on both sides: the sum of the in-process epoch times,
set-up excluded). Every epoch's mean reward is recorded (trl: the rewards its reward function returned; ctrl: its
``train/reward``).

The rise: an epoch reaches it when the mean reward of the last ``--window`` epochs is at least the run's own
first-epoch reward (the starting model: LoRA starts at zero) plus ``--rise``; the time to reward is the
training seconds up to the end of that epoch. State ``--rise`` before the seeds it is reported on (choose it on
a pilot seed outside ``--seeds``). Writes ``<output>/time_to_reward.md`` (per seed and mean +- std over the
seeds that reached it, beside how many did) and ``.json`` (every epoch's time and reward).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import vs_trl

from ctrl.tuning import mean_std

WORKLOADS = {"alignprop": "DirectBackprop", "ddpo": "PPO"}  # trl trainer -> ctrl's plugin on its workload


def time_to_rise(walls: list[float], rewards: list[float], rise: float, window: int) -> float | None:
    """Training seconds until the mean of the last ``window`` epochs' rewards first reaches ``rewards[0] + rise``
    (None: never)."""
    for end in range(window, len(rewards) + 1):
        if statistics.mean(rewards[end - window : end]) >= rewards[0] + rise:
            return sum(walls[:end])
    return None


def ctrl_config(row: dict, pipeline: str, minutes: float) -> dict:
    """vs_trl.py's config of the row's plugin, its epoch clock stopping the run after ``minutes`` of training."""
    config = vs_trl.ctrl_config(row["plugin"], pipeline)
    clock = {"path": vs_trl.EPOCH_TIMES, "minutes": minutes}
    config["trainer"]["callbacks"] = [{"class_path": "speed.EpochClock", "init_args": clock}]
    config["trainer"]["max_epochs"] = 10**6
    return config


def trl_extra(spec: str) -> dict:
    """``TRAINER:ARGS`` -> a trl row: trl_peer.py's TRAINER with ARGS added (e.g. ``alignprop:--truncation last``)."""
    trainer, args = vs_trl.parse_spec("--trl-extra", spec, WORKLOADS, "trainer", "alignprop:--truncation last")
    return {"trainer": trainer, "args": args}


def run_trl(row: dict, pipeline: str, args, seed: int, env: dict, folder: Path) -> dict:
    extra = [*row["args"], "--minutes", str(args.minutes)]
    result = vs_trl.run_trl(
        args.trl_python, row["trainer"], pipeline, args, env, folder, seed=seed, epochs=10**6, extra=extra
    )
    return {k: result[k] for k in ("epoch_s", "epoch_reward", "peak_rss_mib")}


def run_ctrl(row: dict, seed: int, env: dict, folder: Path) -> dict:
    print(f"seed {seed}: ctrl {row['name']} ...", flush=True)
    run = vs_trl.run_ctrl(vs_trl.seeded(row, seed), 10**6, env, folder)
    figures = json.loads((folder / vs_trl.EPOCH_TIMES).read_text())
    return {
        "epoch_s": figures["epoch_s"],
        "epoch_reward": figures["epoch_reward"],
        "peak_rss_mib": run["peak_rss_mib"],
    }


def summary(runs: list[dict], rise: float, window: int) -> dict:
    """One trainer's runs (one per seed): each seed's time to the rise, their mean +- std over the seeds that
    reached it, and how many did."""
    times = [time_to_rise(r["epoch_s"], r["epoch_reward"], rise, window) for r in runs]
    reached = [t for t in times if t is not None]
    mean, std = mean_std(reached) if reached else (None, None)
    gains = [statistics.mean(r["epoch_reward"][-window:]) - r["epoch_reward"][0] for r in runs]
    return {"times": times, "mean_s": mean, "std_s": std, "reached": len(reached), "final_gain": gains}


def markdown(report: dict) -> str:
    def seconds(t):
        return "not reached" if t is None else f"{t:.0f} s"

    lines = [
        f"{report['date']}: rise {report['rise']:g} over the first epoch's reward (mean of the last "
        f"{report['window']} epochs), at most {report['minutes']:g} min of training each, seeds {report['seeds']}, "
        f"{report['threads']} thread(s), {report['machine']['cpu_model']}",
        "",
        "| trainer | time to the rise, per seed | mean +- std (seeds that reached it) | reached | reward gain, end |",
        "|---|---|---|---|---|",
    ]
    for name, s in report["summary"].items():
        mean = "-" if s["mean_s"] is None else f"{s['mean_s']:.0f} +- {s['std_s']:.0f} s"
        gains = ", ".join(f"{g:+.3f}" for g in s["final_gain"])
        per_seed = ", ".join(seconds(t) for t in s["times"])
        lines.append(f"| {name} | {per_seed} | {mean} | {s['reached']} of {len(s['times'])} | {gains} |")
    return "\n".join(lines) + "\n"


def arguments(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--trl-python", help="python of a venv with trl 0.23.x (vs_trl.py's docstring)")
    parser.add_argument("--rise", type=float, required=True, help="the reward rise, in the reward's units")
    parser.add_argument("--minutes", type=float, default=30.0, help="training time per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--window", type=int, default=3, help="epochs averaged when testing the rise")
    parser.add_argument(
        "--workloads",
        nargs="*",
        choices=sorted(WORKLOADS),
        default=["alignprop"],
        help="each one's trl trainer and ctrl plugin as released; none: only the --trl-extra and --ctrl-extra rows",
    )
    parser.add_argument("--trl-extra", action="append", default=[], metavar="TRAINER:ARGS")
    parser.add_argument("--ctrl-extra", action="append", default=[], metavar="PLUGIN:ARGS")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", help="where the pipeline, configs and logs go (default: under --output)")
    parser.add_argument("--output", default="benchmarks/time_to_reward")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        vs_trl.refuse(f"--minutes: a positive training time per run, got {args.minutes:g}.")
    if args.window < 1 or args.threads < 1:
        vs_trl.refuse(f"--window and --threads: at least 1, got {args.window} and {args.threads}.")
    if len(set(args.seeds)) != len(args.seeds):
        vs_trl.refuse(f"--seeds: give distinct seeds, got {args.seeds}.")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = arguments(argv)
    rows = [{"plugin": WORKLOADS[w], "args": [], "base": True} for w in args.workloads]
    rows += [vs_trl.parse_extra(spec) for spec in args.ctrl_extra]
    trl_rows = [{"trainer": w, "args": []} for w in args.workloads] + [trl_extra(s) for s in args.trl_extra]
    if not rows and not trl_rows:
        vs_trl.refuse("--workloads: none given and no --trl-extra or --ctrl-extra row: nothing to run.")
    vs_trl.check_trl_python(args.trl_python)
    workdir = Path(args.workdir or Path(args.output) / "work").resolve()
    pipeline, env, ctrl_env = vs_trl.setup(args.threads, workdir)
    for i, row in enumerate(rows):
        row["name"] = f"{row['plugin']} {' '.join(row['args'])}".strip()
        row["config"] = str(workdir / "configs" / f"{i}-{row['plugin']}.yaml")
        Path(row["config"]).parent.mkdir(parents=True, exist_ok=True)
        Path(row["config"]).write_text(json.dumps(ctrl_config(row, pipeline, args.minutes), indent=1))
    runs: dict[str, list[dict]] = {}
    for seed in args.seeds:  # every trainer of a seed in turn, so a slow spell of the machine falls on all
        for i, row in enumerate(trl_rows):
            name = f"trl {vs_trl.TRL_NAMES[row['trainer']]} {' '.join(row['args'])}".strip()
            folder = workdir / f"seed-{seed}" / f"trl-{i}"  # the run goes into its trl-<trainer> folder
            runs.setdefault(name, []).append(run_trl(row, pipeline, args, seed, env, folder))
        for i, row in enumerate(rows):
            folder = workdir / f"seed-{seed}" / f"ctrl-{i}-{row['plugin']}"
            runs.setdefault(f"ctrl {row['name']}", []).append(run_ctrl(row, seed, ctrl_env, folder))
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        **{k: getattr(args, k) for k in ("rise", "minutes", "seeds", "window", "threads")},
        "machine": vs_trl.machine(),
        "git": vs_trl.git_state(),
        "summary": {name: summary(r, args.rise, args.window) for name, r in runs.items()},
        "runs": runs,
    }
    vs_trl.write_report(report, markdown(report), Path(args.output), "time_to_reward")
    return report


if __name__ == "__main__":
    main()
