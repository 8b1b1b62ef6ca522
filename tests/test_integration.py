"""Real containers on Docker AND Podman, checked the way a user would check a run.

Each engine's tests skip with the reason when the engine (or a test image) is missing here,
and fail instead when RUNPILOT_TEST_ENGINES names the engine (CI sets docker,podman).
The images come from tests/images/build.sh (no registry is needed).
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import unittest
from pathlib import Path

from tests.common import EXAMPLES, POLITE, RUNPILOT, STUBBORN, HomeTestCase, small_disk
from tests.support import python_for_nobody, BUSYBOX_IMAGE, PYTHON_IMAGE, containers_with_label, remove_containers_with_label, \
    require_engine

class EngineCase(HomeTestCase):
    engine = ""

    def setUp(self) -> None:
        super().setUp()
        require_engine(self, self.engine)

    def config(self, name: str, image: str, entrypoint: str, extra: str = "", script: str | None = None) -> Path:
        if script is not None:
            self.write(f"{name}.py", script)
        text = (f"name: {name}\nengine: {self.engine}\nimage: {json.dumps(image)}\n"
                f"entrypoint: {json.dumps(entrypoint)}\nmounts:\n  code: .\n{extra}")
        return self.write(f"{name}.yaml", text)

    def python_job(self, name: str, script: str, extra: str = "") -> Path:
        return self.config(name, PYTHON_IMAGE, f"python {name}.py", extra, script)

    def leftovers(self, run_id: str) -> list[str]:
        found = containers_with_label(self.engine, f"runpilot.run_id={run_id}")
        self.addCleanup(remove_containers_with_label, self.engine, f"runpilot.run_id={run_id}")
        return found

    def start(self, config: Path, *extra: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(RUNPILOT), "run", str(config), *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(self._reap, proc)
        line = b""
        while b"ready" not in line:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"job never got ready: {proc.stderr.read().decode()}")
        return proc

    @staticmethod
    def _reap(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()

    # -- the tests, run once per engine ---------------------------------------
    def test_quickstart_end_to_end(self):
        result = self.process("run", EXAMPLES / "quickstart" / "config.yaml", "--engine", self.engine)
        self.assertEqual(result.returncode, 0, result.stderr)
        run = self.only_run()
        logged = (run / "logs.txt").read_bytes()
        self.assertEqual(logged, result.stdout)
        self.assertTrue(logged.startswith(b"training for 8 epochs, lr=0.05\n"), logged[:200])
        samples = self.metrics(run)
        self.assertEqual([s["step"] for s in samples], list(range(1, 9)))
        self.assertEqual(set(samples[0]), {"step", "train_loss", "val_loss", "val_accuracy"})
        self.assertLess(samples[-1]["train_loss"], samples[0]["train_loss"])
        meta = self.meta(run)
        self.assertEqual((meta["status"], meta["exit_code"], meta["engine"]), ("succeeded", 0, self.engine))
        self.assertRegex(meta["engine_version"] or "", r"^\d+\.\d+")
        self.assertEqual(meta["image"], PYTHON_IMAGE)
        self.assertRegex(meta["image_id"], r"^(sha256:)?[0-9a-f]{12,}")
        # Docker's id comes from the daemon's socket, Podman's from its CLI: both as the CLI says it
        inspect = subprocess.run([self.engine, "image", "inspect", "--format", "{{.Id}}", PYTHON_IMAGE],
                                 capture_output=True, text=True, check=True)
        self.assertEqual(meta["image_id"], inspect.stdout.strip())
        self.assertEqual(meta["command"][:3], [self.engine, "run", "--rm"])
        self.assertIn(f"runpilot.run_id={run.name}", meta["command"])
        row = self.db_rows()[0]
        self.assertEqual((row["id"], row["status"], row["exit_code"]), (run.name, "succeeded", 0))
        listing = self.process("list").stdout.decode()
        self.assertRegex(listing, rf"{run.name[-6:]}\s+quickstart\s+succeeded\s+")
        shown = self.process("show", run.name[:18]).stdout.decode()
        self.assertIn(f"engine     {self.engine} {meta['engine_version']}", shown)
        self.assertRegex(shown, r"train_loss\s+8\s")
        self.assertEqual(self.leftovers(run.name), [])

    def test_exit_status_and_both_streams(self):
        config = self.config("fail", BUSYBOX_IMAGE, "echo to-out; echo to-err >&2; exit 3")
        result = self.process("run", config)
        self.assertEqual(result.returncode, 3, result.stderr)
        self.assertEqual(result.stdout, b"to-out\n")
        self.assertIn(b"to-err\n", result.stderr)
        run = self.only_run()
        self.assertEqual(sorted((run / "logs.txt").read_bytes().splitlines()), [b"to-err", b"to-out"])
        self.assertEqual((self.meta(run)["status"], self.db_rows()[0]["exit_code"]), ("failed", 3))

    def test_binary_output_is_logged_byte_for_byte(self):
        config = self.config("bin", BUSYBOX_IMAGE,
                             "head -c 3000000 /dev/urandom > /workspace/out.bin; cat /workspace/out.bin; "
                             "printf '\\nMETRIC a=1\\nMETRIC b=2.5\\n'")
        result = self.process("run", config)
        self.assertEqual(result.returncode, 0, result.stderr)
        run = self.only_run()
        # what the job writes into its working folder stays in its run's copy of the code (issue 23)
        expected = (run / "code" / "out.bin").read_bytes() + b"\nMETRIC a=1\nMETRIC b=2.5\n"
        self.assertEqual(hashlib.sha256((run / "logs.txt").read_bytes()).hexdigest(),
                         hashlib.sha256(expected).hexdigest())
        self.assertEqual(self.metrics(run), [{"step": 1, "a": 1}, {"step": 2, "b": 2.5}])

    def test_env_values_reach_the_job_but_not_the_command_line(self):
        (self.work / "data").mkdir()
        (self.work / "data" / "in.txt").write_text("data!")
        config = self.config("env", BUSYBOX_IMAGE,
                             'echo "$SECRET|$LR|$PYTHONUNBUFFERED|$RUNPILOT_MOUNT_DATA|$(cat /mnt/data/in.txt)|$(pwd)"; '
                             "touch /mnt/data/x 2>/dev/null && echo writable || echo read-only; "
                             'printf "%s" "$MULTI" > /workspace/multi.txt',
                             extra="  data: ./data:/mnt/data:ro\nenv:\n  SECRET: 'p@ss word;$x'\n  LR: 0.001\n"
                                   '  MULTI: "one\\ntwo = three"\n')
        result = self.process("run", config)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.decode().splitlines(),
                         ["p@ss word;$x|0.001|1|/mnt/data|data!|/workspace", "read-only"])
        multi = self.only_run() / "code" / "multi.txt"  # the job's writes stay in its run's copy (issue 23)
        self.assertEqual(multi.read_text(), "one\ntwo = three")  # a newline arrives as is
        meta = self.meta(self.only_run())
        self.assertNotIn("p@ss", json.dumps(meta["command"]))
        self.assertEqual(meta["command"][meta["command"].index("--env-file") + 1], "/dev/fd/ENV")  # a pipe
        self.assertIn("MULTI", meta["command"])  # a line break travels by name

    def test_config_env_is_the_jobs_and_never_the_engines(self):
        # PATH, DOCKER_HOST and CONTAINERS_CONF set in a config used to reach the engine CLI itself:
        # docker could not start, podman failed in netavark, DOCKER_HOST sent the job elsewhere.
        config = self.config("env", BUSYBOX_IMAGE, 'echo "$PATH|$DOCKER_HOST|$CONTAINERS_CONF"; ls /bin/sh',
                             extra="env:\n  PATH: /usr/bin:/bin:/job/bin\n  DOCKER_HOST: tcp://192.0.2.1:2375\n"
                                   "  CONTAINERS_CONF: /nonexistent.conf\n  CONTAINERS_STORAGE_CONF: /nonexistent\n")
        result = self.process("run", config)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.decode().splitlines(),
                         ["/usr/bin:/bin:/job/bin|tcp://192.0.2.1:2375|/nonexistent.conf", "/bin/sh"])

    def test_a_workdir_the_image_lacks_is_created_on_both_engines(self):
        config = self.write("wd.yaml", f"name: wd\nengine: {self.engine}\nimage: {BUSYBOX_IMAGE}\n"
                                       "workdir: /not/in/the/image\nentrypoint: [pwd]\n")
        result = self.process("run", config)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, b"/not/in/the/image\n")
        self.assertEqual(self.meta(self.only_run())["status"], "succeeded")

    def test_failures_get_a_hint(self):
        cases = (("oom", PYTHON_IMAGE, "python -c 'x = bytearray(512 << 20); print(len(x))'",
                  "resources:\n  memory: 64m\n", 137, "resources.memory 64m"),
                 ("notfound", BUSYBOX_IMAGE, "python train.py", "", 127, "'python' was not found"))
        for name, image, entrypoint, extra, code, words in cases:
            with self.subTest(name):
                result = self.process("run", self.config(name, image, entrypoint, extra=extra))
                self.assertEqual(result.returncode, code, result.stderr)
                hints = [l for l in result.stderr.decode().splitlines() if l.startswith("runpilot: hint: ")]
                self.assertEqual(len(hints), 1, result.stderr)
                self.assertIn(words, hints[0])
                run = next(r for r in self.runs() if self.meta(r)["name"] == name)
                self.assertIn(words, self.meta(run)["hint"])

    def test_a_sweep_on_the_engine(self):
        config = self.config("sweep", BUSYBOX_IMAGE, 'echo "METRIC loss=$LR repeat=$RUNPILOT_REPEAT"')
        result = self.process("sweep", config, "--grid", "env.LR=0.5,0.25", "--repeat", "2", "--parallel", "2")
        self.assertEqual(result.returncode, 0, result.stderr)
        rows = json.loads(self.process("list", "--json").stdout)
        self.assertEqual(sorted((r["status"], r["last_metrics"]["loss"], r["last_metrics"]["repeat"]) for r in rows),
                         [("succeeded", 0.25, 0), ("succeeded", 0.25, 1), ("succeeded", 0.5, 0), ("succeeded", 0.5, 1)])
        self.assertEqual(len({r["sweep_id"] for r in rows}), 1)
        for row in rows:
            self.assertEqual(self.leftovers(row["id"]), [])

    def test_missing_image_with_pull_never(self):
        config = self.config("missing", "runpilot-no-such-image:latest", "true")
        result = self.process("run", config, "--pull", "never")
        self.assertEqual(result.returncode, 125)
        self.assertEqual(result.stderr.decode().count("\n"), 1, result.stderr)
        self.assertIn(b"runpilot: error: image runpilot-no-such-image:latest is not present locally", result.stderr)
        self.assertEqual(self.runs(), [])

    def test_missing_image_is_pulled_as_its_own_phase(self):
        config = self.config("missing", "runpilot-no-such-image:latest", "true")
        result = self.process("run", config)  # --pull missing: no registry is reachable here, so it fails
        self.assertEqual(result.returncode, 125)
        err = result.stderr.decode()
        self.assertIn("runpilot: pulling runpilot-no-such-image:latest ...", err)
        self.assertEqual(err.count("runpilot: error: "), 1)
        self.assertIn("runpilot: error: could not pull image runpilot-no-such-image:latest", err)
        self.assertEqual(self.runs(), [])

    def test_present_image_is_not_pulled_unless_always(self):
        config = self.config("present", BUSYBOX_IMAGE, "true")
        result = self.process("run", config)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn(b"pulling", result.stderr)
        result = self.process("run", config, "--pull", "always")  # a local-only image cannot be pulled
        self.assertEqual(result.returncode, 125)
        self.assertIn(b"runpilot: pulling runpilot-test-busybox:latest ...", result.stderr)
        self.assertEqual(len(self.runs()), 1)

    def test_a_tag_moved_or_removed_is_seen_at_once(self):
        # Docker is asked over its socket, Podman's answer is remembered while its image store is
        # unchanged: a tag that now names another image, or none, must be seen by the very next run.
        tag = f"runpilot-test-moving-{self.engine}:{os.getpid()}"
        config = self.config("moving", tag, "true")

        def engine(*args):
            return subprocess.run([self.engine, *args], capture_output=True, text=True, check=True).stdout.strip()

        self.addCleanup(subprocess.run, [self.engine, "rmi", tag], capture_output=True)
        ids = {}
        for image in (BUSYBOX_IMAGE, PYTHON_IMAGE):
            engine("tag", image, tag)
            ids[image] = engine("image", "inspect", "--format", "{{.Id}}", tag)
            for _ in range(2):  # the second run may use the remembered answer
                before = set(self.runs())
                result = self.process("run", config, "--pull", "never")
                self.assertEqual(result.returncode, 0, result.stderr)
                (run,) = set(self.runs()) - before
                self.assertEqual(self.meta(run)["image_id"], ids[image])
        self.assertNotEqual(ids[BUSYBOX_IMAGE], ids[PYTHON_IMAGE])
        engine("rmi", tag)
        result = self.process("run", config, "--pull", "never")
        self.assertEqual(result.returncode, 125)
        self.assertIn(f"runpilot: error: image {tag} is not present locally".encode(), result.stderr)
        self.assertEqual(len(self.runs()), 4)

    def test_ctrl_c_stops_container_and_leaves_nothing(self):
        proc = self.start(self.python_job("polite", POLITE))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 130, err)
        run = self.only_run()
        self.assertEqual((self.meta(run)["status"], self.db_rows()[0]["status"]), ("interrupted", "interrupted"))
        self.assertIn(b"got signal 2, saving checkpoint", (run / "logs.txt").read_bytes())
        self.assertEqual(self.metrics(run), [{"step": 1, "loss": 1.5}])
        self.assertEqual(self.leftovers(run.name), [])

    def test_sigterm_kills_a_stubborn_job_after_grace(self):
        proc = self.start(self.python_job("stubborn", STUBBORN), "--stop-timeout", "1")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 143, err)
        self.assertLess(time.monotonic() - sent, 20)
        run = self.only_run()
        self.assertEqual(self.meta(run)["status"], "interrupted")
        self.assertEqual(self.leftovers(run.name), [])

    def test_stop_from_another_terminal(self):
        proc = self.start(self.python_job("polite", POLITE))
        run = self.only_run()
        result = self.process("stop", run.name)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.decode().strip(), f"run {run.name} interrupted")
        proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 143)
        self.assertEqual(self.leftovers(run.name), [])

    def test_killed_runner_marks_lost_and_stop_removes_container(self):
        proc = self.start(self.python_job("polite", POLITE))
        run = self.only_run()
        proc.kill()
        proc.communicate()
        self.assertNotEqual(self.leftovers(run.name), [])  # the engine keeps the container alive
        listing = self.process("list")
        self.assertIn(b"lost", listing.stdout)
        self.assertIn(f"runpilot stop {run.name}".encode(), listing.stderr)
        self.assertEqual(self.meta(run)["status"], "lost")
        result = self.process("stop", run.name)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.leftovers(run.name), [])

    def test_timeout(self):
        config = self.python_job("slow", POLITE, extra="timeout: 2s\n")
        result = self.process("run", config)
        self.assertEqual(result.returncode, 124, result.stderr)
        run = self.only_run()
        self.assertEqual(self.meta(run)["status"], "timeout")
        self.assertEqual(self.leftovers(run.name), [])

    def test_full_disk_stops_the_container(self):
        disk = small_disk(self, "1m")
        config = self.config("big", BUSYBOX_IMAGE, "head -c 5000000 /dev/zero; sleep 60")
        started = time.monotonic()
        result = self.process("run", config, env={"RUNPILOT_HOME": str(disk)})
        self.assertLess(time.monotonic() - started, 40)
        self.assertEqual(result.returncode, 1)
        self.assertIn(b"(No space left on device); the job was stopped", result.stderr)
        self.assertNotIn(b"Traceback", result.stderr)
        run_id = next((disk / "runs").iterdir()).name
        self.assertEqual(self.leftovers(run_id), [])

    def test_detach_then_follow_the_logs(self):
        config = self.python_job("slow", 'import time\nfor i in range(3):\n    print(f"METRIC i={i}", flush=True)\n'
                                         '    time.sleep(0.5)\nprint("finished")\n')
        started = time.monotonic()
        result = self.process("run", "-d", config)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertLess(time.monotonic() - started, 10)
        run_id = result.stdout.decode().strip()
        self.assertRegex(run_id, r"^\d{8}-\d{6}-[0-9a-f]{6}$")
        followed = self.process("logs", "-f", run_id)
        self.assertEqual(followed.stdout, b"METRIC i=0\nMETRIC i=1\nMETRIC i=2\nfinished\n")
        run = self.home / "runs" / run_id
        self.assertEqual((self.meta(run)["status"], len(self.metrics(run))), ("succeeded", 3))
        self.assertEqual(self.leftovers(run_id), [])

    def test_rerun_uses_the_stored_config(self):
        config = self.config("again", BUSYBOX_IMAGE, 'echo "METRIC lr=$LR"', extra="env:\n  LR: 0.1\n")
        first = self.process("run", config, "--tag", "sweep=1")
        self.assertEqual(first.returncode, 0, first.stderr)
        old = self.only_run()
        config.unlink()  # the stored config is what counts now
        again = self.process("rerun", old.name, "--set", "env.LR=0.2")
        self.assertEqual(again.returncode, 0, again.stderr)
        new = next(p for p in self.runs() if p != old)
        meta = self.meta(new)
        self.assertEqual((meta["rerun_of"], meta["engine"], meta["tags"]), (old.name, self.engine, {"sweep": "1"}))
        self.assertEqual(self.metrics(new), [{"step": 1, "lr": 0.2}])
        self.assertEqual(meta["image_id"], self.meta(old)["image_id"])
        self.assertEqual(meta["warnings"], [])

    def test_ctrl_c_on_a_sweep_leaves_no_container(self):
        config = self.config("sweep-stop", BUSYBOX_IMAGE, "echo ready; sleep 60")
        proc = subprocess.Popen([sys.executable, str(RUNPILOT), "sweep", str(config), "--grid", "env.X=1,2,3",
                                 "--parallel", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(self._reap, proc)
        deadline = time.monotonic() + 60
        while len([r for r in self.runs() if (r / "logs.txt").exists() and b"ready" in (r / "logs.txt").read_bytes()]) < 2:
            self.assertLess(time.monotonic(), deadline, "the sweep's runs never started")
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
        self.assertEqual(proc.returncode, 130, err)
        statuses = sorted(self.meta(r)["status"] for r in self.runs())
        self.assertEqual(statuses, ["cancelled", "interrupted", "interrupted"])
        for run in self.runs():
            self.assertEqual(self.leftovers(run.name), [])

    def test_parallel_runs(self):
        config = self.config("par", BUSYBOX_IMAGE, "echo METRIC x=1")
        procs = [subprocess.Popen([sys.executable, str(RUNPILOT), "run", str(config)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE) for _ in range(16)]
        listings = []
        while any(p.poll() is None for p in procs):
            listed = self.process("list", "--all")
            listings.append((listed.returncode, listed.stderr.decode()[-500:]))
        errors = [p.communicate()[1] for p in procs]
        self.assertEqual([p.returncode for p in procs], [0] * 16, errors)
        self.assertEqual({rc for rc, _ in listings}, {0}, listings)
        self.assertEqual(len(self.runs()), 16)
        self.assertEqual(len({r["id"] for r in self.db_rows()}), 16)
        self.assertTrue(all(self.metrics(p) == [{"step": 1, "x": 1}] for p in self.runs()))


class DockerIntegration(EngineCase):
    engine = "docker"

    def test_a_user_outside_the_docker_group_is_told_how_to_fix_it(self):
        # The daemon's socket is root:docker 0660; `nobody` gets "permission denied" from it. Without
        # being told, RunPilot took the image for missing and said "could not pull image".
        if os.geteuid() != 0:
            self.skipTest("switching to the user nobody needs root")
        python = python_for_nobody()
        if python is None:
            self.skipTest("no Python 3.10+ that the user nobody can run")
        folder = self.tmp / "nobody"
        folder.mkdir()
        (folder / "runpilot.py").write_bytes(RUNPILOT.read_bytes())
        config = folder / "config.yaml"
        config.write_text(f"name: nobody\nimage: {BUSYBOX_IMAGE}\nentrypoint: [\"true\"]\n")
        for path in (self.tmp, folder):
            path.chmod(0o777)
        home = folder / "home"
        result = subprocess.run([python, str(folder / "runpilot.py"), "run", str(config), "--engine", "docker"],
                                user="nobody", capture_output=True, timeout=120,
                                env={"PATH": os.environ["PATH"], "RUNPILOT_HOME": str(home)})
        self.assertEqual(result.returncode, 125, result.stderr)
        self.assertEqual(result.stderr.decode().splitlines(), [
            "runpilot: error: this user may not use the docker engine (permission denied on /var/run/docker.sock);"
            " add it to the docker group ('sudo usermod -aG docker $USER', then log in again), or use rootless"
            " Docker or Podman"])
        self.assertFalse((home / "runs").exists() and any((home / "runs").iterdir()))


class PodmanIntegration(EngineCase):
    engine = "podman"


del EngineCase  # the base class itself runs no test

if __name__ == "__main__":
    unittest.main()
