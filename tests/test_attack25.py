"""Attacks on issue 25's exports and GPU statistics (unit: no engine, no TensorBoard, no MLflow).

Each test is a defect found by attacking what issue 25 built, failing on the code before its fix:
steps beyond int64 in the runner's event file and in the exports, MLflow URIs with credentials or
that do not parse, nvidia-smi answering garbage, and the export's memory with many samples.
"""

import os
import shutil
import time
from pathlib import Path

import runpilot
from tests.common import RunsHome
from tests.test_exports import FIXTURES, split_records

INT64 = 1 << 63


def steps_of(path: Path) -> list[int]:
    """The steps of an event file's scalar events (decoded with the test's own varint reader)."""
    steps = []
    for payload in split_records(path.read_bytes())[1:]:
        if payload[9:10] != b"\x10":
            steps.append(0)
            continue
        value, shift, at = 0, 0, 10
        while True:
            byte = payload[at]
            value |= (byte & 0x7F) << shift
            shift, at = shift + 7, at + 1
            if not byte & 0x80:
                break
        assert at - 10 <= 10, "a varint longer than protobuf's ten bytes"
        steps.append(value - (1 << 64) if value >= INT64 else value)
    return steps


class StepsBeyondInt64(RunsHome):
    """A METRIC step is any integer; an Event's step (and MLflow's) is an int64."""

    def test_the_runners_event_file_survives_a_huge_step(self):
        # before: IndexError in LiveEvents.flush, a traceback out of the tee loop
        config = self.local_config("print('METRIC step=99999999999999999999999 loss=0.5')\n"
                                   "print('METRIC step=2 loss=0.25')\nprint('METRIC step=-3 loss=1')\n"
                                   "print('after')\n", "tb", "tensorboard: true\n")
        code, _, err = self.cli("run", config)
        self.assertEqual(code, 0, err)
        run = self.only_run()
        self.assertEqual(self.meta(run)["status"], "succeeded")
        self.assertEqual([s["step"] for s in self.metrics(run)], [99999999999999999999999, 2, -3])
        self.assertEqual(steps_of(next(run.glob("events.out.tfevents.*"))), [2, -3])

    def test_live_events_drop_only_the_steps_beyond_int64(self):
        events = runpilot.LiveEvents(self.tmp / "events.out.tfevents.1", 0.0)
        events.samples += [{"step": s, "x": 1.0} for s in (INT64, -INT64 - 1, INT64 - 1, -INT64, 7)]
        events.flush(1)
        events.samples += [{"step": 2 ** 70, "x": 1.0}] + [{"step": i, "x": 1.0} for i in range(40)]
        events.flush(6)
        events.close()
        self.assertEqual(steps_of(self.tmp / "events.out.tfevents.1"), [INT64 - 1, -INT64, 7, *range(40)])

    def test_the_export_leaves_out_steps_beyond_int64(self):
        run = self.add_run(samples=[{"step": 2 ** 70, "loss": 1.0}, {"step": -3, "loss": 2}, {"step": 5, "loss": 3}])
        out = self.tmp / "tb"
        code, _, err = self.cli("export", run.id, "--format", "tensorboard", "-o", out)
        self.assertEqual(code, 0, err)
        self.assertEqual(steps_of(next(out.glob("*/events.out.tfevents.*"))), [-3, 5])
        self.assertEqual([m["step"] for m in runpilot.mlflow_metrics(run, runpilot.RunFolder(Path(run.path)))],
                         [-3, 5])
