"""The command lines RunPilot builds for docker, podman and engine `local`, the job's environment, choosing
the engine, and what the engine CLI's answers about images mean. (Config validation: test_config.py.)"""

import dataclasses
import os
import unittest
from unittest import mock

import runpilot
from tests.common import SECRETS, ConfigTestCase

RUN_ID = "20261128-224705-a3f9c1"


class BuildEngineArgvTest(ConfigTestCase):
    def expected_head(self, engine: str) -> list[str]:
        return [engine, "run", "--rm", "--init", "--pull", "never", "--name", f"runpilot-{RUN_ID}",
                "--label", f"runpilot.run_id={RUN_ID}"]

    def test_full_config(self):
        config = self.full_config()
        names = ["PYTHONUNBUFFERED", "RUNPILOT_RUN_ID", "API_TOKEN", "DB_PASSWORD", "LR"]
        mounts = ["-v", f"{self.tmp}/src:/workspace", "-v", f"{self.tmp}/data:/mnt/data",
                  "-v", f"{self.tmp}/ckpt:/ckpt:ro", "-w", "/workspace"]
        sizes = ["--cpus", "4.5", "--memory", str(8 << 30), "--shm-size", str(2 << 30)]
        tail = ["--entrypoint", "/bin/sh", "pytorch/pytorch:2.4", "-c", "python train.py --lr 0.1"]
        envs = [arg for name in names for arg in ("-e", name)]
        gpus = {"docker": ["--gpus", "2"],
                "podman": ["--device", "nvidia.com/gpu=0", "--device", "nvidia.com/gpu=1"]}
        for engine in ("docker", "podman"):
            with self.subTest(engine=engine):
                argv = runpilot.build_engine_argv(config, RUN_ID, engine, names)
                self.assertEqual(argv, self.expected_head(engine) + ["--log-driver", "none"] + envs + mounts
                                 + gpus[engine] + sizes + tail)
            with self.subTest(engine=engine, keep_engine_logs=True):
                argv = runpilot.build_engine_argv(config, RUN_ID, engine, names, keep_engine_logs=True)
                self.assertNotIn("--log-driver", argv)
                self.assertEqual(argv, self.expected_head(engine) + envs + mounts + gpus[engine] + sizes + tail)

    def test_minimal_config(self):
        config = self.validate({"name": "m", "image": "busybox", "entrypoint": "true"})
        self.assertEqual(runpilot.build_engine_argv(config, RUN_ID, "docker", []),
                         self.expected_head("docker") + ["--log-driver", "none", "--entrypoint", "/bin/sh",
                                                         "busybox", "-c", "true"])

    def test_env_file_comes_before_the_names(self):
        config = self.validate({"name": "m", "image": "busybox", "entrypoint": "true"})
        argv = runpilot.build_engine_argv(config, RUN_ID, "docker", ["MULTI"], env_file="/dev/fd/7")
        self.assertEqual(argv, self.expected_head("docker") + [
            "--log-driver", "none", "--env-file", "/dev/fd/7", "-e", "MULTI",
            "--entrypoint", "/bin/sh", "busybox", "-c", "true"])

    def test_list_entrypoint_is_exec_form(self):
        config = self.validate({"name": "m", "image": "img:1", "workdir": "/app",
                                "entrypoint": ["python", "-u", "train.py", "--msg", "a b; rm -rf /"]})
        argv = runpilot.build_engine_argv(config, RUN_ID, "docker", [])
        self.assertEqual(argv, self.expected_head("docker") + [
            "--log-driver", "none", "-w", "/app",
            "--entrypoint", "python", "img:1", "-u", "train.py", "--msg", "a b; rm -rf /"])

    def test_podman_creates_a_workdir_that_no_mount_provides(self):
        # docker creates a missing workdir itself; podman refuses it, so the job's own shell makes it first
        wrapper = ["/bin/sh", "img:1", "-c", 'mkdir -p "$0" && cd "$0" && exec "$@"', "/app"]
        config = self.validate({"name": "m", "image": "img:1", "workdir": "/app",
                                "entrypoint": ["python", "-u", "train.py", "--msg", "a b; rm -rf /"]})
        self.assertEqual(runpilot.build_engine_argv(config, RUN_ID, "podman", []), self.expected_head("podman") + [
            "--log-driver", "none", "-w", "/", "--entrypoint", *wrapper,
            "python", "-u", "train.py", "--msg", "a b; rm -rf /"])
        shell = self.validate({"name": "m", "image": "img:1", "workdir": "/app", "entrypoint": "python train.py"})
        self.assertEqual(runpilot.build_engine_argv(shell, RUN_ID, "podman", []), self.expected_head("podman") + [
            "--log-driver", "none", "-w", "/", "--entrypoint", *wrapper, "/bin/sh", "-c", "python train.py"])
        provided = self.validate({"name": "m", "image": "img:1", "workdir": "/app", "entrypoint": ["python"],
                                  "mounts": {"code": "./src"}})
        self.assertEqual(runpilot.build_engine_argv(provided, RUN_ID, "podman", []), self.expected_head("podman") + [
            "--log-driver", "none", "-v", f"{self.tmp}/src:/app", "-w", "/app", "--entrypoint", "python", "img:1"])

    def test_env_values_reach_the_engine_through_the_env_file_never_argv(self):
        config = self.full_config()
        environ = {"PATH": "/usr/bin", "HOME_SECRET": "should-not-leak-either"}
        multi = "line one\nline two"
        config = dataclasses.replace(config, env={**config.env, "REF": "${HOME_SECRET}", "MULTI": multi,
                                                  "PATH": "/opt/job/bin"})
        values = list(SECRETS.values()) + ["should-not-leak-either", multi, "/opt/job/bin"]
        for engine in ("docker", "podman"):
            with self.subTest(engine=engine):
                env = runpilot.job_environment(config, RUN_ID, engine, environ)
                launch = runpilot.make_launch(config, RUN_ID, engine, env, runpilot.RunOptions(), environ, None)
                for value in values:
                    self.assertFalse([a for a in launch.argv if value in a], f"{value!r} in argv")
                lines = launch.env_file.decode().splitlines()
                for name, value in SECRETS.items():
                    self.assertIn(f"{name}={value}", lines)
                self.assertIn("REF=should-not-leak-either", lines)
                self.assertIn("PATH=/opt/job/bin", lines)
                self.assertEqual(launch.argv[launch.argv.index("--env-file") + 1], "/dev/fd/ENV")
                # a value with a line break cannot go in an env file: it travels by name, from the engine
                # CLI's own environment, which is otherwise the runner's, untouched (PATH stays the runner's)
                self.assertEqual([launch.argv[i + 1] for i, a in enumerate(launch.argv) if a == "-e"], ["MULTI"])
                self.assertFalse([line for line in lines if line.startswith(("MULTI=", "line two"))])
                self.assertEqual(launch.env, {**environ, "MULTI": multi})
                self.assertEqual(launch.container, f"runpilot-{RUN_ID}")


