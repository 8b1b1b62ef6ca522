#!/usr/bin/env python3
"""RunPilot's performance benchmark: RunPilot and the bare engine side by side, in the same run.

    python tests/bench.py [--engine docker|podman] [--quick] [--reps N] [--cases 1,2,...]

Cases (each prints its own block; a markdown table of every figure against its target closes the report):
  1  fixed overhead per run      `runpilot run` of a job that exits at once vs `ENGINE run --rm --init IMG true`
                                 and vs RunPilot's own engine command line (meta.json "command") run bare
  2  log throughput              500 MB to stdout (`yes | head`, `cat` of a file of 100-byte lines, `head` of
                                 /dev/zero), terminal output to /dev/null, vs the bare engine command with
                                 `--log-driver none`, the same piped into coreutils' `tee FILE` (the least a
                                 tee to a file costs), and the bare command with the engine's default driver
  3  METRIC-heavy output         1,000,000 METRIC lines vs as many bytes without METRIC: CPU per sample, peak RSS
  4  history at scale            `list`, `list --status failed`, `show PREFIX` on a home with 100,000 runs
  5  start-up                    `import runpilot` (-X importtime), `runpilot --help` vs `python -c pass`, and
                                 `runpilot --version` as a copied file (`python3 -B runpilot.py`: no bytecode
                                 cache) and installed (pip into a venv, as pipx does)
  6  config parsing              a generated 2,000-line config through runpilot.parse_yaml
  7  plots                       `runpilot plot` of a run of 1,000,000 samples (wall, peak RSS), and the size of
                                 the `--html` page of 10 runs x 100,000 steps
  8  the removed fast paths      the module before the refactor of issue 14 (commit OLD_COMMIT below) beside
                                 today's, in the same run: per run of `true` as a whole, with each fast path
                                 of the old module switched off in turn (Docker socket image check, Podman
                                 image-answer cache, engine-version cache, lazy imports), METRIC CPU per
                                 sample (old with and without its block fast path), `import runpilot`, and
                                 `list` on 100,000 runs
  9  sweeps                      100 short runs on engine local with `--parallel 4` vs the same commands under
                                 `xargs -P 4` (ratio of wall times), RunPilot's CPU per run, and
                                 `runpilot list --sweep ID` of a 1,000-run sweep (installed)
 10  Slurm                       `runpilot list` with 1,000 active Slurm runs, answered by the stand-in
                                 tests/fixtures/squeue (wall, and the number of squeue calls: one), and a
                                 100-point `sweep --on slurm` submitted to the real cluster when `sinfo`
                                 answers (one sbatch call; the array is scancelled at once)
 11  metrics_from                RunPilot's own CPU with metrics_from (one recogniser; three and two patterns) beside
                                 METRIC-only capture, per output line and per sample found, on a chatty job (a tqdm
                                 bar at 100 updates/s, \r-redrawn) and a quiet one (nanoGPT's iteration lines);
                                 engine local, `cat` of a generated log
 12  code snapshots              `runpilot run` on engine local with a `code` mount of 1,000 files / 20 MiB: the
                                 snapshot the first time (empty home) and of the unchanged folder, beside the
                                 run without a code mount (the fixed start cost) and with --live-code; and the
                                 home's size after those runs (one copy of the folder, not one per run)

How it measures:
- Every command is a whole process, timed wall-clock from spawn to exit; variants alternate (A B A B ...) so
  that drift on a shared machine hits all of them alike; figures are medians with min-max over --reps.
- "RunPilot's own CPU" and peak RSS are the runpilot Python process alone (RUSAGE_SELF read at the end of
  runpilot.main inside that process), not the engine CLI or the local jobs it starts (reported apart as
  "CLI CPU").
- RunPilot runs under a clean interpreter: a venv of --python made for the run, as `pipx install` makes,
  so none of --python's own site-packages .pth files run at start (this sandbox's python3 runs a certifi
  hook from one, ≈ 30 ms at every start, that a GPU box's Python does not have). `import runpilot` uses
  cached bytecode, as an installed `runpilot` does. Case 1 also shows RunPilot imported in --python
  itself, and both interpreters' bare start. Child Pythons get
  PYTHONPYCACHEPREFIX under /tmp (so nothing is written into the repository) and never PYTHONDONTWRITEBYTECODE.
  `python runpilot.py` (a copied file) recompiles the whole script on every start; cases 1, 4 and 5 show it.
  "Installed" (cases 5, 9, 10) is `pip install` of the project into a venv made without pip (pipx's kind):
  the `runpilot` console script, bytecode compiled by pip; cached per runpilot.py in /tmp/runpilot-bench-cache.
- Every RUNPILOT_HOME is a temporary folder; the 100,000-run homes of cases 4 and 8 are cached in
  /tmp/runpilot-bench-cache (keyed by the module's DB_SCHEMA_VERSION, the schema text and the size;
  --fresh-home rebuilds them; about 0.8 GB per 100,000 runs).
  Containers started by the benchmark are removed at the end, also after Ctrl-C.

Standard library only, Python 3.10+. Not a unit test (the name does not match test*.py); the targets are
printed, never asserted. Needs the engine and the image from tests/images/build.sh; case 8 needs git (the
old module is read from the repository's history).
"""

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNPILOT_PY = ROOT / "runpilot.py"
SQUEUE_STANDIN = ROOT / "tests" / "fixtures" / "squeue"
# The last commit before the refactor of issue 14 removed the fast paths that case 8 measures.
OLD_COMMIT = "291c273"
BUSYBOX_IMAGE = "runpilot-test-busybox:latest"
# Label on every container the benchmark starts itself (RunPilot's own carry runpilot.run_id).
BENCH_LABEL = "runpilot.bench"
CACHE_DIR = Path(tempfile.gettempdir()) / "runpilot-bench-cache"
PYCACHE_DIR = CACHE_DIR / "pycache"
# Bump when the generated history home changes shape, so a cached one is rebuilt.
HOME_GENERATION = 2
MARK = "@@RUNPILOT-BENCH@@"
TEE_VARIANT = "bare --log-driver none | tee FILE"
MB = 1_000_000
PROCESS_TIMEOUT_S = 1800

# Runs runpilot.main in this process and reports the process's own CPU and peak RSS on stderr.
# RUSAGE_SELF leaves out the engine CLI (a child), which RUSAGE_CHILDREN gives apart. Peak RSS is VmHWM:
# Linux carries the spawning process's RSS into ru_maxrss across vfork+exec, so ru_maxrss would report
# the benchmark's own size whenever that is larger.
# RUNPILOT_BENCH_OFF (case 8, the old module only) switches fast paths off before main runs: each is
# replaced by the plain path the old module fell back to, exactly as the old code did when the fast
# path could not answer.
WRAPPER = f"""\
import os, resource, sys
sys.path.insert(0, sys.argv[1])
off = set(filter(None, os.environ.pop("RUNPILOT_BENCH_OFF", "").split(",")))
if "lazy" in off:  # what the old module imported lazily, imported before it: an eager import's cost
    import argparse, difflib, getpass, selectors, shutil, socket, sqlite3, subprocess, unicodedata
import runpilot
if "docker_api" in off:   # no answer from the socket: `docker image inspect`, as for a remote daemon
    runpilot._docker_api_image = lambda image, environ: (False, None)
if "podman_cache" in off:  # nothing remembered: `podman image inspect` at every run
    runpilot.podman_cached_image = lambda cache, image: None
    runpilot.podman_remember_image = lambda *args: None
if "version_cache" in off:  # `ENGINE version` at every run (in the start-up probe thread, as before)
    def _ask(engine, cache):
        fmt = "{{{{.Server.Version}}}}" if engine == "docker" else "{{{{.Client.Version}}}}"
        return runpilot._quiet([engine, "version", "--format", fmt]).stdout.strip() or None
    runpilot.engine_version = _ask
if "fast_block" in off:  # every METRIC block line by line
    runpilot.fast_metric_block = lambda block, first_step: None
rc = runpilot.main(sys.argv[2:])
s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
peak = s.ru_maxrss
try:
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
except (OSError, StopIteration, ValueError):
    pass
print("{MARK}", rc, s.ru_utime + s.ru_stime, peak, c.ru_utime + c.ru_stime, file=sys.stderr, flush=True)
sys.exit(rc)
"""

TARGETS = {
    "overhead_ms": 60.0,       # extra wall per run over the bare engine command
    "throughput_ratio": 0.9,   # RunPilot's MB/s over the bare `--log-driver none` run's
    "cpu_s_per_gb": 3.0,       # RunPilot's own CPU per GB of output
    "us_per_sample": 3.0,      # RunPilot's own CPU per METRIC sample
    "rss_mb": 40.0,            # RunPilot's peak RSS, whatever the job prints
    "list_ms": 150.0,
    "show_ms": 100.0,
    "import_ms": 30.0,
    "yaml_ms": 50.0,
    "plot_s": 1.0,             # `runpilot plot` of a run of 1,000,000 samples, whole process
    "plot_rss_mb": 60.0,       # ... its peak RSS
    "html_mb": 1.0,            # the --html page of 10 runs x 100,000 steps
    "list_sweep_ms": 150.0,    # `list --sweep ID` of a 1,000-run sweep, installed, whole process (issue 15)
    "slurm_list_ms": 300.0,    # `list` with 1,000 active Slurm runs, installed, whole process (issue 16)
}


class BenchError(Exception):
    """A command the benchmark needs failed; the message says which and why."""


# ==== statistics and report rows ===============================================

