"""PhilEO Bench downstream data: the published `.npy` patch files, the n-shot protocol, and a torch Dataset.

On-disk format (the published "PhilEO-downstream" set, one flat folder; see shared/reference/PHILEO_BENCH.md):

    {region}_{tile}_{split}_s2.npy            (N, S, S, 10) reflectance x10000 (uint16), channel-last,
                                              bands B02 B03 B04 B08 B05 B06 B07 B8A B11 B12
    {region}_{tile}_{split}_label_roads.npy   (N, S, S, 1) road density, fraction of each pixel (0-1)
    {region}_{tile}_{split}_label_building.npy (N, S, S, 1) building density (0-1)
    {region}_{tile}_{split}_label_lc.npy      (N, S, S, 1) ESA WorldCover codes (10, 20, ... 100)

split is train, val or test; S is 128 in the published set (any square size is accepted, tests use small ones).
Arrays are opened with `np.load(mmap_mode="r")` and read patch by patch: the full set is ~0.4 TB. Every file is
checked when it is opened (shape, channel count, label beside it with the same N and S); a missing or
mis-shaped array raises BenchDataError naming the file and what was expected.

The n-shot protocol (reference `protocol_fewshot`): the 20 regions form six buckets; from each bucket n training
patches are drawn from its `*_train_*` files and ceil(0.2 n) validation patches from its `*_val_*` files, with a
fixed seed. For roads and buildings a drawn patch is accepted when its mean label exceeds 0.005 (train) / 0.01
(val), otherwise kept with probability 0.25. The selection is written once as a JSON index next to the data
(`{root}/nshot_indices/nshot_{task}_n{n}_seed{seed}.json`, or another folder) and reused by every run, so every
model is fine-tuned on exactly the same patches; its sha256 goes into each run's result.

Selection is nested: for a fixed seed the patches chosen for n=50 are the first 50 chosen for n=100 (each
bucket's candidate order and coin flips depend on the seed, bucket and split only, never on n).
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from phileo.fsutil import atomic_write_json, file_digest, read_json

BANDS = ("B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12")
NUM_BANDS = len(BANDS)
TASKS = ("roads", "building", "lc")
REGRESSION_TASKS = ("roads", "building")
SPLITS = ("train", "val", "test")

REGIONS = (
    "denmark-1", "denmark-2", "east-africa", "egypt-1", "eq-guinea", "europe", "ghana-1", "israel-1", "israel-2",
    "japan", "nigeria", "north-america", "senegal", "south-america", "tanzania-1", "tanzania-2", "tanzania-3",
    "tanzania-4", "tanzania-5", "uganda-1",
)
# The reference code (and so some copies of the files) spell Israel "isreal".
REGION_ALIASES = {"isreal-1": "israel-1", "isreal-2": "israel-2"}
REGION_BUCKETS: dict[str, tuple[str, ...]] = {
    "europe": ("europe", "denmark-1", "denmark-2"),
    "east-africa": ("east-africa", "tanzania-1", "tanzania-2", "tanzania-3", "tanzania-4", "tanzania-5", "uganda-1"),
    "northwest-africa": ("eq-guinea", "ghana-1", "egypt-1", "israel-1", "israel-2", "nigeria", "senegal"),
    "north-america": ("north-america",),
    "south-america": ("south-america",),
    "japan": ("japan",),
}
BUCKET_OF_REGION = {r: b for b, rs in REGION_BUCKETS.items() for r in rs}

WORLDCOVER_CODES = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
WORLDCOVER_NAMES = ("tree cover", "shrubland", "grassland", "cropland", "built-up", "bare/sparse", "snow/ice",
                    "permanent water", "herbaceous wetland", "mangroves", "moss/lichen")
NUM_LC_CLASSES = len(WORLDCOVER_CODES)
# Pixels whose code is not a WorldCover class (0 = no data) get this index; the loss and metrics skip them.
IGNORE_INDEX = -100

# Per-band statistics (reflectance x10000, BANDS order) used by some baselines ("standardise").
BAND_MEAN = np.array([1184, 1121, 1136, 1763, 1264, 1645, 1847, 1973, 1732, 1248], dtype=np.float32)
BAND_STD = np.array([650, 965, 949, 1364, 1108, 1258, 1233, 3546, 1310, 1088], dtype=np.float32)
NORMALISATIONS = ("reflectance", "standardise", "none")

VAL_RATIO = 0.2
ACCEPT_MEAN_LABEL = {"train": 0.005, "val": 0.01}
ACCEPT_EMPTY_PROB = 0.25
# The reference seeded Python's `random` with 97 before drawing.
DEFAULT_NSHOT_SEED = 97
NSHOT_FORMAT = "phileo-bench-nshot-v1"

_S2_NAME = re.compile(r"^(?P<region>[a-z0-9-]+)_(?P<tile>[^_]+)_(?P<split>train|val|test)_s2\.npy$")
_LUT = np.full(256, IGNORE_INDEX, dtype=np.int64)
_LUT[list(WORLDCOVER_CODES)] = np.arange(NUM_LC_CLASSES)


class BenchDataError(ValueError):
    """The PhilEO Bench files are missing, mis-shaped or do not match a saved n-shot index; names the file."""


def check_task(task: str) -> str:
    if task not in TASKS:
        raise BenchDataError(f"unknown PhilEO Bench task '{task}': choose one of {', '.join(TASKS)}")
    return task


def worldcover_to_class(codes: np.ndarray) -> np.ndarray:
    """ESA WorldCover codes (10, 20, ... 100) -> class indices 0..10 (int64), same shape.

    Any other value (0 = no data, or a code that is not a WorldCover class) becomes IGNORE_INDEX (-100).
    """
    codes = np.asarray(codes)
    out = np.full(codes.shape, IGNORE_INDEX, dtype=np.int64)
    as_int = codes.astype(np.int64, copy=False)
    valid = (as_int >= 0) & (as_int < _LUT.size)
    if np.issubdtype(codes.dtype, np.floating):
        valid &= codes == as_int
    out[valid] = _LUT[as_int[valid]]
    return out


def canonical_region(name: str) -> str:
    return REGION_ALIASES.get(name, name)


def parse_s2_name(name: str) -> tuple[str, str, str] | None:
    """'europe_12_train_s2.npy' -> ('europe', '12', 'train'); None for any other file name."""
    m = _S2_NAME.match(name)
    if not m:
        return None
    return canonical_region(m["region"]), m["tile"], m["split"]


def label_name(s2_name: str, task: str) -> str:
    """The label file beside an s2 file: '..._train_s2.npy' -> '..._train_label_{task}.npy'."""
    return s2_name[: -len("_s2.npy")] + f"_label_{task}.npy"


def open_array(path: Path, what: str) -> np.ndarray:
    """Memory-maps a .npy file; BenchDataError naming the file when it is missing or not a .npy array."""
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise BenchDataError(f"missing {what}: {path}") from None
    except (ValueError, OSError, EOFError) as e:
        raise BenchDataError(f"{what} {path} is not a readable .npy array ({e}); re-copy it from the "
                             f"PhilEO-downstream set") from None


def check_s2_array(arr: np.ndarray, path: Path) -> tuple[int, int]:
    """(n_patches, patch_size) of an s2 array, or BenchDataError naming the file and the expected shape."""
    if arr.ndim != 4 or arr.shape[3] != NUM_BANDS or arr.shape[1] != arr.shape[2]:
        raise BenchDataError(f"{path}: s2 array has shape {tuple(arr.shape)}, expected (N, S, S, {NUM_BANDS}) "
                             f"(channel-last patches, bands {' '.join(BANDS)})")
    return int(arr.shape[0]), int(arr.shape[1])


def check_label_array(arr: np.ndarray, path: Path, n_patches: int, patch_size: int) -> None:
    want = (n_patches, patch_size, patch_size, 1)
    if tuple(arr.shape) != want:
        raise BenchDataError(f"{path}: label array has shape {tuple(arr.shape)}, expected {want} to match the s2 "
                             f"file beside it")


@dataclass(frozen=True)
class BenchFile:
    """One `{region}_{tile}_{split}_s2.npy` file and its label file for one task, checked."""

    region: str
    tile: str
    split: str
    s2_path: Path
    label_path: Path
    n_patches: int
    patch_size: int

    @property
    def name(self) -> str:
        return self.s2_path.name

    @property
    def bucket(self) -> str:
        return BUCKET_OF_REGION[self.region]


@dataclass
class BenchScan:
    """Files found for one task and split, and those left out with the reason (nothing is dropped silently)."""

    files: list[BenchFile] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def n_patches(self) -> int:
        return sum(f.n_patches for f in self.files)


def scan_bench_files(root: str | Path, task: str, split: str, regions: Iterable[str] | None = None) -> BenchScan:
    """Finds and checks every `*_{split}_s2.npy` file under `root` (flat folder) with a label file for `task`.

    regions: restrict to these region names (default all 20). Files without a label for the task (roads exist
    only for some regions) or with no patches are listed in `skipped`. Refuses (BenchDataError): a missing root,
    a file whose region is not a PhilEO Bench region, a mis-shaped s2 or label array.
    """
    check_task(task)
    if split not in SPLITS:
        raise BenchDataError(f"unknown split '{split}': choose one of {', '.join(SPLITS)}")
    root = Path(root)
    if not root.is_dir():
        raise BenchDataError(f"PhilEO Bench data folder not found: {root} (set data.root to the folder holding "
                             f"the *_s2.npy files)")
    wanted = None if regions is None else {canonical_region(r) for r in regions}
    if wanted is not None and (unknown := sorted(wanted - set(REGIONS))):
        raise BenchDataError(f"unknown PhilEO Bench region(s) {unknown}; valid: {', '.join(REGIONS)}")
    scan = BenchScan()
    for s2_path in sorted(root.glob(f"*_{split}_s2.npy")):
        parsed = parse_s2_name(s2_path.name)
        if parsed is None or parsed[0] not in REGIONS:
            raise BenchDataError(f"{s2_path}: not a PhilEO Bench file name ({{region}}_{{tile}}_{split}_s2.npy with "
                                 f"region one of {', '.join(REGIONS)}); move it out of {root}")
        region, tile, _ = parsed
        if wanted is not None and region not in wanted:
            continue
        label_path = s2_path.with_name(label_name(s2_path.name, task))
        if not label_path.exists():
            scan.skipped.append({"file": s2_path.name, "reason": f"no {label_path.name}"})
            continue
        n, size = check_s2_array(open_array(s2_path, "s2 array"), s2_path)
        check_label_array(open_array(label_path, f"{task} label array"), label_path, n, size)
        if n == 0:
            scan.skipped.append({"file": s2_path.name, "reason": "no patches"})
            continue
        scan.files.append(BenchFile(region, tile, split, s2_path, label_path, n, size))
    sizes = {f.patch_size for f in scan.files}
    if len(sizes) > 1:
        raise BenchDataError(f"{root}: patch files of different sizes {sorted(sizes)} for task {task}; one "
                             f"data folder must hold one patch size")
    return scan


# --------------------------------------------------------------------------------------------------- n-shot
def nshot_index_path(index_dir: str | Path, task: str, n_shot: int, seed: int = DEFAULT_NSHOT_SEED) -> Path:
    return Path(index_dir) / f"nshot_{task}_n{n_shot}_seed{seed}.json"


def default_index_dir(root: str | Path) -> Path:
    return Path(root) / "nshot_indices"


def _stream(seed: int, bucket: str, split: str) -> np.random.Generator:
    # Keyed by seed, bucket and split only (not n, not task) so that selections are nested in n.
    return np.random.default_rng([seed, zlib.crc32(bucket.encode()), zlib.crc32(split.encode())])


def _draw(files: Sequence[BenchFile], task: str, split: str, count: int, rng: np.random.Generator,
          label_cache: dict[Path, np.ndarray]) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """Draws `count` (file name, patch index) pairs from the files' patches by the n-shot rule."""
    pool = [(f, i) for f in files for i in range(f.n_patches)]
    order = rng.permutation(len(pool))
    coins = rng.random(len(pool))
    rule = task in REGRESSION_TASKS
    chosen: list[tuple[str, int]] = []
    rejected: list[tuple[str, int]] = []
    by_rule = by_chance = 0
    for k in order:
        if len(chosen) >= count:
            break
        f, i = pool[k]
        if not rule:
            chosen.append((f.name, i))
            continue
        if f.label_path not in label_cache:
            label_cache[f.label_path] = open_array(f.label_path, f"{task} label array")
        mean_label = float(np.asarray(label_cache[f.label_path][i], dtype=np.float64).mean())
        if mean_label > ACCEPT_MEAN_LABEL[split]:
            by_rule += 1
            chosen.append((f.name, i))
        elif coins[k] < ACCEPT_EMPTY_PROB:
            by_chance += 1
            chosen.append((f.name, i))
        else:
            rejected.append((f.name, i))
    # A bucket with too few labelled patches to fill n by the rule: the rejected ones (in drawn order) fill it,
    # recorded as topped_up, rather than handing the model fewer patches than asked for without a trace.
    topped_up = min(count - len(chosen), len(rejected)) if len(chosen) < count else 0
    chosen.extend(rejected[:topped_up])
    stats = {"requested": count, "selected": len(chosen), "available": len(pool),
             "accepted_by_rule": by_rule, "accepted_by_chance": by_chance, "topped_up": topped_up}
    return chosen, stats


