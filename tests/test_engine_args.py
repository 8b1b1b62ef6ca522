"""Config validation and the command lines RunPilot builds for docker, podman and engine `local`."""

import dataclasses
import json
import math
import os
import socket
import tempfile
import threading
import unittest
from pathlib import Path
from unittest import mock

import runpilot

RUN_ID = "20261128-224705-a3f9c1"
SECRETS = {"API_TOKEN": "sk-live-9f8e7d6c5b4a", "DB_PASSWORD": "hunter2-correct-horse", "LR": "0.0123456"}


class HomeTestCase(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.tmp = Path(tmp.name).resolve()
        patcher = mock.patch.dict(os.environ, {"RUNPILOT_HOME": str(self.tmp / "home")})
        patcher.start()
        self.addCleanup(patcher.stop)
        for folder in ("src", "data", "ckpt", "we,ird", "a:b"):
            (self.tmp / folder).mkdir()
        self.config_file = str(self.tmp / "config.yaml")

    def validate(self, data: dict) -> runpilot.JobConfig:
        return runpilot.validate_config(data, self.config_file, base_dir=self.tmp)

    def problems(self, data: dict) -> list[str]:
        with self.assertRaises(runpilot.ConfigError) as caught:
            self.validate(data)
        self.assertEqual(caught.exception.exit_code, 2)
        return [p.message for p in [caught.exception] + caught.exception.others]

    def full_config(self, **changes) -> runpilot.JobConfig:
        data = {"name": "exp", "image": "pytorch/pytorch:2.4", "entrypoint": "python train.py --lr 0.1",
                "env": dict(SECRETS),
                "mounts": {"code": "./src", "data": "./data", "ckpt": "./ckpt:/ckpt:ro"},
                "resources": {"gpus": 2, "cpu": 4.5, "memory": "8g", "shm_size": "2g"}}
        data.update(changes)
        return self.validate(data)


class BuildEngineArgvTest(HomeTestCase):
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

    def test_list_entrypoint_is_exec_form(self):
        config = self.validate({"name": "m", "image": "img:1", "workdir": "/app",
                                "entrypoint": ["python", "-u", "train.py", "--msg", "a b; rm -rf /"]})
        argv = runpilot.build_engine_argv(config, RUN_ID, "podman", [])
        self.assertEqual(argv, self.expected_head("podman") + [
            "--log-driver", "none", "-w", "/app",
            "--entrypoint", "python", "img:1", "-u", "train.py", "--msg", "a b; rm -rf /"])

    def test_no_env_value_in_argv(self):
        config = self.full_config()
        environ = {"PATH": "/usr/bin", "HOME_SECRET": "should-not-leak-either"}
        config = dataclasses.replace(config, env={**config.env, "REF": "${HOME_SECRET}"})
        values = list(SECRETS.values()) + ["should-not-leak-either"]
        for engine in ("docker", "podman"):
            with self.subTest(engine=engine):
                env = runpilot.resolve_env(
                    runpilot.job_environment(config, RUN_ID, runpilot._mount_env(config, engine)), environ)
                launch = runpilot.make_launch(config, RUN_ID, engine, env, runpilot.RunOptions(), environ)
                for value in values:
                    self.assertFalse([a for a in launch.argv if value in a], f"{value!r} in argv")
                for name, value in SECRETS.items():
                    self.assertEqual(launch.env[name], value)  # the engine takes values from here
                    self.assertEqual(launch.argv[launch.argv.index(name) - 1], "-e")
                self.assertEqual(launch.env["REF"], "should-not-leak-either")
                self.assertEqual(launch.container, f"runpilot-{RUN_ID}")


class GpuArgsTest(HomeTestCase):
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

    def test_validated_list_reaches_argv(self):
        config = self.validate({"name": "g", "image": "i", "entrypoint": "e", "resources": {"gpus": [0, 2]}})
        self.assertEqual(config.resources.gpus, ("0", "2"))
        argv = runpilot.build_engine_argv(config, RUN_ID, "docker", [])
        self.assertEqual(argv[argv.index("--gpus") + 1], '"device=0,2"')


class ChooseEngineTest(HomeTestCase):
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


class FakeDockerApi:
    """A Unix socket that answers one canned HTTP response per request, as dockerd's API does."""

    def __init__(self, path: Path, replies: dict[str, tuple[int, bytes]]) -> None:
        self.replies, self.requests = replies, []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(4096)
                line = request.split(b"\r\n")[0].decode()
                self.requests.append(line)
                status, body = self.replies.get(line.split()[1], (500, b'{"message": "boom"}'))
                conn.sendall(b"HTTP/1.0 %d X\r\nContent-Type: application/json\r\n\r\n%s" % (status, body))

    def close(self) -> None:
        self.server.close()


class DockerApiTest(HomeTestCase):
    IMAGE_JSON = json.dumps({"Id": "sha256:" + "ab" * 32, "RepoDigests": ["busybox@sha256:" + "cd" * 32],
                             "Config": {"Env": ["PATH=/bin"]}, "Size": 4096}).encode()

    def serve(self, replies: dict) -> tuple[FakeDockerApi, dict]:
        path = self.tmp / "docker.sock"
        api = FakeDockerApi(path, replies)
        self.addCleanup(api.close)
        return api, {"DOCKER_HOST": f"unix://{path}"}

    def test_present_image(self):
        api, env = self.serve({"/images/busybox:1.36/json": (200, self.IMAGE_JSON)})
        self.assertEqual(runpilot._docker_api_image("busybox:1.36", env),
                         (True, {"image_id": "sha256:" + "ab" * 32, "repo_digests": ["busybox@sha256:" + "cd" * 32]}))
        self.assertEqual(api.requests, ["GET /images/busybox:1.36/json HTTP/1.0"])

    def test_missing_image(self):
        _, env = self.serve({"/images/ghcr.io/org/img@sha256:00/json": (404, b'{"message": "No such image"}')})
        self.assertEqual(runpilot._docker_api_image("ghcr.io/org/img@sha256:00", env), (True, None))

    def test_anything_else_is_left_to_the_cli(self):
        api, env = self.serve({"/images/bad/json": (200, b"not json"), "/images/noid/json": (200, b"{}")})
        for image in ("other:1", "bad", "noid"):  # a 500, a body that is not JSON, no Id
            with self.subTest(image):
                self.assertEqual(runpilot._docker_api_image(image, env), (False, None))
        self.assertEqual(runpilot._docker_api_image("has space", env), (False, None))  # never sent
        self.assertEqual(len(api.requests), 3)
        gone = {"DOCKER_HOST": f"unix://{self.tmp}/nothing.sock"}
        self.assertIsNone(runpilot.docker_api_get(gone["DOCKER_HOST"][7:], "/version"))
        self.assertEqual(runpilot._docker_api_image("busybox", gone), (False, None))

    def test_which_socket(self):
        home = self.tmp / "user"
        (home / ".docker").mkdir(parents=True)
        contexts = self.tmp / "contexts"
        contexts.mkdir()
        (contexts / "config.json").write_text('{"currentContext": "remote"}')
        cases = [
            ({"HOME": str(home)}, "/var/run/docker.sock"),
            ({"HOME": str(home), "DOCKER_HOST": "unix:///run/user/1000/docker.sock"}, "/run/user/1000/docker.sock"),
            ({"HOME": str(home), "DOCKER_HOST": "tcp://10.0.0.5:2376"}, None),
            ({"HOME": str(home), "DOCKER_HOST": "ssh://me@box"}, None),
            ({"HOME": str(home), "DOCKER_CONTEXT": "remote"}, None),
            ({"HOME": str(home), "DOCKER_CONFIG": str(contexts)}, None),
        ]
        for env, expected in cases:
            with self.subTest(env=env):
                self.assertEqual(runpilot.docker_socket(env), expected)
        (home / ".docker" / "config.json").write_text('{"currentContext": "default", "auths": {}}')
        self.assertEqual(runpilot.docker_socket({"HOME": str(home)}), "/var/run/docker.sock")
        (home / ".docker" / "config.json").write_text('{"currentContext": "colima"}')
        self.assertIsNone(runpilot.docker_socket({"HOME": str(home)}))


FAKE_PODMAN = """#!/bin/sh
# Answers `podman image inspect` like podman 4 with the 4-field format RunPilot asks for; logs each call.
echo "$*" >> "$FAKE_PODMAN_LOG"
printf '%s|["img@sha256:00"]|overlay|{"UpperDir":"%s/overlay/l1/diff","WorkDir":"%s/overlay/l1/work"}\\n' \\
    "$(cat "$FAKE_PODMAN_ID")" "$FAKE_PODMAN_ROOT" "$FAKE_PODMAN_ROOT"
"""


class PodmanImageCacheTest(HomeTestCase):
    def setUp(self):
        super().setUp()
        self.root = self.tmp / "storage"
        (self.root / "overlay-images").mkdir(parents=True)
        self.lock = self.root / "overlay-images" / "images.lock"
        self.lock.write_bytes(b"\x01" * 64)
        bin_dir = self.tmp / "bin"
        bin_dir.mkdir()
        (bin_dir / "podman").write_text(FAKE_PODMAN)
        (bin_dir / "podman").chmod(0o755)
        self.log, self.id_file = self.tmp / "calls.log", self.tmp / "id"
        self.id_file.write_text("sha256:aaa")
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_PODMAN_LOG": str(self.log),
               "FAKE_PODMAN_ROOT": str(self.root), "FAKE_PODMAN_ID": str(self.id_file)}
        patcher = mock.patch.dict(os.environ, env)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.cache = self.tmp / "home" / "podman-images.json"
        self.cache.parent.mkdir()

    def inspect(self, image: str = "busybox:1") -> tuple[str, int]:
        info = runpilot.prepare_image("podman", image, "missing", self.cache)
        calls = len(self.log.read_text().splitlines()) if self.log.exists() else 0
        return info["image_id"], calls

    def test_store_folder_from_the_layer_folder(self):
        data = json.dumps({"UpperDir": "/var/lib/containers/storage/overlay/abc/diff", "WorkDir": "/x"})
        self.assertEqual(runpilot._podman_image_store("overlay", data), "/var/lib/containers/storage/overlay-images")
        self.assertIsNone(runpilot._podman_image_store("vfs", data))  # the layer is not where vfs keeps it
        self.assertIsNone(runpilot._podman_image_store("overlay", "{}"))
        self.assertIsNone(runpilot._podman_image_store("overlay", "<no value>"))

    def test_answer_is_remembered_while_the_store_is_unchanged(self):
        self.assertEqual(self.inspect(), ("sha256:aaa", 1))
        self.assertEqual(self.inspect(), ("sha256:aaa", 1))  # no second CLI call
        self.assertEqual(self.inspect("other:2"), ("sha256:aaa", 2))  # another image is asked for
        self.id_file.write_text("sha256:bbb")
        self.lock.write_bytes(b"\x02" * 64)  # Podman rewrites the lock on every pull, tag or rmi
        self.assertEqual(self.inspect(), ("sha256:bbb", 3))
        self.assertEqual(set(json.loads(self.cache.read_text())), {"busybox:1"})  # older answers dropped
        self.assertEqual(self.inspect(), ("sha256:bbb", 3))

    def test_anything_else_asks_the_cli(self):
        self.inspect()
        with mock.patch.dict(os.environ, {"CONTAINERS_STORAGE_CONF": str(self.tmp / "storage.conf")}):
            self.assertEqual(self.inspect()[1], 2)  # other storage settings
        self.assertEqual(runpilot.prepare_image("podman", "busybox:1", "missing", None)["image_id"], "sha256:aaa")
        self.assertEqual(self.inspect()[1], 4)  # the answer under other settings replaced the first
        self.lock.unlink()
        self.assertEqual(self.inspect()[1], 5)  # no lock to compare
        self.assertEqual(self.inspect()[1], 6)  # and nothing remembered without one
        self.cache.write_text("not json")
        self.lock.write_bytes(b"\x03" * 64)
        self.assertEqual(self.inspect()[1], 7)  # a damaged cache is only a miss


