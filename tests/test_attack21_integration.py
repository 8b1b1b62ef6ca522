"""Defects found attacking issue 21's daily loop, on real engines (gated as tests/test_integration.py:
skipped with the reason where an engine is missing, failed where RUNPILOT_TEST_ENGINES names it)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

from tests.common import RUNPILOT, HomeTestCase
from tests.support import BUSYBOX_IMAGE, cancel_slurm_jobs, require_engine, require_slurm


class InitSkipsAnImageWithoutAnyPython(HomeTestCase):
    """The newest image named like python has no interpreter at all (busybox): init must not write it,
    and must not start a second throwaway container for the image it chose."""

    def no_python_image(self, engine: str) -> str:
        require_engine(self, engine)
        image = f"localhost/runpilot-test-python-nopy-{os.getpid()}:latest"
        name = f"runpilot-test-nopy-{os.getpid()}"
        subprocess.run([engine, "rm", "-f", name], capture_output=True)
        subprocess.run([engine, "run", "--name", name, BUSYBOX_IMAGE, "true"], check=True, capture_output=True,
                       timeout=120)
        self.addCleanup(subprocess.run, [engine, "rmi", "-f", image], capture_output=True)
        subprocess.run([engine, "commit", name, image], check=True, capture_output=True, timeout=120)
        subprocess.run([engine, "rm", "-f", name], capture_output=True)
        return image

    def test_init_writes_an_image_whose_sample_runs(self):
        image = self.no_python_image("docker")  # the newest: the one init looks at first
        done = self.process("init", cwd=self.work)
        self.assertEqual(done.returncode, 0, done.stderr)
        config = (self.work / "config.yaml").read_text()
        written = re.search(r'^image: "([^"]+)"', config, re.M).group(1)
        self.assertNotEqual(written, image)
        if "found locally" in config:
            result = self.process("run", self.work / "config.yaml", "--engine", "docker", cwd=self.work)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn(b"done", result.stdout)


class CtrlCWhileATimeoutStops(HomeTestCase):
    """Ctrl-C while a container's timeout stop is in its grace period kills it now; the run stays
    `timeout` (it was recorded `interrupted`, after the whole grace period)."""

    engine = "docker"

    def test_ctrl_c_in_the_timeouts_grace_period(self):
        require_engine(self, self.engine)
        config = self.write("stubborn.yaml", f"""\
            name: stubborn
            engine: {self.engine}
            image: {BUSYBOX_IMAGE}
            timeout: 2
            entrypoint: 'trap "" INT TERM; echo ready; while :; do sleep 0.1; done'
            """)
        proc = subprocess.Popen([sys.executable, str(RUNPILOT), "run", str(config), "--stop-timeout", "30"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        for line in proc.stderr:
            if "hit its timeout" in line:
                break
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
        proc.wait(timeout=120)
        self.assertLess(time.monotonic() - started, 15, err)
        self.assertEqual(proc.returncode, 124, err)
        meta = json.loads((self.only_run() / "meta.json").read_text())
        self.assertEqual(meta["status"], "timeout")
        self.assertIn("killed by Ctrl-C", meta["reason"])
        done = subprocess.run([self.engine, "ps", "-q", "--filter", f"label=runpilot.run_id={meta['run_id']}"],
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(done.stdout.strip(), "")


class PodmanCtrlCWhileATimeoutStops(CtrlCWhileATimeoutStops):
    engine = "podman"


# A job that saves its state on SIGUSR1 (its stop_signal) and says which signal it got.
ON_USR1 = """\
import signal, sys, time
def bye(signum, frame):
    print(f"got signal {signum}", flush=True)
    sys.exit(0)
signal.signal(signal.SIGUSR1, bye)
signal.signal(signal.SIGTERM, bye)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


class SlurmCase(HomeTestCase):
    """A Slurm test: skipped without a cluster (failed with RUNPILOT_TEST_SLURM=1); its jobs cancelled after."""

    def setUp(self) -> None:
        super().setUp()
        require_slurm(self)
        self.addCleanup(self.cancel_leftovers)
        self.write("usr1.py", ON_USR1)

    def cancel_leftovers(self) -> None:
        jobs = {str(self.meta(r).get("slurm", {}).get("job_id", "")) for r in self.runs() if (r / "meta.json").exists()}
        cancel_slurm_jobs(*sorted(j for j in jobs if j))

    def submit(self, *extra: str) -> str:
        config = self.write("usr1.yaml", f"name: usr1\nengine: local\nstop_signal: USR1\n"
                                         f"entrypoint: [{json.dumps(sys.executable)}, usr1.py]\n"
                                         f"slurm:\n  python: {json.dumps(sys.executable)}\n")
        done = self.process("run", config, "--on", "slurm", "-d", *extra)
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout.decode().split()[-1]


