"""Config files: validation with every problem located, --set overrides, ${VAR} expansion in env, the
resolved config written back (config.yaml), and the size and duration spellings."""

import math
import unittest

import runpilot
from tests.common import SECRETS, ConfigTestCase


class SizeAndDurationTest(ConfigTestCase):
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


class RoundTripTest(ConfigTestCase):
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
        self.assertEqual(runpilot.size_spec(8 << 30), "8g")
        self.assertEqual(runpilot.size_spec(1536 << 20), "1536m")
        self.assertEqual(runpilot.size_spec(1000), 1000)


class ValidateConfigTest(ConfigTestCase):
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
            ("comma", {"data": "./we,ird"}, ("mounts.data", "holds ','", "rename the folder")),
            ("comma in list", ["./we,ird:/data"], ("mounts.0", "holds ','")),
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

    def test_a_colon_that_only_resolving_or_the_workdir_brings_is_refused(self):
        (self.tmp / "link").symlink_to(self.tmp / "a:b")  # `code: .` in a folder named exp:1 is the same
        self.assertProblem(self.with_(mounts={"code": "./link"}), "mounts.code", f"'{self.tmp}/a:b' holds ':'",
                           "move or rename the folder")
        with self.assertRaises(runpilot.ConfigError) as caught:  # it would mount the code read-only at /work
            runpilot.load_config(self.write("c.yaml", "name: n\nimage: i\nentrypoint: e\nworkdir: /work:ro\n"
                                                   "mounts: {code: .}\n"))
        self.assertEqual((caught.exception.line, caught.exception.message),
                         (4, "mount mounts.code: '/work:ro' holds ':', which the engines cannot mount exactly; "
                             "choose another container path"))

    def test_bad_gpus(self):
        # values are quoted as YAML writes them, never as Python reprs
        for gpus, shown in ((-1, "-1"), ("two", "'two'"), (True, "true"), (False, "false"), (1.5, "1.5"),
                            ([], "[]"), ([True], "[true]"), (["a b"], '["a b"]'), ({"n": 1}, '{"n": 1}')):
            with self.subTest(gpus=gpus):
                self.assertProblem(self.with_(resources={"gpus": gpus}), "resources.gpus must be", f"got {shown}")
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

    def test_names_and_paths_must_be_text(self):
        # a number where a name is expected is a mistake (`image: 3.11` is not an image), located like any other
        for key, value, shown in (("image", 3.11, "float 3.11"), ("name", 7, "int 7"), ("workdir", True, "bool true"),
                                  ("engine", 1, "1")):
            with self.subTest(key=key):
                self.assertProblem(self.with_(**{key: value}), f"'{key}'" if key != "engine" else "engine", shown)
        self.assertProblem(self.with_(image=["a"]), "'image' must be text, not a list")

    def test_nul_anywhere_is_an_error(self):
        for data in (self.with_(entrypoint="python\0 x"), self.with_(workdir="/w\0"), self.with_(image="i\0"),
                     self.with_(mounts={"data": "./data:/d\0ata"})):
            with self.subTest(data=data):
                self.assertProblem(data, "NUL character")

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


class ExpandEnvTest(ConfigTestCase):
    """${VAR} in env values takes VAR from the runner's environment; $${ is a literal ${."""

    def test_expand_env(self):
        environ = {"USER_TOKEN": "abc", "HOST": "h1", "EMPTY": ""}
        env = {"T": "${USER_TOKEN}", "URL": "https://${HOST}:80/${USER_TOKEN}/x", "PLAIN": "$USER_TOKEN",
               "E": "${EMPTY}", "NONE": "no refs", "LITERAL": "$${HOST}", "BOTH": "$${HOST}=${HOST}",
               "DOLLARS": "$$HOST $ ${HOST}$"}
        self.assertEqual(runpilot.expand_env(env, environ),
                         {"T": "abc", "URL": "https://h1:80/abc/x", "PLAIN": "$USER_TOKEN", "E": "",
                          "NONE": "no refs", "LITERAL": "${HOST}", "BOTH": "${HOST}=h1", "DOLLARS": "$$HOST $ h1$"})

    def test_unset_variable_is_a_config_error(self):
        for value in ("${MISSING_VAR}", "prefix-${MISSING_VAR}-suffix"):
            with self.subTest(value=value):
                with self.assertRaises(runpilot.ConfigError) as caught:
                    runpilot.expand_env({"OK": "${SET}", "X": value}, {"SET": "1"})
                self.assertIn("MISSING_VAR", str(caught.exception))
                self.assertIn("env.X", str(caught.exception))
                self.assertEqual(caught.exception.exit_code, 2)
        self.assertEqual(runpilot.expand_env({"X": "$${MISSING_VAR}"}, {}), {"X": "${MISSING_VAR}"})


