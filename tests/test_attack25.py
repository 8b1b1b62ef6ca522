"""Attacks on issue 25's exports and GPU statistics (unit: no engine, no TensorBoard, no MLflow).

Each test is a defect found by attacking what issue 25 built, failing on the code before its fix:
steps beyond int64 in the runner's event file and in the exports, MLflow URIs with credentials or
that do not parse, nvidia-smi answering garbage, and the export's memory with many samples.
"""

import base64
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import runpilot
from tests.common import RunsHome
from tests.test_exports import FIXTURES, RecordingMlflow, RecordingServerCase, split_records

INT64 = 1 << 63


def steps_of(path: Path) -> list[int]:
    """The steps of an event file's scalar events (decoded with the test's own varint reader)."""
    steps = []
    for payload in split_records(path.read_bytes())[1:]:
        if payload[9:10] != b"\x10":
            steps.append(0)
            continue
        value, shift, at = 0, 0, 10
        while True:
            byte = payload[at]
            value |= (byte & 0x7F) << shift
            shift, at = shift + 7, at + 1
            if not byte & 0x80:
                break
        assert at - 10 <= 10, "a varint longer than protobuf's ten bytes"
        steps.append(value - (1 << 64) if value >= INT64 else value)
    return steps


class StepsBeyondInt64(RunsHome):
    """A METRIC step is any integer; an Event's step (and MLflow's) is an int64."""

    def test_the_runners_event_file_survives_a_huge_step(self):
        # before: IndexError in LiveEvents.flush, a traceback out of the tee loop
        config = self.local_config("print('METRIC step=99999999999999999999999 loss=0.5')\n"
                                   "print('METRIC step=2 loss=0.25')\nprint('METRIC step=-3 loss=1')\n"
                                   "print('after')\n", "tb", "tensorboard: true\n")
        code, _, err = self.cli("run", config)
        self.assertEqual(code, 0, err)
        run = self.only_run()
        self.assertEqual(self.meta(run)["status"], "succeeded")
        self.assertEqual([s["step"] for s in self.metrics(run)], [99999999999999999999999, 2, -3])
        self.assertEqual(steps_of(next(run.glob("events.out.tfevents.*"))), [2, -3])

    def test_live_events_drop_only_the_steps_beyond_int64(self):
        events = runpilot.LiveEvents(self.tmp / "events.out.tfevents.1", 0.0)
        events.samples += [{"step": s, "x": 1.0} for s in (INT64, -INT64 - 1, INT64 - 1, -INT64, 7)]
        events.flush(1)
        events.samples += [{"step": 2 ** 70, "x": 1.0}] + [{"step": i, "x": 1.0} for i in range(40)]
        events.flush(6)
        events.close()
        self.assertEqual(steps_of(self.tmp / "events.out.tfevents.1"), [INT64 - 1, -INT64, 7, *range(40)])

    def test_the_export_leaves_out_steps_beyond_int64(self):
        run = self.add_run(samples=[{"step": 2 ** 70, "loss": 1.0}, {"step": -3, "loss": 2}, {"step": 5, "loss": 3}])
        out = self.tmp / "tb"
        code, _, err = self.cli("export", run.id, "--format", "tensorboard", "-o", out)
        self.assertEqual(code, 0, err)
        self.assertEqual(steps_of(next(out.glob("*/events.out.tfevents.*"))), [-3, 5])
        self.assertEqual([m["step"] for m in runpilot.mlflow_metrics(run, runpilot.RunFolder(Path(run.path)))],
                         [-3, 5])


class AuthRecordingMlflow(RecordingMlflow):
    """The recording stand-in, also keeping each request's Authorization header."""

    seen: list = []

    def _serve(self):
        self.seen.append(self.headers.get("Authorization"))
        super()._serve()


