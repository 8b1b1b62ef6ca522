"""A new engine is one class (issue 22, item 1), for real: a nerdctl-like engine registered by the test, whose
CLI is a script in a temp folder that logs its arguments and hands them to Docker (or Podman), runs a job,
and finds and removes what a dead runner left. Skips where the engine is missing, fails where
RUNPILOT_TEST_ENGINES names it."""

import subprocess
import unittest

import runpilot
from tests.common import HomeTestCase
from tests.support import BUSYBOX_IMAGE, containers_with_label, remove_containers_with_label, require_engine


class ScriptEngineCase(HomeTestCase):
    engine = ""                  # the real engine the script hands its arguments to
    base: type = runpilot.Engine

    def setUp(self) -> None:
        super().setUp()
        require_engine(self, self.engine)
        self.calls = self.tmp / "calls.log"
        self.program = self.tmp / "bin" / "nerdctl"
        self.program.parent.mkdir()
        self.program.write_text(f'#!/bin/sh\necho "$*" >> {self.calls}\nexec {self.engine} "$@"\n')
        self.program.chmod(0o755)
        runpilot.ENGINES["nerdctl"] = type("NerdctlEngine", (self.base,), {"name": "nerdctl",
                                                                           "program": str(self.program)})
        self.addCleanup(runpilot.ENGINES.pop, "nerdctl", None)

    def called(self) -> list[str]:
        """The first two words of each call of the engine's CLI."""
        return [" ".join(line.split()[:2]) for line in self.calls.read_text().splitlines()]

    def test_a_job_runs_on_it(self):
        config = self.write("job.yaml", f"name: job\nengine: nerdctl\nimage: {BUSYBOX_IMAGE}\n"
                                        "entrypoint: echo hello; echo METRIC loss=0.5\n")
        code, out, err = self.cli("run", config)
        self.assertEqual(code, 0, err)
        run = self.only_run()
        self.addCleanup(remove_containers_with_label, self.engine, f"runpilot.run_id={run.name}")
        self.assertEqual((run / "logs.txt").read_bytes(), b"hello\nMETRIC loss=0.5\n")
        self.assertEqual([s["loss"] for s in self.metrics(run)], [0.5])
        meta = self.meta(run)
        self.assertEqual((meta["status"], meta["engine"], meta["container"]),
                         ("succeeded", "nerdctl", f"runpilot-{run.name}"))
        self.assertEqual(meta["command"][:3], [str(self.program), "run", "--rm"])
        self.assertRegex(meta["engine_version"] or "", r"^\d+\.\d+")
        self.assertEqual(self.db_rows()[0]["engine"], "nerdctl")
        # its image, the job, its version, the container's memory: all through its own CLI
        self.assertEqual(set(self.called()), {"image inspect", "run --rm", "version --format", "inspect --format"})
        self.assertEqual(containers_with_label(self.engine, f"runpilot.run_id={run.name}"), [])

    def test_it_finds_and_removes_what_a_dead_runner_left(self):
        run_id = "20261208-000000-f00d01"
        label = f"runpilot.run_id={run_id}"
        self.addCleanup(remove_containers_with_label, self.engine, label)
        subprocess.run([self.engine, "run", "-d", "--label", label, "--name", f"runpilot-{run_id}",
                        BUSYBOX_IMAGE, "sleep", "300"], check=True, capture_output=True, timeout=120)
        engine = runpilot.engine_of("nerdctl")
        left = engine.leftovers(run_id, {})
        self.assertEqual(len(left), 1)
        self.assertTrue(containers_with_label(self.engine, label)[0].startswith(left[0]), left)
        engine.end_leftovers(run_id, {}, 5.0)
        self.assertEqual(containers_with_label(self.engine, label), [])
        self.assertEqual(self.called(), ["ps -a", "ps -a", "rm -f"])


class OnDocker(ScriptEngineCase):
    engine, base = "docker", runpilot.DockerEngine


class OnPodman(ScriptEngineCase):
    engine, base = "podman", runpilot.PodmanEngine


del ScriptEngineCase

if __name__ == "__main__":
    unittest.main()
