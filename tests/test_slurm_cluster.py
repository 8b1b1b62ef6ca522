"""The test infrastructure for Slurm: the one-node cluster runs real jobs, and the stand-in squeue
(tests/fixtures/squeue) prints what the real one prints.

The cluster tests skip where no cluster answers (start one with tests/slurm/setup.sh, as root) and fail where
RUNPILOT_TEST_SLURM=1.
"""

import os
import re
import subprocess
import tempfile
import unittest
from pathlib import Path

from tests.common import HomeTestCase
from tests.support import cancel_slurm_jobs, require_slurm, scontrol_job, wait_until_left_queue

FAKE_SQUEUE = Path(__file__).resolve().parent / "fixtures" / "squeue"
# A trivial job goes from sbatch to finished in about 3 s on an idle node here; 60 s means it is stuck.
JOB_TIMEOUT_S = 60
# The fields RunPilot reads from squeue: job or task id, job id, array id, task id, state, reason, node, partition.
QUEUE_FORMAT = "%i|%A|%F|%K|%T|%r|%N|%P"


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command with a time limit and capture its output as text."""
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
                          **kwargs)


def shape(row: str) -> str:
    """Return a QUEUE_FORMAT row with numbers as N, without the fields a site words its own way."""
    id_, job_id, array_id, task_id, state, _reason, node, _partition = row.split("|")
    return re.sub(r"\d+", "N", "|".join([id_, job_id, array_id, task_id, state, node]))


class SlurmClusterTest(HomeTestCase):
    """Real jobs on the cluster that tests/slurm/setup.sh starts (in the test's private folder)."""

    def setUp(self) -> None:
        require_slurm(self)
        super().setUp()

    def sbatch(self, *args: str) -> str:
        """Submit with sbatch --parsable; return the job id, cancelled at cleanup if it is still queued."""
        done = run(["sbatch", "--parsable", *args], cwd=self.tmp)
        self.assertEqual(done.returncode, 0, done.stderr)
        job_id = done.stdout.strip()
        self.assertRegex(job_id, r"^\d+$")
        self.addCleanup(cancel_slurm_jobs, job_id)
        return job_id

    def test_batch_job_runs_and_its_exit_status_is_kept(self) -> None:
        script = self.tmp / "job.sh"
        script.write_text('#!/bin/sh\necho "$SLURM_JOB_ID" > ran.txt\necho to-output\nexit 3\n')
        job_id = self.sbatch("--output=out-%j.txt", str(script))
        wait_until_left_queue(job_id, JOB_TIMEOUT_S)
        fields = scontrol_job(job_id)
        self.assertEqual((fields["JobState"], fields["ExitCode"]), ("FAILED", "3:0"))
        self.assertEqual((self.tmp / "ran.txt").read_text(), f"{job_id}\n")
        self.assertEqual((self.tmp / f"out-{job_id}.txt").read_text(), "to-output\n")

    def test_stand_in_squeue_rows_are_shaped_like_the_real_ones(self) -> None:
        # Held jobs stay pending without using the node: a plain job, and a throttled array shown collapsed
        # (as one row) and expanded (-r, one row per task).
        plain = self.sbatch("--hold", "--output=/dev/null", "--wrap=true")
        array = self.sbatch("--hold", "--array=0-2%2", "--output=/dev/null", "--wrap=true")
        real = run(["squeue", "-h", "-o", QUEUE_FORMAT, "-j", f"{plain},{array}"]).stdout.splitlines()
        real_r = run(["squeue", "-h", "-r", "-o", QUEUE_FORMAT, "-j", array]).stdout.splitlines()
        fake = run([str(FAKE_SQUEUE), "-h", "-o", QUEUE_FORMAT, "-j", "1006,1008"],
                   env={**os.environ, "RUNPILOT_FAKE_SQUEUE_ROWS": "10"}).stdout.splitlines()
        fake_r = run([str(FAKE_SQUEUE), "-h", "-r", "-o", QUEUE_FORMAT, "-j", "1008"],
                     env={**os.environ, "RUNPILOT_FAKE_SQUEUE_ROWS": "10"}).stdout.splitlines()
        pending = {shape(row) for row in fake + fake_r if "|PENDING|" in row}
        self.assertEqual(len(real), 2)
        self.assertEqual(len(real_r), 3)
        for row in real + real_r:
            self.assertIn(shape(row), pending, row)


class FakeSqueueTest(unittest.TestCase):
    """The stand-in squeue does what its docstring promises (no Slurm needed)."""

    def fake(self, *args: str, rows: int = 1000) -> subprocess.CompletedProcess:
        env = {**os.environ, "RUNPILOT_FAKE_SQUEUE_ROWS": str(rows)}
        return run([str(FAKE_SQUEUE), *args], env=env)

    def test_prints_the_requested_number_of_rows(self) -> None:
        done = self.fake("-h", "-o", "%i|%T|%r|%N|%P", rows=1000)
        lines = done.stdout.splitlines()
        self.assertEqual((done.returncode, len(lines)), (0, 1000))
        self.assertEqual(lines[:2], ["1000|RUNNING|None|node040|gpu", "1001|RUNNING|None|node041|gpu"])
        self.assertIn("1008_[1-3%1]|PENDING|JobArrayTaskLimit||gpu", lines)

    def test_array_rows_expand_with_r(self) -> None:
        done = self.fake("-h", "-r", "-o", "%i|%A|%F|%K|%T", "-j", "1008", rows=10)
        self.assertEqual(done.stdout.splitlines(), ["1008_0|1009|1008|0|RUNNING", "1008_1|1008|1008|1|PENDING",
                                                    "1008_2|1008|1008|2|PENDING", "1008_3|1008|1008|3|PENDING"])

    def test_job_list_selects_jobs_and_tasks(self) -> None:
        done = self.fake("-h", "-o", "%i|%T", "-j", "1007,1018_2,99999", rows=20)
        self.assertEqual((done.returncode, done.stdout), (0, "1007|PENDING\n1018_2|PENDING\n"))

    def test_one_unknown_job_id_fails_like_squeue(self) -> None:
        done = self.fake("-h", "-j", "99999")
        self.assertEqual((done.returncode, done.stdout, done.stderr),
                         (1, "", "slurm_load_jobs error: Invalid job id specified\n"))

    def test_logs_each_call(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "calls.jsonl"
            env = {**os.environ, "RUNPILOT_FAKE_SQUEUE_LOG": str(log)}
            run([str(FAKE_SQUEUE), "-h", "-j", "1000"], env=env)
            self.assertEqual(log.read_text(), '["-h", "-j", "1000"]\n')


if __name__ == "__main__":
    unittest.main()