class GpuArgsTest(ConfigTestCase):
    def test_table(self):
        cases = [
            ("docker", None, []),
            ("docker", 1, ["--gpus", "1"]),
            ("docker", 2, ["--gpus", "2"]),
            ("docker", "all", ["--gpus", "all"]),
            ("docker", ("0", "2"), ["--gpus", '"device=0,2"']),
            ("docker", ("GPU-3f2a",), ["--gpus", '"device=GPU-3f2a"']),
            ("podman", None, []),
            ("podman", 1, ["--device", "nvidia.com/gpu=0"]),
            ("podman", 2, ["--device", "nvidia.com/gpu=0", "--device", "nvidia.com/gpu=1"]),
            ("podman", "all", ["--device", "nvidia.com/gpu=all"]),
            ("podman", ("0", "2"), ["--device", "nvidia.com/gpu=0", "--device", "nvidia.com/gpu=2"]),
        ]
        for engine, gpus, expected in cases:
            with self.subTest(engine=engine, gpus=gpus):
                self.assertEqual(runpilot.gpu_args(engine, gpus), expected)

    def test_placed_devices_replace_the_count_on_both_engines(self):
        # `gpus: 2` placed on GPUs 2 and 3: explicit devices, never Docker's count (which means 0..N-1)
        config = self.validate({"name": "g", "image": "i", "entrypoint": "e", "resources": {"gpus": 2}})
        docker = runpilot.build_engine_argv(config, RUN_ID, "docker", devices=("2", "3"))
        self.assertEqual(docker[docker.index("--gpus"):docker.index("--gpus") + 2], ["--gpus", '"device=2,3"'])
        podman = runpilot.build_engine_argv(config, RUN_ID, "podman", devices=("2", "3"))
        self.assertEqual([a for a in podman if a.startswith("nvidia.com/gpu=")],
                         ["nvidia.com/gpu=2", "nvidia.com/gpu=3"])
        self.assertNotIn("--gpus", podman)
        local = runpilot.make_launch(config, RUN_ID, "local", {}, runpilot.RunOptions(), {}, ("2", "3"))
        self.assertEqual(local.env["CUDA_VISIBLE_DEVICES"], "2,3")

    def test_validated_list_reaches_argv(self):
        config = self.validate({"name": "g", "image": "i", "entrypoint": "e", "resources": {"gpus": [0, 2]}})
        self.assertEqual(config.resources.gpus, ("0", "2"))
        argv = runpilot.build_engine_argv(config, RUN_ID, "docker", [])
        self.assertEqual(argv[argv.index("--gpus") + 1], '"device=0,2"')


