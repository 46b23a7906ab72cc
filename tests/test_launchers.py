"""The launchers on real processes: launch/multinode.sh as a two-node job on one machine, its signal handling
(torchrun ignores SIGUSR1, forwards SIGTERM so the workers save), and launch/slurm.sbatch on a real
single-node SLURM (tests/slurm/start.sh) through a requeue and a time-limit signal."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml
from assets import REPO, free_port

pytestmark = pytest.mark.slow
SLURM_DIR = os.environ.get("RECIPE_SLURM_DIR", "/tmp/recipe-slurm")


def launcher_env(**extra) -> dict:
    """The current venv's python on PATH, no set-up, CPU; none of the caller's rendezvous variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "NNODES", "NODE_RANK", "NPROC_PER_NODE"} and not k.startswith("SLURM_")}
    env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
               RECIPE_SKIP_SETUP="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def write_config(tmp_path, demo_assets, **overrides) -> tuple[str, str]:
    out = str(tmp_path / "out")
    cfg = {"output_dir": out, "seed": 0, "max_steps": 8, "save_every": 4,
           "student": {"path": demo_assets["student"]}, "teacher": {"path": demo_assets["teacher"]},
           "data": {"train": [demo_assets["train"]], "max_length": 128, "num_workers": 0},
           "micro_batch_size": 4, "grad_accum": 1, "zero_stage": 2,
           "optim": {"lr": 1e-3, "warmup_steps": 1}, "loss": {"candidates": 16, "impl": "torch"}}
    cfg.update(overrides)
    path = str(tmp_path / "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path, out


def metric_steps(out: str) -> list[int]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


def latest_step(out: str) -> int:
    try:
        with open(os.path.join(out, "checkpoints", "latest")) as f:
            return int(f.read().strip().removeprefix("step"))
    except (OSError, ValueError):
        return 0


def tail(path: str, n: int = 6000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError as e:
        return f"({e})"


def wait_for(condition, timeout: float, what: str, logs=()) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n" +
                        "\n".join(f"----- {p}\n{tail(p)}" for p in logs))
        time.sleep(0.3)


def stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def assert_final_loads(out: str) -> None:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(os.path.join(out, "final"))
    assert sum(p.numel() for p in model.parameters()) > 0


# ---------------------------------------------------------------- launch/multinode.sh

def test_two_nodes_on_one_machine(tmp_path, demo_assets):
    config, out = write_config(tmp_path, demo_assets)
    port = str(free_port())
    procs, logs = [], []
    try:
        for node in (0, 1):
            logs.append(str(tmp_path / f"node{node}.log"))
            env = launcher_env(NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                               NPROC_PER_NODE="1")
            with open(logs[-1], "w") as log:
                procs.append(subprocess.Popen(["bash", "launch/multinode.sh", config], cwd=REPO, env=env,
                                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 240
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        report = "\n".join(f"----- node {i} (exit {p.poll()})\n{tail(log)}"
                           for i, (p, log) in enumerate(zip(procs, logs)))
        assert [p.poll() for p in procs] == [0, 0], report
    finally:
        for proc in procs:
            stop_group(proc)
    for node, log in enumerate(logs):
        assert f"node {node} of 2, 1 process(es) per node (world size 2)" in tail(log, 10**6), tail(log)
    assert metric_steps(out) == list(range(1, 9))
    checkpoint = os.path.join(out, "checkpoints", "step00000008")
    assert {f for f in os.listdir(checkpoint) if f.startswith("rng_rank")} == {"rng_rank00000.pt", "rng_rank00001.pt"}
    assert_final_loads(out)


def test_launcher_ignores_usr1_and_forwards_sigterm_to_the_workers(tmp_path, demo_assets):
    """Default topology without a GPU (2 CPU processes). SIGUSR1 to the launcher (torchrun) must not kill it;
    SIGTERM to it reaches the workers, which save a checkpoint before torchrun's shutdown timeout."""
    config, out = write_config(tmp_path, demo_assets, max_steps=400, save_every=5)
    log = str(tmp_path / "launcher.log")
    with open(log, "w") as f:
        proc = subprocess.Popen(["bash", "launch/multinode.sh", config], cwd=REPO,
                                env=launcher_env(MASTER_PORT=str(free_port())), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for(lambda: latest_step(out) > 0 or proc.poll() is not None, 180, "a first checkpoint", [log])
        assert proc.poll() is None, tail(log)
        os.kill(proc.pid, signal.SIGUSR1)  # the pid is torchrun's: the script execs it
        time.sleep(2)
        assert proc.poll() is None, f"torchrun died on SIGUSR1\n{tail(log)}"
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        stop_group(proc)
    text = tail(log, 10**6)
    assert "2 process(es) per node (world size 2)" in text and "cpu, gloo" in text, text[-3000:]
    saved = re.findall(r"stop requested \(SIGTERM\): saved step (\d+)", text)
    assert saved, text[-6000:]
    assert "forcefully exiting" not in text, "torchrun SIGKILLed a worker before it saved\n" + text[-6000:]
    assert latest_step(out) == int(saved[-1]) < 400
    assert metric_steps(out) == list(range(1, int(saved[-1]) + 1))
    assert not os.path.exists(os.path.join(out, "final"))


# ---------------------------------------------------------------- launch/slurm.sbatch on a real SLURM

@pytest.fixture(scope="session")
def slurm_env():
    """A running single-node SLURM (installed with apt-get if missing); left running for later sessions
    (tests/slurm/stop.sh stops it; RECIPE_SLURM_STOP=1 stops it at the end of this session)."""
    proc = subprocess.run(["bash", os.path.join(REPO, "tests", "slurm", "start.sh")], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode == 2:
        pytest.skip(f"SLURM cannot be installed or run on this machine: {proc.stderr.strip()[-2000:]}")
    assert proc.returncode == 0, f"tests/slurm/start.sh failed\n{proc.stdout}\n{proc.stderr}"
    env = launcher_env(SLURM_CONF=os.path.join(SLURM_DIR, "slurm.conf"))
    yield env
    if os.environ.get("RECIPE_SLURM_STOP") == "1":
        subprocess.run(["bash", os.path.join(REPO, "tests", "slurm", "stop.sh")], timeout=120)


def scontrol_job(job: str, env: dict) -> dict:
    proc = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout)) if proc.returncode == 0 else {}


def test_slurm_job_requeues_resumes_and_finishes(tmp_path, demo_assets, slurm_env):
    max_steps = 100
    config, out = write_config(tmp_path, demo_assets, max_steps=max_steps, save_every=10)
    log = str(tmp_path / "slurm.log")
    daemon_logs = [log, os.path.join(SLURM_DIR, "slurmctld.log"), os.path.join(SLURM_DIR, "slurmd.log")]
    submit = subprocess.run(["sbatch", "--parsable", f"--output={log}", "--job-name=recipe-launcher-test",
                             "launch/slurm.sbatch", config], cwd=REPO, env=slurm_env, capture_output=True, text=True,
                            timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    state = lambda: scontrol_job(job, slurm_env)  # noqa: E731
    text = lambda: tail(log, 10**7)  # noqa: E731
    try:
        # 1. once a checkpoint exists, requeue from outside: SIGTERM to the job, the trainer saves, SLURM requeues
        wait_for(lambda: latest_step(out) > 0 or state().get("JobState") not in ("PENDING", "RUNNING"), 240,
                 "a first checkpoint", daemon_logs)
        assert state().get("JobState") == "RUNNING", text()
        subprocess.run(["scontrol", "requeue", job], env=slurm_env, check=True, timeout=30)
        # 2. it runs again and resumes; once it has saved past the resume point (the trainer's handlers are
        #    installed), send the time-limit signal (--signal=B:USR1) to the batch shell: save, then self-requeue
        resumed = re.compile(r"resumed from \S+ at step (\d+)")
        wait_for(lambda: resumed.search(text()), 240, "the requeued job to resume", daemon_logs)
        first_resume = int(resumed.search(text()).group(1))
        wait_for(lambda: latest_step(out) > first_resume, 120, "a checkpoint after the resume", daemon_logs)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm_env, check=True, timeout=30)
        # 3. it runs a third time and finishes
        wait_for(lambda: state().get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
                 300, "the job to finish", daemon_logs)
        final = state()
        assert (final.get("JobState"), final.get("ExitCode"), final.get("Restarts")) == ("COMPLETED", "0:0", "2"), \
            f"{final}\n{text()[-8000:]}"
    finally:
        if state().get("JobState") in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED"):
            subprocess.run(["scancel", job], env=slurm_env, timeout=30)
    log_text = text()
    assert "requeued (restart 1): resuming" in log_text and "requeued (restart 2): resuming" in log_text, log_text
    assert "stop requested (SIGTERM)" in log_text, log_text[-8000:]
    assert "stop requested (SIGUSR1)" in log_text and "requeueing job" in log_text, log_text[-8000:]
    resumes = [int(s) for s in resumed.findall(log_text)]
    assert len(resumes) == 2 and 0 < resumes[0] < resumes[1] < max_steps, resumes
    assert metric_steps(out) == list(range(1, max_steps + 1))
    assert os.path.isfile(os.path.join(out, "final", "config.json"))
    assert f"done: {max_steps} steps" in log_text
