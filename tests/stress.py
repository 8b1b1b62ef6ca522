"""Reliability stress run: interrupts at random moments and bursts of parallel runs, on real engines.

    python3 tests/stress.py [--engines docker,podman,local] [--interrupts 20] [--parallel 16]

Needs the test images (tests/images/build.sh). Prints, per engine, how many interrupts were tried,
how many ended with the right exit status and run status, how many containers were left behind, and
for the parallel burst how many runs, distinct ids, folders and rows there were. The README's
Reliability section quotes the last figures.
"""

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.support import BUSYBOX_IMAGE, PYTHON_IMAGE, containers_with_label  # noqa: E402

RUNPILOT = ROOT / "runpilot.py"
JOB = """\
import signal, sys, time
if sys.argv[1] == "polite":
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(0))
else:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("METRIC loss=1", flush=True)
while True:
    time.sleep(0.05)
"""


def config_for(work: Path, engine: str, kind: str) -> Path:
    (work / "job.py").write_text(JOB)
    entry = f'["python3", "job.py", "{kind}"]'
    image = "" if engine == "local" else f'image: "{PYTHON_IMAGE}"\n'
    path = work / f"{engine}-{kind}.yaml"
    path.write_text(f"name: stress-{kind}\nengine: {engine}\n{image}entrypoint: {entry}\nmounts:\n  code: .\n")
    return path


def interrupts(engine: str, count: int, home: Path, work: Path, rng: random.Random) -> dict:
    stats = {"tried": 0, "right exit": 0, "right status": 0, "containers left": 0}
    for _ in range(count):
        kind = rng.choice(["polite", "stubborn"])
        sig = rng.choice([signal.SIGINT, signal.SIGTERM])
        before = set(os.listdir(home / "runs")) if (home / "runs").exists() else set()
        proc = subprocess.Popen([sys.executable, str(RUNPILOT), "run", str(config_for(work, engine, kind)),
                                 "--stop-timeout", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "RUNPILOT_HOME": str(home)})
        time.sleep(rng.uniform(0.3, 2.0))  # sometimes before the container exists, sometimes while it runs
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
        stats["tried"] += 1
        stats["right exit"] += code == 128 + sig
        new = set(os.listdir(home / "runs")) - before
        run_id = new.pop() if new else None
        if run_id:
            meta = json.loads((home / "runs" / run_id / "meta.json").read_text())
            stats["right status"] += meta["status"] == "interrupted"
            if engine != "local":
                stats["containers left"] += len(containers_with_label(engine, f"runpilot.run_id={run_id}"))
    return stats


def parallel(engine: str, count: int, home: Path, work: Path) -> dict:
    config = work / f"{engine}-par.yaml"
    image = "" if engine == "local" else f'image: "{BUSYBOX_IMAGE}"\n'
    config.write_text(f"name: burst\nengine: {engine}\n{image}entrypoint: 'echo METRIC x=1'\n")
    before = len(os.listdir(home / "runs")) if (home / "runs").exists() else 0
    procs = [subprocess.Popen([sys.executable, str(RUNPILOT), "run", str(config)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "RUNPILOT_HOME": str(home)})
             for _ in range(count)]
    codes = [p.wait(timeout=300) for p in procs]
    with sqlite3.connect(home / "runs.db") as conn:
        rows = conn.execute("SELECT id FROM runs WHERE name = 'burst' AND status = 'succeeded'").fetchall()
    return {"runs": count, "exit 0": codes.count(0), "distinct ids": len({r[0] for r in rows}),
            "folders": len(os.listdir(home / "runs")) - before, "rows lost": count - len(rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="docker,podman,local")
    parser.add_argument("--interrupts", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    print("| engine | interrupts tried | right exit status | recorded interrupted | containers left | "
          "parallel runs | exit 0 | distinct ids | folders | rows lost |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for engine in args.engines.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            home, work = Path(tmp) / "home", Path(tmp) / "work"
            work.mkdir()
            i = interrupts(engine, args.interrupts, home, work, rng)
            p = parallel(engine, args.parallel, home, work)
        print(f"| {engine} | {i['tried']} | {i['right exit']} | {i['right status']} | {i['containers left']} | "
              f"{p['runs']} | {p['exit 0']} | {p['distinct ids']} | {p['folders']} | {p['rows lost']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