def select_nshot(root: str | Path, task: str, n_shot: int, seed: int = DEFAULT_NSHOT_SEED,
                 val_ratio: float = VAL_RATIO, regions: Iterable[str] | None = None) -> dict[str, Any]:
    """Draws the n-shot training and validation patches (see module docstring); returns the index document.

    Takes the data folder, task, n (patches per bucket), the selection seed and validation ratio. Returns a
    JSON-able dict with `train` and `val` lists of [s2 file name, patch index], per-bucket counts (requested,
    selected, available, accepted by rule / by chance, topped up), the files used with their patch counts, and
    the files skipped (no label for this task). A bucket with fewer patches than n gives all it has (its
    `selected` says so). Refuses n_shot < 1 and a folder with no training patches for the task.
    """
    check_task(task)
    if int(n_shot) < 1:
        raise BenchDataError(f"n_shot must be >= 1, got {n_shot}")
    if not 0 <= val_ratio <= 1:
        raise BenchDataError(f"val_ratio must be within 0..1, got {val_ratio}")
    n_val = math.ceil(val_ratio * n_shot)
    scans = {split: scan_bench_files(root, task, split, regions) for split in ("train", "val")}
    if not scans["train"].files:
        raise BenchDataError(f"no *_train_s2.npy files with {task} labels in {root}; is data.root the "
                             f"PhilEO-downstream folder?")
    label_cache: dict[Path, np.ndarray] = {}
    doc: dict[str, Any] = {
        "format": NSHOT_FORMAT, "task": task, "n_shot": int(n_shot), "n_val": n_val, "val_ratio": val_ratio,
        "seed": int(seed), "data_root": str(Path(root).resolve()),
        "rule": ({"accept_mean_label": ACCEPT_MEAN_LABEL, "accept_empty_prob": ACCEPT_EMPTY_PROB}
                 if task in REGRESSION_TASKS else None),
        "files": {}, "skipped_files": {s: scans[s].skipped for s in scans}, "buckets": {}, "train": [], "val": [],
    }
    for bucket in REGION_BUCKETS:
        entry = {}
        for split, count in (("train", int(n_shot)), ("val", n_val)):
            files = [f for f in scans[split].files if f.bucket == bucket]
            if not files:
                continue
            chosen, stats = _draw(files, task, split, count, _stream(seed, bucket, split), label_cache)
            doc[split].extend([name, int(i)] for name, i in chosen)
            entry[split] = stats
            for f in files:
                doc["files"][f.name] = {"n_patches": f.n_patches, "label": f.label_path.name}
        if entry:
            doc["buckets"][bucket] = entry
    return doc