class ApplyOverridesTest(ConfigTestCase):
    def test_overrides(self):
        data = {"name": "n", "env": {"A": "1"}, "resources": {"cpu": 2}}
        items = ["env.LR=0.01", "resources.gpus=2", "new.nested.key=x", "name=other", "env.EMPTY="]
        out, blamed = runpilot.apply_overrides(data, items)
        self.assertEqual(out, {"name": "other", "env": {"A": "1", "LR": "0.01", "EMPTY": ""},
                               "resources": {"cpu": 2, "gpus": 2}, "new": {"nested": {"key": "x"}}})
        self.assertIsInstance(out["env"]["LR"], str)  # env values are text, as written (issue 21)
        self.assertIsInstance(out["resources"]["gpus"], int)
        self.assertEqual(blamed, {("env", "LR"): "--set env.LR=0.01", ("resources", "gpus"): "--set resources.gpus=2",
                                  ("new", "nested", "key"): "--set new.nested.key=x", ("name",): "--set name=other",
                                  ("env", "EMPTY"): "--set env.EMPTY="})

    def test_value_keeps_equals(self):
        out, _ = runpilot.apply_overrides({}, ["env.OPTS=a=b"])
        self.assertEqual(out, {"env": {"OPTS": "a=b"}})

    def test_then_validates(self):
        data, blamed = runpilot.apply_overrides({"name": "n", "image": "i", "entrypoint": "e"},
                                                ["env.LR=0.01", "resources.gpus=2"])
        config = runpilot.validate_config(data, self.config_file, base_dir=self.tmp, overrides=blamed)
        self.assertEqual((config.env, config.resources.gpus), ({"LR": "0.01"}, 2))

    def test_errors_blame_the_set_argument(self):
        path = self.tmp / "config.yaml"
        path.write_text("name: n\nimage: i\nentrypoint: e\nresources:\n  gpus: 1\n")
        with self.assertRaises(runpilot.ConfigError) as caught:
            runpilot.load_config(path, ["env.LR=0.01", "resources.gpus=two"])
        self.assertEqual(caught.exception.exit_code, 2)
        self.assertTrue(str(caught.exception).startswith("--set resources.gpus=two: resources.gpus must be a count"),
                        str(caught.exception))
        self.assertIn("'two'", str(caught.exception))
        self.assertNotIn("config.yaml", str(caught.exception))  # not the file, whose value was fine
        path.write_text("name: n\nimage: i\nentrypoint: e\nresources:\n  gpus: lots\n")
        with self.assertRaises(runpilot.ConfigError) as caught:  # a problem of the file's own is located there
            runpilot.load_config(path, ["env.LR=0.01"])
        self.assertTrue(str(caught.exception).startswith(f"{path}:5:3: resources.gpus must be a count"),
                        str(caught.exception))

    def test_a_mapping_that_a_set_creates_is_blamed_on_it(self):
        path = self.tmp / "config.yaml"
        path.write_text("name: n\nimage: i\nentrypoint: e\n")
        for item, message in (("envv.LR=1", "unknown key 'envv' (did you mean 'env'?)"),
                              ("resources.gpus.x=1", 'resources.gpus must be a count (1), \'all\', or a list of '
                                                     'device indices or UUIDs ([0, 2]); got {"x": 1}'),
                              ("sweep.env.LR=1", "sweep.env must be a non-empty list")):
            with self.subTest(item=item):
                with self.assertRaises(runpilot.ConfigError) as caught:
                    runpilot.load_config(path, [item])
                self.assertTrue(str(caught.exception).startswith(f"--set {item}: {message}"), str(caught.exception))
        path.write_text("name: n\nimage: i\nentrypoint: e\nresources:\n  gpus: {x: 1}\n")
        with self.assertRaises(runpilot.ConfigError) as caught:  # the file's own mapping stays the file's
            runpilot.load_config(path, ["resources.gpus.y=2"])
        self.assertTrue(str(caught.exception).startswith(f"{path}:5:3: resources.gpus must be"), str(caught.exception))

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