@dataclass
class Stats:
    """Median, min and max of repeated measurements."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    def fmt(self, scale: float = 1.0, digits: int = 0, unit: str = "") -> str:
        """'123 ms (110-140)': the median, then min-max, all multiplied by SCALE."""
        f = f"{{:.{digits}f}}"
        unit = f" {unit}" if unit else ""
        return (f"{f.format(self.median * scale)}{unit} "
                f"({f.format(self.min * scale)}–{f.format(self.max * scale)})")


@dataclass
class Row:
    """One line of the final table."""

    case: str
    measure: str
    runpilot: str
    reference: str
    compare: str
    target: str = ""
    ok: bool | None = None      # None: informational, no target

    @property
    def verdict(self) -> str:
        return "" if self.ok is None else ("PASS" if self.ok else "**MISS**")


@dataclass
class Sample:
    """One timed process."""

    wall: float                      # seconds, spawn to exit
    rc: int
    cpu_self: float | None = None    # runpilot process only (RUSAGE_SELF), seconds
    maxrss_kb: int | None = None     # runpilot process peak RSS (VmHWM), KiB
    cpu_children: float | None = None  # the engine CLI: under RunPilot, or run bare
    stderr: str = ""


def run_variants(variants: dict, reps: int, warmups: int = 1) -> dict[str, list[Sample]]:
    """WARMUPS rounds of every variant, then REPS rounds in turn (A B C A B C ...)."""
    for _ in range(warmups):
        for fn in variants.values():
            fn()
    samples: dict[str, list[Sample]] = {k: [] for k in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            samples[name].append(fn())
    return samples


def median_of(samples: list[Sample], attr: str) -> Stats:
    return Stats([getattr(s, attr) for s in samples])


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table (also readable as plain text)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in rows])


def say(text: str = "") -> None:
    print(text, flush=True)


# ==== processes ================================================================

class Bench:
    """What every case needs: the engine, the interpreter, temp folders, timed processes, cleanup."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.engine: str = args.engine
        self.python: str = args.python
        self.quick: bool = args.quick
        self.reps: int = args.reps
        self.fresh_home: bool = args.fresh_home
        self.tmp = Path(tempfile.mkdtemp(prefix="runpilot-bench-"))
        self.homes: list[Path] = []
        self.rows: list[Row] = []
        self.peak_rss_kb: list[tuple[str, int]] = []
        self._serial = 0

    # -- environment -----------------------------------------------------------
    def env(self, home: Path | None = None, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        for name in ("PYTHONDONTWRITEBYTECODE", "RUNPILOT_ENGINE", "PYTHONPROFILEIMPORTTIME"):
            env.pop(name, None)
        env["PYTHONPYCACHEPREFIX"] = str(PYCACHE_DIR)
        if home is not None:
            env["RUNPILOT_HOME"] = str(home)
        env.update(extra)
        return env

    def new_home(self, name: str) -> Path:
        home = self.tmp / f"home-{name}"
        self.homes.append(home)
        return home

    def unique(self, stem: str) -> str:
        self._serial += 1
        return f"{stem}-{os.getpid()}-{self._serial}"

    # -- timed processes -------------------------------------------------------
    def alternate(self, commands: dict[str, list[str]], env: dict[str, str], reps: int) -> dict[str, list[Sample]]:
        """One warm-up each (bytecode, page cache), then REPS rounds running every command in turn."""
        for argv in commands.values():
            self.timed(argv, env, cwd=ROOT)
        samples: dict[str, list[Sample]] = {k: [] for k in commands}
        for _ in range(reps):
            for name, argv in commands.items():
                samples[name].append(self.timed(argv, env, cwd=ROOT))
        return samples

    def timed(self, argv: list[str], env: dict[str, str], cwd: Path | None = None,
              expect_rc: int | None = 0) -> Sample:
        """Run ARGV with stdout to /dev/null; wall time and the process's rusage from wait4."""
        with tempfile.TemporaryFile(dir=self.tmp) as err:
            start = time.perf_counter()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                    env=env, cwd=cwd, start_new_session=True)
            timer = threading.Timer(PROCESS_TIMEOUT_S, _kill_group, (proc.pid,))
            timer.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:  # Ctrl-C: the child is in its own session and would live on
                _kill_group(proc.pid)
                proc.wait()
                raise
            finally:
                timer.cancel()
            wall = time.perf_counter() - start
            proc.returncode = rc = os.waitstatus_to_exitcode(status)
            err.seek(0)
            text = err.read().decode("utf-8", "replace")
        sample = Sample(wall, rc, cpu_children=usage.ru_utime + usage.ru_stime, stderr=text)
        for line in text.splitlines():
            if line.startswith(MARK):
                _, _rc, cpu, rss, children = line.split()
                sample.cpu_self, sample.maxrss_kb = float(cpu), int(rss)
                sample.cpu_children = float(children)
        if expect_rc is not None and rc != expect_rc:
            tail = "\n    ".join(text.strip().splitlines()[-8:])
            raise BenchError(f"{' '.join(argv)[:300]}\n  exited {rc} (expected {expect_rc}):\n    {tail}")
        return sample

    @property
    def clean(self) -> str:
        """The interpreter RunPilot is measured with: a venv of --python (see venv_python)."""
        return self.venv_python()

    def venv_python(self) -> str:
        """A fresh venv of --python, as `pipx install` makes: none of the interpreter's own site-packages.

        Some machines run code at every Python start from .pth files in site-packages (this sandbox's
        certifi hook costs ≈ 20 ms); an installed runpilot lives in its own venv and never pays that.
        """
        venv = self.tmp / "venv"
        if not venv.exists():
            subprocess.run([self.python, "-m", "venv", "--without-pip", str(venv)], check=True)
        return str(venv / "bin" / "python")

    def runpilot(self, args: list[str], home: Path, cwd: Path | None = None, python: str | None = None,
                 module: Path = ROOT, off: tuple[str, ...] = (), extra_env: dict[str, str] | None = None,
                 expect_rc: int | None = 0) -> Sample:
        """`runpilot ARGS` as an installed runpilot runs (module import), with its own CPU and RSS.

        MODULE is the folder of the runpilot.py to import (case 8: the old one); OFF names the old
        module's fast paths to switch off (see WRAPPER).
        """
        env = self.env(home, **(extra_env or {}))
        if off:
            env["RUNPILOT_BENCH_OFF"] = ",".join(off)
        sample = self.timed([python or self.venv_python(), "-c", WRAPPER, str(module), *args], env, cwd,
                            expect_rc=expect_rc)
        if sample.cpu_self is None:
            raise BenchError(f"runpilot {' '.join(args)} printed no measurement line:\n{sample.stderr[-2000:]}")
        return sample

    @property
    def old_dir(self) -> Path:
        """A folder holding the runpilot.py of OLD_COMMIT (before the fast paths were removed)."""
        folder = self.tmp / "old"
        if not (folder / "runpilot.py").exists():
            folder.mkdir(exist_ok=True)
            done = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:runpilot.py"],
                                  capture_output=True, timeout=60)
            if done.returncode != 0:
                raise BenchError(f"git show {OLD_COMMIT}:runpilot.py failed: "
                                 f"{done.stderr.decode(errors='replace').strip()[:300]}")
            (folder / "runpilot.py").write_bytes(done.stdout)
        return folder

    def installed(self) -> Path:
        """The `runpilot` console script of a venv that pip installed this checkout into, as pipx does.

        The venv is made without pip (pipx's kind: nothing but RunPilot in it); the system's pip
        installs into it from a copy of the project's files (a build in the repository would leave
        build/ and *.egg-info there). Cached per runpilot.py and pyproject.toml.
        """
        digest = hashlib.sha256(RUNPILOT_PY.read_bytes() + (ROOT / "pyproject.toml").read_bytes()
                                + self.python.encode()).hexdigest()[:12]
        venv = CACHE_DIR / f"installed-{digest}"
        script = venv / "bin" / "runpilot"
        if script.exists():
            return script
        for stale in CACHE_DIR.glob("installed-*"):  # venvs of runpilot.py versions gone since
            shutil.rmtree(stale, ignore_errors=True)
        src = self.tmp / "install-src"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE", "runpilot.py"):
            if (ROOT / name).exists():
                shutil.copy2(ROOT / name, src / name)
        subprocess.run([self.python, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
        done = subprocess.run([self.python, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                               "--quiet", "--disable-pip-version-check", "--no-deps", str(src)],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not script.exists():
            shutil.rmtree(venv, ignore_errors=True)
            raise BenchError(f"pip install of runpilot into a venv failed: {done.stderr.strip()[-800:]}")
        return script

    def installed_env(self, home: Path | None = None, **extra: str) -> dict[str, str]:
        """The environment of an installed runpilot: the bytecode pip compiled, no pycache prefix."""
        env = self.env(home, **extra)
        env.pop("PYTHONPYCACHEPREFIX", None)
        return env

    def bare(self, flags: list[str], image_and_cmd: list[str]) -> Sample:
        """`ENGINE run FLAGS --name N --label runpilot.bench=1 IMAGE CMD...` with stdout to /dev/null."""
        argv = [self.engine, "run", *flags, "--name", self.unique("runpilot-bench"),
                "--label", f"{BENCH_LABEL}=1", *image_and_cmd]
        return self.timed(argv, self.env())

    def record(self, name: str, sample: Sample) -> None:
        if sample.maxrss_kb:
            self.peak_rss_kb.append((name, sample.maxrss_kb))

    # -- engine ----------------------------------------------------------------
    def engine_output(self, *args: str) -> str:
        done = subprocess.run([self.engine, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise BenchError(f"{self.engine} {' '.join(args)}: {done.stderr.strip()[:500]}")
        return done.stdout.strip()

    def check_engine(self) -> None:
        if shutil.which(self.engine) is None:
            raise BenchError(f"{self.engine} is not installed")
        self.engine_output("info")
        try:
            self.engine_output("image", "inspect", BUSYBOX_IMAGE)
        except BenchError:
            raise BenchError(f"image {BUSYBOX_IMAGE} missing: run tests/images/build.sh {self.engine}") from None

    def cleanup(self) -> None:
        """Remove the benchmark's containers (its own label, and RunPilot's for runs in its homes).

        One listing of the engine's labelled containers, matched against the homes' run ids (the
        sweep and Slurm cases leave thousands of runs: one `ps` per run would take minutes).
        """
        run_ids: set[str] = set()
        for home in self.homes:
            runs = home / "runs"
            if runs.is_dir():
                run_ids.update(p.name for p in runs.iterdir())
        ids: set[str] = set()
        if shutil.which(self.engine):
            for label, wanted in ((BENCH_LABEL, None), ("runpilot.run_id", run_ids)):
                done = subprocess.run([self.engine, "ps", "-a", "--filter", f"label={label}", "--format",
                                       "{{.ID}} {{json .Labels}}"], capture_output=True, text=True, timeout=60)
                for line in done.stdout.splitlines():
                    cid, _, labels = line.partition(" ")
                    if cid and (wanted is None or _label_value(labels, label) in wanted):
                        ids.add(cid)
        if ids:
            subprocess.run([self.engine, "rm", "-f", *sorted(ids)], capture_output=True, timeout=120)
            say(f"removed {len(ids)} leftover container(s)")
        shutil.rmtree(self.tmp, ignore_errors=True)


def _label_value(text: str, key: str) -> str | None:
    """A label's value from `ps --format '{{json .Labels}}'`: Podman gives a JSON object, Docker a JSON
    string `k=v,k=v`."""
    try:
        labels = json.loads(text)
    except ValueError:
        return None
    if isinstance(labels, str):
        labels = dict(item.partition("=")[::2] for item in labels.split(",") if item)
    return labels.get(key) if isinstance(labels, dict) else None


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def write_config(path: Path, name: str, engine: str, entrypoint: object, data_dir: Path | None = None) -> Path:
    """A RunPilot config; entrypoint is a shell string or a list (written as JSON, which YAML reads)."""
    text = (f"name: {name}\nengine: {engine}\nimage: \"{BUSYBOX_IMAGE}\"\n"
            f"entrypoint: {json.dumps(entrypoint)}\n")
    if data_dir is not None:
        text += f"mounts:\n  data: \"{data_dir}\"\n"
    path.write_text(text, encoding="utf-8")
    return path


def only_run(home: Path) -> tuple[Path, dict]:
    """The single run folder of HOME (cases 2-3 delete each run after reading it) and its meta.json."""
    runs = [p for p in (home / "runs").iterdir() if p.is_dir()]
    if len(runs) != 1:
        raise BenchError(f"expected one run in {home}, found {len(runs)}")
    return runs[0], json.loads((runs[0] / "meta.json").read_text())


def sample_count(meta: dict) -> int | None:
    """The number of METRIC samples a meta.json records (`samples` since 0.5, `metrics` before)."""
    counts = meta.get("samples") or meta.get("metrics") or {}
    return counts.get("count") if isinstance(counts, dict) else None


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# ==== machine ==================================================================

def machine_lines(bench: Bench) -> list[str]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1]) / 1024 / 1024
    except (OSError, TypeError):
        mem = 0.0
    py = subprocess.run([bench.python, "-c", "import platform; print(platform.python_version())"],
                        capture_output=True, text=True).stdout.strip()
    if bench.engine == "docker":
        versions = bench.engine_output("version", "--format", "client {{.Client.Version}}, server {{.Server.Version}}")
        details = bench.engine_output("info", "--format",
                                      "storage {{.Driver}}, default log driver {{.LoggingDriver}}, "
                                      "runtime {{.DefaultRuntime}}, cgroup v{{.CgroupVersion}}")
    else:
        versions = "podman " + bench.engine_output("version", "--format", "{{.Client.Version}}")
        try:
            details = bench.engine_output("info", "--format",
                                          "storage {{.Store.GraphDriverName}}, default log driver "
                                          "{{.Host.LogDriver}}, runtime {{.Host.OCIRuntime.Name}}, "
                                          "cgroup {{.Host.CgroupsVersion}}")
        except BenchError:
            details = ""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    head = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"], capture_output=True,
                          text=True).stdout.strip()[:72] or "?"
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "runpilot.py"],
                           capture_output=True, text=True).stdout.strip()
    source = RUNPILOT_PY.read_bytes()
    lines = source.count(b"\n")
    return [
        f"runpilot.py: {lines:,} lines, sha256 {hashlib.sha256(source).hexdigest()[:12]}, "
        f"at {head}{' (modified)' if dirty else ''}",
        f"machine: {cpus} CPUs ({model}), {mem:.1f} GiB RAM, {platform.system()} {platform.release()}",
        f"python:  {py} ({bench.python})",
        f"engine:  {bench.engine} — {versions}; {details}",
        f"load:    {loadavg()} (1/5/15 min) at start",
    ]


# ==== case 1: fixed overhead ===================================================

def case_overhead(bench: Bench) -> None:
    reps = bench.reps * 2  # short runs: twice the repetitions
    say(f"\n## 1. Fixed overhead per run ({reps} reps, alternating; load {loadavg()})")
    home = bench.new_home("overhead")
    cfg = write_config(bench.tmp / "overhead.yaml", "bench-overhead", bench.engine, ["true"])

    # Warm-up: bytecode, the image in the page cache, and RunPilot's own command line for variant D.
    bench.runpilot(["run", str(cfg)], home)
    meta = json.loads(next((home / "runs").glob("*/meta.json")).read_text())
    own_argv = list(meta["command"])
    run_label = next(a for a in own_argv if a.startswith("runpilot.run_id="))

    # RunPilot hands the job's environment to the engine through `--env-file /dev/fd/N` (a pipe); bare,
    # the same variables come from a file.
    env_file = bench.tmp / "overhead.env"
    import runpilot as rp
    job_env = rp.job_environment(rp.load_config(cfg), meta["run_id"], bench.engine, bench.env())
    env_file.write_text("".join(f"{k}={v}\n" for k, v in job_env.items() if "\n" not in v))
    own_argv = [str(env_file) if a.startswith("/dev/fd/") else a for a in own_argv]

    def same_flags() -> Sample:
        argv = list(own_argv)
        argv[argv.index("--name") + 1] = bench.unique("runpilot-bench")
        argv[argv.index(run_label)] = f"{BENCH_LABEL}=1"
        return bench.timed(argv, bench.env())

    venv = bench.venv_python()
    variants = {
        "runpilot run (installed: pipx-like venv)": lambda: bench.runpilot(["run", str(cfg)], home, python=venv),
        "bare: run --rm --init IMG true": lambda: bench.bare(["--rm", "--init"], [BUSYBOX_IMAGE, "true"]),
        "python runpilot.py run (copied file)": lambda: bench.timed(
            [bench.clean, str(RUNPILOT_PY), "run", str(cfg)], bench.env(home)),
        "bare: RunPilot's own command (meta.json)": same_flags,
        "runpilot run (import runpilot in this python3)": lambda: bench.runpilot(["run", str(cfg)], home,
                                                                                python=bench.python),
        "python3 -c pass (this python3)": lambda: bench.timed([bench.python, "-c", "pass"], bench.env()),
        "python -c pass (the venv's)": lambda: bench.timed([venv, "-c", "pass"], bench.env()),
    }
    samples = run_variants(variants, reps)  # after one more warm-up round of every variant
    names = list(variants)
    for sample in samples[names[0]]:
        bench.record("1 true", sample)
    walls = {n: median_of(samples[n], "wall") for n in names}
    ref = walls[names[1]].median
    rows = []
    for n in names:
        cpu = median_of(samples[n], "cpu_self").fmt(1000, 0, "ms") if samples[n][0].cpu_self is not None else "–"
        rows.append([n, walls[n].fmt(1000, 0, "ms"), f"{(walls[n].median - ref) * 1000:+.0f} ms",
                     f"{walls[n].median / ref:.2f}×", cpu])
    say(table(["variant", "wall median (min–max)", "vs bare --rm --init", "ratio", "RunPilot's own CPU"], rows))
    say(f"RunPilot's own command line: {shlex.join(own_argv)}")
    extra = (walls[names[0]].median - ref) * 1000
    extra_own = (walls[names[0]].median - walls[names[3]].median) * 1000
    extra_script = (walls[names[2]].median - ref) * 1000
    extra_system = (walls[names[4]].median - ref) * 1000
    start_system, start_venv = walls[names[5]].median * 1000, walls[names[6]].median * 1000
    target = TARGETS["overhead_ms"]
    bench.rows += [
        Row("1", "fixed overhead per run (extra wall vs bare `run --rm --init`)", walls[names[0]].fmt(1000, 0, "ms"),
            walls[names[1]].fmt(1000, 0, "ms"), f"+{extra:.0f} ms", f"≤ {target:.0f} ms", extra <= target),
        Row("1", "… vs bare with RunPilot's own flags", walls[names[0]].fmt(1000, 0, "ms"),
            walls[names[3]].fmt(1000, 0, "ms"), f"+{extra_own:.0f} ms", "", None),
        Row("1", "… as `python runpilot.py run` (copied file)", walls[names[2]].fmt(1000, 0, "ms"),
            walls[names[1]].fmt(1000, 0, "ms"), f"+{extra_script:.0f} ms", "", None),
        Row("1", "… importing runpilot in this python3 (its site-packages .pth files run first)",
            walls[names[4]].fmt(1000, 0, "ms"), walls[names[1]].fmt(1000, 0, "ms"), f"+{extra_system:.0f} ms",
            "", None),
        Row("1", "interpreter start alone: `python -c pass`", f"venv {start_venv:.0f} ms",
            f"this python3 {start_system:.0f} ms", f"{start_system - start_venv:+.0f} ms", "", None),
    ]


# ==== case 2: log throughput ===================================================

@dataclass
class Workload:
    key: str
    label: str
    command: str                  # shell command inside the container; {n} = bytes (the cat file is N bytes)
    default_driver_share: float   # share of the bytes the default-log-driver reference writes (it can be slow)


