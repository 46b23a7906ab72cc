"""Launch shapes and path choices of the DBiLD kernels, as one frozen dataclass passed explicitly.

`DEFAULT_TUNING` is what `dbild_loss_triton` uses. A caller that needs another shape builds its own
instance and passes `tuning=`: tests/perf/bench_dbild.py --sweep compares lane-kernel shapes on a GPU,
tests/test_kernels.py forces the exact fallback, small lane lists or the compiled formulation under the
interpreter. Nothing here imports triton or torch.

The defaults come from ptxas reports for sm_90 (tests/perf/compile_check.py) and the SASS of the lane
kernel's block loop; tests/perf/README.md records those reports and the measurements. The lane kernel's
block loop is bound by integer min/max (the ALU pipe, half rate), hence the choice of keys per lane.
"""
from __future__ import annotations

from dataclasses import dataclass


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class DBiLDTuning:
    """None means "the rule described at the field". Sizes are powers of two."""

    # Lane kernel (recipe/kernels/window_lanes.py), the one-pass window of every row.
    lane_depth: int | None = None
    """Keys kept per lane, 3 or 4. Rule: 3 for 16-bit rows with C <= 64 on >= 2048 lanes (5 integer
    min/max per logit), else 4 (7 min/max, but a window of 128 or fewer lanes is crowded less)."""
    lanes: int | None = None
    """Lanes per block. Rule: 2048 at depth 3, 1024 at depth 4 for 16-bit rows; 512 for float32 rows
    (int64 keys). Always clipped to [max(C, 16), next power of two >= V]: the threshold's lower bound
    needs at least C lane groups."""
    lane_warps: int | None = None
    """Rule: 8 for 16-bit rows; 4 for float32 rows (at 8 the compiler's layout repeats their pair loads)."""
    lane_maxnreg: int | None = None
    """Register cap (ptxas). Rule: 64 for 16-bit rows (4 programs per SM), 80 for float32 rows."""
    use_lane_kernel: bool = True
    """False: skip the lane kernel, every window goes to the exact kernel."""

    # Exact kernel (recipe/kernels/window_exact.py), for the windows the lane kernel could not settle.
    exact_block: int | None = None
    """Logits per block. Rule: min(2048, max(next power of two >= V, CAP / 2))."""
    exact_cap: int | None = None
    """Candidate-list slots per window. Rule: max(4 * next power of two >= C, 64). It also sizes the
    lane kernel's candidate list."""
    exact_warps: int = 4
    exact_maxnreg: int = 96
    """Register cap: without it ptxas takes more registers for values hoisted out of the compaction's sort."""

    # Both window kernels.
    interpreter_formulation: bool | None = None
    """The formulation of sorts and NaN-propagating maxima that the CPU interpreter runs fast (there,
    reductions with a custom combine run element by element in Python). Rule: on iff TRITON_INTERPRET=1.
    False under the interpreter runs the GPU formulation there too."""

    def __post_init__(self):
        if self.lane_depth not in (None, 3, 4):
            raise ValueError(f"DBiLDTuning.lane_depth must be 3 or 4, got {self.lane_depth!r}")
        for name in ("lanes", "lane_warps", "exact_block", "exact_cap", "exact_warps"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and _is_pow2(value)):
                raise ValueError(f"DBiLDTuning.{name} must be a power of two, got {value!r}")
        for name in ("lane_maxnreg", "exact_maxnreg"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value > 0):
                raise ValueError(f"DBiLDTuning.{name} must be a positive integer, got {value!r}")

    def exact_config(self, vocab: int, candidates: int) -> tuple[int, int, int]:
        """(CAP, SUB, BLOCK) of the exact kernel, SUB its sub-block when a block overflows the list."""
        cap = max(4 * next_pow2(max(2, candidates)), 64) if self.exact_cap is None else self.exact_cap
        sub = cap // 2
        # SUB <= CAP - C guarantees a sub-block always fits after one compaction.
        if not 1 <= sub <= cap - candidates:
            raise ValueError(f"DBiLDTuning.exact_cap={cap} is too small for {candidates} candidates: "
                             f"it needs cap / 2 <= cap - candidates")
        block = min(2048, max(next_pow2(vocab), sub)) if self.exact_block is None else self.exact_block
        if block < sub:
            raise ValueError(f"DBiLDTuning.exact_block={block} must be at least exact_cap / 2 = {sub}")
        return cap, sub, block

    def lane_config(self, vocab: int, candidates: int, itemsize: int) -> tuple[int, int, int]:
        """(LANES, DEPTH, G) of the lane kernel for rows of `itemsize`-byte logits, G the number of lane
        groups of the threshold's lower bound."""
        groups = max(2, next_pow2(candidates))
        depth, lanes = self.lane_depth, self.lanes
        if depth is None:
            depth = 3 if itemsize <= 2 and groups <= 64 and (lanes is None or lanes >= 2048) else 4
        if lanes is None:
            lanes = (2048 if depth == 3 else 1024) if itemsize <= 2 else 512
        lanes = max(min(lanes, next_pow2(vocab)), groups, 16)
        if itemsize <= 2 and vocab // lanes >= 0xFFFF:  # 16-bit keys hold the block number in 16 bits
            raise ValueError(f"DBiLDTuning.lanes={lanes} is too few for a vocabulary of {vocab}: "
                             f"16-bit rows need fewer than 65535 blocks")
        return lanes, depth, groups

    def lane_launch(self, itemsize: int) -> dict:
        if itemsize > 2:
            warps, maxnreg = 4, 80
        else:
            warps, maxnreg = 8, 64
        return {"num_warps": self.lane_warps or warps, "maxnreg": self.lane_maxnreg or maxnreg}

    def exact_launch(self) -> dict:
        return {"num_warps": self.exact_warps, "maxnreg": self.exact_maxnreg}

    @staticmethod
    def pairs_launch(km: int) -> dict:
        """The pair kernel's KM x KM tiles: 4 warps up to 32, 8 warps and 128 registers at 64, 32 warps
        at 128 (larger tiles would spill)."""
        if km <= 32:
            return {"num_warps": 4}
        if km <= 64:
            return {"num_warps": 8, "maxnreg": 128}
        return {"num_warps": 32}

    @staticmethod
    def scatter_launch(km: int) -> dict:
        return {"num_warps": 4 if km <= 64 else 8}


DEFAULT_TUNING = DBiLDTuning()
