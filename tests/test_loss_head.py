"""The chunked loss head (recipe/losses/head.py): the same values and gradients as the unchunked objective for
any chunk size, memory that grows with the chunk and not with the rows, and ZeRO-2/3 on 2 gloo ranks."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from assets import REPO, free_port
from torch import nn

from recipe.config import LossConfig
from recipe.data import Collator, ShardDataset
from recipe.losses import divergence
from recipe.losses.head import chunk_sizes
from recipe.losses.objective import switch_kd_objective
from recipe.models import PassOutputs, image_token_count, load_image_processor, load_tokenizer, load_vlm, run_passes


def reference_objective(passes, cfg) -> dict:
    """The objective as one piece over all rows (the unchunked formula of docs/method.md, "Objective")."""
    student = passes.student_logits()
    shared = slice(0, passes.vocab)
    teacher = passes.teacher_logits()[:, shared]
    ce = F.cross_entropy(student.float(), passes.targets)
    align = divergence(teacher, student[:, shared], cfg) if cfg.align_weight > 0 else torch.zeros(())
    vsd = divergence(teacher[passes.switch_rows], passes.switch_logits()[:, shared], cfg)
    return {"loss": cfg.ce_weight * ce + cfg.align_weight * align + cfg.vsd_weight * vsd, "ce": ce, "align": align,
            "vsd": vsd}


@pytest.fixture(scope="module")
def pair(demo_assets):
    return load_vlm(demo_assets["student"]), load_vlm(demo_assets["teacher"])


@pytest.fixture(scope="module")
def batch(demo_assets, pair):
    """Image and text-only samples of different lengths, collated as in training."""
    dataset = ShardDataset(demo_assets["train"])
    images = [i for i in range(len(dataset)) if dataset.meta(i).get("image")][:3]
    texts = [i for i in range(len(dataset)) if not dataset.meta(i).get("image")][:2]
    student = pair[0]
    collator = Collator(load_tokenizer(demo_assets["student"]), load_image_processor(demo_assets["student"]),
                        num_image_tokens=image_token_count(student.config),
                        image_token_id=student.config.image_token_id, max_length=256)
    return collator([dataset[i] for i in [images[0], texts[0], images[1], texts[1], images[2]]])


TERMS = ("loss", "ce", "align", "vsd")


def model_terms_and_grads(pair, batch, objective, cfg) -> tuple[dict, dict]:
    """The loss terms and the gradient of every trained student parameter after one backward through the models."""
    student, teacher = pair
    student.zero_grad(set_to_none=True)
    out = objective(run_passes(student, teacher, batch), cfg)
    out["loss"].backward()
    grads = {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}
    return {k: float(out[k].detach()) for k in TERMS}, grads


@pytest.fixture(scope="module")
def passes(pair, batch):
    """The passes' hidden states of the batch, computed once."""
    with torch.no_grad():
        return run_passes(*pair, batch)


def head_terms_and_grads(passes, objective, cfg, vocab) -> tuple[dict, dict]:
    """The loss terms and the gradients of the student's and the switch pass's hidden states (everything below
    them follows by the chain rule) and of the student's LM-head weight."""
    student_hidden = passes.student_hidden.clone().requires_grad_()
    switch_hidden = passes.switch_hidden.clone().requires_grad_()
    head = passes.student_head
    head.zero_grad(set_to_none=True)
    out = objective(dataclasses.replace(passes, student_hidden=student_hidden, switch_hidden=switch_hidden,
                                        vocab=vocab), cfg)
    out["loss"].backward()
    grads = {"student_hidden": student_hidden.grad, "switch_hidden": switch_hidden.grad, "lm_head": head.weight.grad}
    return {k: float(out[k].detach()) for k in TERMS}, grads


CONFIGS = {  # k_max up to candidates, candidates up to the whole (compared) vocabulary
    "c16": dict(candidates=16),
    "c16_kmax4": dict(candidates=16, k_max=4),
    "whole_vocab": dict(candidates=64, k_max=64),  # with vocab = 64: the window is every compared logit
    "vsd_only": dict(candidates=16, ce_weight=0.0, align_weight=0.0),
    "kl": dict(kind="kl"),
    "bild": dict(kind="bild"),
}


