"""Reliability stress run: faults at random moments, on real engines; every run's outcome checked.

    python3 tests/stress.py [--engines docker,podman,local] [--interrupts 10] [--parallel 16] [--faults 8]
                            [--seed 1] [--runpilot PATH]

Needs the test images (tests/images/build.sh) for docker and podman. Cases, per engine:

  signals        SIGINT or SIGTERM at a random moment (while Python reads runpilot.py, before the
                 container exists, while the job runs), to jobs that exit on SIGTERM and jobs that
                 ignore it (--stop-timeout 2): exit 128+N, the run `interrupted` (`cancelled` if the
                 job never started; nothing recorded if RunPilot had not started yet)
  index lock     a run of ~2 s while another process holds runs.db with BEGIN EXCLUSIVE for longer
                 than RUNPILOT_DB_TIMEOUT (1 s), the lock taken at a random moment from before the
                 start to after the end: RunPilot exits with the job's own status, and the run's
                 status is right in meta.json, after `list`, and after `reindex`
  closed pipes   a job that closes its stdout and stderr (`exec >/dev/null 2>&1; sleep 12`, some also
                 ignoring SIGTERM) with `timeout: 2`: the run ends `timeout`, exit 124, in time
  stalled reader RunPilot's stdout is a pipe nobody reads, the job prints forever; the run is stopped
                 by `timeout: 2`, by one Ctrl-C, or by two: right exit status and status, in time
  parallel       N runs started at once: N exit 0, N distinct ids, folders and index rows

A RunPilot killed by the signal it was sent counts as the right exit status (a shell's $? is 128+N
either way) in two places only: a signal before RunPilot's own code runs (nothing may be recorded
then), and the second Ctrl-C of the stalled reader landing while RunPilot exits, after the run was
recorded (the report counts these apart). "In time" is the limit (timeout or signal) + --stop-timeout
+ a slack for the engine (local 2 s, docker 4 s, podman 5 s). "Processes left": local jobs still
alive afterwards (any process whose working folder is in the stress run's temporary folder) and
containers carrying the run's label. docker and podman run half of --faults (at least 2) of the
three fault cases, local all of them.

Prints one table row per engine and case: faults tried, exit statuses wrong, statuses wrong, runs
that overran, processes left; every count but the first should be 0. The README's Reliability
section quotes the last figures. Standard library only; not a unit test (the name does not match
test*.py). A full run takes about 4-5 minutes on 2 cores. --runpilot runs another runpilot.py (an
older one, to see that the checks catch what it got wrong).
"""

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.support import BUSYBOX_IMAGE, PYTHON_IMAGE, containers_with_label  # noqa: E402

RUNPILOT = ROOT / "runpilot.py"
JOB = """\
import signal, sys, time
if sys.argv[1] == "polite":
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(0))
else:  # Ctrl-C reaches the job as SIGINT: a stubborn job ignores both
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
print("METRIC loss=1", flush=True)
while True:
    time.sleep(0.05)
"""
SLACK = {"local": 2.0, "docker": 4.0, "podman": 5.0}   # seconds a stop may take beyond its limits
DB_TIMEOUT = 1.0          # RUNPILOT_DB_TIMEOUT of the index-lock case
HARD_LIMIT = 60.0         # a runpilot process still alive then is killed (and counted as overrun)


@dataclass
class Tally:
    """One row of the report."""

    engine: str
    case: str
    tried: int = 0
    exit_wrong: int = 0
    status_wrong: int = 0
    overruns: int = 0
    left: int = 0
    by_signal: int = 0        # runs that ended killed by the signal sent (a shell's $? is 128+N all the same)
    notes: list[str] = field(default_factory=list)

    def wrong(self, what: str, detail: str) -> None:
        setattr(self, what, getattr(self, what) + 1)
        if len(self.notes) < 5:
            self.notes.append(detail)


