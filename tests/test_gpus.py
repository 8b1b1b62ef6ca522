"""GPU requests: argument forms, the pre-flight check and what meta.json records.

There is no GPU here: detection runs against tests/fixtures/nvidia-smi, a stand-in that prints
the real tool's output (and fails the ways the real one fails), put first on PATH.
"""

import os
import shutil
from pathlib import Path
from unittest import mock

import runpilot
from tests.common import HomeTestCase

FIXTURES = Path(__file__).resolve().parent / "fixtures"


class GpuHost(HomeTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.bin = self.tmp / "bin"
        self.bin.mkdir()
        shutil.copy(FIXTURES / "nvidia-smi", self.bin / "nvidia-smi")
        self.env = {"PATH": f"{self.bin}:{os.environ['PATH']}", "FAKE_NVIDIA_SMI": "2xh100"}

    def facts(self, requested, engine="local", check=True, **env):
        return runpilot.gpu_facts(requested, engine, check, {**self.env, **env})

    def test_reads_devices_driver_and_cuda(self):
        facts = self.facts(2)
        self.assertEqual(facts["requested"], 2)
        self.assertEqual((facts["driver"], facts["cuda"]), ("535.129.03", "12.2"))
        self.assertEqual([(g["index"], g["name"], g["memory_mib"]) for g in facts["devices"]],
                         [(0, "NVIDIA H100 80GB HBM3", 81559), (1, "NVIDIA H100 80GB HBM3", 81559)])
        self.assertEqual(self.facts(["GPU-0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"] and
                                    ("GPU-0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0",))["requested"],
                         ["GPU-0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"])
        self.assertEqual(self.facts("all")["requested"], "all")

    def test_no_gpu_requested_runs_without_asking(self):
        self.assertEqual(self.facts(None, PATH="/nonexistent"), {"requested": None, "devices": []})

    def test_failures_say_what_is_missing(self):
        cases = [
            ((4,), {}, "asks for 4 GPUs but this machine has 2"),
            ((("0", "3"),), {}, "names 3, which this machine does not have (it has 0, 1)"),
            ((1,), {"FAKE_NVIDIA_SMI": "nodriver"}, "nvidia-smi failed (exit 9): NVIDIA-SMI has failed because it "
                                                    "couldn't communicate with the NVIDIA driver"),
            ((1,), {"FAKE_NVIDIA_SMI": "none"}, "nvidia-smi failed (exit 6): No devices were found"),
            ((1,), {"PATH": "/nonexistent"}, "the NVIDIA driver is not installed here (nvidia-smi not found on PATH)"),
        ]
        for args, env, message in cases:
            with self.subTest(message=message):
                with self.assertRaises(runpilot.GpuError) as caught:
                    self.facts(*args, **env)
                self.assertIn(message, str(caught.exception))
                self.assertIn("--no-gpu-check", str(caught.exception))

    def test_no_gpu_check_records_what_it_can(self):
        facts = self.facts(4, check=False)
        self.assertEqual(len(facts["devices"]), 2)
        self.assertIn("error", self.facts(1, check=False, PATH="/nonexistent"))

    def test_docker_needs_the_container_toolkit(self):
        with self.assertRaises(runpilot.GpuError) as caught:
            self.facts(1, engine="docker")
        self.assertIn("nvidia-container-toolkit", str(caught.exception))
        hook = self.bin / "nvidia-container-runtime-hook"
        hook.write_text("#!/bin/sh\n")
        hook.chmod(0o755)
        self.assertEqual(self.facts(1, engine="docker")["requested"], 1)

    def test_podman_needs_a_cdi_spec(self):
        cdi = self.tmp / "cdi"
        cdi.mkdir()
        with mock.patch.object(runpilot, "CDI_DIRS", (str(cdi),)):
            with self.assertRaises(runpilot.GpuError) as caught:
                self.facts(1, engine="podman")
            self.assertIn("nvidia-ctk cdi generate", str(caught.exception))
            (cdi / "nvidia.yaml").write_text("cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- name: all\n")
            self.assertEqual(self.facts(1, engine="podman")["requested"], 1)

    def test_run_records_gpus_in_meta_and_sets_cuda_visible_devices(self):
        script = 'import os\nprint(os.environ["CUDA_VISIBLE_DEVICES"])\n'
        config = self.local_config(script, extra="resources:\n  gpus: [1]\n")
        result = self.process("run", config, env=self.env)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, b"1\n")
        gpus = self.meta(self.only_run())["gpus"]
        self.assertEqual((gpus["requested"], gpus["cuda"], len(gpus["devices"])), (["1"], "12.2", 2))

    def test_failed_check_is_one_line_and_records_nothing(self):
        config = self.local_config("print(1)\n", extra="resources:\n  gpus: 8\n")
        result = self.process("run", config, env=self.env)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.decode(), "runpilot: error: resources.gpus asks for 8 GPUs but this machine "
                                                 "has 2; or start anyway with --no-gpu-check\n")
        self.assertEqual(self.runs(), [])


class GpuArguments(HomeTestCase):
    def test_every_form_on_both_engines(self):
        cases = [
            (1, ["--gpus", "1"], ["--device", "nvidia.com/gpu=0"]),
            (2, ["--gpus", "2"], ["--device", "nvidia.com/gpu=0", "--device", "nvidia.com/gpu=1"]),
            ("all", ["--gpus", "all"], ["--device", "nvidia.com/gpu=all"]),
            (("0", "2"), ["--gpus", '"device=0,2"'], ["--device", "nvidia.com/gpu=0", "--device", "nvidia.com/gpu=2"]),
            (("GPU-abc",), ["--gpus", '"device=GPU-abc"'], ["--device", "nvidia.com/gpu=GPU-abc"]),
            (None, [], []),
        ]
        for gpus, docker, podman in cases:
            with self.subTest(gpus=gpus):
                self.assertEqual(runpilot.gpu_args("docker", gpus), docker)
                self.assertEqual(runpilot.gpu_args("podman", gpus), podman)

    def test_config_forms(self):
        for text, expected in (("1", 1), ("all", "all"), ("[0, 2]", ("0", "2")), ("0", None),
                               ("[GPU-6f2e4b7a]", ("GPU-6f2e4b7a",))):
            with self.subTest(text=text):
                config = self.write("c.yaml", f"name: x\nimage: i\nentrypoint: e\nresources:\n  gpus: {text}\n")
                self.assertEqual(runpilot.load_config(config).resources.gpus, expected)
        for text in ("-1", "two", "true", "[]", "1.5"):
            with self.subTest(text=text):
                config = self.write("c.yaml", f"name: x\nimage: i\nentrypoint: e\nresources:\n  gpus: {text}\n")
                with self.assertRaises(runpilot.ConfigError) as caught:
                    runpilot.load_config(config)
                self.assertIn("resources.gpus must be a count", str(caught.exception))
