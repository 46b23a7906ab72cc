"""Beyond one world size (CPU, gloo): resume on another number of ranks, the teacher's placement, and the
communication model against DeepSpeed's comms logger (docs/scaling.md).

The default run takes about 3 minutes on 2 idle cores; `-m extended` adds the other resume directions, the
replicated teacher under ZeRO-2 and the comms model over every ZeRO-3 release regime."""
import json
import os
import shutil
import subprocess

import pytest
from assets import REPO, run_until_stopped
from test_train import read_metrics, run_training, torchrun_cmd, without_timing, write_config
from transformers import LlavaForConditionalGeneration

from recipe.config import ConfigError, load_config
from recipe.data import ResumableDistributedSampler
from recipe.resume import grad_accum_keeping, plan_resume

ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
STEPS = 8  # 16 samples per step, 96 in the demo set: epoch 1 starts at step 7


def scaling_config(tmp_path, demo_assets, name, **overrides):
    """micro 4 x grad_accum 2 x 2 ranks = 16 samples per step (grad_accum is for 2 ranks: a 1-rank run sets 4)."""
    return write_config(tmp_path, demo_assets, name, **{"max_steps": STEPS, "save_every": 100, **overrides})


def final_weights(out):
    """The exported student's weights by parameter name (ZeRO-2 and ZeRO-3 exports name the vision tower's
    tensors differently in the file; loading maps both onto the model)."""
    return LlavaForConditionalGeneration.from_pretrained(os.path.join(out, "final")).state_dict()


def max_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def references(tmp_path_factory, demo_assets):
    """An uninterrupted 2-rank run at ZeRO-2 (ZeRO-3 follows it to float noise), and one with another data
    order (another seed); their outputs and logs."""
    root = tmp_path_factory.mktemp("scaling")
    outs = {}
    for name, overrides in (("zero2", {}), ("reordered", {"seed": 1})):
        config, out = scaling_config(root, demo_assets, name, **overrides)
        outs[name], outs[f"{name}_log"] = out, run_training(config).stdout
    return outs


# ---------------------------------------------------------------------------------------------------
# Resume on another number of ranks

RESUMES = [pytest.param(2, 2, 1, id="zero2-2to1"), pytest.param(3, 1, 2, id="zero3-1to2"),
           pytest.param(2, 1, 2, id="zero2-1to2", marks=pytest.mark.extended),
           pytest.param(3, 2, 1, id="zero3-2to1", marks=pytest.mark.extended)]