def assert_same(got: tuple[dict, dict], want: tuple[dict, dict], what) -> None:
    assert got[0] == pytest.approx(want[0], rel=1e-4, abs=1e-7), what
    assert got[1].keys() == want[1].keys(), what
    for name, grad in want[1].items():
        error = float((got[1][name] - grad).abs().max())  # float32 sums in another order: relative to the scale
        assert error <= 1e-5 * float(grad.abs().max()) + 1e-9, (what, name, error)


# vocab: the divergences over the first `vocab` logits only (a shared id range of tables of 401 rows).
@pytest.mark.parametrize("config, vocab", [(c, v) for c in CONFIGS if c != "whole_vocab" for v in (None, 396)]
                         + [("whole_vocab", 64)])
def test_chunked_head_equals_the_unchunked_objective(passes, config, vocab):
    rows = passes.student_hidden.shape[0]
    assert rows >= 8 and 0 < passes.switch_hidden.shape[0] < rows
    want = head_terms_and_grads(passes, reference_objective, LossConfig(impl="torch", **CONFIGS[config]), vocab)
    assert want[0]["vsd"] > 0 and want[1]["switch_hidden"].abs().sum() > 0
    if config == "vsd_only":
        assert not want[1]["lm_head"].any()
    else:
        assert want[0]["align"] > 0 and want[1]["lm_head"].abs().sum() > 0
    for chunk_rows in (0, 1, 3, 7, rows, rows + 50):
        cfg = LossConfig(impl="torch", chunk_rows=chunk_rows, **CONFIGS[config])
        assert_same(head_terms_and_grads(passes, switch_kd_objective, cfg, vocab), want, chunk_rows)


def test_chunked_head_trains_the_student_as_the_unchunked_objective(pair, batch):
    """End to end through the models: every student parameter, E_S included (through both its passes)."""
    want = model_terms_and_grads(pair, batch, reference_objective, LossConfig(impl="torch", candidates=16))
    assert any("vision_tower" in name for name in want[1]) and "lm_head.weight" in want[1]
    for chunk_rows in (1, 3):
        cfg = LossConfig(impl="torch", candidates=16, chunk_rows=chunk_rows)
        assert_same(model_terms_and_grads(pair, batch, switch_kd_objective, cfg), want, chunk_rows)


def test_chunk_sizes_cover_the_rows_and_match_a_larger_rank():
    assert chunk_sizes(10, 0) == [10] and chunk_sizes(0, 4) == [0]
    assert chunk_sizes(10, 4) == [4, 4, 2] and chunk_sizes(10, 1) == [1] * 10 and chunk_sizes(10, 99) == [10]
    assert chunk_sizes(5, 4, most_rows=13) == [4, 1, 0, 0]  # as many chunks as the rank with 13 rows


def peak_bytes_during(fn) -> int:
    """Peak of the CPU memory allocated while fn runs, above what was allocated before (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def loss_peak(rows: int, chunk_rows: int, vocab: int = 2048, hidden: int = 32) -> int:
    """Peak memory of the objective's forward and backward over `rows` rows (all of them switch rows)."""
    torch.manual_seed(0)
    student_head, teacher_head = nn.Linear(hidden, vocab, bias=False), nn.Linear(hidden, vocab, bias=False)
    teacher_head.requires_grad_(False)
    student_hidden = torch.randn(rows, hidden, requires_grad=True)
    switch_hidden = torch.randn(rows, hidden, requires_grad=True)
    passes = PassOutputs(student_hidden=student_hidden, targets=torch.randint(vocab, (rows,)),
                         student_head=student_head, teacher_hidden=torch.randn(rows, hidden),
                         switch_hidden=switch_hidden, switch_rows=torch.ones(rows, dtype=torch.bool),
                         teacher_head=teacher_head)
    cfg = LossConfig(impl="torch", candidates=16, chunk_rows=chunk_rows)
    return peak_bytes_during(lambda: switch_kd_objective(passes, cfg)["loss"].backward())


