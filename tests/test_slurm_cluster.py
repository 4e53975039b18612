"""The dev cluster is a real SLURM: multi-node jobs, job arrays and sbatch scripts behave as on a cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import cloudpickle

import pytest
import submitit

from phileo.launch.slurm import JobFailedError, job_active, sbatch, wait_for_job_id, wait_for_submitit_job

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

# The job's Python cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _rank_and_node():
    env = submitit.JobEnvironment()
    return env.global_rank, os.environ["SLURMD_NODENAME"], env.num_tasks


def _array_index():
    return int(os.environ["SLURM_ARRAY_TASK_ID"])


def _fail():
    raise SystemExit(3)


def test_two_node_job_returns_both_ranks_and_nodes(submitit_folder):
    ex = submitit.AutoExecutor(folder=submitit_folder, cluster="slurm")
    ex.update_parameters(nodes=2, tasks_per_node=1, cpus_per_task=1, timeout_min=5, slurm_partition="debug")
    job = ex.submit(_rank_and_node)
    results = wait_for_submitit_job(job, timeout_s=120)
    assert sorted(r[0] for r in results) == [0, 1]
    assert len({r[1] for r in results}) == 2, f"both tasks ran on one node: {results}"
    assert all(r[1].startswith("node") for r in results)
    assert all(r[2] == 2 for r in results)


def test_submitit_array_of_four_gets_distinct_indices(submitit_folder):
    ex = submitit.AutoExecutor(folder=submitit_folder, cluster="slurm")
    ex.update_parameters(timeout_min=5, cpus_per_task=1, slurm_partition="debug", slurm_array_parallelism=4)
    jobs = ex.map_array(lambda _: _array_index(), range(4))
    indices = sorted(wait_for_submitit_job(j, timeout_s=120)[0] for j in jobs)
    assert indices == [0, 1, 2, 3]


def test_sbatch_array_script_sees_task_id(tmp_path):
    script = tmp_path / "array.sh"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --array=0-2
        #SBATCH --output={tmp_path}/out_%a.txt
        echo "task=$SLURM_ARRAY_TASK_ID count=$SLURM_ARRAY_TASK_COUNT"
        """))
    job_id = sbatch(script)
    wait_for_job_id(job_id, timeout_s=120, poll_s=0.5)
    outs = sorted((tmp_path / f"out_{i}.txt").read_text().strip() for i in range(3))
    assert outs == [f"task={i} count=3" for i in range(3)]


def test_wait_reports_a_job_that_died_without_result(submitit_folder):
    ex = submitit.AutoExecutor(folder=submitit_folder, cluster="slurm")
    ex.update_parameters(timeout_min=5, slurm_partition="debug")
    # A job killed before writing its result: with no accounting, plain result() would wait forever.
    job = ex.submit(_fail)
    subprocess.run(["scancel", str(job.job_id)], check=True)
    with pytest.raises(JobFailedError, match=str(job.job_id)):
        wait_for_submitit_job(job, timeout_s=60, poll_s=0.5, grace_s=1)
    assert not job_active(job.job_id)
