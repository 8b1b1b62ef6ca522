"""Shared helpers for RunPilot's tests: a private home per test and ways to call the CLI."""

import contextlib
import dataclasses
import datetime as dt
import io
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest
from pathlib import Path
from unittest import mock

import runpilot

ROOT = Path(__file__).resolve().parents[1]
RUNPILOT = ROOT / "runpilot.py"
EXAMPLES = ROOT / "examples"
UTC = dt.timezone.utc
# When synthetic runs start unless a test says otherwise.
BASE = dt.datetime(2026, 11, 20, 10, 0, 0, tzinfo=UTC)
# Env values a config may hold that must never show in argv, logs or meta.json.
SECRETS = {"API_TOKEN": "sk-live-9f8e7d6c5b4a", "DB_PASSWORD": "hunter2-correct-horse", "LR": "0.0123456"}
# Variables of the caller's shell that change what RunPilot prints or how long it waits for the index:
# each test starts without them.
CALLER_ENV = ("COLUMNS", "LINES", "NO_COLOR", "RUNPILOT_DB_TIMEOUT")


# A job that says when it is ready, writes its pid, and exits cleanly on SIGTERM or SIGINT (Ctrl-C).
POLITE = """\
import os, signal, sys, time
open("job.pid", "w").write(str(os.getpid()))
def bye(signum, frame):
    print(f"got signal {signum}, saving checkpoint", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
signal.signal(signal.SIGINT, bye)
print("METRIC loss=1.5", flush=True)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""

# A job that ignores SIGTERM and SIGINT: only SIGKILL ends it.
STUBBORN = """\
import os, signal, time
open("job.pid", "w").write(str(os.getpid()))
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