def case_throughput(bench: Bench) -> None:
    size = 100 * MB if bench.quick else 500 * MB
    reps = bench.reps
    say(f"\n## 2. Log throughput: {size // MB} MB to stdout, terminal output to /dev/null "
        f"({reps} reps, alternating; load {loadavg()})")
    data = bench.tmp / "data"
    data.mkdir(exist_ok=True)
    line = b"epoch 3 batch 1234/5000: forward ok, backward ok, optimizer step done, grad norm 0.734 lr 1e-4\n"
    line = line[:-1].ljust(99, b".") + b"\n"  # 100 bytes
    with open(data / "log100.txt", "wb") as f:
        block = line * 10_000
        for _ in range(size // len(block)):
            f.write(block)
        f.write(line * ((size % len(block)) // len(line)))
    subprocess.run(["cat", str(data / "log100.txt")], stdout=subprocess.DEVNULL, check=True)  # page cache

    workloads = [
        Workload("yes", "`yes | head -c N` (2-byte lines, 4 KiB writes)", "yes | head -c {n}", 0.05),
        Workload("cat", "`cat` of a file of 100-byte lines (64 KiB writes)", "cat /mnt/data/log100.txt", 1.0),
        Workload("zero", "`head -c N /dev/zero` (no newlines, 4 KiB writes)", "head -c {n} /dev/zero", 1.0),
    ]
    # Each variant's wall for a job that exits at once, so that the streaming rate can be told apart from
    # the start-up cost that a whole-run rate also carries.
    home = bench.new_home("tp-start")
    variants = _throughput_variants(bench, "true", "true", data, home, 0)
    starts: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up: bytecode, a new home's runs.db
        fn()
    for _ in range(reps):
        for name, fn in variants.items():
            starts[name].append(fn().wall)
    start_wall = {name: statistics.median(walls) for name, walls in starts.items()}
    say("start-up wall of each variant (a job that exits at once): "
        + ", ".join(f"{name} {wall * 1000:.0f} ms" for name, wall in start_wall.items()))
    for w in workloads:
        _throughput_workload(bench, w, size, reps, data, start_wall)


def _throughput_variants(bench: Bench, cmd_full: str, cmd_small: str, data: Path, home: Path,
                         size: int, key: str = "start") -> dict:
    """runpilot, bare `--log-driver none` and bare with the default driver, for one job command."""
    cfg = write_config(bench.tmp / f"tp-{key}.yaml", f"bench-{key}", bench.engine, cmd_full, data)
    base = ["--rm", "--init", "-v", f"{data}:/mnt/data"]

    def rp() -> Sample:
        s = bench.runpilot(["run", str(cfg)], home)
        run, meta = only_run(home)
        logged = (run / "logs.txt").stat().st_size
        if meta.get("status") != "succeeded" or logged != size:
            raise BenchError(f"RunPilot run {run.name}: status {meta.get('status')}, logs.txt {logged} bytes "
                             f"(expected {size})")
        shutil.rmtree(run)
        if size:
            bench.record(f"2 {key}", s)
        return s
    def tee() -> Sample:
        """The bare run piped into coreutils' tee writing a file: the least any tee to a file costs."""
        argv = [bench.engine, "run", *base, "--log-driver", "none", "--name", bench.unique("runpilot-bench"),
                "--label", f"{BENCH_LABEL}=1", BUSYBOX_IMAGE, "sh", "-c", cmd_full]
        out = bench.tmp / f"tee-{key}.txt"
        try:
            return bench.timed(["sh", "-c", f"{shlex.join(argv)} | tee {shlex.quote(str(out))} >/dev/null"],
                               bench.env())
        finally:
            out.unlink(missing_ok=True)
    return {
        "runpilot run": rp,
        "bare --log-driver none": lambda: bench.bare([*base, "--log-driver", "none"],
                                                     [BUSYBOX_IMAGE, "sh", "-c", cmd_full]),
        TEE_VARIANT: tee,
        "bare, default log driver": lambda: bench.bare(base, [BUSYBOX_IMAGE, "sh", "-c", cmd_small]),
    }


def _throughput_workload(bench: Bench, w: Workload, size: int, reps: int, data: Path,
                         start_wall: dict[str, float]) -> None:
    small = int(size * w.default_driver_share)
    variants = _throughput_variants(bench, w.command.format(n=size), w.command.format(n=small), data,
                                    bench.new_home(f"tp-{w.key}"), size, w.key)
    nbytes = {"runpilot run": size, "bare --log-driver none": size, TEE_VARIANT: size, "bare, default log driver": small}
    samples = run_variants(variants, reps, warmups=0)
    rates = {n: Stats([nbytes[n] / s.wall / MB for s in samples[n]]) for n in variants}
    net = {n: nbytes[n] / max(median_of(samples[n], "wall").median - start_wall[n], 1e-3) / MB for n in variants}
    none = "bare --log-driver none"
    rows = []
    for n in variants:
        ss = samples[n]
        own = Stats([s.cpu_self / (size / 1e9) for s in ss]) if ss[0].cpu_self is not None else None
        cli = Stats([s.cpu_children / (nbytes[n] / 1e9) for s in ss])
        rows.append([n + ("" if nbytes[n] == size else f" ({nbytes[n] // MB} MB)"), rates[n].fmt(1, 1, "MB/s"),
                     f"{rates[n].median / rates[none].median:.2f}×", median_of(ss, "wall").fmt(1, 2, "s"),
                     f"{net[n]:.1f} MB/s ({net[n] / net[none]:.2f}×)",
                     own.fmt(1, 2) if own else "–", cli.fmt(1, 2),
                     f"{max(s.maxrss_kb for s in ss) / 1024:.1f} MB" if own else "–"])
    say(f"\n{w.label}")
    say(table(["variant", "MB/s median (min–max)", "vs none", "wall", "net of start-up", "RunPilot CPU s/GB",
               "CLI CPU s/GB", "RunPilot peak RSS"], rows))
    rp_rate = rates["runpilot run"]
    ratio = rp_rate.median / rates[none].median
    own = Stats([s.cpu_self / (size / 1e9) for s in samples["runpilot run"]])
    default_rate = rates["bare, default log driver"].median
    tee_ratio = rates[TEE_VARIANT].median / rates[none].median
    bench.rows += [
        Row("2", f"throughput, {w.key}: MB/s (ratio to bare `--log-driver none`)", rp_rate.fmt(1, 1, "MB/s"),
            rates[none].fmt(1, 1, "MB/s"),
            f"{ratio:.2f}× (net of start-up {net['runpilot run'] / net[none]:.2f}×; default driver "
            f"{default_rate:.1f} MB/s)", f"≥ {TARGETS['throughput_ratio']}×", ratio >= TARGETS["throughput_ratio"]),
        Row("2", f"… the bare run piped into `tee FILE`, {w.key}", rates[TEE_VARIANT].fmt(1, 1, "MB/s"),
            rates[none].fmt(1, 1, "MB/s"), f"{tee_ratio:.2f}× (RunPilot / tee: {ratio / tee_ratio:.2f}×)", "", None),
        Row("2", f"RunPilot's own CPU per GB, {w.key} (whole run)", own.fmt(1, 2, "s/GB"), "", "",
            f"≤ {TARGETS['cpu_s_per_gb']:.0f} s/GB", own.median <= TARGETS["cpu_s_per_gb"]),
    ]


# ==== case 3: METRIC-heavy output ==============================================

def case_metrics(bench: Bench) -> None:
    n = 200_000 if bench.quick else 1_000_000
    reps = bench.reps
    say(f"\n## 3. METRIC-heavy output: {n:,} lines (`cat` of a mounted file) ({reps} reps, alternating; "
        f"load {loadavg()})")
    data = bench.tmp / "metric-data"
    data.mkdir(exist_ok=True)
    rnd = random.Random(3)
    lines = [f"METRIC step={i} loss={rnd.random() * 2:.6f} acc={rnd.random():.6f}\n" for i in range(n)]
    metric_text = "".join(lines).encode()
    plain_text = metric_text.replace(b"METRIC", b"NOTICE")  # same bytes and lines, no METRIC
    (data / "metric.txt").write_bytes(metric_text)
    (data / "plain.txt").write_bytes(plain_text)
    del lines, plain_text
    home = bench.new_home("metrics")
    configs = {kind: write_config(bench.tmp / f"m-{kind}.yaml", f"bench-{kind}", bench.engine,
                                  ["cat", f"/mnt/data/{kind}.txt"], data) for kind in ("metric", "plain")}
    # the same METRIC run with the runner's own TensorBoard event file (config `tensorboard: true`, issue 25)
    configs["tensorboard"] = bench.tmp / "m-tensorboard.yaml"
    configs["tensorboard"].write_text(configs["metric"].read_text().replace("bench-metric", "bench-tensorboard")
                                      + "tensorboard: true\n")

    def rp(kind: str) -> Sample:
        s = bench.runpilot(["run", str(configs[kind])], home)
        run, meta = only_run(home)
        count = sample_count(meta)
        if meta.get("status") != "succeeded" or count != (0 if kind == "plain" else n):
            raise BenchError(f"run {run.name}: status {meta.get('status')}, {count} samples recorded")
        events = list(run.glob("events.out.tfevents.*"))
        if kind == "tensorboard" and (len(events) != 1 or events[0].stat().st_size < n * 40):
            raise BenchError(f"run {run.name}: no event file of {n:,} events ({events})")
        shutil.rmtree(run)
        bench.record(f"3 {kind}", s)
        return s

    variants = {
        "runpilot run, METRIC lines": lambda: rp("metric"),
        "runpilot run, same bytes without METRIC": lambda: rp("plain"),
        "runpilot run, METRIC lines, tensorboard: true": lambda: rp("tensorboard"),
        "bare --log-driver none, METRIC lines": lambda: bench.bare(
            ["--rm", "--init", "--log-driver", "none", "-v", f"{data}:/mnt/data"],
            [BUSYBOX_IMAGE, "cat", "/mnt/data/metric.txt"]),
    }
    samples = run_variants(variants, reps, warmups=0)
    names = list(variants)
    rows = []
    for name in names:
        ss = samples[name]
        rp_row = ss[0].cpu_self is not None
        rows.append([name, median_of(ss, "wall").fmt(1, 2, "s"),
                     median_of(ss, "cpu_self").fmt(1, 2, "s") if rp_row else "–",
                     Stats([s.cpu_self / n * 1e6 for s in ss]).fmt(1, 2, "µs") if rp_row else "–",
                     f"{max(s.maxrss_kb for s in ss) / 1024:.1f} MB" if rp_row else "–"])
    say(f"{len(metric_text) / MB:.1f} MB of output; metrics.json checked to hold {n:,} samples")
    say(table(["variant", "wall", "RunPilot's own CPU", "CPU per line", "peak RSS"], rows))
    with_m, without = median_of(samples[names[0]], "cpu_self"), median_of(samples[names[1]], "cpu_self")
    per_sample = (with_m.median - without.median) / n * 1e6
    total_per_sample = with_m.median / n * 1e6
    rss = max(s.maxrss_kb for s in samples[names[0]]) / 1024
    bench.rows += [
        Row("3", "METRIC capture: RunPilot CPU per sample (METRIC run − same bytes without)",
            f"{per_sample:.2f} µs", f"whole run: {total_per_sample:.2f} µs/line", "",
            f"≤ {TARGETS['us_per_sample']:.0f} µs", per_sample <= TARGETS["us_per_sample"]),
        Row("3", "METRIC capture with `tensorboard: true` (its run − same bytes without METRIC)",
            f"{(median_of(samples[names[2]], 'cpu_self').median - without.median) / n * 1e6:.2f} µs",
            "of which the event file: "
            f"{(median_of(samples[names[2]], 'cpu_self').median - with_m.median) / n * 1e6:.2f} µs", "",
            "< 5 µs", (median_of(samples[names[2]], "cpu_self").median - without.median) / n * 1e6 < 5),
        Row("3", f"peak RSS, {n:,} METRIC lines", f"{rss:.1f} MB",
            f"without METRIC: {max(s.maxrss_kb for s in samples[names[1]]) / 1024:.1f} MB", "",
            f"< {TARGETS['rss_mb']:.0f} MB", rss < TARGETS["rss_mb"]),
        Row("3", "wall, METRIC run vs bare `--log-driver none`", median_of(samples[names[0]], "wall").fmt(1, 2, "s"),
            median_of(samples[names[3]], "wall").fmt(1, 2, "s"),
            f"{median_of(samples[names[0]], 'wall').median / median_of(samples[names[3]], 'wall').median:.2f}×",
            "", None),
    ]


# ==== case 4: history at scale =================================================

PROJECT_NAMES = [f"{a}-{b}" for a in ("resnet", "vit", "bert", "gpt2", "unet", "mlp")
                 for b in ("baseline", "sweep", "ablation", "finetune", "debug")]
STATUS_WEIGHTS = {"succeeded": 80, "failed": 12, "interrupted": 5, "timeout": 2, "lost": 1}


def history_home(bench: Bench, n: int, rp=None) -> tuple[Path, str, str]:
    """A home with N runs made through the store code of module RP (today's runpilot by default, or the
    old one of case 8); cached. Returns (home, show ref, run id)."""
    if rp is None:
        import runpilot as rp
    shape = hashlib.sha256(f"{getattr(rp, 'SCHEMA', '')}{getattr(rp, 'RUN_COLUMNS', '')}".encode()).hexdigest()[:8]
    key = f"home-s{rp.DB_SCHEMA_VERSION}-{shape}-g{HOME_GENERATION}-n{n}"
    home = CACHE_DIR / key
    marker = home / "bench-complete.json"
    if marker.exists() and not bench.fresh_home:
        info = json.loads(marker.read_text())
        say(f"using the cached home {home} ({n:,} runs, built in {info['build_s']:.0f} s)")
        return home, info["ref"], info["target"]
    shutil.rmtree(home, ignore_errors=True)
    started = time.perf_counter()
    store = rp.RunStore(home)
    with store.db():
        pass  # the real schema and indexes, on an empty runs/ folder
    rnd = random.Random(4)
    when = time.time() - 60
    statuses, weights = list(STATUS_WEIGHTS), list(STATUS_WEIGHTS.values())
    rows, ids = [], []
    for i in range(n):
        when -= rnd.randint(60, 1200)
        start = time.gmtime(when)
        run_id = time.strftime("%Y%m%d-%H%M%S", start) + f"-{rnd.getrandbits(24):06x}"
        status = rnd.choices(statuses, weights)[0]
        duration = round(rnd.uniform(5, 7200), 3)
        exit_code = {"succeeded": 0, "failed": 1, "interrupted": 143, "timeout": 143, "lost": None}[status]
        meta = _fake_meta(run_id, rnd.choice(PROJECT_NAMES), status, start, when, duration, exit_code, rnd, i)
        path = store.runs_dir / run_id
        path.mkdir(mode=0o700)
        rows.append(_write_meta_and_row(rp, path, meta))
        ids.append(run_id)
    with store.db() as conn, rp._transaction(conn):
        conn.executemany(_upsert_sql(rp), rows)
    target = ids[n // 2]
    _full_run_files(rp, store.runs_dir / target)
    ordered = sorted(ids)
    pos = ordered.index(target)
    neighbours = [ordered[j] for j in (pos - 1, pos + 1) if 0 <= j < len(ordered)]
    length = 1 + max(len(os.path.commonprefix([target, other])) for other in neighbours)
    ref = target[:max(length, 13)]
    build_s = time.perf_counter() - started
    marker.write_text(json.dumps({"n": n, "ref": ref, "target": target, "build_s": build_s}))
    say(f"built {home}: {n:,} run folders with meta.json + rows inserted in one transaction ({build_s:.1f} s)")
    return home, ref, target


def _write_meta_and_row(rp, path: Path, meta: dict) -> tuple:
    """Write meta.json as module RP writes it; the index row it makes of it.

    META is in the 0.4 layout (`watched`, `metrics: {count}`), which the old module writes as it is and
    today's reads through RunMeta.from_json (as it reads any older file) and writes in its own layout.
    """
    if hasattr(rp, "RunMeta"):
        typed = rp.RunMeta.from_json(meta, path.name)
        (path / "meta.json").write_bytes(typed.to_json())
        return rp._row(rp.RunRecord.of(typed, path))
    (path / "meta.json").write_bytes(rp._meta_bytes(meta))
    return rp._row(rp.record_from_meta(meta, path))


def _upsert_sql(rp) -> str:
    return rp._UPSERT if hasattr(rp, "_UPSERT") else rp._upsert_sql()


def load_module(path: Path, name: str):
    """Import the runpilot.py at PATH under another module name (the old module beside today's)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


def _fake_meta(run_id, name, status, start, when, duration, exit_code, rnd, i) -> dict:
    started = time.strftime("%Y-%m-%dT%H:%M:%S", start) + ".000Z"
    finished = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when + duration)) + ".000Z"
    container = f"runpilot-{run_id}"
    command = ["docker", "run", "--rm", "--init", "--pull", "never", "--name", container, "--label",
               f"runpilot.run_id={run_id}", "--log-driver", "none", "-e", "PYTHONUNBUFFERED", "-e",
               "RUNPILOT_RUN_ID", "-v", "/home/ana/project:/workspace", "-w", "/workspace", "--gpus", "1",
               "--entrypoint", "/bin/sh", "pytorch/pytorch:2.3.0-cuda12.1-cudnn8-runtime", "-c",
               "python train.py"]
    loss = round(rnd.uniform(0.01, 2), 4)
    return {
        "run_id": run_id, "name": name, "status": status, "started_at": started, "finished_at": finished,
        "duration": duration, "exit_code": exit_code, "engine": "docker", "engine_version": "24.0.7",
        "image": command[-4], "image_id": "sha256:" + "%064x" % rnd.getrandbits(256), "repo_digests": [],
        "command": command, "command_line": " ".join(command), "container": container, "workdir": "/workspace",
        "host": "gpu-box-1", "user": "ana", "runpilot_version": "0.4.0", "python": "3.11.7",
        "os": "Linux-6.1.0-x86_64-with-glibc2.36",
        "runner": {"pid": 1000 + i % 30000, "host": "gpu-box-1", "boot_id": "b" * 36, "start": str(i)},
        "config_file": "/home/ana/project/config.yaml", "tags": {"try": str(i % 7)} if i % 3 == 0 else {},
        "overrides": [], "rerun_of": None, "metrics": {"count": 1000, "malformed": 0},
        "last_metrics": {"loss": loss, "accuracy": round(1 - loss / 2, 4)}, "warnings": [],
    }


def _full_run_files(rp, path: Path) -> None:
    """The run `show` is timed on also has config.yaml, logs.txt and a metrics.json of 1,000 samples."""
    (path / "config.yaml").write_text("name: resnet-baseline\nimage: \"pytorch/pytorch:2.3.0\"\n"
                                      "entrypoint: \"python train.py\"\nmounts:\n  code: .\n")
    (path / "logs.txt").write_bytes(b"epoch 1 batch 10/500 loss 1.234\n" * 3000)
    metrics = rp.MetricLog(path / "metrics.json")
    metrics.add_lines([f"METRIC step={i} loss={2 / (i + 1):.5f} accuracy={1 - 1 / (i + 2):.5f}".encode()
                       for i in range(1000)])
    metrics.close()


def case_history(bench: Bench) -> None:
    n = 20_000 if bench.quick else 100_000
    reps = max(5, bench.reps * 2)
    say(f"\n## 4. History at scale: {n:,} runs ({reps} reps, alternating; load {loadavg()})")
    home, ref, target = history_home(bench, n)
    env = bench.env(home)
    forms = {"python runpilot.py": [bench.clean, str(RUNPILOT_PY)],   # a copied file: compiled at every start
             "python -m runpilot": [bench.clean, "-m", "runpilot"]}    # cached bytecode, as installed
    tasks = {"list": (["list"], "list_ms"), "list --status failed": (["list", "--status", "failed"], "list_ms"),
             f"show {ref}": (["show", ref], "show_ms")}
    commands = {"python -c pass": [bench.clean, "-c", "pass"]}
    for form, prefix in forms.items():
        for task, (args, _) in tasks.items():
            commands[f"{form} {task}"] = [*prefix, *args]
    out = subprocess.run(commands[f"python runpilot.py show {ref}"], env=env, capture_output=True, text=True,
                         cwd=ROOT)
    if out.returncode != 0 or target not in out.stdout:
        raise BenchError(f"runpilot show {ref} did not show {target}: {out.stderr.strip()[:500]}")
    walls = {k: median_of(v, "wall") for k, v in bench.alternate(commands, env, reps).items()}
    base = walls["python -c pass"].median
    say("`python -m runpilot` runs from cached bytecode like an installed `runpilot`; `python runpilot.py` "
        "(a copied file) compiles the whole script at every start")
    say(table(["command (stdout to /dev/null)", "wall median (min–max)", "over python -c pass"],
              [[k, v.fmt(1000, 0, "ms"), f"+{(v.median - base) * 1000:.0f} ms"] for k, v in walls.items()]))
    for form in reversed(forms):
        for task, (_, limit) in tasks.items():
            w = walls[f"{form} {task}"]
            label = "show PREFIX" if task.startswith("show") else task
            bench.rows.append(Row("4", f"`runpilot {label}`, {n:,} runs, as `{form}`", w.fmt(1000, 0, "ms"),
                                  f"python -c pass: {base * 1000:.0f} ms", f"+{(w.median - base) * 1000:.0f} ms",
                                  f"< {TARGETS[limit]:.0f} ms", w.median * 1000 < TARGETS[limit]))


# ==== case 5: start-up =========================================================

IMPORTTIME_RE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)\s*$")


def importtime(bench: Bench, flags: list[str], module: Path = ROOT) -> tuple[float, list[tuple[int, str]]]:
    """Cumulative µs of the top-level `runpilot` import, and its direct imports' cumulative µs."""
    done = subprocess.run([bench.clean, *flags, "-X", "importtime", "-c", "import runpilot"], cwd=module,
                          env=bench.env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"import runpilot failed: {done.stderr[-1000:]}")
    entries = [m.groups() for m in map(IMPORTTIME_RE.match, done.stderr.splitlines()) if m]
    top = min(len(e[2]) for e in entries)
    idx = max(i for i, e in enumerate(entries) if e[3] == "runpilot" and len(e[2]) == top)
    children = []
    for self_us, cum_us, indent, name in reversed(entries[:idx]):
        if len(indent) == top:
            break
        if len(indent) == top + 2:
            children.append((int(cum_us), name))
    return float(entries[idx][1]), sorted(children, reverse=True)


def case_startup(bench: Bench) -> None:
    reps = max(5, bench.reps * 2)
    say(f"\n## 5. Start-up ({reps} reps, alternating; load {loadavg()})")
    plain, clean = [], []
    children: list[tuple[int, str]] = []
    importtime(bench, [])  # bytecode
    for _ in range(reps):
        plain.append(importtime(bench, [])[0] / 1e6)
        cum, children = importtime(bench, ["-S"])
        clean.append(cum / 1e6)
    commands = {
        "python -c pass": [bench.clean, "-c", "pass"],
        "python -c 'import runpilot'": [bench.clean, "-c", "import runpilot"],
        "python runpilot.py --help": [bench.clean, str(RUNPILOT_PY), "--help"],
        "python -m runpilot --help": [bench.clean, "-m", "runpilot", "--help"],
    }
    env = bench.env()
    walls = {k: median_of(v, "wall") for k, v in bench.alternate(commands, env, reps).items()}
    base = walls["python -c pass"].median
    sp, sc = Stats(plain), Stats(clean)
    say(table(["measure", "median (min–max)", "over python -c pass"],
              [["-X importtime: runpilot cumulative (the venv, as installed)", sp.fmt(1000, 1, "ms"), ""],
               ["-S -X importtime (no site at all)", sc.fmt(1000, 1, "ms"), ""]]
              + [[k, v.fmt(1000, 0, "ms"), f"+{(v.median - base) * 1000:.0f} ms"] for k, v in walls.items()]))
    say("heaviest direct imports of runpilot (-S, cumulative): "
        + ", ".join(f"{name} {us / 1000:.1f} ms" for us, name in children[:8]))
    preloaded = subprocess.run([bench.clean, "-c", "import sys; print(len(sys.modules))"],
                               capture_output=True, text=True, env=env).stdout.strip()
    preloaded_s = subprocess.run([bench.clean, "-S", "-c", "import sys; print(len(sys.modules))"],
                                 capture_output=True, text=True, env=env).stdout.strip()
    say(f"(the venv's interpreter has {preloaded} modules loaded at start with site, {preloaded_s} with -S)")
    limit = TARGETS["import_ms"]
    bench.rows += [
        Row("5", "`import runpilot` (-X importtime, cumulative, in the venv)", sp.fmt(1000, 1, "ms"),
            f"with -S: {sc.median * 1000:.1f} ms", "", f"< {limit:.0f} ms", sp.median * 1000 < limit),
        Row("5", "`runpilot --help`, whole process", walls["python -m runpilot --help"].fmt(1000, 0, "ms"),
            f"python -c pass: {base * 1000:.0f} ms",
            f"+{(walls['python -m runpilot --help'].median - base) * 1000:.0f} ms "
            f"(`python runpilot.py --help`: +{(walls['python runpilot.py --help'].median - base) * 1000:.0f} ms)",
            "", None),
    ]
    version_startup(bench, reps)


def version_startup(bench: Bench, reps: int) -> None:
    """`runpilot --version` as a copied file (compiled at every start) and installed (issue 14).

    The copied file lies alone in a fresh folder and runs under `python3 -B`: no __pycache__ beside it
    and none written, as when someone copies runpilot.py to a login node and runs it. The file before
    the refactor (OLD_COMMIT) is shown the same way, so that the cost of the file's growth stays visible.
    """
    copied, old_copied = bench.tmp / "copied", bench.tmp / "old-copied"
    for folder, source in ((copied, RUNPILOT_PY), (old_copied, bench.old_dir / "runpilot.py")):
        folder.mkdir(exist_ok=True)
        shutil.copy2(source, folder / "runpilot.py")
    script = bench.installed()
    lines = {"today": RUNPILOT_PY.read_text().count("\n"), "old": (old_copied / "runpilot.py").read_text().count("\n")}
    commands = {
        "python3 -c pass (this python3)": [bench.python, "-c", "pass"],
        "python -c pass (a venv's)": [bench.clean, "-c", "pass"],
        "python3 -B runpilot.py --version (copied file, this python3)": [bench.python, "-B",
                                                                         str(copied / "runpilot.py"), "--version"],
        "python -B runpilot.py --version (copied file, a venv's python)": [bench.clean, "-B",
                                                                           str(copied / "runpilot.py"), "--version"],
        f"… the same, runpilot.py of {OLD_COMMIT} (before the refactor)": [
            bench.clean, "-B", str(old_copied / "runpilot.py"), "--version"],
        "runpilot --version (installed: pip into a venv, as pipx)": [str(script), "--version"],
    }
    env = bench.installed_env()
    walls = {k: median_of(v, "wall") for k, v in bench.alternate(commands, env, reps).items()}
    say(f"\n`runpilot --version`: runpilot.py has {lines['today']:,} lines today, {lines['old']:,} at {OLD_COMMIT}")
    names = list(commands)
    base = {name: walls[names[0] if "this python3" in name else names[1]].median for name in names}
    say(table(["command (stdout to /dev/null)", "wall median (min–max)", "over its python -c pass"],
              [[k, v.fmt(1000, 0, "ms"), f"+{(v.median - base[k]) * 1000:.0f} ms"] for k, v in walls.items()]))
    copied_sys, copied_venv, old_venv, inst = (walls[n] for n in names[2:6])
    bench.rows += [
        Row("5", "`python3 -B runpilot.py --version`, copied file (no bytecode cache), whole process",
            copied_sys.fmt(1000, 0, "ms"), f"python3 -c pass: {base[names[2]] * 1000:.0f} ms",
            f"+{(copied_sys.median - base[names[2]]) * 1000:.0f} ms; a venv's python: "
            f"{copied_venv.median * 1000:.0f} ms (+{(copied_venv.median - base[names[3]]) * 1000:.0f} ms)", "", None),
        Row("5", f"… the copied file of {OLD_COMMIT} ({lines['old']:,} lines; today {lines['today']:,})",
            old_venv.fmt(1000, 0, "ms"), f"today: {copied_venv.median * 1000:.0f} ms",
            f"{(copied_venv.median - old_venv.median) * 1000:+.0f} ms", "", None),
        Row("5", "`runpilot --version` installed (pip into a venv, as pipx), whole process",
            inst.fmt(1000, 0, "ms"), f"python -c pass: {base[names[5]] * 1000:.0f} ms",
            f"+{(inst.median - base[names[5]]) * 1000:.0f} ms", "", None),
    ]


# ==== case 6: config parsing ===================================================

def generated_config(lines_wanted: int = 2000) -> tuple[str, dict]:
    """A YAML config of about LINES_WANTED lines and the data it must parse to."""
    rnd = random.Random(6)
    out = ["# Generated by tests/bench.py: a large RunPilot-style config for the parser benchmark.",
           "# It mixes nested mappings, sequences, quoted strings, comments and block scalars.",
           'name: "bench-config"', "image: 'runpilot-test-python:latest'", 'entrypoint: ["python", "train.py"]',
           "experiments:"]
    data: dict = {"name": "bench-config", "image": "runpilot-test-python:latest",
                  "entrypoint": ["python", "train.py"], "experiments": {}}
    i = 0
    while len(out) < lines_wanted - 1:
        key = f"exp_{i:03d}"
        lr, dropout, seed = round(rnd.uniform(1e-4, 1e-2), 6), round(rnd.uniform(0, 0.5), 3), rnd.randint(0, 9999)
        layers = [rnd.choice((64, 128, 256, 512)) for _ in range(3)]
        exp = {
            "description": f"Run {i}: the baseline with a larger batch.\nSecond line of notes.\n",
            "model": {"layers": layers, "dropout": dropout, "activation": "gelu", "name": f"net-{i}"},
            "optimizer": {"name": "adam", "lr": lr, "betas": [0.9, 0.999], "weight_decay": 0.01},
            "schedule": [{"step": 0, "lr": lr}, {"step": 1000, "lr": round(lr / 2, 7)}],
            "tags": ["baseline", "it's quoted", "tab\there"],
            "notes": "Folded text that goes on and on across several lines.\n",
            "env": {"EPOCHS": 10 + i % 5, "DATA_DIR": f"/mnt/data/shard-{i}", "DEBUG": False},
            "enabled": i % 2 == 0,
            "seed": seed,
            "checkpoint": None,
        }
        data["experiments"][key] = exp
        out += [
            f"  {key}:",
            f"    # experiment {i}",
            "    description: |",
            f"      Run {i}: the baseline with a larger batch.",
            "      Second line of notes.",
            "    model:",
            f"      layers: [{', '.join(map(str, layers))}]",
            f"      dropout: {dropout}",
            "      activation: 'gelu'   # a trailing comment",
            f'      name: "net-{i}"',
            "    optimizer:",
            "      name: adam",
            f"      lr: {lr}",
            "      betas: [0.9, 0.999]",
            "      weight_decay: 0.01",
            "    schedule:",
            "      - step: 0",
            f"        lr: {lr}",
            "      - step: 1000",
            f"        lr: {round(lr / 2, 7)}",
            "    tags:",
            '      - "baseline"',
            "      - 'it''s quoted'",
            '      - "tab\\there"',
            "    notes: >",
            "      Folded text that goes on",
            "      and on across several lines.",
            "    env:",
            f"      EPOCHS: {10 + i % 5}",
            f'      DATA_DIR: "/mnt/data/shard-{i}"',
            "      DEBUG: false",
            f"    enabled: {'true' if i % 2 == 0 else 'false'}",
            f"    seed: {seed}",
            "    checkpoint: null",
            "",
        ]
        i += 1
    return "\n".join(out) + "\n", data


def first_difference(a: object, b: object, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                return f"{path}.{key}: missing on one side"
            diff = first_difference(a[key], b[key], f"{path}.{key}")
            if diff:
                return diff
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next((d for j, (x, y) in enumerate(zip(a, b)) if (d := first_difference(x, y, f"{path}[{j}]"))),
                    None)
    if a != b or type(a) is not type(b):
        return f"{path}: parsed {a!r}, expected {b!r}"
    return None


def case_yaml(bench: Bench) -> None:
    import runpilot as rp
    reps = max(20, bench.reps * 4)
    text, expected = generated_config()
    nlines = text.count("\n")
    say(f"\n## 6. Config parsing: {nlines:,} lines, {len(text) / 1000:.0f} kB through runpilot.parse_yaml "
        f"({reps} reps, in process)")
    if "@@YAML@@" in RUNPILOT_PY.read_text():
        say("NOTE: section 6 of runpilot.py is still the temporary PyYAML shim: this measures PyYAML")
    try:
        parsed = rp.parse_yaml(text, "bench.yaml")
    except Exception as exc:  # a parser that rejects the file: say so, do not stop the other cases
        say(f"parse_yaml raised {type(exc).__name__}: {exc}")
        bench.rows.append(Row("6", f"{nlines:,}-line config, parse_yaml", "error", "", str(exc)[:60],
                              f"< {TARGETS['yaml_ms']:.0f} ms", False))
        return
    diff = first_difference(parsed, expected)
    say("parsed data matches the generated data" if diff is None else f"WARNING: parsed data differs: {diff}")
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        rp.parse_yaml(text, "bench.yaml")
        times.append(time.perf_counter() - start)
    located = []
    for _ in range(max(5, reps // 4)):
        start = time.perf_counter()
        rp.parse_yaml_located(text, "bench.yaml")
        located.append(time.perf_counter() - start)
    st = Stats(times)
    say(f"parse_yaml: {st.fmt(1000, 1, 'ms')}; parse_yaml_located: {Stats(located).fmt(1000, 1, 'ms')}; "
        f"{st.median / nlines * 1e6:.1f} µs per line")
    bench.rows.append(Row("6", f"{nlines:,}-line config through parse_yaml", st.fmt(1000, 1, "ms"),
                          "" if diff is None else "result differs!", f"{st.median / nlines * 1e6:.1f} µs/line",
                          f"< {TARGETS['yaml_ms']:.0f} ms", st.median * 1000 < TARGETS["yaml_ms"]))


# ==== case 7: plots ===========================================================

def plot_run(rp, store, name: str, n: int, seed: int) -> str:
    """A finished run of N samples of loss and acc, written through RunPilot's own MetricLog; its id."""
    folder = store.create_run_dir()
    rnd = random.Random(seed)
    log = rp.MetricLog(folder.metrics)
    for start in range(0, n, 10_000):
        log.add_lines([f"METRIC step={i} loss={2 / (1 + i * seed / 20_000) + rnd.random() * 0.1:.5f} "
                       f"acc={1 - 1 / (1 + i * seed / 30_000) - rnd.random() * 0.05:.5f}".encode()
                       for i in range(start, min(n, start + 10_000))])
    log.close()
    folder.config.write_text(f"name: {name}\nengine: local\nentrypoint: [python3, train.py]\n"
                             f"env:\n  SEED: {seed}\nmetrics: [loss, acc]\n")
    now = rp.utc_now()
    meta = rp.RunMeta(folder.run_id, name=name, status=rp.SUCCEEDED, started_at=now, finished_at=now,
                      duration=60.0, exit_code=0, engine="local", metric_names=["loss", "acc"],
                      last_metrics=dict(log.last), samples={"count": log.count, "malformed": 0})
    folder.write_meta(meta, durable=False)
    store.save(meta)
    return folder.run_id


def case_plot(bench: Bench) -> None:
    import runpilot as rp
    n, runs, steps = 1_000_000, 10, 100_000
    reps = max(3, bench.reps)
    say(f"\n## 7. Plots: `runpilot plot` of one run of {n:,} samples (loss, acc), and the `--html` page of "
        f"{runs} runs x {steps:,} steps ({reps} reps, alternating; load {loadavg()})")
    home = bench.new_home("plot")
    store = rp.RunStore(home)
    started = time.perf_counter()
    big = plot_run(rp, store, "big", n, 1)
    many = [plot_run(rp, store, f"run{i}", steps, i + 1) for i in range(runs)]
    size = (home / "runs" / big / "metrics.json").stat().st_size
    say(f"wrote the runs in {time.perf_counter() - started:.0f} s; metrics.json of the big run: {size / MB:.1f} MB")
    page, smooth_page = bench.tmp / "plot.html", bench.tmp / "plot-smooth.html"
    variants = {
        "runpilot plot ID (80 x 24 per chart)": lambda: bench.runpilot(["plot", big, "--no-color"], home),
        "runpilot plot ID --smooth 0.6": lambda: bench.runpilot(["plot", big, "--no-color", "--smooth", "0.6"], home),
        f"runpilot plot {runs} IDS --html FILE": lambda: bench.runpilot(["plot", *many, "--html", str(page)], home),
        f"runpilot plot {runs} IDS --html FILE --smooth 0.6": lambda: bench.runpilot(
            ["plot", *many, "--html", str(smooth_page), "--smooth", "0.6"], home),
        "python -c pass": lambda: bench.timed([bench.clean, "-c", "pass"], bench.env()),
    }
    samples = run_variants(variants, reps)  # the warm-up reads bytecode and the page cache
    names = list(variants)
    say(table(["variant", "wall", "RunPilot's own CPU", "peak RSS"],
              [[name, median_of(samples[name], "wall").fmt(1000, 0, "ms"),
                median_of(samples[name], "cpu_self").fmt(1000, 0, "ms") if samples[name][0].cpu_self else "–",
                f"{max(s.maxrss_kb for s in samples[name]) / 1024:.1f} MB" if samples[name][0].maxrss_kb else "–"]
               for name in names]))
    wall = median_of(samples[names[0]], "wall")
    rss = max(s.maxrss_kb for s in samples[names[0]]) / 1024
    base = median_of(samples[names[-1]], "wall").median
    html_mb, smooth_mb = page.stat().st_size / MB, smooth_page.stat().st_size / MB
    say(f"HTML page: {html_mb:.2f} MB ({smooth_mb:.2f} MB with --smooth 0.6: a faint raw line under each curve)")
    bench.rows += [
        Row("7", f"`runpilot plot`, one run of {n:,} samples (2 metrics), whole process", wall.fmt(1000, 0, "ms"),
            f"python -c pass: {base * 1000:.0f} ms",
            f"--smooth 0.6: {median_of(samples[names[1]], 'wall').median * 1000:.0f} ms",
            f"< {TARGETS['plot_s']:.0f} s", wall.median < TARGETS["plot_s"]),
        Row("7", "… its peak RSS", f"{rss:.1f} MB", f"{size / MB:.0f} MB of metrics.json", "",
            f"< {TARGETS['plot_rss_mb']:.0f} MB", rss < TARGETS["plot_rss_mb"]),
        Row("7", f"`--html` page, {runs} runs x {steps:,} steps (2 metrics)", f"{html_mb:.2f} MB",
            f"--smooth 0.6: {smooth_mb:.2f} MB", f"written in {median_of(samples[names[2]], 'wall').median:.2f} s",
            f"< {TARGETS['html_mb']:.0f} MB", max(html_mb, smooth_mb) < TARGETS["html_mb"]),
    ]


# ==== case 8: the removed fast paths, old module beside today's ==================

def case_fastpaths(bench: Bench) -> None:
    """What each fast path that issue 14 removed bought, on whole processes (README: Performance)."""
    old = bench.old_dir
    say(f"\n## 8. The removed fast paths: runpilot.py of {OLD_COMMIT} (before the refactor) beside today's, "
        f"on {bench.engine} (load {loadavg()})")
    say("Each fast path of the old module is switched off in turn (replaced by the plain path it fell back "
        "to); today's module has only the plain paths, and has grown (sweeps, Slurm, plots, typed records).")
    _fastpath_runs(bench, old)
    _fastpath_metrics(bench, old)
    _fastpath_import(bench, old)
    _fastpath_list(bench, old)


def _fastpath_runs(bench: Bench, old: Path) -> None:
    reps = bench.reps * 4  # differences of 10-30 ms on runs of 200-500 ms
    image_fp = "docker_api" if bench.engine == "docker" else "podman_cache"
    image_label = ("Docker socket image check" if bench.engine == "docker"
                   else "Podman image-answer cache")
    cfg = write_config(bench.tmp / "fp-true.yaml", "bench-fastpath", bench.engine, ["true"])
    home_new, home_old = bench.new_home("fp-new"), bench.new_home("fp-old")
    variants = {
        "today's runpilot run": lambda: bench.runpilot(["run", str(cfg)], home_new),
        f"{OLD_COMMIT} as it was": lambda: bench.runpilot(["run", str(cfg)], home_old, module=old),
        f"{OLD_COMMIT} without the {image_label}": lambda: bench.runpilot(["run", str(cfg)], home_old, module=old,
                                                                         off=(image_fp,)),
        f"{OLD_COMMIT} without the engine-version cache": lambda: bench.runpilot(
            ["run", str(cfg)], home_old, module=old, off=("version_cache",)),
        f"{OLD_COMMIT} without lazy imports": lambda: bench.runpilot(["run", str(cfg)], home_old, module=old,
                                                                     off=("lazy",)),
        f"{OLD_COMMIT} with all three off": lambda: bench.runpilot(
            ["run", str(cfg)], home_old, module=old, off=(image_fp, "version_cache", "lazy")),
        "bare: run --rm --init IMG true": lambda: bench.bare(["--rm", "--init"], [BUSYBOX_IMAGE, "true"]),
    }
    samples = run_variants(variants, reps)
    names = list(variants)
    walls = {n: median_of(samples[n], "wall") for n in names}
    as_was = walls[names[1]].median
    rows = []
    for n in names:
        ss = samples[n]
        rp_row = ss[0].cpu_self is not None
        rows.append([n, walls[n].fmt(1000, 0, "ms"), f"{(walls[n].median - as_was) * 1000:+.0f} ms",
                     median_of(ss, "cpu_self").fmt(1000, 0, "ms") if rp_row else "–",
                     median_of(ss, "cpu_children").fmt(1000, 0, "ms")])
    say(f"\nA run of `true` on {bench.engine} ({reps} reps, alternating; load {loadavg()})")
    say(table(["variant", "wall median (min–max)", f"vs {OLD_COMMIT} as it was", "RunPilot's own CPU",
               "engine CLI CPU"], rows))
    _plain_paths(bench, reps)
    bare = walls[names[-1]].median
    bench.rows += [
        Row("8", f"run of `true` on {bench.engine}: today vs {OLD_COMMIT} (overhead over bare `run --rm --init`)",
            f"{walls[names[0]].median * 1000:.0f} ms (+{(walls[names[0]].median - bare) * 1000:.0f})",
            f"{as_was * 1000:.0f} ms (+{(as_was - bare) * 1000:.0f})",
            f"{(walls[names[0]].median - as_was) * 1000:+.0f} ms per run", "", None),
    ]
    def more(name: str, attr: str) -> float:
        """Milliseconds of ATTR (median) the variant NAME takes beyond the old module as it was."""
        return (median_of(samples[name], attr).median - median_of(samples[names[1]], attr).median) * 1000

    for n in names[2:6]:
        what = n.removeprefix(f"{OLD_COMMIT} ")
        bench.rows.append(Row("8", f"… {OLD_COMMIT} {what}: what it saved per run", walls[n].fmt(1000, 0, "ms"),
                              f"as it was: {as_was * 1000:.0f} ms",
                              f"{(walls[n].median - as_was) * 1000:+.0f} ms wall, {more(n, 'cpu_self'):+.0f} ms own "
                              f"CPU, {more(n, 'cpu_children'):+.0f} ms CLI CPU", "", None))


def _plain_paths(bench: Bench, reps: int) -> None:
    """What the fast paths saved a run from doing, alone: the engine CLI calls of the plain paths (today's
    image check and engine-version probe; the probe runs in a thread beside the job's start)."""
    fmt = "{{.Server.Version}}" if bench.engine == "docker" else "{{.Client.Version}}"
    commands = {
        f"{bench.engine} image inspect IMG (the image check)": [bench.engine, "image", "inspect", "--format",
                                                                 "{{.Id}}|{{json .RepoDigests}}", BUSYBOX_IMAGE],
        f"{bench.engine} version (the engine-version probe)": [bench.engine, "version", "--format", fmt],
    }
    samples = bench.alternate(commands, bench.env(), reps)
    say(table(["the plain path alone, whole process", "wall median (min–max)", "its CPU"],
              [[k, median_of(v, "wall").fmt(1000, 0, "ms"), median_of(v, "cpu_children").fmt(1000, 0, "ms")]
               for k, v in samples.items()]))
    bench.rows.append(Row("8", f"the plain paths alone: `{bench.engine} image inspect` / `{bench.engine} version`",
                          " / ".join(median_of(v, "wall").fmt(1000, 0, "ms") for v in samples.values()),
                          "", "CPU " + " / ".join(f"{median_of(v, 'cpu_children').median * 1000:.0f} ms"
                                                  for v in samples.values()), "", None))


def _fastpath_metrics(bench: Bench, old: Path) -> None:
    n = 200_000 if bench.quick else 1_000_000
    reps = bench.reps
    data = bench.tmp / "fp-metric-data"
    data.mkdir(exist_ok=True)
    rnd = random.Random(8)
    metric_text = "".join(f"METRIC step={i} loss={rnd.random() * 2:.6f} acc={rnd.random():.6f}\n"
                          for i in range(n)).encode()
    (data / "metric.txt").write_bytes(metric_text)
    (data / "plain.txt").write_bytes(metric_text.replace(b"METRIC", b"NOTICE"))
    configs = {kind: write_config(bench.tmp / f"fp-{kind}.yaml", f"bench-fp-{kind}", bench.engine,
                                  ["cat", f"/mnt/data/{kind}.txt"], data) for kind in ("metric", "plain")}
    homes = {"new": bench.new_home("fp-m-new"), "old": bench.new_home("fp-m-old")}

    def rp(which: str, kind: str, off: tuple[str, ...] = ()) -> Sample:
        home = homes[which]
        s = bench.runpilot(["run", str(configs[kind])], home, module=old if which == "old" else ROOT, off=off)
        run, meta = only_run(home)
        count = sample_count(meta)
        if meta.get("status") != "succeeded" or count != (n if kind == "metric" else 0):
            raise BenchError(f"run {run.name} ({which}): status {meta.get('status')}, {count} samples recorded")
        shutil.rmtree(run)
        return s

    variants = {
        "today, METRIC lines": lambda: rp("new", "metric"),
        "today, same bytes without METRIC": lambda: rp("new", "plain"),
        f"{OLD_COMMIT}, METRIC lines": lambda: rp("old", "metric"),
        f"{OLD_COMMIT}, same bytes without METRIC": lambda: rp("old", "plain"),
        f"{OLD_COMMIT} without the block fast path, METRIC lines": lambda: rp("old", "metric", ("fast_block",)),
    }
    samples = run_variants(variants, reps, warmups=0)
    names = list(variants)
    cpu = {k: median_of(v, "cpu_self") for k, v in samples.items()}
    per = {
        "today": (cpu[names[0]].median - cpu[names[1]].median) / n * 1e6,
        OLD_COMMIT: (cpu[names[2]].median - cpu[names[3]].median) / n * 1e6,
        f"{OLD_COMMIT}, no fast path": (cpu[names[4]].median - cpu[names[3]].median) / n * 1e6,
    }
    say(f"\nMETRIC capture: {n:,} lines ({len(metric_text) / MB:.0f} MB, `cat` of a mounted file) "
        f"({reps} reps, alternating; load {loadavg()})")
    say(table(["variant", "wall", "RunPilot's own CPU", "peak RSS"],
              [[k, median_of(v, "wall").fmt(1, 2, "s"), cpu[k].fmt(1, 2, "s"),
                f"{max(x.maxrss_kb for x in v) / 1024:.1f} MB"] for k, v in samples.items()]))
    say("CPU per sample (METRIC run − the same bytes without METRIC): "
        + "; ".join(f"{k} {v:.2f} µs" for k, v in per.items()))
    bench.rows.append(Row("8", f"METRIC CPU per sample ({n:,} lines): today vs {OLD_COMMIT} (its block fast path)",
                          f"{per['today']:.2f} µs", f"{per[OLD_COMMIT]:.2f} µs",
                          f"{OLD_COMMIT} without the fast path: {per[f'{OLD_COMMIT}, no fast path']:.2f} µs; "
                          f"today costs {(per['today'] - per[OLD_COMMIT]) * n / 1e6:+.2f} s of CPU per "
                          f"{n:,} samples", "", None))


def _fastpath_import(bench: Bench, old: Path) -> None:
    reps = max(5, bench.reps * 2)
    lazy = "import argparse, difflib, getpass, selectors, shutil, socket, sqlite3, subprocess, unicodedata"
    importtime(bench, [], ROOT)
    importtime(bench, [], old)
    cum = {"today": [], OLD_COMMIT: []}
    for _ in range(reps):
        cum["today"].append(importtime(bench, [], ROOT)[0] / 1e6)
        cum[OLD_COMMIT].append(importtime(bench, [], old)[0] / 1e6)
    variants = {
        "python -c pass": lambda: bench.timed([bench.clean, "-c", "pass"], bench.env()),
        "today: python -c 'import runpilot'": lambda: bench.timed([bench.clean, "-c", "import runpilot"],
                                                                  bench.env(), cwd=ROOT),
        f"{OLD_COMMIT}: python -c 'import runpilot'": lambda: bench.timed([bench.clean, "-c", "import runpilot"],
                                                                         bench.env(), cwd=old),
        f"{OLD_COMMIT}, lazy modules imported first": lambda: bench.timed(
            [bench.clean, "-c", f"{lazy}; import runpilot"], bench.env(), cwd=old),
    }
    samples = run_variants(variants, reps)
    walls = {k: median_of(v, "wall") for k, v in samples.items()}
    names = list(variants)
    base = walls[names[0]].median
    say(f"\n`import runpilot` ({reps} reps, alternating; load {loadavg()})")
    say(table(["measure", "median (min–max)", "over python -c pass"],
              [[f"-X importtime, runpilot cumulative: {k}", Stats(v).fmt(1000, 1, "ms"), ""] for k, v in cum.items()]
              + [[k, v.fmt(1000, 0, "ms"), f"+{(v.median - base) * 1000:.0f} ms"] for k, v in walls.items()]))
    bench.rows += [
        Row("8", f"`import runpilot` (-X importtime): today vs {OLD_COMMIT}", Stats(cum["today"]).fmt(1000, 1, "ms"),
            Stats(cum[OLD_COMMIT]).fmt(1000, 1, "ms"),
            f"whole process: {walls[names[1]].median * 1000:.0f} vs {walls[names[2]].median * 1000:.0f} ms; "
            f"{OLD_COMMIT} without its lazy imports: {walls[names[3]].median * 1000:.0f} ms", "", None),
    ]


def _fastpath_list(bench: Bench, old: Path) -> None:
    n = 20_000 if bench.quick else 100_000
    reps = max(5, bench.reps * 2)
    home_new, _, _ = history_home(bench, n)
    home_old, _, _ = history_home(bench, n, load_module(old / "runpilot.py", "runpilot_old"))
    variants = {
        "today: runpilot list": lambda: bench.runpilot(["list"], home_new),
        f"{OLD_COMMIT}: runpilot list": lambda: bench.runpilot(["list"], home_old, module=old),
        f"{OLD_COMMIT} without lazy imports: runpilot list": lambda: bench.runpilot(["list"], home_old, module=old,
                                                                                   off=("lazy",)),
        "python -c pass": lambda: bench.timed([bench.clean, "-c", "pass"], bench.env()),
    }
    samples = run_variants(variants, reps)
    names = list(variants)
    walls = {k: median_of(v, "wall") for k, v in samples.items()}
    base = walls[names[-1]].median
    say(f"\n`runpilot list` on {n:,} runs ({reps} reps, alternating; load {loadavg()})")
    say(table(["variant", "wall median (min–max)", "over python -c pass", "RunPilot's own CPU"],
              [[k, v.fmt(1000, 0, "ms"), f"+{(v.median - base) * 1000:.0f} ms",
                median_of(samples[k], "cpu_self").fmt(1000, 0, "ms") if samples[k][0].cpu_self else "–"]
               for k, v in walls.items()]))
    bench.rows.append(Row("8", f"`runpilot list`, {n:,} runs: today vs {OLD_COMMIT}",
                          walls[names[0]].fmt(1000, 0, "ms"), walls[names[1]].fmt(1000, 0, "ms"),
                          f"{(walls[names[0]].median - walls[names[1]].median) * 1000:+.0f} ms; {OLD_COMMIT} "
                          f"without lazy imports: {walls[names[2]].median * 1000:.0f} ms", "", None))


# ==== case 9: sweeps ============================================================

def case_sweeps(bench: Bench) -> None:
    """Issue 15: a sweep's cost over the same commands under xargs, and `list --sweep` of a big sweep."""
    say(f"\n## 9. Sweeps on engine local (load {loadavg()})")
    _sweep_vs_xargs(bench)
    _list_sweep(bench)


def _sweep_vs_xargs(bench: Bench) -> None:
    points, parallel = 100, 4
    reps = bench.reps
    grid = f"env.I={','.join(map(str, range(points)))}"
    jobs = {"true": ["true"], "sleep 0.5": ["sleep", "0.5"]}
    variants: dict = {}
    for label, argv in jobs.items():
        cfg = bench.tmp / f"sweep-{argv[0]}.yaml"
        cfg.write_text(f"name: bench-sweep\nengine: local\nentrypoint: {json.dumps(argv)}\n")
        home = bench.new_home(f"sweep-{argv[0]}")
        xargs = ["sh", "-c", f"seq {points} | xargs -P {parallel} -I{{}} {shlex.join(argv)}"]
        variants[f"runpilot sweep, {points} x `{label}`, --parallel {parallel}"] = (
            lambda cfg=cfg, home=home: bench.runpilot(["sweep", str(cfg), "--grid", grid, "--parallel",
                                                       str(parallel)], home))
        variants[f"xargs -P {parallel}, {points} x `{label}`"] = (
            lambda xargs=xargs: bench.timed(xargs, bench.env()))
    samples = run_variants(variants, reps)
    names = list(variants)
    say(f"\n{points} runs, {parallel} at a time ({reps} reps, alternating; load {loadavg()}). RunPilot's own CPU "
        "is its process alone (the jobs are its children); total CPU is the whole process tree")
    for label, argv in jobs.items():
        say(f"the last sweep of `{label}`, from its runs' meta.json: " + sweep_timeline(
            bench.tmp / f"home-sweep-{argv[0]}", parallel, float(argv[1]) if len(argv) > 1 else 0.0))
    rows = []
    for name in names:
        ss = samples[name]
        own = median_of(ss, "cpu_self") if ss[0].cpu_self is not None else None
        total = Stats([(s.cpu_self or 0) + (s.cpu_children or 0) for s in ss])
        rows.append([name, median_of(ss, "wall").fmt(1, 2, "s"),
                     own.fmt(1000 / points, 1, "ms") if own else "–", total.fmt(1000 / points, 1, "ms")])
    say(table(["variant", "wall median (min–max)", "RunPilot's own CPU per run", "total CPU per run"], rows))
    for i, label in enumerate(jobs):
        sweep, xargs = samples[names[2 * i]], samples[names[2 * i + 1]]
        ratio = median_of(sweep, "wall").median / median_of(xargs, "wall").median
        extra = (median_of(sweep, "wall").median - median_of(xargs, "wall").median) / points * parallel * 1000
        own = median_of(sweep, "cpu_self").median / points * 1000
        total = (statistics.median((s.cpu_self or 0) + (s.cpu_children or 0) for s in sweep)
                 - statistics.median(s.cpu_children for s in xargs)) / points * 1000
        bench.rows.append(Row("9", f"sweep of {points} x `{label}`, --parallel {parallel}, vs `xargs -P {parallel}`",
                              median_of(sweep, "wall").fmt(1, 2, "s"), median_of(xargs, "wall").fmt(1, 2, "s"),
                              f"{ratio:.2f}× wall (+{extra:.0f} ms per run and slot); RunPilot's CPU "
                              f"{own:.1f} ms per run (tree minus xargs': {total:.1f} ms)", "", None))


def sweep_timeline(home: Path, parallel: int, job_s: float) -> str:
    """Where a sweep's time goes: inside each run (duration beyond the job's own) and between runs
    (from a run's end to the start of the run that takes its place)."""
    import runpilot as rp
    metas = [rp.RunFolder(p).read_meta() for p in sorted((home / "runs").iterdir()) if p.is_dir()]
    last = max(m.sweep.get("id") or "" for m in metas)
    metas = [m for m in metas if m.sweep.get("id") == last and m.started_at and m.finished_at]
    starts = sorted(rp.parse_time(m.started_at).timestamp() for m in metas)
    ends = sorted(rp.parse_time(m.finished_at).timestamp() for m in metas)
    inside = [(m.duration or 0) - job_s for m in metas]
    gaps = [s - e for s, e in zip(starts[parallel:], ends)]
    if not gaps:
        return "too few runs to tell"
    return (f"{len(metas)} runs; each run's duration beyond the job's {job_s:g}s: median "
            f"{statistics.median(inside) * 1000:.0f} ms; from a run's end to the next run's start in its slot: "
            f"median {statistics.median(gaps) * 1000:.0f} ms (max {max(gaps) * 1000:.0f} ms)")


def sweep_home(bench: Bench, rp, runs: int, finished: bool) -> tuple[Path, str]:
    """A home holding one sweep of RUNS points, planned by runpilot.plan_sweep (folders, config.yaml,
    meta.json, one index transaction) and, when FINISHED, every run then recorded succeeded."""
    home = bench.new_home(f"sweep-{runs}-{'done' if finished else 'queued'}")
    store = rp.RunStore(home)
    cfg = bench.tmp / "sweep-list.yaml"
    cfg.write_text("name: lr-grid\nengine: local\nentrypoint: [python3, train.py]\nmetrics: [loss, acc]\n")
    data, text, positions = rp.load_config_data(cfg)
    axes = (("env.LR", tuple(round(10 ** (-1 - 3 * i / runs), 8) for i in range(runs))),)
    points = rp.sweep_points(axes, 1)
    configs = [(p, rp.point_config(data, str(cfg), text, positions, {}, p, 1)) for p in points]
    sweep_id = rp.new_sweep_id()
    sweep = rp.plan_sweep(store, sweep_id, configs, axes, 1, {"parallel": 4}, str(cfg))
    if finished:
        rnd = random.Random(9)
        rows = []
        for point in sweep.points:
            folder = store.folder(point.run_id)
            meta = folder.read_meta()
            loss = round(rnd.uniform(0.05, 2), 5)
            meta.status, meta.exit_code, meta.duration = rp.SUCCEEDED, 0, round(rnd.uniform(60, 600), 3)
            meta.finished_at, meta.runner = rp.utc_now(), {}
            meta.last_metrics = {"loss": loss, "acc": round(1 - loss / 2, 5)}
            meta.samples = {"count": 1000, "malformed": 0}
            folder.write_meta(meta, durable=False)
            rows.append(rp._row(rp.RunRecord.of(meta, folder.path)))
        with store.db() as conn, rp._transaction(conn):
            conn.executemany(rp._UPSERT, rows)
    return home, sweep_id


def _list_sweep(bench: Bench) -> None:
    import runpilot as rp
    runs = 1000
    reps = max(5, bench.reps * 2)
    script = bench.installed()
    started = time.perf_counter()
    done_home, done_id = sweep_home(bench, rp, runs, finished=True)
    queued_home, queued_id = sweep_home(bench, rp, runs, finished=False)
    say(f"\nplanned two sweeps of {runs:,} runs through runpilot.plan_sweep in {time.perf_counter() - started:.1f} s")
    for home, sweep_id, status in ((done_home, done_id, "succeeded"), (queued_home, queued_id, "queued")):
        out = subprocess.run([str(script), "list", "--sweep", sweep_id, "--json"], env=bench.installed_env(home),
                             capture_output=True, text=True, timeout=120)
        listed = json.loads(out.stdout) if out.returncode == 0 else []
        if len(listed) != runs or any(r["status"] != status for r in listed):
            raise BenchError(f"list --sweep {sweep_id} --json gave {len(listed)} runs (expected {runs} {status}): "
                             f"{out.stderr.strip()[:300]}")
    variants = {
        f"list --sweep ID, {runs:,} finished runs": lambda: bench.timed(
            [str(script), "list", "--sweep", done_id], bench.installed_env(done_home)),
        f"list --sweep ID, {runs:,} queued runs (the sweep's runner alive)": lambda: bench.timed(
            [str(script), "list", "--sweep", queued_id], bench.installed_env(queued_home)),
        f"list --sweep ID --json, {runs:,} finished runs": lambda: bench.timed(
            [str(script), "list", "--sweep", done_id, "--json"], bench.installed_env(done_home)),
        "python -c pass (the installed venv's)": lambda: bench.timed([str(script.parent / "python"), "-c", "pass"],
                                                                     bench.installed_env()),
    }
    samples = run_variants(variants, reps)
    walls = {k: median_of(v, "wall") for k, v in samples.items()}
    names = list(variants)
    base = walls[names[-1]].median
    say(f"\n`runpilot list --sweep ID` (installed; {reps} reps, alternating; load {loadavg()})")
    say(table(["command (stdout to /dev/null)", "wall median (min–max)", "over python -c pass"],
              [[k, v.fmt(1000, 0, "ms"), f"+{(v.median - base) * 1000:.0f} ms"] for k, v in walls.items()]))
    limit = TARGETS["list_sweep_ms"]
    for name in names[:2]:
        command, runs_said = name.split(", ", 1)
        bench.rows.append(Row("9", f"`runpilot {command}`, {runs_said}, installed, whole process",
                              walls[name].fmt(1000, 0, "ms"), f"python -c pass: {base * 1000:.0f} ms",
                              f"+{(walls[name].median - base) * 1000:.0f} ms", f"< {limit:.0f} ms",
                              walls[name].median * 1000 < limit))


# ==== case 10: Slurm ============================================================

def case_slurm(bench: Bench) -> None:
    """Issue 16: `list` with 1,000 active Slurm runs (one squeue call), and a 100-point array submitted."""
    say(f"\n## 10. Slurm (load {loadavg()})")
    _slurm_list(bench)
    _slurm_submit(bench)


def fake_queue(bench: Bench, bin_dir: Path, rows: int, first_id: int) -> list[tuple[str, str, str | None]]:
    """(job id, state, reason) of every job the squeue stand-in lists, as RunPilot asks it."""
    env = bench.env(RUNPILOT_FAKE_SQUEUE_ROWS=str(rows), RUNPILOT_FAKE_SQUEUE_FIRST_ID=str(first_id))
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(["squeue", "-h", "-r", "--me", "-t", "all", "-o", "%i|%T|%r|%N|%P"], env=env,
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise BenchError(f"the squeue stand-in failed: {done.stderr.strip()[:300]}")
    jobs = []
    for line in done.stdout.splitlines():
        job, state, reason = line.split("|")[:3]
        jobs.append((job, state, None if reason in ("None", "(null)") else reason))
    return jobs


def slurm_home(bench: Bench, rp, jobs: list[tuple[str, str, str | None]], runs: int) -> Path:
    """A home with RUNS Slurm runs, queued or running as the stand-in's queue says, one job each."""
    home = bench.new_home("slurm-list")
    store = rp.RunStore(home)
    rows = []
    for job, state, reason in jobs[:runs]:
        folder = store.create_run_dir()
        status = rp.slurm_status(state)
        meta = rp.RunMeta(folder.run_id, name="train-on-cluster", status=status, started_at=rp.utc_now(),
                          engine="podman", image="pytorch/pytorch:2.3.0", metric_names=["loss"],
                          reason=reason if status == rp.QUEUED else None,
                          slurm={"job_id": job, "partition": "gpu", "state": state, "submitted_from": rp.hostname()})
        folder.write_meta(meta, durable=False)
        rows.append(rp._row(rp.RunRecord.of(meta, folder.path)))
    with store.db() as conn, rp._transaction(conn):
        conn.executemany(rp._UPSERT, rows)
    return home


def _slurm_list(bench: Bench) -> None:
    import runpilot as rp
    runs, first_id = 1000, 5000
    reps = max(5, bench.reps * 2)
    bin_dir = bench.tmp / "squeue-bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "squeue").exists():
        os.symlink(SQUEUE_STANDIN, bin_dir / "squeue")  # the stand-in alone (fixtures also hold nvidia-smi)
    jobs = fake_queue(bench, bin_dir, runs, first_id)
    if len(jobs) < runs:
        raise BenchError(f"the squeue stand-in listed {len(jobs)} jobs, fewer than {runs}")
    home = slurm_home(bench, rp, jobs, runs)
    log = bench.tmp / "squeue-calls.jsonl"
    script = bench.installed()
    env = bench.installed_env(home, RUNPILOT_FAKE_SQUEUE_ROWS=str(runs), RUNPILOT_FAKE_SQUEUE_FIRST_ID=str(first_id),
                              RUNPILOT_FAKE_SQUEUE_LOG=str(log))
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    calls: dict[str, list[int]] = {}

    def counted(name: str, args: list[str]):
        def run() -> Sample:
            log.write_text("")
            sample = bench.timed([str(script), *args], env)
            calls.setdefault(name, []).append(len(log.read_text().splitlines()))
            return sample
        return run

    queued = sum(1 for _, state, _ in jobs[:runs] if rp.slurm_status(state) == rp.QUEUED)
    variants = {
        "runpilot list": counted("runpilot list", ["list"]),
        "runpilot list --all": counted("runpilot list --all", ["list", "--all"]),
        "runpilot list --status queued": counted("runpilot list --status queued", ["list", "--status", "queued"]),
        "squeue stand-in alone (one call)": lambda: bench.timed(
            ["squeue", "-h", "-r", "--me", "-t", "all", "-o", "%i|%T|%r|%N|%P"], env),
        "python -c pass (the installed venv's)": lambda: bench.timed([str(script.parent / "python"), "-c", "pass"],
                                                                     bench.installed_env()),
    }
    samples = run_variants(variants, reps)
    out = subprocess.run([str(script), "list", "--all", "--json"], env=env, capture_output=True, text=True, timeout=120)
    listed = json.loads(out.stdout) if out.returncode == 0 else []
    wrong = sum(1 for r in listed if r["status"] not in rp.ACTIVE_STATUSES)
    walls = {k: median_of(v, "wall") for k, v in samples.items()}
    names = list(variants)
    base = walls[names[-1]].median
    say(f"\n{runs:,} active Slurm runs ({runs - queued} running, {queued} queued), squeue = tests/fixtures/squeue "
        f"listing {len(jobs):,} jobs; installed runpilot ({reps} reps, alternating; load {loadavg()})")
    say(table(["command (stdout to /dev/null)", "wall median (min–max)", "over python -c pass",
               "squeue calls per command"],
              [[k, v.fmt(1000, 0, "ms"), f"+{(v.median - base) * 1000:.0f} ms",
                ", ".join(map(str, sorted(set(calls[k])))) if k in calls else "–"] for k, v in walls.items()]))
    say(f"`list --all --json` afterwards: {len(listed)} runs, {wrong} not queued/running")
    if len(listed) != runs or wrong:
        say("WARNING: the runs did not all stay active: the figures above include re-recording them")
    limit = TARGETS["slurm_list_ms"]
    for name in names[:2]:
        once = set(calls[name]) == {1}
        bench.rows.append(Row("10", f"`{name}`, {runs:,} active Slurm runs (squeue stand-in), installed",
                              walls[name].fmt(1000, 0, "ms"), f"python -c pass: {base * 1000:.0f} ms",
                              f"+{(walls[name].median - base) * 1000:.0f} ms; squeue calls per list: "
                              f"{', '.join(map(str, sorted(set(calls[name]))))}",
                              f"< {limit:.0f} ms, 1 squeue call", walls[name].median * 1000 < limit and once))


def _slurm_submit(bench: Bench) -> None:
    points = 100
    reps = max(2, bench.reps)
    sinfo = shutil.which("sinfo")
    reason = None
    if sinfo is None or shutil.which("sbatch") is None:
        reason = "sinfo/sbatch are not installed"
    else:
        try:
            done = subprocess.run([sinfo, "-h"], capture_output=True, text=True, timeout=15)
            if done.returncode != 0 or not done.stdout.strip():
                reason = f"sinfo does not answer ({(done.stderr.strip() or 'no partition')[:200]})"
        except subprocess.TimeoutExpired:
            reason = "sinfo did not answer within 15 s"
    if reason:
        say(f"\n`sweep --on slurm` of {points} points: skipped: {reason}")
        bench.rows.append(Row("10", f"`sweep --on slurm`, {points} points", "skipped", "", reason, "1 sbatch call",
                              None))
        return
    real_sbatch = shutil.which("sbatch")
    bin_dir = bench.tmp / "sbatch-bin"
    bin_dir.mkdir(exist_ok=True)
    calls = bench.tmp / "sbatch-calls.txt"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$*" >> {shlex.quote(str(calls))}\n'
                                    f'exec {shlex.quote(real_sbatch)} "$@"\n')
    (bin_dir / "sbatch").chmod(0o755)
    cfg = bench.tmp / "slurm-sweep.yaml"
    cfg.write_text("name: bench-slurm-sweep\nengine: local\nentrypoint: [\"true\"]\n")
    grid = f"env.I={','.join(map(str, range(points)))}"
    env_extra = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    samples, counts, arrays = [], [], []
    try:
        for rep in range(reps + 1):  # the first is a warm-up
            home = bench.new_home(f"slurm-sweep-{rep}")
            calls.write_text("")
            # --parallel 1: at most one task of the array starts before it is cancelled
            sample = bench.runpilot(["sweep", str(cfg), "--grid", grid, "--on", "slurm", "--parallel", "1", "-d"],
                                    home, extra_env=env_extra)
            array = _cancel_array(home)
            if array:
                arrays.append(array)
            if rep:
                samples.append(sample)
                counts.append(len(calls.read_text().splitlines()))
    finally:
        for array in arrays:
            subprocess.run(["scancel", array], capture_output=True, timeout=60)
    wall, own = median_of(samples, "wall"), median_of(samples, "cpu_self")
    say(f"\n`runpilot sweep CONFIG --grid (100 values) --on slurm --parallel 1 -d` against the real cluster "
        f"({reps} reps; each array scancelled at once: {', '.join(arrays)}; load {loadavg()})")
    say(table(["measure", "median (min–max)"],
              [["wall, whole process", wall.fmt(1000, 0, "ms")], ["RunPilot's own CPU", own.fmt(1000, 0, "ms")],
               ["sbatch calls per sweep", ", ".join(map(str, counts))]]))
    bench.rows.append(Row("10", f"`sweep --on slurm -d`, {points} points, real Slurm (one job array)",
                          wall.fmt(1000, 0, "ms"), f"own CPU {own.median * 1000:.0f} ms",
                          f"sbatch calls: {', '.join(map(str, counts))}", "1 sbatch call", set(counts) == {1}))


def _cancel_array(home: Path) -> str | None:
    """scancel the job array of the one sweep in HOME at once; its id."""
    for meta_file in (home / "runs").glob("*/meta.json"):
        array = (json.loads(meta_file.read_text()).get("slurm") or {}).get("array_job_id")
        if array:
            subprocess.run(["scancel", str(array)], capture_output=True, timeout=60)
            return str(array)
    return None


# ==== case 11: metrics_from =====================================================

# What each variant asks for: nothing (METRIC only), one recogniser, or every recogniser and two patterns.
METRICS_FROM_VARIANTS = {
    "METRIC only (default)": "",
    "metrics_from: [tqdm]": "metrics_from: [tqdm]\n",
    "metrics_from: 3 recognisers + 2 patterns": (
        "metrics_from:\n  - huggingface\n  - keras\n  - tqdm\n"
        "  - pattern: '^step (?P<step>\\d+): train loss (?P<train_loss>[^,\\s]+), val loss (?P<val_loss>[^,\\s]+)'\n"
        "  - pattern: '^iter (?P<step>\\d+): loss (?P<loss>[^,\\s]+), time (?P<iter_ms>[^,\\s]+)ms'\n"),
}


def metrics_from_logs(quick: bool) -> dict[str, tuple[bytes, int, int]]:
    """The two workloads: name -> (output, its lines, the samples the patterns/recognisers find)."""
    epochs, updates = (20, 3000) if quick else (100, 6000)   # a tqdm bar at 100 updates/s: 60 s an epoch
    chatty = b"".join(
        b"".join(f"\rEpoch {e}: {u * 100 // updates:3d}%|#####| {u}/{updates} [00:{u // 100:02d}<00:00, 100.0it/s, "
                 f"loss={1 / (u + 1):.4f}, acc={u / updates:.4f}]".encode() for u in range(1, updates + 1)) + b"\n"
        for e in range(epochs))
    iters = 50_000 if quick else 200_000                       # nanoGPT: one line per iteration, quiet otherwise
    quiet = b"".join(f"iter {i}: loss {4 - i / iters:.4f}, time 40.80ms, mfu 0.03%\n".encode() for i in range(iters))
    return {"chatty (tqdm, 100 updates/s)": (chatty, epochs * updates, epochs),
            "quiet (nanoGPT lines)": (quiet, iters, iters)}


def case_metrics_from(bench: Bench) -> None:
    """Runner CPU of metrics_from beside METRIC-only capture, engine local (`cat` of a log)."""
    reps = bench.reps
    say(f"\n## 11. metrics_from: recognisers and patterns beside METRIC lines ({reps} reps, alternating; "
        f"engine local, `cat` of a log; load {loadavg()})")
    home = bench.new_home("metrics-from")
    rows = []
    for workload, (data, lines, samples_expected) in metrics_from_logs(bench.quick).items():
        log = bench.tmp / f"mf-{len(data)}.log"
        log.write_bytes(data)
        configs = {}
        for i, (variant, extra) in enumerate(METRICS_FROM_VARIANTS.items()):
            configs[variant] = bench.tmp / f"mf-{len(data)}-{i}.yaml"
            configs[variant].write_text(f"name: mf\nengine: local\nentrypoint: [cat, {json.dumps(str(log))}]\n{extra}")

        def rp(variant: str) -> Sample:
            s = bench.runpilot(["run", str(configs[variant])], home)
            run, meta = only_run(home)
            if meta.get("status") != "succeeded":
                raise BenchError(f"run {run.name}: status {meta.get('status')}")
            s.samples = sample_count(meta)
            shutil.rmtree(run)
            bench.record(f"11 {variant}", s)
            return s

        samples = run_variants({v: (lambda v=v: rp(v)) for v in METRICS_FROM_VARIANTS}, reps, warmups=0)
        base = median_of(samples["METRIC only (default)"], "cpu_self").median
        for variant, ss in samples.items():
            cpu = median_of(ss, "cpu_self")
            count = ss[0].samples or 0
            extra_us = (cpu.median - base) * 1e6
            extra_us = max(extra_us, 0.0)  # below the noise: shown as 0
            rows.append([workload, variant, f"{len(data) / MB:.1f} MB, {lines:,} lines", f"{count:,}",
                         cpu.fmt(1, 2, "s"), f"{extra_us / lines:.2f} µs" if variant != "METRIC only (default)" else "–",
                         f"{extra_us / count:.1f} µs" if count else "–"])
        bench.rows.append(Row("11", f"metrics_from, all sources, {workload}: extra CPU per line",
                              rows[-1][5], f"per sample {rows[-1][6]}", f"{rows[-1][3]} samples", "", None))
    say(table(["workload", "variant", "output", "samples", "RunPilot's own CPU", "extra CPU per line",
               "extra CPU per sample"], rows))


# ==== case 12: code snapshots ==================================================

def snapshot_folder(root: Path, files: int = 1000, size: int = 20 << 20) -> Path:
    """A code folder of FILES files holding SIZE bytes in all (random, so nothing compresses or dedups)."""
    folder = root / "snapshot-code"
    rnd = random.Random(23)
    each = size // files
    for i in range(files):
        path = folder / f"pkg{i // 100}" / f"mod{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rnd.randbytes(each))
    return folder


def case_snapshots(bench: Bench) -> None:
    reps = bench.reps * 2
    say(f"\n## 12. Code snapshots at a run's start: 1,000 files, 20 MiB, engine local ({reps} reps; load {loadavg()})")
    folder = snapshot_folder(bench.tmp)
    cfg = bench.tmp / "snapshot.yaml"
    cfg.write_text(f"name: bench-snapshot\nengine: local\nentrypoint: [\"true\"]\nmounts:\n  code: \"{folder}\"\n")
    bare = bench.tmp / "snapshot-bare.yaml"
    bare.write_text("name: bench-snapshot\nengine: local\nentrypoint: [\"true\"]\n")
    warm = bench.new_home("snapshot-warm")
    bench.runpilot(["run", str(cfg)], warm)
    fresh = iter(range(10_000))
    variants = {
        "run, no code mount (the fixed start cost)": lambda: bench.runpilot(["run", str(bare)], warm),
        "run, code mount, snapshot first time (empty home)": lambda: bench.runpilot(
            ["run", str(cfg)], bench.new_home(f"snapshot-first-{next(fresh)}")),
        "run, code mount, folder unchanged": lambda: bench.runpilot(["run", str(cfg)], warm),
        "run, code mount, --live-code": lambda: bench.runpilot(["run", str(cfg), "--live-code"], warm),
    }
    samples = run_variants(variants, reps)
    names = list(variants)
    walls = {n: median_of(samples[n], "wall") for n in names}
    ref = walls[names[0]].median
    say(table(["variant", "wall median (min–max)", "vs no code mount", "RunPilot's own CPU"],
              [[n, walls[n].fmt(1000, 0, "ms"), f"{(walls[n].median - ref) * 1000:+.0f} ms",
                median_of(samples[n], "cpu_self").fmt(1000, 0, "ms")] for n in names]))
    runs = len(list((warm / "runs").iterdir()))
    grown = sum(p.stat().st_size for p in warm.rglob("*") if p.is_file())
    code = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    say(f"home after {runs} runs of the 20 MiB folder: {grown / MB:.1f} MB (the folder: {code / MB:.1f} MB)")
    for n, label in ((names[1], "first time"), (names[2], "unchanged folder")):
        bench.rows.append(Row("12", f"snapshot of 1,000 files / 20 MiB at a run's start, {label}",
                              walls[n].fmt(1000, 0, "ms"), walls[names[0]].fmt(1000, 0, "ms"),
                              f"+{(walls[n].median - ref) * 1000:.0f} ms", "", None))
    bench.rows.append(Row("12", f"home after {runs} runs of that folder", f"{grown / MB:.1f} MB",
                          f"folder {code / MB:.1f} MB", f"{grown / code:.2f}×", "", None))



# ==== 13. your other GPU boxes over SSH ========================================

SSH_BOXES = ("runpilot-box1", "runpilot-box2")  # tests/ssh/setup.sh: 2 and 4 GPUs (the nvidia-smi stand-in)


def ssh_box_problem(host: str) -> str | None:
    done = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", host,
                           f"docker image inspect {BUSYBOX_IMAGE} >/dev/null && python3 -V"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    return None if done.returncode == 0 else done.stderr.strip()[:200] or f"exit {done.returncode}"


def case_ssh(bench: Bench) -> None:
    """Issue 24: a run's fixed cost over ssh against `ssh box docker run` by hand (cold and warm
    connections), and a 100-point sweep over two boxes against xargs -P over ssh."""
    say(f"\n## 13. Your other GPU boxes over SSH (load {loadavg()})")
    for host in SSH_BOXES:
        if (why := ssh_box_problem(host)) is not None:
            say(f"skipped: box {host} does not answer with docker and {BUSYBOX_IMAGE} ({why}); start the boxes "
                "with bash tests/ssh/setup.sh (as root)")
            return
    box_home = f"runpilot-bench-{os.getpid()}"
    try:
        _ssh_fixed_cost(bench, box_home)
        _ssh_sweep(bench, box_home)
    finally:
        for host in SSH_BOXES:
            subprocess.run(["ssh", "-o", "BatchMode=yes", host, f"rm -rf ~/{box_home}"], capture_output=True,
                           timeout=120, stdin=subprocess.DEVNULL)


def _ssh_fixed_cost(bench: Bench, box_home: str) -> None:
    reps, box = bench.reps * 2, SSH_BOXES[0]
    home = bench.new_home("ssh-run")
    cfg = bench.tmp / "ssh-run.yaml"
    cfg.write_text(f"name: bench-ssh\nengine: {bench.engine}\nimage: {BUSYBOX_IMAGE}\nentrypoint: [\"true\"]\n"
                   f"ssh:\n  home: ~/{box_home}\n")
    hand_socket = bench.tmp / "ssh-hand-%C"
    warm_flags = ["-o", "ControlMaster=auto", "-o", f"ControlPath={hand_socket}", "-o", "ControlPersist=120"]
    by_hand = ["ssh", "-o", "BatchMode=yes", box, f"{bench.engine} run --rm --init {BUSYBOX_IMAGE} true"]

    def cold_runpilot() -> Sample:  # no shared connection: RunPilot opens its master first
        subprocess.run(["ssh", "-o", f"ControlPath={home}/ssh/%C", "-O", "exit", box], capture_output=True)
        return bench.runpilot(["run", str(cfg), "--on", f"ssh:{box}"], home)

    variants = {
        "runpilot run --on ssh, cold (a new connection)": cold_runpilot,
        "ssh box docker run --rm --init IMG true, cold": lambda: bench.timed(by_hand, bench.env()),
        "runpilot run --on ssh, warm (its shared connection)": lambda: bench.runpilot(
            ["run", str(cfg), "--on", f"ssh:{box}"], home),
        "ssh box docker run ..., warm (ControlMaster)": lambda: bench.timed(
            [*by_hand[:1], *warm_flags, *by_hand[1:]], bench.env()),
    }
    samples = run_variants(variants, reps)  # the warm-up sends runpilot.py to the box once
    names = list(variants)
    say(f"{reps} reps, alternating; box {box} is a user of this machine with its own sshd (loopback)")
    say(table(["variant", "wall median (min–max)"], [[n, median_of(samples[n], "wall").fmt(1000, 0, "ms")]
                                                     for n in names]))
    for i, kind in ((0, "cold"), (2, "warm")):
        ours, hand = median_of(samples[names[i]], "wall").median, median_of(samples[names[i + 1]], "wall").median
        bench.rows.append(Row("13", f"a run of `true` over ssh ({kind}) vs `ssh box {bench.engine} run` by hand",
                              f"{ours * 1000:.0f} ms", f"{hand * 1000:.0f} ms",
                              f"{ours / hand:.2f}× (+{(ours - hand) * 1000:.0f} ms)", "", None))


def _ssh_sweep(bench: Bench, box_home: str) -> None:
    points, pool = 100, 6  # the boxes' 2 + 4 GPUs
    home = bench.new_home("ssh-sweep")
    cfg = bench.tmp / "ssh-sweep.yaml"
    cfg.write_text(f"name: bench-ssh-sweep\nengine: local\nentrypoint: [\"true\"]\nresources: {{gpus: 1}}\n"
                   f"ssh:\n  home: ~/{box_home}\n")
    socket = bench.tmp / "ssh-xargs-%C"
    one = (f"ssh -o BatchMode=yes -o ControlMaster=auto -o ControlPath={socket} -o ControlPersist=120 "
           f"runpilot-box$(( $0 % 2 + 1 )) true")
    xargs = ["sh", "-c", f"seq {points} | xargs -P {pool} -n 1 sh -c {shlex.quote(one)}"]
    grid = f"env.I={','.join(map(str, range(points)))}"
    hosts = ",".join(SSH_BOXES)
    variants = {
        f"runpilot sweep, {points} x `true` on 2 boxes": lambda: bench.runpilot(
            ["sweep", str(cfg), "--grid", grid, "--on", f"ssh:{hosts}"], home),
        f"xargs -P {pool} over ssh (warm), {points} x `true`": lambda: bench.timed(xargs, bench.env()),
    }
    reps = max(1, bench.reps // 2)
    samples = run_variants(variants, reps, warmups=0)
    names = list(variants)
    say(f"{points} points over two boxes ({reps} rep(s); RunPilot places each on a free GPU of a box)")
    say(table(["variant", "wall median (min–max)"], [[n, median_of(samples[n], "wall").fmt(1, 1, "s")]
                                                     for n in names]))
    ours, hand = median_of(samples[names[0]], "wall").median, median_of(samples[names[1]], "wall").median
    bench.rows.append(Row("13", f"a sweep of {points} x `true` over two boxes vs `xargs -P {pool}` and ssh",
                          f"{ours:.1f} s", f"{hand:.1f} s",
                          f"{ours / hand:.1f}× (+{(ours - hand) / points * pool * 1000:.0f} ms per run and slot)",
                          "", None))


# ==== main =====================================================================

CASES = {1: case_overhead, 2: case_throughput, 3: case_metrics, 4: case_history, 5: case_startup, 6: case_yaml,
         7: case_plot, 8: case_fastpaths, 9: case_sweeps, 10: case_slurm, 11: case_metrics_from,
         12: case_snapshots, 13: case_ssh}
ENGINE_CASES = {1, 2, 3, 8}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Prints a plain-text report ending in a markdown table.")
    parser.add_argument("--engine", choices=("docker", "podman"), default="docker")
    parser.add_argument("--quick", action="store_true",
                        help="fewer reps and smaller sizes (100 MB, 200k METRIC lines, 20k runs): about 5 minutes")
    parser.add_argument("--reps", type=int, help="repetitions per variant (default 5, --quick 2); short cases "
                                                 "run twice as many")
    parser.add_argument("--cases", default="1,2,3,4,5,6,7,8,9,10,11,12,13", help="comma-separated case numbers (default all)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for RunPilot (default: this one)")
    parser.add_argument("--fresh-home", action="store_true", help="rebuild the cached history home of case 4")
    args = parser.parse_args(argv)
    if args.reps is None:
        args.reps = 2 if args.quick else 5
    try:
        args.cases = sorted({int(c) for c in args.cases.split(",") if c.strip()})
    except ValueError:
        parser.error(f"--cases {args.cases!r}: give numbers such as 1,2,5")
    if not set(args.cases) <= set(CASES):
        parser.error(f"--cases: known cases are {', '.join(map(str, CASES))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    bench = Bench(args)
    PYCACHE_DIR.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    failures = []
    try:
        if ENGINE_CASES & set(args.cases):
            bench.check_engine()
        say(f"# RunPilot benchmark ({'quick' if args.quick else 'full'}; cases {','.join(map(str, args.cases))})")
        say("\n".join(machine_lines(bench)))
        subprocess.run([bench.clean, "-c", "import runpilot"], cwd=ROOT, env=bench.env(), check=True)
        for number in args.cases:
            try:
                CASES[number](bench)
            except BenchError as exc:
                say(f"case {number} FAILED: {exc}")
                failures.append(number)
    except KeyboardInterrupt:
        say("\ninterrupted")
        return 130
    except BenchError as exc:
        say(f"bench: error: {exc}")
        return 1
    finally:
        bench.cleanup()
    if bench.peak_rss_kb:
        name, worst = max(bench.peak_rss_kb, key=lambda x: x[1])
        bench.rows.append(Row("1-3", "RunPilot's peak RSS over every run above", f"{worst / 1024:.1f} MB",
                              f"worst: case {name}", "", f"< {TARGETS['rss_mb']:.0f} MB",
                              worst / 1024 < TARGETS["rss_mb"]))
    say(f"\n## Summary ({args.engine}, {'quick' if args.quick else 'full'}, {time.monotonic() - started:.0f} s, "
        f"load at end {loadavg()})\n")
    say(table(["case", "measure", "RunPilot", "reference", "comparison", "target", "result"],
              [[r.case, r.measure, r.runpilot, r.reference, r.compare, r.target, r.verdict] for r in bench.rows]))
    misses = [r for r in bench.rows if r.ok is False]
    say(f"\n{len([r for r in bench.rows if r.ok])} target(s) met, {len(misses)} missed"
        + (f"; case(s) {failures} failed to run" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
