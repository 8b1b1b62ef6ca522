"""Truth and safety (issue 21) against the real components: the one-node Slurm cluster's sbatch.

Skips where no cluster answers, and fails where RUNPILOT_TEST_SLURM=1 requires one (as
tests/test_slurm_cluster.py).
"""

import subprocess

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