def pid_alive(pid: int) -> bool:
    """Whether a process lives (a zombie is dead for our purpose)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Tty(io.StringIO):
    """A captured stdout that says it is a UTF-8 terminal (with no file descriptor: its size comes from $COLUMNS)."""

    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


class HomeTestCase(unittest.TestCase):
    """Each test gets its own RUNPILOT_HOME (not created: RunPilot creates it) and a scratch folder for configs.

    self.tmp is the test's private folder (symlinks resolved), self.home the RUNPILOT_HOME in it and
    self.work a folder for configs and scripts. The environment is restored after the test.
    """

    def setUp(self) -> None:
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.tmp = Path(tmp.name).resolve()
        self.home = self.tmp / "home"
        self.work = self.tmp / "work"
        self.work.mkdir()
        patcher = mock.patch.dict(os.environ, {"RUNPILOT_HOME": str(self.home)})
        patcher.start()
        self.addCleanup(patcher.stop)
        for name in CALLER_ENV:
            os.environ.pop(name, None)

    # -- files -----------------------------------------------------------------
    def write(self, name: str, text: str) -> Path:
        path = self.work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    def local_config(self, script: str, name: str = "job", extra: str = "", **env) -> Path:
        """A config for engine local that runs a Python script written next to it."""
        self.write(f"{name}.py", script)
        env_lines = "".join(f"\n  {k}: {json.dumps(v)}" for k, v in env.items())
        text = (f"name: {name}\nengine: local\nentrypoint: [{json.dumps(sys.executable)}, \"{name}.py\"]\n"
                + (f"env:{env_lines}\n" if env else "") + textwrap.dedent(extra))
        return self.write(f"{name}.yaml", text)

    # -- running the CLI -------------------------------------------------------
    def start_until_ready(self, *args: str, seconds: float = 120) -> subprocess.Popen:
        """`runpilot ARGS` started attached, once its job has printed a line with `ready` (killed at cleanup)."""
        proc = subprocess.Popen([sys.executable, str(RUNPILOT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        deadline = time.monotonic() + seconds
        while b"ready" not in proc.stdout.readline():
            self.assertLess(time.monotonic(), deadline)
        return proc

    def cli(self, *args: str, env: dict | None = None) -> tuple[int, str, str]:
        """runpilot.main in this process, with ENV added to the environment; job output goes to the captured
        streams too (main() returns once the run's output is written)."""
        out, err = io.StringIO(), io.StringIO()
        with mock.patch.dict(os.environ, env or {}), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            code = runpilot.main([str(a) for a in args])
        return code, out.getvalue(), err.getvalue()

    def process(self, *args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
        """`python runpilot.py ...` as a separate process, the way a copied file is used."""
        full_env = dict(os.environ, **(env or {}))
        return subprocess.run([sys.executable, str(RUNPILOT), *map(str, args)], capture_output=True,
                              env=full_env, timeout=kwargs.pop("timeout", 120), **kwargs)

    # -- reading what a run left ---------------------------------------------
    def runs(self) -> list[Path]:
        folder = self.home / "runs"
        return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.exists() else []

    def only_run(self) -> Path:
        runs = self.runs()
        self.assertEqual(len(runs), 1, f"expected one run folder, found {runs}")
        return runs[0]

    def meta(self, run: Path) -> dict:
        return json.loads((run / "meta.json").read_text())

    def metrics(self, run: Path) -> list:
        return json.loads((run / "metrics.json").read_text())

    def db_rows(self) -> list[dict]:
        db = self.home / "runs.db"
        if not db.exists():
            return []
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute("SELECT * FROM runs ORDER BY started_at")]


class ConfigTestCase(HomeTestCase):
    """Configs validated in memory (runpilot.validate_config), relative to self.tmp, where the folders
    src, data, ckpt and two with awkward names (we,ird and a:b) exist for mounts."""

    FOLDERS = ("src", "data", "ckpt", "we,ird", "a:b")

    def setUp(self) -> None:
        super().setUp()
        for folder in self.FOLDERS:
            (self.tmp / folder).mkdir()
        self.config_file = str(self.tmp / "config.yaml")

    def validate(self, data: object) -> runpilot.JobConfig:
        return runpilot.validate_config(data, self.config_file, base_dir=self.tmp)

    def problems(self, data: object) -> list[str]:
        """The messages of every problem validation finds (it must find one: exit status 2)."""
        with self.assertRaises(runpilot.ConfigError) as caught:
            self.validate(data)
        self.assertEqual(caught.exception.exit_code, 2)
        return [p.message for p in [caught.exception] + caught.exception.others]

    def full_config(self, **changes) -> runpilot.JobConfig:
        """A config using every section: three named mounts, secrets in env, every resource."""
        data = {"name": "exp", "image": "pytorch/pytorch:2.4", "entrypoint": "python train.py --lr 0.1",
                "env": dict(SECRETS),
                "mounts": {"code": "./src", "data": "./data", "ckpt": "./ckpt:/ckpt:ro"},
                "resources": {"gpus": 2, "cpu": 4.5, "memory": "8g", "shm_size": "2g"}}
        data.update(changes)
        return self.validate(data)


class RunsHome(HomeTestCase):
    """A home with synthetic runs, written through RunPilot's own store code (RunFolder, RunMeta,
    MetricLog, RunStore.save) with controlled start times, statuses, names, tags and metrics."""

    def setUp(self) -> None:
        super().setUp()
        self.store = runpilot.RunStore(self.home)
        self.serial = 0

    def tty_cli(self, *args: str, env: dict | None = None) -> tuple[int, str, str]:
        """main() with a stdout that is a terminal of 200 x 40 unless env says otherwise."""
        out, err = Tty(), io.StringIO()
        with mock.patch.dict(os.environ, {"COLUMNS": "200", "LINES": "40", **(env or {})}), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = runpilot.main([str(a) for a in args])
        return code, out.getvalue(), err.getvalue()

    def assertCleanError(self, result: tuple[int, str, str], code: int, *parts: str) -> None:
        """An error: the exit status, one line on stderr that says why, nothing on stdout."""
        got, out, err = result
        self.assertEqual(got, code, err)
        self.assertEqual(out, "")
        self.assertTrue(err.startswith("runpilot: error: "), err)
        self.assertEqual(err.count("\n"), 1, err)
        for part in parts:
            self.assertIn(part, err)

    def add_run(self, name: str = "job", status: str = "succeeded", started: dt.datetime | None = None,
                ago: dt.timedelta | None = None, duration: float | None = 10.0, exit_code: int | None = None,
                samples: list[dict] = (), metric_names: list[str] = (), tags: dict | None = None,
                log: bytes = b"", config: str | None = None, index: bool = True, write_meta: bool = True,
                run_id: str | None = None, **meta_fields) -> runpilot.RunRecord:
        """One run: its folder, meta.json, metrics.json, logs.txt, config.yaml and (unless index=False,
        which leaves it to a later reindex) its row. A queued or running run has no end yet; its runner
        is this process. META_FIELDS set other RunMeta fields (engine, image, runner, warnings...);
        write_meta=False leaves the folder without meta.json (the row is still written)."""
        if started is None:
            started = dt.datetime.now(UTC) - ago if ago is not None else BASE
        self.serial += 1
        folder = self.store.create_run_dir(run_id or f"{started:%Y%m%d-%H%M%S}-{self.serial:06x}")
        active = status in runpilot.ACTIVE_STATUSES
        if exit_code is None and not active and status != runpilot.CANCELLED:
            exit_code = 0 if status == runpilot.SUCCEEDED else 1
        metric_log = runpilot.MetricLog(folder.metrics)
        metric_log.add_lines([("METRIC " + " ".join(f"{k}={v}" for k, v in s.items())).encode() for s in samples])
        metric_log.close()
        runpilot.write_private(folder.logs, log)
        runpilot.write_private(folder.config, (
            config if config is not None else f"name: {name}\nengine: local\nentrypoint: [python3, train.py]\n"
        ).encode("utf-8"))
        meta = runpilot.RunMeta(
            run_id=folder.run_id, name=name, status=status, started_at=runpilot.iso_utc(started),
            finished_at=None if active else runpilot.iso_utc(started + dt.timedelta(seconds=duration or 0)),
            duration=None if active else duration, exit_code=exit_code, engine="local",
            command=["python3", "train.py"], command_line="python3 train.py", host="testhost", tags=tags or {},
            metric_names=list(metric_names), samples={"count": metric_log.count, "malformed": metric_log.malformed},
            last_metrics=metric_log.last,
            runner=runpilot.runner_identity() if active else {"pid": 1, "host": "elsewhere"})
        meta = dataclasses.replace(meta, **meta_fields)
        if write_meta:
            folder.write_meta(meta)
        if index:
            self.store.save(meta)
        return runpilot.RunRecord.of(meta, folder.path)


class LiveRun:
    """`python runpilot.py run CONFIG` in the background, read until the job prints `ready`."""

    def __init__(self, test: HomeTestCase, config: Path, *extra: str, env: dict | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, str(RUNPILOT), "run", str(config), *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
        test.addCleanup(self.cleanup)
        self.started = time.monotonic()
        line = b""
        while b"ready" not in line:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"job never got ready: {self.proc.stderr.read().decode()}")

    def finish(self, timeout: float = 60) -> tuple[int, bytes, bytes]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def small_disk(test: unittest.TestCase, size: str = "1m", read_only: bool = False) -> Path:
    """A tmpfs of `size` mounted for the test (root only; the test skips elsewhere)."""
    where = Path(tempfile.mkdtemp(prefix="runpilot-disk-"))
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        where.rmdir()
        test.skipTest(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
    test.addCleanup(lambda: (subprocess.run(["umount", "-l", str(where)]), where.rmdir()))
    return where


# GPU claims are machine-wide (runpilot.GPU_CLAIMS_DIR): the tests of this process claim the stand-in
# nvidia-smi's GPUs in a folder of their own, so that test runs beside each other on one machine
# do not take each other's GPUs. Tests of the machine-wide behaviour point it elsewhere.
os.environ.setdefault("RUNPILOT_GPU_CLAIMS", tempfile.mkdtemp(prefix="runpilot-test-gpu-claims-"))
