"""`--on ssh:HOST` against real boxes: two users of this machine with their own sshd (tests/ssh/setup.sh).

Each test gives the box a home of its own (ssh.home) and its code a folder made with mkdtemp, which the
box's user cannot read: a passing run proves the code was shipped. The tests skip where the boxes do not
answer, and fail where RUNPILOT_TEST_SSH=1 requires them.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import uuid

from tests.common import RUNPILOT, HomeTestCase
from tests.support import PYTHON_IMAGE

BOX1, BOX2 = "runpilot-box1", "runpilot-box2"
REQUIRED_VAR = "RUNPILOT_TEST_SSH"
# A run on a box takes about 3 s here (ssh, shipping, docker run, copying home); 60 s means it is stuck.
RUN_TIMEOUT_S = 60

JOB = """\
import sys, time
for i in range(3):
    print(f"step {i} caf\\u00e9", flush=True)
    print(f"METRIC loss={1.0 / (i + 1)}", flush=True)
    time.sleep(0.1)
sys.exit(3)
"""

LONG = """\
import signal, sys, time
def bye(signum, frame):
    print(f"got signal {signum}", flush=True)
    sys.exit(0)
signal.signal(signal.SIGINT, bye)
print("ready", flush=True)
for i in range(600):
    print(i, flush=True)
    time.sleep(0.1)
