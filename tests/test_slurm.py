"""A real SLURM run: a one-node cluster on this machine (munged, slurmctld, slurmd, started here and
stopped by their process ids) runs configs/slurm/train.sbatch with 2 CPU tasks (DDP over gloo).

Needs root and Debian's slurm-wlm and munge (.ci/run installs them); skipped elsewhere, with the reason."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import final_state, report, run_args

ROOT = Path(__file__).resolve().parents[1]
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo")


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "the SLURM test starts slurmd, which needs root"
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing; .ci/run installs slurm-wlm and munge)"
    return None


def _exe(name: str) -> str:
    """The daemon's full path (/usr/sbin may be missing from PATH)."""
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, what: str, timeout: float = 60) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not happen within {timeout} s")


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    why = _why_not()
    if why:
        pytest.skip(why)
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log", "munge"):
        (d / sub).mkdir()
    key = d / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=ctrltest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=ctrl Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    # srun runs `ctrl` from PATH: the one installed beside this interpreter, activated or not
    env = {
        **os.environ,
        "SLURM_CONF": str(conf),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    pid_files = [d / "munge" / "munged.pid", d / "slurmctld.pid", d / "slurmd.pid"]
    try:
        subprocess.run(
            [
                _exe("munged"),
                f"--key-file={key}",
                f"--socket={d}/munge/munge.socket",
                f"--pid-file={pid_files[0]}",
                f"--log-file={d}/munge/munged.log",
                f"--seed-file={d}/munge/seed",
                "--force",
            ],
            check=True,
            env=env,
        )
        subprocess.run([_exe("slurmctld"), "-i"], check=True, env=env)
        subprocess.run([_exe("slurmd")], check=True, env=env)
        _wait(
            lambda: (
                "idle" in subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env).stdout
            ),
            "the SLURM node becoming idle",
        )
        yield env, d
    finally:
        for pid_file in reversed(pid_files):  # stop exactly the daemons started here
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass


def test_sbatch_template_trains_on_two_ranks(slurm_cluster, tmp_path, tiny_pretrained, tiny_classifier):
    env, d = slurm_cluster
    overrides = run_args(tmp_path / "run", tiny_pretrained, tiny_classifier, "--trainer.accelerator", "cpu")[2:]
    log = tmp_path / "job.out"
    proc = subprocess.run(
        [
            "sbatch",
            "--wait",
            "--nodes",
            "1",
            "--ntasks-per-node",
            "2",
            f"--output={log}",
            "--chdir",
            str(ROOT),
            str(ROOT / "configs/slurm/train.sbatch"),
            str(ROOT / "configs/digits/control.yaml"),
            *overrides,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    out = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n--- job output ---\n{out[-4000:]}"
    for rank in (0, 1):
        assert f"ctrl: rank {rank} of 2 trained 6 rollouts of 2 chains" in out, out[-4000:]
    assert final_state(tmp_path / "run")[1]["last_metrics"]["accuracy"] >= 0
    job = proc.stdout.split()[-1]
    report(f"SLURM: job {job} ran configs/slurm/train.sbatch on a one-node cluster; both ranks trained")
