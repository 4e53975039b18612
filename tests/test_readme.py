"""README.md cannot drift: every ```bash block is run, or says why it cannot be, and every flag, path, script
and make target the README names exists.

Markers: an HTML comment on the line just above a ```bash fence (invisible on GitHub). One kind exists:

    <!-- readme-test: skip: <why it cannot run here> -->

The block is not run (the reason is required) but still checked statically. Any other `readme-test` comment,
or one that is not directly above a ```bash fence, fails the test, so a typo never silently skips or runs a
block.

Static checks (every block, skipped or not, and the README's inline code and links):
- paths under the repository's top folders (jobs/, slurm/, phileo/, ...) exist (globs match something);
- `make X`: X is a target of the Makefile;
- each `--flag` given to one of our programs (a jobs/ or preprocess/ script, a `python -m phileo...` module, a
  phileo-* console script; their subcommands too, in `$(...)` and in `sbatch --wrap "..."`) is in that
  program's own `--help`, and the console scripts are in pyproject.toml.

How a block runs: `bash -euo pipefail` from the repo root, in a stand-in for Leonardo's environment: HOME,
WORK, FAST, CINECA_SCRATCH are temporary folders, USER a name, and PATH starts with this Python's folder
(python, the console scripts). Nothing else is inherited, so a variable that neither the site nor an earlier
block defines fails the block (`set -u`), as it would for a reader following the README. The `export` lines
of every earlier block that runs come first (the names of the walk-through's step 2 hold for the rest). The
data those names point at is generated first: SHARDS (a converted set as preflight sees it: manifest.json
and chunk files of the recorded sizes), MAJORTOM (real MajorTOM parquet cells, converted for real where a
block converts), PHILEO_BENCH_DATA (a PhilEO Bench sample), PHILEO_WEIGHTS (empty files under the
published names: preflight checks that the weights exist, and nothing here loads them).
- A launcher (`jobs/launch_*.py`, `phileo-pretrain|finetune|sweep|preprocess`) runs as a dry run: --dry-run
  is added where the README submits, so the command renders and checks its job instead of queueing it.
- Blocks without `sbatch` run in the no_slurm group: the SLURM client hidden from PATH, as on a laptop.
- Blocks with `sbatch` run on the dev cluster (slurm, slow): `sbatch` is a wrapper that checks `-p` names a
  partition of slurm/sites/leonardo.yaml, then calls the real sbatch with `--test-only` and the request fitted
  into a dev node (partition debug, no GPU, 1 task of 1 CPU, at most the cluster's nodes). `sbatch --parsable`
  (whose job id a later line needs) submits the job held instead; the held jobs are cancelled at the end.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*(?P<kind>[\w-]+)\s*(?::\s*(?P<arg>.*?))?\s*-->")
FENCE = "```bash"
TOP_FOLDERS = ("jobs", "preprocess", "slurm", "phileo", "tests", "benchmarks", "docs")
REPO_PATH = re.compile(r"^(?:\./)?((?:%s)/[^\s$'\"`<>]*)" % "|".join(TOP_FOLDERS))
LAUNCHER = re.compile(r"(jobs/launch_\w+\.py|(?<![\w/-])phileo-(?:pretrain|finetune|sweep|preprocess))(?=\s|$)")
# What a block may take from the machine; everything else comes from the site stand-in or earlier blocks.
PASSED_THROUGH = ("LANG", "LC_ALL", "TMPDIR", "SLURM_CONF")
# The walk-through's data names and what is generated for them.
DATA_VARS = ("SHARDS", "MAJORTOM", "PHILEO_BENCH_DATA", "PHILEO_WEIGHTS")
PUBLISHED_WEIGHTS = ("phileo_cnn_44m", "phileo_cnn_200m", "phileo_vit_100m")
SBATCH_VALUE_OPTIONS = {"-p", "-A", "-N", "-n", "-c", "-t", "-o", "-e", "-J", "-a", "-d", "-q", "-w", "-D",
                        "--wrap", "--partition", "--account", "--nodes", "--time", "--output", "--error",
                        "--job-name", "--array", "--dependency", "--export", "--gres", "--qos", "--cpus-per-task",
                        "--mem", "--chdir", "--ntasks-per-node"}


# ------------------------------------------------------------------------------------------- the README's blocks
@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the ```bash fence
    text: str
    skip: str | None  # the reason of a skip marker

    @property
    def joined(self) -> str:
        """The text with line continuations joined, as bash reads it."""
        return self.text.replace("\\\n", " ")

    @property
    def uses_sbatch(self) -> bool:
        return any(c[0] == "sbatch" for c in commands(self.text))


def read_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == FENCE:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            m = MARKER.search(lines[i - 1]) if i else None
            blocks.append(Block(i + 1, "\n".join(lines[i + 1:end]) + "\n", m.group("arg") if m else None))
            i = end
        i += 1
    return blocks


BLOCKS = read_blocks(README.read_text())


def _block_id(b: Block) -> str:
    return f"README.md:{b.line}"


def commands(text: str) -> list[list[str]]:
    """The simple commands of a shell text as word lists; `$(...)` contents and `sbatch --wrap "..."` strings
    are commands of their own. Assignments before a command and redirections are dropped."""
    out: list[list[str]] = []
    for line in text.replace("\\\n", " ").splitlines():
        for inner in re.findall(r"\$\(([^()]*)\)", line):
            out += commands(inner)
        line = re.sub(r"\$\(([^()]*)\)", "SUBST", line)
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|<>()")
        lex.whitespace_split = True
        try:
            words = list(lex)
        except ValueError as e:
            raise AssertionError(f"README shell line does not parse ({e}): {line}") from None
        current: list[str] = []
        skip_next = False
        for w in words + [";"]:
            if skip_next:
                skip_next = False
            elif w in ("<", ">", ">>"):
                skip_next = True
            elif set(w) <= set(";&|()"):
                while current and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", current[0]):
                    current.pop(0)
                if current:
                    out.append(current)
                current = []
            else:
                current.append(w)
    for c in list(out):
        if c[0] == "sbatch" and "--wrap" in c:
            out += commands(c[c.index("--wrap") + 1])
    return out


# ----------------------------------------------------------------------------------------------- static checks
def _inline_code(text: str) -> list[str]:
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", prose)


def _repo_paths(words: list[str]) -> list[str]:
    found = []
    for w in words:
        for part in (w, *re.split(r"[=,]", w)[1:]):
            m = REPO_PATH.match(part)
            if m:
                found.append(m.group(1).rstrip(".,:;)"))
    return found


def _missing(path: str) -> bool:
    if "::" in path:  # tests/test_x.py::test_name (a trailing … stands for the rest of the name)
        file, name = path.split("::", 1)
        prefix = name.rstrip("…").rstrip(".")
        return _missing(file) or not re.search(rf"^def {re.escape(prefix)}\w*\(", (REPO / file).read_text(),
                                               flags=re.M)
    return not glob.glob(str(REPO / path)) if any(c in path for c in "*?[") else not (REPO / path).exists()


def test_markers_are_known_and_sit_just_above_a_bash_fence():
    lines = README.read_text().splitlines()
    for i, line in enumerate(lines):
        if not re.match(r"\s*<!--\s*readme-test", line):
            continue  # prose may quote the marker in inline code
        m = MARKER.search(line)
        assert m, f"README.md:{i + 1}: unreadable readme-test marker: {line}"
        assert m.group("kind") == "skip", f"README.md:{i + 1}: unknown marker kind {m.group('kind')!r} (known: skip)"
        assert (m.group("arg") or "").strip(), f"README.md:{i + 1}: a skip marker must say why the block cannot run"
        assert i + 1 < len(lines) and lines[i + 1].strip() == FENCE, \
            f"README.md:{i + 1}: the marker must be on the line just above a ```bash fence"


def test_first_screen_keeps_exactly_the_two_commands():
    first = BLOCKS[0]
    assert [c[:2] for c in commands(first.text)] == [["make", "demo"], ["make", "test"]]


def test_every_repository_path_named_exists():
    text = README.read_text()
    words = [w for b in BLOCKS for c in commands(b.text) for w in c]
    words += [w for span in _inline_code(text) for w in span.split()]
    words += re.findall(r"\]\(([^)#\s]+)", text)  # markdown links
    missing = sorted({p for p in _repo_paths(words) if _missing(p)})
    assert not missing, f"README.md names paths that do not exist: {missing}"


def _make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (REPO / "Makefile").read_text(), flags=re.M))


def _all_commands() -> list[list[str]]:
    """Commands of every block, plus inline code that is a command of ours (`make ...`, `python ...`,
    `phileo-... ARGS`, or a jobs/ or preprocess/ script written without `python`)."""
    out = [c for b in BLOCKS for c in commands(b.text)]
    for span in _inline_code(README.read_text()):
        if "..." in span or "<" in span or "|" in span:
            continue  # an elided or templated command: its words are still path-checked
        if re.match(r"^(jobs|preprocess)/\w+\.py\b", span):
            span = "python " + span
        if re.match(r"^(make |python |\.venv/bin/python |phileo-[\w-]+ )", span):
            out += commands(span)
    return out


def test_every_make_target_named_exists():
    targets = _make_targets()
    named = {w for c in _all_commands() if c[0] == "make" for w in c[1:] if not w.startswith("-") and "=" not in w}
    assert named, "no make target found: the parser is broken"
    assert not named - targets, f"README.md names make targets the Makefile lacks: {sorted(named - targets)}"


def _program(words: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    """(the command that runs one of our programs, its arguments) or None for anything else."""
    head, rest = words[0], words[1:]
    if head in ("srun", "torchrun"):
        for i, w in enumerate(rest):
            if w == "-m" and head == "torchrun":
                return (sys.executable, "-m", rest[i + 1]), rest[i + 2:]
            if not w.startswith("-") and head == "srun" and i and not rest[i - 1] in ("-N", "-n", "-c"):
                return _program(rest[i:])
        return None
    if head in ("python", "python3") or head.endswith("/python"):
        if rest[:1] == ["-m"] and rest[1].startswith("phileo"):
            return (sys.executable, "-m", rest[1]), rest[2:]
        if rest and REPO_PATH.match(rest[0]) and rest[0].endswith(".py"):
            return (sys.executable, str(REPO / rest[0])), rest[1:]
        return None
    if head.startswith("phileo-"):
        return (head,), rest
    return None


@functools.lru_cache(maxsize=None)
def _help_options(program: tuple[str, ...], sub: str | None) -> frozenset[str]:
    if program[0].startswith("phileo-"):
        scripts = re.findall(r'^(phileo-[\w-]+)\s*=', (REPO / "pyproject.toml").read_text(), flags=re.M)
        assert program[0] in scripts, f"README.md runs {program[0]}, which is not a console script in pyproject.toml"
        program = (shutil.which(program[0], path=str(Path(sys.executable).parent)) or program[0],)
    options: set[str] = set()
    for argv in ([*program, "--help"], [*program, sub, "--help"] if sub else None):
        if argv is None:
            continue
        res = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)
        if res.returncode == 0:
            options |= set(re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", res.stdout))
        else:
            assert argv[-2] == sub, f"{' '.join(program)} --help failed:\n{res.stderr[-2000:]}"
    return frozenset(options)


def test_every_flag_given_to_our_programs_exists():
    checked, unknown = 0, []
    for words in _all_commands():
        found = _program(words)
        if found is None:
            continue
        program, args = found
        sub = args[0] if args and re.match(r"^[a-z][a-z_-]*$", args[0]) else None
        options = _help_options(program, sub)
        for a in args:
            if a.startswith("--"):
                checked += 1
                if a.split("=", 1)[0] not in options:
                    unknown.append(f"{' '.join(Path(p).name for p in program)}: {a.split('=', 1)[0]}")
    assert checked > 20, "too few flags found: the parser is broken"
    assert not unknown, f"README.md uses flags its programs do not have: {sorted(set(unknown))}"


def test_environment_yml_install_lines_are_the_readme_s():
    """environment.yml's header and the README install the cluster environment with the same commands."""
    header = []
    for line in (REPO / "environment.yml").read_text().splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("#   "):
            header.append(line[4:].strip())
    readme_lines = {line.strip() for b in BLOCKS for line in b.text.splitlines()}
    assert header and not [h for h in header if h not in readme_lines], \
        f"environment.yml's install lines are not the README's: {[h for h in header if h not in readme_lines]}"