"""


def box_problem(host: str) -> str | None:
    """Why HOST cannot serve these tests, or None."""
    try:
        done = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", host,
                               f"docker image inspect {PYTHON_IMAGE} >/dev/null && python3 -V"],
                              capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"ssh {host} cannot run ({exc}); start the boxes with bash tests/ssh/setup.sh (as root)"
    if done.returncode != 0:
        return (f"box {host} does not answer with docker and {PYTHON_IMAGE} ({done.stderr.strip()[:200]}); "
                "start the boxes with bash tests/ssh/setup.sh (as root)")
    return None


def on_box(host: str, script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ssh", "-o", "BatchMode=yes", host, script], capture_output=True, timeout=60,
                          stdin=subprocess.DEVNULL)


class BoxTestCase(HomeTestCase):
    """A home here, a home of its own on each box (removed afterwards), a private code folder."""

    def setUp(self) -> None:
        super().setUp()
        for host in (BOX1, BOX2):
            problem = box_problem(host)
            if problem is not None:
                if os.environ.get(REQUIRED_VAR) == "1":
                    self.fail(f"{problem} (required by {REQUIRED_VAR}=1)")
                self.skipTest(problem)
        self.box_home = f"runpilot-test-{uuid.uuid4().hex[:12]}"
        for host in (BOX1, BOX2):
            self.addCleanup(on_box, host, f"rm -rf ~/{self.box_home}")
        self.code = self.tmp / "code"  # self.tmp is mkdtemp's: 0700, the boxes' users cannot read it
        self.code.mkdir()

    def config(self, script: str, extra: str = "", name: str = "job") -> str:
        (self.code / "train.py").write_text(script)
        return str(self.write(f"{name}.yaml", f"""\
            name: {name}
            engine: docker
            image: {PYTHON_IMAGE}
            entrypoint: [python, train.py]
            mounts:
              code: {self.code}
            ssh:
              home: ~/{self.box_home}
            """ + extra))

    def sweep_config(self, script: str, extra: str = "", name: str = "sw") -> str:
        """A one-GPU sweep config run by engine local on the boxes (their nvidia-smi stand-ins)."""
        (self.code / "train.py").write_text(script)
        return str(self.write("sweep.yaml", textwrap.dedent(f"""\
            name: {name}
            engine: local
            entrypoint: [python3, train.py]
            mounts:
              code: {self.code}
            resources: {{gpus: 1}}
            ssh:
              home: ~/{self.box_home}
            """) + extra))

    def box_file(self, host: str, run_id: str, name: str) -> bytes:
        done = on_box(host, f"cat ~/{self.box_home}/runs/{run_id}/{name}")
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(RUNPILOT), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=dict(os.environ))

    def wait_for_line(self, stream, text: bytes) -> bytes:
        """Read STREAM up to a line holding TEXT; return what was read."""
        deadline, read = time.monotonic() + RUN_TIMEOUT_S, b""
        while time.monotonic() < deadline:
            line = stream.readline()
            read += line
            if text in line:
                return read
            if not line:
                break
        self.fail(f"no line with {text!r} within {RUN_TIMEOUT_S} s")


class AttachedRun(BoxTestCase):
    def test_run_is_shipped_followed_and_recorded_on_both_sides(self) -> None:
        config = self.config(JOB)
        self.assertNotEqual(on_box(BOX1, f"test -r {shlex.quote(str(self.code / 'train.py'))}").returncode, 0,
                            "the box's user can read the code here; the test would not prove shipping")
        done = self.process("run", config, "--on", f"ssh:{BOX1}", "--tag", "try=1", timeout=RUN_TIMEOUT_S)
        self.assertEqual(done.returncode, 3, done.stderr)
        run = self.only_run()
        local_log = (run / "logs.txt").read_bytes()
        self.assertEqual(local_log, self.box_file(BOX1, run.name, "logs.txt"))
        self.assertEqual(local_log, "".join(f"step {i} café\nMETRIC loss={1.0 / (i + 1)}\n"
                                            for i in range(3)).encode())
        self.assertEqual(done.stdout, local_log)  # streamed live, byte for byte
        self.assertEqual((run / "metrics.json").read_bytes(), self.box_file(BOX1, run.name, "metrics.json"))
        self.assertEqual([s["loss"] for s in self.metrics(run)], [1.0, 0.5, 1.0 / 3])
        meta = self.meta(run)
        self.assertEqual((meta["status"], meta["exit_code"], meta["tags"]), ("failed", 3, {"try": "1"}))
        self.assertEqual((meta["runner"]["backend"], meta["runner"]["box"]), ("ssh", BOX1))
        self.assertEqual(meta["config_file"], config)
        box_meta = json.loads(self.box_file(BOX1, run.name, "meta.json"))
        self.assertEqual((box_meta["status"], box_meta["exit_code"]), ("failed", 3))
        row = self.db_rows()[0]
        self.assertEqual((row["id"], row["status"], row["exit_code"]), (run.name, "failed", 3))
        self.assertEqual(json.loads(row["runner"])["box"], BOX1)
        self.assertIn(f"run {run.name} failed in", done.stderr.decode())
        code, out, _ = self.cli("show", run.name)
        self.assertIn(f"ssh        box {BOX1}, ", out)

    def test_code_goes_over_once_per_content(self) -> None:
        config = self.config("print('one')\n")
        first = self.process("run", config, "--on", f"ssh:{BOX2}", timeout=RUN_TIMEOUT_S)
        again = self.process("run", config, "--on", f"ssh:{BOX2}", timeout=RUN_TIMEOUT_S)
        (self.code / "train.py").write_text("print('two')\n")
        changed = self.process("run", config, "--on", f"ssh:{BOX2}", timeout=RUN_TIMEOUT_S)
        self.assertEqual([p.returncode for p in (first, again, changed)], [0, 0, 0])
        self.assertIn(b"sending runpilot.py, the code, the config", first.stderr)
        self.assertIn(b"sending the config to box", again.stderr)
        self.assertIn(b"sending the code, the config", changed.stderr)
        self.assertEqual((first.stdout, again.stdout, changed.stdout), (b"one\n", b"one\n", b"two\n"))
        folders = on_box(BOX2, f"ls ~/{self.box_home}/code").stdout.split()
        self.assertEqual(len(folders), 2)

    def test_ctrl_c_stops_the_run_on_the_box(self) -> None:
        config = self.config(LONG)
        child = self.start("run", config, "--on", f"ssh:{BOX1}")
        self.wait_for_line(child.stdout, b"ready")
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=RUN_TIMEOUT_S)
        self.assertEqual(child.returncode, 130, err)
        run = self.only_run()
        meta = self.meta(run)
        self.assertEqual((meta["status"], meta["stop_signal"]), ("interrupted", signal.SIGINT))
        self.assertIn(b"got signal 2", (run / "logs.txt").read_bytes())
        self.assertEqual(json.loads(self.box_file(BOX1, run.name, "meta.json"))["status"], "interrupted")
        self.assertIn(b"interrupted by Ctrl-C", err)


class DetachedRun(BoxTestCase):
    def test_detach_logs_follow_stop_and_list(self) -> None:
        config = self.config(LONG)
        done = self.process("run", config, "--on", f"ssh:{BOX2}", "-d", timeout=RUN_TIMEOUT_S)
        self.assertEqual(done.returncode, 0, done.stderr)
        run_id = done.stdout.decode().strip()
        self.assertEqual([p.name for p in self.runs()], [run_id])
        code, out, _ = self.cli("list", "--json")
        self.assertEqual(json.loads(out)[0]["status"], "running")
        follower = self.start("logs", "-f", run_id)
        self.wait_for_line(follower.stdout, b"ready")
        code, out, err = self.cli("stop", run_id)
        self.assertEqual((code, out), (0, f"run {run_id} interrupted\n"), err)
        rest, _ = follower.communicate(timeout=RUN_TIMEOUT_S)  # logs -f ends with the run
        self.assertEqual(follower.returncode, 0)
        meta = self.meta(self.home / "runs" / run_id)
        self.assertEqual((meta["status"], meta["exit_code"]), ("interrupted", 143))
        self.assertEqual((self.home / "runs" / run_id / "logs.txt").read_bytes(),
                         self.box_file(BOX2, run_id, "logs.txt"))
        self.assertEqual(self.db_rows()[0]["status"], "interrupted")

    def test_the_boxs_detached_runner_reuses_the_cached_bytecode(self) -> None:
        import runpilot
        config = self.config(LONG)
        done = self.process("run", config, "--on", f"ssh:{BOX1}", "-d", timeout=RUN_TIMEOUT_S)
        self.assertEqual(done.returncode, 0, done.stderr)
        run_id = done.stdout.decode().strip()
        self.addCleanup(self.process, "stop", run_id, timeout=RUN_TIMEOUT_S)
        pid = json.loads(self.box_file(BOX1, run_id, "meta.json"))["runner"]["pid"]
        argv = on_box(BOX1, f"cat /proc/{pid}/cmdline").stdout.split(b"\0")
        self.assertEqual(argv[1:3], [b"-c", runpilot.SSH_LAUNCHER.encode()], argv)  # imported, not a script
        self.assertTrue(argv[3].endswith(b".py") and b"/bin/runpilot-" in argv[3], argv)
        self.assertEqual(argv[4:6], [b"run", f"{argv[3].split(b'/bin/')[0].decode()}/configs/{run_id}.yaml".encode()])
        cached = on_box(BOX1, f"ls ~/{self.box_home}/bin/__pycache__").stdout.decode()
        self.assertIn(argv[3].rsplit(b"/", 1)[1].removesuffix(b".py").decode() + ".cpython-", cached)

    def test_list_refreshes_and_copies_a_finished_run_home(self) -> None:
        config = self.config(JOB)
        done = self.process("run", config, "--on", f"ssh:{BOX1}", "-d", timeout=RUN_TIMEOUT_S)
        run_id = done.stdout.decode().strip()
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while on_box(BOX1, f"grep -q '\"status\": \"failed\"' ~/{self.box_home}/runs/{run_id}/meta.json").returncode:
            self.assertLess(time.monotonic(), deadline, "the run did not end on the box")
            time.sleep(0.2)
        self.assertEqual(self.meta(self.home / "runs" / run_id)["status"], "running")  # as last copied
        code, out, _ = self.cli("list", "--json")
        self.assertEqual((json.loads(out)[0]["status"], json.loads(out)[0]["exit_code"]), ("failed", 3))
        self.assertEqual((self.home / "runs" / run_id / "logs.txt").read_bytes(),
                         self.box_file(BOX1, run_id, "logs.txt"))
        self.assertEqual(self.db_rows()[0]["status"], "failed")
        code, out, _ = self.cli("pull", run_id)
        self.assertEqual(code, 0)
        self.assertIn(f"run {run_id} failed: its files are in", out)


class BoxFailures(BoxTestCase):
    """Each failure: one line with ssh's or the box's words and the fix, exit 2 or 125, no run left here."""

    def assert_refused(self, args: list[str], exit_code: int, *words: str) -> None:
        done = self.process(*args, timeout=RUN_TIMEOUT_S)
        err = done.stderr.decode()
        self.assertEqual(done.returncode, exit_code, err)
        lines = [line for line in err.splitlines() if line.startswith("runpilot: error: ")]
        self.assertEqual(len(lines), 1, err)
        for word in words:
            self.assertIn(word, lines[0])
        self.assertEqual(self.runs(), [])

    def test_ssh_failures(self) -> None:
        config = self.config(JOB)
        cases = [("ssh://rpbox1@127.0.0.1:1", "Connection refused", "check that 'ssh ssh://rpbox1@127.0.0.1:1 true'"),
                 ("ssh://nobody@127.0.0.1:2201", "Permission denied (publickey)", "the box refused the key"),
                 ("ssh://rpbox1@localhost:2201", "Host key verification failed", "known_hosts")]
        for host, words, fix in cases:
            with self.subTest(host=host):
                self.assert_refused(["run", config, "--on", f"ssh:{host}"], 125, words, fix)

    def test_box_failures(self) -> None:
        fakes = self.tmp / "fakes"  # stand-ins for a box's interpreter, which the boxes' users may run
        fakes.mkdir()
        os.chmod(self.tmp, 0o711)
        os.chmod(fakes, 0o755)
        for name, text in (("oldpy", "#!/bin/sh\necho python=3.8.10\n"),
                           ("noengine", "#!/bin/sh\nexec env PATH=/nonexistent /usr/bin/python3 \"$@\"\n")):
            (fakes / name).write_text(text)
            os.chmod(fakes / name, 0o755)
        config = self.config(JOB)
        cases = [("/nonexistent/python3", [], 125, "has no working /nonexistent/python3", "set ssh.python"),
                 (f"{fakes}/oldpy", [], 125, "has Python 3.8.10", "needs 3.10 or newer"),
                 ("python3", ["--set", "ssh.home=/root/runpilot-test"], 125, "/root/runpilot-test on box",
                  "Permission denied", "set ssh.home"),
                 ("python3", ["--set", "mounts.data=/tmp", "--set", "ssh.mounts.data=/nonexistent/data"], 125,
                  "has no folder /nonexistent/data (mapped in ssh.mounts)"),
                 ("python3", ["--set", "mounts.data=/tmp"], 2, "mount 'data' names a folder here")]
        for python, more, code, *words in cases:
            with self.subTest(python=python, more=more):
                self.assert_refused(["run", config, "--on", f"ssh:{BOX1}", "--set", f"ssh.python={python}", *more],
                                    code, *words)
        self.assert_refused(["run", config, "--on", f"ssh:{BOX1}", "--set", f"ssh.python={fakes}/noengine"],
                            125, f"on box {BOX1}: docker is not installed")
        left = on_box(BOX1, f"find ~/{self.box_home}/configs ~/{self.box_home}/runs -mindepth 1")
        self.assertEqual((left.returncode, left.stdout), (0, b""), left.stderr)  # no run, no config left there

    def test_a_full_remote_disk_is_one_line_and_leaves_nothing_there(self) -> None:
        """A full remote disk: a 64 KiB tmpfs as the box's home (root mounts it; removed afterwards)."""
        import pwd
        if os.geteuid() != 0:
            self.skipTest("mounting a tiny tmpfs as the box's home needs root")
        mount = self.tmp / "full"
        mount.mkdir()
        os.chmod(self.tmp, 0o711)
        uid = pwd.getpwnam("rpbox1").pw_uid
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=64k,mode=0700,uid={uid}", "tmpfs", str(mount)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            self.skipTest(f"cannot mount a tmpfs here ({done.stderr.strip()})")
        self.addCleanup(subprocess.run, ["umount", str(mount)], capture_output=True)
        config = self.config(JOB)
        self.assert_refused(["run", config, "--on", f"ssh:{BOX1}", "--set", f"ssh.home={mount}/home"], 125,
                            "No space left on device", f"free some space on box {BOX1} under {mount}/home",
                            "or set ssh.home to a folder with room")
        self.assertEqual(sorted(os.listdir(mount / "home")), ["bin", "code", "configs"])  # nothing half-sent
        self.assertEqual(os.listdir(mount / "home" / "configs"), [])


