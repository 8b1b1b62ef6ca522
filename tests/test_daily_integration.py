"""The researcher's daily loop (issue 21) on real engines and a real Slurm cluster.

Ctrl-C reaches the job as SIGINT, so a job's `except KeyboardInterrupt:` checkpoint code and its
`finally:` run, on engine local, Docker, Podman and Slurm; `runpilot stop` and SIGTERM send
SIGTERM; a config's stop_signal overrides both. Engine tests skip with the reason where the engine
is missing and fail where RUNPILOT_TEST_ENGINES names it; Slurm tests likewise with
RUNPILOT_TEST_SLURM=1 (see tests/support.py).
"""

import json
import os
import signal
import subprocess
import sys
import time
import unittest
from pathlib import Path

import runpilot
from tests.common import RUNPILOT, HomeTestCase
from tests.support import BUSYBOX_IMAGE, PYTHON_IMAGE, cancel_slurm_jobs, containers_with_label, \
    remove_containers_with_label, require_engine, require_slurm

# A training loop that saves a checkpoint on Ctrl-C and cleans up in `finally:`, as people write them.
CHECKPOINTING = """\
import signal, sys, time
def term(signum, frame):
    print(f"got signal {signum}", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
signal.signal(signal.SIGUSR1, term)
try:
    print("METRIC loss=1.5", flush=True)
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
except KeyboardInterrupt:
    print("KeyboardInterrupt: checkpoint saved", flush=True)
finally:
    print("finally ran", flush=True)
"""