def _check_index(doc: Any, path: Path, root: Path, task: str, n_shot: int, seed: int, val_ratio: float) -> None:
    fix = f"delete {path} to draw it again, or point data.nshot_index_dir elsewhere"
    if not isinstance(doc, dict) or doc.get("format") != NSHOT_FORMAT:
        raise BenchDataError(f"{path} is not a PhilEO Bench n-shot index ({NSHOT_FORMAT}); {fix}")
    want = {"task": task, "n_shot": int(n_shot), "seed": int(seed), "val_ratio": val_ratio}
    got = {k: doc.get(k) for k in want}
    if got != want:
        raise BenchDataError(f"{path} was drawn for {got}, not {want}; {fix}")
    for name, info in doc["files"].items():
        s2_path = root / name
        arr = open_array(s2_path, "s2 array (listed in the n-shot index)")
        if int(arr.shape[0]) != info["n_patches"]:
            raise BenchDataError(f"{s2_path} has {arr.shape[0]} patches but the n-shot index {path} was drawn "
                                 f"when it had {info['n_patches']}: the data changed; {fix}")


def load_or_create_nshot_index(root: str | Path, task: str, n_shot: int, seed: int = DEFAULT_NSHOT_SEED,
                               val_ratio: float = VAL_RATIO, index_dir: str | Path | None = None
                               ) -> tuple[Path, dict[str, Any]]:
    """The n-shot index for (task, n_shot, seed): read from `index_dir` when present, else drawn and saved.

    index_dir defaults to `{root}/nshot_indices`. Concurrent callers (array tasks) may both draw it: the draw is
    deterministic and the write atomic, so they agree. Returns (path, document). Refuses an existing index made
    for other parameters or from data that has changed since (patch counts differ), naming the file to delete.
    """
    root = Path(root)
    path = nshot_index_path(index_dir or default_index_dir(root), task, n_shot, seed)
    if path.exists():
        doc = read_json(path, "n-shot index")
        _check_index(doc, path, root, task, n_shot, seed, val_ratio)
        return path, doc
    doc = select_nshot(root, task, n_shot, seed, val_ratio)
    _write_index(path, doc)
    return path, doc


