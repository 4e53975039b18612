"""MajorTOM readers, the HDF5 chunk format and its manifest, PretrainDataset, synthetic MajorTOM data.

    MajorTOMSource, CellError           read Core-S2L2A/FastTOM cells from parquet shards or the unpacked tree
    phileo.data.convert                 MajorTOM → HDF5 chunk files + manifest.json (preprocess/majortom_to_h5.py)
    load_manifest, assign_chunks        the manifest, and which node reads which chunk
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
