"""Truth and safety (issue 21): GPU claims machine-wide, a sweep point never runs twice, a locked
index holds up nothing, orphans, Slurm values that would inject options, bounded work, tracebacks.

No engine is needed: GPUs are the tests/fixtures/nvidia-smi stand-in, jobs run with engine local,
sbatch's command line is built and checked without a cluster (tests/test_safety2_integration.py
submits to the real one).
"""

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

import runpilot
from tests.common import ROOT, RUNPILOT, HomeTestCase, LiveRun, RunsHome, pid_alive, small_disk

FIXTURES = ROOT / "tests" / "fixtures"

# A job that holds its GPUs until killed, saying which it got.
HOLDER = "echo got $CUDA_VISIBLE_DEVICES; echo ready; exec sleep 60"
# A job that says which GPUs it got and ends.
SAYER = "echo got $CUDA_VISIBLE_DEVICES"


class ClaimsCase(HomeTestCase):
    """A machine-wide claims folder of the test's own (sticky, world-writable, like /tmp) and the
    two-GPU stand-in of nvidia-smi."""

    def setUp(self) -> None:
        super().setUp()
        self.shared = Path(tempfile.mkdtemp(prefix="runpilot-claims-"))
        self.addCleanup(shutil.rmtree, self.shared, True)
        os.chmod(self.shared, 0o1777)
        os.chmod(self.tmp, 0o755)
        patcher = mock.patch.dict(os.environ, {"PATH": f"{FIXTURES}:{os.environ['PATH']}",
                                               "FAKE_NVIDIA_SMI": "2xh100", "RUNPILOT_GPU_CLAIMS": str(self.shared)})
        patcher.start()
        self.addCleanup(patcher.stop)

    def config(self, script: str, gpus: object = 1, name: str = "g") -> Path:
        """A shell job (any user can run /bin/sh; the test's Python may live in root's home)."""
        path = self.write(f"{name}.yaml", f"name: {name}\nengine: local\nentrypoint: [sh, -c, {json.dumps(script)}]\n"
                                          f"resources: {{gpus: {json.dumps(gpus)}}}\n")
        for p in self.work.iterdir():
            os.chmod(p, 0o644)
        os.chmod(self.work, 0o755)
        return path

    def other_home(self, name: str = "home2") -> dict:
        return {"RUNPILOT_HOME": str(self.tmp / name)}


