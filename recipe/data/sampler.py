"""A distributed sampler that resumes exactly in the middle of an epoch, on any number of ranks.

Each epoch has one global order: a permutation of range(num_samples) drawn from a torch.Generator
seeded with seed + epoch (identity order when shuffle=False), whatever the number of ranks. It is cut
(drop_last=True) or padded by wrapping around (drop_last=False) to a multiple of `step_size`, the samples
of one optimizer step over all ranks (micro_batch_size x grad_accum x world_size): an epoch ends at a step
boundary. The order is consumed one global micro-batch (micro_batch_size x world_size entries) at a time,
and rank r takes the r-th block of micro_batch_size entries of each. So an optimizer step always covers
the same step_size entries, cut into the same micro-batches of micro_batch_size entries, whatever the
number of ranks that share them: a run resumed on another number of ranks, with grad_accum recomputed to
keep step_size, sees the same micro-batches in the same steps (docs/scaling.md). micro_batch_size=1 gives
the plain strided split (rank r takes entries r, r + world_size, ...).

Consumption is counted *globally* and explicitly: the trainer calls `advance(n)` after each
micro-batch with n = micro_batch_size * world_size (the samples that micro-batch drew on all ranks;
samples the collator dropped as too long count too - they were drawn). Counting inside
__iter__ would be wrong: DataLoader workers prefetch indices ahead of training. After
`load_state_dict({"epoch", "consumed"})` the next `iter()` starts at entry `consumed` of the same
global order, so interrupted + resumed runs see exactly the uninterrupted sequence. Because
`consumed` is global, a resume may change world_size (as long as micro_batch_size x world_size divides
`consumed`, which holds at every step boundary when step_size is kept).

Length grouping (`group_by_length`): the permutation is cut into runs of `group_size` consecutive entries,
a size that does not depend on world_size, and each run is ordered longest first (equal lengths keep their
order). The micro-batches cut from a run then hold samples of similar length, so less padding; the global
order stays a function of (seed, epoch, lengths, group_size) alone, so resuming stays exact, on any number of
ranks.

Epoch loop:  for epoch in range(start_epoch, epochs): sampler.set_epoch(epoch); for batch in loader: ...
set_epoch(e) with e == the current epoch keeps `consumed` (the resume case); a new epoch resets it.
"""

import torch


class ResumableDistributedSampler(torch.utils.data.Sampler[int]):
    def __init__(
        self,
        num_samples: int,
        *,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
        micro_batch_size: int = 1,
        step_size: int | None = None,
    ):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        micro_global = micro_batch_size * world_size  # one global micro-batch
        step_size = micro_global if step_size is None else step_size
        if micro_batch_size < 1 or step_size < 1 or step_size % micro_global:
            raise ValueError(f"step_size={step_size} must be a positive multiple of micro_batch_size x world_size "
                             f"= {micro_batch_size} x {world_size}")
        if drop_last and num_samples < step_size:
            raise ValueError(f"one optimizer step takes {step_size} samples (micro-batch x accumulation x ranks) "
                             f"but there are only {num_samples}: nothing is left after drop_last")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.micro_batch_size, self.step_size = micro_batch_size, step_size
        self.epoch = 0
        self.consumed = 0  # samples consumed this epoch, summed over all ranks
        self.lengths, self.group_size = None, None  # set by group_by_length

    @property
    def total_size(self) -> int:
        """Length of one epoch's global order (a multiple of step_size, hence of world_size)."""
        if self.drop_last:
            return self.num_samples // self.step_size * self.step_size
        return -(-self.num_samples // self.step_size) * self.step_size

    def global_order(self) -> torch.Tensor:
        """This epoch's order over all ranks."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        if self.lengths is not None:
            order = self._grouped_by_length(order)
        if self.total_size > self.num_samples:  # pad by wrapping around (repeat as often as needed)
            order = order.repeat(-(-self.total_size // self.num_samples))
        return order[: self.total_size]

    def group_by_length(self, lengths, group_size: int) -> None:
        """From now on, order each run of group_size consecutive entries of the permutation longest first.
        lengths: one (estimated) length per sample."""
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        if lengths.shape != (self.num_samples,):
            raise ValueError(f"need one length per sample: {self.num_samples} samples, {lengths.numel()} lengths")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.lengths, self.group_size = lengths, group_size

    def _grouped_by_length(self, order: torch.Tensor) -> torch.Tensor:
        runs = order.split(self.group_size)
        return torch.cat([run[torch.argsort(self.lengths[run], descending=True, stable=True)] for run in runs])

    def __iter__(self):
        # Materialised now: the start point is `consumed` at the moment the DataLoader asks.
        # (global micro-batches, ranks, micro_batch_size): this rank's block of each global micro-batch.
        blocks = self.global_order()[self.consumed:].reshape(-1, self.world_size, self.micro_batch_size)
        return iter(blocks[:, self.rank].reshape(-1).tolist())

    def __len__(self) -> int:
        """Samples this rank still has to take this epoch."""
        return (self.total_size - self.consumed) // self.world_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def advance(self, n_global_samples: int) -> None:
        """Record that all ranks together consumed n more samples of this epoch."""
        if n_global_samples < 0 or self.consumed + n_global_samples > self.total_size:
            raise ValueError(
                f"advance({n_global_samples}) with {self.consumed} of {self.total_size} already consumed this epoch"
            )
        self.consumed += n_global_samples

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        micro_global = self.micro_batch_size * self.world_size
        if not 0 <= consumed <= self.total_size or consumed % micro_global:
            raise ValueError(
                f"cannot resume at consumed={consumed}: need a multiple of world_size x micro_batch_size = "
                f"{self.world_size} x {self.micro_batch_size} within the epoch size {self.total_size} "
                f"(was the dataset, the global batch or drop_last changed?)"
            )
        self.epoch, self.consumed = epoch, consumed
