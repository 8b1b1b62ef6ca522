"""Truth and safety (issue 21) against the real components: the one-node Slurm cluster's sbatch.

Skips where no cluster answers, and fails where RUNPILOT_TEST_SLURM=1 requires one (as
tests/test_slurm_cluster.py).
"""

import json
import subprocess
import sys
import time

import runpilot
from tests.common import HomeTestCase
from tests.support import cancel_slurm_jobs, require_slurm, scontrol_job


class SbatchSpellings(HomeTestCase):
    """What RunPilot refuses in slurm.extra is what the real sbatch reads as an option RunPilot owns."""

    def setUp(self) -> None:
        require_slurm(self)
        super().setUp()

    def held_job(self, line: str) -> dict:
        """Submit a held job whose script says `#SBATCH LINE` after RunPilot's own options; its fields."""
        script = self.tmp / "job.sh"
        script.write_text("#!/bin/sh\n#SBATCH --job-name=runpilot-mine\n#SBATCH --output=/dev/null\n"
                          f"#SBATCH {line}\ntrue\n")
        done = subprocess.run(["sbatch", "--parsable", "--hold", str(script)], capture_output=True, text=True,
                              timeout=60, cwd=self.tmp)
        self.assertEqual(done.returncode, 0, done.stderr)
        job_id = done.stdout.strip().split(";")[0]
        self.addCleanup(cancel_slurm_jobs, job_id)
        return scontrol_job(job_id)

    def test_each_refused_spelling_changes_what_runpilot_owns(self):
        for line, key, value in (("-Jhijack", "JobName", "hijack"), ("--job=pwned", "JobName", "pwned"),
                                 ("-vJx", "JobName", "x"), ("--out=/tmp/elsewhere-%j.out", "StdOut", "/tmp/elsewhere-")):
            with self.subTest(line=line):
                self.assertTrue(runpilot.owned_sbatch_option(line), line)
                self.assertTrue(self.held_job(line)[key].startswith(value), line)

    def test_an_accepted_line_leaves_runpilots_options_alone(self):
        line = "-c1 --comment=fine --no-requeue"
        self.assertIsNone(runpilot.owned_sbatch_option(line))
        fields = self.held_job(line)
        self.assertEqual((fields["JobName"], fields["StdOut"]), ("runpilot-mine", "/dev/null"))


class SlurmSweepTimeLimits(HomeTestCase):
    """A Slurm sweep over timeout: each task gets its own --time, and stops itself before it."""

    def setUp(self) -> None:
        require_slurm(self)
        super().setUp()

    def config(self, entrypoint: str, slurm: str = "") -> str:
        return str(self.write("t.yaml", f"name: t\nengine: local\nentrypoint: {json.dumps(entrypoint)}\n"
                                        f"slurm:\n  python: {json.dumps(sys.executable)}\n{slurm}"))

    def sweep(self, *args: str) -> str:
        done = self.process("sweep", *args, "--on", "slurm", "-d")
        self.assertEqual(done.returncode, 0, done.stderr)
        sweep_id = done.stdout.decode().strip()
        array = json.loads((self.home / "sweeps" / sweep_id / "sweep.json").read_text())["points"][0]["run_id"]
        job = json.loads((self.home / "runs" / array / "meta.json").read_text())["slurm"]["array_job_id"]
        self.addCleanup(cancel_slurm_jobs, str(job))
        return str(job)

    def test_each_point_gets_its_own_time_limit(self):
        job = self.sweep(self.config("true", "  extra: [--hold]\n"), "--grid", "timeout=60,3600")
        limits = [scontrol_job(f"{job}_{task}")["TimeLimit"] for task in (0, 1)]
        self.assertEqual(limits, ["00:06:00", "01:05:00"])

    def test_the_array_task_whose_id_is_the_arrays_stops_itself_before_the_limit(self):
        # squeue -j ARRAY lists every task of the array (here the second one, pending): task 0's job id is
        # the array's id, and it must read its own time left
        self.sweep(self.config("echo start; sleep 300", "  time: 1\n"), "--grid", "env.A=1,2", "--parallel", "1")
        sweep_id = next((self.home / "sweeps").iterdir()).name
        first = json.loads((self.home / "sweeps" / sweep_id / "sweep.json").read_text())["points"][0]["run_id"]
        deadline = time.monotonic() + 180
        while True:
            rows = {r["id"]: r for r in json.loads(self.cli("list", "--json", "--all")[1])}
            if rows.get(first, {}).get("status") not in (None, "queued", "running"):
                break
            self.assertLess(time.monotonic(), deadline, rows)
            time.sleep(2)
        meta = json.loads((self.home / "runs" / first / "meta.json").read_text())
        self.assertEqual(meta["status"], "timeout", meta)
        self.assertIn("Slurm's time limit", meta["reason"])
