"""The on-disk format of a converted MajorTOM set: one home for every name, dtype and rule the converter writes
and PretrainDataset reads (schema 2, `FORMAT` "phileo-majortom-h5"; schema 1 sets still read, without auxiliary targets).

A converted folder OUT:

    plan.json, plan.parquet           which cell goes into which chunk (plan.json is written last: its
                                      presence means the plan is complete)
    chunks/chunk_NNNNN.h5             one HDF5 file of up to --cells-per-chunk cells (below)
    chunks/chunk_NNNNN.json           its sidecar: checksum, bytes, counts, rejected and skipped cells
    parts/task_TTTTT-of-NNNNN.json    the part manifest of one array task (the sidecars of its chunks)
    manifest.json                     the merged manifest (phileo.data.manifest): chunks, checksums, node
                                      assignment, band statistics, every rejected/skipped/duplicate cell

Every file is written under a temporary name and renamed when complete, so a visible file is a whole file.

A chunk file holds N cells along axis 0 of every dataset; pixels at native resolution, lossless:

    bands_10m         uint16 (N, B10, 1068, 1068)  tiles (1, B10, 89, 89)   reflectance x 10000, 0 = no-data
    bands_20m         uint16 (N, B20, 534, 534)    tiles (1, B20, 89, 89)   (only when a 20 m band is stored)
    bands_60m         uint16 (N, B60, 178, 178)    one tile a cell          (only with --bands B01/B09)
    cloud_mask        uint8  (N, 1068, 1068)       tiles (1, 178, 178)      MajorTOM classes 0-3
    nodata_count_20m  uint8  (N, 534, 534)         gzip, one tile a cell    no-data 10 m pixels per 20 m pixel
                                                   (0-4); never written (so all 0) for a cell without no-data
    aux/buildings_20m      float32 (N, 534, 534)  tiles (1, 89, 89)   building percent 0-100 (average resampling
                                                   of --aux-buildings onto the cell's 20 m grid); NaN outside the
                                                   raster's bounds. Only in sets converted with --aux-buildings
    aux/landcover_20m      uint8  (N, 534, 534)   tiles (1, 89, 89)   ESA WorldCover code (mode resampling of
                                                   --aux-landcover), 0 = no-data, 255 outside the raster's bounds.
                                                   Only in sets converted with --aux-landcover
    cells/grid_cell, cells/product_id, cells/timestamp, cells/crs, cells/source     utf-8 strings (N,)
    cells/geotransform     float64 (N, 6)    GDAL geotransform of the 10 m grid, in cells/crs
    cells/nodata_fraction  float32 (N,)      no-data fraction of the cell's 10 m pixels
    cells/cloud_fraction   float32 (N, 4)    fraction of the mask's classes 0-3
    cells/n_valid_offsets  int64 (N,)        servable even crop offsets at the converter's patch size
    cells/grid_valid       bool (N, G, G)    servable patches of the fixed grid, G = 1068 // patch_size
    stats/band_histogram   uint32 (bands, 65536)  exact value counts of a regular 1/8 sample (STATS_ROW_STRIDE_*),
                           value 0 excluded; attrs `bands` (JSON list, row order) and `sampling` (text)
    report                 utf-8 JSON {"rejected": [...], "skipped": [...]} (a dataset: may exceed 64 KiB)

    file attributes: format, schema_version, chunk_index, plan_fingerprint, bands_10m / bands_20m / bands_60m
    (JSON lists, the order of the band axis), patch_size, max_patch_nodata, compression; with auxiliary
    rasters aux_buildings / aux_landcover (the raster's path, as given)

Bands are in PhilEO order (10 m B02 B03 B04 B08, 20 m B05 B06 B07 B8A B11 B12). Compression is one of
`COMPRESSIONS` (lz4/zstd are Blosc through hdf5plugin: readers must import hdf5plugin).

What is checked, and where:
    manifest.json's format, schema_version and fields   phileo.data.manifest.load_manifest (refuses others)
    the stored bands, each chunk's cell count           PretrainDataset (a file replaced after the merge)
    each chunk's size against its task's record          merge
    plan_fingerprint and chunk_index of a finished chunk   the converter, before it reuses the chunk
    each chunk's size and whole-file checksum            phileo.data.integrity: at every training start, spread
      (crc32; sha256 in older sets) against the manifest   over the job's ranks (data.verify_chunks, BadChunkError,
                                                         data.on_bad_chunk), and by --verify
    every read of a cell (an HDF5 or filter error)       PretrainDataset (ChunkReadError, naming file and cell)

A patch is servable when at most max_patch_nodata of its pixels are no-data; `valid_offsets_map` derives
that from nodata_count_20m for any (even) patch size, so the reader and the writer apply the same rule.
Changing a name, dtype or rule here changes the format: bump SCHEMA_VERSION with it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from phileo.data.majortom import CELL_SIZE_PX
from phileo.fsutil import file_digest

FORMAT = "phileo-majortom-h5"
SCHEMA_VERSION = 2  # 2: optional aux/ datasets (auxiliary targets, issue 15); otherwise as 1
READABLE_SCHEMA_VERSIONS = (1, 2)  # a schema 1 set reads as one without auxiliary targets (weights 0)
PLAN_FORMAT = FORMAT + "-plan"
PART_FORMAT = FORMAT + "-part"

# ----------------------------------------------------------------------------------------- folder layout
MANIFEST_NAME = "manifest.json"
PLAN_JSON = "plan.json"
PLAN_CELLS = "plan.parquet"
CHUNKS_DIR = "chunks"
PARTS_DIR = "parts"
PART_GLOB = "task_*-of-*.json"


def chunk_name(index: int) -> str:
    """File name of chunk `index`: chunk_00017.h5."""
    return f"chunk_{index:05d}.h5"


def sidecar_name(index: int) -> str:
    """File name of the sidecar of chunk `index`: chunk_00017.json."""
    return f"chunk_{index:05d}.json"


def chunk_relpath(index: int) -> str:
    """Path of chunk `index` relative to OUT, as manifests record it: chunks/chunk_00017.h5."""
    return f"{CHUNKS_DIR}/{chunk_name(index)}"


def part_name(task_index: int, num_tasks: int) -> str:
    """File name of the part manifest of array task `task_index` of `num_tasks` (matches PART_GLOB)."""
    return f"task_{task_index:05d}-of-{num_tasks:05d}.json"


# ------------------------------------------------------------------------------------ HDF5 datasets, attrs
RESOLUTIONS_M = (10, 20, 60)
BANDS = {10: "bands_10m", 20: "bands_20m", 60: "bands_60m"}
CLOUD_MASK = "cloud_mask"
NODATA_COUNT_20M = "nodata_count_20m"
REPORT = "report"

CELLS = "cells"
GRID_CELL = f"{CELLS}/grid_cell"
PRODUCT_ID = f"{CELLS}/product_id"
TIMESTAMP = f"{CELLS}/timestamp"
CRS = f"{CELLS}/crs"
SOURCE = f"{CELLS}/source"
GEOTRANSFORM = f"{CELLS}/geotransform"
NODATA_FRACTION = f"{CELLS}/nodata_fraction"
CLOUD_FRACTION = f"{CELLS}/cloud_fraction"
N_VALID_OFFSETS = f"{CELLS}/n_valid_offsets"
GRID_VALID = f"{CELLS}/grid_valid"
CELL_STRINGS = (GRID_CELL, PRODUCT_ID, TIMESTAMP, CRS, SOURCE)  # utf-8 string datasets

AUX = "aux"
AUX_BUILDINGS = f"{AUX}/buildings_20m"
AUX_LANDCOVER = f"{AUX}/landcover_20m"
AUX_DATASETS = {"buildings": AUX_BUILDINGS, "landcover": AUX_LANDCOVER}  # auxiliary target → its dataset
ATTR_AUX = {"buildings": "aux_buildings", "landcover": "aux_landcover"}  # file attrs: the raster's path

STATS = "stats"
BAND_HISTOGRAM = f"{STATS}/band_histogram"
STATS_ATTR_BANDS = "bands"
STATS_ATTR_SAMPLING = "sampling"

ATTR_FORMAT = "format"
ATTR_SCHEMA_VERSION = "schema_version"
ATTR_CHUNK_INDEX = "chunk_index"
ATTR_PLAN_FINGERPRINT = "plan_fingerprint"
ATTR_BANDS = {10: "bands_10m", 20: "bands_20m", 60: "bands_60m"}  # JSON lists: the band axis of BANDS[res]
ATTR_PATCH_SIZE = "patch_size"
ATTR_MAX_PATCH_NODATA = "max_patch_nodata"
ATTR_COMPRESSION = "compression"

# ---------------------------------------------------------------------------------------------- dtypes
BAND_DTYPE = np.uint16
REFLECTANCE_SCALE = 10000  # stored value = reflectance x 10000 (Sentinel-2 L2A digital numbers)
CLOUD_MASK_DTYPE = np.uint8
NODATA_COUNT_DTYPE = np.uint8
CELL_DTYPES = {GEOTRANSFORM: np.float64, NODATA_FRACTION: np.float32, CLOUD_FRACTION: np.float32,
               N_VALID_OFFSETS: np.int64, GRID_VALID: bool}
AUX_DTYPES = {AUX_BUILDINGS: np.float32, AUX_LANDCOVER: np.uint8}
AUX_RESOLUTION_M = 20  # the cell's 20 m grid: crops sit on even 10 m offsets, so a patch covers whole pixels
BUILDINGS_OUTSIDE = np.float32(np.nan)  # stored where the 20 m pixel lies outside the buildings raster
LANDCOVER_OUTSIDE = 255  # stored where it lies outside the land-cover raster (WorldCover codes are 0-100)
HISTOGRAM_BINS = 65536  # one bin per uint16 value
HISTOGRAM_DTYPE = np.uint32  # enough per chunk: 256 cells x 1068 x 1068 px is 2.9e8 < 2^32

# ------------------------------------------------------------------------------- HDF5 tiles, compression
# HDF5 chunk shapes: one cell, all bands of a resolution, 89 px tiles. 89 divides 1068 and 534, so no tile is
# partial; a 128 px crop reads 4-9 tiles at 10 m and 1-4 at 20 m. Measured here against 64/32 px tiles: 40 %
# less CPU to write, ~10 % fewer patches/s to read (both far above their goals).
H5_TILE_10M = 89
H5_TILE_20M = 89
H5_TILE_MASK = 178
H5_TILE_AUX = 89  # like the 20 m bands: a 128 px patch reads 1-4 tiles of 64 x 64 px
# Histograms sample every 8th 10 m row and every 4th 20 m row (the same 80 m spacing): exact counts of a
# regular 1/8 sample, at a fraction of the cost of counting every pixel of every cell.
STATS_ROW_STRIDE_10M = 8
STATS_ROW_STRIDE_20M = 4
STATS_SAMPLING = (f"every {STATS_ROW_STRIDE_10M}th 10 m row, every {STATS_ROW_STRIDE_20M}th 20 m row, every "
                  f"60 m row; value 0 (no-data) excluded")

COMPRESSIONS = ("lz4", "zstd", "gzip", "none")


def h5_filter(compression: str) -> dict[str, Any]:
    """h5py create_dataset keywords of a lossless filter in COMPRESSIONS ({} for 'none')."""
    if compression == "none":
        return {}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    import hdf5plugin

    # Blosc with byte shuffle: uint16 reflectance compresses ~2x; level 1 is nearly as small as 5 and faster.
    cname = {"lz4": "lz4", "zstd": "zstd"}[compression]
    return dict(hdf5plugin.Blosc(cname=cname, clevel=1 if cname == "lz4" else 3, shuffle=hdf5plugin.Blosc.SHUFFLE))


# --------------------------------------------------------------------------------------------- checksums
CHECKSUM_ALGORITHM = "crc32"  # of the whole chunk file; older manifests recorded sha256 (still verified)
CHECKSUM_ALGORITHMS = ("crc32", "sha256")


def file_checksum(path: str | os.PathLike, algorithm: str = CHECKSUM_ALGORITHM) -> str:
    """'<algorithm>:<hex>' of the whole file, as manifests and sidecars record it.

    crc32 (the default) detects corruption and truncation at ~3.5 GB/s, 2.4x sha256 with SHA-NI: the converter
    checksums every chunk it writes. sha256 is still computed for manifests that recorded it. Refuses other
    algorithms (ValueError).
    """
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise ValueError(f"unknown checksum algorithm {algorithm!r} ({' or '.join(CHECKSUM_ALGORITHMS)})")
    return f"{algorithm}:{file_digest(path, algorithm)}"


def checksum_matches(path: str | os.PathLike, checksum: str) -> bool:
    """Whether the file's checksum, computed with the algorithm `checksum` names ('crc32:…', 'sha256:…'), is
    `checksum`. False for an unknown algorithm."""
    algorithm, _, _ = checksum.partition(":")
    try:
        return file_checksum(path, algorithm) == checksum
    except ValueError:
        return False


class BadChunkError(ValueError):
    """A chunk file is not what the manifest says (missing, another size, another checksum): its data cannot be
    trusted, and retrying the job cannot help. The message names each chunk file, the cells it holds and how to
    repair the set (phileo.data.integrity.bad_chunk_error writes it); `paths` are the chunks' paths as the
    manifest records them."""

    def __init__(self, message: str, paths: tuple[str, ...] = (), retryable: bool = False):
        super().__init__(message)
        self.paths = tuple(paths)
        # The same bytes fail again: no retry of the job (phileo.launch.failover). True when every chunk was only
        # unreadable (an I/O error, e.g. a file server failing over), which a later start may not meet.
        self.retryable = retryable

    def __reduce__(self):  # keeps `paths` across processes (DataLoader workers, object collectives)
        return type(self), (str(self), self.paths, self.retryable)


class ChunkReadError(OSError):
    """HDF5 could not read a cell of a chunk file (a filter failure, a truncated or unreadable file) although
    the file may have verified: an I/O fault that a retry may cure, or damage since the verification. The
    message names the chunk file, the cell (grid_cell and its row), the original error and the fix
    (phileo.data.integrity.chunk_read_error writes it); `path` is the chunk file."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path

    def __reduce__(self):
        return type(self), (str(self), self.path)


