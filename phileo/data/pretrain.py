"""PretrainDataset: 128 px training patches from the converter's HDF5 chunk files, one node's share at a time.

On disk (schema 2, documented in phileo.data.chunk_format; schema 1 sets read without auxiliary targets): each chunk file holds N cells with `bands_10m` uint16
(N, 4, 1068, 1068), `bands_20m` uint16 (N, 6, 534, 534), `cloud_mask` uint8 (N, 1068, 1068),
`nodata_count_20m` uint8 (N, 534, 534) and per-cell metadata under `cells/` (grid_cell, product_id, timestamp,
crs, geotransform, …). A patch reads only its window: 4 × 128² px at 10 m, 6 × 66² px at 20 m (64 plus a
one-pixel margin, so the bilinear upsampling equals that of the whole band), 128² px of the mask, and 64² px of
each auxiliary dataset (aux/buildings_20m, aux/landcover_20m) the set holds.
"""

from __future__ import annotations

import os
import resource
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from phileo.data import aux_targets, geo, integrity
from phileo.data import chunk_format as fmt
from phileo.data.chunk_format import ChunkReadError, grid_offsets, valid_offsets_map
from phileo.data.majortom import BANDS_10M, BANDS_20M, CELL_SIZE_PX, PHILEO_BANDS
from phileo.data.manifest import ChunkInfo, Manifest, assign_chunks, load_manifest
from phileo.fsutil import open_h5_read

try:  # a torch Dataset when torch is there (it always is for training); plain object otherwise
    from torch.utils.data import Dataset as _Base
except ImportError:  # pragma: no cover
    _Base = object


def upsample2_bilinear(a: np.ndarray) -> np.ndarray:
    """×2 bilinear upsampling of the last two axes with half-pixel centres and edge clamping: the same values
    as torch.nn.functional.interpolate(scale_factor=2, mode='bilinear', align_corners=False), in float32."""
    a = np.asarray(a, dtype=np.float32)
    edge = [(0, 0)] * (a.ndim - 2) + [(1, 1), (1, 1)]
    return _upsample_interior(np.pad(a, edge, mode="edge"))


def _upsample_interior(w: np.ndarray) -> np.ndarray:
    """×2 bilinear upsampling of the interior of `w` (..., h+2, w+2), whose one-pixel border is context only:
    returns float32 (..., 2h, 2w). Output pixel 2i sits a quarter pixel before input i, 2i+1 a quarter after."""
    w = np.asarray(w, dtype=np.float32)
    *lead, hh, ww = w.shape
    h, v = hh - 2, ww - 2
    rows = np.empty((*lead, 2 * h, ww), np.float32)
    centre = 0.75 * w[..., 1:-1, :]
    np.add(centre, 0.25 * w[..., :-2, :], out=rows[..., 0::2, :])
    np.add(centre, 0.25 * w[..., 2:, :], out=rows[..., 1::2, :])
    out = np.empty((*lead, 2 * h, 2 * v), np.float32)
    centre = 0.75 * rows[..., 1:-1]
    np.add(centre, 0.25 * rows[..., :-2], out=out[..., 0::2])
    np.add(centre, 0.25 * rows[..., 2:], out=out[..., 1::2])
    return out


