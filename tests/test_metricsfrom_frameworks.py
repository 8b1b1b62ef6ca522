"""metrics_from against the real frameworks (issue 26): Hugging Face Trainer, Keras 3 (torch backend),
torch.utils.tensorboard's SummaryWriter and tqdm, installed as packages, run with engine local; and
metrics_from and --check-writes in real Docker and Podman containers.

Each run's metrics.json is checked against what the framework itself reported: the Trainer's
state.log_history, Keras's History, and the event files as TensorBoard's own EventAccumulator reads them.

The frameworks live in a venv that .ci/run prepares (FRAMEWORKS_VENV below, or $RUNPILOT_FRAMEWORKS_PYTHON);
without it these tests skip saying why, and RUNPILOT_TEST_FRAMEWORKS=1 (CI) makes that a failure.
"""

import json
import math
import os
import subprocess
import sys
import unittest
from pathlib import Path

from tests.common import HomeTestCase
from tests.support import PYTHON_IMAGE, containers_with_label, remove_containers_with_label, require_engine
from tests.test_metricsfrom import record, simple_value_event, tensor_event

HERE = Path(__file__).resolve().parent / "frameworks"
FRAMEWORKS_VENV = Path("/var/cache/runpilot-test-frameworks")
PACKAGES = ("torch", "transformers", "accelerate", "keras", "tensorboard", "tqdm")


def framework_python() -> tuple[str | None, str]:
    """The Python that has the frameworks, or None and why not."""
    python = os.environ.get("RUNPILOT_FRAMEWORKS_PYTHON") or str(FRAMEWORKS_VENV / "bin" / "python3")
    if not Path(python).exists():
        return None, f"no {python} (.ci/run makes that venv: torch==2.13.0, {', '.join(PACKAGES[1:])})"
    probe = subprocess.run([python, "-c", "import " + ", ".join(PACKAGES)], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "KERAS_BACKEND": "torch"})
    if probe.returncode != 0:
        return None, f"{python} cannot import {', '.join(PACKAGES)}: {probe.stderr.strip().splitlines()[-1:]}"
    return python, ""


PYTHON, WHY = framework_python()
REQUIRED = os.environ.get("RUNPILOT_TEST_FRAMEWORKS") == "1"


class Frameworks(HomeTestCase):
    def setUp(self) -> None:
        super().setUp()
        if PYTHON is None:
            if REQUIRED:
                self.fail(f"RUNPILOT_TEST_FRAMEWORKS=1 but {WHY}")
            self.skipTest(WHY)

    def run_script(self, name: str, args: list[str], metrics_from: str, *extra: str, env: dict | None = None):
        config = self.write(f"{name}.yaml", f"name: {name}\nengine: local\n"
                                            f"entrypoint: {json.dumps([PYTHON, str(HERE / name), *args])}\n"
                                            + (f"metrics_from: {metrics_from}\n" if metrics_from else ""))
        result = self.process("run", config, *extra, env=env, timeout=300)
        self.assertEqual(result.returncode, 0, result.stderr.decode(errors="replace")[-3000:])
        return result, self.runs()[-1]

    def assertClose(self, got: float, want: float, digits: int, what: str) -> None:
        """GOT is WANT as printed to DIGITS significant digits (the framework's own rounding)."""
        self.assertLessEqual(abs(got - want), 0.51 * 10 ** (math.floor(math.log10(abs(want) or 1)) - digits + 1)
                             + 1e-12, f"{what}: {got} is not {want} to {digits} digits")

    def test_huggingface_trainer_curves_are_its_log_history(self):
        history_file = self.tmp / "log_history.json"
        result, run = self.run_script("hf_trainer.py", [str(self.tmp / "out"), str(history_file)], "[huggingface]")
        history = json.loads(history_file.read_text())
        points = [h for h in history if "train_runtime" not in h]  # the summary is no point of a curve
        samples = self.metrics(run)
        self.assertEqual(len(samples), len(points), samples)
        self.assertEqual([s["step"] for s in samples], list(range(1, len(points) + 1)))
        for sample, point in zip(samples, points):
            for key in ("loss", "eval_loss", "learning_rate", "epoch"):
                if key in point:
                    self.assertClose(sample[key], point[key], 4, f"step {sample['step']} {key}")
        self.assertEqual(sum("loss" in s for s in samples), sum("loss" in p for p in points))
        self.assertGreaterEqual(sum("eval_loss" in s for s in samples), 3)
        self.assertNotIn(b"captured no metrics", result.stderr)

    def test_trainer_without_metrics_from_is_named_then_reparsed(self):
        history_file = self.tmp / "log_history.json"
        result, run = self.run_script("hf_trainer.py", [str(self.tmp / "out"), str(history_file)], "")
        self.assertIn(b"its log looks like huggingface output", result.stderr)
        self.assertEqual(self.metrics(run), [])
        reparse = self.process("reparse", run.name, "--metrics-from", "huggingface")
        self.assertEqual(reparse.returncode, 0, reparse.stderr)
        losses = [h["loss"] for h in json.loads(history_file.read_text()) if "loss" in h]
        got = [s["loss"] for s in self.metrics(run) if "loss" in s]
        self.assertEqual(len(got), len(losses), (reparse.stdout, reparse.stderr, (run / "logs.txt").read_bytes()[-800:]))
        for a, b in zip(got, losses):
            self.assertClose(a, b, 4, "loss")

    def test_keras_fit_curves_are_its_history(self):
        for verbose in ("1", "2"):  # the progress bar (colours, \r, backspaces), and one line per epoch
            with self.subTest(verbose=verbose):
                history_file = self.tmp / f"history{verbose}.json"
                result, run = self.run_script("keras_fit.py", [str(history_file), verbose], "[keras]",
                                              env={"KERAS_BACKEND": "torch"})
                history = json.loads(history_file.read_text())
                samples = self.metrics(run)
                self.assertEqual([s["step"] for s in samples], [1, 2, 3])
                self.assertEqual(set(samples[0]) - {"step"}, set(history))
                for key, values in history.items():
                    for sample, value in zip(samples, values):
                        self.assertAlmostEqual(sample[key], value, delta=0.000051, msg=f"{key} {sample}")

    def test_tqdm_postfix_of_each_finished_epoch(self):
        last_file = self.tmp / "last.json"
        result, run = self.run_script("tqdm_epochs.py", [str(last_file)], "[tqdm]")
        samples = self.metrics(run)
        self.assertEqual([s["step"] for s in samples], [1, 2, 3])
        for sample, want in zip(samples, json.loads(last_file.read_text())):
            for key in ("loss", "acc"):
                self.assertClose(sample[key], want[key], 3, f"epoch {sample['step']} {key}")

    def test_summary_writer_scalars_are_what_tensorboard_reads(self):
        result, run = self.run_script("tb_writer.py", ["tb"], "[tensorboard: tb]")
        reader = ("import json, sys\n"
                  "from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n"
                  "from tensorboard.util import tensor_util\n"
                  "acc = EventAccumulator(sys.argv[1], size_guidance={'scalars': 0, 'tensors': 0}); acc.Reload()\n"
                  "out = [[t, e.step, e.value] for t in acc.Tags()['scalars'] for e in acc.Scalars(t)]\n"
                  "out += [[t, e.step, float(tensor_util.make_ndarray(e.tensor_proto))] for t in acc.Tags()['tensors']"
                  " for e in acc.Tensors(t)]\n"
                  "print(json.dumps(out))\n")
        seen = subprocess.run([PYTHON, "-c", reader, str(self.work / "tb")], capture_output=True, text=True,
                              timeout=120)
        self.assertEqual(seen.returncode, 0, seen.stderr)
        theirs = sorted(map(tuple, json.loads(seen.stdout)))
        self.assertEqual(len(theirs), 105)
        self.assertIn("lr", {t for t, _, _ in theirs})  # the TF2 tensor form is among them
        ours = sorted((tag, s["step"], value) for s in self.metrics(run) for tag, value in s.items() if tag != "step")
        self.assertEqual(ours, theirs)