def _write_index(path: Path, doc: dict[str, Any]) -> None:
    try:
        atomic_write_json(path, doc)
    except OSError as e:
        raise BenchDataError(f"cannot write the n-shot index {path} ({e}); if the data folder is read-only set "
                             f"data.nshot_index_dir to a writable folder shared by all runs") from None


def save_published_selection(root: str | Path, task: str, n_shot: int, published: str | Path,
                             index_dir: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """A published selection read onto the data in `root` (see phileo.bench.published_nshot), written as
    `{index_dir}/nshot_{task}_n{n}_published-{file stem}.json` (atomically: array tasks may write it together,
    and they write the same bytes). Returns (path, document)."""
    from phileo.bench.published_nshot import published_nshot_index

    doc = published_nshot_index(root, task, n_shot, published)
    stem = Path(doc["source"]["published_index"]).stem
    path = Path(index_dir or default_index_dir(root)) / f"nshot_{task}_n{int(n_shot)}_published-{stem}.json"
    _write_index(path, doc)
    return path, doc


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of the whole file (the n-shot index's fingerprint in result.json)."""
    return file_digest(path, "sha256")


# --------------------------------------------------------------------------------------------------- dataset
def normalise(x: np.ndarray, how: str) -> np.ndarray:
    """Channel-last reflectance x10000 -> float32 model input: 'reflectance' x/10000 (default of the reference),
    'standardise' (x - BAND_MEAN)/BAND_STD per band, 'none' (float32 as stored)."""
    x = np.asarray(x, dtype=np.float32)
    if how == "reflectance":
        return x / np.float32(10000.0)
    if how == "standardise":
        return (x - BAND_MEAN) / BAND_STD
    if how == "none":
        return x
    raise BenchDataError(f"unknown normalisation '{how}': choose one of {', '.join(NORMALISATIONS)}")


class BenchDataset(Dataset):
    """PhilEO Bench patches for one task as a torch Dataset of {"image": x, "label": y}.

    x: float32 (10, S, S), normalised (see `normalise`). y: float32 (1, S, S) density for roads/building;
    int64 (S, S) class index (IGNORE_INDEX where the code is no WorldCover class) for lc.
    samples: (s2 file name, patch index) pairs under `root`, e.g. an n-shot index's `train` list. Files are
    memory-mapped lazily in each DataLoader worker (a memmap must not be pickled into workers: that copies it).
    augment: random flips and 90-degree rotations, applied to x and y alike.
    """

    def __init__(self, root: str | Path, task: str, samples: Sequence[tuple[str, int]] | Sequence[list],
                 normalisation: str = "reflectance", augment: bool = False):
        self.root = Path(root)
        self.task = check_task(task)
        if normalisation not in NORMALISATIONS:
            raise BenchDataError(f"unknown normalisation '{normalisation}': choose one of {', '.join(NORMALISATIONS)}")
        self.normalisation = normalisation
        self.augment = augment
        self.samples = [(str(name), int(i)) for name, i in samples]
        self.skipped: list[dict[str, str]] = []  # test files left out (no label for the task)
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def test_set(cls, root: str | Path, task: str, regions: Iterable[str] | None = None,
                 normalisation: str = "reflectance") -> "BenchDataset":
        """Every patch of every `*_test_s2.npy` file that has a label for `task` (the full test set)."""
        scan = scan_bench_files(root, task, "test", regions)
        if not scan.files:
            raise BenchDataError(f"no *_test_s2.npy files with {task} labels in {root}")
        ds = cls(root, task, [(f.name, i) for f in scan.files for i in range(f.n_patches)], normalisation)
        ds.skipped = scan.skipped
        return ds

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state

    def __len__(self) -> int:
        return len(self.samples)

    def _open(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        pair = self._arrays.get(name)
        if pair is None:
            s2_path = self.root / name
            label_path = s2_path.with_name(label_name(name, self.task))
            s2 = open_array(s2_path, "s2 array")
            n, size = check_s2_array(s2, s2_path)
            label = open_array(label_path, f"{self.task} label array")
            check_label_array(label, label_path, n, size)
            pair = self._arrays[name] = (s2, label)
        return pair

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw (s2 (S, S, 10), label (S, S, 1)) arrays of sample `index`, as stored."""
        name, i = self.samples[index]
        s2, label = self._open(name)
        if not 0 <= i < s2.shape[0]:
            raise BenchDataError(f"{self.root / name}: patch {i} requested but the file has {s2.shape[0]}; the "
                                 f"n-shot index does not match the data")
        return np.array(s2[i]), np.array(label[i])  # copies: a memmap view is read-only

    def __getitem__(self, index: int):
        s2, label = self.read(index)
        x = torch.from_numpy(np.ascontiguousarray(normalise(s2, self.normalisation).transpose(2, 0, 1)))
        if self.task == "lc":
            y = torch.from_numpy(worldcover_to_class(label[..., 0]))
        else:
            y = torch.from_numpy(np.ascontiguousarray(label.transpose(2, 0, 1), dtype=np.float32))
        if self.augment:
            # torch's RNG is seeded per DataLoader worker, numpy's global one is not everywhere.
            k = int(torch.randint(0, 4, ()))
            flip = bool(torch.randint(0, 2, ()))
            x = torch.rot90(x, k, dims=(-2, -1))
            y = torch.rot90(y, k, dims=(-2, -1))
            if flip:
                x, y = x.flip(-1), y.flip(-1)
            x, y = x.contiguous(), y.contiguous()
        return {"image": x, "label": y}


def nshot_datasets(root: str | Path, task: str, n_shot: int, seed: int = DEFAULT_NSHOT_SEED,
                   val_ratio: float = VAL_RATIO, index_dir: str | Path | None = None,
                   normalisation: str = "reflectance", augment: bool = False,
                   published_index: str | Path | None = None) -> "BenchSplits":
    """Train (n-shot), validation and full test datasets for one task, with the index file and its sha256.

    published_index: a published selection (phileo-bench/indices/*.json, or their folder) to use instead of a
    drawn one (phileo.bench.published_nshot); it is converted, saved in index_dir and recorded like a drawn one."""
    if published_index:
        path, doc = save_published_selection(root, task, n_shot, published_index, index_dir)
    else:
        path, doc = load_or_create_nshot_index(root, task, n_shot, seed, val_ratio, index_dir)
    if not doc["val"]:
        raise BenchDataError(f"the n-shot index {path} has no validation patches (no *_val_s2.npy files with {task} "
                             f"labels in {root}); early stopping needs them")
    return BenchSplits(
        train=BenchDataset(root, task, doc["train"], normalisation, augment),
        val=BenchDataset(root, task, doc["val"], normalisation),
        test=BenchDataset.test_set(root, task, normalisation=normalisation),
        index_path=path, index_sha256=file_sha256(path), index=doc)


@dataclass
class BenchSplits:
    train: BenchDataset
    val: BenchDataset
    test: BenchDataset
    index_path: Path
    index_sha256: str
    index: dict[str, Any]


def main(argv: Sequence[str] | None = None) -> int:
    """python -m phileo.bench.data {scan,nshot} ROOT ...: what is in a bench folder; draw n-shot indices ahead."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m phileo.bench.data", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_scan = sub.add_parser("scan", help="count files and patches per task and split, list what is skipped")
    p_scan.add_argument("root", type=Path)
    p_nshot = sub.add_parser("nshot", help="draw and save the n-shot indices (once, before a sweep starts)")
    p_nshot.add_argument("root", type=Path)
    p_nshot.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p_nshot.add_argument("--n-shots", nargs="+", type=int, default=[50, 100, 500, 1000, 5000])
    p_nshot.add_argument("--seed", type=int, default=DEFAULT_NSHOT_SEED)
    p_nshot.add_argument("--val-ratio", type=float, default=VAL_RATIO)
    p_nshot.add_argument("--index-dir", type=Path, default=None, help="default: ROOT/nshot_indices")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "scan":
            for task in TASKS:
                for split in SPLITS:
                    scan = scan_bench_files(args.root, task, split)
                    print(f"{task:9s} {split:5s} {len(scan.files):5d} files {scan.n_patches:8d} patches"
                          + (f"  ({len(scan.skipped)} skipped: {scan.skipped[0]['reason']} ...)" if scan.skipped
                             else ""))
        else:
            for task in args.tasks:
                for n in args.n_shots:
                    path, doc = load_or_create_nshot_index(args.root, task, n, args.seed, args.val_ratio,
                                                           args.index_dir)
                    short = {b: e["train"]["selected"] for b, e in doc["buckets"].items()
                             if "train" in e and e["train"]["selected"] < n}
                    print(f"{path}: {len(doc['train'])} train, {len(doc['val'])} val"
                          + (f"; buckets with fewer than {n}: {short}" if short else ""))
    except BenchDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "BANDS", "TASKS", "REGRESSION_TASKS", "REGIONS", "REGION_BUCKETS", "WORLDCOVER_CODES", "WORLDCOVER_NAMES",
    "NUM_LC_CLASSES", "IGNORE_INDEX", "BAND_MEAN", "BAND_STD", "NORMALISATIONS", "DEFAULT_NSHOT_SEED",
    "BenchDataError", "BenchFile", "BenchScan", "BenchDataset", "BenchSplits", "worldcover_to_class",
    "scan_bench_files", "select_nshot", "load_or_create_nshot_index", "nshot_index_path", "nshot_datasets",
    "save_published_selection",
    "file_sha256", "normalise", "parse_s2_name", "label_name",
]

if __name__ == "__main__":
    raise SystemExit(main())
