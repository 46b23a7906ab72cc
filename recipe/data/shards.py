"""LLaVA-format JSON/JSONL + image folder -> WebDataset tar shards with a wids index.

Layout of OUTDIR after a run:
  shard-000000.tar ...  per sample `KEY.json` (the input record, key order kept) and, for image
                        samples, `KEY.<ext>` (the original file bytes; re-encoded only when resized).
                        KEY = the sample's running index over all inputs, "%09d".
  rejects.jsonl         one {"id", "reason", "index"} per rejected sample (codes: recipe/data/validate.py)
  index.json            wids shard index (relative URLs) + "stats" + "sample_sizes" (per kept sample, in
                        order: "text_chars", the characters of its turns, and "images", its image count;
                        what recipe/data/lengths.py estimates token lengths from); written last.

Crash safety: every file is written to NAME.tmp, fsynced and renamed, and index.json (removed at
the start of a run) appears only after all shards are in place. A directory without index.json is
an unfinished conversion; rerunning the same command rewrites it to exactly the uninterrupted result.
Determinism: fixed tar metadata, input order kept, JSON dumped without reordering keys.
"""

import io
import json
import multiprocessing
import os
import tarfile
from functools import partial

from tqdm import tqdm

from recipe.data.images import image_extension, reencode, shrink_to_max_side
from recipe.data.validate import Reject, check_sample, has_image, read_image_file
from recipe.files import TMP_SUFFIX, fsync_and_rename, fsync_path, write_atomically

INDEX_NAME = "index.json"
REJECTS_NAME = "rejects.jsonl"
INDEX_KIND = "wids-shard-index-v1"


class InputError(Exception):
    """An input file is missing or unreadable: the whole run stops (a bad *sample* never does)."""


class NothingKept(Exception):
    """Every sample was rejected."""


def shard_name(n: int) -> str:
    return f"shard-{n:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:09d}"


# ---------------------------------------------------------------------------------------------------
# Reading the inputs


