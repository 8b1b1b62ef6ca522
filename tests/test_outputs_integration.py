"""What a run makes (issue 23) on real engines: Docker and Podman containers, and the Slurm cluster.

Engine tests skip with the reason when the engine (or a test image) is missing here, and fail
when RUNPILOT_TEST_ENGINES names the engine; the Slurm test skips without a cluster and fails
when RUNPILOT_TEST_SLURM=1 (see tests/support.py).
"""

import grp
import json
import os
import pwd
import subprocess
import sys
import time
import unittest
from pathlib import Path

from tests.common import RUNPILOT, HomeTestCase
from tests.support import python_for_nobody, BUSYBOX_IMAGE, PYTHON_IMAGE, cancel_slurm_jobs, require_engine, require_slurm

# Writes a checkpoint (and one in a folder of its own), and a scratch file in its working folder.
JOB = """\
import os
print("version", open("version.txt").read().strip(), flush=True)
out = os.environ["RUNPILOT_OUTPUT_DIR"]
os.makedirs(os.path.join(out, "epoch1"), exist_ok=True)
open(os.path.join(out, "ckpt.pt"), "wb").write(b"c" * 4096)
open(os.path.join(out, "epoch1", "ckpt.pt"), "wb").write(b"e" * 100)
print("scratch seen:", os.path.exists("scratch.txt"), flush=True)
open("scratch.txt", "w").write("mine")
print("output dir:", out, flush=True)
"""


class EngineCase(HomeTestCase):
    engine = ""

    def setUp(self) -> None:
        super().setUp()
        require_engine(self, self.engine)
        self.src = self.work / "src"
        self.src.mkdir()
        (self.src / "train.py").write_text(JOB)
        (self.src / "version.txt").write_text("1\n")

    def config(self, image: str = PYTHON_IMAGE, entrypoint: str = "python train.py", extra: str = "") -> Path:
        return self.write("c.yaml", f"name: outputs\nengine: {self.engine}\nimage: {json.dumps(image)}\n"
                                    f"entrypoint: {json.dumps(entrypoint)}\nmounts: {{code: ./src}}\n{extra}")

    def run_ok(self, *args) -> subprocess.CompletedProcess:
        result = self.process(*args)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result

    def newest(self) -> Path:
        return self.home / "runs" / self.run_ok("list", "-q", "--limit", "1").stdout.decode().strip()

    def test_a_checkpoint_is_the_users_is_listed_and_deleted(self):
        first = self.run_ok("run", self.config())
        self.assertEqual(first.stdout, b"version 1\nscratch seen: False\noutput dir: /outputs\n")
        run = self.only_run()
        self.assertEqual((run / "outputs" / "ckpt.pt").read_bytes(), b"c" * 4096)
        for path in (run / "outputs" / "ckpt.pt", run / "outputs" / "epoch1"):
            self.assertEqual(path.stat().st_uid, os.geteuid())
        shown = self.run_ok("show", "latest").stdout.decode()
        self.assertIn("outputs    2 file(s), 4.1 KiB\n     4.0 KiB  ckpt.pt\n       100 B  epoch1/ckpt.pt\n", shown)
        # the scratch file stayed with the run: not in the user's folder, not seen by the next run
        self.assertFalse((self.src / "scratch.txt").exists())
        self.assertEqual((run / "code" / "scratch.txt").read_text(), "mine")
        second = self.run_ok("run", self.config())
        self.assertIn(b"scratch seen: False\n", second.stdout)
        self.assertIn(b"freed", self.run_ok("rm", "-y", run.name).stdout)
        self.assertFalse(run.exists())

    def test_outputs_path_can_be_chosen(self):
        result = self.run_ok("run", self.config(extra="outputs: /ckpt\n"))
        self.assertIn(b"output dir: /ckpt\n", result.stdout)
        self.assertTrue((self.only_run() / "outputs" / "ckpt.pt").is_file())

    def test_rerun_runs_the_code_of_its_run_and_current_code_todays(self):
        self.run_ok("run", self.config())
        old = self.only_run()
        (self.src / "version.txt").write_text("2\n")
        self.assertEqual(self.run_ok("rerun", old.name).stdout.splitlines()[0], b"version 1")
        result = self.run_ok("rerun", old.name, "--current-code")
        self.assertEqual(result.stdout.splitlines()[0], b"version 2")
        self.assertIn(f"the code changed since run {old.name}: 1 modified (version.txt)".encode(), result.stderr)

    def test_rerun_runs_the_recorded_image_when_its_tag_moved(self):
        tag = f"runpilot-test-moving-{os.getpid()}:latest"
        subprocess.run([self.engine, "tag", BUSYBOX_IMAGE, tag], check=True, capture_output=True)
        self.addCleanup(subprocess.run, [self.engine, "rmi", tag], capture_output=True)
        config = self.config(tag, "command -v python3 >/dev/null && echo python || echo busybox")
        self.assertEqual(self.run_ok("run", config).stdout, b"busybox\n")
        old = self.only_run()
        subprocess.run([self.engine, "tag", PYTHON_IMAGE, tag], check=True, capture_output=True)
        result = self.run_ok("rerun", old.name)
        self.assertEqual(result.stdout, b"busybox\n")
        image_id = self.meta(old)["image_id"]
        self.assertIn(f"image {tag} has moved since run {old.name}".encode(), result.stderr)
        recorded = self.meta(old)["repo_digests"][:1] or [image_id]  # Podman gives local images a digest too
        self.assertIn(f"running the recorded image {recorded[0]}\n".encode(), result.stderr)
        self.assertEqual(self.meta(self.newest())["image_id"], image_id)


