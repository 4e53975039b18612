"""PhilEO HPC: pretrain and fine-tune PhilEO geospatial foundation models on SLURM clusters.

Subpackages:
    phileo.data    MajorTOM readers, the converter, the HDF5 chunk format (chunk_format), PretrainDataset.
    phileo.models  PhilEO CNN / ViT / UPerNet, checkpoint-compatible with the published weights.
    phileo.train   The training engine (DDP, DeepSpeed ZeRO), losses, checkpoints, logging.
    phileo.bench   PhilEO Bench: data, the n-shot protocol, metrics, fine-tuning, sweeps, results.
    phileo.launch  Site profiles, preflight checks and SLURM job generation used by jobs/.
See docs/ARCHITECTURE.md for the map.
"""

__version__ = "0.1.0"