class Stress:
    """The temporary home and work folder of one engine, and what every case needs."""

    def __init__(self, engine: str, tmp: Path, rng: random.Random, program: Path = RUNPILOT) -> None:
        self.engine, self.rng, self.program = engine, rng, program
        self.home, self.work = tmp / "home", tmp / "work"
        self.work.mkdir(parents=True)
        (self.work / "job.py").write_text(JOB)

    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, "RUNPILOT_HOME": str(self.home), **extra}
        env.pop("RUNPILOT_ENGINE", None)
        return env

    def config(self, name: str, entrypoint: object, image: str = BUSYBOX_IMAGE, extra: str = "") -> Path:
        """A config file in the work folder; ENTRYPOINT is a shell string or a list."""
        path = self.work / f"{self.engine}-{name}.yaml"
        img = "" if self.engine == "local" else f'image: "{image}"\n'
        path.write_text(f"name: stress-{name}\nengine: {self.engine}\n{img}entrypoint: {json.dumps(entrypoint)}\n"
                        f"mounts:\n  code: .\n{extra}")
        return path

    def start(self, args: list[str], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
              **env: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(self.program), *args], stdin=subprocess.DEVNULL, stdout=stdout,
                                stderr=stderr, env=self.env(**env), cwd=ROOT)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(self.program), *args], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, env=self.env(), cwd=ROOT, timeout=120)

    def run_ids(self) -> set[str]:
        runs = self.home / "runs"
        return {p.name for p in runs.iterdir() if p.is_dir() and not p.name.startswith(".")} if runs.is_dir() else set()

    def meta(self, run_id: str) -> dict:
        try:
            return json.loads((self.home / "runs" / run_id / "meta.json").read_text())
        except (OSError, ValueError):
            return {}

    def listed(self) -> dict[str, str]:
        """Status of every run as `runpilot list --all --json` gives it."""
        done = self.cli("list", "--all", "--json")
        if done.returncode != 0:
            return {}
        return {r["id"]: r["status"] for r in json.loads(done.stdout)}

    def leftovers(self, run_ids: list[str], grace: float = 3.0) -> int:
        """Jobs of these runs still alive after GRACE seconds; they are killed (or removed) then."""
        deadline = time.monotonic() + grace
        while True:
            if self.engine == "local":
                found = local_processes_in(self.work)
            else:
                found = [c for r in run_ids for c in containers_with_label(self.engine, f"runpilot.run_id={r}")]
            if not found or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for item in found:
            if self.engine == "local":
                with_suppress(os.kill, item, signal.SIGKILL)
            else:
                subprocess.run([self.engine, "rm", "-f", item], capture_output=True, timeout=60)
        return len(found)

    def wait(self, proc: subprocess.Popen, limit: float = HARD_LIMIT) -> tuple[int, float]:
        """RunPilot's exit status and when it exited (monotonic); killed after LIMIT seconds (exit -9)."""
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return proc.returncode, time.monotonic()

    def forget(self, run_ids) -> None:
        """Delete these runs' folders (large logs of the loud cases); the index keeps their rows."""
        for run_id in run_ids:
            shutil.rmtree(self.home / "runs" / run_id, ignore_errors=True)


def with_suppress(fn, *args) -> None:
    try:
        fn(*args)
    except (ProcessLookupError, PermissionError):
        pass


def local_processes_in(folder: Path) -> list[int]:
    """Live (not zombie) processes whose working folder is FOLDER or below it."""
    found, prefix = [], str(folder.resolve())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (cwd == prefix or cwd.startswith(prefix + "/")):
            found.append(int(entry))
    return found


# ==== signals at random moments =================================================

def signals_case(s: Stress, count: int) -> Tally:
    t = Tally(s.engine, "signals (SIGINT/SIGTERM)")
    stubborn_grace = 2
    for _ in range(count):
        kind = s.rng.choice(["polite", "stubborn"])
        sig = s.rng.choice([signal.SIGINT, signal.SIGTERM])
        cfg = s.config(f"sig-{kind}", ["python3", "job.py", kind], image=PYTHON_IMAGE)
        before = s.run_ids()
        with tempfile.TemporaryFile() as err:
            proc = s.start(["run", str(cfg), "--stop-timeout", str(stubborn_grace)], stderr=err)
            delay = s.rng.uniform(0.1, 2.0)  # while Python reads the file, before the container, while it runs
            time.sleep(delay)
            proc.send_signal(sig)
            sent = time.monotonic()
            code, ended = s.wait(proc)
            err.seek(0)
            said = err.read().decode("utf-8", "replace").strip().splitlines()
        t.tried += 1
        new = sorted(s.run_ids() - before)
        what = f"{signal.Signals(sig).name} after {delay:.2f}s ({kind})"
        if ended - sent > stubborn_grace + SLACK[s.engine]:
            t.wrong("overruns", f"{what}: exited {ended - sent:.1f}s after the signal")
        if not new:  # stopped before RunPilot recorded anything: it must end as the signal's default does
            if code not in (-sig, 128 + sig):
                t.wrong("exit_wrong", f"{what}: nothing recorded, exit {code}, stderr ends "
                                      f"{said[-1][:100] if said else '(nothing)'!r}")
            continue
        meta = s.meta(new[0])
        if code != 128 + sig:
            t.wrong("exit_wrong", f"{what}: exit {code}, expected {128 + sig}")
        status = meta.get("status")
        if not (status == "interrupted" or (status == "cancelled" and meta.get("exit_code") is None)):
            t.wrong("status_wrong", f"{what}: status {status}")
        t.left += s.leftovers(new)
    return t


# ==== the index locked while a run ends ==========================================

