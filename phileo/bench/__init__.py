"""PhilEO Bench: the downstream evaluation of a pretrained PhilEO model, as a Task and recipe on the engine.

    phileo.bench.data        the PhilEO Bench folder layout, its reader, the n-shot protocol (buckets, selection)
    phileo.bench.synthetic   a small synthetic PhilEO Bench folder for the demo and the tests
    phileo.bench.metrics     segmentation / regression metrics as published (IoU, F1, MSE ...)
    phileo.bench.config      FinetuneConfig: the fine-tuning recipe (kept light: sweeps expand on a login node)
    phileo.bench.finetune    one fine-tuning run (roads, building, lc) on the training engine
    phileo.bench.sweep       a grid of fine-tuning runs as one SLURM job array
    phileo.bench.results     a sweep's results: CSV, Markdown table, plots, what failed or is missing
"""