class EngineDownTest(unittest.TestCase):
    def test_what_the_cli_said_becomes_one_line_with_the_fix(self):
        denied = ('permission denied while trying to connect to the Docker daemon socket at '
                  'unix:///var/run/docker.sock: Get "http://%2Fvar%2Frun%2Fdocker.sock/v1.50/images/x/json": '
                  'dial unix /var/run/docker.sock: connect: permission denied\n')
        down = "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?\n"
        self.assertEqual(str(runpilot._engine_down("docker", denied)),
                         "this user may not use the docker engine (permission denied on /var/run/docker.sock); "
                         "add it to the docker group ('sudo usermod -aG docker $USER', then log in again), "
                         "or use rootless Docker or Podman")
        error = runpilot._engine_down("docker", down)
        self.assertEqual(str(error), f"the docker engine is not answering ({down.strip()}); start it "
                                     "(e.g. 'sudo systemctl start docker' or 'sudo dockerd &') and retry")
        self.assertEqual(error.exit_code, 125)
        for other in ("Error: No such image: x\n", "Error: x: image not known\n", ""):
            self.assertIsNone(runpilot._engine_down("docker", other))


class ImageLookupErrorTest(HomeTestCase):
    """A failed `image inspect` is a missing image only when the CLI says so; else a clear error."""

    def test_missing_or_broken(self):
        bin_dir = self.tmp / "bin"
        bin_dir.mkdir()
        for engine in ("docker", "podman"):
            (bin_dir / engine).write_text('#!/bin/sh\nprintf "%s\\n" "$FAKE_ERR" >&2\nexit 125\n')
            (bin_dir / engine).chmod(0o755)
        cases = [
            ("podman", "Error: inspecting object: img:1: image not known", None),
            ("docker", "Error response from daemon: no such image: img:1: No such image: img:1", None),
            ("docker", "Error: No such image: img:1", None),
            ("podman", "cannot resolve /nonexistent: lstat /nonexistent: no such file or directory",
             "podman could not look up image img:1 (cannot resolve /nonexistent: lstat /nonexistent: no such "
             "file or directory); check that 'podman image inspect img:1' works for this user"),
            ("podman", "", "podman could not look up image img:1 (exit status 125); check that "
                           "'podman image inspect img:1' works for this user"),
        ]
        for engine, err, expected in cases:
            env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_ERR": err, "DOCKER_HOST": "tcp://127.0.0.1:9"}
            with self.subTest(engine=engine, err=err), mock.patch.dict(os.environ, env):
                if expected is None:
                    self.assertIsNone(runpilot._inspect_image(engine, "img:1"))
                else:
                    with self.assertRaises(runpilot.EngineError) as caught:
                        runpilot._inspect_image(engine, "img:1")
                    self.assertEqual(str(caught.exception), expected)
                    self.assertEqual(caught.exception.exit_code, 125)


