"""Token-length estimates of every training sample (data.group_by_length), without tokenizing the dataset.

Exact lengths would mean rendering and tokenizing every sample at start-up (665K for LLaVA-665K: minutes).
Instead the shard converter records each sample's size in index.json ("sample_sizes": the characters of its
turns and its image count), and a run turns sizes into tokens with a line fitted at start-up on a few hundred
samples that the collator encodes for real, with the run's tokenizer, chat template and image tokens:

    tokens ~= a * text_chars + b * images + c,   capped at data.max_length

Shard directories converted before the converter recorded sizes get them from the samples' JSON records,
read once per run with a progress bar (reconverting the directory records them). The estimate only decides
which samples share micro-batches: a wrong one costs padding, never correctness.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from recipe.data.shards import read_index, text_chars
from recipe.data.validate import has_image

CALIBRATION_SAMPLES = 256  # encoded for the fit, half with images when the data has both kinds


def sample_sizes(dataset, shard_dirs: list[str], progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(text characters, images) per sample of `dataset` (a ShardDataset over shard_dirs, in that order)."""
    chars, images = [], []
    for shard_dir in shard_dirs:
        recorded = read_index(shard_dir).get("sample_sizes")
        if recorded is None:
            return _read_sizes(dataset, progress)
        chars += recorded["text_chars"]
        images += recorded["images"]
    if len(chars) != len(dataset):
        raise ValueError(f"the shard indexes record sizes of {len(chars)} samples, the directories hold "
                         f"{len(dataset)}; reconvert them")
    return torch.tensor(chars, dtype=torch.long), torch.tensor(images, dtype=torch.long)


def _read_sizes(dataset, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    chars, images = torch.zeros(len(dataset), dtype=torch.long), torch.zeros(len(dataset), dtype=torch.long)
    print("[data] group_by_length: these shards record no sample sizes; reading them from every sample's JSON "
          "once (reconvert the shards to skip this)", flush=True)
    for i in tqdm(range(len(dataset)), desc="sample sizes", unit="sample", disable=not progress):
        record = dataset.meta(i)
        chars[i], images[i] = text_chars(record), int(has_image(record))
    return chars, images


def calibration_indices(images: torch.Tensor, count: int = CALIBRATION_SAMPLES) -> list[int]:
    """Evenly spaced samples, half of them with images and half without when the data has both."""
    kinds = [torch.nonzero(images > 0).flatten(), torch.nonzero(images == 0).flatten()]
    kinds = [kind for kind in kinds if kind.numel()]
    picked = []
    for kind in kinds:
        take = min(kind.numel(), count // len(kinds))
        picked += kind[torch.linspace(0, kind.numel() - 1, take).round().long()].tolist()
    return sorted(set(picked))


def fit_token_estimate(dataset, collator, chars: torch.Tensor, images: torch.Tensor,
                       max_length: int) -> torch.Tensor:
    """(a, b, c) of tokens ~= a * chars + b * images + c, least squares over calibration samples the collator
    encodes (truncated ones excluded; b = 0 when every sample, or none, has an image)."""
    rows, tokens = [], []
    for i in calibration_indices(images):
        batch = collator([dataset[i]])
        length = int(batch["attention_mask"].sum())
        if batch["input_ids"].shape[0] == 1 and length < max_length:  # neither dropped nor cut
            rows.append([float(chars[i]), float(images[i]), 1.0])
            tokens.append(float(length))
    if not rows:
        raise ValueError(f"group_by_length: none of {len(calibration_indices(images))} calibration samples encodes "
                         f"within data.max_length={max_length}")
    features, targets = torch.tensor(rows, dtype=torch.float64), torch.tensor(tokens, dtype=torch.float64)
    if len(set(features[:, 1].tolist())) < 2:  # one kind only: its image tokens are part of the constant
        features[:, 1] = 0.0
    return torch.linalg.lstsq(features, targets[:, None], driver="gelsd").solution.flatten()


def estimate_lengths(dataset, shard_dirs: list[str], collator, max_length: int, progress: bool = True) -> torch.Tensor:
    """Estimated tokens per sample of `dataset`, at most max_length."""
    chars, images = sample_sizes(dataset, shard_dirs, progress)
    a, b, c = fit_token_estimate(dataset, collator, chars, images, max_length).tolist()
    estimate = (a * chars.double() + b * images.double() + c).round().long()
    return estimate.clamp(1, max_length)