class SlurmStopSendsTheStopSignal(SlurmCase):
    """`runpilot stop` of a running Slurm run scancelled it plainly: the job itself got SIGTERM, not
    its stop_signal, while its record said `the job got SIGUSR1`."""

    def test_a_running_run_gets_its_stop_signal(self):
        run_id = self.submit()
        logs = self.home / "runs" / run_id / "logs.txt"
        deadline = time.monotonic() + 120
        while not (logs.exists() and b"ready" in logs.read_bytes()):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.3)
        done = self.process("stop", run_id)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(b"got signal 10", logs.read_bytes())
        self.assertNotIn(b"got signal 15", logs.read_bytes())
        meta = self.meta(self.home / "runs" / run_id)
        self.assertEqual(meta["status"], "interrupted")
        self.assertIn("the job got SIGUSR1", meta["reason"])

    def test_a_queued_run_is_cancelled(self):
        run_id = self.submit("--set", 'slurm.extra=["--begin=now+1hour"]')
        done = self.process("stop", run_id)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(self.meta(self.home / "runs" / run_id)["status"], "cancelled")


class SlurmSweepStops(SlurmCase):
    """A sweep's points still queued when the sweep was stopped (Ctrl-C, `stop --sweep`) were recorded
    `lost`: Slurm lists a pending array cancelled whole as the array alone (`320`, not `320_0`).
    `stop --sweep` of started points gave the jobs SIGTERM, not their stop_signal."""

    def sweep(self, *extra: str) -> subprocess.Popen:
        config = self.write("usr1.yaml", f"name: usr1\nengine: local\nstop_signal: USR1\n"
                                         f"entrypoint: [{json.dumps(sys.executable)}, usr1.py]\n"
                                         f"slurm:\n  python: {json.dumps(sys.executable)}\n")
        proc = subprocess.Popen([sys.executable, str(RUNPILOT), "sweep", str(config), "--on", "slurm",
                                 "--grid", "env.A=1,2", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        return proc

    def statuses(self) -> list[str]:
        return [self.meta(r)["status"] for r in self.runs()]

    def test_ctrl_c_of_a_queued_sweep_cancels_its_points(self):
        proc = self.sweep("--set", 'slurm.extra=["--begin=now+1hour"]')
        for line in proc.stderr:
            if "submitted to Slurm" in line:
                break
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        self.assertEqual(proc.returncode, 130, err)
        self.assertEqual(self.statuses(), ["cancelled", "cancelled"], err)
        self.assertEqual(err.count("cancelled by Ctrl-C before the job started"), 2, err)

    def test_stop_of_a_queued_sweep_cancels_its_points(self):
        proc = self.sweep("-d", "--set", 'slurm.extra=["--begin=now+1hour"]')
        out, err = proc.communicate(timeout=120)
        done = self.process("stop", "--sweep", "latest")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(self.statuses(), ["cancelled", "cancelled"])

    def test_stop_of_a_running_sweep_sends_each_job_its_stop_signal(self):
        proc = self.sweep("-d")
        proc.communicate(timeout=120)
        deadline = time.monotonic() + 120
        while not all((r / "logs.txt").exists() and b"ready" in (r / "logs.txt").read_bytes() for r in self.runs()):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.3)
        done = self.process("stop", "--sweep", "latest")
        self.assertEqual(done.returncode, 0, done.stderr)
        for run in self.runs():
            self.assertEqual((run / "logs.txt").read_bytes(), b"ready\ngot signal 10\n")
        self.assertEqual(self.statuses(), ["interrupted", "interrupted"])


class SlurmSigtermOfAnAttachedRun(SlurmCase):
    """SIGTERM to an attached `run --on slurm` scancelled the job plainly: the job got SIGTERM, not
    its stop_signal, while its record said `the job got SIGUSR1`."""

    def test_sigterm_reaches_the_job_as_its_stop_signal(self):
        config = self.write("usr1.yaml", f"name: usr1\nengine: local\nstop_signal: USR1\n"
                                         f"entrypoint: [{json.dumps(sys.executable)}, usr1.py]\n"
                                         f"slurm:\n  python: {json.dumps(sys.executable)}\n")
        proc = self.start_until_ready("run", str(config), "--on", "slurm")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        self.assertEqual(proc.returncode, 143, err)
        self.assertEqual(out, b"got signal 10\n")
        meta = self.meta(self.only_run())
        self.assertEqual(meta["status"], "interrupted")
        self.assertIn("the job got SIGUSR1", meta["reason"])
