"""Truth and safety when things go wrong (issue 12), each class of failure on engine local.

Statuses stay true (the run folder is the truth), the clock and signals never wait on the terminal
or a probe, nothing a repository configures runs on the host, nothing the job or a config says
reaches the terminal as control codes, ids never leave the home, the job's environment is the
job's, and a user mistake is one line, never a traceback. The same promises on Docker and Podman
are in test_integration.
"""

import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import runpilot
from tests.common import RUNPILOT, HomeTestCase, LiveRun, RunsHome, pid_alive, small_disk

ESC = "\x1b]0;PWNED\x07"   # sets the terminal's title when printed raw


# The line of runpilot.py after its Ctrl-C guard: the first line of the imports proper.
GUARD_END = RUNPILOT.read_text().splitlines().index("import argparse") + 1


def hold_lock(db: Path, seconds: float, after: float = 0.0) -> threading.Thread:
    """Hold runs.db with BEGIN EXCLUSIVE from AFTER seconds on, for SECONDS, in a thread; its `held`
    event is set once it holds it."""
    held = threading.Event()

    def hold() -> None:
        time.sleep(after)
        conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        conn.execute("BEGIN EXCLUSIVE")
        held.set()
        time.sleep(seconds)
        conn.execute("ROLLBACK")
        conn.close()
    thread = threading.Thread(target=hold, daemon=True)
    thread.held = held
    thread.start()
    return thread