# ------------------------------------------------------------------------------------------------- running them
def _prelude(block: Block) -> str:
    """The export lines of every earlier block that runs: what a reader has set when reaching this block."""
    lines = []
    for b in BLOCKS:
        if b.line >= block.line:
            break
        if b.skip is None:
            lines += [ln for ln in b.joined.splitlines() if re.match(r"^\s*export\s", ln)]
    return "\n".join(lines) + "\n"


def as_dry_runs(text: str) -> str:
    """Launchers that would submit get --dry-run right after the script name (argparse takes it anywhere)."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        if "--dry-run" not in line:
            line = LAUNCHER.sub(r"\1 --dry-run", line)
        out.append(line)
    return "\n".join(out) + "\n"


def _site_env(root: Path, path: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSED_THROUGH if k in os.environ}
    for name in ("home", "work", "fast", "scratch"):
        (root / name).mkdir(parents=True, exist_ok=True)
    env.update({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{path}", "HOME": str(root / "home"),
                "USER": "myuser", "WORK": str(root / "work"), "FAST": str(root / "fast"),
                "CINECA_SCRATCH": str(root / "scratch"), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
    return env


def _generate_data(env: dict[str, str]) -> None:
    """Data at the places the README's exports name (see the module docstring)."""
    from _launch_fixtures import write_bench, write_manifest
    from phileo.data.synthetic import write_majortom_parquet

    every_export = "\n".join(ln for b in BLOCKS if b.skip is None for ln in b.joined.splitlines()
                             if re.match(r"^\s*export\s", ln))
    script = every_export + "\n" + "".join(f'printf "%s\\0" "${{{v}:-}}"\n' for v in DATA_VARS)
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60, cwd=REPO)
    assert res.returncode == 0, res.stderr
    where = dict(zip(DATA_VARS, res.stdout.split("\0")))
    if where["SHARDS"]:
        write_manifest(Path(where["SHARDS"]), 64)
    if where["MAJORTOM"]:
        write_majortom_parquet(Path(where["MAJORTOM"]), 4)
    if where["PHILEO_BENCH_DATA"]:
        write_bench(Path(where["PHILEO_BENCH_DATA"]))
    if where["PHILEO_WEIGHTS"]:
        Path(where["PHILEO_WEIGHTS"]).mkdir(parents=True, exist_ok=True)
        for name in PUBLISHED_WEIGHTS:
            (Path(where["PHILEO_WEIGHTS"]) / f"{name}.pt").touch()


