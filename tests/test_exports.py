"""Exports and GPU statistics, without TensorBoard or MLflow installed (tests/test_exports_tools.py
reads the same files with TensorBoard's own reader and talks to a real `mlflow server`).

- The event-file writer's bytes: CRC-32C check values, TFRecord framing, Event and Summary encoding
  (golden bytes checked once against TensorBoard's protobuf classes), and the fast encoders
  (ScalarEvents, BatchEvents, LiveEvents) against the plain one.
- MLflow's REST calls: their shapes against a recording HTTP server (argument building), and the error
  paths: a server that is down, refuses, or answers garbage gives one line, exit 1, naming the runs.
- GPU statistics through tests/fixtures/nvidia-smi made to report a utilization and memory: gpu.json,
  meta.json's usage, `show`, `plot --metric gpu0.util`, the idle-GPU hint, --no-gpu-stats, and a
  hung nvidia-smi that holds neither the tee loop nor the run's end.
"""

import http.server
import json
import math
import os
import shutil
import struct
import threading
import time
from pathlib import Path
from unittest import mock

import runpilot
from tests.common import RunsHome

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# One Event of two scalars (wall_time 1796670000.25, step 300, loss=0.5, val/acc=-2.5) in TFRecord
# framing, as TensorBoard's event_pb2.Event(...).SerializeToString() frames it (checked once by hand).
GOLDEN_RECORD = bytes.fromhex(
    "2b00000000000000861bc34b090000108cc0c5da4110ac022a1d0a0b0a046c6f7373150000003f0a0e0a0776616c2f6163"
    "6315000020c081330a9b")


def split_records(data: bytes) -> list[bytes]:
    """The payloads of a TFRecord file, checking both masked CRCs of every record."""
    payloads, at = [], 0
    while at < len(data):
        header = data[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[at + 8:at + 12])
        assert header_crc == runpilot.masked_crc32c(header), f"bad length CRC at {at}"
        payload = data[at + 12:at + 12 + length]
        (crc,) = struct.unpack("<I", data[at + 12 + length:at + 16 + length])
        assert crc == runpilot.masked_crc32c(payload), f"bad data CRC at {at}"
        payloads.append(payload)
        at += 16 + length
    return payloads


