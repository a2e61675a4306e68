"""ctrl against trl 0.23.1's DDPOTrainer and AlignPropTrainer, side by side in one run on one machine: seconds
per epoch, peak resident memory, and ctrl / trl for each.

trl 0.23.1 is the last trl release with DDPOTrainer and AlignPropTrainer (0.24 removed them). trl and ctrl
want different library versions, so trl's side runs in a venv of its own. Make it once (any directory):

    python3 -m venv V
    V/bin/pip install torch==2.13.0        # the build you compare on (CPU-only wheel: add
                                           #   --index-url https://download.pytorch.org/whl/cpu)
    echo 'torch==2.13.0' > constraints.txt # so that installing trl keeps exactly that torch
    V/bin/pip install -c constraints.txt trl==0.23.1 diffusers==0.42.1 transformers==5.23.0 peft==0.21.2 \\
        accelerate==1.15.0

Then, from the project root, with the python of ctrl's venv (its bin/ctrl runs ctrl's side):

    python benchmarks/vs_trl.py --trl-python V/bin/python --threads 1 --epochs 4 --repeats 3 \\
        --ctrl-extra 'PPO:--model.algorithm.init_args.steps_per_call 5' \\
        --ctrl-extra 'PPO:--model.algorithm.init_args.alpha 0.1'

The workload (the one benchmarks/speed.py times, and the same on both sides): the tiny random pipeline of
speed.py (ctrl.testing.make_tiny_sd at speed.py's sizes, built once into --workdir and read by both sides),
50 DDIM steps, eta 1, guidance 5, LoRA rank 4 on to_q/to_k/to_v/to_out.0, fp32, 8 images per epoch as 2
batches of 4, no KL, no checkpoints, no validation.
  DDPO / PPO: -(JPEG size in kB at quality 95), minibatches of 2 chains, every timestep, 1 inner epoch,
    clip range 1e-4.
  AlignProp / DirectBackprop: -100 (mean |dI/dx| + mean |dI/dy|) of the image in [0, 1] (speed.ImageGradient
    on ctrl's side), a random number of backpropagated steps K ~ U{1..50}, gradient checkpointing, one
    optimizer step per epoch (the 2 batches accumulated: trl's train_gradient_accumulation_steps 2, ctrl's
    model.accumulate 2).

How each side is timed, the same way on both: each trainer runs --epochs epochs in its own process; the
first is a warm-up, and s/epoch is the mean wall time of the others (the throughput: their total over their
number), timed inside the process around the whole epoch (sampling and training; trl: around
``trainer.step``, benchmarks/trl_peer.py running the trainer unmodified in --trl-python; ctrl:
speed.EpochClock around each Lightning training epoch of `ctrl fit`). Peak RSS: trl's process reports its own
(getrusage), ctrl's comes from the operating system (wait4). --ctrl-extra PLUGIN:ARGS adds a row: PLUGIN's
workload with ARGS added to `ctrl fit`.
Repeats: the whole sequence (trl DDPO, trl AlignProp, every ctrl row; ctrl's rows first on odd repeats, so
drift within a repeat falls on both sides alike) runs --repeats times, repeat r seeded r on both sides: an
AlignProp / DirectBackprop epoch's cost follows its random truncation draws (ctrl draws one K per rollout, trl
one cut per step), so the repeats must draw anew for their spread to include it. Each repeat gives its own
ratio; the table gives mean +- std over the repeats (one process's wall time moves by up to 20% between runs
minutes apart on a 2-core machine, so a single run's ratio is not a figure).
Threads: --threads for both (OMP_NUM_THREADS, MKL_NUM_THREADS and torch's own count). Compare only the
figures of one run on an otherwise idle machine, and read the ratios rather than the absolute times.

Writes <output>/vs_trl.md (the table) and <output>/vs_trl.json (every figure, both sides' library versions,
the machine, its load average at start and end, the date). Linux or macOS (wait4).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from speed import PLUGINS, PROMPTS, make_pipeline
from speed import config as speed_config

from ctrl.seeds import run_seed_args
from ctrl.tuning import mean_std

HERE = Path(__file__).resolve().parent
TRL_VERSION = "0.23."
TRL_NAMES = {"ddpo": "DDPO", "alignprop": "AlignProp"}
BASE_ROWS = ("PPO", "DirectBackprop")  # ctrl's plugin for each trl trainer
EPOCH_TIMES = "epoch_times.json"


def trl_trainer(plugin: str) -> str:
    """The trl trainer whose workload ``plugin`` runs: AlignProp for the differentiable reward, else DDPO."""
    return "alignprop" if plugin == "DirectBackprop" else "ddpo"


def refuse(message: str):
    sys.exit(f"vs_trl: {message}")


def venv_hint() -> str:
    return (
        "make one as the docstring of benchmarks/vs_trl.py shows (python3 -m venv V; V/bin/pip install "
        "torch==2.13.0; V/bin/pip install -c constraints.txt trl==0.23.1 diffusers==0.42.1 transformers==5.23.0 "
        "peft==0.21.2 accelerate==1.15.0) and pass --trl-python V/bin/python"
    )


def check_trl_python(python: str | None) -> str:
    """trl's version in ``python``, or a one-line refusal naming --trl-python."""
    if not python:
        refuse(f"--trl-python is required: the python of a venv with trl 0.23.x; {venv_hint()}.")
    if not (Path(python).is_file() and os.access(python, os.X_OK)):
        refuse(f"--trl-python {python}: no such executable; {venv_hint()}.")
    probe = "import trl; from trl import AlignPropTrainer, DDPOTrainer, DefaultDDPOStableDiffusionPipeline; "
    probe += "print(trl.__version__)"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        refuse(f"--trl-python {python} could not run ({error}); {venv_hint()}.")
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        refuse(f"--trl-python {python} cannot import trl's DDPO and AlignProp trainers ({last}); {venv_hint()}.")
    version = lines[-1].strip()
    if not version.startswith(TRL_VERSION):
        refuse(f"--trl-python {python} has trl {version}, not 0.23.x (the last with DDPOTrainer); {venv_hint()}.")
    return version