@pytest.mark.slow
@pytest.mark.parametrize("stage,before,after", RESUMES)
def test_run_stopped_on_some_ranks_resumes_on_another_number(tmp_path, demo_assets, references, stage, before,
                                                              after):
    grad_accum = {1: 4, 2: 2}
    config, out = scaling_config(tmp_path, demo_assets, f"zero{stage}", zero_stage=stage,
                                 grad_accum=grad_accum[before])
    log = run_until_stopped(torchrun_cmd(config, before), out, after_steps=3, env=ENV)
    assert "stop requested" in log, log[-3000:]
    tag = open(os.path.join(out, "checkpoints", "latest")).read()
    stopped_at = int(tag.removeprefix("step"))
    assert 3 <= stopped_at < STEPS
    with open(os.path.join(out, "checkpoints", tag, "run_state.json")) as f:
        state = json.load(f)
    epoch = (stopped_at - 1) // 6  # the sampler moves to the next epoch when the next step draws from it
    assert state.pop("bad_steps") == {"in_a_row": 0} and state.pop("skipped")["reasons"] == {}  # clean data
    assert state == {"step": stopped_at, "sampler": {"epoch": epoch, "consumed": 16 * stopped_at - 96 * epoch},
                     "world_size": before, "micro_batch_size": 4, "grad_accum": grad_accum[before],
                     "global_batch": 16, "zero_stage": stage}

    # The same config (grad_accum for the old number of ranks): the resume recomputes it.
    resumed = run_training(config, nproc=after)
    assert (f"world size changed: {tag} was written on {before} ranks, resuming on {after}; the global batch "
            f"of 16 samples per step is kept as micro_batch_size 4 x grad_accum {grad_accum[after]} x {after} ranks "
            f"(was 4 x {grad_accum[before]} x {before})") in resumed.stdout
    got, want = without_timing(read_metrics(out)), without_timing(read_metrics(references["zero2"]))
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # every step logged once
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want] == [0] * 6 + [1] * 2
    for a, b in zip(got, want):
        for key in ("loss", "ce", "align", "vsd", "lr", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    resumed_weights, reference = final_weights(out), final_weights(references["zero2"])
    noise = max_difference(resumed_weights, reference)
    assert noise < 1e-5  # float noise: the same samples in the same micro-batches, summed in another order
    assert max_difference(final_weights(references["reordered"]), reference) > 100 * max(noise, 1e-6)


@pytest.mark.slow
def test_a_number_of_ranks_that_cannot_keep_the_global_batch_stops_before_training(tmp_path, demo_assets,
                                                                                    references):
    config, out = scaling_config(tmp_path, demo_assets, "bad", max_steps=2 * STEPS)
    shutil.copytree(references["zero2"], out)  # its checkpoint at step 8: 16 samples per step, 2 ranks
    proc = run_training_expecting_failure(config, nproc=3)
    assert ("the checkpoint was trained with a global batch of 16 samples per optimizer step, which 3 ranks with "
            "micro_batch_size=4 cannot keep (16 is not a multiple of 4 x 3). Resume on one of [1, 2, 4] ranks") \
        in proc
    assert "[train] loaded" not in proc  # before any model was loaded
    assert len(read_metrics(out)) == STEPS
    assert not os.path.exists(os.path.join(out, "checkpoints", f"step{STEPS:08d}", "universal"))


def run_training_expecting_failure(config: str, nproc: int) -> str:
    proc = subprocess.run(torchrun_cmd(config, nproc), cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


def test_grad_accum_is_recomputed_to_keep_the_global_batch_or_the_error_says_what_would(tmp_path):
    assert grad_accum_keeping(128, 4, 8) == 4 and grad_accum_keeping(128, 4, 32) == 1
    with pytest.raises(ConfigError, match=r"96 is not a multiple of 4 x 5\). Resume on one of \[1, 2, 3, 4, 6, 8, 12, "
                                          r"24\] ranks \(grad_accum"):
        grad_accum_keeping(96, 4, 5)  # and no micro_batch_size would keep it on 5 ranks
    with pytest.raises(ConfigError, match=r"No number of ranks keeps it with micro_batch_size=5; set micro_batch_size "
                                          r"to one of \[1, 2, 3, 4, 6, 8, 12, 24\]"):
        grad_accum_keeping(96, 5, 4)
    # A checkpoint written at another ZeRO stage is refused up front, with the stage to use.
    tag = tmp_path / "checkpoints" / "step00000004"
    tag.mkdir(parents=True)
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    (tag / "run_state.json").write_text(json.dumps({"step": 4, "sampler": {}, "world_size": 1, "micro_batch_size": 4,
                                                    "grad_accum": 4, "global_batch": 16, "zero_stage": 2}))
    cfg = load_config(os.path.join(REPO, "recipe/configs/demo_switchkd.yaml"), ["zero_stage=3", "micro_batch_size=2"])
    with pytest.raises(ConfigError, match="was written at ZeRO-2 but the config asks for zero_stage=3"):
        plan_resume(cfg, str(tmp_path / "checkpoints"), "step00000004", 4)
    plan = plan_resume(load_config(os.path.join(REPO, "recipe/configs/demo_switchkd.yaml"), ["micro_batch_size=2"]),
                       str(tmp_path / "checkpoints"), "step00000004", 4)
    assert plan.universal and plan.config.grad_accum == 2 and plan.config.micro_batch_size == 2


def test_every_step_takes_the_same_micro_batches_on_any_number_of_ranks():
    """The sampler's global order, cut into steps of 12 samples and micro-batches of 3, whatever the ranks: each
    rank's k-th micro-batch of a step is micro-batch k x ranks + rank of the step; an epoch ends at a step."""
    n, micro, step = 53, 3, 12

    def micro_batches(world, epochs=2):
        per_rank = {}
        for r in range(world):
            sampler = ResumableDistributedSampler(n, rank=r, world_size=world, seed=5, drop_last=True,
                                                  micro_batch_size=micro, step_size=step)
            taken = []
            for epoch in range(epochs):
                sampler.set_epoch(epoch)
                taken += list(sampler)
            per_rank[r] = [taken[i:i + micro] for i in range(0, len(taken), micro)]
        # Interleave the ranks' micro-batches as the steps take them.
        return [per_rank[r][k] for k in range(len(per_rank[0])) for r in range(world)]

    one, two, four = micro_batches(1), micro_batches(2), micro_batches(4)
    assert one == two == four
    assert len(one) == 2 * (n // step) * (step // micro)  # 4 whole steps per epoch, the rest cut
    first_epoch = [i for b in one[: len(one) // 2] for i in b]
    assert len(set(first_epoch)) == len(first_epoch) == 48  # each sample at most once in an epoch

    # Resumed mid-epoch on another number of ranks: it continues at the same sample.
    sampler = ResumableDistributedSampler(n, rank=1, world_size=2, seed=5, drop_last=True, micro_batch_size=micro,
                                          step_size=step)
    sampler.load_state_dict({"epoch": 0, "consumed": 24})  # written by a 4-rank run after 2 steps
    assert list(sampler)[:micro] == one[24 // micro + 1]


# ---------------------------------------------------------------------------------------------------
# Teacher placement and communication


def zero3_config(tmp_path, release: dict) -> str:
    with open(os.path.join(REPO, "ds_configs", "zero3.json")) as f:
        ds = json.load(f)
    ds["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0, **release)
    path = str(tmp_path / f"zero3_{'_'.join(f'{k}{v}' for k, v in release.items()) or 'held'}.json")
    with open(path, "w") as f:
        json.dump(ds, f)
    return path


def predicted(demo_assets, config_path: str, nproc: int = 2) -> dict[str, int]:
    from recipe.comms import Layout, predict_step, vlm_blocks
    from recipe.engine import deepspeed_config

    cfg = load_config(config_path)
    ds = deepspeed_config(cfg, "fp32")
    student = LlavaForConditionalGeneration.from_pretrained(demo_assets["student"])
    teacher = LlavaForConditionalGeneration.from_pretrained(demo_assets["teacher"])
    blocks = dict(student=vlm_blocks(student, trainable=True, checkpointing=cfg.gradient_checkpointing),
                  teacher=vlm_blocks(teacher, trainable=False, checkpointing=cfg.gradient_checkpointing))
    # The demo's micro-batches have fewer supervised rows than loss.chunk_rows: one chunk of the loss head.
    layout = Layout.from_ds_config(ds, nproc, head_chunks=1 if cfg.loss.chunk_rows else 0)
    return predict_step(**blocks, layout=layout, switch=True,
                        placement=cfg.teacher_placement)


def measured(out: str, step: int = 2) -> dict[str, int]:
    """Bytes of each collective in a step after the first (the first records ZeRO-3's module trace)."""
    comms = read_metrics(out)[step - 1]["comms"]
    return {name: entry["bytes"] for name, entry in comms.items()}


@pytest.mark.slow
# ZeRO-2 (nothing to gather for the teacher either way) runs under -m extended
@pytest.mark.parametrize("stage", [3, pytest.param(2, marks=pytest.mark.extended)])
def test_replicated_teacher_gives_the_sharded_losses_and_the_modelled_communication(tmp_path, demo_assets,
                                                                                     references, stage):
    """ZeRO-3: with every parameter partitioned, released after each use unless used again within 1e6
    elements, and gradient checkpointing (its recomputation gathers again): the replicated teacher's run gathers
    the student's parameters only, the sharded one the teacher's too, both as the model predicts."""
    extra = {"ds_config": zero3_config(tmp_path, {"stage3_max_reuse_distance": 1_000_000}),
             "gradient_checkpointing": True} if stage == 3 else {}
    runs = {}
    # At ZeRO-2 the placement changes nothing ZeRO sends (no parameter is ever partitioned): one run.
    for placement, steps in (("replicated", 4), ("sharded", 2))[: 2 if stage == 3 else 1]:
        config, out = scaling_config(tmp_path, demo_assets, placement, zero_stage=stage, max_steps=steps,
                                     teacher_placement=placement, log_comms=True, **extra)
        log = run_training(config).stdout
        runs[placement] = (config, out, log)
        want = predicted(demo_assets, config)
        got = measured(out)
        assert 0 <= got.pop("all_reduce", 0) - want.pop("all_reduce", 0) <= 64  # and the gradient norm's scalars
        assert got == want, placement
    replicated, reference = read_metrics(runs["replicated"][1]), read_metrics(references["zero2"])[:4]
    for a, b in zip(replicated, reference):
        for key in ("loss", "ce", "align", "vsd", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    if stage == 3:
        assert measured(runs["sharded"][1])["all_gather_into_tensor"] > 4 * measured(
            runs["replicated"][1])["all_gather_into_tensor"]
        assert "teacher replicated, outside ZeRO: 4.1 MB per GPU; parameter all-gathers per step: teacher 0 B" \
            in runs["replicated"][2]
        assert "teacher sharded by ZeRO-3 over 2 ranks: 2.1 MB of its 4.1 MB per GPU" in runs["sharded"][2]
    else:
        assert "teacher whole on every GPU (ZeRO-2 partitions no parameters): 4.1 MB per GPU" in references["zero2_log"]


@pytest.mark.slow
def test_hierarchical_partitioning_config_trains_and_gathers_as_modelled(tmp_path, demo_assets, references):
    """ds_configs/zero3_hpz.json ("auto": the ranks of one node, here both): a secondary parameter partition
    per node. Its default persistence threshold keeps every demo parameter whole between uses: each is gathered
    once per step, after the optimizer step."""
    config, out = scaling_config(tmp_path, demo_assets, "hpz", zero_stage=3, max_steps=2, log_comms=True,
                                 ds_config=os.path.join(REPO, "ds_configs", "zero3_hpz.json"))
    log = run_training(config).stdout
    assert "(hpZ: a second copy over each 2 ranks)" in log
    want, got = predicted(demo_assets, config), measured(out)
    got.pop("all_reduce")
    assert got == want
    for a, b in zip(read_metrics(out), read_metrics(references["zero2"])):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


RELEASE_REGIMES = [{"stage3_max_reuse_distance": r} for r in (0, 100_000, 300_000)]


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("release", RELEASE_REGIMES + [{}], ids=["reuse0", "reuse1e5", "reuse3e5", "held"])
def test_the_communication_model_holds_in_every_release_regime(tmp_path, demo_assets, release, checkpointing):
    config, out = scaling_config(tmp_path, demo_assets, "regime", zero_stage=3, max_steps=2, log_comms=True,
                                 gradient_checkpointing=checkpointing, ds_config=zero3_config(tmp_path, release))
    run_training(config)
    got, want = measured(out), predicted(demo_assets, config)
    got.pop("all_reduce")
    assert got == want



def test_predicted_step_times_beyond_one_node_tell_the_placements_apart():
    """The docs' tables (python -m recipe.comms): the pairs' sizes, and across nodes a sharded teacher's gathers
    several times the traffic of the replicated teacher or hpZ, which cost memory instead."""
    from recipe.comms import main, predict_rows

    rows = {(r["gpus"], r["plan"]): r for r in predict_rows("tinyllava", [8, 64])}
    student, teacher = rows[(8, "ZeRO-3, teacher sharded")]["params_B"]
    assert student == pytest.approx(1.04, abs=0.01) and teacher == pytest.approx(3.82, abs=0.01)
    sharded, hpz = rows[(64, "ZeRO-3, teacher sharded")], rows[(64, "ZeRO-3 + hpZ (8), teacher sharded")]
    replicated = rows[(64, "ZeRO-3, teacher replicated")]
    assert sharded["comm_s"] > 4 * max(hpz["comm_s"], replicated["comm_s"])
    assert replicated["teacher_GB_per_gpu"] == pytest.approx(2 * teacher, rel=0.01)
    assert sharded["teacher_GB_per_gpu"] < hpz["teacher_GB_per_gpu"] < replicated["teacher_GB_per_gpu"]
    assert rows[(8, "ZeRO-3, teacher sharded")]["comm_s"] < 0.05 * sharded["compute_s"]  # NVLink inside a node
    main(["--pair", "tinyllava", "--gpus", "8"])


def test_hpz_partition_size_auto_is_the_ranks_of_a_node_and_must_divide_the_ranks(tmp_path, monkeypatch):
    from recipe.engine import deepspeed_config

    hpz = os.path.join(REPO, "ds_configs", "zero3_hpz.json")
    cfg = load_config(os.path.join(REPO, "recipe/configs/demo_switchkd.yaml"), ["zero_stage=3", f"ds_config={hpz}"])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert deepspeed_config(cfg, "bf16")["zero_optimization"]["zero_hpz_partition_size"] == 1
    with open(hpz) as f:
        ds = json.load(f)
    ds["zero_optimization"]["zero_hpz_partition_size"] = 3
    (tmp_path / "hpz3.json").write_text(json.dumps(ds))
    cfg = load_config(os.path.join(REPO, "recipe/configs/demo_switchkd.yaml"),
                      ["zero_stage=3", f"ds_config={tmp_path / 'hpz3.json'}"])
    with pytest.raises(ConfigError, match=r"zero_hpz_partition_size=3 must be a positive integer that divides the "
                                          r"number of ranks \(1\)"):
        deepspeed_config(cfg, "bf16")