class LocalEngineTest(HomeTestCase):
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


class EnvironmentTest(HomeTestCase):
    def test_job_environment(self):
        config = self.validate({"name": "e", "image": "i", "entrypoint": "e", "env": {"LR": 0.01, "FLAG": True},
                                "mounts": {"code": "./src", "my-data.v2": "./data"}})
        env = runpilot.job_environment(config, RUN_ID, runpilot._mount_env(config, "docker"))
        self.assertEqual(env, {"PYTHONUNBUFFERED": "1", "RUNPILOT_RUN_ID": RUN_ID,
                               "RUNPILOT_MOUNT_CODE": "/workspace", "RUNPILOT_MOUNT_MY_DATA_V2": "/mnt/my-data.v2",
                               "LR": "0.01", "FLAG": "true"})
        local = runpilot.job_environment(config, RUN_ID, runpilot._mount_env(config, "local"))
        self.assertEqual(local["RUNPILOT_MOUNT_MY_DATA_V2"], str(self.tmp / "data"))
        self.assertEqual(local["RUNPILOT_MOUNT_CODE"], str(self.tmp / "src"))

    def test_config_may_set_pythonunbuffered(self):
        config = self.validate({"name": "e", "image": "i", "entrypoint": "e", "env": {"PYTHONUNBUFFERED": ""}})
        self.assertEqual(runpilot.job_environment(config, RUN_ID, {})["PYTHONUNBUFFERED"], "")

    def test_resolve_env(self):
        environ = {"USER_TOKEN": "abc", "HOST": "h1", "EMPTY": ""}
        env = {"T": "${USER_TOKEN}", "URL": "https://${HOST}:80/${USER_TOKEN}/x", "PLAIN": "$USER_TOKEN",
               "E": "${EMPTY}", "NONE": "no refs", "DOLLAR": "$${HOST}"}
        self.assertEqual(runpilot.resolve_env(env, environ),
                         {"T": "abc", "URL": "https://h1:80/abc/x", "PLAIN": "$USER_TOKEN", "E": "",
                          "NONE": "no refs", "DOLLAR": "$h1"})

    def test_resolve_env_unset(self):
        for value in ("${MISSING_VAR}", "prefix-${MISSING_VAR}-suffix"):
            with self.subTest(value=value):
                with self.assertRaises(runpilot.ConfigError) as caught:
                    runpilot.resolve_env({"OK": "${SET}", "X": value}, {"SET": "1"})
                self.assertIn("MISSING_VAR", str(caught.exception))
                self.assertIn("env.X", str(caught.exception))
                self.assertEqual(caught.exception.exit_code, 2)


