"""`--on ssh:HOST` without a box: the backend frame, host checks, ssh's argv, the box's plan, failure lines.

The runs on real boxes are in tests/test_ssh_boxes.py.
"""

import os
import shlex
import stat
import tarfile
import io
from pathlib import Path

import runpilot
from tests.common import ConfigTestCase, HomeTestCase

GOOD_HOSTS = ("box1", "rpbox1@127.0.0.1", "ssh://rpbox1@127.0.0.1:2201", "gpu-7.lab.example.com", "user@[::1]")
BAD_HOSTS = ("-oProxyCommand=touch /tmp/x", "-p2201", "box 1", "box\t1", "box\n1", "box\x1b[31m", "box;id",
             "box$(id)", "`id`", "box|x", "box'x", "")


class Frame(HomeTestCase):
    """Where a run executes is a registry of backends, and --on takes its choices from it."""

    def test_registry_names_every_place(self) -> None:
        self.assertEqual(list(runpilot.BACKENDS), ["here", "slurm", "ssh"])
        for name, cls in runpilot.BACKENDS.items():
            with self.subTest(name=name):
                self.assertTrue(issubclass(cls, runpilot.Backend))
                self.assertEqual(cls.name, name)

    def test_backend_for_splits_name_and_argument(self) -> None:
        backend = runpilot.backend_for("ssh:box1,box2")
        self.assertIsInstance(backend, runpilot.SshBackend)
        self.assertEqual(backend.arg, "box1,box2")
        self.assertIsInstance(runpilot.backend_for("here"), runpilot.HereBackend)
        self.assertIsNone(runpilot.backend_for("slurm").arg)

    def test_unknown_place_is_one_line_naming_the_choices(self) -> None:
        config = self.write("c.yaml", "name: x\nengine: local\nentrypoint: [true]\n")
        code, out, err = self.cli("run", config, "--on", "moon")
        self.assertEqual(code, 2)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("unknown place 'moon'; choose from here, slurm, ssh", err)
        self.assertFalse(self.home.exists())

    def test_here_and_slurm_take_no_argument(self) -> None:
        config = self.write("c.yaml", "name: x\nengine: local\nentrypoint: [true]\n")
        for on in ("here:x", "slurm:x"):
            with self.subTest(on=on):
                code, _, err = self.cli("run", config, "--on", on)
                self.assertEqual(code, 2)
                self.assertIn(f"takes no argument (got {on})", err)

    def test_here_still_runs_here(self) -> None:
        config = self.local_config("print('hi')")
        code, out, _ = self.cli("run", config, "--on", "here")
        self.assertEqual((code, out), (0, "hi\n"))

    def test_runner_backend_is_named_by_the_runner_only(self) -> None:
        self.assertIsInstance(runpilot.runner_backend({"backend": "ssh", "box": "b"}), runpilot.SshBackend)
        self.assertIsNone(runpilot.runner_backend({"pid": 12, "host": "h"}))
        self.assertIsNone(runpilot.runner_backend({}))