class ContainerCase:
    """metrics_from and --check-writes with a real engine (skips, or fails under RUNPILOT_TEST_ENGINES);
    a mixin, so that only the engines' own classes below run."""

    engine = ""

    def setUp(self) -> None:
        super().setUp()
        require_engine(self, self.engine)

    def python_job(self, script: str, extra: str = "") -> Path:
        self.write("job.py", script)
        return self.write("job.yaml", f"name: job\nengine: {self.engine}\nimage: {json.dumps(PYTHON_IMAGE)}\n"
                                      f"entrypoint: python job.py\nmounts:\n  code: .\n{extra}")

    def no_container_left(self, run: Path) -> None:
        label = f"runpilot.run_id={run.name}"
        self.addCleanup(remove_containers_with_label, self.engine, label)
        self.assertEqual(containers_with_label(self.engine, label), [])

    def test_check_writes_warns_of_a_checkpoint_left_in_the_container(self):
        script = ("import os\nos.makedirs('/scratch/out')\n"
                  "open('/scratch/out/ckpt.pt', 'wb').write(b'x' * (120 << 20))\nopen('/tmp/small', 'w').write('1')\n")
        result = self.process("run", self.python_job(script), "--check-writes", timeout=300)
        self.assertEqual(result.returncode, 0, result.stderr)
        run = self.only_run()
        self.assertIn(b"runpilot: warning: the job wrote 120.0 MiB outside its mounts, now gone with its "
                      b"container: /scratch/out/ckpt.pt (120.0 MiB)", result.stderr)
        self.assertEqual(len(self.meta(run)["warnings"]), 1)
        self.no_container_left(run)

    def test_small_writes_and_no_check_say_nothing(self):
        script = "open('/tmp/small', 'w').write('1')\nprint('METRIC a=1')\n"
        for extra in (["--check-writes"], []):
            with self.subTest(extra=extra):
                result = self.process("run", self.python_job(script), *extra, timeout=300)
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertNotIn(b"warning", result.stderr)
                self.no_container_left(self.runs()[-1])

    def test_event_files_in_the_code_mount_and_a_pattern(self):
        events = record(simple_value_event(1, "Loss/train", 0.5)) + record(tensor_event(2, "lr", 0.25))
        script = ("import os, time\nos.makedirs('tb', exist_ok=True)\nprint('epoch 7 val acc 0.91', flush=True)\n"
                  f"open('tb/events.out.tfevents.1.c', 'wb').write({events!r})\n")
        extra = "metrics_from:\n  - tensorboard: tb\n  - pattern: 'epoch (?P<step>\\d+) val acc (?P<val_acc>\\S+)'\n"
        result = self.process("run", self.python_job(script, extra), timeout=300)
        self.assertEqual(result.returncode, 0, result.stderr)
        samples = sorted(self.metrics(self.only_run()), key=lambda s: s["step"])
        self.assertEqual(samples, [{"step": 1, "Loss/train": 0.5}, {"step": 2, "lr": 0.25},
                                   {"step": 7, "val_acc": 0.91}])


class DockerMetricsFrom(ContainerCase, HomeTestCase):
    engine = "docker"


class PodmanMetricsFrom(ContainerCase, HomeTestCase):
    engine = "podman"


if __name__ == "__main__":
    unittest.main()