class MachineWideGpuClaims(ClaimsCase):
    def test_two_homes_never_both_get_gpu_0(self):
        live = LiveRun(self, self.config(HOLDER), "--gpus", "0")
        code, out, err = self.cli("run", self.config(SAYER, name="b"), "--gpus", "0", "--no-wait",
                                  env=self.other_home())
        self.assertEqual(code, 1, err)
        self.assertIn(f"waiting for 1 GPU: GPU 0 is held by pid {live.proc.pid} of user root", err)
        code, out, err = self.cli("run", self.config(SAYER, name="b"), "--no-wait", env=self.other_home())
        self.assertEqual(code, 0, err)
        self.assertIn("got 1", out)  # the other home's run gets the GPU nobody holds
        live.proc.kill()
        live.finish()
        # the SIGKILLed runner's claim file stays behind, unlocked: GPU 0 is free again for everyone
        code, out, err = self.cli("run", self.config(SAYER, name="b"), "--gpus", "0", "--no-wait",
                                  env=self.other_home())
        self.assertEqual(code, 0, err)
        self.assertIn("got 0", out)

    def test_claim_files_are_private_and_removed_when_the_run_ends(self):
        live = LiveRun(self, self.config(HOLDER), "--gpus", "1")
        files = list(self.shared.glob("runpilot-gpu-1.*.lock"))
        self.assertEqual(len(files), 1, files)
        self.assertEqual(files[0].stat().st_mode & 0o777, 0o600)
        live.proc.send_signal(signal.SIGINT)
        live.finish()
        self.assertEqual(list(self.shared.iterdir()), [])

    def test_an_unlocked_file_of_another_user_is_no_claim(self):
        for name in ("runpilot-gpu-0.1-aaaa.lock", "runpilot-gpu-1.2-bbbb.lock"):
            (self.shared / name).write_text("")
            os.chown(self.shared / name, 65534, 65534)
        code, out, err = self.cli("run", self.config(SAYER, gpus=2), "--no-wait")
        self.assertEqual(code, 0, err)
        self.assertIn("got 0,1", out)
        self.assertEqual(len(list(self.shared.iterdir())), 2)  # another user's files are left alone

    def test_an_unsafe_claims_folder_is_refused_in_one_line(self):
        os.chmod(self.shared, 0o777)  # world-writable, not sticky: anyone could remove a claim
        code, out, err = self.cli("run", self.config(SAYER), "--no-wait")
        self.assertEqual(code, 1)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn(f"the GPU claims folder {self.shared} is writable by others but not sticky", err)

    def test_claims_race_never_double_books(self):
        claims = [runpilot.GpuClaims(self.tmp / f"h{i}", machine=self.shared) for i in range(2)]
        for _ in range(50):
            got = [c.try_claim(1, ("0",), ["0"], {"run_id": "x"}) for c in claims]
            self.assertLessEqual(sum(g is not None for g in got), 1)
            for g in got:
                if g is not None:
                    g.release()

    def test_proc_locks_is_parsed(self):
        text = ("1: POSIX  ADVISORY  WRITE 10460 fe:00:16638148 0 EOF\n"
                "2: FLOCK  ADVISORY  WRITE 3170 00:2d:1499240 0 EOF\n"
                "2: -> FLOCK  ADVISORY  WRITE 3171 00:2d:1499240 0 EOF\n")
        self.assertEqual(runpilot.parse_proc_locks(text), {(0, 0x2d, 1499240): 3170})


class TwoUsers(ClaimsCase):
    """A second Unix user (nobody) on the same machine, with its own home."""

    def setUp(self) -> None:
        super().setUp()
        if os.geteuid() != 0 or not shutil.which("setpriv"):
            self.skipTest("needs root and setpriv to run a second runner as another user")
        self.home2 = self.tmp / "nobody-home"
        self.home2.mkdir()
        os.chown(self.home2, 65534, 65534)

    def as_nobody(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        env = {**os.environ, "RUNPILOT_HOME": str(self.home2), "HOME": str(self.home2)}
        return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               sys.executable, str(RUNPILOT), *args], capture_output=True, text=True,
                              env=env, timeout=60, cwd=str(self.home2), **kwargs)

    def test_two_users_never_both_get_gpu_0(self):
        probe = self.as_nobody("--version")
        if probe.returncode != 0:
            self.skipTest(f"user nobody cannot run RunPilot from here: {probe.stderr.strip()}")
        live = LiveRun(self, self.config(HOLDER), "--gpus", "0")
        done = self.as_nobody("run", str(self.config(SAYER, name="b")), "--gpus", "0", "--no-wait")
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn(f"GPU 0 is held by pid {live.proc.pid} of user root", done.stderr)
        done = self.as_nobody("run", str(self.config(SAYER, name="b")), "--no-wait")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("got 1", done.stdout)
        live.proc.kill()
        live.finish()
        # root's stale claim file is private: nobody cannot open (or lock) it, and it is no claim
        stale = list(self.shared.glob("runpilot-gpu-0.*.lock"))
        self.assertEqual([p.stat().st_uid for p in stale], [0])
        done = self.as_nobody("run", str(self.config(SAYER, name="b")), "--gpus", "0", "--no-wait")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("got 0", done.stdout)

    def test_another_users_live_claim_blocks_a_root_run(self):
        probe = self.as_nobody("--version")
        if probe.returncode != 0:
            self.skipTest(f"user nobody cannot run RunPilot from here: {probe.stderr.strip()}")
        env = {**os.environ, "RUNPILOT_HOME": str(self.home2), "HOME": str(self.home2)}
        proc = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                                 str(RUNPILOT), "run", str(self.config(HOLDER, name="b")), "--gpus", "1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(self.home2))
        self.addCleanup(lambda: (proc.poll() is None and proc.send_signal(signal.SIGINT), proc.communicate()))
        while b"ready" not in (line := proc.stdout.readline()):
            if not line:
                self.fail(proc.stderr.read())
        code, out, err = self.cli("run", self.config(SAYER), "--gpus", "1", "--no-wait")
        self.assertEqual(code, 1, err)
        self.assertIn("GPU 1 is held by pid", err)
        self.assertIn("of user nobody", err)


