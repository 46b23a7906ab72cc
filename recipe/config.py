"""The one typed config of a training run: YAML file + `--set key=value` overrides, validated up front.

Every knob is a dataclass field below. A knob with a fixed set of values has a `Literal` type, which is
the one place those values are listed (other modules read them with `choices`). An unknown key or a bad
value stops with a message that lists what is valid, before anything heavy is loaded.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

import yaml

# The valid values of each multiple-choice knob.
DivergenceKind = Literal["dbild", "bild", "kl"]  # D of the alignment and VSD terms (docs/method.md, Baselines)
LossImpl = Literal["auto", "torch", "triton"]  # DBiLD implementation; auto: triton for CUDA tensors
ChatTemplate = Literal["auto", "tokenizer", "chatml"]  # auto: the tokenizer's chat template when it has one
Precision = Literal["auto", "fp32", "bf16", "fp16"]  # auto: bf16 on GPUs that have it, else fp32
Attention = Literal["auto", "sdpa", "eager", "flash_attention_2"]  # auto: flash-attention when usable, else sdpa
ZeroStage = Literal[2, 3]
# Where the frozen teacher lives under ZeRO-3 (docs/scaling.md). sharded: partitioned with the student by ZeRO
# and gathered for each pass; replicated: whole on every GPU, outside ZeRO (no teacher gathers). At ZeRO-2
# parameters are never partitioned, so both hold the whole teacher on every GPU.
TeacherPlacement = Literal["sharded", "replicated"]
Reporter = Literal["tensorboard", "wandb"]  # where metrics go besides metrics.jsonl (wandb: extra "monitoring")


def choices(literal) -> tuple:
    """The values of a Literal type above, e.g. choices(LossImpl) == ("auto", "torch", "triton")."""
    return typing.get_args(literal)


class ConfigError(ValueError):
    """A config that cannot run; `problems` lists each thing wrong with it."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


@dataclass
class ModelConfig:
    path: str | None = None  # a save_pretrained directory of a supported model family (docs/families.md)


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # shard directories (data_prep/llava_to_shards.py)
    eval: list[str] = field(default_factory=list)
    max_length: int = 2048
    template: ChatTemplate = "auto"
    num_workers: int = 2
    # Micro-batches of similar lengths (less padding): each run of length_group_size consecutive samples of an
    # epoch's shuffled order is taken longest first (recipe/data/sampler.py); lengths are estimated from sizes
    # the shard converter records (recipe/data/lengths.py). The runs' size does not depend on the ranks.
    group_by_length: bool = False
    length_group_size: int = 2048
    max_skipped_fraction: float = 0.01  # unreadable samples per epoch above which the run stops (see skipped.jsonl)


@dataclass
class OptimConfig:
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio at max_steps
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class LossConfig:
    kind: DivergenceKind = "dbild"
    ce_weight: float = 1.0
    align_weight: float = 1.0
    vsd_weight: float = 1.0
    temperature: float = 3.0
    candidates: int = 64  # DBiLD knee window C
    k_min: int = 2
    k_max: int | None = None  # None: candidates
    bild_top_k: int = 8
    impl: LossImpl = "auto"
    # Supervised rows the LM heads and the loss terms process at a time; the backward recomputes one chunk's
    # logits at a time, so no (rows x vocab) tensor is kept for it (recipe/losses/head.py). 0: all rows at once.
    # 512 bounds the loss's memory to a few GB at V = 151,936 while its matmuls stay large.
    chunk_rows: int = 512


@dataclass
class TrainConfig:
    output_dir: str = ""
    seed: int = 0
    max_steps: int | None = None  # optimizer steps; or give epochs
    epochs: float | None = None
    save_every: int = 500
    keep_checkpoints: int = 2
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)  # no path: plain SFT of the student
    data: DataConfig = field(default_factory=DataConfig)
    micro_batch_size: int = 8
    grad_accum: int = 1
    zero_stage: ZeroStage = 2
    ds_config: str | None = None  # default: ds_configs/zero{2,3}.json by zero_stage
    teacher_placement: TeacherPlacement = "sharded"
    log_comms: bool = False  # DeepSpeed's comms logger: each step's collectives and bytes in metrics.jsonl
    optim: OptimConfig = field(default_factory=OptimConfig)
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False  # the student, and the teacher's layers in the switch pass
    loss: LossConfig = field(default_factory=LossConfig)
    train_vision_tower: bool = True  # False freezes E_S, which disables what VSD is for
    precision: Precision = "auto"
    attention: Attention = "auto"
    log_every: int = 1
    eval_every: int = 0  # optimizer steps between evaluations on data.eval (0: none); always once at the end
    eval_max_new_tokens: int = 16
    eval_batch_size: int = 16
    eval_max_samples: int | None = None
    report_to: list[Reporter] = field(default_factory=lambda: ["tensorboard"])  # [] : metrics.jsonl only
    max_bad_steps: int = 5  # steps in a row with a non-finite loss or gradient norm (each skipped) before stopping

    @property
    def distill(self) -> bool:
        return self.teacher.path is not None