class ChooseEngineTest(ConfigTestCase):
    def test_precedence(self):
        def which_of(*found):
            return lambda name: f"/usr/bin/{name}" if name in found else None
        both = which_of("docker", "podman")
        cases = [
            ("flag beats all", "podman", "docker", {"RUNPILOT_ENGINE": "local"}, both, "podman"),
            ("config beats env", None, "local", {"RUNPILOT_ENGINE": "podman"}, both, "local"),
            ("env beats which", None, None, {"RUNPILOT_ENGINE": "podman"}, both, "podman"),
            ("empty env ignored", None, None, {"RUNPILOT_ENGINE": ""}, which_of("podman"), "podman"),
            ("docker first", None, None, {}, both, "docker"),
            ("podman if no docker", None, None, {}, which_of("podman"), "podman"),
            ("docker alone", None, None, {}, which_of("docker"), "docker"),
        ]
        for label, flag, engine, environ, which, expected in cases:
            with self.subTest(label):
                config = runpilot.JobConfig(name="n", image="i", entrypoint="e", engine=engine)
                self.assertEqual(runpilot.choose_engine(flag, config, environ, which=which), expected)

    def test_none_installed(self):
        config = runpilot.JobConfig(name="n", image="i", entrypoint="e")
        with self.assertRaises(runpilot.EngineError) as caught:
            runpilot.choose_engine(None, config, {}, which=lambda name: None)
        self.assertEqual(caught.exception.exit_code, 125)
        self.assertIn("--engine local", str(caught.exception))

    def test_bad_env_engine(self):
        config = runpilot.JobConfig(name="n", image="i", entrypoint="e")
        with self.assertRaises(runpilot.UsageError) as caught:
            runpilot.choose_engine(None, config, {"RUNPILOT_ENGINE": "dockr"}, which=lambda name: "/x")
        self.assertIn("RUNPILOT_ENGINE", str(caught.exception))


    def test_a_container_engine_needs_an_image(self):
        # a config written for engine local has none: --engine docker must not pull an image named "None"
        config = runpilot.JobConfig(name="n", image=None, entrypoint="e", engine="local", source="c.yaml")
        self.assertEqual(runpilot.choose_engine(None, config, {}, which=lambda name: "/x"), "local")
        for engine in ("docker", "podman"):
            with self.subTest(engine=engine):
                with self.assertRaises(runpilot.ConfigError) as caught:
                    runpilot.choose_engine(engine, config, {}, which=lambda name: "/x")
                self.assertEqual(str(caught.exception), f"c.yaml: engine {engine} needs an image, and the config "
                                                        "names none; add 'image:' to it, or run with --engine local")
                self.assertEqual(caught.exception.exit_code, 2)
                with self.assertRaises(runpilot.ConfigError):
                    runpilot.build_engine_argv(config, "20261128-000000-abcdef", engine)


