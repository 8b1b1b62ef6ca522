"""Quick iteration and reproducibility on engine local: --set, --name/--tag, --dry-run, validate, -d, rerun,
git facts, the shared-memory hint and timeouts."""

import contextlib
import json
import os
import shlex
import sqlite3
import subprocess
import sys
import threading
import time
import unittest
import warnings
from pathlib import Path
from unittest import mock

import runpilot
from tests.common import EXAMPLES, HomeTestCase

# Prints what the job sees of its environment as one JSON line.
ENV_JOB = """\
import json, os
names = ("LR", "FLAG", "NEW", "EMPTY", "CUDA_VISIBLE_DEVICES")
print(json.dumps({k: os.environ.get(k) for k in names}, sort_keys=True))
print("METRIC loss=0.5")
"""

LR_JOB = 'import os\nprint("METRIC lr=" + os.environ["LR"])\n'

GIT_ENV = {"GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "Test",
           "GIT_COMMITTER_EMAIL": "test@example.com", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


class Iteration(HomeTestCase):
    def run_ok(self, *args: str) -> tuple[str, str]:
        code, out, err = self.cli(*args)
        self.assertEqual(code, 0, err)
        return out, err

    def newest(self) -> Path:
        return self.home / "runs" / self.db_rows()[-1]["id"]

    def assertNothingRecorded(self) -> None:
        self.assertEqual(self.runs(), [])
        self.assertEqual(self.db_rows(), [])

    def git(self, *args: str) -> str:
        done = subprocess.run(["git", "-C", str(self.work), *args], capture_output=True, text=True,
                              env={**os.environ, **GIT_ENV}, timeout=30)
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout.strip()

    def git_repo(self) -> str:
        """Make the work folder a git repo with everything in it committed; returns the commit."""
        self.git("init", "-q", "-b", "main")
        self.git("add", "-A")
        self.git("commit", "-q", "-m", "first")
        return self.git("rev-parse", "HEAD")


class Overrides(Iteration):
    def test_values_are_typed_like_yaml_scalars(self):
        config = self.local_config(ENV_JOB, LR=0.1, FLAG="x", extra="resources:\n  gpus: 64\nmetrics: [loss]\n")
        code, _, err = self.cli("run", config)
        self.assertEqual(code, 1, err)  # no machine here has 64 GPUs
        self.assertIn("or start anyway with --no-gpu-check", err)
        self.assertNothingRecorded()
        sets = ["env.LR=0.01", "env.FLAG=true", "env.NEW=abc", "env.EMPTY=", "resources.gpus=0"]
        out, _ = self.run_ok("run", config, *[a for s in sets for a in ("--set", s)])
        self.assertEqual(json.loads(out.splitlines()[0]), {"LR": "0.01", "FLAG": "true", "NEW": "abc", "EMPTY": "",
                                                           "CUDA_VISIBLE_DEVICES": ""})
        run = self.only_run()
        meta = self.meta(run)
        self.assertEqual(meta["overrides"], sets)
        self.assertEqual(meta["gpus"], {"requested": None, "devices": []})
        saved = runpilot.load_config(run / "config.yaml")
        self.assertEqual(saved.env, {"LR": "0.01", "FLAG": "true", "NEW": "abc", "EMPTY": ""})
        self.assertIsNone(saved.resources.gpus)

    def test_nested_new_keys(self):
        config = self.local_config(ENV_JOB)
        _, err = self.run_ok("run", config, "--set", "resources.shm_size=1g", "--set", "resources.cpu=2",
                             "--set", "timeout=30", "--set", "env.NEW=made")
        self.assertIn("engine local does not enforce resources.cpu, memory or shm_size", err)
        saved = runpilot.load_config(self.only_run() / "config.yaml")
        self.assertEqual((saved.resources.shm_size, saved.resources.cpu, saved.timeout, saved.env),
                         (1 << 30, 2.0, 30.0, {"NEW": "made"}))

    def test_bad_overrides_record_nothing(self):
        config = self.local_config(ENV_JOB, LR=0.1)
        for sets, message in ((["env=5", "env.X=1"], "'env' holds a int, not a mapping"),
                              (["novalue"], "must look like KEY=VALUE"),
                              (["resources.gpus=lots"], "resources.gpus must be a count"),
                              (["bogus.key=1"], "unknown key 'bogus'")):
            with self.subTest(sets=sets):
                code, out, err = self.cli("run", config, *[a for s in sets for a in ("--set", s)])
                self.assertEqual((code, out), (2, ""))
                self.assertTrue(err.startswith("runpilot: error: "), err)
                self.assertIn(message, err)
                self.assertNothingRecorded()


class NameAndTags(Iteration):
    def test_shown_by_list_and_show_and_filterable(self):
        config = self.local_config(LR_JOB, LR=0.1)
        self.run_ok("run", config)
        plain = self.db_rows()[0]["id"]
        self.run_ok("run", config, "--name", "tuned", "--tag", "try=2", "--tag", "opt=adam")
        tuned = self.db_rows()[-1]
        self.assertEqual((tuned["name"], json.loads(tuned["tags"])), ("tuned", {"opt": "adam", "try": "2"}))
        listing = self.run_ok("list", "--absolute")[0].splitlines()
        tags = listing[0].split().index("TAGS")
        self.assertEqual([line.split()[:2] + [line.split()[tags]] for line in listing[1:]],
                         [[tuned["id"][-6:], "tuned", "opt=adam,try=2"], [plain[-6:], "job", "-"]])
        shown = self.run_ok("show", tuned["id"])[0].splitlines()
        self.assertIn("name       tuned", shown)
        self.assertIn("tags       opt=adam try=2", shown)
        self.assertEqual(self.run_ok("list", "-q", "--tag", "try=2")[0].split(), [tuned["id"]])
        self.assertEqual(self.run_ok("list", "-q", "--tag", "opt=adam", "--tag", "try=2")[0].split(), [tuned["id"]])
        self.assertEqual(self.run_ok("list", "--tag", "try=3")[0], "no run matches\n")
        self.assertEqual(self.run_ok("list", "-q", "--name", "tun*")[0].split(), [tuned["id"]])
        self.assertEqual(self.run_ok("list", "-q", "--name", "job")[0].split(), [plain])
        self.assertEqual(json.loads(self.run_ok("list", "--json", "--limit", "1")[0])[0]["tags"],
                         {"opt": "adam", "try": "2"})

    def test_malformed_tag_records_nothing(self):
        code, _, err = self.cli("run", self.local_config(LR_JOB, LR=0.1), "--tag", "novalue")
        self.assertEqual(code, 2)
        self.assertIn("--tag 'novalue' must look like KEY=VALUE", err)
        self.assertNothingRecorded()


class DryRun(Iteration):
    def test_prints_resolved_config_and_command_and_records_nothing(self):
        script = 'open("ran.txt", "w").write("yes")\n'
        config = self.local_config(script, LR=0.1, extra="metrics: [loss]\n")
        code, out, err = self.cli("run", config, "--dry-run", "--set", "env.LR=0.5", "--name", "try")
        self.assertEqual((code, err), (0, ""))
        resolved, sep, command = out.partition("\n# command (local)\n")
        self.assertEqual(sep, "\n# command (local)\n")
        self.assertTrue(resolved.startswith("# resolved config\n"), out)
        self.assertEqual(runpilot.parse_yaml(resolved), {
            "name": "try", "engine": "local", "entrypoint": [sys.executable, "job.py"], "env": {"LR": "0.5"},
            "metrics": ["loss"]})
        self.assertEqual(command.splitlines(), [f"# in {self.work}", shlex.join([sys.executable, "job.py"])])
        self.assertFalse((self.work / "ran.txt").exists())
        self.assertNothingRecorded()

    def test_container_command_line(self):
        config = self.write("c.yaml", "name: c\nimage: busybox:1.36\nentrypoint: [echo, hi]\nenv:\n  A: 1\n")
        out, _ = self.run_ok("run", config, "--dry-run", "--engine", "podman", "--set", "resources.memory=1g")
        command = out.splitlines()[-1]
        argv = shlex.split(command)
        self.assertEqual(argv[:2], ["podman", "run"])
        self.assertEqual(argv[-4:], ["--entrypoint", "echo", "busybox:1.36", "hi"])
        self.assertIn("--memory 1073741824", command)
        # the job's variables reach the container through an env file (a pipe), never on the command line
        self.assertEqual(argv[argv.index("--env-file") + 1], "/dev/fd/ENV")
        self.assertNotIn("-e", argv)
        self.assertNothingRecorded()


class Validate(Iteration):
    def test_every_example_is_valid(self):
        examples = sorted(EXAMPLES.glob("*/*.yaml"))
        self.assertGreaterEqual(len(examples), 3)
        for path in examples:
            with self.subTest(example=path.relative_to(EXAMPLES)):
                code, out, err = self.cli("validate", path)
                self.assertEqual((code, err), (0, ""))
                self.assertTrue(out.startswith(f"{path}: ok ("), out)
        self.assertNothingRecorded()

    def test_every_problem_is_listed(self):
        config = self.write("broken.yaml", """\
            name: broken
            engine: local
            entrypoint: [python3, x.py]
            enviroment:
              A: 1
            resources:
              gpus: lots
              memory: huge
            timeout: soon
            metrics: [ok, "bad name"]
            """)
        code, out, err = self.cli("validate", config)
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(err.count("runpilot: error: "), 5, err)
        for problem in ("unknown key 'enviroment'", "did you mean 'env'", "resources.gpus must be a count",
                        "resources.memory must be a size", "timeout must be a duration", "metric name 'bad name'"):
            self.assertIn(problem, err)
        self.assertNotIn("Traceback", err)
        code, _, err = self.cli("validate", config, "--set", "resources.gpus=1")
        self.assertEqual(err.count("runpilot: error: "), 4, err)


SLOW = """\
import time
print("started", flush=True)
time.sleep(3)
print("METRIC loss=0.25", flush=True)
print("done", flush=True)
"""


class Detach(Iteration):
    def wait_for_row(self, run_id: str, finished: bool = False, seconds: float = 30) -> dict:
        """The run's runs.db row once it is there (and, if asked, no longer running)."""
        deadline = time.monotonic() + seconds
        while True:
            with contextlib.suppress(sqlite3.Error, runpilot.StoreError):  # the child may be creating runs.db
                runpilot.RunStore(self.home).query()  # a use of the index catches up with runs it held up
                rows = [r for r in self.db_rows() if r["id"] == run_id]
                if rows and not (finished and rows[0]["status"] == "running"):
                    return rows[0]
            self.assertLess(time.monotonic(), deadline, f"run {run_id} never got that far")
            time.sleep(0.05)

    def test_prints_the_id_returns_at_once_and_the_run_finishes(self):
        config = self.local_config(SLOW, extra="metrics: [loss]\n")
        started = time.monotonic()
        with warnings.catch_warnings():  # the child outlives its Popen object on purpose
            warnings.simplefilter("ignore", ResourceWarning)
            code, out, err = self.cli("run", config, "-d", "--tag", "bg=1")
        returned = time.monotonic() - started
        self.assertEqual((code, err), (0, ""))
        self.assertRegex(out, r"\A\d{8}-\d{6}-[0-9a-f]{6}\n\Z")
        run_id = out.strip()
        self.assertLess(returned, 2.5)
        self.assertEqual(self.wait_for_row(run_id)["status"], "running")  # the job sleeps 3 s
        row = self.wait_for_row(run_id, finished=True)
        self.assertEqual((row["status"], row["exit_code"], json.loads(row["tags"])), ("succeeded", 0, {"bg": "1"}))
        run = self.only_run()
        self.assertEqual(run.name, run_id)
        self.assertEqual(self.meta(run)["last_metrics"], {"loss": 0.25})
        self.assertEqual((run / "logs.txt").read_bytes(), b"started\nMETRIC loss=0.25\ndone\n")

    def test_the_printed_id_is_known_at_once(self):
        # Was a bug (fixed): detach() prints the id as soon as meta.json exists, but record_start writes meta.json before the
        # runs.db row, so `id=$(runpilot run -d c.yaml); runpilot logs -f $id` can fail with "no run matches"
        # (every time the index is busy, e.g. another run holds its write lock, as here for one second).
        config = self.local_config("print('hi')\n")
        runpilot.RunStore(self.home).query()  # the index exists
        lock = sqlite3.connect(self.home / "runs.db", check_same_thread=False, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        release = threading.Timer(1.0, lambda: (lock.execute("ROLLBACK"), lock.close()))
        release.start()
        self.addCleanup(release.join)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            code, out, err = self.cli("run", config, "-d")
        self.assertEqual(code, 0, err)
        run_id = out.strip()
        self.addCleanup(self.wait_for_row, run_id, True)
        code, _, err = self.cli("show", run_id)
        self.assertEqual(code, 0, err)

    def test_a_bad_config_fails_in_the_foreground(self):
        config = self.local_config(SLOW, extra="timeout: soon\n")
        code, out, err = self.cli("run", config, "--detach")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("timeout must be a duration", err)
        self.assertNothingRecorded()


class Rerun(Iteration):
    def test_stored_config_link_tags_and_new_overrides(self):
        config = self.local_config(LR_JOB, LR=0.1, extra="metrics: [lr]\n")
        self.run_ok("run", config, "--name", "first", "--tag", "try=1")
        first = self.db_rows()[0]["id"]
        config.write_text(config.read_text().replace("0.1", "9"))  # later edits do not change a rerun
        _, err = self.run_ok("rerun", "latest")
        second = self.newest()
        meta = self.meta(second)
        self.assertNotEqual(second.name, first)
        self.assertEqual((meta["rerun_of"], meta["name"], meta["tags"], meta["overrides"]),
                         (first, "first", {"try": "1"}, []))
        self.assertEqual(self.metrics(second), [{"step": 1, "lr": 0.1}])
        self.assertEqual(meta["warnings"], [])
        self.assertNotIn("warning", err)
        self.assertIn(f"rerun of   {first}", self.run_ok("show", second.name)[0].splitlines())

        self.run_ok("rerun", first[:18], "--set", "env.LR=0.5", "--tag", "try=2")
        third = self.newest()
        meta = self.meta(third)
        self.assertEqual((meta["rerun_of"], meta["tags"], meta["overrides"]), (first, {"try": "2"}, ["env.LR=0.5"]))
        self.assertEqual(self.metrics(third), [{"step": 1, "lr": 0.5}])
        self.assertEqual(runpilot.load_config(third / "config.yaml").env, {"LR": "0.5"})
        self.assertEqual(len(self.db_rows()), 3)

    def test_warns_when_a_folders_git_commit_changed(self):
        config = self.local_config(LR_JOB, LR=0.1)
        before = self.git_repo()
        self.run_ok("run", config)
        first = self.db_rows()[0]["id"]
        _, err = self.run_ok("rerun", "latest")
        self.assertEqual(self.meta(self.newest())["warnings"], [])
        self.write("job.py", LR_JOB + "# tuned\n")
        self.git("commit", "-q", "-am", "second")
        after = self.git("rev-parse", "HEAD")
        _, err = self.run_ok("rerun", first)
        root = os.path.realpath(self.work)
        warning = f"{root} is at commit {after[:12]}, was {before[:12]} in run {first}"
        meta = self.meta(self.newest())
        self.assertEqual(meta["warnings"], [warning])
        self.assertIn(f"runpilot: warning: {warning}\n", err)
        self.assertEqual(meta["git"][0]["commit"], after)

    def test_rerun_keeps_the_engine_given_on_the_command_line(self):
        # Was a bug (fixed): cmd_rerun takes the engine from the stored config.yaml only; an engine chosen with --engine is
        # not in it (config_to_dict writes config.engine), so the rerun of a `--engine local` run goes to
        # docker/podman (or fails with exit 125 where neither is installed).
        config = self.write("c.yaml", f"name: c\nimage: python:3.12-slim\nentrypoint: [{json.dumps(sys.executable)},"
                                      f" \"-c\", \"print('METRIC x=1')\"]\n")
        self.run_ok("run", config, "--engine", "local")
        empty_bin = self.tmp / "bin"
        empty_bin.mkdir()
        with mock.patch.dict(os.environ, {"PATH": str(empty_bin)}):
            os.environ.pop("RUNPILOT_ENGINE", None)
            code, _, err = self.cli("rerun", "latest")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.meta(self.newest())["engine"], "local")


class GitFacts(Iteration):
    def test_clean_work_tree(self):
        config = self.local_config(LR_JOB, LR=0.1)
        commit = self.git_repo()
        self.run_ok("run", config)
        run = self.only_run()
        root = os.path.realpath(self.work)
        self.assertEqual(self.meta(run)["git"], [{"root": root, "commit": commit, "branch": "main", "dirty": False,
                                                  "diff_saved": False}])
        self.assertFalse((run / "git.diff").exists())
        self.assertIn(f"git        {root} main {commit[:12]}", self.run_ok("show", "latest")[0].splitlines())

    def test_uncommitted_changes_are_saved_as_git_diff(self):
        config = self.local_config(LR_JOB, LR=0.1)
        commit = self.git_repo()
        self.write("job.py", LR_JOB + "# local change\n")
        self.run_ok("run", config)
        run = self.only_run()
        root = os.path.realpath(self.work)
        self.assertEqual(self.meta(run)["git"], [{"root": root, "commit": commit, "branch": "main", "dirty": True,
                                                  "diff_saved": True}])
        diff = (run / "git.diff").read_text()
        self.assertTrue(diff.startswith(f"# {root}\ndiff --git a/job.py b/job.py\n"), diff)
        self.assertIn("\n+# local change\n", diff)
        self.assertIn(f"git        {root} main {commit[:12]} (uncommitted changes)",
                      self.run_ok("show", "latest")[0].splitlines())

    def test_outside_git(self):
        if subprocess.run(["git", "-C", str(self.work), "rev-parse"], capture_output=True).returncode == 0:
            self.skipTest("the temporary folder is inside a git work tree")
        self.run_ok("run", self.local_config(LR_JOB, LR=0.1))
        run = self.only_run()
        self.assertEqual(self.meta(run)["git"], [])
        self.assertFalse((run / "git.diff").exists())


SHM_HINT = ("the job ran out of shared memory (/dev/shm): PyTorch DataLoader workers pass batches through it; "
            "set resources.shm_size (e.g. 8g), or use fewer num_workers")


class SharedMemoryHint(Iteration):
    def run_job(self, text: str, code: int) -> tuple[str | None, str]:
        """The hint recorded for a job that says TEXT on stderr and exits CODE, and RunPilot's stderr."""
        script = f"import sys\nsys.stderr.write({text!r} + '\\n')\nsys.exit({code})\n"
        got, _, err = self.cli("run", self.local_config(script))
        self.assertEqual(got, code, err)
        meta = self.meta(self.newest())
        self.assertEqual(meta["warnings"], [])  # a hint, not a warning
        return meta["hint"], err

    def test_failed_job_with_a_bus_error_gets_the_hint(self):
        hint, err = self.run_job("ERROR: Unexpected bus error encountered in worker. "
                                 "This might be caused by insufficient shared memory (shm).", 1)
        self.assertEqual(hint, SHM_HINT)
        self.assertEqual(err.count("runpilot: hint: "), 1)
        self.assertIn(f"runpilot: hint: {SHM_HINT}\n", err)

    def test_plain_bus_error(self):
        self.assertEqual(self.run_job("Bus error (core dumped)", 135)[0], SHM_HINT)

    def test_succeeding_job_gets_no_hint(self):
        hint, err = self.run_job("Bus error (core dumped), retried fine", 0)
        self.assertIsNone(hint)
        self.assertNotIn("/dev/shm", err)
        self.assertNotIn("runpilot: hint:", err)

    def test_other_failures_get_no_hint(self):
        hint, err = self.run_job("ValueError: bad input", 1)
        self.assertIsNone(hint)
        self.assertNotIn("runpilot: hint:", err)

    def test_words_containing_shm_are_not_a_hint(self):
        # Was a bug (fixed): SHM_HINT_WORDS matches the bare substring b"shm", so any failed job whose log tail says
        # "hashmap", "HashMap" or "refreshment" gets the /dev/shm advice.
        self.assertIsNone(self.run_job("KeyError: 'epoch' not in hashmap", 1)[0])


POLITE_SLEEPER = "import time\nprint('working', flush=True)\ntime.sleep(30)\n"


class Timeout(Iteration):
    def test_timeout_status_and_exit_124(self):
        config = self.local_config(POLITE_SLEEPER, extra="timeout: 1s\n")
        started = time.monotonic()
        code, out, err = self.cli("run", config)
        self.assertEqual(code, 124, err)
        self.assertLess(time.monotonic() - started, 10)
        meta = self.meta(self.only_run())
        self.assertEqual(meta["status"], "timeout")
        self.assertGreaterEqual(meta["duration"], 1)
        self.assertEqual([(r["status"], r["id"]) for r in self.db_rows()], [("timeout", meta["run_id"])])
        # the exit code is the job's own (SIGTERM); RunPilot's own exit status is said in words
        self.assertRegex(err, rf"runpilot: run {meta['run_id']} timed out after \d+\.\ds \(exit code 143\); "
                              r"runpilot exits with 124\n")
        self.assertEqual(meta["exit_code"], 143)
        self.assertEqual(out, "working\n")

    def test_set_timeout_on_the_command_line(self):
        code, _, err = self.cli("run", self.local_config(POLITE_SLEEPER), "--set", "timeout=1")
        self.assertEqual(code, 124, err)
        self.assertEqual(self.meta(self.only_run())["status"], "timeout")

    def test_exit_code_of_a_timed_out_local_job_is_not_negative(self):
        # Was a bug (fixed): _finish stores result.returncode as is for timeout/interrupted runs; a local job killed by
        # SIGTERM has Popen's -15, so meta/runs.db/list show exit code -15 (a container run shows 143).
        code, _, _ = self.cli("run", self.local_config(POLITE_SLEEPER, extra="timeout: 1s\n"))
        self.assertEqual(code, 124)
        self.assertEqual(self.meta(self.only_run())["exit_code"], 143)


if __name__ == "__main__":
    unittest.main()
