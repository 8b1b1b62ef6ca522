"""Engines as classes (issue 22, item 1): the ENGINES registry holds the three engines, a new engine is one
class added to it (accepted by --engine and `validate`, its command line built with no edit elsewhere), and no
code outside section 11 asks which engine it has by name. Needs no engine."""

import re
import unittest
from pathlib import Path

import runpilot
from tests.common import RUNPILOT, ConfigTestCase

RUN_ID = "20261208-000000-abcdef"
# What "asking which engine it has" looks like in code; section 11 may, nothing else may.
NAME_TEST_RE = re.compile(r"""engine (==|!=) "|engine in \(""")


def engine_named(name: str, program: str) -> type:
    """A Docker-compatible engine (nerdctl-like) under NAME whose CLI is PROGRAM: a subclass, nothing else."""
    return type("NerdctlEngine", (runpilot.DockerEngine,), {"name": name, "program": program, "package": name})


class RegistryTest(unittest.TestCase):
    def test_the_registry_lists_the_three_engines_by_name_in_the_order_they_are_offered(self):
        self.assertEqual(list(runpilot.ENGINES), ["docker", "podman", "local"])
        self.assertEqual(runpilot.ENGINES, {"docker": runpilot.DockerEngine, "podman": runpilot.PodmanEngine,
                                            "local": runpilot.LocalEngine})
        for name, cls in runpilot.ENGINES.items():
            with self.subTest(name=name):
                self.assertTrue(issubclass(cls, runpilot.Engine))
                self.assertEqual(cls.name, name)
                self.assertIsInstance(runpilot.engine_of(name), cls)

    def test_what_each_engine_says_of_itself(self):
        facts = {name: (cls.runs_in_container, cls.needs_image, cls.program)
                 for name, cls in runpilot.ENGINES.items()}
        self.assertEqual(facts, {"docker": (True, True, "docker"), "podman": (True, True, "podman"),
                                 "local": (False, False, "")})

    def test_a_name_the_registry_lacks_is_refused_unless_a_default_is_given(self):
        with self.assertRaises(runpilot.UsageError) as caught:
            runpilot.engine_of("containerd")
        self.assertEqual(str(caught.exception),
                         "engine 'containerd' is not known here; choose one of docker, podman, local")
        self.assertIsInstance(runpilot.engine_of(None, "local"), runpilot.LocalEngine)
        self.assertIsInstance(runpilot.engine_of("gone", "docker"), runpilot.DockerEngine)

    def test_the_job_sees_a_mount_where_its_engine_puts_it(self):
        mount = runpilot.Mount("/home/me/data", "/mnt/data", True, "data")
        self.assertEqual(runpilot.engine_of("local").mount_path(mount), "/home/me/data")
        self.assertEqual(runpilot.engine_of("podman").mount_path(mount), "/mnt/data")


class NewEngineTest(ConfigTestCase):
    """A Docker-compatible engine registered by a test, with its CLI a script in a temp folder."""

    def setUp(self) -> None:
        super().setUp()
        self.program = str(self.tmp / "bin" / "nerdctl")
        runpilot.ENGINES["nerdctl"] = engine_named("nerdctl", self.program)
        self.addCleanup(runpilot.ENGINES.pop, "nerdctl", None)
        self.write("train.py", "print('METRIC loss=1')\n")
        self.config = self.write("job.yaml", "name: job\nimage: busybox:1.36\nentrypoint: python train.py\n"
                                             "mounts: {code: .}\nresources:\n  gpus: 2\n")

    def test_run_accepts_it_and_builds_its_command_line(self):
        code, out, err = self.cli("run", "--engine", "nerdctl", "--dry-run", self.config)
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        command = lines[lines.index("# command (nerdctl)") + 1:]
        self.assertTrue(command[-1].startswith(f"{self.program} run --rm --init --pull never --name runpilot-"),
                        command)
        self.assertIn(" --gpus 2 ", command[-1])
        self.assertTrue(command[-1].endswith(" --entrypoint /bin/sh busybox:1.36 -c 'python train.py'"), command)

    def test_its_argv_is_dockers_with_its_own_program(self):
        config = runpilot.load_config(self.config)
        docker = runpilot.build_engine_argv(config, RUN_ID, "docker", devices=("1",))
        ours = runpilot.build_engine_argv(config, RUN_ID, "nerdctl", devices=("1",))
        self.assertEqual(ours, [self.program, *docker[1:]])
        self.assertEqual(ours[1:3], ["run", "--rm"])
        self.assertEqual(runpilot.job_environment(config, RUN_ID, "nerdctl", {})["RUNPILOT_MOUNT_CODE"],
                         "/workspace")

    def test_validate_and_the_config_accept_it_and_ask_for_an_image(self):
        named = self.write("named.yaml", "name: job\nengine: nerdctl\nimage: busybox:1.36\nentrypoint: 'true'\n")
        code, out, err = self.cli("validate", named)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("named.yaml: ok (job, image busybox:1.36", out)
        imageless = self.write("imageless.yaml", "name: job\nengine: nerdctl\nentrypoint: 'true'\n")
        code, out, err = self.cli("validate", imageless)
        self.assertEqual(code, 2)
        self.assertEqual(err.splitlines()[0], f"runpilot: error: {imageless}:1:1: 'image' is required: add a line "
                                              "'image: ...'")

    def test_unregistered_it_is_refused_with_the_registrys_choices(self):
        runpilot.ENGINES.pop("nerdctl")
        code, out, err = self.cli("run", "--engine", "nerdctl", "--dry-run", self.config)
        self.assertEqual(code, 2)
        self.assertIn("invalid choice: 'nerdctl' (choose from 'docker', 'podman', 'local')", err)
        named = self.write("named.yaml", "name: job\nengine: nerdctl\nimage: busybox:1.36\nentrypoint: 'true'\n")
        code, out, err = self.cli("validate", named)
        self.assertEqual(code, 2)
        self.assertIn("engine must be one of docker, podman, local; got 'nerdctl'", err)

    def test_it_is_chosen_when_nothing_names_an_engine_and_only_it_is_installed(self):
        config = runpilot.load_config(self.config)
        installed = {self.program}
        self.assertEqual(runpilot.choose_engine(None, config, {}, which=installed.__contains__), "nerdctl")


class NoNameTestsTest(unittest.TestCase):
    def sections(self) -> list[tuple[str, list[str]]]:
        """runpilot.py's numbered sections: (banner, lines)."""
        found: list[tuple[str, list[str]]] = [("", [])]
        for line in Path(RUNPILOT).read_text(encoding="utf-8").splitlines():
            if line.startswith("# ===="):
                found.append((line, []))
            found[-1][1].append(line)
        return found

    def test_the_detector_finds_what_it_is_for(self):
        for line in ('if engine == "local":', 'what = "a" if record.engine != "docker" else "b"',
                     'if meta.engine in ("docker", "podman"):'):
            with self.subTest(line=line):
                self.assertRegex(line, NAME_TEST_RE)
        self.assertNotRegex("if engine_of(engine).runs_in_container:", NAME_TEST_RE)

    def test_no_code_outside_section_11_tests_an_engines_name(self):
        sections = self.sections()
        self.assertIn("# ==== 11. Engines", "\n".join(banner for banner, _ in sections))
        found = [f"{banner[7:30]}: {line.strip()}" for banner, lines in sections
                 if not banner.startswith("# ==== 11. ") for line in lines if NAME_TEST_RE.search(line)]
        self.assertEqual(found, [])


if __name__ == "__main__":
    unittest.main()
