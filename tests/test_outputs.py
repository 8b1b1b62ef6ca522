"""What a run makes (issue 23): its outputs folder, the code snapshot it runs from, reruns that
reproduce, and `runpilot diff`. Engine local only: no container engine is needed here (the
engines are in tests/test_outputs_integration.py)."""

import json
import os
import subprocess
import sys
import textwrap
import unittest
from pathlib import Path

import runpilot
from tests.common import HomeTestCase

# The job of most tests: prints its version, writes a checkpoint and a scratch file in its working folder.
TRAIN = """\
import os, sys
print("version", open("version.txt").read().strip(), flush=True)
with open(os.path.join(os.environ["RUNPILOT_OUTPUT_DIR"], "ckpt.pt"), "wb") as f:
    f.write(b"w" * 1234)
with open("scratch.txt", "a") as f:
    f.write("scratch\\n")
print("scratch before:", open("scratch.txt").read().count("scratch"), flush=True)
"""


def du(path: Path) -> int:
    """Bytes of the files under PATH (hard links once)."""
    seen, total = set(), 0
    for top, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(top, name))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


class CodeFolderCase(HomeTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.src = self.work / "src"
        self.src.mkdir()
        (self.src / "train.py").write_text(TRAIN)
        (self.src / "version.txt").write_text("1\n")

    def config(self, extra: str = "", entrypoint: str = "train.py") -> Path:
        return self.write("c.yaml", f"name: job\nengine: local\nentrypoint: [{json.dumps(sys.executable)}, "
                                    f"{entrypoint}]\nmounts: {{code: ./src}}\n{extra}")

    def run_ok(self, *args: str) -> tuple[str, str]:
        code, out, err = self.cli(*args)
        self.assertEqual(code, 0, err)
        return out, err

    def newest(self) -> Path:
        return self.home / "runs" / self.run_ok("list", "-q", "--limit", "1")[0].strip()


class IgnoreRulesTest(unittest.TestCase):
    CASES = [  # pattern text, path, is a folder, ignored
        ("*.pt", "ckpt.pt", False, True),
        ("*.pt", "a/b/ckpt.pt", False, True),
        ("*.pt", "ckpt.pth", False, False),
        ("data/", "data", True, True),
        ("data/", "data", False, False),          # a trailing / matches folders only
        ("data/", "src/data", True, True),        # ... at any depth
        ("/data", "src/data", True, False),       # a leading / anchors to the folder
        ("/data", "data", True, True),
        ("a/b", "x/a/b", False, False),           # a middle / anchors too
        ("a/b", "a/b", False, True),
        ("**/logs", "x/y/logs", True, True),
        ("**/logs", "logs", True, True),
        ("out/**", "out/a/b.bin", False, True),
        ("a/**/z", "a/z", False, True),
        ("a/**/z", "a/b/c/z", False, True),
        ("a/**/z", "b/a/z", False, False),
        ("?.txt", "a.txt", False, True),
        ("?.txt", "ab.txt", False, False),
        ("*.txt", "a/b.txt", False, True),
        ("a*", "b/abc", False, True),
        ("[ab].py", "a.py", False, True),
        ("[!ab].py", "a.py", False, False),
        ("[!ab].py", "c.py", False, True),
        ("*.bin\n!keep.bin", "keep.bin", False, False),
        ("*.bin\n!keep.bin", "drop.bin", False, True),
        ("# a comment\n\n*.log", "x.log", False, True),
        ("\\#name", "#name", False, True),
        ("\\!bang", "!bang", False, True),
        ("a.b", "axb", False, False),             # dots are literal
    ]

    def test_patterns(self):
        for text, path, is_dir, expected in self.CASES:
            with self.subTest(pattern=text, path=path):
                self.assertEqual(runpilot.IgnoreRules(text).ignored(path, is_dir), expected)

    def test_walk_skips_ignored_folders_and_git(self):
        with self._folder({"a.py": "", "data/x.bin": "", "data/keep.txt": "", "sub/b.py": "", "sub/c.log": "",
                           ".git/HEAD": "", ".runpilotignore": "data/\n*.log\n"}) as folder:
            files = runpilot.walk_code_files(folder, runpilot.read_ignore_rules(folder))
        self.assertEqual(files, [".runpilotignore", "a.py", "sub/b.py"])

    def _folder(self, files: dict):
        import contextlib
        import tempfile

        @contextlib.contextmanager
        def made():
            with tempfile.TemporaryDirectory() as tmp:
                for name, text in files.items():
                    (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                    (Path(tmp) / name).write_text(text)
                yield Path(tmp)
        return made()


class ConfigKeys(HomeTestCase):
    def problems(self, text: str) -> list[str]:
        path = self.write("c.yaml", text)
        code, _, err = self.cli("validate", path)
        self.assertEqual(code, 2, err)
        return err.splitlines()

    def test_outputs_and_code_snapshot_are_validated_with_their_line(self):
        (self.work / "src").mkdir()
        base = "name: x\nimage: i\nentrypoint: e\nmounts: {code: ./src}\n"
        self.assertEqual(self.problems(base + "outputs: ckpt\n")[0],
                         f"runpilot: error: {self.work}/c.yaml:5:1: outputs must be an absolute container path "
                         "such as /outputs, without ':' or ','; got 'ckpt'")
        self.assertEqual(self.problems(base + "code_snapshot: lots\n")[0],
                         f"runpilot: error: {self.work}/c.yaml:5:1: code_snapshot must be true, false (run the "
                         "folder as it is) or a size limit such as 500m or 2g; got 'lots'")
        self.assertIn("set outputs: to another container path",
                      self.problems("name: x\nimage: i\nentrypoint: e\nmounts: [\"./src:/outputs\"]\n")[0])

    def test_the_stored_config_keeps_them(self):
        (self.work / "src").mkdir()
        path = self.write("c.yaml", "name: x\nimage: i\nentrypoint: e\noutputs: /ckpt\ncode_snapshot: 2g\n")
        config = runpilot.load_config(path)
        self.assertEqual((config.outputs, config.code_snapshot), ("/ckpt", 2 << 30))
        self.assertEqual({k: v for k, v in runpilot.config_to_dict(config).items() if k in ("outputs", "code_snapshot")},
                         {"outputs": "/ckpt", "code_snapshot": "2g"})
        off = runpilot.load_config(self.write("d.yaml", "name: x\nimage: i\nentrypoint: e\ncode_snapshot: false\n"))
        self.assertIs(off.code_snapshot, False)
        self.assertIs(runpilot.config_to_dict(off)["code_snapshot"], False)

    def test_the_container_sees_the_outputs_folder(self):
        config = runpilot.JobConfig(name="x", image="img", entrypoint="true",
                                    mounts=(runpilot.Mount("/home/u/runs/r/outputs", "/outputs"),))
        argv = runpilot.build_engine_argv(config, "r", "docker")
        self.assertIn("/home/u/runs/r/outputs:/outputs", argv)


class Outputs(CodeFolderCase):
    def test_a_checkpoint_is_kept_shown_exported_and_deleted(self):
        self.run_ok("run", self.config())
        run = self.only_run()
        self.assertEqual((run / "outputs" / "ckpt.pt").read_bytes(), b"w" * 1234)
        out, _ = self.run_ok("show", "latest")
        self.assertIn("outputs    1 file(s), 1.2 KiB\n     1.2 KiB  ckpt.pt\n", out)
        shown = json.loads(self.run_ok("show", "latest", "--json")[0])
        self.assertEqual(shown["outputs"], {"ckpt.pt": 1234})
        listed = json.loads(self.run_ok("list", "--json")[0])
        self.assertEqual(listed[0]["outputs_bytes"], 1234)
        _, err = self.run_ok("export", "latest", "--outputs", str(self.tmp / "exported"))
        self.assertEqual((self.tmp / "exported" / run.name / "ckpt.pt").read_bytes(), b"w" * 1234)
        self.assertEqual(err, f"copied 1 output file(s), 1.2 KiB, of 1 run(s) to {self.tmp / 'exported'}\n")
        code, _, err = self.cli("export", "latest", "--outputs", str(self.tmp / "exported"))
        self.assertEqual(code, 2)
        self.assertIn("exists already", err)
        size = du(run)
        out, _ = self.run_ok("rm", "-y", "latest")
        self.assertFalse(run.exists())
        self.assertEqual(out, f"deleted {run.name} (job)\nfreed {runpilot.fmt_size(size)}\n")

    def test_scratch_files_stay_with_their_run(self):
        self.run_ok("run", self.config())
        out, _ = self.run_ok("run", self.config())
        self.assertIn("scratch before: 1\n", out)       # the second run did not see the first one's scratch
        self.assertFalse((self.src / "scratch.txt").exists())  # nor did the user's folder get it
        first, second = self.runs()
        for run in (first, second):
            self.assertEqual(sorted(p.name for p in (run / "code").iterdir()), ["scratch.txt"])  # only what it wrote
        self.assertEqual(self.meta(second)["workdir"], str(second / "code"))

    def test_dry_run_shows_the_code_copy_and_the_outputs_folder_and_records_nothing(self):
        out, _ = self.run_ok("run", self.config(), "--dry-run", "--engine", "docker", "--set", "image=img")
        self.assertRegex(out, rf"-v {self.home}/runs/(\d{{8}}-\d{{6}}-[0-9a-f]{{6}})/code:/workspace "
                              rf"-v {self.home}/runs/\1/outputs:/outputs -w /workspace ")
        out, _ = self.run_ok("run", self.config(), "--dry-run", "--live-code")
        self.assertIn(f"# in {self.src}\n", out)
        self.assertEqual(self.runs(), [])

    def test_outputs_variable_and_where_the_job_runs_without_a_code_mount(self):
        config = self.local_config('import os\nprint(os.environ["RUNPILOT_OUTPUT_DIR"], os.getcwd())\n')
        out, _ = self.run_ok("run", config)
        run = self.only_run()
        self.assertEqual(out, f"{run / 'outputs'} {self.work}\n")
        self.assertEqual(self.meta(run)["code"], {})


class Snapshots(CodeFolderCase):
    def test_the_record_names_the_snapshot_and_its_files(self):
        self.run_ok("run", self.config())
        code = self.meta(self.only_run())["code"]
        manifest = json.loads((self.home / "snapshots" / "manifests" / f"{code['snapshot']}.json").read_text())
        self.assertEqual([(f["path"], f["size"]) for f in manifest["files"]],
                         [("train.py", len(TRAIN)), ("version.txt", 2)])
        self.assertEqual({k: code[k] for k in ("mode", "folder", "files", "bytes", "listed_by")},
                         {"mode": "snapshot", "folder": str(self.src), "files": 2, "bytes": len(TRAIN) + 2,
                          "listed_by": "files"})
        out, _ = self.run_ok("show", "latest")
        self.assertIn(f"code       snapshot {code['snapshot'][:12]} (2 file(s), {runpilot.fmt_size(len(TRAIN) + 2)}) "
                      f"of {self.src}\n", out)

    def test_twenty_runs_of_twenty_mib_cost_one_copy(self):
        for i in range(40):
            (self.src / f"blob{i}.bin").write_bytes(os.urandom(512 << 10))
        for _ in range(20):
            self.run_ok("run", self.config())
        code_bytes = du(self.src)
        self.assertEqual(code_bytes // (1 << 20), 20)
        grown = du(self.home)
        self.assertLess(grown, code_bytes * 1.2, f"the home grew by {grown} bytes")
        self.assertEqual(len({self.meta(r)["code"]["snapshot"] for r in self.runs()}), 1)

    def test_a_huge_folder_is_refused_with_its_biggest_entries_and_ignore_fixes_it(self):
        (self.src / "data").mkdir()
        with open(self.src / "data" / "big.bin", "wb") as f:
            f.truncate(2 << 30)  # sparse: 2 GiB by its size, no disk used
        (self.src / "model.ckpt").write_bytes(b"x" * (1 << 20))
        code, out, err = self.cli("run", self.config())
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(err, f"runpilot: error: the code folder {self.src} holds 2.0 GiB, more than the code "
                              "snapshot limit of 100.0 MiB; biggest: data/ (2.0 GiB), model.ckpt (1.0 MiB), "
                              f"train.py ({runpilot.fmt_size(len(TRAIN))}); list what the job does not need in "
                              f"{self.src}/.runpilotignore (gitignore syntax), raise the limit (code_snapshot: 2g "
                              "in the config), or run the folder as it is with --live-code\n")
        self.assertEqual(self.runs(), [])
        self.assertFalse((self.home / "snapshots" / "objects").exists() and
                         any((self.home / "snapshots" / "objects").iterdir()))
        (self.src / ".runpilotignore").write_text("# data sets live elsewhere\ndata/\n")
        self.run_ok("run", self.config())
        manifest = self.meta(self.only_run())["code"]
        self.assertEqual(manifest["files"], 4)  # .runpilotignore, model.ckpt, train.py, version.txt

    def test_the_limit_can_be_raised_or_snapshots_turned_off(self):
        (self.src / "big.bin").write_bytes(b"x" * (2 << 20))
        code, _, err = self.cli("run", self.config("code_snapshot: 1m\n"))
        self.assertEqual(code, 2)
        self.assertIn("more than the code snapshot limit of 1.0 MiB", err)
        self.run_ok("run", self.config("code_snapshot: 3m\n"))
        self.run_ok("run", self.config("code_snapshot: false\n"))
        self.assertEqual(self.meta(self.newest())["code"],
                         {"mode": "off", "folder": str(self.src), "reason": "code_snapshot: false in the config"})
        self.assertTrue((self.src / "scratch.txt").exists())  # it ran in the folder itself

    def test_an_unreadable_file_is_one_clear_line_and_nothing_is_recorded(self):
        if os.geteuid() == 0:
            self.skipTest("root reads every file")
        (self.src / "secret.py").write_text("x")
        (self.src / "secret.py").chmod(0)
        code, _, err = self.cli("run", self.config())
        self.assertEqual(code, 2)
        self.assertEqual(err, f"runpilot: error: cannot record the code of {self.src}: {self.src}/secret.py: "
                              "Permission denied; fix its permissions or free some space, list it in "
                              ".runpilotignore, or run with --live-code\n")
        self.assertEqual(self.runs(), [])

    def test_live_code_runs_the_folder_and_says_so(self):
        out, _ = self.run_ok("run", self.config(), "--live-code")
        self.assertIn("scratch before: 1", out)
        self.assertEqual((self.src / "scratch.txt").read_text(), "scratch\n")
        run = self.only_run()
        self.assertEqual(self.meta(run)["code"], {"mode": "live", "folder": str(self.src), "reason": "--live-code"})
        self.assertEqual(self.meta(run)["workdir"], str(self.src))

    def test_unchanged_files_are_not_read_again(self):
        store = runpilot.SnapshotStore(self.home)
        first = store.take(self.src, 1 << 20)
        cache = json.loads(next((self.home / "snapshots" / "cache").iterdir()).read_text())
        self.assertEqual(sorted(cache["files"]), ["train.py", "version.txt"])
        # an edit that keeps size and mtime is still seen: the entry was written too soon after the change
        stat = os.stat(self.src / "version.txt")
        (self.src / "version.txt").write_text("2\n")
        os.utime(self.src / "version.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns))
        second = store.take(self.src, 1 << 20)
        self.assertNotEqual(first.snapshot_id, second.snapshot_id)

    def test_git_work_tree_records_tracked_and_untracked_but_not_ignored_files(self):
        git = ["git", "-C", str(self.src), "-c", "user.name=t", "-c", "user.email=t@t"]
        subprocess.run(git + ["init", "-q"], check=True)
        (self.src / ".gitignore").write_text("*.log\n")
        (self.src / "run.log").write_text("noise")
        subprocess.run(git + ["add", "train.py", ".gitignore"], check=True)
        subprocess.run(git + ["commit", "-qm", "x"], check=True)
        (self.src / "new.py").write_text("# untracked\n")
        (self.src / "weights").mkdir()
        (self.src / "weights" / "big.bin").write_text("tracked or not, .runpilotignore leaves it out")
        (self.src / ".runpilotignore").write_text("weights/\n")
        hook = self.src / ".git" / "hooks" / "post-index-change"  # RunPilot never runs the repository's hooks
        hook.write_text(f"#!/bin/sh\ntouch {self.tmp}/hook-ran\n")
        hook.chmod(0o755)
        self.run_ok("run", self.config())
        code = self.meta(self.only_run())["code"]
        manifest = json.loads((self.home / "snapshots" / "manifests" / f"{code['snapshot']}.json").read_text())
        self.assertEqual([f["path"] for f in manifest["files"]],
                         [".gitignore", ".runpilotignore", "new.py", "train.py", "version.txt"])
        self.assertEqual(code["listed_by"], "git")
        self.assertFalse((self.tmp / "hook-ran").exists())


class SweepsAndReruns(CodeFolderCase):
    # Point 0 edits the user's code while the sweep runs; every point must still run version 1.
    EDITING = TRAIN + textwrap.dedent("""\
        if os.environ["RUNPILOT_SWEEP_POINT"] == "0":
            open(os.environ["SRC"] + "/version.txt", "w").write("2\\n")
        """)

    def test_an_edit_during_a_sweep_changes_no_point(self):
        (self.src / "train.py").write_text(self.EDITING)
        config = self.config(f"env: {{SRC: {json.dumps(str(self.src))}}}\n")
        out, err = self.run_ok("sweep", str(config), "--grid", "env.X=1,2,3")
        self.assertEqual(out.count("version 1\n"), 3, out)
        self.assertEqual((self.src / "version.txt").read_text(), "2\n")
        self.assertEqual(len({self.meta(r)["code"]["snapshot"] for r in self.runs()}), 1)

    def test_a_resumed_sweep_runs_the_code_of_its_start(self):
        (self.src / "train.py").write_text(TRAIN + "sys.exit(3 if os.environ['X'] == '1' else 0)\n")
        code, out, err = self.cli("sweep", str(self.config()), "--grid", "env.X=1,2", "--fail-fast")
        self.assertEqual(code, 1, err)
        self.assertEqual(out.count("version 1\n"), 1, out)  # the second point was cancelled
        sweep_id = json.loads(self.run_ok("list", "--json")[0])[0]["sweep_id"]
        (self.src / "version.txt").write_text("2\n")
        out, _ = self.run_ok("sweep", "--resume", sweep_id)
        self.assertIn("version 1\n", out)
        self.assertNotIn("version 2", out)

    def test_rerun_runs_the_recorded_code_and_current_code_says_what_changed(self):
        self.run_ok("run", self.config())
        first = self.only_run()
        (self.src / "version.txt").write_text("2\n")
        (self.src / "extra.py").write_text("")
        out, err = self.run_ok("rerun", first.name)
        self.assertTrue(out.startswith("version 1\n"), out)
        snapshot = self.meta(first)["code"]["snapshot"]
        self.assertIn(f"runpilot: rerunning the code of run {first.name} (snapshot {snapshot[:12]}, 2 file(s)); "
                      f"--current-code runs {self.src} as it is now\n", err)
        self.assertEqual(self.meta(self.newest())["code"]["snapshot"], snapshot)
        out, err = self.run_ok("rerun", first.name, "--current-code")
        self.assertTrue(out.startswith("version 2\n"), out)
        said = err.splitlines()
        self.assertEqual(said[0], f"runpilot: the code changed since run {first.name}: 1 added (extra.py), "
                                  "1 modified (version.txt)")
        self.assertIn("starting", said[1])  # said before the job starts

    def test_rerun_of_a_snapshot_that_is_gone_is_one_clear_line(self):
        self.run_ok("run", self.config())
        for manifest in (self.home / "snapshots" / "manifests").iterdir():
            manifest.unlink()
        code, _, err = self.cli("rerun", "latest")
        self.assertEqual(code, 2)
        self.assertRegex(err, r"^runpilot: error: code snapshot [0-9a-f]{12} is missing from .*; rerun with "
                              r"--current-code to run the folder as it is now\n$")

    def test_diff_shows_code_and_config(self):
        self.run_ok("run", self.config())
        (self.src / "version.txt").write_text("2\n")
        self.run_ok("run", self.config(), "--set", "env.LR=0.5")
        second, first = [self.home / "runs" / i for i in self.run_ok("list", "-q")[0].split()]
        out, _ = self.run_ok("diff", first.name, second.name)
        a, b = first.name[-6:], second.name[-6:]
        self.assertEqual(out, f"config env.LR: - -> 0.5\n--- {a}/version.txt\n+++ {b}/version.txt\n@@ -1 +1 @@\n"
                              "-1\n+2\n")
        out, _ = self.run_ok("diff", first.name, first.name)
        self.assertEqual(out, f"runs {a} and {a} ran the same code with the same config\n")


class Collecting(CodeFolderCase):
    def test_gc_removes_snapshots_no_run_names(self):
        self.run_ok("run", self.config())
        objects = self.home / "snapshots" / "objects"
        old = 1_000_000_000
        for path in [*objects.rglob("*"), *(self.home / "snapshots" / "manifests").iterdir()]:
            os.utime(path, (old, old))
        stored = [p for p in objects.rglob("*") if p.is_file()]
        self.assertEqual(self.run_ok("gc", "--keep", "1", "-y")[0], "nothing to delete\n")
        self.assertEqual([p for p in objects.rglob("*") if p.is_file()], stored)  # its run still names it
        out, _ = self.run_ok("rm", "-y", "latest")
        self.assertRegex(out, r"^deleted .*\nfreed [\d.]+ KiB\n$")  # rm: the run folder only
        self.assertEqual([p for p in objects.rglob("*") if p.is_file()], stored)
        size = sum(p.stat().st_size for p in stored) + sum(
            p.stat().st_size for p in (self.home / "snapshots" / "manifests").iterdir())
        out, _ = self.run_ok("gc", "--keep", "0", "-y")
        self.assertEqual(out, f"nothing to delete\nfreed {runpilot.fmt_size(size)} of code snapshots no run uses\n")
        self.assertEqual([p for p in objects.rglob("*") if p.is_file()], [])

    def test_gc_keeps_young_snapshots(self):
        self.run_ok("run", self.config())
        self.run_ok("rm", "-y", "latest")
        self.assertEqual(self.run_ok("gc", "--keep", "0", "-y")[0], "nothing to delete\n")
        self.assertEqual(len([p for p in (self.home / "snapshots" / "objects").rglob("*") if p.is_file()]), 2)


if __name__ == "__main__":
    unittest.main()