class Rerun(BoxTestCase):
    def test_rerun_of_a_box_run_uses_this_sides_folders(self) -> None:
        config = self.config("print('hello from', __file__)\n")
        first = self.process("run", config, "--on", f"ssh:{BOX2}", timeout=RUN_TIMEOUT_S)
        self.assertEqual(first.returncode, 0, first.stderr)
        run = self.only_run()
        self.assertIn(f"code: {self.code}\n", (run / "config.yaml").read_text())
        again = self.process("rerun", run.name, "--on", f"ssh:{BOX1}", timeout=RUN_TIMEOUT_S)
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertEqual(again.stdout, b"hello from /workspace/train.py\n")
        second = [p for p in self.runs() if p != run][0]
        self.assertEqual((self.meta(second)["rerun_of"], self.meta(second)["runner"]["box"]), (run.name, BOX1))


class DroppedConnection(BoxTestCase):
    def test_a_killed_connection_reattaches_and_the_run_is_reconciled(self) -> None:
        config = self.config(JOB.replace("time.sleep(0.1)", "time.sleep(1)").replace("range(3)", "range(4)"))
        child = self.start("run", config, "--on", f"ssh:{BOX1}")
        before = self.wait_for_line(child.stdout, b"step 0")
        followers = subprocess.run(["pgrep", "-P", str(child.pid), "-f", "logs -f"], capture_output=True, text=True)
        self.assertTrue(followers.stdout.split(), "no ssh follower found")
        for pid in followers.stdout.split():
            os.kill(int(pid), signal.SIGKILL)
        out, err = child.stdout.read(), child.stderr.read()  # read(): readline() buffered past its line
        child.wait(timeout=RUN_TIMEOUT_S)
        child.stdout.close()
        child.stderr.close()
        self.assertEqual(child.returncode, 3, err)
        self.assertIn(b"the run goes on there, re-attaching", err)
        run = self.only_run()
        self.assertEqual(self.meta(run)["status"], "failed")
        self.assertEqual((run / "logs.txt").read_bytes(), self.box_file(BOX1, run.name, "logs.txt"))
        self.assertEqual(before + out, (run / "logs.txt").read_bytes())  # nothing shown twice after re-attaching