class EngineDownTest(unittest.TestCase):
    def test_what_the_cli_said_becomes_one_line_with_the_fix(self):
        denied = ('permission denied while trying to connect to the Docker daemon socket at '
                  'unix:///var/run/docker.sock: Get "http://%2Fvar%2Frun%2Fdocker.sock/v1.50/images/x/json": '
                  'dial unix /var/run/docker.sock: connect: permission denied\n')
        down = "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?\n"
        self.assertEqual(str(runpilot.engine_down("docker", denied)),
                         "this user may not use the docker engine (permission denied on /var/run/docker.sock); "
                         "add it to the docker group ('sudo usermod -aG docker $USER', then log in again), "
                         "or use rootless Docker or Podman")
        error = runpilot.engine_down("docker", down)
        self.assertEqual(str(error), f"the docker engine is not answering ({down.strip()}); start it "
                                     "(e.g. 'sudo systemctl start docker' or 'sudo dockerd &') and retry")
        self.assertEqual(error.exit_code, 125)
        for other in ("Error: No such image: x\n", "Error: x: image not known\n", ""):
            self.assertIsNone(runpilot.engine_down("docker", other))




# A stand-in for `docker` / `podman`: logs each call; answers `image inspect` with the id in $FAKE_ID
# (in the --format RunPilot asks for), or fails with $FAKE_ERR on stderr.
FAKE_ENGINE = """#!/bin/sh
echo "$*" >> "$FAKE_LOG"
if [ -n "$FAKE_ERR" ]; then printf '%s\\n' "$FAKE_ERR" >&2; exit 125; fi
printf '%s|["busybox@sha256:cdcd"]\\n' "$(cat "$FAKE_ID")"
"""


