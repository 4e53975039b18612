"""Site profiles, preflight checks and SLURM job generation: what jobs/launch_*.py are made of.

    sites       SiteProfile, load_site("leonardo" | path): a cluster's facts and defaults (slurm/sites/*.yaml)
    resources   JobResources, resolve_resources(site, nodes=..., ...), parse_time_min, parse_mem_mb
    preflight   preflight(site, resources, run_dir=..., data_root=..., count_chunks=...) -> PreflightReport
    scripts     slurm_parameters(...), render_sbatch(...): the batch script submitit writes (and --dry-run prints)
    submit      make_plan / submit / submit_array / wait_for / read_task_result: the cluster as a parameter
    jobs        TrainingJob(kind, payload): the one submitit Checkpointable (kinds: JOB_KINDS), requeue on preemption
    arrays      split_for_arrays, site_max_array_size: job arrays within MaxArraySize
    slurm       job_active, wait_for_submitit_job, sbatch, scontrol_config_value: SLURM command-line helpers
    pretrain, preprocess, finetune, cli: the launchers' command lines (jobs/ calls their main()).

Nothing here imports torch: launchers stay quick on a login node.
"""
