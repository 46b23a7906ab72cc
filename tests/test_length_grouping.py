"""data.group_by_length: the grouped global order (deterministic, every sample once, the same on any number of
ranks, exact resume), the sizes the converter records, the token-length estimate, and a run that pads less."""
import json
import os
import shutil

import pytest
import torch

from recipe.data import Collator, ResumableDistributedSampler, ShardDataset
from recipe.data.lengths import estimate_lengths, sample_sizes
from recipe.data.shards import text_chars
from recipe.models import image_token_count, load_image_processor, load_tokenizer

N, GROUP = 203, 32


def lengths_for(n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.randint(10, 1000, (n,), generator=torch.Generator().manual_seed(seed))


def grouped_sampler(rank: int = 0, world_size: int = 1, **kwargs) -> ResumableDistributedSampler:
    sampler = ResumableDistributedSampler(N, rank=rank, world_size=world_size, seed=5, **kwargs)
    sampler.group_by_length(lengths_for(), GROUP)
    return sampler


def test_grouped_order_reorders_each_run_longest_first_and_takes_every_sample_once():
    lengths = lengths_for()
    plain = ResumableDistributedSampler(N, rank=0, world_size=1, seed=5)
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        sampler = grouped_sampler()
        sampler.set_epoch(epoch)
        order, unordered = sampler.global_order(), plain.global_order()
        assert sorted(order.tolist()) == list(range(N))
        again = grouped_sampler()
        again.set_epoch(epoch)
        assert torch.equal(again.global_order(), order)  # deterministic
        for start in range(0, N, GROUP):  # the same samples in each run as without grouping, longest first
            run = order[start:start + GROUP]
            assert sorted(run.tolist()) == sorted(unordered[start:start + GROUP].tolist())
            assert (lengths[run][:-1] >= lengths[run][1:]).all()
    epoch0, epoch1 = grouped_sampler(), grouped_sampler()
    epoch1.set_epoch(1)
    assert not torch.equal(epoch0.global_order(), epoch1.global_order())


def test_grouped_order_is_the_same_on_any_number_of_ranks():
    """The scale contract: resuming on another number of ranks continues the same order."""
    one = grouped_sampler().global_order()
    for world_size in (2, 3, 4):
        order = grouped_sampler(world_size=world_size).global_order()
        assert torch.equal(order[:N], one), world_size
        ranks = [list(grouped_sampler(rank=r, world_size=world_size)) for r in range(world_size)]
        assert sorted(i for part in ranks for i in part) == sorted(order.tolist())


def take(sampler, micro_batches: int, micro: int, world_size: int) -> list[int]:
    """What one rank takes for `micro_batches` micro-batches, advancing like the trainer."""
    loader = iter(torch.utils.data.DataLoader(range(N), batch_size=micro, sampler=sampler))
    taken = []
    for _ in range(micro_batches):
        taken += next(loader).tolist()
        sampler.advance(micro * world_size)
    return taken


@pytest.mark.parametrize("world_size", [1, 2])
def test_grouped_sampler_resumes_exactly(world_size):
    micro = 4
    per_epoch = N // (micro * world_size)
    for rank in range(world_size):
        full = take(grouped_sampler(rank, world_size), per_epoch, micro, world_size)
        first = grouped_sampler(rank, world_size)
        got = take(first, 7, micro, world_size)
        resumed = ResumableDistributedSampler(N, rank=rank, world_size=world_size, seed=5)
        resumed.group_by_length(lengths_for(), GROUP)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        got += take(resumed, per_epoch - 7, micro, world_size)
        assert got == full


def padding(micro_batches: list[list[int]], lengths: torch.Tensor) -> float:
    slots = sum(len(batch) * int(lengths[batch].max()) for batch in micro_batches)
    return 1 - sum(int(lengths[batch].sum()) for batch in micro_batches) / slots


def test_grouping_cuts_the_padding_of_every_rank():
    lengths, micro, world_size = lengths_for(), 4, 2

    def micro_batches(make) -> list[list[int]]:
        per_rank = [list(make(rank)) for rank in range(world_size)]
        return [part[i:i + micro] for part in per_rank for i in range(0, len(part) - micro + 1, micro)]

    plain = padding(micro_batches(lambda r: ResumableDistributedSampler(N, rank=r, world_size=world_size, seed=5)),
                    lengths)
    grouped = padding(micro_batches(lambda r: grouped_sampler(r, world_size)), lengths)
    assert plain > 0.3 and grouped < plain / 2, (plain, grouped)


def test_group_by_length_checks_its_input():
    sampler = ResumableDistributedSampler(N, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="one length per sample"):
        sampler.group_by_length(torch.ones(N - 1), GROUP)
    with pytest.raises(ValueError, match="group_size"):
        sampler.group_by_length(torch.ones(N), 0)


# ---------------------------------------------------------------------------------------------------
# Sizes recorded by the converter, and the token-length estimate


def test_converter_records_every_samples_size_and_old_shards_are_read_instead(tmp_path, demo_assets):
    dataset = ShardDataset(demo_assets["train"])
    index = json.load(open(os.path.join(demo_assets["train"], "index.json")))
    records = [dataset.meta(i) for i in range(len(dataset))]
    assert index["sample_sizes"] == {"text_chars": [text_chars(r) for r in records],
                                     "images": [int(r.get("image") is not None) for r in records]}
    assert 0 < sum(index["sample_sizes"]["images"]) < len(dataset)
    recorded = sample_sizes(dataset, [demo_assets["train"]], progress=False)

    old = tmp_path / "old"  # a directory converted before the sizes were recorded
    shutil.copytree(demo_assets["train"], old)
    del index["sample_sizes"]
    (old / "index.json").write_text(json.dumps(index, indent=1))
    read = sample_sizes(ShardDataset(str(old)), [str(old)], progress=False)
    assert all(torch.equal(a, b) for a, b in zip(read, recorded))


def test_estimated_lengths_follow_the_encoded_lengths(demo_assets):
    from recipe.models import load_vlm

    student = load_vlm(demo_assets["student"])
    collator = Collator(load_tokenizer(demo_assets["student"]), load_image_processor(demo_assets["student"]),
                        num_image_tokens=image_token_count(student.config),
                        image_token_id=student.config.image_token_id, max_length=160)
    dataset = ShardDataset(demo_assets["train"])
    estimate = estimate_lengths(dataset, [demo_assets["train"]], collator, 160, progress=False).double()
    exact = torch.tensor([int(collator([dataset[i]])["attention_mask"].sum()) for i in range(len(dataset))]).double()
    assert (estimate - exact).abs().mean() < 0.1 * exact.mean()
    # What matters for the grouping: the order. Ranks of the estimate against ranks of the exact lengths.
    ranks = torch.stack([estimate.argsort().argsort(), exact.argsort().argsort()]).double()
    assert torch.corrcoef(ranks)[0, 1] > 0.8


@pytest.mark.slow
def test_a_grouped_run_records_less_padding(tmp_path, demo_assets):
    import yaml
    from test_train import read_metrics, run_training

    padding = {}
    for grouped in (False, True):
        out = tmp_path / f"grouped_{grouped}"
        config = {"output_dir": str(out), "max_steps": 3, "save_every": 100,
                  "student": {"path": demo_assets["student"]},
                  "data": {"train": [demo_assets["train"]], "max_length": 160, "num_workers": 0,
                           "group_by_length": grouped, "length_group_size": 48},
                  "micro_batch_size": 8, "loss": {"align_weight": 0.0, "vsd_weight": 0.0}}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        run_training(str(tmp_path / "c.yaml"), nproc=1)
        padding[grouped] = sum(r["padding_fraction"] for r in read_metrics(str(out))) / 3
    assert 0 <= padding[True] < padding[False] / 2, padding
