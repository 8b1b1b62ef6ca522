"""What a newcomer trips on (issue 13): exit codes that never lie, failures that explain
themselves, views that fit 80 columns, first steps that work offline."""

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import runpilot
from tests.common import BASE, RUNPILOT, HomeTestCase, LiveRun, RunsHome


class ExitStatusAndTerminal(HomeTestCase):
    def test_a_closed_output_pipe_never_changes_the_exit_status(self):
        config = self.local_config("import sys\nfor i in range(2000): print('line', i)\nsys.exit(3)\n")
        done = subprocess.run(f"{sys.executable} {RUNPILOT} run {config} 2>&1 | head -1; echo \"${{PIPESTATUS[0]}}\"",
                              shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=60)
        first, status = done.stdout.splitlines()
        self.assertEqual(status, "3", done.stderr)
        self.assertEqual(self.meta(self.only_run())["status"], "failed")

    def test_list_into_head_exits_quietly(self):
        for _ in range(3):
            self.process("run", self.local_config("print(1)"))
        done = subprocess.run(f"{sys.executable} {RUNPILOT} list | head -1; echo \"${{PIPESTATUS[0]}}\"",
                              shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=60)
        self.assertEqual(done.stdout.splitlines()[-1], "0")
        self.assertEqual(done.stderr, "")

    def test_one_exit_code_everywhere_after_ctrl_c_and_timeout(self):
        live = LiveRun(self, self.local_config("import time\nprint('ready', flush=True)\ntime.sleep(60)\n"))
        live.proc.send_signal(signal.SIGINT)
        code, _, err = live.finish()
        self.assertEqual(code, 130)
        run_id = self.only_run().name
        job_code = self.meta(self.only_run())["exit_code"]
        self.assertEqual(job_code, 130)  # the job's own status: Python died of its KeyboardInterrupt (SIGINT)
        self.assertIn(b"interrupted by Ctrl-C after", err)
        self.assertIn(f"(exit code {job_code})\n".encode(), err)  # RunPilot's 130 too: said once
        self.assertIn(f"status     interrupted (exit code {job_code})", self.cli("show", run_id)[1])
        row = json.loads(self.cli("list", "--json")[1])[0]
        self.assertEqual(row["exit_code"], job_code)
        self.assertEqual(row["reason"], "stopped by Ctrl-C (the job got SIGINT)")

    def test_a_stopped_run_says_why_in_its_record(self):
        # a 137 after a stop reads like out-of-memory unless the record says who killed it
        stubborn = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                    "signal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(60)\n")
        live = LiveRun(self, self.local_config(stubborn), "--stop-timeout", "1")
        live.proc.send_signal(signal.SIGINT)
        self.assertEqual(live.finish()[0], 130)
        live = LiveRun(self, self.local_config(stubborn))
        live.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        live.proc.send_signal(signal.SIGINT)
        self.assertEqual(live.finish()[0], 130)
        timed = self.local_config("import time\ntime.sleep(30)\n", extra="timeout: 1\n")
        self.assertEqual(self.process("run", timed).returncode, 124)
        rows = json.loads(self.cli("list", "--json")[1])
        self.assertEqual([(r["status"], r["exit_code"], r["reason"]) for r in rows], [
            ("timeout", 143, "it ran into its timeout of 1s and was stopped (the job got SIGTERM)"),
            ("interrupted", 137, "stopped by Ctrl-C (the job got SIGINT); killed by a second Ctrl-C"),
            ("interrupted", 137, "stopped by Ctrl-C (the job got SIGINT); killed after its grace period of 1s")])
        self.assertIn("reason     it ran into its timeout of 1s and was stopped (the job got SIGTERM)", self.cli("show", rows[0]["id"])[1])

    def test_ctrl_c_says_at_once_that_the_run_is_stopping(self):
        job = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
               "signal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('ready', flush=True)\nwhile True: print('tick', flush=True); time.sleep(0.1)\n")
        live = LiveRun(self, self.local_config(job), "--stop-timeout", "3")
        live.proc.send_signal(signal.SIGINT)
        said = b""
        started = time.monotonic()
        os.set_blocking(live.proc.stderr.fileno(), False)
        while b"stopping run" not in said and time.monotonic() - started < 2:
            said += live.proc.stderr.read() or b""
            time.sleep(0.05)
        self.assertLess(time.monotonic() - started, 1.5)
        self.assertIn(b"stopping run", said)
        self.assertIn(b"the job got SIGINT and has 3s to exit; press Ctrl-C again to kill it now", said)
        os.set_blocking(live.proc.stderr.fileno(), True)
        self.assertEqual(live.finish()[0], 130)

    def test_runpilots_lines_start_on_a_fresh_line(self):
        config = self.local_config("import sys\nsys.stdout.write('progress done')\nsys.stdout.flush()\n")
        done = subprocess.run([sys.executable, str(RUNPILOT), "run", str(config)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=60)
        self.assertEqual(done.returncode, 0)
        self.assertIn(b"progress done\nrunpilot: run ", done.stdout)
        self.assertEqual((self.only_run() / "logs.txt").read_bytes(), b"progress done")


class FailuresExplainThemselves(HomeTestCase):
    CASES = {
        "killed": ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", 137, "SIGKILL"),
        "not found": ("import subprocess, sys\nsys.exit(subprocess.call(['sh', '-c', 'python9 train.py']))\n",
                      127, "'python9' was not found"),
        "not executable": ("import subprocess, sys\nsys.exit(subprocess.call(['sh', '-c', './data.txt']))\n",
                           126, "could not be executed"),
        "segfault": ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n", 139, "segmentation fault"),
        "shm": ("import sys\nprint('RuntimeError: DataLoader worker (pid 12) is killed by signal: Bus error. It is "
                "possible that dataloader's workers are out of shared memory.')\nsys.exit(1)\n", 1, "shm_size"),
        "cuda": ("import sys\nprint('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB')\n"
                 "sys.exit(1)\n", 1, "GPU ran out of memory"),
        "nccl": ("import sys\nprint('torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1275, "
                 "unhandled system error, NCCL version 2.18.1\\nncclSystemError: System call failed')\nsys.exit(1)\n",
                 1, "NCCL_DEBUG=INFO"),
    }

    def test_each_failure_gets_one_hint_line_and_meta_records_it(self):
        (self.work / "data.txt").write_text("not a program\n")
        for name, (script, code, words) in self.CASES.items():
            with self.subTest(name):
                config = self.local_config(script, name=name.replace(" ", "_"))
                result = self.process("run", config)
                self.assertEqual(result.returncode, code, result.stderr)
                hints = [l for l in result.stderr.decode().splitlines() if l.startswith("runpilot: hint: ")]
                self.assertEqual(len(hints), 1, result.stderr)
                self.assertIn(words, hints[0])
                run = next(r for r in self.runs() if self.meta(r)["name"] == name.replace(" ", "_"))
                self.assertIn(words, self.meta(run)["hint"])

    def test_the_memory_limit_is_named_for_a_killed_job(self):
        config = runpilot.JobConfig(name="x", image="i", entrypoint="true",
                                    resources=runpilot.Resources(memory=64 << 20))
        meta = runpilot.RunMeta("20261201-000000-abcdef", exit_code=137)
        hint = runpilot.failure_hint(config, meta, runpilot.RunFolder(self.work))
        self.assertIn("resources.memory 64m", hint)

    def test_a_succeeding_job_has_no_hint(self):
        result = self.process("run", self.local_config("print('bus error in the logs is fine')\n"))
        self.assertNotIn(b"hint", result.stderr)
        self.assertIsNone(self.meta(self.only_run())["hint"])

    def test_show_prints_the_last_lines_of_a_failed_runs_log(self):
        script = "import sys\nfor i in range(30): print('line', i)\nsys.exit(2)\n"
        self.process("run", self.local_config(script))
        code, out, err = self.cli("show", "latest")
        self.assertEqual(code, 0, err)
        self.assertIn("log        the last 10 line(s) of logs.txt", out)
        self.assertIn("  line 29", out)
        self.assertIn("  line 20", out)
        self.assertNotIn("  line 19\n", out)
        out3 = self.cli("show", "latest", "--tail", "3")[1]
        self.assertIn("the last 3 line(s)", out3)
        self.assertNotIn("  line 26\n", out3)
        self.process("run", self.local_config("print('fine')", name="ok"))
        self.assertNotIn("log        the last", self.cli("show", "latest")[1])

    def test_a_missing_metric_is_only_warned_about_when_metrics_could_have_appeared(self):
        extra = "metrics: [loss]\n"
        failed = self.process("run", self.local_config("import sys\nsys.exit(1)\n", name="a", extra=extra))
        self.assertNotIn(b"never appeared", failed.stderr)
        typo = self.process("run", self.local_config("print('METRIC los=1')\n", name="b", extra=extra))
        self.assertIn(b"warning: metric loss listed in the config never appeared", typo.stderr)


class ConfigMistakes(HomeTestCase):
    def test_a_local_config_on_a_container_engine_records_nothing(self):
        config = self.local_config("print(1)")  # no image
        for argv in (("run", config, "--engine", "docker"), ("sweep", config, "--engine", "podman", "--grid", "env.A=1,2")):
            with self.subTest(argv[0]):
                code, out, err = self.cli(*argv)
                self.assertEqual(code, 2, err)
                self.assertTrue(err.startswith("runpilot: error: ") and "needs an image, and the config names none" in err
                                and err.count("\n") == 1, err)
                self.assertFalse((self.home / "runs").exists() and any((self.home / "runs").iterdir()))

    def test_set_errors_blame_the_argument(self):
        config = self.local_config("print(1)")
        code, out, err = self.cli("run", config, "--set", "resources.gpus=two")
        self.assertEqual(code, 2)
        self.assertTrue(err.startswith("runpilot: error: --set resources.gpus=two: resources.gpus must be"), err)
        self.assertNotIn(":1:1", err)
        self.assertEqual(err.count("\n"), 1, err)

    def test_a_number_where_a_name_is_expected_is_a_located_error(self):
        for key, value in (("image", "3.11"), ("name", "2024"), ("workdir", "7")):
            with self.subTest(key=key):
                text = {"name": "name: x", "image": "image: busybox", "entrypoint": "entrypoint: 'true'"}
                text[key] = f"{key}: {value}"
                config = self.write("c.yaml", "\n".join(text.values()) + "\n")
                code, out, err = self.cli("validate", config)
                self.assertEqual(code, 2)
                self.assertIn(f"c.yaml:{list(text).index(key) + 1}:1: '{key}' must be text", err)

    def test_a_relative_script_that_no_mount_provides_is_warned_about(self):
        bare = self.write("bare.yaml", "name: x\nimage: python:3.12\nentrypoint: python train.py\n")
        code, out, err = self.cli("validate", bare)
        self.assertEqual(code, 0, err)
        self.assertIn("warning: the entrypoint names train.py, a path relative to the image's working folder, "
                      "but no mount provides that folder", err)
        (self.work / "src").mkdir()
        typo = self.write("typo.yaml", "name: x\nimage: python:3.12\nentrypoint: python trian.py\n"
                                       "mounts: {code: ./src}\n")
        self.assertIn(f"trian.py, which is not in {self.work / 'src'}", self.cli("validate", typo)[2])
        (self.work / "src" / "train.py").write_text("")
        good = self.write("good.yaml", "name: x\nimage: python:3.12\nentrypoint: python train.py\n"
                                       "mounts: {code: ./src}\n")
        self.assertEqual(self.cli("validate", good)[2], "")


class EightyColumns(RunsHome):
    def fill(self) -> None:
        self.add_run("resnet50-imagenet-baseline-with-a-very-long-name", samples=[{"train_loss": 0.1234567,
                     "val_accuracy": 0.912345}], metric_names=["train_loss", "val_accuracy"],
                     tags={"try": "3", "owner": "ana"}, image="pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime" * 2,
                     command_line="docker run " + "--flag value " * 30)
        self.add_run("b", started=BASE.replace(minute=5), samples=[{"train_loss": 0.2, "val_accuracy": 0.8}],
                     metric_names=["train_loss", "val_accuracy"])
        self.add_run("c", started=BASE.replace(minute=9), samples=[{"train_loss": 0.3, "val_accuracy": 0.7}],
                     metric_names=["train_loss", "val_accuracy"])

    def test_every_view_fits_80_columns(self):
        self.fill()
        for args in (["list"], ["show", "-3"], ["compare", "-1", "-2", "-3"]):
            with self.subTest(args=args):
                code, out, err = self.tty_cli(*args, env={"COLUMNS": "80"})
                self.assertEqual(code, 0, err)
                widths = [runpilot.text_width(re.sub(r"\x1b\[[0-9;]*m", "", line)) for line in out.splitlines()]
                self.assertLessEqual(max(widths), 80, out)
        out = self.tty_cli("list", env={"COLUMNS": "80"})[1]
        header = out.splitlines()[0].split()
        self.assertEqual(header[:2], ["ID", "NAME"])
        self.assertIn("TRAIN_LOSS", header)
        self.assertIn("VAL_ACCURACY", header)
        self.assertNotIn("TAGS", header)  # at 80 columns the tags give way to the metrics
        self.assertIn("…", out)
        wide = self.tty_cli("list", "--no-color", env={"COLUMNS": "120"})[1]
        self.assertIn("TAGS", wide.splitlines()[0].split())
        self.assertIn("owner=ana,try=3", wide)

    def test_piped_views_follow_columns_and_no_trunc_prints_whole_values(self):
        self.fill()
        out = self.cli_env(["list"], {"COLUMNS": "80"})
        self.assertLessEqual(max(map(len, out.splitlines())), 80)
        wide = self.cli_env(["list"], {})
        self.assertIn("resnet50-imagenet-baseline-with-a-very-long-name", wide)  # piped: no limit
        whole = self.cli_env(["list", "--no-trunc"], {"COLUMNS": "80"})
        self.assertIn("resnet50-imagenet-baseline-with-a-very-long-name", whole)
        self.assertRegex(whole, r"\d{8}-\d{6}-[0-9a-f]{6}")

    def cli_env(self, args: list[str], env: dict) -> str:
        from unittest import mock
        with mock.patch.dict(os.environ, env):
            code, out, err = self.cli(*args)
        self.assertEqual(code, 0, err)
        return out

    def test_the_short_id_works_everywhere(self):
        record = self.add_run("x")
        short = runpilot.short_id(record.id)
        self.assertEqual(len(short), 6)
        for args in (["show", short], ["logs", short], ["compare", short, short], ["export", short]):
            with self.subTest(args=args):
                code, out, err = self.cli(*args)
                self.assertEqual(code, 0, err)
        self.assertIn(short, self.cli("list")[1].splitlines()[1])

    def test_list_shows_tags_and_export_adds_config_values_and_tags(self):
        self.add_run("a", tags={"try": "1"}, samples=[{"loss": 1}], config="name: a\nenv:\n  LR: 0.1\n")
        self.add_run("b", started=BASE.replace(minute=1), tags={"try": "2", "opt": "adam"}, samples=[{"loss": 2}],
                     config="name: b\nenv:\n  LR: 0.01\n")
        listed = self.cli("list")[1]
        self.assertIn("TAGS", listed.splitlines()[0])
        self.assertIn("opt=adam,try=2", listed)
        out = self.cli("export", "-1", "-2", "--config", "--tags")[1]
        rows = list(csv.reader(io.StringIO(out)))
        header = rows[0]
        self.assertEqual(header[:2], ["run_id", "name"])
        self.assertIn("env.LR", header)
        self.assertIn("tag.try", header)
        by_name = {r[1]: dict(zip(header, r)) for r in rows[1:]}
        self.assertEqual((by_name["a"]["env.LR"], by_name["a"]["tag.try"], by_name["a"]["tag.opt"]), ("0.1", "1", ""))
        self.assertEqual((by_name["b"]["env.LR"], by_name["b"]["tag.opt"]), ("0.01", "adam"))


class FirstStepsOffline(HomeTestCase):
    def fake_engine(self, images: list[str]) -> dict:
        bin_dir = self.tmp / "bin"
        bin_dir.mkdir(exist_ok=True)
        for engine in ("docker", "podman"):
            script = bin_dir / engine
            listing = "\\n".join(images) if engine == "podman" else ""
            script.write_text(f"#!/bin/sh\n[ \"$1\" = images ] && printf '{listing}\\n'\nexit 0\n")
            script.chmod(0o755)
        return {"PATH": f"{bin_dir}:/usr/bin:/bin"}

    def test_init_prefers_an_image_present_here(self):
        env = self.fake_engine(["localhost/runpilot-test-busybox:latest", "localhost/runpilot-test-python:latest"])
        done = self.process("init", env=env, cwd=self.work)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(b"image: localhost/runpilot-test-python:latest (found locally (podman))", done.stdout)
        self.assertIn('image: "localhost/runpilot-test-python:latest"',
                      (self.work / "config.yaml").read_text())

    def test_init_says_how_to_get_an_image_when_none_is_here(self):
        env = self.fake_engine([])
        done = self.process("init", env=env, cwd=self.work)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(b"docker pull python:3.12-slim", done.stdout)
        self.assertIn("--engine local", (self.work / "config.yaml").read_text())
        self.assertEqual(runpilot.load_config(self.work / "config.yaml").image, "python:3.12-slim")
