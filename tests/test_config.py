"""The typed config: shipped configs are valid, overrides parse as YAML, bad input names what is valid."""
import glob
import json
import os
import sys

import pytest
from assets import REPO

from recipe.config import ConfigError, load_config
from recipe.engine import deepspeed_config, zero3_loading
from recipe.train import plan_steps


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "recipe", "configs", "*.yaml"))))
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.output_dir and cfg.student.path and cfg.data.train


def test_overrides_are_typed_and_nested():
    cfg = load_config(os.path.join(REPO, "recipe/configs/demo_switchkd.yaml"),
                      ["optim.lr=1e-4", "loss.k_max=16", "zero_stage=3", "data.train=[a, b]", "teacher.path=null",
                       "loss.align_weight=0", "loss.vsd_weight=0"])
    assert cfg.optim.lr == 1e-4 and cfg.loss.k_max == 16 and cfg.zero_stage == 3
    assert cfg.data.train == ["a", "b"] and cfg.teacher.path is None and not cfg.distill


def test_errors_list_what_is_valid(tmp_path):
    demo = os.path.join(REPO, "recipe/configs/demo_switchkd.yaml")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['optim.learning_rate'\].*'optim.lr'"):
        load_config(demo, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="micro_batch_size: expected an integer, got 'four'"):
        load_config(demo, ["micro_batch_size=four"])
    with pytest.raises(ConfigError, match=r"give exactly one of max_steps and epochs"):
        load_config(demo, ["epochs=1"])
    with pytest.raises(ConfigError, match=r"train_vision_tower: false freezes E_S"):
        load_config(demo, ["train_vision_tower=false"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="--set takes key=value"):
        load_config(demo, ["optim.lr"])


def test_multiple_choice_knobs_list_their_values_from_one_place(demo_assets):
    demo = os.path.join(REPO, "recipe/configs/demo_switchkd.yaml")
    with pytest.raises(ConfigError, match=r"loss.impl = 'cuda'; valid: \['auto', 'torch', 'triton'\]"):
        load_config(demo, ["loss.impl=cuda"])
    with pytest.raises(ConfigError, match=r"zero_stage = 1; valid: \[2, 3\]"):
        load_config(demo, ["zero_stage=1"])
    with pytest.raises(ConfigError, match=r"precision = True; valid"):
        load_config(demo, ["precision=true"])
    # The chat renderer accepts every value the config does (they once disagreed on "tokenizer").
    from recipe.config import ChatTemplate, choices
    from recipe.data.conversation import chat_renderer
    assert load_config(demo, ["data.template=tokenizer"]).data.template == "tokenizer"
    from recipe.models import load_tokenizer
    tokenizer = load_tokenizer(demo_assets["student"])
    messages = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    for template in choices(ChatTemplate):
        assert "A." in chat_renderer(tokenizer, template)(messages)


@pytest.mark.parametrize("override, message", [
    ("eval_batch_size=0", "eval_batch_size must be >= 1, got 0"),
    ("data.num_workers=-1", "data.num_workers must be >= 0, got -1"),
    ("optim.min_lr_ratio=-0.1", r"optim.min_lr_ratio must be in \[0, 1\], got -0.1"),
    ("optim.betas=[0.9]", r"optim.betas must be two numbers in \[0, 1\), got \[0.9\]"),
    ("loss.k_max=65", "need 2 <= loss.k_min <= loss.k_max <= loss.candidates; got candidates=64, k_min=2, k_max=65"),
    ("loss.k_min=1", "need 2 <= loss.k_min"),
    ("loss.bild_top_k=1", "loss.bild_top_k must be >= 2"),
])
def test_values_that_would_fail_later_are_refused_up_front(override, message):
    demo = os.path.join(REPO, "recipe/configs/demo_switchkd.yaml")
    with pytest.raises(ConfigError, match=message):
        load_config(demo, [override, "loss.candidates=64"])


def test_epochs_and_data_size_plan_the_steps_or_say_why_they_cannot():
    demo = os.path.join(REPO, "recipe/configs/demo_switchkd.yaml")
    cfg = load_config(demo, ["max_steps=null", "epochs=2", "micro_batch_size=4", "grad_accum=2"])
    assert plan_steps(cfg, num_samples=100, world=2) == 2 * (100 // 8 // 2)
    # An epoch is a whole number of optimizer steps (the sampler cuts it there): one that holds none would
    # make the loop wait forever, with max_steps too.
    with pytest.raises(ConfigError, match="one optimizer step takes .* = 16 samples, data.train has 12"):
        plan_steps(cfg, num_samples=12, world=2)
    steps = load_config(demo, ["micro_batch_size=4", "grad_accum=2"])
    with pytest.raises(ConfigError, match="4 x 2 x 2 = 16 samples, data.train has 6"):
        plan_steps(steps, num_samples=6, world=2)
    assert plan_steps(steps, num_samples=16, world=2) == steps.max_steps


def test_deepspeed_config_fills_every_auto_from_the_recipe_config():
    cfg = load_config(os.path.join(REPO, "recipe/configs/tinyllava_3b_to_0p5b.yaml"))
    ds = deepspeed_config(cfg, "bf16")
    assert "auto" not in json.dumps(ds)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 4
    assert ds["optimizer"]["params"]["lr"] == 2e-5
    for name in ("zero2.json", "zero3.json", "zero3_offload.json"):
        with open(os.path.join(REPO, "ds_configs", name)) as f:
            json.load(f)


def test_deepspeed_config_values_that_disagree_with_the_recipe_are_refused(tmp_path):
    with open(os.path.join(REPO, "ds_configs", "zero2.json")) as f:
        base = json.load(f)

    def ds_for(**changes):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps({**base, **changes}))
        cfg = load_config(os.path.join(REPO, "recipe/configs/demo_switchkd.yaml"),
                          [f"ds_config={path}", "grad_accum=2", "micro_batch_size=4"])
        return deepspeed_config(cfg, "fp32")

    # The loop counts steps by grad_accum: DeepSpeed stepping every 8 micro-batches would disagree.
    with pytest.raises(ConfigError, match=r"sets gradient_accumulation_steps=8 but the recipe config has grad_accum=2"):
        ds_for(gradient_accumulation_steps=8)
    with pytest.raises(ConfigError, match=r"sets optimizer.params.lr=0.1 but the recipe config has optim.lr="):
        ds_for(optimizer={"type": "AdamW", "params": {**base["optimizer"]["params"], "lr": 0.1}})
    with pytest.raises(ConfigError, match="has a scheduler section"):
        ds_for(scheduler={"type": "WarmupLR"})
    assert ds_for(gradient_accumulation_steps=2, train_micro_batch_size_per_gpu=4)["gradient_accumulation_steps"] == 2


def test_zero3_without_accelerate_names_the_missing_package(monkeypatch):
    ds = deepspeed_config(load_config(os.path.join(REPO, "recipe/configs/tinyllava_3b_to_0p5b.yaml")), "bf16")
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate now raises ImportError
    with pytest.raises(ConfigError, match="zero_stage 3 .* needs the accelerate package"):
        zero3_loading(ds)
    assert zero3_loading({**ds, "zero_optimization": {"stage": 2}}) is None  # ZeRO-2 loads whole models
