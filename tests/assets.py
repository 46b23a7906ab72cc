"""Real test assets built the way a user builds them: demo data through data_prep/, tiny models through
recipe.models.tiny, both loaded back through the user-facing code paths."""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_module(args: list[str], env: dict | None = None, timeout: int = 600,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run `python ARGS` from the repository root; with check, raise with the output when it fails."""
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def load_demo_module():
    """data_prep/make_demo_data.py as a module (a script, not part of the package)."""
    path = os.path.join(REPO, "data_prep", "make_demo_data.py")
    spec = importlib.util.spec_from_file_location("make_demo_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_until_stopped(cmd: list[str], out: str, after_steps: int, env: dict, timeout: int = 300) -> str:
    """Run a training command in a session of its own, send SIGTERM to every process of it (as SLURM does on
    preemption) once out/metrics.jsonl has `after_steps` lines, and return its output once it has exited."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= after_steps:
            os.killpg(proc.pid, signal.SIGTERM)
            break
        time.sleep(0.02)
    return proc.communicate(timeout=timeout)[0]


def build_demo_assets(root: str, n_train: int = 96, n_eval: int = 24) -> dict:
    """Small demo data (train/eval shards, tokenizer) and the two tiny models; reused when present."""
    paths = {"data": os.path.join(root, "data"), "teacher": os.path.join(root, "teacher"),
             "student": os.path.join(root, "student")}
    paths.update(train=os.path.join(paths["data"], "train"), eval=os.path.join(paths["data"], "eval"),
                 tokenizer=os.path.join(paths["data"], "tokenizer"))
    if not os.path.isfile(os.path.join(paths["train"], "index.json")):
        run_module(["data_prep/make_demo_data.py", "--out", paths["data"], "--n-train", str(n_train),
                    "--n-eval", str(n_eval)])
    for role, seed in (("teacher", 0), ("student", 1)):
        if not os.path.isfile(os.path.join(paths[role], "config.json")):
            run_module(["-m", "recipe.models.tiny", "--preset", f"demo-{role}", "--tokenizer", paths["tokenizer"],
                        "--out", paths[role], "--seed", str(seed)])
    return paths