class LostRunner(BoxTestCase):
    def test_a_runner_killed_on_the_box_is_lost_here_too(self) -> None:
        config = self.config(LONG)
        done = self.process("run", config, "--on", f"ssh:{BOX2}", "-d", timeout=RUN_TIMEOUT_S)
        run_id = done.stdout.decode().strip()
        box_meta = json.loads(self.box_file(BOX2, run_id, "meta.json"))
        killed = on_box(BOX2, f"kill -KILL {box_meta['runner']['pid']}")
        self.assertEqual(killed.returncode, 0, killed.stderr)
        code, out, _ = self.cli("list", "--json")
        self.assertEqual(json.loads(out)[0]["status"], "lost")
        meta = self.meta(self.home / "runs" / run_id)
        self.assertIn("ended without recording how the run ended", meta["reason"])
        code, out, err = self.cli("stop", run_id)  # its container lives on, on the box: stop removes it
        self.assertEqual(code, 0, err)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while on_box(BOX2, f"docker ps -q --filter label=runpilot.run_id={run_id}").stdout.strip():
            self.assertLess(time.monotonic(), deadline, "the container was not removed")
            time.sleep(0.2)


class UnreachableBox(BoxTestCase):
    def test_list_shows_the_runs_of_a_box_that_does_not_answer_as_last_known(self) -> None:
        config = self.config(LONG)
        done = self.process("run", config, "--on", f"ssh:{BOX1}", "-d", timeout=RUN_TIMEOUT_S)
        run_id = done.stdout.decode().strip()
        self.addCleanup(self.process, "stop", run_id, timeout=RUN_TIMEOUT_S)
        folder = self.home / "runs" / run_id
        meta = self.meta(folder)
        gone = dict(meta["runner"], box="ssh://rpbox1@127.0.0.1:1")  # as if the box went away
        (folder / "meta.json").write_text(json.dumps(dict(meta, runner=gone)))
        self.assertEqual(self.process("reindex").returncode, 0)
        code, out, err = self.cli("list", "--json")
        self.assertEqual((code, json.loads(out)[0]["status"]), (0, "running"))
        self.assertIn("cannot reach box ssh://rpbox1@127.0.0.1:1 over ssh", err)
        self.assertIn("its runs are shown as last known", err)
        (folder / "meta.json").write_text(json.dumps(meta))
        self.assertEqual(self.process("reindex").returncode, 0)