def test_loss_memory_grows_with_the_chunk_not_with_the_rows():
    def logits_bytes(rows):  # one float32 (rows x V) tensor
        return rows * 2048 * 4

    unchunked = {rows: loss_peak(rows, 0) for rows in (128, 512)}
    chunked = {rows: loss_peak(rows, 32) for rows in (128, 512)}
    larger_chunk = loss_peak(512, 64)
    # Unchunked, several (rows x V) tensors live at once; chunked, one chunk's, and the (rows x hidden) ones.
    assert unchunked[512] > 3.5 * unchunked[128] and unchunked[128] > 4 * logits_bytes(128)
    assert chunked[512] < 1.25 * chunked[128] and chunked[512] < 10 * logits_bytes(32)
    assert chunked[512] * 8 < unchunked[512]
    assert 1.6 * chunked[512] < larger_chunk < 2.4 * chunked[512]


DISTRIBUTED = r"""
import json, sys
import deepspeed, torch
from deepspeed.utils import safe_get_full_grad
from recipe.config import load_config
from recipe.train import build_run

deepspeed.init_distributed(dist_backend="gloo")
cfg = load_config(sys.argv[1])
cfg.optim.lr = 0.0  # every step leaves the weights as they are: each chunk size sees the same model
run = build_run(cfg, "fp32")
run.engine.train()
model = run.engine.module
batch = {k: v for k, v in next(run.data).items() if k not in ("ids", "dropped")}
result = {}
for chunk_rows in (0, 1, 5, 1000):
    model.loss_config.chunk_rows = chunk_rows
    out = run.engine(batch)
    run.engine.backward(out["loss"])
    grads = {name: safe_get_full_grad(p) for name, p in model.student.named_parameters()}
    rows = [None, None]
    torch.distributed.all_gather_object(rows, int(out["rows"]))
    result[chunk_rows] = {"terms": {k: float(out[k]) for k in ("loss", "ce", "align", "vsd")},
                          "rows": rows, "grads": {k: g.flatten().tolist() for k, g in grads.items()}}
    run.engine.step()
if torch.distributed.get_rank() == 0:
    print("RESULT " + json.dumps(result))
"""


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_chunked_head_under_zero_on_two_ranks(tmp_path, demo_assets, zero_stage):
    """Each rank has its own micro-batch (other rows); under ZeRO-3 the heads are partitioned (persistence
    threshold 0), so every rank must call them equally often, whatever its rows."""
    import yaml

    ds = json.loads(open(os.path.join(REPO, "ds_configs", f"zero{zero_stage}.json")).read())
    if zero_stage == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps(ds))
    config = {"output_dir": str(tmp_path / "out"), "max_steps": 4, "student": {"path": demo_assets["student"]},
              "teacher": {"path": demo_assets["teacher"]},
              "data": {"train": [demo_assets["train"]], "max_length": 160, "num_workers": 0},
              "micro_batch_size": 3, "zero_stage": zero_stage, "ds_config": str(ds_path),
              "loss": {"candidates": 16, "impl": "torch"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(tmp_path / "script.py"), str(tmp_path / "c.yaml")]
    (tmp_path / "script.py").write_text(DISTRIBUTED)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    want = result.pop("0")
    assert min(want["rows"]) > 5 and want["rows"][0] != want["rows"][1] and want["terms"]["vsd"] > 0
    for chunk_rows, got in result.items():
        # float32 sums in another order: vsd (about 1e-3 of the loss) moves by about 1e-5 of itself
        assert got["terms"] == pytest.approx(want["terms"], rel=1e-4, abs=1e-7), chunk_rows
        for name, grad in want["grads"].items():
            assert torch.allclose(torch.tensor(got["grads"][name]), torch.tensor(grad), rtol=1e-4, atol=1e-7), \
                (chunk_rows, name)
    assert any(torch.tensor(g).abs().sum() > 0 for name, g in want["grads"].items() if "vision_tower" in name)
