"""Convert LLaVA-format JSON/JSONL + images into validated WebDataset shards with a wids index.

    python data_prep/llava_to_shards.py --json FILE [FILE ...] --image-root DIR --out OUTDIR \
        [--samples-per-shard 1000] [--workers N] [--max-image-side PX]

Bad samples are listed in OUTDIR/rejects.jsonl with a reason code and never stop the run.
Exit status: 0 done, 1 no sample kept, 2 bad input file or arguments.
Layout, reason codes and crash safety: recipe/data/shards.py and recipe/data/validate.py.
"""

import argparse
import os
import sys

from recipe.data.shards import InputError, NothingKept, convert_to_shards, summary_line  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--json", nargs="+", required=True, help="LLaVA .json (a list) or .jsonl files, in order")
    parser.add_argument("--image-root", required=True, help="directory the samples' image paths are relative to")
    parser.add_argument("--out", required=True, help="output shard directory")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--max-image-side", type=int, default=None, help="downscale larger images (re-encoded)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        stats = convert_to_shards(
            args.json,
            args.image_root,
            args.out,
            samples_per_shard=args.samples_per_shard,
            workers=args.workers,
            max_image_side=args.max_image_side,
        )
    except NothingKept as error:
        print(f"llava_to_shards: error: {error}", file=sys.stderr)
        return 1
    except (InputError, ValueError) as error:
        print(f"llava_to_shards: error: {error}", file=sys.stderr)
        return 2
    print(summary_line(stats, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