def load_records(json_files: list[str]) -> list:
    """All records of all input files, in order. `.jsonl`: one record per non-empty line;
    anything else: a JSON list. Raises InputError on a missing/unreadable/invalid file."""
    records = []
    for path in json_files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise InputError(f"input file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"cannot read input file {path}: {error}") from None
        if path.endswith(".jsonl"):
            # Records end at "\n" only: splitlines() would also split inside strings at U+2028, U+0085...
            for lineno, line in enumerate(text.split("\n"), 1):
                if line.strip():
                    records.append(_parse_json(line, f"{path}:{lineno}"))
        else:
            data = _parse_json(text, path)
            if not isinstance(data, list):
                raise InputError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
            records.extend(data)
    return records


def text_chars(record: dict) -> int:
    """The characters of a sample's turns: with its image count, what its token length is estimated from."""
    return sum(len(turn["value"]) for turn in record["conversations"])


def _parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{where}: not valid JSON ({error})") from None


# ---------------------------------------------------------------------------------------------------
# One sample -> shard members (runs in the worker pool)


def prepare_sample(indexed_record, *, image_root: str, max_image_side: int | None):
    """(index, record) -> ("keep", members, info) or ("reject", {"id", "reason", "index"}).

    members: [(member name, bytes)], the JSON first. Never raises for bad data.
    """
    index, record = indexed_record
    key = sample_key(index)
    try:
        check_sample(record)
        members = [(f"{key}.json", _dump_json(record))]
        resized = False
        if has_image(record):
            data, image = read_image_file(os.path.join(image_root, record["image"]))
            ext = image_extension(data)
            smaller = shrink_to_max_side(image, max_image_side) if max_image_side else None
            if smaller is not None:
                data, ext = reencode(smaller, ext)
                resized = True
            members.append((f"{key}.{ext}", data))
    except Reject as reject:
        sample_id = record.get("id") if isinstance(record, dict) else None
        return "reject", {"id": sample_id, "reason": reject.reason, "index": index}
    info = {"has_image": has_image(record), "rounds": len(record["conversations"]) // 2, "resized": resized,
            "text_chars": text_chars(record)}
    return "keep", members, info


def _dump_json(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# ---------------------------------------------------------------------------------------------------
# Writing


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata: the same input gives byte-identical shards on any machine, at any time.
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _open_shard(path: str) -> tarfile.TarFile:
    """A tar writing to PATH.tmp; _close_shard moves it to PATH once complete."""
    return tarfile.open(fileobj=open(path + TMP_SUFFIX, "wb"), mode="w", format=tarfile.USTAR_FORMAT)


def _close_shard(tar: tarfile.TarFile) -> None:
    tar.close()  # writes the end-of-archive blocks; leaves the file object open
    fsync_and_rename(tar.fileobj, tar.fileobj.name, tar.fileobj.name[: -len(TMP_SUFFIX)])


def _remove_leftovers(out_dir: str) -> None:
    """Start of a run: drop the index (the directory is 'unfinished' until the end) and tmp files."""
    ours = (INDEX_NAME + TMP_SUFFIX, REJECTS_NAME + TMP_SUFFIX)
    for name in os.listdir(out_dir):
        if name == INDEX_NAME or name in ours or (name.startswith("shard-") and name.endswith(".tar" + TMP_SUFFIX)):
            os.remove(os.path.join(out_dir, name))


def _remove_stale_shards(out_dir: str, keep: set[str]) -> None:
    """A previous run over different input may have written more shards than this one."""
    for name in os.listdir(out_dir):
        if name.startswith("shard-") and name.endswith(".tar") and name not in keep:
            os.remove(os.path.join(out_dir, name))


def convert_to_shards(
    json_files: list[str] | str,
    image_root: str,
    out_dir: str,
    *,
    samples_per_shard: int = 1000,
    workers: int = 1,
    max_image_side: int | None = None,
    progress: bool = True,
) -> dict:
    """Validate and write all samples; returns the stats dict also stored in index.json.

    Raises InputError for a missing/invalid input file, NothingKept when every sample is rejected.
    """
    if isinstance(json_files, str):
        json_files = [json_files]
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if max_image_side is not None and max_image_side < 1:
        raise ValueError(f"max_image_side must be >= 1, got {max_image_side}")
    records = load_records(json_files)
    os.makedirs(out_dir, exist_ok=True)
    _remove_leftovers(out_dir)

    prepare = partial(prepare_sample, image_root=image_root, max_image_side=max_image_side)
    shardlist, rejects = [], []
    sizes = {"text_chars": [], "images": []}  # per kept sample
    stats = {"with_image": 0, "text_only": 0, "rounds": 0, "multi_round": 0, "max_rounds": 0, "resized_images": 0}
    tar = None  # the shard being written
    with tqdm(total=len(records), unit="sample", desc="shards", disable=not progress) as bar:
        for result in _map_in_order(prepare, enumerate(records), workers):
            bar.update(1)
            if result[0] == "reject":
                rejects.append(result[1])
                continue
            _, members, info = result
            if tar is None:
                shardlist.append({"url": shard_name(len(shardlist)), "nsamples": 0})
                tar = _open_shard(os.path.join(out_dir, shardlist[-1]["url"]))
            for member_name, data in members:
                tar.addfile(_tar_member(member_name, len(data)), io.BytesIO(data))
            shardlist[-1]["nsamples"] += 1
            _count(stats, info)
            sizes["text_chars"].append(info["text_chars"])
            sizes["images"].append(int(info["has_image"]))
            if shardlist[-1]["nsamples"] == samples_per_shard:
                _close_shard(tar)
                tar = None
    if tar is not None:
        _close_shard(tar)

    write_atomically(os.path.join(out_dir, REJECTS_NAME), b"".join(_dump_json(r) + b"\n" for r in rejects))
    kept = sum(shard["nsamples"] for shard in shardlist)
    stats = {
        "records": len(records),
        "kept": kept,
        "rejected": len(rejects),
        "rejected_by_reason": _count_reasons(rejects),
        **stats,
        "shards": len(shardlist),
    }
    if kept == 0:
        reasons = _format_reasons(stats)
        raise NothingKept(f"no sample kept out of {len(records)} ({reasons}); see {out_dir}/{REJECTS_NAME}")
    _remove_stale_shards(out_dir, {shard["url"] for shard in shardlist})
    index = {"__kind__": INDEX_KIND, "wids_version": 1, "shardlist": shardlist, "stats": stats}
    write_atomically(os.path.join(out_dir, INDEX_NAME), _index_json(index, sizes).encode())
    fsync_path(out_dir)
    return stats


def _index_json(index: dict, sizes: dict) -> str:
    """index.json's text: indented, except the per-sample size lists, one line each (665K samples would
    otherwise take a line per number)."""
    lists = ",\n".join(f"  {json.dumps(key)}: {json.dumps(values, separators=(',', ':'))}"
                        for key, values in sizes.items())
    return json.dumps(index, indent=1)[:-2] + f',\n "sample_sizes": {{\n{lists}\n }}\n}}\n'


def _map_in_order(fn, items, workers: int):
    """fn over items, results in input order; a process pool when workers > 1 (decoding is CPU-bound)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        yield from pool.imap(fn, items, chunksize=16)


def _count(stats: dict, info: dict) -> None:
    stats["with_image" if info["has_image"] else "text_only"] += 1
    stats["rounds"] += info["rounds"]
    stats["multi_round"] += info["rounds"] > 1
    stats["max_rounds"] = max(stats["max_rounds"], info["rounds"])
    stats["resized_images"] += info["resized"]


def _count_reasons(rejects: list[dict]) -> dict:
    counts = {}
    for reject in rejects:
        counts[reject["reason"]] = counts.get(reject["reason"], 0) + 1
    return dict(sorted(counts.items()))


def _format_reasons(stats: dict) -> str:
    reasons = ", ".join(f"{reason}={n}" for reason, n in stats["rejected_by_reason"].items())
    return f"rejected {stats['rejected']}" + (f": {reasons}" if reasons else "")


def summary_line(stats: dict, out_dir: str) -> str:
    return (
        f"kept {stats['kept']}/{stats['records']} samples ({stats['with_image']} with image, "
        f"{stats['text_only']} text-only) in {stats['shards']} shards under {out_dir}; {_format_reasons(stats)}"
    )


def read_index(shard_dir: str) -> dict:
    """index.json of a shard directory, checked; a clear error for an unfinished conversion."""
    path = os.path.join(shard_dir, INDEX_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: not a shard directory, or its conversion did not finish (rerun llava_to_shards)"
        )
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    if index.get("__kind__") != INDEX_KIND or not isinstance(index.get("shardlist"), list):
        raise ValueError(f"{path} is not a {INDEX_KIND} index")
    return index