def hold_lock(db: Path, after: float, hold: float, ready: threading.Event) -> None:
    """From AFTER seconds on, hold DB with BEGIN EXCLUSIVE for HOLD seconds (another process's way)."""
    time.sleep(after)
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        ready.set()
        time.sleep(hold)
        conn.execute("ROLLBACK")
    finally:
        ready.set()
        conn.close()


def index_lock_case(s: Stress, count: int) -> Tally:
    t = Tally(s.engine, "index lock (BEGIN EXCLUSIVE > RUNPILOT_DB_TIMEOUT)")
    warm = s.start(["run", str(s.config("lock-warm", "true"))])  # runs.db exists from here on
    s.wait(warm)
    for _ in range(count):
        code = s.rng.choice([0, 3])
        cfg = s.config(f"lock-{code}", f"echo METRIC loss=1; sleep 2; exit {code}")
        at, hold = s.rng.uniform(-0.5, 3.0), s.rng.uniform(DB_TIMEOUT + 0.5, DB_TIMEOUT + 2.5)
        ready = threading.Event()
        locker = threading.Thread(target=hold_lock, args=(s.home / "runs.db", max(0.0, at), hold, ready))
        before = s.run_ids()
        if at < 0:  # held before RunPilot starts
            locker.start()
            ready.wait(10)
            proc = s.start(["run", str(cfg)], RUNPILOT_DB_TIMEOUT=str(DB_TIMEOUT))
        else:
            proc = s.start(["run", str(cfg)], RUNPILOT_DB_TIMEOUT=str(DB_TIMEOUT))
            locker.start()
        rc, _ = s.wait(proc)
        locker.join()
        t.tried += 1
        what = f"lock from {at:+.1f}s for {hold:.1f}s, job exits {code}"
        expected = "succeeded" if code == 0 else "failed"
        new = sorted(s.run_ids() - before)
        if rc != code:
            t.wrong("exit_wrong", f"{what}: runpilot exited {rc}")
        if not new:
            if rc == code:  # the job ran, yet nothing was recorded
                t.wrong("status_wrong", f"{what}: no run folder")
            continue
        run_id = new[0]
        after_list = s.listed().get(run_id)
        in_meta = s.meta(run_id).get("status")
        s.cli("reindex")
        after_reindex = s.listed().get(run_id)
        for when, status in (("meta.json", in_meta), ("list", after_list), ("reindex + list", after_reindex)):
            if status != expected:
                t.wrong("status_wrong", f"{what}: {when} says {status}, expected {expected}")
                break
        t.left += s.leftovers(new)
    return t


# ==== a job that closes its output ==============================================

def closed_pipes_case(s: Stress, count: int) -> Tally:
    t = Tally(s.engine, "closed pipes (job closes stdout+stderr, timeout 2s)")
    timeout, grace = 2, 1
    for _ in range(count):
        stubborn = s.rng.random() < 0.5
        trap = "trap '' TERM; " if stubborn else ""
        cfg = s.config(f"closed-{int(stubborn)}", f"{trap}exec >/dev/null 2>&1; sleep 12",
                       extra=f"timeout: {timeout}\n")
        before = s.run_ids()
        started = time.monotonic()
        proc = s.start(["run", str(cfg), "--stop-timeout", str(grace)])
        rc, ended = s.wait(proc)
        t.tried += 1
        what = f"{'TERM-ignoring' if stubborn else 'plain'} job"
        took = ended - started
        if took > timeout + grace + SLACK[s.engine]:
            t.wrong("overruns", f"{what}: ran {took:.1f}s")
        if rc != 124:
            t.wrong("exit_wrong", f"{what}: exit {rc}, expected 124")
        new = sorted(s.run_ids() - before)
        status = s.meta(new[0]).get("status") if new else None
        if status != "timeout":
            t.wrong("status_wrong", f"{what}: status {status}")
        t.left += s.leftovers(new)
    return t


# ==== a reader that stops reading ================================================