class SweepOverBoxes(BoxTestCase):
    JOB = """\
import os, time
print("gpus", os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
print(f"METRIC loss={float(os.environ['LR'])}", flush=True)
time.sleep(4)
"""

    def assert_no_gpu_shared(self, metas: list[dict]) -> list[tuple]:
        """No GPU of a box held by two points at once; each point's (box, devices, start, end)."""
        spans = [(m["runner"]["box"], m["devices"], m["started_at"], m["finished_at"]) for m in metas]
        for box, devices, start, end in spans:
            self.assertEqual(len(devices), 1)
            for other in spans:
                if other[:2] == (box, devices) and other[2:] != (start, end):
                    self.assertTrue(other[3] <= start or other[2] >= end, f"GPU {devices} of {box} shared")
        return spans

    def test_eight_one_gpu_points_over_boxes_with_two_and_four_gpus(self) -> None:
        config = self.sweep_config(self.JOB, "metrics: [loss]\n")
        done = self.process("sweep", config, "--grid", "env.LR=1,2,3,4,5,6,7,8", "--on", f"ssh:{BOX1},{BOX2}",
                            timeout=4 * RUN_TIMEOUT_S)
        err = done.stderr.decode()
        self.assertEqual(done.returncode, 0, err)
        self.assertIn(f"box {BOX1} takes 2 at once, box {BOX2} takes 4 at once", err)
        metas = [self.meta(run) for run in self.runs()]
        self.assertEqual(len(metas), 8)
        self.assertEqual({m["status"] for m in metas}, {"succeeded"})
        self.assertEqual({m["runner"]["box"] for m in metas}, {BOX1, BOX2})
        self.assertTrue(all(m["sweep"].get("id") for m in metas), "the runs lost their sweep")
        spans = self.assert_no_gpu_shared(metas)
        peak = max(sum(s[2] <= t < s[3] for s in spans) for t in (s[2] for s in spans))
        self.assertEqual(peak, 6)  # the pool: 2 + 4 GPUs
        for run in self.runs():
            meta = self.meta(run)
            self.assertIn(f"gpus {meta['devices'][0]}\n".encode(), (run / "logs.txt").read_bytes())
        code, out, _ = self.cli("list", "--sweep", "latest", "--json")
        self.assertEqual(len(json.loads(out)), 8)

    def test_two_sweeps_at_once_on_the_same_boxes_never_share_a_gpu(self) -> None:
        config = self.sweep_config(self.JOB)
        grid = ["--grid", "env.LR=1,2,3,4,5,6", "--on", f"ssh:{BOX1},{BOX2}"]
        first, second = self.start("sweep", config, *grid), self.start("sweep", config, *grid)  # both see 6 free
        for child in (first, second):
            out, err = child.communicate(timeout=8 * RUN_TIMEOUT_S)
            self.assertEqual(child.returncode, 0, err)
        metas = [self.meta(run) for run in self.runs()]
        self.assertEqual(len(metas), 12)
        self.assertEqual(len({m["sweep"]["id"] for m in metas}), 2)
        self.assertEqual({m["status"] for m in metas}, {"succeeded"})
        self.assert_no_gpu_shared(metas)  # of either sweep

    def test_ctrl_c_stops_the_points_on_their_boxes_and_cancels_the_rest(self) -> None:
        config = self.sweep_config(LONG)
        child = self.start("sweep", config, "--grid", "env.LR=1,2,3,4", "--on", f"ssh:{BOX1}")
        self.wait_for_line(child.stderr, b"[2/4 LR=2] started on box")
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=RUN_TIMEOUT_S)
        self.assertEqual(child.returncode, 130, err)
        statuses = sorted(self.meta(run)["status"] for run in self.runs())
        self.assertEqual(statuses, ["cancelled", "cancelled", "interrupted", "interrupted"])
        for run in self.runs():
            meta = self.meta(run)
            if meta["status"] == "interrupted":
                self.assertEqual(meta["stop_signal"], signal.SIGINT)
                self.assertEqual(json.loads(self.box_file(BOX1, run.name, "meta.json"))["status"], "interrupted")
        self.assertEqual({r["status"] for r in self.db_rows()}, {"cancelled", "interrupted"})

    def test_points_that_end_before_their_start_is_copied_home_still_end_the_sweep(self) -> None:
        config = self.sweep_config("print('quick')\n", name="quick")
        done = self.process("sweep", config, "--grid", "env.LR=1,2,3,4", "--on", f"ssh:{BOX1},{BOX2}",
                            timeout=RUN_TIMEOUT_S)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stderr.count(b"] succeeded in "), 4, done.stderr)
        self.assertEqual({self.meta(run)["status"] for run in self.runs()}, {"succeeded"})


def running_on_a_dead_box(store) -> tuple[str, str]:
    """A run recorded running on a box that does not answer (a closed port): the box and the run id."""
    import runpilot
    dead, run_id = "ssh://rpbox1@127.0.0.1:1", "20261207-000000-abcdef"
    meta = runpilot.RunMeta(run_id, name="p", status=runpilot.RUNNING, started_at="2026-12-07T00:00:00.000Z",
                            runner={"backend": "ssh", "box": dead, "home": "/h", "python": "python3",
                                    "program": "/h/bin/runpilot.py"})
    store.create_run_dir(run_id).write_meta(meta)
    store.save(meta)
    return dead, run_id


class LostBox(BoxTestCase):
    def test_a_box_silent_mid_sweep_has_its_running_points_recorded_lost(self) -> None:
        from unittest import mock
        import runpilot
        store = runpilot.RunStore(self.home)
        dead, run_id = running_on_a_dead_box(store)
        said = []
        sweep = runpilot.BoxSweep(store, mock.Mock(), [dead], runpilot.RunOptions(), 4, False, said.append,
                                  running={run_id: dead}, slots={dead: 1})
        with mock.patch.object(runpilot, "SSH_LOST_S", 0):
            sweep.collect({run_id: "[1/1]"}, [])
            self.assertEqual(sweep.running, {run_id: dead})
            sweep.collect({run_id: "[1/1]"}, [])
        self.assertEqual(sweep.running, {})
        self.assertTrue(sweep.failed)
        self.assertIn("Connection refused", said[0])
        self.assertIn(f"box {dead} did not answer for 0s: its running points are recorded lost", said[1])
        self.assertEqual(self.meta(store.folder(run_id).path)["status"], "lost")
        self.assertEqual(store.get(run_id).status, "lost")
        self.assertEqual(sum("Connection refused" in line for line in said), 1)  # said once, not every poll


