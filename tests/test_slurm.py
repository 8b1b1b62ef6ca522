"""The same config on a Slurm cluster (issue 16): `--on slurm`, against a real one-node cluster.

Unit tests cover the batch script, the sbatch options and the state mapping without Slurm.
The integration tests submit real jobs (tests/slurm/setup.sh starts the cluster; .ci/run does it):
they skip with the reason where no cluster answers, and fail where RUNPILOT_TEST_SLURM=1.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from unittest import mock

import runpilot
from tests.common import RUNPILOT, HomeTestCase
from tests.support import cancel_slurm_jobs, containers_with_label, require_engine, require_slurm


class BatchScript(HomeTestCase):
    def config(self, slurm: dict | None = None, **extra) -> runpilot.JobConfig:
        data = {"name": "x", "engine": "podman", "image": "img", "entrypoint": "python train.py",
                "resources": {"gpus": 2, "cpu": 3.5, "memory": "8g"}, "timeout": "1h",
                "slurm": slurm or {"partition": "gpu", "account": "lab", "qos": "high", "constraint": "a100",
                                   "python": "/opt/py/bin/python3", "setup": ["module load cuda", "echo go"],
                                   "extra": ["--exclusive", "--mail-type=END"]}, **extra}
        return runpilot.validate_config(data, str(self.work / "c.yaml"), base_dir=self.work)

    def test_options_from_resources_and_the_slurm_section(self):
        lines = runpilot.sbatch_lines(self.config(), "abc123", "/h/runs/R/slurm-%j.out")
        self.assertEqual(lines, ["--job-name=runpilot-abc123", "--output=/h/runs/R/slurm-%j.out", "--nodes=1",
                                 "--ntasks=1", "--partition=gpu", "--time=01:05:00", "--account=lab", "--qos=high",
                                 "--constraint=a100", "--gpus=2", "--cpus-per-task=4", "--mem=8192M",
                                 "--exclusive", "--mail-type=END"])
        gres = self.config(slurm={"gpu_flag": "gres", "time": "2-00:00:00"})
        self.assertIn("--gres=gpu:2", runpilot.sbatch_lines(gres, "a", "o"))
        self.assertIn("--time=2-00:00:00", runpilot.sbatch_lines(gres, "a", "o"))
        self.assertIn("--time=01:30:00", runpilot.sbatch_lines(self.config(slurm={"time": "90m"}), "a", "o"))
        self.assertIn("--array=0-9%3", runpilot.sbatch_lines(self.config(), "a", "o", "0-9%3"))

    def test_the_script_runs_this_file_on_the_node(self):
        config = self.config()
        script = runpilot.slurm_script(config, ["--nodes=1"], Path("/h/runs/R/runpilot.py"), "/h/runs/R")
        self.assertEqual(script.splitlines()[2:], ["#SBATCH --nodes=1", "module load cuda", "echo go",
                                                   "exec /opt/py/bin/python3 /h/runs/R/runpilot.py _slurm-job /h/runs/R"])
        self.assertTrue(script.startswith("#!/bin/sh\n"))

    def test_the_slurm_section_is_validated_always(self):
        for bad, words in (({"partiton": "x"}, "did you mean 'partition'"), ({"time": "soon"}, "slurm.time"),
                           ({"gpu_flag": "mig"}, "slurm.gpu_flag"), ({"extra": [1]}, "slurm.extra"),
                           ("gpu", "'slurm' must be a mapping"),
                           # a line break would end the #SBATCH block: the rest ran as shell on the node
                           ({"partition": "debug\ntouch /tmp/x"}, "slurm.partition must be one line of text"),
                           ({"account": "lab\r"}, "slurm.account must be one line"),
                           ({"extra": ["--array=0-3"]}, "slurm.extra sets --array, which RunPilot sets itself"),
                           ({"extra": ["-J other"]}, "slurm.extra sets -J")):
            with self.subTest(bad=bad), self.assertRaises(runpilot.ConfigError) as caught:
                self.config(slurm=bad)
            self.assertIn(words, str(caught.exception))

    def test_states(self):
        table = {"PENDING": "queued", "REQUEUED": "queued", "RUNNING": "running", "COMPLETING": "running",
                 "CANCELLED": "interrupted", "CANCELLED by 0": "interrupted", "TIMEOUT": "timeout",
                 "OUT_OF_MEMORY": "failed", "FAILED": "failed", "NODE_FAIL": "lost", "BOOT_FAIL": "lost",
                 "PREEMPTED": "lost"}
        for state, status in table.items():
            with self.subTest(state=state):
                self.assertEqual(runpilot.slurm_status(state), status)

    def test_a_job_whose_runner_recorded_nothing(self):
        # a runner killed on the node is not the job failing with 137; a job cancelled in the queue never ran
        cases = [("running", "FAILED", "0:9", "lost", None, "ended without recording how the run ended"),
                 ("running", "COMPLETED", "0:0", "lost", None, "ended without recording how the run ended"),
                 ("running", "CANCELLED", "0:15", "interrupted", 143, "Slurm ended job 7: CANCELLED"),
                 ("running", "OUT_OF_MEMORY", "0:9", "failed", 137, "OUT_OF_MEMORY"),
                 ("queued", "CANCELLED", "0:0", "cancelled", None, "was cancelled before it started"),
                 ("queued", "FAILED", "2:0", "failed", None, "RunPilot never started on node vm")]
        for before, state, exit_code, status, code, reason in cases:
            with self.subTest(before=before, state=state):
                meta = runpilot.RunMeta("20261128-000000-abcdef", status=before, slurm={"job_id": "7"})
                runpilot._record_slurm_ending(meta, state, {"ExitCode": exit_code, "NodeList": "vm"}, self.home,
                                              seen_running=before == "running")
                self.assertEqual((meta.status, meta.exit_code), (status, code))
                self.assertIn(reason, meta.reason)

    def test_options_slurm_cannot_honour_are_refused(self):
        config = self.write("c.yaml", "name: x\nengine: local\nentrypoint: 'true'\n")
        for argv, words in ((("run", config, "--engine", "docker"), "--engine cannot be given with --on slurm"),
                            (("run", config, "--gpus", "0"), "--gpus cannot be given with --on slurm"),
                            (("sweep", config, "--grid", "env.A=1,2", "--fail-fast"), "--fail-fast cannot be given")):
            with self.subTest(argv=argv):
                code, out, err = self.cli(*argv, "--on", "slurm", "--dry-run")
                self.assertEqual(code, 2, err)
                self.assertIn(words, err)
        with mock.patch.dict(os.environ, {"RUNPILOT_HOME": str(self.tmp / "my home")}):
            code, out, err = self.cli("run", config, "--on", "slurm", "--dry-run")
        self.assertEqual(code, 2)
        self.assertIn("holds a space, '%', a backslash or a quote, which sbatch's --output cannot take", err)

    def test_a_sweeps_dry_run_shows_control_characters_escaped(self):
        config = self.write("c.yaml", "name: x\nengine: local\nentrypoint: 'true'\n"
                                      "slurm: {setup: \"echo \\e]0;owned\\a\"}\n")
        code, out, err = self.cli("sweep", config, "--grid", "env.A=1,2", "--on", "slurm", "--dry-run")
        self.assertEqual(code, 0, err)
        self.assertIn("\necho \\x1b]0;owned\\x07\n", out)

    def test_squeue_scontrol_and_time_left(self):
        rows = runpilot.parse_squeue("84_1|PENDING|Priority||debug\n81|RUNNING|None|vm|debug\nbad\n")
        self.assertEqual(rows, {"84_1": {"state": "PENDING", "reason": "Priority", "node": None, "partition": "debug"},
                                "81": {"state": "RUNNING", "reason": None, "node": "vm", "partition": "debug"}})
        info = runpilot.parse_scontrol("JobId=46 JobState=FAILED Reason=JobLaunchFailure ExitCode=0:53 NodeList=vm")
        self.assertEqual((info["JobState"], info["ExitCode"]), ("FAILED", "0:53"))
        for text, seconds in (("59", 59), ("4:59", 299), ("1:04:59", 3899), ("2-01:04:59", 176699),
                              ("UNLIMITED", None), ("INVALID", None)):
            self.assertEqual(runpilot.parse_slurm_duration(text), seconds)

    def test_dry_run_prints_the_script_and_records_nothing(self):
        config = self.write("c.yaml", "name: x\nengine: local\nentrypoint: 'true'\nslurm: {partition: debug}\n")
        code, out, err = self.cli("run", config, "--on", "slurm", "--dry-run")
        self.assertEqual(code, 0, err)
        self.assertIn("#SBATCH --partition=debug", out)
        self.assertIn("_slurm-job RUN_FOLDER", out)
        self.assertFalse(self.home.exists())

    def test_a_job_array_cannot_sweep_resources(self):
        config = self.write("c.yaml", "name: x\nengine: local\nentrypoint: 'true'\n")
        code, out, err = self.cli("sweep", config, "--grid", "resources.cpu=1,2", "--on", "slurm")
        self.assertEqual(code, 2, err)
        self.assertIn("a Slurm job array gives every point the same resources", err)


class SlurmCase(HomeTestCase):
    def setUp(self) -> None:
        super().setUp()
        require_slurm(self)
        self.addCleanup(self.cancel_leftovers)

    def cancel_leftovers(self) -> None:
        jobs = []
        for run in self.runs():
            job = self.meta(run).get("slurm", {}).get("job_id") if (run / "meta.json").exists() else None
            if job:
                jobs.append(str(job).split("_")[0])
        cancel_slurm_jobs(*sorted(set(jobs)))

    def config(self, entrypoint: str, slurm: str = "", engine: str = "local", extra: str = "") -> Path:
        return self.write("job.yaml", f"name: on-slurm\nengine: {engine}\nentrypoint: {json.dumps(entrypoint)}\n"
                                      f"slurm:\n  python: {json.dumps(sys.executable)}\n{slurm}{extra}")

    def submit(self, config: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return self.process("run", config, "--on", "slurm", *args, timeout=timeout)


class AttachedAndDetached(SlurmCase):
    def test_attached_streams_and_exits_with_the_jobs_status(self):
        config = self.config("echo on $SLURMD_NODENAME; echo METRIC loss=0.25; exit 3", extra="metrics: [loss]\n")
        result = self.submit(config)
        self.assertEqual(result.returncode, 3, result.stderr)
        node = runpilot.hostname()
        self.assertEqual(result.stdout, f"on {node}\nMETRIC loss=0.25\n".encode())
        self.assertRegex(result.stderr.decode(), r"submitted to Slurm as job \d+")
        self.assertIn(b"failed in", result.stderr)
        run = self.only_run()
        meta = self.meta(run)
        self.assertEqual((meta["status"], meta["exit_code"]), ("failed", 3))
        self.assertEqual(meta["slurm"]["node"], node)
        self.assertEqual(meta["host"], node)
        self.assertIn(meta["slurm"]["state"], ("COMPLETED", "FAILED"))  # Slurm's last word, not RUNNING
        self.assertIn("reason", meta["slurm"])
        for name in ("slurm.sh", "runpilot.py", "logs.txt", "metrics.json"):
            self.assertTrue((run / name).exists(), name)
        self.assertEqual((run / "runpilot.py").read_bytes(), RUNPILOT.read_bytes())
        self.assertEqual(json.loads((run / "metrics.json").read_text()), [{"step": 1, "loss": 0.25}])
        rows = json.loads(self.cli("list", "--json")[1])
        self.assertEqual((rows[0]["status"], rows[0]["exit_code"]), ("failed", 3))

    def test_detached_then_logs_follow(self):
        config = self.config("for i in 1 2 3; do echo tick $i; sleep 1; done")
        result = self.submit(config, "-d")
        self.assertEqual(result.returncode, 0, result.stderr)
        run_id = result.stdout.decode().strip()
        self.assertRegex(run_id, r"^\d{8}-\d{6}-[0-9a-f]{6}$")
        self.assertIn(json.loads(self.cli("list", "--json")[1])[0]["status"], ("queued", "running"))
        logs = self.process("logs", "-f", run_id, timeout=120)
        self.assertEqual(logs.stdout, b"tick 1\ntick 2\ntick 3\n")
        self.assertEqual(json.loads(self.cli("list", "--json")[1])[0]["status"], "succeeded")

    def test_sbatch_refusing_leaves_nothing(self):
        config = self.config("true", slurm="  partition: no-such-partition\n")
        result = self.submit(config)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(result.stderr.count(b"\n"), 1, result.stderr)
        self.assertIn(b"sbatch refused the job: sbatch: error: Batch job submission failed: Invalid partition name "
                      b"specified; check the slurm: section", result.stderr)
        self.assertEqual(self.runs(), [])
        self.assertEqual(json.loads(self.cli("list", "--json")[1]), [])

    def test_the_engine_missing_on_the_node_fails_the_run_with_the_reason(self):
        config = self.config("echo never", engine="podman", slurm="  setup: export PATH=/nonexistent\n",
                              extra="image: runpilot-test-busybox:latest\n")
        result = self.submit(config)
        self.assertNotEqual(result.returncode, 0)
        meta = self.meta(self.only_run())
        self.assertEqual(meta["status"], "failed")
        self.assertIn("podman is not installed", meta["reason"])
        self.assertIn(b"podman is not installed", result.stderr)


    def test_python_missing_on_the_node_is_reported(self):
        config = self.config("echo never").read_text().replace(json.dumps(sys.executable), "/nonexistent/python3")
        result = self.submit(self.write("nopython.yaml", config))
        self.assertNotEqual(result.returncode, 0)
        meta = self.meta(self.only_run())
        self.assertEqual(meta["status"], "failed")
        self.assertIn("RunPilot never started on node", meta["reason"])
        self.assertIn("slurm.python", meta["reason"])
        self.assertIn(b"slurm.python", result.stderr)


class StopAndLimits(SlurmCase):
    def test_stop_cancels_the_job_and_the_run_ends_interrupted(self):
        config = self.config("echo ready; sleep 120")
        result = self.submit(config, "-d")
        run_id = result.stdout.decode().strip()
        deadline = time.monotonic() + 60
        while json.loads(self.cli("list", "--json")[1])[0]["status"] != "running":
            self.assertLess(time.monotonic(), deadline, "the job never ran")
            time.sleep(0.5)
        code, out, err = self.cli("stop", run_id)
        self.assertEqual((code, out.strip()), (0, f"run {run_id} interrupted"), err)
        meta = self.meta(self.only_run())
        self.assertEqual(meta["status"], "interrupted")

    def test_stop_leaves_no_container_on_the_node(self):
        for engine in ("docker", "podman"):
            with self.subTest(engine=engine):
                require_engine(self, engine)
                config = self.config("echo ready; sleep 120", engine=engine,
                                     extra="image: runpilot-test-busybox:latest\n")
                run_id = self.submit(config, "-d").stdout.decode().strip()
                deadline = time.monotonic() + 60
                while b"ready" not in (self.home / "runs" / run_id / "logs.txt").read_bytes() \
                        if (self.home / "runs" / run_id / "logs.txt").exists() else True:
                    self.assertLess(time.monotonic(), deadline, "the job never ran")
                    time.sleep(0.5)
                code, out, err = self.cli("stop", run_id)
                self.assertEqual((code, out.strip()), (0, f"run {run_id} interrupted"), err)
                self.assertEqual(containers_with_label(engine, f"runpilot.run_id={run_id}"), [])

    def test_ctrl_c_on_an_attached_run_cancels_it(self):
        config = self.config("echo ready; sleep 120")
        proc = subprocess.Popen([sys.executable, str(RUNPILOT), "run", str(config), "--on", "slurm"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertEqual(proc.stdout.readline(), b"ready\n")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        self.assertEqual(proc.returncode, 130, err)
        self.assertIn(b"stopping Slurm job", err)
        self.assertIn(b"the job gets SIGINT through its runner", err)
        self.assertEqual(self.meta(self.only_run())["status"], "interrupted")
        self.assertEqual(self.meta(self.only_run())["reason"], "stopped by Ctrl-C (the job got SIGINT)")

    def test_a_slurm_time_limit_ends_the_run_as_timeout(self):
        config = self.config("echo start; sleep 300", slurm="  time: 1\n")
        started = time.monotonic()
        result = self.submit(config, timeout=200)
        self.assertEqual(result.returncode, 124, result.stderr)
        self.assertLess(time.monotonic() - started, 120)
        meta = self.meta(self.only_run())
        self.assertEqual(meta["status"], "timeout")
        self.assertIn("Slurm's time limit", meta["reason"])

    def test_a_home_the_node_cannot_see_is_reported(self):
        config = self.config("true", slurm="  extra: [--hold]\n")
        result = self.submit(config, "-d")
        self.assertEqual(result.returncode, 0, result.stderr)
        run = self.only_run()
        job = self.meta(run)["slurm"]["job_id"]
        hidden = run.with_name("hidden")
        run.rename(hidden)  # as if RUNPILOT_HOME were a folder of the login node only
        subprocess.run(["scontrol", "release", job], check=True)
        deadline = time.monotonic() + 60
        while subprocess.run(["squeue", "-h", "-j", f"{job},{job}"], capture_output=True, text=True).stdout.strip():
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.5)
        hidden.rename(run)
        code, out, err = self.cli("show", run.name)
        self.assertEqual(code, 0, err)
        meta = self.meta(run)
        self.assertEqual(meta["status"], "failed")
        self.assertIn("must be on a file system the nodes share", meta["reason"])
        self.assertIn("must be on a file system the nodes share", out)


class ControlOfSubmitted(SlurmCase):
    def test_ctrl_c_right_after_submitting_cancels_the_job(self):
        # between sbatch and the follow loop, Ctrl-C left the job queued in Slurm (and the run queued)
        config = self.config("true", slurm="  extra: [--hold]\n")
        proc = subprocess.Popen([sys.executable, str(RUNPILOT), "run", str(config), "--on", "slurm"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertIn(b"submitted to Slurm as job", proc.stderr.readline())
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        self.assertEqual(proc.returncode, 130, err)
        meta = self.meta(self.only_run())
        self.assertEqual(meta["status"], "cancelled", err)
        self.assertIn(b"runpilot exits with 130", err)
        queue = subprocess.run(["squeue", "-h", "-j", meta["slurm"]["job_id"]], capture_output=True, text=True)
        self.assertEqual(queue.stdout.strip(), "")

    def test_stop_and_resume_of_a_slurm_sweep(self):
        config = self.config("sleep 120", slurm="  extra: [--hold]\n")
        result = self.process("sweep", config, "--grid", "env.A=1,2", "--on", "slurm", "-d", timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        sweep_id = result.stdout.decode().strip()
        code, out, err = self.cli("sweep", "--resume", sweep_id)
        self.assertEqual(code, 2)
        self.assertIn("was submitted to Slurm, and --resume runs points here", err)
        code, out, err = self.cli("stop", sweep_id)
        self.assertEqual((code, out), (0, f"sweep {sweep_id}: 2 cancelled\n"), err)
        arrays = {self.meta(run)["slurm"]["array_job_id"] for run in self.runs()}
        queue = subprocess.run(["squeue", "-h", "-j", ",".join(arrays)], capture_output=True, text=True)
        self.assertEqual(queue.stdout.strip(), "")


class Arrays(SlurmCase):
    def test_a_sweep_is_one_job_array(self):
        config = self.config("echo METRIC loss=$LR; echo repeat=$RUNPILOT_REPEAT", extra="env: {LR: 1}\n")
        result = self.process("sweep", config, "--grid", "env.LR=0.1,0.2,0.3", "--on", "slurm", "--parallel", "2",
                              timeout=240)
        self.assertEqual(result.returncode, 0, result.stderr)
        sweep_dir = next((self.home / "sweeps").iterdir())
        script = (sweep_dir / "slurm.sh").read_text()
        self.assertIn("#SBATCH --array=0-2%2", script)
        self.assertEqual(len((sweep_dir / "runs.txt").read_text().splitlines()), 3)
        rows = json.loads(self.cli("list", "--json", "--sweep", sweep_dir.name)[1])
        self.assertEqual(sorted((r["status"], r["last_metrics"]["loss"]) for r in rows),
                         [("succeeded", 0.1), ("succeeded", 0.2), ("succeeded", 0.3)])
        jobs = {self.meta(self.home / "runs" / r["id"])["slurm"]["array_job_id"] for r in rows}
        self.assertEqual(len(jobs), 1)  # one sbatch call