class DockerOutputs(EngineCase):
    engine = "docker"

    def test_files_a_root_job_makes_belong_to_the_user_who_ran_runpilot(self):
        # Docker's jobs run as root; RunPilot run by `nobody` (in the docker group) must still own,
        # and be able to delete, what its job wrote.
        if os.geteuid() != 0:
            self.skipTest("switching to the user nobody needs root")
        try:
            grp.getgrnam("docker")
        except KeyError:
            self.skipTest("there is no docker group to put the user nobody in")
        python = python_for_nobody()
        if python is None:
            self.skipTest("no Python 3.10+ that the user nobody can run")
        nobody = pwd.getpwnam("nobody").pw_uid
        folder = self.tmp / "nobody"
        folder.mkdir()
        (folder / "runpilot.py").write_bytes(RUNPILOT.read_bytes())
        for path in (self.tmp, folder, self.work, self.src):
            path.chmod(0o777)
        env = {"PATH": os.environ["PATH"], "RUNPILOT_HOME": str(folder / "home")}

        def as_nobody(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([python, str(folder / "runpilot.py"), *args], user="nobody", extra_groups=["docker"],
                                  capture_output=True, timeout=120, env=env)

        result = as_nobody("run", str(self.config()))
        self.assertEqual(result.returncode, 0, result.stderr)
        run = next((folder / "home" / "runs").iterdir())
        owners = {str(p.relative_to(run)): p.stat().st_uid for p in [*run.rglob("*")]}
        self.assertEqual(set(owners.values()), {nobody}, owners)
        self.assertIn("outputs/epoch1/ckpt.pt", owners)
        self.assertIn("code/scratch.txt", owners)
        removed = as_nobody("rm", "-y", run.name)
        self.assertEqual(removed.returncode, 0, removed.stderr)
        self.assertFalse(run.exists())


class PodmanOutputs(EngineCase):
    engine = "podman"


del EngineCase  # the base class itself runs no test


class SlurmOutputs(HomeTestCase):
    def setUp(self) -> None:
        super().setUp()
        require_slurm(self)
        self.addCleanup(self.cancel_leftovers)

    def cancel_leftovers(self) -> None:
        jobs = [str(self.meta(r).get("slurm", {}).get("job_id", "")).split("_")[0] for r in self.runs()
                if (r / "meta.json").exists()]
        cancel_slurm_jobs(*sorted({j for j in jobs if j}))

    def config(self) -> tuple[Path, Path]:
        src = self.work / "src"
        src.mkdir()
        (src / "train.py").write_text(JOB)
        (src / "version.txt").write_text("1\n")
        return src, self.write("c.yaml", f"name: on-slurm\nengine: local\nentrypoint: [{json.dumps(sys.executable)}, "
                                         f"train.py]\nmounts: {{code: ./src}}\n"
                                         f"slurm:\n  python: {json.dumps(sys.executable)}\n")

    def test_every_point_of_a_submitted_sweep_runs_the_code_of_its_submission(self):
        src, config = self.config()
        submitted = self.process("sweep", config, "--grid", "env.X=1,2", "--on", "slurm", "-d")
        self.assertEqual(submitted.returncode, 0, submitted.stderr)
        (src / "version.txt").write_text("2\n")
        sweep_id = submitted.stdout.decode().strip()
        deadline = time.monotonic() + 180
        while True:
            rows = json.loads(self.process("list", "--json", "--sweep", sweep_id).stdout)
            if all(r["status"] not in ("queued", "running") for r in rows) or time.monotonic() > deadline:
                break
            time.sleep(1)
        self.assertEqual([r["status"] for r in rows], ["succeeded", "succeeded"])
        for row in rows:
            self.assertEqual((Path(row["path"]) / "logs.txt").read_text().splitlines()[0], "version 1")
            self.assertEqual(row["outputs_bytes"], 4196)
        self.assertEqual(len({self.meta(Path(r["path"]))["code"]["snapshot"] for r in rows}), 1)

    def test_the_node_runs_the_snapshot_taken_at_submission_and_keeps_its_outputs(self):
        src, config = self.config()
        submitted = self.process("run", config, "--on", "slurm", "-d")
        self.assertEqual(submitted.returncode, 0, submitted.stderr)
        (src / "version.txt").write_text("2\n")  # an edit after the submission changes nothing the node runs
        run_id = submitted.stdout.decode().strip()
        logs = self.process("logs", "-f", run_id, timeout=180)
        run = self.home / "runs" / run_id
        self.assertEqual(logs.stdout, f"version 1\nscratch seen: False\noutput dir: {run / 'outputs'}\n".encode())
        self.assertEqual((run / "outputs" / "ckpt.pt").read_bytes(), b"c" * 4096)
        meta = self.meta(run)
        self.assertEqual((meta["status"], meta["code"]["mode"]), ("succeeded", "snapshot"))
        self.assertFalse((src / "scratch.txt").exists())


if __name__ == "__main__":
    unittest.main()