class ImageLookupTest(ConfigTestCase):
    """`image inspect` through the engine CLI: present, missing, or an error that says what to check."""

    def setUp(self) -> None:
        super().setUp()
        bin_dir = self.tmp / "bin"
        bin_dir.mkdir()
        for engine in ("docker", "podman"):
            (bin_dir / engine).write_text(FAKE_ENGINE)
            (bin_dir / engine).chmod(0o755)
        self.log, self.id_file = self.tmp / "calls.log", self.tmp / "id"
        self.id_file.write_text("sha256:" + "ab" * 32)
        patcher = mock.patch.dict(os.environ, {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_LOG": str(self.log),
                                               "FAKE_ID": str(self.id_file), "FAKE_ERR": ""})
        patcher.start()
        self.addCleanup(patcher.stop)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def test_present_image(self):
        for engine in ("docker", "podman"):
            with self.subTest(engine=engine):
                self.assertEqual(runpilot.inspect_image(engine, "busybox:1.36"), {
                    "image_id": "sha256:" + "ab" * 32, "repo_digests": ["busybox@sha256:cdcd"]})
        self.assertEqual([c.split()[:2] + c.split()[-1:] for c in self.calls()],
                         [["image", "inspect", "busybox:1.36"]] * 2)

    def test_a_moved_tag_is_seen_at_once(self):
        # what `run` does before it records anything: no answer is remembered between runs, so a pull, tag or
        # rmi in between is always seen
        for engine in ("docker", "podman"):
            with self.subTest(engine=engine):
                self.id_file.write_text("sha256:" + "aa" * 32)
                self.assertEqual(runpilot.prepare_image(engine, "busybox:1", "missing")["image_id"],
                                 "sha256:" + "aa" * 32)
                self.id_file.write_text("sha256:" + "bb" * 32)
                self.assertEqual(runpilot.prepare_image(engine, "busybox:1", "missing")["image_id"],
                                 "sha256:" + "bb" * 32)
                with mock.patch.dict(os.environ, {"FAKE_ERR": "Error: busybox:1: image not known"}):
                    with self.assertRaises(runpilot.EngineError) as caught:
                        runpilot.prepare_image(engine, "busybox:1", "never")
                self.assertEqual(str(caught.exception), "image busybox:1 is not present locally and --pull never "
                                                        f"was given; pull it ({engine} pull busybox:1) or build it")
        self.assertEqual(len(self.calls()), 6)

    def test_the_gpus_are_checked_before_a_pull(self):
        # a box without a GPU learns it at once, not after pulling a multi-GB CUDA image
        config = self.validate({"name": "gpu", "image": "pytorch/pytorch:2.4", "entrypoint": "true",
                                "resources": {"gpus": 1}})
        with mock.patch.dict(os.environ, {"FAKE_ERR": "Error: No such image: pytorch/pytorch:2.4"}):
            with self.assertRaises(runpilot.GpuError) as caught:
                runpilot.check_host(config, "docker", runpilot.RunOptions(), os.environ, runpilot.ignore_events)
        self.assertIn("nvidia-smi not found on PATH", str(caught.exception))
        self.assertEqual([c.split()[:2] for c in self.calls()], [["image", "inspect"]])

    def test_missing_or_broken(self):
        cases = [
            ("podman", "Error: inspecting object: img:1: image not known", None),
            ("docker", "Error response from daemon: no such image: img:1: No such image: img:1", None),
            ("docker", "Error: No such image: img:1", None),
            ("podman", "cannot resolve /nonexistent: lstat /nonexistent: no such file or directory",
             "podman could not look up image img:1 (cannot resolve /nonexistent: lstat /nonexistent: no such "
             "file or directory); check that 'podman image inspect img:1' works for this user"),
            ("podman", " ", "podman could not look up image img:1 (exit status 125); check that "
                            "'podman image inspect img:1' works for this user"),
        ]
        for engine, err, expected in cases:
            with self.subTest(engine=engine, err=err), mock.patch.dict(os.environ, {"FAKE_ERR": err}):
                if expected is None:
                    self.assertIsNone(runpilot.inspect_image(engine, "img:1"))
                else:
                    with self.assertRaises(runpilot.EngineError) as caught:
                        runpilot.inspect_image(engine, "img:1")
                    self.assertEqual(str(caught.exception), expected)
                    self.assertEqual(caught.exception.exit_code, 125)

    def test_engine_not_installed(self):
        with mock.patch.dict(os.environ, {"PATH": str(self.tmp / "nothing")}):
            with self.assertRaises(runpilot.EngineError) as caught:
                runpilot.inspect_image("docker", "img:1")
        self.assertIn("docker is not installed", str(caught.exception))
        self.assertEqual(self.calls(), [])


