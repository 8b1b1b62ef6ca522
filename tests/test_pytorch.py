"""The PyTorch example (examples/pytorch) as written, in a real PyTorch CPU image on Docker AND Podman, no GPU.

The image runpilot-test-pytorch:latest comes from `tests/images/build.sh --pytorch docker podman` (no registry:
pip installs torch's CPU wheel). Without it the tests skip with the reason, or fail when RUNPILOT_TEST_PYTORCH=1
(CI sets it once the image is built); without the engine they skip or fail as tests/test_integration.py does.
Each run is a `python3 runpilot.py run examples/pytorch/config.yaml --set ...` a user could type.
"""

import shutil
import subprocess
import unittest

from tests.common import EXAMPLES, HomeTestCase
from tests.support import PYTORCH_IMAGE, require_pytorch_image

# What a CPU-only machine changes in the example: the local image, and no GPU.
CPU_ONLY = ("image=" + PYTORCH_IMAGE, "resources.gpus=0")
# Batches of 32 x 3x512x512 float32 (~100 MB), more than the engines' default /dev/shm of 64 MB; one short epoch.
BIG_BATCHES = ("env.BATCH=32", "env.IMAGE_SIZE=512", "env.TRAIN_SIZE=64", "env.VAL_SIZE=32", "env.EPOCHS=1")
# Torch's import and the loader workers' start take a few seconds; a minute means something hangs.
RUN_TIMEOUT_S = 120


class PyTorchCase(HomeTestCase):
    engine = ""

    def setUp(self) -> None:
        super().setUp()
        require_pytorch_image(self, self.engine)
        self.example = self.work / "pytorch"
        shutil.copytree(EXAMPLES / "pytorch", self.example)  # the job gets a copy mounted, never the repository

    def run_example(self, *sets: str) -> subprocess.CompletedProcess:
        args = ["run", self.example / "config.yaml", "--engine", self.engine]
        for assignment in (*CPU_ONLY, *sets):
            args += ["--set", assignment]
        return self.process(*args, timeout=RUN_TIMEOUT_S)

    def hint_texts(self, meta: dict) -> list[str]:
        """What meta.json says to the user after the run: a "hint" field, else (until it exists) "warnings"."""
        hint = meta.get("hint")
        if hint:
            return [hint] if isinstance(hint, str) else list(hint)
        return list(meta.get("warnings") or [])

    # -- the tests, run once per engine ---------------------------------------
    def test_the_example_trains_on_the_cpu(self):
        result = self.run_example()
        self.assertEqual(result.returncode, 0, result.stderr.decode(errors="replace")[-3000:])
        run = self.only_run()
        self.assertEqual((run / "logs.txt").read_bytes(), result.stdout)
        lines = result.stdout.decode().splitlines()
        self.assertEqual(lines[0], "torch 2.13.0+cpu on cpu; data mount at /mnt/data (unused: the images are generated)")
        self.assertEqual(lines[1], "5 epochs, batch 16 x 3x32x32, lr=0.01, 2 loader workers")
        self.assertEqual(lines[-1], "done")
        # The job wrote nothing to stderr (no torch warning), and RunPilot warned about nothing.
        self.assertEqual([line for line in result.stderr.decode().splitlines()
                          if not line.startswith("runpilot: ") or line.startswith("runpilot: warning")], [])

        meta = self.meta(run)
        self.assertEqual((meta["status"], meta["exit_code"], meta["engine"]), ("succeeded", 0, self.engine))
        self.assertEqual(meta["image"], PYTORCH_IMAGE)
        self.assertIsNone(meta["gpus"]["requested"])
        samples = self.metrics(run)
        self.assertEqual([s["step"] for s in samples], [1, 2, 3, 4, 5])
        self.assertEqual(set(samples[0]), {"step", "train_loss", "val_loss", "val_accuracy"})
        self.assertLess(samples[-1]["train_loss"], 0.8 * samples[0]["train_loss"], samples)
        self.assertEqual(min(s["train_loss"] for s in samples), samples[-1]["train_loss"], samples)
        self.assertGreater(samples[-1]["val_accuracy"], 0.5, samples)  # four classes: chance is 0.25

    def test_too_little_shared_memory_fails_with_the_shm_size_hint(self):
        result = self.run_example("resources.shm_size=64m", *BIG_BATCHES)  # 64m: both engines' default
        stderr = result.stderr.decode(errors="replace")
        self.assertNotEqual(result.returncode, 0, stderr[-3000:])
        run = self.only_run()
        log = (run / "logs.txt").read_text(errors="replace")
        self.assertIn("unable to allocate shared memory", log)  # PyTorch's own words, from a loader worker
        hinted = [line for line in stderr.splitlines() if line.startswith("runpilot: ") and "shm_size" in line]
        self.assertTrue(hinted, stderr[-3000:])
        meta = self.meta(run)
        self.assertEqual((meta["status"], meta["exit_code"]), ("failed", result.returncode))
        self.assertTrue(any("shm_size" in text for text in self.hint_texts(meta)), meta)

    def test_the_configs_shm_size_lets_the_same_batches_through(self):
        # The control for the test above: the same job with the config's shm_size: 1g succeeds.
        result = self.run_example(*BIG_BATCHES)
        stderr = result.stderr.decode(errors="replace")
        self.assertEqual(result.returncode, 0, stderr[-3000:])
        self.assertNotIn("shm_size", stderr)
        meta = self.meta(self.only_run())
        self.assertEqual(meta["status"], "succeeded")
        self.assertIn("--shm-size", meta["command"])
        self.assertEqual([s["step"] for s in self.metrics(self.only_run())], [1])


class DockerPyTorch(PyTorchCase):
    engine = "docker"


class PodmanPyTorch(PyTorchCase):
    engine = "podman"


del PyTorchCase  # the base class itself runs no test

if __name__ == "__main__":
    unittest.main()
