"""RunPilot: run a training job in a container, keep every byte it prints, remember the run.

Pipeline::

    config.yaml -> JobConfig -> engine argv -> container -> tee(logs.txt, METRIC) -> runs/<id>/ + runs.db

Examples::

    runpilot run examples/quickstart/config.yaml     # stream, record, exit with the job's status
    runpilot sweep config.yaml --grid env.LR=0.1,0.01 # one run per point, one per free GPU
    runpilot list                                     # newest runs first
    runpilot plot latest                              # learning curves in the terminal

Exit status of ``runpilot run`` is the job's own status, except:

    0       the job succeeded          2    bad config or usage (nothing recorded)
    1       RunPilot error             124  the run hit its ``timeout``
    125     the engine failed to start the container (bad flag, missing image, daemon down)
    128+N   the run was stopped by signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP)

The module is standard library only, Python 3.10+: copy it onto a box and run
``python runpilot.py run config.yaml``, install it (console script ``runpilot``), or import it.
"""

# ==== 2. Imports and version =================================================

from __future__ import annotations

import sys as _sys

# Run as a script or as the `runpilot` command: a Ctrl-C while Python loads the rest of this file ends
# it quietly, as the default action does (no traceback); main() then takes Ctrl-C over. A library's
# import changes nothing.
if __name__ == "__main__" or _sys.argv[:1] and _sys.argv[0].rsplit("/", 1)[-1] == "runpilot":
    import _signal  # built in and already loaded: `signal` would first be looked for on disk
    if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)

import argparse
import contextlib
import dataclasses
import datetime as _dt
import fcntl
import functools
import io
import itertools
import json
import math
import operator
import os
import re
import select
import selectors
import shlex
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

__version__ = "0.6.0"

__all__ = [
    "ConfigError", "EngineError", "GpuError", "JobConfig", "Mount", "Resources", "RunEvent", "RunFilter",
    "RunFolder", "RunMeta", "RunOptions", "RunPilotError", "RunRecord", "RunStore", "SlurmError", "StoreError",
    "Terminal", "UsageError", "YamlError", "build_engine_argv", "dump_yaml", "load_config", "main",
    "parse_metric_line", "parse_yaml", "parse_yaml_located", "run_job",
]

# ==== 3. Constants ===========================================================

# Keys a config may have at the top level; anything else is a typo to report.
TOP_LEVEL_KEYS = ("name", "image", "entrypoint", "workdir", "env", "mounts", "resources",
                  "metrics", "engine", "timeout", "sweep", "slurm", "stop_signal", "tensorboard",
                  "metrics_from", "outputs", "code_snapshot", "ssh")
RESOURCE_KEYS = ("gpus", "cpu", "memory", "shm_size")
# What people write by habit from docker-compose and Kubernetes, for "did you mean".
KEY_SYNONYMS = {"environment": "env", "volumes": "mounts", "command": "entrypoint", "cmd": "entrypoint",
                "working_dir": "workdir", "cpus": "cpu", "gpu": "gpus", "mem": "memory", "shm": "shm_size"}
# Engine name -> its class (section 11 defines and registers them; `--engine` and configs choose from it).
ENGINES: dict[str, type] = {}
# Where the mount called `code` appears when no workdir is given (the PyTorch images' WORKDIR).
DEFAULT_WORKDIR = "/workspace"
# Every other named mount appears at /mnt/<name>; top-level paths could shadow the image's own.
NAMED_MOUNT_ROOT = "/mnt"
# Label put on every container so it can always be traced back to its run.
RUN_LABEL = "runpilot.run_id"
# os.read size for the tee loop: large reads keep Python's per-byte cost negligible.
READ_SIZE = 256 << 10
# The pipe buffer asked for (Linux's default limit for an unprivileged pipe): the job can
# write ahead while the tee works on the previous read.
PIPE_SIZE = 1 << 20
# After a short read the tee waits this long for more: a live job is never held back by more
# than a millisecond, and a loud one is read in large chunks.
FILL_PAUSE = 0.001
# While output flows, signals, timeouts and the job's state are looked at this often.
HOUSEKEEPING_SECONDS = 0.05
# A METRIC line longer than this is not buffered whole: it is counted as malformed instead.
MAX_METRIC_LINE = 1 << 20
# The notices about metrics never captured read logs in blocks this big (and a 0-sample run's last block).
LOG_SCAN_BYTES = 1 << 20
# --check-writes warns when a job left at least this much in its container's own filesystem (checkpoints).
LARGE_WRITE_BYTES = 100 << 20
# metrics_from's event files are read this often while the job runs: a curve a second behind is live enough.
TB_POLL_SECONDS = 1.0
# How often the tee loop wakes up to look at signals and timeouts when the job is silent.
POLL_SECONDS = 0.2
# Output waiting for a slow terminal: past this, the job's pipes are not read (the job waits,
# as it would writing to that terminal itself) while signals and the clock are still served.
TERMINAL_BACKLOG = 1 << 20
# Grace period between SIGTERM and SIGKILL when a run is stopped (like `docker stop`).
DEFAULT_STOP_TIMEOUT = 10
# The signals a config's stop_signal may name: each ends a job that does not handle it. SIGCHLD,
# SIGCONT, SIGWINCH, SIGURG are ignored by default (a stop would wait the grace period for nothing),
# SIGSTOP/SIGTSTP pause, SIGKILL cannot be handled, and SIGSEGV and kin mean a crash.
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGABRT")
# The longest grace period accepted: a day; anything longer is a typo that would make Ctrl-C useless.
MAX_STOP_TIMEOUT = 86400
# SQLite waits this long for a lock held by a parallel run before it gives up (RUNPILOT_DB_TIMEOUT).
DB_TIMEOUT = 30.0
DB_SCHEMA_VERSION = 4
# Space set aside in each run folder while the job runs, freed to write the final record on a full disk.
RESERVE_BYTES = 256 << 10
# What git's probes of a mounted folder may take in all; past it the run is recorded without them.
GIT_PROBE_SECONDS = 10.0
# A working-tree diff larger than this is not copied into the run folder (only noted).
GIT_DIFF_MAX = 1 << 20
# How many lines of a failed run's log `show` prints.
SHOW_LOG_TAIL = 10
# Where a container sees its run's outputs folder unless the config's `outputs:` names another path.
OUTPUTS_TARGET = "/outputs"
# A code folder larger than this is refused, not copied (`code_snapshot: 2g` raises it): a data set or
# a checkpoint folder under the code would otherwise be copied at every run's start.
CODE_SNAPSHOT_MAX = 100 << 20
# A file's hash is taken from the snapshot cache only when the file was last changed this long before
# the cache was written: a coarse file-system clock cannot then hide an edit (git's "racy" rule).
SNAPSHOT_CACHE_SLACK_NS = 100_000_000
# gc removes a snapshot no run names only once it is this old: a run starting now may not have said yet.
SNAPSHOT_GC_AGE = 3600
# Where every RunPilot of this machine, whatever its user and home, claims GPUs (RUNPILOT_GPU_CLAIMS
# names another): /tmp is root's, sticky and world-writable on every Linux, so each user can create
# claim files there that only that user (and root) can remove.
GPU_CLAIMS_DIR = "/tmp"
# A claim file is published (renamed into its place) only once it is locked; one still unpublished
# after this long was left by a runner that died between creating and publishing it.
GPU_CLAIM_STALE_SECONDS = 60.0

# Run statuses. queued and running may still change; every other one is final and is never
# rewritten by lost-detection or by the index catching up.
QUEUED, RUNNING = "queued", "running"
SUCCEEDED, FAILED, INTERRUPTED, TIMEOUT, CANCELLED, LOST = (
    "succeeded", "failed", "interrupted", "timeout", "cancelled", "lost")
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, INTERRUPTED, TIMEOUT, CANCELLED, LOST)
ACTIVE_STATUSES = (QUEUED, RUNNING)

ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# ${VAR} takes VAR from the runner's environment; $${ is a literal ${.
ENV_REF_RE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
METRIC_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/]*\Z")
RUN_ID_RE = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}\Z")
SWEEP_ID_RE = re.compile(r"sw-\d{8}-\d{6}-[0-9a-f]{6}\Z")
# How Docker ("No such image") and Podman ("image not known") say an image is not present.
IMAGE_MISSING_RE = re.compile(r"no such image|image not known|no such object|unable to find", re.IGNORECASE)
SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\Z", re.IGNORECASE)
DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)?\Z", re.IGNORECASE)
SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# The longest age `list --since` and `gc --older-than` take: beyond it dates stop being dates.
MAX_AGE_SECONDS = 3650 * 86400

# How many Python-like local images `init` tries (a throwaway container each) before it gives up.
INIT_PROBES = 3
# Variables that tools read in both cases (curl reads http_proxy, others HTTP_PROXY): a --set of
# one beside another (http_proxy, HTTP_PROXY, HTTPS_PROXY) is meant, not a typo (key_meant).
BOTH_CASES_VARIABLES = frozenset({"http_proxy", "https_proxy", "ftp_proxy", "no_proxy", "all_proxy"})
# How much of a running run's metrics.json `list` reads for its latest values (about 500 samples).
METRICS_TAIL = 64 << 10
# The most points a sweep may have unless --max-points says more: each point is a run folder, an
# index row and a validated config, and a grid larger than this is far more often a typo (a value
# list pasted twice, --repeat 1000000) than a plan.
MAX_SWEEP_POINTS = 10000
# How long a run's life (its start, its end, a cancel) waits for an index that another process holds;
# past it the run leaves a marker in <home>/pending/ and goes on: the folder is the truth, and the
# index catches up the next time it is used. After such a wait the same process only tries without
# waiting for INDEX_BUSY_SECONDS (a sweep cancelling 1,000 queued points waits once, not 1,000 times).
INDEX_LIFE_WAIT = 0.5
INDEX_BUSY_SECONDS = 10.0
# A sweep's plan lists this many points; the rest are counted.
SWEEP_PLAN_SHOWN = 50

# ==== 4. Errors ==============================================================

class RunPilotError(Exception):
    """Root of every error RunPilot reports to a user; main() prints it once."""

    exit_code = 1


class ConfigError(RunPilotError):
    """A problem with a config file, located by file, line and column (1-based).

    A problem caused by a `--set KEY=VALUE` argument names that argument instead of a file.
    """

    exit_code = 2

    def __init__(self, message: str, filename: str | None = None,
                 line: int | None = None, col: int | None = None,
                 source_line: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.filename = filename
        self.line = line
        self.col = col
        self.source_line = source_line
        self.others: list[ConfigError] = []  # further problems found in the same file

    def __str__(self) -> str:
        where = ":".join(str(p) for p in (self.filename, self.line, self.col) if p is not None)
        text = f"{where}: {self.message}" if where else self.message
        if self.source_line is not None and self.col is not None:
            text += f"\n  {self.source_line}\n  {' ' * (self.col - 1)}^"
        return text


class YamlError(ConfigError):
    """A YAML syntax error, or a feature outside RunPilot's subset, located by file, line and column."""


class UsageError(RunPilotError):
    """A command line that cannot be carried out as written."""

    exit_code = 2


class EngineError(RunPilotError):
    """The container engine is missing, not answering, or refused the job."""

    exit_code = 125


class GpuError(RunPilotError):
    """The GPUs asked for are not there, are held by other runs, or the engine cannot hand them out."""

    exit_code = 1


class StoreError(RunPilotError):
    """The run folder or the database cannot be read or written."""

    exit_code = 1


class SlurmError(RunPilotError):
    """sbatch refused the job, or Slurm's tools are missing."""

    exit_code = 2


class ExportError(RunPilotError):
    """An export could not be written, or the server it goes to refused it or could not be reached."""

    exit_code = 1


class SnapshotError(RunPilotError):
    """The code folder cannot be recorded: too large, unreadable, or its snapshot is gone."""

    exit_code = 2


class SshError(RunPilotError):
    """A box cannot be reached over ssh, or refused what RunPilot asked of it."""

    exit_code = 125


class BoxError(RunPilotError):
    """The box's RunPilot refused the run; its exit status is the box's."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code if exit_code in (1, 2, 125) else 125

# ==== 5. Data types ==========================================================

@dataclass(frozen=True)
class Mount:
    """A host folder bind-mounted into the job (for engine `local`: only named)."""

    source: str                 # absolute host path
    target: str                 # absolute path inside the container
    read_only: bool = False
    name: str | None = None     # key under `mounts:`; None for the "host:container" list form


@dataclass(frozen=True)
class Resources:
    """What the job may use; None means the engine's default."""

    gpus: int | str | tuple[str, ...] | None = None   # a count, "all", or device ids
    cpu: float | None = None
    memory: int | None = None                          # bytes
    shm_size: int | None = None                        # bytes


@dataclass(frozen=True)
class SlurmSettings:
    """The config's `slurm:` section: how `--on slurm` asks sbatch for the job."""

    partition: str | None = None
    time: str | None = None                 # sbatch's --time; default: the config's timeout
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    python: str = "python3"                 # the interpreter on the node
    setup: tuple[str, ...] = ()             # shell lines run before RunPilot on the node
    extra: tuple[str, ...] = ()             # raw sbatch options
    gpu_flag: str = "gpus"                  # gpus: --gpus=K; gres: --gres=gpu:K


@dataclass(frozen=True)
class SshSettings:
    """The config's `ssh:` section: how `--on ssh:HOST` runs the config on the user's other boxes."""

    hosts: tuple[str, ...] = ()             # the boxes `--on ssh` (without :HOST) means
    home: str = "~/.runpilot"               # RunPilot's home on the box (~/ is the box user's home)
    mounts: tuple[tuple[str, str], ...] = ()  # (mount name, folder on the box) for mounts other than code
    python: str = "python3"                 # the interpreter on the box


@dataclass(frozen=True)
class JobConfig:
    """A validated run config: what `runpilot run` needs, with paths made absolute."""

    name: str
    image: str | None
    entrypoint: str | tuple[str, ...]
    workdir: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # values may hold ${VAR} references
    mounts: tuple[Mount, ...] = ()
    resources: Resources = Resources()
    metrics: tuple[str, ...] = ()                       # names of the metrics to feature
    engine: str | None = None
    timeout: float | None = None                        # seconds
    source: str | None = None                           # the config file it came from
    sweep: tuple[tuple[str, tuple], ...] = ()           # (dotted key, values); only `sweep` reads it
    slurm: SlurmSettings = SlurmSettings()              # only `--on slurm` reads it
    stop_signal: str | None = None                      # e.g. "SIGUSR1": the signal every stop sends
    tensorboard: bool = False                           # the runner writes a TensorBoard event file too
    metrics_from: tuple[MetricsSource, ...] = ()        # sources of samples besides METRIC lines
    workdir_implied: bool = False                       # workdir is the code mount's default, not written
    outputs: str | None = None                          # the outputs folder's container path (/outputs)
    code_snapshot: bool | int = True                    # False: run the live folder; an int: the size limit
    ssh: SshSettings = SshSettings()                    # only `--on ssh:HOST` reads it


def _type_ok(value: object, annotation: str) -> bool:
    """Whether a value read from JSON fits a field annotation such as `int | None` or `list[str]`."""
    for option in annotation.split(" | "):
        if option == "None" and value is None:
            return True
        base, _, inner = option.partition("[")
        if base == "str" and isinstance(value, str):
            return True
        if base == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if base == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if base == "bool" and isinstance(value, bool):
            return True
        if base == "dict" and isinstance(value, dict):
            return True
        if base == "list" and isinstance(value, list):
            return not inner or all(_type_ok(v, inner.rstrip("]")) for v in value)
    return False


class MetaPart:
    """A typed part of meta.json (a JSON object of its own), as a dataclass with an `extra` field.

    `from_data` reads the object and `to_data` writes it under the same keys: the keys it was read
    with or given since (null included), and the keys this version does not know (`extra`).
    """

    extra: dict

    def __post_init__(self) -> None:  # given: what differs from the defaults (from_data says more)
        self.__dict__["_given"] = {f.name for f in dataclasses.fields(self)
                                   if f.name != "extra" and getattr(self, f.name) not in (None, {})}

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        if name != "extra":
            self.__dict__.setdefault("_given", set()).add(name)

    @classmethod
    def from_data(cls, data: dict):
        """The part as read from meta.json; a wrongly typed value is kept as it was, in `extra`."""
        known = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        ok = {k: v for k, v in data.items() if k in known and _type_ok(v, str(known[k].type))}
        state = cls(**ok, extra={k: v for k, v in data.items() if k not in ok})
        state.__dict__["_given"] = set(ok)
        return state

    def to_data(self) -> dict:
        given = self.__dict__.get("_given", set())
        return {**self.extra, **{k: getattr(self, k) for k in sorted(given)}}

    def __bool__(self) -> bool:
        return bool(self.to_data())

    def __eq__(self, other: object) -> bool:  # (for parts declared eq=False) the JSON object it writes
        if isinstance(other, MetaPart):
            return type(self) is type(other) and self.to_data() == other.to_data()
        return self.to_data() == other if isinstance(other, dict) else NotImplemented


@dataclass
class SlurmState(MetaPart):
    """A Slurm run's state, meta.json's `slurm` block: only the Slurm backend reads it."""

    job_id: str | None = None           # `123`, or `120_4` for a task of a job array
    array_job_id: str | None = None
    array_task_id: int | None = None
    partition: str | None = None
    state: str | None = None            # Slurm's last word: PENDING, RUNNING, COMPLETED, ...
    node: str | None = None
    reason: str | None = None
    submitted_from: str | None = None
    options: dict = field(default_factory=dict)   # the run's options as submitted: the node runs with them
    extra: dict = field(default_factory=dict)


@dataclass
class SweepRef(MetaPart):
    """A sweep's run: its place in the sweep, meta.json's `sweep` block."""

    id: str | None = None               # the sweep's id, sw-...
    index: int | None = None            # its point's index in the plan
    repeat: int | None = None           # which repeat of the point (--repeat)
    point: dict = field(default_factory=dict)   # the swept values, by dotted key
    extra: dict = field(default_factory=dict)


@dataclass(eq=False)
class RunnerState(MetaPart):
    """Who runs the run, meta.json's `runner` block (and the index's `runner` column): the process
    here (pid, host, boot id, its start), or for a run that lives elsewhere the backend that runs it
    and its handle on it (`box`). That backend's other keys (home, python, program, pull_outputs,
    ...) stay in `extra`, and only that backend reads them (as `to_data()`, see SshBox)."""

    backend: str | None = None          # a name in BACKENDS; None: it runs here
    box: str | None = None              # --on ssh: the box it runs on
    pid: int | None = None
    host: str | None = None
    boot_id: str | None = None
    start: str | None = None            # the runner's start in clock ticks (tells a reused pid apart)
    extra: dict = field(default_factory=dict)


@dataclass
class RunMeta:
    """What a run records about itself: the contents of its meta.json, the truth about the run.

    `from_json` is the one reader of meta.json and `to_json` the one writer. Fields a file lacks
    take their defaults; a wrongly typed field is dropped and named in `problems`; fields this
    version does not know are kept in `extra` and written back.
    """

    run_id: str
    name: str = ""
    status: str = LOST
    started_at: str | None = None       # when the job started (when it was queued, until then)
    finished_at: str | None = None
    duration: float | None = None       # seconds
    exit_code: int | None = None        # the job's own exit status (128+N when killed by signal N)
    stop_signal: int | None = None      # the signal that stopped the run (interrupted)
    reason: str | None = None           # why it ended as it did, when the exit code does not say
    hint: str | None = None             # the likely cause of a failure, and the fix
    engine: str | None = None
    engine_version: str | None = None
    image: str | None = None
    image_id: str | None = None
    repo_digests: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    command_line: str | None = None
    container: str | None = None
    workdir: str | None = None
    executable: str | None = None       # engine local: the program that ran
    host: str | None = None
    user: str | None = None
    runpilot_version: str | None = None
    python: str | None = None
    os: str | None = None
    runner: RunnerState = field(default_factory=RunnerState)  # pid, host, boot id, start: who runs the run
    job: dict = field(default_factory=dict)        # engine local: the job's process group
    config_file: str | None = None
    config: dict = field(default_factory=dict)     # the resolved config (also in config.yaml)
    overrides: list[str] = field(default_factory=list)
    tags: dict = field(default_factory=dict)
    rerun_of: str | None = None
    metric_names: list[str] = field(default_factory=list)   # the metrics the config features
    samples: dict = field(default_factory=dict)    # {"count": N, "malformed": M} METRIC lines
    last_metrics: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    gpus: dict = field(default_factory=dict)       # what nvidia-smi reported, and what was asked
    devices: list[str] = field(default_factory=list)  # the GPUs this run was given
    usage: dict = field(default_factory=dict)      # what the job used: peak memory, its GPUs' utilization
    git: list[dict] = field(default_factory=list)
    lost_at: str | None = None
    sweep: SweepRef = field(default_factory=SweepRef)  # its place in a sweep
    slurm: SlurmState = field(default_factory=SlurmState)  # --on slurm: the Slurm backend's state of the run
    code: dict = field(default_factory=dict)       # mode (snapshot, live, off), folder, snapshot, files, bytes
    extra: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list, repr=False)  # what from_json had to drop

    _OLD_NAMES = {"watched": "metric_names"}   # keys of meta.json files written by RunPilot 0.4
    _PARTS = {"slurm": SlurmState, "sweep": SweepRef, "runner": RunnerState}  # typed parts, read and written under their keys

    def __setattr__(self, name: str, value: object) -> None:
        part = self._PARTS.get(name)  # a part given as meta.json holds it (a dict) is read as such
        object.__setattr__(self, name, part.from_data(value) if part is not None and isinstance(value, dict)
                           else value)

    @classmethod
    def from_json(cls, data: object, run_id: str) -> "RunMeta":
        """Read meta.json's parsed value; a file of another run, or no mapping at all, is a problem."""
        meta = cls(run_id=run_id)
        if not isinstance(data, dict):
            meta.problems.append("meta.json does not hold a JSON object")
            return meta
        data = dict(data)
        if isinstance(data.get("metrics"), dict) and "samples" not in data:
            data["samples"] = data.pop("metrics")     # 0.4 called the sample counts "metrics"
        for old, new in cls._OLD_NAMES.items():
            if old in data and new not in data:
                data[new] = data.pop(old)
        known = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("extra", "problems")}
        for key, value in data.items():
            spec = known.get(key)
            if spec is None:
                meta.extra[key] = value
            elif key in cls._PARTS and isinstance(value, dict):
                setattr(meta, key, cls._PARTS[key].from_data(value))
            elif _type_ok(value, str(spec.type)):
                setattr(meta, key, value)
            else:
                meta.problems.append(f"field {key!r} should be {'dict' if key in cls._PARTS else spec.type}, "
                                     f"found {json.dumps(value)[:40]}")
        if meta.run_id != run_id:
            meta.problems.append(f"run_id {meta.run_id!r} is not its folder's name")
            meta.run_id = run_id
        if meta.status not in STATUSES:
            meta.problems.append(f"unknown status {meta.status!r}")
            meta.status = LOST
        for key in ("started_at", "finished_at"):
            value = getattr(meta, key)
            try:
                if value is not None:
                    _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                meta.problems.append(f"field {key!r} is not a time: {value[:40]!r}")
                setattr(meta, key, None)
        if meta.started_at is None and RUN_ID_RE.match(run_id) and "meta.json" not in " ".join(meta.problems):
            meta.started_at = f"{run_id[:4]}-{run_id[4:6]}-{run_id[6:8]}T{run_id[9:11]}:{run_id[11:13]}:{run_id[13:15]}.000Z"
        return meta

    def to_json(self) -> bytes:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("extra", "problems")}
        data = {**self.extra, **data, **{key: getattr(self, key).to_data() for key in self._PARTS}}
        return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")

    @property
    def final(self) -> bool:
        return self.status not in ACTIVE_STATUSES

    @property
    def backend(self) -> str:
        """Where the run executes: `slurm` (it has a `slurm` block), the backend its runner names
        (`ssh`), or `here`."""
        if self.slurm:
            return "slurm"
        return self.runner.backend or "here"

    @property
    def backend_ref(self) -> str | None:
        """The backend's handle on the run, as the index keeps it: the Slurm job (`123`, `120_4`), the box."""
        ref = self.slurm.job_id if self.slurm else self.runner.box
        return str(ref) if ref not in (None, "") else None

    # -- the life of a run: queued, then running, then one final status, never rewritten --------
    def queue(self) -> None:
        """Record the run as waiting (for its GPUs, a Slurm node): it has not started."""
        self.status = QUEUED

    def start(self, when: str | None = None) -> None:
        """Record the job's start; a queued run's wait is not part of its duration."""
        self.status, self.started_at = RUNNING, when or utc_now()

    def end(self, status: str, reason: str | None = None, finished: bool = True, **fields) -> bool:
        """Record how the run ended: STATUS (final), REASON (None keeps the one it has), and FIELDS
        of meta.json (exit_code, stop_signal, lost_at, ...); finished_at is now unless set already
        or not FINISHED (a run found lost ended at a time nobody saw). A run that has ended already
        keeps its first ending: nothing changes, and the result is False."""
        if self.final:
            return False
        if status in ACTIVE_STATUSES:
            raise ValueError(f"{status!r} is not how a run ends")
        self.status, self.reason = status, self.reason if reason is None else reason
        for key, value in fields.items():
            setattr(self, key, value)
        if finished:
            self.finished_at = self.finished_at or utc_now()
        return True


@dataclass
class RunRecord:
    """One run as the index knows it: a row of runs.db, derived from its meta.json."""

    id: str
    name: str
    status: str
    started_at: str
    path: str
    finished_at: str | None = None
    exit_code: int | None = None
    duration: float | None = None
    engine: str | None = None
    image: str | None = None
    last_metrics: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    metric_names: list = field(default_factory=list)
    sweep_id: str | None = None
    reason: str | None = None           # Slurm's pending reason, or why a run was lost
    runner: RunnerState = field(default_factory=RunnerState)  # who runs it: stoppable without meta.json
    backend: str = "here"               # where it executes: a name in BACKENDS
    backend_ref: str | None = None      # the backend's handle on it (the Slurm job), for one batch per list

    def __setattr__(self, name: str, value: object) -> None:  # a runner given as a dict (the index's
        object.__setattr__(self, name, RunnerState.from_data(value)  # column) is read as meta.json's
                           if name == "runner" and isinstance(value, dict) else value)

    @classmethod
    def of(cls, meta: RunMeta, path: Path) -> "RunRecord":
        return cls(id=meta.run_id, name=meta.name, status=meta.status, started_at=meta.started_at or "",
                   path=str(path), finished_at=meta.finished_at, exit_code=meta.exit_code,
                   duration=meta.duration, engine=meta.engine, image=meta.image,
                   last_metrics=meta.last_metrics, tags=meta.tags, metric_names=meta.metric_names,
                   sweep_id=meta.sweep.id,
                   reason=meta.reason, runner=meta.runner, backend=meta.backend, backend_ref=meta.backend_ref)


@dataclass(frozen=True)
class RunEvent:
    """Something in a run's life that its caller may want to show: orchestration reports, the CLI prints.

    kind is one of: pulling, starting, notice, queued, stopping, warning, hint, finished.
    """

    kind: str
    run_id: str | None
    message: str = ""
    outcome: "RunOutcome | None" = None


Reporter = Callable[[RunEvent], None]


def ignore_events(event: RunEvent) -> None:
    """A reporter for callers that want no messages (the Python API's default)."""


@dataclass(frozen=True)
class MetricsSource:
    """One entry of `metrics_from`: a named recogniser, a `pattern:` regex or a `tensorboard:` folder."""

    kind: str      # "recogniser", "pattern" or "tensorboard"
    value: str     # the recogniser's name, the regex, or the folder as the job sees it

    @property
    def spec(self) -> str:
        """The entry as `--metrics-from` takes it."""
        return self.value if self.kind == "recogniser" else f"{self.kind}:{self.value}"

    def to_data(self) -> object:
        """The entry as the config writes it."""
        return self.value if self.kind == "recogniser" else {self.kind: self.value}

# ==== 6. Files: written whole, privately, atomically =========================

def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out (a signal can cut a pipe write short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_private(path: Path, data: bytes) -> None:
    """Write a file readable by its owner only (logs and configs can hold secrets)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """Replace a file so that readers see the old or the new content, never a part.

    `durable` also flushes it to disk first, so a power cut cannot leave it empty.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json_file(path: Path) -> object:
    """The parsed contents of a JSON file; FileNotFoundError when missing, ValueError when corrupt."""
    return json.loads(path.read_bytes())


def make_private_dirs(folder: Path) -> None:
    """mkdir -p with every folder it creates private (0700), whatever the umask."""
    missing = []
    for parent in (folder, *folder.parents):
        if parent.exists():
            break
        missing.append(parent)
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
            os.chmod(path, 0o700)
    if not folder.is_dir():
        raise NotADirectoryError(20, "not a folder", str(folder))

# ==== 7. YAML reader: RunPilot's subset ======================================
# RunPilot reads its config with this small reader so that the tool stays one
# standard-library file. The subset is what a run config needs and what people
# write by habit: block and flow collections, plain, quoted and block scalars,
# comments, one document. Anchors, aliases, tags, merge keys, complex keys,
# directives and multiple documents are refused by name with a located
# YamlError, never half-read. Plain scalars are typed by the YAML 1.2 core
# schema, so `no` stays a string and `010` is ten.
#
# Names used throughout the parser:
#   row, col  the cursor: 0-based line and column in the text (errors print them 1-based);
#   n         the indentation of the enclosing block (-1 at the top level): the lines of
#             a node inside it must be indented more than n;
#   indent    the column at which the entries of the current block collection start;
#   path      where a node sits: the tuple of mapping keys and sequence indexes from the root.

_YAML_MAX_DEPTH = 100  # far beyond any config, and well inside Python's recursion limit
_YAML_MAX_KEY = 1024   # YAML's limit on an implicit key's length; PyYAML enforces it too

# Characters YAML allows in a stream (c-printable); others may appear only as escapes.
_YAML_NON_PRINTABLE = "[^\t\n\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
_YAML_ASCII_NON_PRINTABLE_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f]")  # the same, for ASCII text
_YAML_BLANK_RE = re.compile(r"[ \t]*(?:#.*)?$")      # nothing but whitespace or a comment
_YAML_WS_RE = re.compile(r"[ \t]*")
_YAML_END_RE = re.compile(r"[ \t]*$|[ \t]+#")        # what may follow a node on its line

# Plain scalars (YAML 1.2 ns-plain-first, ns-plain-char), for block and flow context. Whitespace
# is only space and tab: \s would also take NBSP and U+2028, which YAML reads as ordinary text.
_YAML_PLAIN_FIRST_BLOCK = r"(?:[^ \t\-?:,\[\]{}#&*!|>'\"%@`]|[-?:](?=[^ \t]))"
_YAML_PLAIN_CHAR_BLOCK = r"(?:[^ \t:#]|:(?=[^ \t])|(?<=[^ \t])#)"
_YAML_PLAIN_FIRST_FLOW = r"(?:[^ \t\-?:,\[\]{}#&*!|>'\"%@`]|[-?:](?=[^ \t,\[\]{}]))"
_YAML_PLAIN_CHAR_FLOW = r"(?:[^ \t:#,\[\]{}]|:(?=[^ \t,\[\]{}])|(?<=[^ \t])#)"


def _yaml_plain_pattern(first: str, char: str) -> str:
    """A one-line plain scalar: words of plain characters separated by spaces or tabs."""
    return f"{first}{char}*(?:[ \\t]+{char}+)*"


_YAML_PLAIN_BLOCK_RE = re.compile(_yaml_plain_pattern(_YAML_PLAIN_FIRST_BLOCK, _YAML_PLAIN_CHAR_BLOCK))
_YAML_PLAIN_MORE_BLOCK_RE = re.compile(_yaml_plain_pattern(_YAML_PLAIN_CHAR_BLOCK, _YAML_PLAIN_CHAR_BLOCK))
_YAML_PLAIN_FLOW_RE = re.compile(_yaml_plain_pattern(_YAML_PLAIN_FIRST_FLOW, _YAML_PLAIN_CHAR_FLOW))
_YAML_PLAIN_MORE_FLOW_RE = re.compile(_yaml_plain_pattern(_YAML_PLAIN_CHAR_FLOW, _YAML_PLAIN_CHAR_FLOW))
_YAML_PLAIN_KEY_RE = re.compile(
    f"({_yaml_plain_pattern(_YAML_PLAIN_FIRST_BLOCK, _YAML_PLAIN_CHAR_BLOCK)})[ \\t]*:(?=[ \\t]|$)")
_YAML_DQ_KEY_RE = re.compile(r'"(?:[^"\\]|\\.)*"[ \t]*:(?=[ \t]|$)')
_YAML_SQ_KEY_RE = re.compile(r"'(?:[^']|'')*'[ \t]*:(?=[ \t]|$)")
_YAML_DQ_SIMPLE_RE = re.compile(r'"([^"\\]*)"')      # one line, no escapes: the common case
_YAML_SQ_SIMPLE_RE = re.compile(r"'((?:[^']|'')*)'(?!')")  # (?!') keeps '' from closing it
_YAML_DQ_RUN_RE = re.compile(r'[^"\\ \t]+')
_YAML_SQ_RUN_RE = re.compile(r"[^' \t]+")
_YAML_HEX_RE = re.compile(r"[0-9A-Fa-f]+")
_YAML_BLOCK_HEADER_RE = re.compile(r"[|>](?:([1-9])([-+]?)|([-+])([1-9]?))?(?=[ \t]|$)")

_YAML_ESCAPES = {
    "0": "\0", "a": "\a", "b": "\b", "t": "\t", "\t": "\t", "n": "\n", "v": "\v", "f": "\f",
    "r": "\r", "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\", "N": "\x85", "_": "\xa0",
    "L": "\u2028", "P": "\u2029",
}
_YAML_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}

# What a node cannot start with, and why: features outside the subset are named.
_YAML_BAD_STARTS = {
    "&": "anchors (&name) are not supported; quote the value if '&' is text",
    "*": "aliases (*name) are not supported; quote the value if '*' is text",
    "!": "tags (!!str, !name) are not supported; quote the value if '!' is text",
    "%": "'%' cannot start a plain scalar; quote the value",
    "@": "'@' is reserved and cannot start a plain scalar; quote the value",
    "`": "'`' is reserved and cannot start a plain scalar; quote the value",
    ",": "unexpected ',' (an entry is missing before it)",
    "]": "unexpected ']'",
    "}": "unexpected '}'",
    "#": "'#' starts a comment only after whitespace; quote the value if it is text",
}
_YAML_BAD_STARTS_BEFORE_SPACE = {
    "?": "complex mapping keys ('? ') are not supported",
    ":": "a mapping key is missing before ':' (empty keys are not supported)",
}

# The YAML 1.2 core schema. Everything else a plain scalar can spell is a string.
_YAML_CONSTANTS: dict[str, object] = {
    "~": None, "null": None, "Null": None, "NULL": None,
    "true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False,
}
_YAML_INT_RE = re.compile(r"[-+]?[0-9]+")
_YAML_OCT_RE = re.compile(r"0o[0-7]+")
_YAML_HEX_INT_RE = re.compile(r"0x[0-9a-fA-F]+")
_YAML_FLOAT_RE = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")
_YAML_INF_RE = re.compile(r"[-+]?\.(?:inf|Inf|INF)")
_YAML_NAN_RE = re.compile(r"\.(?:nan|NaN|NAN)")

@functools.lru_cache(maxsize=None)
def _yaml_regex(pattern: str) -> re.Pattern:
    """Compile a large Unicode class on first use: only non-ASCII text needs one."""
    return re.compile(pattern)


def parse_yaml(text: str, filename: str = "<string>") -> object:
    """Read one YAML document of RunPilot's subset; raise YamlError for anything else."""
    return parse_yaml_located(text, filename)[0]


def parse_yaml_located(text: str, filename: str = "<string>") -> tuple[object, dict[tuple, tuple[int, int]]]:
    """Read a document and say where each node starts.

    Returns (value, positions): positions maps a node's path (the tuple of mapping keys and
    sequence indexes from the root; () is the root) to its 1-based (line, column). A mapping
    entry's path points at its key; an empty value at the '-' or key that introduces it.
    """
    parser = _YamlParser(text, filename)
    try:
        value = parser.document()
    except RecursionError as exc:  # the depth limit should prevent this; a deep caller may not leave room
        raise YamlError("document nested too deeply to read", filename) from exc
    return value, parser.positions


def _yaml_is_marker(line: str) -> bool:
    """Whether a line is a document marker: '---' or '...' alone or followed by whitespace."""
    return line[:3] in ("---", "...") and line[3:4] in ("", " ", "\t")


def _yaml_is_entry(line: str, col: int) -> bool:
    """Whether a block sequence entry ('-' then whitespace or the line's end) starts at col."""
    return line[col:col + 1] == "-" and line[col + 1:col + 2] in ("", " ", "\t")


def _yaml_type_plain(text: str) -> object:
    """Type a plain scalar by the YAML 1.2 core schema: null, bool, int, float, else str."""
    if text in _YAML_CONSTANTS:
        return _YAML_CONSTANTS[text]
    if text[0] not in "0123456789+-.":
        return text
    if _YAML_INT_RE.fullmatch(text):
        return int(text)  # ValueError past Python's int digit limit; the parser reports it
    if _YAML_OCT_RE.fullmatch(text):
        return int(text[2:], 8)
    if _YAML_HEX_INT_RE.fullmatch(text):
        return int(text[2:], 16)
    if _YAML_FLOAT_RE.fullmatch(text):
        return float(text)
    if _YAML_INF_RE.fullmatch(text):
        return -math.inf if text[0] == "-" else math.inf
    if _YAML_NAN_RE.fullmatch(text):
        return math.nan
    return text


def _yaml_fold(lines: list[str | None]) -> str:
    """Join a folded block scalar's lines (None is an empty line).

    A single break between two ordinary lines becomes a space; n empty lines between them
    become n newlines. Breaks next to a more-indented line are kept as they are.
    """
    parts: list[str] = []
    blanks = 0
    prev: str | None = None
    for line in lines:
        if line is None:
            blanks += 1
            continue
        if prev is None:
            parts.append("\n" * blanks)
        elif prev[0] in " \t" or line[0] in " \t":
            parts.append("\n" * (blanks + 1))
        else:
            parts.append("\n" * blanks if blanks else " ")
        parts.append(line)
        prev, blanks = line, 0
    return "".join(parts)


def _yaml_block_text(lines: list[str | None], folded: bool, chomp: str) -> str:
    """Build a block scalar's value from its lines, then chomp: '-' strip, '' clip, '+' keep."""
    last = max((i for i, line in enumerate(lines) if line is not None), default=-1)
    body, trailing = lines[:last + 1], len(lines) - last - 1
    text = _yaml_fold(body) if folded else "\n".join(line or "" for line in body)
    if chomp == "-":
        return text
    if chomp == "+":
        return text + "\n" * (trailing + (1 if body else 0))
    return text + "\n" if body else ""


class _YamlParser:
    """Recursive descent over the document's lines with an explicit cursor (row, col).

    Block structure is read line by line from indentation; quoted scalars and flow collections
    are scanned character by character and may run over several lines. n is always the
    indentation of the parent block (-1 at the top): a node's lines must be indented more.
    """

    def __init__(self, text: str, filename: str) -> None:
        self.filename = filename
        if text.startswith("\ufeff"):
            text = text[1:]
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        self.lines = text.split("\n")
        if self.lines[-1] == "":
            self.lines.pop()
        self.blank = [_YAML_BLANK_RE.match(line) is not None for line in self.lines]
        self.row = 0
        self.col = 0
        self.depth = 0
        self.positions: dict[tuple, tuple[int, int]] = {}
        bad = (_YAML_ASCII_NON_PRINTABLE_RE if text.isascii() else _yaml_regex(_YAML_NON_PRINTABLE)).search(text)
        if bad:
            row = text.count("\n", 0, bad.start())
            col = bad.start() - (text.rfind("\n", 0, bad.start()) + 1)
            raise self.error(f"character U+{ord(bad.group()):04X} is not allowed in YAML text; "
                             "write it as an escape in a double-quoted string", row, col)

    # -- cursor and errors ----------------------------------------------------------------

    def error(self, message: str, row: int, col: int) -> YamlError:
        """A YamlError at a 0-based row and column of the text."""
        if row >= len(self.lines):
            row = max(len(self.lines) - 1, 0)
            col = len(self.lines[row]) if self.lines else 0
        source = self.lines[row] if self.lines else ""
        return YamlError(message, self.filename, row + 1, col + 1, source)

    def peek(self) -> str:
        """The character at the cursor, or '' at the end of its line."""
        line = self.lines[self.row]
        return line[self.col] if self.col < len(line) else ""

    def next_content_row(self, row: int) -> int:
        """The first row at or after row that holds more than whitespace and comments."""
        blank = self.blank
        while row < len(blank) and blank[row]:
            row += 1
        return row

    def block_indent(self, row: int) -> int:
        """The indentation of a content row in block context; -1 for a document marker."""
        line = self.lines[row]
        if _yaml_is_marker(line):
            return -1
        indent = len(line) - len(line.lstrip(" "))
        if line[indent] == "\t":
            raise self.error("tab character used for indentation; indent with spaces", row, indent)
        return indent

    def enter(self, row: int, col: int) -> None:
        """Count one more level of nesting; refuse absurd depths before Python's stack does."""
        self.depth += 1
        if self.depth > _YAML_MAX_DEPTH:
            raise self.error(f"nesting deeper than {_YAML_MAX_DEPTH} levels is not supported", row, col)

    def type_plain(self, text: str, row: int, col: int) -> object:
        """Type a plain scalar, reporting a number Python cannot hold as a located error."""
        try:
            return _yaml_type_plain(text)
        except ValueError as exc:
            raise self.error(f"cannot read this number: {exc}", row, col) from exc

    def check_continuation(self, row: int, n: int, what: str) -> None:
        """Check a line that continues a quoted scalar, plain scalar or flow collection."""
        line = self.lines[row]
        if _yaml_is_marker(line):
            raise self.error(f"document marker {line[:3]!r} inside a {what}", row, 0)
        indent = len(line) - len(line.lstrip(" "))
        if indent <= n and line[indent:indent + 1] == "\t":
            raise self.error("tab character used for indentation; indent with spaces", row, indent)
        if indent <= n:
            hint = ""
            if what.startswith("flow"):
                hint = (" (the closing bracket too)" if line[indent:indent + 1] in ("]", "}") else
                        "; or is its closing bracket missing?")
            raise self.error(f"bad indentation: a line that continues a {what} must be indented "
                             f"by at least {n + 1} space(s){hint}", row, indent)

    def check_node_start(self, row: int, col: int) -> None:
        """Refuse, by name, what a node may not start with in this subset."""
        line = self.lines[row]
        ch = line[col]
        message = _YAML_BAD_STARTS.get(ch)
        if line[col + 1:col + 2] in ("", " ", "\t"):
            message = _YAML_BAD_STARTS_BEFORE_SPACE.get(ch, message)
        if ch == "%" and col == 0:
            message = "directives (%YAML, %TAG) are not supported"
        if message:
            raise self.error(message, row, col)

    def end_of_line(self, colon_message: str) -> None:
        """Require nothing but whitespace or a comment after a node; move to the next row."""
        line = self.lines[self.row]
        if _YAML_END_RE.match(line, self.col) is None:
            col = _YAML_WS_RE.match(line, self.col).end()
            ch = line[col]
            if ch == "#":
                message = "a comment needs whitespace before '#'"
            elif ch == ":":
                message = colon_message
            else:
                message = f"unexpected text {line[col:col + 20]!r} after the value"
            raise self.error(message, self.row, col)
        self.row, self.col = self.row + 1, 0

    # -- document and block structure -----------------------------------------------------

    def document(self) -> object:
        """document ::= ( "---" ( sep node(-1) | comment? NL block-node(-1) ) | block-node(-1) )
        ( "..." comment? )?, with blank and comment lines anywhere around them."""
        row = self.next_content_row(0)
        self.positions[()] = (row + 1 if row < len(self.lines) else 1, 1)
        if row < len(self.lines) and self.lines[row].startswith("%"):
            raise self.error("directives (%YAML, %TAG) are not supported", row, 0)
        if row < len(self.lines) and self.lines[row].startswith("---") and _yaml_is_marker(self.lines[row]):
            value = self.entry_value(-1, (), row, 3, "doc")
        else:
            self.row = row
            value = self.block_node(-1, ())
        self.end_of_document()
        return value

    def end_of_document(self) -> None:
        """Allow only a '...' marker, blank lines and comments after the top-level value."""
        row = self.next_content_row(self.row)
        if row >= len(self.lines):
            return
        line = self.lines[row]
        ended = line.startswith("...") and _yaml_is_marker(line)
        if ended:
            if _YAML_END_RE.match(line, 3) is None:
                raise self.error("only a comment may follow the document end marker '...'", row, 4)
            row = self.next_content_row(row + 1)
            if row >= len(self.lines):
                return
            line = self.lines[row]
        if line.startswith("---") and _yaml_is_marker(line):
            raise self.error("multiple documents in one file are not supported", row, 0)
        if line.startswith("%"):
            raise self.error("directives (%YAML, %TAG) are not supported", row, 0)
        if ended:
            raise self.error("content after the document end marker '...' is not supported "
                             "(multiple documents)", row, 0)
        col = self.block_indent(row)
        raise self.error("expected the end of the document, but found more content "
                         "(check the indentation)", row, col)

    def block_node(self, n: int, path: tuple) -> object:
        """block-node(n) ::= a node on a later line indented more than n; else empty (None)."""
        row = self.next_content_row(self.row)
        self.row = row
        if row >= len(self.lines):
            return None
        indent = self.block_indent(row)
        if indent <= n:
            return None
        self.col = indent
        return self.node(n, path, "line")

    def entry_value(self, n: int, path: tuple, row: int, col: int, context: str) -> object:
        """The node after a '-', 'key:' or '---' indicator: on the same line, on the lines
        below, or empty. Only a mapping value may be an indentless sequence (at column n)."""
        line = self.lines[row]
        start = _YAML_WS_RE.match(line, col).end()
        if start < len(line) and line[start] != "#":
            if context == "seq" and "\t" in line[col:start]:
                context = "seq-tab"
            self.row, self.col = row, start
            return self.node(n, path, context)
        self.row = row + 1
        if context == "key":
            nxt = self.next_content_row(self.row)
            if nxt < len(self.lines) and self.block_indent(nxt) == n and _yaml_is_entry(self.lines[nxt], n):
                self.row, self.col = nxt, n
                self.positions[path] = (nxt + 1, n + 1)
                return self.block_sequence(n, path, indentless=True)
        value = self.block_node(n, path)
        self.positions.setdefault(path, (row + 1, col))
        return value

    def node(self, n: int, path: tuple, context: str) -> object:
        """node(n) ::= block-sequence | block-mapping | block-scalar | flow-collection
        | quoted-scalar | plain-scalar, starting at the cursor.

        context says what precedes it: 'line' (nothing), 'seq' ('- '), 'seq-tab' ('-' and a
        tab), 'key' ('key: ') or 'doc' ('--- '). Block collections may start only after
        'line' or 'seq': elsewhere their indentation would be ambiguous.
        """
        row, col = self.row, self.col
        line = self.lines[row]
        ch = line[col]
        self.positions[path] = (row + 1, col + 1)
        self.check_node_start(row, col)
        if _yaml_is_entry(line, col):
            self.check_collection_allowed(context, "sequence", row, col)
            return self.block_sequence(col, path, indentless=False)
        if ch in "|>":
            return self.block_scalar(n)
        if ch in "[{":
            value = self.flow_collection(n, path)
            self.end_of_line("flow collections cannot be mapping keys (complex keys are not supported)")
            return value
        if context in ("line", "seq", "seq-tab") and self.key_match(row, col):
            self.check_collection_allowed(context, "mapping", row, col)
            return self.block_mapping(col, path)
        if ch in "\"'":
            value = self.scan_quoted(n)
            self.end_of_line(self.colon_message(context) if self.row == row else
                             "an implicit mapping key must be on a single line")
            return value
        return self.type_plain(self.plain_in_block(n, context), row, col)

    def check_collection_allowed(self, context: str, what: str, row: int, col: int) -> None:
        """Refuse a block collection that starts on the line of a 'key:', '---' or '-<tab>'."""
        if context == "seq-tab":
            raise self.error(f"tab character used for indentation: a block {what} after '-' "
                             "must be indented with spaces", row, col)
        if context == "key" and what == "sequence":
            raise self.error("a block sequence cannot start on the same line as its key; "
                             "start it on the next line", row, col)
        if context == "doc" and what == "sequence":
            raise self.error("a block sequence cannot start on the '---' line", row, col)
        if context in ("key", "doc"):
            raise self.error(self.colon_message(context), row, col)

    @staticmethod
    def colon_message(context: str) -> str:
        """Why a 'key:' may not appear where context puts it."""
        if context == "doc":
            return "a block mapping cannot start on the '---' line"
        if context == "key":
            return ("': ' after a value: quote the value if ': ' is part of it; a nested mapping "
                    "must start on the next line, indented")
        return "a ':' after a key must be followed by a space"

    def next_sibling(self, indent: int, what: str) -> bool:
        """Move to the next content row; whether it continues the block at indent."""
        row = self.next_content_row(self.row)
        self.row = row
        if row >= len(self.lines):
            return False
        found = self.block_indent(row)
        if found > indent:
            raise self.error(f"bad indentation: expected the next {what} at column {indent + 1}, "
                             "or a line indented less", row, found)
        self.col = found
        return found == indent

    def block_sequence(self, indent: int, path: tuple, indentless: bool) -> list:
        """block-sequence(i) ::= ( "-" ( sep node(i) | comment? NL block-node(i) ) )+,
        with every '-' at column i."""
        self.enter(self.row, indent)
        items: list = []
        while True:
            items.append(self.entry_value(indent, path + (len(items),), self.row, indent + 1, "seq"))
            if not self.next_sibling(indent, "sequence entry"):
                break
            if not _yaml_is_entry(self.lines[self.row], indent):
                if indentless:  # a key at the parent mapping's indentation ends the sequence
                    break
                raise self.error("expected a sequence entry ('- ') at this indentation", self.row, indent)
        self.depth -= 1
        return items

    def block_mapping(self, indent: int, path: tuple) -> dict:
        """block-mapping(i) ::= ( key ":" ( sep node(i) | comment? NL ( block-node(i)
        | block-sequence(i) ) ) )+, with every key at column i."""
        self.enter(self.row, indent)
        mapping: dict = {}
        while True:
            row = self.row
            self.check_node_start(row, indent)
            match = self.key_match(row, indent)
            if match is None:
                raise self.error(self.not_a_key(row, indent), row, indent)
            key = self.decode_key(match, row, indent)
            self.check_new_key(mapping, key, path, row, indent)
            mapping[key] = self.entry_value(indent, path + (key,), row, match.end(), "key")
            self.positions[path + (key,)] = (row + 1, indent + 1)
            if not self.next_sibling(indent, "key"):
                break
        self.depth -= 1
        return mapping

    def not_a_key(self, row: int, col: int) -> str:
        """Explain why a line in a block mapping is not a 'key: value' entry."""
        line = self.lines[row]
        if _yaml_is_entry(line, col):
            return "expected a mapping key here, found a sequence entry ('- ')"
        if line.startswith(("'", '"'), col):
            return "expected a mapping key; a quoted key must be on one line and followed by ': '"
        if ":" not in line:
            return "expected 'key: value' here, found a line without ':'"
        return "expected 'key: value' here (a ':' after a key must be followed by a space)"

    def key_match(self, row: int, col: int) -> re.Match | None:
        """Match an implicit key and its ':' (then whitespace or the line's end) at row, col."""
        line = self.lines[row]
        ch = line[col]
        regex = _YAML_DQ_KEY_RE if ch == '"' else _YAML_SQ_KEY_RE if ch == "'" else _YAML_PLAIN_KEY_RE
        return regex.match(line, col)

    def decode_key(self, match: re.Match, row: int, col: int) -> object:
        """The value of the key that key_match found; refuse merge keys and overlong keys."""
        if match.end() - 1 - col > _YAML_MAX_KEY:
            raise self.error(f"a mapping key longer than {_YAML_MAX_KEY} characters is not allowed", row, col)
        if self.lines[row][col] in "\"'":
            self.row, self.col = row, col
            return self.scan_quoted(-1)  # it fits on its line, so indentation does not matter
        self.check_merge_key(match.group(1), "plain", row, col)
        return self.type_plain(match.group(1), row, col)

    def check_merge_key(self, key: object, kind: str, row: int, col: int) -> None:
        """Refuse a plain '<<' key: PyYAML would merge mappings there, this reader will not."""
        if kind == "plain" and key == "<<":
            raise self.error("merge keys (<<) are not supported; quote '<<' if it is a plain key", row, col)

    def check_new_key(self, mapping: dict, key: object, path: tuple, row: int, col: int) -> None:
        """Refuse a duplicate key (PyYAML would silently keep the last one)."""
        if key in mapping:
            first = self.positions.get(path + (key,), (0, 0))[0]
            same = next(k for k in mapping if k == key)
            note = "" if type(same) is type(key) else f" ({same!r} and {key!r} are the same dict key)"
            raise self.error(f"duplicate key {key!r} (already defined on line {first}){note}", row, col)

    # -- scalars --------------------------------------------------------------------------

    def plain_in_block(self, n: int, context: str) -> str:
        """plain(n) ::= a first line, then continuation lines indented more than n; a single
        line break folds into a space and each empty line into a newline. A comment ends it."""
        row, col = self.row, self.col
        line = self.lines[row]
        match = _YAML_PLAIN_BLOCK_RE.match(line, col)
        if match is None:
            raise self.error(f"unexpected {line[col]!r}; quote the value", row, col)
        parts = [match.group()]
        ended = self.plain_line_end(row, match.end(), context)
        last, blanks, r = row, 0, row + 1
        while not ended and r < len(self.lines):
            text = self.lines[r]
            stripped = text.lstrip(" \t")
            if not stripped:
                blanks, r = blanks + 1, r + 1
                continue
            if stripped[0] == "#":
                ended = True
                break
            if _yaml_is_marker(text) or len(text) - len(text.lstrip(" ")) <= n:
                break
            start = len(text) - len(stripped)
            match = _YAML_PLAIN_MORE_BLOCK_RE.match(text, start)
            if match is None:
                raise self.error("a ':' at the start of this line cannot continue the scalar above", r, start)
            parts.append("\n" * blanks if blanks else " ")
            parts.append(match.group())
            ended = self.plain_line_end(r, match.end(), "more")
            last, blanks, r = r, 0, r + 1
        self.row, self.col = last + 1, 0
        if ended:
            self.check_no_continuation(n)
        return "".join(parts)

    def plain_line_end(self, row: int, col: int, context: str) -> bool:
        """Check what ends a plain scalar's line: its end, a comment (True), or a bad ':'."""
        line = self.lines[row]
        match = _YAML_END_RE.match(line, col)
        if match is not None:
            return match.group().endswith("#")
        colon = _YAML_WS_RE.match(line, col).end()
        if context == "more":
            raise self.error("this line looks like a mapping key but continues the multi-line scalar "
                             "above; check its indentation", row, colon)
        raise self.error(self.colon_message(context), row, colon)

    def check_no_continuation(self, n: int) -> None:
        """After a comment ends a plain scalar, nothing may continue it on a deeper line."""
        row = self.next_content_row(self.row)
        if row < len(self.lines) and not _yaml_is_marker(self.lines[row]):
            line = self.lines[row]
            indent = len(line) - len(line.lstrip(" "))
            if indent > n:
                raise self.error("bad indentation, or a multi-line scalar interrupted by a comment "
                                 "(a comment ends a plain scalar)", row, indent)

    def scan_quoted(self, n: int) -> str:
        """quoted ::= "'" ( char | "''" )* "'" | '"' ( char | escape )* '"', at the cursor.
        It may fold over lines indented more than n, like a plain scalar."""
        line = self.lines[self.row]
        quote = line[self.col]
        simple = (_YAML_DQ_SIMPLE_RE if quote == '"' else _YAML_SQ_SIMPLE_RE).match(line, self.col)
        if simple:
            self.col = simple.end()
            return simple.group(1) if quote == '"' else simple.group(1).replace("''", "'")
        return self.scan_quoted_lines(quote, n)

    def scan_quoted_lines(self, quote: str, n: int) -> str:
        """The general case of scan_quoted: escapes, and line folding."""
        opener = (self.row, self.col)
        run_re = _YAML_DQ_RUN_RE if quote == '"' else _YAML_SQ_RUN_RE
        row, i = self.row, self.col + 1
        out: list[str] = []
        while True:
            line = self.lines[row]
            spaces = ""  # unescaped whitespace, dropped if the line ends after it
            escaped_break = False
            while i < len(line):
                ch = line[i]
                if ch in " \t":
                    spaces, i = spaces + ch, i + 1
                    continue
                if ch == quote == "'" and line[i + 1:i + 2] == "'":
                    text, i = "'", i + 2  # '' is one quote inside single quotes
                elif ch == quote:
                    out.append(spaces)
                    self.row, self.col = row, i + 1
                    return "".join(out)
                elif ch == "\\" and quote == '"':
                    if i + 1 == len(line):
                        out.append(spaces)
                        spaces, escaped_break = "", True
                        break
                    text, i = self.escape(row, i)
                else:
                    match = run_re.match(line, i)
                    text, i = match.group(), match.end()
                out.append(spaces + text)
                spaces = ""
            row, i = self.fold_quoted_break(row, n, opener, escaped_break, out)

    def fold_quoted_break(self, row: int, n: int, opener: tuple[int, int], escaped: bool,
                          out: list[str]) -> tuple[int, int]:
        """Fold the line break(s) after row inside a quoted scalar; return where text resumes."""
        blanks = 0
        row += 1
        while row < len(self.lines) and not self.lines[row].strip(" \t"):
            blanks, row = blanks + 1, row + 1
        if row >= len(self.lines):
            raise self.error("unterminated quoted scalar: no closing quote", *opener)
        self.check_continuation(row, n, "quoted scalar")
        out.append("\n" * blanks if blanks or escaped else " ")
        return row, _YAML_WS_RE.match(self.lines[row]).end()

    def escape(self, row: int, i: int) -> tuple[str, int]:
        """Decode the escape sequence at line[i] (a backslash); return its text and where it ends."""
        line = self.lines[row]
        code = line[i + 1]
        if code in _YAML_ESCAPES:
            return _YAML_ESCAPES[code], i + 2
        width = _YAML_HEX_ESCAPES.get(code, 0)
        digits = line[i + 2:i + 2 + width]
        if width and len(digits) == width and _YAML_HEX_RE.fullmatch(digits):
            point = int(digits, 16)
            if point > 0x10FFFF or 0xD800 <= point <= 0xDFFF:
                raise self.error(f"escape '\\{code}{digits}' is not a Unicode character", row, i)
            return chr(point), i + 2 + width
        raise self.error(f"invalid escape '\\{code}' in a double-quoted scalar", row, i)

    def block_scalar(self, n: int) -> str:
        """block-scalar(n) ::= ( "|" | ">" ) ( digit chomp? | chomp digit? )? comment? NL line*,
        with chomp '-' (strip) or '+' (keep), and every line indented at least n + digit, or
        as much as the first non-empty line when there is no digit (more than n)."""
        row, col = self.row, self.col
        line = self.lines[row]
        header = _YAML_BLOCK_HEADER_RE.match(line, col)
        if header is None or _YAML_END_RE.match(line, header.end()) is None:
            bad = header.end() if header else col + 1
            if line[bad:bad + 1] == "#":
                message = "a comment after a block scalar header needs whitespace before '#'"
            else:
                message = ("bad block scalar header: after '|' or '>' only a chomping indicator "
                           "('-' or '+'), an indentation digit 1-9 and a comment may follow")
            raise self.error(message, row, bad)
        digit = header.group(1) or header.group(4)
        chomp = header.group(2) or header.group(3) or ""
        lines = self.block_scalar_lines(row + 1, n, n + int(digit) if digit else None)
        if digit and n < 0 and any(line is not None for line in lines):
            # The grammar says column digit-1 here, libyaml and PyYAML say column digit.
            raise self.error("an indentation digit on a top-level block scalar is read differently by "
                             "different YAML parsers; remove it", row, col + 1)
        return _yaml_block_text(lines, line[col] == ">", chomp)

    def block_scalar_lines(self, row: int, n: int, indent: int | None) -> list[str | None]:
        """Collect a block scalar's lines with their indentation removed (None: empty line).
        Without an explicit indentation, the first non-empty line sets it."""
        out: list[str | None] = []
        leading = (0, row)  # the most spaces on an empty line before the first content, and where
        while row < len(self.lines):
            line = self.lines[row]
            if _yaml_is_marker(line):
                break
            stripped = line.lstrip(" ")
            spaces = len(line) - len(stripped)
            if indent is None and stripped and spaces > n:
                indent = spaces
                if leading[0] > indent:
                    raise self.error("a leading empty line of this block scalar has more spaces "
                                     "than its first content line", leading[1], leading[0])
            if indent is not None and spaces >= indent and (stripped or spaces > indent):
                out.append(line[indent:])
            elif not stripped:
                out.append(None)
                leading = max(leading, (spaces, row)) if indent is None else leading
            elif stripped[0] == "\t":
                raise self.error("tab character used for indentation in a block scalar", row, spaces)
            else:
                break
            row += 1
        self.row, self.col = row, 0
        return out

    # -- flow collections -----------------------------------------------------------------

    def flow_collection(self, n: int, path: tuple) -> object:
        """flow-collection ::= flow-sequence | flow-mapping; its lines are indented more than n."""
        self.enter(self.row, self.col)
        if self.peek() == "[":
            value: object = self.flow_sequence(n, path)
        else:
            value = self.flow_mapping(n, path)
        self.depth -= 1
        return value

    def flow_skip(self, n: int, opener: tuple[int, int]) -> None:
        """Skip spaces, tabs, comments and line breaks inside a flow collection."""
        line = self.lines[self.row]
        col = _YAML_WS_RE.match(line, self.col).end()
        while col == len(line) or (line[col] == "#" and (col == 0 or line[col - 1] in " \t")):
            self.row += 1
            if self.row >= len(self.lines):
                raise self.error("unterminated flow collection: no closing bracket for this one", *opener)
            line = self.lines[self.row]
            if not self.blank[self.row]:
                self.check_continuation(self.row, n, f"flow collection opened on line {opener[0] + 1}")
            col = _YAML_WS_RE.match(line).end()
        self.col = col

    def flow_sequence(self, n: int, path: tuple) -> list:
        """flow-sequence ::= "[" ( entry ( "," entry )* ","? )? "]",
        entry ::= flow-node | key ":" flow-node?  (a single-pair mapping)."""
        opener = (self.row, self.col)
        self.col += 1
        items: list = []
        while True:
            self.flow_skip(n, opener)
            if self.peek() == "]":
                self.col += 1
                return items
            items.append(self.flow_sequence_entry(n, path + (len(items),), opener))
            self.flow_skip(n, opener)
            if self.peek() == ",":
                self.col += 1
            elif self.peek() != "]":
                raise self.error(f"expected ',' or ']' in the flow sequence opened on line {opener[0] + 1}",
                                 self.row, self.col)

    def flow_sequence_entry(self, n: int, path: tuple, opener: tuple[int, int]) -> object:
        """One flow sequence entry; 'key: value' in a sequence is a single-pair mapping."""
        row, col = self.row, self.col
        value, kind = self.flow_node(n, path)
        end_row = self.row
        self.flow_skip(n, opener)
        if not self.at_value_indicator(kind):
            return value
        if kind == "collection":
            raise self.error("flow collections cannot be mapping keys (complex keys are not supported)", row, col)
        self.check_merge_key(value, kind, row, col)
        if end_row != row or self.row != row:
            raise self.error("an implicit key and its ':' must be on one line", row, col)
        self.col += 1
        pair = {value: self.flow_value(n, path + (value,), opener)}
        self.positions[path + (value,)] = (row + 1, col + 1)
        return pair

    def flow_mapping(self, n: int, path: tuple) -> dict:
        """flow-mapping ::= "{" ( pair ( "," pair )* ","? )? "}", pair ::= key ( ":" flow-node? )?"""
        opener = (self.row, self.col)
        self.col += 1
        mapping: dict = {}
        while True:
            self.flow_skip(n, opener)
            if self.peek() == "}":
                self.col += 1
                return mapping
            row, col = self.row, self.col
            if self.peek() in ("[", "{"):
                raise self.error("flow collections cannot be mapping keys (complex keys are not supported)", row, col)
            key, kind = self.flow_scalar(n)
            self.check_merge_key(key, kind, row, col)
            self.check_new_key(mapping, key, path, row, col)
            self.flow_skip(n, opener)
            value = None
            if self.at_value_indicator(kind):
                self.col += 1
                value = self.flow_value(n, path + (key,), opener)
            mapping[key] = value
            self.positions[path + (key,)] = (row + 1, col + 1)
            self.flow_skip(n, opener)
            if self.peek() == ",":
                self.col += 1
            elif self.peek() != "}":
                raise self.error(f"expected ',' or '}}' in the flow mapping opened on line {opener[0] + 1}",
                                 self.row, self.col)

    def at_value_indicator(self, kind: str) -> bool:
        """Whether the cursor is at a ':' that separates a flow key from its value. After a
        quoted key or a collection it may touch the value ("a":b); after a plain key not."""
        line = self.lines[self.row]
        if self.peek() != ":":
            return False
        return kind != "plain" or line[self.col + 1:self.col + 2] in ("", " ", "\t", ",", "[", "]", "{", "}")

    def flow_value(self, n: int, path: tuple, opener: tuple[int, int]) -> object:
        """The value after a ':' in a flow collection; empty (None) before ',', ']' or '}'."""
        self.flow_skip(n, opener)
        if self.peek() in (",", "]", "}"):
            self.positions[path] = (self.row + 1, self.col + 1)
            return None
        return self.flow_node(n, path)[0]

    def flow_node(self, n: int, path: tuple) -> tuple[object, str]:
        """flow-node ::= flow-collection | flow-scalar; also says which kind it was."""
        self.positions[path] = (self.row + 1, self.col + 1)
        if self.peek() in ("[", "{"):
            return self.flow_collection(n, path), "collection"
        return self.flow_scalar(n)

    def flow_scalar(self, n: int) -> tuple[object, str]:
        """flow-scalar ::= quoted-scalar | plain-scalar; also says which kind it was."""
        row, col = self.row, self.col
        if self.peek() in ("'", '"'):
            return self.scan_quoted(n), "quoted"
        self.check_node_start(row, col)
        return self.type_plain(self.plain_in_flow(n), row, col), "plain"

    def plain_in_flow(self, n: int) -> str:
        """A plain scalar inside a flow collection; it may continue on lines indented more than
        n, and ends at ',', brackets, a ':' before whitespace or brackets, or a comment."""
        line = self.lines[self.row]
        match = _YAML_PLAIN_FLOW_RE.match(line, self.col)
        if match is None:
            raise self.error(f"unexpected {line[self.col]!r} in a flow collection; quote the value",
                             self.row, self.col)
        parts = [match.group()]
        self.col = match.end()
        while _YAML_WS_RE.match(line, self.col).end() == len(line):
            row, blanks = self.row + 1, 0
            while row < len(self.lines) and not self.lines[row].strip(" \t"):
                blanks, row = blanks + 1, row + 1
            if row >= len(self.lines) or _yaml_is_marker(self.lines[row]):
                break
            text = self.lines[row]
            start = _YAML_WS_RE.match(text).end()
            match = _YAML_PLAIN_MORE_FLOW_RE.match(text, start)
            if match is None or text[start] == "#" or len(text) - len(text.lstrip(" ")) <= n:
                break  # what follows is flow_skip's to judge
            parts.append("\n" * blanks if blanks else " ")
            parts.append(match.group())
            self.row, self.col, line = row, match.end(), text
        return "".join(parts)

# ==== 8. YAML writer =========================================================
# dump_yaml writes block YAML that the reader above and PyYAML's safe_load both read
# back to the same data: it is how config.yaml is stored in each run folder.

# The writer's rules. A string is written plain only when it is made of these characters and
# neither YAML 1.2 nor PyYAML's YAML 1.1 would read it as anything but that same string.
_YAML_PLAIN_OK_RE = re.compile(r"[\w./](?:[\w ./:@+=,()~%^*!?<>;$\\&'#-]*[\w./@+=,()~%^*!?<>;$\\&'#-])?")
_YAML_NUMBER_LIKE_RE = re.compile(r"[-+]?(?:[0-9]|\.[0-9_])|\.(?:inf|nan)$", re.IGNORECASE)
_YAML_11_WORDS = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"})
_YAML_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_YAML_DQ_ESCAPE_RE = re.compile('[\\\\"\x00-\x1f\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff]')
_YAML_DQ_UNESCAPES = {
    "\0": "\\0", "\a": "\\a", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\v": "\\v", "\f": "\\f",
    "\r": "\\r", "\x1b": "\\e", '"': '\\"', "\\": "\\\\", "\x85": "\\N", "\u2028": "\\L",
    "\u2029": "\\P",
}
# Multi-line strings are written as literal blocks when every line reads back unchanged.
_YAML_LITERAL_OK = (  # no tab, and not U+0085, U+2028, U+2029: line breaks to YAML 1.1
    "[\n\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]*")
_YAML_ASCII_LITERAL_OK_RE = re.compile("[\n\x20-\x7e]*")  # the same, for ASCII text

_YAML_TRAILING_SPACE_RE = re.compile(r" (?:\n|$)")


def dump_yaml(data: object) -> str:
    """Write data as block-style YAML that parse_yaml and PyYAML's safe_load read back equal.

    data is made of dict (keys: str, int, float, bool or None), list or tuple (read back as
    list), str, int, float, bool and None; key order is kept. Strings are written plain when
    that is unambiguous under both YAML 1.2 and YAML 1.1, as literal blocks when they are
    tidy multi-line text, else double-quoted with escapes. Raises TypeError for other types,
    ValueError for nesting deeper than the reader accepts, lone surrogates, or a key longer
    than 1024 characters once written.
    """
    out: list[str] = []
    if isinstance(data, (dict, list, tuple)) and data:
        _yaml_dump_block(data, 0, out, 1)
    else:
        _yaml_dump_entry("", data, 0, out, 0)
    return "\n".join(out) + "\n"


def _yaml_check_depth(depth: int) -> None:
    """Refuse to write what the reader would refuse to read back."""
    if depth > _YAML_MAX_DEPTH:
        raise ValueError(f"data nested deeper than {_YAML_MAX_DEPTH} levels cannot be written "
                         "(the reader refuses it)")


def _yaml_dump_block(value: dict | list | tuple, indent: int, out: list[str], depth: int) -> None:
    """Append a non-empty dict or list with its entries at column indent."""
    _yaml_check_depth(depth)
    pad = " " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            _yaml_dump_entry(f"{pad}{_yaml_dump_key(key)}:", item, indent, out, depth)
        return
    for item in value:
        if isinstance(item, (dict, list, tuple)) and item:  # compact: the first entry shares the '-' line
            start = len(out)
            _yaml_dump_block(item, indent + 2, out, depth + 1)
            out[start] = f"{pad}- {out[start][indent + 2:]}"
        else:
            _yaml_dump_entry(f"{pad}-", item, indent, out, depth)


def _yaml_dump_entry(head: str, value: object, indent: int, out: list[str], depth: int) -> None:
    """Append 'head value' where head is 'key:', '-' or '' (the document), indent its column."""
    sep = " " if head else ""
    if isinstance(value, (dict, list, tuple)):
        _yaml_check_depth(depth + 1)
        if value:
            out.append(head)
            _yaml_dump_block(value, indent + 2, out, depth + 1)
            return
    if isinstance(value, str) and _yaml_literal_ok(value):
        newlines = len(value) - len(value.rstrip("\n"))
        out.append(f"{head}{sep}|{'-' if newlines == 0 else '' if newlines == 1 else '+'}")
        lines = value.split("\n")
        if newlines:
            lines.pop()  # the last line break is the header's to give back
        out.extend(" " * (indent + 2) + line if line else "" for line in lines)
    else:
        out.append(f"{head}{sep}{_yaml_dump_scalar(value)}")


def _yaml_literal_ok(text: str) -> bool:
    """Whether a string reads back exactly from a literal block ('|'): multi-line, printable,
    no tabs, no trailing spaces, and a first line that sets the indentation."""
    printable = _YAML_ASCII_LITERAL_OK_RE if text.isascii() else _yaml_regex(_YAML_LITERAL_OK)
    return ("\n" in text and text[0] not in " \n" and printable.fullmatch(text) is not None
            and _YAML_TRAILING_SPACE_RE.search(text) is None)


def _yaml_dump_key(key: object) -> str:
    """A mapping key on one line; YAML limits implicit keys to 1024 characters."""
    if not (key is None or isinstance(key, (str, int, float))):
        raise TypeError(f"cannot write a mapping key of type {type(key).__name__} as YAML")
    text = _yaml_dump_scalar(key)
    if len(text) > _YAML_MAX_KEY:
        raise ValueError(f"a mapping key longer than {_YAML_MAX_KEY} characters cannot be written")
    return text


def _yaml_dump_scalar(value: object) -> str:
    """A scalar (or empty collection) on one line, read the same by YAML 1.2 core and YAML 1.1."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return _yaml_dump_float(value)
    if isinstance(value, str):
        return _yaml_dump_str(value)
    if isinstance(value, (dict, list, tuple)) and not value:
        return "{}" if isinstance(value, dict) else "[]"
    raise TypeError(f"cannot write a value of type {type(value).__name__} as YAML")


def _yaml_dump_float(value: float) -> str:
    """A float that reads back as a float: YAML 1.1 wants a '.' before any exponent."""
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    mantissa, e, exponent = repr(value).partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return mantissa + e + exponent


def _yaml_dump_str(text: str) -> str:
    """A string, plain when nothing could read it as another type or structure, else quoted."""
    if _YAML_SURROGATE_RE.search(text):
        raise ValueError("a string with a lone surrogate cannot be written as UTF-8 YAML")
    if (_YAML_PLAIN_OK_RE.fullmatch(text) and ": " not in text and " #" not in text and not text.startswith("...")
            and _YAML_NUMBER_LIKE_RE.match(text) is None and text.lower() not in _YAML_11_WORDS):
        return text
    return '"' + _YAML_DQ_ESCAPE_RE.sub(_yaml_escape_char, text) + '"'


def _yaml_escape_char(match: re.Match) -> str:
    """The double-quoted escape for one character."""
    ch = match.group()
    if ch in _YAML_DQ_UNESCAPES:
        return _YAML_DQ_UNESCAPES[ch]
    return f"\\x{ord(ch):02X}" if ord(ch) < 0x100 else f"\\u{ord(ch):04X}"

# ==== 9. Config loading and validation =======================================

def fmt_scalar(value: object) -> str:
    """Spell a YAML scalar as the job sees it in its environment (true, not True; 0.1, not 1e-01)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    return str(value)


def parse_size(value: object) -> int:
    """Bytes from `8g`, `512m`, `8GiB`, `1.5G`, `1024` (plain bytes); ValueError if nonsense."""
    if isinstance(value, bool) or value is None:
        raise ValueError
    if isinstance(value, int):
        if value <= 0:
            raise ValueError
        return value
    match = SIZE_RE.match(str(value).strip())
    if not match or (match.group(3) and not match.group(2) and match.group(3).lower() != "b"):
        raise ValueError
    number = float(match.group(1)) * SIZE_UNITS[match.group(2).lower()]
    if number < 1:
        raise ValueError
    return int(number)


def size_spec(size: int | None) -> str | int | None:
    """8589934592 -> "8g": a size as a config spells it, the largest unit that divides it exactly."""
    if size is None:
        return None
    for unit in "tgmk":
        if size % SIZE_UNITS[unit] == 0:
            return f"{size // SIZE_UNITS[unit]}{unit}"
    return size


def parse_duration(value: object) -> float:
    """Seconds from `90`, `90s`, `30m`, `2h`, `1d`; ValueError if nonsense."""
    if isinstance(value, bool) or value is None:
        raise ValueError
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = DURATION_RE.match(str(value).strip())
        if not match:
            raise ValueError
        seconds = float(match.group(1)) * DURATION_UNITS[(match.group(2) or "").lower()]
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError
    return seconds


class _Checker:
    """Collects located problems while a config is validated, so all can be listed at once.

    A problem under a key that a `--set` argument set is blamed on that argument, not the file.
    """

    def __init__(self, filename: str, text: str, positions: dict, overrides: dict | None = None) -> None:
        self.filename = filename
        self.lines = text.splitlines()
        self.positions = positions
        self.overrides = overrides or {}   # path -> what set it: `--set env.LR=1`, `--grid ...`
        self.problems: list[ConfigError] = []

    def problem(self, path: tuple, message: str) -> None:
        blamed = self._blamed(path)
        if blamed:
            self.problems.append(ConfigError(message, blamed))
            return
        line, col = self._locate(path)
        source = self.lines[line - 1] if line and line <= len(self.lines) else None
        self.problems.append(ConfigError(message, self.filename, line, col, source))

    def _blamed(self, path: tuple) -> str | None:
        """The --set argument that set PATH or a key above it, or that made the mapping at PATH."""
        for length in range(len(path), 0, -1):
            if path[:length] in self.overrides:
                return self.overrides[path[:length]]
        if path not in self.positions:  # not in the file: a --set below it created it
            return next((item for where, item in self.overrides.items() if where[:len(path)] == path), None)
        return None

    def _locate(self, path: tuple) -> tuple[int | None, int | None]:
        while path not in self.positions and path:
            path = path[:-1]
        return self.positions.get(path, (None, None))

    def raise_if_any(self) -> None:
        if self.problems:
            first = self.problems[0]
            first.others = self.problems[1:]
            raise first


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _shown(value: object) -> str:
    """A value as a message quotes it: 'text', 3, {"x": 1} (JSON is YAML's flow style; no Python reprs)."""
    return repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def _did_you_mean(word: str, choices: tuple[str, ...]) -> str:
    import difflib  # only here: not every start pays for it
    word = word.lower()
    close = [KEY_SYNONYMS[word]] if KEY_SYNONYMS.get(word) in choices else \
        difflib.get_close_matches(word, choices, n=1) or \
        [c for c in choices if word.startswith(c) or c.startswith(word)]
    return f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(choices)})"


def _check_keys(chk: _Checker, data: dict, path: tuple, allowed: tuple[str, ...]) -> None:
    for key in data:
        if key not in allowed:
            where = f" in {_dotted(path)}" if path else ""
            chk.problem(path + (key,), f"unknown key '{key}'{where}{_did_you_mean(str(key), allowed)}")


def _check_no_nul(chk: _Checker, data: object, path: tuple = ()) -> None:
    """No command line, path or environment can hold a NUL character: refuse it anywhere."""
    if isinstance(data, str) and "\0" in data:
        chk.problem(path, f"{_dotted(path) or 'the config'} contains a NUL character (\\0), which no "
                          "command line, path or environment can hold; remove it")
    elif isinstance(data, dict):
        for key, value in data.items():
            _check_no_nul(chk, key, path + (key,))
            _check_no_nul(chk, value, path + (key,))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            _check_no_nul(chk, value, path + (i,))


def _engine_lacks_image(chk: _Checker, data: dict) -> bool:
    """A container engine set by --set or a sweep's point on a config without an image: the problem
    is blamed on that engine, not on the file (whose engine needed none)."""
    named = data.get("engine")
    if data.get("image") is not None or chk._blamed(("engine",)) is None or named is None \
            or (isinstance(named, str) and named in ENGINES and not ENGINES[named].needs_image):
        return False
    chk.problem(("engine",), f"engine {data['engine']} runs an image, and the config names none; add "
                             "'image: ...' to the config, or leave this engine out")
    return True


def _check_text(chk: _Checker, data: dict, path: tuple, required: bool = False) -> str | None:
    """A text value (a number where a name is expected is a mistake: `image: 3.11` is not an image)."""
    value = data.get(path[-1])
    name = _dotted(path)
    if value is None:
        if required:
            chk.problem(path if path[-1] in data else path[:-1], f"'{name}' is required: add a line '{name}: ...'")
        return None
    if isinstance(value, (dict, list)):
        chk.problem(path, f"'{name}' must be text, not a {'list' if isinstance(value, list) else 'mapping'}")
        return None
    if not isinstance(value, str):
        chk.problem(path, f"'{name}' must be text, not the {type(value).__name__} {fmt_scalar(value)}; "
                          f"quote it as you mean it ({path[-1]}: \"...\")")
        return None
    if not value.strip():
        chk.problem(path, f"'{name}' must not be empty")
        return None
    return value


def _check_entrypoint(chk: _Checker, data: dict) -> str | tuple[str, ...] | None:
    value = data.get("entrypoint")
    if isinstance(value, list):
        if not value or any(isinstance(v, (dict, list)) or v is None for v in value):
            chk.problem(("entrypoint",), "'entrypoint' as a list must hold one or more plain words")
            return None
        return tuple(fmt_scalar(v) for v in value)
    return _check_text(chk, data, ("entrypoint",), required=True)


def _check_env(chk: _Checker, env: object) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, dict):
        chk.problem(("env",), "'env' must be a mapping of NAME: value")
        return {}
    result = {}
    for name, value in env.items():
        path = ("env", name)
        if not isinstance(name, str) or not ENV_NAME_RE.match(name):
            chk.problem(path, f"env name {str(name)!r} is not a valid variable name "
                              "(letters, digits and _, not starting with a digit)")
        elif isinstance(value, (dict, list)):
            chk.problem(path, f"env.{name} must be a single value, not a {type(value).__name__}")
        else:
            result[name] = fmt_scalar(value)
    return result


def _mount_problem(path_text: str) -> str | None:
    """What makes a path unmountable as `-v host:container`: ':' and ',' split the option."""
    if not path_text:
        return "is empty"
    for char in ":,\n":
        if char in path_text:
            return f"holds {char!r}, which the engines cannot mount exactly"
    return None


def _parse_mount_spec(spec: str) -> tuple[str, str | None, bool]:
    """Split `host[:container[:ro|rw]]` into (host, container or None, read_only)."""
    parts = spec.split(":")
    read_only = False
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        read_only = parts.pop() == "ro"
    if len(parts) > 2:
        raise ValueError(f"{spec!r} has too many ':'; write host_path:container_path[:ro]")
    return parts[0], (parts[1] if len(parts) == 2 else None), read_only


def _check_mount(chk: _Checker, path: tuple, spec: object, name: str | None, base: Path,
                 workdir: str | None) -> Mount | None:
    if not isinstance(spec, str):
        chk.problem(path, f"mount {_dotted(path)} must be a path or 'host_path:container_path[:ro]'")
        return None
    try:
        host, target, read_only = _parse_mount_spec(spec)
    except ValueError as exc:
        chk.problem(path, f"mount {_dotted(path)}: {exc}")
        return None
    if target is None:
        if name is None:
            chk.problem(path, f"mount {spec!r} needs a container path: write '{spec}:/data'")
            return None
        target = (workdir or DEFAULT_WORKDIR) if name == "code" else f"{NAMED_MOUNT_ROOT}/{name}"
    elif not target.startswith("/"):
        chk.problem(path, f"mount {_dotted(path)} reads as host path {host!r} and container path {target!r}, "
                          "which needs an absolute container path; a folder whose name holds ':' cannot be mounted")
        return None
    source = str((base / os.path.expanduser(host)).resolve())
    for where, text, fix in ((path, host, "rename the folder"), (path, source, "move or rename the folder"),
                             (("workdir",) if name == "code" else path, target, "choose another container path")):
        problem = _mount_problem(text)
        if problem:
            chk.problem(where, f"mount {_dotted(path)}: {text!r} {problem}; {fix}")
            return None
    if not os.path.exists(source):
        chk.problem(path, f"mount {_dotted(path)}: {source} does not exist; create it or fix the path")
        return None
    return Mount(source, target, read_only, name)


def _check_mounts(chk: _Checker, mounts: object, base: Path, workdir: str | None) -> tuple[Mount, ...]:
    if mounts is None:
        return ()
    if isinstance(mounts, dict):
        items = [(("mounts", k), v, str(k)) for k, v in mounts.items()]
        for (path, _, name) in items:
            if not re.match(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z", name):
                chk.problem(path, f"mount name {name!r} must be letters, digits, '_', '.' or '-'")
    elif isinstance(mounts, list):
        items = [(("mounts", i), v, None) for i, v in enumerate(mounts)]
    else:
        chk.problem(("mounts",), "'mounts' must be a mapping (name: path) or a list of 'host:container'")
        return ()
    found = [_check_mount(chk, path, spec, name, base, workdir) for path, spec, name in items]
    return tuple(m for m in found if m is not None)


def _check_gpus(chk: _Checker, value: object) -> int | str | tuple[str, ...] | None:
    path = ("resources", "gpus")
    if value is None or value == 0 and not isinstance(value, bool):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and value.strip().lower() == "all":
        return "all"
    if isinstance(value, list) and value and all(
            isinstance(v, (int, str)) and not isinstance(v, bool) and re.match(r"[\w-]+\Z", str(v))
            for v in value):
        return tuple(str(v) for v in value)
    chk.problem(path, "resources.gpus must be a count (1), 'all', or a list of device indices or "
                      f"UUIDs ([0, 2]); got {_shown(value)}")
    return None


def _check_number(chk: _Checker, path: tuple, value: object, parse, what: str):
    if value is None:
        return None
    try:
        return parse(value)
    except (ValueError, OverflowError):
        chk.problem(path, f"{_dotted(path)} must be {what}; got {_shown(value)}")
        return None


def _positive_float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError
    number = float(value)
    if not (number > 0 and math.isfinite(number)):
        raise ValueError
    return number


def _check_resources(chk: _Checker, res: object) -> Resources:
    if res is None:
        return Resources()
    if not isinstance(res, dict):
        chk.problem(("resources",), "'resources' must be a mapping (gpus, cpu, memory, shm_size)")
        return Resources()
    _check_keys(chk, res, ("resources",), RESOURCE_KEYS)
    size = "a size such as 8g, 512m, 8GiB or plain bytes"
    return Resources(
        gpus=_check_gpus(chk, res.get("gpus")),
        cpu=_check_number(chk, ("resources", "cpu"), res.get("cpu"), _positive_float, "a positive number of CPUs"),
        memory=_check_number(chk, ("resources", "memory"), res.get("memory"), parse_size, size),
        shm_size=_check_number(chk, ("resources", "shm_size"), res.get("shm_size"), parse_size, size),
    )


def _check_metrics(chk: _Checker, metrics: object) -> tuple[str, ...]:
    if metrics is None:
        return ()
    if isinstance(metrics, str):
        metrics = [metrics]
    if not isinstance(metrics, list):
        chk.problem(("metrics",), "'metrics' must be a list of metric names")
        return ()
    names = []
    for i, name in enumerate(metrics):
        if not isinstance(name, str) or not METRIC_KEY_RE.match(name):
            chk.problem(("metrics", i), f"metric name {name!r} must be letters, digits, '_', '.', '-' or '/'")
        else:
            names.append(name)
    return tuple(names)


def _check_engine(chk: _Checker, engine: object) -> str | None:
    if engine is None:
        return None
    if not isinstance(engine, str) or engine not in ENGINES:
        chk.problem(("engine",), f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
        return None
    return str(engine)


def repeated_value(values: list) -> tuple[object] | None:
    """The first value that VALUES holds twice (1 and 1.0 are one value, True and 1 are not), in a
    1-tuple; None when every value is different."""
    seen = set()
    for value in values:
        key = (isinstance(value, bool), value)
        if key in seen:
            return (value,)
        seen.add(key)
    return None


def _check_sweep(chk: _Checker, sweep: object) -> tuple[tuple[str, tuple], ...]:
    """`sweep: {env.LR: [0.1, 0.01], seed: [1, 2]}`: dotted keys (as --set takes) and their values."""
    if sweep is None:
        return ()
    if not isinstance(sweep, dict) or not sweep:
        chk.problem(("sweep",), "'sweep' must be a mapping of dotted keys to lists of values "
                                "(sweep: {env.LR: [0.1, 0.01]})")
        return ()
    axes = []
    for key, values in sweep.items():
        path = ("sweep", key)
        if not isinstance(key, str) or not all(key.split(".")) or key.split(".")[0] in ("sweep", "slurm"):
            chk.problem(path, f"sweep key {key!r} must be a dotted config key such as env.LR")
        elif not isinstance(values, list) or not values or any(isinstance(v, (dict, list)) for v in values):
            chk.problem(path, f"sweep.{key} must be a non-empty list of plain values ([0.1, 0.01])")
        elif (twice := repeated_value(values)) is not None:
            chk.problem(path, f"sweep.{key} gives the value {_shown(twice[0])} twice, which would run the same "
                              "point twice; give each value once (--repeat N runs every point N times)")
        else:
            axes.append((key, tuple(values)))
    return tuple(axes)


# Slurm's --time spellings: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
SLURM_TIME_RE = re.compile(r"\d+(?::\d{1,2}){0,2}|\d+-\d{1,2}(?::\d{1,2}){0,2}|UNLIMITED|INFINITE\Z")
SLURM_KEYS = ("partition", "time", "account", "qos", "constraint", "python", "setup", "extra", "gpu_flag")


def slurm_time(seconds: float) -> str:
    """A duration in Slurm's D-HH:MM:SS spelling, rounded up to whole minutes."""
    minutes = max(1, math.ceil(seconds / 60))
    days, minutes = divmod(minutes, 1440)
    return (f"{days}-" if days else "") + f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def _check_slurm_time(chk: _Checker, value: object) -> str | None:
    if value is None:
        return None
    text = fmt_scalar(value).strip()
    if SLURM_TIME_RE.fullmatch(text) and not isinstance(value, float):
        return text
    try:
        return slurm_time(parse_duration(value))
    except ValueError:
        chk.problem(("slurm", "time"), f"slurm.time must be Slurm's D-HH:MM:SS or a duration such as 2h; "
                                       f"got {_shown(value)}")
        return None


def _check_lines(chk: _Checker, data: dict, key: str) -> tuple[str, ...]:
    value = data.get(key)
    if value is None:
        return ()
    lines = [value] if isinstance(value, str) else value
    if not isinstance(lines, list) or not all(isinstance(v, str) for v in lines):
        chk.problem(("slurm", key), f"slurm.{key} must be a text line or a list of text lines")
        return ()
    return tuple(line for text in lines for line in text.splitlines() if line.strip())


# sbatch options that RunPilot writes itself (see sbatch_lines): slurm.extra may not change them.
SLURM_OWNED_OPTIONS = {"--job-name", "-J", "--output", "-o", "--nodes", "-N", "--ntasks", "-n", "--array", "-a",
                       "--parsable", "--wrap"}

# The slurm: values that become one sbatch option's value: a space would start another option.
SLURM_TOKEN_KEYS = ("partition", "account", "qos", "constraint", "gpu_flag")
# sbatch's short options that take no value: after one of them, the next letter of `-vJx` is an option too.
SBATCH_SHORT_FLAGS = set("hHIkOQsvVW")


def owned_sbatch_option(line: str) -> str | None:
    """The option of SLURM_OWNED_OPTIONS that an #SBATCH line sets, in any spelling sbatch
    (getopt_long) accepts: `--output=x`, `--out=x` (an unambiguous prefix), `-o x`, `-ox`, `-vJx`;
    a line that cannot be split as sbatch would split it counts as one that sets --wrap."""
    try:
        tokens = shlex.split(line)
    except ValueError:
        return f"{line.split()[0] if line.split() else line} (a line sbatch cannot split: unbalanced quotes)"
    owned_long = [o for o in SLURM_OWNED_OPTIONS if o.startswith("--")]
    for token in tokens:
        if token.startswith("--") and len(token) > 2:
            name = token.split("=", 1)[0]
            hit = next((o for o in sorted(owned_long) if o.startswith(name)), None)
            if hit:
                return name if name == hit else f"{hit} (as {name})"
        elif token.startswith("-") and len(token) > 1:
            for letter in token[1:]:
                if f"-{letter}" in SLURM_OWNED_OPTIONS:
                    return f"-{letter}" if token == f"-{letter}" else f"-{letter} (as {token})"
                if letter not in SBATCH_SHORT_FLAGS:
                    break  # the rest is this option's value
    return None


def _check_slurm(chk: _Checker, slurm: object) -> SlurmSettings:
    if slurm is None:
        return SlurmSettings()
    if not isinstance(slurm, dict):
        chk.problem(("slurm",), f"'slurm' must be a mapping ({', '.join(SLURM_KEYS)})")
        return SlurmSettings()
    _check_keys(chk, slurm, ("slurm",), SLURM_KEYS)
    text = {k: _check_text(chk, slurm, ("slurm", k)) for k in ("partition", "account", "qos", "constraint",
                                                                 "python", "gpu_flag")}
    if text["gpu_flag"] not in (None, "gpus", "gres"):
        chk.problem(("slurm", "gpu_flag"), f"slurm.gpu_flag must be gpus (--gpus=K) or gres (--gres=gpu:K); "
                                           f"got {text['gpu_flag']!r}")
    for key, value in text.items():  # each becomes one #SBATCH line: a line break would end the block
        if value and re.search(r"[\x00-\x1f\x7f]", value):
            chk.problem(("slurm", key), f"slurm.{key} must be one line of text, without control characters; "
                                        f"got {value!r}")
            text[key] = None
        elif value and key in SLURM_TOKEN_KEYS and re.search(r"[\s'\"\\]", value):
            chk.problem(("slurm", key), f"slurm.{key} must be one word (sbatch would read the rest as options of "
                                        f"its own): no spaces, quotes or backslashes; got {value!r}")
            text[key] = None
    extra = _check_lines(chk, slurm, "extra")
    for line in extra:
        flag = owned_sbatch_option(line)
        if flag:
            chk.problem(("slurm", "extra"), f"slurm.extra sets {flag}, which RunPilot sets itself (job name, "
                                            "output, one node and task, the array of a sweep); leave it out")
    return SlurmSettings(partition=text["partition"], time=_check_slurm_time(chk, slurm.get("time")),
                         account=text["account"], qos=text["qos"], constraint=text["constraint"],
                         python=text["python"] or "python3", setup=_check_lines(chk, slurm, "setup"),
                         extra=extra,
                         gpu_flag=text["gpu_flag"] if text["gpu_flag"] in ("gpus", "gres") else "gpus")


SSH_KEYS = ("hosts", "home", "mounts", "python")


def _check_ssh(chk: _Checker, ssh: object) -> SshSettings:
    """The `ssh:` section: hosts (a list of what ssh understands), home, mounts (name: box folder), python."""
    if ssh is None:
        return SshSettings()
    if not isinstance(ssh, dict):
        chk.problem(("ssh",), f"'ssh' must be a mapping ({', '.join(SSH_KEYS)})")
        return SshSettings()
    _check_keys(chk, ssh, ("ssh",), SSH_KEYS)
    text = {k: _check_text(chk, ssh, ("ssh", k)) for k in ("home", "python")}
    hosts = ssh.get("hosts") or []
    hosts = [hosts] if isinstance(hosts, str) else hosts
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        chk.problem(("ssh", "hosts"), "ssh.hosts must be a list of hosts as ssh understands them ([box1, box2])")
        hosts = []
    for host in hosts:
        if (why := ssh_host_problem(host)) is not None:
            chk.problem(("ssh", "hosts"), f"ssh.hosts: {why}")
    mounts = ssh.get("mounts") or {}
    if not isinstance(mounts, dict) or not all(isinstance(v, str) and v.startswith("/") for v in mounts.values()):
        chk.problem(("ssh", "mounts"), "ssh.mounts must map mount names to absolute folders on the box "
                                       "(mounts: {data: /datasets/imagenet})")
        mounts = {}
    home = text["home"] or "~/.runpilot"
    if not (home.startswith("/") or home.startswith("~/")) or re.search(r"[\x00-\x1f\x7f]", home):
        chk.problem(("ssh", "home"), f"ssh.home must be an absolute folder or one under ~/ on the box; got {home!r}")
    return SshSettings(hosts=tuple(hosts), home=home, python=text["python"] or "python3",
                       mounts=tuple(sorted((str(k), v) for k, v in mounts.items())))


def ssh_settings_to_data(ssh: SshSettings) -> dict:
    data = {"hosts": list(ssh.hosts), "home": ssh.home, "mounts": dict(ssh.mounts), "python": ssh.python}
    return {k: v for k, v in data.items() if v != getattr(SshSettings(), k) and v not in ([], {})}


def ssh_host_problem(host: str) -> str | None:
    """Why ssh must not be given HOST, or None: an option in disguise, whitespace or control characters."""
    if not host:
        return "the host is empty; give an alias from ~/.ssh/config, user@host or ssh://user@host:port"
    if host.startswith("-"):
        return (f"host {host!r} starts with '-', which ssh would read as an option (it could run a local "
                "command); give an alias from ~/.ssh/config, user@host or ssh://user@host:port")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 or c in "'\"`$;|&<>" for c in host):
        return (f"host {host!r} holds whitespace, quotes, shell or control characters; give an alias from "
                "~/.ssh/config, user@host or ssh://user@host:port")
    return None


def _check_switch(chk: _Checker, data: dict, key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        chk.problem((key,), f"{key} must be true or false; got {value!r}")
        return False
    return value


def _check_metrics_from(chk: _Checker, entries: object) -> tuple[MetricsSource, ...]:
    """`metrics_from:` is a list of recogniser names, `pattern: REGEX` and `tensorboard: FOLDER`."""
    if entries is None:
        return ()
    if isinstance(entries, (str, dict)):
        entries = [entries]
    if not isinstance(entries, list):
        chk.problem(("metrics_from",), "'metrics_from' must be a list such as [huggingface, pattern: REGEX]")
        return ()
    sources = []
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and len(entry) == 1 and next(iter(entry)) in ("pattern", "tensorboard"):
            kind, value = next(iter(entry.items()))
            where: tuple = ("metrics_from", i, kind)
        elif isinstance(entry, str):
            kind, value, where = "recogniser", entry, ("metrics_from", i)
        else:
            chk.problem(("metrics_from", i), f"metrics_from entry {entry!r} must be a recogniser's name, "
                        "pattern: REGEX or tensorboard: FOLDER")
            continue
        problem = metrics_source_problem(kind, value)
        if problem:
            chk.problem(where, problem)
        else:
            sources.append(MetricsSource(kind, value))
    return tuple(sources)


def validate_config(data: object, filename: str, text: str = "", positions: dict | None = None,
                    base_dir: Path | None = None, overrides: dict | None = None) -> JobConfig:
    """Turn parsed YAML into a JobConfig, or raise ConfigError listing every problem."""
    chk = _Checker(filename, text, positions or {}, overrides)
    if not isinstance(data, dict):
        what = "the config is empty" if data is None else "a config must be a mapping"
        chk.problem((), f"{what}; it needs at least name, image and entrypoint (runpilot init writes a sample)")
        chk.raise_if_any()
    assert isinstance(data, dict)
    _check_keys(chk, data, (), TOP_LEVEL_KEYS)
    _check_no_nul(chk, data)
    engine = _check_engine(chk, data.get("engine"))
    workdir = _check_text(chk, data, ("workdir",))
    if workdir is not None and not workdir.startswith("/"):
        chk.problem(("workdir",), f"workdir must be an absolute path inside the container; got {workdir!r}")
    base = base_dir or Path(filename).resolve().parent
    mounts = _check_mounts(chk, data.get("mounts"), base, workdir)
    implied = workdir is None and any(m.name == "code" for m in mounts)
    if implied:
        workdir = DEFAULT_WORKDIR
    config = JobConfig(
        name=_check_text(chk, data, ("name",), required=True) or "",
        image=_check_text(chk, data, ("image",), required=(engine is None or ENGINES[engine].needs_image)
                          and not _engine_lacks_image(chk, data)),
        entrypoint=_check_entrypoint(chk, data) or "",
        workdir=workdir,
        env=_check_env(chk, data.get("env")),
        mounts=mounts,
        resources=_check_resources(chk, data.get("resources")),
        metrics=_check_metrics(chk, data.get("metrics")),
        engine=engine,
        timeout=_check_number(chk, ("timeout",), data.get("timeout"), parse_duration,
                              "a duration such as 90s, 30m, 2h or a number of seconds"),
        source=str(Path(filename).resolve()) if filename and not filename.startswith("<") else None,
        sweep=_check_sweep(chk, data.get("sweep")),
        slurm=_check_slurm(chk, data.get("slurm")),
        stop_signal=_check_stop_signal(chk, data.get("stop_signal")),
        tensorboard=_check_switch(chk, data, "tensorboard"),
        metrics_from=_check_metrics_from(chk, data.get("metrics_from")),
        workdir_implied=implied,
        outputs=_check_outputs(chk, data, mounts),
        code_snapshot=_check_code_snapshot(chk, data.get("code_snapshot")),
        ssh=_check_ssh(chk, data.get("ssh")),
    )
    chk.raise_if_any()
    return config


def read_config_text(path: str | os.PathLike) -> str:
    """Read a config file as UTF-8, turning OS errors into one clear ConfigError."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; check the path (runpilot init writes a sample)")
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder, not a config file")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError("the file is not valid UTF-8; save it as UTF-8", str(path), line)


def parse_override(item: str, flag: str = "--set") -> tuple[tuple[str, ...], object]:
    """`a.b=value` -> (("a", "b"), value typed like a YAML scalar)."""
    key, sep, raw = item.partition("=")
    parts = tuple(key.split("."))
    if not sep or not all(parts):
        raise UsageError(f"{flag} {item!r} must look like KEY=VALUE, e.g. {flag} env.LR=0.01")
    if "\n" in raw or "\r" in raw:  # refused: the job would get another value than the one typed
        raise UsageError(f"{flag} {key}: the value {raw!r} has a line break, which YAML would fold into a "
                         f"space; to keep it, write the value in the config in double quotes (\"a\\nb\")")
    try:
        value, _, texts = parse_config_yaml(raw, f"{flag} {key}") if raw.strip() else ("", {}, {})
        in_env = parts[0] == "env" and (len(parts) > 1 or isinstance(value, dict))  # env values are text
        return parts, with_plain_text(value, texts, ()) if in_env else value
    except YamlError as exc:
        raise UsageError(f"{flag} {item}: cannot read the value {raw!r}: {exc.message}") from None


def apply_overrides(data: object, overrides: list[str]) -> tuple[object, dict[tuple, str]]:
    """Apply `--set a.b=value` overrides to parsed config data; also say which argument set which key."""
    blamed: dict[tuple, str] = {}
    for item in overrides:
        parts, value = parse_override(item)
        check_new_key(data, parts, f"--set {item}")
        data = set_dotted(data, parts, value, f"--set {item}")
        blamed[parts] = f"--set {item}"
    return data, blamed


def set_dotted(data: object, parts: tuple[str, ...], value: object, what: str) -> object:
    """Set data[a][b]... = value, creating mappings on the way; `what` names the request in errors."""
    if not isinstance(data, dict):
        raise UsageError(f"{what}: the config is not a mapping at {parts[0]!r}")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UsageError(f"{what}: {part!r} holds a {type(child).__name__}, not a mapping")
        node = child
    node[parts[-1]] = value
    return data


def load_config_data(path: str | os.PathLike) -> tuple[object, str, dict]:
    """A config file's parsed data, text and node positions (raises ConfigError)."""
    text = read_config_text(path)
    data, positions, texts = parse_config_yaml(text, str(path))
    return keep_env_text(data, texts), text, positions


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> JobConfig:
    """Read, parse, override and validate a config file (raises ConfigError, exit status 2)."""
    data, text, positions = load_config_data(path)
    data, blamed = apply_overrides(data, overrides or [])
    return validate_config(data, str(path), text, positions, overrides=blamed)


def config_to_dict(config: JobConfig) -> dict:
    """The resolved config as plain data, readable again by load_config (written as config.yaml).

    A sweep's points are runs of their own: their config has no `sweep:` section.
    """
    data: dict = {"name": config.name}
    if config.engine:
        data["engine"] = config.engine
    if config.image:
        data["image"] = config.image
    data["entrypoint"] = config.entrypoint if isinstance(config.entrypoint, str) else list(config.entrypoint)
    if config.workdir and not config.workdir_implied:
        data["workdir"] = config.workdir
    if config.env:
        data["env"] = dict(config.env)
    if config.mounts:
        data["mounts"] = _mounts_to_data(config)
    res = config.resources
    resources = {"gpus": list(res.gpus) if isinstance(res.gpus, tuple) else res.gpus,
                 "cpu": int(res.cpu) if res.cpu is not None and res.cpu == int(res.cpu) else res.cpu,
                 "memory": size_spec(res.memory), "shm_size": size_spec(res.shm_size)}
    resources = {k: v for k, v in resources.items() if v is not None}
    if resources:
        data["resources"] = resources
    if config.metrics:
        data["metrics"] = list(config.metrics)
    if config.timeout:
        data["timeout"] = int(config.timeout) if config.timeout == int(config.timeout) else config.timeout
    if config.metrics_from:
        data["metrics_from"] = [source.to_data() for source in config.metrics_from]
    slurm = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config.slurm).items()
             if v != getattr(SlurmSettings(), k)}
    if slurm:
        data["slurm"] = slurm
    if config.stop_signal:
        data["stop_signal"] = config.stop_signal
    if config.tensorboard:
        data["tensorboard"] = True
    if config.outputs:
        data["outputs"] = config.outputs
    if config.code_snapshot is not True:
        data["code_snapshot"] = size_spec(config.code_snapshot) if config.code_snapshot else False
    if config.ssh != SshSettings():
        data["ssh"] = ssh_settings_to_data(config.ssh)
    return data


def _mounts_to_data(config: JobConfig) -> dict | list:
    def spec(m: Mount) -> str:
        default = (config.workdir or DEFAULT_WORKDIR) if m.name == "code" else f"{NAMED_MOUNT_ROOT}/{m.name}"
        if m.name is not None and m.target == default and not m.read_only:
            return m.source
        return f"{m.source}:{m.target}" + (":ro" if m.read_only else "")
    if all(m.name is not None for m in config.mounts):
        return {m.name: spec(m) for m in config.mounts}
    return [spec(m) for m in config.mounts]


def expand_env(env: dict[str, str], environ) -> dict[str, str]:
    """Replace ${VAR} in the config's env values with the runner's environment (error if unset).

    `$${` stands for a literal `${`. Nothing else in a config is expanded.
    """
    expanded = {}
    for name, value in env.items():
        missing = [m for m in ENV_REF_RE.findall(value) if m and m not in environ]
        if missing:
            raise ConfigError(f"env.{name} refers to ${{{missing[0]}}}, which is not set in your "
                              f"environment; export {missing[0]}=... before running (write $${{ for a "
                              "literal ${)")
        expanded[name] = ENV_REF_RE.sub(lambda m: environ[m.group(1)] if m.group(1) else "${", value)
    return expanded


def local_workdir(config: JobConfig) -> str:
    """Engine `local` runs in the `code` mount's folder, else in the config file's folder."""
    for m in config.mounts:
        if m.name == "code":
            return m.source
    return str(Path(config.source).parent) if config.source else os.getcwd()


def tensorboard_folder(config: JobConfig, engine: str, path: str) -> Path | None:
    """The host folder behind a `tensorboard:` path as the job sees it; None when no mount shows it.

    Engine local: relative to the job's folder. In a container: relative to the workdir, and
    readable from here only inside a mount.
    """
    if engine in ENGINES and not ENGINES[engine].runs_in_container:
        return Path(local_workdir(config), path)
    if not path.startswith("/"):
        if not config.workdir:
            return None
        path = config.workdir.rstrip("/") + "/" + path
    inside = os.path.normpath(path)
    for mount in sorted(config.mounts, key=lambda m: len(m.target), reverse=True):
        target = mount.target.rstrip("/") or "/"
        if inside == target or inside.startswith(target.rstrip("/") + "/"):
            return Path(mount.source, os.path.relpath(inside, target))
    return None


# Files an entrypoint may name by a relative path: scripts a mount is expected to provide.
SCRIPT_SUFFIXES = (".py", ".sh", ".bash", ".pl", ".rb", ".js", ".jl", ".R", ".lua")


def entrypoint_files(entrypoint: str | tuple[str, ...]) -> list[str]:
    """The relative script paths an entrypoint names (`python train.py` -> ["train.py"])."""
    try:
        words = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
    except ValueError:
        return []
    return [w for w in words if w.endswith(SCRIPT_SUFFIXES) and not w.startswith(("/", "-", "$", "~"))
            and "=" not in w]


def entrypoint_warnings(config: JobConfig, engine: str | None) -> list[str]:
    """Warn when the entrypoint names a relative script that nothing provides where the job starts."""
    files = entrypoint_files(config.entrypoint)
    if not files:
        return []
    if engine in ENGINES and not ENGINES[engine].runs_in_container:
        folder = local_workdir(config)
        missing = [f for f in files if not os.path.exists(os.path.join(folder, f))]
        return [f"the entrypoint names {', '.join(missing)}, which is not in {folder} (where engine local "
                "starts the job)"] if missing else []
    holder = next((m for m in config.mounts if config.workdir and m.target == config.workdir), None)
    if holder is None:
        where = f"the workdir {config.workdir}" if config.workdir else "the image's working folder"
        return [f"the entrypoint names {', '.join(files)}, a path relative to {where}, but no mount "
                "provides that folder; mount your code there (mounts: {code: .})"]
    missing = [f for f in files if not os.path.exists(os.path.join(holder.source, f))]
    return [f"the entrypoint names {', '.join(missing)}, which is not in {holder.source} (mounted at "
            f"{holder.target})"] if missing else []

def parse_stop_signal(value: object) -> str:
    """`SIGINT`, `INT`, `sigint` or a number such as 2 -> "SIGINT"; ValueError if no such signal.

    Only STOP_SIGNALS are taken: the rest either cannot be handled (SIGKILL, which follows the
    grace period anyway, and SIGSTOP), do nothing to a job by default (SIGCHLD, SIGCONT,
    SIGWINCH, SIGURG) or stand for a crash (SIGSEGV).
    """
    if isinstance(value, bool) or value is None or isinstance(value, float):
        raise ValueError
    text = str(value).strip()
    if isinstance(value, int) or re.fullmatch(r"[0-9]+", text):  # `'10'` is the signal 10, as 10 is
        sig = signal.Signals(int(text))
    else:
        if not text.isascii():  # str.upper() makes SIGINT of `ſigint` and `ınt`
            raise ValueError
        name = text.upper()
        sig = signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    if sig.name not in STOP_SIGNALS:
        raise ValueError
    return sig.name


def _check_stop_signal(chk: _Checker, value: object) -> str | None:
    if value is None:
        return None
    try:
        return parse_stop_signal(value)
    except (ValueError, KeyError):
        chk.problem(("stop_signal",), f"stop_signal must name a signal the job can handle, such as SIGINT, "
                                      f"and that ends it if not handled: {', '.join(STOP_SIGNALS)} (or "
                                      f"INT, TERM, ...); got {_shown(value)}")
        return None


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions of one character each."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def key_meant(key: str, existing: list[str]) -> str | None:
    """The existing key that KEY is most likely a typo of, or None when KEY is truly new.

    Close means equal but for case (`lr`, `LR`), or a small edit distance on longer keys (one edit
    from 4 characters on, two from 8); keys that differ only in digits (`GPU0`, `GPU1`) are
    different on purpose, and so are keys that differ only by a number (`SEED`, `SEED2`).
    """
    def strip_digits(text: str) -> str:
        return re.sub(r"\d+", "", text)

    low = key.lower()
    if low in BOTH_CASES_VARIABLES:  # a variable of its own, however close to another
        return None
    for name in existing:
        if name.lower() == low:
            return name
    allowed = 2 if len(key) >= 8 else 1 if len(key) >= 4 else 0
    scored = sorted((_edit_distance(low, name.lower()), name) for name in existing
                    if strip_digits(name.lower()) != strip_digits(low) and not _another_word(low, name.lower()))
    return scored[0][1] if scored and scored[0][0] <= allowed else None


def _another_word(a: str, b: str) -> bool:
    """Whether keys A and B differ in one short word for another (MIN_STEPS and MAX_STEPS, NUM_GPUS
    and NUM_CPUS): two keys on purpose. A word with its letters swapped (GPSU) is still a typo."""
    words_a, words_b = re.split(r"[_.-]", a), re.split(r"[_.-]", b)
    if len(words_a) != len(words_b):
        return False
    differ = [(x, y) for x, y in zip(words_a, words_b) if x != y]
    return len(differ) == 1 and len(differ[0][0]) == len(differ[0][1]) <= 4 and \
        sorted(differ[0][0]) != sorted(differ[0][1])


def check_new_key(data: object, parts: tuple[str, ...], what: str) -> None:
    """Refuse a --set/--grid key the config lacks when it is close to one it has (`env.lr` for
    `env.LR`): that typo would otherwise add a variable no one reads and run the same job again."""
    node = data
    for depth, part in enumerate(parts):
        if not isinstance(node, dict):
            return
        if part not in node:
            meant = key_meant(part, [k for k in node if isinstance(k, str)])
            if meant is not None:
                where = ".".join(parts[:depth] + (meant,))
                raise UsageError(f"{what}: the config has no {'.'.join(parts[:depth + 1])}; did you mean "
                                 f"'{where}'? (a key that is meant to be new and this close to another "
                                 "goes in the config file)")
            return
        node = node[part]


class _PlainTextParser(_YamlParser):
    """The YAML reader, also keeping the text of each plain scalar it typed as other than text
    (`3.10`, `007`, `0x1F`, `true`), by the path of its node: environment values are text."""

    def __init__(self, text: str, filename: str) -> None:
        super().__init__(text, filename)
        self.node_at: dict[tuple[int, int], tuple] = {}   # (row, col) -> the innermost node's path there
        self.plain_at: dict[tuple[int, int], str] = {}

    def node(self, n: int, path: tuple, context: str) -> object:
        self.node_at[(self.row, self.col)] = path
        return super().node(n, path, context)

    def flow_node(self, n: int, path: tuple) -> tuple[object, str]:
        self.node_at[(self.row, self.col)] = path
        return super().flow_node(n, path)

    def type_plain(self, text: str, row: int, col: int) -> object:
        value = super().type_plain(text, row, col)
        if not isinstance(value, str):
            self.plain_at[(row, col)] = text
        return value

    def plain_texts(self) -> dict[tuple, str]:
        return {self.node_at[at]: text for at, text in self.plain_at.items() if at in self.node_at}


def parse_config_yaml(text: str, filename: str) -> tuple[object, dict, dict[tuple, str]]:
    """parse_yaml_located, plus the written text of the plain scalars that were typed (by path)."""
    parser = _PlainTextParser(text, filename)
    try:
        value = parser.document()
    except RecursionError as exc:
        raise YamlError("document nested too deeply to read", filename) from exc
    return value, parser.positions, parser.plain_texts()


def with_plain_text(value: object, texts: dict[tuple, str], path: tuple) -> object:
    """VALUE with every typed plain scalar under PATH spelled as it was written (`3.10`, not 3.1).
    An empty value, `~` or `null` stays None: the variable is set, to the empty string."""
    if isinstance(value, dict):
        return {k: with_plain_text(v, texts, path + (k,)) for k, v in value.items()}
    if isinstance(value, list):
        return [with_plain_text(v, texts, path + (i,)) for i, v in enumerate(value)]
    if value is None or isinstance(value, str):
        return value
    return texts.get(path, value)


def keep_env_text(data: object, texts: dict[tuple, str]) -> object:
    """Config data whose env values (and env.* values of its sweep: section) are as written."""
    if not isinstance(data, dict):
        return data
    if isinstance(data.get("env"), dict):
        data["env"] = with_plain_text(data["env"], texts, ("env",))
    if isinstance(data.get("sweep"), dict):
        data["sweep"] = {key: with_plain_text(values, texts, ("sweep", key)) if str(key).startswith("env.")
                         else values for key, values in data["sweep"].items()}
    return data

def _check_outputs(chk: _Checker, data: dict, mounts: tuple[Mount, ...]) -> str | None:
    """`outputs: /ckpt`: where a container sees the run's outputs folder (default /outputs)."""
    target = _check_text(chk, data, ("outputs",))
    if target is not None and (not target.startswith("/") or _mount_problem(target) or target == "/"):
        chk.problem(("outputs",), f"outputs must be an absolute container path such as /outputs, without ':' "
                                  f"or ','; got {target!r}")
        return None
    taken = next((m for m in mounts if m.target.rstrip("/") == (target or OUTPUTS_TARGET).rstrip("/")), None)
    if taken is not None:
        where = ("mounts", taken.name) if taken.name else ("mounts",)
        chk.problem(("outputs",) if target else where,
                    f"{(target or OUTPUTS_TARGET)} is where the run's outputs folder is mounted, and a mount "
                    f"uses it too; set outputs: to another container path (outputs: /ckpt), or move the mount")
    return target


def _check_code_snapshot(chk: _Checker, value: object) -> bool | int:
    """`code_snapshot: false` runs the live folder; `code_snapshot: 2g` raises the size limit."""
    if value is None or value is True:
        return True
    if value is False:
        return False
    try:
        return parse_size(value)
    except ValueError:
        chk.problem(("code_snapshot",), "code_snapshot must be true, false (run the folder as it is) or a "
                                        f"size limit such as 500m or 2g; got {_shown(value)}")
        return True

# ==== 10. Metrics: the METRIC line protocol ==================================

_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}
_METRIC_LINE_STARTS = frozenset((b"METRIC", b"METRIC ", b"METRIC\t", b"METRIC\r"))
# A line that carries METRIC after something else (`INFO:root:METRIC loss=1`): counted, never parsed.
PREFIXED_METRIC_RE = re.compile(rb".+?METRIC[ \t]+[A-Za-z_][^ \t=]*=")
_INNER_METRIC_RE = re.compile(rb"[^\n]METRIC")


def metric_value(text: str) -> int | float | str:
    """Type one METRIC value: ints and floats become numbers, anything else stays text.

    Numbers are what float() reads (1, -2.5, 1e-3, .5, nan, inf, infinity), except spellings
    with `_` (1_000 stays text, as in YAML 1.2).
    """
    digits = text[1:] if text[:1] in "+-" else text
    try:
        if digits.isdecimal():
            return int(text)
        if "_" not in text:
            return float(text)
    except ValueError:
        if digits.isdecimal():   # more digits than int() converts: keep the magnitude
            return float(text)
    return text


@functools.lru_cache(maxsize=4096)
def _metric_key_ok(key: str) -> bool:
    return METRIC_KEY_RE.match(key) is not None


def parse_metric_line(line: bytes | str) -> dict | None:
    """Parse `METRIC k=v [k=v ...]` into {k: v}; None when the line is malformed.

    Only spaces and tabs separate pairs. Malformed: no pairs, a pair without `=` or with an
    empty value, a key that is not letters/digits/`_.-/`, a key given twice, or a `step`
    that is not an integer.
    """
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    fields = line.rstrip("\r\n").replace("\t", " ").split(" ")
    if fields[0] != "METRIC":
        return None
    sample: dict = {}
    for item in fields[1:]:
        if not item:
            continue
        key, _, raw = item.partition("=")
        if not raw or key in sample or not _metric_key_ok(key):
            return None
        sample[key] = metric_value(raw)
    if not sample or ("step" in sample and type(sample["step"]) is not int):
        return None
    return sample


def _json_number(value: int | float | str) -> str:
    kind = type(value)
    if kind is float:
        # repr is what json.dumps writes for a finite float; NaN and ±Infinity as Python's json reads them
        return repr(value) if value - value == 0.0 else "NaN" if value != value else _NON_FINITE[value]
    if kind is int:
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def json_safe(value: object) -> object:
    """Strict JSON for other tools (jq, SQLite's json_extract): NaN and ±Infinity become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def sample_json(step: int, sample: dict) -> str:
    """One sample as a JSON object, `step` first; hand-written because it is on the hot path."""
    pairs = "".join([f', "{key}": {_json_number(value)}' for key, value in sample.items() if key != "step"])
    return f'{{"step": {step}{pairs}}}'


def is_metric_line(line: bytes) -> bool:
    """`METRIC` alone or followed by a space or tab: the one test of what counts as a METRIC line."""
    return line[:7] in _METRIC_LINE_STARTS


def may_hold_metric(data: bytes) -> bool:
    """`b"METRIC" in data`, sooner: finding each `M` with memchr is far cheaper than the substring
    search over ordinary output, which has few capital Ms (README: Performance)."""
    at = data.find(b"M")
    for _ in range(8):
        if at < 0:
            return False
        if data.startswith(b"METRIC", at):
            return True
        at = data.find(b"M", at + 1)
    return at >= 0 and data.find(b"METRIC", at) >= 0  # M-heavy output: the substring search from here


class MetricScanner:
    """Finds complete METRIC lines in one output stream's chunks, carrying a partial line over.

    Ordinary output costs one `in` test per chunk; only a line that may be a METRIC line is
    kept between reads, and never more than MAX_METRIC_LINE bytes of it.
    """

    def __init__(self) -> None:
        self.pending = b""       # start of the current line, kept only if it may be METRIC
        self.skipping = False    # inside a line known not to be (or too long to be) METRIC
        self.overlong = 0        # METRIC lines dropped for length
        self.prefixed = False    # saw METRIC after a prefix (INFO:root:METRIC ...): worth a notice

    def feed(self, chunk: bytes) -> list[bytes]:
        if self.skipping:
            newline = chunk.find(b"\n")
            if newline < 0:
                return []
            self.skipping, chunk = False, chunk[newline + 1:]
        data = self.pending + chunk if self.pending else chunk
        if not may_hold_metric(data):
            self._keep_tail(data[data.rfind(b"\n") + 1:])
            return []
        lines = data.split(b"\n")
        tail = lines.pop()
        self._keep_tail(tail)
        found = list(filter(is_metric_line, lines))
        if not self.prefixed and data.count(b"METRIC") > len(found) + tail.count(b"METRIC"):  # in C
            self.prefixed = _INNER_METRIC_RE.search(data) is not None
        return [ln.rstrip(b"\r") for ln in found] if b"\r" in data else found

    def finish(self) -> list[bytes]:
        """The last line when the stream ended without a newline."""
        tail, self.pending = self.pending, b""
        return [tail.rstrip(b"\r")] if is_metric_line(tail) else []

    def _keep_tail(self, tail: bytes) -> None:
        if not (b"METRIC".startswith(tail) or is_metric_line(tail)):
            self.pending, self.skipping = b"", bool(tail)
        elif len(tail) > MAX_METRIC_LINE:
            self.pending, self.skipping = b"", True
            self.overlong += 1
        else:
            self.pending = tail


class MetricLog:
    """Appends samples to metrics.json as they arrive; the file is a JSON list once closed.

    One sample per line, so a reader can recover every complete sample of a run that was
    killed before close() (see read_metrics).
    """

    def __init__(self, path: Path, times: Path | None = None) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        os.write(self.fd, b"[\n")
        self.times_fd = os.open(times, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600) if times else -1
        self.started = time.monotonic()
        self.error: OSError | None = None
        self.count = 0
        self.malformed = 0
        self.last: dict = {}
        self.events: LiveEvents | None = None   # config `tensorboard: true`: the run's event file
        self.metric_lines = 0                        # samples from METRIC lines: their default step
        self.lines: LineSources | None = None       # metrics_from's recognisers and patterns
        self.watchers: list[TensorBoardWatcher] = []  # metrics_from's event-file folders
        self.next_poll = 0.0

    def add_lines(self, lines: list[bytes]) -> None:
        """Parse and append the METRIC lines of one read in a single write."""
        if not lines:
            return
        out = []
        events = self.events
        for line in b"\n".join(lines).decode("utf-8", "replace").split("\n"):  # one decode per read
            sample = parse_metric_line(line)
            if sample is None:
                self.malformed += 1
                continue
            self.count += 1
            self.metric_lines += 1
            out.append(sample_json(sample.get("step", self.metric_lines), sample))
            self.last.update(sample)
            if events is not None:
                events.samples.append(sample)
        if events is not None:
            events.flush(self.count - len(events.samples) + 1)
        self.last.pop("step", None)  # a position, not a metric
        self._append(out)

    def _append(self, out: list[str]) -> None:
        """Write samples already counted in self.count, in one write."""
        if out and self.error is None:
            try:
                write_all(self.fd, ((b"\n" if self.count == len(out) else b",\n")
                                    + ",\n".join(out).encode("utf-8")))
                if self.times_fd >= 0:  # when they arrived: samples 1..count by these seconds (plot --x time)
                    write_all(self.times_fd, f"{self.count} {time.monotonic() - self.started:.3f}\n".encode())
            except OSError as exc:  # a full disk: the runner stops the job and says so
                self.error = exc

    def add_samples(self, samples: list[dict]) -> None:
        """Append samples that metrics_from sources found (each has its step)."""
        if not samples:
            return
        out = []
        for sample in samples:
            self.count += 1
            out.append(sample_json(sample["step"], sample))
            self.last.update(sample)
        self.last.pop("step", None)
        self._append(out)

    def use_sources(self, sources: tuple[MetricsSource, ...], tensorboard: list[Path]) -> None:
        """Also take samples from these recognisers and patterns, and these event-file folders."""
        recognisers = make_recognisers(sources)
        self.lines = LineSources(recognisers) if recognisers else None
        self.watchers = [TensorBoardWatcher(folder) for folder in tensorboard]

    def feed_sources(self, which: int, chunk: bytes) -> None:
        if self.lines is not None:
            self.add_samples(self.lines.feed(which, chunk))

    def poll_sources(self, now: float) -> None:
        """Read what the event files gained, at most once a TB_POLL_SECONDS."""
        if self.watchers and now >= self.next_poll:
            self.next_poll = now + TB_POLL_SECONDS
            for watcher in self.watchers:
                self.add_samples(watcher.poll())

    def finish_sources(self) -> None:
        if self.lines is not None:
            self.add_samples(self.lines.finish())
        for watcher in self.watchers:
            self.add_samples(watcher.poll())

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                if self.error is None:
                    os.write(self.fd, b"\n]\n")
            os.close(self.fd)
            self.fd = -1
        if self.times_fd >= 0:
            os.close(self.times_fd)
            self.times_fd = -1
        if self.events is not None:
            self.events.close()


# -- reading metrics.json: the one reader ------------------------------------
# MetricLog writes `[`, then one sample per line, `{"step": N, "key": value, ...}`, each but the
# last followed by `,`, and `]` at close. Everything that reads samples back (show, compare, export,
# list's live values, plot, the GPU summary) goes through metric_blocks: whole lines, a block at a
# time. samples_in_block parses a block of MetricLog's layout in one json.loads and any other block
# line by line, skipping what does not parse, so a hand-edited file or one cut short by a crash
# reads as it always has; the plot folds the same blocks with the regexes below instead.
# metrics.times, `COUNT SECONDS` per write of samples, is read by read_sample_times.

# Bytes per block (about 5,000 samples): few Python steps per sample, and a few MB at most.
METRICS_BLOCK_BYTES = 1 << 18
# A sample line as MetricLog writes it starts with its step; the regexes below rely on that layout.
_SAMPLE_STEP_RE = re.compile(rb'\{"step": (-?\d+)[,}]')
_SAMPLE_KEY_RE = re.compile(rb'"([A-Za-z_][A-Za-z0-9_.\-/]*)": ')
# Lines that one json.loads of a block would read differently from a line by line reading: a line
# that starts with something else than `{` (a continuation, an indented sample), or two objects on one.
_ODD_LINE_RE = re.compile(rb"\n[^{\n]")
_TWO_ON_A_LINE_RE = re.compile(rb"\}[ \t\r]*,[ \t\r]*\{")


@functools.lru_cache(maxsize=256)
def _value_re(key: str) -> re.Pattern:
    """`"key": VALUE` in sample lines (a quote inside a JSON string is escaped, so only keys match)."""
    return re.compile(rb'"' + re.escape(key.encode()) + rb'": ([^,}\n]*)')


@functools.lru_cache(maxsize=256)
def _step_value_re(key: str) -> re.Pattern:
    """The step and the value of KEY on each sample line that has KEY."""
    return re.compile(rb'\{"step": (-?\d+),[^\n]*?"' + re.escape(key.encode()) + rb'": ([^,}\n]*)')


def metric_blocks(path: Path, size: int = METRICS_BLOCK_BYTES) -> Iterator[bytes]:
    """A metrics.json (or gpu.json) as blocks of whole lines of about SIZE bytes, then what follows the
    last newline (a sample being written, or cut short by a crash) as a block of its own; nothing when
    there is no such file."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}; check its permissions") from exc
    with f:
        rest = b""
        while chunk := f.read(size):
            data = rest + chunk
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            if cut:
                yield data[:cut]
    if rest:
        yield rest


def samples_in_block(block: bytes) -> list[dict]:
    """The samples of whole lines of a metrics.json: every line that is one JSON object (less the `,`
    after it). A block in MetricLog's layout is parsed whole, which is several times faster."""
    body = _between_brackets(block.strip())
    if body[:1] == b"{" and not _ODD_LINE_RE.search(body) and not _TWO_ON_A_LINE_RE.search(body):
        try:
            samples = json.loads(b"[" + body.rstrip().rstrip(b",") + b"]")
        except (ValueError, RecursionError):
            pass
        else:  # one object per line, as a line by line reading finds them
            if len(samples) == body.count(b"\n{") + 1 and set(map(type, samples)) == {dict}:
                return samples
    return _samples_line_by_line(block)


def _between_brackets(body: bytes) -> bytes:
    """BODY without the list's `[` and `]` where each is alone on its line (else BODY, whole), stripped."""
    if body.startswith(b"["):
        end = body.find(b"\n")
        if body[1:end if end >= 0 else len(body)].strip():
            return body
        body = body[end + 1:] if end >= 0 else b""
    if body.endswith(b"]"):
        start = body.rfind(b"\n")
        if body[start + 1:-1].strip():
            return body
        body = body[:max(start, 0)]
    return body.strip()


def _samples_line_by_line(block: bytes) -> list[dict]:
    samples = []
    for raw in block.split(b"\n"):
        line = raw.decode("utf-8", "replace").strip().rstrip(",").strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                samples.append(json.loads(line))
    return samples


def iter_metrics(path: Path) -> Iterator[dict]:
    """The samples of a metrics.json one at a time, read as a stream: a run of a million samples is
    summed up or exported in the memory of a block (see metric_blocks)."""
    for block in metric_blocks(path):
        yield from samples_in_block(block)


def read_metrics(path: Path) -> list[dict]:
    """Every complete sample in a metrics.json, also one left unterminated by a crash."""
    return list(iter_metrics(path))


def metric_names_in(path: Path) -> list[str]:
    """The metrics of a metrics.json in the order they first appear (not `step`)."""
    names: dict[str, None] = {}
    for block in metric_blocks(path):
        names.update(dict.fromkeys(itertools.chain.from_iterable(samples_in_block(block))))
    names.pop("step", None)
    return list(names)


def read_samples_from(path: Path, offset: int, limit: int = -1) -> tuple[list[dict], int]:
    """The complete samples of a metrics.json (or gpu.json) after byte OFFSET, and where they end;
    with LIMIT, those of the next LIMIT bytes (more when one sample is longer). A last line that does
    not parse yet (being written) is left for the next call."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(limit)
    except FileNotFoundError:
        return [], offset
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from exc
    cut = data.rfind(b"\n") + 1
    samples = samples_in_block(data[:cut]) if cut else []
    last = _samples_line_by_line(data[cut:]) if cut < len(data) else []
    used = len(data) if last or not data[cut:].strip().rstrip(b",").strip().startswith(b"{") else cut
    if not used and 0 < limit <= len(data):   # one sample longer than LIMIT
        return read_samples_from(path, offset, 2 * limit)
    return samples + last, offset + used


def read_sample_times(path: Path) -> Callable[[int], float] | None:
    """From metrics.times, the minutes since the start at which sample N (0-based) arrived; None
    when the run has no such file (runs of RunPilot before 0.5)."""
    import bisect
    counts, minutes = [], []
    try:
        for line in path.read_text(errors="replace").splitlines():
            count, _, seconds = line.partition(" ")
            with contextlib.suppress(ValueError):
                at = float(seconds) / 60
                if not 0 <= at <= 1e300:  # a damaged line (nan, inf, negative, beyond an axis) is skipped
                    continue
                counts.append(int(count))
                minutes.append(at)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from exc
    return lambda n: minutes[min(bisect.bisect_right(counts, n), len(minutes) - 1)] if minutes else 0.0


def latest_metrics(path: Path, size: int = METRICS_TAIL) -> dict:
    """The latest value of each metric in the last SIZE bytes of a metrics.json being written:
    what `list` shows for a running run, read cheaply (the index learns them when the run ends)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            tail = f.read(size)
    except OSError:
        return {}
    latest: dict = {}
    for sample in reversed(samples_in_block(tail)):
        for key, value in sample.items():
            latest.setdefault(key, value)
    latest.pop("step", None)  # a position, not a metric
    return latest


# -- metrics_from: recognisers, patterns and event files beside METRIC lines --
# METRIC lines stay the fast default: nothing below runs unless a config's `metrics_from:` or
# `--metrics-from` asks for it (README: Metrics from scripts as they are).

# The named recognisers, in the order the 0-sample notice tries them.
METRICS_FROM_RECOGNISERS = ("huggingface", "keras", "tqdm")
# Terminal colour and cursor codes (Keras 3 colours its progress bar); stripped before recognising.
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
# A number as training code prints it: 1, -2.5, 1e-3, .5, nan, inf (what metric_value turns into a number).
_NUMBER = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|NaN|inf|Infinity)"
KERAS_EPOCH_RE = re.compile(r"^Epoch (\d+)/\d+\s*$")
KERAS_PAIR_RE = re.compile(r" - ([A-Za-z_][A-Za-z0-9_.\-/]*): (" + _NUMBER + r")(?=\s|$)")
# The closing state of a tqdm bar: `100/100 [00:01<00:00, 99.5it/s, loss=0.123, acc=0.9]`.
TQDM_DONE_RE = re.compile(r"\b(\d+)/(\1) \[[^\]]*?, ([A-Za-z_][^\]]*=[^\]]*)\]\s*$")
TQDM_PAIR_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_.\-/]*)=(" + _NUMBER + r")(?=,|$)")
# Hugging Face Trainer's final summary dict: the run's totals, not a point on a curve.
HF_SUMMARY_KEYS = frozenset(("train_runtime", "train_samples_per_second", "train_steps_per_second"))
HF_BARE_NON_FINITE_RE = re.compile(r"(?<=: )(-?(?:nan|inf))(?=[,}])")


def metrics_source_problem(kind: str, value: object) -> str | None:
    """Why an entry of metrics_from cannot be used, or None (pure: the config and the CLI both ask)."""
    if kind == "recogniser":
        if value not in METRICS_FROM_RECOGNISERS:
            names = ", ".join(METRICS_FROM_RECOGNISERS)
            return (f"unknown metrics source {value!r}; use one of {names}, "
                    "pattern: REGEX or tensorboard: FOLDER")
        return None
    if not isinstance(value, str) or not value:
        return f"{kind}: needs a text value"
    if kind == "tensorboard":
        return None
    try:
        compiled = re.compile(value)
    except re.error as exc:
        return f"pattern '{value}' does not compile: {exc}; check its brackets and escapes"
    names = [n for n in compiled.groupindex if n != "step"]
    if not names:
        return (f"pattern '{value}' names no metric; name what it captures with groups, e.g. "
                r"loss (?P<loss>[\d.]+)")
    bad = [n for n in names if not METRIC_KEY_RE.match(n)]
    return f"pattern group {bad[0]!r} is not a metric name" if bad else None


def parse_metrics_source(spec: str) -> MetricsSource:
    """`--metrics-from`'s value: a recogniser's name, `pattern:REGEX` or `tensorboard:FOLDER`."""
    kind, sep, value = spec.partition(":")
    source = MetricsSource(kind, value) if sep and kind in ("pattern", "tensorboard") \
        else MetricsSource("recogniser", spec)
    problem = metrics_source_problem(source.kind, source.value)
    if problem:
        raise UsageError(f"--metrics-from {spec!r}: {problem}")
    return source


class HuggingFaceRecogniser:
    """Trainer's log dicts, `{'loss': 2.34, 'learning_rate': 4.5e-05, 'epoch': 0.1}`, one sample each.

    The step is `global_step` (or `step`) where the dict has it, else the count of log dicts; the
    final summary dict (train_runtime, ...) is the run's totals, not a point on a curve.
    """

    name = "huggingface"

    def __init__(self) -> None:
        import ast  # only runs that ask for this recogniser pay for the import
        self.literal_eval = ast.literal_eval
        self.logs = 0

    def feed(self, line: str) -> dict | None:
        if not (line.endswith("}") and "'epoch'" in line):
            return None
        at = line.find("{'")  # in logs.txt a progress bar on stderr may run into the dict without a newline
        if at < 0:
            return None
        text = line[at:]
        if "nan" in text or "inf" in text:  # older Transformers print a float nan/inf bare: quote it
            text = HF_BARE_NON_FINITE_RE.sub(r"'\1'", text)
        try:
            data = self.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
        if not isinstance(data, dict) or HF_SUMMARY_KEYS & data.keys():
            return None
        sample = {}
        for key, value in data.items():
            if isinstance(value, str):
                value = metric_value(value)
            if isinstance(key, str) and METRIC_KEY_RE.match(key) and type(value) in (int, float):
                sample[key] = value
        self.logs += 1
        step = sample.pop("global_step", sample.pop("step", None))
        sample = {"step": step if type(step) is int else self.logs, **sample}
        return sample if len(sample) > 1 else None


class KerasRecogniser:
    """`Epoch N/M` sets the step for the ` - key: value` pairs of the epoch's closing line."""

    name = "keras"

    def __init__(self) -> None:
        self.epoch: int | None = None

    def feed(self, line: str) -> dict | None:
        if line.startswith("Epoch "):
            match = KERAS_EPOCH_RE.match(line)
            if match:
                self.epoch = int(match[1])
                return None
        if self.epoch is None or " - " not in line:
            return None
        pairs = KERAS_PAIR_RE.findall(line)
        if not pairs:
            return None
        sample = {"step": self.epoch}
        sample.update((key, metric_value(value)) for key, value in pairs if key != "step")
        self.epoch = None  # one sample per epoch: evaluate() after fit() is not a point of the last epoch
        return sample


class TqdmRecogniser:
    """The `key=value` postfix of a tqdm bar as it stands when the bar completes (n == total)."""

    name = "tqdm"

    def __init__(self) -> None:
        self.bars = 0

    def feed(self, line: str) -> dict | None:
        if not line.endswith("]") or "=" not in line:
            return None
        match = TQDM_DONE_RE.search(line)
        if not match:
            return None
        pairs = TQDM_PAIR_RE.findall(", ".join(p.strip() for p in match[3].split(",")).replace(", ", ","))
        if not pairs:
            return None
        self.bars += 1
        sample = {"step": self.bars}
        sample.update((key, metric_value(value)) for key, value in pairs if key != "step")
        return sample


class PatternRecogniser:
    """A user's regex: named groups are metrics, a group named `step` the step (else the match count)."""

    def __init__(self, pattern: str) -> None:
        self.name = f"pattern:{pattern}"
        self.regex = re.compile(pattern)
        self.matches = 0

    def feed(self, line: str) -> dict | None:
        match = self.regex.search(line)
        if match is None:
            return None
        found = {k: v for k, v in match.groupdict().items() if v is not None}
        step = metric_value(found.pop("step", "").strip())
        sample = {k: metric_value(v.strip()) for k, v in found.items()}
        if not sample:
            return None
        self.matches += 1
        return {"step": step if type(step) is int else self.matches, **sample}


RECOGNISERS = {"huggingface": HuggingFaceRecogniser, "keras": KerasRecogniser, "tqdm": TqdmRecogniser}


def make_recognisers(sources: tuple[MetricsSource, ...]) -> list:
    """Fresh recognisers (they keep state: the epoch, the log count) for the line sources."""
    found = []
    for source in sources:
        if source.kind == "recogniser":
            found.append(RECOGNISERS[source.value]())
        elif source.kind == "pattern":
            found.append(PatternRecogniser(source.value))
    return found


def output_line_text(line: bytes) -> str:
    """What a terminal would show of one output line: the last `\\r` segment, colour codes gone."""
    line = line.rstrip(b"\r")
    cut = line.rfind(b"\r")
    text = line[cut + 1:].decode("utf-8", "replace")
    if "\x1b" in text or "\b" in text:  # Keras 3 colours its bar and backspaces over it
        text = ANSI_RE.sub("", text).replace("\b", "")
    return text.strip()


class LineSources:
    """Runs recognisers and patterns over each complete output line of both streams.

    Only the text a terminal shows at a line's end counts (progress bars' intermediate states are
    running estimates), so a line being redrawn with `\\r` is kept from its last `\\r` on only.
    """

    def __init__(self, recognisers: list) -> None:
        self.recognisers = recognisers
        self.pending: dict[int, bytes] = {}

    def feed(self, which: int, chunk: bytes) -> list[dict]:
        data = self.pending.get(which, b"") + chunk
        lines = data.split(b"\n")
        tail = lines.pop()
        cut = tail.rfind(b"\r", 0, len(tail) - 1)
        if cut >= 0 or len(tail) > MAX_METRIC_LINE:
            tail = tail[cut + 1:][-MAX_METRIC_LINE:]
        self.pending[which] = tail
        return self.samples(lines)

    def finish(self) -> list[dict]:
        """The last line of each stream when it ended without a newline."""
        tails, self.pending = [t for t in self.pending.values() if t], {}
        return self.samples(tails)

    def samples(self, lines: list[bytes]) -> list[dict]:
        found = []
        for line in lines:
            text = output_line_text(line)
            if not text:
                continue
            for recogniser in self.recognisers:
                sample = recogniser.feed(text)
                if sample is not None:
                    found.append(sample)
        return found


def samples_from_log(data: bytes, sources: tuple[MetricsSource, ...]) -> list[dict]:
    """Every sample METRIC lines and the line sources give for a whole log, in order (reparse)."""
    recognisers = make_recognisers(sources)
    lines = LineSources(recognisers) if recognisers else None
    found, count = [], 0
    for line in data.split(b"\n"):
        if is_metric_line(line.rstrip(b"\r")):
            sample = parse_metric_line(line.rstrip(b"\r"))
            if sample is not None:
                count += 1
                found.append({"step": sample.pop("step", count), **sample})
        elif lines is not None:
            found.extend(lines.samples([line]))
    return found


def prefixed_metric_lines(data: bytes) -> int:
    """How many lines carry `METRIC k=v` after a prefix (a logging format): never captured."""
    count, done = 0, -1
    for found in _INNER_METRIC_RE.finditer(data):  # in C: METRIC not at a line's start
        if found.start() < done:
            continue  # a second METRIC on a line already counted
        start, done = data.rfind(b"\n", 0, found.start()) + 1, data.find(b"\n", found.start())
        done = len(data) if done < 0 else done
        if not is_metric_line(data[start:done]) and PREFIXED_METRIC_RE.match(data, start, done):
            count += 1
    return count


# What a line must hold for each named recogniser to take a sample from it (HuggingFaceRecogniser,
# KerasRecogniser, TqdmRecogniser.feed): a log without it is not in that style.
RECOGNISER_MARKS = {"huggingface": b"'epoch'", "keras": b" - ", "tqdm": b"="}


def recogniser_for_log(data: bytes) -> str | None:
    """The named recogniser that would find samples in this log, if any: the 0-sample notice names it.

    A log that lacks a recogniser's mark is not fed to it line by line (1.2 s for the last MiB of
    `yes`); the mark is looked for in the bytes only where no colour code or backspace, which a line's
    text loses, could split it."""
    plain = b"\x1b" not in data and b"\b" not in data
    for name in METRICS_FROM_RECOGNISERS:
        if plain and RECOGNISER_MARKS[name] not in data:
            continue
        if LineSources([RECOGNISERS[name]()]).feed(1, data + b"\n"):
            return name
    return None


def log_prefixed_metric_lines(path: Path) -> int:
    """prefixed_metric_lines over a whole log, read in blocks cut at line ends (memory stays flat)."""
    count, carry = 0, b""
    try:
        with open(path, "rb") as f:
            for block in iter(functools.partial(f.read, LOG_SCAN_BYTES), b""):
                block = carry + block
                cut = block.rfind(b"\n") + 1
                count += prefixed_metric_lines(block[:cut])
                carry = block[cut:][-MAX_METRIC_LINE:]
    except OSError:
        return count
    return count + prefixed_metric_lines(carry)


def capture_notices(log: Path, samples: dict, sources: tuple[MetricsSource, ...],
                    scanner_saw_prefix: bool, succeeded: bool = True) -> list[str]:
    """The closing notices about metrics never captured, reading the log only when they may apply."""
    prefixed = log_prefixed_metric_lines(log) if scanner_saw_prefix else 0
    tail = log_tail(log, LOG_SCAN_BYTES) if not samples.get("count", 0) else b""
    return zero_sample_notices(samples.get("count", 0), prefixed, tail, sources, succeeded)


def damaged_event_warnings(damaged: int) -> list[str]:
    """A record whose CRC failed ends the reading of its event file: say so, samples may be missing."""
    if not damaged:
        return []
    return [f"{damaged} TensorBoard event file(s) hold a record whose CRC check failed; their samples from "
            "there on were not taken (a file damaged or written by two writers at once)"]


def zero_sample_notices(count: int, prefixed: int, log: bytes, sources: tuple[MetricsSource, ...],
                        succeeded: bool = True) -> list[str]:
    """What to say at the end about metrics never captured: a run with 0 samples, prefixed METRIC lines.

    LOG is the end of the log (for the style it looks like); PREFIXED the lines with METRIC after a prefix.
    A run that failed without a known style gets no 0-sample notice: it may have failed before printing any.
    """
    notices = []
    if prefixed:
        notices.append(f"{prefixed} line(s) carry METRIC after a prefix (e.g. from Python's logging) and were "
                       "not captured: a METRIC line starts with METRIC (print it on a line of its own, or "
                       "capture these lines with a metrics_from pattern)")
    if count:
        return notices
    known = None if prefixed else recogniser_for_log(log)
    if known and not any(s.value == known for s in sources):
        notices.append(f"the run captured no metrics; its log looks like {known} output: add "
                       f"`metrics_from: [{known}]` to the config, or run `runpilot reparse ID "
                       f"--metrics-from {known}`")
    elif not prefixed and succeeded:
        notices.append("the run captured no metrics (no METRIC lines"
                       + (", and its metrics_from sources found none" if sources else "")
                       + "); see README: Metrics from scripts as they are")
    return notices

# ==== 10a. TensorBoard event files ===========================================

def _crc32c_table() -> tuple[int, ...]:
    """The 256 entries of the reflected CRC-32C (Castagnoli, polynomial 0x1EDC6F41) byte table."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C of data (what TFRecord framing checks; zlib only has the other CRC-32)."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 and add a constant, so a CRC of CRCs is not trivial."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def encode_varint(value: int) -> bytes:
    """A protocol-buffer base-128 varint; a negative int64 as its two's complement (ten bytes)."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)

# What TensorBoard's reader checks first in every event file.
TB_FILE_VERSION = b"brain.Event:2"
# The steps an Event (and MLflow) can hold: an int64. A METRIC step beyond it stays out of both.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
# float32's largest finite value: a scalar beyond it is written as ±inf, as numpy would round it.
FLOAT32_MAX = 3.4028234663852886e38
# The hparams plugin's summary tags and its SessionEndInfo.Status values.
HPARAMS_START_TAG, HPARAMS_END_TAG = "_hparams_/session_start_info", "_hparams_/session_end_info"
HPARAMS_STATUS = {SUCCEEDED: 1, FAILED: 2, TIMEOUT: 2, LOST: 2, INTERRUPTED: 2, CANCELLED: 2, RUNNING: 3}


def pb_field(number: int, data: bytes) -> bytes:
    """A length-delimited protocol-buffer field (a string, bytes or a nested message)."""
    return encode_varint(number << 3 | 2) + encode_varint(len(data)) + data


def tfrecord(data: bytes) -> bytes:
    """TFRecord framing: length, its masked CRC, the payload, the payload's masked CRC."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def tb_event(wall_time: float, step: int = 0, summary: bytes | None = None, file_version: bytes | None = None) -> bytes:
    """An Event message: wall_time (1, double), step (2, int64), file_version (3) or summary (5)."""
    out = b"\x09" + struct.pack("<d", wall_time)
    if step:
        out += b"\x10" + encode_varint(step)
    if file_version is not None:
        out += pb_field(3, file_version)
    if summary is not None:
        out += pb_field(5, summary)
    return out


def tb_float(value: float) -> bytes:
    """A float32's four bytes; beyond float32's range, ±inf."""
    if value > FLOAT32_MAX or value < -FLOAT32_MAX:
        value = math.inf if value > 0 else -math.inf
    return struct.pack("<f", value)


@functools.lru_cache(maxsize=4096)
def _tb_tag(tag: str) -> bytes:
    return pb_field(1, tag.encode("utf-8")) + b"\x15"


def tb_scalars(values: dict) -> bytes:
    """A Summary of simple_value scalars: Summary.value (1) holding Value{tag (1), simple_value (2, float)}."""
    return b"".join([pb_field(1, _tb_tag(tag) + tb_float(value)) for tag, value in values.items()])


def _pb_value(value: object) -> bytes:
    """A google.protobuf.Value: number_value (2), string_value (3) or bool_value (4)."""
    if isinstance(value, bool):
        return b"\x20" + (b"\x01" if value else b"\x00")
    if isinstance(value, (int, float)) and math.isfinite(value) and abs(value) < 1e300:
        return b"\x11" + struct.pack("<d", value)
    return pb_field(3, fmt_cell(value).encode("utf-8"))


def _hparams_value(tag: str, plugin_data: bytes) -> bytes:
    """A Summary.Value the hparams plugin reads: its plugin data in the metadata (9), a null float
    tensor (8) as TensorBoard's own hparams summaries carry."""
    metadata = pb_field(1, pb_field(1, b"hparams") + pb_field(2, plugin_data))
    null_tensor = b"\x08\x01" + pb_field(2, b"") + pb_field(5, struct.pack("<f", 0.0))
    return pb_field(1, pb_field(1, tag.encode("utf-8")) + pb_field(8, null_tensor) + pb_field(9, metadata))


def tb_hparams_start(hparams: dict, start_time: float, group: str) -> bytes:
    """The Summary of a SessionStartInfo: hparams (1, map of Value), group_name (4), start_time_secs (5)."""
    entries = b"".join(pb_field(1, pb_field(1, str(k).encode("utf-8")) + pb_field(2, _pb_value(v)))
                       for k, v in sorted(hparams.items()))
    info = entries + pb_field(4, group.encode("utf-8")) + b"\x29" + struct.pack("<d", start_time)
    return _hparams_value(HPARAMS_START_TAG, pb_field(3, info))


def tb_hparams_end(status: str, end_time: float) -> bytes:
    """The Summary of a SessionEndInfo: status (1, enum) and end_time_secs (2)."""
    info = b"\x08" + encode_varint(HPARAMS_STATUS.get(status, 0)) + b"\x11" + struct.pack("<d", end_time)
    return _hparams_value(HPARAMS_END_TAG, pb_field(4, info))


_SMALL_VARINTS = [bytes((n,)) for n in range(128)]
# The fast encoders keep a CRC table per byte distance from a message's end and one entry per layout
# (the keys of a sample): longer messages and further layouts are encoded the plain way, so that a job
# printing thousands of keys in a line, or ever-new keys, cannot make them grow without bound.
TB_FAST_BYTES, TB_LAYOUTS_MAX = 2048, 1024


def tb_fast_too_long(names) -> bool:
    """Whether a sample of NAMES makes a message longer than the fast encoders' tables reach."""
    return sum(map(len, names)) + 12 * len(names) > TB_FAST_BYTES


def _crc_mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class ScalarEvents:
    """Encodes a sample's scalars as one framed Event, fast enough for the tee loop.

    CRC-32C is linear: between two messages of one length, a byte that differs changes the CRC by
    an amount that depends only on the XOR of the two bytes and on its distance from the end. So
    each layout (the tags in order, the length of the step's varint) keeps the CRC of its message
    with the changing bytes (wall time, step, values) zeroed, and a sample's CRC is that CRC patched
    with one table look-up per changing byte rather than eight bit operations per byte in Python.
    """

    def __init__(self) -> None:
        self.shifts = [list(_CRC32C_TABLE)]   # shifts[k][b]: byte b, k bytes before the end
        self.layouts: dict[tuple, tuple] = {}
        self.headers: dict[int, bytes] = {}

    def record(self, wall_time: float, step: int, values: dict) -> bytes:
        """The framed Event of VALUES (ints and floats) at STEP."""
        step_bytes = (_SMALL_VARINTS[step] if 0 <= step < 128 else encode_varint(step)) if step else b""
        key = (len(step_bytes), *values)
        layout = self.layouts.get(key)
        if layout is None:
            if len(self.layouts) >= TB_LAYOUTS_MAX or tb_fast_too_long(values):  # tables would grow: the plain way
                return tfrecord(tb_event(wall_time, step, tb_scalars(values)))
            layout = self._layout(key)
        encoder, args, variable, crc, tables = layout
        args[1], args[3], args[5::2] = wall_time, step_bytes, values.values()
        try:
            payload = encoder.pack(*args)
        except (OverflowError, struct.error):  # beyond float32, or an int beyond float: ±inf, as numpy rounds
            args[5::2] = [v if -FLOAT32_MAX <= v <= FLOAT32_MAX else math.inf if v > 0 else -math.inf
                          for v in values.values()]
            payload = encoder.pack(*args)
        crc = functools.reduce(operator.xor, map(list.__getitem__, tables, variable(payload)), crc)
        header = self.headers.get(len(payload)) or self._header(len(payload))
        return header + payload + struct.pack("<I", _crc_mask(crc))

    def _layout(self, key: tuple) -> tuple:
        """The struct that packs a layout's message, the places of its changing bytes, their tables."""
        step_len, tags = key[0], key[1:]
        heads = [pb_field(1, _tb_tag(tag) + b"\0\0\0\0")[:-4] for tag in tags]
        heads[0] = b"\x2a" + encode_varint(sum(len(h) + 4 for h in heads)) + heads[0]
        args = [b"\x09", 0.0, b"\x10" if step_len else b"", b""]
        for head in heads:
            args += [head, 0.0]
        encoder = struct.Struct("<1sd%ds%ds" % (len(args[2]), step_len) + "".join("%dsf" % len(h) for h in heads))
        places, at = [], 1
        for width, constant in zip([8, step_len] + [4] * len(heads), [args[2]] + heads + [b""]):
            places += range(at, at + width)
            at += width + len(constant)
        template = bytearray(encoder.pack(*args))
        for place in places:
            template[place] = 0
        tables = [self._shift(len(template) - 1 - place) for place in places]
        self.layouts[key] = layout = (encoder, args, operator.itemgetter(*places), crc32c(bytes(template)), tables)
        return layout

    def _shift(self, distance: int) -> list[int]:
        base = _CRC32C_TABLE
        while len(self.shifts) <= distance:
            self.shifts.append([base[crc & 0xFF] ^ (crc >> 8) for crc in self.shifts[-1]])
        return self.shifts[distance]

    def _header(self, length: int) -> bytes:
        head = struct.pack("<Q", length)
        self.headers[length] = header = head + struct.pack("<I", masked_crc32c(head))
        return header


class EventFileWriter:
    """Appends TFRecord-framed Event messages to one TensorBoard event file as samples arrive.

    The file starts with the file_version event; every add() is one event (a sample's scalars at
    its step) written with one os.write, so a reader never sees half a record for long.
    """

    def __init__(self, path: Path, wall_time: float, append: bool = False) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if append else os.O_TRUNC)
        self.path = path
        self.fd = os.open(path, flags, 0o600)
        self.error: OSError | None = None
        if not append or os.fstat(self.fd).st_size == 0:
            self.write(tfrecord(tb_event(wall_time, file_version=TB_FILE_VERSION)))

    def add(self, wall_time: float, step: int, values: dict) -> None:
        """One event holding the numeric VALUES of a sample (text, bools and None are left out)."""
        numbers = {k: v for k, v in values.items() if type(v) is float or type(v) is int}
        if numbers:
            self.write(tfrecord(tb_event(wall_time, step, tb_scalars(numbers))))

    def add_summary(self, wall_time: float, summary: bytes, step: int = 0) -> None:
        self.write(tfrecord(tb_event(wall_time, step, summary)))

    def write(self, data: bytes) -> None:
        if self.error is None:
            try:
                write_all(self.fd, data)
            except OSError as exc:
                self.error = exc

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _lanes(count: int, lane: int) -> int:
    """LANE (a 32-bit pattern) repeated COUNT times, as one little-endian big int."""
    return int.from_bytes(struct.pack("<I", lane) * count, "little")


class BatchEvents:
    """Encodes many samples of one layout as framed Events at once, for the runner's tee loop.

    A read of a fast job holds hundreds of METRIC lines; Python spends about 0.1 µs per byte on a
    CRC, more than the whole METRIC capture may cost. Here the events of a layout (the same tags,
    the same wall time, steps of one varint length) are built as a matrix from a template: the
    changing bytes are columns set by slice assignment, and the CRCs are computed column-wise,
    since CRC-32C is linear: each changing byte adds a table value that depends on its distance
    from the message's end, looked up for a whole column with bytes.translate and XORed as big
    ints. TFRecord's mask (a 32-bit rotation and addition) is done for all lanes with big-int
    masks too. Byte for byte what tb_event and tfrecord write (tests/test_exports.py).
    """

    def __init__(self) -> None:
        self.shifts = [list(_CRC32C_TABLE)]   # shifts[k][b]: what byte b, k bytes before the end, adds
        self.byte_tables: dict[int, list[bytes]] = {}

    def records(self, wall_time: float, steps: list[int], names: list[str], values: list) -> bytes:
        """The framed Events of len(STEPS) samples at WALL_TIME: sample i has values[i * len(NAMES) + j]
        (an int or a float) for names[j] at steps[i], all steps having one varint length."""
        count = len(steps)
        length = len(encode_varint(steps[0])) if steps[0] else 0
        summary = tb_scalars({name: 0.0 for name in names})
        payload = tb_event(wall_time, 1, summary)[:9] + (b"\x10" + b"\0" * length if length else b"") \
            + pb_field(5, summary)
        head = struct.pack("<Q", len(payload))
        record = head + struct.pack("<I", masked_crc32c(head)) + payload + b"\0\0\0\0"
        size, at = len(record), 12
        out = bytearray(record * count)
        varying: list[tuple[int, bytes]] = []           # (place in the payload, its column)
        if length:
            varying += [(10 + k, column) for k, column in enumerate(_varint_columns(steps, length))]
        value_at = payload.find(b"\x2a") + len(pb_field(5, summary)) - len(summary)
        packed, stride = _pack_floats(values), 4 * len(names)
        for j, name in enumerate(names):
            value_at += len(pb_field(1, _tb_tag(name) + b"\0\0\0\0")) - 4
            varying += [(value_at + b, packed[4 * j + b::stride]) for b in range(4)]
            value_at += 4
        for place, column in varying:
            out[at + place::size] = column
        crc = self._crcs(crc32c(payload), len(payload), varying, count)
        out[at + len(payload)::size] = crc[0::4]
        out[at + len(payload) + 1::size] = crc[1::4]
        out[at + len(payload) + 2::size] = crc[2::4]
        out[at + len(payload) + 3::size] = crc[3::4]
        return bytes(out)

    def _crcs(self, base: int, length: int, varying: list[tuple[int, bytes]], count: int) -> bytes:
        """The masked CRCs (4 bytes each, little-endian) of COUNT messages: BASE patched by the columns."""
        lanes = [int.from_bytes(bytes([(base >> (8 * j)) & 0xFF]) * count, "little") for j in range(4)]
        for place, column in varying:
            tables = self._byte_tables(length - 1 - place)
            for j in range(4):
                lanes[j] ^= int.from_bytes(column.translate(tables[j]), "little")
        crcs = bytearray(4 * count)
        for j in range(4):
            crcs[j::4] = lanes[j].to_bytes(count, "little")
        x = int.from_bytes(crcs, "little")
        x = ((x >> 15) & _lanes(count, 0x0001FFFF)) | ((x << 17) & _lanes(count, 0xFFFE0000))
        low, top = _lanes(count, 0x7FFFFFFF), _lanes(count, 0x80000000)
        k = _lanes(count, 0xA282EAD8)
        x = ((x & low) + (k & low)) ^ ((x ^ k) & top)   # lane-wise addition mod 2**32
        return x.to_bytes(4 * count, "little")

    def _byte_tables(self, distance: int) -> list[bytes]:
        """For a byte DISTANCE bytes before the end: four 256-byte tables, byte j of what it adds."""
        if distance not in self.byte_tables:
            base = _CRC32C_TABLE
            while len(self.shifts) <= distance:
                self.shifts.append([base[crc & 0xFF] ^ (crc >> 8) for crc in self.shifts[-1]])
            table = self.shifts[distance]
            self.byte_tables[distance] = [bytes((v >> (8 * j)) & 0xFF for v in table) for j in range(4)]
        return self.byte_tables[distance]


def _varint_columns(steps: list[int], length: int) -> list[bytes]:
    """Byte k of each step's varint (all of LENGTH bytes), as column k. Steps below 2**32 are cut
    into 7-bit groups as 32-bit lanes of one big int, without a Python loop over the steps."""
    count = len(steps)
    if min(steps) < 0 or max(steps) >= 1 << 32:
        wide = [s + (1 << 64) if s < 0 else s for s in steps]
        return [bytes([((s >> (7 * k)) & 0x7F) | (0x80 if k < length - 1 else 0) for s in wide])
                for k in range(length)]
    lanes = int.from_bytes(struct.pack(f"<{count}I", *steps), "little")
    columns = []
    for k in range(length):
        group = (lanes >> (7 * k)) & _lanes(count, 0x7F & ((1 << (32 - 7 * k)) - 1))  # no bit of the next lane
        if k < length - 1:
            group |= _lanes(count, 0x80)
        columns.append(group.to_bytes(4 * count, "little")[0::4])
    return columns

def _pack_floats(values: list) -> bytes:
    """VALUES as float32s; beyond float32 (or an int beyond float), ±inf as numpy would round them."""
    try:
        return struct.pack(f"<{len(values)}f", *values)
    except (OverflowError, struct.error):
        return b"".join(map(tb_float, values))

# The bytes of a step's varint by the step's bit length (0: a zero step, which an Event leaves out).
_VARINT_BYTES = [0] + [(bits + 6) // 7 for bits in range(1, 65)]


class LiveEvents:
    """The runner's own event file (config `tensorboard: true`): each read's samples as events,
    written together once the read is parsed, so `tensorboard --logdir ~/.runpilot/runs` shows a
    run as it runs. Consecutive samples of one layout are encoded together (BatchEvents); the
    samples' order is kept, since TensorBoard drops a tag's later points when its step goes back.
    Per sample only C-level maps run here: the whole METRIC capture may cost a few microseconds."""

    def __init__(self, path: Path, start: float) -> None:
        self.writer = EventFileWriter(path, start)
        self.single = ScalarEvents()
        self.batch = BatchEvents()
        self.samples: list[dict] = []   # MetricLog appends a read's samples, then calls flush

    def flush(self, first: int) -> None:
        """Write the pending samples' events in one write; FIRST is the first one's number, the step
        of a sample without one."""
        samples, self.samples = self.samples, []
        if not samples:
            return
        steps = list(map(dict.get, samples, itertools.repeat("step"), itertools.count(first)))
        now = time.time()
        low, high = min(steps), max(steps)
        if low < INT64_MIN or high > INT64_MAX:  # an Event's step is an int64: such samples stay out
            kept = [i for i, step in enumerate(steps) if INT64_MIN <= step <= INT64_MAX]
            steps, samples = [steps[i] for i in kept], [samples[i] for i in kept]
            if not samples:
                return
            low, high = min(steps), max(steps)
        with_step = sum(map(dict.__contains__, samples, itertools.repeat("step")))
        if len(set(map(len, samples))) == 1 and with_step in (0, len(samples)) and low >= 0 and \
                _VARINT_BYTES[low.bit_length()] == _VARINT_BYTES[high.bit_length()]:
            # the usual read, one layout: as many keys each, and (no KeyError below) the first one's
            with contextlib.suppress(KeyError):
                self.writer.write(self._encode(now, steps, samples))
                return
        if low < 0:  # a negative step is ten bytes long
            lengths = [_VARINT_BYTES[s.bit_length()] if s >= 0 else 10 for s in steps]
        else:
            lengths = list(map(_VARINT_BYTES.__getitem__, map(int.bit_length, steps)))
        keys = list(map(tuple, samples))
        if len(set(keys)) == 1 and len(set(lengths)) == 1:
            cuts = [0, len(steps)]
        else:
            layouts = list(zip(keys, lengths))
            cuts = [0, *itertools.compress(range(1, len(steps)), map(operator.ne, layouts[1:], layouts[:-1])),
                    len(steps)]
        self.writer.write(b"".join([self._encode(now, steps[a:b], samples[a:b]) for a, b in zip(cuts, cuts[1:])]))

    def _encode(self, now: float, steps: list[int], samples: list[dict]) -> bytes:
        """The events of samples that have the same keys and steps of one varint length (KeyError: a
        sample lacks a key of the first)."""
        names = [k for k in samples[0] if k != "step"]
        if not names:
            return b""
        values = list(itertools.chain.from_iterable(map(operator.itemgetter(*names), samples))) \
            if len(names) > 1 else list(map(operator.itemgetter(names[0]), samples))
        if len(steps) < 32 or set(map(type, values)) - {int, float} or tb_fast_too_long(names):
            return b"".join(self.single.record(now, step, numbers) for step, numbers in (  # few, or text: one by one
                (step, {k: v for k, v in sample.items() if (type(v) is float or type(v) is int) and k != "step"})
                for step, sample in zip(steps, samples)) if numbers)
        return self.batch.records(now, steps, names, values)

    def close(self) -> None:
        self.writer.close()

# -- reading event files: TFRecord framing, then Event and Summary protobufs by hand --

# TensorFlow's DataType numbers for the scalar tensors of TF2 summaries, and how each is packed.
_TB_DTYPES = {1: ("<f", 5), 2: ("<d", 6), 3: ("<i", 7), 9: ("<q", 10), 19: ("<e", 13)}


def decode_varint(data: bytes, at: int) -> tuple[int, int]:
    """A protobuf varint at AT: (value, the position after it); ValueError when cut short."""
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7


def protobuf_fields(data: bytes) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of one message: varints as ints, the rest as bytes."""
    at = 0
    while at < len(data):
        key, at = decode_varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = decode_varint(data, at)
        elif wire == 1:
            value, at = data[at:at + 8], at + 8
        elif wire == 2:
            size, at = decode_varint(data, at)
            value, at = data[at:at + size], at + size
        elif wire == 5:
            value, at = data[at:at + 4], at + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if at > len(data):
            raise ValueError("truncated protobuf field")
        yield number, wire, value


def _tb_tensor_scalar(tensor: bytes) -> float | None:
    """The one number of a TF2 scalar summary's TensorProto, or None when it is not one number."""
    import struct
    dtype, content, shape, packed = 0, b"", b"", {}
    for number, wire, value in protobuf_fields(tensor):
        if number == 1 and wire == 0:
            dtype = value
        elif number == 2 and wire == 2:
            shape = value
        elif number == 4 and wire == 2:
            content = value
        elif wire in (1, 2, 5):  # float_val, double_val, int_val...: packed (2) or one at a time
            packed[number] = packed.get(number, b"") + value
        elif wire == 0:
            packed[number] = packed.get(number, b"") + encode_varint(value)
    if dtype not in _TB_DTYPES or any(n == 2 for n, _, _ in protobuf_fields(shape)):
        return None  # not a number type, or not a scalar (shape has a dim)
    fmt, field_number = _TB_DTYPES[dtype]
    if content:
        return float(struct.unpack(fmt, content[:struct.calcsize(fmt)])[0])
    raw = packed.get(field_number, b"")
    if field_number in (7, 10, 13):  # int_val, int64_val, half_val: varints
        if not raw:
            return None
        value, _ = decode_varint(raw, 0)
        if field_number == 13:
            return float(struct.unpack("<e", value.to_bytes(2, "little"))[0])
        return float(value - (1 << 64) if value >= 1 << 63 else value)
    return float(struct.unpack(fmt, raw[:struct.calcsize(fmt)])[0]) if raw else None


def _tb_summary_value(value: bytes) -> tuple[str, float] | None:
    """(tag, number) of one Summary.Value: `simple_value` (TF1, tensorboardX) or a TF2 scalar tensor."""
    import struct
    tag, simple, tensor, plugin = "", None, None, ""
    for number, wire, field_value in protobuf_fields(value):
        if number == 1 and wire == 2:
            tag = field_value.decode("utf-8", "replace")
        elif number == 2 and wire == 5:
            simple = struct.unpack("<f", field_value)[0]
        elif number == 8 and wire == 2:
            tensor = field_value
        elif number == 9 and wire == 2:  # SummaryMetadata.plugin_data.plugin_name
            for n, w, meta in protobuf_fields(field_value):
                if n == 1 and w == 2:
                    plugin = next((p.decode("utf-8", "replace") for k, kw, p in protobuf_fields(meta)
                                   if k == 1 and kw == 2), "")
    if simple is not None:
        return tag, float(simple)
    if tensor is not None and plugin in ("scalars", ""):
        number = _tb_tensor_scalar(tensor)
        return (tag, number) if number is not None else None
    return None


def tb_metric_name(tag: str) -> str:
    """A TensorBoard tag as a metric name: `Loss/train` stays, other characters become `_`."""
    name = re.sub(r"[^A-Za-z0-9_.\-/]", "_", tag)
    return name if METRIC_KEY_RE.match(name) else "_" + name


def tb_event_sample(event: bytes) -> dict | None:
    """The scalars of one Event as a sample {step, tag: value, ...}; None when it holds none."""
    step, values = 0, {}
    for number, wire, value in protobuf_fields(event):
        if number == 2 and wire == 0:
            step = value - (1 << 64) if value >= 1 << 63 else value
        elif number == 5 and wire == 2:
            for n, w, item in protobuf_fields(value):
                if n == 1 and w == 2:
                    found = _tb_summary_value(item)
                    if found:
                        values[tb_metric_name(found[0])] = found[1]
    return {"step": step, **values} if values else None


class EventFileReader:
    """Reads the records of one growing event file from where it stopped; checks both CRCs.

    A record not yet written whole is left for the next read; a CRC that does not match stops
    the reading of that file (counted in `corrupt`), so no damaged number becomes a sample.
    """

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.corrupt = path, 0, 0

    def read(self) -> list[dict]:
        import struct
        if self.corrupt:
            return []
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        samples, at = [], 0
        while len(data) - at >= 12:
            header = data[at:at + 8]
            if struct.unpack("<I", data[at + 8:at + 12])[0] != masked_crc32c(header):
                self.corrupt += 1
                break
            size = struct.unpack("<Q", header)[0]
            end = at + 12 + size + 4
            if end > len(data):
                break
            body = data[at + 12:end - 4]
            if struct.unpack("<I", data[end - 4:end])[0] != masked_crc32c(body):
                self.corrupt += 1
                break
            try:
                sample = tb_event_sample(body)
            except ValueError:
                sample = None
            if sample:
                samples.append(sample)
            at = end
        self.offset += at
        return samples


class TensorBoardWatcher:
    """The event files under one folder, found and read as they grow (`*tfevents*`, any depth)."""

    def __init__(self, folder: Path, window: tuple[float, float] | None = None) -> None:
        """Live (no WINDOW): files there before the run are an earlier run's and are skipped.
        With WINDOW (reparse): only files last modified within (start, end) epoch seconds."""
        self.folder, self.window = folder, window
        self.readers: dict[Path, EventFileReader] = {}
        self.skipped = set() if window else set(self._files())

    def _files(self) -> list[Path]:
        with contextlib.suppress(OSError):
            return sorted(p for p in self.folder.rglob("*tfevents*") if p.is_file())
        return []

    def _belongs(self, path: Path) -> bool:
        if path in self.skipped:
            return False
        if self.window is None:
            return True
        with contextlib.suppress(OSError):
            return self.window[0] <= path.stat().st_mtime <= self.window[1]
        return False

    def poll(self) -> list[dict]:
        for path in self._files():
            if path not in self.readers and self._belongs(path):
                self.readers[path] = EventFileReader(path)
        samples = []
        for reader in self.readers.values():
            samples.extend(reader.read())
        return samples

    @property
    def corrupt(self) -> int:
        return sum(r.corrupt for r in self.readers.values())

# ==== 11. Engines: choosing one, its command line, its images ================
# An engine is one class: `Engine` is the protocol (its command line, its images, its GPUs, what the job
# sees of a mount, stopping the job, what a dead runner left behind), `LocalEngine`, `DockerEngine` and
# `PodmanEngine` implement it, and ENGINES (section 3) lists them by the name that configs, --engine
# and records keep. Code elsewhere gets the object with `engine_of(name)` and asks it; it never tests
# the name. The methods that end a job's processes use section 12's /proc helpers when called.

def quiet_run(argv: list[str], timeout: float = 30, env=None) -> subprocess.CompletedProcess:
    """Run a short helper command and capture its output; never raises for a bad status."""
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, env=None if env is None else dict(env))
    except (OSError, subprocess.SubprocessError) as exc:
        return subprocess.CompletedProcess(argv, 127, "", str(exc))


def container_name(run_id: str) -> str:
    return f"runpilot-{run_id}"


def require_image(config: JobConfig, engine: str) -> None:
    if not config.image:
        raise ConfigError(f"engine {engine} needs an image, and the config names none; add 'image:' to it, "
                          "or run with --engine local", config.source)


Gpus = int | str | tuple[str, ...] | None


def env_file_lines(env: dict[str, str]) -> tuple[bytes, list[str]]:
    """The engines' --env-file lines for one-line values, and the names of the others.

    The env-file format has no escapes, so a value with a line break cannot go in it.
    """
    lines, others = [], []
    for name, value in env.items():
        if "\n" in value or "\r" in value:
            others.append(name)
        else:
            lines.append(os.fsencode(f"{name}={value}\n"))
    return b"".join(lines), others


def workdir_provided(config: JobConfig) -> bool:
    """Whether a mount provides the workdir (else the image has it or the engine must create it)."""
    for m in config.mounts:
        if config.workdir == m.target:
            return True
        inside = os.path.relpath(str(config.workdir), m.target)
        if not inside.startswith("..") and os.path.isdir(os.path.join(m.source, inside)):
            return True
    return False


def local_argv(config: JobConfig) -> list[str]:
    """The host command for engine `local`: a string runs through /bin/sh, a list as is."""
    if isinstance(config.entrypoint, str):
        return ["/bin/sh", "-c", config.entrypoint]
    return list(config.entrypoint)


def local_gpu_env(gpus: Gpus) -> dict[str, str]:
    if gpus is None:
        return {"CUDA_VISIBLE_DEVICES": ""}
    if gpus == "all":
        return {}
    if isinstance(gpus, int):
        return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus))}
    return {"CUDA_VISIBLE_DEVICES": ",".join(gpus)}


def engine_down(engine: str, stderr: str) -> EngineError | None:
    """What the engine CLI's stderr says when it could not use its daemon, as one line with the fix."""
    text = stderr.lower()
    if "permission denied" in text and "daemon socket" in text:  # not in the docker group
        where = re.search(r"unix://(\S+?):? ", stderr)
        sock = where.group(1) if where else "the daemon's socket"
        return EngineError(f"this user may not use the {engine} engine (permission denied on {sock}); add it "
                           f"to the {engine} group ('sudo usermod -aG {engine} $USER', then log in again), "
                           "or use rootless Docker or Podman")
    if "cannot connect" in text or "is the docker daemon running" in text or "connection refused" in text:
        first = stderr.strip().splitlines()[0] if stderr.strip() else ""
        return EngineError(f"the {engine} engine is not answering ({first}); start it "
                           f"(e.g. 'sudo systemctl start {engine}' or 'sudo dockerd &') and retry")
    return None


# Where Podman looks for CDI specs (`nvidia-ctk cdi generate` writes one of these).
CDI_DIRS = ("/etc/cdi", "/var/run/cdi")


def _has_nvidia_cdi_spec() -> bool:
    for folder in CDI_DIRS:
        for spec in sorted(Path(folder).glob("*.*")) if Path(folder).is_dir() else []:
            with contextlib.suppress(OSError):
                if "nvidia.com/gpu" in spec.read_text(errors="replace"):
                    return True
    return False


class Engine:
    """What runs a job, and the protocol every engine implements. An instance holds no state: the
    class attributes say what kind of engine it is, the methods do what differs between engines.
    Register a subclass in ENGINES under its `name` and `--engine`, configs and records accept it."""

    name = ""                     # what configs, --engine, meta.json and runs.db say
    program = ""                  # the CLI it runs (a container engine's), found on PATH
    runs_in_container = False     # the job runs in a container (its name, labels, --rm), not as a process here
    needs_image = False           # the config must name an image
    autodetect = False            # chosen, in ENGINES' order, when nothing names an engine and `program` is here
    writes_as_root = False        # what the job writes into a mount belongs to root (handed back after it)

    def argv(self, config: JobConfig, run_id: str, env_names: list[str] = (), keep_engine_logs: bool = False,
             env_file: str | None = None, devices: tuple[str, ...] | None = None,
             keep_container: bool = False) -> list[str]:
        """The command that runs the job (see build_engine_argv)."""
        raise NotImplementedError

    def gpu_args(self, gpus: Gpus) -> list[str]:
        """The command-line arguments that hand GPUS (a count, 'all' or device ids) to the job."""
        return []

    def gpu_env(self, gpus: Gpus) -> dict[str, str]:
        """The variables that show the job only GPUS (the engine's arguments do it in a container)."""
        return {}

    def gpu_problem(self, environ) -> str | None:
        """Why this engine cannot hand NVIDIA GPUs to a job here, or None."""
        return None

    def mount_path(self, mount: Mount) -> str:
        """Where the job sees MOUNT."""
        return mount.target

    def version(self) -> str | None:
        """The engine's version, as it reports it (None where it has none)."""
        return None

    def inspect_image(self, image: str) -> dict | None:
        """IMAGE's id and repo digests, or None when it is not present here (other failures raise)."""
        return None

    def pull_image(self, image: str, pull: str, info: dict | None, report: Reporter) -> dict:
        """Pull IMAGE as --pull says, given what inspect_image said of it (INFO); its id and digests."""
        return info or {}

    def stop(self, job: "Job", sig: int) -> None:
        """Send SIG to a started JOB (section 13's Job)."""
        raise NotImplementedError

    def end_job(self, job: "Job") -> None:
        """After JOB's main process ended: end whatever else of it is still running."""

    def remove(self, launch: "Launch") -> None:
        """After a stop: remove what the engine keeps of the job (its container)."""

    def leftovers(self, run_id: str, job: dict) -> list:
        """What of run RUN_ID's job still runs (containers, processes) after its runner died; JOB is
        meta.job (a local job's process group)."""
        return []

    def end_leftovers(self, run_id: str, job: dict, wait: float) -> None:
        """Remove what `leftovers` finds, and wait (up to WAIT seconds) until it is gone."""


class LocalEngine(Engine):
    """The job runs as a process group on this host, without a container (`--engine local`)."""

    name = "local"

    def argv(self, config: JobConfig, run_id: str, *args, **kwargs) -> list[str]:
        return local_argv(config)

    def gpu_env(self, gpus: Gpus) -> dict[str, str]:
        return local_gpu_env(gpus)

    def mount_path(self, mount: Mount) -> str:
        return mount.source

    def stop(self, job: "Job", sig: int) -> None:
        job.signal_group(sig)

    def end_job(self, job: "Job") -> None:
        """Nothing a local job started outlives its run: its process group, and its adopted orphans."""
        job.signal_group(signal.SIGKILL)
        end_orphans(job.launch.run_id)

    def leftovers(self, run_id: str, job: dict) -> list:
        return local_job_processes(run_id, job)

    def end_leftovers(self, run_id: str, job: dict, wait: float) -> None:
        deadline = time.monotonic() + wait
        while (pids := local_job_processes(run_id, job)) and time.monotonic() < deadline:
            for pid in pids:  # again each time: a process may have forked before it got its SIGKILL
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)


class ContainerEngine(Engine):
    """An engine with Docker's command line: `PROGRAM run`, `kill`, `rm`, `ps`, `image inspect`, `pull`."""

    runs_in_container = True
    needs_image = True
    autodetect = True
    creates_workdir = True        # `run -w DIR` creates a missing DIR (Podman refuses one)
    version_format = "{{.Client.Version}}"
    package = ""                  # what to install when `program` is missing

    def argv(self, config: JobConfig, run_id: str, env_names: list[str] = (), keep_engine_logs: bool = False,
             env_file: str | None = None, devices: tuple[str, ...] | None = None,
             keep_container: bool = False) -> list[str]:
        require_image(config, self.name)
        argv = [self.program, "run", *([] if keep_container else ["--rm"]), "--init", "--pull", "never",
                "--name", container_name(run_id), "--label", f"{RUN_LABEL}={run_id}"]
        if not keep_engine_logs:
            argv += ["--log-driver", "none"]
        if env_file:
            argv += ["--env-file", env_file]
        for name in env_names:
            argv += ["-e", name]
        for m in config.mounts:
            argv += ["-v", f"{m.source}:{m.target}" + (":ro" if m.read_only else "")]
        # An engine that refuses a missing workdir on its command line gets it from the job's own shell.
        create_workdir = not self.creates_workdir and bool(config.workdir) and not workdir_provided(config)
        if config.workdir:
            argv += ["-w", "/" if create_workdir else config.workdir]
        res = config.resources
        argv += self.gpu_args(devices if devices is not None else res.gpus)
        if res.cpu is not None:
            argv += ["--cpus", f"{res.cpu:g}"]
        if res.memory is not None:
            argv += ["--memory", str(res.memory)]
        if res.shm_size is not None:
            argv += ["--shm-size", str(res.shm_size)]
        command = ["/bin/sh", "-c", config.entrypoint] if isinstance(config.entrypoint, str) else \
            list(config.entrypoint)
        if create_workdir:
            command = ["/bin/sh", "-c", 'mkdir -p "$0" && cd "$0" && exec "$@"', str(config.workdir), *command]
        return argv + ["--entrypoint", command[0], str(config.image), *command[1:]]

    def version(self) -> str | None:
        return quiet_run([self.program, "version", "--format", self.version_format],
                         timeout=GIT_PROBE_SECONDS).stdout.strip() or None

    def require_cli(self) -> None:
        if not shutil.which(self.program):
            raise EngineError(f"{self.name} is not installed (not found on PATH); install it "
                              f"(apt-get install {self.package or self.name}) "
                              "or choose another engine with --engine")

    def inspect_image(self, image: str) -> dict | None:
        self.require_cli()
        done = quiet_run([self.program, "image", "inspect", "--format", "{{.Id}}|{{json .RepoDigests}}", image])
        if done.returncode != 0:
            down = engine_down(self.name, done.stderr)
            if down:
                raise down
            if IMAGE_MISSING_RE.search(done.stderr):
                return None
            first = done.stderr.strip().splitlines()[0] if done.stderr.strip() else f"exit status {done.returncode}"
            raise EngineError(f"{self.name} could not look up image {image} ({first}); check that "
                              f"'{self.name} image inspect {image}' works for this user")
        image_id, _, digests = done.stdout.strip().partition("|")
        try:
            found = json.loads(digests) or []
        except ValueError:
            found = []
        return {"image_id": image_id, "repo_digests": [str(d) for d in found if isinstance(d, str)]}

    def pull_image(self, image: str, pull: str, info: dict | None, report: Reporter) -> dict:
        if info is not None and pull != "always":
            return info
        if pull == "never":
            raise EngineError(f"image {image} is not present locally and --pull never was given; "
                              f"pull it ({self.name} pull {image}) or build it")
        report(RunEvent("pulling", None, f"pulling {image} ..."))
        try:  # the engine's progress goes to our stderr; the job's log stays the job's
            sys.stderr.flush()
            status = subprocess.run([self.program, "pull", image], stdin=subprocess.DEVNULL,
                                    stdout=sys.stderr.fileno(), stderr=sys.stderr.fileno()).returncode
        except (OSError, ValueError, AttributeError):
            status = subprocess.run([self.program, "pull", image], stdin=subprocess.DEVNULL,
                                    capture_output=True).returncode
        if status != 0:
            raise EngineError(f"could not pull image {image} ({self.name} pull exited {status}); check "
                              "the name and your registry access, or build the image locally")
        return self.inspect_image(image) or {}

    def stop(self, job: "Job", sig: int) -> None:
        """`docker kill --signal SIG NAME`: the container's init hands SIG to the job."""
        argv = [self.program, "kill", "--signal", signal.Signals(sig).name, job.launch.container]
        job.helpers.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, start_new_session=True))

    def remove(self, launch: "Launch") -> None:
        if launch.container:
            quiet_run([self.program, "rm", "-f", launch.container], timeout=60)

    def leftovers(self, run_id: str, job: dict) -> list:
        """The run's containers, found by the label every container of a run carries."""
        if not shutil.which(self.program):
            return []
        done = quiet_run([self.program, "ps", "-a", "-q", "--filter", f"label={RUN_LABEL}={run_id}"])
        return done.stdout.split() if done.returncode == 0 else []

    def end_leftovers(self, run_id: str, job: dict, wait: float) -> None:
        for container in self.leftovers(run_id, job):
            quiet_run([self.program, "rm", "-f", container], timeout=60)


class DockerEngine(ContainerEngine):
    """Docker: its daemon runs the job as root; `--gpus` through the NVIDIA Container Toolkit."""

    name = program = "docker"
    package = "docker.io"
    version_format = "{{.Server.Version}}"  # the daemon's: it is what runs the job
    writes_as_root = True

    def gpu_args(self, gpus: Gpus) -> list[str]:
        if gpus is None:
            return []
        if isinstance(gpus, tuple):
            return ["--gpus", f'"device={",".join(gpus)}"']  # Docker parses this value as CSV
        return ["--gpus", str(gpus)]

    def gpu_problem(self, environ) -> str | None:
        path = environ.get("PATH")
        if not any(shutil.which(tool, path=path) for tool in (
                "nvidia-container-runtime-hook", "nvidia-container-runtime", "nvidia-ctk")):
            return ("docker cannot reach the GPUs: the NVIDIA Container Toolkit is not installed; install "
                    "nvidia-container-toolkit, run 'sudo nvidia-ctk runtime configure --runtime=docker' and restart docker")
        return None


class PodmanEngine(ContainerEngine):
    """Podman: rootless, daemonless; GPUs as CDI devices."""

    name = program = "podman"
    package = "podman"
    creates_workdir = False

    def gpu_args(self, gpus: Gpus) -> list[str]:
        if gpus is None:
            return []
        if gpus == "all":
            devices = ["all"]
        elif isinstance(gpus, int):
            devices = [str(i) for i in range(gpus)]
        else:
            devices = list(gpus)
        return [arg for d in devices for arg in ("--device", f"nvidia.com/gpu={d}")]

    def gpu_problem(self, environ) -> str | None:
        if not _has_nvidia_cdi_spec():
            return ("podman cannot reach the GPUs: no CDI spec for nvidia.com/gpu; run "
                    "'sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml'")
        return None


# The order is the order the choices are listed in, and autodetection's: docker, then podman.
ENGINES.update({cls.name: cls for cls in (DockerEngine, PodmanEngine, LocalEngine)})


def engine_of(name: str | None, default: str | None = None) -> Engine:
    """The engine registered as NAME (what a config or record says); DEFAULT's where NAME is none
    of them (a record without one), else a UsageError."""
    cls = ENGINES.get(name) if isinstance(name, str) else None
    if cls is None and default is not None:
        cls = ENGINES[default]
    if cls is None:
        raise UsageError(f"engine {name!r} is not known here; choose one of {', '.join(ENGINES)}")
    return cls()


def choose_engine(flag: str | None, config: JobConfig, environ, which=None) -> str:
    """--engine, then the config's `engine`, then RUNPILOT_ENGINE, then docker if present, else podman;
    a container engine needs the config to name an image."""
    engine = _pick_engine(flag, config, environ, which or shutil.which)
    if engine_of(engine).needs_image:
        require_image(config, engine)
    return engine


def _pick_engine(flag: str | None, config: JobConfig, environ, which) -> str:
    for choice, where in ((flag, "--engine"), (config.engine, "the config"),
                          (environ.get("RUNPILOT_ENGINE"), "RUNPILOT_ENGINE")):
        if choice:
            if choice not in ENGINES:
                raise UsageError(f"{where} names engine {choice!r}; choose one of {', '.join(ENGINES)}")
            return choice
    for name, cls in ENGINES.items():
        if cls.autodetect and which(cls.program):
            return name
    raise EngineError("neither docker nor podman is installed; install one (apt-get install docker.io "
                      "or podman), or run without a container with --engine local")


def gpu_args(engine: str, gpus: Gpus) -> list[str]:
    """Docker's --gpus value, or Podman's CDI devices, for a count, 'all' or device ids."""
    return engine_of(engine).gpu_args(gpus)


def job_environment(config: JobConfig, run_id: str, engine: str, environ) -> dict[str, str]:
    """What the job sees in its environment besides the image's own: RunPilot's variables,
    RUNPILOT_MOUNT_<NAME> for each named mount, then the config's env with ${VAR} expanded."""
    env = {"PYTHONUNBUFFERED": "1", "RUNPILOT_RUN_ID": run_id}
    for m in config.mounts:
        if m.name:
            name = "RUNPILOT_MOUNT_" + re.sub(r"[^A-Za-z0-9]", "_", m.name).upper()
            env[name] = engine_of(engine).mount_path(m)
    env.update(expand_env(config.env, environ))
    return env


def build_engine_argv(config: JobConfig, run_id: str, engine: str, env_names: list[str] = (),
                      keep_engine_logs: bool = False, env_file: str | None = None,
                      devices: tuple[str, ...] | None = None, keep_container: bool = False) -> list[str]:
    """The `docker run` / `podman run` argv for a job (pure: no I/O, tested without an engine).

    Env values never appear here (anyone can read argv in `ps`): they come from ENV_FILE, which
    the runner passes as a pipe, or by name (`-e NAME`) from the engine's own environment.
    DEVICES, when given, are the GPUs this run was placed on. KEEP_CONTAINER (--check-writes) leaves
    out --rm: the runner looks at what the job wrote, then removes the container itself.
    """
    return engine_of(engine).argv(config, run_id, env_names, keep_engine_logs, env_file, devices, keep_container)


def inspect_image(engine: str, image: str) -> dict | None:
    """The image's id and repo digests, or None when it is not present (other failures raise)."""
    return engine_of(engine).inspect_image(image)


def prepare_image(engine: str, image: str, pull: str, report: Reporter = ignore_events) -> dict:
    """Make sure the image is present (pulling it as its own phase) and return its id and digests."""
    return pull_image(engine, image, pull, inspect_image(engine, image), report)


def pull_image(engine: str, image: str, pull: str, info: dict | None, report: Reporter) -> dict:
    """Pull the image as --pull says, given what inspect_image said of it (INFO)."""
    return engine_of(engine).pull_image(image, pull, info, report)


def engine_version(engine: str) -> str | None:
    """The engine's version (the daemon's, for Docker), as its CLI reports it."""
    return engine_of(engine).version()


def local_images(engine: str) -> list[str]:
    """The repo:tag names of the images present locally (empty when the engine cannot say)."""
    program = engine_of(engine).program
    if not shutil.which(program):
        return []
    done = quiet_run([program, "images", "--format", "{{.Repository}}:{{.Tag}}"], timeout=20)
    return [line for line in done.stdout.split() if "<none>" not in line] if done.returncode == 0 else []


def image_python(engine: str, image: str) -> str | None:
    """`python` or `python3`: the first that IMAGE runs (`--version` in a throwaway container
    without network), or None; `init` must not write a sample whose first run exits 127."""
    for python in ("python", "python3"):
        done = quiet_run([engine_of(engine).program, "run", "--rm", "--pull", "never", "--network", "none",
                          "--log-driver", "none", "--entrypoint", python, image, "--version"], timeout=60)
        if done.returncode == 0:
            return python
    return None


# ==== 12. Host facts: GPUs and their claims, git, the runner =================

NVIDIA_QUERY = "index,uuid,name,driver_version,memory.total"


def parse_gpu_csv(text: str) -> list[dict]:
    """Rows of `nvidia-smi --query-gpu=index,uuid,name,driver_version,memory.total --format=csv,noheader,nounits`."""
    gpus = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) == 5 and cells[0].isdigit():
            memory = int(cells[4]) if cells[4].isdigit() else None
            gpus.append({"index": int(cells[0]), "uuid": cells[1], "name": cells[2], "driver": cells[3],
                         "memory_mib": memory})
    return gpus


def parse_cuda_version(banner: str) -> str | None:
    """The `CUDA Version: 12.2` of nvidia-smi's banner (the driver's CUDA, not the image's)."""
    match = re.search(r"CUDA Version:\s*([\d.]+)", banner)
    return match.group(1) if match else None


def gpu_shortfall(requested: Gpus, gpus: list[dict]) -> str | None:
    """Why the GPUs found cannot satisfy the request, or None."""
    if not gpus:
        return "nvidia-smi lists no GPU on this machine"
    if isinstance(requested, int) and requested > len(gpus):
        return f"resources.gpus asks for {requested} GPUs but this machine has {len(gpus)}"
    if isinstance(requested, tuple):
        known = {str(g["index"]) for g in gpus} | {g["uuid"] for g in gpus}
        missing = [d for d in requested if d not in known]
        if missing:
            return (f"resources.gpus names {', '.join(missing)}, which this machine does not have "
                    f"(it has {', '.join(str(g['index']) for g in gpus)})")
    return None


def query_gpus(environ) -> dict:
    """What nvidia-smi reports: {"devices", "driver", "cuda"} or {"error": why it cannot tell}."""
    smi = shutil.which("nvidia-smi", path=environ.get("PATH"))
    if not smi:
        return {"error": "the NVIDIA driver is not installed here (nvidia-smi not found on PATH)"}
    done = quiet_run([smi, f"--query-gpu={NVIDIA_QUERY}", "--format=csv,noheader,nounits"], 30, environ)
    if done.returncode != 0:
        said = (done.stdout + done.stderr).strip().splitlines()
        return {"error": f"nvidia-smi failed (exit {done.returncode}): {said[0] if said else 'no output'}"}
    devices = parse_gpu_csv(done.stdout)
    banner = quiet_run([smi], 30, environ).stdout
    return {"devices": devices, "driver": devices[0]["driver"] if devices else None,
            "cuda": parse_cuda_version(banner)}


def gpu_facts(requested: Gpus, engine: str, check: bool, environ, pool: list[str] | None = None) -> dict:
    """Check that the GPUs asked for exist (unless told not to) and describe what the run saw.

    A POOL given on the command line (`--gpus 0,1,3`) stands for the GPUs to use; they are
    still described from nvidia-smi when it answers.
    """
    if requested is None:
        return {"requested": None, "devices": []}
    found = query_gpus(environ)
    if check:
        problem = _unknown_in_pool(pool, found["devices"]) if pool else \
            found.get("error") or gpu_shortfall(requested, found["devices"])
        if pool and isinstance(requested, int) and requested > len(pool):
            problem = f"resources.gpus asks for {requested} GPUs but --gpus offers {len(pool)}"
        problem = problem or engine_of(engine).gpu_problem(environ)
        if problem:
            raise GpuError(f"{problem}; or start anyway with --no-gpu-check")
    return {"requested": list(requested) if isinstance(requested, tuple) else requested, **found}


def _unknown_in_pool(pool: list[str], devices: list[dict]) -> str | None:
    """--gpus naming a GPU that nvidia-smi does not list (where it lists any)."""
    known = {str(d["index"]) for d in devices} | {d["uuid"] for d in devices}
    unknown = [d for d in pool if d not in known]
    if devices and unknown:
        have = ", ".join(str(d["index"]) for d in devices)
        return f"--gpus names GPU {', '.join(unknown)}, which nvidia-smi does not list (GPUs here: {have})"
    return None


def gpu_pool(facts: dict, given: list[str] | None) -> list[str]:
    """The GPUs runs are placed on: those given with --gpus (a UUID as its index, so that both
    spellings claim the same GPU), else every GPU nvidia-smi lists."""
    if not given:
        return [str(d["index"]) for d in facts.get("devices") or []]
    by_uuid = {d["uuid"]: str(d["index"]) for d in facts.get("devices") or []}
    pool = [by_uuid.get(d, d) for d in given]
    if len(set(pool)) < len(pool):
        raise UsageError(f"--gpus {','.join(given)} names one GPU twice (by its index and its UUID); name it once")
    return pool


def gpu_request(requested: Gpus, pool: list[str], facts: dict) -> tuple[int, tuple[str, ...]]:
    """(how many to pick from the pool, the devices a run is pinned to) for resources.gpus."""
    if requested == "all":
        return 0, tuple(pool)
    if isinstance(requested, tuple):  # UUIDs are claimed under their index, so both spellings agree
        by_uuid = {d["uuid"]: str(d["index"]) for d in facts.get("devices") or []}
        return 0, tuple(by_uuid.get(d, d) for d in requested)
    return int(requested or 0), ()


@dataclass
class GpuClaim:
    """GPUs held for one run: open lock files, released by release() or by the process's death."""

    devices: tuple[str, ...]
    fds: list[int]
    holder_files: list[Path] = field(default_factory=list)

    def release(self) -> None:
        """Say no one holds the GPUs (while still holding them), then let them go."""
        for path in self.holder_files:
            with contextlib.suppress(OSError):
                path.unlink()
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds, self.holder_files = [], []


class GpuClaims:
    """Which GPUs of this machine RunPilot runs hold, for every user and every home.

    A claim on GPU D is a file `runpilot-gpu-D.<pid>-<random>.lock` in the machine's claims folder
    (/tmp, see gpu_claims_folder), created by the claimer, private to it, flock'ed before it is
    published under that name and unlinked before it is let go. GPU D is held while any published
    claim file of D is locked: /proc/locks says which are, for files of every user, without opening
    them. A claimer publishes its own locked file first and then looks for another locked one (and
    withdraws when it finds one), so of two claimers at once at least one sees the other: no GPU is
    ever held twice. The kernel drops a lock when its process ends, however it ends (a SIGKILLed
    runner cannot leak a GPU); its file stays behind unlocked, which means free, and is removed by
    its owner's next claim. No user can block or fake another's claim: a claim counts only while
    its creator's process holds the lock, each file is private to its creator, and in a sticky
    folder nobody else can remove or replace it.

    `<home>/gpus/<device>.json` names the holder for the runs of one home; a run that ends removes
    it before letting go. So a free GPU beside a holder file means the holder's runner died holding
    it, and its job may live on (a container keeps running without its runner): OUTLIVED(run_id)
    says whether it does, and such a GPU stays busy until that job ends.
    """

    def __init__(self, folder: Path, outlived: Callable[[str], bool] = lambda run_id: False,
                 machine: Path | None = None) -> None:
        self.folder, self.outlived = folder, outlived
        self.machine = machine if machine is not None else folder

    def try_claim(self, count: int, pinned: tuple[str, ...], pool: list[str], holder: dict) -> GpuClaim | None:
        """Claim PINNED devices, or COUNT free ones of POOL; None (and nothing held) when busy."""
        make_private_dirs(self.folder)
        wanted = list(pinned) if pinned else list(pool)
        need = len(pinned) if pinned else count
        claim = GpuClaim((), [])
        for device in wanted:
            taken = None if self._left_behind(device) else self._lock(device)
            if taken is None:
                if pinned:
                    break
                continue
            claim.fds.append(taken[0])
            claim.devices += (device,)
            claim.holder_files += [taken[1], self.folder / f"{device}.json"]
            if len(claim.devices) == need:
                self.describe(claim, holder)
                return claim
        claim.release()
        return None

    def describe(self, claim: GpuClaim, holder: dict) -> None:
        """Say who holds the claim's GPUs (read by holders() for a queued run's message)."""
        for device in claim.devices:
            with contextlib.suppress(OSError):
                write_atomic(self.folder / f"{device}.json", json.dumps(holder).encode(), durable=False)

    def _lock(self, device: str) -> tuple[int, Path] | None:
        """Publish a locked claim file for DEVICE and keep it unless another claim of DEVICE is held."""
        self._remove_stale(device)
        fd, path = self._publish(device)
        if self._machine_holders(device, besides=path):
            with contextlib.suppress(OSError):
                path.unlink()
            os.close(fd)
            return None
        return fd, path

    def _publish(self, device: str) -> tuple[int, Path]:
        token = f"{os.getpid()}-{os.urandom(6).hex()}"
        fresh = self.machine / f"runpilot-gpu-new.{token}"
        fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a file just made: nobody else has it open
            path = self.machine / f"{_claim_prefix(device)}{token}.lock"
            os.rename(fresh, path)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                fresh.unlink()
            raise
        return fd, path

    def _claim_files(self, prefix: str) -> list[tuple[Path, os.stat_result]]:
        """The regular files of the claims folder whose name starts with PREFIX, not followed."""
        found = []
        with os.scandir(self.machine) as entries:
            for entry in entries:
                if entry.name.startswith(prefix):
                    with contextlib.suppress(OSError):
                        st = entry.stat(follow_symlinks=False)
                        if stat_is_file(st):
                            found.append((Path(entry.path), st))
        return found

    def _machine_holders(self, device: str, besides: Path | None = None) -> list[dict]:
        """{pid, uid} of each live claim on DEVICE by anyone (the listing comes before /proc/locks,
        so a claim file published meanwhile is locked by the time the locks are read)."""
        files = [(p, st) for p, st in self._claim_files(_claim_prefix(device)) if p != besides]
        locked = flock_holders() if files else {}
        return [{"pid": locked[_lock_key(st)], "uid": st.st_uid} for _, st in files if _lock_key(st) in locked]

    def _remove_stale(self, device: str) -> None:
        """Remove this user's claim files whose runner died (unlocked), so that they do not pile up."""
        mine = [(p, st) for p, st in self._claim_files(_claim_prefix(device)) + self._claim_files("runpilot-gpu-new.")
                if st.st_uid == os.geteuid()]
        locked = flock_holders() if mine else {}
        for path, st in mine:
            young = path.name.startswith("runpilot-gpu-new.") and time.time() - st.st_mtime < GPU_CLAIM_STALE_SECONDS
            if _lock_key(st) not in locked and not young:
                with contextlib.suppress(OSError):
                    path.unlink()

    def _holder(self, device: str) -> dict:
        try:
            holder = json.loads((self.folder / f"{device}.json").read_bytes())
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _left_behind(self, device: str) -> bool:
        """Whether a free device is still used by the job of a runner that died holding it."""
        if self._machine_holders(device):
            return False
        run_id = self._holder(device).get("run_id")
        return isinstance(run_id, str) and self.outlived(run_id)

    def holders(self, devices: list[str]) -> dict[str, dict]:
        """Who holds each busy device (a device free for the taking is left out)."""
        busy = {}
        for device in devices:
            held = self._machine_holders(device)
            ours = self._holder(device)
            if held:
                busy[device] = ours if ours.get("pid") in [h["pid"] for h in held] else \
                    {"pid": held[0]["pid"], "user": user_name(held[0]["uid"])}
            elif self._left_behind(device):
                busy[device] = {**ours, "runner_died": True}
        return busy


def _claim_prefix(device: str) -> str:
    """The start of a claim file's name for DEVICE (an index or a UUID: kept to safe characters)."""
    return f"runpilot-gpu-{re.sub(r'[^A-Za-z0-9_-]', '_', device)}."


def stat_is_file(st: os.stat_result) -> bool:
    return (st.st_mode & 0o170000) == 0o100000


def _lock_key(st: os.stat_result) -> tuple[int, int, int]:
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def parse_proc_locks(text: str) -> dict[tuple[int, int, int], int]:
    """{(major, minor, inode): pid} of the granted flock locks listed in /proc/locks."""
    held = {}
    for match in re.finditer(r"^\d+: FLOCK\s+\S+\s+\S+\s+(-?\d+)\s+([0-9a-f]+):([0-9a-f]+):(\d+)\s", text, re.M):
        held[(int(match[2], 16), int(match[3], 16), int(match[4]))] = int(match[1])
    return held


def flock_holders() -> dict[tuple[int, int, int], int]:
    """The flock locks held on this machine now, by any user (see parse_proc_locks)."""
    try:
        return parse_proc_locks(Path("/proc/locks").read_text(errors="replace"))
    except OSError as e:
        raise GpuError(f"cannot read /proc/locks to tell which GPUs are claimed: {e.strerror}; "
                       "RunPilot places GPUs only where /proc is mounted (or pin the run with --gpus)") from e


def user_name(uid: int) -> str:
    import pwd  # only for a message about another user's claim
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def gpu_claims_folder(environ) -> Path:
    """The folder where GPUs are claimed machine-wide (RUNPILOT_GPU_CLAIMS or /tmp), checked: a
    folder (not a link) that only root or this user owns, sticky if others may write in it (so that
    no one can remove another's claim file)."""
    folder = Path(environ.get("RUNPILOT_GPU_CLAIMS") or GPU_CLAIMS_DIR)
    with contextlib.suppress(FileExistsError, FileNotFoundError):
        if environ.get("RUNPILOT_GPU_CLAIMS"):
            folder.mkdir(mode=0o700)
    try:
        st = os.lstat(folder)
    except OSError as e:
        raise GpuError(f"cannot use {folder} for GPU claims: {e.strerror}; "
                       "set RUNPILOT_GPU_CLAIMS to a folder every RunPilot user of this machine can write") from e
    problem = ("is not a folder" if (st.st_mode & 0o170000) != 0o040000 else
               f"belongs to {user_name(st.st_uid)}, who could remove other users' claims"
               if st.st_uid not in (0, os.geteuid()) else
               "is writable by others but not sticky (chmod +t), so anyone could remove a claim"
               if st.st_mode & 0o022 and not st.st_mode & 0o1000 else None)
    if problem:
        raise GpuError(f"the GPU claims folder {folder} {problem}; set RUNPILOT_GPU_CLAIMS to a folder "
                       "owned by root (mode 1777, like /tmp) or by you")
    return folder


def fmt_gpu_wait(count: int, pinned: tuple[str, ...], holders: dict[str, dict]) -> str:
    """`waiting for 1 GPU: GPU 0 is held by run X (pid 12)` for the queued event."""
    wanted = f"GPU {', '.join(pinned)}" if pinned else f"{count} GPU{'s' if count != 1 else ''}"
    held = "; ".join(_fmt_gpu_holder(d, h) for d, h in sorted(holders.items())) or "the GPUs are busy"
    return f"waiting for {wanted}: {held}"


def _fmt_gpu_holder(device: str, holder: dict) -> str:
    run_id = holder.get("run_id", "?")
    if "user" in holder:
        return f"GPU {device} is held by pid {holder.get('pid', '?')} of user {holder['user']} (another home or user)"
    if holder.get("runner_died"):
        return (f"GPU {device} is used by run {run_id}, whose runner died while its job runs on "
                f"('runpilot stop {run_id}' ends it)")
    return f"GPU {device} is held by run {run_id} (pid {holder.get('pid', '?')})"


# -- git, probed without running anything a repository configures ---------------------------

GIT_REF_RE = re.compile(r"refs/[A-Za-z0-9._/+-]+\Z")


def find_repository(folder: str) -> tuple[Path, Path, Path] | None:
    """(work tree, git dir, common git dir) of the repository holding FOLDER, found by reading files."""
    start = Path(folder).resolve()
    for top in (start, *start.parents):
        dot = top / ".git"
        try:
            if dot.is_dir():
                gitdir = dot
            elif dot.is_file():
                text = dot.read_text(errors="replace").strip()
                if not text.startswith("gitdir:"):
                    return None
                gitdir = (top / text[7:].strip()).resolve()
            else:
                continue
            common = gitdir
            if (gitdir / "commondir").is_file():
                common = (gitdir / (gitdir / "commondir").read_text().strip()).resolve()
        except OSError:
            return None
        return top, gitdir, common
    return None


def git_head(gitdir: Path, common: Path) -> tuple[str | None, str | None]:
    """(commit, branch) from HEAD, refs and packed-refs; commit None when it cannot be read."""
    try:
        head = (gitdir / "HEAD").read_text(errors="replace").strip()
    except OSError:
        return None, None
    if not head.startswith("ref: "):
        return (head if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", head) else None), "(detached)"
    ref = head[5:].strip()
    if not GIT_REF_RE.match(ref) or ".." in ref:
        return None, None
    branch = ref.removeprefix("refs/heads/")
    with contextlib.suppress(OSError):
        return (common / ref).read_text().strip(), branch
    with contextlib.suppress(OSError):
        for line in (common / "packed-refs").read_text(errors="replace").splitlines():
            if line.endswith(" " + ref) and not line.startswith(("#", "^")):
                return line.split(" ", 1)[0], branch
    return "(initial)", branch


def _object_format(common: Path) -> str:
    with contextlib.suppress(OSError):
        if re.search(r"objectformat\s*=\s*sha256", (common / "config").read_text(errors="replace"), re.I):
            return "sha256"
    return "sha1"


def _sterile_git_dir(tmp: Path, gitdir: Path, common: Path, commit: str) -> Path:
    """A git dir that shares the repository's objects and index but none of its configuration.

    Nothing the repository configures (config, hooks, filters, diff drivers, fsmonitor, includes)
    exists in it, so git run against it cannot be told to run a program; HEAD is detached at the
    same commit, so no refs are needed.
    """
    sterile = tmp / "git"
    (sterile / "objects" / "info").mkdir(parents=True)
    (sterile / "refs").mkdir()
    (sterile / "info").mkdir()
    (sterile / "HEAD").write_text(commit + "\n")
    (sterile / "objects" / "info" / "alternates").write_text(str(common / "objects") + "\n")
    sha256 = _object_format(common) == "sha256"
    (sterile / "config").write_text(
        f"[core]\n\trepositoryformatversion = {1 if sha256 else 0}\n\tbare = false\n"
        + ("[extensions]\n\tobjectformat = sha256\n" if sha256 else ""))
    for source, target in ((gitdir / "index", sterile / "index"),
                           (common / "info" / "exclude", sterile / "info" / "exclude")):
        with contextlib.suppress(OSError):
            shutil.copyfile(source, target)
    return sterile


def _sterile_git(argv: list[str], sterile: Path, top: Path, deadline: float,
                 procs: list | None = None) -> subprocess.CompletedProcess:
    """git ARGV against the sterile git dir, with no system or user configuration either."""
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(sterile.parent), "LC_ALL": "C",
           "XDG_CONFIG_HOME": str(sterile.parent), "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
           "GIT_DIR": str(sterile), "GIT_WORK_TREE": str(top), "GIT_OPTIONAL_LOCKS": "0",
           "GIT_TERMINAL_PROMPT": "0", "GIT_NO_REPLACE_OBJECTS": "1", "GIT_ATTR_NOSYSTEM": "1"}
    safety = ["-c", "core.fsmonitor=false", "-c", "core.untrackedCache=false", "-c", "safe.directory=*"]
    timeout = max(0.1, deadline - time.monotonic())
    if procs is None:
        return quiet_run(["git", *safety, *argv], timeout=timeout, env=env)
    return tracked_run(["git", *safety, *argv], timeout, env, procs)


def tracked_run(argv: list[str], timeout: float, env, procs: list) -> subprocess.CompletedProcess:
    """quiet_run, with the process listed in PROCS while it runs, so that whoever abandons the
    caller (a probe given up at Ctrl-C) can end it: nothing is left running after RunPilot exits."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=dict(env))
    except OSError as exc:
        return subprocess.CompletedProcess(argv, 127, "", str(exc))
    procs.append(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    finally:
        procs.remove(proc)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def git_facts(folder: str, deadline: float, procs: list | None = None) -> tuple[dict, str] | None:
    """Commit, branch and dirtiness of the work tree holding FOLDER, and its diff (None outside git).

    Commit and branch are read from the repository's files; only the dirtiness and the diff need
    git, and it runs against a sterile copy of the repository's git dir (see _sterile_git_dir).
    """
    found = find_repository(folder)
    if found is None:
        return None
    top, gitdir, common = found
    commit, branch = git_head(gitdir, common)
    facts = {"root": str(top), "commit": commit, "branch": branch, "dirty": None}
    if not commit or commit == "(initial)" or not shutil.which("git"):
        return facts, ""
    import tempfile  # only here: not every start pays for it
    with tempfile.TemporaryDirectory(prefix="runpilot-git-") as tmp:
        sterile = _sterile_git_dir(Path(tmp), gitdir, common, commit)
        status = _sterile_git(["status", "--porcelain=v2", "--untracked-files=normal"], sterile, top, deadline,
                              procs)
        if status.returncode != 0:
            return facts, ""
        facts["dirty"] = bool(status.stdout.strip())
        if not facts["dirty"]:
            return facts, ""
        diff = _sterile_git(["diff", "HEAD", "--no-ext-diff", "--no-textconv", "--no-color"],
                            sterile, top, deadline, procs)
        return facts, diff.stdout if diff.returncode == 0 else ""


class StartProbes:
    """Facts gathered in a background thread while the job starts: the engine's version, the git
    state of mounted folders. They never hold up the run: collect() waits at most until a deadline
    and gives up at once when the caller says to."""

    def __init__(self, engine: str, folders: list[str]) -> None:
        self.engine = engine
        self.folders = folders
        self.deadline = time.monotonic() + GIT_PROBE_SECONDS
        self.facts: dict = {}
        self.diffs: dict[str, str] = {}
        self.procs: list[subprocess.Popen] = []  # git while it runs: ended when the probe is given up
        self.abandoned = False
        self.thread = threading.Thread(target=self._probe, daemon=True)
        self.thread.start()

    def _probe(self) -> None:
        if engine_of(self.engine, "local").runs_in_container:
            self.facts["engine_version"] = engine_of(self.engine).version()
        repos: dict[str, dict] = {}
        for folder in self.folders:
            if self.abandoned:
                return
            found = git_facts(folder, self.deadline, self.procs)
            if found and found[0]["root"] not in repos:
                repos[found[0]["root"]] = found[0]
                self.diffs[found[0]["root"]] = found[1]
        if repos:
            self.facts["git"] = list(repos.values())

    def collect(self, run_dir: Path, give_up: Callable[[], bool]) -> dict:
        """The facts found by the deadline (or until GIVE_UP says so); writes git.diff when small."""
        while self.thread.is_alive() and time.monotonic() < self.deadline and not give_up():
            self.thread.join(timeout=0.05)
        if self.thread.is_alive():
            self.abandoned = True
            for proc in list(self.procs):
                with contextlib.suppress(OSError):
                    proc.kill()
            return {"unfinished": True}
        text = "".join(f"# {root}\n{diff}" for root, diff in self.diffs.items() if diff)
        saved = bool(text) and len(text) <= GIT_DIFF_MAX
        if saved:
            with contextlib.suppress(OSError):
                write_private(run_dir / "git.diff", text.encode("utf-8", "replace"))
        for repo in self.facts.get("git", []):
            repo["diff_saved"] = saved and bool(repo["dirty"])
        return dict(self.facts)


# -- the runner and the job's processes -----------------------------------------------------

def _boot_id() -> str | None:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return None


def process_start(pid: int) -> str | None:
    """Start time of a live process in clock ticks since boot (tells a reused PID apart); None for
    a process that is gone or a zombie (dead, waiting for its parent to notice)."""
    with contextlib.suppress(OSError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else fields[19]
    return None


def hostname() -> str:
    """socket.gethostname() without importing socket: both read the kernel's node name."""
    return os.uname().nodename


def runner_identity() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": hostname(), "boot_id": _boot_id(), "start": process_start(pid)}


def runner_alive(runner: "RunnerState | dict") -> bool | None:
    """Whether the process that runs a run (or a sweep: sweep.json's runner) still exists; None when
    it cannot be told from here."""
    runner = RunnerState.from_data(runner) if isinstance(runner, dict) else runner
    if not runner or runner.host != hostname():
        return None
    if runner.boot_id and runner.boot_id != _boot_id():
        return False  # the machine rebooted since
    pid = runner.pid
    if pid is None or pid <= 0:
        return None
    if runner.start is not None and Path("/proc").is_dir():
        return process_start(pid) == runner.start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftover_job(record: RunRecord, meta: RunMeta) -> bool:
    """Whether the job of a run whose runner died is still alive (container or process group)."""
    return bool(engine_of(record.engine, "local").leftovers(record.id, meta.job))


def local_job_processes(run_id: str, job: dict) -> list[int]:
    """The live processes of a local run's job: every process of its process group (also once the
    group's leader has exited), and every process carrying RUNPILOT_RUN_ID=RUN_ID in its environment
    (a child that left the group; the only trace when meta.json lost the group). A process whose pid
    is the group's id but started at another time means the id was reused: the group is gone."""
    pgid = job.get("pgid") if isinstance(job, dict) else None
    if not isinstance(pgid, int) or pgid <= 1 or process_start(pgid) not in (None, job.get("start")):
        pgid = None
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z" and (int(fields[2]) == pgid or _belongs_to(int(entry), run_id)):
                found.append(int(entry))
    return found


def become_subreaper() -> bool:
    """Adopt the orphans of our children (Linux PR_SET_CHILD_SUBREAPER): a local job's child that
    calls setsid and whose parent exits becomes our child, where the run can still end it."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes  # only here: not every start pays for it
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # 36: PR_SET_CHILD_SUBREAPER
    return False


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                    found.append(int(entry))
    return found


def _belongs_to(pid: int, run_id: str) -> bool:
    with contextlib.suppress(OSError):
        return f"\0RUNPILOT_RUN_ID={run_id}\0".encode() in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
    return False


def end_orphans(run_id: str, grace: float = 2.0) -> int:
    """End the processes of RUN_ID's job that were adopted by this runner (see become_subreaper):
    SIGTERM, then SIGKILL after GRACE seconds. A process is the job's when its environment holds
    the run's RUNPILOT_RUN_ID. Returns how many there were."""
    ended = 0
    for _ in range(20):  # an ended process's own children are adopted next
        orphans = [pid for pid in _children(os.getpid()) if _belongs_to(pid, run_id)]
        if not orphans:
            break
        ended += len(orphans)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in orphans:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5)
            while orphans and time.monotonic() < deadline:
                orphans = [pid for pid in orphans if not _reaped(pid)]
                time.sleep(0.02)
    return ended


def _reaped(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid

# What the runner asks nvidia-smi while a run holds GPUs, and how often by default (--gpu-stats-every).
GPU_STATS_QUERY = "index,uuid,utilization.gpu,memory.used"
GPU_STATS_SECONDS = 10.0
# The job's memory is looked at this often: reading a cgroup file or /proc costs well under a millisecond.
MEMORY_SAMPLE_SECONDS = 1.0
# Below this mean utilization (percent) a run's closing lines say its GPU mostly waited.
LOW_GPU_UTIL = 20.0
GPU_STAT_KEY_RE = re.compile(r"gpu(\d+)\.(util|mem_mib)\Z")


def parse_gpu_stats(text: str) -> list[dict]:
    """Rows of `nvidia-smi --query-gpu=index,uuid,utilization.gpu,memory.used --format=csv,noheader,nounits`;
    a value nvidia-smi cannot give (`[N/A]`, `[Not Supported]`) is None."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) == 4 and cells[0].isdigit():
            util, mem = (metric_value(c) for c in cells[2:])
            # a percent beyond 0..100 or negative memory is no reading (a broken driver, a stand-in)
            rows.append({"index": int(cells[0]), "uuid": cells[1],
                         "util": util if _is_number(util) and 0 <= util <= 100 else None,
                         "mem_mib": mem if _is_number(mem) and mem >= 0 else None})
    return rows


def gpu_stats_sample(rows: list[dict], devices: list[str]) -> dict:
    """The sample of one nvidia-smi answer: gpuN.util and gpuN.mem_mib of the run's DEVICES (indices or
    UUIDs; none named: every GPU), N being nvidia-smi's index."""
    sample = {}
    for row in rows:
        if devices and str(row["index"]) not in devices and row["uuid"] not in devices:
            continue
        for key in ("util", "mem_mib"):
            if row[key] is not None:
                sample[f"gpu{row['index']}.{key}"] = row[key]
    return sample


def summarise_gpu_stats(samples: list[dict]) -> dict[str, dict]:
    """Per GPU index: mean and peak utilization (percent), peak memory used (MiB), number of samples."""
    per_gpu: dict[str, dict] = {}
    for sample in samples:
        for key, value in sample.items():
            match = GPU_STAT_KEY_RE.match(key)
            if match and _is_number(value):
                per_gpu.setdefault(match[1], {"util": [], "mem_mib": []})[match[2]].append(float(value))
    summary = {}
    for index, series in sorted(per_gpu.items(), key=lambda item: int(item[0])):
        util, mem = series["util"], series["mem_mib"]
        summary[index] = {"util_mean": round(sum(util) / len(util), 1) if util else None,
                          "util_peak": max(util) if util else None, "mem_peak_mib": max(mem) if mem else None,
                          "samples": max(len(util), len(mem))}
    return summary


def low_gpu_hint(summary: dict[str, dict]) -> str | None:
    """A hint for a run whose GPUs were mostly idle (by their mean utilization)."""
    idle = [f"GPU {index} {s['util_mean']:g}%" for index, s in summary.items()
            if s.get("util_mean") is not None and s["util_mean"] < LOW_GPU_UTIL]
    if not idle:
        return None
    return (f"the GPU was busy less than {LOW_GPU_UTIL:g}% of the time on average ({', '.join(idle)}): "
            "the job may be bound by data loading or the CPU (more DataLoader workers, pin_memory, "
            "a larger batch)")


def process_group_memory(pgid: int) -> int | None:
    """The resident memory of every process of a process group together, in bytes (Linux /proc)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total, found = 0, False
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if int(fields[2]) == pgid:  # after `pid (comm)`: state, ppid, pgrp, ..., rss is the 22nd
                total += int(fields[21]) * page
                found = True
    return total if found else None


def cgroup_memory_files(pid: int) -> list[Path]:
    """The files holding the peak (and else the current) memory of PID's cgroup, cgroup v2 or v1."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return []
    files = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            files += [Path("/sys/fs/cgroup" + path) / name for name in ("memory.peak", "memory.current")]
        elif "memory" in controllers.split(","):
            files += [Path("/sys/fs/cgroup/memory" + path) / name
                      for name in ("memory.max_usage_in_bytes", "memory.usage_in_bytes")]
    return [f for f in files if f.is_file()]


class MemoryProbe:
    """The job's memory now (or its peak so far, where the kernel keeps one): the container's cgroup
    (found through the engine once the container runs), or the local job's process group."""

    def __init__(self, engine: str, container: str | None, pgid: int | None) -> None:
        self.engine, self.container, self.pgid = engine, container, pgid
        self.files: list[Path] | None = None
        self.source = "container" if container else "process group"

    def __call__(self) -> int | None:
        if self.container is None:
            return process_group_memory(self.pgid) if self.pgid else None
        if not self.files:
            done = quiet_run([engine_of(self.engine).program, "inspect", "--format", "{{.State.Pid}}",
                              self.container], timeout=10)
            pid = done.stdout.strip()
            self.files = cgroup_memory_files(int(pid)) if done.returncode == 0 and pid.isdigit() and pid != "0" \
                else None
        for path in self.files or []:
            with contextlib.suppress(OSError, ValueError):
                return int(path.read_text().split()[0])
        return None


class UsageSampler:
    """What the job used, sampled on a thread of its own so the tee loop never waits for it:
    the run's GPUs through one nvidia-smi call per interval (written to gpu.json as samples
    `gpuN.util`, `gpuN.mem_mib` whose step is the second of the run), and the job's memory every
    second (its peak)."""

    def __init__(self, gpu_log: MetricLog | None, smi: list[str] | None, devices: list[str], interval: float,
                 memory: Callable[[], int | None]) -> None:
        self.gpu_log, self.smi, self.devices, self.interval = gpu_log, smi, devices, interval
        self.memory = memory
        self.peak_memory: int | None = None
        self.gpu_errors: list[str] = []
        self.stopping = threading.Event()
        self.writing = threading.Lock()   # gpu.json is closed by stop(), never while a sample is written
        self.thread = threading.Thread(target=self._run, name="runpilot-usage", daemon=True)

    def start(self) -> "UsageSampler":
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling and close gpu.json; a hung nvidia-smi does not hold the run's end."""
        self.stopping.set()
        self.thread.join(timeout=1.0)
        with self.writing:
            if self.gpu_log is not None:
                self.gpu_log.close()

    def _run(self) -> None:
        started = time.monotonic()
        next_gpu = started
        while True:
            self._sample_memory()
            now = time.monotonic()
            if self.smi and now >= next_gpu:
                self._sample_gpus(round(now - started))
                next_gpu = max(next_gpu + self.interval, time.monotonic())
            wait = min(MEMORY_SAMPLE_SECONDS, next_gpu - time.monotonic()) if self.smi else MEMORY_SAMPLE_SECONDS
            if self.stopping.wait(max(0.01, wait)):
                break
        self._sample_memory()

    def _sample_memory(self) -> None:
        with contextlib.suppress(OSError):
            used = self.memory()
            if used is not None and (self.peak_memory is None or used > self.peak_memory):
                self.peak_memory = used

    def _sample_gpus(self, second: int) -> None:
        assert self.smi is not None and self.gpu_log is not None
        try:
            done = subprocess.run(self.smi, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  errors="replace", timeout=max(5.0, self.interval))  # garbage stays text
        except (OSError, subprocess.SubprocessError) as exc:
            self.gpu_errors.append(str(exc))
            return
        sample = gpu_stats_sample(parse_gpu_stats(done.stdout), self.devices) if done.returncode == 0 else {}
        if not sample:
            self.gpu_errors.append(f"nvidia-smi exit {done.returncode}: {(done.stdout + done.stderr).strip()[:200]}")
            return
        pairs = " ".join(f"{k}={v}" for k, v in sample.items())
        with self.writing:
            if not self.stopping.is_set():
                self.gpu_log.add_lines([f"METRIC step={second} {pairs}".encode()])


# -- the files of a code folder: git's view in a work tree, else .runpilotignore's ------------

class IgnoreRules:
    """The common subset of gitignore syntax, read from a `.runpilotignore`.

    Supported: blank lines and `#` comments; `*` (any characters but `/`), `?` (one character
    but `/`), `[abc]` and `[!a-z]` classes; `**` as a whole path component (`**/x`, `x/**`,
    `a/**/b`); a `/` at the start or in the middle anchors a pattern to the folder, else it
    matches at any depth; a trailing `/` matches folders only; `!` re-includes what an earlier
    line excluded (not inside an excluded folder, as in git); `\\` quotes the next character.
    The last matching line decides.
    """

    def __init__(self, text: str = "") -> None:
        self.rules: list[tuple[re.Pattern, bool, bool]] = []   # (pattern, negated, folders only)
        for line in text.splitlines():
            line = line.rstrip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            line = line[1:] if negated else line
            dir_only = line.endswith("/")
            line = line.rstrip("/")
            if line:
                self.rules.append((re.compile(_ignore_regex(line)), negated, dir_only))

    def ignored(self, path: str, is_dir: bool) -> bool:
        """Whether PATH (relative, `/`-separated) is excluded."""
        verdict = False
        for pattern, negated, dir_only in self.rules:
            if (is_dir or not dir_only) and pattern.match(path):
                verdict = not negated
        return verdict


def _ignore_regex(pattern: str) -> str:
    """One gitignore pattern (without `!` and trailing `/`) as a regular expression for a whole path."""
    anchored = "/" in pattern
    pattern = pattern.removeprefix("/")
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i) and (i == 0 or pattern[i - 1] == "/"):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i) and i + 2 == len(pattern) and (i == 0 or pattern[i - 1] == "/"):
            out.append(".*")
            i += 2
            continue
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if char == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
            continue
        out.append("[^/]*" if char == "*" else "[^/]" if char == "?" else re.escape(char))
        i += 1
    return ("" if anchored else "(?:.*/)?") + "".join(out) + r"\Z"


def read_ignore_rules(folder: Path) -> IgnoreRules:
    try:
        return IgnoreRules((folder / ".runpilotignore").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return IgnoreRules()


def walk_code_files(folder: Path, rules: IgnoreRules) -> list[str]:
    """Every file and symlink under FOLDER (relative paths), but what RULES exclude and `.git`."""
    found = []
    for top, dirs, files in os.walk(folder, onerror=_walk_error):
        rel_top = os.path.relpath(top, folder)
        prefix = "" if rel_top == "." else rel_top.replace(os.sep, "/") + "/"
        keep = []
        for name in sorted(dirs):
            path = Path(top, name)
            if path.is_symlink():
                if not rules.ignored(prefix + name, False):
                    found.append(prefix + name)
            elif name != ".git" and not rules.ignored(prefix + name, True):
                keep.append(name)
        dirs[:] = keep
        found += [prefix + name for name in sorted(files) if not rules.ignored(prefix + name, False)]
    return found


def _walk_error(exc: OSError) -> None:
    raise SnapshotError(f"cannot read {exc.filename}: {exc.strerror}; fix its permissions, or list it in "
                        ".runpilotignore")


def git_code_files(folder: Path) -> list[str] | None:
    """The tracked and untracked-but-not-ignored files under FOLDER, as git sees them (run against a
    sterile git dir, see _sterile_git_dir); None outside a work tree or when git cannot tell."""
    found = find_repository(str(folder))
    if found is None or not shutil.which("git"):
        return None
    top, gitdir, common = found
    commit, _ = git_head(gitdir, common)
    if not commit or commit == "(initial)":
        return None
    import tempfile  # only here: not every start pays for it
    with tempfile.TemporaryDirectory(prefix="runpilot-git-") as tmp:
        sterile = _sterile_git_dir(Path(tmp), gitdir, common, commit)
        listed = _sterile_git(["-C", str(folder), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                              sterile, top, time.monotonic() + GIT_PROBE_SECONDS * 3)
    if listed.returncode != 0:
        return None
    return sorted({path for path in listed.stdout.split("\0") if path})


def code_files(folder: Path) -> tuple[list[str], str]:
    """The files a snapshot of FOLDER records, and who listed them: git, or a walk of the folder;
    `.runpilotignore` excludes files in both cases."""
    rules = read_ignore_rules(folder)
    listed = git_code_files(folder)
    if listed is None:
        return walk_code_files(folder, rules), "files"
    kept = []
    for path in listed:
        parts = path.split("/")
        if not any(rules.ignored("/".join(parts[:i]), True) for i in range(1, len(parts))) and \
                not rules.ignored(path, False):
            kept.append(path)
    return kept, "git"

# ==== 13. Process I/O: the terminal, the tee loop, signals, stopping the job ===

def terminal_writer(stream) -> Callable[[bytes], object] | None:
    """Write raw bytes to a text stream's file descriptor (or decoded, for an in-memory stream)."""
    if stream is None:
        return None
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return lambda chunk: stream.write(chunk.decode("utf-8", "replace"))
    with contextlib.suppress(OSError, ValueError):
        stream.flush()
    return lambda chunk: write_all(fd, chunk)


def _same_file(a, b) -> bool:
    """Whether two streams write to the same place (then their lines share one screen)."""
    if a is b:
        return True
    try:
        sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def visible(text: str) -> str:
    """Text safe to print: control characters (escape codes, bidi overrides) shown as escapes."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class _Writer:
    """A thread that writes queued bytes to one destination, so the caller never waits on it."""

    def __init__(self, write: Callable[[bytes], object] | None) -> None:
        self.write = write
        self.queue: list[tuple[bool, bytes]] = []
        self.pending = 0
        self.ends_line = True
        self.cond = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def put(self, data: bytes, own_line: bool = False) -> None:
        """Queue DATA; OWN_LINE data starts on a fresh line of this destination."""
        with self.cond:
            if self.write is not None:
                self.queue.append((own_line, data))
                self.pending += len(data)
                if len(self.queue) == 1:  # the thread only sleeps on an empty queue
                    self.cond.notify_all()

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.queue)
                batch, self.queue = self.queue, []
                write = self.write
            data = self._join(batch)
            try:
                if write is not None:
                    write(data)
            except (OSError, ValueError):  # the reader is gone: keep running, stop writing there
                self.abandon()
            with self.cond:
                self.pending = max(0, self.pending - sum(len(chunk) for _, chunk in batch))
                self.cond.notify_all()

    def _join(self, batch: list[tuple[bool, bytes]]) -> bytes:
        """Everything queued as one write: a thread hand-off per read of the job costs more than the write."""
        parts = []
        for own_line, data in batch:
            if own_line and not self.ends_line:  # RunPilot's own line after a partial line of the job
                parts.append(b"\n")
            parts.append(data)
            if data:
                self.ends_line = data.endswith(b"\n")
        return b"".join(parts)

    def wait(self, predicate, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def abandon(self) -> None:
        with self.cond:
            self.write = None
            self.queue.clear()
            self.pending = 0
            self.cond.notify_all()


class Terminal:
    """Where a run's output goes: the job's bytes as they come, and RunPilot's own lines.

    Threads do the writing, one per destination, so a reader that stops reading (a full pipe,
    a pager) never holds up the clock or the signals; the tee stops reading the job while too
    much is waiting (the job then waits, as it would writing to that terminal itself). A closed
    output is dropped quietly. RunPilot's lines always start on a fresh line of the screen.
    """

    def __init__(self, stdout, stderr) -> None:
        err = _Writer(terminal_writer(stderr))
        shared = stdout is not None and stderr is not None and _same_file(stdout, stderr)
        self.writers = {1: err if shared else _Writer(terminal_writer(stdout)), 2: err}

    def job_output(self, which: int, chunk: bytes) -> None:
        self.writers[which].put(chunk)

    def say(self, line: str) -> None:
        """One line of RunPilot's own (prefixed `runpilot: `) on stderr, control codes made visible."""
        self.writers[2].put(("runpilot: " + visible(line) + "\n").encode("utf-8", "replace"), own_line=True)

    def backlog(self) -> int:
        return max(w.pending for w in self.writers.values())

    def wait_for_room(self, timeout: float) -> None:
        stalled = max(self.writers.values(), key=lambda w: w.pending)
        stalled.wait(lambda: stalled.pending < TERMINAL_BACKLOG, timeout)

    def drain(self, timeout: float) -> bool:
        """Wait until everything queued is written; False if a reader is still behind."""
        deadline = time.monotonic() + timeout
        return all(w.wait(lambda w=w: not w.queue and w.pending == 0, max(0.0, deadline - time.monotonic()))
                   for w in set(self.writers.values()))

    def abandon(self, stalled_only: bool = False) -> None:
        """Write nothing more (to the stalled destinations only, if asked): logs.txt has it all."""
        for writer in set(self.writers.values()):
            if not stalled_only or writer.pending >= TERMINAL_BACKLOG:
                writer.abandon()


@dataclass
class Launch:
    """How to start one job: the argv, its full environment, and how to stop it."""

    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    engine: str
    container: str | None = None      # container name; None for engine `local`
    env_file: bytes = b""             # the engine's --env-file, handed over through a pipe
    run_id: str = ""
    devices: tuple[str, ...] = ()     # the GPUs the run was placed on
    stop_signal: str | None = None    # the config's stop_signal: sent on every stop instead
    check_writes: bool = False        # run without --rm; diff the container after the job (--check-writes)


def _grow_pipe(fd: int, size: int = PIPE_SIZE) -> None:
    """Ask Linux for a bigger pipe buffer (fewer wake-ups for a loud job); fine if refused."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)


def env_file_pipe(data: bytes) -> int:
    """A pipe holding DATA whole, for the engine CLI to read as /dev/fd/N; returns its read end."""
    read_fd, write_fd = os.pipe()
    try:
        _grow_pipe(write_fd, max(len(data), 4096))
        if len(data) > fcntl.fcntl(write_fd, fcntl.F_GETPIPE_SZ):
            raise ConfigError(f"the job's environment is {len(data)} bytes, more than a pipe can hand "
                              "to the engine at once; make the env values smaller")
        write_all(write_fd, data)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return read_fd


class Job:
    """A started job: the engine CLI (or the local process) in its own process group."""

    def __init__(self, launch: Launch, stop_timeout: float) -> None:
        self.launch = launch
        self.stop_timeout = stop_timeout
        self.helpers: list[subprocess.Popen] = []
        self.kill_at: float | None = None
        self.first_stop = 0.0
        self.last_stop = 0.0
        self.forced = False
        self.sent = 0                     # the last signal sent to the job
        argv, fds = launch.argv, ()
        env_fd = env_file_pipe(launch.env_file) if engine_of(launch.engine).runs_in_container else None
        try:
            if env_fd is not None:
                argv = [f"/dev/fd/{env_fd}" if a == "/dev/fd/ENV" else a for a in argv]
                fds = (env_fd,)
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=launch.env, cwd=launch.cwd, start_new_session=True, pass_fds=fds)
        finally:
            if env_fd is not None:
                os.close(env_fd)
        for pipe in (self.proc.stdout, self.proc.stderr):
            _grow_pipe(pipe.fileno())

    def request_stop(self, force: bool, sig: int = signal.SIGTERM) -> int:
        """Signal SIG to the job (through the engine), SIGKILL after the grace period (or at once
        if FORCE); returns the signal the job got (the config's stop_signal wins over SIG).

        Asking again without force changes nothing: the grace period holds.
        """
        if self.first_stop and not force:
            return self.sent
        sig = signal.Signals[self.launch.stop_signal] if self.launch.stop_signal else sig
        self.forced = self.forced or force
        self.sent = signal.SIGKILL if force else sig
        self.last_stop = time.monotonic()
        self.first_stop = self.first_stop or self.last_stop
        self.kill_at = self.last_stop if force else self.last_stop + self.stop_timeout
        engine_of(self.launch.engine).stop(self, self.sent)
        return self.sent

    def tick(self) -> None:
        """SIGKILL a job that outlives its grace period; retry a signal sent before the container
        existed (its `kill` failed), but never send the job its stop signal twice."""
        now = time.monotonic()
        if not self.first_stop or self.proc.poll() is not None:
            return
        engine = engine_of(self.launch.engine)
        if not engine.runs_in_container:  # a signal to a process group cannot fail to arrive
            if self.kill_at is not None and now >= self.kill_at:
                engine.stop(self, signal.SIGKILL)
                self.kill_at = None
            return
        if now - self.last_stop <= 2 or any(h.poll() is None for h in self.helpers):
            return
        failed = bool(self.helpers) and self.helpers[-1].returncode != 0
        if self.kill_at is not None and now >= self.kill_at:
            self.sent, self.last_stop = signal.SIGKILL, now
            engine.stop(self, signal.SIGKILL)
        elif failed:
            self.last_stop = now
            engine.stop(self, self.sent)

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def end_leftovers(self) -> None:
        """Nothing the job started outlives its run (a local job's process group and orphans)."""
        engine_of(self.launch.engine).end_job(self)

    def reap_helpers(self) -> None:
        for helper in self.helpers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                helper.wait(timeout=self.stop_timeout + 15)

    def close_pipes(self) -> None:
        for pipe in (self.proc.stdout, self.proc.stderr):
            pipe.close()


class StopSignals:
    """Records SIGINT/SIGTERM/SIGHUP while a run is live; the loop acts on them.

    Used as a context manager in the main thread it installs the handlers; a plain instance is a
    mailbox that a sweep fills for each of its runs.
    """

    HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: list[int] = []
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.HANDLED:
            old = signal.getsignal(sig)
            if sig == signal.SIGHUP and old == signal.SIG_IGN:
                continue  # started under nohup: the user asked the run to survive a hang-up
            self.previous[sig] = old
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self.previous.items():
            signal.signal(sig, old)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame) -> None:
        self.received.append(signum)


def job_exit_code(returncode: int) -> int:
    """A shell's spelling of how the job ended: a local process killed by signal N is 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def signal_name(signum: int, job: bool = False) -> str:
    """How a message names a signal: the one RunPilot got (Ctrl-C), or the one the JOB got (SIGINT)."""
    return "Ctrl-C" if signum == signal.SIGINT and not job else signal.Signals(signum).name


def job_stop_signal(received: int) -> int:
    """The signal a job gets when RunPilot gets RECEIVED: Ctrl-C stays SIGINT (as `docker run`
    forwards it, so `except KeyboardInterrupt:` runs); SIGTERM and SIGHUP become SIGTERM (as
    `docker stop`). A config's stop_signal overrides both (Job.request_stop)."""
    return signal.SIGINT if received == signal.SIGINT else signal.SIGTERM


@dataclass
class TeeResult:
    """What happened while the job ran."""

    returncode: int | None              # None: the job never started
    stop_reason: str | None = None      # INTERRUPTED, TIMEOUT or FAILED (the disk)
    stop_signal: int | None = None
    log_error: OSError | None = None
    killed: str | None = None           # after a stop: `by a second Ctrl-C`, `after its grace period of 10s`
    job_signal: int | None = None       # the signal the job got when it was asked to stop
    prefixed_metric: bool = False       # output had METRIC after a prefix: finish() counts and says so
    unmounted_writes: list | None = None  # --check-writes: [(path, bytes)] the job left in its container
    damaged_events: int = 0             # metrics_from event files whose reading a failed CRC stopped


class Tee:
    """Copies the job's stdout/stderr to the terminal and logs.txt and feeds METRIC lines on.

    The loop follows subprocess.Popen._communicate: a selector over both pipes, os.read of
    large chunks, bytes all the way, unregister on EOF. It runs until the pipes are closed and
    the job has exited, looking after signals and the timeout all along, whatever the job does
    with its output and however slowly the terminal reads.
    """

    def __init__(self, log_fd: int, metrics: MetricLog, terminal: Terminal | None,
                 report: Reporter, run_id: str) -> None:
        self.log_fd = log_fd
        self.metrics = metrics
        self.terminal = terminal
        self.report = report
        self.run_id = run_id
        self.log_error: OSError | None = None

    def run(self, job: Job, signals: StopSignals, timeout: float | None) -> TeeResult:
        """Tee until both pipes close and the job has exited; act on signals, timeout, full disk."""
        self.job, self.signals, self.result = job, signals, TeeResult(returncode=0)
        self.deadline = time.monotonic() + timeout if timeout else None
        self.handled, self.exited_at = 0, None
        sel = selectors.DefaultSelector()
        scanners = {}
        for which, pipe in ((1, job.proc.stdout), (2, job.proc.stderr)):
            scanners[pipe.fileno()] = (which, MetricScanner())
            sel.register(pipe.fileno(), selectors.EVENT_READ)
        next_check = 0.0
        while sel.get_map() or job.proc.poll() is None:
            events = self._wait(sel)
            for key, _ in events:
                self._pump(sel, key.fd, *scanners[key.fd])
            now = time.monotonic()
            if events and now < next_check and len(signals.received) == self.handled:
                continue  # output is flowing: look after the rest a few times a second, not per read
            next_check = now + HOUSEKEEPING_SECONDS
            self._look_after(sel, now)
        for _, scanner in scanners.values():
            self.metrics.add_lines(scanner.finish())
            self.metrics.malformed += scanner.overlong
            self.result.prefixed_metric |= scanner.prefixed
        self.metrics.finish_sources()
        self.result.damaged_events = sum(watcher.corrupt for watcher in self.metrics.watchers)
        sel.close()
        self.result.returncode = job.proc.returncode
        self.result.log_error = self.log_error
        if job.forced:
            self.result.killed = "by a second Ctrl-C" if self.result.stop_signal else "by Ctrl-C"
        elif job.first_stop and job_exit_code(job.proc.returncode) == 128 + signal.SIGKILL:
            self.result.killed = f"after its grace period of {job.stop_timeout:g}s"
        return self.result

    def _wait(self, sel) -> list:
        """Ready pipes; or, while the terminal is behind or the pipes are closed, a short wait."""
        if not sel.get_map():  # the job closed its output, or the engine CLI is finishing
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.job.proc.wait(timeout=POLL_SECONDS / 4)
            return []
        if self.terminal is not None and self.terminal.backlog() >= TERMINAL_BACKLOG:
            self.terminal.wait_for_room(POLL_SECONDS)
            return []
        return sel.select(POLL_SECONDS)

    def _look_after(self, sel, now: float) -> None:
        """Signals, the timeout, a full disk, an ignored stop, pipes held by an orphan."""
        job, result = self.job, self.result
        self._on_signals()
        if self.deadline and result.stop_reason is None and now > self.deadline:
            result.stop_reason = TIMEOUT
            sent = job.request_stop(force=False)
            result.job_signal = sent
            self.report(RunEvent("stopping", self.run_id, f"run {self.run_id} hit its timeout; stopping it "
                                 f"({self._grace(sent)})"))
        self.log_error = self.log_error or self.metrics.error
        if self.log_error and result.stop_reason is None:
            result.stop_reason = FAILED
            job.request_stop(force=False)
        if result.stop_reason and self.terminal is not None and self.terminal.backlog() >= TERMINAL_BACKLOG:
            self.terminal.abandon(stalled_only=True)  # a stalled reader must not hold a stopping job's output
        self.metrics.poll_sources(now)
        job.tick()
        self._drop_orphan_pipes(sel)

    def _pump(self, sel, fd: int, which: int, scanner: MetricScanner) -> None:
        chunk = os.read(fd, READ_SIZE)
        if not chunk:
            sel.unregister(fd)
            return
        if self.terminal is not None:
            self.terminal.job_output(which, chunk)
        self._to_log(chunk)
        lines = scanner.feed(chunk)
        if lines:
            self.metrics.add_lines(lines)
        if self.metrics.lines is not None:
            self.metrics.feed_sources(which, chunk)
        if len(chunk) < READ_SIZE // 4:
            time.sleep(FILL_PAUSE)  # let the pipe fill: fewer, larger reads cost less CPU per byte

    def _to_log(self, chunk: bytes) -> None:
        if self.log_error is None:
            try:
                write_all(self.log_fd, chunk)
            except OSError as exc:
                self.log_error = exc

    def _on_signals(self) -> None:
        """The first signal stops the job gracefully; a second Ctrl-C kills it. Further SIGTERMs
        and SIGHUPs (two `runpilot stop` at once, say) change nothing: the grace period holds.
        A job already being stopped for its timeout (or a full disk) keeps that reason: Ctrl-C
        then kills it now, as a second one would."""
        for signum in self.signals.received[self.handled:]:
            if self.result.stop_signal is None and self.result.stop_reason is None:
                self.result.stop_reason, self.result.stop_signal = INTERRUPTED, signum
                sent = self.job.request_stop(force=False, sig=job_stop_signal(signum))
                self.result.job_signal = sent
                grace = self._grace(sent)
                again = "; press Ctrl-C again to kill it now" if signum == signal.SIGINT else ""
                self.report(RunEvent("stopping", self.run_id,
                                     f"stopping run {self.run_id} ({signal_name(signum)}): {grace}{again}"))
            elif signum == signal.SIGINT:
                if not self.job.forced:
                    self.report(RunEvent("stopping", self.run_id, f"killing run {self.run_id} now (SIGKILL)"))
                self.job.request_stop(force=True)
        self.handled = len(self.signals.received)

    def _grace(self, sent: int) -> str:
        """What every stop says: `the job got SIGINT and has 10s to exit`."""
        return f"the job got {signal_name(sent, job=True)} and has {self.job.stop_timeout:g}s to exit"

    def _drop_orphan_pipes(self, sel) -> None:
        """A background child of a local job can hold the pipes open after the job exits."""
        if self.job.proc.poll() is None or not sel.get_map():
            return
        self.exited_at = self.exited_at or time.monotonic()
        if time.monotonic() - self.exited_at > 2:
            self.job.end_leftovers()
            for fd in list(sel.get_map()):
                sel.unregister(fd)

# ==== 14. The run store: run folders and the sqlite index ====================

@dataclass(frozen=True)
class RunFolder:
    """One run's folder, `<home>/runs/<run_id>/`: the only place that knows the names of its files."""

    path: Path

    @property
    def run_id(self) -> str:
        return self.path.name

    config = property(lambda self: self.path / "config.yaml")
    logs = property(lambda self: self.path / "logs.txt")
    metrics = property(lambda self: self.path / "metrics.json")
    sample_times = property(lambda self: self.path / "metrics.times")  # `count seconds` per write of samples
    meta_file = property(lambda self: self.path / "meta.json")
    git_diff = property(lambda self: self.path / "git.diff")
    batch_script = property(lambda self: self.path / "slurm.sh")        # --on slurm: what sbatch ran
    program = property(lambda self: self.path / "runpilot.py")          # --on slurm: what the node runs
    reserve = property(lambda self: self.path / ".reserve")             # space kept for the final record
    gpu_stats = property(lambda self: self.path / "gpu.json")           # samples of gpuN.util, gpuN.mem_mib

    def tensorboard_events(self, start: float) -> Path:
        """The event file of config `tensorboard: true` (TensorBoard reads files named *tfevents*)."""
        return self.path / f"events.out.tfevents.{int(start)}.runpilot"
    outputs = property(lambda self: self.path / "outputs")              # $RUNPILOT_OUTPUT_DIR: what the job keeps
    code = property(lambda self: self.path / "code")                    # the run's copy of its code snapshot

    def read_meta(self) -> RunMeta:
        """The run's meta.json, never raising: a missing or corrupt file is a problem on the result."""
        try:
            return RunMeta.from_json(read_json_file(self.meta_file), self.run_id)
        except FileNotFoundError:
            meta = RunMeta(self.run_id)
            meta.problems.append("meta.json is missing")
        except (OSError, ValueError) as exc:
            meta = RunMeta(self.run_id)
            meta.problems.append(f"meta.json cannot be read ({exc})")
        return meta

    def write_meta(self, meta: RunMeta, durable: bool = True) -> None:
        """Replace meta.json whole; on a full disk, free the space set aside for this and retry."""
        try:
            write_atomic(self.meta_file, meta.to_json(), durable)
        except OSError:
            if not self.free_reserve():
                raise
            write_atomic(self.meta_file, meta.to_json(), durable)

    def set_aside_space(self) -> None:
        """Keep RESERVE_BYTES of disk for the final meta.json and index row (see write_meta)."""
        with contextlib.suppress(OSError):
            write_private(self.reserve, b"\0" * RESERVE_BYTES)

    def free_reserve(self) -> bool:
        try:
            os.unlink(self.reserve)
            return True
        except OSError:
            return False


@dataclass(frozen=True)
class SweepFolder:
    """One sweep's folder, `<home>/sweeps/<sweep_id>/`: the only place that knows the names of its files."""

    path: Path

    @property
    def sweep_id(self) -> str:
        return self.path.name

    plan = property(lambda self: self.path / "sweep.json")              # the plan: points, options (Sweep)
    stop_requests = property(lambda self: self.path / "stop")           # `runpilot stop RUN_ID` of one point
    runner_lock = property(lambda self: self.path / "runner.lock")      # flocked by the one runner (hold_sweep)
    program = property(lambda self: self.path / "runpilot.py")          # --on slurm: what the nodes run
    run_list = property(lambda self: self.path / "runs.txt")            # --on slurm: a run folder per array task
    batch_script = property(lambda self: self.path / "slurm.sh")        # --on slurm: what sbatch ran
    task_output = property(lambda self: self.path / "slurm-%A_%a.out")  # --on slurm: sbatch's --output pattern

    @staticmethod
    def is_run_list(path: Path) -> bool:
        """Whether PATH names a sweep's runs.txt (the node's `_slurm-job TARGET`)."""
        return path.name == "runs.txt"


SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    status       TEXT NOT NULL,
    started_at   TEXT NOT NULL,
    finished_at  TEXT,
    exit_code    INTEGER,
    path         TEXT NOT NULL,
    duration     REAL,
    engine       TEXT,
    image        TEXT,
    last_metrics TEXT NOT NULL DEFAULT '{}',
    tags         TEXT NOT NULL DEFAULT '{}',
    metric_names TEXT NOT NULL DEFAULT '[]',
    sweep_id     TEXT,
    reason       TEXT,
    runner       TEXT NOT NULL DEFAULT '{}',
    backend      TEXT NOT NULL DEFAULT 'here',
    backend_ref  TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_duration ON runs(duration);
CREATE INDEX IF NOT EXISTS runs_by_start ON runs(started_at);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs(status, started_at);
CREATE INDEX IF NOT EXISTS runs_by_name ON runs(name, started_at);
CREATE INDEX IF NOT EXISTS runs_by_sweep ON runs(sweep_id, started_at);
CREATE INDEX IF NOT EXISTS runs_by_backend ON runs(backend, status);
"""
RUN_COLUMNS = ("id", "name", "status", "started_at", "finished_at", "exit_code", "path", "duration", "engine",
               "image", "last_metrics", "tags", "metric_names", "sweep_id", "reason", "runner", "backend",
               "backend_ref")
# Version 3 (RunPilot 0.5) kept no path, and its Slurm job in a column of its own: its rows carry over.
MIGRATE_FROM_3 = """
INSERT INTO runs ({columns})
SELECT id, name, status, started_at, finished_at, exit_code, ? || '/' || id, duration, engine, image,
       last_metrics, tags, metric_names, sweep_id, reason, runner,
       CASE WHEN slurm_job IS NOT NULL THEN 'slurm' WHEN NOT json_valid(runner) THEN 'here'
            ELSE coalesce(json_extract(runner, '$.backend'), 'here') END,
       coalesce(slurm_job, CASE WHEN json_valid(runner) THEN json_extract(runner, '$.box') END)
FROM runs_v3
"""
JSON_COLUMNS = ("last_metrics", "tags", "metric_names", "runner")


def iso_utc(when: _dt.datetime) -> str:
    """ISO 8601 UTC with milliseconds (`2026-11-28T22:47:05.123Z`); sorts as text in time order."""
    return when.astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now() -> str:
    return iso_utc(_dt.datetime.now(_dt.timezone.utc))


def parse_time(text: str) -> _dt.datetime:
    return _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def new_run_id(now: _dt.datetime | None = None) -> str:
    """`YYYYMMDD-HHMMSS-xxxxxx`: sorts by start time; 24 random bits tell parallel starts apart."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}-{os.urandom(3).hex()}"


def short_id(run_id: str) -> str:
    """The last six hex digits of a run id: what tables show, and what every command accepts."""
    return run_id.rsplit("-", 1)[-1] if RUN_ID_RE.match(run_id) else run_id


def check_run_id(run_id: str) -> str:
    """A run id as the store names folders; anything else (../x, an absolute path) is refused."""
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id):
        raise UsageError(f"{run_id!r} is not a run id; run ids look like 20261128-224705-a3f9c1")
    return run_id


@dataclass
class RunFilter:
    """What `list`, `gc` and friends ask of the index (filtering and sorting happen in SQL)."""

    status: str | None = None
    name_glob: str | None = None
    since: str | None = None           # ISO time
    before: str | None = None          # ISO time
    tags: dict = field(default_factory=dict)
    sweep_id: str | None = None
    sort: str = "started"              # started, duration, or a metric name
    ascending: bool = False
    limit: int | None = None
    keep_newest: int | None = None     # gc: leave the N newest runs out
    final_only: bool = False           # gc: never a queued or running run

    def sql(self) -> tuple[str, tuple, str]:
        where, params = [], []
        for clause, value in (("status = ?", self.status), ("name GLOB ?", self.name_glob),
                              ("started_at >= ?", self.since), ("started_at < ?", self.before),
                              ("sweep_id = ?", self.sweep_id)):
            if value is not None:
                where.append(clause)
                params.append(value)
        for key, value in self.tags.items():
            where.append("json_extract(tags, ?) = ?")
            params += [f'$."{key}"', value]
        if self.final_only:
            where.append(f"status NOT IN ({', '.join('?' for _ in ACTIVE_STATUSES)})")
            params += ACTIVE_STATUSES
        if self.keep_newest is not None:
            where.append("id NOT IN (SELECT id FROM runs ORDER BY started_at DESC LIMIT ?)")
            params.append(max(0, self.keep_newest))
        order = self._order(params)  # it may add the metric's parameters
        return " AND ".join(where), tuple(params), order

    def _order(self, params: list) -> str:
        direction = "ASC" if self.ascending else "DESC"
        if self.sort == "started":
            return f"started_at {direction}"
        if self.sort == "duration":
            return f"duration IS NULL, duration {direction}, started_at DESC"
        if METRIC_KEY_RE.match(self.sort):
            params += [f'$."{self.sort}"'] * 2
            return f"json_extract(last_metrics, ?) IS NULL, json_extract(last_metrics, ?) {direction}, started_at DESC"
        raise UsageError(f"--sort {self.sort!r}: use started, duration or a metric name")


class RunStore:
    """`<home>/runs/<id>/` folders (the truth) and `<home>/runs.db` (an index rebuilt from them).

    An index that cannot be written when a run records itself (locked past the timeout, full,
    damaged) is not fatal: the run leaves a marker in `<home>/pending/` and every later use of
    the index first catches up from those runs' folders. With write_index=False (a job on a
    Slurm node, where SQLite's locks are not safe) only the run folders are written.
    """

    def __init__(self, home: Path, db_timeout: float = DB_TIMEOUT, write_index: bool = True,
                 note: Callable[[str], None] = lambda text: None) -> None:
        self.home = home
        self.runs_dir = home / "runs"
        self.sweeps_dir = home / "sweeps"
        self.pending_dir = home / "pending"
        self.db_path = home / "runs.db"
        self.db_timeout = db_timeout
        self.write_index = write_index
        self.note = note   # told what the store did on its own (a damaged index set aside)
        self.index_busy_until = 0.0  # see save_or_defer

    @classmethod
    def default(cls, environ=os.environ, note: Callable[[str], None] = lambda text: None) -> "RunStore":
        home = environ.get("RUNPILOT_HOME") or os.path.join(os.path.expanduser("~"), ".runpilot")
        try:
            timeout = float(environ.get("RUNPILOT_DB_TIMEOUT") or DB_TIMEOUT)
        except ValueError:
            timeout = DB_TIMEOUT
        return cls(Path(home).absolute(), timeout if math.isfinite(timeout) and timeout >= 0 else DB_TIMEOUT,
                   note=note)

    # -- folders ------------------------------------------------------------
    def ensure(self) -> None:
        try:
            make_private_dirs(self.runs_dir)
        except OSError as exc:
            raise StoreError(f"cannot create {exc.filename or self.runs_dir}: {exc.strerror}; "
                             "set RUNPILOT_HOME to a writable folder") from exc

    def folder(self, run_id: str) -> RunFolder:
        return RunFolder(self.runs_dir / check_run_id(run_id))

    def sweep_folder(self, sweep_id: str) -> SweepFolder:
        """The folder of sweep SWEEP_ID (checked by the caller: see check_sweep_id)."""
        return SweepFolder(self.sweeps_dir / sweep_id)

    def sweep_names(self) -> list[str]:
        """The names under sweeps/ that are sweep ids (raises OSError, FileNotFoundError without sweeps/)."""
        return [p.name for p in self.sweeps_dir.iterdir() if SWEEP_ID_RE.match(p.name)]

    def sweep_folders(self) -> list[SweepFolder]:
        """Every folder under sweeps/ that holds a plan (sweep.json), in name order."""
        if not self.sweeps_dir.is_dir():
            return []
        return [f for p in sorted(self.sweeps_dir.iterdir()) if (f := SweepFolder(p)).plan.is_file()]

    def create_run_dir(self, wanted: str | None = None) -> RunFolder:
        """A fresh, exclusively created folder (safe under parallel starts)."""
        self.ensure()
        for _ in range(100):
            folder = self.folder(wanted or new_run_id())
            try:
                folder.path.mkdir(mode=0o700)
                return folder
            except FileExistsError:
                if wanted:
                    raise StoreError(f"run {wanted} exists already") from None
            except OSError as exc:
                raise StoreError(f"cannot create run folder {folder.path}: {exc.strerror}; free some space "
                                 "or set RUNPILOT_HOME to a writable folder") from exc
        raise StoreError("could not find a free run id after 100 tries")

    def adopt(self, run_id: str) -> RunFolder:
        """The folder of a run whose id was chosen beforehand: a queued one (a sweep's point, a Slurm
        job), or a new one (a detached run)."""
        folder = self.folder(run_id)
        if not folder.path.is_dir():
            return self.create_run_dir(run_id)
        status = folder.read_meta().status
        if status != QUEUED:
            raise StoreError(f"run {run_id} is {status}, not queued; it cannot be started again")
        return folder

    def folders(self) -> list[RunFolder]:
        try:
            names = sorted(os.listdir(self.runs_dir))
        except OSError:
            return []
        return [RunFolder(self.runs_dir / n) for n in names if RUN_ID_RE.match(n)]

    # -- database -----------------------------------------------------------
    @contextlib.contextmanager
    def db(self, read_only: bool = False, timeout: float | None = None) -> Iterator[sqlite3.Connection]:
        """A connection with the schema in place, caught up with runs that could not write to it.

        A damaged index is set aside and rebuilt; a reader on a full or read-only disk still gets
        the last checkpointed rows.
        """
        self.ensure()
        try:
            conn = self._open(timeout, catch_up_wait=INDEX_LIFE_WAIT if read_only else None)
        except sqlite3.OperationalError as exc:  # locked past the timeout, unwritable, full disk
            conn = self._open_read_only(exc) if read_only else None
            if conn is None:
                raise self._error(exc, self.db_timeout if timeout is None else timeout) from exc
        except sqlite3.DatabaseError as exc:     # not a database, or a malformed one
            conn = self._rebuild_damaged(exc)
        try:
            yield conn
        except sqlite3.DatabaseError as exc:
            raise self._error(exc, self.db_timeout if timeout is None else timeout) from exc
        finally:
            conn.close()

    def _error(self, exc: sqlite3.Error, waited: float | None = None) -> StoreError:
        if "locked" in str(exc) or "busy" in str(exc):
            waited = self.db_timeout if waited is None else waited
            return StoreError(f"{self.db_path} is locked by another process (waited {waited:g}s); "
                              "try again when it is done")
        if self.db_path.is_dir():
            return StoreError(f"{self.db_path} is a folder, not RunPilot's index; move it away "
                              "(runpilot reindex then rebuilds the index from the run folders)")
        return StoreError(f"cannot use {self.db_path}: {exc}; check the folder's permissions and free space "
                          "(runpilot reindex rebuilds the index from the run folders)")

    def _open(self, timeout: float | None = None, catch_up_wait: float | None = None) -> sqlite3.Connection:
        if not self.db_path.exists():
            os.close(os.open(self.db_path, os.O_WRONLY | os.O_CREAT, 0o600))
        conn = sqlite3.connect(self.db_path, timeout=self.db_timeout if timeout is None else timeout,
                               isolation_level=None)
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self._while_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            conn.execute("PRAGMA synchronous=NORMAL")
            if conn.execute("PRAGMA user_version").fetchone()[0] != DB_SCHEMA_VERSION and self._migrate(conn,
                                                                                                        self.runs_dir):
                self._index_folders(conn)
            if self.write_index:
                self._catch_up(conn, catch_up_wait)
            return conn
        except BaseException:
            conn.close()
            raise

    def _open_read_only(self, exc: Exception) -> sqlite3.Connection | None:
        if not self.db_path.is_file():
            return None
        conn = sqlite3.connect(f"{self.db_path.as_uri()}?immutable=1", uri=True)
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] == DB_SCHEMA_VERSION:
                return conn
        except sqlite3.DatabaseError:
            pass
        conn.close()
        return None

    def _while_locked(self, action):
        """Retry what SQLite refuses at once with 'database is locked' (switching to WAL does)."""
        deadline = time.monotonic() + self.db_timeout
        while True:
            try:
                return action()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @staticmethod
    def _migrate(conn: sqlite3.Connection, runs_dir: Path) -> bool:
        """Create the schema. 0.5's index (version 3) keeps its rows, moved into the new columns (the
        path, the backend and its handle); an index of another version is dropped and rebuilt from
        the folders. Either way the folders without a row are indexed next (True)."""
        with _transaction(conn):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == DB_SCHEMA_VERSION:
                return False  # a parallel process got here first
            carried = version == 3 and conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'runs'").fetchone()
            if carried:
                conn.execute("ALTER TABLE runs RENAME TO runs_v3")
                for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND "
                                            "tbl_name = 'runs_v3' AND sql IS NOT NULL").fetchall():
                    conn.execute(f'DROP INDEX "{name}"')  # the new schema's indexes take their names
            elif version:
                conn.execute("DROP TABLE IF EXISTS runs")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            if carried:
                conn.execute(MIGRATE_FROM_3.format(columns=", ".join(RUN_COLUMNS)), (str(runs_dir),))
                conn.execute("DROP TABLE runs_v3")
            conn.execute(f"PRAGMA user_version={DB_SCHEMA_VERSION}")
        return True

    def _rebuild_damaged(self, exc: Exception) -> sqlite3.Connection:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.db_path.with_name(f"runs.db.damaged-{stamp}-{os.getpid()}-{os.urandom(2).hex()}")
        self.note(f"{self.db_path} is damaged ({exc}); moved it to {aside.name} and rebuilt the "
                            "index from the run folders")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.db_path}{suffix}", f"{aside}{suffix}")
        try:
            return self._open()
        except sqlite3.DatabaseError as again:
            raise self._error(again) from again

    def _index_folders(self, conn: sqlite3.Connection) -> int:
        """Insert a row for every run folder that has none (used on creation and by reindex)."""
        known = {row[0] for row in conn.execute("SELECT id FROM runs")}
        rows = [_row(RunRecord.of(meta, folder.path)) for folder in self.folders()
                if folder.run_id not in known and (meta := folder.read_meta()).started_at is not None]
        with _transaction(conn):
            conn.executemany(_UPSERT, rows)
        return len(rows)

    # -- runs that could not reach the index --------------------------------
    def defer(self, run_id: str) -> None:
        """Remember that RUN_ID's row is behind its folder; the next use of the index catches up."""
        make_private_dirs(self.pending_dir)
        write_private(self.pending_dir / check_run_id(run_id), b"")

    def _catch_up(self, conn: sqlite3.Connection, wait: float | None = None) -> None:
        """Index the runs that left a marker in pending/. A reader (WAIT given) waits that long at most
        for a locked index and then reads without catching up: the markers stay for the next use."""
        try:
            pending = [n for n in os.listdir(self.pending_dir) if RUN_ID_RE.match(n)]
        except OSError:
            return
        if pending and wait is not None:
            wait = 0.0 if time.monotonic() < self.index_busy_until else wait
            conn.execute(f"PRAGMA busy_timeout={int(wait * 1000)}")
            try:
                self._catch_up_rows(conn, pending)
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                self.index_busy_until = time.monotonic() + INDEX_BUSY_SECONDS
            finally:
                conn.execute(f"PRAGMA busy_timeout={int(self.db_timeout * 1000)}")
            return
        self._catch_up_rows(conn, pending)

    def _catch_up_rows(self, conn: sqlite3.Connection, pending: list[str]) -> None:
        """Each marker is claimed (renamed) before its run's record is read, and the record is read
        under the index's write lock: a runner that ends meanwhile either saves its row after ours or
        leaves a new marker, which stays for the next catch-up (neither is lost to a stale row)."""
        for run_id in pending:
            claimed = self.pending_dir / f".{run_id}.{os.getpid()}.{threading.get_ident()}"
            try:
                os.rename(self.pending_dir / run_id, claimed)
            except OSError:
                continue  # another reader took it
            try:
                with _transaction(conn):
                    meta = self.folder(run_id).read_meta()
                    if meta.started_at is not None:
                        conn.execute(_UPSERT, _row(RunRecord.of(meta, self.folder(run_id).path)))
                    else:
                        conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.rename(claimed, self.pending_dir / run_id)  # not caught up: the marker stays
                raise
            with contextlib.suppress(OSError):
                os.unlink(claimed)

    # -- rows ---------------------------------------------------------------
    def save(self, meta: RunMeta, timeout: float | None = None) -> None:
        """Write the index row of a run from its meta (raises StoreError)."""
        self.save_record(RunRecord.of(meta, self.folder(meta.run_id).path), timeout)

    def save_record(self, record: RunRecord, timeout: float | None = None) -> None:
        if not self.write_index:
            return
        with self.db(timeout=timeout) as conn, _transaction(conn):
            conn.execute(_UPSERT, _row(record))

    def save_or_defer(self, meta: RunMeta) -> str | None:
        """save(), or leave a marker for a later catch-up; returns why the index is behind, if it is.
        A locked index holds the caller INDEX_LIFE_WAIT at most, and then not again for a while."""
        try:
            busy = time.monotonic() < self.index_busy_until  # found locked a moment ago: do not wait again
            self.save(meta, timeout=0.0 if busy else min(self.db_timeout, INDEX_LIFE_WAIT))
            return None
        except StoreError as exc:
            self.index_busy_until = time.monotonic() + INDEX_BUSY_SECONDS
            try:
                self.defer(meta.run_id)
            except OSError as again:
                return f"{exc} (and no marker could be left: {again.strerror})"
            return f"{exc}; the index catches up from the run folder the next time it is used"

    def record(self, meta: RunMeta, durable: bool = True, strict: bool = True) -> str | None:
        """Record a changed run: its meta.json first (the truth), then its index row (see
        save_or_defer); a run that has ended gives back the space set aside for its last record.
        Returns why the index is behind, if it is. A folder that cannot be written raises OSError;
        not STRICT (an ending seen from outside), the row is written all the same."""
        self.record_folder(meta, durable, strict)
        return self.save_or_defer(meta)

    def record_folder(self, meta: RunMeta, durable: bool = True, strict: bool = True) -> None:
        """The first half of record(), for a caller that writes many runs' rows in one batch
        afterwards (save_records): meta.json, and an ended run's reserve given back."""
        folder = self.folder(meta.run_id)
        try:
            folder.write_meta(meta, durable)
        except OSError:
            if strict:
                raise
        if meta.final:
            folder.free_reserve()

    def save_all_or_defer(self, metas: list[RunMeta]) -> None:
        """The index rows of many runs in one transaction (a sweep's plan), or a marker for each to catch
        up later when the index cannot be written now."""
        if not self.write_index:
            return
        try:
            with self.db() as conn, _transaction(conn):
                conn.executemany(_UPSERT, [_row(RunRecord.of(m, self.folder(m.run_id).path)) for m in metas])
        except StoreError:
            for meta in metas:
                self.defer(meta.run_id)

    def delete(self, run_id: str) -> None:
        """Remove a run's folder, then its row (a folder left by a crash comes back on reindex)."""
        folder = self.folder(run_id)
        trash = self.runs_dir / f".deleting-{run_id}"
        try:
            os.replace(folder.path, trash)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"cannot delete run {run_id}: {e.strerror} ({self.runs_dir}); nothing was deleted: "
                             "check that RUNPILOT_HOME is writable") from e
        shutil.rmtree(trash, ignore_errors=True)
        with self.db() as conn, _transaction(conn):
            conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))

    def get(self, run_id: str) -> RunRecord | None:
        with self.db(read_only=True) as conn:
            row = conn.execute(f"SELECT {', '.join(RUN_COLUMNS)} FROM runs WHERE id = ?", (run_id,)).fetchone()
        return self._record(row) if row else None

    def query(self, what: RunFilter | None = None) -> list[RunRecord]:
        where, params, order = (what or RunFilter()).sql()
        sql = f"SELECT {', '.join(RUN_COLUMNS)} FROM runs" + (f" WHERE {where}" if where else "") + f" ORDER BY {order}"
        if what is not None and what.limit is not None:
            sql += f" LIMIT {max(0, int(what.limit))}"
        with self.db(read_only=True) as conn:
            return [self._record(row) for row in conn.execute(sql, params)]

    def active_runs(self, backend: str) -> list[RunRecord]:
        """The runs of BACKEND that the index holds as queued or running, with the backend's handle on them."""
        marks = ", ".join("?" for _ in ACTIVE_STATUSES)
        with self.db(read_only=True) as conn:
            rows = conn.execute(f"SELECT {', '.join(RUN_COLUMNS)} FROM runs WHERE backend = ? AND backend_ref "
                                f"IS NOT NULL AND status IN ({marks})", (backend, *ACTIVE_STATUSES)).fetchall()
        return [self._record(row) for row in rows]

    def save_records(self, records: list[RunRecord]) -> None:
        """Write the index rows of many runs in one transaction (a backend's batch of changes)."""
        if records and self.write_index:
            with self.db() as conn, _transaction(conn):
                conn.executemany(_UPSERT, [_row(r) for r in records])

    def _record(self, row: tuple) -> RunRecord:
        values = dict(zip(RUN_COLUMNS, row))
        for column in JSON_COLUMNS:
            values[column] = json.loads(values[column])
        values["path"] = str(self.runs_dir / values["id"])  # where the home is now (it may have moved)
        return RunRecord(**values)

    def find(self, ref: str) -> RunRecord:
        """A run by full id, unique id prefix, its short id (the last six hex digits), `latest` or `-N`."""
        if ref in ("latest", "last") or re.fullmatch(r"-[1-9]\d*", ref):
            offset = 0 if not ref.startswith("-") else int(ref[1:]) - 1
            rows = self.query(RunFilter(limit=offset + 1))
            if len(rows) <= offset:
                raise UsageError(f"there is no run {ref!r} yet; start one with runpilot run CONFIG")
            return rows[offset]
        if re.fullmatch(r"-0+", ref):
            raise UsageError(f"{ref!r} names no run: -1 is the newest, -2 the one before")
        if not re.fullmatch(r"[0-9a-f-]{1,22}", ref):
            raise UsageError(f"{visible(ref)!r} is not a run id; run ids look like 20261128-224705-a3f9c1, "
                             "or a3f9c1 for short (see runpilot list)")
        with self.db(read_only=True) as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM runs WHERE id >= ? AND id < ? ORDER BY id LIMIT 6",
                                              (ref, ref + "\x7f"))]
            if not ids and re.fullmatch(r"[0-9a-f]{6}", ref):
                ids = [r[0] for r in conn.execute("SELECT id FROM runs WHERE id LIKE ? ORDER BY id LIMIT 6",
                                                  (f"%-{ref}",))]
        if not ids and RUN_ID_RE.match(ref) and (meta := self.folder(ref).read_meta()).started_at is not None:
            return RunRecord.of(meta, self.folder(ref).path)  # the folder is the truth; its row comes later
        if not ids:
            raise UsageError(f"no run matches {ref!r}; see runpilot list")
        if len(ids) > 1 and ids[0] != ref:
            listed = ", ".join(ids[:5])
            raise UsageError(f"{ref!r} matches several runs ({listed}{', ...' if len(ids) > 5 else ''}); "
                             "give more of the id")
        record = self.get(ids[0])
        assert record is not None
        return record

    def reindex(self) -> int:
        """Rebuild runs.db from the run folders; returns the number of runs indexed."""
        self.ensure()
        if self.db_path.is_dir():
            raise self._error(sqlite3.DatabaseError("is a folder"))
        for suffix in ("", "-wal", "-shm"):
            try:
                os.remove(f"{self.db_path}{suffix}")
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StoreError(f"cannot remove {self.db_path}{suffix}: {exc.strerror}; check the "
                                 "folder's permissions") from exc
        with self.db() as conn:
            return conn.execute("SELECT count(*) FROM runs").fetchone()[0]


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection):
    """BEGIN IMMEDIATE waits for a parallel writer instead of failing with 'database is locked'."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


_UPSERT = (f"INSERT OR REPLACE INTO runs ({', '.join(RUN_COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in RUN_COLUMNS)})")


def _row(record: RunRecord) -> tuple:
    values = {**dataclasses.asdict(record), "runner": record.runner.to_data()}
    for column in JSON_COLUMNS:
        values[column] = json.dumps(json_safe(values[column]), sort_keys=True)
    return tuple(values[c] for c in RUN_COLUMNS)


@dataclass(frozen=True)
class Snapshot:
    """One recorded state of a code folder: its id (the hash of its manifest) and what it holds."""

    snapshot_id: str
    files: int
    size: int
    listed_by: str                      # git, or files (a walk that honours .runpilotignore)


class SnapshotStore:
    """Code snapshots, content-addressed under `<home>/snapshots/`.

    `objects/ab/cdef...` holds each file's content once, named by its SHA-256, read-only;
    `manifests/<id>.json` lists a snapshot's files (path, hash, size, mode, or a symlink's target),
    and its id is the SHA-256 of that list, so N runs of the same code share one copy and one
    manifest. `cache/` remembers the hash of each file by its stat, so an unchanged folder is not
    read again. A run never uses the objects in place: it gets its own copy (materialize).
    """

    def __init__(self, home: Path) -> None:
        self.root = home / "snapshots"
        self.objects = self.root / "objects"
        self.manifests = self.root / "manifests"
        self.cache_dir = self.root / "cache"

    def object_path(self, digest: str) -> Path:
        return self.objects / digest[:2] / digest[2:]

    def _object_file(self, digest: str) -> str:
        """object_path as text: the per-file loops run a thousand times per run's start."""
        return f"{self.objects}/{digest[:2]}/{digest[2:]}"

    def manifest_path(self, snapshot_id: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", snapshot_id):
            raise SnapshotError(f"{visible(snapshot_id)!r} is not a snapshot id")
        return self.manifests / f"{snapshot_id}.json"

    def manifest(self, snapshot_id: str) -> list[dict]:
        """The files of a snapshot; SnapshotError when it is gone (gc, or another home)."""
        try:
            return json.loads(self.manifest_path(snapshot_id).read_bytes())["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SnapshotError(f"code snapshot {snapshot_id[:12]} is missing from {self.root} ({exc}); rerun "
                                "with --current-code to run the folder as it is now") from None

    def take(self, folder: Path, limit: int) -> Snapshot:
        """Record FOLDER's code files (refused above LIMIT bytes) and return the snapshot."""
        paths, listed_by = code_files(folder)
        entries = self._stat_all(folder, paths)
        total = sum(size for _, st, size in entries if st is not None)
        if total > limit:
            raise SnapshotError(oversize_message(folder, entries, total, limit, listed_by))
        try:
            make_private_dirs(self.objects)
            make_private_dirs(self.manifests)
            files = self._store_files(folder, entries)
            body = json.dumps(files, sort_keys=True, separators=(",", ":")).encode()
            snapshot_id = hashlib_sha256(body)
            target = self.manifest_path(snapshot_id)
            if not target.exists():
                write_atomic(target, b'{"files":' + body + b"}\n", durable=False)
            else:
                os.utime(target)  # in use again: gc keeps young snapshots
        except OSError as exc:
            raise SnapshotError(f"cannot record the code of {folder}: {exc.filename or self.root}: {exc.strerror}; "
                                "fix its permissions or free some space, list it in .runpilotignore, or run with "
                                "--live-code") from exc
        return Snapshot(snapshot_id, len(files), total, listed_by)

    @staticmethod
    def _stat_all(folder: Path, paths: list[str]) -> list[tuple[str, os.stat_result, int]]:
        """(path, lstat, size) of each listed file or symlink that exists (git lists deleted files too)."""
        entries, top = [], str(folder)
        for path in paths:
            try:
                st = os.lstat(os.path.join(top, path))
            except OSError:
                continue
            if stat_is_file(st) or stat_is_link(st):
                entries.append((path, st, st.st_size if stat_is_file(st) else 0))
        return entries

    def _store_files(self, folder: Path, entries: list) -> list[dict]:
        cache, started = self._read_cache(folder), time.time_ns()
        seen: dict[str, list] = {}
        files = []
        for path, st, size in entries:
            if stat_is_link(st):
                files.append({"path": path, "link": os.readlink(folder / path)})
                continue
            signature = [size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
            known = cache.get("files", {}).get(path)
            trusted = known and known[:4] == signature and st.st_mtime_ns < cache.get("time", 0) - \
                SNAPSHOT_CACHE_SLACK_NS and os.path.exists(self._object_file(known[4]))
            digest = known[4] if trusted else self._add_object(folder / path)
            seen[path] = signature + [digest]
            files.append({"path": path, "sha256": digest, "size": size,
                          "mode": 0o755 if st.st_mode & 0o111 else 0o644})
        with contextlib.suppress(OSError):
            make_private_dirs(self.cache_dir)
            write_atomic(self._cache_file(folder), json.dumps({"time": started, "files": seen}).encode(),
                         durable=False)
        return files

    def _cache_file(self, folder: Path) -> Path:
        return self.cache_dir / (hashlib_sha256(os.fsencode(str(folder)))[:24] + ".json")

    def _read_cache(self, folder: Path) -> dict:
        try:
            cache = json.loads(self._cache_file(folder).read_bytes())
        except (OSError, ValueError):
            return {}
        return cache if isinstance(cache, dict) and isinstance(cache.get("files"), dict) else {}

    def _add_object(self, source: Path) -> str:
        """Copy a file into the store while hashing it (one read: an edit meanwhile cannot split the two)."""
        import hashlib  # only here: not every start pays for it
        tmp = self.objects / f".in-{os.getpid()}-{threading.get_ident()}-{os.urandom(4).hex()}"
        digest = hashlib.sha256()
        try:
            with open(source, "rb") as src, open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400), "wb") as out:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            target = self.object_path(digest.hexdigest())
            if target.exists():
                os.unlink(tmp)
            else:
                target.parent.mkdir(mode=0o700, exist_ok=True)
                os.replace(tmp, target)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return digest.hexdigest()

    def materialize(self, snapshot_id: str, target: Path) -> dict[str, tuple]:
        """A private, writable copy of a snapshot in TARGET; returns each copied file's stat signature
        (what prune_copy compares to find the files the job left as they were)."""
        copied, made, top = {}, {str(target)}, str(target)
        try:
            target.mkdir(mode=0o700, exist_ok=True)
            for entry in self.manifest(snapshot_id):
                if entry["path"].startswith("/") or ".." in entry["path"].split("/"):
                    raise SnapshotError(f"code snapshot {snapshot_id[:12]} names {visible(entry['path'])!r}, a "
                                        "path outside its folder; it is damaged: rerun with --current-code")
                path = os.path.join(top, entry["path"])
                parent = os.path.dirname(path)
                if parent not in made:
                    os.makedirs(parent, mode=0o700, exist_ok=True)
                    made.add(parent)
                if "link" in entry:
                    os.symlink(entry["link"], path)
                    continue
                st = copy_object(self._object_file(entry["sha256"]), path, 0o700 if entry["mode"] & 0o111 else 0o600)
                copied[entry["path"]] = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError as exc:
            raise SnapshotError(f"cannot copy code snapshot {snapshot_id[:12]} into {target}: {exc.strerror}; "
                                "free some space, or run with --live-code") from exc
        return copied

    def referenced(self, snapshot_ids: set[str]) -> set[str]:
        """The object hashes the given snapshots use."""
        digests = set()
        for snapshot_id in snapshot_ids:
            with contextlib.suppress(SnapshotError):
                digests |= {e["sha256"] for e in self.manifest(snapshot_id) if "sha256" in e}
        return digests

    def collect(self, keep: set[str], min_age: float = SNAPSHOT_GC_AGE) -> int:
        """Remove the snapshots not in KEEP (older than MIN_AGE seconds) and the objects no kept
        snapshot uses; returns the bytes freed."""
        freed, cutoff = 0, time.time() - min_age
        for path in sorted(self.manifests.glob("*.json")) if self.manifests.is_dir() else []:
            with contextlib.suppress(OSError):
                if path.stem not in keep and path.stat().st_mtime < cutoff:
                    freed += path.stat().st_size
                    path.unlink()
        live = {p.stem for p in self.manifests.glob("*.json")} if self.manifests.is_dir() else set()
        used = self.referenced(live)
        for path in sorted(self.objects.glob("??/*")) if self.objects.is_dir() else []:
            with contextlib.suppress(OSError):
                if path.parent.name + path.name not in used and path.stat().st_mtime < cutoff:
                    freed += path.stat().st_size
                    path.unlink()
        return freed


def copy_object(source: str, target: str, mode: int) -> os.stat_result:
    """Copy a stored file to a new private file (the kernel copies: sendfile); return the copy's stat."""
    with open(source, "rb") as src:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            size, offset = os.fstat(src.fileno()).st_size, 0
            while offset < size:
                sent = os.sendfile(fd, src.fileno(), offset, size - offset)
                if sent == 0:
                    break
                offset += sent
            return os.fstat(fd)
        finally:
            os.close(fd)


def hashlib_sha256(data: bytes) -> str:
    import hashlib  # only here: not every start pays for it
    return hashlib.sha256(data).hexdigest()


def stat_is_link(st: os.stat_result) -> bool:
    return (st.st_mode & 0o170000) == 0o120000


def oversize_message(folder: Path, entries: list, total: int, limit: int, listed_by: str) -> str:
    """Why a code folder is refused: its size, its three biggest entries, and the ways out."""
    by_top: dict[str, int] = {}
    for path, _, size in entries:
        top = path.split("/")[0] + ("/" if "/" in path else "")
        by_top[top] = by_top.get(top, 0) + size
    biggest = sorted(by_top.items(), key=lambda item: (-item[1], item[0]))[:3]
    named = ", ".join(f"{name} ({fmt_size(size)})" for name, size in biggest)
    listed = " (the files git lists)" if listed_by == "git" else ""
    return (f"the code folder {folder} holds {fmt_size(total)}{listed}, more than the code snapshot limit of "
            f"{fmt_size(limit)}; biggest: {named}; list what the job does not need in {folder}/.runpilotignore "
            "(gitignore syntax), raise the limit (code_snapshot: 2g in the config), or run the folder as it is "
            "with --live-code")


def tree_size(path: Path) -> int:
    """Bytes of the files under PATH (not following symlinks); 0 when it is gone."""
    total = 0
    for top, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(top, name)).st_size
    return total


def tree_files(path: Path) -> dict[str, int]:
    """Relative path -> size of each file under PATH, sorted by path."""
    found = {}
    for top, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(top, name)
            with contextlib.suppress(OSError):
                found[os.path.relpath(full, path)] = os.lstat(full).st_size
    return dict(sorted(found.items()))

# ==== 15. Orchestration: run_job and the life of a run =======================

@dataclass
class RunOptions:
    """Choices made on the command line rather than in the config."""

    engine: str | None = None
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    keep_engine_logs: bool = False
    pull: str = "missing"                         # always | missing | never
    tags: dict = field(default_factory=dict)
    overrides: list = field(default_factory=list)
    gpu_check: bool = True
    rerun_of: str | None = None
    previous: RunMeta | None = None               # the run being rerun
    run_id: str | None = None                     # chosen beforehand: a detached run, a sweep's point
    gpu_pool: list[str] | None = None             # --gpus 0,1,3: the GPUs runs are placed on
    wait_for_gpus: bool = True                    # --no-wait: fail at once when the GPUs are busy
    claim_gpus: bool = True                       # False on a Slurm node: Slurm placed the job
    sweep: dict = field(default_factory=dict)     # id, index, point, repeat
    slurm: dict = field(default_factory=dict)     # job_id, partition, node: a run submitted to Slurm
    extra_env: dict = field(default_factory=dict) # RUNPILOT_SWEEP_ID, RUNPILOT_REPEAT, ...
    gpu_stats: float | None = GPU_STATS_SECONDS   # seconds between GPU samples; None: --no-gpu-stats
    check_writes: bool = False                    # --check-writes: warn of large files left in the container
    live_code: bool = False                       # --live-code: run the code folder as it is
    code_snapshots: dict = field(default_factory=dict)  # code folder -> the snapshot to run (sweep, rerun)


@dataclass
class RunOutcome:
    record: RunRecord
    exit_code: int        # RunPilot's exit status (the job's own status is record.exit_code)
    meta: RunMeta


@dataclass
class RunContext:
    """What travels along one run's path, from its record to its ending: where it is recorded, the
    config and options it was started with, and who hears of it (instead of long parameter lists)."""

    store: RunStore
    config: JobConfig                   # as the user gave it (the job may be launched with a copy's paths)
    folder: RunFolder
    meta: RunMeta                       # the record, changed along the way and recorded by the store
    options: RunOptions
    report: Reporter = ignore_events
    terminal: Terminal | None = None    # where the job's output goes besides logs.txt
    signals: StopSignals | None = None  # the stop requests this run obeys


def make_launch(config: JobConfig, run_id: str, engine: str, env: dict[str, str], options: RunOptions,
                environ, devices: tuple[str, ...] | None) -> Launch:
    """Argv, environment and folder of the job for its engine.

    A container's engine CLI keeps the runner's environment untouched: the job's variables reach
    the container through --env-file (a pipe), so `env: {PATH: ..., DOCKER_HOST: ...}` is the
    job's business only.
    """
    runs = engine_of(engine)
    if not runs.runs_in_container:
        gpus = devices if devices is not None else config.resources.gpus
        child_env = {**environ, **runs.gpu_env(gpus), **env}
        return Launch(runs.argv(config, run_id), child_env, local_workdir(config), engine, run_id=run_id,
                      devices=tuple(devices or ()), stop_signal=config.stop_signal)
    lines, by_name = split_job_env(env, environ, engine)
    argv = build_engine_argv(config, run_id, engine, by_name, options.keep_engine_logs, "/dev/fd/ENV", devices,
                             options.check_writes)
    child_env = {**environ, **{n: env[n] for n in by_name}}
    return Launch(argv, child_env, None, engine, container_name(run_id), lines, run_id, tuple(devices or ()),
                  stop_signal=config.stop_signal, check_writes=options.check_writes)


def split_job_env(env: dict[str, str], environ, engine: str) -> tuple[bytes, list[str]]:
    """The job's variables as --env-file lines, and the few that must travel by name (a line break);
    those may not replace a variable of the runner's own, which the engine CLI itself reads."""
    if not engine_of(engine).runs_in_container:
        return b"", []
    lines, by_name = env_file_lines(env)
    if len(lines) > PIPE_SIZE:
        raise ConfigError(f"the job's environment is {len(lines)} bytes, more than the {PIPE_SIZE} bytes a pipe "
                          "hands to the engine at once; make the env values smaller")
    clash = [n for n in by_name if n in environ and environ[n] != env[n]]
    if clash:
        raise ConfigError(f"env.{clash[0]} holds a line break, so it can reach the job only through the "
                          f"{engine} command's own environment, where it would replace your {clash[0]}; "
                          "rename it or remove the line break")
    return lines, by_name


def new_meta(config: JobConfig, run_id: str, engine: str, options: RunOptions, facts: dict) -> RunMeta:
    known = {f.name for f in dataclasses.fields(RunMeta)}
    meta = RunMeta(
        run_id=run_id, name=config.name, status=RUNNING, started_at=utc_now(), engine=engine,
        image=config.image, workdir=config.workdir if engine_of(engine).runs_in_container else local_workdir(config),
        host=hostname(), user=_user(), runpilot_version=__version__,
        python=".".join(map(str, sys.version_info[:3])), os=_os_name(), runner=runner_identity(),
        config_file=config.source, config=config_to_dict(config), overrides=list(options.overrides),
        tags=dict(options.tags), rerun_of=options.rerun_of, metric_names=list(config.metrics),
        samples={"count": 0, "malformed": 0}, sweep=dict(options.sweep), slurm=dict(options.slurm))
    for key, value in facts.items():
        if key in known:
            setattr(meta, key, value)
    return meta


def _os_name() -> str:
    """`Linux-6.1.0-amd64-x86_64`, like platform.platform() without its probing."""
    u = os.uname()
    return f"{u.sysname}-{u.release}-{u.machine}"


def _user() -> str | None:
    with contextlib.suppress(KeyError, OSError):  # no name for this uid (containers, LDAP outages)
        import getpass  # only here: not every start pays for it
        return getpass.getuser()
    return None


def record_start(store: RunStore, config: JobConfig, folder: RunFolder, meta: RunMeta) -> str | None:
    """Write config.yaml and meta.json, set space aside, and index the run. A folder that cannot be
    written is removed whole (nothing half-recorded); an index that cannot be written catches up
    later. Returns why the index is behind, if it is."""
    try:
        write_private(folder.config, dump_yaml(config_to_dict(config)).encode("utf-8"))
        folder.write_meta(meta, durable=False)  # the final write is durable
    except OSError as exc:
        shutil.rmtree(folder.path, ignore_errors=True)
        raise StoreError(f"cannot record the run in {store.home}: {exc.strerror}; free some space or set "
                         "RUNPILOT_HOME to a writable folder") from exc
    folder.set_aside_space()
    return store.save_or_defer(meta)


def finish_status(result: TeeResult) -> tuple[str, int]:
    """The run's status and RunPilot's exit status from how the job ended."""
    if result.returncode is None and result.log_error is not None:  # its files could not be made: never started
        return FAILED, 1
    if result.returncode is None:  # stopped before the job started
        return CANCELLED, 128 + (result.stop_signal or signal.SIGINT)
    if result.stop_reason == INTERRUPTED:
        return INTERRUPTED, 128 + (result.stop_signal or signal.SIGINT)
    if result.stop_reason == TIMEOUT:
        return TIMEOUT, 124
    code = job_exit_code(result.returncode)
    if result.log_error is not None:
        return FAILED, 1
    return (SUCCEEDED if code == 0 else FAILED), code


def run_job(config: JobConfig, options: RunOptions, store: RunStore, terminal: Terminal | None = None,
            report: Reporter = ignore_events, environ=None, signals: StopSignals | None = None) -> RunOutcome:
    """Run one job end to end: check, record, wait for its GPUs, tee its output, record how it ended.

    TERMINAL receives the job's output (None: only logs.txt does); REPORT receives the run's
    events; SIGNALS, when given, is the caller's mailbox of stop requests (a sweep's), else
    Ctrl-C, SIGTERM and SIGHUP are handled here.
    """
    environ = os.environ if environ is None else environ
    engine = choose_engine(options.engine, config, environ)
    config = dataclasses.replace(config, engine=engine)  # the stored config says where it ran
    env = {**job_environment(config, "", engine, environ), **options.extra_env, "RUNPILOT_RUN_ID": "0" * 22}
    split_job_env(env, environ, engine)  # every problem found before anything is recorded
    facts = check_host(config, engine, options, environ, report)
    code = plan_code(config, options, store)  # a refused code folder is refused before anything is recorded
    placement = GpuPlacement.plan(config, options, facts, store)
    placement.claim(options.run_id)  # with --no-wait, busy GPUs are an error here
    try:
        with (contextlib.nullcontext(signals) if signals is not None else StopSignals()) as signals:
            folder = store.adopt(options.run_id) if options.run_id else store.create_run_dir()
            placement.name_holder(folder.run_id)
            env["RUNPILOT_RUN_ID"] = folder.run_id
            meta = new_meta(config, folder.run_id, engine, options, facts)
            meta.code = code
            if not placement.ready:
                meta.queue()
            run = RunContext(store, config, folder, meta, options, report, terminal, signals)
            _report_behind(report, folder.run_id, record_start(store, config, folder, meta))
            if not placement.ready and not placement.wait(folder.run_id, signals, report):
                return finish(run, TeeResult(None, INTERRUPTED, signals.received[0]))
            try:
                launched, files_env, copied = prepare_run_files(store, config, folder, code, engine)
            except RunPilotError as exc:
                fail_before_start(store, folder, meta, exc)
                raise
            env.update(files_env)
            if not engine_of(engine).runs_in_container:
                meta.workdir = local_workdir(launched)
            launch = make_launch(launched, folder.run_id, engine, env, options, environ, placement.devices)
            try:
                return _run_placed(run, launched, launch)
            finally:
                settle_run_files(folder, engine, launched, copied, report)
    finally:
        placement.release()


def _run_placed(run: RunContext, launched: JobConfig, launch: Launch) -> RunOutcome:
    """The run holds its GPUs: mark it running, start the job, tee it, finish. LAUNCHED is the config
    the job is launched with (its code copy and outputs mounted), LAUNCH its command."""
    store, config, folder, meta, report, signals = run.store, run.config, run.folder, run.meta, run.report, run.signals
    assert signals is not None
    meta.command, meta.command_line, meta.container = launch.argv, shlex.join(launch.argv), launch.container
    meta.devices = list(launch.devices)
    was_queued = meta.status == QUEUED
    meta.start()  # the duration is the job's: what recording the run took (an index that was busy) is not
    if was_queued:
        _report_behind(report, folder.run_id, store.record(meta, durable=False))
    _announce(config, meta, report)
    probes = StartProbes(meta.engine or "", _probe_folders(config))
    result = supervise(run, launch, launched)
    meta.finished_at = utc_now()  # before the probes: their time is not the job's
    seen = len(signals.received)
    facts = probes.collect(folder.path, give_up=lambda: len(signals.received) > seen)
    meta.engine_version, meta.git = facts.get("engine_version"), facts.get("git", [])
    if facts.get("unfinished"):
        meta.extra["probes"] = "unfinished: recorded without the engine's version and the git state"
    return finish(run, result)


def _probe_folders(config: JobConfig) -> list[str]:
    folders = [m.source for m in config.mounts if os.path.isdir(m.source)]
    if not engine_of(config.engine, "docker").runs_in_container and config.source:
        folders.append(local_workdir(config))
    return folders


def _report_behind(report: Reporter, run_id: str, behind: str | None) -> None:
    if behind:
        report(RunEvent("warning", run_id, f"the index was not updated: {behind}"))


def check_host(config: JobConfig, engine: str, options: RunOptions, environ, report: Reporter) -> dict:
    """Fail fast on what would stop the job from starting; return the facts learnt for meta.json."""
    facts: dict = {}
    if not engine_of(engine).runs_in_container:
        program = local_argv(config)[0]
        found = program if "/" in program else shutil.which(program, path=environ.get("PATH"))
        if not found:
            raise ConfigError(f"{program} (the entrypoint) is not found on PATH for engine local", config.source)
        facts["executable"] = os.path.abspath(found)
    else:  # the image lookup also tells a stopped engine; a pull, which may take minutes, comes last
        present = inspect_image(engine, str(config.image))
    facts["gpus"] = gpu_facts(config.resources.gpus, engine, options.gpu_check, environ, options.gpu_pool)
    if engine_of(engine).runs_in_container:
        facts.update(pull_image(engine, str(config.image), options.pull, present, report))
    return facts


def outlived_its_runner(store: RunStore, run_id: str) -> bool:
    """Whether run RUN_ID's runner died here while its job (container or process group) lives on."""
    try:
        folder = store.folder(run_id)
    except UsageError:
        return False
    meta = folder.read_meta()
    if meta.status not in (*ACTIVE_STATUSES, LOST) or runner_alive(meta.runner) is not False:
        return False
    return leftover_job(RunRecord.of(meta, folder.path), meta)


class GpuPlacement:
    """The GPUs one run holds: a count picked from the pool, or pinned devices, claimed across
    processes (see GpuClaims) and held until the run ends, or while a job whose runner died
    holding them still runs."""

    def __init__(self, claims: GpuClaims | None, count: int, pinned: tuple[str, ...], pool: list[str],
                 wait_allowed: bool) -> None:
        self.claims, self.count, self.pinned, self.pool = claims, count, pinned, pool
        self.wait_allowed = wait_allowed
        self.held: GpuClaim | None = None

    @classmethod
    def plan(cls, config: JobConfig, options: RunOptions, facts: dict, store: RunStore) -> "GpuPlacement":
        """No placement without GPUs asked for, or without a pool to place them on."""
        requested = config.resources.gpus
        pool = gpu_pool(facts.get("gpus") or {}, options.gpu_pool)
        if requested is None or not pool or not options.claim_gpus:
            return cls(None, 0, (), [], options.wait_for_gpus)
        count, pinned = gpu_request(requested, pool, facts.get("gpus") or {})
        claims = GpuClaims(store.home / "gpus", functools.partial(outlived_its_runner, store),
                           gpu_claims_folder(os.environ))
        return cls(claims, count, pinned, pool, options.wait_for_gpus)

    @property
    def ready(self) -> bool:
        return self.claims is None or self.held is not None

    @property
    def devices(self) -> tuple[str, ...] | None:
        return self.held.devices if self.held else None

    def claim(self, run_id: str | None) -> bool:
        """Try to take the GPUs now; busy GPUs are an error when waiting is not allowed."""
        if self.ready:
            return True
        assert self.claims is not None
        holder = {"run_id": run_id, "pid": os.getpid(), "host": hostname()}
        self.held = self.claims.try_claim(self.count, self.pinned, self.pool, holder)
        if self.held is None and not self.wait_allowed:
            raise GpuError(self.waiting_text() + "; try again later, or leave out --no-wait to wait for them")
        return self.held is not None

    def name_holder(self, run_id: str) -> None:
        if self.claims is not None and self.held is not None:
            self.claims.describe(self.held, {"run_id": run_id, "pid": os.getpid(), "host": hostname()})

    def waiting_text(self) -> str:
        assert self.claims is not None
        return fmt_gpu_wait(self.count, self.pinned, self.claims.holders(list(self.pinned) or self.pool))

    def wait(self, run_id: str, signals: StopSignals, report: Reporter) -> bool:
        """Wait, queued, until the GPUs are free (True) or a stop is asked for (False)."""
        said = ""
        while signals.received or not self.claim(run_id):
            if signals.received:
                return False
            text = self.waiting_text()
            if text != said:
                report(RunEvent("queued", run_id, f"run {run_id} queued, {text}"))
                said = text
            time.sleep(POLL_SECONDS)
        return True

    def release(self) -> None:
        if self.held is not None:
            self.held.release()


def _announce(config: JobConfig, meta: RunMeta, report: Reporter) -> None:
    in_container = engine_of(meta.engine, "docker").runs_in_container
    what = f"{config.image} on {meta.engine}" if in_container else "on this host (engine local)"
    where = f" on GPU {','.join(meta.devices)}" if meta.devices else ""
    report(RunEvent("starting", meta.run_id, f"run {meta.run_id} ({config.name}) starting: {what}{where}"))
    if not in_container:
        # A code mount's default workdir is where engine local runs anyway: only a chosen one is ignored.
        ignored = [k for k, v in (("workdir", config.workdir and not config.workdir_implied),
                                  ("image", config.image)) if v]
        if ignored:
            report(RunEvent("notice", meta.run_id, f"engine local ignores {' and '.join(ignored)}: the job runs "
                                                   f"in {meta.workdir or local_workdir(config)}"))
        if config.resources.cpu or config.resources.memory or config.resources.shm_size:
            report(RunEvent("notice", meta.run_id, "engine local does not enforce resources.cpu, memory or shm_size"))
    for warning in entrypoint_warnings(config, meta.engine):
        report(RunEvent("warning", meta.run_id, warning))


def supervise(run: RunContext, launch: Launch, config: JobConfig) -> TeeResult:
    """Start the job (launched with CONFIG) and tee it until it ends; after it, make sure nothing of
    it is left."""
    folder, meta, report, signals = run.folder, run.meta, run.report, run.signals
    assert signals is not None
    metrics = None
    try:
        metrics = MetricLog(folder.metrics, folder.sample_times)
        if config.tensorboard:
            metrics.events = LiveEvents(folder.tensorboard_events(time.time()), time.time())
        log_fd = os.open(folder.logs, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError as exc:
        if metrics is not None:   # metrics.json and its times file, not left open
            metrics.close()
        return TeeResult(None, FAILED, log_error=exc)
    if config.metrics_from:
        metrics.use_sources(config.metrics_from, _tensorboard_folders(config, meta, report))
    try:
        if signals.received:  # stopped while the run was being recorded: never start the job
            return TeeResult(None, INTERRUPTED, signals.received[0])
        job = _start_job(run, launch)
        if job is None:  # recorded as failed like a shell's "command not found"
            return TeeResult(127)
        sampler = start_usage_sampler(run, launch, job, config)
        try:
            return _tee_to_the_end(job, Tee(log_fd, metrics, run.terminal, report, meta.run_id), signals,
                                   config.timeout)
        finally:
            record_usage(sampler, folder, meta)
    finally:
        os.close(log_fd)
        metrics.close()
        meta.samples = {"count": metrics.count, "malformed": metrics.malformed}
        meta.last_metrics = metrics.last


def _tensorboard_folders(config: JobConfig, meta: RunMeta, report: Reporter) -> list[Path]:
    """The host folders of the config's `tensorboard:` sources; one the engine hides is a warning."""
    folders = []
    for source in config.metrics_from:
        if source.kind != "tensorboard":
            continue
        folder = tensorboard_folder(config, meta.engine or "docker", source.value)
        if folder is None:
            report(RunEvent("warning", meta.run_id, f"metrics_from tensorboard: {source.value} is not inside any "
                                                    "mount, so its event files cannot be read from the host; "
                                                    "mount that folder, or write the event files into a mount"))
        else:
            folders.append(folder)
    return folders


def _start_job(run: RunContext, launch: Launch) -> Job | None:
    """The started job, or None (said as a warning) when its program cannot be started."""
    options, folder, meta, report = run.options, run.folder, run.meta, run.report
    if not engine_of(launch.engine).runs_in_container:
        become_subreaper()
    try:
        job = Job(launch, options.stop_timeout)
    except OSError as exc:
        report(RunEvent("warning", meta.run_id, f"cannot start {launch.argv[0]}: {exc.strerror}"))
        return None
    if not engine_of(launch.engine).runs_in_container:  # so `stop` can end a local job whose runner died
        meta.job = {"pgid": job.proc.pid, "start": process_start(job.proc.pid)}
        with contextlib.suppress(OSError):
            folder.write_meta(meta)
    return job


def _tee_to_the_end(job: Job, tee: Tee, signals: StopSignals, timeout: float | None) -> TeeResult:
    """Tee the job until it ends; then nothing of it is left, also after a bug in the loop."""
    try:
        result = tee.run(job, signals, timeout)
    except BaseException:  # a bug in the loop must not leave a job running behind the user's back
        job.request_stop(force=True)
        job.reap_helpers()
        remove_container(job.launch)
        job.end_leftovers()
        with contextlib.suppress(subprocess.TimeoutExpired):
            job.proc.wait(timeout=job.stop_timeout + 15)
        raise
    finally:
        job.close_pipes()
    job.end_leftovers()
    if job.launch.check_writes and engine_of(job.launch.engine).runs_in_container:
        result.unmounted_writes = container_writes(job.launch.engine, job.launch.container)
    if result.stop_reason or job.launch.check_writes:
        job.reap_helpers()
        remove_container(job.launch)
    return result


def container_writes(engine: str, container: str) -> list[tuple[str, int]] | None:
    """Files the job added or changed in its container (outside every mount), with their sizes in
    bytes (-1 when the engine's storage cannot be read from here); None when the engine cannot say."""
    program = engine_of(engine).program
    diff = quiet_run([program, "diff", container], timeout=60)
    if diff.returncode != 0:
        return None
    upper = quiet_run([program, "inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", container], timeout=60)
    top = upper.stdout.strip() if upper.returncode == 0 else ""
    return parse_container_diff(diff.stdout, functools.partial(_upper_size, top) if top.startswith("/") else None)


def _upper_size(upper: str, path: str) -> int:
    """A file's size in the container's own layer (folders count 0); -1 when it cannot be read here."""
    import stat
    try:
        info = os.lstat(upper + path)
    except OSError:
        return -1
    return info.st_size if stat.S_ISREG(info.st_mode) else 0


def parse_container_diff(text: str, size: Callable[[str], int] | None) -> list[tuple[str, int]]:
    """`docker diff` / `podman diff` lines (`A /scratch/out/ckpt.pt`, `C /tmp`): added or changed paths
    with their sizes (SIZE of the path; -1 unknown), largest first."""
    found = []
    for line in text.splitlines():
        kind, _, path = line.partition(" ")
        if kind in ("A", "C") and path.startswith("/"):
            found.append((path, size(path) if size else -1))
    return sorted(found, key=lambda item: -item[1])


def unmounted_write_warnings(writes: list[tuple[str, int]] | None) -> list[str]:
    """One warning when the job left large files in its container, where they are gone with it."""
    if not writes:
        return []
    total = sum(size for _, size in writes if size > 0)
    if total < LARGE_WRITE_BYTES:
        return []
    biggest = ", ".join(f"{path} ({fmt_size(size)})" for path, size in writes[:3] if size > 0)
    return [f"the job wrote {fmt_size(total)} outside its mounts, now gone with its container: {biggest}; "
            "write such files into a mount (e.g. --out_dir=/mnt/NAME)"]


def remove_container(launch: Launch) -> None:
    """After a stop, make sure no container of the run is left (podman's --rm needs its CLI alive)."""
    engine_of(launch.engine).remove(launch)


def stop_reason(meta: RunMeta, result: TeeResult, config: JobConfig) -> str | None:
    """Why a stopped run ended, in words: `stopped by Ctrl-C; killed after its 10s grace period`."""
    killed = f"; killed {result.killed}" if result.killed else ""
    if meta.status == TIMEOUT:
        got = f" (the job got {signal_name(result.job_signal, job=True)})" if result.job_signal else ""
        return f"it ran into its timeout of {config.timeout:g}s and was stopped{got}{killed}"
    if meta.status not in (INTERRUPTED, CANCELLED) or not result.stop_signal:
        return None
    by = f"stopped by {signal_name(result.stop_signal)}"
    if result.job_signal and meta.status != CANCELLED:
        by += f" (the job got {signal_name(result.job_signal, job=True)})"
    return f"{by} before the job started" if meta.status == CANCELLED else by + killed


def finish(run: RunContext, result: TeeResult) -> RunOutcome:
    """Record how the run ended (meta.json first: it is the truth), report it, return the outcome."""
    store, config, folder, meta, report = run.store, run.config, run.folder, run.meta, run.report
    previous = run.options.previous
    status, exit_status = finish_status(result)
    if not meta.end(status, exit_code=None if result.returncode is None else job_exit_code(result.returncode),
                    stop_signal=result.stop_signal if status in (INTERRUPTED, CANCELLED) else None):
        outcome = RunOutcome(RunRecord.of(meta, folder.path), exit_status_of(meta), meta)  # its first ending
        report(RunEvent("finished", meta.run_id, outcome=outcome))
        return outcome
    meta.duration = round((parse_time(meta.finished_at) - parse_time(meta.started_at or meta.finished_at))
                          .total_seconds(), 3) if meta.status != CANCELLED else None
    if result.log_error is not None:
        meta.reason = (f"cannot write the run's files in {folder.path} ({result.log_error.strerror}); "
                       + ("the job was not started" if result.returncode is None else "the job was stopped"))
    meta.reason = meta.reason or stop_reason(meta, result, config)
    meta.warnings = run_warnings(config, meta, previous) + unmounted_write_warnings(result.unmounted_writes) \
        + damaged_event_warnings(result.damaged_events)
    meta.hint = failure_hint(config, meta, folder) if meta.status == FAILED else None
    try:
        behind = store.record(meta)
    except OSError as exc:
        raise StoreError(f"the job ended ({meta.status}) but {folder.meta_file} could not be written "
                         f"({exc.strerror}); free some space and run runpilot reindex") from exc
    outcome = RunOutcome(RunRecord.of(meta, folder.path), exit_status, meta)
    report(RunEvent("finished", meta.run_id, outcome=outcome))
    for warning in meta.warnings:
        report(RunEvent("warning", meta.run_id, warning))
    _report_behind(report, meta.run_id, behind)
    if result.returncode is not None:
        for notice in capture_notices(folder.logs, meta.samples, config.metrics_from, result.prefixed_metric,
                                      meta.status == SUCCEEDED):
            report(RunEvent("notice", meta.run_id, notice))
    if meta.hint:
        report(RunEvent("hint", meta.run_id, meta.hint))
    if meta.usage.get("hint"):
        report(RunEvent("hint", meta.run_id, meta.usage["hint"]))
    if result.log_error is not None:
        raise StoreError(f"{meta.reason}; it is recorded as failed. Free some space or set RUNPILOT_HOME "
                         "to a writable folder")
    return outcome


def rerun_changes(meta: RunMeta, previous: RunMeta | None) -> list[str]:
    """What differs from the run being rerun: the image behind the tag, or a mount's git commit."""
    if previous is None:
        return []
    changes = []
    if previous.image_id and meta.image_id and previous.image_id != meta.image_id:
        changes.append(f"image {meta.image} is now {meta.image_id[:19]}, was {previous.image_id[:19]} "
                       f"in run {previous.run_id}")
    if meta.code.get("snapshot") and meta.code.get("snapshot") == previous.code.get("snapshot"):
        return changes  # it ran the recorded code: today's commit of the folder says nothing about it
    before = {g.get("root"): g.get("commit") for g in previous.git}
    for repo in meta.git:
        if repo.get("root") in before and before[repo["root"]] != repo.get("commit"):
            changes.append(f"{repo['root']} is at commit {str(repo.get('commit'))[:12]}, was "
                           f"{str(before[repo['root']])[:12]} in run {previous.run_id}")
    return changes


def run_warnings(config: JobConfig, meta: RunMeta, previous: RunMeta | None) -> list[str]:
    """Things the user should hear about once the run is over.

    A featured metric that never appeared is a likely typo, but only worth saying when the job
    got as far as printing metrics (or succeeded): a job that failed at once printed none at all.
    """
    warnings = []
    count, malformed = meta.samples.get("count", 0), meta.samples.get("malformed", 0)
    missing = [m for m in config.metrics if m not in meta.last_metrics]
    if missing and (count or meta.status == SUCCEEDED):
        warnings.append(f"metric {', '.join(missing)} listed in the config never appeared "
                        "(a METRIC line is: METRIC name=value)")
    if malformed:
        warnings.append(f"{malformed} METRIC line(s) were malformed and skipped "
                        "(expected: METRIC name=value [name=value ...])")
    return warnings + rerun_changes(meta, previous)


# What a failed job's last log lines say, and what to do about it: the famous ML failures first.
LOG_HINTS = (
    (re.compile(rb"bus error|insufficient shared memory|unable to (?:allocate|write to) shared memory|/dev/shm"
                rb"|\bshm\b", re.IGNORECASE),
     "the job ran out of shared memory (/dev/shm): PyTorch DataLoader workers pass batches through it; "
     "set resources.shm_size (e.g. 8g), or use fewer num_workers"),
    (re.compile(rb"CUDA out of memory|CUDA error: out of memory|OutOfMemoryError", re.IGNORECASE),
     "the GPU ran out of memory: lower the batch size or the model size, or give the run more GPUs"),
    (re.compile(rb"NCCL (?:error|WARN)|ncclSystemError|ncclInternalError|ncclUnhandledCudaError"),
     "NCCL (GPU-to-GPU communication) failed: rerun with env NCCL_DEBUG=INFO to see why; in a container "
     "NCCL also needs a large /dev/shm (resources.shm_size)"),
)
# `sh: 1: python: not found`, `bash: line 1: python: command not found`, an engine's `exec: "python":
# executable file not found in $PATH`: the name just before "not found".
NOT_FOUND_RE = re.compile(rb'([^\s:"]+)"?: (?:command not found|not found|executable file not found)')


def log_tail(path: Path, size: int = 16384) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read()
    except OSError:
        return b""


def failure_hint(config: JobConfig, meta: RunMeta, folder: RunFolder) -> str | None:
    """The likely cause of a failed run, and the fix, from its log and its exit status."""
    tail = log_tail(folder.logs)
    for pattern, hint in LOG_HINTS:
        if pattern.search(tail):
            return hint
    code = meta.exit_code
    if code == 137:
        limit = config.resources.memory
        if limit:
            return (f"the job was killed (exit 137, SIGKILL), most likely for using more than its memory "
                    f"limit, resources.memory {size_spec(limit)}: raise it, or use less memory")
        return ("the job was killed (exit 137, SIGKILL), most likely by the kernel's out-of-memory killer "
                "(see `dmesg`): use less memory, or run it on a machine with more")
    if code == 127:
        found = NOT_FOUND_RE.findall(tail)
        name = found[-1].decode(errors="replace") if found else ""
        what = f"the command {name!r} was not found" if name else "a command was not found"
        fix = " (python images often have only python3)" if name == "python" else ""
        return f"{what} (exit 127): check the entrypoint's program exists in the image{fix}"
    if code == 126:
        return ("the entrypoint could not be executed (exit 126): it is not a program or not executable; "
                "chmod +x it, or run it through its interpreter (python train.py)")
    if code == 139:
        return ("the job crashed with a segmentation fault (exit 139, SIGSEGV) in native code (an extension, "
                "a driver, CUDA); look at the last lines of its log (runpilot logs --tail 50)")
    return None


def start_usage_sampler(run: RunContext, launch: Launch, job: Job, config: JobConfig) -> UsageSampler:
    """Sample the job's memory, and its GPUs (when it holds some, nvidia-smi answers and --no-gpu-stats
    was not given), from now until record_usage."""
    options, folder, meta = run.options, run.folder, run.meta
    smi = None
    if options.gpu_stats and config.resources.gpus is not None:
        found = shutil.which("nvidia-smi", path=(launch.env or os.environ).get("PATH"))
        smi = [found, f"--query-gpu={GPU_STATS_QUERY}", "--format=csv,noheader,nounits"] if found else None
    gpu_log = None
    if smi:
        with contextlib.suppress(OSError):
            gpu_log = MetricLog(folder.gpu_stats)
    in_container = engine_of(launch.engine).runs_in_container
    memory = MemoryProbe(launch.engine, launch.container, None if in_container else job.proc.pid)
    return UsageSampler(gpu_log, smi if gpu_log else None, list(meta.devices), options.gpu_stats or GPU_STATS_SECONDS,
                        memory).start()


def record_usage(sampler: UsageSampler, folder: RunFolder, meta: RunMeta) -> None:
    """Stop sampling; put the job's peak memory and its GPUs' summary (and a hint if they idled) in META."""
    sampler.stop()
    usage: dict = {}
    if sampler.peak_memory is not None:
        usage.update(peak_memory=sampler.peak_memory, memory_of=getattr(sampler.memory, "source", "job"))
    if sampler.gpu_log is not None:
        gpus = summarise_gpu_stats(read_metrics(folder.gpu_stats))
        usage.update(gpus=gpus, gpu_interval=sampler.interval)
        if not gpus and sampler.gpu_errors:
            usage["gpu_error"] = sampler.gpu_errors[-1]
        if low_gpu_hint(gpus):
            usage["hint"] = low_gpu_hint(gpus)
    meta.usage = usage


# -- what a run makes: its outputs folder, and the code snapshot it runs from ---------------

def code_mount(config: JobConfig) -> Mount | None:
    return next((m for m in config.mounts if m.name == "code"), None)


def plan_code(config: JobConfig, options: RunOptions, store: RunStore) -> dict:
    """What the run's code is, as meta.json records it: the snapshot it runs from (taken now, or the
    one OPTIONS names for its folder: a sweep's, a rerun's), the live folder, or nothing (no `code`
    mount). A folder above the size limit is refused here, before anything is recorded."""
    mount = code_mount(config)
    if mount is None:
        return {}
    if options.live_code or not os.path.isdir(mount.source):
        return {"mode": "live", "folder": mount.source,
                "reason": "--live-code" if options.live_code else "the code mount is not a folder"}
    if config.code_snapshot is False:
        return {"mode": "off", "folder": mount.source, "reason": "code_snapshot: false in the config"}
    snapshots = SnapshotStore(store.home)
    recorded = options.code_snapshots.get(mount.source)
    if recorded:
        files = snapshots.manifest(recorded)
        return {"mode": "snapshot", "folder": mount.source, "snapshot": recorded, "files": len(files),
                "bytes": sum(e.get("size", 0) for e in files)}
    limit = CODE_SNAPSHOT_MAX if config.code_snapshot is True else int(config.code_snapshot)
    snap = snapshots.take(Path(mount.source), limit)
    return {"mode": "snapshot", "folder": mount.source, "snapshot": snap.snapshot_id, "files": snap.files,
            "bytes": snap.size, "listed_by": snap.listed_by}


def snapshots_once(store: RunStore, configs: list[JobConfig], options: RunOptions) -> dict[str, str]:
    """One snapshot per code folder for many runs (a sweep's points): {folder: snapshot id}."""
    taken: dict[str, str] = dict(options.code_snapshots)
    for config in configs:
        mount = code_mount(config)
        if mount is not None and mount.source not in taken:
            code = plan_code(config, dataclasses.replace(options, code_snapshots=taken), store)
            if code.get("mode") == "snapshot":
                taken[mount.source] = code["snapshot"]
    return taken


def prepare_run_files(store: RunStore, config: JobConfig, folder: RunFolder, code: dict,
                      engine: str) -> tuple[JobConfig, dict[str, str], dict[str, tuple]]:
    """Make the run's outputs folder and its private copy of the code snapshot; return the config the
    job is launched with (its `code` mount on the copy, the outputs folder mounted), the variables
    that say where they are, and the copied files' signatures (see prune_copy)."""
    try:
        folder.outputs.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create {folder.outputs}: {exc.strerror}; free some space") from exc
    copied = {}
    if code.get("mode") == "snapshot":
        copied = SnapshotStore(store.home).materialize(code["snapshot"], folder.code)
    launched, env = run_files_config(config, folder, code.get("mode") == "snapshot", engine)
    return launched, env, copied


def run_files_config(config: JobConfig, folder: RunFolder, snapshot: bool, engine: str) -> tuple[JobConfig, dict]:
    """The config a job is launched with: its `code` mount on the run's copy (SNAPSHOT), the outputs
    folder mounted (containers); and $RUNPILOT_OUTPUT_DIR (pure: --dry-run shows it too)."""
    mounts = [dataclasses.replace(m, source=str(folder.code)) if m.name == "code" and snapshot else m
              for m in config.mounts]
    if not engine_of(engine).runs_in_container:
        env = {"RUNPILOT_OUTPUT_DIR": str(folder.outputs)}
        if snapshot:
            env["RUNPILOT_MOUNT_CODE"] = str(folder.code)
    else:
        target = config.outputs or OUTPUTS_TARGET
        mounts.append(Mount(str(folder.outputs), target, False, None))
        env = {"RUNPILOT_OUTPUT_DIR": target}
    return dataclasses.replace(config, mounts=tuple(mounts)), env


def settle_run_files(folder: RunFolder, engine: str, config: JobConfig, copied: dict[str, tuple],
                     report: Reporter) -> None:
    """After the job: files it made as root belong to the user again (Docker), and the code copy
    keeps only what the job wrote or changed (the snapshot itself is in the store)."""
    if engine_of(engine).writes_as_root and os.geteuid() != 0:
        reclaim_files(engine, str(config.image), [folder.outputs, folder.code], report, folder.run_id)
    prune_copy(folder.code, copied)


def owned_by_others(path: Path) -> bool:
    uid = os.geteuid()
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                if os.lstat(os.path.join(top, name)).st_uid != uid:
                    return True
    return False


def reclaim_files(engine: str, image: str, folders: list[Path], report: Reporter, run_id: str) -> None:
    """Docker's jobs run as root: what they wrote into a bind mount is root's. Give it back to the
    user who runs RunPilot with one short container of the run's own image (chown -R)."""
    folders = [f for f in folders if f.is_dir() and owned_by_others(f)]
    if not folders:
        return
    mounts = [arg for i, f in enumerate(folders) for arg in ("-v", f"{f}:/runpilot-files/{i}")]
    argv = [engine_of(engine).program, "run", "--rm", "--pull", "never", "--user", "0:0", "--network", "none",
            "--log-driver", "none",
            *mounts, "--entrypoint", "chown", image, "-R", f"{os.geteuid()}:{os.getegid()}",
            *[f"/runpilot-files/{i}" for i in range(len(folders))]]
    done = quiet_run(argv, timeout=120)
    if done.returncode != 0:
        said = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        report(RunEvent("warning", run_id, f"the job's files in {folders[0].parent} are root's and could not be "
                                           f"given back ({said[0]}); delete them with sudo"))


def prune_copy(target: Path, copied: dict[str, tuple]) -> None:
    """Remove the files of the code copy that the job left as they were copied, then empty folders."""
    top = str(target)
    for rel, signature in copied.items():
        with contextlib.suppress(OSError):
            path = os.path.join(top, rel)
            st = os.lstat(path)
            if (st.st_ino, st.st_size, st.st_mtime_ns) == signature:
                os.unlink(path)
    if not target.is_dir():
        return
    for top, _, _ in sorted(os.walk(target, topdown=False), key=lambda item: -len(item[0])):
        with contextlib.suppress(OSError):
            if not os.path.islink(top):
                os.rmdir(top)


def fail_before_start(store: RunStore, folder: RunFolder, meta: RunMeta, exc: RunPilotError) -> None:
    """A recorded run whose job cannot start: it failed, and says why (it never stays `running`)."""
    if meta.end(FAILED, str(exc).splitlines()[0]):
        store.record(meta, strict=False)


def code_changes(old: list[dict], new: list[dict]) -> dict[str, list[str]]:
    """Files added, removed and modified from snapshot OLD to NEW (manifests)."""
    before = {e["path"]: e.get("sha256") or "link:" + str(e.get("link")) for e in old}
    after = {e["path"]: e.get("sha256") or "link:" + str(e.get("link")) for e in new}
    return {"added": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after)),
            "modified": sorted(p for p in set(before) & set(after) if before[p] != after[p])}


def fmt_code_changes(changes: dict[str, list[str]], run_id: str) -> str:
    """`the code changed since run X: 1 modified (train.py), 1 added (new.py)`."""
    parts = [f"{len(paths)} {kind} ({', '.join(paths[:5])}{', ...' if len(paths) > 5 else ''})"
             for kind, paths in changes.items() if paths]
    return f"the code changed since run {run_id}: " + ", ".join(parts) if parts else \
        f"the code is unchanged since run {run_id}"

# ==== 16. Sweeps: a grid of runs from one config =============================
# A sweep is a plan (<home>/sweeps/<id>/sweep.json) and ordinary runs, one per point, recorded
# up front as `queued`. One process runs them, a thread per running run, as many at once as
# --parallel and the GPU pool allow; every run claims its own GPUs (GpuPlacement), so a sweep
# and separate `runpilot run` commands share a machine without ever sharing a GPU.

def new_sweep_id() -> str:
    return "sw-" + new_run_id()


def check_sweep_id(sweep_id: str) -> str:
    if not SWEEP_ID_RE.match(sweep_id):
        raise UsageError(f"{visible(sweep_id)!r} is not a sweep id; sweep ids look like sw-20261201-120000-a1b2c3")
    return sweep_id


def parse_grid(items: list[str]) -> tuple[tuple[str, tuple], ...]:
    """`--grid env.LR=0.1,0.01` (or a YAML list: `env.LR=[0.1, 0.01]`) -> ((key, values), ...)."""
    axes = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not raw.strip():
            raise UsageError(f"--grid {item!r} must look like KEY=V1,V2,..., e.g. --grid env.LR=0.1,0.01")
        if raw.strip().startswith("["):
            parts, values = parse_override(item, "--grid")
        else:
            pieces = [parse_override(f"{key}={value}", "--grid") for value in raw.split(",")]
            parts, values = pieces[0][0], [value for _, value in pieces]
        if not isinstance(values, list) or not values or any(isinstance(v, (dict, list)) for v in values):
            raise UsageError(f"--grid {item!r} must give one or more plain values: --grid {key}=0.1,0.01")
        name = ".".join(parts)
        if (twice := repeated_value(values)) is not None:
            raise UsageError(f"--grid {name} gives the value {_shown(twice[0])} twice, which would run the same "
                             "point twice; give each value once (--repeat N runs every point N times)")
        if any(name == seen for seen, _ in axes):
            raise UsageError(f"--grid {name} is given twice; give each key once, with all its values")
        axes.append((name, tuple(values)))
    return tuple(axes)


@dataclass(frozen=True)
class SweepPoint:
    """One point of the grid: a value per swept key, and which repeat of it this is."""

    index: int
    values: tuple[tuple[str, object], ...]
    repeat: int

    def label(self, repeats: int) -> str:
        text = ",".join(f"{key.rsplit('.', 1)[-1]}={fmt_scalar(value)}" for key, value in self.values)
        return text + (f",repeat={self.repeat}" if repeats > 1 else "")


class SweepPlan:
    """The points of a grid as a read-only sequence: counted from the axes, and each point made
    from its index when asked for, so a plan of a million points costs no more than its axes."""

    def __init__(self, axes: tuple[tuple[str, tuple], ...], repeat: int) -> None:
        self.axes, self.repeat = axes, repeat
        self.count = math.prod(len(values) for _, values in axes) * repeat

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int | slice) -> "SweepPoint | list[SweepPoint]":
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if not -self.count <= index < self.count:
            raise IndexError(f"point {index} of {self.count}")
        index %= self.count
        combo, repeat = divmod(index, self.repeat)
        values = []
        for key, choices in reversed(self.axes):  # the last key varies fastest
            combo, at = divmod(combo, len(choices))
            values.append((key, choices[at]))
        return SweepPoint(index, tuple(reversed(values)), repeat)

    def __iter__(self) -> Iterator[SweepPoint]:
        return (self[i] for i in range(self.count))


def sweep_points(axes: tuple[tuple[str, tuple], ...], repeat: int) -> SweepPlan:
    """The Cartesian product of the axes (the first key varies slowest), each point REPEAT times."""
    return SweepPlan(axes, repeat)


class PointConfigs:
    """(point, its config) for each point of a plan, the config validated when first asked for:
    a dry run checks the points it prints, a sweep every point before it records one."""

    def __init__(self, points: SweepPlan, configure: Callable[[SweepPoint], JobConfig]) -> None:
        self.points, self.configure = points, configure
        self.made: dict[int, JobConfig] = {}

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, index: int | slice) -> "tuple[SweepPoint, JobConfig] | list[tuple[SweepPoint, JobConfig]]":
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        point = self.points[index]
        if point.index not in self.made:
            self.made[point.index] = self.configure(point)
        return point, self.made[point.index]

    def __iter__(self) -> Iterator[tuple[SweepPoint, JobConfig]]:
        return (self[i] for i in range(len(self)))

    def check(self, count: int) -> None:
        """Validate the first COUNT points' configs (a bad value raises, blamed on its point)."""
        for i in range(min(count, len(self))):
            self[i]  # made, validated and kept


def check_sweep_size(axes: tuple[tuple[str, tuple], ...], repeat: int, limit: int) -> int:
    """How many points the grid has (counted, not built); more than LIMIT is refused."""
    count = len(SweepPlan(axes, repeat))
    if count > limit:
        shape = " x ".join([f"{len(v)} {k}" for k, v in axes] + ([f"{repeat} repeats"] if repeat > 1 else []))
        raise UsageError(f"the sweep has {count} points ({shape}), more than the limit of {limit}; give fewer "
                         f"values, or --max-points {count} to run them all")
    return count


def point_config(data: object, path: str, text: str, positions: dict, blamed: dict, point: SweepPoint,
                 repeats: int, from_grid: bool = True) -> JobConfig:
    """The config of one point: the file's data with --set and the point's values applied; a
    problem with a value is blamed on its --grid, or on its line of the file's sweep: section."""
    data = json.loads(json.dumps(data))  # a private copy (the data is plain JSON-like values)
    if isinstance(data, dict):
        data.pop("sweep", None)
    for key, value in point.values:
        data = set_dotted(data, tuple(key.split(".")), value, f"sweep key {key}")
    blamed = {**blamed, **{tuple(k.split(".")): _sweep_blame(k, v, point, path, positions, from_grid)
                           for k, v in point.values}}
    config = validate_config(data, path, text, positions, overrides=blamed)
    return dataclasses.replace(config, name=f"{config.name}[{point.label(repeats)}]")


def _sweep_blame(key: str, value: object, point: SweepPoint, path: str, positions: dict, from_grid: bool) -> str:
    where = f"--grid {key}" if from_grid else path
    line, col = positions.get(("sweep", key), (None, None))
    if not from_grid and line:
        where += f":{line}:{col}"
    return f"{where} (point {point.index + 1}: {key}={fmt_scalar(value)})"


@dataclass(eq=False)
class SweepOptions(MetaPart):
    """How a sweep's runs run, sweep.json's `options`: kept so that `sweep --resume` runs the rest
    the same way. Written back under the keys it was read or built with, in their order (sweep.json
    is not sorted); a wrongly typed value is kept as it was, never used; a backend's own keys
    (`pull_outputs` of --on ssh) are read by that backend alone."""

    on: str | None = None               # where the runs execute: None (here), slurm, ssh:HOST,...
    engine: str | None = None
    tags: dict = field(default_factory=dict)
    gpus: list[str] | None = None       # --gpus: the pool
    parallel: int | None = None
    fail_fast: bool | None = None
    stop_timeout: float | None = None
    pull: str | None = None
    overrides: list[str] = field(default_factory=list)   # --set
    no_gpu_check: bool | None = None
    no_wait: bool | None = None
    engine_logs: bool | None = None
    code_snapshots: dict = field(default_factory=dict)
    live_code: bool | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_data(cls, data: dict) -> "SweepOptions":
        options = super().from_data(data)
        options.__dict__["_order"] = list(data)
        return options

    def to_data(self) -> dict:
        data = super().to_data()
        order = self.__dict__.get("_order", [])
        return {**{k: data[k] for k in order if k in data}, **data}

    def get(self, key: str, default: object = None) -> object:
        """The value sweep.json holds under KEY, for the backend whose key it is (see the class)."""
        return self.to_data().get(key, default)


@dataclass(eq=False)
class PlannedPoint:
    """A point of a recorded sweep, an entry of sweep.json's `points`: the grid point (INDEX, VALUES
    as [[key, value], ...], REPEAT), the run that runs it, and the runs a `--resume` replaced
    (EARLIER, oldest first). Written back under the same keys in the same order; keys this version
    does not know are kept (EXTRA). sweep_file_problem checks the shape before one is made."""

    index: int
    values: list
    repeat: int
    run_id: str
    earlier: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    KEYS = ("index", "values", "repeat", "run_id", "earlier")

    @classmethod
    def from_data(cls, data: dict) -> "PlannedPoint":
        return cls(data["index"], data.get("values", []), data.get("repeat", 0), data["run_id"],
                   list(data.get("earlier", [])), {k: v for k, v in data.items() if k not in cls.KEYS})

    def to_data(self) -> dict:
        data = {"index": self.index, "values": self.values, "repeat": self.repeat, "run_id": self.run_id}
        return {**data, **({"earlier": self.earlier} if self.earlier else {}), **self.extra}

    def grid_point(self) -> SweepPoint:
        return SweepPoint(self.index, tuple((k, v) for k, v in self.values), self.repeat)

    def replaced_by(self, run_id: str) -> None:
        """A `--resume` runs the point again as RUN_ID: the run it had becomes an earlier one."""
        self.earlier.append(self.run_id)
        self.run_id = run_id


@dataclass
class Sweep:
    """A sweep's plan, kept in sweep.json: what to run, and which run is which point."""

    sweep_id: str
    config_file: str | None
    axes: list                          # [[key, [values]], ...]
    repeat: int
    points: list[PlannedPoint]          # index, values, repeat, run_id (earlier)
    options: SweepOptions               # engine, pull, stop_timeout, tags, gpus, parallel, fail_fast
    created_at: str = ""
    runner: dict = field(default_factory=dict)

    def __setattr__(self, name: str, value: object) -> None:  # options and points as sweep.json holds them: typed
        if name == "options" and isinstance(value, dict):
            value = SweepOptions.from_data(value)
        elif name == "points" and isinstance(value, list):
            value = [PlannedPoint.from_data(p) if isinstance(p, dict) else p for p in value]
        object.__setattr__(self, name, value)

    @classmethod
    def load(cls, store: RunStore, sweep_id: str) -> "Sweep":
        path = store.sweep_folder(check_sweep_id(sweep_id)).plan
        try:
            data = read_json_file(path)
            problem = sweep_file_problem(data)
            if problem:
                raise ValueError(problem)
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        except FileNotFoundError:
            raise UsageError(f"there is no sweep {sweep_id}; see runpilot sweeps") from None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise StoreError(f"cannot read {path}: {exc}; the sweep's runs are still listed by "
                             "'runpilot list' (restore the file, or start a new sweep)") from exc

    def save(self, store: RunStore) -> None:
        folder = store.sweep_folder(self.sweep_id)
        make_private_dirs(folder.path)
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data.update(options=self.options.to_data(), points=[p.to_data() for p in self.points])
        write_atomic(folder.plan, (json.dumps(data, indent=2) + "\n").encode())


def sweep_file_problem(data: object) -> str | None:
    """What is wrongly typed in a parsed sweep.json (None when its shape is the one Sweep.save writes)."""
    if not isinstance(data, dict):
        return "it is not a JSON object"
    for key, kind, name in (("sweep_id", str, "a text"), ("points", list, "a list"), ("options", dict, "an object"),
                            ("axes", list, "a list"), ("runner", dict, "an object"), ("repeat", int, "a number")):
        if key in data and not isinstance(data[key], kind) or key in ("sweep_id", "points") and key not in data:
            return f"'{key}' must be {name}"
    for n, point in enumerate(data["points"], 1):
        if not isinstance(point, dict) or not isinstance(point.get("run_id"), str) \
                or not RUN_ID_RE.match(point["run_id"]) or not isinstance(point.get("index"), int) \
                or not isinstance(point.get("repeat", 0), int) or not _pairs(point.get("values", [])) \
                or not isinstance(point.get("earlier", []), list) \
                or not all(isinstance(r, str) and RUN_ID_RE.match(r) for r in point.get("earlier", [])):
            return f"point {n} of 'points' is not an object with a run_id, an index and values"
    return None


def _pairs(values: object) -> bool:
    return isinstance(values, list) and all(isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
                                            for v in values)


def plan_sweep(store: RunStore, sweep_id: str, configs: list[tuple[SweepPoint, JobConfig]], axes,
               repeat: int, options: "SweepOptions | dict", config_file: str | None) -> Sweep:
    """Record every point as a queued run (folder, config.yaml, meta.json, one index transaction)."""
    store.ensure()
    sweep = Sweep(sweep_id, config_file, [[k, list(v)] for k, v in axes], repeat, [], options, utc_now(),
                  runner_identity())
    metas = []
    for point, config in configs:
        folder = store.create_run_dir()
        meta = queued_meta(config, folder.run_id, sweep, point)
        record_start_queued(folder, config, meta)
        metas.append(meta)
        sweep.points.append(PlannedPoint(point.index, [[k, v] for k, v in point.values], point.repeat, folder.run_id))
    sweep.save(store)
    store.save_all_or_defer(metas)
    return sweep


def in_plan_order(store: RunStore, sweep_id: str, records: list[RunRecord]) -> list[RunRecord]:
    """A sweep's runs in the order of its plan, a point's earlier runs (before a --resume) first."""
    try:
        sweep = Sweep.load(store, sweep_id)
    except RunPilotError:
        return records
    rank: dict[str, int] = {}
    for point in sweep.points:
        for run_id in [*point.earlier, point.run_id]:
            rank[run_id] = len(rank)
    return sorted(records, key=lambda record: rank.get(record.id, len(rank)))


def queued_meta(config: JobConfig, run_id: str, sweep: Sweep, point: SweepPoint) -> RunMeta:
    return RunMeta(run_id=run_id, name=config.name, status=QUEUED, started_at=utc_now(), engine=config.engine,
                   image=config.image, config_file=config.source, config=config_to_dict(config),
                   metric_names=list(config.metrics), runner=dict(sweep.runner), host=hostname(),
                   tags=dict(sweep.options.tags),
                   sweep={"id": sweep.sweep_id, "index": point.index, "repeat": point.repeat,
                          "point": {k: v for k, v in point.values}})


def record_start_queued(folder: RunFolder, config: JobConfig, meta: RunMeta) -> None:
    try:
        write_private(folder.config, dump_yaml(config_to_dict(config)).encode("utf-8"))
        folder.write_meta(meta, durable=False)
    except OSError as exc:
        shutil.rmtree(folder.path, ignore_errors=True)
        raise StoreError(f"cannot record the sweep in {folder.path.parent}: {exc.strerror}") from exc


def sweep_parallel(configs: list[JobConfig], options: RunOptions, asked: int | None, environ) -> int:
    """How many runs at once: --parallel if given; for runs with GPUs, as many as the pool holds."""
    if asked:
        return asked
    wanted = configs[0].resources.gpus if configs else None
    if wanted is None:
        return 1
    pool = options.gpu_pool or [str(d["index"]) for d in query_gpus(environ).get("devices") or []]
    per_run = wanted if isinstance(wanted, int) else len(pool) if wanted == "all" else len(wanted)
    return max(1, len(pool) // max(1, per_run)) if not isinstance(wanted, tuple) else 1


class SweepRunner:
    """Runs a sweep's queued points: a thread per running run, signals forwarded to each."""

    def __init__(self, store: RunStore, sweep: Sweep, jobs: list[tuple[dict, JobConfig]], options: RunOptions,
                 parallel: int, fail_fast: bool, terminal: Terminal | None, report: Reporter) -> None:
        self.store, self.sweep, self.options = store, sweep, options
        self.pending = list(jobs)
        self.parallel, self.fail_fast = parallel, fail_fast
        self.terminal, self.report = terminal, report
        self.running: dict[str, tuple[threading.Thread, StopSignals]] = {}
        self.outcomes: dict[str, RunOutcome | RunPilotError] = {}
        self.ended = threading.Condition()   # notified when a run's thread is done
        self.stopping: int | None = None   # the signal that stopped the sweep
        self.halted = False                # no more points start (a stop, or --fail-fast)
        self.requests = store.sweep_folder(sweep.sweep_id).stop_requests  # `runpilot stop RUN_ID` of one point

    def run(self, signals: StopSignals) -> int:
        """Run every point; RunPilot's exit status: 0, 1 if a run did not succeed, 128+N when stopped."""
        handled = 0
        while self.pending or self.running:
            for signum in signals.received[handled:]:
                self.stop(signum)
            handled = len(signals.received)
            self.stop_requested_runs()
            while self.pending and len(self.running) < self.parallel and not self.halted:
                self.start(*self.pending.pop(0))
            with self.ended:  # a freed slot is filled at once; signals are looked at between runs' ends
                self.ended.wait_for(lambda: any(run_id in self.outcomes for run_id in self.running), POLL_SECONDS)
            for run_id in [r for r in self.running if r in self.outcomes]:
                self.running[run_id][0].join()
                del self.running[run_id]
                self.after(run_id)
        if self.stopping is not None:
            return 128 + self.stopping
        return 0 if all(isinstance(o, RunOutcome) and o.record.status == SUCCEEDED
                        for o in self.outcomes.values()) else 1

    def start(self, point: dict, config: JobConfig) -> None:
        mailbox = StopSignals()
        options = dataclasses.replace(
            self.options, run_id=point.run_id, overrides=list(self.options.overrides) + [
                f"{k}={fmt_scalar(v)}" for k, v in point.values],
            sweep={"id": self.sweep.sweep_id, "index": point.index, "repeat": point.repeat,
                   "point": {k: v for k, v in point.values}},
            extra_env={"RUNPILOT_SWEEP_ID": self.sweep.sweep_id, "RUNPILOT_SWEEP_POINT": str(point.index),
                       "RUNPILOT_REPEAT": str(point.repeat)})
        thread = threading.Thread(target=self._work, args=(config, options, mailbox), daemon=True)
        self.running[point.run_id] = (thread, mailbox)
        thread.start()

    def _work(self, config: JobConfig, options: RunOptions, mailbox: StopSignals) -> None:
        run_id = str(options.run_id)
        try:
            outcome: RunOutcome | RunPilotError = run_job(config, options, self.store, self.terminal, self.report,
                                                          signals=mailbox)
        except RunPilotError as exc:  # failed before the job started: the point must not stay queued
            outcome = exc
            self._record_failure(run_id, exc)
        with self.ended:
            self.outcomes[run_id] = outcome
            self.ended.notify_all()

    def _record_failure(self, run_id: str, exc: RunPilotError) -> None:
        folder = self.store.folder(run_id)
        meta = folder.read_meta()
        if not meta.end(FAILED, str(exc).splitlines()[0]):
            return
        self.store.record(meta, strict=False)
        self.report(RunEvent("warning", run_id, f"run {run_id} could not start: {meta.reason}"))

    def after(self, run_id: str) -> None:
        outcome = self.outcomes.get(run_id)
        failed = not isinstance(outcome, RunOutcome) or outcome.record.status != SUCCEEDED
        if failed and self.fail_fast and not self.halted:
            why = f"--fail-fast: run {run_id} did not succeed"
            self.report(RunEvent("stopping", run_id, f"{why}; stopping the sweep"))
            self.stop(signal.SIGTERM, why)

    def stop(self, signum: int, why: str | None = None) -> None:
        """Stop the running runs as `run` would, and cancel the points not started yet. WHY, when
        given, is a reason other than a signal (--fail-fast): it sets no exit status of its own."""
        if why is None:
            self.stopping = self.stopping or signum
        for _, mailbox in self.running.values():
            mailbox.received.append(signum)
        if not self.halted:
            self.halted = True
            for point, _ in self.pending:
                cancel_queued(self.store, point.run_id, None if why else signum, why)
            if self.pending:
                self.report(RunEvent("stopping", None, f"cancelled {len(self.pending)} point(s) not started yet"))
            self.pending = []

    def stop_requested_runs(self) -> None:
        """`runpilot stop RUN_ID` of one point leaves a request file: stop that run, or cancel it."""
        try:
            requested = [path for path in self.requests.iterdir() if RUN_ID_RE.match(path.name)]
        except OSError:
            return
        for path in requested:
            with contextlib.suppress(OSError):
                path.unlink()
            if path.name in self.running:
                self.running[path.name][1].received.append(signal.SIGTERM)
            for point, config in [job for job in self.pending if job[0].run_id == path.name]:
                self.pending.remove((point, config))
                cancel_queued(self.store, path.name, signal.SIGTERM, "stopped with runpilot stop before it started")


def fmt_sweep_statuses(sweep_id: str, statuses: list[str]) -> str:
    """`sweep sw-...: 2 interrupted, 1 cancelled`, what `runpilot stop SWEEP_ID` says."""
    return f"sweep {sweep_id}: " + ", ".join(f"{statuses.count(s)} {s}" for s in STATUSES if s in statuses)


def cancel_queued(store: RunStore, run_id: str, signum: int | None, why: str | None = None) -> None:
    folder = store.folder(run_id)
    meta = folder.read_meta()
    if meta.status == QUEUED and meta.end(CANCELLED, why or "the sweep was stopped before this point started",
                                          stop_signal=signum):
        store.record(meta, strict=False)


SWEEP_REF_RE = re.compile(r"(sw-)?[0-9a-f-]{1,22}\Z")


def sweep_ids(store: RunStore) -> list[str]:
    """The sweeps this home holds (their folders), newest first: ids begin with their start second,
    and sweeps of the same second are ordered by the time their plan records."""
    try:
        names = store.sweep_names()
    except OSError:
        return []
    seconds = [name[3:18] for name in names]
    return sorted(names, key=lambda name: (name[3:18], _created_at(store, name) if seconds.count(name[3:18]) > 1
                                           else ""), reverse=True)


def _created_at(store: RunStore, sweep_id: str) -> str:
    try:
        created = read_json_file(store.sweep_folder(sweep_id).plan).get("created_at")
    except (OSError, ValueError, AttributeError):
        return ""
    return created if isinstance(created, str) else ""


def find_sweep(store: RunStore, ref: str) -> str:
    """A sweep's full id from what a user typed, as runs are named: the full id, a unique prefix
    (`sw-20261201-23`), its short id (`391ffe` or `sw-391ffe`), `latest` or `-N` (the N-th newest)."""
    ids = sweep_ids(store)
    if ref in ("latest", "last") or re.fullmatch(r"-[1-9]\d*", ref):
        offset = 0 if not ref.startswith("-") else int(ref[1:]) - 1
        if len(ids) <= offset:
            raise UsageError(f"there is no sweep {ref!r} yet; start one with runpilot sweep CONFIG --grid KEY=V1,V2")
        return ids[offset]
    if re.fullmatch(r"-0+", ref):
        raise UsageError(f"{ref!r} names no sweep: -1 is the newest, -2 the one before")
    if not SWEEP_REF_RE.match(ref):
        raise UsageError(f"{visible(ref)!r} is not a sweep id; sweep ids look like sw-20261201-120000-a1b2c3, or "
                         "a1b2c3 for short (see runpilot sweeps)")
    bare = ref.removeprefix("sw-")
    found = [i for i in ids if i.startswith(ref) or i[3:].startswith(bare)]
    if not found and re.fullmatch(r"[0-9a-f]{6}", bare):
        found = [i for i in ids if i.endswith("-" + bare)]
    if ref in found or (not found and SWEEP_ID_RE.match(ref)):
        return ref  # a full id: Sweep.load says it if it is not there
    if not found:
        raise UsageError(f"no sweep matches {ref!r}; see runpilot sweeps")
    if len(found) > 1:
        raise UsageError(f"{ref!r} matches several sweeps ({', '.join(sorted(found)[:5])}"
                         f"{', ...' if len(found) > 5 else ''}); give more of the id")
    return found[0]


def sweep_point_values(sweep: Sweep) -> dict[str, dict]:
    """Each run of a sweep (earlier runs of a point too) -> its point's values, `repeat` included."""
    values = {}
    for point in sweep.points:
        entry = {str(k): v for k, v in point.values}
        entry["repeat"] = point.repeat
        for run_id in [*point.earlier, point.run_id]:
            values[run_id] = entry
    return values


@dataclass(frozen=True)
class SweepSummary:
    """A line of `runpilot sweeps`: a sweep, how far it is, and its best value of the first metric.
    DONE counts the points that finished (succeeded, failed, timeout): those `--resume` leaves alone."""

    sweep_id: str
    name: str
    created_at: str
    on: str
    total: int
    done: int
    statuses: dict
    metric: str | None = None
    best: object = None
    best_run: str | None = None

    def json(self) -> dict:
        return {"id": self.sweep_id, "name": self.name, "created_at": self.created_at, "on": self.on,
                "points": self.total, "done": self.done, "statuses": self.statuses,
                "best": None if self.metric is None else {"metric": self.metric, "value": self.best,
                                                          "run_id": self.best_run}}


def base_name(name: str) -> str:
    """A sweep run's name without its point: `synth-cnn[LR=0.1]` -> `synth-cnn`. The point begins at
    the last `[KEY=`, not the last `[`: a swept value may hold one (`a[0]`, a control sequence)."""
    return name[:point_start(name)]


def point_start(name: str) -> int:
    """Where a sweep run's point (`[LR=0.1]`) begins in its NAME: the last `[KEY=`; len(NAME) if none."""
    starts = [m.start() for m in re.finditer(r"\[[^\W\d][\w.-]*=", name)] if name.endswith("]") else []
    return starts[-1] if starts else len(name)


def summarize_sweep(sweep: Sweep, records: dict[str, RunRecord]) -> SweepSummary:
    """The summary of a sweep from its plan and the current run of each point (RECORDS by id)."""
    current = [records[p.run_id] for p in sweep.points if p.run_id in records]
    statuses = [r.status for r in current]
    counts = {s: statuses.count(s) for s in STATUSES if s in statuses}
    metric = next((m for r in current for m in r.metric_names), None) or \
        next((m for r in current for m in sorted(r.last_metrics)), None)
    scored = [(r.last_metrics.get(metric), r.id) for r in current if metric]
    best = best_of(metric, [v for v, _ in scored]) if metric else None
    name = next((base_name(r.name) for r in current), "") or Path(str(sweep.config_file or "-")).name
    done = sum(s in (SUCCEEDED, FAILED, TIMEOUT) for s in statuses)
    return SweepSummary(sweep.sweep_id, name, str(sweep.created_at), sweep.options.on or "here",
                        len(sweep.points), done, counts, metric, best,
                        next((i for v, i in scored if best is not None and v == best), None))

@contextlib.contextmanager
def held_sweep(store: RunStore, sweep_id: str) -> Iterator[None]:
    """Hold sweep SWEEP_ID for the duration (see hold_sweep)."""
    fd = hold_sweep(store, sweep_id)
    try:
        yield
    finally:
        os.close(fd)


def hold_sweep(store: RunStore, sweep_id: str) -> int:
    """Take sweep SWEEP_ID for this process alone: an flock on `sweeps/<id>/runner.lock`, held
    until the descriptor is closed or the process ends (the kernel lets go however it ends).
    Refuses when another runner runs or resumes it, so that no point is ever run twice at once."""
    folder = store.sweep_folder(check_sweep_id(sweep_id))
    try:
        fd = os.open(folder.runner_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except FileNotFoundError:
        raise UsageError(f"there is no sweep {sweep_id}; see runpilot list") from None
    except OSError as e:
        raise StoreError(f"cannot open {folder.runner_lock}: {e.strerror}; check the home's permissions") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        holder: object = "?"
        with contextlib.suppress(RunPilotError, OSError):
            holder = flock_holders().get(_lock_key(os.stat(folder.runner_lock)), "?")
        raise UsageError(f"sweep {sweep_id} is being run by another runpilot (pid {holder}); wait for it to end, "
                         f"or stop it first (runpilot stop {sweep_id})") from None
    return fd


def still_running_elsewhere(store: RunStore, sweep: Sweep, point: dict, meta: RunMeta) -> bool:
    """Whether a point's run lost its runner while its job (container or process group) lives on:
    such a point is reported and left alone, never run a second time beside it."""
    if meta.status not in (RUNNING, LOST) or not outlived_its_runner(store, point.run_id):
        return False
    note(f"point {point.index + 1} of sweep {sweep.sweep_id} is not resumed: its run {point.run_id} is "
         f"still running (its runner died, its job lives on); 'runpilot stop {point.run_id}' ends it")
    return True


# ==== 17. Slurm: the same config on a cluster ================================
# `--on slurm` records the run as `queued`, copies this very file into the run folder, and
# submits a batch script that runs it on the node (`runpilot.py _slurm-job FOLDER`): the job
# runs there with the config's engine and writes only its own run folder, whole files renamed
# into place (the home is shared over NFS or Lustre, where SQLite's locks are unsafe). The
# submit side keeps the index: every look at the runs asks squeue once for all active jobs,
# and scontrol (or sacct) for the few that left the queue without a final status.

# Slurm's job states (squeue %T, scontrol JobState) -> a status, for a job whose runner wrote
# none; states missing here (COMPLETING, STAGE_OUT, ...) count as running.
SLURM_FINAL = {"COMPLETED": LOST, "FAILED": FAILED, "CANCELLED": INTERRUPTED, "TIMEOUT": TIMEOUT,
               "DEADLINE": TIMEOUT, "OUT_OF_MEMORY": FAILED, "NODE_FAIL": LOST, "BOOT_FAIL": LOST,
               "PREEMPTED": LOST, "SPECIAL_EXIT": FAILED, "REVOKED": LOST}
SLURM_QUEUED = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "CONFIGURING")
# Between the config's timeout and Slurm's --time: RunPilot's own stop comes first and is recorded.
SLURM_TIME_MARGIN = 300
SQUEUE_FORMAT = "%i|%T|%r|%N|%P"


def slurm_status(state: str) -> str:
    """RunPilot's status for a Slurm job state (`CANCELLED by 0` is CANCELLED)."""
    state = state.split()[0].rstrip("+") if state else ""
    if state in SLURM_QUEUED:
        return QUEUED
    return SLURM_FINAL.get(state, RUNNING)


def parse_squeue(text: str) -> dict[str, dict]:
    """Rows of `squeue -h -r -o '%i|%T|%r|%N|%P'`, by job id (`123`, or `123_4` for an array task)."""
    jobs = {}
    for line in text.splitlines():
        cells = line.strip().split("|")
        if len(cells) == 5 and cells[0]:
            jobs[cells[0]] = {"state": cells[1], "reason": cells[2] if cells[2] not in ("None", "(null)") else None,
                              "node": cells[3] or None, "partition": cells[4] or None}
    return jobs


def _unsplit_array_row(queue: dict[str, dict], job: str) -> dict | None:
    """The row of array task JOB (`320_0`) when Slurm lists only its array (`320`): tasks cancelled
    while pending together (Ctrl-C, `stop` of a queued sweep) were never split into rows of their own,
    and without this row they would be recorded `lost`."""
    array, sep, _ = job.partition("_")
    return queue.get(array) if sep else None


def parse_scontrol(text: str) -> dict[str, str]:
    """`scontrol show job -o ID`'s Key=Value pairs (values up to the next space)."""
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def sbatch_lines(config: JobConfig, script_name: str, output: str, array: str | None = None) -> list[str]:
    """The #SBATCH options for a config: resources and the slurm: section (pure)."""
    s, res = config.slurm, config.resources
    lines = [f"--job-name=runpilot-{script_name}", f"--output={output}", "--nodes=1", "--ntasks=1"]
    time_limit = s.time or (slurm_time(config.timeout + SLURM_TIME_MARGIN) if config.timeout else None)
    for flag, value in (("partition", s.partition), ("time", time_limit), ("account", s.account),
                        ("qos", s.qos), ("constraint", s.constraint)):
        if value:
            lines.append(f"--{flag}={value}")
    if res.gpus is not None:
        count = len(res.gpus) if isinstance(res.gpus, tuple) else res.gpus
        if count == "all":
            raise ConfigError("resources.gpus: all cannot be asked of Slurm; give a count", config.source)
        lines.append(f"--gres=gpu:{count}" if s.gpu_flag == "gres" else f"--gpus={count}")
    if res.cpu is not None:
        lines.append(f"--cpus-per-task={math.ceil(res.cpu)}")
    if res.memory is not None:
        lines.append(f"--mem={max(1, math.ceil(res.memory / (1 << 20)))}M")
    if array:
        lines.append(f"--array={array}")
    return lines + list(s.extra)


def slurm_script(config: JobConfig, options: list[str], program: Path, target: str) -> str:
    """The batch script: #SBATCH lines, the setup lines, then RunPilot on the node."""
    head = ["#!/bin/sh", f"# Written by RunPilot {__version__}: the job of {target}. One node per run."]
    body = list(config.slurm.setup) + [
        f"exec {shlex.quote(config.slurm.python)} {shlex.quote(str(program))} _slurm-job {shlex.quote(target)}"]
    return "\n".join(head + [f"#SBATCH {line}" for line in options] + body) + "\n"


def sbatch(script: Path) -> str:
    """Submit a batch script; the job id, or SlurmError with sbatch's own words."""
    if not shutil.which("sbatch"):
        raise SlurmError("sbatch is not installed here; run this on a Slurm login node (where sbatch works)")
    done = quiet_run(["sbatch", "--parsable", str(script)], timeout=120)
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip() and not line.startswith("Try ")]
        said = lines[-1] if lines else f"exit status {done.returncode}"
        raise SlurmError(f"sbatch refused the job: {said}; check the slurm: section of the config")
    return done.stdout.strip().split(";")[0]


def slurm_queued_meta(config: JobConfig, run_id: str, options: RunOptions) -> RunMeta:
    meta = new_meta(config, run_id, config.engine or "docker", options, {})
    meta.status, meta.runner, meta.host = QUEUED, {}, None
    meta.slurm = SlurmState.from_data({"partition": config.slurm.partition, "state": "PENDING",
                                       "submitted_from": hostname(),
                                       "options": {"stop_timeout": options.stop_timeout, "pull": options.pull,
                                                   "keep_engine_logs": options.keep_engine_logs}})
    return meta


def copy_program(target: Path) -> None:
    """Put the very runpilot.py that submits beside the run: the node runs exactly this version."""
    shutil.copyfile(os.path.abspath(__file__), target)
    os.chmod(target, 0o600)


def submit_run(store: RunStore, config: JobConfig, options: RunOptions) -> RunMeta:
    """Record a queued run, write its batch script and submit it; nothing is left if sbatch refuses."""
    folder = store.create_run_dir()
    try:
        meta = slurm_queued_meta(config, folder.run_id, options)
        meta.code = plan_code(config, options, store)  # taken here: the node runs this snapshot
        record_start_queued(folder, config, meta)
        copy_program(folder.program)
        lines = sbatch_lines(config, short_id(folder.run_id), str(folder.path / "slurm-%j.out"))
        write_private(folder.batch_script, slurm_script(config, lines, folder.program, str(folder.path)).encode())
        meta.slurm.job_id = sbatch(folder.batch_script)
    except BaseException:
        shutil.rmtree(folder.path, ignore_errors=True)
        raise
    folder.write_meta(meta)
    store.save_or_defer(meta)
    return meta


def submit_sweep(store: RunStore, sweep_id: str, configs: list[tuple[SweepPoint, JobConfig]], axes, repeat: int,
                 options: RunOptions, parallel: int | None, stored: dict) -> Sweep:
    """Record the sweep's points and submit them as one job array (`%N` from --parallel)."""
    swept = {key.split(".")[0] for key, _ in axes}
    if swept & {"resources", "slurm"}:
        raise UsageError("a Slurm job array gives every point the same resources and slurm settings; sweep "
                         "other keys, or submit the points one by one with runpilot run --on slurm")
    first = configs[0][1]
    sweep = plan_sweep(store, sweep_id, configs, axes, repeat, stored, first.source)
    folder = store.sweep_folder(sweep_id)
    try:
        copy_program(folder.program)
        listing = "".join(f"{store.folder(p.run_id).path}\n" for p in sweep.points)
        write_private(folder.run_list, listing.encode())
        array = f"0-{len(sweep.points) - 1}" + (f"%{parallel}" if parallel else "")
        longest, own = sweep_time_limits([c for _, c in configs])
        array_config = dataclasses.replace(first, slurm=dataclasses.replace(first.slurm, time=longest)) \
            if longest else first
        lines = sbatch_lines(array_config, sweep_id, str(folder.task_output), array)
        write_private(folder.batch_script, slurm_script(first, lines, folder.program,
                                                        str(folder.run_list)).encode())
        array_id = sbatch(folder.batch_script)
        for index, limit in enumerate(own):  # each task down to its own point's limit (users may lower one)
            if limit and longest and parse_slurm_time(limit) < parse_slurm_time(longest):
                quiet_run(["scontrol", "update", f"JobId={array_id}_{index}", f"TimeLimit={limit}"], timeout=30)
    except BaseException:
        for point in sweep.points:
            with contextlib.suppress(RunPilotError):
                store.delete(point.run_id)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    for point, (_, config) in zip(sweep.points, configs):
        run = store.folder(point.run_id)
        meta = run.read_meta()
        meta.code = plan_code(config, options, store)  # the sweep's one snapshot (see slurm_sweep_cli)
        meta.slurm = slurm_queued_meta(first, run.run_id, options).slurm
        meta.slurm.job_id, meta.slurm.array_job_id = f"{array_id}_{point.index}", array_id
        meta.slurm.array_task_id = point.index
        run.write_meta(meta, durable=False)
        store.save_or_defer(meta)
    return sweep


def slurm_refresh(store: RunStore, records: list[RunRecord], note: Callable[[str], None]) -> dict[str, RunRecord]:
    """Bring every active Slurm run up to date with one squeue call (see the section's header);
    returns them by id, as they are now.

    `squeue -t all` also lists jobs that ended in the last minutes, with their final state; a
    job's runner's own final status (meta.json) always wins over Slurm's state.
    """
    active = store.active_runs("slurm") if not records or any(r.backend == "slurm" for r in records) else []
    if not active or not shutil.which("squeue"):
        return {r.id: r for r in active}
    done = quiet_run(["squeue", "-h", "-r", "--me", "-t", "all", "-o", SQUEUE_FORMAT], timeout=60)
    if done.returncode != 0:
        note(f"squeue failed ({done.stderr.strip()[:200]}); Slurm runs are shown as last known")
        return {r.id: r for r in active}
    queue = parse_squeue(done.stdout)
    changed = []
    for record in active:
        job = queue.get(str(record.backend_ref)) or _unsplit_array_row(queue, str(record.backend_ref))
        status = slurm_status(job["state"]) if job else None
        if status in ACTIVE_STATUSES:
            reason = job["reason"] if status == QUEUED else None  # type: ignore[index]
            if (status, reason) != (record.status, record.reason):
                record.status, record.reason = status, reason
                changed.append(record)
        else:
            changed.append(_slurm_ended(store, record, job))
    with contextlib.suppress(StoreError):
        store.save_records(changed)
    return {r.id: r for r in active} | {r.id: r for r in changed}


def _slurm_ended(store: RunStore, record: RunRecord, job: dict | None) -> RunRecord:
    """A job that ended: its runner's final status, else Slurm's final state, recorded in meta.json
    (with Slurm's last word in its slurm block either way).

    The job is gone, so the submit side may write the run folder now.
    """
    folder = store.folder(record.id)
    meta = folder.read_meta()
    state, info = _slurm_final_state(record, job, ask=not (meta.final and job))
    meta.slurm.state, meta.slurm.node = state or "unknown", info.get("NodeList") or meta.slurm.node
    meta.slurm.reason = info.get("Reason") if info.get("Reason") not in (None, "None") else None
    if not meta.final:
        _record_slurm_ending(meta, state, info, store.home, seen_running=record.status == RUNNING)
    store.record_folder(meta, strict=False)  # its row: in slurm_refresh's one batch
    return RunRecord.of(meta, folder.path)


def _slurm_final_state(record: RunRecord, job: dict | None, ask: bool) -> tuple[str | None, dict]:
    """Slurm's final state of a job and what scontrol (or sacct) says of it; squeue's row is enough
    for a run whose runner recorded its own end (ASK False)."""
    info = {"Reason": job.get("reason")} if job else {}
    if ask:
        info = parse_scontrol(quiet_run(["scontrol", "show", "job", "-o", str(record.backend_ref)], timeout=30).stdout)
    state = info.get("JobState") or (job or {}).get("state")
    if not state and ask and shutil.which("sacct"):
        rows = quiet_run(["sacct", "-j", str(record.backend_ref), "-X", "-P", "-n", "-o", "State,ExitCode"],
                         timeout=30).stdout
        state, _, exit_code = (rows.splitlines() or [""])[0].partition("|")
        info.setdefault("ExitCode", exit_code)
    return (state.split()[0] if state else None), info


def _record_slurm_ending(meta: RunMeta, state: str | None, info: dict, home: Path, seen_running: bool) -> None:
    """How a run ended whose runner recorded nothing: Slurm's final state, mapped (see SLURM_FINAL).

    A job cancelled in the queue (never SEEN_RUNNING) was `cancelled`; a runner that started and
    then ended without a word (killed, say) leaves the job's own ending unknown: `lost`."""
    never_started = meta.status == QUEUED
    status = slurm_status(state) if state else LOST
    if status in ACTIVE_STATUSES or (status == FAILED and state != "OUT_OF_MEMORY" and not never_started):
        status = LOST
    if never_started and not seen_running and state == "CANCELLED":
        status = CANCELLED
    code, _, sig = (info.get("ExitCode") or "").partition(":")
    fields = {}
    if code.isdigit() and not never_started and status != LOST:  # "3:0" is exit 3; "0:15" signal 15
        fields["exit_code"] = 128 + int(sig) if int(code) == 0 and sig.isdigit() and int(sig) else int(code)
    if state == "OUT_OF_MEMORY":
        fields["hint"] = "the job went over the memory Slurm gave it: raise resources.memory (sbatch --mem)"
    meta.end(status, _slurm_reason(meta, status, state, info, never_started, home), **fields)


def _slurm_reason(meta: RunMeta, status: str, state: str | None, info: dict, never_started: bool, home: Path) -> str:
    job = meta.slurm.job_id
    if not state:
        return f"Slurm no longer knows job {job}, and RunPilot on the node recorded no final status"
    if info.get("ExitCode", "").endswith(":53"):  # slurmd could not open the job's output file
        return (f"the job could not start on node {info.get('NodeList') or '?'}: its run folder is not there. "
                f"RUNPILOT_HOME ({home}) must be on a file system the nodes share (NFS, Lustre)")
    if never_started and state not in ("CANCELLED", "NODE_FAIL", "BOOT_FAIL", "PREEMPTED"):
        python = (meta.config.get("slurm") or {}).get("python", "python3")
        return (f"Slurm says {state}, but RunPilot never started on node {info.get('NodeList') or '?'}: is "
                f"{python} (slurm.python) installed there? See slurm-{job}.out in the run folder")
    reason = info.get("Reason")
    said = f"Slurm: {state}" + (f", {reason}" if reason not in (None, "None") else "") + \
        (f", exit {info['ExitCode']}" if info.get("ExitCode") else "")
    if status == LOST and state in ("FAILED", "COMPLETED"):
        return (f"RunPilot on node {info.get('NodeList') or '?'} ended without recording how the run ended "
                f"({said}); see slurm-{job}.out in the run folder")
    if status == CANCELLED:
        return f"Slurm job {job} was cancelled before it started"
    return f"Slurm ended job {job}: {state}" + (f" ({reason})" if reason not in (None, "None") else "")


def slurm_stop(store: RunStore, record: RunRecord, meta: RunMeta, wait: float,
               note: Callable[[str], None]) -> RunRecord:
    """`runpilot stop` for a Slurm run, then wait for the job to record how it ended. A started run's
    runner gets SIGTERM (`scancel --batch`, only the runner), as `stop` of a local run: the job gets
    SIGTERM or the config's stop_signal, then the grace period, then SIGKILL; a plain scancel would
    SIGTERM the job itself, whatever its stop_signal. A queued run is cancelled."""
    job = str(meta.slurm.job_id)
    done = quiet_run(["scancel", "--batch", "--signal=TERM", job], timeout=60) if meta.status == RUNNING else None
    if done is None or done.returncode != 0:  # queued, or it ended or was still starting meanwhile
        done = quiet_run(["scancel", job], timeout=60)
    if done.returncode != 0:
        raise SlurmError(f"scancel {job} failed: {done.stderr.strip()[:200]}")
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        slurm_refresh(store, [record], note)
        current = store.get(record.id)
        if current and current.status not in ACTIVE_STATUSES:
            return current
        time.sleep(1)
    raise RunPilotError(f"Slurm job {job} of run {record.id} has not ended within {wait:.0f}s; "
                        "look at it with squeue, or try again")


def slurm_stop_sweep(store: RunStore, sweep: Sweep, wait: float, note: Callable[[str], None]) -> str:
    """`runpilot stop SWEEP_ID` of a sweep submitted as a job array: its queued points are cancelled
    and its started ones' runners get SIGTERM (as slurm_stop), then wait until every point has
    ended as Slurm and the nodes record it."""
    metas = [store.folder(p.run_id).read_meta() for p in sweep.points]
    arrays = sorted({str(m.slurm.array_job_id) for m in metas if m.slurm.array_job_id})
    done = None
    if arrays:
        quiet_run(["scancel", "--state=PENDING", *arrays], timeout=60)
        done = quiet_run(["scancel", "--batch", "--signal=TERM", *arrays], timeout=60)
        if done.returncode != 0:  # no task had started: nothing to signal, cancel what is left
            done = quiet_run(["scancel", *arrays], timeout=60)
    if done is not None and done.returncode != 0:
        raise SlurmError(f"scancel {' '.join(arrays)} failed: {done.stderr.strip()[:200]}")
    deadline = time.monotonic() + wait
    while True:
        slurm_refresh(store, [], note)
        records = [r for p in sweep.points if (r := store.get(p.run_id))]
        if all(r.status not in ACTIVE_STATUSES for r in records) or time.monotonic() > deadline:
            break
        time.sleep(1)
    return fmt_sweep_statuses(sweep.sweep_id, [r.status for r in records])


def exit_status_of(meta: RunMeta) -> int:
    """RunPilot's exit status for a recorded run, as `run` would have exited for it."""
    if meta.status == SUCCEEDED:
        return 0
    if meta.status in (INTERRUPTED, CANCELLED):
        return 128 + (meta.stop_signal or signal.SIGTERM)
    if meta.status == TIMEOUT:
        return 124
    return meta.exit_code or 1


def node_options(meta: RunMeta, slurm: SlurmState) -> RunOptions:
    """The run's options as recorded at submission; the GPUs are the ones Slurm gave the job."""
    stored = meta.slurm.options
    extra = {"RUNPILOT_SWEEP_ID": meta.sweep.id, "RUNPILOT_SWEEP_POINT": meta.sweep.index,
             "RUNPILOT_REPEAT": meta.sweep.repeat}
    return RunOptions(stop_timeout=float(stored.get("stop_timeout", DEFAULT_STOP_TIMEOUT)),
                      pull=str(stored.get("pull", "missing")), keep_engine_logs=bool(stored.get("keep_engine_logs")),
                      tags=meta.tags, overrides=meta.overrides, run_id=meta.run_id, gpu_check=False,
                      claim_gpus=False, sweep=meta.sweep.to_data(), slurm=slurm.to_data(), rerun_of=meta.rerun_of,
                      extra_env={k: str(v) for k, v in extra.items() if v is not None},
                      live_code=meta.code.get("mode") == "live",
                      code_snapshots={meta.code["folder"]: meta.code["snapshot"]}
                      if meta.code.get("mode") == "snapshot" else {})


def parse_slurm_duration(text: str) -> float | None:
    """Seconds from squeue's %L (time left): `59`, `4:59`, `1:04:59`, `2-01:04:59`; None if unlimited."""
    days, _, clock = text.strip().rpartition("-")
    parts = clock.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3 or (days and not days.isdigit()):
        return None
    seconds = sum(int(p) * 60 ** i for i, p in enumerate(reversed(parts)))
    return seconds + int(days or 0) * 86400


def within_slurm_limit(config: JobConfig, environ) -> tuple[JobConfig, bool]:
    """The config with its timeout moved before Slurm's time limit, so that RunPilot stops the job
    itself (and records `timeout`) before Slurm signals everything; also whether it was moved."""
    job = slurm_task_id(environ)
    said = quiet_run(["squeue", "-h", "-j", job, "-o", "%L"], timeout=30).stdout if job and shutil.which("squeue") \
        else ""
    left = parse_slurm_duration((said.splitlines() or [""])[0])
    if left is None:
        return config, False
    own = max(5.0, left - min(60.0, left / 4))
    if config.timeout is not None and config.timeout <= own:
        return config, False
    return dataclasses.replace(config, timeout=own), True


def slurm_task_id(environ) -> str | None:
    """The id that names this job alone to squeue: `ARRAY_TASK` for an array's task (the task whose
    SLURM_JOB_ID is the array's id would otherwise be asked about the whole array), else the job id."""
    array, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else environ.get("SLURM_JOB_ID")


def sweep_time_limits(configs: list[JobConfig]) -> tuple[str | None, list[str | None]]:
    """The --time of a Slurm sweep's array (the longest of its points', so that no point is killed
    before its own limit) and each point's own, which is set on its task after the submission."""
    own = [c.slurm.time or (slurm_time(c.timeout + SLURM_TIME_MARGIN) if c.timeout else None) for c in configs]
    if any(t is None for t in own):
        return None, own
    return max(own, key=lambda t: parse_slurm_time(t)), own


def parse_slurm_time(text: str) -> float:
    """Seconds of a --time value (D-HH:MM:SS and the shorter forms; a bare number is minutes)."""
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return math.inf
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    units = (3600, 60, 1) if days or len(parts) == 3 else (60, 1)  # D-HH[:MM[:SS]], HH:MM:SS; MM[:SS]
    return sum(v * u for v, u in zip(parts, units)) + int(days or 0) * 86400


def run_on_node(folder: RunFolder, environ, report: Reporter) -> int:
    """The job of a Slurm run, on its node: run the recorded config, record in the folder only."""
    store = RunStore(folder.path.parent.parent, write_index=False)
    meta = folder.read_meta()
    if meta.status != QUEUED:
        raise StoreError(f"run {folder.run_id} is {meta.status}, not queued: Slurm started it twice?")
    slurm = SlurmState.from_data({**meta.slurm.to_data(), "state": "RUNNING",
                                  "node": environ.get("SLURMD_NODENAME") or hostname()})
    try:
        config = dataclasses.replace(load_config(folder.config), source=meta.config_file)
        devices = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
        if devices and config.resources.gpus is not None:  # Slurm chose the GPUs: use exactly those
            config = dataclasses.replace(config, resources=dataclasses.replace(config.resources, gpus=tuple(devices)))
        config, limited = within_slurm_limit(config, environ)
        meta.slurm = slurm
        folder.write_meta(meta)
        outcome = run_job(config, node_options(meta, slurm), store, None, report, environ)
        if limited and outcome.meta.status == TIMEOUT:
            outcome.meta.reason = "stopped before Slurm's time limit (slurm.time, sbatch --time)"
            folder.write_meta(outcome.meta)
    except RunPilotError as exc:  # the node cannot run it (no engine, no image, no python...)
        failed = folder.read_meta()
        if failed.end(FAILED, str(exc).splitlines()[0], slurm=slurm, host=slurm.node):
            store.record(failed)
        raise
    return outcome.exit_code


def node_folder(target: str, environ) -> RunFolder:
    """The run folder a Slurm job runs: TARGET itself, or line $SLURM_ARRAY_TASK_ID of a runs.txt."""
    path = Path(target)
    if SweepFolder.is_run_list(path):
        try:
            lines = path.read_text().splitlines()
            path = Path(lines[int(environ["SLURM_ARRAY_TASK_ID"])])
        except (OSError, KeyError, ValueError, IndexError) as exc:
            raise StoreError(f"cannot find this array task's run in {target} ({exc}): is RUNPILOT_HOME on a "
                             f"file system that node {hostname()} shares with the login node?") from exc
    if not (path / "meta.json").is_file():
        raise StoreError(f"run folder {path} is missing on node {hostname()}: RUNPILOT_HOME must be on a file "
                         "system the nodes share with the login node (NFS, Lustre)")
    return RunFolder(path)

def slurm_stop_jobs(jobs: list[str], signum: int | None, note: Callable[[str], None]) -> None:
    """Stop attached Slurm jobs as a local run stops: at Ctrl-C the runner on the node gets SIGINT
    (`scancel --batch`, so only the runner: it hands the job SIGINT, or the config's stop_signal,
    then the grace period, then SIGKILL); at SIGTERM or SIGHUP the runner gets SIGTERM, as a local
    run's job would (SIGTERM, or the stop_signal); queued ones are cancelled. SIGNUM None (a second
    signal): scancel, which ends the job now (SIGTERM, then Slurm's KillWait)."""
    if not jobs:
        return
    if signum is not None:
        name = signal_name(job_stop_signal(signum), job=True)
        again = " again" if signum == signal.SIGINT else ""
        note(f"stopping Slurm job {', '.join(jobs)}: the job gets {name} through its runner; "
             f"press Ctrl-C{again} to cancel it now")
        quiet_run(["scancel", "--state=PENDING", *jobs], timeout=60)
        quiet_run(["scancel", "--batch", f"--signal={name.removeprefix('SIG')}", *jobs], timeout=60)
        return
    note(f"cancelling Slurm job {', '.join(jobs)} (scancel: the job gets SIGTERM); "
         "the run ends when the job has stopped")
    quiet_run(["scancel", *jobs], timeout=60)


# -- submitting and following Slurm runs from the command line ---------------------------

def slurm_run_cli(args, config: JobConfig, options: RunOptions) -> int:
    """`run --on slurm`: submit, then (unless -d) follow the job as a local run would be followed."""
    _slurm_refusals(args, sweep=False)
    store = _store()
    if getattr(args, "dry_run", False):  # rerun has no --dry-run
        lines = sbatch_lines(config, "RUNID", "RUN_FOLDER/slurm-%j.out")
        echo("\n".join(visible(line) for line in slurm_script(config, lines, Path("RUN_FOLDER/runpilot.py"),
                                                                  "RUN_FOLDER").split("\n")))
        return 0
    with StopSignals() as signals:  # from before sbatch: a Ctrl-C then cancels the job it accepted
        meta = submit_run(store, config, options)
        note(f"run {meta.run_id} ({config.name}) submitted to Slurm as job {meta.slurm.job_id}")
        if args.detach and not signals.received:
            echo(meta.run_id)
            return 0
        return follow_slurm(store, [meta.run_id], stream=True, signals=signals)


def slurm_sweep_cli(args, store: RunStore, configs: list, axes, options: RunOptions) -> int:
    _slurm_refusals(args, sweep=True)
    sweep_id = args.sweep_id or new_sweep_id()
    points = [p for p, _ in configs]
    echo(render_sweep_plan(sweep_id, points, args.repeat, args.parallel or len(points), None), err=True)
    if args.dry_run:
        shown = SweepFolder(Path("SWEEP_FOLDER"))  # the plan names no folder yet
        lines = sbatch_lines(configs[0][1], sweep_id, str(shown.task_output),
                             f"0-{len(points) - 1}" + (f"%{args.parallel}" if args.parallel else ""))
        script = slurm_script(configs[0][1], lines, shown.program, str(shown.run_list))
        echo("\n".join(visible(line) for line in script.split("\n")))
        return 0
    options = dataclasses.replace(options, code_snapshots=snapshots_once(store, [c for _, c in configs], options))
    stored = {"engine": args.engine, "tags": options.tags, "parallel": args.parallel, "on": "slurm",
              "code_snapshots": options.code_snapshots}
    with StopSignals() as signals:
        sweep = submit_sweep(store, sweep_id, configs, axes, args.repeat, options, args.parallel, stored)
        array = store.folder(sweep.points[0].run_id).read_meta().slurm.array_job_id
        note(f"sweep {sweep_id}: {len(sweep.points)} run(s) submitted to Slurm as job array {array}")
        if args.detach and not signals.received:
            echo(sweep_id)
            return 0
        return follow_slurm(store, [p.run_id for p in sweep.points], stream=False, signals=signals, sweep=sweep)


def follow_slurm(store: RunStore, run_ids: list[str], stream: bool, signals: StopSignals,
                 sweep: Sweep | None = None) -> int:
    """Show queue state changes, stream the log of a single run, and end with the runs, as a local
    run or sweep ends (closing lines with metrics and folder; a sweep's `[1/3 LR=...]` lines, its
    comparison table and `plot` line). Ctrl-C (held in SIGNALS since before the submission) cancels
    the jobs (scancel), and the runs end `interrupted` as a local Ctrl-C would end them (`cancelled`
    if they had not started), reported as stopped by that Ctrl-C."""
    terminal = Terminal(sys.stdout, sys.stderr)  # RunPilot's lines start on a fresh line of the job's output
    labels = sweep_labels(sweep) if sweep else {}
    offset, said, cancelled, handled = 0, {}, False, 0
    try:
        while True:
            if len(signals.received) > handled:
                jobs = sorted({str(r.backend_ref).split("_")[0] if len(run_ids) > 1 else str(r.backend_ref)
                               for i in run_ids if (r := store.get(i)) and r.backend == "slurm" and r.backend_ref})
                if not cancelled:
                    _note_queued_stop(store, run_ids, signals.received[handled])
                slurm_stop_jobs(jobs, signals.received[handled] if not cancelled else None, terminal.say)
                cancelled, handled = True, len(signals.received)
            records = refresh(store, [r for i in run_ids if (r := store.get(i))], terminal.say)
            for r in records:
                _say_slurm_state(store, r, said, labels, terminal.say)
            if stream:
                with contextlib.suppress(OSError):
                    offset = _copy_from(store.folder(run_ids[0]).logs, lambda chunk: terminal.job_output(1, chunk),
                                        offset)
            if all(r.status not in ACTIVE_STATUSES for r in records):
                break
            time.sleep(1)
        metas = [store.folder(i).read_meta() for i in run_ids]
        code = 128 + signals.received[0] if cancelled else \
            exit_status_of(metas[0]) if len(metas) == 1 else (0 if all(m.status == SUCCEEDED for m in metas) else 1)
        for meta in metas:
            for line in slurm_closing_lines(store, meta, code if len(metas) == 1 else exit_status_of(meta),
                                            labels.get(meta.run_id), stopped_here=cancelled):
                terminal.say(line)
    finally:
        finish_output(terminal, signals)
    if sweep is not None:
        print_sweep_end(store, sweep)
    return code


def _note_queued_stop(store: RunStore, run_ids: list[str], signum: int) -> None:
    """Record on each still-queued run which signal cancels it, before the scancel: the ending that
    Slurm's CANCELLED later gives it then says `cancelled by Ctrl-C` (a run that started meanwhile
    is the node's to record)."""
    for run_id in run_ids:
        folder = store.folder(run_id)
        with contextlib.suppress(OSError, StoreError):
            meta = folder.read_meta()
            if meta.status == QUEUED and meta.stop_signal is None:
                meta.stop_signal = signum
                folder.write_meta(meta)


def _say_slurm_state(store: RunStore, r: RunRecord, said: dict, labels: dict, say: Callable[[str], None]) -> None:
    """A run's queue state, when it changes: `run ID queued (Priority)`, `running on NODE`; a sweep's
    point says `[1/3 LR=0.1] started on NODE (run ID)`, as a local sweep does."""
    text = r.status + (f" ({r.reason})" if r.reason and r.status == QUEUED else "")
    node = store.folder(r.id).read_meta().slurm.node if r.status == RUNNING else None
    if said.get(r.id) != text and r.status in ACTIVE_STATUSES:
        if r.id not in labels:
            say(f"run {r.id} {text}" + (f" on {node}" if node else ""))
        elif r.status == RUNNING:
            say(f"{labels[r.id]} started" + (f" on {node}" if node else "") + f" (run {short_id(r.id)})")
    said[r.id] = text


def slurm_closing_lines(store: RunStore, meta: RunMeta, code: int, label: str | None,
                        stopped_here: bool) -> list[str]:
    """How a Slurm run ended, in the words of a local run (render_summary: ending, metrics, folder)
    or of a local sweep's point (LABEL); the reason too, unless this terminal stopped it."""
    why = f": {meta.reason}" if meta.reason and meta.status != SUCCEEDED and not stopped_here else ""
    if label is not None:
        shown = ", ".join(f"{k} {fmt_value(meta.last_metrics[k])}" for k in meta.metric_names if k in meta.last_metrics)
        lines = [f"{label} {fmt_ending(meta)}" + (f", {shown}" if shown else "") + f" (run {short_id(meta.run_id)})"
                 + why]
    else:
        lines = render_summary(RunOutcome(RunRecord.of(meta, store.folder(meta.run_id).path), code, meta))
        head, sep, tail = lines[0].partition("; runpilot exits with")
        lines[0] = head + why + sep + tail
    return lines + ([f"hint: {meta.hint}"] if meta.hint else [])

# ==== 17a. Backends: where a run executes; your other GPU boxes over SSH =====
# A backend is where a run executes: here, a Slurm cluster, a box over SSH. Each is a class with
# a small protocol (check its `--on` argument; run a config; run a sweep; refresh its active
# runs in one batch; stop a run; follow a run's log), listed in BACKENDS, from which `--on` takes
# its choices (`--on slurm`, `--on NAME:ARG`). The here- and Slurm backends delegate to the code
# that has always run them. A run that lives elsewhere names its backend in `runner.backend`
# (meta.json and the index row), and only that backend reads the rest of that `runner`.
#
# `--on ssh:HOST` drives the system's OpenSSH client (the user's keys, agent, jump hosts and
# known hosts apply; BatchMode: never a password prompt, never an accepted unknown host key) over
# one multiplexed connection per box. The box runs RunPilot itself: this very runpilot.py (once
# per version, `<box home>/bin/runpilot-<hash>.py`), the code mount (once per content,
# `<box home>/code/<hash>/`) and the resolved config go over in one tar stream; the box's own
# RunPilot starts the run detached under the same run id (its GPU claims, its engine), and this
# side follows it (`logs -f` on the box) and copies its files home.

SSH_PERSIST_S = 60          # the shared connection outlives a run's commands by this long
SSH_CONNECT_S = 15          # ssh's ConnectTimeout: an unreachable box fails in seconds, not minutes
SSH_CALL_S = 300            # the longest one ssh command may take (shipping code included)
SSH_MIN_PYTHON = (3, 10)    # what runpilot.py needs on the box
SSH_LOST_S = 60             # a box silent this long mid-sweep: its running points are recorded lost
SSH_FULL_LOOK_S = 3.0       # a box sweep's full look at a box's points (`_box-report`, a Python start there) at least this often
# How a box runs its runpilot-<hash>.py for this side's commands: imported from its path, so Python
# keeps its bytecode in the box's bin/__pycache__ (run as a script, 13,000 lines are compiled each time).
SSH_LAUNCHER = ("import importlib.util as u, sys; p = sys.argv[1]; s = u.spec_from_file_location('runpilot', p); "
                "m = sys.modules['runpilot'] = u.module_from_spec(s); s.loader.exec_module(m); "
                "sys.exit(m.main(sys.argv[2:]))")
SSH_LIVE_FILES = ("meta.json", "metrics.json", "metrics.times")  # what a refresh copies of an active remote run: plot --follow, show
SSH_REPORT_FILES = ("meta.json", "logs.txt", "metrics.json", "metrics.times", "gpu.json", "git.diff")  # what `list` copies home for a finished remote run


class Backend:
    """Where a run executes. `--on NAME[:ARG]` picks a subclass from BACKENDS by NAME."""

    name = ""
    help = ""

    def __init__(self, arg: str | None = None) -> None:
        self.arg = arg

    @classmethod
    def check_arg(cls, arg: str | None) -> None:
        """Refuse an `--on` argument this backend cannot take (a UsageError)."""
        if arg is not None:
            raise UsageError(f"--on {cls.name} takes no argument (got {cls.name}:{arg})")

    def run(self, args, config: JobConfig, options: RunOptions) -> int:
        raise NotImplementedError

    def sweep(self, args, store: "RunStore", configs: list, axes, options: RunOptions) -> int:
        raise UsageError(f"runpilot sweep --on {self.name} is not built yet; run the points one by one with "
                         f"runpilot run --on {self.name}")

    def refresh(self, store: "RunStore", records: list[RunRecord], note: Callable[[str], None]) -> dict[str, RunRecord]:
        """Bring this backend's active runs among RECORDS up to date, in one batch; by id."""
        return {}

    def stop(self, store: "RunStore", record: RunRecord, meta: RunMeta, wait: float,
             note: Callable[[str], None]) -> RunRecord:
        raise NotImplementedError

    def stop_sweep(self, store: "RunStore", sweep: "Sweep", wait: float, note: Callable[[str], None]) -> str | None:
        """`runpilot stop SWEEP_ID` of a sweep this backend runs: what became of its runs, in one
        line; None when the sweep's runner here stops it (as a sweep run here)."""
        return None

    def follow_logs(self, store: "RunStore", record: RunRecord, tail: int | None) -> int | None:
        """Stream a live run's log (`logs -f`); None: the log here is the one to follow."""
        return None


class HereBackend(Backend):
    name = "here"
    help = "this machine (default)"

    def run(self, args, config: JobConfig, options: RunOptions) -> int:
        if getattr(args, "dry_run", False):  # rerun has no --dry-run
            echo(render_dry_run(config, options))
            return 0
        return _launch(args, config, options)


class SlurmBackend(Backend):
    name = "slurm"
    help = "a Slurm cluster, with sbatch"

    def run(self, args, config: JobConfig, options: RunOptions) -> int:
        return slurm_run_cli(args, config, options)

    def sweep(self, args, store: "RunStore", configs: list, axes, options: RunOptions) -> int:
        return slurm_sweep_cli(args, store, configs, axes, options)

    def refresh(self, store: "RunStore", records: list[RunRecord], note: Callable[[str], None]) -> dict[str, RunRecord]:
        return slurm_refresh(store, records, note)

    def stop(self, store: "RunStore", record: RunRecord, meta: RunMeta, wait: float,
             note: Callable[[str], None]) -> RunRecord:
        return slurm_stop(store, record, meta, wait, note)

    def stop_sweep(self, store: "RunStore", sweep: "Sweep", wait: float, note: Callable[[str], None]) -> str | None:
        return slurm_stop_sweep(store, sweep, wait, note)


def ssh_base_argv(control_dir: Path, master: str = "no") -> list[str]:
    """ssh's options for every command to a box: no prompt, one shared connection in a private folder.

    Commands use the box's master connection (ControlMaster=no: a client of it, or a connection of
    their own when it is gone); only SshBox.ensure_master starts one, so that a sweep's commands
    started at once never race to become the master."""
    return ["ssh", "-o", "BatchMode=yes", "-o", f"ControlMaster={master}", "-o", f"ControlPath={control_dir}/%C",
            "-o", f"ControlPersist={SSH_PERSIST_S}", "-o", f"ConnectTimeout={SSH_CONNECT_S}"]


def ssh_argv(control_dir: Path, host: str, script: str) -> list[str]:
    """The argv that runs SCRIPT with sh on HOST (`--` before the host: it is never an option)."""
    return [*ssh_base_argv(control_dir), "--", host, "sh -c " + shlex.quote(script)]


def ssh_home_expr(home: str) -> str:
    """The box's home as a sh expression: `~/x` becomes "$HOME"/'x', anything else is quoted."""
    if home.startswith("~/"):
        rest = home[2:].rstrip("/")
        return '"$HOME"' + ("/" + shlex.quote(rest) if rest else "")
    return shlex.quote(home)


def ssh_failure(host: str, stderr: str, what: str) -> str:
    """One line for ssh's own failure (exit 255): its words and the fix."""
    words = " ".join(line.strip() for line in stderr.strip().splitlines()[-2:] if line.strip()) or "no message"
    if "Host key verification failed" in words or "No ED25519 host key is known" in words or \
            "host key" in words.lower():
        fix = f"check the box's host key and add it to ~/.ssh/known_hosts (ssh {host} once, by hand)"
    elif "Permission denied" in words:
        fix = f"the box refused the key: check that 'ssh {host} true' logs in without a password"
    else:
        fix = f"check that 'ssh {host} true' works from here"
    return f"cannot reach box {host} over ssh to {what} ({words}); {fix}"


def shipped_files(folder: Path, skip: Path | None = None) -> list[Path]:
    """The regular files and symlinks under FOLDER, in a stable order (what goes over, and what is
    hashed); never SKIP (RunPilot's own home, when it lies in the code folder), sockets or pipes."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if skip is None or Path(root, d) != skip)
        found.extend(Path(root) / name for name in files
                     if os.path.islink(os.path.join(root, name)) or os.path.isfile(os.path.join(root, name)))
        found.extend(Path(root) / d for d in dirs if os.path.islink(os.path.join(root, d)))
    return sorted(found)


def content_hash(folder: Path, skip: Path | None = None) -> str:
    """A short hash of a folder's names, modes and contents: the same code gets the same hash."""
    import hashlib  # only here: not every start pays for it
    digest = hashlib.sha256()
    for path in shipped_files(folder, skip):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            digest.update(f"L {rel}\0{os.readlink(path)}\0".encode())
            continue
        digest.update(f"F {rel}\0{os.stat(path).st_mode & 0o111:o}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def program_hash() -> str:
    import hashlib  # only here: not every start pays for it
    with open(os.path.abspath(__file__), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


@dataclass
class SshPlan:
    """What one run on a box needs: where things go there, and what to send."""

    host: str
    run_id: str
    settings: SshSettings
    config: JobConfig             # the config as the box runs it (mounts mapped to the box's folders)
    code: Path | None             # the code mount's folder here, if any
    code_hash: str | None
    program: str                  # runpilot-<hash>.py
    box_mounts: tuple[str, ...]   # folders that must exist on the box
    skip: Path | None = None      # what never goes over: RunPilot's home here
    snapshot: str | None = None   # the code snapshot here that goes over (else the folder as it is)
    home: Path | None = None      # RunPilot's home here (where the snapshot's files are)


def ssh_plan(host: str, run_id: str, config: JobConfig, skip: Path | None = None,
             snapshot: str | None = None) -> SshPlan:
    """Map the config's mounts onto the box: the code mount is shipped (SNAPSHOT, the run's code
    snapshot here, when it has one: the box gets `code/s<id>`, once per content), every other mount
    must be named and mapped in ssh.mounts (a dataset is never copied); refuse anything else now."""
    mapped = dict(config.ssh.mounts)
    code = next((m for m in config.mounts if m.name == "code"), None)
    if code and not Path(code.source).is_dir():
        raise UsageError(f"the code mount {code.source} is not a folder here; only a folder can be shipped to a box")
    scripts = entrypoint_files(config.entrypoint) if code is None else []
    if scripts:  # here engine local would find them beside the config; on the box nothing is beside it
        raise UsageError(f"the entrypoint runs {scripts[0]}, but the config has no code mount, so nothing of this "
                         f"folder goes to box {host}; add a code mount (mounts: {{code: .}}) to ship it")
    try:
        code_hash = None if not code else f"s{snapshot[:16]}" if snapshot else content_hash(Path(code.source), skip)
    except OSError as exc:
        raise UsageError(f"cannot read {exc.filename} in the code mount ({exc.strerror}); make it readable, or "
                         "move it out of the code folder") from exc
    mounts, needed = [], []
    for m in config.mounts:
        if m.name == "code":
            mounts.append(dataclasses.replace(m, source=f"@BOXHOME@/code/{code_hash}"))
        elif m.name in mapped:
            mounts.append(dataclasses.replace(m, source=mapped[m.name]))
            needed.append(mapped[m.name])
        else:
            what = f"mount {m.name!r}" if m.name else f"mount {m.source}:{m.target}"
            raise UsageError(f"{what} names a folder here, which box {host} does not have; name it under mounts: "
                             f"and map it to the box's folder in the config's ssh.mounts "
                             f"(ssh: {{mounts: {{{m.name or 'data'}: /path/on/the/box}}}})")
    boxed = dataclasses.replace(config, mounts=tuple(mounts), ssh=SshSettings(), sweep=())
    return SshPlan(host, run_id, config.ssh, boxed, Path(code.source) if code else None, code_hash,
                   f"runpilot-{program_hash()}.py", tuple(needed), skip, snapshot if code else None, skip)


def ssh_probe_script(plan: SshPlan) -> str:
    """sh that prints the box's facts (home, python, what is there already, missing folders)."""
    py = shlex.quote(plan.settings.python)
    lines = [f"h={ssh_home_expr(plan.settings.home)}", 'printf "home=%s\\n" "$h"',
             f"if command -v {py} >/dev/null 2>&1; then {py} -c "
             + shlex.quote('import sys; print("python=%d.%d.%d" % sys.version_info[:3])')
             + " || echo python=broken; else echo python=missing; fi",
             'if out=$(mkdir -p "$h/bin" "$h/code" "$h/configs" 2>&1) && test -w "$h/bin"; then echo writable=yes; '
             'else printf "writable=%s\\n" "$(printf %s "$out" | head -n 1)"; fi',
             f'test -f "$h/bin/{plan.program}" && echo program=yes']
    if plan.code_hash:
        lines.append(f'test -d "$h/code/{plan.code_hash}" && echo code=yes')
    for folder in plan.box_mounts:
        lines.append(f"test -d {shlex.quote(folder)} || printf 'missing=%s\\n' {shlex.quote(folder)}")
    lines.append("exit 0")
    return "\n".join(lines)


def parse_probe(text: str) -> dict[str, list[str]]:
    facts: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            facts.setdefault(key, []).append(value)
    return facts


def probe_problem(host: str, facts: dict[str, list[str]], settings: SshSettings) -> str | None:
    """Why the box cannot run RunPilot, in the box's words, with the fix; None if it can."""
    python = (facts.get("python") or ["missing"])[0]
    if python in ("missing", "broken"):
        return (f"box {host} has no working {settings.python} ({settings.python}: {python}); install Python "
                f"{'.'.join(map(str, SSH_MIN_PYTHON))} or newer there, or set ssh.python to its path")
    version = tuple(int(p) for p in python.split(".")[:2] if p.isdigit())
    if version < SSH_MIN_PYTHON:
        return (f"box {host} has Python {python} ({settings.python}), and RunPilot needs "
                f"{'.'.join(map(str, SSH_MIN_PYTHON))} or newer; install it there, or set ssh.python to a newer one")
    writable = (facts.get("writable") or [""])[0]
    if writable != "yes":
        home = (facts.get("home") or [settings.home])[0]
        return (f"RunPilot's home {home} on box {host} is not writable ({writable.strip() or 'no message'}); "
                "set ssh.home in the config to a folder the box's user can write")
    if facts.get("missing"):
        return (f"box {host} has no folder {', '.join(facts['missing'])} (mapped in ssh.mounts); create it "
                "there, or map the mount to a folder the box has")
    return None


def ssh_payload(plan: SshPlan, facts: dict[str, list[str]]) -> bytes:
    """One tar stream: the program (unless the box has it), the code (unless it has it), the config."""
    import tarfile  # only here: only runs on other boxes pay for it
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        if not facts.get("program"):
            tar.add(os.path.abspath(__file__), arcname="runpilot.py", recursive=False)
        if plan.code and not facts.get("code") and plan.snapshot and plan.home:
            add_snapshot(tar, SnapshotStore(plan.home), plan.snapshot)
        elif plan.code and not facts.get("code"):
            tar.add(plan.code, arcname="code", recursive=False)
            for path in shipped_files(plan.code, plan.skip):
                tar.add(path, arcname="code/" + path.relative_to(plan.code).as_posix(), recursive=False)
        home = facts["home"][0]
        mounts = tuple(dataclasses.replace(m, source=m.source.replace("@BOXHOME@", home)) for m in plan.config.mounts)
        text = dump_yaml(config_to_dict(dataclasses.replace(plan.config, mounts=mounts)))
        info = tarfile.TarInfo("config.yaml")
        info.size, info.mode = len(text.encode()), 0o600
        tar.addfile(info, io.BytesIO(text.encode()))
    return buffer.getvalue()


def add_snapshot(tar, snapshots: "SnapshotStore", snapshot_id: str) -> None:
    """A code snapshot's files under `code/` in TAR, read from the snapshot store (never the folder,
    which may have changed since): what the box runs is what the run recorded."""
    import tarfile  # only here: only runs on other boxes pay for it
    folder = tarfile.TarInfo("code")
    folder.type, folder.mode = tarfile.DIRTYPE, 0o755
    tar.addfile(folder)
    for entry in snapshots.manifest(snapshot_id):
        if entry["path"].startswith("/") or ".." in entry["path"].split("/"):
            raise SnapshotError(f"code snapshot {snapshot_id[:12]} names {visible(entry['path'])!r}, a path outside "
                                "its folder; it is damaged: rerun with --current-code")
        info = tarfile.TarInfo("code/" + entry["path"])
        if "link" in entry:
            info.type, info.linkname = tarfile.SYMTYPE, entry["link"]
            tar.addfile(info)
            continue
        info.size, info.mode = entry["size"], entry["mode"]
        try:
            with open(snapshots.object_path(entry["sha256"]), "rb") as f:
                tar.addfile(info, f)
        except OSError as exc:
            raise SnapshotError(f"code snapshot {snapshot_id[:12]} lacks {visible(entry['path'])!r} ({exc.strerror}); "
                                "rerun with --current-code") from exc


SSH_UNREADY = 86  # the start script's exit when the box lacks what an earlier look found there (the start then looks again)


def ssh_start_script(plan: SshPlan, home: str, flags: list[str], unlooked: bool = False) -> str:
    """sh that puts the payload in place, starts the run detached with the box's own RunPilot, and
    sends its meta.json back as a tar (what `_box-report` would send, without a second round trip).
    UNLOOKED: no probe ran before it (an earlier start of the sweep found the box ready): it first
    checks that the program and code are still there, else exits SSH_UNREADY, having changed nothing."""
    h, rid = shlex.quote(home), plan.run_id
    ready = [f'test -f "$h/bin/{plan.program}"', *([f'test -d "$h/code/{plan.code_hash}"'] if plan.code_hash else []),
             *(f"test -d {shlex.quote(folder)}" for folder in plan.box_mounts)]
    lines = [f"h={h}", *([f"{' && '.join(ready)} || {{ cat >/dev/null; exit {SSH_UNREADY}; }}"] if unlooked else []),
             "set -e", f's="$h/.incoming-{rid}"', "trap 'rm -rf \"$s\"' EXIT", 'mkdir -p "$s"',
             'tar -x -f - -C "$s"',
             f'if [ -f "$s/runpilot.py" ]; then mv "$s/runpilot.py" "$h/bin/{plan.program}"; fi']
    if plan.code_hash:
        lines.append(f'if [ -d "$s/code" ]; then if [ -d "$h/code/{plan.code_hash}" ]; then rm -rf "$s/code"; '
                     f'else mv "$s/code" "$h/code/{plan.code_hash}"; fi; fi')
    lines += [f'mv "$s/config.yaml" "$h/configs/{rid}.yaml"', 'rm -rf "$s"', "set +e",
              shlex.join(["env", f"RUNPILOT_HOME={home}", plan.settings.python, "-c", SSH_LAUNCHER,
                          f"{home}/bin/{plan.program}", "run", f"{home}/configs/{rid}.yaml", "-d", "--run-id", rid,
                          *flags]) + " >/dev/null",
              f'code=$?; if [ $code -ne 0 ]; then rm -f "$h/configs/{rid}.yaml"; exit $code; fi',  # refused: nothing stays
              f'cd "$h/runs" && tar -c -f - {rid}/meta.json 2>/dev/null; exit 0']  # its record, in the same round trip
    return "\n".join(lines)


def ssh_run_flags(options: RunOptions) -> list[str]:
    """The run options that mean the same on the box, as its RunPilot's flags."""
    flags = [] if options.engine is None else ["--engine", options.engine]
    for key, value in options.tags.items():
        flags += ["--tag", f"{key}={value}"]
    flags += ["--stop-timeout", f"{options.stop_timeout:g}", "--pull", options.pull]
    if options.keep_engine_logs:
        flags.append("--engine-logs")
    if not options.gpu_check:
        flags.append("--no-gpu-check")
    if options.gpu_pool:
        flags += ["--gpus", ",".join(options.gpu_pool)]
    if not options.wait_for_gpus:
        flags.append("--no-wait")
    return flags


@dataclass
class SshBox:
    """One box as ssh reaches it, through this home's private folder of control sockets."""

    host: str
    control_dir: Path

    @classmethod
    def of(cls, host: str, store: "RunStore") -> "SshBox":
        folder = store.home / "ssh"
        try:
            make_private_dirs(folder)
            os.chmod(folder, 0o700)
        except OSError as exc:
            raise StoreError(f"cannot create {folder}: {exc.strerror}; set RUNPILOT_HOME to a writable folder") from exc
        return cls(host, folder)

    def ensure_master(self, what: str) -> None:
        """Start the box's shared connection unless it runs; ssh's refusal is an SshError in its words."""
        check = [*ssh_base_argv(self.control_dir), "-O", "check", "--", self.host]
        if subprocess.run(check, stdin=subprocess.DEVNULL, capture_output=True, timeout=30).returncode == 0:
            return
        import tempfile  # only here: not every start pays for it
        with tempfile.TemporaryFile() as err:
            done = subprocess.run([*ssh_base_argv(self.control_dir, "yes"), "-N", "-f", "--", self.host],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                  timeout=SSH_CONNECT_S + 30)
            err.seek(0)
            said = err.read().decode("utf-8", "replace")
        if done.returncode != 0 and "already exists" not in said:  # another thread's master won: fine
            raise SshError(ssh_failure(self.host, said, what))

    def call(self, script: str, what: str, data: bytes | None = None, timeout: float = SSH_CALL_S,
             binary: bool = False) -> subprocess.CompletedProcess:
        """Run SCRIPT on the box; ssh's own failure (exit 255) is an SshError in ssh's words."""
        try:
            self.ensure_master(what)
            done = subprocess.run(ssh_argv(self.control_dir, self.host, script), input=data or b"",
                                  capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise SshError(f"box {self.host} did not answer within {timeout:.0f}s (to {what}); check the "
                           "connection, then try again") from exc
        except OSError as exc:
            raise SshError(f"cannot run ssh ({exc.strerror}); install OpenSSH's client (apt-get install "
                           "openssh-client)") from exc
        stderr = done.stderr.decode("utf-8", "replace")
        if done.returncode == 255:
            raise SshError(ssh_failure(self.host, stderr, what))
        if binary:
            return done
        return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode("utf-8", "replace"), stderr)

    def runpilot(self, runner: dict, args: list[str]) -> str:
        """sh that runs the box's RunPilot of a run (RUNNER) with ARGS: imported by SSH_LAUNCHER, so
        that the box compiles the file once and reuses its bytecode (a script is compiled at every start)."""
        program = ["-c", SSH_LAUNCHER, runner["program"]] if runner["program"] != "-" else ["-"]
        return shlex.join(["env", f"RUNPILOT_HOME={runner['home']}", runner["python"], *program, *args])

    def follower(self, runner: dict, run_id: str, tail: int | None = None) -> subprocess.Popen:
        """`logs -f` on the box, in its own session (a Ctrl-C here is RunPilot's to handle)."""
        with contextlib.suppress(SshError, subprocess.SubprocessError, OSError):
            self.ensure_master("follow the run")
        tail_flags = [] if tail is None else ["--tail", str(tail)]
        script = "exec " + self.runpilot(runner, ["logs", "-f", run_id, *tail_flags])
        return subprocess.Popen(ssh_argv(self.control_dir, self.host, script), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def box_error_line(host: str, stderr: str) -> str:
    """The box's RunPilot's own error, said as from the box."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("runpilot: error: ")]
    line = (errors or lines or ["no message"])[-1].removeprefix("runpilot: error: ")
    return f"on box {host}: {line}"


def start_failure(host: str, stderr: str, code: int, home: str) -> RunPilotError:
    """Why the start on the box failed: its RunPilot's own refusal (its exit status), or the box's
    words about putting the payload in place (a full disk, a read-only home), with the fix."""
    if "runpilot: error: " in stderr:
        return BoxError(box_error_line(host, stderr), code)
    full = re.compile(r"No space left|Disk quota exceeded|File too large")
    said = [line.strip() for line in stderr.splitlines() if line.strip()]  # tar's first complaint, not its summary
    line = f"on box {host}: " + next((s for s in said if full.search(s)), said[0] if said else f"exit {code}")
    if full.search(stderr):
        fix = f"free some space on box {host} under {home}, or set ssh.home to a folder with room"
    else:
        fix = f"check that box {host} can write {home} (ssh.home), then try again"
    return SshError(f"{line}; {fix}")


def ssh_start(store: "RunStore", host: str, config: JobConfig, options: RunOptions,
              report: Callable[[str], None], pull_outputs: bool = False, ready: dict | None = None) -> RunMeta:
    """Check the box, send what it lacks, start the run there detached; record it here, running.
    The code is the run's snapshot here (a rerun's or a sweep's recorded one, or taken now), so the
    run here names code that this side holds and `rerun` reproduces it. READY (a sweep's): the
    boxes an earlier start found ready for the same program, code and mounts; their start is one
    ssh command (no probe first), which looks again only when the box lacks them now."""
    import tarfile  # only here: only runs on other boxes pay for it
    run_id = options.run_id or new_run_id()
    code = plan_code(config, options, store)
    plan = ssh_plan(host, run_id, config, store.home, code.get("snapshot"))
    box = SshBox.of(host, store)
    key = (host, config.ssh.home, config.ssh.python, plan.program, plan.code_hash, tuple(plan.box_mounts))
    start = None
    if ready is not None and key in ready:
        home = ready[key]
        facts = {"home": [home], "program": ["yes"], "code": ["yes"]}
        start = box.call(ssh_start_script(plan, home, ssh_run_flags(options), unlooked=True), "start the run",
                         data=ssh_payload(plan, facts), binary=True)
        if start.returncode == SSH_UNREADY:
            ready.pop(key, None)
            start = None
    if start is None:
        probe = box.call(ssh_probe_script(plan), "check it")
        facts = parse_probe(probe.stdout)
        if probe.returncode != 0 or "home" not in facts:
            raise SshError(f"box {host} did not run sh ({probe.stderr.strip()[:200] or 'no output'}); RunPilot "
                           "needs a POSIX shell on the box")
        if (why := probe_problem(host, facts, config.ssh)) is not None:
            raise SshError(why)
        home = facts["home"][0]
        sent = "" if facts.get("program") else "runpilot.py, "
        sent += "" if not plan.code or facts.get("code") else "the code, "
        report(f"sending {sent}the config to box {host}")
        start = box.call(ssh_start_script(plan, home, ssh_run_flags(options)), "start the run",
                         data=ssh_payload(plan, facts), binary=True)
    if start.returncode == 0 and ready is not None:
        ready[key] = home
    if start.returncode != 0:
        raise start_failure(host, start.stderr.decode("utf-8", "replace"), start.returncode, home)
    runner = {"backend": "ssh", "box": host, "home": home, "python": config.ssh.python,
              "program": f"{home}/bin/{plan.program}", "config_file": config.source,
              "rerun_of": options.rerun_of, "code": code,
              "pull_outputs": pull_outputs}  # what only this side knows, kept over every copy from the box
    folder = store.adopt(run_id)  # a new folder, or a sweep's queued point
    runner["sweep"] = folder.read_meta().sweep.to_data() if folder.meta_file.exists() else {}
    write_private(folder.config, dump_yaml(config_to_dict(config)).encode("utf-8"))  # this side's paths: rerun
    meta = RunMeta(run_id, name=config.name, status=RUNNING, started_at=utc_now(), engine=config.engine,
                   image=config.image, runner=runner, config_file=config.source, rerun_of=options.rerun_of,
                   sweep=runner["sweep"], tags=options.tags, code=code)
    store.record(meta)  # the run is the box's now: recorded here before its files come over
    with contextlib.suppress(tarfile.TarError):
        return ssh_unpack(store, start.stdout, {run_id: runner})[run_id]
    try:  # the start's answer was cut short: ask again
        return ssh_record_home(store, box, runner, run_id)
    except SshError as exc:
        report(f"{exc}; runpilot list brings the run up to date when the box answers")
        return meta


def ssh_record_home(store: "RunStore", box: SshBox, runner: dict, run_id: str,
                    everything: bool | None = None) -> RunMeta:
    """Copy the run's files from the box into its folder here (its record, log and metrics; with
    EVERYTHING, by default the run's --pull-outputs, its outputs too); record it here as the box does."""
    folder = store.folder(run_id)
    if not folder.path.is_dir():
        store.create_run_dir(run_id)
    everything = bool(runner.get("pull_outputs")) if everything is None else everything
    report = ["_box-report", *(["--all"] if everything else []), run_id]
    done = box.call(box.runpilot(runner, report), "copy the run home", binary=True)
    if done.returncode != 0:
        raise BoxError(box_error_line(box.host, done.stderr.decode("utf-8", "replace")), done.returncode)
    return ssh_unpack(store, done.stdout, {run_id: runner})[run_id]


def ssh_unpack(store: "RunStore", data: bytes, runners: dict[str, dict]) -> dict[str, RunMeta]:
    """Put the files of a `_box-report` tar into the runs' folders here; index them. The runner
    stays this side's (`backend: ssh`, the box): the box's own runner means nothing here. A run that
    has ended here already (recorded lost) keeps that ending: its meta.json is not replaced."""
    import tarfile  # only here: only runs on other boxes pay for it
    metas = {}
    ended = {run_id for run_id in runners
             if (here := store.folder(run_id).read_meta()).final and here.started_at is not None}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for member in tar.getmembers():
            run_id, _, name = member.name.partition("/")
            parts = name.split("/")
            if run_id not in runners or not member.isfile() or name == "config.yaml" or "" in parts or ".." in parts \
                    or (name == "meta.json" and run_id in ended):
                continue  # never outside the run's folder; the box's config.yaml names the box's folders
            target = store.folder(run_id).path / name
            make_private_dirs(target.parent)
            write_atomic(target, tar.extractfile(member).read(), durable=False)  # type: ignore[union-attr]
    for run_id, runner in runners.items():
        folder = store.folder(run_id)
        meta = folder.read_meta()
        meta.runner, meta.job = runner, {}
        meta.config_file = runner.get("config_file") or meta.config_file
        meta.rerun_of = runner.get("rerun_of") or meta.rerun_of
        meta.sweep = runner.get("sweep") or meta.sweep
        meta.code = runner.get("code") or meta.code  # this side's snapshot, not the box's copy of it
        store.record(meta)
        metas[run_id] = meta
    return metas


def box_report(store: "RunStore", run_ids: list[str], everything: bool, out) -> None:
    """`_box-report`: on a box, the runs' files as a tar on OUT (record and metrics of an active run; the
    files `list` copies home of a finished one; with EVERYTHING, the whole folder)."""
    import tarfile  # only here: only runs on other boxes pay for it
    records = refresh(store, [r for r in (store.get(i) for i in run_ids) if r is not None], lambda text: None)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for record in records:
            folder = store.folder(record.id)
            if everything:
                paths = [p for p in shipped_files(folder.path) if not p.name.startswith(".") and p.name != "runpilot.py"
                         and p.relative_to(folder.path).parts[0] != "code"]  # the box's copy of the snapshot here
            else:
                ended = record.status not in ACTIVE_STATUSES or folder.read_meta().final  # the folder is the truth
                names = SSH_REPORT_FILES if ended else SSH_LIVE_FILES
                paths = [folder.path / n for n in names if (folder.path / n).is_file()]
            for path in paths:
                tar.add(path, arcname=f"{record.id}/{path.relative_to(folder.path).as_posix()}", recursive=False)


def ssh_follow(store: "RunStore", box: SshBox, runner: dict, run_id: str, signals: "StopSignals",
               say: Callable[[str], None]) -> RunMeta:
    """Stream the box's log of the run here until it ends; the first Ctrl-C (or SIGTERM) stops the
    run on the box as it would stop here (the runner there gets the same signal), a second one
    leaves it to its end. Return the run's record, copied home."""
    out = terminal_writer(sys.stdout)
    shown, seen = 0, [0]

    def on_signal() -> None:  # the first signal goes to the box's runner; later ones wait for the end
        if len(signals.received) > seen[0]:
            if seen[0] == 0:
                ssh_signal_runner(box, runner, run_id, signals.received[0], say)
            seen[0] = len(signals.received)

    while True:
        follower = box.follower(runner, run_id)
        shown += stream_follower(follower, out, shown, on_signal)
        code = follower.wait()
        stderr = follower.stderr.read().decode("utf-8", "replace") if follower.stderr else ""
        for pipe in (follower.stdout, follower.stderr):
            pipe.close()  # type: ignore[union-attr]
        try:
            meta = ssh_record_home(store, box, runner, run_id)
        except SshError as exc:
            raise SshError(f"{exc}; the run goes on there: follow it with runpilot logs -f {run_id}, or see it "
                           "with runpilot list") from exc
        if meta.final:
            return meta
        why = stderr.strip().splitlines()[-1][:200] if stderr.strip() else f"exit {code}"
        say(f"the connection that followed the run on box {box.host} ended ({why}); the run goes on there, "
            "re-attaching")
        time.sleep(POLL_SECONDS)


def stream_follower(follower: subprocess.Popen, out, skip: int, tick: Callable[[], None]) -> int:
    """Copy a follower's output to OUT until its end, less its first SKIP bytes (shown by an earlier
    follower of the same log); call TICK between reads. Return how many new bytes were shown."""
    shown = 0
    while True:
        tick()
        chunk = _read_some(follower.stdout.fileno())  # type: ignore[union-attr]
        if chunk is None:
            return shown
        dropped = min(len(chunk), max(0, skip))
        skip -= dropped
        if chunk[dropped:] and out is not None:
            out(chunk[dropped:])
        shown += len(chunk) - dropped


def ssh_signal_runner(box: SshBox, runner: dict, run_id: str, signum: int, say: Callable[[str], None]) -> None:
    """Hand SIGNUM to the run's runner on the box (it stops the job as a local Ctrl-C would)."""
    meta_file = shlex.quote(f"{runner['home']}/runs/{run_id}/meta.json")
    read_pid = shlex.quote("import json,sys; print(json.load(open(sys.argv[1]))['runner']['pid'])")
    name = signal.Signals(signum).name.removeprefix("SIG")
    say(f"stopping run {run_id} on box {box.host} (its runner there gets SIG{name})")
    with contextlib.suppress(SshError):
        box.call(f"pid=$({shlex.quote(runner['python'])} -c {read_pid} {meta_file}) && kill -{name} \"$pid\"",
                 "stop the run", timeout=60)


def runner_backend(runner: "RunnerState | dict") -> "Backend | None":
    """The backend that owns a run living elsewhere (its runner names it), or None."""
    runner = RunnerState.from_data(runner) if isinstance(runner, dict) else runner
    cls = BACKENDS.get(runner.backend) if isinstance(runner, RunnerState) else None  # type: ignore[arg-type]
    return cls() if cls is not None else None


class SshBackend(Backend):
    name = "ssh"
    help = "ssh:HOST: one of your other boxes, as ssh reaches it (alias, user@host, ssh://user@host:port)"

    def __init__(self, arg: str | None = None) -> None:
        super().__init__(self.hosts_arg(arg))

    @staticmethod
    def hosts_arg(arg: str | None) -> str | None:
        """`--on ssh://u@h:22` means the host `ssh://u@h:22`, as `--on ssh:ssh://u@h:22` does."""
        return f"ssh:{arg}" if arg is not None and arg.startswith("//") else arg

    @classmethod
    def check_arg(cls, arg: str | None) -> None:
        arg = cls.hosts_arg(arg)
        for host in arg.split(",") if arg is not None else []:
            if (why := ssh_host_problem(host)) is not None:
                raise UsageError(f"--on ssh:{host}: {why}")

    def host_for_run(self, config: JobConfig) -> str:
        hosts = self.arg.split(",") if self.arg else list(config.ssh.hosts)
        if len(hosts) != 1:
            raise UsageError("runpilot run --on ssh needs one box: --on ssh:HOST, or one host in the config's "
                             f"ssh.hosts (found {len(hosts)})")
        if (why := ssh_host_problem(hosts[0])) is not None:
            raise UsageError(why)
        return hosts[0]

    def run(self, args, config: JobConfig, options: RunOptions) -> int:
        host = self.host_for_run(config)
        if getattr(args, "dry_run", False):
            plan = ssh_plan(host, "RUNID", config)
            text = (f"# on box {host}, home {config.ssh.home}: runpilot run CONFIG -d --run-id RUNID "
                    f"{shlex.join(ssh_run_flags(options))}\n# CONFIG:\n{dump_yaml(config_to_dict(plan.config))}")
            echo("\n".join(visible(line) for line in text.replace("@BOXHOME@", config.ssh.home).split("\n")))
            return 0
        store = _store()
        with StopSignals() as signals:
            meta = ssh_start(store, host, config, options, note, bool(getattr(args, "pull_outputs", False)))
            note(f"run {meta.run_id} ({config.name}) started on box {host}")
            if args.detach and not signals.received:
                echo(meta.run_id)
                return 0
            box = SshBox.of(host, store)
            meta = ssh_follow(store, box, meta.runner.to_data(), meta.run_id, signals, note)
        code = exit_status_of(meta)
        for line in slurm_closing_lines(store, meta, code, None, stopped_here=bool(signals.received)):
            note(line)
        return code

    def sweep(self, args, store: "RunStore", configs: list, axes, options: RunOptions) -> int:
        hosts = self.arg.split(",") if self.arg else list(configs[0][1].ssh.hosts)
        if not hosts:
            raise UsageError("sweep --on ssh needs boxes: --on ssh:box1,box2, or the config's ssh.hosts")
        for host in hosts:
            if (why := ssh_host_problem(host)) is not None:
                raise UsageError(why)
        return ssh_sweep_cli(args, store, configs, axes, options, hosts)

    def resume_sweep(self, store: "RunStore", sweep: "Sweep", args) -> int:
        return ssh_resume_sweep(store, sweep, args)

    def refresh(self, store: "RunStore", records: list[RunRecord], note: Callable[[str], None]) -> dict[str, RunRecord]:
        """One ssh command per box for its active runs: their meta.json, and the files of those that ended."""
        boxes: dict[str, dict[str, dict]] = {}
        for r in records:
            if r.status in ACTIVE_STATUSES and r.runner.backend == self.name:
                boxes.setdefault(r.runner.box, {})[r.id] = r.runner.to_data()
        found = {}
        for host, runners in boxes.items():
            box = SshBox.of(host, store)
            first = next(iter(runners.values()))
            try:
                done = box.call(box.runpilot(first, ["_box-report", *runners]), "look at its runs", binary=True,
                                timeout=60)
            except SshError as exc:
                note(f"{exc}; its runs are shown as last known")
                continue
            if done.returncode != 0:
                note(box_error_line(host, done.stderr.decode("utf-8", "replace")) + "; its runs are shown as last known")
                continue
            for run_id, meta in ssh_unpack(store, done.stdout, runners).items():
                if meta.final and runners[run_id].get("pull_outputs"):  # --pull-outputs: its outputs come too
                    with contextlib.suppress(RunPilotError):
                        meta = ssh_record_home(store, box, runners[run_id], run_id, True)
                found[run_id] = RunRecord.of(meta, store.folder(run_id).path)
        return found

    def stop(self, store: "RunStore", record: RunRecord, meta: RunMeta, wait: float,
             note: Callable[[str], None]) -> RunRecord:
        box = SshBox.of(record.runner.box, store)
        done = box.call(box.runpilot(record.runner.to_data(), ["stop", record.id, "--wait", f"{wait:g}"]), "stop the run",
                        timeout=wait + 60)
        if done.returncode != 0:
            raise BoxError(box_error_line(box.host, done.stderr), done.returncode)
        meta = ssh_record_home(store, box, record.runner.to_data(), record.id)
        return RunRecord.of(meta, store.folder(record.id).path)

    def stop_sweep(self, store: "RunStore", sweep: "Sweep", wait: float, note: Callable[[str], None]) -> str | None:
        """A box sweep whose runner here died: its queued points are cancelled, and its started ones
        are stopped on their boxes (one ssh command per box: the box's `stop`, then its report);
        a live runner is stopped as a local sweep's (None: its Ctrl-C path stops the boxes' points)."""
        if runner_alive(sweep.runner):
            return None
        return ssh_stop_points(store, sweep, wait, note)

    def follow_logs(self, store: "RunStore", record: RunRecord, tail: int | None) -> int | None:
        if record.status not in ACTIVE_STATUSES:
            return None
        box = SshBox.of(record.runner.box, store)
        with StopSignals() as signals:
            follower = box.follower(record.runner.to_data(), record.id, tail)
            out = terminal_writer(sys.stdout)
            assert follower.stdout is not None
            while not signals.received and (chunk := _read_some(follower.stdout.fileno())) is not None:
                if chunk and out is not None:
                    out(chunk)
            follower.terminate()
            follower.wait()
        ssh_record_home(store, box, record.runner.to_data(), record.id)
        return 130 if signals.received else 0


def ssh_stop_points(store: "RunStore", sweep: "Sweep", wait: float, note: Callable[[str], None]) -> str:
    """Stop every active point of SWEEP on its box, all boxes at once, and record each as its box
    does (`interrupted`, as a sweep's Ctrl-C leaves them); cancel the queued ones. A box that does
    not answer leaves its points as last known, said in NOTE."""
    import concurrent.futures  # only here: only box sweeps pay for it
    for point in sweep.points:
        cancel_queued(store, point.run_id, None)
    boxes: dict[str, dict[str, dict]] = {}
    for point in sweep.points:
        record = store.get(point.run_id)
        if record is not None and record.status in ACTIVE_STATUSES and record.runner.backend == "ssh":
            boxes.setdefault(str(record.runner.box), {})[record.id] = record.runner.to_data()

    def stop_on(host: str) -> None:
        runners = boxes[host]
        box, first = SshBox.of(host, store), next(iter(runners.values()))
        script = "".join(box.runpilot(first, ["stop", run_id, "--wait", f"{wait:g}"]) + " >&2 & " for run_id in runners)
        try:  # the box's stops at once, then its report of them (stdout: the tar)
            done = box.call(f"{script}wait; exec " + box.runpilot(first, ["_box-report", *runners]),
                            "stop the sweep's runs", binary=True, timeout=wait + 60)
        except SshError as exc:
            note(f"{exc}; its runs are shown as last known")
            return
        if done.returncode != 0:
            note(box_error_line(host, done.stderr.decode("utf-8", "replace")) + "; its runs are shown as last known")
            return
        ssh_unpack(store, done.stdout, runners)
    with concurrent.futures.ThreadPoolExecutor(max(1, len(boxes))) as pool:
        list(pool.map(stop_on, boxes))
    statuses = [store.folder(p.run_id).read_meta().status for p in sweep.points]
    return fmt_sweep_statuses(sweep.sweep_id, statuses)


def _read_some(fd: int) -> bytes | None:
    """What FD has now (b"" if nothing within a poll), None at its end."""
    ready, _, _ = select.select([fd], [], [], POLL_SECONDS)
    if not ready:
        return b""
    return os.read(fd, READ_SIZE) or None


def pull_run(store: "RunStore", record: RunRecord) -> RunMeta:
    """`runpilot pull ID`: copy every file of a remote run's folder home (its outputs too)."""
    if record.runner.backend != SshBackend.name:
        raise UsageError(f"run {record.id} ran here; its files are in {store.folder(record.id).path} already")
    return ssh_record_home(store, SshBox.of(record.runner.box, store), record.runner.to_data(), record.id, True)


def box_free_gpus(store: "RunStore") -> list[str]:
    """On a box: its GPUs that no run of its RunPilot holds (`_box-report --gpus`)."""
    devices = [str(d["index"]) for d in query_gpus(os.environ).get("devices", [])]
    make_private_dirs(store.home / "gpus")
    busy = GpuClaims(store.home / "gpus", functools.partial(outlived_its_runner, store)).holders(devices)
    return [d for d in devices if d not in busy]


def box_slots(store: "RunStore", host: str, config: JobConfig, options: RunOptions, need: int) -> int:
    """How many points needing NEED GPUs each the box takes at once, as its own RunPilot says (its
    GPUs that no run holds; one at a time without GPUs). Its RunPilot then places each point on
    GPUs no other run holds, so one started by hand meanwhile makes a point wait there, never share."""
    if need == 0:
        return 1
    plan = ssh_plan(host, "00000000-000000-000000", config, store.home)
    box = SshBox.of(host, store)
    facts = parse_probe(box.call(ssh_probe_script(plan), "check it").stdout)
    if (why := probe_problem(host, facts, config.ssh)) is not None:
        raise SshError(why)
    runner = {"home": facts["home"][0], "python": config.ssh.python, "program": "-"}  # this very file, on stdin
    with open(os.path.abspath(__file__), "rb") as f:
        done = box.call(box.runpilot(runner, ["_box-report", "--gpus"]), "count its free GPUs", data=f.read(),
                        timeout=60)
    if done.returncode != 0:
        raise BoxError(box_error_line(host, done.stderr), done.returncode)
    return len(done.stdout.split()) // need


def point_gpus(config: JobConfig) -> int:
    gpus = config.resources.gpus
    return gpus if isinstance(gpus, int) else len(gpus) if isinstance(gpus, tuple) else 0 if gpus is None else 1


@dataclass
class BoxSweep:
    """A sweep's points placed on boxes: as many at once as each box's GPUs take (and --parallel)."""

    store: "RunStore"
    sweep: "Sweep"
    hosts: list[str]
    options: RunOptions
    parallel: int
    fail_fast: bool
    say: Callable[[str], None]
    running: dict[str, str] = field(default_factory=dict)   # run id -> its box
    pull_outputs: bool = False
    unplaced: set = field(default_factory=set)               # started before the box said which GPUs
    slots: dict[str, int] = field(default_factory=dict)
    silent: dict[str, float] = field(default_factory=dict)  # box -> when it stopped answering
    failed: bool = False
    looks: dict[str, tuple] = field(default_factory=dict)   # box -> (its points' meta.json sums, when fully looked at)
    ready: dict[tuple, str] = field(default_factory=dict)   # ssh_start's boxes found ready: one command per start

    def run(self, jobs: list, signals: "StopSignals") -> int:
        """Start points while boxes have room; follow them; end as a local sweep ends."""
        labels, pending = sweep_labels(self.sweep), list(jobs)
        self.slots = {host: 0 for host in self.hosts}
        for host in self.hosts if jobs else []:
            mine = sum(h == host for h in self.running.values())  # a resumed sweep's points that run there
            try:
                self.slots[host] = mine + box_slots(self.store, host, jobs[0][1], self.options, point_gpus(jobs[0][1]))
            except RunPilotError as exc:
                del self.slots[host]
                self.say(f"{exc}; box {host} gets no points")
        if jobs:
            self.say(f"sweep {self.sweep.sweep_id}: " + ", ".join(f"box {h} takes {n} at once"
                                                                 for h, n in self.slots.items()))
        while (pending or self.running) and not signals.received:
            self.start_some(pending, labels)
            time.sleep(POLL_SECONDS)
            self.collect(labels, pending)
        if signals.received:
            self.stop_all(pending, signals.received[0], labels)
        return 128 + signals.received[0] if signals.received else 1 if self.failed else 0

    def start_some(self, pending: list, labels: dict[str, str]) -> None:
        """Start as many pending points as the boxes have room for, all at once (a thread each)."""
        import concurrent.futures  # only here: it imports logging, which no other path needs
        batch = []
        for host in self.slots:
            room = self.slots[host] - sum(h == host for h in self.running.values())
            while pending and room > 0 and len(self.running) + len(batch) < self.parallel:
                batch.append((host, *pending.pop(0)))
                room -= 1
        with concurrent.futures.ThreadPoolExecutor(max(1, len(batch))) as pool:
            started = list(pool.map(self.start_one, batch))
        for (host, point, config), result in zip(batch, started):
            if isinstance(result, RunPilotError):  # unreachable, or its RunPilot refused: the other boxes go on
                pending.insert(0, (point, config))
                if self.slots.pop(host, None) is not None:
                    self.say(f"{result}; box {host} gets no more points")
                continue
            self.running[point.run_id] = host
            gpus = f" GPU {','.join(result.devices)}" if result.devices else ""
            if not result.devices and point_gpus(config):
                self.unplaced.add(point.run_id)  # its end line names them
            self.say(f"{labels[point.run_id]} started on box {host}{gpus} (run {short_id(point.run_id)})")
        if pending and not self.slots and not self.running:
            for point, _ in pending:
                cancel_queued(self.store, point.run_id, None, "no box of the sweep answered")
            pending.clear()
            self.failed = True

    def start_one(self, job: tuple) -> "RunMeta | RunPilotError":
        host, point, config = job
        try:
            return ssh_start(self.store, host, config, dataclasses.replace(self.options, run_id=point.run_id),
                             lambda text: None, self.pull_outputs, self.ready)
        except RunPilotError as exc:
            return exc

    def collect(self, labels: dict[str, str], pending: list) -> None:
        import concurrent.futures  # only here: only box sweeps pay for it
        records = [r for r in (self.store.get(i) for i in self.running) if r is not None]
        fresh: dict[str, RunRecord] = {}

        def ask(host: str) -> tuple[str, list[str], dict[str, RunRecord]]:  # one ssh command per box, all at once
            said: list[str] = []
            mine = [r for r in records if self.running[r.id] == host]
            if not self.changed(host, mine):
                return host, said, {}
            return host, said, SshBackend().refresh(self.store, mine, said.append)
        hosts = sorted(set(self.running.values()))
        with concurrent.futures.ThreadPoolExecutor(max(1, len(hosts))) as pool:
            for host, said, found in pool.map(ask, hosts):
                fresh |= found
                fresh |= self.box_answered(host, said, records)
        for record in records:  # one that ended before its start was copied home is final already
            run_id = record.id
            if fresh.get(run_id, record).status in ACTIVE_STATUSES:
                continue
            host = self.running.pop(run_id)
            meta = self.store.folder(run_id).read_meta()
            shown = ", ".join(f"{k} {fmt_value(meta.last_metrics[k])}" for k in meta.metric_names
                              if k in meta.last_metrics)
            if run_id in self.unplaced and meta.devices:
                shown += (", " if shown else "") + f"on box {host} GPU {','.join(meta.devices)}"
            self.say(f"{labels[run_id]} {fmt_ending(meta)}" + (f", {shown}" if shown else "") + f" (run {short_id(run_id)})")
            if meta.status != SUCCEEDED:
                self.failed = True
                if self.fail_fast:
                    for point, _ in pending:
                        cancel_queued(self.store, point.run_id, None, f"--fail-fast: run {run_id} did not succeed")
                    pending.clear()

    def changed(self, host: str, records: list[RunRecord]) -> bool:
        """Whether the box's points may have changed since the last full look (`_box-report`, a Python
        start on the box): a sum of their meta.json files (sh only: what a runner there writes when its
        run is placed or ends) differs, or the last full look is SSH_FULL_LOOK_S old (a runner killed
        there writes nothing; live metrics). A box that does not answer: the full look says so."""
        if not records:
            return True
        home = records[0].runner.to_data().get("home", "")
        paths = " ".join(shlex.quote(f"{home}/runs/{r.id}/meta.json") for r in records)
        try:
            sums = SshBox.of(host, self.store).call(f"cksum {paths} 2>&1; exit 0", "look at its runs",
                                                    timeout=60).stdout
        except SshError:
            return True
        last_sums, last_full = self.looks.get(host, (None, 0.0))
        if sums == last_sums and time.monotonic() - last_full < SSH_FULL_LOOK_S:
            return False
        self.looks[host] = (sums, time.monotonic())
        return True

    def box_answered(self, host: str, said: list[str], records: list[RunRecord]) -> dict[str, RunRecord]:
        """Say once that a box stopped answering; after SSH_LOST_S of silence its running points are
        recorded `lost` here (their jobs may live on there); return those."""
        if not said:
            self.silent.pop(host, None)
            return {}
        if host not in self.silent:
            self.silent[host] = time.monotonic()
            self.say(f"{said[0]}; waiting up to {SSH_LOST_S}s for box {host} to answer")
            return {}
        if time.monotonic() - self.silent[host] < SSH_LOST_S:
            return {}
        self.slots.pop(host, None)
        lost = {}
        for record in records:
            if self.running.get(record.id) == host:
                folder = self.store.folder(record.id)
                meta = folder.read_meta()
                if meta.end(LOST, f"box {host} stopped answering over ssh for {SSH_LOST_S}s during the sweep",
                            finished=False, lost_at=utc_now()):
                    self.store.record(meta)
                lost[record.id] = RunRecord.of(meta, folder.path)
        self.say(f"box {host} did not answer for {SSH_LOST_S}s: its running points are recorded lost; the others go on")
        return lost

    def stop_all(self, pending: list, signum: int, labels: dict[str, str]) -> None:
        """Cancel the points not started; hand SIGNUM to each running point's runner on its box (as a
        local sweep's Ctrl-C reaches its jobs) and wait for them to end."""
        for point, _ in pending:
            cancel_queued(self.store, point.run_id, signum)
        pending.clear()
        for run_id, host in self.running.items():
            record = self.store.get(run_id)
            if record is not None:
                ssh_signal_runner(SshBox.of(host, self.store), record.runner.to_data(), run_id, signum, lambda text: None)
        deadline = time.monotonic() + self.options.stop_timeout + SSH_CONNECT_S * 2
        while self.running and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
            self.collect(labels, pending)
        if self.running:
            self.say(f"run(s) {', '.join(self.running)} did not end yet on their boxes; runpilot list follows them")


def ssh_sweep_cli(args, store: "RunStore", configs: list, axes, options: RunOptions, hosts: list[str]) -> int:
    """`sweep --on ssh:box1,box2`: record the points here, place them on the boxes, follow them.
    `--dry-run` prints the plan and asks no box (which box takes a point is decided when it starts,
    by the boxes' free GPUs then); `-d` runs the same in the background."""
    for _, config in configs:  # a mount no box has is refused before anything is recorded
        ssh_plan(hosts[0], "00000000-000000-000000", config, store.home)
    if args.sweep_id and store.sweep_folder(args.sweep_id).path.exists():
        raise UsageError(f"sweep {args.sweep_id} exists already; leave out --sweep-id")
    sweep_id = args.sweep_id or new_sweep_id()
    parallel = args.parallel or len(configs)
    if args.dry_run:
        need = point_gpus(configs[0][1])
        echo(render_sweep_plan(sweep_id, [p for p, _ in configs], args.repeat, parallel, None), err=True)
        note(visible(f"on boxes {', '.join(hosts)}: each point starts on a box with {need or 'no'} free GPU(s) "
                     "when one has them (the boxes' own claims decide); no box was asked"))
        return 0
    if args.detach:
        ssh_check_boxes(store, hosts, note)
        return detach(args.argv, store, "--sweep-id", sweep=store.sweep_folder(sweep_id))
    options = dataclasses.replace(options, code_snapshots=snapshots_once(store, [c for _, c in configs], options))
    stored = {"engine": args.engine, "tags": options.tags, "parallel": args.parallel, "on": f"ssh:{','.join(hosts)}",
              "fail_fast": args.fail_fast, "code_snapshots": options.code_snapshots,
              "pull_outputs": bool(args.pull_outputs)}
    with StopSignals() as signals:
        sweep = plan_sweep(store, sweep_id, configs, axes, args.repeat, stored, configs[0][1].source)
        with held_sweep(store, sweep_id):
            jobs = [(point, config) for point, (_, config) in zip(sweep.points, configs)]
            note(f"sweep {sweep_id}: {len(jobs)} point(s) on {', '.join(hosts)}")
            return follow_box_sweep(store, sweep, jobs, hosts, options, parallel, args.fail_fast, signals, {})


def ssh_check_boxes(store: "RunStore", hosts: list[str], say: Callable[[str], None]) -> list[str]:
    """Before a box sweep goes to the background: can ssh reach each box (one `true` each, all at
    once; the connection made stays for the sweep)? None answers: ssh's failure, one line (exit 125).
    Some answer: the sweep goes on with those, and SAY names the others (they get no points, as
    when a box stops answering mid-sweep); the boxes that answer are returned."""
    import concurrent.futures  # only here: only box sweeps pay for it

    def check(host: str) -> SshError | None:
        try:
            SshBox.of(host, store).call("true", "check it", timeout=SSH_CONNECT_S + 30)
        except SshError as exc:
            return exc
        return None
    with concurrent.futures.ThreadPoolExecutor(len(hosts)) as pool:
        failures = dict(zip(hosts, pool.map(check, hosts)))
    answered = [host for host in hosts if failures[host] is None]
    if not answered:
        first = str(failures[hosts[0]])
        raise SshError(first if len(hosts) == 1 else f"none of the sweep's {len(hosts)} boxes answers over ssh: {first}")
    for host in hosts:
        if failures[host] is not None:
            say(visible(f"{failures[host]}; the sweep goes on without box {host} (on {', '.join(answered)})"))
    return answered


def follow_box_sweep(store: "RunStore", sweep: "Sweep", jobs: list, hosts: list[str], options: RunOptions,
                     parallel: int, fail_fast: bool, signals: "StopSignals", running: dict[str, str]) -> int:
    """Run a box sweep's JOBS (and follow its RUNNING points) to the end; the comparison table."""
    code = BoxSweep(store, sweep, hosts, options, parallel, fail_fast, note, running=running,
                    pull_outputs=bool(sweep.options.get("pull_outputs"))).run(jobs, signals)
    sweep.runner = {}  # no one runs it any more: --resume may
    with contextlib.suppress(OSError):
        sweep.save(store)
    print_sweep_end(store, sweep)
    return code


def ssh_resume_sweep(store: "RunStore", sweep: "Sweep", args) -> int:
    """`sweep --resume SW` of a box sweep: the points whose run still lives on its box are reported
    running and followed, never run again; the ones that never finished are placed anew."""
    hosts = str(sweep.options.on).removeprefix("ssh:").split(",")
    if runner_alive(sweep.runner):
        raise UsageError(f"sweep {sweep.sweep_id} is still running (pid {sweep.runner.get('pid')}); "
                         f"stop it first (runpilot stop {sweep.sweep_id})")
    known = [r for r in (store.get(p.run_id) for p in sweep.points) if r is not None]
    records = {r.id: r for r in refresh(store, known, note)}  # one ssh command per box: what still runs
    running, todo = {}, []
    for point in sweep.points:
        record = records.get(point.run_id)
        if record is not None and record.status == RUNNING and record.runner.backend == "ssh":
            running[record.id] = record.runner.box
            note(f"point {point.index + 1} of sweep {sweep.sweep_id} runs on box {record.runner.box} "
                 f"(run {record.id}): followed, not run again")
        elif record is None or record.status not in (SUCCEEDED, FAILED, TIMEOUT):
            todo.append((point, store.folder(point.run_id), store.folder(point.run_id).read_meta()))
    if not todo and not running:
        echo(f"sweep {sweep.sweep_id}: every point has finished; nothing to resume")
        return 0
    options = RunOptions(engine=sweep.options.engine, tags=sweep.options.tags or {},
                         code_snapshots=sweep.options.code_snapshots or {})
    with StopSignals() as signals:
        sweep.runner = runner_identity()
        jobs = [_requeue(store, sweep, point, folder, meta) for point, folder, meta in todo]
        sweep.save(store)
        note(f"resuming sweep {sweep.sweep_id}: {len(jobs)} point(s) on {', '.join(hosts)}")
        parallel = args.parallel or sweep.options.parallel or len(sweep.points)
        return follow_box_sweep(store, sweep, jobs, hosts, options, parallel,
                                args.fail_fast or bool(sweep.options.fail_fast), signals, running)


def add_pull_outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pull-outputs", action="store_true",
                   help="with --on ssh: copy the run's outputs home when it ends (else runpilot pull ID does)")


def check_pull_outputs(args) -> None:
    """--pull-outputs means something only for a run on a box."""
    if getattr(args, "pull_outputs", False) and not str(getattr(args, "on", "here")).startswith("ssh"):
        raise UsageError("--pull-outputs copies a box's outputs home; it goes with --on ssh:HOST (a run here "
                         "keeps its outputs in its folder already)")


# The places a run can execute, by `--on` name (`--on NAME` or `--on NAME:ARG`).
BACKENDS: dict[str, type[Backend]] = {"here": HereBackend, "slurm": SlurmBackend, "ssh": SshBackend}


def backend_for(on: str) -> Backend:
    """The backend object an `--on` value names (already checked by the argument parser)."""
    name, _, arg = on.partition(":")
    return BACKENDS[name](arg or None)


def refresh_elsewhere(store: "RunStore", records: list[RunRecord], note: Callable[[str], None]) -> dict[str, RunRecord]:
    """The active runs that live in a backend other than this machine, each backend's refreshed in
    one batch by it (a backend may bring its other active runs up to date too); by id."""
    found: dict[str, RunRecord] = {}
    for name, backend in BACKENDS.items():
        if name != HereBackend.name:
            found |= backend().refresh(store, records, note)
    return found


# ==== 18. Runs over time: keeping statuses true, stopping, deleting ==========

def refresh(store: RunStore, records: list[RunRecord], note: Callable[[str], None]) -> list[RunRecord]:
    """Bring queued and running runs up to date: the folder is the truth.

    A run whose meta.json holds a final status is indexed as such (the index catches up). A run
    whose runner died (SIGKILL, a reboot) is stored `lost`, or `cancelled` when it never started;
    a container or process group that lives on is reported. Final statuses are never rewritten.
    """
    remote = refresh_elsewhere(store, [r for r in records if r.status in ACTIVE_STATUSES], note)
    alive = functools.lru_cache(maxsize=None)(lambda runner: runner_alive(json.loads(runner)))
    return [remote.get(r.id, r) if r.backend != HereBackend.name else _refresh_one(store, r, note, alive)
            if r.status in ACTIVE_STATUSES else r for r in records]


def _refresh_one(store: RunStore, record: RunRecord, note: Callable[[str], None],
                 alive: Callable[[str], bool | None]) -> RunRecord:
    """One active run: its row stands while its runner lives (the runner keeps it current; a
    sweep's thousand queued points share one runner, looked at once); else its folder decides."""
    if record.runner and alive(json.dumps(record.runner.to_data(), sort_keys=True)):
        return record
    folder = store.folder(record.id)
    meta = folder.read_meta()
    readable = meta.started_at is not None
    if readable and meta.final:
        store.save_or_defer(meta)
        return RunRecord.of(meta, folder.path)
    runner = meta.runner or record.runner
    if alive(json.dumps(runner.to_data(), sort_keys=True)) is not False:
        return RunRecord.of(meta, folder.path) if readable else record
    never_started = (meta.status if readable else record.status) == QUEUED
    if readable:
        meta.end(CANCELLED if never_started else LOST, "the process that queued it ended before it started"
                 if never_started else f"its runner (pid {runner.pid}) ended without recording how the "
                 "run ended", finished=False, lost_at=utc_now())
        store.record(meta, strict=False)
        record = RunRecord.of(meta, folder.path)
    else:
        record.status, record.reason = LOST, f"its runner ended, and meta.json is unreadable ({meta.problems[0]})"
        with contextlib.suppress(StoreError):
            store.save_record(record)
    if leftover_job(record, meta):
        what = "container" if engine_of(record.engine, "docker").runs_in_container else "process group"
        note(f"run {record.id} lost its runner but its {what} is still running; "
             f"'runpilot stop {record.id}' removes it")
    return record


def stop_run(store: RunStore, record: RunRecord, wait: float, note: Callable[[str], None]) -> RunRecord:
    """Stop a run from another terminal: signal its runner, or remove its orphaned job."""
    folder = store.folder(record.id)
    meta = folder.read_meta()
    name = meta.backend if meta.started_at is not None else record.backend  # the folder is the truth
    if name != HereBackend.name and name in BACKENDS:
        return BACKENDS[name]().stop(store, record, meta, wait, note)
    runner = meta.runner or record.runner
    alive = runner_alive(runner)
    if alive:
        if meta.sweep and SWEEP_ID_RE.match(str(meta.sweep.id)):  # its runner runs the whole sweep
            requests = store.sweep_folder(str(meta.sweep.id)).stop_requests
            make_private_dirs(requests)
            write_private(requests / record.id, b"")
        else:
            os.kill(runner.pid, signal.SIGTERM)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            current = folder.read_meta()
            if current.final:
                store.save_or_defer(current)
                return RunRecord.of(current, folder.path)
            time.sleep(0.1)
        raise RunPilotError(f"run {record.id} did not stop within {wait:.0f}s; try again, "
                            f"or kill its runner (pid {runner.pid})")
    if alive is None and record.status in ACTIVE_STATUSES:
        raise RunPilotError(f"run {record.id} runs on host {runner.host or 'unknown'}; stop it there")
    end_leftover_job(record, meta)
    return refresh(store, [record], note)[0]


def stop_sweep(store: RunStore, sweep_id: str, wait: float, note: Callable[[str], None]) -> str:
    """`runpilot stop SWEEP_ID`: ask the sweep's runner to stop, as Ctrl-C would (or, when it died,
    end the jobs it left and cancel its queued points); say what became of its runs."""
    sweep = Sweep.load(store, sweep_id)
    backend = BACKENDS.get((sweep.options.on or HereBackend.name).partition(":")[0])
    if backend is not None and (said := backend().stop_sweep(store, sweep, wait, note)) is not None:
        return said
    if runner_alive(sweep.runner):
        os.kill(sweep.runner["pid"], signal.SIGTERM)
        deadline = time.monotonic() + wait
        while runner_alive(sweep.runner) and time.monotonic() < deadline:
            time.sleep(0.1)
        if runner_alive(sweep.runner):
            raise RunPilotError(f"sweep {sweep_id} did not stop within {wait:.0f}s; try again, or kill its "
                                f"runner (pid {sweep.runner['pid']})")
    for point in sweep.points:  # a runner that died left its queued points behind
        cancel_queued(store, point.run_id, None)
    records = refresh(store, [RunRecord.of(store.folder(p.run_id).read_meta(), store.folder(p.run_id).path)
                              for p in sweep.points], lambda text: None)  # quiet: it ends what it would note
    for record in records:
        meta = store.folder(record.id).read_meta()
        if record.status == LOST and leftover_job(record, meta):
            end_leftover_job(record, meta)
    return fmt_sweep_statuses(sweep_id, [record.status for record in records])


def end_leftover_job(record: RunRecord, meta: RunMeta, wait: float = 5.0) -> None:
    """Remove the container, or kill the process group, that a dead runner left behind, and wait
    (up to WAIT seconds) until it is gone."""
    engine_of(record.engine, "local").end_leftovers(record.id, meta.job, wait)


def deletable(store: RunStore, records: list[RunRecord], note: Callable[[str], None]) -> list[str]:
    """Why each run that must not be deleted must not be: still active, or its job lives on."""
    refused = []
    for record in refresh(store, records, note):
        if record.status in ACTIVE_STATUSES:
            refused.append(f"run {record.id} is {record.status}; stop it first (runpilot stop {record.id})")
        elif record.status == LOST and leftover_job(record, store.folder(record.id).read_meta()):
            refused.append(f"run {record.id} is lost but its job is still running; 'runpilot stop {record.id}' "
                           "ends it, then delete the run")
    return refused

def with_live_metrics(store: RunStore, records: list[RunRecord]) -> list[RunRecord]:
    """Running runs with their latest metric values from their metrics.json (the index row has
    them only once the run has ended); other runs as they are."""
    return [dataclasses.replace(r, last_metrics={**r.last_metrics, **latest_metrics(store.folder(r.id).metrics)})
            if r.status == RUNNING else r for r in records]


def reparse_run(store: RunStore, run_id: str, sources: tuple[MetricsSource, ...] | None) -> tuple[int, int, list[str]]:
    """Rebuild a finished run's metrics.json from its logs.txt (and event files): (new, old count, notices).

    SOURCES None: the run's own metrics_from. The new file is written whole beside the old one,
    which stays in place until the new one replaces it in one rename.
    """
    folder = store.folder(run_id)
    meta = folder.read_meta()
    if meta.status in ACTIVE_STATUSES:
        raise UsageError(f"run {run_id} is {meta.status}; reparse it once it has ended")
    if not folder.logs.exists():
        raise StoreError(f"run {run_id} has no logs.txt in {folder.path}; there is nothing to reparse")
    config = dataclasses.replace(_reparse_config(folder, sources), source=meta.config_file)
    sources = config.metrics_from if sources is None else sources
    tmp = folder.path / f".metrics.json.reparse.{os.getpid()}"
    try:
        metrics = MetricLog(tmp)
        try:
            metrics.use_sources(sources, [])
            _reparse_log(folder.logs, metrics)
            watchers = _reparse_watchers(config, meta, sources)
            for watcher in watchers:
                metrics.add_samples(watcher.poll())
        finally:
            metrics.close()
        if metrics.error:
            raise metrics.error
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, folder.metrics)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StoreError(f"cannot write the new metrics of run {run_id} in {folder.path} ({exc.strerror}); "
                         "its old metrics.json is unchanged") from exc
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folder.sample_times)  # arrival times of the old samples: they would mislabel the new ones
    old = meta.samples.get("count", 0)
    meta.samples = {"count": metrics.count, "malformed": metrics.malformed}
    meta.last_metrics = metrics.last
    folder.write_meta(meta)
    behind = store.save_or_defer(meta)
    notices = capture_notices(folder.logs, meta.samples, sources, scanner_saw_prefix=True)
    notices += damaged_event_warnings(sum(w.corrupt for w in watchers))
    hidden = [s.value for s in sources if s.kind == "tensorboard"
              and tensorboard_folder(config, meta.engine or "docker", s.value) is None]
    notices += [f"tensorboard: {path} is not inside any mount of the run; its event files cannot be read"
                for path in hidden]
    return metrics.count, old, notices + ([behind] if behind else [])


def _reparse_config(folder: RunFolder, sources: tuple[MetricsSource, ...] | None) -> JobConfig:
    """The run's stored config; without one, an empty config serves sources given on the command line."""
    try:
        return load_config(folder.config)
    except ConfigError:
        if sources is None:
            raise
        return JobConfig(name=folder.run_id, image=None, entrypoint="")


def _reparse_log(path: Path, metrics: MetricLog) -> None:
    """Feed logs.txt through the tee's own scanners, block by block, as if the job wrote it now."""
    scanner = MetricScanner()
    with open(path, "rb") as f:
        for chunk in iter(functools.partial(f.read, READ_SIZE), b""):
            metrics.add_lines(scanner.feed(chunk))
            metrics.feed_sources(1, chunk)
    metrics.add_lines(scanner.finish())
    metrics.malformed += scanner.overlong
    if metrics.lines is not None:
        metrics.add_samples(metrics.lines.finish())


def _reparse_watchers(config: JobConfig, meta: RunMeta, sources) -> list[TensorBoardWatcher]:
    """Event-file folders of the sources, keeping the files last written while the run ran."""
    if not meta.started_at:
        return []
    start = parse_time(meta.started_at).timestamp()
    end = parse_time(meta.finished_at).timestamp() + 60 if meta.finished_at else time.time()
    watchers = []
    for source in sources:
        folder = tensorboard_folder(config, meta.engine or "docker", source.value) \
            if source.kind == "tensorboard" else None
        if folder is not None:
            watchers.append(TensorBoardWatcher(folder, (start, end)))
    return watchers


def by_metric(records: list[RunRecord], what: RunFilter) -> list[RunRecord]:
    """RECORDS sorted again by WHAT's metric once running runs carry their live values: the index
    sorted them as having none. The same order as the index's: runs without the metric last, then
    the value, then the newest first."""
    if what.sort in ("started", "duration") or not any(r.status == RUNNING for r in records):
        return records

    def value(record: RunRecord) -> float | None:
        found = record.last_metrics.get(what.sort)
        number = isinstance(found, (int, float)) and not isinstance(found, bool) and found == found  # not NaN
        return found if number else None

    records = sorted(records, key=lambda r: r.started_at, reverse=True)
    records = sorted(records, key=lambda r: value(r) or 0, reverse=not what.ascending)
    return sorted(records, key=lambda r: value(r) is None)


# ==== 19. Presentation: tables, durations, sparklines ========================
# Everything here turns data into text for a terminal: pure functions, and every value that
# came from a job, a config or a file goes through visible() on its way out.

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
SPARK_ASCII = "_.-=+*#@"
ELLIPSIS = "…"
STATUS_COLOURS = {SUCCEEDED: "32", FAILED: "31", INTERRUPTED: "33", TIMEOUT: "33", RUNNING: "36", LOST: "35",
                  QUEUED: "34", CANCELLED: "90"}
# Metrics whose name says lower is better; every other metric is better higher.
LOWER_IS_BETTER = re.compile(r"loss|err|mse|mae|rmse|perplexity|ppl|wer|cer|time(?!_?steps?)|latency", re.IGNORECASE)
# Names whose larger values are better: with LOWER_IS_BETTER, the metrics `compare` may star when
# no config lists its metrics (a star on `lr` or `epoch` means nothing).
HIGHER_IS_BETTER = re.compile(r"acc(?!um)|f1|auc|precision|recall|score|bleu|rouge|map|iou|reward|top\d", re.IGNORECASE)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def fmt_ago(iso: str | None, now: _dt.datetime | None = None) -> str:
    if not iso:
        return "-"
    now = now or _dt.datetime.now(_dt.timezone.utc)
    try:
        seconds = max(0.0, (now - parse_time(iso)).total_seconds())
    except ValueError:
        return visible(iso)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def fmt_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else visible(str(value))


def fmt_size(size: float) -> str:
    """1536 -> "1.5 KiB": a file's size for people."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def text_width(text: str) -> int:
    """Columns a string takes on a terminal: wide (CJK) characters take two, combining marks none."""
    if text.isascii():
        return len(text)
    import unicodedata
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def clip(text: str, width: int, ellipsis: str = ELLIPSIS) -> str:
    """TEXT cut to WIDTH terminal columns (wide characters count two), ending in ELLIPSIS when cut."""
    if width <= 0:
        return ""
    if text_width(text) <= width:
        return text
    room, out, used = width - text_width(ellipsis), [], 0
    for ch in text:
        w = text_width(ch)
        if used + w > room:
            break
        out.append(ch)
        used += w
    return "".join(out) + ellipsis


def render_table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset(),
                 width: int | None = None, min_columns: int = 1, shrink: set[int] = frozenset(),
                 paint=None, middle: set[int] = frozenset()) -> str:
    """Aligned columns that fit WIDTH: whole columns past MIN_COLUMNS are dropped from the right
    until the rest fits with the SHRINK columns cut to 8 columns wide; then the SHRINK columns are
    cut with … only as much as needed, the widest first, so the table uses the whole width. The
    MIDDLE columns are cut in their middle, keeping their end (clip_middle).

    Cells are made visible (no control codes). `paint(column, padded_text, row)` may decorate a
    body cell (colour) after alignment.
    """
    rows = [[visible(c) for c in r] for r in rows]
    widths = [max([text_width(h)] + [text_width(r[i]) for r in rows]) for i, h in enumerate(headers)]
    keep = len(headers)
    if width:
        keep = _columns_that_fit(widths, width, min_columns, shrink)
        _shrink_to(widths, width, keep, shrink)

    def line(cells: list[str], row: list[str] | None) -> str:
        cells = [(clip_middle if i in middle else clip)(c, widths[i]) for i, c in enumerate(cells[:keep])]
        pads = [" " * (widths[i] - text_width(c)) for i, c in enumerate(cells)]
        parts = [pad + c if i in right else c + pad for i, (c, pad) in enumerate(zip(cells, pads))]
        if paint and row is not None:
            parts = [paint(i, p, row) for i, p in enumerate(parts)]
        return "  ".join(parts).rstrip()
    return "\n".join([line(headers, None)] + [line(r, r) for r in rows])


def _columns_that_fit(widths: list[int], width: int, min_columns: int, shrink: set[int]) -> int:
    """How many columns from the left fit WIDTH with the SHRINK columns cut to 8 (at least MIN_COLUMNS)."""
    least = [min(w, 8) if i in shrink else w for i, w in enumerate(widths)]
    keep = len(widths)
    while keep > min_columns and sum(least[:keep]) + 2 * (keep - 1) > width:
        keep -= 1
    return keep


def _shrink_to(widths: list[int], width: int, keep: int, shrink: set[int]) -> None:
    """Narrow the SHRINK columns among the first KEEP, the widest first, until they fit WIDTH."""
    excess = sum(widths[:keep]) + 2 * (keep - 1) - width
    cuttable = [i for i in shrink if i < keep]
    while excess > 0 and any(widths[i] > 8 for i in cuttable):
        widest = max((i for i in cuttable if widths[i] > 8), key=lambda i: widths[i])
        widths[widest] -= 1
        excess -= 1


def clip_middle(text: str, width: int, ellipsis: str = ELLIPSIS) -> str:
    """TEXT cut to WIDTH columns in its middle, keeping its end, which tells similar names apart: a
    sweep point's `[LR=0.01]` is kept whole when it fits (`synth-…[LR=0.01]`), else two thirds are end."""
    if text_width(text) <= width:
        return text
    room = width - text_width(ellipsis)
    if room < 2:
        return clip(text, width, ellipsis)
    bracket = point_start(text) if point_start(text) < len(text) else -1
    tail_room = text_width(text[bracket:]) if 0 < bracket and text_width(text[bracket:]) < room else room - room // 3
    tail = _fitting(reversed(text), tail_room)
    head = _fitting(text, room - text_width(tail))
    return head + ellipsis + tail[::-1]


def _fitting(chars, room: int) -> str:
    """The leading CHARS that fit ROOM terminal columns."""
    out, used = [], 0
    for ch in chars:
        if used + text_width(ch) > room:
            break
        out.append(ch)
        used += text_width(ch)
    return "".join(out)


def sparkline(values: list[float], width: int = 40, ascii_only: bool = False) -> str:
    """The shape of a series in block characters, resampled to at most `width` points. VALUES may be
    metric_summary's array of finite floats (used as it is: a million values stay 8 MB)."""
    from array import array
    numbers = values if isinstance(values, array) else \
        [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not numbers or width <= 0:
        return ""
    if len(numbers) > width:
        step = len(numbers) / width
        numbers = [numbers[int(i * step)] for i in range(width - 1)] + [numbers[-1]]
    blocks = SPARK_ASCII if ascii_only else SPARK_BLOCKS
    low, high = min(numbers), max(numbers)
    span = (high - low) or 1.0
    return "".join(blocks[min(len(blocks) - 1, int((v - low) / span * (len(blocks) - 1) + 0.5))]
                   for v in numbers)


def metric_summary(samples: Iterable[dict]) -> dict[str, dict]:
    """count, first, last, min, max (of the numbers, NaN left out) and `values` (the finite numbers,
    as floats, for a sparkline) of every metric in a run. SAMPLES may be a stream (iter_metrics):
    they are folded a batch at a time, a metric's batch at once, and only the floats are kept."""
    from array import array
    summary: dict[str, dict] = {}
    samples = iter(samples)
    while batch := list(itertools.islice(samples, 4096)):
        for key in dict.fromkeys(itertools.chain.from_iterable(batch)):
            if key != "step":
                _fold_metric(summary, key, [s[key] for s in batch if key in s], array)
    return summary


def _fold_metric(summary: dict[str, dict], key: str, values: list, array) -> None:
    """Fold a batch of one metric's values (in order) into its entry in SUMMARY."""
    entry = summary.get(key)
    if entry is None:
        entry = summary[key] = {"count": 0, "first": values[0], "values": array("d"), "min": None, "max": None}
    entry["count"] += len(values)
    entry["last"] = values[-1]
    kinds = set(map(type, values))
    numbers = values if kinds <= {int, float} else [v for v in values if type(v) is int or type(v) is float]
    if float in kinds:
        numbers = [v for v in numbers if v == v]  # NaN is no minimum or maximum
    if not numbers:
        return
    low, high = min(numbers), max(numbers)
    if entry["min"] is None or low < entry["min"]:
        entry["min"] = low
    if entry["max"] is None or high > entry["max"]:
        entry["max"] = high
    try:
        floats = array("d", numbers)
    except OverflowError:  # an integer beyond a float: no point on a sparkline
        floats = array("d")
        for number in numbers:
            with contextlib.suppress(OverflowError):
                floats.append(number)
    total = sum(floats)
    entry["values"].extend(floats if total - total == 0.0 else [v for v in floats if math.isfinite(v)])


def colour_status(text: str, status: str) -> str:
    """Wrap an already padded cell in the status's ANSI colour."""
    return f"\x1b[{STATUS_COLOURS[status]}m{text}\x1b[0m" if status in STATUS_COLOURS else text


def list_columns(records: list[RunRecord]) -> list[str]:
    """The metrics the runs' configs feature, in first-seen order (all metrics if none is listed)."""
    names = list(dict.fromkeys(m for r in records for m in r.metric_names))
    return names or sorted({m for r in records for m in r.last_metrics})[:6]


def fmt_utc_seconds(iso: str) -> str:
    """`2026-12-02T02:30:45.321Z` as `2026-12-02T02:30:45Z`: ISO 8601 UTC, to the second."""
    head, dot, _ = iso.partition(".")
    return f"{head}Z" if dot else iso


def fmt_tags(tags: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(tags.items())) or "-"


def render_runs(records: list[RunRecord], metrics: list[str], absolute: bool, width: int | None,
                colour: bool = False, full: bool = False, points: dict[str, dict] | None = None) -> str:
    """`list`: one row per run, metrics featured by the configs, then tags; short ids, long values cut
    (names in their middle) and then the last columns dropped (tags first, then metrics) to fit WIDTH,
    unless FULL. The first six columns always stay. With POINTS (`list --sweep`: run id -> its
    point's values) the swept keys follow them as columns of their own, cut and dropped after the
    metrics; else a SWEEP
    column says which sweep a run is in, when some are."""
    tags = any(r.tags for r in records)
    fixed = ["ID", "NAME", "STATUS", "STARTED", "DURATION", "EXIT", "TAGS"]
    keys = swept_columns(points) if points else []
    sweep = not points and any(r.sweep_id for r in records)
    between = [_key_header(k, keys) for k in keys] + (["SWEEP"] if sweep else [])
    headers = fixed[:6] + between + [m if m.upper() in fixed else m.upper() for m in metrics] + \
        (["TAGS"] if tags else [])
    rows = []
    for r in records:
        started = fmt_utc_seconds(r.started_at) if absolute else fmt_ago(r.started_at)
        status = f"{r.status} ({r.reason})" if r.status == QUEUED and r.reason else r.status
        row = [r.id if full else short_id(r.id), base_name(r.name) if keys else r.name, status, started,
               fmt_duration(r.duration), "-" if r.exit_code is None else str(r.exit_code)]
        row += [fmt_cell((points or {}).get(r.id, {}).get(k)) for k in keys]
        row += [fmt_sweep_ref(r.sweep_id, full)] if sweep else []
        row += [fmt_value(r.last_metrics.get(m)) for m in metrics]
        rows.append(row + ([fmt_tags(r.tags)] if tags else []))
    paint = (lambda col, text, row: colour_status(text, row[2].split()[0]) if col == 2 else text) if colour else None
    columns = set(range(6, 6 + len(keys)))  # long swept values are cut, and keys that cannot fit dropped last
    shrink = set() if full else {1} | columns | ({len(headers) - 1} if tags else set())
    first = 6 + len(between)
    return render_table(headers, rows, {4, 5} | columns | set(range(first, first + len(metrics))),
                        None if full else width, min_columns=6, shrink=shrink, paint=paint, middle={1} | columns)


def swept_columns(points: dict[str, dict]) -> list[str]:
    """The keys a sweep's points set, in plan order, then `repeat` when a point ran more than once."""
    keys = list(dict.fromkeys(k for values in points.values() for k in values if k != "repeat"))
    return keys + (["repeat"] if any(values.get("repeat") for values in points.values()) else [])


def _key_header(key: str, keys: list[str]) -> str:
    """A swept key's column: its last part (`env.LR` -> `LR`), the whole key where two share it."""
    short = key.rsplit(".", 1)[-1]
    return (key if sum(k.rsplit(".", 1)[-1] == short for k in keys) > 1 else short).upper()


def fmt_sweep_ref(sweep_id: str | None, full: bool = False) -> str:
    """A sweep as views name it: `sw-391ffe` (its short id, which every SWEEP_ID argument takes)."""
    if not sweep_id:
        return "-"
    return sweep_id if full else f"sw-{sweep_id[-6:]}"


def render_sweeps(summaries: list, width: int | None, full: bool = False) -> str:
    """`runpilot sweeps`: one row per sweep (SweepSummary), newest first, fit to WIDTH."""
    headers = ["SWEEP", "NAME", "CREATED", "DONE", "STATUSES", "BEST"]
    rows = [[fmt_sweep_ref(s.sweep_id, full), s.name + (" (slurm)" if s.on == "slurm" else ""),
             fmt_ago(s.created_at), f"{s.done}/{s.total}",
             ", ".join(f"{n} {status}" for status, n in s.statuses.items()) or "-",
             "-" if s.best is None else f"{s.metric}={fmt_value(s.best)}"] for s in summaries]
    if full or not width:
        return render_table(headers, rows, {3}, None, min_columns=len(headers))
    for shrink in ({1}, {1, 4, 5}):  # the name gives way first; the statuses and the best when it is not enough
        table = render_table(headers, rows, {3}, width, min_columns=len(headers), shrink=shrink, middle={1, 5})
        if max(text_width(line) for line in table.splitlines()) <= width:
            break
    return table


def flatten(data: object, prefix: str = "") -> dict[str, object]:
    """{"env": {"LR": 1}} -> {"env.LR": 1}; lists stay whole values."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, object] = {}
    for key, value in data.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def best_of(name: str, values: list) -> object:
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
    if not numbers:
        return None
    return min(numbers) if LOWER_IS_BETTER.search(name) else max(numbers)


def differing(configs: list[dict]) -> list[str]:
    """The flattened config keys whose values differ between runs."""
    keys = sorted({k for flat in configs for k in flat})
    return [k for k in keys if any(flat.get(k) != configs[0].get(k) for flat in configs)]


def compare_rows(runs: list[tuple[RunRecord, dict, dict]], skip: tuple[str, ...] = (),
                 starred: list[str] | None = None) -> list[list[str]]:
    """Rows of `compare`: differing config values (but the SKIP keys), status, duration, each
    metric's last and best. `runs` holds (record, flattened config, metric summary); the best
    value of a row gets a `*` where best means something (see metrics_to_star).
    """
    starred = metrics_to_star(runs, starred)
    rows = []
    for key in [k for k in differing([flat for _, flat, _ in runs]) if k not in skip]:
        rows.append([key] + [fmt_cell(flat.get(key)) for _, flat, _ in runs])
    rows.append(["status"] + [r.status for r, _, _ in runs])
    rows.append(["duration"] + [fmt_duration(r.duration) for r, _, _ in runs])
    for metric in dict.fromkeys(m for _, _, summary in runs for m in summary):
        entries = [summary.get(metric) for _, _, summary in runs]
        best = (lambda e: best_of(metric, [e["min"], e["max"]]))  # the best of all its values
        for label, pick in (("last", lambda e: e["last"]), ("best", best)):
            values = [pick(e) if e else None for e in entries]
            winner = best_of(metric, values)
            cells = [fmt_value(v) + ("*" if winner is not None and v == winner and len(runs) > 1
                                     and metric in starred else "") for v in values]
            rows.append([f"{metric} ({label})"] + cells)
    return rows


def metrics_to_star(runs: list[tuple[RunRecord, dict, dict]], asked: list[str] | None) -> set[str]:
    """The metrics whose best value `compare` stars: those ASKED for (--metric), else the ones the
    runs' configs list (metrics:), else those whose name says which way is better (loss, acc)."""
    if asked:
        return set(asked)
    listed = {m for r, _, _ in runs for m in r.metric_names}
    if listed:
        return listed
    return {m for _, _, summary in runs for m in summary
            if LOWER_IS_BETTER.search(m) or HIGHER_IS_BETTER.search(m)}


def fmt_cell(value: object) -> str:
    if isinstance(value, list):
        return ",".join(fmt_scalar(v) for v in value)
    return "-" if value is None else fmt_scalar(value)


def export_rows(runs: list[tuple[RunRecord, list[dict], dict]], keys: list[str],
                tag_names: list[str]) -> tuple[list[str], list[list]]:
    """One row per sample of every run: run_id, name, the config KEYS and tags asked for, step,
    then every metric (empty if absent). runs holds (record, samples, flattened config)."""
    metrics = list(dict.fromkeys(k for _, samples, _ in runs for s in samples for k in s if k != "step"))
    rows = [[r.id, r.name] + [fmt_cell(flat.get(k)) for k in keys] + [r.tags.get(t, "") for t in tag_names]
            + [s.get("step")] + [s.get(m, "") for m in metrics] for r, samples, flat in runs for s in samples]
    return ["run_id", "name"] + keys + [f"tag.{t}" for t in tag_names] + ["step"] + metrics, rows


def export_stream(runs: list[tuple[RunRecord, Path, dict]], keys: list[str], tag_names: list[str], fmt: str,
                  write: Callable[[str], object]) -> int:
    """`export`, a line at a time to WRITE, reading each run's metrics.json as a stream (the CSV
    header's metrics take a first pass): as export_rows and render_csv, or JSON lines. Returns
    how many samples were written."""
    import csv
    import io
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")

    def emit(rows: list[list]) -> None:
        """A CSV line per row to WRITE (a row with a line break in a cell is still one call)."""
        writer.writerows(rows)
        lines = buffer.getvalue().split("\n")[:-1]
        buffer.seek(0)
        buffer.truncate()
        if len(lines) != len(rows):  # a cell holds a line break: row by row
            lines = []
            for row in rows:
                writer.writerow(row)
                lines.append(buffer.getvalue()[:-1])
                buffer.seek(0)
                buffer.truncate()
        for line in lines:
            write(line)
    if fmt == "csv":
        metrics = list(dict.fromkeys(k for _, path, _ in runs for k in metric_names_in(path)))
        emit([["run_id", "name"] + keys + [f"tag.{t}" for t in tag_names] + ["step"] + metrics])
    count = 0
    for r, path, flat in runs:
        fixed = [r.id, r.name] + [fmt_cell(flat.get(k)) for k in keys] + [r.tags.get(t, "") for t in tag_names]
        head = {"run_id": r.id, "name": r.name, **{k: flat.get(k) for k in keys},
                **{f"tag.{t}": r.tags.get(t) for t in tag_names}}
        for block in metric_blocks(path):
            samples = samples_in_block(block)
            count += len(samples)
            if fmt == "csv":
                emit([fixed + [s.get("step")] + [s.get(m, "") for m in metrics] for s in samples])
            else:
                for s in samples:
                    write(_strict_json({**head, **s}))
    return count


def _strict_json(value: dict) -> str:
    """json.dumps(json_safe(VALUE)), the walk through json_safe only for a value that may need it."""
    text = json.dumps(value)
    return json.dumps(json_safe(value)) if "NaN" in text or "Infinity" in text else text


def render_csv(header: list[str], rows: list[list]) -> str:
    import csv
    import io
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def render_summary(outcome: RunOutcome) -> list[str]:
    """What `run` says when a run ends: how, the featured metrics, where its files are."""
    r, meta = outcome.record, outcome.meta
    lines = [f"run {r.id} {fmt_ending(meta)}"
             + (f"; runpilot exits with {outcome.exit_code}" if outcome.exit_code != (r.exit_code or 0) or
                r.exit_code is None else "")]
    if r.last_metrics:
        lines.append("  " + "  ".join(f"{k}={fmt_value(v)}" for k, v in sorted(r.last_metrics.items())[:12]))
    return lines + [f"  folder: {r.path}"]


def fmt_ending(meta: RunMeta) -> str:
    """`failed in 3.2s (exit code 3)`, `interrupted by Ctrl-C after 2.0s (exit code 143)`."""
    code = "" if meta.exit_code is None else f" (exit code {meta.exit_code})"
    took = fmt_duration(meta.duration)
    if meta.status == INTERRUPTED:
        by = f" by {signal_name(meta.stop_signal)}" if meta.stop_signal else ""
        return f"interrupted{by} after {took}{code}"
    if meta.status == TIMEOUT:
        return f"timed out after {took}{code}"
    if meta.status == CANCELLED:
        by = f" by {signal_name(meta.stop_signal)}" if meta.stop_signal else ""
        return f"cancelled{by} before the job started"
    return f"{meta.status} in {took}{code}"


def render_show(record: RunRecord, meta: RunMeta, samples: list[dict], files: dict[str, int],
                config_text: str, log_lines: list[str], ascii_only: bool, width: int | None,
                outputs: dict[str, int] | None = None) -> str:
    """`show`: everything about one run, each line cut to WIDTH (None: no limit)."""
    fit = (lambda text: clip(visible(text), width)) if width else visible
    out = [fit(line) for line in _show_facts(record, meta)]
    out += ["files"] + [fit(f"  {name:<14} {fmt_size(size):>10}") for name, size in files.items()]
    out += [fit(line) for line in render_outputs(outputs or {})]
    out += _metrics_block(samples, ascii_only, width)
    out += [fit(line) for line in usage_lines(meta)]
    out += [fit(f"warning    {w}") for w in meta.warnings]
    if meta.hint:
        out.append(fit(f"hint       {meta.hint}"))
    if log_lines:
        out.append(f"log        the last {len(log_lines)} line(s) of logs.txt")
        out += [fit("  " + line) for line in log_lines]
    if config_text:
        out += ["config"] + [fit("  " + line) for line in config_text.splitlines()]
    return "\n".join(out)


def _show_facts(record: RunRecord, meta: RunMeta) -> list[str]:
    """`show`'s `label  value` lines, those a run has."""
    status = record.status + ("" if record.exit_code is None else f" (exit code {record.exit_code})")
    slurm = meta.slurm.to_data()
    facts = [
        ("run", record.id), ("name", record.name), ("status", status), ("reason", record.reason),
        ("started", record.started_at), ("finished", record.finished_at or "-"),
        ("duration", fmt_duration(record.duration)),
        ("engine", f"{meta.engine or '-'} {meta.engine_version or ''}".rstrip()),
        ("image", f"{meta.image or '-'}" + (f"  ({meta.image_id})" if meta.image_id else "")),
        *[("digest", digest) for digest in meta.repo_digests],
        ("command", meta.command_line or "-"), ("host", meta.host or "-"),
        ("gpus", ", ".join(meta.devices)),
        ("slurm", slurm.get("job_id") and f"job {slurm['job_id']}" + (f" on {slurm['node']}" if slurm.get("node")
                                                                        else "")
         + (f", partition {slurm['partition']}" if slurm.get("partition") else "")),
        ("ssh", meta.runner.backend == "ssh" and f"box {meta.runner.box}, "
                                                 f"{meta.runner.extra.get('home')}/runs/{record.id}"),
        ("folder", record.path), ("tags", " ".join(f"{k}={v}" for k, v in sorted(record.tags.items()))),
        ("sweep", meta.sweep.id and f"{meta.sweep.id} point {meta.sweep.index}"),
        ("rerun of", meta.rerun_of), ("code", fmt_code(meta.code)),
        *[("git", f"{repo.get('root')} {repo.get('branch')} {str(repo.get('commit'))[:12]}"
                  + (" (uncommitted changes)" if repo.get("dirty") else "")) for repo in meta.git]]
    return [f"{label:<10} {value}" for label, value in facts if value]


def _metrics_block(samples: list[dict], ascii_only: bool, width: int | None) -> list[str]:
    summary = metric_summary(samples)
    if not summary:
        return ["metrics    none"]
    rows = [[name, str(e["count"]), fmt_value(e["first"]), fmt_value(e["last"]), fmt_value(e["min"]),
             fmt_value(e["max"])] for name, e in summary.items()]
    headers = ["metric", "count", "first", "last", "min", "max"]
    used = max(map(len, render_table(headers, rows, right={1, 2, 3, 4, 5}).splitlines()))
    trend = 40 if width is None else max(0, min(40, width - 2 - used - 2))
    if trend >= 8:
        headers.append("trend")
        rows = [row + [sparkline(e["values"], trend, ascii_only)] for row, e in zip(rows, summary.values())]
    table = render_table(headers, rows, right={1, 2, 3, 4, 5}, width=None if width is None else width - 2,
                         shrink={0})
    return ["metrics"] + ["  " + line for line in table.splitlines()]


def render_compare(runs: list[tuple[RunRecord, dict, dict]], width: int | None, full: bool,
                   skip: tuple[str, ...] = (), starred: list[str] | None = None) -> str:
    """`compare`: runs side by side (a sweep's leave out their names: the swept values say it)."""
    header = [""] + [r.id if full else short_id(r.id) for r, _, _ in runs]
    rows = compare_rows(runs, skip, starred)
    if full or not width:
        return render_table(header, rows, set(range(1, len(runs) + 1)), None, min_columns=len(header))
    blocks = []
    for columns in _column_blocks([header] + rows, width):  # too many runs for one table: several, one below another
        block = [0, *columns]
        blocks.append(render_table([header[i] for i in block], [[row[i] for i in block] for row in rows],
                                   set(range(1, len(block))), width, min_columns=len(block),
                                   shrink=set(range(len(block)))))
    return "\n\n".join(blocks)


def _column_blocks(table: list[list[str]], width: int) -> list[list[int]]:
    """The columns after the first, packed into groups that fit WIDTH beside the first column."""
    widths = [max(text_width(visible(row[i])) for row in table) for i in range(len(table[0]))]
    label = min(widths[0], max(8, width // 3))
    blocks: list[list[int]] = [[]]
    used = label
    for i in range(1, len(widths)):
        if blocks[-1] and used + 2 + widths[i] > width:
            blocks.append([])
            used = label
        blocks[-1].append(i)
        used += 2 + widths[i]
    return blocks


def usage_lines(meta: RunMeta) -> list[str]:
    """`show`'s lines on what the job used: its peak memory and, per GPU, utilization and memory."""
    usage, lines = meta.usage, []
    number = (lambda value, unit: f"{value:g}{unit}" if _is_number(value) else "?")
    if _is_number(usage.get("peak_memory")):
        lines.append(f"memory     peak {fmt_size(usage['peak_memory'])} ({usage.get('memory_of', 'job')})")
    gpus = usage.get("gpus") if isinstance(usage.get("gpus"), dict) else {}
    for index, s in gpus.items():
        if isinstance(s, dict):
            lines.append(f"gpu {index:<6} util mean {number(s.get('util_mean'), '%')}, peak "
                         f"{number(s.get('util_peak'), '%')}; memory peak {number(s.get('mem_peak_mib'), ' MiB')} "
                         f"({s.get('samples')} sample{'' if s.get('samples') == 1 else 's'})")
    if usage.get("gpu_error"):
        lines.append(f"gpu stats  none: {usage['gpu_error']}")
    if usage.get("hint"):
        lines.append(f"hint       {usage['hint']}")
    return lines

def render_outputs(outputs: dict[str, int], most: int = 20) -> list[str]:
    """`show`'s outputs block: each file the job kept in $RUNPILOT_OUTPUT_DIR, with its size, and the total."""
    if not outputs:
        return []
    lines = [f"outputs    {len(outputs)} file(s), {fmt_size(sum(outputs.values()))}"]
    lines += [f"  {fmt_size(size):>10}  {name}" for name, size in list(outputs.items())[:most]]
    if len(outputs) > most:
        lines.append(f"  ... and {len(outputs) - most} more (runpilot show --json lists them all)")
    return lines


def fmt_code(code: dict) -> str | None:
    """`snapshot 1a2b3c4d5e6f (12 files, 40.0 KiB) of /src`, or how else the run's code ran."""
    if code.get("mode") == "snapshot":
        return (f"snapshot {str(code.get('snapshot'))[:12]} ({code.get('files')} file(s), "
                f"{fmt_size(code.get('bytes') or 0)}) of {code.get('folder')}")
    if code.get("mode") in ("live", "off"):
        return f"{code.get('folder')} as it was (live: {code.get('reason')})"
    return None


def render_code_diff(old: list[dict], new: list[dict], read: Callable[[str], bytes], names: tuple[str, str]) -> list[str]:
    """A unified diff of two snapshots' files (READ gives an object's bytes by hash); binary files are named."""
    import difflib  # only here: not every start pays for it
    before, after = {e["path"]: e for e in old}, {e["path"]: e for e in new}
    lines = []
    for path in sorted(set(before) | set(after)):
        a, b = before.get(path), after.get(path)
        if a is not None and b is not None and (a.get("sha256"), a.get("link")) == (b.get("sha256"), b.get("link")):
            continue
        texts = [_diff_text(e, read) for e in (a, b)]
        if None in texts:
            lines.append(f"Binary files {names[0]}/{path} and {names[1]}/{path} differ")
            continue
        lines += [line.rstrip("\n") for line in difflib.unified_diff(
            texts[0], texts[1], f"{names[0]}/{path}" if a else "/dev/null", f"{names[1]}/{path}" if b else "/dev/null")]
    return lines


def _diff_text(entry: dict | None, read: Callable[[str], bytes]) -> list[str] | None:
    """A snapshot file's lines, [] when absent, None when it is not text."""
    if entry is None:
        return []
    if "link" in entry:
        return [f"symlink to {entry['link']}\n"]
    data = read(entry["sha256"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\0" in text else text.splitlines(keepends=True)

# ==== 20. Plots: braille charts and the HTML page ============================
# `runpilot plot` reads metrics.json in blocks, one regex pass per metric, and folds each series into at
# most PLOT_BUCKETS min/max buckets as it reads, so memory stays flat however long a run is. Everything
# after the reader is pure: points in, lines of text or one HTML page out.

# Braille dot bits by [row][column] within a cell of 2 x 4 dots (dots 1-2-3-7 left, 4-5-6-8 right).
BRAILLE_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
BRAILLE_BASE = 0x2800
# One marker per run where colour cannot tell runs apart; with --ascii the curve is drawn with it.
PLOT_MARKERS = "*o+x#@%&=$~^"
# ANSI colours per run (normal, then bright); the raw series under a smoothed one is drawn faint (SGR 2).
PLOT_COLOURS = ("36", "33", "35", "32", "34", "31", "96", "93", "95", "92", "94", "91")
# The page's colours per run (Tableau 10): told apart on screen and on paper.
SVG_COLOURS = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
               "#9c755f", "#bab0ac")
# Buckets a series keeps while it is read (two points each): more than any chart has pixel columns.
PLOT_BUCKETS = 1024
# Below this a chart has no room for its axis labels and a legend.
PLOT_MIN_WIDTH = 20
PLOT_MIN_HEIGHT = 6
# ... and above this it is no longer a picture (and its grid of cells would fill the memory).
PLOT_MAX_SIZE = 1000
# Values and steps beyond this are left out, as NaN is: an axis around them would overflow a float.
PLOT_MAX_VALUE = 1e300
# --follow redraws this often at most (re-reading a long run costs more; the pause grows with it).
FOLLOW_SECONDS = 1.0
# The SVG's drawing area in user units (the page scales it to its width).
SVG_WIDTH = 960
SVG_PLOT_HEIGHT = 260
# -- series, folded as they are read -------------------------------------------

def ema(values, weight: float, state: tuple[float, float] = (0.0, 1.0)) -> tuple[list[float], tuple]:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start.

    WEIGHT 0 gives the values back; 0.99 is very smooth. STATE (the running average and weight**n)
    carries one call over to the next, so a series can be smoothed block by block.
    """
    average, decay = state
    keep = 1.0 - weight
    out = list(itertools.accumulate(values, lambda a, v: a * weight + keep * v, initial=average))[1:]
    state = (out[-1] if out else average, decay * weight ** len(out))
    done = 0
    while done < len(out) and decay > 1e-17:  # debiasing matters until weight**n is lost in a double
        decay *= weight
        out[done] /= 1.0 - decay
        done += 1
    return out, state


def _extremes(points: tuple) -> tuple:
    """The lowest and the highest of some (x, y) points in their order; the first and last if all are level."""
    low = min(range(len(points)), key=lambda i: points[i][1])
    high = max(range(len(points)), key=lambda i: points[i][1])
    if low == high:
        return points[:1] if len(points) == 1 else (points[0], points[-1])
    return (points[low], points[high]) if low < high else (points[high], points[low])


def _bucket(ys, x_at: Callable[[int], float], start: int, end: int) -> tuple:
    """_extremes of the samples START..END of a block, found by C's min and max, not per sample in Python."""
    seg = ys[start:end]
    low, high = min(seg), max(seg)
    i, j = seg.index(low), seg.index(high)
    if i == j:
        return ((x_at(start), seg[0]),) if end - start == 1 else ((x_at(start), seg[0]), (x_at(end - 1), seg[-1]))
    a, b = (i, j) if i < j else (j, i)
    return (x_at(start + a), seg[a]), (x_at(start + b), seg[b])


class SeriesDigest:
    """A series folded as it arrives: count, first, last, lowest and highest, and at most CAPACITY
    buckets of consecutive samples, each keeping its lowest and highest point so that spikes survive.

    Whenever the buckets are full, neighbours merge and each bucket covers twice as many samples.
    Blocks come as values and a function giving the x of a value by its index, so that only the
    x values of the points kept are ever worked out.
    """

    def __init__(self, capacity: int = PLOT_BUCKETS) -> None:
        self.capacity = capacity
        self.per = 1                                   # samples per bucket
        self.buckets: list[tuple] = []                 # each: one or two (x, y) in arrival order
        self.pending: tuple = ()                       # first, lowest, highest, last of an unfinished bucket
        self.pending_count = 0
        self.count = 0
        self.first: tuple[float, float] | None = None
        self.last: tuple[float, float] | None = None
        self.low: tuple[float, float] | None = None    # (x, y) of the lowest value
        self.high: tuple[float, float] | None = None

    def add(self, ys, x_at: Callable[[int], float]) -> None:
        """Fold in a block of finite floats (a list or an array); X_AT(i) is the x of ys[i]."""
        n = len(ys)
        if not n:
            return
        self._stats(ys, x_at)
        while len(self.buckets) + (self.pending_count + n) // self.per > self.capacity:
            self._merge()
        start = min(n, self.per - self.pending_count) if self.pending_count else 0
        if start:
            self._pend(ys, x_at, 0, start)
        full = start + (n - start) // self.per * self.per
        self.buckets += [_bucket(ys, x_at, a, a + self.per) for a in range(start, full, self.per)]
        if full < n:
            self._pend(ys, x_at, full, n)

    def _pend(self, ys, x_at: Callable[[int], float], start: int, end: int) -> None:
        """Add samples START..END to the unfinished bucket (kept as its first, extremes and last)."""
        seg = ys[start:end]
        marks = sorted({0, seg.index(min(seg)), seg.index(max(seg)), len(seg) - 1})
        self.pending += tuple((x_at(start + k), seg[k]) for k in marks)
        self.pending_count += end - start
        if self.pending_count == self.per:
            self.buckets.append(_extremes(self.pending))
            self.pending, self.pending_count = (), 0

    def _stats(self, ys, x_at: Callable[[int], float]) -> None:
        self.count += len(ys)
        if self.first is None:
            self.first = (x_at(0), ys[0])
        self.last = (x_at(len(ys) - 1), ys[-1])
        low, high = min(ys), max(ys)
        if self.low is None or low < self.low[1]:
            self.low = (x_at(ys.index(low)), low)
        if self.high is None or high > self.high[1]:
            self.high = (x_at(ys.index(high)), high)

    def _merge(self) -> None:
        pairs = [_extremes(a + b) for a, b in zip(self.buckets[0::2], self.buckets[1::2])]
        self.buckets = pairs + self.buckets[len(pairs) * 2:]
        self.per *= 2

    def points(self) -> list[tuple[float, float]]:
        """The kept points in arrival order, from the first sample to the last."""
        kept = [point for bucket in self.buckets for point in bucket]
        if self.pending:
            kept += _extremes(self.pending)
        if self.first is not None and (not kept or kept[0] != self.first):
            kept.insert(0, self.first)
        if self.last is not None and kept[-1] != self.last:
            kept.append(self.last)
        return kept


class MetricSeries:
    """One metric of one run: the raw series and, with smoothing, its moving average, both digested."""

    def __init__(self, smooth: float | None = None) -> None:
        self.raw = SeriesDigest()
        self.weight = smooth or 0.0
        self.smoothed = SeriesDigest() if smooth else None
        self._ema_state = (0.0, 1.0)

    def add(self, ys, x_at: Callable[[int], float]) -> None:
        self.raw.add(ys, x_at)
        if self.smoothed is not None and len(ys):
            values, self._ema_state = ema(ys, self.weight, self._ema_state)
            self.smoothed.add(values, x_at)


# -- series from metrics.json's blocks (metric_blocks, section 10) ------------

def read_metric_series(path: Path, names: list[str] | None, smooth: float | None = None,
                       x_time: Callable[[int], float] | None = None) -> dict[str, MetricSeries]:
    """The numeric samples of NAMES (None: every metric) in a metrics.json, read block by block
    (metric_blocks, section 10).

    Never holds more than a block of the file: each series is digested as it is read. Text values,
    NaN and infinities are left out. A last line cut short by a crash is skipped, as read_metrics does.
    X_TIME (see read_sample_times) puts each sample at its time instead of its step.
    """
    series: dict[str, MetricSeries] = {}
    first = 0  # how many samples came before the block
    for block in metric_blocks(path):
        if block.endswith(b"\n"):
            first += _fold_block(block, names, series, smooth, first, x_time)
        else:  # the line after the last newline, if whole
            _fold_lines([block], names, series, smooth, first, x_time)
    return series


def _fold_block(block: bytes, names: list[str] | None, series: dict, smooth: float | None, first: int,
                x_time: Callable[[int], float] | None) -> int:
    """Fold in whole sample lines: one regex pass per metric; a JSON parse only for an unusual layout
    (or a metric that only some samples have, placed in time). Returns how many samples it held."""
    count = block.count(b"\n{") + block.startswith(b"{")
    if not count:
        return 0
    lines = block.split(b"\n")
    if block.count(b'{"step": ') != count:  # not MetricLog's layout: parse line by line
        return _fold_lines(lines, names, series, smooth, first, x_time)
    lines.pop()  # the block ends with a newline
    if len(lines) != count:  # the opening `[` or closing `]` of the list
        lines = [line for line in lines if line.startswith(b"{")]
    keys = names if names is not None else sorted({k.decode() for k in _SAMPLE_KEY_RE.findall(block)})
    for key in keys:
        values = _value_re(key).findall(block) if key != "step" else []
        if len(values) == count:
            ys, kept = _finite(values)
            if x_time is not None:
                x_at = (lambda i, kept=kept: x_time(first + (i if kept is None else kept[i])))
            else:
                x_at = _line_step_reader(lines if kept is None else [lines[i] for i in kept])
        elif values and x_time is not None:
            _fold_lines(lines, [key], series, smooth, first, x_time)
            continue
        elif values:  # only some samples have it
            pairs = _step_value_re(key).findall(block)
            ys, kept = _finite([value for _, value in pairs])
            steps = [step for step, _ in pairs] if kept is None else [pairs[i][0] for i in kept]
            x_at = _float_reader(steps)
        else:
            continue
        if len(ys):
            series.setdefault(key, MetricSeries(smooth)).add(ys, x_at)
    return count


def _line_step_reader(lines: list[bytes]) -> Callable[[int], float]:
    return lambda i: _plot_x(_SAMPLE_STEP_RE.match(lines[i])[1])


def _float_reader(values: list) -> Callable[[int], float]:
    return lambda i: _plot_x(values[i])


def _plot_x(text) -> float:
    """A step as an x: a step beyond what an axis holds is put at its edge (the sample stays)."""
    x = _float_or_nan(text)
    return x if abs(x) <= PLOT_MAX_VALUE else math.copysign(PLOT_MAX_VALUE, x if x == x else 1.0)


def _fold_lines(lines: list[bytes], names: list[str] | None, series: dict, smooth: float | None,
                first: int = 0, x_time: Callable[[int], float] | None = None) -> int:
    """Fold in sample lines parsed one by one as JSON; a line that does not parse is skipped.
    Returns how many sample lines there were."""
    found: dict[str, tuple[list, list]] = {}
    number = -1
    for line in lines:
        line = line.strip().rstrip(b",")
        if not line.startswith(b"{"):
            continue
        number += 1
        try:
            sample = json.loads(line)
        except ValueError:
            continue
        x = x_time(first + number) if x_time is not None else \
            sample.get("step", first + number) if isinstance(sample, dict) else None
        if not _is_number(x):
            continue
        for key, value in sample.items():
            if key != "step" and (names is None or key in names) and _is_number(value):
                xs, ys = found.setdefault(key, ([], []))
                xs.append(float(x))
                ys.append(float(value))
    for key, (xs, ys) in found.items():
        series.setdefault(key, MetricSeries(smooth)).add(ys, xs.__getitem__)
    return number + 1


def _is_number(value: object) -> bool:
    """A number a chart can place (not a bool, not text, not NaN, not infinite, not beyond ±1e300)."""
    return type(value) in (int, float) and abs(value) <= PLOT_MAX_VALUE


def _finite(values: list) -> tuple:
    """The finite numbers among VALUES (JSON text as bytes) as floats, and the indexes kept (None: all)."""
    from array import array
    try:
        ys = array("d", map(float, values))
    except (ValueError, OverflowError):  # a text value among them
        ys = array("d", [_float_or_nan(v) for v in values])
    total = sum(ys)
    if total - total == 0.0 and (not ys or -PLOT_MAX_VALUE <= min(ys) and max(ys) <= PLOT_MAX_VALUE):
        return ys, None
    kept = [i for i, y in enumerate(ys) if abs(y) <= PLOT_MAX_VALUE]  # drops NaN, ±inf and the huge
    return array("d", [ys[i] for i in kept]), kept


def _float_or_nan(value) -> float:
    try:
        return float(value)
    except (ValueError, OverflowError):
        return math.nan


# -- what a chart shows ------------------------------------------------------

@dataclass
class Curve:
    """One run's series of one metric, ready to draw."""

    run: int                            # position among the runs shown: its colour and marker
    name: str                           # the run's name, as recorded (visible() it to show it)
    run_id: str
    points: list                        # (x, y) in arrival order, decimated
    smoothed: list = field(default_factory=list)   # the moving average, decimated (empty: none)
    last: float | None = None
    best: float | None = None
    best_x: float | None = None
    low: float | None = None            # the lowest value (a log axis needs it above zero)
    count: int = 0
    active: str | None = None           # queued or running: said in the legend

    @property
    def short_id(self) -> str:
        return short_id(self.run_id)


@dataclass
class Chart:
    """One metric and one Curve per run shown, in the runs' order."""

    metric: str
    curves: list[Curve]


@dataclass
class PlotStyle:
    """How to draw: braille or ASCII, colours or markers, a log axis, smoothing."""

    braille: bool = True
    colour: bool = False
    log: bool = False
    smooth: float | None = None
    x_label: str = "step"


def lower_is_better(metric: str) -> bool:
    return LOWER_IS_BETTER.search(metric) is not None


def make_curve(run: int, record: RunRecord, metric: str, series: MetricSeries | None) -> Curve:
    """A chart's view of a run's series (an empty curve where the run has no such samples)."""
    curve = Curve(run, record.name, record.id, [], active=record.status if record.status in ACTIVE_STATUSES else None)
    if series is None or not series.raw.count:
        return curve
    digest = series.raw
    best = digest.low if lower_is_better(metric) else digest.high
    curve.points = digest.points()
    curve.smoothed = series.smoothed.points() if series.smoothed is not None else []
    curve.last, curve.count = digest.last[1], digest.count
    curve.best_x, curve.best = best
    curve.low = digest.low[1]
    return curve


def decimate(points: list, columns: int, x_lo: float, x_hi: float) -> list:
    """At most two points per column of x (its lowest and highest), in their order, plus the first
    and the last point: a line through them has every spike a full series would show."""
    if len(points) <= 2 * columns + 2:
        return list(points)
    span = (x_hi - x_lo) or 1.0
    lows: dict[int, int] = {}
    highs: dict[int, int] = {}
    for i, (x, y) in enumerate(points):
        column = int((x - x_lo) / span * (columns - 1) + 0.5)
        if column not in lows or y < points[lows[column]][1]:
            lows[column] = i
        if column not in highs or y > points[highs[column]][1]:
            highs[column] = i
    keep = sorted({0, len(points) - 1, *lows.values(), *highs.values()})
    return [points[i] for i in keep]


# -- axes ---------------------------------------------------------------------

def _widen(lo: float, hi: float) -> tuple[float, float]:
    """A range to draw a flat series in: around the value (±10 %, or ±1 around zero)."""
    if hi > lo:
        return lo, hi
    margin = abs(lo) * 0.1 or 1.0
    return lo - margin, hi + margin


def nice_ticks(lo: float, hi: float, max_count: int, extend: bool = False) -> tuple[list[float], float, float, float]:
    """Ticks at round numbers (1, 2, 2.5 or 5 times a power of ten) for the range LO..HI.

    Returns (ticks, axis_lo, axis_hi, step): at most MAX_COUNT ticks. EXTEND widens the range out to
    the ticks around it (a y axis that starts and ends on a label); otherwise the ticks lie inside it.
    """
    lo, hi = _widen(min(lo, hi), max(lo, hi))
    rough = (hi - lo) / max(1, max_count - 1)
    exponent = math.floor(math.log10(rough))
    for exp in (exponent, exponent + 1, exponent + 2):
        for mantissa in (1, 2, 2.5, 5):
            step = mantissa * 10.0 ** exp if exp >= 0 else mantissa / 10.0 ** -exp
            first = math.floor(lo / step + 1e-9) if extend else math.ceil(lo / step - 1e-9)
            last = math.ceil(hi / step - 1e-9) if extend else math.floor(hi / step + 1e-9)
            if last - first + 1 <= max_count:
                ticks = [_tick_value(k, mantissa, exp) for k in range(first, last + 1)]
                return (ticks, ticks[0], ticks[-1], step) if extend else (ticks, lo, hi, step)
    return [lo, hi], lo, hi, hi - lo


def _tick_value(k: int, mantissa: float, exp: int) -> float:
    """k steps of mantissa * 10**exp, computed so that 3 x 0.1 is 0.3."""
    scaled = k * mantissa
    return float(scaled * 10 ** exp) if exp >= 0 else scaled / 10.0 ** -exp


def log_ticks(lo: float, hi: float, max_count: int) -> tuple[list[float], float, float]:
    """Ticks at powers of ten spanning LO..HI (both > 0), with 2 and 5 between them over one decade."""
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if last == first:
        last += 1
    stride = max(1, math.ceil((last - first) / max(1, max_count - 1)))
    last = first + stride * math.ceil((last - first) / stride)
    ticks = [10.0 ** e for e in range(first, last + 1, stride)]
    if last - first == 1 and max_count >= 4:
        ticks = sorted(ticks + [2 * ticks[0], 5 * ticks[0]])
    return ticks, 10.0 ** first, 10.0 ** last


def fmt_tick(value: float, step: float) -> str:
    """A tick label with the digits its step needs: 0.25, 1.5k, 2M, 1e-07."""
    if value == 0:
        return "0"
    size = abs(value)
    if size >= 1e4 and step >= 1:
        for divisor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if size >= divisor:
                text = f"{value / divisor:.{_decimals(step / divisor)}f}"
                return (text.rstrip("0").rstrip(".") if "." in text else text) + suffix
    decimals = _decimals(step)
    if decimals <= 6:
        return f"{value:.{decimals}f}"
    digits = max(1, math.floor(math.log10(size)) - math.floor(math.log10(step)) + 1)
    return f"{value:.{digits - 1}e}"


def _decimals(step: float) -> int:
    """The fewest decimals that write STEP exactly (0.25 → 2)."""
    for decimals in range(13):
        if abs(round(step, decimals) - step) <= abs(step) * 1e-6:
            return decimals
    return 13


def _log_text(value: float) -> str:
    return f"{value:g}"


class _Axes:
    """Where values land: the ranges, the y ticks and their labels."""

    __slots__ = ("x_lo", "x_hi", "y_lo", "y_hi", "y_ticks", "log")

    def __init__(self, x_lo: float, x_hi: float, y_lo: float, y_hi: float, y_ticks: list, log: bool) -> None:
        self.x_lo, self.x_hi = x_lo, x_hi
        self.y_lo, self.y_hi = y_lo, y_hi    # in log10 when the axis is logarithmic
        self.y_ticks = y_ticks               # (value, label)
        self.log = log

    def y(self, value: float) -> float:
        """Height of a value as a fraction, 0 at the bottom."""
        value = math.log10(value) if self.log else value
        return (value - self.y_lo) / ((self.y_hi - self.y_lo) or 1.0)

    def x(self, value: float) -> float:
        return (value - self.x_lo) / ((self.x_hi - self.x_lo) or 1.0)


def chart_axes(chart: Chart, log: bool, max_y_ticks: int) -> _Axes | None:
    """The ranges of a chart and its y ticks (None when no curve has a point)."""
    points = [p for c in chart.curves for p in itertools.chain(c.points, c.smoothed)]
    if not points:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_lo, x_hi = (min(xs), max(xs)) if min(xs) < max(xs) else (xs[0] - 1, xs[0] + 1)  # one step: around it
    if log:
        ticks, lo, hi = log_ticks(min(ys), max(ys), max_y_ticks)
        labelled = [(t, _log_text(t)) for t in ticks]
        return _Axes(x_lo, x_hi, math.log10(lo), math.log10(hi), labelled, True)
    ticks, lo, hi, step = nice_ticks(min(ys), max(ys), max_y_ticks, extend=True)
    return _Axes(x_lo, x_hi, lo, hi, [(t, fmt_tick(t, step)) for t in ticks], False)


def x_tick_labels(lo: float, hi: float, columns: int, place: Callable[[float], int]) -> list[tuple[int, str, int]]:
    """(where the label starts, label, the tick's column) of round x ticks, as many as fit side by side
    in COLUMNS without touching."""
    for count in range(max(2, columns // 10), 1, -1):
        ticks, _, _, step = nice_ticks(lo, hi, count)
        labels = [(min(columns - 1, max(0, place(t))), fmt_tick(t, step)) for t in ticks]
        spans = [(max(0, min(columns - len(text), col - len(text) // 2)), text, col) for col, text in labels]
        if all(a[0] + len(a[1]) < b[0] for a, b in zip(spans, spans[1:])):
            return spans
    return [(0, fmt_tick(lo, hi - lo or 1.0), 0)]


# -- the terminal chart -------------------------------------------------------

class BrailleCanvas:
    """A grid of character cells drawn in dots: 2 x 4 per cell in braille, 1 x 1 in ASCII.

    Each cell remembers the last owner (run, faint) that drew in it, for its colour or marker.
    """

    def __init__(self, cols: int, rows: int, braille: bool = True) -> None:
        self.cols, self.rows, self.braille = cols, rows, braille
        self.sx, self.sy = (2, 4) if braille else (1, 1)
        self.width, self.height = cols * self.sx, rows * self.sy
        self.dots = [0] * (cols * rows)
        self.owner: list = [None] * (cols * rows)
        self.trail: dict[int, dict[int, set]] = {}    # run -> column -> rows its main curve touched

    def dot(self, x: int, y: int, owner: tuple[int, bool]) -> None:
        if not (0 <= x < self.width and 0 <= y < self.height):
            return
        col, row = x // self.sx, y // self.sy
        cell = row * self.cols + col
        self.dots[cell] |= BRAILLE_BITS[y % 4][x % 2] if self.braille else 1
        self.owner[cell] = owner
        if not owner[1]:
            self.trail.setdefault(owner[0], {}).setdefault(col, set()).add(row)

    def line(self, x0: int, y0: int, x1: int, y1: int, owner: tuple[int, bool]) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0))
        if steps == 0:
            self.dot(x0, y0, owner)
            return
        for i in range(steps + 1):
            self.dot(int(x0 + (x1 - x0) * i / steps + 0.5), int(y0 + (y1 - y0) * i / steps + 0.5), owner)

    def polyline(self, points: list, owner: tuple[int, bool], to_dots: Callable) -> None:
        previous = None
        for point in points:
            current = to_dots(point)
            if previous is None:
                self.dot(*current, owner)
            else:
                self.line(*previous, *current, owner)
            previous = current

    def marker_cells(self, runs: list[int], gap: int) -> dict[int, int]:
        """Cells where each run's marker goes: every GAP columns along its curve, staggered per run."""
        cells: dict[int, int] = {}
        for order, run in enumerate(runs):
            columns = self.trail.get(run, {})
            offset = (order * gap) // max(1, len(runs))
            chosen = [c for c in sorted(columns) if (c - offset) % gap == 0] + ([max(columns)] if columns else [])
            for col in chosen:
                rows = sorted(columns[col])
                cell = rows[len(rows) // 2] * self.cols + col
                cells.setdefault(cell, run)
        return cells

    def row_text(self, row: int, style: PlotStyle, markers: dict[int, int]) -> str:
        """One row of cells as text, coloured by owner when STYLE says so."""
        parts: list[str] = []
        current = None
        for col in range(self.cols):
            cell = row * self.cols + col
            owner, dots = self.owner[cell], self.dots[cell]
            if cell in markers:
                text, owner = PLOT_MARKERS[markers[cell] % len(PLOT_MARKERS)], (markers[cell], False)
            elif not dots:
                text, owner = " ", None
            elif self.braille:
                text = chr(BRAILLE_BASE + dots)
            else:
                text = "." if owner[1] else PLOT_MARKERS[owner[0] % len(PLOT_MARKERS)]
            if style.colour and owner != current:
                parts.append("\x1b[0m" if owner is None else _sgr(owner))
                current = owner
            parts.append(text)
        if style.colour and current is not None:
            parts.append("\x1b[0m")
        return "".join(parts)


def _sgr(owner: tuple[int, bool]) -> str:
    colour = PLOT_COLOURS[owner[0] % len(PLOT_COLOURS)]
    return f"\x1b[0;2;{colour}m" if owner[1] else f"\x1b[0;{colour}m"


def legend_line(curve: Curve, width: int, style: PlotStyle) -> str:
    """`* name 3f9c1a  last 0.012  best 0.011`, cut to WIDTH; the marker in the run's colour."""
    marker = PLOT_MARKERS[curve.run % len(PLOT_MARKERS)]
    ellipsis = "…" if style.braille else "~"
    name = visible(curve.name)
    state = f" ({curve.active})" if curve.active else ""
    if curve.count:
        forms = [f"  last {fmt_value(curve.last)}  best {fmt_value(curve.best)}",
                 f" last {fmt_value(curve.last)} best {fmt_value(curve.best)}"]
    else:
        forms = ["  no samples", " -"]
    for tail, with_id in ((forms[0], True), (forms[1], True), (forms[1], False)):
        head = f" {curve.short_id}{state}" if with_id else ""
        room = width - 2 - text_width(head + tail)
        if room >= min(8, text_width(name)):
            text = clip_middle(name, room, ellipsis) + head + tail  # a sweep's names differ at their end
            break
    else:
        text = clip(name + f" {curve.short_id}" + forms[1], width - 2, ellipsis)
    sign = _sgr((curve.run, False)) + marker + "\x1b[0m" if style.colour else marker
    return f"{sign} {text}"


def chart_title(metric: str, style: PlotStyle) -> str:
    notes = ([f"smoothed {style.smooth:g}"] if style.smooth else []) + (["log scale"] if style.log else []) \
        + (["x: minutes since the start"] if style.x_label == "minutes" else [])
    return visible(metric) + "".join(f"  ({note})" for note in notes)


def chart_lines(chart: Chart, width: int, height: int, style: PlotStyle) -> list[str]:
    """One metric as a terminal chart: title, plot with y ticks, x axis and ticks, a legend line per run.

    Takes HEIGHT lines where it can (at least three plot rows) and never a line wider than WIDTH.
    """
    ellipsis = "…" if style.braille else "~"
    title = clip(chart_title(chart.metric, style), width, ellipsis)
    legend = [legend_line(c, width, style) for c in chart.curves]
    rows = max(3, height - 3 - len(legend))
    axes = chart_axes(chart, style.log, max(2, min(8, (rows + 1) // 2)))
    if axes is None:
        return [title, clip("  no numeric samples in these runs", width, ellipsis)]
    label_width = max(len(label) for _, label in axes.y_ticks)
    cols = width - label_width - 2
    if cols < 4:  # labels too long for the width: keep the plot
        label_width, cols = 0, width - 2
    canvas = BrailleCanvas(cols, rows, style.braille)
    _draw_curves(canvas, chart, axes, style)
    drawn = [c.run for c in chart.curves if c.points]
    markers = {} if style.colour or not style.braille or len(drawn) < 2 else \
        canvas.marker_cells(drawn, max(3, cols // 6))
    tick_rows = {}
    for value, label in axes.y_ticks:
        row = int((1 - axes.y(value)) * (canvas.height - 1) + 0.5) // canvas.sy
        tick_rows.setdefault(min(rows - 1, max(0, row)), label)
    bar, tee, corner, dash, down = ("│", "┤", "└", "─", "┬") if style.braille else ("|", "+", "+", "-", "+")
    lines = [title]
    for row in range(rows):
        label = tick_rows.get(row, "")[:label_width]
        lines.append((f"{label:>{label_width}} {tee if row in tick_rows else bar}"
                      + canvas.row_text(row, style, markers)).rstrip())
    ticks = x_tick_labels(axes.x_lo, axes.x_hi, cols,
                          lambda t: int(axes.x(t) * (canvas.width - 1) + 0.5) // canvas.sx)
    axis = [dash] * cols
    for _, _, col in ticks:
        axis[col] = down
    lines.append(" " * label_width + " " + corner + "".join(axis))
    lines.append(_x_label_line(ticks, label_width, cols, style.x_label))
    return lines + legend


def _draw_curves(canvas: BrailleCanvas, chart: Chart, axes: _Axes, style: PlotStyle) -> None:
    """Faint raw series first (under smoothing, where colour or --ascii can show them), then the curves."""
    def to_dots(point: tuple[float, float]) -> tuple[int, int]:
        return (int(axes.x(point[0]) * (canvas.width - 1) + 0.5),
                int((1 - axes.y(point[1])) * (canvas.height - 1) + 0.5))

    smoothing = any(c.smoothed for c in chart.curves)
    if smoothing and (style.colour or not style.braille):
        for curve in chart.curves:
            canvas.polyline(decimate(curve.points, canvas.width, axes.x_lo, axes.x_hi), (curve.run, True), to_dots)
    for curve in chart.curves:
        points = curve.smoothed if smoothing else curve.points
        canvas.polyline(decimate(points, canvas.width, axes.x_lo, axes.x_hi), (curve.run, False), to_dots)


def _x_label_line(ticks: list[tuple[int, str, int]], label_width: int, cols: int, x_label: str) -> str:
    line = [" "] * cols
    for start, text, _ in ticks:
        line[start:start + len(text)] = text
    prefix = x_label.rjust(label_width + 1) + " " if len(x_label) <= label_width else " " * (label_width + 2)
    return (prefix + "".join(line[:cols])).rstrip()


def render_plot(charts: list[Chart], width: int, height: int, style: PlotStyle) -> str:
    """Every chart, one after the other, separated by a blank line."""
    if not charts:
        return "no numeric samples yet"
    return "\n\n".join("\n".join(chart_lines(c, width, height, style)) for c in charts)


# -- the HTML page ------------------------------------------------------------

_PAGE_STYLE = """\
:root{color-scheme:light}
*{box-sizing:border-box}
body{margin:0;background:#f6f7f9;color:#1f2328;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,\
"Helvetica Neue",Arial,sans-serif}
main{max-width:1040px;margin:0 auto;padding:28px 20px 40px}
h1{font-size:22px;margin:0 0 2px;font-weight:650}
.sub{color:#59636e;margin:0 0 20px}
h2{font-size:15px;margin:0 0 4px;font-weight:600}
.card{background:#fff;border:1px solid #d8dee4;border-radius:10px;padding:14px 16px 10px;margin:0 0 16px;\
break-inside:avoid;page-break-inside:avoid}
svg{display:block;width:100%;height:auto}
.pt{fill-opacity:0}
.pt:hover{fill-opacity:1}
.wrap{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums;font-size:13px}
th,td{padding:6px 8px;border-bottom:1px solid #eaeef2;text-align:left;white-space:nowrap;vertical-align:top}
th{font-weight:600;color:#59636e;font-size:12px}
td.num,th.num{text-align:right}
th.grp{text-align:center;border-bottom-color:#d8dee4}
td.best{font-weight:650;color:#1a7f37}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
.id{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:11px;color:#59636e;margin-left:16px}
.st-succeeded{color:#1a7f37}.st-failed,.st-lost{color:#cf222e}.st-running{color:#0969da}
.st-interrupted,.st-timeout{color:#9a6700}
footer{color:#8c959f;font-size:12px;margin-top:8px}
@media print{body{background:#fff}main{max-width:none;padding:0}.card{border-color:#ccc}.wrap{overflow:visible}}
"""


def _h(value: object) -> str:
    """A run-provided value made safe for HTML and XML: control characters spelled out, markup escaped."""
    import html  # only here: not every start pays for it
    return html.escape(visible(str(value)), quote=True)


def _num(value: float) -> str:
    """An SVG coordinate: one decimal, no trailing zero."""
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def html_page(charts: list[Chart], runs: list[tuple[RunRecord, dict]], style: PlotStyle,
              generated: str, refresh: int | None = None) -> str:
    """One self-contained page: an SVG chart per metric and a table of the runs; nothing fetched.

    RUNS holds each run's record and flattened config. REFRESH (seconds) makes the page reload itself
    while runs are still running (--follow).
    """
    names = ", ".join(dict.fromkeys(r.name for r, _ in runs))
    head = [f'<meta http-equiv="refresh" content="{refresh}"/>'] if refresh else []
    notes = ([f"{len(runs)} run(s)", f"x: {style.x_label}"] + ([f"smoothed {style.smooth:g}"] if style.smooth else [])
             + (["log scale"] if style.log else [])
             + [f"made {generated[:16].replace('T', ' ')} UTC by RunPilot {__version__}"])
    body = [f"<h1>Learning curves: {_h(clip(names, 80))}</h1>", f'<p class="sub">{_h(" · ".join(notes))}</p>']
    body += [f'<section class="card"><h2>{_h(c.metric)}</h2>{svg_chart(c, style)}</section>' for c in charts]
    body.append(f'<section class="card"><h2>Runs</h2><div class="wrap">{runs_table(charts, runs)}</div></section>')
    body.append('<footer>Hover a point for its value. Made by <code>runpilot plot --html</code>.</footer>')
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1"/>\n'
            + "".join(line + "\n" for line in head)
            + f"<title>RunPilot: {_h(clip(names, 80))}</title>\n<style>\n{_PAGE_STYLE}</style>\n</head>\n"
            + "<body>\n<main>\n" + "\n".join(body) + "\n</main>\n</body>\n</html>\n")


def svg_chart(chart: Chart, style: PlotStyle) -> str:
    """An inline SVG: grid, axes with round ticks, one polyline per run (raw faint under smoothing),
    points with <title> tooltips, the best value marked, and a legend."""
    axes = chart_axes(chart, style.log, 6)
    legend_rows = (len(chart.curves) + 1) // 2 if len(chart.curves) > 3 else len(chart.curves)
    if axes is None:
        return '<p class="sub">No numeric samples in these runs.</p>'
    labels = [label for _, label in axes.y_ticks]
    left, top, right = 14 + 7 * max(map(len, labels)), 10, 16
    plot_w, plot_h = SVG_WIDTH - left - right, SVG_PLOT_HEIGHT
    height = top + plot_h + 48 + 20 * legend_rows

    def at(point: tuple[float, float]) -> tuple[float, float]:
        return left + axes.x(point[0]) * plot_w, top + (1 - axes.y(point[1])) * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {SVG_WIDTH} {height}" role="img" '
           f'font-family="system-ui, -apple-system, Segoe UI, Roboto, Arial, sans-serif" font-size="12" '
           f'aria-label="{_h(chart.metric)}">']
    out += _svg_axes(axes, left, top, plot_w, plot_h, style)
    for curve in chart.curves:
        out += _svg_curve(curve, chart.metric, at, plot_w, axes)
    out += _svg_legend(chart.curves, left, top + plot_h + 44)
    out.append("</svg>")
    return "\n".join(out)


def _svg_axes(axes: _Axes, left: float, top: float, plot_w: float, plot_h: float, style: PlotStyle) -> list[str]:
    out = []
    for value, label in axes.y_ticks:
        y = _num(top + (1 - axes.y(value)) * plot_h)
        out.append(f'<line x1="{_num(left)}" y1="{y}" x2="{_num(left + plot_w)}" y2="{y}" stroke="#eaeef2"/>')
        out.append(f'<text x="{_num(left - 6)}" y="{y}" dy="4" text-anchor="end" fill="#59636e">{_h(label)}</text>')
    bottom = top + plot_h
    for value, text in _svg_x_ticks(axes):
        x = _num(left + axes.x(value) * plot_w)
        out.append(f'<line x1="{x}" y1="{_num(bottom)}" x2="{x}" y2="{_num(bottom + 5)}" stroke="#8c959f"/>')
        out.append(f'<text x="{x}" y="{_num(bottom + 18)}" text-anchor="middle" fill="#59636e">{_h(text)}</text>')
    out.append(f'<line x1="{_num(left)}" y1="{_num(bottom)}" x2="{_num(left + plot_w)}" y2="{_num(bottom)}" '
               f'stroke="#8c959f"/>')
    out.append(f'<line x1="{_num(left)}" y1="{_num(top)}" x2="{_num(left)}" y2="{_num(bottom)}" stroke="#8c959f"/>')
    out.append(f'<text x="{_num(left + plot_w)}" y="{_num(bottom + 34)}" text-anchor="end" fill="#59636e">'
               f'{_h(style.x_label)}</text>')
    return out


def _svg_x_ticks(axes: _Axes) -> list[tuple[float, str]]:
    ticks, _, _, step = nice_ticks(axes.x_lo, axes.x_hi, 9)
    return [(t, fmt_tick(t, step)) for t in ticks]


def _svg_points(points: list, at: Callable, plot_w: float, axes: _Axes) -> str:
    """The polyline's points, at most two per unit of width, repeated positions dropped."""
    out, previous = [], None
    for point in decimate(points, int(plot_w), axes.x_lo, axes.x_hi):
        x, y = at(point)
        text = f"{_num(x)},{_num(y)}"
        if text != previous:
            out.append(text)
            previous = text
    return " ".join(out)


def _svg_curve(curve: Curve, metric: str, at: Callable, plot_w: float, axes: _Axes) -> list[str]:
    if not curve.points:
        return []
    colour = SVG_COLOURS[curve.run % len(SVG_COLOURS)]
    who = f"{curve.name} ({curve.run_id})"
    out = [f'<g data-run="{_h(curve.run_id)}">']
    main = curve.smoothed or curve.points
    if curve.smoothed:
        out.append(f'<polyline class="raw" points="{_svg_points(curve.points, at, plot_w, axes)}" fill="none" '
                   f'stroke="{colour}" stroke-opacity="0.28" stroke-width="1"/>')
    out.append(f'<polyline class="curve" data-run="{_h(curve.run_id)}" points="{_svg_points(main, at, plot_w, axes)}"'
               f' fill="none" stroke="{colour}" stroke-width="2" stroke-linejoin="round" stroke-linecap="round">'
               f'<title>{_h(who)}</title></polyline>')
    for point in _tooltip_points(curve.points):
        x, y = at(point)
        out.append(f'<circle class="pt" cx="{_num(x)}" cy="{_num(y)}" r="4" fill="{colour}">'
                   f'<title>{_h(who)}&#10;step {_step_text(point[0])}: {_h(f"{point[1]:.6g}")}</title></circle>')
    if curve.best is not None:
        x, y = at((curve.best_x, curve.best))
        out.append(f'<circle cx="{_num(x)}" cy="{_num(y)}" r="3.5" fill="#fff" stroke="{colour}" stroke-width="2">'
                   f'<title>{_h(who)}&#10;best {_h(metric)}: {_h(f"{curve.best:.6g}")} at step '
                   f'{_step_text(curve.best_x)}</title></circle>')
    out.append("</g>")
    return out


def _step_text(step: float) -> str:
    return str(int(step)) if step.is_integer() else f"{step:g}"


def _tooltip_points(points: list, count: int = 24) -> list:
    """About COUNT points spread along a series, and its last one."""
    if len(points) <= count:
        return list(points)
    return [points[i * (len(points) - 1) // (count - 1)] for i in range(count)]


def _svg_legend(curves: list[Curve], left: float, top: float) -> list[str]:
    two = len(curves) > 3
    column = (SVG_WIDTH - left) / 2 if two else SVG_WIDTH - left
    out = []
    for i, curve in enumerate(curves):
        x, y = left + (i % 2) * column if two else left, top + (i // 2 if two else i) * 20
        colour = SVG_COLOURS[curve.run % len(SVG_COLOURS)]
        values = (f"last {fmt_value(curve.last)} · best {fmt_value(curve.best)}" if curve.count
                  else "no samples")
        name = clip_middle(visible(curve.name), 34 if two else 60)
        out.append(f'<rect x="{_num(x)}" y="{_num(y - 9)}" width="12" height="12" rx="2" fill="{colour}"/>')
        out.append(f'<text x="{_num(x + 18)}" y="{_num(y + 1)}" fill="#1f2328">{_h(name)}'
                   f'<tspan dx="6" fill="#8c959f">{_h(curve.short_id)}</tspan>'
                   f'<tspan dx="10" fill="#59636e">{_h(values)}</tspan></text>')
    return out


def runs_table(charts: list[Chart], runs: list[tuple[RunRecord, dict]]) -> str:
    """The runs: colour, name and id, status, start, duration, the config values that differ, and each
    metric's last and best value, the best of each column marked."""
    keys = differing([{k: v for k, v in flat.items() if k != "name"} for _, flat in runs])  # name: own column
    top = ["run", "status", "started", "duration"] + keys
    head = "".join(f'<th rowspan="2" class="num">{_h(h)}</th>' if h == "duration" else f'<th rowspan="2">{_h(h)}</th>'
                   for h in top)
    head += "".join(f'<th colspan="2" class="grp">{_h(c.metric)}</th>' for c in charts)
    sub = '<th class="num">last</th><th class="num">best</th>' * len(charts)
    columns = []
    for chart in charts:
        for pick in (lambda c: c.last, lambda c: c.best):
            values = [pick(c) if c.count else None for c in chart.curves]
            winner = best_of(chart.metric, values)
            columns.append([_value_cell(v, v is not None and v == winner and len(runs) > 1) for v in values])
    rows = []
    for i, (record, flat) in enumerate(runs):
        cells = [f'<td><span class="sw" style="background:{SVG_COLOURS[i % len(SVG_COLOURS)]}"></span>'
                 f'{_h(record.name)}<br/><span class="id">{_h(record.id)}</span></td>',
                 f'<td class="st-{_h(record.status)}">{_h(record.status)}</td>',
                 f'<td>{_h(record.started_at[:16].replace("T", " "))}</td>',
                 f'<td class="num">{_h(fmt_duration(record.duration))}</td>']
        cells += [f"<td>{_h(fmt_cell(flat.get(k)))}</td>" for k in keys]
        rows.append("<tr>" + "".join(cells + [column[i] for column in columns]) + "</tr>")
    return (f"<table>\n<thead><tr>{head}</tr><tr>{sub}</tr></thead>\n<tbody>\n" + "\n".join(rows)
            + "\n</tbody>\n</table>")


def _value_cell(value: float | None, best: bool) -> str:
    if value is None:
        return '<td class="num">-</td>'
    if best:
        return f'<td class="num best" title="best of these runs">★ {_h(fmt_value(value))}</td>'
    return f'<td class="num">{_h(fmt_value(value))}</td>'

# ==== 20a. Exports: TensorBoard folders and MLflow ===========================

# MLflow's statuses for RunPilot's, and what one runs/log-batch request may hold (MLflow's own limits).
MLFLOW_STATUS = {SUCCEEDED: "FINISHED", FAILED: "FAILED", TIMEOUT: "FAILED", LOST: "FAILED",
                 INTERRUPTED: "KILLED", CANCELLED: "KILLED", RUNNING: "RUNNING", QUEUED: "SCHEDULED"}
MLFLOW_BATCH = {"metrics": 1000, "params": 100, "tags": 100}
# The longest param value MLflow 2 stores (and tag value); longer config values are cut, saying so.
MLFLOW_PARAM_MAX, MLFLOW_TAG_MAX = 6000, 5000
# The longest param or tag name MLflow takes.
MLFLOW_NAME_MAX = 250
MLFLOW_TIMEOUT = 30.0
# An export reads metrics.json in blocks of this many bytes, so its memory does not grow with the run.
EXPORT_READ_BYTES = 1 << 20


def run_start_epoch(record: RunRecord) -> float:
    return parse_time(record.started_at).timestamp() if record.started_at else time.time()


def tb_run_dirname(record: RunRecord, full: bool = False) -> str:
    """The run's folder in a TensorBoard export: its name and short id (FULL: its whole id, for runs
    that share both), so TensorBoard's run list tells runs apart and a second export of the run lands
    in the same place."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", record.name).strip("._") or "run"
    return f"{name}-{record.id if full else short_id(record.id)}"


def scalar_values(sample: dict) -> dict:
    """The numbers of a sample (not its step, not text or true/false)."""
    return {k: v for k, v in sample.items() if k != "step" and (type(v) is float or type(v) is int)}


class TensorBoardRun:
    """One run's event file in an export folder, `DIR/<name>-<short id>/events.out.tfevents.*`,
    written whole at first and grown by update() while the run records samples (--follow)."""

    def __init__(self, target: Path, record: RunRecord, hparams: dict | None, dirname: str | None = None) -> None:
        self.record, self.folder = record, RunFolder(Path(record.path))
        self.start = run_start_epoch(record)
        self.dir = target / (dirname or tb_run_dirname(record))
        self.offsets = {"metrics": 0, "gpu": 0}
        self.count, self.ended = 0, False
        self.events = ScalarEvents()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            for old in self.dir.glob("events.out.tfevents.*.runpilot"):  # an earlier export of this run
                old.unlink()
            self.writer = EventFileWriter(self.dir / f"events.out.tfevents.{int(self.start)}.runpilot", self.start)
        except OSError as exc:
            raise ExportError(f"cannot write {self.dir}: {exc.strerror}; choose another -o folder") from exc
        self.sessions = hparams is not None  # the hparams plugin's session: its config values, how it ended
        if hparams is not None:
            self.writer.add_summary(self.start, tb_hparams_start(hparams, self.start, self.dir.name))

    def update(self, record: RunRecord) -> int:
        """Append the samples recorded since the last update (and, once the run ended, how it ended)."""
        self.record = record
        at = read_sample_times(self.folder.sample_times) or (lambda index: 0.0)
        written, offset = 0, None
        while offset != self.offsets["metrics"]:   # a block at a time: a run of millions of samples streams
            offset = self.offsets["metrics"]
            samples, self.offsets["metrics"] = read_samples_from(self.folder.metrics, offset, EXPORT_READ_BYTES)
            self.writer.write(b"".join([self._event(self.start + at(i) * 60, sample.get("step", i + 1),
                                                    scalar_values(sample))
                                        for i, sample in enumerate(samples, self.count)]))
            self.count += len(samples)
            written += len(samples)
        gpu, self.offsets["gpu"] = read_samples_from(self.folder.gpu_stats, self.offsets["gpu"])
        for sample in gpu:
            step = sample.get("step", 0)
            self._write(self.start + (step if _is_number(step) else 0), step, scalar_values(sample))
        if record.status not in ACTIVE_STATUSES and self.sessions and not self.ended:
            end = parse_time(record.finished_at).timestamp() if record.finished_at else time.time()
            self.writer.add_summary(end, tb_hparams_end(record.status, end))
            self.ended = True
        if self.writer.error is not None:
            raise ExportError(f"cannot write {self.writer.path}: {self.writer.error.strerror}; free some space or "
                              "choose another -o folder")
        return written + len(gpu)

    def _write(self, wall_time: float, step: object, values: dict) -> None:
        self.writer.write(self._event(wall_time, step, values))

    def _event(self, wall_time: float, step: object, values: dict) -> bytes:
        if values and type(step) is int and INT64_MIN <= step <= INT64_MAX:
            return self.events.record(wall_time, step, values)
        return b""

    def close(self) -> None:
        self.writer.close()


def tb_hparams(runs: list[tuple[RunRecord, dict]]) -> dict[str, dict | None]:
    """Per run id, the config values that differ between the runs (None when none differ)."""
    keys = [k for k in differing([flat for _, flat in runs]) if k != "name"]
    return {r.id: {k: flat[k] for k in keys if flat.get(k) is not None} if keys else None for r, flat in runs}


def export_tensorboard(store: RunStore, records: list[RunRecord], target: Path, follow: bool) -> tuple[int, int]:
    """Write each run's event file under TARGET; with FOLLOW, keep them growing until every run has
    ended. Returns (samples written, runs)."""
    hparams = tb_hparams([(r, _config_of(store, r)) for r in records])
    import collections
    shared = collections.Counter(map(tb_run_dirname, records))   # one name and short id, two runs: whole ids
    dirnames = [tb_run_dirname(r, shared[tb_run_dirname(r)] > 1) for r in records]
    if not follow:  # one file open at a time: a sweep of thousands of runs stays within the open-file limit
        written = 0
        for record, dirname in zip(records, dirnames):
            run = TensorBoardRun(target, record, hparams[record.id], dirname)
            try:
                written += run.update(record)
            finally:
                run.close()
        return written, len(records)
    runs = [TensorBoardRun(target, r, hparams[r.id], dirname) for r, dirname in zip(records, dirnames)]
    try:
        written = sum(run.update(r) for run, r in zip(runs, records))
        while follow and any(run.record.status in ACTIVE_STATUSES for run in runs):
            time.sleep(FOLLOW_SECONDS)
            written += sum(run.update(_refresh(store, run.record)) for run in runs)
    finally:
        for run in runs:
            run.close()
    return written, len(runs)


class MlflowClient:
    """MLflow's tracking REST API 2.0 over urllib: one JSON request, one JSON answer, errors as ExportError.

    $MLFLOW_TRACKING_TOKEN (a bearer token) or $MLFLOW_TRACKING_USERNAME and _PASSWORD authenticate,
    as MLflow's own client does.
    """

    def __init__(self, uri: str, environ=os.environ, opener: Callable | None = None,
                 timeout: float = MLFLOW_TIMEOUT) -> None:
        import urllib.parse
        import urllib.request
        try:
            parsed = urllib.parse.urlsplit(uri)
            parsed.port  # noqa: B018 (a port that is not a number, or beyond 65535, raises here)
        except ValueError:
            parsed = None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
            shown = re.sub(r"//[^/@]*@", "//", uri)   # never a password of the URI
            if parsed is not None and parsed.scheme in ("", "file", "sqlite", "postgresql", "mysql", "mssql") \
                    and not uri.startswith("databricks"):
                raise UsageError(f"--format mlflow: {visible(shown)!r} is not a tracking server's http(s) URL "
                                 f"but a local MLflow store, which RunPilot does not write; serve it with `mlflow server --backend-store-uri {visible(shown)}` "
                                 "and give its address (-o http://127.0.0.1:5000)")
            raise UsageError(f"--format mlflow: {visible(shown)!r} is not a tracking server's http(s) URL; give "
                             "-o http://HOST:5000 or set MLFLOW_TRACKING_URI")
        # user:password@ in the address authenticates, as in MLflow's own client, and is never printed
        self.uri = parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl().rstrip("/")
        self.timeout = timeout
        if environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT"):   # MLflow's own client reads it too
            wait = environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]
            self.timeout = float(wait) if re.fullmatch(r"\d+(\.\d*)?|\.\d+", wait.strip()) else 0.0
            if not 0 < self.timeout < math.inf:
                raise UsageError(f"MLFLOW_HTTP_REQUEST_TIMEOUT={visible(wait)} is not a number of seconds; set it "
                                 "to how long to wait for each answer of the MLflow server, e.g. 120")
        # no redirects: urllib would send the Authorization header to wherever they point, a POST without its body
        self.opener = opener or urllib.request.build_opener(_no_redirects()).open
        self.headers = {"Content-Type": "application/json", "User-Agent": f"runpilot/{__version__}"}
        if parsed.username is not None and not environ.get("MLFLOW_TRACKING_USERNAME"):
            environ = {**environ, "MLFLOW_TRACKING_USERNAME": urllib.parse.unquote(parsed.username),
                       "MLFLOW_TRACKING_PASSWORD": urllib.parse.unquote(parsed.password or "")}
        if environ.get("MLFLOW_TRACKING_TOKEN"):
            self.headers["Authorization"] = f"Bearer {environ['MLFLOW_TRACKING_TOKEN']}"
        elif environ.get("MLFLOW_TRACKING_USERNAME"):
            import base64
            pair = f"{environ['MLFLOW_TRACKING_USERNAME']}:{environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
            self.headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()

    def call(self, method: str, endpoint: str, body: dict | None = None, query: dict | None = None) -> dict:
        """POST (or GET) /api/2.0/mlflow/ENDPOINT; the answer's JSON object."""
        import http.client
        import urllib.error
        import urllib.parse
        import urllib.request
        url = f"{self.uri}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = json.dumps(body).encode("utf-8") if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers=self.headers)
        try:
            with self.opener(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400 and exc.headers.get("Location"):
                where = re.sub(r"//[^/@]*@", "//", urllib.parse.urljoin(url, exc.headers["Location"]))
                raise ExportError(f"{self.uri} redirected {endpoint} to {visible(where.split('?')[0])}; give -o the "
                                  "address it redirects to") from exc
            raise MlflowRefusal(exc.code, endpoint, exc.read()) from exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", None) or exc
            if isinstance(reason, TimeoutError):
                raise ExportError(f"the MLflow server at {self.uri} did not answer {endpoint} within "
                                  f"{self.timeout:g} s; it may be overloaded: try again, or wait longer with "
                                  "MLFLOW_HTTP_REQUEST_TIMEOUT=SECONDS") from exc
            raise ExportError(f"cannot reach the MLflow server at {self.uri} ({reason}); start it, or check -o "
                              "and MLFLOW_TRACKING_URI") from exc
        try:
            answer = json.loads(raw or b"{}")
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise ExportError(f"{self.uri} answered {endpoint} with something that is not MLflow's JSON "
                              f"({raw[:60].decode('utf-8', 'replace')!r}); is -o a tracking server?")
        return answer


def _no_redirects():
    """A urllib handler that follows no redirect (the 3xx answer comes back as an HTTPError)."""
    import urllib.request

    class NoRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            return None
    return NoRedirects()


class MlflowRefusal(ExportError):
    """The tracking server answered with an HTTP error (MLflow's error_code and message when it says them)."""

    def __init__(self, status: int, endpoint: str, raw: bytes) -> None:
        try:
            said = json.loads(raw)
        except ValueError:
            said = {}
        said = said if isinstance(said, dict) else {}
        self.status, self.error_code = status, said.get("error_code")
        message = str(said.get("message") or "")[:300] or (
            "not MLflow's JSON; is -o the tracking server's address?" if raw.strip() else "no message")
        super().__init__(f"the MLflow server refused {endpoint} (HTTP {status}"
                         + (f", {self.error_code}" if self.error_code else "") + f"): {visible(message)}")


def mlflow_field(client: MlflowClient, endpoint: str, answer: object, *path: str | int) -> object:
    """The value at PATH (keys and list indices) of the server's ANSWER to ENDPOINT; ExportError when
    the answer has another shape, as a server that is not MLflow's may give."""
    for step in path:
        if (isinstance(answer, dict) and isinstance(step, str)) or (
                isinstance(answer, list) and isinstance(step, int) and -len(answer) <= step < len(answer)):
            answer = answer.get(step) if isinstance(answer, dict) else answer[step]
        else:
            answer = None
        if answer is None:
            raise ExportError(f"{client.uri} answered {endpoint} with something that is not MLflow's answer "
                              f"(no {'.'.join(map(str, path))}); is -o a tracking server?")
    return answer


def mlflow_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment NAME, created when the server does not know it."""
    try:
        found = client.call("GET", "experiments/get-by-name", query={"experiment_name": name})
    except MlflowRefusal as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        created = client.call("POST", "experiments/create", {"name": name})
        return str(mlflow_field(client, "experiments/create", created, "experiment_id"))
    experiment_id = mlflow_field(client, "experiments/get-by-name", found, "experiment", "experiment_id")
    if found["experiment"].get("lifecycle_stage") == "deleted":
        raise ExportError(f"MLflow experiment {visible(name)!r} is deleted; restore it (mlflow experiments restore) "
                          "or export with --experiment NAME")
    return str(experiment_id)


@functools.lru_cache(maxsize=4096)
def mlflow_name(key: str) -> str:
    """KEY as a param, tag or metric name MLflow takes: letters, digits and `_-. :/` (others become `_`), at
    most 250 characters, and nothing that reads as another path (`a//b`, `/x`, `../x`, `.`)."""
    import posixpath
    name = re.sub(r"[^\w./\- :]", "_", key)[:MLFLOW_NAME_MAX] or "_"
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith(("..", "/")):
        name = name.replace("/", "_")
        name = "_" + name[1:] if name.startswith(".") and posixpath.normpath(name).startswith(".") else name
    return name


def mlflow_tags(record: RunRecord, meta: RunMeta) -> dict[str, str]:
    """The run's tags plus RunPilot's own: its id (how an export again finds it), image, engine, backend."""
    tags = {str(k): str(v) for k, v in record.tags.items()}
    tags.update({"runpilot.run_id": record.id, "runpilot.engine": record.engine or "",
                 "runpilot.image": record.image or "", "runpilot.backend": "slurm" if meta.slurm else "host",
                 "runpilot.status": record.status})
    return {mlflow_name(k): v[:MLFLOW_TAG_MAX] for k, v in tags.items() if v}


def mlflow_value(value: int | float) -> float | str:
    """A metric value as MLflow's protobuf JSON takes it: NaN and ±inf as the strings it spells them with
    (an integer beyond a double as ±inf)."""
    try:
        value = float(value)
    except OverflowError:
        value = math.inf if value > 0 else -math.inf
    return value if math.isfinite(value) else _NON_FINITE.get(value, "NaN")


def mlflow_metrics(record: RunRecord, folder: RunFolder) -> Iterator[dict]:
    """Every numeric sample of the run (and of its GPUs) as MLflow metrics with step and time (ms),
    read as they are sent: a run of millions of samples streams."""
    start = run_start_epoch(record)
    at = read_sample_times(folder.sample_times) or (lambda index: 0.0)
    for i, sample in enumerate(iter_metrics(folder.metrics)):
        when = int((start + at(i) * 60) * 1000)
        if not INT64_MIN <= sample.get("step", 0) <= INT64_MAX:  # MLflow's steps are int64s
            continue
        for key, value in scalar_values(sample).items():
            yield {"key": mlflow_name(key), "value": mlflow_value(value), "timestamp": when,
                   "step": sample.get("step", i + 1)}
    for sample in iter_metrics(folder.gpu_stats):
        step = sample.get("step", 0)
        for key, value in scalar_values(sample).items():
            yield {"key": key, "value": mlflow_value(value), "timestamp": int((start + step) * 1000), "step": step}


def mlflow_logged(client: MlflowClient, run_id: str, keys: list[str]) -> set[tuple]:
    """(key, step, timestamp) of every metric value the server already holds for the run."""
    logged = set()
    for key in keys:
        token = None
        while True:
            query = {"run_id": run_id, "metric_key": key, "max_results": 25000}
            if token:
                query["page_token"] = token
            answer = client.call("GET", "metrics/get-history", query=query)
            points = answer.get("metrics") or []
            if not isinstance(points, list) or not all(isinstance(m, dict) for m in points):
                raise ExportError(f"{client.uri} answered metrics/get-history with something that is not "
                                  "MLflow's answer (no list of metrics); is -o a tracking server?")
            logged.update((key, m.get("step"), m.get("timestamp")) for m in points)
            token = answer.get("next_page_token")
            if not token:
                break
    return logged


def export_mlflow_run(client: MlflowClient, experiment_id: str, record: RunRecord, meta: RunMeta,
                      params: dict) -> tuple[str, int]:
    """Create the run in MLflow (or find it by its runpilot.run_id tag), send what it lacks, set its
    status and times. Returns (MLflow's run id, metric values sent)."""
    folder = RunFolder(Path(record.path))
    found = client.call("POST", "runs/search", {
        "experiment_ids": [experiment_id], "filter": f"tags.`runpilot.run_id` = '{record.id}'", "max_results": 1})
    metrics = mlflow_metrics(record, folder)
    if found.get("runs"):
        run_id = mlflow_field(client, "runs/search", found, "runs", 0, "info", "run_id")
        logged = mlflow_logged(client, run_id, list(dict.fromkeys(m["key"] for m in mlflow_metrics(record, folder))))
        metrics = (m for m in metrics if (m["key"], m["step"], m["timestamp"]) not in logged)
    else:
        created = client.call("POST", "runs/create", {   # its run_id tag from the start: an export again finds it
            "experiment_id": experiment_id, "run_name": record.name, "start_time": int(run_start_epoch(record) * 1000),
            "tags": [{"key": "runpilot.run_id", "value": record.id}]})
        run_id = mlflow_field(client, "runs/create", created, "run", "info", "run_id")
    tags = [{"key": k, "value": v} for k, v in mlflow_tags(record, meta).items()]
    values = [{"key": mlflow_name(k), "value": fmt_cell(v)[:MLFLOW_PARAM_MAX]} for k, v in params.items()]
    for kind, items in (("tags", tags), ("params", values)):
        size = MLFLOW_BATCH[kind]
        for at in range(0, len(items), size):
            client.call("POST", "runs/log-batch", {"run_id": run_id, kind: items[at:at + size]})
    sent = 0
    while batch := list(itertools.islice(metrics, MLFLOW_BATCH["metrics"])):
        client.call("POST", "runs/log-batch", {"run_id": run_id, "metrics": batch})
        sent += len(batch)
    update = {"run_id": run_id, "status": MLFLOW_STATUS.get(record.status, "FAILED"), "run_name": record.name}
    if record.finished_at and record.status not in ACTIVE_STATUSES:
        update["end_time"] = int(parse_time(record.finished_at).timestamp() * 1000)
    client.call("POST", "runs/update", update)
    return run_id, sent


def export_mlflow(store: RunStore, records: list[RunRecord], client: MlflowClient, experiment: str | None,
                  say: Callable[[str], None]) -> int:
    """Send every run; on an error, say which runs went over and which did not. Returns the values sent."""
    experiments: dict[str, str] = {}
    sent, done, lines = 0, [], []
    for record in records:
        try:
            params = _config_of(store, record)
            name = experiment or str(params.get("name") or record.name)   # default: the config's name
            experiments[name] = experiments.get(name) or mlflow_experiment(client, name)
            meta = store.folder(record.id).read_meta()
            run_id, count = export_mlflow_run(client, experiments[name], record, meta, params)
        except RunPilotError as exc:
            over = ", ".join(short_id(r.id) for r in done) or "none"
            left = ", ".join(short_id(r.id) for r in records[len(done):])
            raise ExportError(f"{exc}; runs exported: {over}; not (or only partly) exported: {left} "
                              "(exporting them again completes them, without duplicates)") from exc
        done.append(record)
        sent += count
        lines.append(f"run {record.id} -> MLflow run {run_id} in experiment {visible(name)!r} ({count} new value(s))")
    for line in lines:  # once all went over: an error is one line
        say(line)
    return sent

# ==== 21. Command line =======================================================
# Each command reads: parse its arguments, ask the store or the orchestrator, present.

# -- the command line's value types, checked where they enter

def _stop_timeout(text: str) -> float:
    """--stop-timeout: a finite number of seconds, at most a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (0 <= value <= MAX_STOP_TIMEOUT):
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and {MAX_STOP_TIMEOUT} seconds")
    return value


def _on_arg(text: str) -> str:
    """`--on NAME` or `--on NAME:ARG`, NAME from BACKENDS, ARG as that backend accepts it."""
    name, sep, arg = text.partition(":")
    if name not in BACKENDS:
        raise argparse.ArgumentTypeError(f"unknown place {visible(text)!r}; choose from "
                                         f"{', '.join(BACKENDS)} (ssh as ssh:HOST)")
    try:
        BACKENDS[name].check_arg(arg if sep else None)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _run_id_arg(text: str) -> str:
    if not RUN_ID_RE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a run id (like 20261128-224705-a3f9c1)")
    return text


def _sweep_id_arg(text: str) -> str:
    if not SWEEP_ID_RE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a sweep id (like sw-20261201-120000-a1b2c3)")
    return text


def _sweep_ref_arg(text: str) -> str:
    """A sweep as a user names it (full id, prefix, short id, latest, -N); find_sweep resolves it."""
    if not (SWEEP_REF_RE.match(text) or text in ("latest", "last") or re.fullmatch(r"-\d+", text)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a sweep id (like sw-20261201-120000-a1b2c3, "
                                         "sw-a1b2c3, latest or -2)")
    return text


def _gpu_list(text: str) -> list[str]:
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices or not all(re.fullmatch(r"[\w-]+", d) for d in devices):
        raise argparse.ArgumentTypeError(f"{text!r} must list GPU indices or UUIDs: 0,1,3")
    return list(dict.fromkeys(devices))


def _gpu_interval(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 1 <= seconds <= 86400:  # a sample's step is the second of the run it was taken in
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 1 to 86400")
    return seconds


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of 1 or more")
    return int(text)


def _plot_dimension(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= PLOT_MAX_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number from 1 to {PLOT_MAX_SIZE}")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number (0 or more)")
    return int(text)


def _run_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the name is empty; give some text, or leave out --name")
    return text


# -- what every command uses: output, the store, naming runs

def echo(text: str = "", err: bool = False) -> None:
    """print() that a closed output (`runpilot list | head`) cannot turn into a failure."""
    stream = sys.stderr if err else sys.stdout
    try:
        print(text, file=stream, flush=err)
    except BrokenPipeError:
        _silence(stream)


def _silence(stream) -> None:
    """Send a stream whose reader has gone to /dev/null, so nothing more fails on it (nor at exit)."""
    with contextlib.suppress(OSError, AttributeError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def note(text: str) -> None:
    echo(f"runpilot: {visible(text)}", err=True)


def _store() -> RunStore:
    return RunStore.default(note=note)


def output_width(stream=None) -> int | None:
    """The width views fit: the terminal's, else $COLUMNS, else none (piped output is not cut)."""
    stream = stream or sys.stdout
    with contextlib.suppress(AttributeError, OSError, ValueError):
        if stream.isatty():
            return os.get_terminal_size(stream.fileno()).columns
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else None


def _tags(items: list[str]) -> dict:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--tag {item!r} must look like KEY=VALUE, e.g. --tag try=3")
        if key in tags and tags[key] != value:
            raise UsageError(f"--tag {key} is given twice ({key}={tags[key]}, {item}); give each key once")
        tags[key] = value
    return tags


def since_cutoff(text: str, flag: str = "--since", now: _dt.datetime | None = None) -> str:
    """ISO time from `2d`, `12h`, `30m` (ago) or a date `2026-11-01` / time `2026-11-01T08:00`."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    with contextlib.suppress(ValueError):
        seconds = parse_duration(text)
        if seconds > MAX_AGE_SECONDS:
            raise UsageError(f"{flag} {text!r} reaches back more than ten years; give a date (2020-01-01)")
        return iso_utc(now - _dt.timedelta(seconds=seconds))
    try:
        when = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{flag} {visible(text)!r}: give an age (2d, 12h, 30m) or a date (2026-11-01)") from None
    return iso_utc(when.replace(tzinfo=when.tzinfo or _dt.timezone.utc))


def find_run(store: RunStore, ref: str) -> RunRecord:
    """The run a command names, with its status brought up to date."""
    return refresh(store, [store.find(ref)], note)[0]


def _run_details(store: RunStore, ref: str) -> tuple[RunRecord, RunMeta, Iterator[dict]]:
    """A run with its meta.json and its samples."""
    record = find_run(store, ref)
    folder = store.folder(record.id)
    return record, folder.read_meta(), iter_metrics(folder.metrics)


def _sweep_runs(store: RunStore, sweep_id: str) -> list[RunRecord]:
    records = refresh(store, store.query(RunFilter(sweep_id=check_sweep_id(sweep_id), ascending=True)), note)
    records = in_plan_order(store, sweep_id, records)
    if not records:
        raise StoreError(f"no run belongs to sweep {sweep_id}; see runpilot list")
    return records


def _refs_or_sweep(store: RunStore, args) -> list[RunRecord]:
    if args.sweep:
        args.sweep = find_sweep(store, args.sweep)
        return _sweep_runs(store, args.sweep)
    if not args.runs:
        raise UsageError("name the runs (ids, prefixes, latest, -N), or a sweep with --sweep ID")
    return [find_run(store, ref) for ref in args.runs]


def _config_of(store: RunStore, record: RunRecord) -> dict:
    path = store.folder(record.id).config
    try:
        return flatten(parse_yaml(path.read_text(encoding="utf-8"), str(path)))
    except (OSError, ConfigError):
        return {}


# -- running: run, rerun, validate

def cli_reporter(terminal: Terminal) -> Reporter:
    """A run's events as `runpilot: ...` lines on stderr, the way `runpilot run` shows them."""
    def report(event: RunEvent) -> None:
        if event.kind == "finished" and event.outcome is not None:
            lines = render_summary(event.outcome)
        elif event.kind in ("warning", "hint"):
            lines = [f"{event.kind}: {event.message}"]
        else:
            lines = [event.message]
        for line in lines:
            terminal.say(line)
        if event.kind == "pulling":  # the engine's own progress follows on the same stderr
            terminal.drain(5)
    return report


def finish_output(terminal: Terminal, signals: StopSignals) -> None:
    """Let the terminal catch up before exiting; a Ctrl-C meanwhile drops what it has not shown."""
    seen = len(signals.received)
    while not terminal.drain(POLL_SECONDS):
        if len(signals.received) > seen:
            terminal.abandon()
            return


def _run_options(args, **more) -> RunOptions:
    return RunOptions(engine=args.engine, stop_timeout=args.stop_timeout, keep_engine_logs=args.engine_logs,
                      pull=args.pull, tags=_tags(args.tag), overrides=args.set, gpu_check=not args.no_gpu_check,
                      run_id=args.run_id, gpu_pool=args.gpus, wait_for_gpus=not args.no_wait,
                      gpu_stats=None if getattr(args, "no_gpu_stats", False) else getattr(
                          args, "gpu_stats_every", GPU_STATS_SECONDS),
                      check_writes=getattr(args, "check_writes", False), live_code=args.live_code,
                      **more)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=ENGINES, help="docker, podman or local (default: config, "
                   "$RUNPILOT_ENGINE, then docker if installed, else podman)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, dotted keys (repeatable): --set env.LR=0.01")
    p.add_argument("--name", type=_run_name, help="override the run name")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="attach a tag (repeatable)")
    p.add_argument("-d", "--detach", action="store_true", help="run in the background; print the id")
    p.add_argument("--stop-timeout", type=_stop_timeout, default=DEFAULT_STOP_TIMEOUT, metavar="SECONDS",
                   help=f"grace period between SIGTERM and SIGKILL when stopped (default {DEFAULT_STOP_TIMEOUT})")
    p.add_argument("--pull", choices=("always", "missing", "never"), default="missing",
                   help="when to pull the image (default: missing)")
    p.add_argument("--engine-logs", action="store_true",
                   help="keep the engine's own log driver (docker logs works; output is slower)")
    p.add_argument("--no-gpu-check", action="store_true", help="skip the check that the GPUs asked for exist")
    p.add_argument("--gpus", type=_gpu_list, metavar="LIST",
                   help="the GPUs to place runs on, e.g. 0,1,3 (default: every GPU nvidia-smi lists)")
    p.add_argument("--no-wait", action="store_true", help="fail at once when the GPUs are held by other runs")
    p.add_argument("--no-gpu-stats", action="store_true", help="do not sample the run's GPUs with nvidia-smi")
    p.add_argument("--gpu-stats-every", type=_gpu_interval, default=GPU_STATS_SECONDS, metavar="SECONDS",
                   help=f"seconds between samples of the run's GPUs (default {GPU_STATS_SECONDS:g})")
    p.add_argument("--check-writes", action="store_true",
                   help="warn when the job leaves large files in its container, outside every mount "
                        "(runs it without --rm; costs about half a second)")
    p.add_argument("--run-id", type=_run_id_arg, help=argparse.SUPPRESS)  # chosen by a detached run's parent
    p.add_argument("--live-code", action="store_true",
                   help="run the code folder as it is, not a snapshot of it (the record says so)")


def _add_metrics_from(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-from", action="append", default=[], metavar="SOURCE",
                   help="also take metrics from huggingface, keras or tqdm output, pattern:REGEX or "
                        "tensorboard:FOLDER (repeatable; adds to the config's metrics_from)")


def cmd_run(args) -> int:
    config = _with_metrics_from(load_config(args.config, args.set), args.metrics_from)
    if args.name:
        config = dataclasses.replace(config, name=args.name)
    if config.sweep:
        note("this config has a sweep: section, which only `runpilot sweep` reads; running it once, "
             "with the values of the rest of the file")
    check_pull_outputs(args)
    return backend_for(args.on).run(args, config, options=_run_options(args))


def _launch(args, config: JobConfig, options: RunOptions) -> int:
    store = _store()
    if args.detach:
        return detach(args.argv, store, "--run-id", store.folder(args.run_id or new_run_id()))
    terminal = Terminal(sys.stdout, sys.stderr)
    with StopSignals() as signals:
        try:
            outcome = run_job(config, options, store, terminal, cli_reporter(terminal), signals=signals)
        finally:
            finish_output(terminal, signals)
    return outcome.exit_code


def detach(argv: list[str], store: RunStore, flag: str, folder: RunFolder | None = None,
           sweep: SweepFolder | None = None) -> int:
    """Start the same command in the background, in its own session; print the id once recorded."""
    store.ensure()
    key = folder.run_id if folder else sweep.sweep_id if sweep else ""
    errors = store.home / f".detach-{key}.err"
    child_argv = [a for a in argv if a not in ("-d", "--detach")] + [flag, key]
    try:
        fd = os.open(errors, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as e:
        raise StoreError(f"cannot start in the background: {e.strerror} ({store.home}); check that "
                         "RUNPILOT_HOME is writable, or set it to a writable folder") from e
    with open(fd, "wb") as err:
        # imported through SSH_LAUNCHER, not run as a script: the child reuses the cached bytecode
        # (a script is compiled at every start: the larger part of a detached start, on a box too);
        # a copy installed without `.py` cannot be imported by its path, and runs as the script
        me = os.path.abspath(__file__)
        child = subprocess.Popen([sys.executable, *(["-c", SSH_LAUNCHER] if me.endswith(".py") else []), me,
                                  *child_argv],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                 start_new_session=True)
    recorded = folder.meta_file if folder else sweep.plan  # type: ignore[union-attr]
    try:
        while not recorded.exists():  # the child may be pulling an image first
            if child.poll() is not None:
                sys.stderr.write(errors.read_text(errors="replace"))
                return child.returncode or 1
            time.sleep(0.05)
    finally:
        with contextlib.suppress(OSError):
            errors.unlink()
    echo(key)
    return 0


def render_dry_run(config: JobConfig, options: RunOptions) -> str:
    engine = choose_engine(options.engine, config, os.environ)
    run_id = new_run_id()
    env = {**job_environment(dataclasses.replace(config, env={}), run_id, engine, os.environ), **config.env}
    snapshot = code_mount(config) is not None and not options.live_code and config.code_snapshot is not False
    launched, files_env = run_files_config(config, _store().folder(run_id), snapshot, engine)
    env.update(files_env)
    launch = make_launch(launched, run_id, engine, env, options, {}, None)
    where = f"# in {launch.cwd}\n" if launch.cwd else ""
    if "/dev/fd/ENV" in launch.argv:
        where += (f"# /dev/fd/ENV stands for the pipe that carries the job's environment "
                  f"({', '.join(sorted(env))}):\n# to paste the command, put NAME=VALUE lines in a file and "
                  "give its path instead\n")
    text = f"# resolved config\n{dump_yaml(config_to_dict(config))}\n# command ({engine})\n{where}{shlex.join(launch.argv)}"
    return "\n".join(visible(line) for line in text.split("\n"))


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the run config (YAML)")
    _add_run_options(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the engine command line; run and record nothing")
    add_pull_outputs(p)
    p.add_argument("--on", type=_on_arg, default="here", metavar="WHERE",
                   help="here (default), slurm (submit to a Slurm cluster with sbatch), or ssh:HOST "
                        "(run on one of your other boxes over ssh)")
    _add_metrics_from(p)


def cmd_rerun(args) -> int:
    store = _store()
    old = find_run(store, args.run)
    old_meta = store.folder(old.id).read_meta()
    config = load_config(store.folder(old.id).config, args.set)
    config = dataclasses.replace(_with_metrics_from(config, args.metrics_from), name=args.name or config.name,
                                 source=old_meta.config_file)
    options = dataclasses.replace(_run_options(args, rerun_of=old.id, previous=old_meta),
                                  tags={**old.tags, **_tags(args.tag)})
    if args.live_code and args.current_code:
        raise UsageError("--live-code and --current-code both run today's folder; give one of them")
    options = dataclasses.replace(options, code_snapshots=rerun_code(store, config, old_meta, options,
                                                                    args.current_code, note))
    config = rerun_image(config, old_meta, options, note)
    check_pull_outputs(args)
    return backend_for(args.on).run(args, config, options)


def _with_metrics_from(config: JobConfig, specs: list[str]) -> JobConfig:
    """The config with `--metrics-from` sources added after its own (recorded in the run's config)."""
    added = tuple(parse_metrics_source(spec) for spec in specs)
    return dataclasses.replace(config, metrics_from=config.metrics_from + added) if added else config


def rerun_code(store: RunStore, config: JobConfig, old: RunMeta, options: RunOptions, current: bool,
               say: Callable[[str], None]) -> dict[str, str]:
    """The snapshot a rerun runs ({folder: id}): the recorded one, or with CURRENT a new one of the
    folder as it is now, after saying what changed. Said before the job starts."""
    mount, recorded = code_mount(config), old.code.get("snapshot") if old.code.get("mode") == "snapshot" else None
    if mount is None or options.live_code:
        return {}
    snapshots = SnapshotStore(store.home)
    box = old.runner.box if old.runner.backend == "ssh" else None
    if recorded and box and not current and not snapshots.manifest_path(recorded).exists():  # a box's own snapshot
        say(f"run {old.run_id} ran on box {box}, whose snapshot of its code stays there; running "
            f"{mount.source} as it is now")
        return {}
    if not current:
        if not recorded:
            say(f"run {old.run_id} recorded no code snapshot ({old.code.get('mode') or 'before snapshots'}); "
                f"running {mount.source} as it is now")
            return {}
        files = snapshots.manifest(recorded)
        say(f"rerunning the code of run {old.run_id} (snapshot {recorded[:12]}, {len(files)} file(s)); "
            f"--current-code runs {mount.source} as it is now")
        return {mount.source: recorded}
    code = plan_code(config, options, store)
    if code.get("mode") != "snapshot":
        return {}
    if recorded:
        with contextlib.suppress(SnapshotError):
            say(fmt_code_changes(code_changes(snapshots.manifest(recorded), snapshots.manifest(code["snapshot"])),
                                 old.run_id))
    return {mount.source: code["snapshot"]}


def rerun_image(config: JobConfig, old: RunMeta, options: RunOptions, say: Callable[[str], None]) -> JobConfig:
    """The config with the image the old run ran, where its tag has moved since (said before the job
    starts): by digest when the registry gave one, else by the image id while it is still here."""
    engine = options.engine or config.engine or old.engine
    if not engine_of(engine, "local").needs_image or not old.image_id or not config.image or config.image != old.image:
        return config
    with contextlib.suppress(RunPilotError):
        now = inspect_image(engine, config.image)
        if now is None or now["image_id"] == old.image_id:
            return config
        pinned = old.repo_digests[0] if old.repo_digests else old.image_id
        if not old.repo_digests and inspect_image(engine, old.image_id) is None:
            say(f"image {config.image} has moved since run {old.run_id}, and the image it ran "
                f"({old.image_id[:19]}) is gone; running {config.image} as it is now")
            return config
        say(f"image {config.image} has moved since run {old.run_id} (now {now['image_id'][:19]}): running the "
            f"recorded image {pinned}")
        return dataclasses.replace(config, image=pinned)
    return config


def _rerun_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run id, unique prefix, short id, latest or -N")
    p.add_argument("--current-code", action="store_true",
                   help="run the code folder as it is now (a new snapshot), and say what changed")
    _add_run_options(p)
    add_pull_outputs(p)
    p.add_argument("--on", type=_on_arg, default="here", metavar="WHERE",
                   help="here (default), slurm (submit to a Slurm cluster with sbatch), or ssh:HOST "
                        "(run on one of your other boxes over ssh)")
    _add_metrics_from(p)


def cmd_validate(args) -> int:
    data, text, positions = load_config_data(args.config)
    data, blamed = apply_overrides(data, args.set)
    config = validate_config(data, str(args.config), text, positions, overrides=blamed)
    for point in sweep_points(config.sweep, 1) if config.sweep else []:  # a sweep: section's points are configs too
        point_config(data, str(args.config), text, positions, blamed, point, 1, from_grid=False)
    engine = config.engine or os.environ.get("RUNPILOT_ENGINE")
    for warning in entrypoint_warnings(config, engine):
        note(f"warning: {warning}")
    echo(visible(f"{args.config}: ok ({config.name}, image {config.image or '-'}, {len(config.mounts)} mount(s), "
                 f"{len(config.env)} env value(s))"))
    return 0


def _validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")


# -- running: sweep, and its resume

def sweep_labels(sweep: Sweep) -> dict[str, str]:
    """Each point's run -> `[1/3 LR=0.1]`, what a sweep's lines begin with."""
    return {p.run_id: f"[{p.index + 1}/{len(sweep.points)} {p.grid_point().label(sweep.repeat)}]"
            for p in sweep.points}


def sweep_reporter(sweep: Sweep, terminal: Terminal) -> Reporter:
    """One line per run event, the point's values in front: parallel jobs' output stays in logs.txt."""
    labels = sweep_labels(sweep)

    def report(event: RunEvent) -> None:
        label = labels.get(event.run_id or "", "")
        if event.kind == "finished" and event.outcome is not None:
            meta = event.outcome.meta
            shown = ", ".join(f"{k} {fmt_value(meta.last_metrics[k])}" for k in meta.metric_names
                              if k in meta.last_metrics)
            terminal.say(f"{label} {fmt_ending(meta)}" + (f", {shown}" if shown else "") + f" (run {short_id(meta.run_id)})")
        elif event.kind == "starting":
            meta_devices = re.search(r" on GPU (\S+)$", event.message)
            where = f" on GPU {meta_devices.group(1)}" if meta_devices else ""
            terminal.say(f"{label} started{where} (run {short_id(event.run_id or '')})")
        elif event.kind in ("warning", "hint"):
            terminal.say(f"{label} {event.kind}: {event.message}".strip())
        elif event.kind not in ("notice", "pulling") or not label:
            terminal.say(f"{label} {event.message}".strip())
    return report


def render_sweep_plan(sweep_id: str, points: list[SweepPoint], repeat: int, parallel: int, pool: list[str] | None) -> str:
    where = f" on GPUs {','.join(pool)}" if pool else ""
    lines = [f"sweep {sweep_id}: {len(points)} run(s), {parallel} at a time{where}"]
    lines += [f"  {p.index + 1:>3}. {p.label(repeat)}" for p in points[:SWEEP_PLAN_SHOWN]]
    if len(points) > SWEEP_PLAN_SHOWN:
        lines.append(f"  (and {len(points) - SWEEP_PLAN_SHOWN} more)")
    return "\n".join(visible(line) for line in lines)


def cmd_sweep(args) -> int:
    store = _store()
    if args.resume:
        return _resume_sweep(store, args)
    if not args.config:
        raise UsageError("sweep needs a CONFIG (or --resume SWEEP_ID)")
    base, axes, points, configs = _sweep_grid(args)
    options = _run_options(args)
    check_pull_outputs(args)
    if args.on != "here":
        return backend_for(args.on).sweep(args, store, configs, axes, options)
    return _sweep_here(store, args, base, axes, points, configs, options)


def _sweep_grid(args) -> tuple[JobConfig, list, "SweepPlan", "PointConfigs"]:
    """The config `sweep` names with its overrides, its axes, its points, and each point's config."""
    data, text, positions = load_config_data(args.config)
    data, blamed = apply_overrides(data, args.set)
    if args.name and isinstance(data, dict):
        data["name"] = args.name
    if args.metrics_from and isinstance(data, dict):
        added = [parse_metrics_source(spec).to_data() for spec in args.metrics_from]
        data["metrics_from"] = [*(data.get("metrics_from") or []), *added]
    base = validate_config(data, str(args.config), text, positions, overrides=blamed)
    axes = parse_grid(args.grid) or base.sweep
    for key, _ in axes:
        check_new_key(data, tuple(key.split(".")), f"--grid {key}" if args.grid else f"{args.config}: sweep: {key}")
    if not axes:
        raise UsageError("nothing to sweep: give --grid KEY=V1,V2 or a sweep: section in the config")
    check_sweep_size(axes, args.repeat, args.max_points)
    points = sweep_points(axes, args.repeat)
    configs = PointConfigs(points, functools.partial(point_config, data, str(args.config), text, positions, blamed,
                                                     repeats=args.repeat, from_grid=bool(args.grid)))
    configs.check(SWEEP_PLAN_SHOWN if args.dry_run else len(configs))  # a dry run checks what it prints
    return base, axes, points, configs


def _sweep_here(store: RunStore, args, base: JobConfig, axes: list, points: "SweepPlan",
                configs: "PointConfigs", options: RunOptions) -> int:
    """A sweep on this machine: check it, print its plan, then record and run it (or detach)."""
    if not args.dry_run:  # a dry run prints the plan, also on a box without the GPUs or the image
        _check_sweep_host([c for _, c in configs], options)
    if args.sweep_id and store.sweep_folder(args.sweep_id).path.exists():
        raise UsageError(f"sweep {args.sweep_id} exists already; leave out --sweep-id")
    sweep_id = args.sweep_id or new_sweep_id()
    parallel = sweep_parallel([c for _, c in configs[:1]], options, args.parallel, os.environ)
    echo(render_sweep_plan(sweep_id, points, args.repeat, parallel, options.gpu_pool), err=True)
    if args.dry_run:
        return 0
    if args.detach:
        return detach(args.argv, store, "--sweep-id", sweep=store.sweep_folder(sweep_id))
    # one snapshot for every point: an edit made while the sweep runs changes none of them
    options = dataclasses.replace(options, code_snapshots=snapshots_once(store, [c for _, c in configs], options))
    with StopSignals() as signals:
        sweep = plan_sweep(store, sweep_id, configs, axes, args.repeat, _stored_options(args, options), base.source)
        with held_sweep(store, sweep_id):
            jobs = [(point, config) for point, (_, config) in zip(sweep.points, configs)]
            return _run_sweep(store, sweep, jobs, options, parallel, args.fail_fast, signals)


def _stored_options(args, options: RunOptions) -> SweepOptions:
    """The options a sweep keeps in sweep.json, so that `sweep --resume` runs the rest the same way."""
    return SweepOptions.from_data({"engine": args.engine, "tags": options.tags, "gpus": args.gpus, "parallel": args.parallel,
            "fail_fast": args.fail_fast, "stop_timeout": args.stop_timeout, "pull": args.pull,
            "overrides": args.set, "no_gpu_check": args.no_gpu_check, "no_wait": args.no_wait,
            "engine_logs": args.engine_logs, "code_snapshots": options.code_snapshots,
            "live_code": args.live_code})


def _check_sweep_host(configs: list[JobConfig], options: RunOptions) -> None:
    """What `run` refuses before recording anything (no image, GPUs this machine lacks, a GPU named
    twice in --gpus), checked once per distinct engine, image and GPU request, before a sweep records
    its points; a missing image is pulled here, once."""
    checked = set()
    for config in configs:
        engine = choose_engine(options.engine, config, os.environ)
        key = (engine, config.image, repr(config.resources.gpus))
        if key not in checked:
            checked.add(key)
            facts = check_host(config, engine, options, os.environ, lambda event: note(event.message))
            gpu_pool(facts.get("gpus") or {}, options.gpu_pool)


def _run_sweep(store: RunStore, sweep: Sweep, jobs: list, options: RunOptions, parallel: int,
               fail_fast: bool, signals: StopSignals) -> int:
    """Run the recorded points; SIGNALS has held Ctrl-C since before they were recorded (a stop then
    cancels them all, once every one is recorded)."""
    terminal = Terminal(sys.stdout, sys.stderr)
    report = cli_reporter(terminal) if parallel == 1 else sweep_reporter(sweep, terminal)
    runner = SweepRunner(store, sweep, jobs, options, parallel, fail_fast, terminal if parallel == 1 else None,
                         report)
    try:
        code = runner.run(signals)
    finally:
        finish_output(terminal, signals)
    sweep.runner = {}  # no one runs it any more: --resume may
    with contextlib.suppress(OSError):
        sweep.save(store)
    print_sweep_end(store, sweep)
    return code


def print_sweep_end(store: RunStore, sweep: Sweep) -> None:
    """What a sweep ends with, wherever it ran: the comparison table, then how to look at it again."""
    records = refresh(store, [r for p in sweep.points if (r := store.get(p.run_id)) is not None], note)
    runs = [(r, _config_of(store, r), metric_summary(iter_metrics(store.folder(r.id).metrics))) for r in records]
    echo(render_compare(runs, output_width(), False, ("name",)))
    note(f"sweep {sweep.sweep_id}: runpilot list --sweep {sweep.sweep_id}; runpilot plot --sweep {sweep.sweep_id}")


def _resume_sweep(store: RunStore, args) -> int:
    """Run again the points of a sweep that never finished (queued, cancelled, interrupted, lost)."""
    changed = [flag for flag, given in (
        ("CONFIG", args.config), ("--grid", args.grid), ("--set", args.set), ("--name", args.name),
        ("--tag", args.tag), ("--engine", args.engine), ("--repeat", args.repeat != 1), ("--on", args.on != "here"),
        ("--dry-run", args.dry_run), ("--pull", args.pull != "missing"),
        ("--stop-timeout", args.stop_timeout != DEFAULT_STOP_TIMEOUT)) if given]
    if changed:
        raise UsageError(f"--resume runs the points as they were recorded; {', '.join(changed)} cannot be given "
                         "with it (start a new sweep to change them)")
    sweep = Sweep.load(store, find_sweep(store, args.resume))
    if (sweep.options.on or "").startswith("ssh"):
        with held_sweep(store, sweep.sweep_id):
            return SshBackend().resume_sweep(store, Sweep.load(store, sweep.sweep_id), args)
    with held_sweep(store, sweep.sweep_id):
        return _resume_held(store, Sweep.load(store, sweep.sweep_id), args)  # as the last runner left it


def _resume_held(store: RunStore, sweep: Sweep, args) -> int:
    """--resume, once this process alone holds the sweep."""
    if sweep.options.on == "slurm":
        raise UsageError(f"sweep {sweep.sweep_id} was submitted to Slurm, and --resume runs points here; submit "
                         "the points that did not finish again with runpilot sweep ... --on slurm")
    if runner_alive(sweep.runner):
        raise UsageError(f"sweep {sweep.sweep_id} is still running (pid {sweep.runner.get('pid')}); "
                         f"stop it first (runpilot stop {sweep.sweep_id})")
    todo = _unfinished_points(store, sweep)
    if not todo:
        echo(f"sweep {sweep.sweep_id}: every point has finished; nothing to resume")
        return 0
    options = _resume_options(sweep.options, args)
    with StopSignals() as signals:
        sweep.runner = runner_identity()
        jobs = [_requeue(store, sweep, point, folder, meta) for point, folder, meta in todo]
        sweep.save(store)
        parallel = args.parallel or sweep.options.parallel or sweep_parallel([c for _, c in jobs], options,
                                                                                      None, os.environ)
        note(f"resuming sweep {sweep.sweep_id}: {len(jobs)} point(s)")
        return _run_sweep(store, sweep, jobs, options, parallel,
                          args.fail_fast or bool(sweep.options.fail_fast), signals)


def _unfinished_points(store: RunStore, sweep: Sweep) -> list[tuple[dict, RunFolder, RunMeta]]:
    todo = []
    for point in sweep.points:
        folder = store.folder(point.run_id)
        meta = folder.read_meta()
        if meta.status in (SUCCEEDED, FAILED, TIMEOUT) or still_running_elsewhere(store, sweep, point, meta):
            continue
        if not folder.config.is_file():
            note(f"point {point.index + 1} of sweep {sweep.sweep_id} is not resumed: its run {point.run_id} "
                 "was deleted, and its config with it")
            continue
        todo.append((point, folder, meta))
    return todo


def _requeue(store: RunStore, sweep: Sweep, point: dict, folder: RunFolder, meta: RunMeta) -> tuple[dict, JobConfig]:
    """A point queued again: in its own run if it never started, else in a new one (the old stays)."""
    config = dataclasses.replace(load_config(folder.config), source=meta.config_file, name=meta.name)
    if meta.status not in (QUEUED, CANCELLED):
        folder = store.create_run_dir()
        point.replaced_by(folder.run_id)
    values = point.grid_point()
    record_start_queued(folder, config, queued_meta(config, folder.run_id, sweep, values))
    store.save_or_defer(folder.read_meta())
    return point, config


def _resume_options(stored: SweepOptions, args) -> RunOptions:
    """The options the sweep was started with; how-to-run flags given again are added."""
    return RunOptions(engine=stored.engine, tags=stored.tags or {},
                      gpu_pool=args.gpus or stored.gpus,
                      stop_timeout=stored.stop_timeout or DEFAULT_STOP_TIMEOUT,
                      pull=stored.pull or "missing", overrides=stored.overrides or [],
                      gpu_check=not (args.no_gpu_check or stored.no_gpu_check),
                      wait_for_gpus=not (args.no_wait or stored.no_wait),
                      keep_engine_logs=args.engine_logs or bool(stored.engine_logs),
                      code_snapshots=stored.code_snapshots or {},
                      live_code=args.live_code or bool(stored.live_code))


def _sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="the run config (YAML); its sweep: section, or --grid, gives the grid")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a dotted key and its values (repeatable; the runs are every combination)")
    p.add_argument("--repeat", type=_positive_int, default=1, metavar="N",
                   help="run each point N times (the job sees RUNPILOT_REPEAT=0..N-1)")
    p.add_argument("--parallel", type=_positive_int, metavar="N",
                   help="at most N runs at once (default: one per free GPU, or 1 without GPUs)")
    p.add_argument("--fail-fast", action="store_true", help="stop the sweep when a run does not succeed")
    p.add_argument("--resume", metavar="SWEEP_ID", type=_sweep_ref_arg, help="run the points of a sweep that never finished")
    p.add_argument("--dry-run", action="store_true", help="print the plan; run and record nothing")
    p.add_argument("--max-points", type=_positive_int, default=MAX_SWEEP_POINTS, metavar="N",
                   help=f"allow a sweep of up to N points (default {MAX_SWEEP_POINTS})")
    add_pull_outputs(p)
    p.add_argument("--on", type=_on_arg, default="here", metavar="WHERE",
                   help="here (default), or submit the sweep to Slurm as one job array (slurm)")
    _add_metrics_from(p)
    p.add_argument("--sweep-id", type=_sweep_id_arg, help=argparse.SUPPRESS)  # chosen by a detached sweep's parent
    _add_run_options(p)


# -- running elsewhere: a Slurm cluster, an SSH box

def _slurm_refusals(args, sweep: bool) -> None:
    """Options that mean nothing where Slurm places the job are refused, not ignored."""
    given = [flag for flag, value in (("--engine", args.engine), ("--gpus", args.gpus), ("--no-wait", args.no_wait),
                                      ("--fail-fast", sweep and args.fail_fast)) if value]
    if given:
        raise UsageError(f"{', '.join(given)} cannot be given with --on slurm: Slurm places the job and the node "
                         "runs the config's engine (set engine: in the config)")
    home = str(RunStore.default().home)
    if re.search(r"[\s%\\'\"]", home):
        raise UsageError(f"RUNPILOT_HOME {home!r} holds a space, '%', a backslash or a quote, which sbatch's "
                         "--output cannot take (it would strip them); choose a home without them")


def cmd_slurm_job(args) -> int:
    """The job of a Slurm run on its node (what the batch script runs)."""
    def report(event: RunEvent) -> None:
        lines = render_summary(event.outcome) if event.kind == "finished" and event.outcome else \
            [f"{event.kind}: {event.message}" if event.kind in ("warning", "hint") else event.message]
        for line in lines:
            note(line)
    return run_on_node(node_folder(args.target, os.environ), os.environ, report)


def _slurm_job_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="the run folder, or a sweep's runs.txt (one line per array task)")


def cmd_box_report(args) -> int:
    """On a box: the files of the runs asked for, as a tar on stdout (see box_report); with --gpus,
    its free GPUs, one a line."""
    if args.gpus:
        echo("\n".join(box_free_gpus(RunStore.default())))
        return 0
    sys.stdout.flush()
    box_report(RunStore.default(), args.runs, args.all, sys.stdout.buffer)
    return 0


def _box_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="every file of each run's folder")
    p.add_argument("--gpus", action="store_true", help="the box's free GPUs instead")
    p.add_argument("runs", nargs="*", type=_run_id_arg)


# -- output formats: one table that list, show, compare and export share

def record_json(record: RunRecord) -> dict:
    """A run as `list --json` and `show --json` give it: the index row without its bookkeeping, and the
    total size of its outputs folder."""
    return {**{k: v for k, v in dataclasses.asdict(record).items() if k not in ("runner", "backend", "backend_ref")},
            "outputs_bytes": tree_size(Path(record.path) / "outputs")}


@dataclasses.dataclass(frozen=True)
class ListView:
    """What `list` found: the runs, the metrics that are its columns, and the filter that chose them."""
    store: RunStore
    args: argparse.Namespace
    records: list[RunRecord]
    metrics: list[str]
    what: RunFilter


@dataclasses.dataclass(frozen=True)
class ShowView:
    """What `show` found: one run, its meta.json, its samples, its folder and the folder's files."""
    args: argparse.Namespace
    record: RunRecord
    meta: RunMeta
    samples: Iterator[dict]
    folder: RunFolder
    files: dict[str, int]


@dataclasses.dataclass(frozen=True)
class CompareView:
    """What `compare` found: each run with its flattened config and its metrics' summary."""
    args: argparse.Namespace
    runs: list[tuple[RunRecord, dict, dict]]


@dataclasses.dataclass(frozen=True)
class ExportView:
    """What `export` found: the runs whose samples it writes."""
    store: RunStore
    args: argparse.Namespace
    records: list[RunRecord]


def list_table(view: ListView) -> None:
    """`list`: the table people read (its default)."""
    if not view.records:
        what = view.what
        filtered = what.status or what.name_glob or what.since or what.tags or what.sweep_id
        echo("no run matches" if filtered else "no runs yet; start one with: runpilot run CONFIG")
        return
    args = view.args
    colour = sys.stdout.isatty() and not args.no_color and not os.environ.get("NO_COLOR")
    points = _sweep_points_of(view.store, args.sweep) if args.sweep else None
    echo(render_runs(view.records, view.metrics, args.absolute, output_width(), colour, args.no_trunc, points))


def list_csv(view: ListView) -> None:
    """`list --format csv`: one row per run, its last metric values as columns."""
    header = ["id", "name", "status", "started_at", "finished_at", "duration", "exit_code", "tags"] + view.metrics
    echo(render_csv(header, [[r.id, r.name, r.status, r.started_at, r.finished_at, r.duration, r.exit_code,
                              fmt_tags(r.tags) if r.tags else ""] + [r.last_metrics.get(m) for m in view.metrics]
                             for r in view.records]).rstrip("\n"))


def list_json(view: ListView) -> None:
    """`list --json`: a JSON list of runs."""
    echo(json.dumps(json_safe([record_json(r) for r in view.records]), indent=2, sort_keys=True))


def list_ids(view: ListView) -> None:
    """`list -q`: run ids only, one a line."""
    echo("\n".join(r.id for r in view.records))


def show_text(view: ShowView) -> None:
    """`show`: the page people read, with the log's tail for a run that did not succeed."""
    args, record, folder = view.args, view.record, view.folder
    tail = args.tail if args.tail is not None else SHOW_LOG_TAIL if record.status in (
        FAILED, INTERRUPTED, TIMEOUT, LOST) else 0
    log = log_tail(folder.logs, 64 << 10).decode("utf-8", "replace").splitlines()[-tail:] if tail > 0 else []
    config = folder.config.read_text(encoding="utf-8", errors="replace") if folder.config.is_file() else ""
    ascii_only = args.ascii or not _can_encode(SPARK_BLOCKS)
    echo(render_show(record, view.meta, view.samples, view.files, config, log, ascii_only,
                     None if args.no_trunc else output_width(), tree_files(folder.outputs)))


def show_json(view: ShowView) -> None:
    """`show --json`: one JSON object: the run, its meta.json, its metrics' summary, its files."""
    summary = {k: {kk: vv for kk, vv in v.items() if kk != "values"} for k, v in metric_summary(view.samples).items()}
    meta_data = json.loads(view.meta.to_json())
    echo(json.dumps(json_safe({"run": record_json(view.record), "meta": meta_data, "metrics": summary,
                               "files": view.files, "outputs": tree_files(view.folder.outputs)}),
                    indent=2, sort_keys=True))


def compare_table(view: CompareView) -> None:
    """`compare`: the runs side by side, the best value of each chosen metric starred."""
    args = view.args
    echo(render_compare(view.runs, output_width(), args.no_trunc, ("name",) if args.sweep else (), args.metric))


def export_csv(view: ExportView) -> None:
    """`export --format csv` (the default): one row per sample, to stdout or -o FILE."""
    export_lines(view, "csv")


def export_jsonl(view: ExportView) -> None:
    """`export --format jsonl`: one JSON object per sample, to stdout or -o FILE."""
    export_lines(view, "jsonl")


def export_lines(view: ExportView, fmt: str) -> None:
    """The samples of the runs as lines in FMT, with the config keys and tags asked for as columns."""
    store, args, records = view.store, view.args, view.records
    runs = [(r, store.folder(r.id).metrics, _config_of(store, r)) for r in records]  # samples: streamed
    keys = [k for k in differing([flat for _, _, flat in runs]) if k != "name"] if args.config else []  # a column
    if args.sweep:  # a sweep's points differ in their swept keys: always columns, first
        keys = list(dict.fromkeys(swept_keys(store, args.sweep) + keys))
    tag_names = sorted({t for r in records for t in r.tags}) if args.tags else []
    if args.output:
        write_export(runs, keys, tag_names, fmt, args.output)
        return
    shown = visible if sys.stdout.isatty() and fmt == "csv" else (lambda line: line)
    try:
        export_stream(runs, keys, tag_names, fmt, lambda line: sys.stdout.write(shown(line) + "\n"))
        sys.stdout.flush()
    except BrokenPipeError:
        _silence(sys.stdout)


def write_export(runs: list[tuple[RunRecord, Path, dict]], keys: list[str], tag_names: list[str], fmt: str,
                 output: str) -> None:
    """Write the export to OUTPUT whole: a partial file beside it, renamed when complete."""
    target = Path(output)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")  # never a half-written file
    try:
        with open(partial, "w", encoding="utf-8") as f:
            count = export_stream(runs, keys, tag_names, fmt, lambda line: f.write(line + "\n"))
        os.replace(partial, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise RunPilotError(f"cannot write {output}: {exc.strerror}; choose another -o path") from exc
    echo(f"wrote {count} sample(s) of {len(runs)} run(s) to {output}", err=True)


def export_tensorboard_view(view: ExportView) -> None:
    """`export --format tensorboard -o DIR`: event files in a folder, one per run."""
    args = view.args
    if not args.output:
        raise UsageError("--format tensorboard writes a folder of event files; name it with -o DIR")
    written, runs = export_tensorboard(view.store, view.records, Path(args.output), args.follow)
    echo(f"wrote {written} sample(s) of {runs} run(s) to {visible(args.output)}; see them with: "
         f"tensorboard --logdir {shlex.quote(args.output)}", err=True)


def export_mlflow_view(view: ExportView) -> None:
    """`export --format mlflow`: the runs on a tracking server (-o URI or $MLFLOW_TRACKING_URI)."""
    uri = view.args.output or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UsageError("--format mlflow needs the tracking server: -o http://HOST:5000 or MLFLOW_TRACKING_URI")
    client = MlflowClient(uri)
    sent = export_mlflow(view.store, view.records, client, view.args.experiment, lambda text: echo(text, err=True))
    echo(f"exported {len(view.records)} run(s) ({sent} new metric value(s)) to {visible(client.uri)}", err=True)


# The output formats, per view: {view: {format name: function that prints the view in it}}. A view's
# first format is its default. Adding a format is one function and one entry here: `--format` takes
# its choices from this table.
FORMATS: dict[str, dict[str, Callable]] = {
    "list": {"table": list_table, "csv": list_csv, "json": list_json, "ids": list_ids},
    "show": {"text": show_text, "json": show_json},
    "compare": {"table": compare_table},
    "export": {"csv": export_csv, "jsonl": export_jsonl, "tensorboard": export_tensorboard_view,
               "mlflow": export_mlflow_view},
}


# The options that name a format without --format, in the order they win (`list -q --json` prints ids).
FORMAT_FLAGS = (("quiet", "ids"), ("json", "json"))


def chosen_format(view: str, args: argparse.Namespace) -> str:
    """The format VIEW's options ask for: a flag of FORMAT_FLAGS, else --format, else the view's first."""
    for flag, name in FORMAT_FLAGS:
        if getattr(args, flag, False) and name in FORMATS[view]:
            return name
    return getattr(args, "format", None) or next(iter(FORMATS[view]))


def format_choices(view: str) -> tuple[str, ...]:
    """What VIEW's --format takes: its formats, less those an option of their own names (--json, -q)."""
    flagged = {name for _, name in FORMAT_FLAGS}
    return tuple(name for name in FORMATS[view] if name not in flagged)


def print_view(view: str, args: argparse.Namespace, found) -> int:
    """Print what VIEW found in the format its options ask for."""
    FORMATS[view][chosen_format(view, args)](found)
    return 0


# -- looking: list, sweeps, show, logs, compare, diff, export

def _list_filter(args) -> RunFilter:
    limit = None if args.all else args.limit
    if limit is None and not args.all:
        limit = max(5, shutil.get_terminal_size().lines - 3) if sys.stdout.isatty() else 20
    ascending = args.ascending if args.ascending is not None else bool(args.sweep)  # a sweep: in plan order
    return RunFilter(status=args.status, name_glob=args.name, since=since_cutoff(args.since) if args.since else None,
                     tags=_tags(args.tag), sweep_id=args.sweep, sort=args.sort, ascending=ascending,
                     limit=None if args.sweep and not args.limit else limit)


def _check_sort_metric(sort: str, records: list[RunRecord]) -> None:
    """A metric to sort by that no listed run has is a typo: the list would come back unsorted."""
    if sort in ("started", "duration") or not records or any(sort in r.last_metrics for r in records):
        return
    known = sorted({m for r in records for m in r.last_metrics})
    raise UsageError(f"--sort {sort!r}: no listed run has that metric; sort by started, duration"
                     + (f" or one of {', '.join(known)}" if known else ""))


def _sweep_points_of(store: RunStore, sweep_id: str) -> dict[str, dict] | None:
    """Run id -> its point's values, for the columns of `list --sweep`; None if the plan is unreadable."""
    try:
        return sweep_point_values(Sweep.load(store, sweep_id))
    except (RunPilotError, TypeError, AttributeError, ValueError):
        return None


def cmd_list(args) -> int:
    store = _store()
    args.sweep = args.sweep and find_sweep(store, args.sweep)
    what = _list_filter(args)
    records = _listed(store, what)
    _check_sort_metric(what.sort, records)
    if args.sweep and args.sort == "started" and args.ascending is None:
        records = in_plan_order(store, args.sweep, records)
    return print_view("list", args, ListView(store, args, records, list_columns(records), what))


def _listed(store: RunStore, what: RunFilter) -> list[RunRecord]:
    """The runs `list` shows. Sorted by a metric, running runs are sorted by their live values
    before --limit cuts the list (the index sorts them as having none): they are asked for beside
    the limited query, and the merged list is cut once sorted."""
    found = store.query(what)
    if what.sort not in ("started", "duration") and what.limit is not None and what.status in (None, RUNNING):
        seen = {r.id for r in found}
        found += [r for r in store.query(dataclasses.replace(what, status=RUNNING, limit=None)) if r.id not in seen]
    records = by_metric(with_live_metrics(store, refresh(store, found, note)), what)
    return records[:what.limit] if what.limit is not None else records


def _list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--status", choices=STATUSES, metavar="STATUS", help=f"only runs with this status: {', '.join(STATUSES)}")
    p.add_argument("--name", metavar="PATTERN", help="only runs whose name matches this glob")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="only runs with this tag")
    p.add_argument("--since", metavar="WHEN", help="only runs started since: 2d, 12h, 30m or 2026-11-01")
    p.add_argument("--sweep", metavar="ID", type=_sweep_ref_arg, help="only the runs of this sweep (all of them)")
    p.add_argument("--sort", default="started", metavar="KEY",
                   help="started (default), duration, or the name of a metric")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--desc", dest="ascending", action="store_false", default=None, help="largest first")
    order.add_argument("--asc", dest="ascending", action="store_true", help="smallest first")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="show at most N runs (default: a screenful)")
    p.add_argument("--all", action="store_true", help="show every run")
    p.add_argument("--absolute", action="store_true", help="show start times as ISO 8601 UTC")
    p.add_argument("--no-color", action="store_true", help="no colours (also: NO_COLOR=1)")
    p.add_argument("--no-trunc", action="store_true", help="full run ids and values, however wide")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--format", choices=format_choices("list"), default="table", help="table (default) or csv")
    p.add_argument("-q", "--quiet", action="store_true", help="print run ids only")


def cmd_sweeps(args) -> int:
    """`runpilot sweeps`: every sweep, newest first, with how far it got and its best value."""
    store = _store()
    summaries = sweep_summaries(store, note, None if args.all else args.limit)
    if args.json:
        echo(json.dumps(json_safe([s.json() for s in summaries]), indent=2, sort_keys=True))
    elif not summaries:
        echo("no sweeps yet; start one with: runpilot sweep CONFIG --grid KEY=V1,V2")
    else:
        echo(render_sweeps(summaries, output_width(), args.no_trunc))
    return 0


def sweep_summaries(store: RunStore, note: Callable[[str], None], limit: int | None = None) -> list[SweepSummary]:
    """The LIMIT newest sweeps' summaries from their plans and their runs' index rows, statuses
    brought up to date (only those: a home's thousand old sweeps are not read to show twenty)."""
    plans = []
    for sweep_id in sweep_ids(store)[:limit]:
        try:
            sweep = Sweep.load(store, sweep_id)
        except RunPilotError as exc:
            note(f"sweep {sweep_id} is left out: {exc}")
            continue
        if not isinstance(sweep.points, list) or not isinstance(sweep.options, SweepOptions):
            note(f"sweep {sweep_id} is left out: its sweep.json is not a sweep's plan")
            continue
        plans.append(sweep)
    rows = [r for sweep in plans for r in store.query(RunFilter(sweep_id=sweep.sweep_id))] if plans else []
    records = {r.id: r for r in with_live_metrics(store, refresh(store, rows, note))}  # BEST as `list` shows them
    summaries = []
    for sweep in plans:
        try:
            summaries.append(summarize_sweep(sweep, records))
        except (TypeError, ValueError, AttributeError, KeyError) as exc:  # a hand-edited sweep.json
            note(f"sweep {sweep.sweep_id} is left out: its sweep.json is not a sweep's plan ({exc})")
    return summaries


def _sweeps_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=_positive_int, default=20, metavar="N", help="show the N newest (default 20)")
    p.add_argument("--all", action="store_true", help="show every sweep")
    p.add_argument("--no-trunc", action="store_true", help="full sweep ids and values, however wide")
    p.add_argument("--json", action="store_true", help="print a JSON list")


def cmd_show(args) -> int:
    store = _store()
    record, meta, samples = _run_details(store, args.run)
    folder = store.folder(record.id)
    files = {f.name: f.stat().st_size for f in sorted(folder.path.iterdir())
             if not f.name.startswith(".") and not f.is_dir()} if folder.path.is_dir() else {}  # outputs/: below
    return print_view("show", args, ShowView(args, record, meta, samples, folder, files))


def _can_encode(text: str) -> bool:
    try:
        text.encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run id, unique prefix, short id, latest or -N")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--ascii", action="store_true", help="draw sparklines with ASCII only")
    p.add_argument("--tail", type=_count, metavar="N",
                   help=f"print the last N lines of the log (default: {SHOW_LOG_TAIL} for a run that did not succeed)")
    p.add_argument("--no-trunc", action="store_true", help="print long values whole")


def cmd_logs(args) -> int:
    store = _store()
    record = find_run(store, args.run)
    backend = runner_backend(record.runner) if args.follow else None
    if backend is not None and (code := backend.follow_logs(store, record, args.tail)) is not None:
        return code
    path = store.folder(record.id).logs
    out = terminal_writer(sys.stdout)
    try:
        offset = _print_log(path, out, args.tail)
        while args.follow:
            running = find_run(store, record.id).status in ACTIVE_STATUSES
            offset = _copy_from(path, out, offset)
            if not running:
                break
            time.sleep(POLL_SECONDS)
    except BrokenPipeError:
        _silence(sys.stdout)
    return 0


def _print_log(path: Path, out, tail: int | None) -> int:
    """Print the log (or its last `tail` lines, however long they are); return the offset reached."""
    if tail is None or not path.exists():
        return _copy_from(path, out, 0)
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = _tail_start(f, size, tail)
    _copy_from(path, out, start, size)
    return size


def _tail_start(f, size: int, lines: int) -> int:
    """Offset of the first of the last `lines` lines, reading backwards block by block."""
    if lines <= 0:
        return size
    end, found = size, 0
    f.seek(size - 1 if size else 0)
    if size and f.read(1) == b"\n":
        end -= 1  # the final newline ends the last line; it does not start a new one
    position = end
    while position > 0:
        block = min(READ_SIZE, position)
        position -= block
        f.seek(position)
        data = f.read(block)
        index = len(data)
        while (index := data.rfind(b"\n", 0, index)) >= 0:
            found += 1
            if found == lines:
                return position + index + 1
    return 0


def _copy_from(path: Path, out, offset: int, end: int | None = None) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            while chunk := f.read(READ_SIZE if end is None else min(READ_SIZE, end - offset)):
                out(chunk)
                offset += len(chunk)
    except FileNotFoundError:
        pass
    return offset


def _logs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run id, unique prefix, short id, latest or -N")
    p.add_argument("--tail", type=_count, metavar="N", help="only the last N lines")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")


def cmd_compare(args) -> int:
    store = _store()
    runs = [(r, _config_of(store, r), metric_summary(iter_metrics(store.folder(r.id).metrics)))
            for r in _refs_or_sweep(store, args)]
    known = {m for _, _, summary in runs for m in summary}
    for name in args.metric:
        if name not in known:
            raise UsageError(f"--metric '{visible(name)}': none of these runs has that metric; choose one of "
                             f"{', '.join(sorted(visible(m) for m in known)) or '(none: no metrics recorded)'}")
    print_view("compare", args, CompareView(args, runs))
    if sys.stderr.isatty() and len(runs) > 1:  # a pointer for people, not for scripts
        refs = f"--sweep {args.sweep}" if args.sweep else " ".join(dict.fromkeys(short_id(r.id) for r, _, _ in runs))
        note(f"curves: runpilot plot {refs}")
    return 0


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="*", metavar="run", help="run ids, unique prefixes, short ids, latest or -N")
    p.add_argument("--sweep", metavar="ID", type=_sweep_ref_arg, help="every run of this sweep")
    p.add_argument("--no-trunc", action="store_true", help="full run ids and values, however wide")
    p.add_argument("--metric", action="append", default=[], metavar="NAME",
                   help="star the best value of this metric (repeatable; default: the configs' metrics:, "
                        "else metrics named like loss or accuracy)")


def cmd_diff(args) -> int:
    """How two runs' code and config differ: the config values, then a unified diff of the snapshots."""
    store = _store()
    runs = [find_run(store, ref) for ref in (args.run1, args.run2)]
    metas = [store.folder(r.id).read_meta() for r in runs]
    names = (short_id(runs[0].id), short_id(runs[1].id))
    configs = [_config_of(store, r) for r in runs]
    lines = [f"config {key}: {fmt_cell(configs[0].get(key))} -> {fmt_cell(configs[1].get(key))}"
             for key in differing(configs) if key != "name"]
    snapshots = SnapshotStore(store.home)
    ids = [m.code.get("snapshot") if m.code.get("mode") == "snapshot" else None for m in metas]
    for meta, snapshot in zip(metas, ids):
        if not snapshot:
            lines.append(f"run {meta.run_id} recorded no code snapshot ({fmt_code(meta.code) or 'no code mount'})")
    if all(ids):
        lines += render_code_diff(snapshots.manifest(ids[0]), snapshots.manifest(ids[1]),
                                  lambda digest: snapshots.object_path(digest).read_bytes(), names)
    if not lines:
        lines = [f"runs {names[0]} and {names[1]} ran the same code with the same config"]
    try:
        echo("\n".join(visible(line) for line in lines))
    except BrokenPipeError:
        _silence(sys.stdout)
    return 0


def _diff_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run1", help="run id, unique prefix, short id, latest or -N")
    p.add_argument("run2", help="the run to compare it with")


def cmd_export(args) -> int:
    store = _store()
    if args.follow and args.format != "tensorboard":
        raise UsageError(f"--follow keeps a TensorBoard export growing; --format {args.format} writes once")
    if args.experiment is not None and args.format != "mlflow":
        raise UsageError("--experiment names an MLflow experiment; give it with --format mlflow")
    records = _refs_or_sweep(store, args)
    if args.outputs:
        export_outputs(store, records, Path(args.outputs))
        if not args.output:
            return 0
    return print_view("export", args, ExportView(store, args, records))


def swept_keys(store: RunStore, sweep_id: str) -> list[str]:
    """The keys a sweep varies (env.LR, ...), as a flattened config names them; [] if unreadable."""
    try:
        axes = Sweep.load(store, sweep_id).axes
        return [str(axis[0]) for axis in axes if isinstance(axis, list) and axis and str(axis[0]) != "name"]
    except (RunPilotError, TypeError):  # a damaged sweep.json's axes (not a list): no swept columns
        return []


def export_outputs(store: RunStore, records: list[RunRecord], target: Path) -> None:
    """Copy each run's outputs folder to TARGET/<run id>/ (a run's copy that exists already is refused)."""
    count = size = 0
    for record in records:
        source, dest = store.folder(record.id).outputs, target / record.id
        if dest.exists():
            raise UsageError(f"{dest} exists already; choose another --outputs folder or move it away")
        files = tree_files(source)
        try:
            if source.is_dir():
                shutil.copytree(source, dest, symlinks=True)
        except (OSError, shutil.Error) as exc:
            raise RunPilotError(f"cannot copy the outputs of run {record.id} to {dest}: {exc}; check the "
                                "folder and its free space") from exc
        count, size = count + len(files), size + sum(files.values())
    echo(f"copied {count} output file(s), {fmt_size(size)}, of {len(records)} run(s) to {target}", err=True)


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="*", metavar="run")
    p.add_argument("--sweep", metavar="ID", type=_sweep_ref_arg, help="every run of this sweep")
    p.add_argument("--format", choices=format_choices("export"), default="csv",
                   help="csv (default), jsonl, tensorboard (event files in -o DIR) or mlflow (to the server -o URI)")
    p.add_argument("--config", action="store_true", help="add the config values that differ between the runs "
                                                         "(a --sweep has its swept keys as columns always)")
    p.add_argument("--tags", action="store_true", help="add each tag as a column tag.NAME")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of to stdout (tensorboard: a "
                   "folder; mlflow: the tracking server's URL, default $MLFLOW_TRACKING_URI)")
    p.add_argument("--outputs", metavar="DIR", help="copy each run's outputs folder to DIR/RUN_ID/ (then the "
                   "metrics are written only with -o)")
    p.add_argument("--follow", action="store_true", help="tensorboard: keep the event files growing until the runs end")
    p.add_argument("--experiment", metavar="NAME", help="mlflow: the experiment (default: each run's config name)")


# -- looking: plot, in the terminal or as an HTML page

def cmd_plot(args) -> int:
    style = _plot_style(args)
    store = _store()
    records = _plot_records(store, args)
    names = list(dict.fromkeys(args.metric)) or list(dict.fromkeys(m for r in records for m in r.metric_names)) or None
    if args.html is not None:
        return _plot_html(store, records, names, style, args)
    out = sys.stdout
    tty = out.isatty()

    def draw(current: list[RunRecord], status: str = "") -> str:
        charts = plot_charts(current, names, style, explicit=bool(args.metric))
        width, height = _plot_size(args, out, len(charts) if args.follow and tty else 0)
        return render_plot(charts, width, height, style) + (f"\n{clip(status, width)}" if status else "")

    if not args.follow:
        print(draw(records))
    elif tty:
        _follow_on_terminal(store, records, draw, out)
    else:  # a file or a pipe gets the final picture once, without cursor moves
        print(draw(_wait_for_runs(store, records)))
    return 0


def _plot_style(args) -> PlotStyle:
    """The drawing choices of the command line, checked."""
    if not 0 <= args.smooth < 1:
        raise UsageError(f"--smooth {args.smooth:g}: give a weight from 0 (no smoothing) to below 1, "
                         "e.g. --smooth 0.6")
    colour = sys.stdout.isatty() and not args.no_color and not os.environ.get("NO_COLOR") and args.html is None
    braille = not args.ascii and _can_encode("⣿│┤└─┬…")
    return PlotStyle(braille=braille, colour=bool(colour), log=args.log, smooth=args.smooth or None,
                     x_label="minutes" if args.x == "time" else "step")


def _plot_records(store: RunStore, args) -> list[RunRecord]:
    """The runs to plot, each once, in the order given."""
    if args.sweep and args.runs:
        raise UsageError("give runs or --sweep ID, not both")
    records = {r.id: r for r in _refs_or_sweep(store, args)}
    return list(records.values())


def plot_charts(records: list[RunRecord], names: list[str] | None, style: PlotStyle,
                explicit: bool = False) -> list[Chart]:
    """Each run's metrics.json read as a stream, laid out as one chart per metric.

    NAMES None means every numeric metric; EXPLICIT names (--metric) that no run has are an error.
    """
    per_run = [read_metric_series(RunFolder(Path(r.path)).metrics, names or _recorded_metrics(r), style.smooth,
                                  _sample_minutes(r) if style.x_label == "minutes" else None) for r in records]
    per_run = [with_gpu_series(r, names, series, style) for r, series in zip(records, per_run)]
    found = sorted({k for series in per_run for k in series})
    metrics = names if names is not None else found
    running = any(r.status in ACTIVE_STATUSES for r in records)
    if not metrics and running:
        return []  # --follow on a run that has not printed a sample yet
    if not metrics or explicit and not set(metrics) & set(found) and not running:
        raise (UsageError if explicit else RunPilotError)(_nothing_to_plot(records, metrics, found))
    charts = [Chart(m, [make_curve(i, r, m, s.get(m)) for i, (r, s) in enumerate(zip(records, per_run))])
              for m in metrics]
    if style.log:
        _check_log_axis(charts)
    return charts


def with_gpu_series(record: RunRecord, names: list[str] | None, series: dict, style: PlotStyle) -> dict:
    """A run's metric series plus the GPU statistics NAMES asks for by name (`--metric gpu0.util`),
    read from its gpu.json, whose step is the second of the run (--x time: its minute)."""
    wanted = [n for n in names or [] if GPU_STAT_KEY_RE.match(n) and n not in series]
    if not wanted:
        return series
    path, minutes = RunFolder(Path(record.path)).gpu_stats, None
    if style.x_label == "minutes":
        seconds = [s.get("step") if _is_number(s.get("step")) else 0 for s in read_metrics(path)]
        minutes = (lambda i: seconds[min(i, len(seconds) - 1)] / 60 if seconds else 0.0)
    return {**series, **read_metric_series(path, wanted, style.smooth, minutes)}


def _sample_minutes(record: RunRecord) -> Callable[[int], float]:
    """When each sample of a run arrived, for --x time (recorded since RunPilot 0.5)."""
    at = read_sample_times(RunFolder(Path(record.path)).sample_times)
    if at is None and record.status in ACTIVE_STATUSES:  # no sample has arrived yet
        return lambda count: 0.0
    if at is None:
        raise UsageError(f"--x time: run {record.id} has no metrics.times (runs recorded before RunPilot 0.5, "
                         "and runs whose metrics `reparse` rebuilt, keep steps only); plot it by step")
    return at


def _nothing_to_plot(records: list[RunRecord], asked: list[str], found: list[str]) -> str:
    ids = ", ".join(r.id for r in records)
    drawable = ", ".join(visible(k) for k in sorted(set(found) | {
        k for r in records for k, v in r.last_metrics.items() if _is_number(v)})) or "none"
    if asked:
        return (f"no numeric samples of {', '.join(visible(repr(a)) for a in asked)} in run(s) {ids}; "
                f"the metrics with numbers there: {drawable}")
    if {k for r in records for k in r.last_metrics}:
        return (f"no numeric samples that a chart can place in run(s) {ids} (text, NaN, infinities and values "
                "beyond ±1e300 are left out)")
    return f"no metrics in run(s) {ids}; a job records them by printing lines such as: METRIC step=1 loss=0.5"


def _recorded_metrics(record: RunRecord) -> list[str] | None:
    """The numeric metrics a finished run recorded (None: look for them in metrics.json)."""
    numeric = [k for k, v in record.last_metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if record.status in ACTIVE_STATUSES or len(numeric) < len(record.last_metrics):
        return None  # a metric whose last value was text may still have numbers before it
    return numeric


def _check_log_axis(charts: list[Chart]) -> None:
    for chart in charts:
        for curve in chart.curves:
            if curve.count and curve.low < 1 / PLOT_MAX_VALUE:
                raise UsageError(f"--log: {chart.metric!r} of run {curve.run_id} goes down to {curve.low:g}, "
                                 f"which a log axis cannot show; plot it without --log")


def _plot_size(args, out, charts_on_screen: int = 0) -> tuple[int, int]:
    """Columns and lines per chart: --width/--height, else the terminal's, else $COLUMNS/$LINES, else 80 x 24.

    CHARTS_ON_SCREEN > 0 (following on a terminal) shares the screen's lines between that many charts.
    """
    width, height = 0, 0
    if out.isatty():
        with contextlib.suppress(AttributeError, OSError, ValueError):
            width, height = os.get_terminal_size(out.fileno())
    if width <= 0 or height <= 0:
        width, height = (_env_int("COLUMNS") or 80), (_env_int("LINES") or 24)
    if charts_on_screen:  # the charts, a blank line between them and the status line, then the cursor's line
        height = max(PLOT_MIN_HEIGHT, (height - 1 - charts_on_screen) // charts_on_screen)
    width, height = args.width or min(width, PLOT_MAX_SIZE), args.height or min(height, PLOT_MAX_SIZE)
    if width < PLOT_MIN_WIDTH or height < PLOT_MIN_HEIGHT:
        raise UsageError(f"a chart of {width} x {height} is too small; give at least --width {PLOT_MIN_WIDTH} "
                         f"--height {PLOT_MIN_HEIGHT}")
    return width, height


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else 0


def _refresh(store: RunStore, record: RunRecord) -> RunRecord:
    return find_run(store, record.id)


def _wait_for_runs(store: RunStore, records: list[RunRecord]) -> list[RunRecord]:
    while any(r.status in ACTIVE_STATUSES for r in records):
        time.sleep(FOLLOW_SECONDS)
        records = [_refresh(store, r) for r in records]
    return records


def _follow_on_terminal(store: RunStore, records: list[RunRecord], draw: Callable, out) -> None:
    """Redraw in place (the cursor moves up over the last picture) until no run is running."""
    shown = 0
    while True:
        started = time.monotonic()
        records = [_refresh(store, r) for r in records]
        running = sum(r.status in ACTIVE_STATUSES for r in records)
        status = f"following {running} running run(s); Ctrl-C stops watching (the runs go on)" if running else ""
        lines = draw(records, status).split("\n")
        out.write((f"\x1b[{shown}F" if shown else "") + "".join(f"{line}\x1b[K\n" for line in lines) + "\x1b[J")
        out.flush()
        shown = len(lines)
        if not running:
            return
        time.sleep(max(FOLLOW_SECONDS, 3 * (time.monotonic() - started)))


def _plot_html(store: RunStore, records: list[RunRecord], names: list[str] | None, style: PlotStyle,
               args) -> int:
    """Write the page (again and again with --follow, reloading itself, until the runs end)."""
    path = html_target(args.html)
    while True:
        started = time.monotonic()
        records = [_refresh(store, r) for r in records] if args.follow else records
        running = args.follow and any(r.status in ACTIVE_STATUSES for r in records)
        charts = plot_charts(records, names, style, explicit=bool(args.metric))
        runs = [(r, _flat_config(r)) for r in records]
        page = html_page(charts, runs, style, utc_now(), refresh=5 if running else None)
        try:
            write_atomic(path, page.encode("utf-8"), durable=False)
        except OSError as exc:
            raise RunPilotError(f"cannot write {path}: {exc.strerror}; choose another --html path") from exc
        if not running:
            break
        time.sleep(max(5 * FOLLOW_SECONDS, 3 * (time.monotonic() - started)))
    note(f"wrote {path} ({len(charts)} chart(s) of {len(records)} run(s), {len(page.encode()) / 1024:.0f} KiB)")
    return 0


def html_target(text: str) -> Path:
    """--html's file: a symlink's target; never a device, a pipe or a folder, which replacing the
    path with the page would destroy (`--html /dev/null`)."""
    if not text.strip():
        raise UsageError("--html needs a file path, e.g. --html curves.html")
    path = Path(text)
    if path.exists() and not path.is_file():
        raise UsageError(f"--html {text} is not a regular file; give the path of a file to write")
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _flat_config(record: RunRecord) -> dict:
    """A run's config.yaml flattened (env.LR, ...), empty where it cannot be read."""
    try:
        data = parse_yaml(RunFolder(Path(record.path)).config.read_text(encoding="utf-8"))
    except (OSError, ConfigError):
        return {}
    return flatten(data) if isinstance(data, dict) else {}


def _plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="*", metavar="run", help="run ids, unique prefixes, short ids, latest or -N")
    p.add_argument("--sweep", metavar="ID", type=_sweep_ref_arg, help="every run of this sweep")
    p.add_argument("--metric", action="append", default=[], metavar="NAME",
                   help="a metric to plot (repeatable; default: the configs' metrics, else every numeric one)")
    p.add_argument("--x", choices=("step", "time"), default="step",
                   help="x axis: step (default), or time: minutes since the run started")
    p.add_argument("--smooth", type=float, default=0.0, metavar="N",
                   help="exponential moving average weight, 0 <= N < 1, as TensorBoard's slider "
                        "(the raw curve stays, faint)")
    p.add_argument("--log", action="store_true", help="logarithmic y axis (every value must be above 0)")
    p.add_argument("-f", "--follow", action="store_true",
                   help="redraw while a run is running; stop when they have ended")
    p.add_argument("--width", type=_plot_dimension, metavar="COLUMNS",
                   help="chart width (default: the terminal's, else $COLUMNS, else 80)")
    p.add_argument("--height", type=_plot_dimension, metavar="LINES",
                   help="lines per chart (default: the terminal's, else $LINES, else 24)")
    p.add_argument("--no-color", action="store_true", help="no colours (also: NO_COLOR=1); runs get markers")
    p.add_argument("--ascii", action="store_true", help="draw with ASCII characters instead of braille dots")
    p.add_argument("--html", metavar="FILE",
                   help="write one self-contained HTML page (SVG charts, a table of the runs) instead")


# -- managing: stop, rm, gc, reparse, reindex, pull, init

def cmd_stop(args) -> int:
    store = _store()
    if args.sweep or (args.run or "").startswith("sw-"):
        if args.sweep and args.run:
            raise UsageError("give a run or --sweep ID, not both")
        echo(stop_sweep(store, find_sweep(store, args.sweep or args.run), args.wait, note))
        return 0
    if not args.run:
        raise UsageError("name the run to stop (id, prefix, latest, -N), or a sweep with --sweep ID")
    record = find_run(store, args.run)
    meta = store.folder(record.id).read_meta()
    elsewhere = bool(record.runner.backend)  # its backend asks where it runs for what the job left
    if record.status not in ACTIVE_STATUSES and not (record.status == LOST and (elsewhere or leftover_job(record, meta))):
        echo(f"run {record.id} is not running ({record.status})")
        return 0
    record = stop_run(store, record, args.wait, note)
    echo(f"run {record.id} {record.status}")
    return 0


def _stop_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", help="run id, unique prefix, short id, latest, -N, or a sweep id (sw-...)")
    p.add_argument("--sweep", metavar="ID", type=_sweep_ref_arg, help="stop this sweep (sw-a1b2c3, latest, -N, ...)")
    p.add_argument("--wait", type=_stop_timeout, default=60, metavar="SECONDS", help="how long to wait (default 60)")


def _confirm(question: str, yes: bool) -> bool:
    if yes:
        return True
    if not sys.stdin or not sys.stdin.isatty():
        raise UsageError(f"{question} needs a confirmation; pass -y to confirm without a terminal")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def delete_runs(store: RunStore, records: list[RunRecord], yes: bool, skip_busy: bool = False,
                collect: bool = False) -> int:
    """Delete runs after a confirmation; a run that is active or whose job lives on is never deleted.
    Say what it freed; with COLLECT (gc) also the code snapshots no run names any more."""
    refused = deletable(store, records, note)
    if refused and not skip_busy:
        raise UsageError(refused[0] + (f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""))
    busy = {line.split()[1] for line in refused}
    for line in refused:
        note(f"skipped: {line}")
    records = [r for r in records if r.id not in busy]
    if not records:
        echo("nothing to delete")
        snapshots = collect_snapshots(store) if collect and yes else 0
        if snapshots:
            echo(f"freed {fmt_size(snapshots)} of code snapshots no run uses")
        return 0
    if not _confirm(f"delete {len(records)} run(s) and their files?", yes):
        echo("nothing deleted")
        return 1
    freed = 0
    for record in records:
        size = tree_size(store.folder(record.id).path)
        store.delete(record.id)
        freed += size - tree_size(store.folder(record.id).path)
        echo(f"deleted {record.id} ({visible(record.name)})")
    snapshots = collect_snapshots(store) if collect else 0
    echo(f"freed {fmt_size(freed + snapshots)}" + (f" ({fmt_size(snapshots)} of it code snapshots no run uses)"
                                                  if snapshots else ""))
    return 0


def cmd_rm(args) -> int:
    store = _store()
    records = list({r.id: r for r in (store.find(ref) for ref in args.runs)}.values())
    return delete_runs(store, records, args.yes)


def _rm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="run")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")


def collect_snapshots(store: RunStore) -> int:
    """Remove the code snapshots that no run (nor a sweep's plan) names any more; the bytes freed."""
    keep = set()
    for folder in store.folders():
        snapshot = folder.read_meta().code.get("snapshot")
        if isinstance(snapshot, str):
            keep.add(snapshot)
    for sweep in store.sweep_folders():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            keep |= set((read_json_file(sweep.plan).get("options") or {}).get("code_snapshots", {}).values())
    return SnapshotStore(store.home).collect(keep)


def cmd_gc(args) -> int:
    if args.keep is None and args.older_than is None:
        raise UsageError("gc needs --keep N and/or --older-than AGE")
    store = _store()
    before = since_cutoff(args.older_than, "--older-than") if args.older_than else None
    records = store.query(RunFilter(before=before, keep_newest=args.keep, final_only=True, ascending=True))
    records = whole_sweeps_only(store, records, note)
    matching = RunFilter(before=before, keep_newest=args.keep, ascending=True)
    if args.dry_run:
        width = output_width()
        for record in records:
            line = visible(f"would delete {record.id} {record.status:<11} {record.name}")
            echo(clip(line, width) if width else line)
        echo(f"{len(records)} run(s) would be deleted")
        note_active_kept(store, matching, records)
        return 0
    code = delete_runs(store, records, args.yes, skip_busy=True, collect=True)
    note_active_kept(store, matching, records)
    return code


def whole_sweeps_only(store: RunStore, records: list[RunRecord], say: Callable[[str], None]) -> list[RunRecord]:
    """RECORDS without the runs of a sweep that RECORDS holds only in part: gc deletes a sweep whole
    or not at all (half a sweep compares and plots as a different experiment), and says which it kept."""
    chosen: dict[str, int] = {}
    for record in records:
        if record.sweep_id:
            chosen[record.sweep_id] = chosen.get(record.sweep_id, 0) + 1
    partial = set()
    for sweep_id, count in chosen.items():
        total = len(store.query(RunFilter(sweep_id=sweep_id)))
        if count < total:
            partial.add(sweep_id)
            say(f"kept sweep {sweep_id} whole: {total - count} of its {total} runs are not to be deleted, "
                f"so its other {count} stay too")
    return [r for r in records if r.sweep_id not in partial]


def note_active_kept(store: RunStore, matching: RunFilter, chosen: list[RunRecord]) -> None:
    """Name the runs gc's age and count would have taken but leaves, because they are still active."""
    picked = {r.id for r in chosen}
    for record in store.query(matching):
        if record.id not in picked and record.status in ACTIVE_STATUSES:
            note(f"skipped: run {record.id} ({visible(record.name)}) is {record.status}; gc never deletes an "
                 f"active run (runpilot stop {record.id} first)")


def _gc_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep", type=int, metavar="N", help="keep the N newest runs")
    p.add_argument("--older-than", metavar="AGE", help="delete runs started longer ago than this: 30d, 12h")
    p.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")


def cmd_reparse(args) -> int:
    store = _store()
    sources = tuple(parse_metrics_source(spec) for spec in args.metrics_from) or None
    records = [find_run(store, ref) for ref in args.runs]
    for record in records:
        if record.status in ACTIVE_STATUSES:
            raise UsageError(f"run {record.id} is {record.status}; reparse it once it has ended")
    for record in records:
        count, old, notices = reparse_run(store, record.id, sources)
        echo(f"run {record.id}: {count} sample(s) from its log (before: {old})")
        for notice in notices:
            note(notice)
    return 0


def _reparse_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="run", help="run ids, unique prefixes, short ids, latest or -N")
    p.add_argument("--metrics-from", action="append", default=[], metavar="SOURCE",
                   help="use these sources instead of the run's metrics_from: huggingface, keras, tqdm, "
                        "pattern:REGEX, tensorboard:FOLDER (repeatable)")


def cmd_reindex(args) -> int:
    count = _store().reindex()
    echo(f"indexed {count} run(s)")
    return 0


# name, function, help, example, arguments: the commands in the order --help lists them.
def cmd_pull(args) -> int:
    store = _store()
    meta = pull_run(store, find_run(store, args.run))
    echo(f"run {meta.run_id} {meta.status}: its files are in {store.folder(meta.run_id).path}")
    return 0


def _pull_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run id, unique prefix, short id, latest or -N")


SAMPLE_CONFIG = """\
# RunPilot run config: `runpilot run config.yaml` (see `runpilot run --help`).
name: sample-training            # shown by `runpilot list`; any text
image: "{image}"{image_note}
entrypoint: "{python} train.py"{pad}# a string runs through the image's /bin/sh; a list runs as is
# engine: docker                 # docker, podman or local (no container); default: docker if present

env:                             # passed to the job; ${{VAR}} takes VAR from your environment
  EPOCHS: 5
  LR: 0.01

mounts:                          # host folders, relative to this file
  code: "."                      # `code` is mounted at the workdir (/workspace) and the job starts there
  # data: "./data"               # any other name appears at /mnt/<name> (and in $RUNPILOT_MOUNT_<NAME>)
  # extra: "./cache:/cache:ro"   # or give the container path yourself

resources:
  gpus: 0                        # a count, all, or device ids such as [0, 2]
  # cpu: 4
  # memory: 8g
  # shm_size: 2g                 # PyTorch DataLoader workers need more than the default 64 MB

metrics:                         # the job prints lines such as: METRIC loss=0.25 accuracy=0.91
  - loss
  - accuracy
"""


SAMPLE_TRAIN = '''\
"""A tiny stand-in for a training script: prints METRIC lines that RunPilot records."""
import math
import os

epochs = int(os.environ.get("EPOCHS", "5"))
lr = float(os.environ.get("LR", "0.01"))
for epoch in range(1, epochs + 1):
    loss = math.exp(-lr * 40 * epoch)
    print(f"epoch {epoch}/{epochs}: training...")
    print(f"METRIC step={epoch} loss={loss:.4f} accuracy={1 - loss / 2:.4f}")
print("done")
'''


# The image `init` writes when no Python image is present locally: it must be pulled once.
SAMPLE_IMAGE = "python:3.12-slim"


def init_image() -> tuple[str, str, str]:
    """The image `init` writes, a note why, and the interpreter the sample names: a Python image
    present here and the one it runs (python, else python3), else the sample image and `python`
    (the official python images have it)."""
    for engine in [name for name, cls in ENGINES.items() if cls.autodetect]:
        found = [i for i in local_images(engine) if re.search(r"(python|pytorch)[^/]*:[^/]*$", i)]
        for image in found[:INIT_PROBES]:
            python = image_python(engine, image)
            if python is not None:
                return image, f"found locally ({engine})", python
    return SAMPLE_IMAGE, f"not present here: pull it first (docker pull {SAMPLE_IMAGE}), or run the job " \
                         "without a container: runpilot run config.yaml --engine local", "python"


def cmd_init(args) -> int:
    image, why, python = init_image()  # one throwaway container per candidate, not a second for the chosen
    note_line = f"  # {why}" if len(why) < 60 else f"\n# {why}"
    pad = " " * max(1, 10 - len(python))
    files = {Path("config.yaml"): SAMPLE_CONFIG.format(image=image, image_note=note_line, python=python, pad=pad),
             Path("train.py"): SAMPLE_TRAIN}
    existing = [str(p) for p in files if p.exists()]
    if existing and not args.force:
        raise UsageError(f"{', '.join(existing)} already exist(s) here; use --force to overwrite")
    for path, text in files.items():
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise RunPilotError(f"cannot write {path}: {exc.strerror}; move it away or run init elsewhere") from exc
        echo(f"wrote {path}")
    echo(visible(f"image: {image} ({why})"))
    echo("next: runpilot run config.yaml")
    return 0


def _init_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="overwrite existing files")


# -- the parser: the table of commands, argparse

COMMANDS = [
    ("run", cmd_run, "run a job from a config file and record it",
     "runpilot run config.yaml --set env.LR=0.01 --tag try=3", _run_arguments),
    ("sweep", cmd_sweep, "run a grid of configs, one run per point, placed on free GPUs",
     "runpilot sweep config.yaml --grid env.LR=0.1,0.01 --repeat 3", _sweep_arguments),
    ("rerun", cmd_rerun, "run a recorded run again: its config, code snapshot and image",
     "runpilot rerun latest --set env.LR=0.02", _rerun_arguments),
    ("list", cmd_list, "list runs, newest first",
     "runpilot list --status failed --since 2d --sort val_accuracy", _list_arguments),
    ("sweeps", cmd_sweeps, "list sweeps, newest first: points done, statuses, best value",
     "runpilot sweeps && runpilot list --sweep latest", _sweeps_arguments),
    ("show", cmd_show, "show one run: status, files, metrics, config",
     "runpilot show latest", _show_arguments),
    ("logs", cmd_logs, "print the saved log of a run",
     "runpilot logs latest --tail 20", _logs_arguments),
    ("stop", cmd_stop, "stop a running run or sweep (from another terminal)",
     "runpilot stop a3f9c1", _stop_arguments),
    ("validate", cmd_validate, "check a config without running it",
     "runpilot validate config.yaml", _validate_arguments),
    ("compare", cmd_compare, "compare runs side by side",
     "runpilot compare -1 -2", _compare_arguments),
    ("plot", cmd_plot, "draw learning curves in the terminal, or as an HTML page",
     "runpilot plot -1 -2 --metric val_loss --smooth 0.6", _plot_arguments),
    ("export", cmd_export, "metrics as CSV or JSON lines, TensorBoard files, or to MLflow",
     "runpilot export latest -2 --format csv -o metrics.csv", _export_arguments),
    ("reparse", cmd_reparse, "rebuild finished runs' metrics from their logs",
     "runpilot reparse latest --metrics-from huggingface", _reparse_arguments),
    ("diff", cmd_diff, "show how two runs' code and config differ",
     "runpilot diff -2 -1", _diff_arguments),
    ("rm", cmd_rm, "delete runs (folder and history row)",
     "runpilot rm a3f9c1 -y", _rm_arguments),
    ("gc", cmd_gc, "delete old runs in bulk",
     "runpilot gc --keep 100 --dry-run", _gc_arguments),
    ("init", cmd_init, "write a sample config.yaml and train.py here",
     "runpilot init", _init_arguments),
    ("reindex", cmd_reindex, "rebuild runs.db from the run folders",
     "runpilot reindex", None),
]
COMMANDS.append(("pull", cmd_pull, "copy every file of a run on an SSH box home (its outputs too)",
                 "runpilot pull a3f9c1", _pull_arguments))


# Commands RunPilot gives itself, not listed in --help: the job of a Slurm run on its node; what a
# box tells the machine that started its runs (--on ssh).
HIDDEN_COMMANDS = [("_slurm-job", cmd_slurm_job, "", "", _slurm_job_arguments),
                   ("_box-report", cmd_box_report, "", "", _box_report_arguments)]


class ArgumentParser(argparse.ArgumentParser):
    """argparse, whose mistakes are one line like every other: `list: argument --limit: invalid int
    value: 'abc'; see runpilot list --help` (argparse prints its usage and exits)."""

    def error(self, message: str):
        command = self.prog.removeprefix("runpilot").strip()
        raise UsageError(f"{command + ': ' if command else ''}{message}; see {self.prog} --help")


def parse_command_line(argv: list[str]) -> argparse.Namespace:
    args, extra = build_parser(argv).parse_known_args(argv)
    if extra:  # argparse would blame the top level for an option that the command does not know
        raise UsageError(f"{args.command}: unknown argument(s) {' '.join(extra)}; see runpilot {args.command} --help")
    return args


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line, or only the command ARGV names (what `run` needs)."""
    parser = ArgumentParser(
        prog="runpilot", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run training jobs in containers; keep their logs, metrics and history.",
        epilog="example:\n  runpilot run config.yaml && runpilot list")
    parser.add_argument("--version", action="version", version=f"runpilot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    names = {spec[0] for spec in COMMANDS + HIDDEN_COMMANDS}
    named = argv[0] if argv and argv[0] in names else None
    for name, func, help_text, example, add_arguments in COMMANDS + HIDDEN_COMMANDS:
        if name == named or (named is None and not name.startswith("_")):
            p = sub.add_parser(name, help=help_text or argparse.SUPPRESS, description=help_text,
                               epilog=f"example:\n  {example}" if example else None,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
            p.set_defaults(func=func)
            if add_arguments:
                add_arguments(p)
    return parser

# ==== 22. Entry point ========================================================

def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (RunPilot errors become one clear line)."""
    _usable_output()
    try:
        if signal.getsignal(signal.SIGINT) == signal.SIG_DFL and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)  # see the top of the file
        argv = list(sys.argv[1:] if argv is None else argv)
        args = parse_command_line(argv)
        args.argv = argv
        code = args.func(args)
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    except RunPilotError as exc:
        _report(exc)
        code = exc.exit_code
    except KeyboardInterrupt:
        echo("runpilot: interrupted", err=True)
        code = 130
    except BrokenPipeError:  # a reader that went away before a command could tell: not a failure of it
        _silence(sys.stdout)
        code = 0
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        _silence(sys.stdout)
    return code


def _usable_output() -> None:
    """Output that a terminal's encoding or a closed descriptor cannot turn into a traceback: what
    cannot be encoded is escaped (`caf\\xe9`), and a closed stdout or stderr goes to /dev/null."""
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))
        with contextlib.suppress(AttributeError, ValueError, OSError):
            getattr(sys, name).reconfigure(errors="backslashreplace")


def _report(exc: RunPilotError) -> None:
    for problem in [exc] + list(getattr(exc, "others", [])):
        echo("\n".join(visible(line) for line in f"runpilot: error: {problem}".split("\n")), err=True)


if __name__ == "__main__":
    sys.exit(main())
