"""The command line in-process (runpilot.main) and as a copied file, on engine local."""

import json
import os
import sys
from pathlib import Path
from unittest import mock

import runpilot
from tests.common import EXAMPLES, HomeTestCase

JOB = """\
import sys
sys.stdout.write("hello\\n")
sys.stdout.flush()
sys.stderr.write("warn\\n")
sys.stderr.flush()
for i in range(1, 4):  # one write per line: under PYTHONUNBUFFERED, print() writes the newline apart,
    sys.stdout.write(f"METRIC loss={1 / i:.3f} acc={i / 4}\\n")  # and stderr could land in between
    sys.stdout.flush()
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
"""


class VersionAndHelp(HomeTestCase):
    def test_version(self):
        code, out, _ = self.cli("--version")
        self.assertEqual((code, out.strip()), (0, f"runpilot {runpilot.__version__}"))

    def test_every_command_has_help_with_an_example(self):
        for command in ("run", "rerun", "list", "show", "logs", "stop", "compare", "export", "rm", "gc",
                        "validate", "init", "reindex"):
            with self.subTest(command=command):
                code, out, _ = self.cli(command, "--help")
                self.assertEqual(code, 0)
                self.assertIn("example:", out)
                self.assertIn(f"runpilot {command}", out)

    def test_no_command_is_a_usage_error(self):
        code, _, err = self.cli()
        self.assertEqual((code, err), (2, "runpilot: error: the following arguments are required: COMMAND; "
                                          "see runpilot --help\n"))

    def test_a_command_line_mistake_is_one_line_naming_the_command(self):
        # argparse printed its usage block, and blamed the top level for an option a command lacks
        cases = [(("run", "--bogus", "c.yaml"), "run: unknown argument(s) --bogus; see runpilot run --help"),
                 (("list", "--limit", "abc"), "list: argument --limit: 'abc' must be a whole number of 1 or "
                                              "more; see runpilot list --help"),
                 (("list", "--limit", "0"), "list: argument --limit: '0' must be a whole number of 1 or more"),
                 (("logs", "latest", "--tail", "-3"), "logs: argument --tail: '-3' must be a whole number (0 or "
                                                      "more)"),
                 (("show", "latest", "--tail", "-1"), "show: argument --tail: '-1' must be a whole number"),
                 (("run", "c.yaml", "--name", " "), "run: argument --name: the name is empty; give some text, or "
                                                    "leave out --name"),
                 (("run", self.local_config("print(1)"), "--tag", "k=1", "--tag", "k=2"), "--tag k is given twice (k=1, k=2); "
                                                                     "give each key once"),
                 (("bogus",), "argument COMMAND: invalid choice: 'bogus' (choose from 'run', "),
                 (("list", "--status", "\x1b]0;x\x07"), "list: argument --status: invalid choice: '\\x1b]0;x\\x07'")]
        for argv, message in cases:
            with self.subTest(argv=argv):
                code, out, err = self.cli(*argv)
                self.assertEqual((code, out), (2, ""))
                self.assertTrue(err.startswith(f"runpilot: error: {message}"), err)
                self.assertEqual(err.count("\n"), 1, err)


class Init(HomeTestCase):
    def test_writes_sample_and_never_overwrites(self):
        os.chdir(self.work)
        self.addCleanup(os.chdir, Path(__file__).resolve().parents[1])
        code, out, _ = self.cli("init")
        self.assertEqual(code, 0)
        self.assertTrue((self.work / "config.yaml").is_file() and (self.work / "train.py").is_file())
        (self.work / "train.py").write_text("mine")
        code, _, err = self.cli("init")
        self.assertEqual(code, 2)
        self.assertEqual(err.count("\n"), 1)
        self.assertIn("runpilot: error: config.yaml, train.py already exist", err)
        self.assertEqual((self.work / "train.py").read_text(), "mine")
        self.assertEqual(self.cli("init", "--force")[0], 0)
        self.assertIn("METRIC", (self.work / "train.py").read_text())

    def test_sample_config_is_valid_and_runs_locally(self):
        os.chdir(self.work)
        self.addCleanup(os.chdir, Path(__file__).resolve().parents[1])
        self.cli("init")
        code, out, err = self.cli("run", "config.yaml", "--engine", "local")
        self.assertEqual(code, 0, err)
        run = self.only_run()
        self.assertEqual([s["step"] for s in self.metrics(run)], [1, 2, 3, 4, 5])
        self.assertIn("done", out)