def _run_block(block: Block, env: dict[str, str]) -> subprocess.CompletedProcess:
    script = _prelude(block) + as_dry_runs(block.text)
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def _report(block: Block, res: subprocess.CompletedProcess) -> str:
    return (f"README.md:{block.line} failed (exit {res.returncode}); as run:\n{as_dry_runs(block.text)}\n"
            f"--- stdout ---\n{res.stdout[-3000:]}\n--- stderr ---\n{res.stderr[-3000:]}")


@pytest.fixture(scope="module")
def site(tmp_path_factory, _hidden_path):
    """The Leonardo stand-in with the walk-through's data generated, SLURM hidden (the blocks' own PATH)."""
    env = _site_env(tmp_path_factory.mktemp("leonardo"), _hidden_path)
    _generate_data(env)
    return env


RUN_HERE = [b for b in BLOCKS if b.skip is None and not b.uses_sbatch]
RUN_ON_CLUSTER = [b for b in BLOCKS if b.skip is None and b.uses_sbatch]


@pytest.mark.no_slurm
@pytest.mark.parametrize("block", RUN_HERE, ids=_block_id)
def test_block_runs_without_slurm(block, site, no_slurm_path):
    res = _run_block(block, site)
    assert res.returncode == 0, _report(block, res)


def test_launchers_in_blocks_do_run_as_dry_runs():
    """The rewrite the runs rely on: a submission becomes a dry run, a dry run stays one."""
    launches = [b for b in RUN_HERE if LAUNCHER.search(b.joined)]
    assert len(launches) >= 4, "the walk-through's launcher blocks are not found"
    for b in launches:
        for line in as_dry_runs(b.text).splitlines():
            if LAUNCHER.search(line):
                assert line.count("--dry-run") == 1, line