class BoxSweepCost(BoxTestCase):
    """What a box sweep costs the box: one ssh command per start once the box is known ready, and a
    sh-only look per poll (a `_box-report`, a Python start there, only when a point changed)."""

    def setUp(self) -> None:
        super().setUp()
        import runpilot
        self.rp = runpilot
        self.store = runpilot.RunStore(self.home)
        self.job = runpilot.load_config(self.config(LONG))

    def counted(self, calls: list):
        from unittest import mock
        real = self.rp.SshBox.call

        def call(box, script, *args, **kwargs):
            calls.append(script)
            return real(box, script, *args, **kwargs)
        return mock.patch.object(self.rp.SshBox, "call", call)

    def test_a_start_on_a_box_known_ready_is_one_ssh_command(self) -> None:
        ready, calls, ids = {}, [], []
        with self.counted(calls):
            for expected in (2, 1, 3):
                if expected == 3:  # the box lost its copy of RunPilot: the start looks again and resends it
                    self.assertEqual(on_box(BOX1, f"rm -rf ~/{self.box_home}/bin").returncode, 0)
                calls.clear()
                options = self.rp.RunOptions(run_id=self.rp.new_run_id())
                meta = self.rp.ssh_start(self.store, BOX1, self.job, options, lambda text: None, False, ready)
                ids.append(meta.run_id)
                self.addCleanup(self.process, "stop", meta.run_id, timeout=RUN_TIMEOUT_S)
                self.assertEqual(len(calls), expected, calls)
                self.assertEqual(meta.status, "running")
        for run_id in ids:
            self.assertEqual(json.loads(self.box_file(BOX1, run_id, "meta.json"))["status"], "running")
        self.assertEqual(len(on_box(BOX1, f"ls ~/{self.box_home}/bin").stdout.split()), 2)  # program, __pycache__

    def test_polls_look_fully_only_when_a_point_changed(self) -> None:
        from unittest import mock
        meta = self.rp.ssh_start(self.store, BOX1, self.job, self.rp.RunOptions(), lambda text: None)
        run_id = meta.run_id
        self.addCleanup(self.process, "stop", run_id, timeout=RUN_TIMEOUT_S)
        said, reports = [], []
        real = self.rp.SshBackend.refresh

        def refresh(backend, store, records, note):
            reports.append([r.id for r in records])
            return real(backend, store, records, note)
        sweep = self.rp.BoxSweep(self.store, mock.Mock(), [BOX1], self.rp.RunOptions(), 4, False, said.append,
                                 running={run_id: BOX1}, slots={BOX1: 1})
        with mock.patch.object(self.rp.SshBackend, "refresh", refresh):
            for _ in range(5):
                sweep.collect({run_id: "[1/1]"}, [])
            self.assertEqual(reports, [[run_id]])  # the first poll looks fully; the box's points did not change
            self.assertEqual(sweep.running, {run_id: BOX1})
            code, out, err = self.cli("stop", run_id)
            self.assertEqual(code, 0, err)
            reports.clear()
            sweep.collect({run_id: "[1/1]"}, [])
        self.assertEqual(reports, [[run_id]])  # its meta.json changed on the box: a full look, which ends it
        self.assertEqual(sweep.running, {})
        self.assertIn("[1/1] interrupted", said[-1])

    def test_a_full_look_comes_at_least_every_few_seconds(self) -> None:
        from unittest import mock
        meta = self.rp.ssh_start(self.store, BOX1, self.job, self.rp.RunOptions(), lambda text: None)
        self.addCleanup(self.process, "stop", meta.run_id, timeout=RUN_TIMEOUT_S)
        reports = []
        sweep = self.rp.BoxSweep(self.store, mock.Mock(), [BOX1], self.rp.RunOptions(), 4, False, lambda t: None,
                                 running={meta.run_id: BOX1}, slots={BOX1: 1})
        real = self.rp.SshBackend.refresh
        with mock.patch.object(self.rp.SshBackend, "refresh",
                               lambda b, *a: reports.append(1) or real(b, *a)), \
                mock.patch.object(self.rp, "SSH_FULL_LOOK_S", 0.5):
            sweep.collect({meta.run_id: "[1/1]"}, [])
            sweep.collect({meta.run_id: "[1/1]"}, [])
            time.sleep(0.6)
            sweep.collect({meta.run_id: "[1/1]"}, [])
        self.assertEqual(len(reports), 2)  # a runner killed on the box writes nothing: the full look finds it


class LostBoxOthersGoOn(BoxTestCase):
    def test_the_boxes_that_answer_keep_their_points_and_their_room(self) -> None:
        from unittest import mock
        import runpilot
        store = runpilot.RunStore(self.home)
        alive = runpilot.ssh_start(store, BOX1, runpilot.load_config(self.config(LONG)), runpilot.RunOptions(),
                                   lambda text: None)
        self.addCleanup(self.process, "stop", alive.run_id, timeout=RUN_TIMEOUT_S)
        dead, run_id = running_on_a_dead_box(store)
        said = []
        sweep = runpilot.BoxSweep(store, mock.Mock(), [dead, BOX1], runpilot.RunOptions(), 4, False, said.append,
                                  running={run_id: dead, alive.run_id: BOX1}, slots={dead: 1, BOX1: 2})
        labels = {run_id: "[1/2]", alive.run_id: "[2/2]"}
        with mock.patch.object(runpilot, "SSH_LOST_S", 0):
            sweep.collect(labels, [])
            sweep.collect(labels, [])
        self.assertEqual((sweep.running, sweep.slots), ({alive.run_id: BOX1}, {BOX1: 2}))
        self.assertEqual(self.meta(store.folder(run_id).path)["status"], "lost")
        self.assertEqual(self.meta(self.home / "runs" / alive.run_id)["status"], "running")
        self.assertIn(f"box {dead} did not answer for 0s: its running points are recorded lost; the others go on",
                      said)
        self.assertFalse(any(BOX1 in line for line in said), said)


