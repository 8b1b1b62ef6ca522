"""Engine local, for real: signals, stop, timeouts, lost runners, parallel runs, hostile output.

These are the fast variants of the reliability tests; they need nothing but Python, so they
run everywhere. The same promises are tested on Docker and Podman in test_integration.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

from tests.common import POLITE, RUNPILOT, STUBBORN, HomeTestCase, LiveRun, pid_alive, small_disk

class Signals(HomeTestCase):
    def job_pid(self) -> int:
        return int((self.work / "job.pid").read_text())

    def test_ctrl_c_stops_the_job_and_records_interrupted(self):
        live = LiveRun(self, self.local_config(POLITE))
        live.proc.send_signal(signal.SIGINT)
        code, out, err = live.finish()
        self.assertEqual(code, 130, err)
        run = self.only_run()
        meta = self.meta(run)
        self.assertEqual(meta["status"], "interrupted")
        self.assertIsNotNone(meta["finished_at"])
        # said at once; the exit code is the job's own (it saved and exited 0), RunPilot's is said in words
        self.assertIn(f"runpilot: stopping run {run.name} (Ctrl-C): the job got SIGINT and has 10s to exit; press "
                      "Ctrl-C again to kill it now\n".encode(), err)
        self.assertEqual((meta["exit_code"], meta["stop_signal"]), (0, signal.SIGINT))
        self.assertRegex(err.decode(), rf"runpilot: run {run.name} interrupted by Ctrl-C after \d+\.\ds "
                                       r"\(exit code 0\); runpilot exits with 130\n")
        self.assertEqual(self.db_rows()[0]["status"], "interrupted")
        self.assertIn(b"got signal 2, saving checkpoint", (run / "logs.txt").read_bytes())
        self.assertEqual(self.metrics(run), [{"step": 1, "loss": 1.5}])
        self.assertFalse(pid_alive(self.job_pid()))

    def test_sigterm_exits_143(self):
        live = LiveRun(self, self.local_config(POLITE))
        live.proc.send_signal(signal.SIGTERM)
        code, _, err = live.finish()
        self.assertEqual(code, 143, err)
        self.assertEqual(self.meta(self.only_run())["status"], "interrupted")

    def test_sighup_is_like_sigterm(self):
        live = LiveRun(self, self.local_config(POLITE))
        live.proc.send_signal(signal.SIGHUP)
        code, _, err = live.finish()
        self.assertEqual(code, 129, err)
        self.assertEqual(self.meta(self.only_run())["status"], "interrupted")

    def test_job_ignoring_sigterm_is_killed_after_grace(self):
        live = LiveRun(self, self.local_config(STUBBORN), "--stop-timeout", "1")
        sent = time.monotonic()
        live.proc.send_signal(signal.SIGINT)
        code, _, err = live.finish()
        waited = time.monotonic() - sent
        self.assertEqual(code, 130, err)
        self.assertGreaterEqual(waited, 0.9)
        self.assertLess(waited, 10)
        self.assertFalse(pid_alive(self.job_pid()))

    def test_second_ctrl_c_kills_at_once(self):
        live = LiveRun(self, self.local_config(STUBBORN), "--stop-timeout", "60")
        live.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        sent = time.monotonic()
        live.proc.send_signal(signal.SIGINT)
        code, _, err = live.finish(timeout=20)
        self.assertLess(time.monotonic() - sent, 5)
        self.assertEqual(code, 130, err)
        self.assertFalse(pid_alive(self.job_pid()))

    def test_stop_from_another_terminal(self):
        live = LiveRun(self, self.local_config(POLITE))
        run_id = self.only_run().name
        result = self.process("stop", run_id[:17])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.decode().strip(), f"run {run_id} interrupted")
        code, _, _ = live.finish()
        self.assertEqual(code, 143)
        self.assertFalse(pid_alive(self.job_pid()))

    def test_timeout(self):
        config = self.local_config(POLITE, extra="timeout: 1s\n")
        result = self.process("run", config)
        self.assertEqual(result.returncode, 124, result.stderr)
        meta = self.meta(self.only_run())
        self.assertEqual(meta["status"], "timeout")
        self.assertLess(meta["duration"], 8)
        self.assertFalse(pid_alive(self.job_pid()))

    def test_killed_runner_is_marked_lost_and_stop_ends_the_job(self):
        live = LiveRun(self, self.local_config(POLITE))
        live.proc.kill()
        live.proc.wait()
        run = self.only_run()
        self.assertEqual(self.meta(run)["status"], "running")
        result = self.process("list")
        self.assertIn(b"lost", result.stdout)
        self.assertIn(b"still running", result.stderr)
        self.assertEqual((self.meta(run)["status"], self.db_rows()[0]["status"]), ("lost", "lost"))
        self.assertTrue(pid_alive(self.job_pid()))
        self.assertEqual(self.process("stop", run.name).returncode, 0)
        time.sleep(0.2)
        self.assertFalse(pid_alive(self.job_pid()))
        shown = self.process("show", run.name)
        self.assertEqual(shown.returncode, 0)
        self.assertIn(b"status     lost", shown.stdout)


class Parallel(HomeTestCase):
    def test_sixteen_runs_at_once(self):
        config = self.local_config('import time\ntime.sleep(0.5)\nprint("METRIC x=1")\n')
        procs = [subprocess.Popen([sys.executable, str(RUNPILOT), "run", str(config)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(16)]
        listings = []
        while any(p.poll() is None for p in procs):
            listings.append(self.process("list", "--all"))
        errors = [p.communicate()[1] for p in procs]
        self.assertEqual([p.returncode for p in procs], [0] * 16, errors)
        self.assertTrue(all(r.returncode == 0 for r in listings), [r.stderr for r in listings])
        runs = self.runs()
        self.assertEqual(len(runs), 16)
        rows = self.db_rows()
        self.assertEqual(sorted(r["id"] for r in rows), [p.name for p in runs])
        self.assertEqual({r["status"] for r in rows}, {"succeeded"})
        self.assertTrue(all(self.metrics(p) == [{"step": 1, "x": 1}] for p in runs))


class HostileOutput(HomeTestCase):
    def test_logs_are_byte_exact_for_hostile_output(self):
        script = r'''
import os, random, sys
rng = random.Random(7)
out = sys.stdout.buffer
parts = [bytes(rng.randrange(256) for _ in range(100000)), b"\x00\x01\xff\xfe invalid \xc3\x28\n",
         b"x" * (20 * 1024 * 1024), b"\n", b"\x1b[31mred\x1b[0m\n",
         b"".join(b"\rprogress %d%%" % i for i in range(100)), b"\n",
         b"".join(b"METRIC step=%d loss=%d.5 acc=nan big=%s\n" % (i, i, b"9" * 400) for i in range(20000)),
         b"METRIC\nMETRIC =1\nMETRIC a=1 a=2\nMETRIC " + b" ".join(b"k%d=%d" % (i, i) for i in range(10000)) + b"\n",
         b"no newline at the end"]
data = b"".join(parts)
open("expected.sha256", "w").write(__import__("hashlib").sha256(data).hexdigest())
for i in range(0, len(data), 7919):
    out.write(data[i:i + 7919])
out.flush()
'''
        config = self.local_config(script)
        result = self.process("run", config)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        run = self.only_run()
        logged = (run / "logs.txt").read_bytes()
        self.assertEqual(hashlib.sha256(logged).hexdigest(), (self.work / "expected.sha256").read_text())
        self.assertEqual(hashlib.sha256(result.stdout).hexdigest(), (self.work / "expected.sha256").read_text())
        samples = json.loads((run / "metrics.json").read_text())
        self.assertEqual(len(samples), 20001)
        self.assertEqual(samples[5]["loss"], 5.5)
        self.assertNotEqual(samples[5]["acc"], samples[5]["acc"])  # nan
        self.assertEqual(samples[5]["big"], int("9" * 400))
        self.assertEqual(len(samples[-1]), 10001)  # 10,000 pairs and the step
        self.assertEqual(self.meta(run)["samples"], {"count": 20001, "malformed": 3})
        self.assertEqual(result.stderr.count(b"3 METRIC line(s) were malformed"), 1)


class LocalEngineEnvironment(HomeTestCase):
    def test_workdir_mount_env_and_gpus(self):
        (self.work / "src").mkdir()
        (self.work / "data").mkdir()
        script = ('import json, os\nprint(json.dumps({"cwd": os.getcwd(), "data": os.environ.get("RUNPILOT_MOUNT_DATA"),'
                  ' "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "unbuf": os.environ.get("PYTHONUNBUFFERED"),'
                  ' "lr": os.environ.get("LR"), "id": os.environ.get("RUNPILOT_RUN_ID")}))\n')
        (self.work / "src" / "probe.py").write_text(script)
        config = self.write("c.yaml", f"""\
            name: probe
            engine: local
            entrypoint: [{json.dumps(sys.executable)}, probe.py]
            workdir: /workspace
            env: {{LR: 0.5}}
            mounts: {{code: ./src, data: ./data}}
            resources: {{gpus: [0, 2], memory: 8g}}
            """)
        result = self.process("run", config, "--no-gpu-check")
        self.assertEqual(result.returncode, 0, result.stderr)
        seen = json.loads(result.stdout)
        run = self.only_run()
        # the job runs in the run's own copy of the code snapshot (issue 23), not in the folder itself
        self.assertEqual(seen, {"cwd": str(run / "code"), "data": str(self.work / "data"), "cuda": "0,2",
                                "unbuf": "1", "lr": "0.5", "id": run.name})
        self.assertEqual(result.stderr.count(b"ignores workdir"), 1)
        self.assertIn(b"does not enforce", result.stderr)
        meta = self.meta(run)
        self.assertEqual((meta["engine"], meta["workdir"]), ("local", str(run / "code")))
        self.assertEqual((meta["code"]["mode"], meta["code"]["folder"]), ("snapshot", str(self.work / "src")))


class DiskAndPermissions(HomeTestCase):
    def test_full_disk_stops_the_job_with_one_clear_line(self):
        disk = small_disk(self, "1m")
        config = self.write("big.yaml", "name: big\nengine: local\n"
                                        "entrypoint: 'head -c 5000000 /dev/zero; echo METRIC a=1; sleep 30'\n")
        started = time.monotonic()
        result = self.process("run", config, env={"RUNPILOT_HOME": str(disk)})
        self.assertLess(time.monotonic() - started, 20)  # stopped, not left to sleep
        self.assertEqual(result.returncode, 1)
        err = result.stderr.decode()
        self.assertNotIn("Traceback", err)
        self.assertRegex(err, r"runpilot: error: cannot write the run's files in .* \(No space left on device\); "
                              r"the job was stopped")
        listing = self.process("list", env={"RUNPILOT_HOME": str(disk)})
        self.assertEqual(listing.returncode, 0, listing.stderr)
        self.assertIn(b"big", listing.stdout)

    def test_unwritable_home_is_one_line_and_starts_nothing(self):
        disk = small_disk(self, "1m", read_only=True)
        config = self.write("c.yaml", "name: x\nengine: local\nentrypoint: 'touch started'\n")
        result = self.process("run", config, env={"RUNPILOT_HOME": str(disk / "home")})
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.decode(), f"runpilot: error: cannot create {disk / 'home'}: Read-only file "
                                                 "system; set RUNPILOT_HOME to a writable folder\n")
        self.assertFalse((self.work / "started").exists())

    def test_home_is_private(self):
        config = self.local_config("print('METRIC a=1')\n")
        self.assertEqual(self.process("run", config).returncode, 0)
        run = self.only_run()
        modes = {p.name: p.stat().st_mode & 0o777 for p in [self.home, self.home / "runs", run,
                                                             self.home / "runs.db", *run.iterdir()]}
        self.assertEqual(modes, {self.home.name: 0o700, "runs": 0o700, run.name: 0o700, "runs.db": 0o600,
                                 "config.yaml": 0o600, "logs.txt": 0o600, "metrics.json": 0o600,
                                 "metrics.times": 0o600, "meta.json": 0o600, "outputs": 0o700})

    def peak_rss_kib(self, entrypoint: str) -> int:
        """Peak RSS of `python runpilot.py run` for a job (the job itself is a tiny shell tool)."""
        config = self.write("job.yaml", f"name: job\nengine: local\nentrypoint: {entrypoint!r}\n")
        # A wrapper process reports the peak RSS of its descendants: the runner (the job is tiny).
        wrapper = ("import resource, subprocess, sys\n"
                   "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
                   "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
        result = subprocess.run([sys.executable, "-c", wrapper, sys.executable, str(RUNPILOT), "run", str(config)],
                                capture_output=True, text=True)
        code, peak_kib = map(int, result.stdout.split())
        self.assertEqual(code, 0, result.stderr)
        return peak_kib

    def test_memory_stays_flat_for_a_loud_job(self):
        quiet = self.peak_rss_kib("true")
        loud = self.peak_rss_kib("head -c 300000000 /dev/zero; echo; yes METRIC loss=0.5 | head -n 300000")
        self.assertLess(loud - quiet, 15 * 1024, f"300 MB of output and 300,000 samples grew the runner "
                                                 f"from {quiet} KiB to {loud} KiB")
        run = max(self.runs(), key=lambda p: (p / "logs.txt").stat().st_size)
        self.assertEqual((run / "logs.txt").stat().st_size, 300000000 + 1 + 300000 * 16)
        self.assertEqual(self.meta(run)["samples"]["count"], 300000)


class NoOrphanOnABug(HomeTestCase):
    def test_a_crash_in_the_tee_loop_still_kills_the_job(self):
        from unittest import mock

        import runpilot
        config = self.local_config(STUBBORN)
        with mock.patch.object(runpilot.Tee, "_pump", side_effect=RuntimeError("a bug")):
            with self.assertRaises(RuntimeError):
                self.cli("run", config)
        pgid = self.meta(self.only_run())["job"]["pgid"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break  # no process of the job's group is left
            time.sleep(0.05)
        else:
            os.killpg(pgid, signal.SIGKILL)
            self.fail("the job outlived a crash of the runner's loop")