# ------------------------------------------------------------------------------------------------ on the cluster
SBATCH_WRAPPER = r'''#!{python}
"""sbatch for tests/test_readme.py: --test-only (or --hold for --parsable), the request fitted to a dev node."""
import json, subprocess, sys
VALUE = set({value_options!r})
allowed, real, log, max_nodes = {allowed!r}, {real!r}, {log!r}, {max_nodes}
args = sys.argv[1:]
i, opts = 0, []
while i < len(args) and args[i].startswith("-"):
    take = 2 if args[i] in VALUE else 1
    opts += args[i:i + take]
    i += take
rest = args[i:]
def value(short, long):
    for k, a in enumerate(opts):
        if a in (short, long):
            return opts[k + 1]
        if a.startswith(long + "="):
            return a.split("=", 1)[1]
part = value("-p", "--partition")
if part is not None and part not in allowed:
    print(f"sbatch (README test): partition {{part}} is not one of leonardo.yaml's {{allowed}}", file=sys.stderr)
    sys.exit(1)
fit = ["--partition=debug", "--gres=none", "--mem=0", "--ntasks-per-node=1", "--cpus-per-task=1"]
nodes = value("-N", "--nodes")
if nodes is not None:
    fit.append(f"--nodes={{min(int(nodes), max_nodes)}}")
mode = ["--hold"] if "--parsable" in opts else ["--test-only"]
res = subprocess.run([real, *mode, *opts, *fit, *rest], capture_output=True, text=True)
sys.stdout.write(res.stdout)
sys.stderr.write(res.stderr)
with open(log, "a") as f:
    f.write(json.dumps({{"args": args, "mode": mode[0], "rc": res.returncode, "out": res.stdout.strip(),
                        "err": res.stderr.strip()}}) + "\n")
sys.exit(res.returncode)
'''