class Outputs(BoxTestCase):
    WRITES = """\
import os
with open(os.path.join(os.environ["RUNPILOT_OUTPUT_DIR"], "model.bin"), "wb") as f:
    f.write(bytes(range(256)) * 64)
print("saved", flush=True)
"""

    def test_outputs_stay_on_the_box_until_pulled(self) -> None:
        config = self.config(self.WRITES)
        done = self.process("run", config, "--on", f"ssh:{BOX1}", timeout=RUN_TIMEOUT_S)
        self.assertEqual((done.returncode, done.stdout), (0, b"saved\n"), done.stderr)
        run = self.only_run()
        self.assertFalse((run / "outputs" / "model.bin").exists())
        self.assertEqual(self.box_file(BOX1, run.name, "outputs/model.bin"), bytes(range(256)) * 64)
        code, out, err = self.cli("pull", run.name)
        self.assertEqual((code, out), (0, f"run {run.name} succeeded: its files are in {run}\n"), err)
        self.assertEqual((run / "outputs" / "model.bin").read_bytes(), bytes(range(256)) * 64)
        self.assertFalse((run / "code").exists())  # the box's copy of the code stays there

    def test_pull_outputs_copies_them_when_the_run_ends(self) -> None:
        config = self.config(self.WRITES)
        done = self.process("run", config, "--on", f"ssh:{BOX2}", "--pull-outputs", timeout=RUN_TIMEOUT_S)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual((self.only_run() / "outputs" / "model.bin").read_bytes(), bytes(range(256)) * 64)

    def test_pull_outputs_of_a_detached_run_come_with_list(self) -> None:
        config = self.config(self.WRITES)
        done = self.process("run", config, "--on", f"ssh:{BOX2}", "-d", "--pull-outputs", timeout=RUN_TIMEOUT_S)
        run_id = done.stdout.decode().strip()
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while json.loads(self.cli("list", "--json")[1])[0]["status"] == "running":
            self.assertLess(time.monotonic(), deadline, "the run did not end")
            time.sleep(0.5)
        self.assertEqual((self.home / "runs" / run_id / "outputs" / "model.bin").read_bytes(),
                         bytes(range(256)) * 64)


class LivePlot(BoxTestCase):
    STEPS = """\
import time
for i in range(40):
    print(f"METRIC loss={1.0 / (i + 1)}", flush=True)
    time.sleep(0.25)
"""

    def test_plot_follows_a_remote_run(self) -> None:
        config = self.config(self.STEPS)
        done = self.process("run", config, "--on", f"ssh:{BOX1}", "-d", timeout=RUN_TIMEOUT_S)
        run_id = done.stdout.decode().strip()
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while on_box(BOX1, f"grep -q 'loss' ~/{self.box_home}/runs/{run_id}/metrics.json").returncode:
            self.assertLess(time.monotonic(), deadline, "no metric on the box")
            time.sleep(0.2)
        code, out, err = self.cli("plot", run_id, "--ascii")  # mid-run: the metrics so far come home
        self.assertEqual(code, 0, err)
        self.assertIn("loss", out)
        self.assertEqual(self.meta(self.home / "runs" / run_id)["status"], "running")
        self.assertTrue((self.home / "runs" / run_id / "metrics.json").read_bytes())
        follow = self.process("plot", "--follow", run_id, "--ascii", timeout=RUN_TIMEOUT_S)
        self.assertEqual(follow.returncode, 0, follow.stderr)  # returns when the run ends on the box
        self.assertIn(b"loss", follow.stdout)
        self.assertEqual(self.meta(self.home / "runs" / run_id)["status"], "succeeded")
        self.assertEqual(len(self.metrics(self.home / "runs" / run_id)), 40)


class SnapshotRerun(BoxTestCase):
    def test_rerun_runs_the_recorded_code_on_the_box(self) -> None:
        config = self.config("print('version one')\n")
        first = self.process("run", config, "--on", f"ssh:{BOX1}", timeout=RUN_TIMEOUT_S)
        self.assertEqual((first.returncode, first.stdout), (0, b"version one\n"), first.stderr)
        run = self.only_run()
        snapshot = self.meta(run)["code"]["snapshot"]
        self.assertEqual(self.meta(run)["code"]["folder"], str(self.code))  # this side's folder and snapshot
        (self.code / "train.py").write_text("print('version two')\n")
        again = self.process("rerun", run.name, "--on", f"ssh:{BOX2}", timeout=RUN_TIMEOUT_S)
        self.assertEqual((again.returncode, again.stdout), (0, b"version one\n"), again.stderr)
        self.assertIn(b"rerunning the code of run", again.stderr)
        second = [p for p in self.runs() if p != run][0]
        self.assertEqual(self.meta(second)["code"]["snapshot"], snapshot)
        self.assertEqual(on_box(BOX2, f"ls ~/{self.box_home}/code").stdout.split(), [f"s{snapshot[:16]}".encode()])
        current = self.process("rerun", run.name, "--on", f"ssh:{BOX2}", "--current-code", timeout=RUN_TIMEOUT_S)
        self.assertEqual((current.returncode, current.stdout), (0, b"version two\n"), current.stderr)