class Crc32cAndVarints(RunsHome):
    def test_crc32c_check_values(self):
        # the catalogue's check value, RFC 3720's test vectors (iSCSI), and the empty string
        cases = [(b"123456789", 0xE3069283), (b"\0" * 32, 0x8A9136AA), (b"\xff" * 32, 0x62A8AB43),
                 (bytes(range(32)), 0x46DD794E), (b"", 0)]
        for data, crc in cases:
            with self.subTest(data=data[:9]):
                self.assertEqual(runpilot.crc32c(data), crc)

    def test_masked_crc_is_tfrecords(self):
        crc = runpilot.crc32c(b"123456789")
        self.assertEqual(runpilot.masked_crc32c(b"123456789"), (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32)
        self.assertEqual(runpilot.masked_crc32c(b""), 0xA282EAD8)

    def test_varints(self):
        cases = [(0, b"\x00"), (1, b"\x01"), (127, b"\x7f"), (128, b"\x80\x01"), (300, b"\xac\x02"),
                 (16383, b"\xff\x7f"), (16384, b"\x80\x80\x01"), (2**63 - 1, b"\xff" * 8 + b"\x7f"),
                 (-1, b"\xff" * 9 + b"\x01")]
        for value, encoded in cases:
            with self.subTest(value=value):
                self.assertEqual(runpilot.encode_varint(value), encoded)


class EventBytes(RunsHome):
    def plain(self, wall: float, step: int, values: dict) -> bytes:
        return runpilot.tfrecord(runpilot.tb_event(wall, step, runpilot.tb_scalars(values)))

    def test_golden_event(self):
        self.assertEqual(self.plain(1796670000.25, 300, {"loss": 0.5, "val/acc": -2.5}), GOLDEN_RECORD)
        self.assertEqual(runpilot.ScalarEvents().record(1796670000.25, 300, {"loss": 0.5, "val/acc": -2.5}),
                         GOLDEN_RECORD)
        self.assertEqual(split_records(GOLDEN_RECORD), [GOLDEN_RECORD[12:-4]])

    def test_file_starts_with_its_version(self):
        path = self.tmp / "events.out.tfevents.1.runpilot"
        writer = runpilot.EventFileWriter(path, 1796670000.0)
        writer.add(1796670001.0, 7, {"loss": 1.5, "note": "text", "flag": True})
        writer.close()
        first, second = split_records(path.read_bytes())
        self.assertEqual(first, b"\x09" + struct.pack("<d", 1796670000.0) + b"\x1a\x0dbrain.Event:2")
        self.assertEqual(second, runpilot.tb_event(1796670001.0, 7, runpilot.tb_scalars({"loss": 1.5})))

    def test_values_beyond_float32(self):
        inf, minus = struct.pack("<f", math.inf), struct.pack("<f", -math.inf)
        self.assertEqual(runpilot.tb_scalars({"big": 1e39, "small": -1e39, "huge": 10**400}),
                         b"\x0a\x0a\x0a\x03big\x15" + inf + b"\x0a\x0c\x0a\x05small\x15" + minus
                         + b"\x0a\x0b\x0a\x04huge\x15" + inf)
        self.assertTrue(math.isnan(struct.unpack("<f", runpilot.tb_scalars({"nan": math.nan})[-4:])[0]))

    def test_fast_encoders_write_the_same_bytes(self):
        cases = [[0, 0, 0], [1, 2, 127], [128, 300, 16383], [16384, 20000, 2**21 - 1], [2**28, 2**30, 2**32 - 1],
                 [2**40, 2**40 + 5, 2**41 - 1], [-5, -1, -2**40]]
        values = [0.5, math.nan, 1e39, 3, -2.5, 10**400]
        single, batch = runpilot.ScalarEvents(), runpilot.BatchEvents()
        for steps in cases:
            with self.subTest(steps=steps):
                want = b"".join(self.plain(12.5, s, {"loss": values[2 * i], "acc/top1": values[2 * i + 1]})
                                for i, s in enumerate(steps))
                got = batch.records(12.5, steps, ["loss", "acc/top1"], values)
                self.assertEqual(got, want)
                self.assertEqual(b"".join(single.record(12.5, s, {"loss": values[2 * i], "acc/top1": values[2 * i + 1]})
                                          for i, s in enumerate(steps)), want)

    def test_live_events_keep_order_and_skip_text(self):
        """METRIC lines through MetricLog with the runner's event file on: the events are the plain
        encoder's, in the samples' order (layouts alternate, text values are left out)."""
        lines = [f"METRIC step={i} loss={1 / (i + 1)}".encode() for i in range(100)]
        lines += [b"METRIC step=100 loss=0.5 acc=0.9", b"METRIC step=101 loss=0.25 note=warmup", b"METRIC acc=1"]
        lines += [f"METRIC step={i} loss={i}".encode() for i in range(120, 300)]
        lines += [b"METRIC step=300 loss=1", b"METRIC loss=2 acc=3"] * 20   # as many keys, not the same
        lines += [b"METRIC step=400 loss=1", b"METRIC step=401 acc=2"] * 20
        log = runpilot.MetricLog(self.tmp / "metrics.json")
        log.events = runpilot.LiveEvents(self.tmp / "events", 1000.0)
        with mock.patch.object(runpilot.time, "time", return_value=2000.0):
            log.add_lines(lines[:150])
            log.add_lines(lines[150:])
        log.close()
        samples = runpilot.read_metrics(self.tmp / "metrics.json")
        want = [runpilot.tb_event(2000.0, s["step"], runpilot.tb_scalars(
            {k: v for k, v in s.items() if k != "step" and not isinstance(v, str)})) for s in samples]
        self.assertEqual(split_records((self.tmp / "events").read_bytes())[1:], want)
        self.assertEqual(samples[102], {"step": 103, "acc": 1})  # `METRIC acc=1` is sample 103


class RecordingMlflow(http.server.BaseHTTPRequestHandler):
    """A stand-in tracking server for argument building and error paths: it records every request
    and answers as MLflow does (or with what ANSWER says)."""

    requests: list = []
    answer: tuple | None = None   # (status, body) for every request

    def do_GET(self):
        self._serve()

    def do_POST(self):
        self._serve()

    def _serve(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.requests.append((self.command, self.path, body))
        if self.answer is not None:
            status, text = self.answer
        elif "get-by-name" in self.path:
            status, text = 404, json.dumps({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no experiment"})
        elif "experiments/create" in self.path:
            status, text = 200, json.dumps({"experiment_id": "7"})
        elif "runs/create" in self.path:
            status, text = 200, json.dumps({"run": {"info": {"run_id": f"mlrun{len(self.requests)}"}}})
        else:
            status, text = 200, "{}"
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class RecordingServerCase(RunsHome):
    """A RecordingMlflow server on a free loopback port, its address in self.uri."""

    def setUp(self):
        super().setUp()
        RecordingMlflow.requests, RecordingMlflow.answer = [], None
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RecordingMlflow)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.addCleanup(self.server.server_close)
        self.addCleanup(self.server.shutdown)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"


class MlflowCalls(RecordingServerCase):
    def test_requests_stay_within_mlflows_batch_limits(self):
        config = "name: big\nengine: local\nentrypoint: [python3, t.py]\nenv:\n" + "".join(
            f"  K{i}: '{i}'\n" for i in range(150))
        run = self.add_run("big", samples=[{"step": i, "loss": i / 10, "acc": 1} for i in range(600)],
                           tags={"team": "vision"}, config=config)
        code, _, err = self.cli("export", run.id, "--format", "mlflow", "-o", self.uri, "--experiment", "exp")
        self.assertEqual(code, 0, err)
        calls = [(method, path.split("?")[0]) for method, path, _ in RecordingMlflow.requests]
        self.assertEqual(calls[:4], [("GET", "/api/2.0/mlflow/experiments/get-by-name"),
                                     ("POST", "/api/2.0/mlflow/experiments/create"),
                                     ("POST", "/api/2.0/mlflow/runs/search"),
                                     ("POST", "/api/2.0/mlflow/runs/create")])
        search = RecordingMlflow.requests[2][2]
        self.assertEqual(search, {"experiment_ids": ["7"], "filter": f"tags.`runpilot.run_id` = '{run.id}'",
                                  "max_results": 1})
        batches = [body for _, path, body in RecordingMlflow.requests if path.endswith("runs/log-batch")]
        sizes = [(kind, len(body[kind])) for body in batches for kind in ("tags", "params", "metrics") if kind in body]
        self.assertEqual(sizes, [("tags", 5), ("params", 100), ("params", 53), ("metrics", 1000), ("metrics", 200)])
        metrics = [m for body in batches for m in body.get("metrics", [])]
        start_ms = int(runpilot.parse_time(run.started_at).timestamp() * 1000)
        self.assertEqual(metrics[:2], [{"key": "loss", "value": 0.0, "timestamp": start_ms, "step": 0},
                                       {"key": "acc", "value": 1.0, "timestamp": start_ms, "step": 0}])
        tags = {t["key"]: t["value"] for t in batches[0]["tags"]}
        self.assertEqual(tags, {"team": "vision", "runpilot.run_id": run.id, "runpilot.engine": "local",
                                "runpilot.backend": "host", "runpilot.status": "succeeded"})
        update = RecordingMlflow.requests[-1]
        self.assertEqual(update[2], {"run_id": "mlrun4", "status": "FINISHED", "run_name": "big",
                                     "end_time": start_ms + 10000})

    def test_statuses(self):
        for status, mlflow in [("failed", "FAILED"), ("timeout", "FAILED"), ("lost", "FAILED"),
                               ("interrupted", "KILLED"), ("cancelled", "KILLED"), ("running", "RUNNING")]:
            with self.subTest(status=status):
                RecordingMlflow.requests.clear()
                run = self.add_run(status=status)
                self.assertEqual(self.cli("export", run.id, "--format", "mlflow", "-o", self.uri)[0], 0)
                update = RecordingMlflow.requests[-1][2]
                self.assertEqual(update["status"], mlflow)
                self.assertEqual("end_time" in update, status != "running")

    def test_server_down_is_one_line_naming_the_runs(self):
        a, b = self.add_run("a"), self.add_run("b")
        self.server.shutdown()
        self.server.server_close()
        result = self.cli("export", a.id, b.id, "--format", "mlflow", "-o", self.uri)
        self.assertCleanError(result, 1, f"cannot reach the MLflow server at {self.uri}", "runs exported: none",
                              f"not (or only partly) exported: {runpilot.short_id(a.id)}, {runpilot.short_id(b.id)}")

    def test_refusal_and_garbage_are_one_line(self):
        run = self.add_run()
        cases = [((403, json.dumps({"error_code": "PERMISSION_DENIED", "message": "no access"})),
                  "refused experiments/get-by-name (HTTP 403, PERMISSION_DENIED): no access"),
                 ((404, "<html>\n<h1>Not Found</h1>\n</html>"), "HTTP 404): not MLflow's JSON"),
                 ((200, "<html>\x1b[31mhello</html>"), "answered experiments/get-by-name with something that is "
                                                       "not MLflow's JSON ('<html>\\x1b[31mhello</html>')")]
        for answer, message in cases:
            with self.subTest(message=message):
                RecordingMlflow.answer = answer
                self.assertCleanError(self.cli("export", run.id, "--format", "mlflow", "-o", self.uri), 1, message,
                                      "runs exported: none")

    def test_a_second_run_fails_after_the_first_went_over(self):
        a, b = self.add_run("a"), self.add_run("b")
        calls = {"n": 0}
        real = runpilot.MlflowClient.call

        def flaky(client, method, endpoint, body=None, query=None):
            calls["n"] += 1
            if body and body.get("run_name") == "b" and endpoint == "runs/create":
                RecordingMlflow.answer = (500, json.dumps({"error_code": "INTERNAL_ERROR", "message": "disk full"}))
            return real(client, method, endpoint, body, query)

        with mock.patch.object(runpilot.MlflowClient, "call", flaky):
            result = self.cli("export", a.id, b.id, "--format", "mlflow", "-o", self.uri)
        self.assertCleanError(result, 1, "disk full", f"runs exported: {runpilot.short_id(a.id)};",
                              f"not (or only partly) exported: {runpilot.short_id(b.id)}")

    def test_usage_errors(self):
        run = self.add_run()
        with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": ""}):
            self.assertCleanError(self.cli("export", run.id, "--format", "mlflow"), 2, "MLFLOW_TRACKING_URI")
        self.assertCleanError(self.cli("export", run.id, "--format", "mlflow", "-o", "/tmp/mlruns"), 2,
                              "is not a tracking server's http(s) URL")
        self.assertCleanError(self.cli("export", run.id, "--format", "tensorboard"), 2, "-o DIR")
        self.assertCleanError(self.cli("export", run.id, "--follow"), 2, "--follow keeps a TensorBoard export")
        self.assertCleanError(self.cli("export", run.id, "--experiment", "x"), 2, "--experiment names an MLflow")

    def test_uri_from_the_environment_and_token(self):
        run = self.add_run()
        seen = []
        real_call = runpilot.MlflowClient.call

        def spy(client, *args, **kwargs):
            seen.append(client.headers.get("Authorization"))
            return real_call(client, *args, **kwargs)

        with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_TRACKING_TOKEN": "tok"}), \
                mock.patch.object(runpilot.MlflowClient, "call", spy):
            code, _, err = self.cli("export", run.id, "--format", "mlflow")
        self.assertEqual(code, 0, err)
        self.assertEqual(set(seen), {"Bearer tok"})
        self.assertIn(f"exported 1 run(s) (0 new metric value(s)) to {self.uri}", err)


class TensorBoardExportFiles(RunsHome):
    def test_one_folder_per_run_named_by_name_and_short_id(self):
        a = self.add_run("my job", samples=[{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25, "note": "x"}],
                         config="name: a\nengine: local\nentrypoint: [python3, t.py]\nenv: {LR: '0.1'}\n")
        b = self.add_run("other", samples=[{"step": 5, "acc": 1}],
                         config="name: a\nengine: local\nentrypoint: [python3, t.py]\nenv: {LR: '0.2'}\n")
        out = self.tmp / "tb"
        code, _, err = self.cli("export", a.id, b.id, "--format", "tensorboard", "-o", out)
        self.assertEqual(code, 0, err)
        self.assertIn(f"wrote 3 sample(s) of 2 run(s) to {out}; see them with: tensorboard --logdir {out}", err)
        folders = sorted(p.name for p in out.iterdir())
        self.assertEqual(folders, sorted([f"my_job-{runpilot.short_id(a.id)}", f"other-{runpilot.short_id(b.id)}"]))
        files = list((out / folders[0]).iterdir())
        self.assertEqual(len(files), 1)
        self.assertRegex(files[0].name, r"events\.out\.tfevents\.\d+\.runpilot\Z")
        records = split_records(files[0].read_bytes())
        start = runpilot.parse_time(a.started_at).timestamp()
        self.assertEqual(records[1], runpilot.tb_event(start, 0, runpilot.tb_hparams_start(
            {"env.LR": "0.1"}, start, folders[0])))
        self.assertEqual(records[2][9:], runpilot.tb_event(0, 1, runpilot.tb_scalars({"loss": 0.5}))[9:])
        self.assertEqual(records[3][9:], runpilot.tb_event(0, 2, runpilot.tb_scalars({"loss": 0.25}))[9:])
        self.assertEqual(records[4], runpilot.tb_event(start + 10, 0, runpilot.tb_hparams_end("succeeded", start + 10)))
        # exported again: replaced, not added to
        self.assertEqual(self.cli("export", a.id, "--format", "tensorboard", "-o", out)[0], 0)
        self.assertEqual(len(split_records(next((out / folders[0]).iterdir()).read_bytes())), 3)

    def test_unwritable_folder_is_one_line(self):
        run = self.add_run()
        (self.tmp / "file").write_text("x")
        self.assertCleanError(self.cli("export", run.id, "--format", "tensorboard", "-o", self.tmp / "file"), 1,
                              "cannot write", "choose another -o folder")


class GpuStatistics(RunsHome):
    def setUp(self):
        super().setUp()
        self.bin = self.tmp / "bin"
        self.bin.mkdir()
        shutil.copy(FIXTURES / "nvidia-smi", self.bin / "nvidia-smi")
        self.calls = self.tmp / "smi-calls"
        self.env = {"PATH": f"{self.bin}:{os.environ['PATH']}", "FAKE_NVIDIA_SMI": "2xh100",
                    "FAKE_NVIDIA_SMI_UTIL": "12,90", "FAKE_NVIDIA_SMI_MEM_MIB": "2048,100",
                    "FAKE_NVIDIA_SMI_LOG": str(self.calls)}

    def gpu_job(self, seconds: float = 2.5, gpus: str = "1", extra: str = "", samples: int = 0) -> Path:
        """A job that runs SECONDS, and on until its run's gpu.json holds SAMPLES samples (at most 60 s):
        on a loaded machine a sampler's call can take longer than its interval."""
        gpu_json = f"{str(self.home / 'runs')!r} + '/' + os.environ['RUNPILOT_RUN_ID'] + '/gpu.json'"
        script = (f"import os, time\nblock = b'x' * (60 << 20)\nend = time.time() + {seconds}\ni = 0\n"
                  f"def sampled():\n    try:\n        return open({gpu_json}).read().count('\"step\"')\n"
                  "    except OSError:\n        return 0\n"
                  f"while time.time() < end or sampled() < {samples} and time.time() < end + 60:\n"
                  "    print(f'METRIC step={i} loss={1 / (i + 1)}', flush=True)\n"
                  "    i += 1\n    time.sleep(0.1)\n")
        return self.local_config(script, "gpujob", f"resources:\n  gpus: {gpus}\n{extra}")

    def test_parsing(self):
        text = "0, GPU-a, 35, 1024\n1, GPU-b, [N/A], 7\nNo devices\n"
        rows = runpilot.parse_gpu_stats(text)
        self.assertEqual(rows, [{"index": 0, "uuid": "GPU-a", "util": 35, "mem_mib": 1024},
                                {"index": 1, "uuid": "GPU-b", "util": None, "mem_mib": 7}])
        self.assertEqual(runpilot.gpu_stats_sample(rows, ["GPU-b"]), {"gpu1.mem_mib": 7})
        self.assertEqual(runpilot.gpu_stats_sample(rows, []), {"gpu0.util": 35, "gpu0.mem_mib": 1024,
                                                                "gpu1.mem_mib": 7})
        summary = runpilot.summarise_gpu_stats([{"step": 0, "gpu0.util": 10, "gpu0.mem_mib": 100},
                                                {"step": 10, "gpu0.util": 20, "gpu0.mem_mib": 300}])
        self.assertEqual(summary, {"0": {"util_mean": 15.0, "util_peak": 20.0, "mem_peak_mib": 300.0, "samples": 2}})
        self.assertIn("GPU 0 15%", runpilot.low_gpu_hint(summary))
        self.assertIsNone(runpilot.low_gpu_hint({"0": {"util_mean": 20.0}}))

    def test_a_gpu_run_records_show_and_plot_its_gpus(self):
        code, _, err = self.cli("run", self.gpu_job(samples=3), "--gpu-stats-every", "1", env=self.env)
        self.assertEqual(code, 0, err)
        run = self.only_run()
        samples = self.metrics(run)
        gpu = runpilot.read_metrics(run / "gpu.json")
        self.assertGreaterEqual(len(gpu), 2)
        steps = [s["step"] for s in gpu]  # the second of the run: one a second, later ones when a call was slow
        self.assertEqual(steps[0], 0)
        self.assertTrue(all(b > a for a, b in zip(steps, steps[1:])), steps)
        self.assertEqual(gpu[0], {"step": 0, "gpu0.util": 12, "gpu0.mem_mib": 2048})  # only the run's GPU 0
        calls = self.calls.read_text().splitlines()
        self.assertEqual(calls[:2], ["--query-gpu=index,uuid,name,driver_version,memory.total "
                                     "--format=csv,noheader,nounits", ""])  # the start's check, the banner
        # one call per sample, for all of the run's GPUs (and one more, if the run ended during it)
        self.assertIn(len(calls[2:]), (len(gpu), len(gpu) + 1))
        self.assertEqual(set(calls[2:]), {"--query-gpu=index,uuid,utilization.gpu,memory.used "
                                          "--format=csv,noheader,nounits"})
        self.assertGreaterEqual(len(samples), 10)
        usage = self.meta(run)["usage"]
        self.assertEqual(usage["gpus"], {"0": {"util_mean": 12.0, "util_peak": 12.0, "mem_peak_mib": 2048.0,
                                               "samples": len(gpu)}})
        self.assertGreater(usage["peak_memory"], 60 << 20)   # the job's 60 MiB block, at least
        self.assertEqual(usage["memory_of"], "process group")
        self.assertIn("hint: the GPU was busy less than 20% of the time on average (GPU 0 12%)", err)
        code, out, _ = self.cli("show", run.name)
        self.assertIn(f"gpu 0      util mean 12%, peak 12%; memory peak 2048 MiB ({len(gpu)} samples)\n", out)
        self.assertRegex(out, r"\nmemory     peak \d+\.\d MiB \(process group\)\n")
        code, out, err = self.cli("plot", run.name, "--metric", "gpu0.util", "--width", "60", "--height", "6")
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith("gpu0.util\n"), out)
        self.assertIn("last 12  best 12", out)
        code, out, err = self.cli("plot", run.name, "--metric", "gpu0.util", "--x", "time", "--width", "60")
        self.assertEqual(code, 0, err)
        self.assertIn("minutes", out)

    def test_busy_gpus_give_no_hint_and_no_gpu_stats_turns_it_off(self):
        env = {**self.env, "FAKE_NVIDIA_SMI_UTIL": "85"}
        code, _, err = self.cli("run", self.gpu_job(1.0, gpus="all", samples=1), "--gpu-stats-every", "1", env=env)
        self.assertEqual(code, 0, err)
        self.assertNotIn("hint", err)
        run = self.only_run()
        self.assertEqual(sorted(self.meta(run)["usage"]["gpus"]), ["0", "1"])
        shutil.rmtree(run)
        self.calls.unlink()
        code, _, err = self.cli("run", self.gpu_job(1.0), "--no-gpu-stats", env=env)
        self.assertEqual(code, 0, err)
        run = self.runs()[-1]
        self.assertFalse((run / "gpu.json").exists())
        self.assertNotIn("gpus", self.meta(run)["usage"])
        self.assertNotIn("utilization", self.calls.read_text())

    def test_a_hung_nvidia_smi_holds_neither_output_nor_the_end(self):
        (self.bin / "nvidia-smi").write_text(
            f"#!{shutil.which('python3')}\nimport runpy, sys, time\n"
            "if 'utilization' in ' '.join(sys.argv): time.sleep(30)\n"
            f"runpy.run_path({str(FIXTURES / 'nvidia-smi')!r}, run_name='__main__')\n")
        (self.bin / "nvidia-smi").chmod(0o755)
        script = ("import sys\nfor i in range(200000):\n    sys.stdout.write(f'line {i} ' + 'x' * 100 + '\\n')\n"
                  "print('METRIC step=1 loss=0.5')\n")
        config = self.local_config(script, "loud", "resources:\n  gpus: 1\n")
        started = time.monotonic()
        code, _, err = self.cli("run", config, "--gpu-stats-every", "1", env=self.env)
        took = time.monotonic() - started
        self.assertEqual(code, 0, err)
        self.assertLess(took, 15, "the run waited for nvidia-smi")
        run = self.only_run()
        self.assertEqual((run / "logs.txt").read_bytes().count(b"\n"), 200001)
        self.assertEqual(self.meta(run)["usage"]["gpus"], {})

    def test_gpu_stats_every_is_checked(self):
        self.assertCleanError(self.cli("run", self.gpu_job(), "--gpu-stats-every", "0.5"), 2,
                              "is not a number of seconds from 1 to 86400")


class TensorBoardSwitch(RunsHome):
    def test_config_switch(self):
        config = self.local_config("print('METRIC step=3 loss=0.5 phase=train')\n", "tb", "tensorboard: true\n")
        code, _, err = self.cli("run", config)
        self.assertEqual(code, 0, err)
        run = self.only_run()
        files = list(run.glob("events.out.tfevents.*.runpilot"))
        self.assertEqual(len(files), 1)
        records = split_records(files[0].read_bytes())
        self.assertEqual(records[1][9:], runpilot.tb_event(0, 3, runpilot.tb_scalars({"loss": 0.5}))[9:])
        self.assertIn("tensorboard: true", (run / "config.yaml").read_text())

    def test_config_switch_must_be_a_boolean(self):
        config = self.local_config("print(1)\n", "tb", "tensorboard: 3\n")
        code, _, err = self.cli("validate", config)
        self.assertEqual(code, 2)
        self.assertIn("tensorboard must be true or false; got 3", err)


class ContainerPeakMemory(RunsHome):
    """The container's peak memory, found through the engine (its cgroup), on Docker and on Podman
    (skipped without the engine or the test image; required where RUNPILOT_TEST_ENGINES names it)."""

    def test_peak_memory_of_the_container(self):
        from tests.support import PYTHON_IMAGE, require_engine
        self.write("mem.py", "import time\nblock = bytearray(80 << 20)\nfor i in range(0, len(block), 4096):\n"
                             "    block[i] = 1\ntime.sleep(2.5)\nprint('METRIC step=1 loss=0.5')\n")
        for engine in ("docker", "podman"):
            with self.subTest(engine=engine):
                require_engine(self, engine)
                config = self.write(f"{engine}.yaml", f"name: mem\nengine: {engine}\nimage: {PYTHON_IMAGE}\n"
                                                      "entrypoint: python mem.py\nmounts:\n  code: .\n")
                code, _, err = self.cli("run", config)
                self.assertEqual(code, 0, err)
                usage = self.meta(self.runs()[-1])["usage"]
                self.assertEqual(usage["memory_of"], "container")
                self.assertGreater(usage["peak_memory"], 80 << 20)
                self.assertLess(usage["peak_memory"], 400 << 20)
