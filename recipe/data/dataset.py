"""Random access over shard directories written by recipe.data.shards.

Global sample i -> (shard, position) through each directory's index.json. The first access to a
shard scans its tar headers once (tarfile skips over the data) and caches (offset, size) of every
member, so later reads are one pread each. File descriptors are opened lazily and per process, so
the dataset can be pickled into DataLoader workers (fork or spawn).
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


class ShardDataset(torch.utils.data.Dataset):
    """Map-style dataset: item = the sample's JSON keys, with "image" = RGB PIL image or None."""

    def __init__(self, dirs: list[str] | str):
        dirs = [dirs] if isinstance(dirs, (str, os.PathLike)) else list(dirs)
        if not dirs:
            raise ValueError("ShardDataset needs at least one shard directory")
        self.shard_paths, self.shard_sizes = [], []
        for shard_dir in dirs:
            for shard in read_index(shard_dir)["shardlist"]:
                self.shard_paths.append(os.path.join(shard_dir, shard["url"]))
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
        sample, image_bytes = self.read(i)
        sample["image"] = decode_rgb(image_bytes) if image_bytes is not None else None
        return sample

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
        return shard, self._member_table(shard)[i - self.starts[shard]]

    def _member_table(self, shard: int) -> list[dict]:
        if shard not in self._members:
            samples, keys = [], {}
            with tarfile.open(self.shard_paths[shard], mode="r:") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if key not in keys:
                        keys[key] = len(samples)
                        samples.append({})
                    samples[keys[key]][ext] = (member.offset_data, member.size)
            if len(samples) != self.shard_sizes[shard] or any("json" not in s for s in samples):
                raise ValueError(
                    f"{self.shard_paths[shard]}: {len(samples)} samples on disk, index says "
                    f"{self.shard_sizes[shard]} (or a sample lacks its .json); reconvert this directory"
                )
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