# ------------------------------------------------------------------ no-data counts and patch validity
def nodata_count_20m(b10: np.ndarray, b20: np.ndarray | None) -> np.ndarray | None:
    """No-data 10 m pixels (0 in any stored 10/20 m band) counted per 20 m pixel: uint8 (534, 534) in 0-4, or
    None when the cell has no zero at all (the common case, decided by a cheap min)."""
    if b10.min() > 0 and (b20 is None or b20.size == 0 or b20.min() > 0):
        return None
    n20 = CELL_SIZE_PX[20]
    nd10 = (b10 == 0).any(axis=0)
    count = nd10.reshape(n20, 2, n20, 2).sum(axis=(1, 3), dtype=NODATA_COUNT_DTYPE)
    if b20 is not None and b20.size:
        count[(b20 == 0).any(axis=0)] = 4
    return count


def valid_offsets_map(count20: np.ndarray | None, patch_size: int, max_nodata: float) -> np.ndarray | None:
    """bool (P, P) over even crop offsets (row_off = 2·i, col_off = 2·j): True where the patch_size crop has at
    most max_nodata of its pixels no-data. None when the cell has no no-data (every offset valid)."""
    if count20 is None:
        return None
    half = patch_size // 2
    ii = np.zeros((count20.shape[0] + 1, count20.shape[1] + 1), dtype=np.int64)
    np.cumsum(np.cumsum(count20, axis=0, dtype=np.int64), axis=1, out=ii[1:, 1:])
    sums = ii[half:, half:] - ii[:-half, half:] - ii[half:, :-half] + ii[:-half, :-half]
    return sums <= max_nodata * patch_size * patch_size


def grid_offsets(patch_size: int) -> np.ndarray:
    """Row (= column) offsets of the fixed non-overlapping patch grid in a cell: 0, p, 2p, … (all even)."""
    return np.arange(CELL_SIZE_PX[10] // patch_size) * patch_size


def grid_valid(valid_map: np.ndarray | None, patch_size: int) -> np.ndarray:
    """bool (G, G): which grid patches (see grid_offsets) are servable."""
    g = grid_offsets(patch_size) // 2
    if valid_map is None:
        return np.ones((len(g), len(g)), dtype=bool)
    return valid_map[np.ix_(g, g)]