class Hosts(HomeTestCase):
    """A host is what ssh understands; never something ssh would read as an option or a shell would split."""

    def test_hosts_ssh_understands_pass(self) -> None:
        for host in GOOD_HOSTS:
            with self.subTest(host=host):
                self.assertIsNone(runpilot.ssh_host_problem(host))

    def test_options_whitespace_and_control_characters_are_refused(self) -> None:
        for host in BAD_HOSTS:
            with self.subTest(host=host):
                self.assertIsNotNone(runpilot.ssh_host_problem(host))

    def test_proxy_command_is_refused_before_anything_runs(self) -> None:
        marker = self.tmp / "pwned"
        config = self.write("c.yaml", "name: x\nengine: local\nentrypoint: [true]\n")
        code, out, err = self.cli("run", config, "--on", f"ssh:-oProxyCommand=touch {marker}")
        self.assertEqual(code, 2)
        self.assertEqual(out, "")
        self.assertTrue(err.startswith("runpilot: error: run: argument --on: --on ssh:-oProxyCommand="), err)
        self.assertIn("starts with '-', which ssh would read as an option", err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertFalse(marker.exists())
        self.assertFalse(self.home.exists())

    def test_control_characters_are_not_echoed_raw(self) -> None:
        config = self.write("c.yaml", "name: x\nengine: local\nentrypoint: [true]\n")
        code, _, err = self.cli("run", config, "--on", "ssh:box\x1b[31m")
        self.assertEqual(code, 2)
        self.assertNotIn("\x1b", err)

    def test_a_run_needs_exactly_one_box(self) -> None:
        config = self.write("c.yaml", "name: x\nengine: local\nentrypoint: [true]\n")
        for on in ("ssh", "ssh:a,b"):
            with self.subTest(on=on):
                code, _, err = self.cli("run", config, "--on", on)
                self.assertEqual(code, 2)
                self.assertIn("runpilot run --on ssh needs one box", err)

    def test_sweep_dry_run_prints_the_plan_and_asks_no_box(self) -> None:
        config = self.write("c.yaml", "name: x\nengine: local\nentrypoint: [true]\nresources: {gpus: 1}\n")
        code, out, err = self.cli("sweep", config, "--grid", "env.A=1,2,3", "--on", "ssh:nowhere-a,nowhere-b",
                                  "--dry-run")  # boxes that do not exist: asking either one would fail
        self.assertEqual(code, 0, err)
        self.assertIn("3 run(s), 3 at a time", err)
        self.assertIn("  2. A=2\n", err)
        self.assertIn("on boxes nowhere-a, nowhere-b: each point starts on a box with 1 free GPU(s)", err)
        self.assertIn("no box was asked", err)
        self.assertFalse((self.home / "runs").exists() and any((self.home / "runs").iterdir()))
        self.assertFalse((self.home / "sweeps").exists() and any((self.home / "sweeps").iterdir()))

    def test_sweep_dry_run_refuses_a_mount_no_box_has(self) -> None:
        config = self.write("c.yaml", f"name: x\nengine: local\nentrypoint: [true]\nmounts: {{data: {self.tmp}}}\n")
        code, _, err = self.cli("sweep", config, "--grid", "env.A=1,2", "--on", "ssh:a,b", "--dry-run")
        self.assertEqual(code, 2)
        self.assertIn("mount 'data' names a folder here, which box a does not have", err)

    def test_pull_outputs_goes_with_a_box_only(self) -> None:
        config = self.write("c.yaml", "name: x\nengine: local\nentrypoint: [true]\n")
        for args in (["run", config], ["sweep", config, "--grid", "env.A=1"]):
            with self.subTest(args=args[0]):
                code, _, err = self.cli(*args, "--pull-outputs")
                self.assertEqual(code, 2)
                self.assertIn("--pull-outputs copies a box's outputs home; it goes with --on ssh:HOST", err)
                self.assertEqual(self.runs(), [])


class SshArgv(HomeTestCase):
    """Every command to a box: BatchMode, one shared connection in a private folder, the script quoted."""

    def test_options_and_quoting(self) -> None:
        script = "echo 'it''s' \"$HOME\"; rm -rf /nowhere; `id`"
        argv = runpilot.ssh_argv(self.tmp / "ssh", "ssh://u@h:22", script)
        self.assertEqual(argv[0], "ssh")
        options = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
        self.assertIn("BatchMode=yes", options)
        self.assertIn("ControlMaster=no", options)  # a client of the master that ensure_master starts
        self.assertIn(f"ControlPath={self.tmp / 'ssh'}/%C", options)
        self.assertTrue(any(o.startswith("ControlPersist=") for o in options))
        self.assertFalse(any(o.lower().startswith("stricthostkeychecking") for o in options))
        self.assertEqual(argv[-3:-1], ["--", "ssh://u@h:22"])
        self.assertEqual(shlex.split(argv[-1]), ["sh", "-c", script])

    def test_control_folder_is_private(self) -> None:
        store = runpilot.RunStore(self.home)
        box = runpilot.SshBox.of("box1", store)
        self.assertEqual(box.control_dir, self.home / "ssh")
        self.assertEqual(stat.S_IMODE(os.stat(box.control_dir).st_mode), 0o700)

    def test_home_expression(self) -> None:
        self.assertEqual(runpilot.ssh_home_expr("~/.runpilot"), '"$HOME"/.runpilot')
        self.assertEqual(runpilot.ssh_home_expr("~/my runs"), "\"$HOME\"/'my runs'")
        self.assertEqual(runpilot.ssh_home_expr("/data/rp"), "/data/rp")
        self.assertEqual(runpilot.ssh_home_expr("/data/$x"), "'/data/$x'")

    def test_box_runpilot_command_is_quoted(self) -> None:
        runner = {"home": "/h/a b", "python": "python3", "program": "/h/a b/bin/runpilot-1.py"}
        box = runpilot.SshBox("box1", self.tmp)
        self.assertEqual(shlex.split(box.runpilot(runner, ["stop", "x;y"])),
                         ["env", "RUNPILOT_HOME=/h/a b", "python3", "-c", runpilot.SSH_LAUNCHER,
                          "/h/a b/bin/runpilot-1.py", "stop", "x;y"])

    def test_the_box_imports_its_program_and_keeps_the_bytecode(self) -> None:
        import subprocess
        import sys
        program = self.tmp / "bin" / "runpilot-0123.py"
        program.parent.mkdir()
        program.write_bytes(Path(runpilot.__file__).read_bytes())
        argv = [sys.executable, "-c", runpilot.SSH_LAUNCHER, str(program), "--version"]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
        for _ in range(2):
            done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
            self.assertEqual((done.returncode, done.stdout.strip()), (0, f"runpilot {runpilot.__version__}"),
                             done.stderr)
        self.assertEqual([p.name.split(".")[0] for p in (program.parent / "__pycache__").iterdir()],
                         ["runpilot-0123"])
        done = subprocess.run([*argv[:-1], "nosuchcommand"], capture_output=True, text=True, env=env, timeout=120)
        self.assertEqual(done.returncode, 2)  # main's own exit status, not the launcher's

    def test_run_flags_carry_the_options_that_mean_the_same_there(self) -> None:
        options = runpilot.RunOptions(engine="docker", tags={"try": "3"}, stop_timeout=4.0, pull="never",
                                      gpu_check=False, gpu_pool=["0", "1"], wait_for_gpus=False)
        self.assertEqual(runpilot.ssh_run_flags(options),
                         ["--engine", "docker", "--tag", "try=3", "--stop-timeout", "4", "--pull", "never",
                          "--no-gpu-check", "--gpus", "0,1", "--no-wait"])


class Failures(HomeTestCase):
    """ssh's own failures and the box's facts become one line with the fix."""

    def test_ssh_failure_lines(self) -> None:
        cases = [("ssh: connect to host 127.0.0.1 port 2299: Connection refused\r\n", "Connection refused",
                  "check that 'ssh b true' works"),
                 ("u@127.0.0.1: Permission denied (publickey).\r\n", "Permission denied (publickey)",
                  "the box refused the key"),
                 ("Host key verification failed.\r\n", "Host key verification failed", "known_hosts")]
        for stderr, words, fix in cases:
            with self.subTest(words=words):
                line = runpilot.ssh_failure("b", stderr, "check it")
                self.assertNotIn("\n", line)
                self.assertIn(words, line)
                self.assertIn(fix, line)

    def test_probe_problems(self) -> None:
        settings = runpilot.SshSettings()
        good = {"home": ["/home/u/.runpilot"], "python": ["3.11.2"], "writable": ["yes"]}
        self.assertIsNone(runpilot.probe_problem("b", good, settings))
        cases = [({"python": ["missing"]}, "has no working python3"),
                 ({"python": ["3.8.10"]}, "has Python 3.8.10 (python3), and RunPilot needs 3.10 or newer"),
                 ({"writable": ["mkdir: cannot create directory '/x': Permission denied"]},
                  "is not writable (mkdir: cannot create directory '/x': Permission denied); set ssh.home"),
                 ({"missing": ["/datasets/in"]}, "has no folder /datasets/in (mapped in ssh.mounts)")]
        for change, words in cases:
            with self.subTest(words=words):
                self.assertIn(words, runpilot.probe_problem("b", {**good, **change}, settings))

    def test_parse_probe(self) -> None:
        facts = runpilot.parse_probe("home=/h/x\npython=3.11.2\nwritable=yes\nmissing=/a\nmissing=/b=c\nnoise\n")
        self.assertEqual(facts, {"home": ["/h/x"], "python": ["3.11.2"], "writable": ["yes"],
                                 "missing": ["/a", "/b=c"]})

    def test_box_error_line_keeps_the_box_words(self) -> None:
        err = "runpilot: error: docker is not installed (not found on PATH); install it\n"
        self.assertEqual(runpilot.box_error_line("b", err),
                         "on box b: docker is not installed (not found on PATH); install it")


class Config(ConfigTestCase):
    """The config's ssh: section."""

    def test_section_is_read_and_written_back(self) -> None:
        config = self.validate({"name": "x", "image": "i", "entrypoint": "e", "ssh": {
            "hosts": ["box1", "u@box2"], "home": "/data/rp", "mounts": {"data": "/datasets/x"}, "python": "python3.12"}})
        self.assertEqual(config.ssh, runpilot.SshSettings(hosts=("box1", "u@box2"), home="/data/rp",
                                                          mounts=(("data", "/datasets/x"),), python="python3.12"))
        again = self.validate(runpilot.config_to_dict(config))
        self.assertEqual(again.ssh, config.ssh)
        plain = self.validate({"name": "x", "image": "i", "entrypoint": "e"})
        self.assertNotIn("ssh", runpilot.config_to_dict(plain))

    def test_bad_sections(self) -> None:
        cases = [({"host": ["a"]}, "unknown key 'host' in ssh"),
                 ({"hosts": ["-oProxyCommand=x"]}, "starts with '-'"),
                 ({"mounts": {"data": "relative/x"}}, "ssh.mounts must map mount names to absolute folders"),
                 ({"home": "rp"}, "ssh.home must be an absolute folder or one under ~/"),
                 ("box1", "'ssh' must be a mapping")]
        for section, words in cases:
            with self.subTest(words=words):
                problems = self.problems({"name": "x", "image": "i", "entrypoint": "e", "ssh": section})
                self.assertTrue(any(words in p for p in problems), problems)


class Plan(ConfigTestCase):
    """What goes to the box: the code (by content), mounts mapped by ssh.mounts, nothing else."""

    def test_code_is_shipped_by_content_and_mounts_are_mapped(self) -> None:
        (self.tmp / "src" / "train.py").write_text("print(1)\n")
        config = self.validate({"name": "x", "image": "i", "entrypoint": "e",
                                "mounts": {"code": "./src", "data": "./data"},
                                "ssh": {"mounts": {"data": "/datasets/in"}}})
        plan = runpilot.ssh_plan("box1", "20261207-000000-abcdef", config)
        sources = {m.name: m.source for m in plan.config.mounts}
        self.assertEqual(sources, {"code": f"@BOXHOME@/code/{plan.code_hash}", "data": "/datasets/in"})
        self.assertEqual(plan.box_mounts, ("/datasets/in",))
        self.assertEqual(plan.code, self.tmp / "src")
        self.assertEqual(plan.config.ssh, runpilot.SshSettings())
        self.assertRegex(plan.program, r"^runpilot-[0-9a-f]{16}\.py$")

    def test_an_unmapped_mount_is_refused(self) -> None:
        for mounts in ({"code": "./src", "data": "./data"}, ["./data:/data"]):
            with self.subTest(mounts=mounts):
                config = self.validate({"name": "x", "image": "i", "entrypoint": "e", "mounts": mounts})
                with self.assertRaises(runpilot.UsageError) as caught:
                    runpilot.ssh_plan("box1", "20261207-000000-abcdef", config)
                self.assertIn("map it to the box's folder in the config's ssh.mounts", str(caught.exception))

    def test_a_script_with_no_code_mount_to_carry_it_is_refused(self) -> None:
        # before: the box ran `python3 train.py` in its configs folder: "can't open file ... train.py"
        config = self.validate({"name": "x", "engine": "local", "entrypoint": ["python3", "train.py"]})
        with self.assertRaises(runpilot.UsageError) as caught:
            runpilot.ssh_plan("box1", "20261207-000000-abcdef", config)
        self.assertIn("runs train.py, but the config has no code mount", str(caught.exception))
        self.assertIn("mounts: {code: .}", str(caught.exception))
        inline = self.validate({"name": "x", "engine": "local", "entrypoint": ["python3", "-c", "print(1)"]})
        self.assertIsNone(runpilot.ssh_plan("box1", "20261207-000000-abcdef", inline).code)

    def test_content_hash_follows_content_and_modes(self) -> None:
        folder = self.tmp / "src"
        (folder / "a.py").write_text("x = 1\n")
        first = runpilot.content_hash(folder)
        self.assertEqual(runpilot.content_hash(folder), first)
        (folder / "a.py").write_text("x = 2\n")
        second = runpilot.content_hash(folder)
        self.assertNotEqual(second, first)
        os.chmod(folder / "a.py", 0o755)
        self.assertNotEqual(runpilot.content_hash(folder), second)

    def test_payload_holds_program_code_and_config_once(self) -> None:
        (self.tmp / "src" / "train.py").write_text("print(1)\n")
        config = self.validate({"name": "x", "image": "i", "entrypoint": "e", "mounts": {"code": "./src"}})
        plan = runpilot.ssh_plan("box1", "20261207-000000-abcdef", config)
        fresh = {"home": ["/h/rp"]}
        with tarfile.open(fileobj=io.BytesIO(runpilot.ssh_payload(plan, fresh))) as tar:
            names = tar.getnames()
            text = tar.extractfile("config.yaml").read().decode()
            program = tar.extractfile("runpilot.py").read()
        self.assertEqual(sorted(names), ["code", "code/train.py", "config.yaml", "runpilot.py"])
        self.assertIn(f"code: /h/rp/code/{plan.code_hash}\n", text)
        self.assertEqual(program, Path(runpilot.__file__).read_bytes())
        there = {"home": ["/h/rp"], "program": ["yes"], "code": ["yes"]}
        with tarfile.open(fileobj=io.BytesIO(runpilot.ssh_payload(plan, there))) as tar:
            self.assertEqual(tar.getnames(), ["config.yaml"])

    def test_home_inside_the_code_folder_and_sockets_stay_here(self) -> None:
        import socket
        folder = self.tmp / "src"
        (folder / "train.py").write_text("print(1)\n")
        home = folder / ".runpilot"
        (home / "runs").mkdir(parents=True)
        (home / "runs" / "big.log").write_text("x" * 100)
        listener = socket.socket(socket.AF_UNIX)
        self.addCleanup(listener.close)
        listener.bind(str(folder / "ctl.sock"))
        self.assertEqual([p.name for p in runpilot.shipped_files(folder, home)], ["train.py"])
        config = self.validate({"name": "x", "image": "i", "entrypoint": "e", "mounts": {"code": "./src"}})
        plan = runpilot.ssh_plan("box1", "20261207-000000-abcdef", config, home)
        with tarfile.open(fileobj=io.BytesIO(runpilot.ssh_payload(plan, {"home": ["/h"]}))) as tar:
            self.assertEqual(sorted(tar.getnames()), ["code", "code/train.py", "config.yaml", "runpilot.py"])


class ShippedSnapshot(ConfigTestCase):
    """The box gets the run's code snapshot here, not the folder as it is when the payload is made."""

    def test_payload_holds_the_snapshot_not_the_folder(self) -> None:
        src = self.tmp / "src"
        (src / "pkg").mkdir(parents=True)
        (src / "train.py").write_text("print('recorded')\n")
        (src / "pkg" / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(src / "pkg" / "run.sh", 0o755)
        home = self.tmp / "home"
        snap = runpilot.SnapshotStore(home).take(src, 1 << 20)
        (src / "train.py").write_text("print('edited later')\n")
        (src / "new.py").write_text("x = 1\n")
        config = self.validate({"name": "x", "image": "i", "entrypoint": "e", "mounts": {"code": "./src"}})
        plan = runpilot.ssh_plan("box1", "20261207-000000-abcdef", config, home, snap.snapshot_id)
        self.assertEqual(plan.code_hash, "s" + snap.snapshot_id[:16])  # once per content per box
        with tarfile.open(fileobj=io.BytesIO(runpilot.ssh_payload(plan, {"home": ["/h"], "program": ["yes"]}))) as tar:
            self.assertEqual(sorted(tar.getnames()), ["code", "code/pkg/run.sh", "code/train.py", "config.yaml"])
            self.assertEqual(tar.extractfile("code/train.py").read(), b"print('recorded')\n")
            self.assertEqual(tar.getmember("code/pkg/run.sh").mode & 0o111, 0o111)
            self.assertIn(f"code: /h/code/s{snap.snapshot_id[:16]}\n", tar.extractfile("config.yaml").read().decode())


class UrlForm(HomeTestCase):
    def test_on_ssh_url_names_the_url_host(self) -> None:
        self.assertEqual(runpilot.backend_for("ssh://u@h:2201").arg, "ssh://u@h:2201")
        self.assertEqual(runpilot.backend_for("ssh:ssh://u@h:2201").arg, "ssh://u@h:2201")
        self.assertEqual(runpilot.backend_for("ssh:u@h").arg, "u@h")


class Unpack(HomeTestCase):
    """What a box sends home lands in the run's folder only."""

    def test_names_outside_the_run_folder_are_dropped(self) -> None:
        store = runpilot.RunStore(self.home)
        run_id = "20261207-000000-abcdef"
        folder = store.create_run_dir(run_id)
        meta = runpilot.RunMeta(run_id, name="x", status=runpilot.SUCCEEDED, started_at="2026-12-07T00:00:00.000Z",
                                runner={"pid": 1, "host": "box"})
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name, data in ((f"{run_id}/meta.json", meta.to_json()), (f"{run_id}/logs.txt", b"hi\n"),
                               (f"{run_id}//{self.tmp}/escaped", b"x"), (f"{run_id}/../escaped2", b"x"),
                               (f"{run_id}/config.yaml", b"name: on-the-box\n"),
                               ("20261207-000000-000000/logs.txt", b"not asked for")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        runner = {"backend": "ssh", "box": "b", "config_file": "/here/c.yaml"}
        metas = runpilot.ssh_unpack(store, buffer.getvalue(), {run_id: runner})
        self.assertEqual(sorted(p.name for p in folder.path.iterdir()), [".reserve", "logs.txt", "meta.json"]
                         if (folder.path / ".reserve").exists() else ["logs.txt", "meta.json"])
        self.assertFalse((self.tmp / "escaped").exists())
        self.assertFalse((store.runs_dir / "escaped2").exists())
        self.assertFalse((store.runs_dir / "20261207-000000-000000").exists())
        self.assertEqual(metas[run_id].runner, runner)
        self.assertEqual(metas[run_id].config_file, "/here/c.yaml")
        self.assertEqual(store.get(run_id).runner, runner)