@pytest.fixture(scope="module")
def cluster_site(tmp_path_factory, slurm_cluster):
    """The Leonardo stand-in on the dev cluster: SLURM on PATH behind the --test-only wrapper."""
    from phileo.launch.sites import load_site

    real = shutil.which("sbatch")
    assert real, "the dev cluster is up but sbatch is not on PATH"
    root = tmp_path_factory.mktemp("leonardo-cluster")
    leonardo = load_site("leonardo")
    shim = root / "shim"
    shim.mkdir()
    log = root / "sbatch.jsonl"
    (shim / "sbatch").write_text(SBATCH_WRAPPER.format(
        python=sys.executable, value_options=sorted(SBATCH_VALUE_OPTIONS), real=real, log=str(log),
        allowed=[leonardo.partition, leonardo.cpu_jobs.partition], max_nodes=slurm_cluster.nodes))
    (shim / "sbatch").chmod(0o755)
    env = _site_env(root, f"{shim}{os.pathsep}{os.environ['PATH']}")
    env["SLURM_CONF"] = str(slurm_cluster.conf)
    _generate_data(env)
    yield env, log
    held = [json.loads(ln)["out"].split(";")[0] for ln in log.read_text().splitlines()
            if json.loads(ln)["mode"] == "--hold"] if log.exists() else []
    if held:
        subprocess.run(["scancel", *held], capture_output=True, env=env, timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN_ON_CLUSTER, ids=_block_id)
def test_block_sbatch_lines_pass_test_only_on_the_dev_cluster(block, cluster_site):
    env, log = cluster_site
    before = len(log.read_text().splitlines()) if log.exists() else 0
    res = _run_block(block, env)
    assert res.returncode == 0, _report(block, res)
    calls = [json.loads(ln) for ln in log.read_text().splitlines()[before:]]
    n_sbatch = sum(c[0] == "sbatch" for c in commands(block.text))
    assert len(calls) == n_sbatch and all(c["rc"] == 0 for c in calls), calls
    for c in calls:
        if c["mode"] == "--test-only":
            assert "to start at" in c["err"], c  # sbatch --test-only: "Job N to start at ... on nodes ..."
