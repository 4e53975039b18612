"""MajorTOM readers, the HDF5 chunk format and its manifest, PretrainDataset, synthetic MajorTOM data.

The data's path, in import order: majortom (read a cell) → plan (which cells go into which chunk) → convert
(write the chunk files) → merge (the manifest) → pretrain (read patches); all of them take names, dtypes and
checks from chunk_format, and the reader imports no part of the writer.

    MajorTOMSource, CellError           read Core-S2L2A/FastTOM cells from parquet shards or the unpacked tree
    phileo.data.chunk_format            the on-disk format: file, dataset and attribute names, dtypes, checksums
    phileo.data.plan                    ConvertConfig and the plan (OUT/plan.json + plan.parquet)
    phileo.data.convert                 planned cells → HDF5 chunk files (convert_task; convert runs every step)
    phileo.data.merge                   the array tasks' part manifests → OUT/manifest.json
    phileo.data.cli                     the converter's command line (preprocess/majortom_to_h5.py)
    load_manifest, assign_chunks        the manifest, and which node reads which chunk
    phileo.data.integrity               chunk files vs the manifest: verification, BadChunkError / ChunkReadError
                                        messages, the commands that repair a chunk
    PretrainDataset                     training patches of one node's chunks (imports torch on first use)
"""

from phileo.data.majortom import CellError, MajorTOMSource, PHILEO_BANDS
from phileo.data.manifest import ChunkInfo, Manifest, assign_chunks, load_manifest

__all__ = ["CellError", "MajorTOMSource", "PHILEO_BANDS", "ChunkInfo", "Manifest", "assign_chunks",
           "load_manifest", "PretrainDataset"]


def __getattr__(name):
    # Lazy: the converter's worker processes import phileo.data without paying for torch.
    if name == "PretrainDataset":
        from phileo.data.pretrain import PretrainDataset
        return PretrainDataset
    raise AttributeError(f"module 'phileo.data' has no attribute {name!r}")
