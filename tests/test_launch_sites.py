"""Site profiles, resource resolution and preflight: what is refused before anything reaches the queue."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from phileo.config import ConfigError
from phileo.launch.preflight import PreflightError, check_chunk_files, check_data, check_run_dir, preflight
from phileo.launch.resources import job_cost, parse_mem_mb, parse_time_min, resolve_resources
from phileo.launch.sites import available_sites, format_minutes, load_site


@pytest.fixture(scope="module")
def leonardo():
    return load_site("leonardo")


def test_shipped_profiles_load_and_describe_their_nodes(leonardo):
    assert {"leonardo", "local"} <= set(available_sites())
    assert leonardo.partition == "boost_usr_prod" and leonardo.account_required
    assert (leonardo.node.gpus, leonardo.node.cpus) == (4, 32)
    assert leonardo.env["NCCL_IB_HCA"] == "mlx5" and leonardo.env["HF_HUB_OFFLINE"] == "1"
    assert any("cineca-ai" in line for line in leonardo.setup)
    assert leonardo.find_qos("boost_qos_dbg").max_nodes == 2
    local = load_site("local")
    assert local.partition == "debug" and local.node.gpus == 0 and local.max_nodes == 4


def test_profile_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\npartiton: x\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*partiton.*Did you mean 'partition'"):
        load_site(bad)
    bad.write_text("name: bad\nenv: {X: 'a`rm -rf`'}\n")
    with pytest.raises(ConfigError, match="backtick"):
        load_site(bad)
    bad.write_text("name: bad\nqos: [{name: q, max_nodes: 1, min_nodes: 4}]\n")
    with pytest.raises(ConfigError, match="max_nodes 1 < min_nodes 4"):
        load_site(bad)
    with pytest.raises(ConfigError, match="known sites: .*leonardo"):
        load_site("no_such_site")


@pytest.mark.parametrize("text,minutes", [("90", 90), ("30:00", 30), ("24:00:00", 1440), ("1-00:00:00", 1440),
                                          ("4-00", 5760), ("2-12:30", 3630), ("00:00:30", 1), (45, 45)])
def test_slurm_time_syntax(text, minutes):
    assert parse_time_min(text) == minutes


@pytest.mark.parametrize("text", ["", "1h", "1:2:3:4", "0", "-5"])
def test_bad_times_are_refused(text):
    with pytest.raises(ConfigError, match="--time"):
        parse_time_min(text)


def test_memory_syntax():
    assert parse_mem_mb("494000M") == 494000
    assert parse_mem_mb("64G") == 65536 and parse_mem_mb("64GB") == 65536
    assert parse_mem_mb("2000") == 2000 and parse_mem_mb("1T") == 1024 * 1024
    with pytest.raises(ConfigError, match="--mem"):
        parse_mem_mb("lots")


def test_format_minutes_round_trips():
    for m in (30, 1440, 5760, 61, 3630):
        assert parse_time_min(format_minutes(m)) == m


def test_leonardo_defaults_fill_a_16_node_request(leonardo):
    res = resolve_resources(leonardo, nodes=16, account="proj")
    assert (res.nodes, res.tasks_per_node, res.gpus_per_node, res.cpus_per_task) == (16, 4, 4, 8)
    assert res.time_min == 24 * 60 and res.qos == "normal" and res.partition == "boost_usr_prod"
    assert res.node_hours == 16 * 24 and res.gpu_hours == 16 * 24 * 4
    assert res.mem == "494000M"  # all four GPUs: the whole node's memory
    report = preflight(leonardo, res)
    assert report.ok, report.problems
    assert any("384 node-hours" in n and "1536 GPU-hours" in n for n in report.notes)
    one_gpu = resolve_resources(leonardo, gpus_per_node=1, account="proj")
    assert (one_gpu.tasks_per_node, one_gpu.cpus_per_task, one_gpu.mem) == (1, 8, "123500M")


def test_account_comes_from_the_environment_when_not_given(leonardo, monkeypatch):
    monkeypatch.setenv("SBATCH_ACCOUNT", "from_env")
    assert resolve_resources(leonardo).account == "from_env"
    monkeypatch.delenv("SBATCH_ACCOUNT")
    report = preflight(leonardo, resolve_resources(leonardo))
    assert any("needs an account" in p and "--account" in p for p in report.problems)


def test_over_limit_requests_are_refused_with_what_to_change(leonardo):
    # 16 nodes on the debug QOS: too many nodes, too long; the message names a QOS that fits.
    res = resolve_resources(leonardo, nodes=16, account="p", qos="boost_qos_dbg")
    problems = preflight(leonardo, res).problems
    assert len(problems) == 1
    assert "16 nodes" in problems[0] and "boost_qos_dbg" in problems[0] and "--qos normal" in problems[0]
    # 300 nodes: no QOS admits it.
    res = resolve_resources(leonardo, nodes=300, account="p", qos="boost_qos_bprod")
    (p,) = preflight(leonardo, res).problems
    assert "300 nodes" in p and "lower --nodes" in p
    # bprod is for 65 nodes and more: 16 is below its minimum.
    (p,) = preflight(leonardo, resolve_resources(leonardo, nodes=16, account="p", qos="boost_qos_bprod")).problems
    assert "boost_qos_bprod (65-256 nodes" in p and "--qos normal" in p
    # Five GPUs on a four-GPU node, too many cores, too much memory, unknown QOS: all reported at once.
    res = resolve_resources(leonardo, nodes=2, gpus_per_node=5, cpus_per_task=8, mem="600G", account="p",
                            qos="fast")
    problems = preflight(leonardo, res).problems
    text = "\n".join(problems)
    assert "--gpus-per-node 5" in text and "has 4 A100-64GB" in text
    assert "40 cores" in text and "--cpus-per-task 6" in text
    assert "--mem 600G" in text and "494000 MB" in text
    assert "--qos fast is not a QOS" in text
    with pytest.raises(PreflightError, match="--gpus-per-node 5"):
        preflight(leonardo, res).raise_if_failed()


def test_dev_cluster_limits():
    local = load_site("local")
    (p,) = preflight(local, resolve_resources(local, nodes=5)).problems
    assert "--nodes 5" in p and "4 nodes" in p
    # CPU-only site: --gpus-per-node counts CPU tasks and no GPU is requested.
    res = resolve_resources(local, nodes=2, gpus_per_node=2)
    assert (res.tasks_per_node, res.gpus_per_node, res.cpus_per_task) == (2, 0, 1)
    (p,) = preflight(local, resolve_resources(local, gpus_per_node=2, cpus_per_task=2)).problems
    assert "4 cores" in p and "node has 2" in p


def test_signal_must_come_after_the_job_starts():
    local = load_site("local")
    (p,) = preflight(local, resolve_resources(local, time="1", signal_delay_s=90)).problems
    assert "pre-timeout signal" in p


def test_values_that_cannot_be_quoted_are_refused():
    local = load_site("local")
    (p,) = preflight(local, resolve_resources(local, job_name="a\ntouch /tmp/x")).problems
    assert "--job-name" in p and "line break" in p
    problems = check_run_dir(Path("/tmp/100%j done"), fresh=True)
    assert any("'%'" in p for p in problems)


def test_run_dir_must_be_writable_and_fresh(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits: use a path under a file instead
            blocker = tmp_path / "file"
            blocker.write_text("x")
            target = blocker / "run"
            problems = check_run_dir(target, fresh=True)
            assert any("not a folder" in p or "not writable" in p for p in problems), problems
        else:
            problems = check_run_dir(ro / "run", fresh=True)
            assert any("not writable" in p for p in problems)
    finally:
        ro.chmod(0o700)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (p,) = check_run_dir(run, fresh=True, is_run=lambda d: (d / "checkpoints").exists())
    assert "already holds a run" in p and f"--resume {run}" in p
    assert check_run_dir(run, fresh=False, is_run=lambda d: True) == []
    assert check_run_dir(tmp_path / "new" / "deeper", fresh=True) == []


def test_data_check_needs_a_chunk_per_node(tmp_path):
    def chunks(n):
        for i in range(n):
            (tmp_path / f"c{i}.h5").write_bytes(b"x" * 10)
        return lambda root: [(tmp_path / f"c{i}.h5", 10) for i in range(n)]

    problems, _ = check_data(tmp_path, 16, chunks(12))
    assert "12 chunk(s)" in problems[0] and "16 nodes" in problems[0] and "--nodes 12" in problems[0]
    problems, notes = check_data(tmp_path, 4, chunks(12))
    assert problems == [] and "3.0 per node" in notes[0]

    def missing(root):
        raise FileNotFoundError(f"{root}/manifest.json not found")

    problems, _ = check_data(tmp_path, 1, missing)
    assert "manifest.json not found" in problems[0]
    problems, _ = check_data(None, 1, missing)
    assert "--data" in problems[0]
    # Chained after the job that writes it (--after), a missing manifest is expected, not a problem.
    problems, notes = check_data(tmp_path, 1, missing, expected_from=["123"])
    assert problems == [] and "expected from job(s) 123" in notes[0]


def test_every_chunk_file_is_there_with_its_recorded_size(tmp_path):
    listed = []
    for i in range(6):
        (tmp_path / f"c{i}.h5").write_bytes(b"x" * 100)
        listed.append((tmp_path / f"c{i}.h5", 100))
    assert check_chunk_files(tmp_path, listed) == []
    (tmp_path / "c1.h5").unlink()
    (tmp_path / "c4.h5").write_bytes(b"x" * 40)  # truncated
    problems = check_chunk_files(tmp_path, listed)
    assert len(problems) == 2
    assert "1 of 6 chunk file(s)" in problems[0] and "missing (c1.h5)" in problems[0]
    assert "c4.h5: 40 bytes, manifest says 100" in problems[1]
    assert all("re-run the same conversion" in p and "\n" not in p for p in problems)


def test_walltime_fields_out_of_range_are_refused():
    for text in ("99:99:99", "10:60", "1-24:00:00", "00:59:60"):
        with pytest.raises(ConfigError, match="is not below"):
            parse_time_min(text)
    assert parse_time_min("48:00:00") == 2880  # hours may exceed 24 without a day count, as in sbatch


def test_costs_of_arrays_and_sub_node_jobs_follow_the_sites_charging(leonardo):
    full = resolve_resources(leonardo, nodes=16, account="p")
    assert job_cost(leonardo, full).describe() == "16 node(s) x 1-00:00:00 = 384 node-hours (1536 GPU-hours)"
    one_gpu = resolve_resources(leonardo, gpus_per_node=1, account="p")
    cost = job_cost(leonardo, one_gpu)
    assert cost.node_share == 0.25 and cost.node_hours == 6 and cost.gpu_hours == 24
    assert "billed as 1/4 of a node" in cost.describe() and "= 6 node-hours (24 GPU-hours)" in cost.describe()
    cpu = leonardo.for_cpu_jobs()
    conv = resolve_resources(cpu, gpus_per_node=0, tasks_per_node=1, time="08:00:00", account="p")
    assert job_cost(cpu, conv, count=64).describe() == "64 task(s) x 1 node(s) x 08:00:00 = 512 node-hours"
    # Billed whole nodes: a 1-GPU job costs the node.
    leonardo_whole = load_site("leonardo")
    leonardo_whole.charging.by = "node"
    assert job_cost(leonardo_whole, one_gpu).node_hours == 24
    leonardo_whole.charging.unit = "gpu-hours"
    assert job_cost(leonardo_whole, one_gpu).describe().endswith("= 24 GPU-hours (24 node-hours)")


def test_leonardo_cpu_jobs_go_to_the_dcgp_partition(leonardo):
    cpu = leonardo.for_cpu_jobs()
    assert (cpu.partition, cpu.node.cpus, cpu.node.gpus, cpu.default_qos) == ("dcgp_usr_prod", 112, 0, "normal")
    assert leonardo.partition == "boost_usr_prod" and leonardo.node.cpus == 32  # the profile itself is unchanged
    assert load_site("local").for_cpu_jobs().partition == "debug"  # no CPU partition: the same one
    assert leonardo.cluster_name == "leonardo" and not leonardo.local_fallback
    assert leonardo.env["HDF5_USE_FILE_LOCKING"] == "FALSE" == load_site("local").env["HDF5_USE_FILE_LOCKING"]


def test_sbatch_and_dependency_options_are_parsed_and_refused_with_the_flag_to_use():
    import argparse

    from phileo.launch.cli import submit_options

    def opts(**kw):
        return submit_options(argparse.Namespace(**{"sbatch": [], "after": [], "dependency": None, **kw}))

    o = opts(sbatch=["mail-type=END,FAIL", "--exclusive", "comment=a b"], after=["12", "34_5"],
             dependency="afterany:7")
    assert o.sbatch == {"mail-type": "END,FAIL", "exclusive": True, "comment": "a b"}
    assert o.dependency == "afterok:12:34_5,afterany:7" and o.after == ["12", "34_5"] and o.any
    assert not opts().any and opts().dependency is None
    for kw, message in [({"sbatch": ["nodes=4"]}, "set it with --nodes"),
                        ({"sbatch": ["Mail Type=x"]}, "must be an sbatch long option"),
                        ({"sbatch": ["comment=a\nb"]}, "line break"),
                        ({"dependency": "afterok:1;rm -rf"}, "not SLURM dependency syntax"),
                        ({"after": ["abc"]}, "not a SLURM job id")]:
        with pytest.raises(ConfigError, match=message):
            opts(**kw)