class PretrainDataset(_Base):
    """Training patches of the cells a node reads, from a converted MajorTOM set.

    Takes the converter's output folder `root` (with manifest.json), this node's `node_rank` among
    `num_nodes` (it reads only the chunks `assign_chunks(manifest, num_nodes)[node_rank]`), `patch_size`
    (even, at most 1068), `random_crop` and `seed`.

    random_crop=True: one item per cell; each access draws one crop at an even (20 m-aligned) offset among
    the offsets whose no-data fraction is at most the manifest's `max_patch_nodata`, from a numpy Generator
    seeded by (seed, epoch, index), so the crop is a pure function of those (see `set_epoch`).
    random_crop=False: one item per valid patch of a fixed non-overlapping grid (offsets 0, p, 2p, …).

    Items: `image` float32 (10, p, p) reflectance / 10000 in B02 B03 B04 B08 B05 B06 B07 B8A B11 B12 order
    (20 m bands bilinearly upsampled); `coords` float32 (4,) sin/cos encoding of the patch centre; `lat`,
    `lon` (float, degrees) of the patch centre from the cell's CRS and geotransform; `cloud_fraction` float32
    (4,) of mask classes 0-3 in the patch; `grid_cell`, `product_id` (str); `window` int64 (2,) =
    (row_off, col_off) in 10 m pixels; the auxiliary targets (phileo.data.aux_targets, the published
    semantics) `buildings` float32 (building percent mean / 100), `buildings_weight` float32 (1 when the patch
    lies within the buildings raster, else 0), `landcover` float32 (11,) (class fractions over the non-zero
    pixels), `landcover_weight` float32 (their fraction; 0 when none): every weight 0 in chunks converted
    without --aux-buildings / --aux-landcover (schema 1 sets included). `aux_targets` names the targets some
    chunk of this node holds. Collatable by torch's default collate.

    h5py files are opened lazily in whichever process reads (DataLoader workers included), at most
    `max_open_files` at a time, and closed by `close()`. Refuses: a missing/invalid manifest, node_rank out
    of range, more nodes than chunks, a set converted without the 10 PhilEO bands, an odd patch size.

    Damaged chunks: `exclude_chunks` (chunk indices, e.g. those the trainer's start-up verification found bad)
    are left out of this node's share, which is still `assign_chunks` of the full list, so other nodes' shares
    do not move (`excluded_chunks` lists this node's); refused when that leaves the node nothing. `verify=True`
    first checks this node's chunks against the manifest (size, checksum) and raises BadChunkError naming the
    bad ones (the trainer does this instead, spread over all ranks: phileo.train.pretrain). An HDF5 error while
    reading a cell, here or in __getitem__, is raised as ChunkReadError naming the chunk file, the cell and
    the fix.
    """

    def __init__(self, root: str | os.PathLike, node_rank: int = 0, num_nodes: int = 1, patch_size: int = 128,
                 random_crop: bool = True, seed: int = 0, *, max_open_files: int | None = None,
                 exclude_chunks: Iterable[int] = (), verify: bool = False):
        import hdf5plugin  # noqa: F401  (registers the Blosc filter the chunks are compressed with)

        # Per-process state first: HDF5 handles (opened lazily), h5py dataset objects, valid-offset lists.
        self._files: OrderedDict[int, Any] = OrderedDict()
        self._dsets: dict[int, tuple] = {}
        self._valid_cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._pid = os.getpid()
        self.root = Path(root)
        self.manifest: Manifest = load_manifest(self.root)
        m = self.manifest
        if not 0 <= node_rank < num_nodes:
            raise ValueError(f"node_rank must be in [0, num_nodes={num_nodes}), got {node_rank}")
        missing = [b for b in PHILEO_BANDS if b not in m.bands_10m + m.bands_20m]
        if missing or m.bands_10m[:4] != list(BANDS_10M) or m.bands_20m[:6] != list(BANDS_20M):
            raise ValueError(f"{self.root / fmt.MANIFEST_NAME} stores bands {m.bands}, but pretraining needs "
                             f"{' '.join(PHILEO_BANDS)} (missing: {missing or 'none'}); re-convert without --bands "
                             f"or with all ten")
        if patch_size % 2 or not 2 <= patch_size <= CELL_SIZE_PX[10]:
            raise ValueError(f"patch_size must be even (20 m-aligned) and at most {CELL_SIZE_PX[10]}, "
                             f"got {patch_size}")
        self.node_rank, self.num_nodes = node_rank, num_nodes
        self.patch_size, self.random_crop, self.seed = patch_size, random_crop, seed
        self.epoch = 0
        self.max_patch_nodata = m.max_patch_nodata
        assigned = assign_chunks(m, num_nodes)[node_rank]
        excluded = {int(i) for i in exclude_chunks}
        unknown = sorted(excluded - {c.index for c in m.chunks})
        if unknown:
            raise ValueError(f"exclude_chunks {unknown}: {self.root / fmt.MANIFEST_NAME} has no such chunk index")
        self.excluded_chunks: list[ChunkInfo] = [c for c in assigned if c.index in excluded]
        self.chunks: list[ChunkInfo] = [c for c in assigned if c.index not in excluded]
        if not self.chunks:
            raise ValueError(f"node {node_rank} of {num_nodes} has no chunk left to read in {self.root}: all of its "
                             f"{len(assigned)} chunk(s) are excluded as bad. Re-convert them (python "
                             f"preprocess/majortom_to_h5.py --verify --out {self.root} names them) or train on "
                             f"fewer nodes")
        if verify:
            bad = integrity.find_bad_chunks(m, self.chunks)
            if bad:
                raise integrity.bad_chunk_error(m, bad, training=False)
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.max_open_files = max_open_files or max(4, min(len(self.chunks), (soft if soft > 0 else 1024) // 4))

        # Per-cell metadata of this node, in compact arrays (cheap to copy into DataLoader workers).
        chunk_of, row_of, gt, nodata, grid = [], [], [], [], []
        self._chunk_aux: list[tuple[str, ...]] = []  # the auxiliary targets each chunk holds
        grid_cells, product_ids, crs_idx = [], [], []
        self._crs_table: list[str] = []
        crs_lookup: dict[str, int] = {}
        same_patch = patch_size == m.patch_size
        for k, c in enumerate(self.chunks):
            try:
                f = open_h5_read(m.chunk_path(c))
            except OSError as e:
                raise integrity.chunk_read_error(m, c, e) from e
            with f:
                n = f[fmt.GRID_CELL].shape[0]
                if n != c.n_cells:
                    raise ValueError(f"{m.chunk_path(c)} holds {n} cells but the manifest says {c.n_cells}: the "
                                     f"file was replaced after the merge; re-run the converter with --merge")
                self._chunk_aux.append(tuple(t for t, name in fmt.AUX_DATASETS.items() if name in f))
                chunk_of.append(np.full(n, k, np.int32))
                row_of.append(np.arange(n, dtype=np.int32))
                try:
                    gt.append(f[fmt.GEOTRANSFORM][...])
                    nodata.append(f[fmt.NODATA_FRACTION][...])
                    grid_cells += [s.decode() if isinstance(s, bytes) else s for s in f[fmt.GRID_CELL][...]]
                    product_ids += [s.decode() if isinstance(s, bytes) else s for s in f[fmt.PRODUCT_ID][...]]
                    for s in f[fmt.CRS][...]:
                        s = s.decode() if isinstance(s, bytes) else s
                        crs_idx.append(crs_lookup.setdefault(s, len(crs_lookup)))
                    # Valid grid patches: precomputed by the converter for its patch size, else derived here.
                    grid.append(f[fmt.GRID_VALID][...].astype(bool) if same_patch
                                else self._grid_from_counts(f, nodata[-1]))
                except OSError as e:  # h5py's error for an HDF5 or filter failure: name the file and the fix
                    raise integrity.chunk_read_error(m, c, e) from e
        self.aux_targets = frozenset(t for ts in self._chunk_aux for t in ts)
        self._crs_table = [s for s, _ in sorted(crs_lookup.items(), key=lambda kv: kv[1])]
        self._chunk_of = np.concatenate(chunk_of) if chunk_of else np.zeros(0, np.int32)
        self._row_of = np.concatenate(row_of) if row_of else np.zeros(0, np.int32)
        self._geotransform = np.concatenate(gt) if gt else np.zeros((0, 6))
        self._nodata = np.concatenate(nodata) if nodata else np.zeros(0, np.float32)
        self._grid_cell = np.array(grid_cells, dtype=np.str_)
        self._product_id = np.array(product_ids, dtype=np.str_)
        self._crs = np.array(crs_idx, dtype=np.int32)
        n_pos = (CELL_SIZE_PX[10] - patch_size) // 2 + 1
        self._n_pos = n_pos
        grid_all = np.concatenate(grid) if grid else np.zeros((0, 1, 1), bool)
        if random_crop:
            servable = np.ones(len(self._nodata), bool)
            if not same_patch:
                # Cells without a servable patch at this size are left out now rather than failing later.
                for i in np.flatnonzero(self._nodata > 0):
                    servable[i] = self._valid_index(int(i)).size > 0
            self._items = np.flatnonzero(servable).astype(np.int64)
        else:
            g = grid_offsets(patch_size)
            cell, gi, gj = np.nonzero(grid_all)
            self._items = np.stack([cell, g[gi], g[gj]], axis=1).astype(np.int64) if cell.size else \
                np.zeros((0, 3), np.int64)
        self.close()  # hold no file handle until the first item is read (in whichever process reads it)

    # ------------------------------------------------------------------------------------------ bookkeeping
    def __len__(self) -> int:
        return int(len(self._items))

    @property
    def num_cells(self) -> int:
        """Cells this node reads."""
        return int(len(self._nodata))

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch the random crops are drawn for (crop of item i = f(seed, epoch, i))."""
        self.epoch = int(epoch)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()  # h5py handles do not pickle; each process opens its own
        state["_dsets"] = {}
        state["_valid_cache"] = OrderedDict()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pid = os.getpid()

    def close(self) -> None:
        """Closes every HDF5 file this process opened."""
        files, self._files = getattr(self, "_files", {}), OrderedDict()
        self._dsets = {}
        if getattr(self, "_pid", None) == os.getpid():
            for f in files.values():
                try:
                    f.close()
                except Exception:
                    pass

    def __del__(self):
        self.close()

    def _file(self, k: int):
        import hdf5plugin  # noqa: F401

        if self._pid != os.getpid():
            # Forked into a worker: the parent's handles belong to the parent; start afresh.
            self._files = OrderedDict()
            self._dsets = {}
            self._valid_cache = OrderedDict()
            self._pid = os.getpid()
        f = self._files.get(k)
        if f is None:
            # Random crops rarely touch a chunk twice: a small chunk cache keeps memory per open file low.
            f = open_h5_read(self.manifest.chunk_path(self.chunks[k]), rdcc_nbytes=1 << 20)
            self._files[k] = f
            while len(self._files) > self.max_open_files:
                old_k, old = self._files.popitem(last=False)
                self._dsets.pop(old_k, None)
                old.close()
        else:
            self._files.move_to_end(k)
        return f

    def _datasets(self, k: int):
        """(bands_10m, bands_20m, cloud_mask, {aux target: dataset}) of chunk k; h5py objects cached with the
        open file."""
        f = self._file(k)
        ds = self._dsets.get(k)
        if ds is None:  # entries leave together with their file (see _file)
            ds = (f[fmt.BANDS[10]], f[fmt.BANDS[20]], f[fmt.CLOUD_MASK],
                  {t: f[fmt.AUX_DATASETS[t]] for t in self._chunk_aux[k]})
            self._dsets[k] = ds
        return ds

    def _grid_from_counts(self, f, nodata: np.ndarray) -> np.ndarray:
        g = len(grid_offsets(self.patch_size))
        out = np.ones((len(nodata), g, g), bool)
        for i in np.flatnonzero(nodata > 0):
            vmap = valid_offsets_map(f[fmt.NODATA_COUNT_20M][i], self.patch_size, self.max_patch_nodata)
            out[i] = vmap[np.ix_(grid_offsets(self.patch_size) // 2, grid_offsets(self.patch_size) // 2)]
        return out

    def _valid_index(self, cell: int) -> np.ndarray:
        """Flat indices (i·P + j) of the valid even offsets of a cell that has no-data (cached per process)."""
        hit = self._valid_cache.get(cell)
        if hit is not None:
            self._valid_cache.move_to_end(cell)
            return hit
        f = self._file(int(self._chunk_of[cell]))
        count = f[fmt.NODATA_COUNT_20M][int(self._row_of[cell])]
        vmap = valid_offsets_map(count, self.patch_size, self.max_patch_nodata)
        idx = np.flatnonzero(vmap).astype(np.int32)
        self._valid_cache[cell] = idx
        while len(self._valid_cache) > 64:
            self._valid_cache.popitem(last=False)
        return idx

    def crop_offset(self, index: int) -> tuple[int, int, int]:
        """(cell, row_off, col_off) item `index` reads in the current epoch (no pixel is read for full cells)."""
        if not 0 <= index < len(self._items):
            raise IndexError(f"index {index} out of range for {len(self._items)} items")
        if not self.random_crop:
            cell, r, c = self._items[index]
            return int(cell), int(r), int(c)
        cell = int(self._items[index])
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self._nodata[cell] <= 0:
            i, j = rng.integers(self._n_pos, size=2)
        else:
            valid = self._valid_index(cell)
            k = int(valid[rng.integers(valid.size)])
            i, j = divmod(k, self._n_pos)
        return cell, 2 * int(i), 2 * int(j)

    # ------------------------------------------------------------------------------------------ reading
    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return self._read_item(int(index))
        except ChunkReadError:
            raise
        except OSError as e:  # h5py's error for any HDF5 or filter failure; the try costs nothing until it fires
            raise self._read_error(int(index), e) from e

    def _read_error(self, index: int, error: OSError) -> ChunkReadError:
        """The ChunkReadError of item `index` (no pixel is read: its cell comes from the item table)."""
        cell = int(self._items[index] if self.random_crop else self._items[index][0])
        chunk = self.chunks[int(self._chunk_of[cell])]
        return integrity.chunk_read_error(self.manifest, chunk, error, str(self._grid_cell[cell]),
                                          int(self._row_of[cell]))

    def _read_item(self, index: int) -> dict[str, Any]:
        cell, r, c = self.crop_offset(index)
        p = self.patch_size
        d10, d20, dmask, daux = self._datasets(int(self._chunk_of[cell]))
        row = int(self._row_of[cell])
        b10 = d10[row, :4, r:r + p, c:c + p]
        # 20 m window with a one-pixel margin (edge-replicated at the cell border, as whole-band upsampling
        # clamps), so upsampling the window gives exactly the crop of the upsampled band.
        n20, h = CELL_SIZE_PX[20], p // 2
        r2, c2 = r // 2, c // 2
        lo_r, hi_r = max(r2 - 1, 0), min(r2 + h + 1, n20)
        lo_c, hi_c = max(c2 - 1, 0), min(c2 + h + 1, n20)
        w20 = d20[row, :6, lo_r:hi_r, lo_c:hi_c]
        pad = ((0, 0), (lo_r - (r2 - 1), (r2 + h + 1) - hi_r), (lo_c - (c2 - 1), (c2 + h + 1) - hi_c))
        if any(a or b for a, b in pad):
            w20 = np.pad(w20, pad, mode="edge")
        image = np.empty((10, p, p), np.float32)
        scale = np.float32(fmt.REFLECTANCE_SCALE)
        np.divide(b10, scale, out=image[:4], casting="unsafe")
        np.divide(_upsample_interior(w20), scale, out=image[4:])
        mask = dmask[row, r:r + p, c:c + p]
        cloud = (np.bincount(mask.ravel(), minlength=4)[:4] / float(p * p)).astype(np.float32)
        lat, lon = geo.lat_lon_of_pixels(self._crs_table[self._crs[cell]], self._geotransform[cell],
                                         r + p / 2, c + p / 2)
        lat, lon = float(lat), float(lon)
        return {"image": image, "coords": geo.encode_coords(lat, lon), "lat": lat, "lon": lon,
                "cloud_fraction": cloud, "grid_cell": str(self._grid_cell[cell]),
                "product_id": str(self._product_id[cell]), "window": np.array([r, c], dtype=np.int64),
                **self._aux_items(daux, row, r2, c2, h)}

    @staticmethod
    def _aux_items(daux: dict[str, Any], row: int, r2: int, c2: int, h: int) -> dict[str, Any]:
        """The auxiliary target keys of a patch whose 20 m window is (r2, c2, h x h); weight 0 for a target its
        chunk does not hold."""
        out = aux_targets.no_targets()
        if "buildings" in daux:
            out["buildings"], out["buildings_weight"] = aux_targets.buildings_target(
                daux["buildings"][row, r2:r2 + h, c2:c2 + h])
        if "landcover" in daux:
            out["landcover"], out["landcover_weight"] = aux_targets.landcover_target(
                daux["landcover"][row, r2:r2 + h, c2:c2 + h])
        return out

    def __repr__(self) -> str:
        left_out = f" ({len(self.excluded_chunks)} bad chunk(s) left out)" if self.excluded_chunks else ""
        return (f"PretrainDataset({str(self.root)!r}, node {self.node_rank}/{self.num_nodes}: {len(self.chunks)} "
                f"chunks{left_out}, {self.num_cells} cells, {len(self)} items, patch {self.patch_size}, "
                f"random_crop={self.random_crop})")