class ParseTest(HomeTestCase):
    def test_parse_size(self):
        good = [("8g", 8 << 30), ("512m", 512 << 20), ("8GiB", 8 << 30), ("1.5G", 3 << 29), ("1024", 1024),
                (1024, 1024), ("2k", 2048), ("1t", 1 << 40), ("100b", 100), (" 4g ", 4 << 30)]
        for text, expected in good:
            with self.subTest(text=text):
                self.assertEqual(runpilot.parse_size(text), expected)
        for text in ("8 apples", "-1", "", 0, True, False, None, -5, "0.5", "8i", "g", "1,5g", "8gb!"):
            with self.subTest(text=text), self.assertRaises(ValueError):
                runpilot.parse_size(text)

    def test_parse_duration(self):
        good = [(90, 90.0), ("90", 90.0), ("90s", 90.0), ("30m", 1800.0), ("2h", 7200.0), ("1d", 86400.0),
                ("1.5h", 5400.0), (0.5, 0.5), ("2H", 7200.0)]
        for text, expected in good:
            with self.subTest(text=text):
                self.assertEqual(runpilot.parse_duration(text), expected)
        for text in ("2 weeks", 0, -5, math.nan, math.inf, "nan", "", True, None, "-5s", "1w", "5 m s"):
            with self.subTest(text=text), self.assertRaises(ValueError):
                runpilot.parse_duration(text)