class StatusesStayTrue(RunsHome):
    def test_a_finished_run_is_never_made_lost_when_the_index_was_locked(self):
        self.cli("list")  # the index exists
        config = self.local_config("import time; time.sleep(2); print('METRIC loss=1'); raise SystemExit(3)")
        locker = hold_lock(self.home / "runs.db", seconds=5, after=1)
        result = self.process("run", config, env={"RUNPILOT_DB_TIMEOUT": "1"})
        locker.join()
        self.assertEqual(result.returncode, 3, result.stderr)  # the job's status, not RunPilot's
        self.assertIn(b"the index was not updated", result.stderr)
        run = self.only_run()
        self.assertEqual(self.meta(run)["status"], "failed")
        # the index is behind: the start's row, or none (a slow start met the lock too, and deferred it)
        self.assertIn([r["status"] for r in self.db_rows()], (["running"], []))
        code, out, err = self.cli("list", "--json")
        self.assertEqual((code, [r["status"] for r in json.loads(out)]), (0, ["failed"]))  # ...and catches up
        self.assertEqual(self.db_rows()[0]["status"], "failed")
        self.assertEqual(self.meta(run)["status"], "failed")
        self.assertEqual(self.cli("reindex")[0], 0)
        self.assertEqual(self.db_rows()[0]["status"], "failed")

    def test_a_runner_killed_after_its_final_record_is_not_lost(self):
        # The runner wrote meta.json (final) and was SIGKILLed before the index row: the folder wins.
        dead = {"pid": 999999, "host": runpilot.hostname(), "boot_id": runpilot._boot_id(), "start": "1"}
        record = self.add_run("done", status="running", runner=dead)
        meta = self.store.folder(record.id).read_meta()
        meta.status, meta.exit_code, meta.finished_at, meta.duration = "succeeded", 0, meta.started_at, 1.0
        self.store.folder(record.id).write_meta(meta)
        code, out, _ = self.cli("list", "--json")
        self.assertEqual(json.loads(out)[0]["status"], "succeeded")
        self.assertEqual(self.store.folder(record.id).read_meta().status, "succeeded")

    def test_a_run_started_while_the_index_is_locked_is_recorded_once_it_frees(self):
        self.cli("list")
        locker = hold_lock(self.home / "runs.db", seconds=3)
        self.assertTrue(locker.held.wait(10))  # not a fixed sleep: a loaded machine may take longer to lock
        result = self.process("run", self.local_config("print('hi')"), env={"RUNPILOT_DB_TIMEOUT": "0.5"})
        self.assertEqual(result.returncode, 0, result.stderr)
        locker.join()
        code, out, _ = self.cli("list", "--json")
        rows = json.loads(out)
        self.assertEqual([(r["status"], r["exit_code"]) for r in rows], [("succeeded", 0)])
        self.assertEqual(list((self.home / "pending").iterdir()), [])

    def test_timeout_holds_when_the_job_closes_its_output(self):
        config = self.write("closed.yaml", "name: closed\nengine: local\ntimeout: 2\n"
                                           "entrypoint: 'echo before; exec >/dev/null 2>&1; sleep 12'\n")
        started = time.monotonic()
        result = self.process("run", config)
        self.assertLess(time.monotonic() - started, 8)
        self.assertEqual(result.returncode, 124, result.stderr)
        self.assertEqual(self.meta(self.only_run())["status"], "timeout")

    def test_timeout_and_ctrl_c_hold_when_the_reader_stalls(self):
        config = self.write("loud.yaml", "name: loud\nengine: local\ntimeout: 2\nentrypoint: 'yes hello'\n")
        read_end, write_end = os.pipe()  # a reader that never reads: a full pipe
        self.addCleanup(os.close, read_end)
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, str(RUNPILOT), "run", str(config)], stdout=write_end,
                                stderr=subprocess.PIPE)
        os.close(write_end)
        _, err = proc.communicate(timeout=30)
        self.assertLess(time.monotonic() - started, 8, err)
        self.assertEqual(proc.returncode, 124, err)
        self.assertIn(b"hit its timeout", err)
        self.assertEqual(self.meta(self.only_run())["status"], "timeout")

    def test_ctrl_c_holds_when_the_reader_stalls(self):
        config = self.write("loud.yaml", "name: loud\nengine: local\nentrypoint: 'trap \"\" TERM; yes hello'\n")
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        proc = subprocess.Popen([sys.executable, str(RUNPILOT), "run", str(config), "--stop-timeout", "30"],
                                stdout=write_end, stderr=subprocess.PIPE)
        os.close(write_end)
        deadline = time.monotonic() + 30  # the job runs (RunPilot handles Ctrl-C): not a fixed 1.5 s, which a
        while not any(b'"running"' in (p / "meta.json").read_bytes()  # loaded machine spent loading Python
                      for p in self.runs() if (p / "meta.json").exists()):
            self.assertLess(time.monotonic(), deadline, "the job never started")
            time.sleep(0.05)
        time.sleep(0.3)  # the stalled reader's pipe fills
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # the second Ctrl-C kills at once, stalled reader or not
        _, err = proc.communicate(timeout=30)
        self.assertLess(time.monotonic() - started, 6, err)
        self.assertEqual(proc.returncode, 130, err)
        self.assertIn(b"press Ctrl-C again to kill it now", err)
        self.assertEqual(self.meta(self.only_run())["status"], "interrupted")

    def test_slow_git_probes_never_hold_up_the_end_or_the_duration(self):
        bin_dir = self.work / "bin"
        bin_dir.mkdir()
        fake = bin_dir / "git"
        fake.write_text("#!/bin/sh\nsleep 30\n")
        fake.chmod(0o755)
        subprocess.run(["git", "init", "-q", str(self.work)], check=True)
        subprocess.run(["git", "-C", str(self.work), "-c", "user.email=a@b", "-c", "user.name=a", "commit",
                        "-q", "--allow-empty", "-m", "x"], check=True)
        live = LiveRun(self, self.local_config("print('ready', flush=True)"),
                       env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
        time.sleep(1.0)  # the job is over; the probe is stuck in the fake git
        started = time.monotonic()
        live.proc.send_signal(signal.SIGINT)
        code, _, err = live.finish(timeout=20)
        self.assertLess(time.monotonic() - started, 3, err)
        self.assertEqual(code, 0, err)  # the job had ended: its status stands
        meta = self.meta(self.only_run())
        self.assertEqual(meta["status"], "succeeded")
        self.assertLess(meta["duration"], 2.5)

    def test_two_stops_at_once_keep_the_grace_period(self):
        job = ("import signal, sys, time\n"
               "def bye(n, f):\n    time.sleep(2); print('saved', flush=True); sys.exit(0)\n"
               "signal.signal(signal.SIGTERM, bye)\nprint('ready', flush=True)\n"
               "while True: time.sleep(0.05)\n")
        live = LiveRun(self, self.local_config(job))
        run_id = self.only_run().name
        stops = [subprocess.Popen([sys.executable, str(RUNPILOT), "stop", run_id], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for _ in range(2)]
        for stop in stops:
            stop.communicate(timeout=60)
        code, _, err = live.finish()
        self.assertEqual(code, 143, err)
        run = self.only_run()
        self.assertIn(b"saved", (run / "logs.txt").read_bytes())  # its handler finished: not SIGKILLed
        self.assertEqual((self.meta(run)["status"], self.meta(run)["exit_code"]), ("interrupted", 0))

    def test_rm_and_gc_refuse_a_lost_run_whose_job_lives_on(self):
        live = LiveRun(self, self.local_config("import time\nprint('ready', flush=True)\ntime.sleep(60)\n"))
        live.proc.kill()  # the runner dies; the job's process group lives on
        live.proc.wait()
        time.sleep(0.2)
        run_id = self.only_run().name
        code, out, err = self.cli("rm", run_id, "-y")
        self.assertEqual(code, 2, err)
        self.assertIn("is still running", err)
        self.assertIn(f"runpilot stop {run_id}", err)
        self.assertTrue(self.only_run().exists())
        self.cli("gc", "--keep", "0", "-y")
        self.assertTrue(self.only_run().exists())
        self.assertEqual(self.cli("stop", run_id)[0], 0)
        self.assertEqual(self.cli("rm", run_id, "-y")[0], 0)
        self.assertEqual(self.runs(), [])

    def test_nothing_the_job_started_outlives_the_run(self):
        job = ("import os, subprocess, sys, time\n"
               "daemon = subprocess.Popen(['setsid', 'sh', '-c', 'echo $$ > daemon.pid; exec sleep 300'],\n"
               "    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
               "bg = subprocess.Popen(['sh', '-c', 'echo $$ > bg.pid; exec sleep 300'],\n"
               "    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)\n"
               "while not (os.path.exists('daemon.pid') and os.path.exists('bg.pid')): time.sleep(0.02)\n"
               "print('ready', flush=True)\ntime.sleep(60)\n")
        live = LiveRun(self, self.local_config(job))
        live.proc.send_signal(signal.SIGINT)
        code, _, err = live.finish()
        self.assertEqual(code, 130, err)
        for name in ("daemon.pid", "bg.pid"):
            pid = int((self.work / name).read_text())
            with self.subTest(name):
                self.assertFalse(pid_alive(pid), f"{name} {pid} outlived the run")

    def test_a_job_that_ends_leaves_no_background_process(self):
        job = ("import subprocess\n"
               "subprocess.Popen(['sh', '-c', 'echo $$ > bg.pid; exec sleep 300'], start_new_session=True,\n"
               "                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\nprint('done')\n")
        result = self.process("run", self.local_config(job))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertFalse(pid_alive(int((self.work / "bg.pid").read_text())))

    def test_a_full_disk_ends_failed_with_the_reason(self):
        disk = small_disk(self, "2m")
        env = {"RUNPILOT_HOME": str(disk / "home")}
        result = self.process("run", self.local_config("import sys\nsys.stdout.write('x' * 8_000_000)\n"), env=env)
        self.assertEqual(result.returncode, 1, result.stderr)
        run = next((disk / "home" / "runs").iterdir())
        meta = json.loads((run / "meta.json").read_text())
        self.assertEqual(meta["status"], "failed")
        self.assertIn("No space left on device", meta["reason"])
        listed = self.process("list", "--json", env=env)
        self.assertEqual(json.loads(listed.stdout)[0]["status"], "failed")


class NoHostCommands(HomeTestCase):
    """A repository's own configuration must not run anything during RunPilot's git probes."""

    MARKERS = ("fsmonitor", "diffext", "clean", "textconv", "hook", "envdiff")

    def evil_repo(self) -> Path:
        repo = self.work
        git = ["git", "-C", str(repo)]
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
        (repo / "a.txt").write_text("one\n")
        (repo / ".gitattributes").write_text("* filter=evil diff=evil\n")
        subprocess.run(git + ["add", "."], check=True)
        subprocess.run(git + ["-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "x"], check=True)
        marker = lambda name: f"touch {self.tmp}/PWNED-{name}"
        for key, value in (("core.fsmonitor", marker("fsmonitor") + "; echo"),
                           ("diff.external", marker("diffext")),
                           ("filter.evil.clean", marker("clean") + "; cat"),
                           ("diff.evil.textconv", marker("textconv") + "; cat")):
            subprocess.run(git + ["config", key, value], check=True)
        hook = repo / ".git" / "hooks" / "post-index-change"
        hook.parent.mkdir(exist_ok=True)
        hook.write_text(f"#!/bin/sh\n{marker('hook')}\n")
        hook.chmod(0o755)
        (repo / "a.txt").write_text("two\n")
        os.utime(repo / "a.txt", (1e9, 1e9))  # stat differs from the index: git must look at the content
        return repo

    def pwned(self) -> list[str]:
        return sorted(p.name for p in self.tmp.glob("PWNED-*"))

    def test_no_mechanism_runs_during_the_probes(self):
        self.evil_repo()
        env = {"GIT_EXTERNAL_DIFF": f"touch {self.tmp}/PWNED-envdiff"}
        result = self.process("run", self.local_config("print('ok')"), env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.pwned(), [])
        run = self.only_run()
        git = self.meta(run)["git"][0]
        self.assertEqual((git["root"], git["dirty"], git["branch"] in ("master", "main")),
                         (str(self.work), True, True))
        self.assertIn("-one\n+two\n", (run / "git.diff").read_text())
        # The mechanisms are live: plain git, run the usual way, triggers them (the test can fail).
        subprocess.run(["git", "-C", str(self.work), "status"], capture_output=True, env={**os.environ, **env})
        subprocess.run(["git", "-C", str(self.work), "diff"], capture_output=True, env={**os.environ, **env})
        self.assertGreaterEqual(len(self.pwned()), 3, self.pwned())

    def test_a_hostile_head_cannot_make_runpilot_read_other_files(self):
        subprocess.run(["git", "init", "-q", str(self.work)], check=True)
        (self.work / ".git" / "HEAD").write_text("ref: refs/../../../../../etc/hostname\n")
        commit, branch = runpilot.git_head(self.work / ".git", self.work / ".git")
        self.assertEqual((commit, branch), (None, None))


class NoControlCodes(RunsHome):
    def test_job_and_config_values_are_printed_visibly(self):
        job = f"print('METRIC step=1 loss=x{ESC}y')\n"
        config = self.local_config(job, name="evil", extra="metrics: [loss]\n")
        code, out, err = self.cli("run", config, "--name", f"name{ESC}", "--tag", f"t=v{ESC}")
        self.assertEqual(code, 0, err)
        self.assertIn(ESC, out)  # the job's own output passes through as it is...
        summary = err
        self.assertNotIn("\x1b", summary)  # ...RunPilot's own lines do not
        self.assertIn("\\x1b]0;PWNED\\x07", summary)
        for args in (["list"], ["list", "--no-trunc"], ["show", "latest"], ["compare", "latest", "latest"],
                     ["logs", "latest"], ["list", "--json"], ["show", "latest", "--json"]):
            with self.subTest(args=args):
                code, out, err = self.cli(*args)
                self.assertEqual(code, 0, err)
                if args[0] == "logs":
                    self.assertIn(ESC, out)  # the saved log is the job's output, byte for byte
                    continue
                self.assertNotIn("\x1b", out + err)
                self.assertNotIn("\x07", out + err)
        data = json.loads(self.cli("list", "--json")[1])[0]
        self.assertEqual((data["name"], data["last_metrics"]["loss"], data["tags"]["t"]),
                         (f"name{ESC}", f"x{ESC}y", f"v{ESC}"))  # --json stays exact

    def test_errors_show_control_codes_visibly(self):
        bad = self.write("bad.yaml", f"name: x\nengine: local\nentrypoint: [true]\nenviroment{ESC}: 1\n")
        code, out, err = self.cli("validate", bad)
        self.assertEqual(code, 2)
        self.assertNotIn("\x1b", err)
        code, out, err = self.cli("show", f"abc{ESC}")
        self.assertEqual(code, 2)
        self.assertNotIn("\x1b", err)


class IdsStayInTheHome(HomeTestCase):
    def test_run_ids_are_checked_at_the_boundary(self):
        config = self.local_config("print(1)")
        for bad in ("../../x", "/tmp/elsewhere", "20261128-224705-a3f9c1/../../x", ".."):
            with self.subTest(bad=bad):
                result = self.process("run", config, "--run-id", bad)
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertIn(b"is not a run id", result.stderr)
        self.assertFalse((self.tmp / "x").exists())
        self.assertFalse(Path("/tmp/elsewhere").exists())
        self.assertEqual(self.runs(), [])
        for args in (["sweep", config, "--grid", "env.X=1", "--sweep-id", "../../x"], ["sweep", "--resume", "../x"],
                     ["list", "--sweep", "/etc"], ["compare", "--sweep", "../x"]):
            with self.subTest(args=args):
                code, out, err = self.cli(*args)
                self.assertEqual(code, 2, err)
                self.assertIn("is not a sweep id", err)
        self.assertFalse((self.tmp / "x").exists())
        store = runpilot.RunStore(self.home)
        for bad in ("../x", "/etc", "a/b"):
            with self.subTest(bad=bad), self.assertRaises(runpilot.UsageError):
                store.folder(bad)


class TheJobsEnvironment(HomeTestCase):
    def test_config_env_reaches_the_job_only(self):
        config = runpilot.validate_config({"name": "x", "image": "img", "entrypoint": "env",
                                           "env": {"PATH": "/job/bin", "DOCKER_HOST": "tcp://elsewhere:2375",
                                                   "CONTAINERS_CONF": "/nope", "MULTI": "a\nb"}},
                                          str(self.work / "c.yaml"), base_dir=self.work)
        environ = {"PATH": "/usr/bin:/bin", "HOME": "/root"}
        env = runpilot.job_environment(config, "20261128-224705-a3f9c1", "docker", environ)
        launch = runpilot.make_launch(config, "20261128-224705-a3f9c1", "docker", env, runpilot.RunOptions(),
                                      environ, None)
        self.assertEqual(launch.env["PATH"], "/usr/bin:/bin")  # the engine CLI's own environment
        self.assertNotIn("DOCKER_HOST", launch.env)
        self.assertNotIn("CONTAINERS_CONF", launch.env)
        self.assertEqual(launch.env["MULTI"], "a\nb")  # a line break travels by name (nothing it replaces)
        self.assertIn(b"PATH=/job/bin\n", launch.env_file)
        self.assertIn(b"DOCKER_HOST=tcp://elsewhere:2375\n", launch.env_file)
        self.assertNotIn(b"MULTI", launch.env_file)
        self.assertEqual(launch.argv[launch.argv.index("--env-file") + 1], "/dev/fd/ENV")
        self.assertIn("MULTI", launch.argv)
        self.assertNotIn("/job/bin", " ".join(launch.argv))

    def test_a_multi_line_value_may_not_replace_the_runners_own(self):
        config = runpilot.validate_config({"name": "x", "image": "img", "entrypoint": "env",
                                           "env": {"PATH": "a\nb"}}, str(self.work / "c.yaml"),
                                          base_dir=self.work)
        env = runpilot.job_environment(config, "20261128-224705-a3f9c1", "docker", {"PATH": "/bin"})
        with self.assertRaises(runpilot.ConfigError) as caught:
            runpilot.split_job_env(env, {"PATH": "/bin"}, "docker")
        self.assertIn("would replace your PATH", str(caught.exception))

    def test_only_env_values_are_expanded_and_dollar_dollar_is_literal(self):
        folder = self.work / "${HOME}"
        folder.mkdir()
        config = self.write("c.yaml", "name: x\nengine: local\nentrypoint: 'echo \"$RUNPILOT_MOUNT_DATA|$A|$B\"'\n"
                                      "mounts:\n  data: './${HOME}'\nenv:\n  A: '${HOME}'\n  B: '$${HOME} costs $$5'\n")
        result = self.process("run", config)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.decode(), f"{folder}|{os.environ['HOME']}|${{HOME}} costs $$5\n")
        self.assertIn("${HOME}", (self.only_run() / "config.yaml").read_text())


class NeverATraceback(RunsHome):
    def assertOneLine(self, result: tuple, code: int, *parts: str) -> None:
        got, out, err = result
        self.assertEqual(got, code, err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertTrue(err.startswith("runpilot: error: "), err)
        for part in parts:
            self.assertIn(part, err)

    def test_nul_anywhere_in_a_config(self):
        for field, line in (("entrypoint", 'entrypoint: "echo \\0 x"'), ("workdir", 'workdir: "/a\\0b"'),
                            ("image", 'image: "busy\\0box"'), ("mounts.data", 'mounts: {data: "/tmp:/mnt/\\0"}')):
            with self.subTest(field=field):
                base = {"name": "name: x", "image": "image: busybox", "entrypoint": "entrypoint: 'true'"}
                base[field.split(".")[0]] = line
                text = "\n".join(base.values()) + "\n"
                config = self.write("nul.yaml", text)
                for command in ("validate", "run"):
                    result = self.cli(command, config)
                    self.assertEqual(result[0], 2, result[2])
                    self.assertIn("NUL character", result[2])
                    self.assertNotIn("Traceback", result[2])
        self.assertEqual(self.runs(), [])

    def test_numbers_out_of_range(self):
        config = self.local_config("print(1)")
        for value in ("inf", "nan", "1e20", "-1"):
            with self.subTest(value=value):
                code, _, err = self.cli("run", config, "--stop-timeout", value)
                self.assertEqual(code, 2, err)
                self.assertNotIn("Traceback", err)
        self.assertOneLine(self.cli("list", "--since", "99999999999d"), 2, "--since")
        self.assertOneLine(self.cli("gc", "--older-than", "99999999999d"), 2, "--older-than")
        self.assertEqual(self.runs(), [])

    def test_wrongly_typed_meta_hides_no_run(self):
        a = self.add_run("a")
        b = self.add_run("b", started=runpilot.parse_time("2026-11-21T10:00:00.000Z"))
        meta_file = self.store.folder(a.id).meta_file
        data = json.loads(meta_file.read_text())
        data.update(started_at=5, tags="x", duration="long", exit_code=[1])
        meta_file.write_text(json.dumps(data))
        self.assertEqual(self.cli("reindex")[0], 0)
        code, out, err = self.cli("list", "-q")
        self.assertEqual((code, sorted(out.split())), (0, sorted([a.id, b.id])), err)
        code, out, err = self.cli("show", a.id)
        self.assertEqual(code, 0, err)
        problems = runpilot.RunMeta.from_json(data, a.id).problems
        self.assertEqual(sorted(p.split("'")[1] for p in problems), ["duration", "exit_code", "started_at", "tags"])

    def test_an_unusable_index_is_one_line(self):
        self.add_run("a")
        for db in (self.home / "runs.db-wal", self.home / "runs.db-shm", self.home / "runs.db"):
            db.unlink(missing_ok=True)
        (self.home / "runs.db").mkdir()
        for args in (["list"], ["reindex"], ["rm", "latest", "-y"]):
            with self.subTest(args=args):
                self.assertOneLine(self.cli(*args), 1, "runs.db is a folder")

    def test_a_read_only_home_is_one_line(self):
        if os.geteuid() == 0:
            disk = small_disk(self, "1m", read_only=True)
            home = disk / "home"
        else:
            home = self.tmp / "ro"
            home.mkdir(mode=0o500)
        result = self.process("run", self.local_config("print(1)"), env={"RUNPILOT_HOME": str(home)})
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stderr.count(b"\n"), 1, result.stderr)
        self.assertIn(b"RUNPILOT_HOME", result.stderr)

    def test_init_over_a_folder(self):
        os.chdir(self.work)
        self.addCleanup(os.chdir, Path(__file__).parent.parent)
        (self.work / "config.yaml").mkdir()
        self.assertOneLine(self.cli("init", "--force"), 1, "config.yaml")

    def test_ctrl_c_in_the_first_moments_is_never_a_traceback(self):
        config = self.local_config("import time\ntime.sleep(1)\n")
        for delay in (0.02, 0.06, 0.1, 0.15, 0.2, 0.3):
            with self.subTest(delay=delay):
                # -S: the interpreter's own start (site hooks) is not RunPilot's to guard
                proc = subprocess.Popen([sys.executable, "-S", str(RUNPILOT), "run", str(config)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                time.sleep(delay)
                proc.send_signal(signal.SIGINT)
                _, err = proc.communicate(timeout=30)
                # Before the guard at the file's top has run (Python compiling the file, or the guard's
                # first lines), Python reports the interrupt itself: "KeyboardInterrupt" alone, or
                # (3.13) a traceback at line 0 or in those first lines, before any of RunPilot's code.
                # Its exit status is 1 while it compiles, and death by SIGINT once the module's code runs.
                lines = [int(n) for n in re.findall(rb'runpilot\.py", line (\d+)', err)]
                before_any_code = err.endswith(b"KeyboardInterrupt\n") and all(n < GUARD_END for n in lines)
                if before_any_code:
                    self.assertIn(proc.returncode, (1, -signal.SIGINT), err)
                else:  # the job itself gets SIGINT, and may print its own KeyboardInterrupt: not RunPilot's
                    self.assertNotRegex(err, rb'File "[^"]*runpilot\.py"')
                    self.assertEqual(err.count(b"Traceback"), err.count(b'job.py", line'), err)
                    self.assertIn(proc.returncode, (0, 130, -signal.SIGINT), err)
        code, out, _ = self.cli("list", "--json", "--all")
        self.assertTrue(all(r["status"] in ("interrupted", "cancelled", "succeeded") for r in json.loads(out)))

    def test_two_damaged_indexes_in_one_second_are_both_kept(self):
        self.add_run("a")
        for garbage in (b"first garbage", b"second garbage"):
            self.store.db_path.write_bytes(garbage)
            code, _, err = self.cli("list")
            self.assertEqual(code, 0, err)
            self.assertIn("damaged", err)
        aside = sorted(p.read_bytes() for p in self.home.glob("runs.db.damaged-*"))
        self.assertEqual(aside, [b"first garbage", b"second garbage"])

    def test_a_lock_is_not_called_damage(self):
        record = self.add_run("a", status="running")
        locker = hold_lock(self.store.db_path, seconds=2)
        time.sleep(0.3)
        store = runpilot.RunStore(self.home, db_timeout=0.3)
        meta = store.folder(record.id).read_meta()
        with self.assertRaises(runpilot.StoreError) as caught:
            store.save(meta)
        locker.join()
        self.assertIn("is locked by another process", str(caught.exception))
        self.assertNotIn("reindex", str(caught.exception))

    def test_an_emptied_meta_json_leaves_the_run_stoppable_and_deletable(self):
        live = LiveRun(self, self.local_config("import time\nprint('ready', flush=True)\ntime.sleep(60)\n"))
        run = self.only_run()
        (run / "meta.json").write_text("")
        code, out, err = self.cli("stop", run.name)
        self.assertEqual(code, 0, err)
        self.assertEqual(live.finish()[0], 143)
        self.assertEqual(self.cli("rm", run.name, "-y")[0], 0)
        self.assertEqual(self.runs(), [])

    def test_the_homes_parent_folders_are_private_whatever_the_umask(self):
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        home = self.tmp / "a" / "b" / "home"
        result = self.process("list", env={"RUNPILOT_HOME": str(home)})
        self.assertEqual(result.returncode, 0, result.stderr)
        for folder in (self.tmp / "a", self.tmp / "a" / "b", home):
            self.assertEqual(stat.S_IMODE(folder.stat().st_mode), 0o700, folder)