# A sweep point that notes it started (one line per start) and holds for env HOLD seconds.
NOTED = """\
import os, time
with open("started.txt", "a") as f:
    f.write(os.environ["HOLD"] + "\\n")
open(os.environ["RUNPILOT_RUN_ID"] + ".pid", "w").write(str(os.getpid()))
time.sleep(float(os.environ["HOLD"]))
"""


class ResumeOnce(HomeTestCase):
    """A sweep point never runs twice: --resume holds the sweep, and leaves a point whose job lives."""

    def sweep_in_background(self, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(RUNPILOT), "sweep", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=os.environ.copy())
        self.addCleanup(lambda: (proc.poll() is None and proc.kill(), proc.communicate()))
        return proc

    def started(self) -> list[str]:
        path = self.work / "started.txt"
        return path.read_text().split() if path.exists() else []

    def wait_for(self, condition, what: str, limit: float = 30) -> None:
        deadline = time.monotonic() + limit
        while not condition():
            self.assertLess(time.monotonic(), deadline, f"never: {what}")
            time.sleep(0.05)

    def kill_jobs(self) -> None:
        for pid_file in self.work.glob("*.pid"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)

    def test_two_resumes_at_once_and_a_live_orphan_run_each_point_once(self):
        self.addCleanup(self.kill_jobs)
        config = self.local_config(NOTED, name="sw")
        first = self.sweep_in_background(str(config), "--grid", "env.HOLD=30,4,0.1")
        self.wait_for(lambda: self.started() == ["30"], "the first point started")
        sweep_id = next(self.home.joinpath("sweeps").iterdir()).name
        first.kill()  # the runner dies; the first point's job lives on
        first.communicate()
        resume = self.sweep_in_background("--resume", sweep_id)
        self.wait_for(lambda: self.started() == ["30", "4"], "the resume started the second point")
        code, out, err = self.cli("sweep", "--resume", sweep_id)
        self.assertEqual(code, 2, err)
        self.assertEqual(err, f"runpilot: error: sweep {sweep_id} is being run by another runpilot "
                              f"(pid {resume.pid}); wait for it to end, or stop it first "
                              f"(runpilot stop {sweep_id})\n")
        _, resumed = resume.communicate(timeout=60)
        self.assertEqual(resume.returncode, 0, resumed)
        self.assertIn(b"point 1 of sweep", resumed)
        self.assertIn(b"is still running (its runner died, its job lives on)", resumed)
        self.assertEqual(sorted(self.started()), ["0.1", "30", "4"])  # no point started twice
        points = json.loads((self.home / "sweeps" / sweep_id / "sweep.json").read_text())["points"]
        self.assertEqual(len({p["run_id"] for p in points}), 3)
        self.assertEqual(len(self.runs()), 3)  # no run outside the sweep's plan


