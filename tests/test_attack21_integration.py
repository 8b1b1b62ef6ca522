"""Defects found attacking issue 21's daily loop, on real engines (gated as tests/test_integration.py:
skipped with the reason where an engine is missing, failed where RUNPILOT_TEST_ENGINES names it)."""

import os
import re
import subprocess
import sys
import time
import signal
import json

from tests.common import RUNPILOT, HomeTestCase
from tests.support import BUSYBOX_IMAGE, require_engine


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
