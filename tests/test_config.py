"""The typed config: shipped configs are valid, overrides parse as YAML, bad input names what is valid."""
import glob
import json
import os
import sys

import pytest

from assets import REPO
from recipe.config import ConfigError, load_config
from recipe.trainer import deepspeed_config, zero3_loading


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


def test_zero3_without_accelerate_names_the_missing_package(monkeypatch):
    ds = deepspeed_config(load_config(os.path.join(REPO, "recipe/configs/tinyllava_3b_to_0p5b.yaml")), "bf16")
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate now raises ImportError
    with pytest.raises(ConfigError, match="zero_stage 3 .* needs the accelerate package"):
        zero3_loading(ds)
    assert zero3_loading({**ds, "zero_optimization": {"stage": 2}}) is None  # ZeRO-2 loads whole models