class SlurmValuesInjectNothing(HomeTestCase):
    """A slurm: value is one sbatch value; slurm.extra never sets what RunPilot owns, however spelt."""

    def problems(self, slurm: dict) -> list[str]:
        data = {"name": "x", "image": "python:3.12-slim", "entrypoint": "true", "slurm": slurm}
        with self.assertRaises(runpilot.ConfigError) as caught:
            runpilot.validate_config(data, str(self.work / "c.yaml"), base_dir=self.work)
        return [p.message for p in [caught.exception] + caught.exception.others]

    def test_values_with_spaces_are_refused(self):
        for key, value in (("partition", "debug --job-name=pwned --array=0-1"), ("qos", "normal --output=/x"),
                           ("account", "a\\b"), ("constraint", "gpu'x")):
            with self.subTest(key=key):
                self.assertEqual(self.problems({key: value}),
                                 [f"slurm.{key} must be one word (sbatch would read the rest as options of its own): "
                                  f"no spaces, quotes or backslashes; got {value!r}"])

    def test_owned_options_in_every_spelling(self):
        for line, flag in (("-a0-2", "-a (as -a0-2)"), ("-Jhijack", "-J (as -Jhijack)"),
                           ("--out=/elsewhere-%j.out", "--output (as --out)"), ("--job=x", "--job-name (as --job)"),
                           ("--mail-type=END --array=0-1", "--array"), ("-vJx", "-J (as -vJx)"),
                           ("-o /x", "-o"), ("--arr 1-2", "--array (as --arr)"), ("--nt=2", "--ntasks (as --nt)"),
                           ("--exclusive '-N' 2", "-N"), ("--comment 'x", "--comment (a line sbatch cannot split: "
                                                                          "unbalanced quotes)")):
            with self.subTest(line=line):
                self.assertEqual(self.problems({"extra": [line]}),
                                 [f"slurm.extra sets {flag}, which RunPilot sets itself (job name, output, one node "
                                  "and task, the array of a sweep); leave it out"])

    def test_other_options_pass(self):
        data = {"name": "x", "image": "python:3.12-slim", "entrypoint": "true",
                "slurm": {"partition": "debug,gpu", "qos": "normal", "constraint": "a100&ib",
                          "extra": ["--exclusive", "-c4 --mail-type=END", "--nodelist=n1", "-x n2", "--no-requeue"]}}
        config = runpilot.validate_config(data, str(self.work / "c.yaml"), base_dir=self.work)
        lines = runpilot.sbatch_lines(config, "x", "out")
        self.assertIn("--partition=debug,gpu", lines)
        self.assertEqual(lines[-5:], data["slurm"]["extra"])


class OneLineNotTraceback(HomeTestCase):
    def quick(self) -> Path:
        return self.write("q.yaml", "name: q\nengine: local\nentrypoint: [sh, -c, 'echo hi']\n")

    def test_a_read_only_home_is_one_line(self):
        disk = small_disk(self, "4m")
        home = {"RUNPILOT_HOME": str(disk / "home")}
        done = self.process("run", self.quick(), env=home)
        self.assertEqual(done.returncode, 0, done.stderr)
        remount = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
        self.assertEqual(remount.returncode, 0, remount.stderr)
        for args, says in ((("rm", "-y", "latest"), "cannot delete run "),
                           (("run", "-d", self.quick()), "cannot start in the background: Read-only file system"),
                           (("sweep", "-d", self.quick(), "--grid", "env.A=1,2"), "cannot start in the background")):
            with self.subTest(args=args):
                done = self.process(*args, env=home)
                self.assertEqual(done.returncode, 1, done.stderr)
                lines = done.stderr.decode().splitlines()
                self.assertTrue(lines[-1].startswith(f"runpilot: error: {says}"), lines)
                self.assertNotIn("Traceback", done.stderr.decode())
        self.assertEqual(len(list((disk / "home" / "runs").iterdir())), 1)  # nothing half-deleted

    def test_a_wrongly_typed_sweep_json_is_one_line(self):
        code, out, err = self.cli("sweep", self.quick(), "--grid", "env.A=1,2")
        self.assertEqual(code, 0, err)
        path = next((self.home / "sweeps").iterdir()) / "sweep.json"
        sweep_id, good = path.parent.name, json.loads(path.read_text())
        for change, says in ((lambda d: d.update(points=[5]), "point 1 of 'points' is not an object with a run_id"),
                             (lambda d: d.update(options=[]), "'options' must be an object"),
                             (lambda d: d["points"][1].pop("run_id"), "point 2 of 'points' is not an object"),
                             (lambda d: d.update(points={}), "'points' must be a list")):
            data = json.loads(json.dumps(good))
            change(data)
            path.write_text(json.dumps(data))
            for args in (("stop", sweep_id), ("list", "--sweep", sweep_id), ("sweep", "--resume", sweep_id)):
                with self.subTest(says=says, args=args):
                    code, out, err = self.cli(*args)
                    self.assertNotIn("Traceback", err)
                    if args[0] == "list":  # the runs are listed from the index, in their start order
                        self.assertEqual((code, len(out.splitlines())), (0, 3), err)
                        continue
                    self.assertEqual(code, 1, err)
                    self.assertEqual(err, f"runpilot: error: cannot read {path}: {says}"
                                     + err.split(says, 1)[1].split("\n")[0] + "\n")


