"""Random access over shard directories written by recipe.data.shards.

Global sample i -> (shard, position) through each directory's index.json. The first access to a
shard scans its tar headers once (tarfile skips over the data) and caches (offset, size) of every
member, so later reads are one pread each. File descriptors are opened lazily and per process, so
the dataset can be pickled into DataLoader workers (fork or spawn).

A shard damaged after conversion (truncated by a copy, bytes corrupted on disk) keeps what can still
be read: the scan stops at the damage, and a sample that cannot be read or decoded raises
UnreadableSample, which names it and its shard. For training, SkipUnreadable turns that into an item
the collator leaves out and reports (recipe.data.collate: batch["skipped"]).
"""

import bisect
import json
import os
import tarfile
from collections import OrderedDict

import torch

from recipe.data.images import decode_rgb
from recipe.data.shards import read_index

MAX_OPEN_FILES = 16  # per process; more shards than this are reopened as needed
UNREADABLE = "unreadable"  # key of the item SkipUnreadable returns in place of a sample it cannot read


class UnreadableSample(Exception):
    """Sample `index` (global) of shard `shard` cannot be read or decoded; `reason` says why."""

    def __init__(self, index: int, shard: str, reason: str, sample_id=None):
        super().__init__(f"sample {index} ({shard}): {reason}")
        self.index, self.shard, self.reason, self.sample_id = index, shard, reason, sample_id


class ShardDataset(torch.utils.data.Dataset):
    """Map-style dataset: item = the sample's JSON keys, with "image" = RGB PIL image or None."""

    def __init__(self, dirs: list[str] | str):
        dirs = [dirs] if isinstance(dirs, (str, os.PathLike)) else list(dirs)
        if not dirs:
            raise ValueError("ShardDataset needs at least one shard directory")
        self.shard_paths, self.shard_sizes = [], []
        for shard_dir in dirs:
            for shard in read_index(shard_dir)["shardlist"]:
                path = os.path.join(shard_dir, shard["url"])
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{path}: listed in {shard_dir}/index.json but missing; reconvert "
                                            f"this directory or restore the file")
                self.shard_paths.append(path)
                self.shard_sizes.append(int(shard["nsamples"]))
        self.starts = [0]  # global index of each shard's first sample
        for size in self.shard_sizes:
            self.starts.append(self.starts[-1] + size)
        self._members = {}  # shard -> [{ext: (offset, size)} per sample, in tar order]
        self._files = OrderedDict()  # shard -> fd, least recently used first
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> dict:
        sample = None
        try:
            sample, image_bytes = self.read(i)
            if image_bytes is None and sample.get("image"):
                raise ValueError(f"its image member ({sample['image']}) is missing from the shard")
            sample["image"] = decode_rgb(image_bytes) if image_bytes is not None else None
        except IndexError:
            raise
        except Exception as error:  # a damaged shard: OSError, tar/JSON/Unicode errors, whatever PIL raises
            sample_id = sample.get("id") if isinstance(sample, dict) else None
            raise UnreadableSample(i % len(self), self.shard_of(i), f"{type(error).__name__}: {error}",
                                   sample_id) from error
        return sample

    def shard_of(self, i: int) -> str:
        return self.shard_paths[bisect.bisect_right(self.starts, i % len(self)) - 1]

    def meta(self, i: int) -> dict:
        """The sample's JSON record only (no image decoding); "image" is the original relative path."""
        shard, members = self._locate(i)
        return json.loads(self._pread(shard, *members["json"]))

    def read(self, i: int) -> tuple[dict, bytes | None]:
        """(JSON record, raw image bytes or None)."""
        shard, members = self._locate(i)
        sample = json.loads(self._pread(shard, *members["json"]))
        image = [ext for ext in members if ext != "json"]
        return sample, (self._pread(shard, *members[image[0]]) if image else None)

    def _locate(self, i: int) -> tuple[int, dict]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        i %= len(self)
        shard = bisect.bisect_right(self.starts, i) - 1
        samples = self._member_table(shard)
        position = i - self.starts[shard]
        if position >= len(samples):
            raise ValueError(f"only the first {len(samples)} of the {self.shard_sizes[shard]} samples its index lists "
                             f"can be read from the shard (truncated or damaged after conversion?); this is "
                             f"sample {position}")
        if "json" not in samples[position]:
            raise ValueError("its .json member is missing from the shard")
        return shard, samples[position]

    def _member_table(self, shard: int) -> list[dict]:
        """(offset, size) of every member, per sample in tar order, as far as the tar can be scanned: a
        truncated or damaged shard ends the scan early (tarfile stops at a bad header or raises at a cut)."""
        if shard not in self._members:
            samples, keys = [], {}
            with tarfile.open(self.shard_paths[shard], mode="r:") as tar:  # a missing or empty file raises here
                try:
                    for member in tar:
                        key, _, ext = member.name.partition(".")
                        if key not in keys:
                            keys[key] = len(samples)
                            samples.append({})
                        samples[keys[key]][ext] = (member.offset_data, member.size)
                except (tarfile.TarError, OSError):
                    pass  # the samples scanned so far stay readable; the rest raise in _locate
            if len(samples) > self.shard_sizes[shard]:
                raise ValueError(f"{self.shard_paths[shard]}: {len(samples)} samples on disk, index says "
                                 f"{self.shard_sizes[shard]}; reconvert this directory")
            self._members[shard] = samples
        return self._members[shard]

    def _pread(self, shard: int, offset: int, size: int) -> bytes:
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise OSError(f"{self.shard_paths[shard]}: short read at {offset} ({len(data)}/{size} bytes)")
        return data

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked into a DataLoader worker: the parent's fds are not ours
            self._files, self._pid = OrderedDict(), os.getpid()
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        if len(self._files) >= MAX_OPEN_FILES:
            os.close(self._files.popitem(last=False)[1])
        fd = self._files[shard] = os.open(self.shard_paths[shard], os.O_RDONLY)
        return fd

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()  # fds do not travel; the member tables (plain data) do
        return state

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._files.values():
                try:
                    os.close(fd)
                except OSError:
                    pass


class SkipUnreadable(torch.utils.data.Dataset):
    """Training's view of a ShardDataset: a sample that cannot be read becomes {UNREADABLE: reason, ...}
    instead of an exception that would end the run from inside a DataLoader worker. Every item carries
    "source" (its shard and global index) for the report of a sample left out later (collate)."""

    def __init__(self, dataset: ShardDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        try:
            item = self.dataset[i]
        except UnreadableSample as error:
            return {"id": error.sample_id, UNREADABLE: error.reason,
                    "source": {"shard": error.shard, "index": error.index}}
        item["source"] = {"shard": self.dataset.shard_of(i), "index": i % len(self.dataset)}
        return item
