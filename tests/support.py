"""Helpers for the integration tests that start real containers with Docker and Podman.

The engines and the two local test images are prepared by `.ci/run` (or `.ci/run --setup-only` on a developer's
machine) and `tests/images/build.sh docker podman`. A test calls `require_engine(self, "docker")` first: it
skips when that engine is unusable here, or fails when the environment variable RUNPILOT_TEST_ENGINES (a
comma-separated list, set by CI to "docker,podman") says the engine must work.

The PyTorch image is optional (about 1 GB, `tests/images/build.sh --pytorch docker podman`):
`require_pytorch_image(self, "docker")` skips without it, saying why, unless RUNPILOT_TEST_PYTORCH=1.

Nothing runs at import time; engine probes run on first use and are cached for the process.
"""

import functools
import os
import re
import shutil
import subprocess
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
