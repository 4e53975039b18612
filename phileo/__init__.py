"""PhilEO HPC: pretrain and fine-tune PhilEO geospatial foundation models on SLURM clusters.

Subpackages:
    phileo.data    MajorTOM readers, the HDF5 shard format, PretrainDataset, PhilEO Bench data.
    phileo.models  PhilEO CNN / ViT / UPerNet, checkpoint-compatible with the published weights.
    phileo.train   The training engine (DDP, DeepSpeed ZeRO), losses, checkpoints, logging.
    phileo.launch  Site profiles, preflight checks and SLURM job generation used by jobs/.
"""

__version__ = "0.1.0"
