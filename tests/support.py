"""Helpers for the integration tests that start real containers with Docker and Podman, or real Slurm jobs.

The engines and the two local test images are prepared by `.ci/run` (or `.ci/run --setup-only` on a developer's
machine) and `tests/images/build.sh docker podman`. A test calls `require_engine(self, "docker")` first: it
skips when that engine is unusable here, or fails when the environment variable RUNPILOT_TEST_ENGINES (a
comma-separated list, set by CI to "docker,podman") says the engine must work.

Slurm tests call `require_slurm(self)` first: it skips when no one-node cluster answers here (start one with
`tests/slurm/setup.sh`, as root; `.ci/run` does), or fails when RUNPILOT_TEST_SLURM=1 (set by CI).

The PyTorch image is optional (about 1 GB, `tests/images/build.sh --pytorch docker podman`):
`require_pytorch_image(self, "docker")` skips without it, saying why, unless RUNPILOT_TEST_PYTORCH=1.

Nothing runs at import time; engine and Slurm probes run on first use and are cached for the process.
"""

import functools
import os
import re
import shutil
import subprocess
import sys
import time
import unittest

BUSYBOX_IMAGE = "runpilot-test-busybox:latest"
PYTHON_IMAGE = "runpilot-test-python:latest"
ENGINES = ("docker", "podman")
TEST_IMAGES = (BUSYBOX_IMAGE, PYTHON_IMAGE)

# Environment variable listing the engines that must work (failing, not skipping, their tests).
REQUIRED_ENGINES_VAR = "RUNPILOT_TEST_ENGINES"
# `docker info` answers in well under a second; a cold `podman info` takes about one. 30 s means "hung".
PROBE_TIMEOUT_S = 30
# Listing or removing containers is quick; 60 s means the engine is stuck.
COMMAND_TIMEOUT_S = 60
# Podman logs through logrus: time="..." level=error msg="the useful part".
_LOGRUS_LINE = re.compile(r'level=(?P<level>\w+) msg="(?P<msg>(?:[^"\\]|\\.)*)"')


def _plain_line(line: str) -> str:
    """Return a stderr line without logrus decoration; warnings are marked with a leading "WARNING"."""
    match = _LOGRUS_LINE.search(line)
    if match is None:
        return line.strip()
    msg = match["msg"].replace('\\"', '"')
    return f"WARNING: {msg}" if match["level"].startswith("warn") else msg


def _first_line(text: str) -> str:
    """Return the first non-empty line of an engine's stderr, preferring one that is not a warning."""
    lines = [_plain_line(line) for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith("WARNING")]
    return (errors or lines or [""])[0]


def _probe(argv: list[str]) -> str | None:
    """Run a quick engine command; return None on success, else the first line of why it failed."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"no answer within {PROBE_TIMEOUT_S} s"
    except OSError as e:
        return str(e)
    if done.returncode == 0:
        return None
    return _first_line(done.stderr) or f"exit status {done.returncode}"


@functools.cache
def engine_problem(name: str) -> str | None:
    """Return None when engine NAME runs and has both test images locally, else a one-line reason."""
    if name not in ENGINES:
        return f"unknown engine {name!r} (known: {', '.join(ENGINES)})"
    if shutil.which(name) is None:
        return f"{name} not installed"
    problem = _probe([name, "info"])
    if problem is not None:
        what = "daemon not answering" if name == "docker" else "not working"
        return f"{name} {what}: {problem}"
    for image in TEST_IMAGES:
        if _probe([name, "image", "inspect", image]) is not None:
            return f"image {image} missing: run tests/images/build.sh {name}"
    return None


def required_engines() -> list[str]:
    """Return the engines named in RUNPILOT_TEST_ENGINES, which must work rather than skip."""
    value = os.environ.get(REQUIRED_ENGINES_VAR, "")
    return [part.strip() for part in value.split(",") if part.strip()]


def require_engine(test: unittest.TestCase, name: str) -> None:
    """Skip TEST when engine NAME is unusable here, or fail it when RUNPILOT_TEST_ENGINES requires NAME."""
    problem = engine_problem(name)
    if problem is None:
        return
    if name in required_engines():
        test.fail(f"{problem} (required by {REQUIRED_ENGINES_VAR}={os.environ[REQUIRED_ENGINES_VAR]})")
    test.skipTest(problem)


# -- the optional PyTorch image (tests/test_pytorch.py) ---------------------------------------------

PYTORCH_IMAGE = "runpilot-test-pytorch:latest"
# Set to 1 to make a missing PyTorch image fail its tests rather than skip (CI sets it once build.sh built it).
REQUIRED_PYTORCH_VAR = "RUNPILOT_TEST_PYTORCH"
# build.sh --pytorch writes why it could not install torch here, in its cache folder.
PYTORCH_UNAVAILABLE = "pytorch-unavailable.txt"
IMAGE_CACHE_VAR = "RUNPILOT_IMAGE_CACHE"
DEFAULT_IMAGE_CACHE = "/var/cache/runpilot-test-images"


def _last_pytorch_build_problem() -> str | None:
    """Why the last `build.sh --pytorch` on this machine could not install torch, or None."""
    path = os.path.join(os.environ.get(IMAGE_CACHE_VAR) or DEFAULT_IMAGE_CACHE, PYTORCH_UNAVAILABLE)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


@functools.cache
def pytorch_image_problem(engine: str) -> str | None:
    """Return None when ENGINE has the PyTorch test image, else a one-line reason and how to build it."""
    if _probe([engine, "image", "inspect", PYTORCH_IMAGE]) is None:
        return None
    problem = f"image {PYTORCH_IMAGE} missing: run tests/images/build.sh --pytorch {engine}"
    last = _last_pytorch_build_problem()
    return f"{problem} (its last build said: {last})" if last else problem


def require_pytorch_image(test: unittest.TestCase, engine: str) -> None:
    """require_engine, then skip TEST when ENGINE lacks the PyTorch image, or fail when RUNPILOT_TEST_PYTORCH=1."""
    require_engine(test, engine)
    problem = pytorch_image_problem(engine)
    if problem is None:
        return
    if os.environ.get(REQUIRED_PYTORCH_VAR) == "1":
        test.fail(f"{problem} (required by {REQUIRED_PYTORCH_VAR}=1)")
    test.skipTest(problem)


def _engine_output(argv: list[str]) -> str:
    """Run an engine command and return its stdout; raise AssertionError with its stderr when it fails."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{' '.join(argv)}: no answer within {COMMAND_TIMEOUT_S} s") from e
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {done.returncode}: {_first_line(done.stderr)}")
    return done.stdout