class MlflowAddresses(RunsHome):
    def setUp(self):
        super().setUp()
        RecordingMlflow.requests, RecordingMlflow.answer, AuthRecordingMlflow.seen = [], None, []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AuthRecordingMlflow)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.addCleanup(self.server.server_close)
        self.addCleanup(self.server.shutdown)
        self.port = self.server.server_address[1]

    def test_credentials_in_the_uri_authenticate_and_are_never_printed(self):
        # before: urllib took "alice:s3cret@127.0.0.1" for the host name, and the error printed the password
        run = self.add_run(samples=[{"step": 1, "loss": 0.5}])
        uri = f"http://alice:s3cret@127.0.0.1:{self.port}/"
        code, out, err = self.cli("export", run.id, "--format", "mlflow", "-o", uri)
        self.assertEqual(code, 0, err)
        self.assertNotIn("s3cret", out + err)
        self.assertIn(f"to http://127.0.0.1:{self.port}\n", err)
        basic = "Basic " + base64.b64encode(b"alice:s3cret").decode()
        self.assertEqual(set(AuthRecordingMlflow.seen), {basic})
        with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": uri}):
            self.server.shutdown()
            self.server.server_close()
            result = self.cli("export", run.id, "--format", "mlflow")
        self.assertCleanError(result, 1, f"cannot reach the MLflow server at http://127.0.0.1:{self.port}")
        self.assertNotIn("s3cret", result[2])

    def test_environment_credentials_are_never_printed(self):
        run = self.add_run()
        env = {"MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "pw-xyz"}
        with mock.patch.dict(os.environ, env):
            code, out, err = self.cli("export", run.id, "--format", "mlflow", "-o", f"http://127.0.0.1:{self.port}")
        self.assertEqual(code, 0, err)
        self.assertNotIn("pw-xyz", out + err)
        self.assertEqual(set(AuthRecordingMlflow.seen), {"Basic " + base64.b64encode(b"bob:pw-xyz").decode()})

    def test_a_local_store_says_how_to_serve_it(self):
        # before: "give -o http://HOST:5000 or set MLFLOW_TRACKING_URI", to someone whose MLFLOW_TRACKING_URI was set
        run = self.add_run()
        for uri in ("file:///tmp/mlruns", "/tmp/mlruns", "mlruns", "sqlite:///tmp/m.db"):
            with self.subTest(uri=uri), mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": uri}):
                self.assertCleanError(self.cli("export", run.id, "--format", "mlflow"), 2,
                                      "is not a tracking server's http(s) URL but a local MLflow store, which "
                                      "RunPilot does not write; serve it with "
                                      f"`mlflow server --backend-store-uri {uri}` and give its address")
        self.assertCleanError(self.cli("export", run.id, "--format", "mlflow", "-o", "databricks"), 2,
                              "'databricks' is not a tracking server's http(s) URL")

    def test_an_address_that_does_not_parse_is_one_line(self):
        # before: ValueError("Invalid IPv6 URL") as a traceback
        run = self.add_run()
        for uri in ("http://[::1", "http://127.0.0.1:99999", "http://127.0.0.1:port"):
            with self.subTest(uri=uri):
                self.assertCleanError(self.cli("export", run.id, "--format", "mlflow", "-o", uri), 2,
                                      "is not a tracking server's http(s) URL")


class NvidiaSmiMisbehaves(RunsHome):
    """GPU statistics while the stand-in nvidia-smi answers the statistics query badly."""

    def setUp(self):
        super().setUp()
        self.bin = self.tmp / "bin"
        self.bin.mkdir()
        self.env = {"PATH": f"{self.bin}:{os.environ['PATH']}"}

    def run_with(self, answer: str, samples: int = 0) -> tuple[int, str, Path]:
        """A 2.5 s job on GPU 0 with samples every second, nvidia-smi's statistics query running ANSWER;
        the job goes on until its gpu.json holds SAMPLES samples (at most 60 s more: on a loaded machine a
        sampler's call can take longer than its interval)."""
        (self.bin / "nvidia-smi").write_text(
            f"#!{shutil.which('python3')}\nimport os, runpy, sys\n"
            f"if 'utilization' in ' '.join(sys.argv):\n    {answer}\n    sys.exit(0)\n"
            f"runpy.run_path({str(FIXTURES / 'nvidia-smi')!r}, run_name='__main__')\n")
        (self.bin / "nvidia-smi").chmod(0o755)
        gpu_json = f"{str(self.home / 'runs')!r} + '/' + os.environ['RUNPILOT_RUN_ID'] + '/gpu.json'"
        script = ("import os, time\nfor i in range(3):\n    print(f'METRIC step={i} loss=1', flush=True)\n"
                  "    time.sleep(0.8)\n"
                  f"def sampled():\n    try:\n        return open({gpu_json}).read().count('\"step\"')\n"
                  "    except OSError:\n        return 0\n"
                  f"end = time.time() + 60\nwhile sampled() < {samples} and time.time() < end:\n    time.sleep(0.1)\n")
        config = self.local_config(script, "g", "resources:\n  gpus: 1\n")
        code, _, err = self.cli("run", config, "--gpu-stats-every", "1", env=self.env)
        return code, err, self.only_run()

    def test_bytes_that_are_not_utf8_are_no_traceback(self):
        # before: UnicodeDecodeError in the sampling thread, its traceback on the terminal, no more samples
        code, err, run = self.run_with(
            r"sys.stdout.buffer.write(b'\xff\xfe\x1b[31m garbage\n0, GPU-a, 37, 12\n'); sys.stdout.flush()", samples=2)
        self.assertEqual(code, 0, err)
        self.assertNotIn("Traceback", err)
        self.assertNotIn("UnicodeDecodeError", err)
        self.assertEqual(self.meta(run)["usage"]["gpus"]["0"]["util_peak"], 37)
        self.assertGreaterEqual(len(runpilot.read_metrics(run / "gpu.json")), 2)

    def test_values_no_gpu_reports_are_left_out(self):
        # before: a utilization of -5% was recorded, and the idle-GPU hint said "GPU 0 -5%"
        code, err, run = self.run_with(r"print('0, GPU-a, -5, -1\n1, GPU-b, 140, 1e999')")
        self.assertEqual(code, 0, err)
        self.assertNotIn("hint", err)
        self.assertEqual(runpilot.read_metrics(run / "gpu.json"), [])
        self.assertEqual(runpilot.parse_gpu_stats("0, GPU-a, 100, 0\n1, GPU-b, 101, -3\n2, GPU-c, nan, inf\n"),
                         [{"index": 0, "uuid": "GPU-a", "util": 100, "mem_mib": 0},
                          {"index": 1, "uuid": "GPU-b", "util": None, "mem_mib": None},
                          {"index": 2, "uuid": "GPU-c", "util": None, "mem_mib": None}])


class MlflowNames(RecordingServerCase):
    """Tag and param names MLflow refuses (it takes letters, digits, `_-. :/`, and no path tricks)."""

    def test_names_mlflow_refuses_are_sent_as_names_it_takes(self):
        # before: the server refused the whole run (HTTP 400 INVALID_PARAMETER_VALUE: Names may only contain...)
        cases = {"ok.name-1/x y:z": "ok.name-1/x y:z", "é": "é", "my key!": "my key_", "a\x1bb": "a_b",
                 "../up": "_._up", "..": "_.", "/abs": "_abs", "a//b": "a__b", ".": "_", "k" * 300: "k" * 250}
        for key, sent in cases.items():
            with self.subTest(key=key):
                self.assertEqual(runpilot.mlflow_name(key), sent)
        config = "name: n\nengine: local\nentrypoint: [python3, t.py]\nenv: {'K!': 'q'}\n"
        run = self.add_run("n", tags={"my key!": "v"}, config=config)
        code, _, err = self.cli("export", run.id, "--format", "mlflow", "-o", self.uri)
        self.assertEqual(code, 0, err)
        batches = [body for _, path, body in RecordingMlflow.requests if path.endswith("runs/log-batch")]
        self.assertIn({"key": "my key_", "value": "v"}, batches[0]["tags"])
        self.assertIn({"key": "env.K_", "value": "q"}, batches[1]["params"])

    def test_metric_names_mlflow_refuses(self):
        # before: METRIC takes `a//b`, `val/` and names of any length; MLflow refused the whole run for them
        run = self.add_run(samples=[{"step": 1, "a//b": 1, "val/": 2, "k" * 300: 3, "ok/x": 4}])
        sent = list(runpilot.mlflow_metrics(run, runpilot.RunFolder(Path(run.path))))
        self.assertEqual([m["key"] for m in sent], ["a__b", "val_", "k" * 250, "ok/x"])
        code, _, err = self.cli("export", run.id, "--format", "mlflow", "-o", self.uri)
        self.assertEqual(code, 0, err)
        self.assertIn("(4 new metric value(s))", err)



def write_many_samples(test: RunsHome, count: int) -> runpilot.RunRecord:
    """A run of COUNT samples (loss and acc at steps 0..COUNT-1), metrics.json written directly."""
    run = test.add_run("many", samples=[{"step": 0, "loss": 1.0, "acc": 0.0}])
    with open(Path(run.path) / "metrics.json", "w") as f:
        f.write("[\n" + ",\n".join(f'{{"step": {i}, "loss": {1 / (i + 1)!r}, "acc": {i * 1e-6!r}}}'
                                   for i in range(count)) + "\n]\n")
    return run


class ManySamples(RunsHome):
    def test_an_export_of_many_samples_streams(self):
        # before: the whole metrics.json and every sample at once: 714 MB for 1,000,000 samples (now ~67 MB)
        run = write_many_samples(self, 300_000)
        out = self.tmp / "tb"
        script = ("import sys, runpilot\ncode = runpilot.main(sys.argv[1:])\n"
                  "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\nsys.exit(code)\n")
        done = subprocess.run([sys.executable, "-c", script, "export", run.id, "--format", "tensorboard",
                               "-o", str(out)],
                              cwd=Path(runpilot.__file__).parent, capture_output=True, text=True, timeout=300)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("wrote 300000 sample(s) of 1 run(s)", done.stderr)
        self.assertLess(int(done.stdout.split()[-1]), 120 * 1024, "peak memory (KiB) of the export")
        steps = steps_of(next(out.glob("*/events.out.tfevents.*")))
        self.assertEqual(steps, list(range(300_000)))

    def test_a_sample_longer_than_a_read_block(self):
        samples = [{"step": 1, "a": 1.0}, {"step": 2, **{f"k{i}": i for i in range(9000)}}, {"step": 3, "a": 3.0}]
        run = self.add_run(samples=samples)
        with mock.patch.object(runpilot, "EXPORT_READ_BYTES", 64):
            code, _, err = self.cli("export", run.id, "--format", "tensorboard", "-o", self.tmp / "tb")
        self.assertEqual(code, 0, err)
        self.assertEqual(steps_of(next((self.tmp / "tb").glob("*/events.out.tfevents.*"))), [1, 2, 3])


class CountingMlflow(RecordingMlflow):
    """The stand-in, keeping only how many metric values it received (not the requests)."""

    received = 0

    def _serve(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else {}
        type(self).received += len(body.get("metrics") or []) if isinstance(body, dict) else 0
        data = json.dumps({"run": {"info": {"run_id": "r1"}}} if "runs/create" in self.path else
                          {"experiment_id": "1"} if "experiments/create" in self.path else
                          {"error_code": "RESOURCE_DOES_NOT_EXIST"} if "get-by-name" in self.path else {}).encode()
        self.send_response(404 if "get-by-name" in self.path else 200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class ManySamplesToMlflow(RunsHome):
    def test_an_mlflow_export_of_many_samples_streams(self):
        # before: every metric value of the run as a dict at once (~220 MB for 150,000 samples of two metrics)
        CountingMlflow.received = 0
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CountingMlflow)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        run = write_many_samples(self, 150_000)
        script = ("import sys, runpilot\ncode = runpilot.main(sys.argv[1:])\n"
                  "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\nsys.exit(code)\n")
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        done = subprocess.run([sys.executable, "-c", script, "export", run.id, "--format", "mlflow", "-o", uri],
                              cwd=Path(runpilot.__file__).parent, capture_output=True, text=True, timeout=300)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("(300000 new metric value(s))", done.stderr)
        self.assertEqual(CountingMlflow.received, 300_000)
        self.assertLess(int(done.stdout.split()[-1]), 100 * 1024, "peak memory (KiB) of the export")



class MlflowNonFinite(RunsHome):
    def test_nan_and_infinities_are_spelled_as_protobuf_json_spells_them(self):
        # before: bare NaN and Infinity in the JSON; the MLflow server stored the batch as one (step 0, 0.0)
        run = self.add_run(samples=[{"step": 1, "loss": "nan", "acc": "inf"}, {"step": 2, "loss": "-inf", "acc": 2}])
        sent = list(runpilot.mlflow_metrics(run, runpilot.RunFolder(Path(run.path))))
        self.assertEqual([(m["key"], m["step"], m["value"]) for m in sent],
                         [("loss", 1, "NaN"), ("acc", 1, "Infinity"), ("loss", 2, "-Infinity"), ("acc", 2, 2.0)])
        json.dumps(sent, allow_nan=False)   # strict JSON

    def test_an_integer_beyond_a_double(self):
        # before: OverflowError (int too large to convert to float) as a traceback
        run = self.add_run(samples=[{"step": 1, "big": "1" + "0" * 400, "neg": "-" + "9" * 400}])
        sent = list(runpilot.mlflow_metrics(run, runpilot.RunFolder(Path(run.path))))
        self.assertEqual([m["value"] for m in sent], ["Infinity", "-Infinity"])


class RedirectingMlflow(http.server.BaseHTTPRequestHandler):
    """A server that sends every request elsewhere (to TARGET)."""

    target = ""

    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", self.target + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args):
        pass


class MlflowRedirect(RunsHome):
    def serve(self, handler) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        return f"http://127.0.0.1:{server.server_address[1]}"

    def test_a_redirect_is_one_line_and_the_token_stays_home(self):
        # before: urllib followed the redirect, sending the Authorization header to the other host (and a
        # POST's body was dropped)
        RecordingMlflow.requests, RecordingMlflow.answer, AuthRecordingMlflow.seen = [], None, []
        RedirectingMlflow.target = self.serve(AuthRecordingMlflow).replace("127.0.0.1", "localhost")
        run = self.add_run()
        with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_TOKEN": "tok-secret"}):
            result = self.cli("export", run.id, "--format", "mlflow", "-o", self.serve(RedirectingMlflow))
        self.assertCleanError(result, 1, "redirected experiments/get-by-name to "
                              f"{RedirectingMlflow.target}/api/2.0/mlflow/experiments/get-by-name",
                              "give -o the address it redirects to")
        self.assertNotIn("tok-secret", result[2])
        self.assertEqual(AuthRecordingMlflow.seen, [])


class EventEncoderMemory(RunsHome):
    """The fast encoders keep tables per layout and per byte distance: a job's keys must not make them grow
    without bound (tensorboard: true runs them in the tee loop, the export for every sample)."""

    def test_wide_and_ever_changing_samples_stay_small(self):
        # before: one METRIC line of 3,000 keys took 727 MB and 5 s; 200,000 ever-new keys 291 MB
        script = (
            "import sys, runpilot\nfrom pathlib import Path\n"
            "events = runpilot.LiveEvents(Path(sys.argv[1]), 0.0)\n"
            "events.samples.append({'step': 1, **{f'key_number_{i}': 1.0 for i in range(3000)}})\n"
            "events.flush(1)\n"
            "events.samples += [{'step': s, **{f'key_{i}': float(s) for i in range(300)}} for s in range(2, 42)]\n"
            "events.flush(2)\n"
            "for s in range(42, 20042):\n"
            "    events.samples.append({'step': s, f'k{s}': 1.0})\n"
            "    events.flush(s)\n"
            "events.close()\n"
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n")
        path = self.tmp / "events.out.tfevents.1"
        done = subprocess.run([sys.executable, "-c", script, str(path)], cwd=Path(runpilot.__file__).parent,
                              capture_output=True, text=True, timeout=300)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertLess(int(done.stdout.split()[-1]), 80 * 1024, "peak memory (KiB)")
        plain = [runpilot.tb_event(0.0, 1, runpilot.tb_scalars({f"key_number_{i}": 1.0 for i in range(3000)}))]
        plain += [runpilot.tb_event(0.0, s, runpilot.tb_scalars({f"key_{i}": float(s) for i in range(300)}))
                  for s in range(2, 42)]
        plain += [runpilot.tb_event(0.0, s, runpilot.tb_scalars({f"k{s}": 1.0})) for s in range(42, 20042)]
        records = split_records(path.read_bytes())[1:]   # each record's CRCs checked
        self.assertEqual(len(records), len(plain))
        self.assertEqual([r[9:] for r in records], [p[9:] for p in plain])   # all but the wall time


class ShapedMlflow(RecordingMlflow):
    """The recording stand-in, answering the endpoints named in REPLIES with their JSON instead."""

    replies: dict = {}

    def _serve(self):
        for endpoint, reply in self.replies.items():
            if endpoint in self.path:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
        super()._serve()


class MlflowAnswersOfAnotherShape(RunsHome):
    def test_json_that_is_not_mlflows_answer_is_one_line(self):
        # before: KeyError, TypeError or AttributeError tracebacks; an experiment without an id became "None"
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ShapedMlflow)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        run = self.add_run(samples=[{"step": 1, "loss": 1}])
        found = {"runs/search": {"runs": [{"info": {"run_id": "r"}}]}}
        cases = [({"runs/search": {"runs": [{}]}}, "runs/search"), ({"runs/search": {"runs": "x"}}, "runs/search"),
                 ({**found, "get-history": {"metrics": "abc"}}, "metrics/get-history"),
                 ({**found, "get-history": {"metrics": [1, 2]}}, "metrics/get-history"),
                 ({"get-by-name": {"experiment": "x"}}, "experiments/get-by-name"),
                 ({"get-by-name": {"experiment": {"experiment_id": None}}}, "experiments/get-by-name"),
                 ({"experiments/create": {}}, "experiments/create"),
                 ({"runs/create": {"run": {"info": []}}}, "runs/create")]
        for replies, endpoint in cases:
            with self.subTest(replies=replies):
                ShapedMlflow.replies = replies
                self.assertCleanError(self.cli("export", run.id, "--format", "mlflow", "-o", uri), 1,
                                      f"answered {endpoint} with something that is not MLflow's answer",
                                      "runs exported: none")


class TensorBoardFolders(RunsHome):
    def test_runs_of_one_name_and_short_id_get_folders_of_their_own(self):
        # before: both went to job-abcdef/, the second's file replacing the first's (one run lost, silently)
        a = self.add_run("job", samples=[{"step": 1, "loss": 1.0}], run_id="20261120-100000-abcdef")
        b = self.add_run("job", samples=[{"step": 1, "loss": 2.0}], run_id="20261121-100000-abcdef")
        c = self.add_run("job", samples=[{"step": 1, "loss": 3.0}], run_id="20261122-100000-123456")
        out = self.tmp / "tb"
        code, _, err = self.cli("export", a.id, b.id, c.id, "--format", "tensorboard", "-o", out)
        self.assertEqual(code, 0, err)
        folders = sorted(p.name for p in out.iterdir())
        self.assertEqual(folders, ["job-123456", f"job-{a.id}", f"job-{b.id}"])
        for folder, value in zip(folders, (3.0, 1.0, 2.0)):
            (events,) = (out / folder).iterdir()
            self.assertEqual(split_records(events.read_bytes())[1][9:],
                             runpilot.tb_event(0, 1, runpilot.tb_scalars({"loss": value}))[9:])


class UnwritableEventFile(RunsHome):
    def test_a_run_whose_event_file_cannot_be_made_is_recorded_failed_and_says_so_once(self):
        # before: recorded as cancelled, "cancelled before the job started; runpilot exits with 130", then
        # "it is recorded as failed" and exit status 1: the record and the two lines disagreed
        config = self.local_config("print('METRIC step=3 loss=0.5')\n", "tb", "tensorboard: true\n")

        def refused(writer, path, *args, **kwargs):  # a read-only run folder (root writes anywhere here)
            raise PermissionError(13, "Permission denied", str(path))

        fds = len(os.listdir("/proc/self/fd"))
        with mock.patch.object(runpilot.EventFileWriter, "__init__", refused):
            code, _, err = self.cli("run", config)
        self.assertEqual(code, 1, err)
        self.assertEqual(len(os.listdir("/proc/self/fd")), fds, "metrics.json left open")
        run = self.only_run()
        meta = self.meta(run)
        self.assertEqual((meta["status"], meta["exit_code"]), ("failed", None))
        self.assertNotIn("cancelled", err)
        self.assertNotIn("130", err)
        self.assertIn("(Permission denied); the job was not started; it is recorded as failed", err)
        self.assertEqual(self.db_rows()[0]["status"], "failed")
        self.assertFalse((run / "logs.txt").exists() and (run / "logs.txt").read_bytes())


class ManyRunsExport(RunsHome):
    def test_a_hundred_runs_within_64_open_files(self):
        # before: every run's event file open at once: "cannot write ...: Too many open files" (a sweep of
        # 1,000 runs under the usual limit of 1,024)
        runs = [self.add_run(f"point{i}", samples=[{"step": 1, "loss": float(i)}]) for i in range(100)]
        script = ("import resource, sys, runpilot\nresource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
                  "sys.exit(runpilot.main(sys.argv[1:]))\n")
        out = self.tmp / "tb"
        done = subprocess.run([sys.executable, "-c", script, "export", *[r.id for r in runs], "--format",
                               "tensorboard", "-o", str(out)], cwd=Path(runpilot.__file__).parent,
                              capture_output=True, text=True, timeout=300)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("wrote 100 sample(s) of 100 run(s)", done.stderr)
        self.assertEqual(len(list(out.glob("*/events.out.tfevents.*"))), 100)


class SlowMlflow(http.server.BaseHTTPRequestHandler):
    """A server that answers nothing for 3 s."""

    def do_GET(self):
        time.sleep(3)

    do_POST = do_GET

    def log_message(self, *args):
        pass


class MlflowTimeouts(RunsHome):
    def test_a_slow_server_is_one_line_and_mlflows_timeout_variable_sets_the_wait(self):
        # before: the wait was a fixed 30 s per request, and "cannot reach the MLflow server ... (timed out)"
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowMlflow)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        run = self.add_run()
        started = time.monotonic()
        with mock.patch.dict(os.environ, {"MLFLOW_HTTP_REQUEST_TIMEOUT": "0.5"}):
            result = self.cli("export", run.id, "--format", "mlflow", "-o", uri)
        self.assertLess(time.monotonic() - started, 2.5)
        self.assertCleanError(result, 1, f"the MLflow server at {uri} did not answer experiments/get-by-name "
                              "within 0.5 s", "MLFLOW_HTTP_REQUEST_TIMEOUT", "runs exported: none")
        for bad in ("abc", "0", "-1", "nan"):
            with self.subTest(bad=bad), mock.patch.dict(os.environ, {"MLFLOW_HTTP_REQUEST_TIMEOUT": bad}):
                self.assertCleanError(self.cli("export", run.id, "--format", "mlflow", "-o", uri), 2,
                                      f"MLFLOW_HTTP_REQUEST_TIMEOUT={bad}", "seconds")


class MlflowRunCreation(RunsHome):
    def test_a_run_is_findable_from_its_creation(self):
        # before: runpilot.run_id was set by the first runs/log-batch; a server that failed between runs/create
        # and it left a run that no export again could find, so the export again made a second one
        RecordingMlflow.requests, RecordingMlflow.answer = [], None
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RecordingMlflow)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        run = self.add_run()
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        code, _, err = self.cli("export", run.id, "--format", "mlflow", "-o", uri)
        self.assertEqual(code, 0, err)
        (create,) = [body for _, path, body in RecordingMlflow.requests if path.endswith("runs/create")]
        self.assertIn({"key": "runpilot.run_id", "value": run.id}, create["tags"])