class RoundTripTest(HomeTestCase):
    def test_config_to_dict_round_trip(self):
        configs = {
            "named mounts": {"name": "a", "image": "i", "entrypoint": "python t.py",
                             "mounts": {"code": "./src", "data": "./data"}},
            "named mounts with targets": {"name": "a", "image": "i", "entrypoint": "x", "workdir": "/app",
                                          "mounts": {"code": "./src", "data": "./data:/data:ro",
                                                     "ckpt": str(self.tmp / "ckpt") + ":/mnt/ckpt:ro"}},
            "explicit mounts": {"name": "b", "image": "i", "entrypoint": ["python", "t.py"],
                                "mounts": ["./data:/data:ro", "./ckpt:/ckpt", "./src:/workspace:rw"]},
            "gpus list": {"name": "c", "image": "i", "entrypoint": "x", "resources": {"gpus": [0, 2]}},
            "gpus all": {"name": "c", "image": "i", "entrypoint": "x", "resources": {"gpus": "all"}},
            "resources": {"name": "d", "image": "i", "entrypoint": "x", "env": {"A": "1", "B": "${HOME}"},
                          "resources": {"gpus": 1, "cpu": 2.5, "memory": "1.5G", "shm_size": "512m"},
                          "metrics": ["loss", "val/acc"], "engine": "podman"},
            "timeout": {"name": "e", "image": "i", "entrypoint": "x", "timeout": "2h"},
            "fractional timeout": {"name": "e", "image": "i", "entrypoint": "x", "timeout": 1.5},
            "local": {"name": "f", "engine": "local", "entrypoint": "x", "mounts": {"code": "./src"}},
        }
        for label, data in configs.items():
            with self.subTest(label):
                config = self.validate(data)
                self.assertEqual(self.validate(runpilot.config_to_dict(config)), config)

    def test_round_trip_values(self):
        config = self.validate({"name": "d", "image": "i", "entrypoint": "x", "timeout": "30m",
                                "resources": {"gpus": [0, 2], "memory": "8g"}})
        self.assertEqual(runpilot.config_to_dict(config),
                         {"name": "d", "image": "i", "entrypoint": "x",
                          "resources": {"gpus": ["0", "2"], "memory": "8g"}, "timeout": 1800})
        self.assertEqual(runpilot.size_text(8 << 30), "8g")
        self.assertEqual(runpilot.size_text(1536 << 20), "1536m")
        self.assertEqual(runpilot.size_text(1000), 1000)