def _coerce(value, hint, key):
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in choices(hint) or isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}; valid: {list(choices(hint))}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a valid {hint}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            names = [f.name for f in dataclasses.fields(hint)]
            raise ConfigError(f"{key}: expected a mapping of {names}, got {value!r}")
        return _build(hint, value, key + ".")
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + u for u in unknown]}; valid keys here: "
                          f"{[prefix + n for n in names]}")
    built, problems = {}, []
    for key, value in values.items():  # every bad value at once, not one per attempt
        try:
            built[key] = _coerce(value, hints[key], prefix + key)
        except ConfigError as e:
            problems += e.problems
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError("\n  - ".join(["invalid config:", *problems]), problems)
    return cls(**built)


def _lookup(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def validate(config: TrainConfig) -> TrainConfig:
    problems = []
    if not config.output_dir:
        problems.append("output_dir is required")
    if not config.student.path:
        problems.append("student.path is required (a save_pretrained VLM directory)")
    if not config.data.train:
        problems.append("data.train is required (one or more shard directories)")
    if (config.max_steps is None) == (config.epochs is None):
        problems.append("give exactly one of max_steps and epochs")
    for key in ("micro_batch_size", "grad_accum", "save_every", "keep_checkpoints", "data.max_length",
                "data.length_group_size", "log_every", "eval_batch_size", "eval_max_new_tokens", "max_steps",
                "eval_max_samples", "max_bad_steps"):
        if _lookup(config, key) is not None and _lookup(config, key) < 1:
            problems.append(f"{key} must be >= 1, got {_lookup(config, key)}")
    for key in ("data.num_workers", "eval_every", "optim.warmup_steps", "optim.weight_decay", "grad_clip"):
        if _lookup(config, key) < 0:
            problems.append(f"{key} must be >= 0, got {_lookup(config, key)}")
    if not 0 <= config.data.max_skipped_fraction <= 1:
        problems.append(f"data.max_skipped_fraction must be in [0, 1], got {config.data.max_skipped_fraction}")
    problems += _missing_reporters(config.report_to)
    if config.epochs is not None and config.epochs <= 0:
        problems.append(f"epochs must be > 0, got {config.epochs}")
    optim = config.optim
    if optim.lr <= 0 or optim.eps <= 0:
        problems.append(f"optim.lr and optim.eps must be > 0, got lr={optim.lr}, eps={optim.eps}")
    if not 0 <= optim.min_lr_ratio <= 1:
        problems.append(f"optim.min_lr_ratio must be in [0, 1], got {optim.min_lr_ratio}")
    if len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas):
        problems.append(f"optim.betas must be two numbers in [0, 1), got {optim.betas}")
    loss = config.loss
    if min(loss.ce_weight, loss.align_weight, loss.vsd_weight) < 0:
        problems.append("loss weights must be >= 0")
    if loss.temperature <= 0:
        problems.append(f"loss.temperature must be > 0, got {loss.temperature}")
    k_max = loss.candidates if loss.k_max is None else loss.k_max
    if not 2 <= loss.k_min <= k_max <= loss.candidates:
        problems.append(f"need 2 <= loss.k_min <= loss.k_max <= loss.candidates; got candidates={loss.candidates}, "
                        f"k_min={loss.k_min}, k_max={loss.k_max}")
    if loss.chunk_rows < 0:
        problems.append(f"loss.chunk_rows must be >= 0 (0: unchunked), got {loss.chunk_rows}")
    if loss.bild_top_k < 2:
        problems.append(f"loss.bild_top_k must be >= 2 (pairs of top logits), got {loss.bild_top_k}")
    if not config.distill and (loss.align_weight > 0 or loss.vsd_weight > 0):
        problems.append("loss.align_weight / loss.vsd_weight > 0 need teacher.path "
                        "(set both weights to 0 for plain SFT)")
    if config.distill and loss.vsd_weight > 0 and not config.train_vision_tower:
        problems.append("train_vision_tower: false freezes E_S, so loss.vsd_weight > 0 trains nothing; set it to 0")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    return config


def _missing_reporters(report_to: list[str]) -> list[str]:
    """A reporter whose library is not installed is a setup mistake, caught before anything is loaded."""
    packages = {"tensorboard": ("tensorboard", "pip install tensorboard, or report_to: []"),
                "wandb": ("wandb", "pip install -e .[monitoring]")}
    return [f"report_to: {name} needs the {packages[name][0]} package ({packages[name][1]})"
            for name in dict.fromkeys(report_to) if importlib.util.find_spec(packages[name][0]) is None]


def add_set_argument(parser, help_suffix: str = "") -> None:
    """--set KEY=VALUE [KEY=VALUE ...], repeatable: every pair lands in one flat list (args.overrides)."""
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set optim.lr=1e-4 max_steps=100 (repeatable)" + help_suffix)


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """`a.b=value` pairs; the value is parsed as YAML (so 3, 1e-4, true, null, [a, b] work)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set takes key=value, got {item!r}")
        key, raw = item.split("=", 1)
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return values


def load_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    values = {}
    if path is not None:
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return validate(_build(TrainConfig, apply_overrides(values, list(overrides))))


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