def containers_with_label(engine: str, label: str) -> list[str]:
    """Return the ids of all containers of ENGINE, running or not, that carry LABEL ("key" or "key=value")."""
    out = _engine_output([engine, "ps", "-a", "--no-trunc", "--filter", f"label={label}", "-q"])
    return out.split()


def remove_containers_with_label(engine: str, label: str) -> list[str]:
    """Force-remove every container of ENGINE that carries LABEL (test cleanup); return the removed ids."""
    ids = containers_with_label(engine, label)
    if ids:
        _engine_output([engine, "rm", "-f", *ids])
    return ids


# ---- Slurm ----

# Environment variable that, set to "1", makes the Slurm tests fail instead of skipping (CI sets it).
REQUIRED_SLURM_VAR = "RUNPILOT_TEST_SLURM"
SLURM_COMMANDS = ("sinfo", "sbatch", "squeue", "scontrol", "scancel")
# Node states in which a partition runs jobs: "allocated" is a busy node, not a broken one. A trailing "*"
# (not responding), "drained" or "down" means a job would never start.
SLURM_READY_STATES = ("idle", "mixed", "allocated", "completing")
# Keys start a `scontrol show job -o` field: "JobState=FAILED", "AllocNode:Sid=vm:5651", "Socks/Node=*".
_SCONTROL_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9:/_]*)=")


@functools.cache
def slurm_problem() -> str | None:
    """Return None when the Slurm commands exist and a partition has a node that runs jobs, else why not."""
    missing = [name for name in SLURM_COMMANDS if shutil.which(name) is None]
    if missing:
        return f"Slurm not installed ({', '.join(missing)} missing): run tests/slurm/setup.sh as root"
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%R|%T"], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"sinfo: no answer within {PROBE_TIMEOUT_S} s"
    if done.returncode != 0:
        return f"sinfo failed: {_first_line(done.stderr)} (run tests/slurm/setup.sh as root)"
    partitions = [line.split("|", 1) for line in done.stdout.splitlines() if "|" in line]
    if any(state in SLURM_READY_STATES for _, state in partitions):
        return None
    seen = ", ".join(f"{name} {state}" for name, state in partitions) or "no partitions"
    return f"no Slurm partition has a node that runs jobs (sinfo: {seen}): run tests/slurm/setup.sh as root"


def require_slurm(test: unittest.TestCase) -> None:
    """Skip TEST when no Slurm cluster runs jobs here, or fail it when RUNPILOT_TEST_SLURM=1 requires one."""
    problem = slurm_problem()
    if problem is None:
        return
    if os.environ.get(REQUIRED_SLURM_VAR) == "1":
        test.fail(f"{problem} (required by {REQUIRED_SLURM_VAR}=1)")
    test.skipTest(problem)


def scontrol_job(job_id: str) -> dict[str, str]:
    """Return the fields of `scontrol show job -o JOB_ID` (one job; for an array, its first line)."""
    line = _engine_output(["scontrol", "show", "job", "-o", job_id]).splitlines()[0]
    keys = list(_SCONTROL_KEY.finditer(line))
    return {key[1]: line[key.end():nxt.start() if nxt else len(line)].strip()
            for key, nxt in zip(keys, keys[1:] + [None])}


def wait_until_left_queue(job_id: str, timeout_s: float) -> None:
    """Wait until JOB_ID no longer shows in squeue (finished, including COMPLETING); raise AssertionError after
    TIMEOUT_S seconds."""
    deadline = time.monotonic() + timeout_s
    # A list, even of one id twice, gets exit 0 and no rows once slurmctld forgot the job; one id gets exit 1.
    while _engine_output(["squeue", "-h", "-o", "%i", "-j", f"{job_id},{job_id}"]).strip():
        if time.monotonic() > deadline:
            raise AssertionError(f"Slurm job {job_id} still in squeue after {timeout_s} s")
        time.sleep(0.2)


def cancel_slurm_jobs(*job_ids: str) -> None:
    """Cancel Slurm jobs (test cleanup); unknown or finished ids are fine."""
    if job_ids:
        _engine_output(["scancel", *job_ids])


def python_for_nobody() -> str | None:
    """A Python 3.10+ that the user nobody can run (this one, or the system's), or None."""
    def runs_as_nobody(python: str) -> bool:
        try:
            return subprocess.run([python, "-c", "import sys; assert sys.version_info >= (3, 10)"],
                                  user="nobody", capture_output=True).returncode == 0
        except OSError:  # an interpreter under /root, say
            return False

    return next((p for p in (sys.executable, "/usr/bin/python3") if runs_as_nobody(p)), None)