class LocalEngineTest(ConfigTestCase):
    def test_local_argv(self):
        config = self.validate({"name": "l", "engine": "local", "entrypoint": "echo $HOME && ls"})
        self.assertEqual(runpilot.local_argv(config), ["/bin/sh", "-c", "echo $HOME && ls"])
        config = self.validate({"name": "l", "engine": "local", "entrypoint": ["python3", "-c", "print(1)"]})
        self.assertEqual(runpilot.local_argv(config), ["python3", "-c", "print(1)"])
        self.assertIsNone(config.image)

    def test_local_workdir(self):
        with_code = self.validate({"name": "l", "engine": "local", "entrypoint": "x",
                                   "mounts": {"data": "./data", "code": "./src"}})
        self.assertEqual(runpilot.local_workdir(with_code), str(self.tmp / "src"))
        without = self.validate({"name": "l", "engine": "local", "entrypoint": "x", "mounts": {"data": "./data"}})
        self.assertEqual(runpilot.local_workdir(without), str(self.tmp))
        no_file = runpilot.JobConfig(name="l", image=None, entrypoint="x")
        self.assertEqual(runpilot.local_workdir(no_file), os.getcwd())

    def test_local_gpu_env(self):
        cases = [(None, {"CUDA_VISIBLE_DEVICES": ""}), ("all", {}), (1, {"CUDA_VISIBLE_DEVICES": "0"}),
                 (3, {"CUDA_VISIBLE_DEVICES": "0,1,2"}), (("1", "3"), {"CUDA_VISIBLE_DEVICES": "1,3"})]
        for gpus, expected in cases:
            with self.subTest(gpus=gpus):
                self.assertEqual(runpilot.local_gpu_env(gpus), expected)




class JobEnvironmentTest(ConfigTestCase):
    """What the job sees besides the image's own environment, per engine."""

    def test_job_environment(self):
        (self.tmp / "${HOME}").mkdir()  # mount paths are taken as written, never expanded
        config = self.validate({"name": "e", "image": "i", "entrypoint": "e",
                                "env": {"LR": 0.01, "FLAG": True, "TOKEN": "${RP_TOKEN}", "LIT": "$${RP_TOKEN}"},
                                "mounts": {"code": "./src", "my-data.v2": "./data", "odd": "./${HOME}"}})
        environ = {"RP_TOKEN": "t0k", "HOME": "/root"}
        for engine in ("docker", "podman"):
            with self.subTest(engine=engine):
                self.assertEqual(runpilot.job_environment(config, RUN_ID, engine, environ), {
                    "PYTHONUNBUFFERED": "1", "RUNPILOT_RUN_ID": RUN_ID, "RUNPILOT_MOUNT_CODE": "/workspace",
                    "RUNPILOT_MOUNT_MY_DATA_V2": "/mnt/my-data.v2", "RUNPILOT_MOUNT_ODD": "/mnt/odd",
                    "LR": "0.01", "FLAG": "true", "TOKEN": "t0k", "LIT": "${RP_TOKEN}"})
        local = runpilot.job_environment(config, RUN_ID, "local", environ)
        self.assertEqual(local["RUNPILOT_MOUNT_MY_DATA_V2"], str(self.tmp / "data"))
        self.assertEqual(local["RUNPILOT_MOUNT_CODE"], str(self.tmp / "src"))
        self.assertEqual(local["RUNPILOT_MOUNT_ODD"], str(self.tmp / "${HOME}"))
        self.assertEqual(local["TOKEN"], "t0k")

    def test_unset_variable_is_a_config_error(self):
        config = self.validate({"name": "e", "image": "i", "entrypoint": "e", "env": {"TOKEN": "${RP_UNSET}"}})
        with self.assertRaises(runpilot.ConfigError) as caught:
            runpilot.job_environment(config, RUN_ID, "docker", {})
        self.assertIn("env.TOKEN refers to ${RP_UNSET}", str(caught.exception))

    def test_config_may_set_pythonunbuffered(self):
        config = self.validate({"name": "e", "image": "i", "entrypoint": "e", "env": {"PYTHONUNBUFFERED": ""}})
        self.assertEqual(runpilot.job_environment(config, RUN_ID, "docker", {})["PYTHONUNBUFFERED"], "")


if __name__ == "__main__":
    unittest.main()