class ValidateConfigTest(HomeTestCase):
    BASE = {"name": "n", "image": "i", "entrypoint": "e"}

    def with_(self, **changes) -> dict:
        return {**self.BASE, **changes}

    def assertProblem(self, data: dict, *words: str):
        problems = self.problems(data)
        self.assertTrue(any(all(w in p for w in words) for p in problems), f"{words} not in {problems}")

    def test_full_config_values(self):
        config = self.full_config(timeout="2h", metrics=["loss"], workdir="/w")
        self.assertEqual(config.mounts, (
            runpilot.Mount(str(self.tmp / "src"), "/w", False, "code"),
            runpilot.Mount(str(self.tmp / "data"), "/mnt/data", False, "data"),
            runpilot.Mount(str(self.tmp / "ckpt"), "/ckpt", True, "ckpt")))
        self.assertEqual(config.resources, runpilot.Resources(gpus=2, cpu=4.5, memory=8 << 30, shm_size=2 << 30))
        self.assertEqual((config.timeout, config.workdir, config.env), (7200.0, "/w", SECRETS))
        self.assertEqual(config.source, self.config_file)

    def test_required(self):
        for key in ("name", "image", "entrypoint"):
            with self.subTest(key=key):
                data = dict(self.BASE)
                del data[key]
                self.assertProblem(data, f"'{key}' is required")
        with self.subTest("local needs no image"):
            self.assertIsNone(self.validate({"name": "n", "engine": "local", "entrypoint": "e"}).image)

    def test_unknown_key(self):
        self.assertProblem(self.with_(enviroment={"A": "1"}), "unknown key 'enviroment'", "did you mean 'env'")
        self.assertProblem(self.with_(resources={"gpu": 1}), "unknown key 'gpu'", "did you mean 'gpus'")

    def test_bad_env_name(self):
        for name in ("A B", "1X", "A=B", "", "A-B"):
            with self.subTest(name=name):
                self.assertProblem(self.with_(env={name: "1"}), "env name", repr(name), "not a valid variable name")

    def test_env_value(self):
        self.assertProblem(self.with_(env={"A": "x\0y"}), "env.A", "NUL")
        self.assertProblem(self.with_(env={"A": {"b": 1}}), "env.A", "single value")

    def test_mounts(self):
        cases = [
            ("missing source", {"data": "./nope"}, ("mounts.data", "does not exist")),
            ("comma", {"data": "./we,ird"}, ("mounts.data", "':' or ','")),
            ("comma in list", ["./we,ird:/data"], ("mounts.0", "':' or ','")),
            ("colon in list", [f"{self.tmp}/a:b:/data"], ("mounts.0", "too many ':'")),
            ("colon in named", {"data": "./a:b"}, ("mounts.data", "absolute container path")),
            ("relative target", ["./data:data"], ("mounts.0", "absolute container path")),
            ("no target in list", ["./data"], ("'./data' needs a container path",)),
            ("bad name", {"my data": "./data"}, ("mount name", "my data")),
            ("not a string", {"data": 5}, ("mounts.data",)),
        ]
        for label, mounts, words in cases:
            with self.subTest(label):
                self.assertProblem(self.with_(mounts=mounts), *words)

    def test_bad_gpus(self):
        for gpus in (-1, "two", True, False, 1.5, [], [True], ["a b"], {"n": 1}):
            with self.subTest(gpus=gpus):
                self.assertProblem(self.with_(resources={"gpus": gpus}), "resources.gpus must be", repr(gpus))
        for gpus, expected in ((0, None), (None, None), ("ALL", "all"), (3, 3), (["GPU-ab12", 1], ("GPU-ab12", "1"))):
            with self.subTest(gpus=gpus):
                self.assertEqual(self.validate(self.with_(resources={"gpus": gpus})).resources.gpus, expected)

    def test_bad_resources(self):
        self.assertProblem(self.with_(resources={"memory": "8 apples"}), "resources.memory must be a size", "8 apples")
        self.assertProblem(self.with_(resources={"shm_size": -1}), "resources.shm_size must be a size")
        self.assertProblem(self.with_(resources={"cpu": 0}), "resources.cpu must be a positive number")
        self.assertProblem(self.with_(resources={"cpu": "nan"}), "resources.cpu")
        self.assertProblem(self.with_(timeout="2 weeks"), "timeout must be a duration")

    def test_bad_engine(self):
        self.assertProblem(self.with_(engine="dockr"), "engine must be one of docker, podman, local", "dockr")

    def test_workdir(self):
        self.assertProblem(self.with_(workdir="app"), "workdir must be an absolute path")

    def test_not_a_mapping(self):
        for data in ([], "text"):
            with self.subTest(data=data):
                self.assertProblem(data, "must be a mapping")
        self.assertProblem(None, "the config is empty", "name, image and entrypoint")

    def test_all_problems_reported(self):
        data = {"image": "i", "entrypoint": "e", "enviroment": {}, "env": {"1X": "a"},
                "mounts": {"data": "./nope"}, "resources": {"gpus": "two", "memory": "lots"}, "engine": "dockr"}
        problems = self.problems(data)
        expected = ["unknown key 'enviroment'", "engine must be one of", "mounts.data", "'name' is required",
                    "env name '1X'", "resources.gpus", "resources.memory"]
        for words in expected:
            with self.subTest(words):
                self.assertTrue(any(words in p for p in problems), f"{words!r} not in {problems}")
        self.assertEqual(len(problems), len(expected))

    def test_error_text(self):
        with self.assertRaises(runpilot.ConfigError) as caught:
            self.validate(self.with_(engine="dockr"))
        self.assertTrue(str(caught.exception).startswith(self.config_file + ": engine must be one of"),
                        str(caught.exception))


