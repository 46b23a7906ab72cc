"""Operating a long run: an error ends every process, live metrics (TensorBoard, W&B offline) and plots,
bad data met during training, diverging steps, crash-safe checkpoints (kill -9, a full disk), --set."""
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid

import psutil
import pytest
import torch
from assets import REPO
from safetensors.torch import load_file
from test_train import read_metrics, torchrun_cmd, without_timing, write_config

TAG_VARIABLE = "RECIPE_TEST_RUN_TAG"  # inherited by every process of a run: torchrun, ranks, DataLoader workers
FAILURE_INJECTION = """
import os, sys, time
import recipe.train as train

where, failing_rank = sys.argv[1], sys.argv[2]


def fail(*args, **kwargs):
    print(f"\\ninjected failure at {where}: {time.time()}", flush=True)
    raise RuntimeError(f"injected failure at {where}")


if where == "loop":
    real_step, calls = train.train_step, []

    def train_step(run, cfg):
        calls.append(1)
        if len(calls) == 2 and os.environ.get("RANK", "0") == failing_rank:
            fail()
        return real_step(run, cfg)

    train.train_step = train_step
elif where == "export":
    train.export_student = fail
elif where == "eval":
    train.evaluate_during_training = fail
sys.exit(train.main(sys.argv[3:]))
"""


def env_with(tag: str, **extra) -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **{TAG_VARIABLE: tag}, **extra)


def processes_tagged(tag: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(TAG_VARIABLE) == tag:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def assert_no_process_left(tag: str) -> None:
    """Every process of the run is gone (a second for the kernel's SIGKILLs to land); any left is killed."""
    deadline = time.time() + 3
    while processes_tagged(tag) and time.time() < deadline:
        time.sleep(0.1)
    left = processes_tagged(tag)
    for process in left:
        process.kill()
    assert not left, f"processes left behind: {[(p.pid, p.name()) for p in left]}"


def start(cmd: list[str], tag: str, **env) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env_with(tag, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"still running after {timeout} s:\n{proc.communicate()[0][-4000:]}") from None


def line_count(path: str) -> int:
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for _ in f)


def single_process(config: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "recipe.train", "--config", config, *args]


# ---------------------------------------------------------------------------------------------------
# An error ends every process


@pytest.mark.slow
# the loop case is the default one; export and eval end the same way (the same handler), 10 s each
@pytest.mark.parametrize("where", ["loop", pytest.param("export", marks=pytest.mark.extended),
                                   pytest.param("eval", marks=pytest.mark.extended)])
def test_an_error_after_training_started_ends_the_run_at_once(tmp_path, demo_assets, where):
    """With a DataLoader worker (which ignores SIGTERM): before, the process hung at interpreter exit."""
    script = tmp_path / "inject.py"
    script.write_text(FAILURE_INJECTION)
    config, out = write_config(tmp_path, demo_assets, "fail", max_steps=2, micro_batch_size=2, grad_accum=1,
                               eval_max_samples=2, **{"data.num_workers": 1, "data.eval": [demo_assets["eval"]]})
    tag = uuid.uuid4().hex
    proc = start([sys.executable, str(script), where, "0", "--config", config], tag)
    log = finish(proc, timeout=240)
    ended = time.time()
    assert proc.returncode != 0 and f"RuntimeError: injected failure at {where}" in log, log[-3000:]
    injected = float(log.split(f"injected failure at {where}: ")[1].split()[0])
    assert ended - injected < 30, f"exited {ended - injected:.0f} s after the error"
    assert_no_process_left(tag)


