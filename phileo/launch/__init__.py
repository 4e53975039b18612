"""Site profiles, preflight checks and SLURM job generation: what jobs/launch_*.py are made of.

    sites       SiteProfile, load_site("leonardo" | path): a cluster's facts and defaults (slurm/sites/*.yaml);
                site.for_cpu_jobs(): its CPU partition
    resources   JobResources, resolve_resources(site, nodes=..., ...), parse_time_min, parse_mem_mb,
                job_cost(site, res, count): what a job or array may be billed
    preflight   preflight(site, resources, run_dir=..., data_root=..., list_chunks=..., live=...) -> PreflightReport
    scripts     slurm_parameters(...), render_sbatch(...): the batch script submitit writes (and --dry-run prints)
    submit      make_plan / submit / submit_array / wait_for / read_task_result: the cluster as a parameter
    jobs        TrainingJob(kind, payload): the one submitit Checkpointable (kinds: JOB_KINDS), requeue on preemption
    arrays      split_for_arrays, site_max_array_size: job arrays within MaxArraySize
    slurm       job_active, wait_for_submitit_job, sbatch, scontrol_config_value, cluster_name_here,
                partitions_here, user_accounts: SLURM command-line helpers
    pretrain, preprocess, finetune, cli: the launchers' command lines (jobs/ calls their main()).

Nothing here imports torch at import time; preflight's model check imports phileo.models (and torch) when it
runs, once per launch (~2 s), so names are checked against the registry the job will use.
"""