class BoundedWork(HomeTestCase):
    def quick(self) -> Path:
        return self.write("q.yaml", "name: q\nengine: local\nentrypoint: [sh, -c, 'echo hi']\n")

    def test_a_huge_plan_is_refused_in_one_line_at_once(self):
        for args, count, shape in ((("--grid", "env.A=1,2", "--repeat", "99999999999"), 199999999998,
                                    "2 env.A x 99999999999 repeats"),
                                   (("--grid", "env.A=" + ",".join(map(str, range(1000))),
                                     "--grid", "env.B=" + ",".join(map(str, range(1000)))), 1000000,
                                    "1000 env.A x 1000 env.B")):
            with self.subTest(count=count):
                started = time.monotonic()
                done = self.process("sweep", self.quick(), *args, "--dry-run")
                self.assertLess(time.monotonic() - started, 10)
                self.assertEqual(done.returncode, 2)
                self.assertEqual(done.stderr.decode(), f"runpilot: error: the sweep has {count} points ({shape}), "
                                 f"more than the limit of 10000; give fewer values, or --max-points {count} "
                                 "to run them all\n")
        self.assertFalse(self.home.exists())

    def test_max_points_raises_the_limit_and_the_plan_is_counted_past_50(self):
        code, out, err = self.cli("sweep", self.quick(), "--grid", "env.A=" + ",".join(map(str, range(60))),
                                  "--max-points", "59", "--dry-run")
        self.assertEqual(code, 2, err)
        self.assertIn("the sweep has 60 points (60 env.A), more than the limit of 59", err)
        code, out, err = self.cli("sweep", self.quick(), "--grid", "env.A=" + ",".join(map(str, range(60))),
                                  "--max-points", "60", "--dry-run")
        self.assertEqual(code, 0, err)
        self.assertEqual(err.splitlines()[-2:], ["   50. A=49", "  (and 10 more)"])


# A job whose group leader exits at once while a background child of its group lives on.
LEADER_EXITS = """\
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
open("child.pid", "w").write(str(child.pid))
print("ready", flush=True)
time.sleep(60)
"""