def parse_spec(option: str, spec: str, allowed, kind: str, example: str) -> tuple[str, list[str]]:
    """``KEY:ARGS`` of ``option`` -> ``(KEY, ARGS split as a shell does)``; refused in one line naming ``option``
    when KEY is not in ``allowed`` (a ``kind``, e.g. "plugin") or ARGS is missing (``example`` shows the form)."""
    key, colon, rest = spec.partition(":")
    key = key.strip()
    if key not in allowed:
        refuse(f"{option} '{spec}': '{key}' is not a {kind} of this workload; choose from {sorted(allowed)}.")
    if not colon or not rest.strip():
        refuse(f"{option} '{spec}': give {kind.upper()}:ARGS, e.g. '{example}'.")
    return key, shlex.split(rest)


def parse_extra(spec: str) -> dict:
    """``PLUGIN:ARGS`` -> a row: PLUGIN's workload with ARGS added to ``ctrl fit``."""
    example = "PPO:--model.algorithm.init_args.steps_per_call 5"
    plugin, args = parse_spec("--ctrl-extra", spec, PLUGINS, "plugin", example)
    return {"plugin": plugin, "args": args, "base": False}


def seeded(row: dict, seed: int) -> dict:
    """``row`` run with ``seed`` as trl's ``--seed`` is: the weights' initialisation (``seed_everything``) and the
    training chains' noise and the algorithm's draws (:func:`ctrl.seeds.run_seed_args`)."""
    return {**row, "args": [*row["args"], *run_seed_args(seed)]}


def ctrl_config(plugin: str, pipeline: str) -> dict:
    """The ``ctrl fit`` config of ``plugin`` on the workload: speed.py's, with every setting the comparison
    depends on spelled out, the image-gradient reward importable from a child process (``speed`` on
    PYTHONPATH), and trl's learning rate for each trainer."""
    config = copy.deepcopy(speed_config(plugin, pipeline, epochs=1))
    config["trainer"]["precision"] = "32-true"
    model = config["model"]["init_args"]
    model["policy"]["init_args"]["dtype"] = "float32"
    # trl's pipeline starts LoRA's A as N(0, 1/rank^2) (peft's default is Kaiming-uniform, a smaller first step);
    # both configs' AdamW decay the weights by 1e-4
    model["policy"]["init_args"]["lora_init"] = "gaussian"
    model["weight_decay"] = 1e-4
    if plugin == "DirectBackprop":
        model["reward"] = {"class_path": "speed.ImageGradient"}
        model["policy"]["init_args"]["lora_lr"] = 1e-3  # AlignPropConfig.train_learning_rate
        # train_gradient_accumulation_steps 2: trl takes one optimizer step per epoch of 2 batches, so ctrl too
        model["accumulate"] = 2
    else:
        model["policy"]["init_args"]["lora_lr"] = 3e-4  # DDPOConfig.train_learning_rate
    if plugin == "PPO":
        model["algorithm"]["init_args"].update(inner_epochs=1, timestep_fraction=1.0)
    # the epochs' wall times, into the run's folder (each run's working directory)
    config["trainer"]["callbacks"] = [{"class_path": "speed.EpochClock", "init_args": {"path": EPOCH_TIMES}}]
    return config