class BoxSweepLife(BoxTestCase):
    def test_detached_sweep_is_listed_and_stopped(self) -> None:
        config = self.sweep_config(LONG)
        done = self.process("sweep", config, "--grid", "env.LR=1,2", "--on", f"ssh:{BOX1}", "-d",
                            timeout=RUN_TIMEOUT_S)
        self.assertEqual(done.returncode, 0, done.stderr)
        sweep_id = done.stdout.decode().strip()
        self.assertTrue(sweep_id.startswith("sw-"), done.stdout)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while [r["status"] for r in json.loads(self.cli("list", "--sweep", sweep_id, "--json")[1])] != ["running"] * 2:
            self.assertLess(time.monotonic(), deadline, "the points did not start on the box")
            time.sleep(0.5)
        code, out, err = self.cli("stop", sweep_id)
        self.assertEqual(code, 0, err)
        self.assertEqual(sorted(self.meta(run)["status"] for run in self.runs()), ["interrupted", "interrupted"])
        for run in self.runs():
            self.assertEqual(json.loads(self.box_file(BOX1, run.name, "meta.json"))["status"], "interrupted")

    def test_stop_of_a_sweep_whose_runner_died_stops_its_points_on_the_box(self) -> None:
        config = self.sweep_config(LONG)
        child = self.start("sweep", config, "--grid", "env.LR=1,2,3,4", "--on", f"ssh:{BOX1}")
        self.wait_for_line(child.stderr, b"[2/4 LR=2] started on box")
        child.kill()  # the sweep's runner dies; its points run on, on the box
        child.communicate(timeout=RUN_TIMEOUT_S)
        sweep_id = self.meta(self.runs()[0])["sweep"]["id"]
        started = sorted(run.name for run in self.runs() if self.meta(run)["status"] == "running")
        self.assertEqual(len(started), 2)
        code, out, err = self.cli("stop", sweep_id)
        self.assertEqual(code, 0, err)
        self.assertIn("2 interrupted", out)
        statuses = {run.name: self.meta(run)["status"] for run in self.runs()}
        self.assertEqual(sorted(statuses.values()), ["cancelled", "cancelled", "interrupted", "interrupted"])
        self.assertEqual({r["id"]: r["status"] for r in self.db_rows()}, statuses)
        for run_id in started:
            self.assertEqual(statuses[run_id], "interrupted")
            self.assertEqual(json.loads(self.box_file(BOX1, run_id, "meta.json"))["status"], "interrupted")

    def test_detached_sweep_on_unreachable_boxes_fails_before_detaching(self) -> None:
        config = self.sweep_config("print('hi')\n")
        dead = "ssh://rpbox1@127.0.0.1:1"
        done = self.process("sweep", config, "--grid", "env.LR=1,2", "--on", f"ssh:{dead}", "-d",
                            timeout=RUN_TIMEOUT_S)
        self.assertEqual(done.returncode, 125, done.stderr)
        self.assertEqual(done.stdout, b"")
        lines = done.stderr.decode().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith(f"runpilot: error: cannot reach box {dead} over ssh"), lines)
        self.assertIn("Connection refused", lines[0])
        self.assertEqual((self.runs(), self.db_rows()), ([], []))
        self.assertFalse((self.home / "sweeps").exists() and any((self.home / "sweeps").iterdir()))
        both = self.process("sweep", config, "--grid", "env.LR=1,2", "--on", f"ssh:{dead},{dead}", "-d",
                            timeout=RUN_TIMEOUT_S)
        self.assertEqual(both.returncode, 125, both.stderr)
        self.assertIn(b"runpilot: error: none of the sweep's 2 boxes answers over ssh: cannot reach box", both.stderr)

    def test_detached_sweep_goes_on_with_the_boxes_that_answer(self) -> None:
        config = self.sweep_config("print('hi')\n")
        dead = "ssh://rpbox1@127.0.0.1:1"
        done = self.process("sweep", config, "--grid", "env.LR=1,2", "--on", f"ssh:{dead},{BOX2}", "-d",
                            timeout=RUN_TIMEOUT_S)
        self.assertEqual(done.returncode, 0, done.stderr)
        sweep_id = done.stdout.decode().strip()
        self.assertTrue(sweep_id.startswith("sw-"), done.stdout)
        self.assertIn(f"cannot reach box {dead} over ssh".encode(), done.stderr)
        self.assertIn(f"the sweep goes on without box {dead} (on {BOX2})".encode(), done.stderr)
        deadline = time.monotonic() + 2 * RUN_TIMEOUT_S
        while sorted(r["status"] for r in json.loads(self.cli("list", "--sweep", sweep_id, "--json")[1])) != \
                ["succeeded"] * 2:
            self.assertLess(time.monotonic(), deadline, "the points did not end on the box that answers")
            time.sleep(0.5)
        self.assertEqual({self.meta(run)["runner"]["box"] for run in self.runs()}, {BOX2})

    def test_resume_follows_the_points_still_running_on_the_box(self) -> None:
        config = self.sweep_config("import time\ntime.sleep(6)\nprint('done', flush=True)\n")
        child = self.start("sweep", config, "--grid", "env.LR=1,2,3,4", "--on", f"ssh:{BOX1}")
        self.wait_for_line(child.stderr, b"[2/4 LR=2] started on box")
        child.kill()  # the sweep's runner dies; its points run on, on the box
        child.communicate(timeout=RUN_TIMEOUT_S)
        sweep_id = self.meta(self.runs()[0])["sweep"]["id"]
        started = {run.name for run in self.runs() if self.meta(run)["status"] == "running"}
        self.assertEqual(len(started), 2)
        done = self.process("sweep", "--resume", sweep_id, timeout=4 * RUN_TIMEOUT_S)
        err = done.stderr.decode()
        self.assertEqual(done.returncode, 0, err)
        for run_id in started:
            self.assertIn(f"(run {run_id}): followed, not run again", err)
        self.assertEqual(len(self.runs()), 4)  # none run twice
        self.assertEqual({self.meta(run)["status"] for run in self.runs()}, {"succeeded"})
        self.assertEqual(len(on_box(BOX1, f"ls ~/{self.box_home}/runs").stdout.split()), 4)
