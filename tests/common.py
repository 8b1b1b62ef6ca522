"""Shared helpers for RunPilot's tests: a private home per test and ways to call the CLI."""

import contextlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import unittest
from pathlib import Path
from unittest import mock

import runpilot

ROOT = Path(__file__).resolve().parents[1]
RUNPILOT = ROOT / "runpilot.py"
EXAMPLES = ROOT / "examples"


# A job that says when it is ready, writes its pid, and exits cleanly on SIGTERM.
POLITE = """\
import os, signal, sys, time
open("job.pid", "w").write(str(os.getpid()))
def bye(signum, frame):
    print(f"got signal {signum}, saving checkpoint", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
print("METRIC loss=1.5", flush=True)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""

# A job that ignores SIGTERM: only SIGKILL ends it.
STUBBORN = """\
import os, signal, time
open("job.pid", "w").write(str(os.getpid()))
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


class HomeTestCase(unittest.TestCase):
    """Each test gets its own RUNPILOT_HOME and a scratch folder for configs."""

    def setUp(self) -> None:
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.tmp = Path(tmp.name)
        self.home = self.tmp / "home"
        self.work = self.tmp / "work"
        self.work.mkdir()
        patcher = mock.patch.dict(os.environ, {"RUNPILOT_HOME": str(self.home)})
        patcher.start()
        self.addCleanup(patcher.stop)

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
    def cli(self, *args: str) -> tuple[int, str, str]:
        """runpilot.main in this process; job output goes to the captured streams too."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
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