class RunLocal(HomeTestCase):
    def test_run_records_everything(self):
        config = self.local_config(JOB, extra="metrics: [loss, acc]\n")
        code, out, err = self.cli("run", config)
        self.assertEqual(code, 0, err)
        run = self.only_run()
        self.assertEqual((run / "logs.txt").read_bytes().count(b"hello\n"), 1)
        self.assertEqual(sorted((run / "logs.txt").read_bytes().splitlines()),
                         sorted([b"hello", b"warn", b"METRIC loss=1.000 acc=0.25",
                                 b"METRIC loss=0.500 acc=0.5", b"METRIC loss=0.333 acc=0.75"]))
        self.assertEqual(self.metrics(run), [{"step": 1, "loss": 1.0, "acc": 0.25},
                                             {"step": 2, "loss": 0.5, "acc": 0.5},
                                             {"step": 3, "loss": 0.333, "acc": 0.75}])
        meta = self.meta(run)
        self.assertEqual(meta["status"], "succeeded")
        self.assertEqual(meta["exit_code"], 0)
        self.assertEqual(meta["engine"], "local")
        self.assertEqual(meta["name"], "job")
        self.assertEqual(meta["run_id"], run.name)
        self.assertEqual(meta["last_metrics"], {"loss": 0.333, "acc": 0.75})
        self.assertEqual(meta["metric_names"], ["loss", "acc"])
        self.assertEqual(meta["samples"], {"count": 3, "malformed": 0})
        self.assertEqual(meta["command"], [sys.executable, "job.py"])
        self.assertEqual(meta["runpilot_version"], runpilot.__version__)
        for key in ("started_at", "finished_at", "duration", "host", "user", "python", "os", "runner"):
            self.assertIsNotNone(meta[key], key)
        self.assertRegex(meta["started_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        rows = self.db_rows()
        self.assertEqual([(r["id"], r["name"], r["status"], r["exit_code"], json.loads(r["metric_names"]))
                          for r in rows], [(run.name, "job", "succeeded", 0, ["loss", "acc"])])
        self.assertEqual(run, self.home / "runs" / rows[0]["id"])
        self.assertIn(f"run {run.name} succeeded", err)
        self.assertIn("acc=0.75  loss=0.333", err)
        self.assertIn(f"folder: {run}", err)
        self.assertIn("hello", out)

    def test_exit_status_is_the_jobs(self):
        config = self.local_config(JOB.replace('sys.argv) > 1', 'sys.argv) > 0').replace(
            "int(sys.argv[1])", "3"))
        code, _, err = self.cli("run", config)
        self.assertEqual(code, 3)
        self.assertEqual(self.meta(self.only_run())["status"], "failed")
        self.assertEqual(self.db_rows()[0]["exit_code"], 3)

    def test_config_yaml_is_the_resolved_config_and_reads_back(self):
        (self.work / "data").mkdir()
        config = self.local_config(JOB, extra="mounts:\n  data: ./data\n", EPOCHS=10, TOKEN="${RP_SECRET}")
        with mock.patch.dict(os.environ, {"RP_SECRET": "s3cr3t-value"}):
            code, _, err = self.cli("run", config)
        self.assertEqual(code, 0, err)
        run = self.only_run()
        saved = (run / "config.yaml").read_text()
        again = runpilot.load_config(run / "config.yaml")
        first = runpilot.load_config(config)
        self.assertEqual(again, runpilot.dataclasses.replace(first, source=again.source))
        self.assertIn(str(self.work / "data"), saved)
        self.assertIn("${RP_SECRET}", saved)
        for name in ("config.yaml", "meta.json", "logs.txt", "metrics.json"):
            self.assertNotIn(b"s3cr3t-value", (run / name).read_bytes(), name)

    def test_unset_env_reference_is_an_error_and_records_nothing(self):
        config = self.local_config(JOB, TOKEN="${RP_SURELY_UNSET_VAR}")
        code, _, err = self.cli("run", config)
        self.assertEqual(code, 2)
        self.assertIn("RP_SURELY_UNSET_VAR", err)
        self.assertEqual(self.runs(), [])

    def test_missing_metric_and_malformed_lines_are_warned_once(self):
        script = 'print("METRIC loss=1")\nprint("METRIC nonsense")\nprint("METRIC a=1 a=2")\n'
        config = self.local_config(script, extra="metrics: [loss, val_acc]\n")
        code, _, err = self.cli("run", config)
        self.assertEqual(code, 0)
        self.assertEqual(err.count("val_acc listed in the config never appeared"), 1)
        self.assertEqual(err.count("2 METRIC line(s) were malformed"), 1)
        meta = self.meta(self.only_run())
        self.assertEqual(meta["samples"], {"count": 1, "malformed": 2})
        self.assertEqual(len(meta["warnings"]), 2, meta["warnings"])
        self.assertIn("metric val_acc listed in the config never appeared", meta["warnings"][0])
        self.assertIn("2 METRIC line(s) were malformed", meta["warnings"][1])

    def test_overrides_name_and_tags(self):
        config = self.local_config('import os\nprint("METRIC lr=" + os.environ["LR"])\n', LR=0.1)
        code, _, err = self.cli("run", config, "--set", "env.LR=0.01", "--name", "tuned", "--tag", "try=2")
        self.assertEqual(code, 0, err)
        run = self.only_run()
        self.assertEqual(self.metrics(run), [{"step": 1, "lr": 0.01}])
        meta = self.meta(run)
        self.assertEqual((meta["name"], meta["tags"], meta["overrides"]), ("tuned", {"try": "2"}, ["env.LR=0.01"]))

    def test_dry_run_prints_command_and_records_nothing(self):
        code, out, _ = self.cli("run", EXAMPLES / "seed" / "config.yaml", "--dry-run", "--engine", "docker")
        self.assertEqual(code, 0)
        self.assertIn("docker run --rm --init", out)
        self.assertIn("--gpus 1 --cpus 4 --memory 8589934592", out)
        self.assertIn("-c 'python train.py'", out)
        self.assertIn("\n# /dev/fd/ENV stands for the pipe that carries the job's environment (", out)
        self.assertIn("RUNPILOT_MOUNT_CODE, RUNPILOT_MOUNT_DATA, RUNPILOT_OUTPUT_DIR, RUNPILOT_RUN_ID):\n# to paste the command, put "
                      "NAME=VALUE lines in a file and give its path instead\n", out)
        self.assertFalse(self.home.exists() and any((self.home / "runs").iterdir()))


class BadInput(HomeTestCase):
    def assertOneLineError(self, err: str, *parts: str) -> None:
        self.assertTrue(err.startswith("runpilot: error: "), err)
        self.assertNotIn("Traceback", err)
        for part in parts:
            self.assertIn(part, err)

    def test_unknown_key_names_key_and_line(self):
        config = self.write("bad.yaml", "name: x\nimage: busybox\nentrypoint: true\nenviroment:\n  A: 1\n")
        code, _, err = self.cli("run", config)
        self.assertEqual(code, 2)
        self.assertOneLineError(err, f"{config}:4:1: unknown key 'enviroment'", "did you mean 'env'")
        self.assertFalse((self.home / "runs").exists() and any((self.home / "runs").iterdir()))
        self.assertEqual(self.db_rows(), [])

    def test_missing_required_keys_are_all_listed(self):
        config = self.write("bad.yaml", "image: busybox\n")
        code, _, err = self.cli("validate", config)
        self.assertEqual(code, 2)
        self.assertOneLineError(err, "'name' is required", "'entrypoint' is required")
        self.assertEqual(err.count("runpilot: error: "), 2)

    def test_missing_config_file(self):
        code, _, err = self.cli("run", self.work / "nope.yaml")
        self.assertEqual(code, 2)
        self.assertOneLineError(err, "nope.yaml not found")
        self.assertEqual(err.count("\n"), 1)

    def test_yaml_syntax_error_is_located(self):
        config = self.write("bad.yaml", "name: x\nentrypoint: [a, b\n")
        code, _, err = self.cli("run", config)
        self.assertEqual(code, 2)
        self.assertOneLineError(err, f"{config}:")

    def test_missing_mount_is_an_error_before_anything_starts(self):
        config = self.local_config(JOB, extra="mounts:\n  data: ./not-there\n")
        code, _, err = self.cli("run", config)
        self.assertEqual(code, 2)
        self.assertOneLineError(err, "not-there does not exist")
        self.assertEqual(self.runs(), [])

    def test_bad_override(self):
        config = self.local_config(JOB)
        code, _, err = self.cli("run", config, "--set", "novalue")
        self.assertEqual(code, 2)
        self.assertOneLineError(err, "--set 'novalue' must look like KEY=VALUE")

    def test_unknown_engine_binary(self):
        config = self.write("c.yaml", "name: x\nimage: img\nentrypoint: 'true'\n")
        with mock.patch.dict(os.environ, {"PATH": str(self.tmp)}):
            code, _, err = self.cli("run", config, "--engine", "docker")
        self.assertEqual(code, 125)
        self.assertOneLineError(err, "docker is not installed")
        self.assertEqual(self.runs(), [])


class ListShowLogs(HomeTestCase):
    def make_runs(self, count: int = 3) -> list[str]:
        config = self.local_config(JOB, extra="metrics: [loss]\n")
        for _ in range(count):
            self.assertEqual(self.cli("run", config)[0], 0)
        return [row["id"] for row in self.db_rows()]  # in start order

    def test_list_table_newest_first(self):
        ids = self.make_runs(2)
        code, out, _ = self.cli("list", "--absolute")
        self.assertEqual(code, 0)
        lines = out.splitlines()
        self.assertEqual(lines[0].split()[:6], ["ID", "NAME", "STATUS", "STARTED", "DURATION", "EXIT"])
        self.assertEqual([ln.split()[0] for ln in lines[1:]], [run_id[-6:] for run_id in ids[::-1]])
        self.assertEqual(lines[1].split()[1:3], ["job", "succeeded"])
        self.assertEqual(len({ln.index("STATUS") if "STATUS" in ln else None for ln in lines[:1]}), 1)

    def test_list_quiet_and_json(self):
        ids = self.make_runs(2)
        self.assertEqual(self.cli("list", "-q")[1].split(), ids[::-1])
        rows = json.loads(self.cli("list", "--json")[1])
        self.assertEqual([r["id"] for r in rows], ids[::-1])
        self.assertEqual(rows[0]["last_metrics"], {"loss": 0.333, "acc": 0.75})

    def test_show_by_prefix_latest_and_errors(self):
        ids = self.make_runs(2)
        code, out, _ = self.cli("show", ids[1])
        self.assertEqual(code, 0)
        self.assertIn(f"run        {ids[1]}", out)
        self.assertRegex(out, r"loss\s+3\s+1\s+0\.333\s+0\.333\s+1\s+\S+")
        self.assertIn("logs.txt", out)
        self.assertEqual(self.cli("show", "latest")[1], out)
        self.assertIn(f"run        {ids[0]}", self.cli("show", "-2")[1])
        code, _, err = self.cli("show", ids[0][:-1])  # all but the last hex digit: still unique here
        self.assertEqual(code, 0, err)
        code, _, err = self.cli("show", "1999")  # a reference to no run is a usage mistake, like a malformed one
        self.assertEqual(code, 2)
        self.assertIn("no run matches '1999'", err)
        self.assertEqual(self.cli("show", "-0")[:2], (2, ""))
        code, _, err = self.cli("show", "../../etc/passwd")
        self.assertEqual(code, 2)
        self.assertIn("is not a run id", err)

    def test_show_json(self):
        ids = self.make_runs(1)
        data = json.loads(self.cli("show", ids[0], "--json")[1])
        self.assertEqual(data["run"]["id"], ids[0])
        self.assertEqual(data["metrics"]["loss"], {"count": 3, "first": 1.0, "last": 0.333, "min": 0.333, "max": 1.0})
        self.assertEqual(set(data["files"]), {"config.yaml", "logs.txt", "meta.json", "metrics.json", "metrics.times"})

    def test_logs_and_tail(self):
        ids = self.make_runs(1)
        code, out, _ = self.cli("logs", ids[0])
        self.assertEqual(out.encode(), (self.home / "runs" / ids[0] / "logs.txt").read_bytes())
        code, out, _ = self.cli("logs", ids[0], "--tail", "2")
        self.assertEqual(out.splitlines(), (self.home / "runs" / ids[0] / "logs.txt").read_text().splitlines()[-2:])

    def test_empty_home(self):
        code, out, _ = self.cli("list")
        self.assertEqual((code, out.strip()), (0, "no runs yet; start one with: runpilot run CONFIG"))


class CopiedFile(HomeTestCase):
    def test_quickstart_local_as_a_copied_file(self):
        result = self.process("run", EXAMPLES / "quickstart" / "local.yaml")
        self.assertEqual(result.returncode, 0, result.stderr)
        run = self.only_run()
        self.assertEqual(result.stdout, (run / "logs.txt").read_bytes())
        self.assertEqual(len(self.metrics(run)), 8)
        listing = self.process("list").stdout.decode()
        self.assertIn("quickstart-local", listing)
        self.assertIn("succeeded", listing)


class HostileNames(HomeTestCase):
    def test_any_name_is_safe_and_shown_escaped(self):
        name = "../../etc/x y\\z\t\x1b[31mred " + "é" * 300
        config = self.local_config("print('METRIC a=1')\n", extra="")
        text = config.read_text().replace("name: job", f"name: {json.dumps(name)}")
        config.write_text(text)
        code, _, err = self.cli("run", config)
        self.assertEqual(code, 0, err)
        run = self.only_run()
        self.assertRegex(run.name, r"^\d{8}-\d{6}-[0-9a-f]{6}$")  # the folder is the id, never the name
        self.assertEqual(run.parent, self.home / "runs")
        self.assertEqual(self.meta(run)["name"], name)
        listing = self.cli("list")[1]
        self.assertNotIn("\x1b", listing)
        self.assertIn(r"../../etc/x y\z\t\x1b[31mred", listing)
        self.assertEqual(self.cli("show", run.name)[0], 0)