class StopSignalsOnAnEngine(HomeTestCase):
    engine = "local"

    def setUp(self) -> None:
        super().setUp()
        if self.engine != "local":
            require_engine(self, self.engine)
        self.write("ckpt.py", CHECKPOINTING)

    def config(self, extra: str = "") -> Path:
        if self.engine == "local":
            head = f"engine: local\nentrypoint: [{json.dumps(sys.executable)}, \"ckpt.py\"]\n"
        else:
            head = (f"engine: {self.engine}\nimage: {json.dumps(PYTHON_IMAGE)}\n"
                    "entrypoint: python ckpt.py\nmounts:\n  code: .\n")
        return self.write("ckpt.yaml", "name: ckpt\n" + head + extra)

    def start(self, config: Path, *extra: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(RUNPILOT), "run", str(config), *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(self._reap, proc)
        line = b"-"
        while line and b"ready" not in line:
            line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"job never got ready: {proc.stderr.read().decode()}")
        return proc

    def _reap(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        for run in self.runs():
            if self.engine != "local":
                remove_containers_with_label(self.engine, f"runpilot.run_id={run.name}")

    def stopped(self, proc: subprocess.Popen, how) -> tuple[int, bytes, dict]:
        how(proc)
        _, err = proc.communicate(timeout=90)
        run = self.only_run()
        if self.engine != "local":
            self.assertEqual(containers_with_label(self.engine, f"runpilot.run_id={run.name}"), [])
        return proc.returncode, err, self.meta(run)

    def logs(self) -> bytes:
        return (self.only_run() / "logs.txt").read_bytes()

    def test_ctrl_c_runs_the_jobs_keyboard_interrupt_handler_and_finally(self):
        code, err, meta = self.stopped(self.start(self.config()), lambda p: p.send_signal(signal.SIGINT))
        self.assertEqual(code, 130, err)
        self.assertIn(b"KeyboardInterrupt: checkpoint saved\nfinally ran\n", self.logs())
        self.assertIn(b"(Ctrl-C): the job got SIGINT and has 10s to exit", err)
        self.assertEqual((meta["status"], meta["exit_code"]), ("interrupted", 0))
        self.assertEqual(meta["reason"], "stopped by Ctrl-C (the job got SIGINT)")

    def test_sigterm_to_runpilot_sends_the_job_sigterm(self):
        code, err, meta = self.stopped(self.start(self.config()), lambda p: p.send_signal(signal.SIGTERM))
        self.assertEqual(code, 143, err)
        self.assertIn(b"got signal 15\nfinally ran\n", self.logs())
        self.assertIn(b"(SIGTERM): the job got SIGTERM and has 10s to exit", err)

    def test_stop_sends_sigterm(self):
        proc = self.start(self.config())
        code, err, meta = self.stopped(proc, lambda p: self.assertEqual(self.cli("stop", self.only_run().name)[0], 0))
        self.assertEqual(code, 143, err)
        self.assertIn(b"got signal 15\nfinally ran\n", self.logs())

    def test_a_second_ctrl_c_kills_a_job_that_ignores_the_first(self):
        self.write("ckpt.py", "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                              "print('ready', flush=True)\ntime.sleep(120)\n")
        proc = self.start(self.config())
        proc.send_signal(signal.SIGINT)
        time.sleep(1)
        code, err, meta = self.stopped(proc, lambda p: p.send_signal(signal.SIGINT))
        self.assertEqual(code, 130, err)
        self.assertIn(b"killing run", err)
        self.assertIn(b"now (SIGKILL)", err)
        self.assertEqual((meta["exit_code"], meta["reason"]),
                         (137, "stopped by Ctrl-C (the job got SIGINT); killed by a second Ctrl-C"))

    def test_the_configs_stop_signal_is_what_the_job_gets(self):
        proc = self.start(self.config("stop_signal: USR1\n"))
        code, err, meta = self.stopped(proc, lambda p: p.send_signal(signal.SIGINT))
        self.assertEqual(code, 130, err)
        self.assertIn(b"got signal 10\nfinally ran\n", self.logs())
        self.assertIn(b"the job got SIGUSR1 and has 10s to exit", err)
        self.assertEqual(meta["reason"], "stopped by Ctrl-C (the job got SIGUSR1)")


class DockerStopSignals(StopSignalsOnAnEngine):
    engine = "docker"


class PodmanStopSignals(StopSignalsOnAnEngine):
    engine = "podman"


class InitWritesAnInterpreterTheImageHas(HomeTestCase):
    """An image with python3 only (as some are): init's sample ran `python train.py` and exited 127."""

    def python3_only_image(self, engine: str) -> str:
        require_engine(self, engine)
        image = f"localhost/runpilot-test-python3only-{os.getpid()}:latest"
        name = f"runpilot-test-py3only-{os.getpid()}"
        subprocess.run([engine, "rm", "-f", name], capture_output=True)
        subprocess.run([engine, "run", "--name", name, "--entrypoint", "/bin/sh", PYTHON_IMAGE, "-c",
                        "rm -f $(command -v python)"], check=True, capture_output=True, timeout=120)
        self.addCleanup(subprocess.run, [engine, "rmi", "-f", image], capture_output=True)
        subprocess.run([engine, "commit", name, image], check=True, capture_output=True, timeout=120)
        subprocess.run([engine, "rm", "-f", name], capture_output=True)
        return image

    def test_the_image_python_check_on_both_engines(self):
        for engine in ("docker", "podman"):
            with self.subTest(engine=engine):
                image = self.python3_only_image(engine)
                self.assertEqual(runpilot.image_python(engine, image), "python3")
                self.assertEqual(runpilot.image_python(engine, PYTHON_IMAGE), "python")
                self.assertIsNone(runpilot.image_python(engine, BUSYBOX_IMAGE))

    def test_inits_sample_runs_on_the_image_it_chose(self):
        image = self.python3_only_image("docker")  # the newest image: the one init finds first
        done = self.process("init", cwd=self.work)
        self.assertEqual(done.returncode, 0, done.stderr)
        config = (self.work / "config.yaml").read_text()
        self.assertIn(f'image: "{image}"', config)
        self.assertIn('entrypoint: "python3 train.py"', config)
        result = self.process("run", self.work / "config.yaml", "--engine", "docker", cwd=self.work)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"done", result.stdout)


class SlurmCtrlC(HomeTestCase):
    def setUp(self) -> None:
        super().setUp()
        require_slurm(self)
        self.addCleanup(self.cancel_leftovers)

    def cancel_leftovers(self) -> None:
        jobs = {str(self.meta(r).get("slurm", {}).get("job_id", "")).split("_")[0] for r in self.runs()
                if (r / "meta.json").exists()}
        cancel_slurm_jobs(*sorted(j for j in jobs if j))

    def test_ctrl_c_of_an_attached_slurm_run_reaches_the_job_as_sigint(self):
        self.write("ckpt.py", CHECKPOINTING)
        config = self.write("job.yaml", f"name: on-slurm\nengine: local\n"
                                        f"entrypoint: [{json.dumps(sys.executable)}, ckpt.py]\n"
                                        f"slurm:\n  python: {json.dumps(sys.executable)}\n")
        proc = self.start_until_ready("run", str(config), "--on", "slurm")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        self.assertEqual(proc.returncode, 130, err)
        self.assertIn(b"the job gets SIGINT through its runner", err)
        run = self.only_run()
        self.assertIn(b"KeyboardInterrupt: checkpoint saved\nfinally ran\n", (run / "logs.txt").read_bytes())
        meta = self.meta(run)
        self.assertEqual((meta["status"], meta["reason"]), ("interrupted", "stopped by Ctrl-C (the job got SIGINT)"))


if __name__ == "__main__":
    unittest.main()