def write_configs(rows: list[dict], pipeline: str, directory: Path) -> None:
    """One config file per plugin of ``rows`` (JSON, which is YAML); each row gets ``config``."""
    directory.mkdir(parents=True, exist_ok=True)
    for row in rows:
        path = directory / f"{row['plugin']}.yaml"
        path.write_text(json.dumps(ctrl_config(row["plugin"], pipeline), indent=1))
        row["config"] = str(path)


def add_model_index(directory: str) -> None:
    """make_tiny_sd writes the components; trl loads the whole pipeline, which needs model_index.json."""
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (Path(directory) / "model_index.json").write_text(json.dumps(index, indent=1))


def mib(maxrss: int) -> float:
    return maxrss / (1024**2 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def timed(cmd: list[str], stdout: Path, stderr: Path, env: dict, cwd: Path) -> dict:
    """Run ``cmd``; its wall seconds, peak RSS (MiB, from the OS: that process and its children) and exit code."""
    with open(stdout, "w") as out, open(stderr, "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
    return {"wall_s": wall, "peak_rss_mib": mib(usage.ru_maxrss), "returncode": proc.returncode}


def failed(what: str, run: dict, log: Path):
    tail = "\n".join(log.read_text().splitlines()[-30:])
    sys.exit(f"{tail}\nvs_trl: {what} failed (exit {run['returncode']}); its log: {log}")


def throughput(walls: list[float]) -> float:
    """Seconds per epoch: the mean of the epochs after the first (a warm-up), the first alone if it is all."""
    return statistics.mean(walls[1:] or walls)


def setup(threads: int, workdir: Path) -> tuple[str, dict, dict]:
    """The shared pipeline (built into ``workdir``), and the environments of trl's and ctrl's processes (threads
    pinned, offline; ctrl's with benchmarks/ on its path for speed.py's reward and clock)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    pipeline = make_pipeline(workdir / "tiny-sd")
    add_model_index(pipeline)
    ctrl_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))}
    return pipeline, env, ctrl_env


def write_report(report: dict, text: str, out: Path, name: str) -> None:
    """``<out>/<name>.json`` (every figure) and ``<out>/<name>.md`` (``text``), and ``text`` printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    (out / f"{name}.md").write_text(text)
    print(text, end="")


def run_trl(python, trainer, pipeline, args, env, workdir: Path, seed=0, epochs=None, extra=()) -> dict:
    """trl_peer.py's run of ``trainer`` in ``workdir/trl-<trainer>`` for ``epochs`` (default ``args.epochs``)
    with ``extra`` arguments: its JSON, s/epoch as :func:`throughput`."""
    directory, epochs = workdir / f"trl-{trainer}", epochs or args.epochs
    directory.mkdir(parents=True, exist_ok=True)
    cmd = [python, str(HERE / "trl_peer.py"), "--trainer", trainer, "--pipeline", pipeline]
    cmd += ["--prompts", json.dumps(PROMPTS), "--epochs", str(epochs), "--threads", str(args.threads)]
    cmd += ["--seed", str(seed), *extra]
    print(f"trl {TRL_NAMES[trainer]}: {epochs} epochs {' '.join(extra)}...", flush=True)
    run = timed(cmd, directory / "stdout.log", directory / "stderr.log", env, directory)
    lines = [line for line in (directory / "stdout.log").read_text().splitlines() if line.startswith("{")]
    if run["returncode"] or not lines:
        failed(f"trl's {TRL_NAMES[trainer]} run", run, directory / "stderr.log")
    result = json.loads(lines[-1])
    result.update(process_wall_s=run["wall_s"], process_peak_rss_mib=run["peak_rss_mib"])
    result.update(trl_median_s_per_epoch=result["s_per_epoch"], s_per_epoch=throughput(result["epoch_s"]))
    print(f"  {result['s_per_epoch']:.2f} s/epoch, peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)
    return result


def run_ctrl(row: dict, epochs: int, env: dict, directory: Path) -> dict:
    """``ctrl fit`` of ``row`` for ``epochs`` epochs in ``directory``: every epoch's wall seconds, s/epoch (the
    mean after the first, :func:`throughput`) and the process's peak RSS."""
    directory.mkdir(parents=True, exist_ok=True)
    ctrl = Path(sys.executable).parent / "ctrl"  # not resolved: the venv's own bin/
    cmd = [str(ctrl), "fit", "--config", row["config"], "--trainer.max_epochs", str(epochs)]
    cmd += ["--trainer.default_root_dir", str(directory / "runs"), *row["args"]]
    print(f"ctrl {row['name']}: {epochs} epochs ...", flush=True)
    run = timed(cmd, directory / "stdout.log", directory / "stderr.log", env, directory)
    if run["returncode"]:
        failed(f"ctrl's {row['name']} run", run, directory / "stderr.log")
    walls = json.loads((directory / EPOCH_TIMES).read_text())["epoch_s"]
    result = {**run, "epoch_s": walls, "s_per_epoch": throughput(walls)}
    print(f"  {result['s_per_epoch']:.2f} s/epoch, peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)
    return result


def versions(*names: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def git_state() -> dict:
    def git(*args):
        done = subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "modified": None if status is None else bool(status)}


def machine() -> dict:
    model = None
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), None)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "processor": platform.processor(),
        "cpu_model": model,
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def spread(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value) of a figure over the repeats; None if any is None."""
    if not values or any(v is None for v in values):
        return None, None
    return mean_std(values)


def summarise(rows: list[dict], repeats: list[dict]) -> None:
    """Each row's figures over the repeats (``<figure>`` and ``<figure>_std``), beside trl's for its trainer."""
    for i, row in enumerate(rows):
        mine = [rep["ctrl"][i] for rep in repeats]
        peer = [rep["trl"][row["trl"]] for rep in repeats]
        base = next((j for j, r in enumerate(rows) if r["base"] and r["plugin"] == row["plugin"]), None)
        figures = {
            "s_per_epoch": [m["s_per_epoch"] for m in mine],
            "peak_rss_mib": [m["peak_rss_mib"] for m in mine],
            "trl_s_per_epoch": [p["s_per_epoch"] for p in peer],
            "trl_peak_rss_mib": [p["peak_rss_mib"] for p in peer],
            "time_ratio": [ratio(m["s_per_epoch"], p["s_per_epoch"]) for m, p in zip(mine, peer)],
            "memory_ratio": [ratio(m["peak_rss_mib"], p["peak_rss_mib"]) for m, p in zip(mine, peer)],
        }
        if base is not None and base != i:
            own = [rep["ctrl"][base]["s_per_epoch"] for rep in repeats]
            figures["time_vs_base"] = [ratio(m["s_per_epoch"], o) for m, o in zip(mine, own)]
        for key, values in figures.items():
            row[key], row[f"{key}_std"] = spread(values)


def table(report: dict) -> str:
    def cell(row, key, spec=".2f", suffix=""):
        mean, std = row.get(key), row.get(f"{key}_std")
        if mean is None:
            return "-"
        return f"{mean:{spec}}{suffix}" + (f" +- {std:{spec}}" if report["repeats"] > 1 else "")

    n = report["epochs"]
    lines = [
        f"{report['date']}, {report['machine']['cpu_model'] or report['machine']['processor']} "
        f"({report['machine']['cpus_usable']} usable of {report['machine']['cpu_count']} CPUs), "
        f"{report['threads']} thread(s), {n} epochs per process (s/epoch: mean of the last {n - 1}, both sides), "
        f"mean +- std over {report['repeats']} repeat(s) in turn, load average "
        f"{report['loadavg_start'][0]:.2f} at start, {report['loadavg_end'][0]:.2f} at end; "
        f"trl {report['trl']['versions'].get('trl')}, torch {report['trl']['versions'].get('torch')} | "
        f"torch {report['ctrl']['versions'].get('torch')} (ctrl)",
        "",
        "| workload | trl 0.23.1 s/epoch | trl peak RSS MiB | ctrl s/epoch | ctrl peak RSS MiB | "
        "time ctrl / trl | memory ctrl / trl | time / ctrl's base row |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        name = f"{TRL_NAMES[row['trl']]} / {row['plugin']}"
        if row["args"]:
            name += ", `" + shlex.join(row["args"]) + "`"
        cells = [cell(row, "trl_s_per_epoch"), cell(row, "trl_peak_rss_mib", ".0f"), cell(row, "s_per_epoch")]
        cells += [cell(row, "peak_rss_mib", ".0f"), cell(row, "time_ratio", suffix="x")]
        cells += [cell(row, "memory_ratio", suffix="x"), cell(row, "time_vs_base", suffix="x")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--trl-python", help="python of a venv with trl 0.23.x (see below)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per process (the first is a warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of both sides in turn (mean +- std)")
    parser.add_argument("--workdir", help="where the pipeline, configs and logs go (default: a temporary one)")
    parser.add_argument(
        "--ctrl-extra",
        action="append",
        default=[],
        metavar="PLUGIN:ARGS",
        help="another ctrl row: PLUGIN's workload with ARGS added to `ctrl fit` (repeatable)",
    )
    parser.add_argument("--output", default="benchmarks/vs_trl", help="folder for vs_trl.md and vs_trl.json")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        refuse(f"--epochs: at least 2 (the first epoch of each process is a warm-up), got {args.epochs}.")
    if args.repeats < 1:
        refuse(f"--repeats: at least 1 (3 for a figure with its spread), got {args.repeats}.")
    if args.threads < 1:
        refuse(f"--threads: at least 1, got {args.threads}.")
    rows = [{"plugin": plugin, "args": [], "base": True} for plugin in BASE_ROWS]
    rows += [parse_extra(spec) for spec in args.ctrl_extra]
    ctrl = Path(sys.executable).parent / "ctrl"
    if not ctrl.is_file():
        refuse(f"no {ctrl}: run this with the python of a venv where ctrl is installed (pip install -e .).")
    trl_version = check_trl_python(args.trl_python)

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        return measure(args, rows, trl_version, Path(args.workdir).resolve())
    with tempfile.TemporaryDirectory(prefix="vs_trl-") as workdir:
        return measure(args, rows, trl_version, Path(workdir))


def repeat(r: int, args, rows: list[dict], pipeline: str, env: dict, ctrl_env: dict, workdir: Path) -> dict:
    """Repeat ``r``: both trl trainers and every ctrl row, all seeded ``r`` (ctrl's rows first when r is odd)."""
    print(f"repeat {r + 1} of {args.repeats}", flush=True)
    folder = workdir / f"repeat-{r}"
    sides = {
        "trl": lambda: {t: run_trl(args.trl_python, t, pipeline, args, env, folder, seed=r) for t in TRL_NAMES},
        "ctrl": lambda: [
            run_ctrl(seeded(row, r), args.epochs, ctrl_env, folder / f"ctrl-{i}-{row['plugin']}")
            for i, row in enumerate(rows)
        ],
    }
    order = ["ctrl", "trl"] if r % 2 else ["trl", "ctrl"]
    return {side: sides[side]() for side in order}


def measure(args, rows: list[dict], trl_version: str, workdir: Path) -> dict:
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "threads": args.threads,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "machine": machine(),
        "loadavg_start": os.getloadavg(),
    }
    git = git_state()  # at the start: the code that runs
    pipeline, env, ctrl_env = setup(args.threads, workdir)
    write_configs(rows, pipeline, workdir / "configs")
    for row in rows:
        row["trl"] = trl_trainer(row["plugin"])
        row["name"] = f"{row['plugin']} {shlex.join(row['args'])}".strip()

    repeats = [repeat(r, args, rows, pipeline, env, ctrl_env, workdir) for r in range(args.repeats)]
    summarise(rows, repeats)

    report["trl"] = {"python": args.trl_python, "versions": repeats[0]["trl"]["ddpo"]["versions"]}
    report["ctrl"] = {
        "python": sys.executable,
        "versions": versions("ctrl", "torch", "diffusers", "transformers", "peft", "lightning", "accelerate"),
        "git": git,
        "configs": {row["plugin"]: json.loads(Path(row["config"]).read_text()) for row in rows},
    }
    report["trl_version_checked"] = trl_version
    report["rows"], report["runs"] = rows, repeats
    report["loadavg_end"] = os.getloadavg()
    write_report(report, table(report), Path(args.output), "vs_trl")
    return report


if __name__ == "__main__":
    main()
