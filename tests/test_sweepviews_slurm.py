"""The same closing lines and sweep output wherever a run executes (issue 21): Slurm runs and sweeps
against the real one-node cluster (tests/slurm/setup.sh starts it; .ci/run does). The tests skip
with the reason where no cluster answers, and fail where RUNPILOT_TEST_SLURM=1.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

from tests.common import RUNPILOT, RunsHome
from tests.test_slurm import SlurmCase


class SlurmLikeLocal(SlurmCase):
    def test_an_attached_runs_closing_lines_carry_the_metrics_and_the_folder(self):
        config = self.config("echo METRIC loss=0.25 acc=0.5", extra="metrics: [loss]\n")
        result = self.submit(config)
        self.assertEqual(result.returncode, 0, result.stderr)
        run = self.only_run()
        lines = result.stderr.decode().splitlines()
        self.assertRegex(lines[-3], rf"^runpilot: run {run.name} succeeded in \d+\.\ds \(exit code 0\)$")
        self.assertEqual(lines[-2:], ["runpilot:   acc=0.5  loss=0.25", f"runpilot:   folder: {run}"])

    def test_a_failed_runs_closing_line_keeps_its_reason(self):
        config = self.config("echo never", engine="podman", slurm="  setup: export PATH=/nonexistent\n",
                              extra="image: runpilot-test-busybox:latest\n")
        result = self.submit(config)
        self.assertNotEqual(result.returncode, 0)
        run = self.only_run()
        closing = [line for line in result.stderr.decode().splitlines()
                   if line.startswith(f"runpilot: run {run.name} failed")]
        self.assertEqual(len(closing), 1, result.stderr)
        self.assertIn("podman is not installed", closing[0])
        self.assertIn(f"runpilot:   folder: {run}", result.stderr.decode())

    def test_a_sweep_prints_its_points_the_comparison_and_the_plot_line(self):
        config = self.config("echo METRIC loss=$LR", extra="env: {LR: 1}\nmetrics: [loss]\n")
        result = self.process("sweep", config, "--grid", "env.LR=0.3,0.1,0.2", "--on", "slurm", timeout=240)
        self.assertEqual(result.returncode, 0, result.stderr)
        err, out = result.stderr.decode(), result.stdout.decode()
        sweep_id = re.search(r"sweep (sw-\S+): 3 run\(s\) submitted to Slurm", err).group(1)
        rows = json.loads(self.cli("list", "--json", "--sweep", sweep_id)[1])
        ids = [row["id"][-6:] for row in rows]
        for index, (lr, run) in enumerate(zip(("0.3", "0.1", "0.2"), ids)):
            self.assertIn(f"runpilot: [{index + 1}/3 LR={lr}] succeeded in ", err)
            self.assertRegex(err, rf"runpilot: \[{index + 1}/3 LR={lr}\] succeeded in \d+\.\ds \(exit code 0\), "
                                  rf"loss {lr} \(run {run}\)\n")
        table = out.splitlines()
        self.assertEqual(table[0].split(), ids)
        self.assertEqual(table[1].split(), ["env.LR", "0.3", "0.1", "0.2"])
        self.assertEqual(table[-2].split(), ["loss", "(last)", "0.3", "0.1*", "0.2"])
        self.assertTrue(err.endswith(f"runpilot: sweep {sweep_id}: runpilot list --sweep {sweep_id}; "
                                     f"runpilot plot --sweep {sweep_id}\n"), err)

    def test_ctrl_c_of_an_attached_run_is_reported_as_ctrl_c_on_a_fresh_line(self):
        # the job draws a progress bar (no newline); stdout and stderr share one pipe, as on a terminal
        config = self.config("printf 'epoch 1 [=====     ] half'; sleep 120")
        proc = subprocess.Popen([sys.executable, str(RUNPILOT), "run", str(config), "--on", "slurm"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        seen = b""
        deadline = time.monotonic() + 90
        while b"half" not in seen:
            self.assertLess(time.monotonic(), deadline, seen)
            chunk = os.read(proc.stdout.fileno(), 4096)
            self.assertTrue(chunk, seen)
            seen += chunk
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
        output = (seen + rest).decode()
        self.assertEqual(proc.returncode, 130, output)
        self.assertIn("epoch 1 [=====     ] half\nrunpilot: stopping Slurm job ", output)
        self.assertNotIn("SIGTERM", output)
        run = self.only_run()
        self.assertRegex(output, rf"runpilot: run {run.name} interrupted by Ctrl-C after \d+\.\ds[^\n]*\n")
        meta = self.meta(run)
        self.assertEqual((meta["status"], meta["stop_signal"]), ("interrupted", signal.SIGINT))
        self.assertTrue(meta["reason"].startswith("stopped by Ctrl-C (the job got SIGINT)"), meta["reason"])
        row = json.loads(self.cli("list", "--json")[1])[0]
        self.assertEqual((row["status"], row["reason"]), ("interrupted", meta["reason"]))

    def test_ctrl_c_of_a_queued_run_says_it_was_cancelled_by_ctrl_c(self):
        config = self.config("true", slurm="  extra: [--hold]\n")
        proc = subprocess.Popen([sys.executable, str(RUNPILOT), "run", str(config), "--on", "slurm"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertIn(b"queued", proc.stderr.readline() + proc.stderr.readline())
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        self.assertEqual(proc.returncode, 130, err)
        run = self.only_run()
        self.assertIn(f"runpilot: run {run.name} cancelled by Ctrl-C before the job started; runpilot exits with "
                      f"130\n".encode(), err)
        self.assertEqual(self.meta(run)["stop_signal"], signal.SIGINT)

    def test_rerun_on_slurm(self):
        config = self.config("echo METRIC loss=$LR", extra="env: {LR: 0.5}\nmetrics: [loss]\n")
        code, _, err = self.cli("run", config)  # here first
        self.assertEqual(code, 0, err)
        first = self.only_run()
        result = self.process("rerun", first.name, "--on", "slurm", "--set", "env.LR=0.25", timeout=240)
        self.assertEqual(result.returncode, 0, result.stderr)
        [second] = [run for run in self.runs() if run != first]
        meta = self.meta(second)
        self.assertEqual((meta["rerun_of"], meta["status"], meta["last_metrics"]), (first.name, "succeeded",
                                                                                     {"loss": 0.25}))
        self.assertRegex(meta["slurm"]["job_id"], r"^\d+$")
        self.assertIn(f"runpilot:   folder: {second}\n".encode(), result.stderr)


class RerunOnSlurmRefusals(RunsHome):
    """What `rerun --on slurm` refuses before anything is submitted (no cluster needed)."""

    def test_options_slurm_cannot_honour_are_refused(self):
        run = self.add_run("old")
        self.assertCleanError(self.cli("rerun", run.id, "--on", "slurm", "--engine", "docker"), 2,
                              "--engine cannot be given with --on slurm")
        self.assertEqual(len(self.runs()), 1)

    def test_on_takes_a_place_the_backends_know(self):
        run = self.add_run("old")
        self.assertCleanError(self.cli("rerun", run.id, "--on", "moon"), 2,
                              "argument --on: unknown place 'moon'; choose from here, slurm, ssh")


if __name__ == "__main__":
    import unittest
    unittest.main()
