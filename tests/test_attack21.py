"""Defects found attacking issue 21's daily loop and sweep views (unit tests: engine local only).

Each test failed on the merged branch before its fix.
"""

import json
import re

import runpilot
from tests.common import RunsHome

# A job that prints its LR as a metric.
JOB = """\
import os
print(f"METRIC loss={os.environ.get('LR', '0')}")
"""


class Attack21Case(RunsHome):
    def sweep(self, *grid: str, name: str = "job", env: dict | None = None) -> str:
        """Run a sweep on engine local to its end; return its id."""
        config = self.local_config(JOB, name="job", extra="metrics: [loss]\n", **(env or {"LR": 1}))
        code, out, err = self.cli("sweep", config, "--name", name, *[a for key in grid for a in ("--grid", key)])
        self.assertEqual(code, 0, err)
        return re.findall(r"runpilot: sweep (sw-\S+): runpilot list", err)[-1]

    def view(self, *args: str, width: int = 80) -> list[str]:
        code, out, err = self.tty_cli(*args, env={"COLUMNS": str(width)})
        self.assertEqual(code, 0, err)
        return out.splitlines()

    def assertFits(self, lines: list[str], width: int = 80) -> None:
        for line in lines:
            self.assertLessEqual(runpilot.text_width(line), width, line)


class ManySweptKeysFit80Columns(Attack21Case):
    """`list --sweep` of a grid over five keys with long names and values was 145 columns wide."""

    def test_list_sweep_with_many_long_keys_fits_and_keeps_the_first_key(self):
        env = {"LR": 1, "BATCH_SIZE_PER_DEVICE": 8, "WEIGHT_DECAY_VALUE": 0, "OPTIMIZER_NAME": "adam",
               "SCHEDULER": "cos"}
        self.sweep("env.LR=0.1,0.2", "env.BATCH_SIZE_PER_DEVICE=16,32", "env.WEIGHT_DECAY_VALUE=0.0001",
                   "env.OPTIMIZER_NAME=adamw-with-long-name", "env.SCHEDULER=cosine-annealing-warm",
                   name="a-very-long-experiment-name-for-testing-columns", env=env)
        lines = self.view("list", "--sweep", "latest", "--no-color")
        self.assertFits(lines)
        self.assertEqual(re.split(r"\s{2,}", lines[0])[6], "LR")
        self.assertEqual(sorted(re.split(r"\s{2,}", line.strip())[6] for line in lines[1:]),
                         ["0.1", "0.1", "0.2", "0.2"])

    def test_a_long_swept_value_is_cut_to_fit(self):
        self.sweep("env.LR=0.1," + "9" * 120)
        lines = self.view("list", "--sweep", "latest", "--no-color")
        self.assertFits(lines)
        self.assertIn("…", lines[-1])