class ApplyOverridesTest(HomeTestCase):
    def test_overrides(self):
        data = {"name": "n", "env": {"A": "1"}, "resources": {"cpu": 2}}
        out = runpilot.apply_overrides(data, ["env.LR=0.01", "resources.gpus=2", "new.nested.key=x",
                                              "name=other", "env.EMPTY="])
        self.assertEqual(out, {"name": "other", "env": {"A": "1", "LR": 0.01, "EMPTY": ""},
                               "resources": {"cpu": 2, "gpus": 2}, "new": {"nested": {"key": "x"}}})
        self.assertIsInstance(out["env"]["LR"], float)
        self.assertIsInstance(out["resources"]["gpus"], int)

    def test_value_keeps_equals(self):
        out = runpilot.apply_overrides({}, ["env.OPTS=a=b"])
        self.assertEqual(out, {"env": {"OPTS": "a=b"}})

    def test_then_validates(self):
        data = runpilot.apply_overrides({"name": "n", "image": "i", "entrypoint": "e"},
                                        ["env.LR=0.01", "resources.gpus=2"])
        config = self.validate(data)
        self.assertEqual((config.env, config.resources.gpus), ({"LR": "0.01"}, 2))

    def test_bad_syntax(self):
        for item in ("LR", "=1", "env..LR=1", "env.=1", ".env=1", "env.A.B=1"):
            with self.subTest(item=item):
                with self.assertRaises(runpilot.UsageError) as caught:
                    runpilot.apply_overrides({"env": {"A": "1"}}, [item])
                self.assertEqual(caught.exception.exit_code, 2)

    def test_not_a_mapping(self):
        with self.assertRaises(runpilot.UsageError):
            runpilot.apply_overrides(None, ["a=1"])


if __name__ == "__main__":
    unittest.main()