@pytest.mark.slow
def test_an_error_on_one_rank_ends_every_rank(tmp_path, demo_assets):
    script = tmp_path / "inject.py"
    script.write_text(FAILURE_INJECTION)
    config, out = write_config(tmp_path, demo_assets, "fail2", max_steps=4, micro_batch_size=2, grad_accum=1,
                               **{"data.num_workers": 1})
    tag = uuid.uuid4().hex
    cmd = torchrun_cmd(config)
    cmd[cmd.index("-m", 3):cmd.index("--config")] = [str(script), "loop", "1"]  # the script instead of -m recipe.train
    proc = start(cmd, tag)
    log = finish(proc, timeout=300)
    ended = time.time()
    assert proc.returncode != 0, log[-3000:]
    # torchrun's summary shows the failing rank's error (recipe.train's main is wrapped in @record).
    assert "injected failure at loop" in log.split("ChildFailedError")[-1], log[-4000:]
    injected = float(log.split("injected failure at loop: ")[1].split()[0])
    assert ended - injected < 45, f"torchrun exited {ended - injected:.0f} s after the error"
    assert_no_process_left(tag)


def test_a_missing_eval_split_stops_before_training(tmp_path, demo_assets):
    config, out = write_config(tmp_path, demo_assets, "noeval", max_steps=2,
                               **{"data.eval": [str(tmp_path / "nope")], "data.num_workers": 1})
    proc = subprocess.run(single_process(config), cwd=REPO, env=env_with("noeval"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert f"config error: data.eval: {tmp_path / 'nope' / 'index.json'} not found" in proc.stderr, proc.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))


# ---------------------------------------------------------------------------------------------------
# Bad data met during training; live metrics; plots; exact resume after kill -9


def shard_members(path: str) -> list[tuple[int, str, int]]:
    """(sample number in the shard, member name, end offset of its data) in tar order."""
    keys, members = {}, []
    with tarfile.open(path) as tar:
        for member in tar:
            key = member.name.split(".")[0]
            keys.setdefault(key, len(keys))
            members.append((keys[key], member.name, member.offset_data + member.size))
    return members


@pytest.fixture(scope="module")
def damaged_data(tmp_path_factory, demo_assets):
    """The demo train split in 4 shards of 24, the second truncated to 60% after conversion; returns the
    directory and the global indices of the samples the cut damaged (a member of theirs reaches past it)."""
    from recipe.data import convert_to_shards

    out = str(tmp_path_factory.mktemp("damaged") / "train")
    raw = os.path.join(demo_assets["data"], "raw")
    convert_to_shards([os.path.join(raw, "train.json")], os.path.join(raw, "images"), out, samples_per_shard=24,
                      progress=False)
    shard = os.path.join(out, "shard-000001.tar")
    size = os.path.getsize(shard)
    cut = int(0.6 * size)
    lost = sorted({24 + n for n, _, end in shard_members(shard) if end > cut})
    with open(shard, "r+b") as f:
        f.truncate(cut)
    return out, lost


def damaged_config(tmp_path, demo_assets, damaged_data, name, **overrides):
    settings = {"max_steps": 12, "save_every": 1, "keep_checkpoints": 1, "micro_batch_size": 4, "grad_accum": 1,
                "eval_every": 6, "eval_max_samples": 6, "data.train": [damaged_data[0]],
                "data.eval": [demo_assets["eval"]], "data.num_workers": 1, "data.max_skipped_fraction": 0.2}
    return write_config(tmp_path, demo_assets, name, **{**settings, **overrides})


@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory, demo_assets, damaged_data):
    """One epoch (12 steps of 2 x 4 samples) over the damaged data on 2 ranks, reporting to TensorBoard and
    to W&B in offline mode (no network)."""
    pytest.importorskip("wandb")
    config, out = damaged_config(tmp_path_factory.mktemp("damaged_run"), demo_assets, damaged_data, "run",
                                 report_to=["tensorboard", "wandb"])
    proc = start(torchrun_cmd(config), uuid.uuid4().hex, WANDB_MODE="offline", WANDB_SILENT="true")
    log = finish(proc, timeout=400)
    assert proc.returncode == 0, log[-5000:]
    return out