class OrphansAreAlive(HomeTestCase):
    """A dead runner's local job counts as alive while any process of its group, or carrying its id, lives."""

    def orphan(self, empty_meta: bool = False) -> tuple[str, int]:
        """A run whose runner was SIGKILLed, then whose group leader exited; (run id, the child's pid)."""
        live = LiveRun(self, self.local_config(LEADER_EXITS, name="orphan"))
        run_id = self.only_run().name
        child = int((self.work / "child.pid").read_text())
        self.addCleanup(lambda: pid_alive(child) and os.kill(child, signal.SIGKILL))
        leader = self.meta(self.only_run())["job"]["pgid"]
        live.proc.kill()
        live.finish()
        os.kill(leader, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(leader) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertTrue(pid_alive(child))
        if empty_meta:
            (self.only_run() / "meta.json").write_text("")
        return run_id, child

    def check_rm_refuses_and_stop_ends_the_child(self, empty: bool) -> None:
        run_id, child = self.orphan(empty)
        code, out, err = self.cli("rm", "-y", run_id)
        self.assertEqual(code, 2, err)
        self.assertIn(f"run {run_id} is lost but its job is still running", err)
        self.assertTrue((self.home / "runs" / run_id).is_dir())
        self.assertTrue(pid_alive(child))
        code, out, err = self.cli("stop", run_id)
        self.assertEqual(code, 0, err)
        deadline = time.monotonic() + 10
        while pid_alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertFalse(pid_alive(child))
        code, out, err = self.cli("rm", "-y", run_id)
        self.assertEqual(code, 0, err)
        self.assertEqual(self.runs(), [])

    def test_rm_refuses_and_stop_ends_the_child(self):
        self.check_rm_refuses_and_stop_ends_the_child(empty=False)

    def test_the_same_with_an_emptied_meta_json(self):
        self.check_rm_refuses_and_stop_ends_the_child(empty=True)


def hold_index(db: Path, seconds: float) -> threading.Thread:
    """Hold runs.db with BEGIN EXCLUSIVE for SECONDS, in a thread (started once it holds it), or until
    the thread's `release` event is set: a test that has seen what it needed lets go at once."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        conn.execute("BEGIN EXCLUSIVE")
        held.set()
        release.wait(seconds)
        conn.execute("ROLLBACK")
        conn.close()
    thread = threading.Thread(target=hold, daemon=True)
    thread.release = release
    thread.start()
    held.wait(10)
    return thread


class LockedIndexHoldsUpNothing(HomeTestCase):
    def test_a_runs_duration_is_the_jobs_and_its_start_does_not_wait(self):
        self.cli("list")  # the index exists
        locker = hold_index(self.home / "runs.db", seconds=8)
        config = self.local_config("import time; time.sleep(1)", name="one")
        started = time.monotonic()
        done = self.process("run", config)  # RUNPILOT_DB_TIMEOUT is the default, 30 s
        took = time.monotonic() - started
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertLess(took, 5, done.stderr)
        meta = self.meta(self.only_run())
        self.assertEqual(meta["status"], "succeeded")
        self.assertLess(meta["duration"], 1.6)
        self.assertIn(b"succeeded in 1.", done.stderr)
        locker.release.set()  # the run has ended with the index locked all along
        locker.join()
        rows = json.loads(self.cli("list", "--json")[1])  # the index catches up
        self.assertEqual([r["status"] for r in rows], ["succeeded"])

    def test_a_sweeps_ctrl_c_ends_in_bounded_time_with_the_index_locked(self):
        self.cli("list")
        config = self.local_config("import time; print('up', flush=True); time.sleep(60)", name="long")
        proc = subprocess.Popen([sys.executable, str(RUNPILOT), "sweep", str(config), "--grid",
                                 "env.A=" + ",".join(map(str, range(40)))], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        self.addCleanup(lambda: (proc.poll() is None and proc.kill(), proc.communicate()))
        deadline = time.monotonic() + 30
        # the first point's job has started (it printed), not only its record: a stop between the two
        # rightly ends the run `cancelled`, before the job started
        while b"up" not in b"".join(
                (p / "logs.txt").read_bytes() for p in self.runs() if (p / "logs.txt").exists()):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.1)
        locker = hold_index(self.home / "runs.db", seconds=40)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        self.assertLess(time.monotonic() - started, 15, err)
        self.assertEqual(proc.returncode, 130, err)
        statuses = sorted(self.meta(p)["status"] for p in self.runs())
        self.assertEqual(statuses, ["cancelled"] * 39 + ["interrupted"])  # the folders are the truth
        locker.release.set()  # the sweep has ended with the index locked all along
        locker.join()
        rows = json.loads(self.cli("list", "--json", "--all")[1])
        self.assertEqual(sorted(r["status"] for r in rows), statuses)  # and the index caught up


class SmallerThings(HomeTestCase):
    def test_a_git_probe_given_up_at_ctrl_c_is_not_left_running(self):
        git = shutil.which("git")
        if not git:
            self.skipTest("git is not installed")
        for args in (["init", "-q"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
                                      "-m", "x"]):
            subprocess.run([git, "-C", str(self.work), *args], check=True, capture_output=True)
        bin_dir = self.tmp / "bin"
        bin_dir.mkdir()
        (bin_dir / "git").write_text(f"#!/bin/sh\necho $$ > {self.tmp}/git.pid\nexec sleep 30\n")
        os.chmod(bin_dir / "git", 0o755)
        config = self.write("slow.yaml", "name: slow\nengine: local\nentrypoint: [sh, -c, 'echo ready; sleep 60']\n")
        live = LiveRun(self, config, env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
        deadline = time.monotonic() + 10
        while not ((self.tmp / "git.pid").exists() and (self.tmp / "git.pid").read_text().strip()):  # written
            self.assertLess(time.monotonic(), deadline, "the git probe never started")
            time.sleep(0.05)
        probe = int((self.tmp / "git.pid").read_text())
        live.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        live.proc.send_signal(signal.SIGINT)  # a second Ctrl-C: give up the probes at once
        code, _, err = live.finish(timeout=30)
        self.assertEqual(code, 130, err)
        self.assertFalse(pid_alive(probe), "the abandoned git probe outlived RunPilot")

    def test_gc_keep_0_names_the_active_runs_it_skips(self):
        live = LiveRun(self, self.write("on.yaml", "name: on\nengine: local\nentrypoint: [sh, -c, 'echo ready; "
                                                   "sleep 60']\n"))
        running = self.only_run().name
        code, out, err = self.cli("run", self.write("q.yaml", "name: q\nengine: local\nentrypoint: 'true'\n"))
        self.assertEqual(code, 0, err)
        code, out, err = self.cli("gc", "--keep", "0", "-y")
        self.assertEqual(code, 0, err)
        self.assertIn(f"skipped: run {running} (on) is running; gc never deletes an active run "
                      f"(runpilot stop {running} first)", err)
        self.assertEqual(out.count("deleted "), 1)
        live.proc.send_signal(signal.SIGINT)
        live.finish()

    def test_a_grid_engine_without_an_image_is_blamed_on_the_grid_point(self):
        config = self.write("q.yaml", "name: q\nengine: local\nentrypoint: 'true'\n")
        code, out, err = self.cli("sweep", config, "--grid", "engine=local,docker", "--dry-run")
        self.assertEqual(code, 2, err)
        self.assertEqual(err, "runpilot: error: --grid engine (point 2: engine=docker): engine docker runs an image, "
                              "and the config names none; add 'image: ...' to the config, or leave this engine out\n")


class SlurmTimeLimits(HomeTestCase):
    def config(self, **changes) -> "runpilot.JobConfig":
        data = {"name": "t", "engine": "local", "entrypoint": "true", **changes}
        return runpilot.validate_config(data, str(self.work / "t.yaml"), base_dir=self.work)

    def test_the_array_gets_the_longest_limit_and_each_point_its_own(self):
        configs = [self.config(timeout=60), self.config(timeout=3600), self.config(timeout=600)]
        self.assertEqual(runpilot.sweep_time_limits(configs), ("01:05:00", ["00:06:00", "01:05:00", "00:15:00"]))
        self.assertEqual(runpilot.sweep_time_limits([self.config(timeout=60), self.config()]),
                         (None, ["00:06:00", None]))

    def test_an_array_task_asks_squeue_about_itself(self):
        self.assertEqual(runpilot.slurm_task_id({"SLURM_JOB_ID": "40", "SLURM_ARRAY_JOB_ID": "40",
                                                 "SLURM_ARRAY_TASK_ID": "0"}), "40_0")
        self.assertEqual(runpilot.slurm_task_id({"SLURM_JOB_ID": "41"}), "41")

    def test_a_home_with_a_backslash_or_quote_is_refused_for_slurm(self):
        config = self.write("t.yaml", "name: t\nengine: local\nentrypoint: 'true'\n")
        for char in ("\\", "'", '"'):
            with self.subTest(char=char):
                home = self.tmp / f"ho{char}me"
                code, out, err = self.cli("run", config, "--on", "slurm", env={"RUNPILOT_HOME": str(home)})
                self.assertEqual(code, 2, err)
                self.assertIn("holds a space, '%', a backslash or a quote, which sbatch's --output cannot take", err)
                self.assertFalse(home.exists())


class StreamingMetrics(HomeTestCase):
    """show, compare and export read metrics.json as a stream: a big run costs the memory of its
    numbers, not of a list of its samples."""

    SAMPLES = 300_000

    def setUp(self) -> None:
        super().setUp()
        job = ("import sys\nw = sys.stdout.write\n"
               f"for i in range({self.SAMPLES}):\n    w(f'METRIC loss={{1 / (i + 1)}} acc={{i}}\\n')\n")
        code, out, err = self.cli("run", self.local_config(job, name="big"))
        self.assertEqual(code, 0, err)

    def peak_kib(self, *args: str) -> tuple[int, bytes]:
        probe = ("import resource, runpy, sys; sys.argv = ['runpilot'] + sys.argv[1:]\n"
                 "try:\n    runpy.run_path(%r, run_name='__main__')\n"
                 "except SystemExit:\n    pass\n"
                 "sys.stderr.write(f'PEAK {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n')\n") % str(RUNPILOT)
        done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, timeout=300)
        peak = int(done.stderr.decode().rsplit("PEAK ", 1)[1])
        return peak, done.stdout

    def test_show_compare_and_export_stream(self):
        baseline, _ = self.peak_kib("--version")
        for args in (("show", "latest"), ("compare", "latest"), ("export", "latest")):
            with self.subTest(args=args):
                peak, out = self.peak_kib(*args)
                # a list of 300,000 sample dicts alone is over 100 MiB; their numbers are ~15 MiB
                self.assertLess(peak - baseline, 60 * 1024, args)
                if args[0] == "export":
                    lines = out.decode().splitlines()
                    self.assertEqual(len(lines), self.SAMPLES + 1)
                    self.assertEqual(lines[0], "run_id,name,step,loss,acc")
                    self.assertTrue(lines[-1].endswith(f",big,{self.SAMPLES},{1 / self.SAMPLES},"
                                                       f"{self.SAMPLES - 1}"), lines[-1])
                if args[0] == "show":
                    self.assertRegex(out.decode(), rf"loss\s+{self.SAMPLES}\s+1\s+3\.333e-06\s+3\.333e-06\s+1")


class CatchUpLosesNoEnding(RunsHome):
    """A runner that ends while another process catches the index up keeps its ending in the index."""

    def test_a_marker_written_again_during_a_catch_up_stays(self):
        record = self.add_run("job", status="running")  # indexed as running
        folder = self.store.folder(record.id)
        self.store.defer(record.id)  # a later change of its record could not reach the index
        transaction, ended = runpilot._transaction, []

        @contextlib.contextmanager
        def runner_ends_after_the_upsert(conn):
            with transaction(conn):
                yield
            if not ended:  # the runner ends now, and its own save finds the index busy: it leaves a marker
                ended.append(True)
                folder.write_meta(dataclasses.replace(folder.read_meta(), status="succeeded", exit_code=0))
                self.store.defer(record.id)

        with mock.patch.object(runpilot, "_transaction", runner_ends_after_the_upsert):
            self.store.query()
        # before: the catch-up then unlinked the marker the runner had just left, and the row said running
        self.assertEqual(self.store.get(record.id).status, "succeeded")