def stalled_reader_case(s: Stress, count: int) -> Tally:
    t = Tally(s.engine, "stalled reader (stdout never read, job prints forever)")
    grace = 1
    loud = 'i=0; while :; do echo "line $i of a job that prints forever"; i=$((i+1)); done'
    for _ in range(count):
        how = s.rng.choice(["timeout 2s", "Ctrl-C", "Ctrl-C twice"])
        extra = "timeout: 2\n" if how == "timeout 2s" else "timeout: 60\n"
        cfg = s.config(f"stalled-{how.split()[0]}", loud, extra=extra)
        before = s.run_ids()
        read_end, write_end = os.pipe()  # nobody ever reads read_end; it stays open until the run is over
        try:
            started = time.monotonic()
            proc = s.start(["run", str(cfg), "--stop-timeout", str(grace)], stdout=write_end)
            os.close(write_end)
            if how == "timeout 2s":
                limit_from, limit, expected_rc, expected = started, 2 + grace, 124, "timeout"
            else:
                time.sleep(s.rng.uniform(1.0, 2.0))
                proc.send_signal(signal.SIGINT)
                limit_from, limit, expected_rc, expected = time.monotonic(), grace, 130, "interrupted"
                if how == "Ctrl-C twice":
                    time.sleep(0.3)
                    proc.send_signal(signal.SIGINT)
                    limit = 0.3
            rc, ended = s.wait(proc)
        finally:
            os.close(read_end)
        t.tried += 1
        took = ended - limit_from
        if took > limit + SLACK[s.engine]:
            t.wrong("overruns", f"{how}: exited {took:.1f}s after the limit's start "
                                f"(allowed {limit + SLACK[s.engine]:.0f}s)")
        if rc == -signal.SIGINT and expected_rc == 130:  # the second Ctrl-C landed while RunPilot exited
            t.by_signal += 1
        elif rc != expected_rc:
            t.wrong("exit_wrong", f"{how}: exit {rc}, expected {expected_rc}")
        new = sorted(s.run_ids() - before)
        status = s.meta(new[0]).get("status") if new else None
        if status != expected:
            t.wrong("status_wrong", f"{how}: status {status}, expected {expected}")
        t.left += s.leftovers(new)
        s.forget(new)
    return t


# ==== many runs at once ==========================================================

def parallel_case(s: Stress, count: int) -> Tally:
    t = Tally(s.engine, f"parallel ({count} runs at once)")
    cfg = s.config("burst", "echo METRIC x=1")
    before = s.run_ids()
    procs = [s.start(["run", str(cfg)]) for _ in range(count)]
    codes = [s.wait(p, 300)[0] for p in procs]
    new = sorted(s.run_ids() - before)
    with sqlite3.connect(s.home / "runs.db") as conn:
        rows = {r[0] for r in conn.execute("SELECT id FROM runs WHERE name = 'stress-burst' AND status = 'succeeded'")}
    t.tried = count
    for code in codes:
        if code != 0:
            t.wrong("exit_wrong", f"a run exited {code}")
    if len(new) != count:
        t.wrong("status_wrong", f"{len(new)} folders for {count} runs")
    lost = count - len(rows & set(new))
    for _ in range(lost):
        t.wrong("status_wrong", f"{lost} of {count} runs have no succeeded row")
    t.left += s.leftovers(new)
    return t


# ==== main =======================================================================

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="docker,podman,local")
    parser.add_argument("--interrupts", type=int, default=10, help="random signals per engine (default 10)")
    parser.add_argument("--parallel", type=int, default=16, help="runs started at once per engine (default 16)")
    parser.add_argument("--faults", type=int, default=8,
                        help="tries of each of index lock, closed pipes and stalled reader on local; docker and "
                             "podman half of it, at least 2 (default 8)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runpilot", type=Path, default=RUNPILOT, help="the runpilot.py to run (default: this "
                                                                          "checkout's)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    began = time.monotonic()
    tallies: list[Tally] = []
    print("| engine | case | faults tried | exit status wrong | status wrong | overran | processes left |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for engine in args.engines.split(","):
        faults = args.faults if engine == "local" else max(2, args.faults // 2)
        with tempfile.TemporaryDirectory(prefix=f"runpilot-stress-{engine}-") as tmp:
            s = Stress(engine, Path(tmp), rng, args.runpilot.resolve())
            for case, n in ((signals_case, args.interrupts), (index_lock_case, faults),
                            (closed_pipes_case, faults), (stalled_reader_case, faults),
                            (parallel_case, args.parallel)):
                if n <= 0:
                    continue
                t = case(s, n)
                tallies.append(t)
                print(f"| {engine} | {t.case} | {t.tried} | {t.exit_wrong} | {t.status_wrong} | {t.overruns} | "
                      f"{t.left} |", flush=True)
    total = Tally("all", "total")
    for t in tallies:
        for key in ("tried", "exit_wrong", "status_wrong", "overruns", "left"):
            setattr(total, key, getattr(total, key) + getattr(t, key))
    print(f"| **all** | **total** | {total.tried} | {total.exit_wrong} | {total.status_wrong} | {total.overruns} | "
          f"{total.left} |")
    print(f"\n{time.monotonic() - began:.0f} s; seed {args.seed}")
    for t in tallies:
        for note in t.notes:
            print(f"- {t.engine}, {t.case}: {note}")
        if t.by_signal:
            print(f"- {t.engine}, {t.case}: {t.by_signal} run(s) recorded right, then RunPilot was killed by the "
                  "signal itself while exiting (a second signal after the stop; a shell's $? is 128+N the same); "
                  "counted right")
    bad = total.exit_wrong + total.status_wrong + total.overruns + total.left
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