def test_a_truncated_shard_loses_only_its_damaged_samples(damaged_run, damaged_data):
    _, lost = damaged_data
    records = read_metrics(damaged_run)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert os.path.isfile(os.path.join(damaged_run, "final", "eval.json"))
    with open(os.path.join(damaged_run, "skipped.jsonl")) as f:
        skipped = [json.loads(line) for line in f]
    assert sorted(s["index"] for s in skipped) == lost  # one epoch: every sample drawn once
    assert all(s["shard"].endswith("shard-000001.tar") and s["epoch"] == 0 for s in skipped)
    assert sum(r["skipped_samples"] for r in steps) == len(lost)
    for s in skipped:  # skipped.jsonl's step is the step whose micro-batches drew the sample
        assert steps[s["step"] - 1]["skipped_samples"] > 0


def test_tensorboard_events_hold_the_metrics_records(damaged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(damaged_run, "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    records = read_metrics(damaged_run)
    for key in ("loss", "ce", "align", "vsd", "lr", "grad_norm", "tokens_per_s", "skipped_samples"):
        logged = {e.step: e.value for e in events.Scalars(f"train/{key}")}
        assert logged == pytest.approx({r["step"]: r[key] for r in records if key in r}, rel=1e-6), key
    accuracy = {e.step: e.value for e in events.Scalars("eval/accuracy")}
    assert accuracy == pytest.approx({r["step"]: r["eval"]["accuracy"] for r in records if "eval" in r})
    assert sorted(accuracy) == [6, 12]


def wandb_history(path: str) -> list[dict]:
    """The history rows of an offline W&B run file: after a 7-byte header, a LevelDB-style log (32 KiB
    blocks of records, each with a 7-byte header: checksum, length, type) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, block, payloads, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's zero-padded tail
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            payloads.append(pending)
            pending = b""
    rows = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_metrics(damaged_run):
    (run_file,) = glob.glob(os.path.join(damaged_run, "wandb", "offline-run-*", "run-*.wandb"))
    rows = {row["_step"]: row for row in wandb_history(run_file)}
    records = read_metrics(damaged_run)
    assert sorted(rows) == list(range(1, 13))
    for record in records:
        if "eval" in record:
            assert rows[record["step"]]["eval/accuracy"] == pytest.approx(record["eval"]["accuracy"])
        else:
            for key in ("loss", "ce", "align", "vsd", "lr", "grad_norm", "skipped_samples"):
                assert rows[record["step"]][f"train/{key}"] == pytest.approx(record[key]), (record["step"], key)


def test_plot_of_two_runs(tmp_path, damaged_run, diverged_run):
    from matplotlib.image import imread

    out = str(tmp_path / "curves.png")
    proc = subprocess.run([sys.executable, "-m", "recipe.plot", damaged_run, diverged_run[0], "--out", out],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == out
    image = imread(out)
    assert image.shape[:2] == (750, 1800) and image.std() > 0.05  # 18 x 7.5 inches at 100 dpi, not blank


KILLS = 2  # each kill costs a rerun's start-up: one inside a checkpoint write, one at a random moment


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun_matches_the_uninterrupted_run(tmp_path, demo_assets, damaged_data,
                                                                           damaged_run):
    """kill -9 of the launcher (its ranks and their DataLoader workers die with it): once inside a checkpoint
    write, then at a random moment; each rerun resumes. The run ends with every step logged once, the same
    skipped samples and the same weights as the uninterrupted one: resume after skips is exact."""
    config, out = damaged_config(tmp_path, demo_assets, damaged_data, "killed")
    rng = random.Random(0)
    checkpoints = os.path.join(out, "checkpoints")
    kills = []
    for attempt in range(8):
        tag = uuid.uuid4().hex
        proc = start(torchrun_cmd(config), tag)
        lines_before = line_count(os.path.join(out, "metrics.jsonl"))
        delay = rng.uniform(0.2, 1.0)
        started, progressed = time.time(), None
        while proc.poll() is None and len(kills) < KILLS and time.time() - started < 300:
            lines = line_count(os.path.join(out, "metrics.jsonl"))
            in_write = os.path.isdir(checkpoints) and any(n.endswith(".partial") for n in os.listdir(checkpoints))
            if lines > lines_before and progressed is None:
                progressed = time.time()
            if (not kills and in_write) or (kills and progressed and time.time() - progressed > delay):
                os.kill(proc.pid, signal.SIGKILL)
                kills.append("inside a checkpoint write" if in_write else f"{delay:.1f} s after step {lines}")
                break
            time.sleep(0.005)
        log = finish(proc, timeout=300)
        assert_no_process_left(tag)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, log[-4000:]
    assert len(kills) == KILLS and kills[0] == "inside a checkpoint write", kills
    got, want = without_timing(read_metrics(out)), without_timing(read_metrics(damaged_run))
    assert [(r["step"], "eval" in r) for r in got] == [(r["step"], "eval" in r) for r in want]
    for a, b in zip(got, want):
        assert (a == b) if "eval" in a else (a == pytest.approx(b, rel=1e-6, abs=1e-9)), (a, b)
    with open(os.path.join(out, "skipped.jsonl")) as a, open(os.path.join(damaged_run, "skipped.jsonl")) as b:
        assert a.read() == b.read()
    want = load_file(os.path.join(damaged_run, "final", "model.safetensors"))
    got = load_file(os.path.join(out, "final", "model.safetensors"))
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)


def test_too_many_unreadable_samples_stop_the_run_naming_the_shard(tmp_path, demo_assets, damaged_data):
    config, out = damaged_config(tmp_path, demo_assets, damaged_data, "strict", max_steps=24, **{
        "data.max_skipped_fraction": 0.01, "data.eval": []})
    proc = subprocess.run(single_process(config), cwd=REPO, env=env_with("strict"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "more than data.max_skipped_fraction=0.01" in proc.stderr, proc.stderr[-3000:]
    assert "shard-000001.tar" in proc.stderr.split("stopped:")[1]
    assert not os.path.exists(os.path.join(out, "final"))


def demo_items(demo_assets, n: int):
    from recipe.data import ShardDataset

    dataset = ShardDataset(demo_assets["train"])
    return [dataset[i] for i in range(n)]


def demo_collator(demo_assets, tokenizer=None):
    from transformers import AutoConfig, AutoTokenizer

    from recipe.data import Collator, image_token_id
    from recipe.models import image_token_count, load_image_processor

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(demo_assets["student"])
    config = AutoConfig.from_pretrained(demo_assets["student"])
    return Collator(tokenizer, load_image_processor(demo_assets["student"]), num_image_tokens=image_token_count(config),
                    image_token_id=image_token_id(tokenizer, "<image>"), max_length=160)


def test_a_bad_image_inside_a_valid_tar_is_skipped_in_a_worker(tmp_path, demo_assets):
    from recipe.data import ShardDataset, SkipUnreadable

    shard_dir = tmp_path / "train"
    shutil.copytree(demo_assets["train"], shard_dir)
    shard = str(shard_dir / "shard-000000.tar")
    with tarfile.open(shard) as tar:
        image = next(m for m in tar if m.name.endswith(".png"))
    with open(shard, "r+b") as f:  # garbage of the same size: the tar stays valid, the PNG does not decode
        f.seek(image.offset_data)
        f.write(bytes(random.Random(0).randrange(256) for _ in range(image.size)))
    bad = int(image.name.split(".")[0])
    dataset = SkipUnreadable(ShardDataset(str(shard_dir)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=demo_collator(demo_assets), num_workers=1)
    batches = [batch for _, batch in zip(range(3), loader)]
    skipped = [s for batch in batches for s in batch["skipped"]]
    assert len(skipped) == 1 and skipped[0]["index"] == bad and skipped[0]["shard"] == shard
    assert skipped[0]["id"] == ShardDataset(demo_assets["train"]).meta(bad)["id"]
    assert "UnidentifiedImageError" in skipped[0]["reason"] or "OSError" in skipped[0]["reason"], skipped[0]
    assert sum(len(batch["ids"]) for batch in batches) == 11 and skipped[0]["id"] not in batches[bad // 4]["ids"]


def test_a_conversation_the_template_cannot_render_is_skipped(demo_assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_assets["student"])
    items = demo_items(demo_assets, 4)
    refused = items[2]["conversations"][-1]["value"]
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['content'] == '" + refused + "' %}{{ raise_exception('cannot render') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    batch = demo_collator(demo_assets, tokenizer)(items)
    kept = [item["id"] for item in items if item["conversations"][-1]["value"] != refused]
    assert batch["ids"] == kept and len(kept) < 4
    assert {s["id"] for s in batch["skipped"]} == {item["id"] for item in items} - set(kept)
    assert all("chat template" in s["reason"] and "cannot render" in s["reason"] for s in batch["skipped"])


# ---------------------------------------------------------------------------------------------------
# Diverging steps


@pytest.fixture(scope="module")
def diverged_run(tmp_path_factory, demo_assets):
    """optim.lr=1e38 (after the demo configs' warmup): step 1 blows the weights up, the next ones are NaN."""
    tmp_path = tmp_path_factory.mktemp("diverged")
    config, out = write_config(tmp_path, demo_assets, "lr", max_steps=10, save_every=1, keep_checkpoints=1,
                               micro_batch_size=2, grad_accum=1, max_bad_steps=3,
                               **{"optim.warmup_steps": 30, "data.num_workers": 1})
    proc = subprocess.run(single_process(config, "--set", "optim.lr=1e38"), cwd=REPO, env=env_with("lr"),
                          capture_output=True, text=True, timeout=300)
    return out, proc


def test_a_diverging_run_stops_after_max_bad_steps_with_finite_weights_saved(diverged_run):
    out, proc = diverged_run
    assert proc.returncode != 0
    assert "3 optimizer steps in a row had a non-finite loss or gradient norm" in proc.stderr, proc.stderr[-3000:]
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r.get("bad_step") for r in records][1:] == ["non-finite loss, ce, align, vsd"] * 3
    assert all(len(r["bad_step_samples"]) == 2 for r in records[1:])
    assert records[2]["lr"] == records[3]["lr"] == records[1]["lr"]  # no LR step either
    latest = open(os.path.join(out, "checkpoints", "latest")).read()
    assert f"The last checkpoint, {out}/checkpoints/{latest}, holds finite weights" in proc.stderr
    state = torch.load(os.path.join(out, "checkpoints", latest, "mp_rank_00_model_states.pt"), weights_only=False)
    weights = [t for t in state["module"].values() if t.is_floating_point()]
    assert weights and all(torch.isfinite(t).all() for t in weights)


def test_a_nonfinite_loss_leaves_no_finite_gradient():
    """An infinite term that does not depend on the weights keeps their gradient finite; DeepSpeed would then
    apply the step. The backward source makes it NaN, so that DeepSpeed's non-finite-norm skip catches it."""
    from recipe.guards import backward_source

    weight = torch.ones(3, requires_grad=True)
    finite = (weight * 2).sum()
    backward_source(finite).backward()
    assert weight.grad.tolist() == [2.0, 2.0, 2.0]
    weight.grad = None
    infinite = (weight * 2).sum() + torch.tensor(float("inf"))
    infinite.backward(retain_graph=True)
    assert torch.isfinite(weight.grad).all()  # what plain backward leaves
    weight.grad = None
    backward_source(infinite).backward()
    assert torch.isnan(weight.grad).all()


def test_weights_that_are_no_longer_finite_stop_the_run_without_saving():
    from recipe.guards import RunStopped, check_weights, weights_finite

    layer = torch.nn.Linear(3, 2)
    assert weights_finite(layer)
    with torch.no_grad():
        layer.bias[1] = float("inf")
    assert not weights_finite(layer)
    layer.bias.requires_grad_(False)  # frozen weights are not the optimizer's doing
    assert weights_finite(layer)
    check_weights(True, 7, "out/checkpoints/step00000006")
    with pytest.raises(RunStopped) as stopped:
        check_weights(False, 7, "out/checkpoints/step00000006")
    assert stopped.value.code == ("[train] stopped: step 7: the student's weights are no longer finite (inf or NaN); "
                                  "stopping without saving them. The last checkpoint, out/checkpoints/step00000006, "
                                  "holds finite weights from before. Lower optim.lr")


NONFINITE_GRADIENT = """
import os, sys
import recipe.train as train

real_build = train.build_run


def build_run(cfg, precision, **kwargs):
    run = real_build(cfg, precision, **kwargs)
    if os.environ["RANK"] == "1":  # the third backward of rank 1 only gets an infinite gradient
        calls = []
        param = next(p for p in run.student.parameters() if p.requires_grad)

        def poison(grad):
            calls.append(1)
            return grad * float("inf") if len(calls) == 3 else grad

        param.register_hook(poison)
    return run


train.build_run = build_run
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.slow
# ZeRO-3 (partitioned gradients) is the harder case; ZeRO-2 runs under -m extended
@pytest.mark.parametrize("zero_stage", [pytest.param(2, marks=pytest.mark.extended), 3])
def test_a_nonfinite_gradient_on_one_rank_is_skipped_on_both(tmp_path, demo_assets, zero_stage):
    script = tmp_path / "poison.py"
    script.write_text(NONFINITE_GRADIENT)
    config, out = write_config(tmp_path, demo_assets, "poisoned", max_steps=4, save_every=1, keep_checkpoints=4,
                               micro_batch_size=2, grad_accum=1, zero_stage=zero_stage, **{"optim.warmup_steps": 0})
    cmd = torchrun_cmd(config)
    cmd[cmd.index("-m", 3):cmd.index("--config")] = [str(script)]
    proc = start(cmd, uuid.uuid4().hex)
    log = finish(proc, timeout=300)
    assert proc.returncode == 0, log[-4000:]
    records = read_metrics(out)
    assert [r.get("bad_step") for r in records] == [None, None, "non-finite gradient norm", None]
    assert len(records[2]["bad_step_samples"]) == 4  # both ranks' samples
    assert records[3]["lr"] == records[2]["lr"] != records[1]["lr"]
    step = {s: os.path.join(out, "checkpoints", f"step{s:08d}") for s in (2, 3, 4)}
    files = sorted(os.listdir(step[3]))
    states = [f for f in files if f.endswith("states.pt")]
    assert sum("optim_states" in f for f in states) == 2  # one optimizer partition per rank
    for name in states:  # step 3 changed nothing on either rank; step 4 trained again
        before, skipped, after = (torch.load(os.path.join(step[s], name), weights_only=False) for s in (2, 3, 4))
        assert tensors_equal(before, skipped, ignore={"global_steps", "skipped_steps", "global_samples", "step",
                                                      "client_state", "lr_scheduler", "ds_version"}), name
        if "optim" in name:
            assert not tensors_equal(skipped, after, ignore=set()), name


def tensors_equal(a, b, ignore: set) -> bool:
    """The tensors of two nested checkpoint states are equal (keys in `ignore` skipped)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(tensors_equal(a[k], b[k], ignore) for k in a if k not in ignore)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y, ignore) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return True


# ---------------------------------------------------------------------------------------------------
# A full disk


FILL_DISK_IN_SECOND_SAVE = """
import os, sys
import recipe.checkpoints as checkpoints
import recipe.train as train

real_save, saves = checkpoints.save_checkpoint, []


def save_checkpoint(engine, checkpoint_dir, *args, **kwargs):
    saves.append(1)
    if len(saves) == 2:  # after save_checkpoint's space check: the disk fills while it writes
        real_engine_save = engine.save_checkpoint

        def fill_then_save(*a, **k):
            with open(os.path.join(checkpoint_dir, "..", "filler"), "wb") as f:
                try:
                    while True:
                        f.write(b"x" * 65536)
                except OSError:
                    pass
            return real_engine_save(*a, **k)

        engine.save_checkpoint = fill_then_save
    return real_save(engine, checkpoint_dir, *args, **kwargs)


train.save_checkpoint = save_checkpoint
sys.exit(train.main(sys.argv[1:]))
"""


def in_small_tmpfs(mount: str, size_mb: float, shell: str) -> list[str]:
    """A shell command run with a tmpfs of size_mb mounted at `mount`, in a mount namespace of its own (the
    mount vanishes with it); as root, or through a user namespace where those are allowed."""
    if not shutil.which("unshare"):
        pytest.skip("unshare(1) is not installed")
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    probe = subprocess.run(["unshare", *user, "--mount", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mount}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.strip()}")
    return ["unshare", *user, "--mount", "sh", "-c",
            f"mount -t tmpfs -o size={int(size_mb * 1024)}k tmpfs {mount} && {shell}"]


@pytest.mark.slow
# "while" (the disk fills during the write) is the harder case; "before" runs under -m extended
@pytest.mark.parametrize("when, disk_mb", [pytest.param("before", 7, marks=pytest.mark.extended), ("while", 12)])
def test_a_full_disk_fails_cleanly_and_keeps_the_previous_checkpoint(tmp_path, demo_assets, when, disk_mb):
    """A checkpoint takes 4.2 MiB. before: the disk holds one, not two (save_checkpoint's space check refuses
    the second); while: it has room for two, but fills up during the second write (ENOSPC from the real
    filesystem)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    config, out = write_config(tmp_path, demo_assets, "full", max_steps=4, save_every=1, keep_checkpoints=1,
                               micro_batch_size=2, grad_accum=1, report_to=[],
                               output_dir=str(mount / "run"))
    script = tmp_path / "fill.py"
    script.write_text(FILL_DISK_IN_SECOND_SAVE)
    program = f"{sys.executable} -m recipe.train" if when == "before" else f"{sys.executable} {script}"
    copy = tmp_path / "copy"
    shell = (f"{program} --config {config} > {tmp_path}/log 2>&1; echo $? > {tmp_path}/rc; "
             f"rm -f {mount}/run/filler; cp -a {mount}/run {copy}")
    subprocess.run(in_small_tmpfs(str(mount), disk_mb, shell), cwd=REPO, env=env_with("full"), timeout=300,
                   check=True)
    log = (tmp_path / "log").read_text()
    assert (tmp_path / "rc").read_text().strip() != "0", log[-3000:]
    message = log.split("CheckpointError: ")[-1]
    assert f"cannot write checkpoint step00000002 to {mount}/run/checkpoints" in message, log[-3000:]
    assert "it needs about 4." in message and f"the previous checkpoint {mount}/run/checkpoints/step00000001 is kept" \
        in message
    assert sorted(os.listdir(copy / "checkpoints")) == ["latest", "step00000001", "zero_to_fp32.py", "zero_to_torch.py"]
    # The previous checkpoint loads: the same command, on a disk with room, resumes from it and finishes.
    resumed_config, _ = write_config(tmp_path, demo_assets, "resumed", max_steps=4, save_every=1, keep_checkpoints=1,
                                     micro_batch_size=2, grad_accum=1, output_dir=str(copy))
    proc = subprocess.run(single_process(resumed_config), cwd=REPO, env=env_with("full"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {copy}/checkpoints/step00000001 at step 1" in proc.stdout + proc.stderr
    assert [r["step"] for r in read_metrics(str(copy))] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------------
# --set


def test_set_takes_several_values_and_repeats(tmp_path):
    from recipe.config import load_config
    from recipe.train import parse_args

    config = tmp_path / "c.yaml"
    config.write_text("output_dir: out\nstudent: {path: s}\nteacher: {path: t}\ndata: {train: [d]}\nmax_steps: 1\n")
    args = parse_args(["--config", str(config), "--set", "optim.lr=1e-4", "max_steps=7", "loss.kind=kl",
                       "--set", "report_to=[]", "data.eval=[a, b]"])
    assert args.overrides == ["optim.lr=1e-4", "max_steps=7", "loss.kind=kl", "report_to=[]", "data.eval=[a, b]"]
    cfg = load_config(args.config, args.overrides)
    assert (cfg.optim.lr, cfg.max_steps, cfg.loss.kind, cfg.report_to, cfg.data.eval) == (
        1e-4, 7, "kl", [], ["a", "b"])
