"""The published PhilEO Bench n-shot selections, read into this suite's n-shot index.

The published code ships its selections as `phileo-bench/indices/indices_<date>_128_10M_<task>_<n>.json`:

    {bucket: {"train_indices": [k, ...], "val_indices": [k, ...],
              "length_multi_array_train": int, "length_multi_array_val": int}, ...}     (the six buckets)

Each k points into the bucket's *concatenation* of patch files, in the published file order:
  * train: for each subregion in the bucket's order (europe, denmark-1, denmark-2, ...), the files matching
    `{subregion}*train_s2.npy`, sorted by name; only those whose label file for the task exists are kept;
  * val: the same train file names with "train" → "val", kept where the val label file exists.
The lengths recorded in the index must equal those concatenations' patch counts: a mismatch means the data is
not the data the selection was drawn from, and it is refused.

One quirk is handled rather than refused: the data files spell Israel "isreal", while the published bucket table
says "israel" (so its glob finds no Israel file); other copies of the code use "isreal" and do find them. Both
readings are tried, and the one whose lengths match the index is used (and recorded). When neither matches, the
error gives the lengths each reading found.

`published_nshot_index(...)` returns an index document in this suite's format (the same as `select_nshot`'s:
`train` / `val` lists of [s2 file name, patch row], per-bucket counts, the files used), with a `source` entry
naming the published file, its sha256 and the Israel reading; fine-tuning saves it beside the drawn indices and
records its path and sha256 in each run's result, as for a drawn selection.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

from phileo.bench.data import (NSHOT_FORMAT, REGION_BUCKETS, TASKS, VAL_RATIO, BenchDataError, check_s2_array,
                               check_task, file_sha256, label_name, open_array)

PUBLISHED_NAME = re.compile(r"^indices_(?P<date>\d{8})_(?P<name>.+)_(?P<task>[a-z]+)_(?P<n>\d+)\.json$")
PUBLISHED_DATASET_NAME = "128_10M"  # the `name` part of the published files (128 px patches, 10 M samples)
_ISRAEL = ("israel-1", "israel-2")
_SPELLINGS = {"israel-1": ("israel-1", "isreal-1"), "israel-2": ("israel-2", "isreal-2")}


def find_published_index(path: str | Path, task: str, n_shot: int) -> Path:
    """The published index file for (task, n_shot): `path` itself when it is a file, else the one file in the
    folder `path` named `indices_*_128_10M_{task}_{n_shot}.json` (as the published code globs it). Refuses a
    missing path, a folder with none or several such files, and a file named for another task or n."""
    check_task(task)
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob(f"indices_*_{PUBLISHED_DATASET_NAME}_{task}_{int(n_shot)}.json"))
        if not found:
            raise BenchDataError(f"no published n-shot index for {task} n={n_shot} in {p} (expected "
                                 f"indices_<date>_{PUBLISHED_DATASET_NAME}_{task}_{n_shot}.json); copy it from "
                                 f"phileo-bench/indices/, or leave data.nshot_index empty to draw a selection")
        if len(found) > 1:
            raise BenchDataError(f"several published n-shot indices for {task} n={n_shot} in {p}: "
                                 f"{', '.join(f.name for f in found)}; set data.nshot_index to the one file")
        return found[0]
    if not p.is_file():
        raise BenchDataError(f"published n-shot index not found: {p} (data.nshot_index / --nshot-index takes a "
                             f"phileo-bench/indices/*.json file or the folder holding them)")
    m = PUBLISHED_NAME.match(p.name)
    if m and (m["task"] != task or int(m["n"]) != int(n_shot)):
        raise BenchDataError(f"{p} is the published selection for {m['task']} n={m['n']}, but this run is {task} "
                             f"n={n_shot}; pick indices_*_{m['name']}_{task}_{n_shot}.json")
    return p


def _read(path: Path) -> dict[str, dict[str, Any]]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BenchDataError(f"{path} is not a readable JSON n-shot index ({e})") from None
    keys = {"train_indices", "val_indices", "length_multi_array_train", "length_multi_array_val"}
    if not isinstance(doc, dict) or not doc or not all(isinstance(v, dict) and keys <= set(v) for v in doc.values()):
        raise BenchDataError(f"{path} is not in the published n-shot format ({{bucket: {{{', '.join(sorted(keys))}}}}})")
    unknown = sorted(set(doc) - set(REGION_BUCKETS))
    if unknown:
        raise BenchDataError(f"{path}: unknown bucket(s) {unknown}; the PhilEO Bench buckets are "
                             f"{', '.join(REGION_BUCKETS)}")
    return doc


def _bucket_files(root: Path, bucket: str, task: str, with_israel: bool) -> dict[str, list[tuple[str, int]]]:
    """{"train": [(s2 name, n patches), ...], "val": [...]} in the published concatenation order."""
    names: list[str] = []
    for sub in REGION_BUCKETS[bucket]:
        if sub in _ISRAEL and not with_israel:
            continue
        found: set[str] = set()
        for spelling in _SPELLINGS.get(sub, (sub,)):
            found.update(f.name for f in root.glob(f"{spelling}*train_s2.npy"))
        names.extend(sorted(found))
    out: dict[str, list[tuple[str, int]]] = {"train": [], "val": []}
    for train_name in names:
        for split, name in (("train", train_name), ("val", train_name.replace("train", "val"))):
            if not (root / label_name(name, task)).exists():
                continue
            n, _ = check_s2_array(open_array(root / name, f"{split} s2 array"), root / name)
            out[split].append((name, n))
    return out


def _rows(files: Sequence[tuple[str, int]], indices: Sequence[int], where: str) -> list[list]:
    """Maps concatenation indices onto [file name, row] pairs."""
    starts, total = [], 0
    for _, n in files:
        starts.append(total)
        total += n
    pairs = []
    for k in indices:
        k = int(k)
        if not 0 <= k < total:
            raise BenchDataError(f"{where}: index {k} is outside the {total} patches of the bucket's files")
        i = bisect.bisect_right(starts, k) - 1
        pairs.append([files[i][0], k - starts[i]])
    return pairs


def published_nshot_index(root: str | Path, task: str, n_shot: int, path: str | Path) -> dict[str, Any]:
    """The published selection `path` (file or folder, see find_published_index) for `task` and `n_shot` on the
    data in `root`, as an index document of this suite's format. Refuses (BenchDataError) an unreadable or
    malformed file and data whose per-bucket patch counts differ from the lengths the file records."""
    root = Path(root)
    if not root.is_dir():
        raise BenchDataError(f"PhilEO Bench data folder not found: {root} (set data.root to the folder holding "
                             f"the *_s2.npy files)")
    path = find_published_index(path, task, n_shot)
    published = _read(path)
    doc: dict[str, Any] = {
        "format": NSHOT_FORMAT, "task": task, "n_shot": int(n_shot), "n_val": math.ceil(VAL_RATIO * int(n_shot)),
        "val_ratio": VAL_RATIO, "seed": None, "data_root": str(root.resolve()),
        "source": {"published_index": str(path.resolve()), "sha256": file_sha256(path), "israel_files": None},
        "files": {}, "skipped_files": {}, "buckets": {}, "train": [], "val": [],
    }
    israel_reading = "none in the data"
    for bucket, entry in published.items():
        want = {"train": int(entry["length_multi_array_train"]), "val": int(entry["length_multi_array_val"])}
        readings = {"with": _bucket_files(root, bucket, task, with_israel=True)}
        if any(sub in _ISRAEL for sub in REGION_BUCKETS[bucket]):
            readings["without"] = _bucket_files(root, bucket, task, with_israel=False)
        counts = {k: {split: sum(n for _, n in files[split]) for split in files} for k, files in readings.items()}
        match = [k for k in readings if counts[k] == want]
        if not match:
            raise BenchDataError(
                f"{path}: bucket {bucket} was drawn from {want['train']} train / {want['val']} val patches, but "
                f"{root} has " + " or ".join(f"{c['train']} / {c['val']} ({k} the Israel files)" if len(counts) > 1
                                             else f"{c['train']} / {c['val']}" for k, c in counts.items())
                + f" for task {task}: this is not the data the published selection was drawn from (or files are "
                  f"missing); use the full PhilEO-downstream set, or leave data.nshot_index empty to draw one")
        files = readings[match[0]]
        if len(counts) > 1 and counts["with"] != counts["without"]:
            israel_reading = "included" if match[0] == "with" else "excluded (the published bucket table's glob)"
        for split in ("train", "val"):
            rows = _rows(files[split], entry[f"{split}_indices"], f"{path} {bucket} {split}")
            doc[split].extend(rows)
            doc["buckets"].setdefault(bucket, {})[split] = {"selected": len(rows), "available": want[split]}
            for name, n in files[split]:
                doc["files"][name] = {"n_patches": n, "label": label_name(name, task)}
    doc["source"]["israel_files"] = israel_reading
    return doc


__all__ = ["find_published_index", "published_nshot_index", "PUBLISHED_DATASET_NAME", "TASKS"]
