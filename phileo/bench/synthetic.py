"""Small synthetic PhilEO Bench data in the published file layout, for tests, demos and benchmarks.

Writes `{region}_{tile}_{split}_s2.npy` (N, S, S, 10) uint16 reflectance x10000 and the `_label_roads`,
`_label_building` (float32 densities 0-1) and `_label_lc` (uint8 WorldCover codes) files beside them, exactly as
phileo.bench.data reads them. Tiles that are multiples of 10 are test tiles (as in the published split); every
other tile has a train and a val file.

The labels are functions of the image, so fine-tuning can learn them: each pixel is a mixture of vegetation,
soil, water and built-up surfaces (smooth random fields); building density follows the built-up fraction, roads
are straight stripes through built-up areas, land cover is the dominant surface's WorldCover code. About a third
of the patches have no built-up surface at all, so the n-shot acceptance rule for roads/buildings has empty
patches to reject. Every array is a deterministic function of (seed, region, tile, split).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Iterable

import numpy as np

from phileo.bench.data import NUM_BANDS, REGIONS, label_name
from phileo.fsutil import atomic_path

# Reflectance x10000 in the bench band order B02 B03 B04 B08 B05 B06 B07 B8A B11 B12.
_SPECTRA = np.array([
    [400, 700, 400, 3500, 900, 2500, 3000, 3300, 1800, 900],          # vegetation
    [1200, 1500, 1800, 2500, 2000, 2300, 2500, 2700, 3200, 2800],     # bare soil
    [600, 500, 300, 150, 250, 200, 180, 160, 80, 50],                 # water
    [1800, 1900, 2000, 2200, 2100, 2150, 2200, 2250, 2600, 2400],     # built-up
], dtype=np.float32)
_ROAD_SPECTRUM = np.array([2400, 2450, 2500, 2550, 2500, 2500, 2550, 2550, 2700, 2650], np.float32)
# Dominant surface -> WorldCover code: tree cover, bare/sparse, permanent water, built-up.
_LC_CODES = np.array([10, 60, 80, 50], dtype=np.uint8)

# One region of each n-shot bucket (and two for europe), so every bucket has data.
DEFAULT_REGIONS = ("europe", "denmark-1", "east-africa", "nigeria", "north-america", "south-america", "japan")


def _smooth_field(rng: np.random.Generator, size: int, n_waves: int = 3) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    f = np.zeros((size, size), np.float32)
    for _ in range(n_waves):
        kx, ky = rng.uniform(-3, 3, size=2)
        f += np.cos(2 * np.pi * (kx * xx + ky * yy) + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    return f / n_waves


def make_patch(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """One synthetic patch: s2 (S, S, 10) uint16 and roads/building (S, S, 1) float32, lc (S, S, 1) uint8."""
    logits = np.stack([_smooth_field(rng, size) * 3 for _ in range(4)])
    built_up_strength = rng.choice([0.0, 0.0, 1.0, 2.0, 3.0])  # 2 of 5 patches have no built-up surface
    logits[3] = logits[3] + (built_up_strength - 1.5) * 2 if built_up_strength else -50.0
    frac = np.exp(logits - logits.max(0))
    frac /= frac.sum(0)
    building = np.clip((frac[3] - 0.3) / 0.7, 0, 1).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    period = int(rng.integers(6, 12))
    stripes = ((xx + int(rng.integers(0, period))) % period == 0) | ((yy + int(rng.integers(0, period))) % period == 0)
    roads = (stripes & (frac[3] > 0.25)).astype(np.float32)
    s2 = np.einsum("khw,kb->hwb", frac, _SPECTRA)
    s2 = np.where(roads[..., None] > 0, 0.3 * s2 + 0.7 * _ROAD_SPECTRUM, s2)
    s2 = s2 + rng.normal(0, 30, s2.shape)
    return {
        "s2": np.clip(s2, 0, 65535).astype(np.uint16),
        "roads": roads[..., None],
        "building": building[..., None],
        "lc": _LC_CODES[frac.argmax(0)][..., None],
    }


def make_bench_data(root: str | Path, regions: Iterable[str] = DEFAULT_REGIONS, train_tiles: int = 2,
                    test_tiles: int = 1, patches_per_file: int = 6, val_patches_per_file: int = 3,
                    patch_size: int = 32, seed: int = 0, roads_regions: Iterable[str] | None = None,
                    lc_nodata: bool = True) -> list[Path]:
    """Writes a small PhilEO Bench folder under `root`; returns the s2 files written (sorted).

    regions: PhilEO Bench region names; train_tiles/test_tiles: tiles per region (test tiles are numbered 0, 10,
    20 ..., train tiles 1, 2 ...; each train tile has a `train` and a `val` file); patches per file; patch_size S.
    roads_regions: regions that get road labels (default all but japan: roads exist only for some regions in
    the published set). lc_nodata: the first row of the first patch of each lc file is 0 (no data), which the
    reader maps to IGNORE_INDEX. Refuses unknown regions.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    regions = list(regions)
    unknown = [r for r in regions if r not in REGIONS]
    if unknown:
        raise ValueError(f"unknown PhilEO Bench region(s) {unknown}; valid: {', '.join(REGIONS)}")
    with_roads = set(r for r in regions if r != "japan") if roads_regions is None else set(roads_regions)
    written = []
    tiles = [(10 * t, "test", patches_per_file) for t in range(test_tiles)]
    for t in range(1, train_tiles + 1):
        tiles += [(t, "train", patches_per_file), (t, "val", val_patches_per_file)]
    for region in regions:
        for tile, split, n in tiles:
            rng = np.random.default_rng([seed, zlib.crc32(region.encode()), tile, zlib.crc32(split.encode())])
            patches = [make_patch(rng, patch_size) for _ in range(n)]
            arrays = {k: np.stack([p[k] for p in patches]) if patches else
                      np.zeros((0, patch_size, patch_size, NUM_BANDS if k == "s2" else 1),
                               np.uint16 if k == "s2" else np.float32)
                      for k in ("s2", "roads", "building", "lc")}
            if lc_nodata and n:
                arrays["lc"][0, 0, :, 0] = 0
            s2_name = f"{region}_{tile}_{split}_s2.npy"
            _save(root / s2_name, arrays["s2"])
            for task in ("building", "lc") + (("roads",) if region in with_roads else ()):
                _save(root / label_name(s2_name, task), arrays[task])
            written.append(root / s2_name)
    return sorted(written)


def _save(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path, fsync=False) as tmp:
        with open(tmp, "wb") as fh:  # np.save(path) would append ".npy" to the temporary name
            np.save(fh, arr)


__all__ = ["DEFAULT_REGIONS", "make_bench_data", "make_patch"]
