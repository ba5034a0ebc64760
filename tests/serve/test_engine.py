"""The model in a process of its own (`nova serve --engine process`, the default): the same vectors as
`encode()`, run-time adapters and item errors across the pipe, prefix-cache metrics, and a model process that
dies takes the server down loudly, never outliving it. (The in-thread engine is what the other server tests
run: they hand `create_app` a model object.)"""

from __future__ import annotations

import asyncio
import base64
import io
import multiprocessing
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import (
    assert_close,
    assert_error,
    b64_png,
    check_concurrent_clients,
    child_pids,
    decode_embedding,
    free_port,
    reference,
)

from nova.loading import load_model
from serve.app import create_app
from serve.config import Settings
from serve.dispatcher import _row_error
from serve.engine import ModelRunner
from serve.engine.child import STOP, RequestTurns, _portable
from serve.rows import BatchResult, EmbeddingRow, ForwardShape, PackedRows

ADMIN = {"Authorization": "Bearer admin-test-key"}


def engine_pid(pid: int) -> int:
    """The child running `serve.engine.child.engine_main` (multiprocessing also starts a resource tracker)."""
    for kid in child_pids(pid):
        with open(f"/proc/{kid}/cmdline", "rb") as fh:
            if b"spawn_main" in fh.read():
                return kid
    raise AssertionError(f"no engine process under {pid}: {child_pids(pid)}")


def gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":  # exited, not yet reaped
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("engine-lora-root")
    shutil.copytree(tiny_dir / "adapters" / "code", root / "mine")
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{}")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    return root


@pytest.fixture(scope="module")
def engine_server(serve_process, tiny_dir, lora_root):
    server = serve_process(tiny_dir, lora_root, extra=["--engine", "process"])
    yield server
    server.stop()


def post(server, payload: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/embeddings", json=payload, timeout=60)


def test_the_model_runs_in_its_own_process_with_the_same_vectors(engine_server, tiny_model):
    pid = engine_pid(engine_server.proc.pid)
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        assert b"multiprocessing" in fh.read()
    image = b64_png(seed=3)
    items = [{"text": "A cat sat on the mat.", "task": "retrieval.passage"},
             {"image": image, "task": "retrieval"},
             {"text": "def add(a, b): return a + b", "task": "code.query", "instructions": "Find the function"}]
    response = post(engine_server, {"input": items, "encoding_format": "base64"})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert_close(decode_embedding(data[0]), reference(tiny_model, items[0]))
    assert_close(decode_embedding(data[1]), reference(tiny_model, items[1]))
    want = reference(tiny_model, {k: v for k, v in items[2].items() if k != "instructions"},
                     instructions="Find the function")
    assert_close(decode_embedding(data[2]), want)
    dims = tiny_model.config.matryoshka_dims[0]
    short = post(engine_server, {"input": [items[0]], "dimensions": dims, "encoding_format": "base64"})
    assert_close(decode_embedding(short.json()["data"][0]), reference(tiny_model, items[0], dimensions=dims))
    multi = post(engine_server, {"input": [items[0]], "return_multivector": True, "encoding_format": "base64"})
    assert_close(decode_embedding(multi.json()["data"][0]), reference(tiny_model, items[0], multivector=True))


def test_concurrent_requests_through_the_model_process_each_get_their_own_vectors(engine_server, tiny_model):
    """Requests arriving together: batches queue behind the running forward, whose replies then leave from the
    model process's reply thread while the next forward runs; every client still gets its own vectors."""
    check_concurrent_clients(engine_server.url, tiny_model)


def test_prefix_cache_metrics_come_back_from_the_model_process(engine_server):
    def hits() -> float:
        text = httpx.get(engine_server.url + "/metrics", timeout=10).text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("nova_prefix_cache_hits_total"))

    before = hits()
    for text in ("first query", "second query"):  # the same instruction twice: the second reuses its prefix
        response = post(engine_server, {"input": [{"text": text, "instructions": "Find passages about cats"}]})
        assert response.status_code == 200, response.text
    assert hits() > before


def test_adapters_load_route_and_unload_through_the_model_process(engine_server, tiny_model):
    item = {"text": "def add(a, b): return a + b", "task": "code.passage"}
    assert_error(post(engine_server, {"input": [{**item, "adapter": "mine"}]}), 404, "adapter_not_found",
                 "input[0].adapter")
    assert engine_server.load_lora("mine", Path("mine")).status_code == 200
    response = post(engine_server, {"input": [{**item, "adapter": "mine"}], "encoding_format": "base64"})
    assert response.status_code == 200, response.text
    assert_close(decode_embedding(response.json()["data"][0]), reference(tiny_model, {**item, "adapter": "code"}))
    listed = httpx.get(engine_server.url + "/v1/internal/lora", headers=ADMIN, timeout=30).json()["data"]
    assert "mine" in [a["lora_name"] for a in listed]
    # a folder the model refuses: an error from the model process, nothing changes
    assert_error(engine_server.load_lora("bad", Path("broken")), 400, "invalid_adapter")
    unload = httpx.post(engine_server.url + "/v1/internal/lora/unload", json={"lora_name": "mine"}, headers=ADMIN,
                        timeout=60)
    assert unload.status_code == 200, unload.text
    assert_error(post(engine_server, {"input": [{**item, "adapter": "mine"}]}), 404, "adapter_not_found")
    listed = httpx.get(engine_server.url + "/v1/internal/lora", headers=ADMIN, timeout=30).json()["data"]
    assert [a["lora_name"] for a in listed if a["lora_name"] in ("mine", "bad")] == []


def test_item_errors_refused_before_the_model_name_the_item(engine_server, tiny_model):
    hidden = tiny_model.config.text_config.hidden_size
    err = assert_error(post(engine_server, {"input": ["fine", {"image_embeds": [[1e300] * hidden],
                                                               "image_grid_thw": [1, 2, 2]}]}), 400)
    assert err["message"].startswith("item 1:"), err
    assert_error(post(engine_server, {"input": [{"text": "x", "task": "nope"}]}), 400, None, "input[0].task")
    assert post(engine_server, {"input": ["still answering"]}).status_code == 200


def test_a_dead_model_process_stops_the_server_loudly(serve_process, tiny_dir, tmp_path):
    server = serve_process(tiny_dir, tmp_path)
    try:
        os.kill(engine_pid(server.proc.pid), signal.SIGKILL)
        assert server.proc.wait(timeout=60) == 1  # exits (a supervisor restarts it), not a zombie server
        server.log.flush()
        assert "the model process exited" in Path(server.log.name).read_text()
    finally:
        server.stop()


def test_a_killed_server_leaves_no_model_process(serve_process, tiny_dir, tmp_path):
    """SIGKILL gives the server no chance to stop its model process: the closed pipe ends a serving one, and a
    watchdog ends one still loading (a large model can take minutes to load)."""
    loading = subprocess.Popen([sys.executable, "-m", "nova.cli", "serve", str(tiny_dir), "--trust-remote-code",
                                "--port", str(free_port())], env=dict(os.environ, HF_HUB_OFFLINE="1"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                engine = engine_pid(loading.pid)
                break
            except AssertionError:
                assert time.monotonic() < deadline, "no model process started"
                time.sleep(0.05)
        loading.kill()
        loading.wait()
        assert gone(engine, 15), "a model process still loading outlived its server"
        server = serve_process(tiny_dir, tmp_path)
        engine = engine_pid(server.proc.pid)
        server.proc.kill()
        server.proc.wait()
        assert gone(engine, 15), "a serving model process outlived its server"
    finally:
        loading.kill()
        if server is not None:
            server.stop()


def test_a_model_object_cannot_be_sent_to_another_process(tiny_dir):
    model = load_model(tiny_dir)
    with pytest.raises(ValueError, match="engine process"):
        create_app(Settings(engine="process"), model=model)
    assert create_app(Settings(engine="auto"), model=model).state.nova.settings.engine_kind(model_given=True) \
        == "thread"


def test_rows_and_item_errors_cross_processes_whole(tiny_model):
    image = Image.open(io.BytesIO(base64.b64decode(b64_png()))).convert("RGB")
    row = tiny_model.processor.prepare_item({"text": "hello", "image": image}, index=0)
    copy = pickle.loads(pickle.dumps(row))
    assert copy.input_ids == row.input_ids and bool((copy.pixel_values == row.pixel_values).all())
    processor = pickle.loads(pickle.dumps(tiny_model.processor))
    for item in ("plain <|im_end|> text", {"text": "q", "instructions": "Find <|im_start|>x", "task": "code.query"}):
        assert processor.prepare_item(item, index=0).input_ids == tiny_model.processor.prepare_item(item, index=0).input_ids
    with pytest.raises(ValueError) as caught:
        tiny_model.processor.resolve("nope", index=4)
    error = pickle.loads(pickle.dumps(caught.value))
    assert (type(error), str(error), error.index, error.code, error.field) == \
        (type(caught.value), str(caught.value), 4, "invalid_input", "task")


def test_a_batch_result_crosses_the_pipe_as_one_array_when_its_vectors_share_a_shape():
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(8).astype(np.float32) for _ in range(5)]
    shape = ForwardShape(9, 12, 2)
    copy = pickle.loads(pickle.dumps(BatchResult(vectors, 0.25, 0.5, shape), protocol=pickle.HIGHEST_PROTOCOL))
    assert (copy.collate_seconds, copy.forward_seconds, copy.forward) == (0.25, 0.5, shape)
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(copy.outcomes, vectors, strict=True))
    assert copy.outcomes[0].base is not None and copy.outcomes[0].base is copy.outcomes[4].base  # one array
    # a row's error, or vectors of different shapes (multi-vector rows): each outcome as it is
    mixed = [vectors[0], ValueError("item 1: bad"), rng.standard_normal((3, 4)).astype(np.float32)]
    copy = pickle.loads(pickle.dumps(BatchResult(mixed, 0.0, 0.0)))
    assert np.array_equal(copy.outcomes[0], mixed[0]) and np.array_equal(copy.outcomes[2], mixed[2])
    assert isinstance(copy.outcomes[1], ValueError) and str(copy.outcomes[1]) == "item 1: bad"


def test_a_batch_of_rows_crosses_the_pipe_as_columns_and_embeds_as_itself(tiny_model):
    """What the server sends the model process: the rows' token fields as one array each (every row's a view of
    it), the row fields as they were; the rows it unpacks give the vectors the rows themselves give."""
    processor = tiny_model.processor
    image = Image.open(io.BytesIO(base64.b64decode(b64_png()))).convert("RGB")
    dims = tiny_model.config.matryoshka_dims[0]
    rows = [EmbeddingRow.of(processor.prepare_item("plain text", index=0), multivector=False, dimensions=dims),
            EmbeddingRow.of(processor.prepare_item({"text": "q", "task": "code.query"}, index=1,
                                                   instructions="Find code"), multivector=True, dimensions=None),
            EmbeddingRow.of(processor.prepare_item({"image": image, "text": "a cat"}, index=2),
                            multivector=False, dimensions=None)]
    packed = PackedRows.of(rows, processor)
    assert isinstance(packed.items.tokens["input_ids"], np.ndarray)
    back = pickle.loads(pickle.dumps(packed, protocol=pickle.HIGHEST_PROTOCOL)).unpack()
    assert [(r.multivector, r.dimensions, r.tokens) for r in back] == \
        [(r.multivector, r.dimensions, r.tokens) for r in rows]
    assert back[0].prepared.input_ids.base is back[2].prepared.input_ids.base is not None  # one array
    runner = ModelRunner(tiny_model)
    want, _ = runner.run(rows, runner.collate(rows))
    got, _ = runner.run(back, runner.collate(back))
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and np.array_equal(a, b)
    assert want[0].shape == (dims,) and want[1].ndim == 2


def test_a_model_process_embeds_a_packed_batch_and_says_when_it_was_ready(tiny_dir, tiny_model):
    """Through a real model process: the rows (as columns) come back as the model's own vectors, and the reply
    says when the batch was collated, on the one monotonic clock every process of the machine reads, between
    the hand-off and the reply (the batcher's lead is timed by it)."""
    from serve.engine.process import ProcessEngine

    items = [{"text": "a short one"}, {"text": "a longer text with several more words", "task": "code.query"}]
    rows = [EmbeddingRow.of(tiny_model.processor.prepare_item(item, index=i), multivector=False, dimensions=None)
            for i, item in enumerate(items)]

    async def embed_once():
        engine = ProcessEngine(Settings(model=str(tiny_dir), trust_remote_code=True))
        await engine.start()
        try:
            handed = time.monotonic()
            result = await engine.embed(rows)
            return handed, result, time.monotonic()
        finally:
            await engine.stop()

    handed, result, replied = asyncio.run(embed_once())
    assert handed < result.ready_at < replied
    want = tiny_model.encode(items)
    for got, expected in zip(result.outcomes, want, strict=True):
        assert_close(got, expected.numpy())


def test_an_item_error_raised_by_the_model_reaches_its_client_as_that_items_error(tiny_model):
    """No valid request makes the forward raise an item error (preparation refuses bad items first), so this
    path is checked at its joints: the runner isolates the failing row, its error crosses the pipe's pickling
    whole, and the dispatcher names the row's place in its own request."""
    with pytest.raises(ValueError) as caught:
        tiny_model.processor.resolve("nope", index=0)
    item_error = type(caught.value)

    class FailsOnRowOne:
        def __getattr__(self, name):
            return getattr(tiny_model, name)

        def launch_prepared(self, rows, return_multivector=False, collated=None):
            if any(row.index == 1 for row in rows):
                raise item_error(1, "the forward refused this row", field="image_embeds")
            return tiny_model.launch_prepared(rows, return_multivector, collated=collated)

        def embed_prepared(self, rows, return_multivector=False, collated=None):
            return self.launch_prepared(rows, return_multivector, collated).result()

    runner = ModelRunner(FailsOnRowOne())
    rows = [EmbeddingRow.of(tiny_model.processor.prepare_item(text, index=i), multivector=False, dimensions=None)
            for i, text in enumerate(["a", "b"])]
    outcomes, _ = runner.run(rows, runner.collate(rows))  # (outcomes, times)
    outcomes = pickle.loads(pickle.dumps([_portable(o) for o in outcomes]))
    assert_close(outcomes[0], reference(tiny_model, "a"))
    error = _row_error(SimpleNamespace(position=3), outcomes[1])
    assert (error.status, error.param, error.code) == (400, "input[3].image_embeds", "invalid_input")
    assert "the forward refused this row" in str(error)


class DeviceLike:
    """The tiny model as a GPU would run it: a launch returns at once, and the vectors can be read only after
    the test opens that forward's gate (its device work ending). `events` is what happened, in order."""

    def __init__(self, model):
        self.model, self.events, self.gates = model, [], []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def launch_prepared(self, rows, return_multivector=False, collated=None):
        number = len(self.gates)
        gate = threading.Event()
        self.gates.append(gate)
        self.events.append(("launch", number))
        return GatedOutcomes(self.model.launch_prepared(rows, return_multivector, collated), gate, self.events,
                             number)


class GatedOutcomes:
    def __init__(self, pending, gate, events, number, fails=None):
        self.pending, self.gate, self.events, self.number, self.fails = pending, gate, events, number, fails

    @property
    def ready(self):
        return self.gate.is_set()

    def result(self):
        assert self.gate.wait(30), "the test never opened this forward's gate"
        self.events.append(("read", self.number))
        if self.fails is not None:
            raise self.fails
        return self.pending.result()

    def device_seconds(self):
        return 0.25


def _rows(model, texts):
    return [EmbeddingRow.of(model.processor.prepare_item(t, index=i), multivector=False, dimensions=None)
            for i, t in enumerate(texts)]


def test_the_next_forward_launches_while_the_device_still_runs_the_last(tiny_model):
    from serve.engine.child import Forward, Part, run_forwards

    model = DeviceLike(tiny_model)
    runner = ModelRunner(model)
    texts = [["a cat", "a dog"], ["the mat"]]
    forwards = [Forward([Part(0, n, len(t))], _rows(tiny_model, t), runner.collate(_rows(tiny_model, t)), 0.0)
                for n, t in enumerate(texts)]

    class Turns:  # the batches, then STOP; nothing else received meanwhile
        received = ()

        def next_batch(self):
            return forwards.pop(0) if forwards else STOP

    class Link:
        def __init__(self):
            self.sent = []

        def send(self, message):
            self.sent.append(message)

    link = Link()
    loop = threading.Thread(target=run_forwards, args=(Turns(), runner, [link]))
    loop.start()
    deadline = time.monotonic() + 30
    while len(model.events) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    launched_before_reading = list(model.events)
    for gate in model.gates:
        gate.set()
    while len(model.gates) < 2 and time.monotonic() < deadline:  # a serial loop launches the second only now
        time.sleep(0.01)
    for gate in model.gates:
        gate.set()
    loop.join(30)
    assert launched_before_reading == [("launch", 0), ("launch", 1)]
    assert not loop.is_alive()
    replies = {request_id: result for request_id, ok, result, _ in link.sent}
    assert sorted(replies) == [0, 1]
    for n, t in enumerate(texts):
        for got, text in zip(replies[n].outcomes, t, strict=True):
            assert_close(got, reference(tiny_model, text))
        assert replies[n].forward_seconds == 0.25  # the device's time for the forward, not the launch's
    assert replies[0].launch_seconds > 0  # returned before its forward ended (the second launch came first)


def test_the_thread_engine_launches_the_next_forward_while_the_device_still_runs_the_last(tiny_model):
    """The engine of a model handed to the server (Ray Serve replicas, --engine thread) launches ahead too."""
    import asyncio

    from serve.engine import ThreadEngine

    model = DeviceLike(tiny_model)
    engine = ThreadEngine(model)
    texts = [["a cat", "a dog"], ["the mat"]]

    async def two_batches():
        batches = [asyncio.create_task(engine.embed(_rows(tiny_model, t))) for t in texts]
        deadline = time.monotonic() + 30
        while len(model.events) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        launched = list(model.events)
        for gate in model.gates:
            gate.set()
        while len(model.gates) < 2 and time.monotonic() < deadline:  # a serial engine launches the second now
            await asyncio.sleep(0.01)
        for gate in model.gates:
            gate.set()
        results = await asyncio.gather(*batches)
        await engine.stop()
        return launched, results

    launched_before_reading, results = asyncio.run(two_batches())
    assert launched_before_reading == [("launch", 0), ("launch", 1)]
    for result, batch in zip(results, texts, strict=True):
        for got, text in zip(result.outcomes, batch, strict=True):
            assert_close(got, reference(tiny_model, text))
        assert result.forward_seconds == 0.25  # the device's time for the forward
    # the first launch returned before its forward ended (its gate opened after the second launch began), so
    # the batcher leads by its time; the second's gate may open before its launch looks
    assert results[0].launch_seconds > 0


def test_a_cpu_forward_is_not_counted_as_a_launch_ahead(tiny_model):
    """On a CPU the launch is the forward: the batcher must not take the next batch a whole forward early."""
    runner = ModelRunner(tiny_model)
    rows = _rows(tiny_model, ["a cat", "a dog"])
    _, times = runner.run(rows, runner.collate(rows))
    assert times.seconds > 0 and times.launch_seconds == 0.0


def test_a_device_error_at_the_wait_is_every_row_of_that_forward(tiny_model):
    class Faulty(DeviceLike):
        def launch_prepared(self, rows, return_multivector=False, collated=None):
            gate = threading.Event()
            gate.set()
            return GatedOutcomes(None, gate, self.events, 0, fails=RuntimeError("CUDA error: an illegal memory access"))

    runner = ModelRunner(Faulty(tiny_model))
    rows = _rows(tiny_model, ["a", "b"])
    outcomes, _ = runner.finish(runner.launch(rows, runner.collate(rows)))
    assert [str(o) for o in outcomes] == ["CUDA error: an illegal memory access"] * 2


# ---------------------------------------------------------------- who reads the request pipe (pure threading)


class WatchedPipe:
    """The request pipe's reading end, noting when the model thread (the test's thread) starts a read: the
    signal that it holds the pipe, so a message sent then is one it reads itself."""

    def __init__(self, connection, model_thread: threading.Thread):
        self.connection = connection
        self.model_thread = model_thread
        self.model_thread_reads = threading.Event()

    def fileno(self) -> int:
        return self.connection.fileno()

    def poll(self, timeout: float = 0.0) -> bool:
        return self.connection.poll(timeout)

    def recv(self):
        if threading.current_thread() is self.model_thread:
            self.model_thread_reads.set()
        return self.connection.recv()


class Turns:
    """`RequestTurns` over a real pipe, with a `handle` that records which thread collated each request (and
    read the stop), and signals each one."""

    def __init__(self):
        reader, self.writer = multiprocessing.Pipe(duplex=False)
        self.pipe = WatchedPipe(reader, threading.current_thread())
        self.collated_on: dict[object, str] = {}
        self._handled: dict[object, threading.Event] = {}
        self._lock = threading.Lock()
        self.turns = RequestTurns([self.pipe], self.handle)
        threading.Thread(target=self.turns.receive_while_forwarding, name="receive", daemon=True).start()

    def handled(self, key) -> threading.Event:
        with self._lock:
            return self._handled.setdefault(key, threading.Event())

    def handle(self, message, pipe: int):
        if message[0] == "call":
            return None
        key = message[1]
        self.collated_on[key] = threading.current_thread().name
        self.handled(key).set()
        return key

    def send_when_the_model_thread_reads(self, *messages) -> None:
        """Send `messages` once the model thread is reading the pipe (after 10 s regardless, so that a
        regression fails the test's assertions rather than hanging it)."""
        self.pipe.model_thread_reads.clear()

        def send() -> None:
            self.pipe.model_thread_reads.wait(10)
            for message in messages:
                self.writer.send(message)

        threading.Thread(target=send, daemon=True).start()


def test_an_idle_model_thread_collates_a_lone_request_itself():
    """A request that arrives while no forward runs is read and collated by the thread that runs forwards (no
    hand-over between threads); one that arrives during a forward is collated by the receive thread."""
    t = Turns()
    me = threading.current_thread().name
    t.send_when_the_model_thread_reads(("embed", 1))  # arrives while this thread waits on the pipe
    assert t.turns.next_batch() == 1 and t.collated_on[1] == me
    t.writer.send(("embed", 2))  # while "forward 1" runs
    assert t.handled(2).wait(10)  # read and collated meanwhile
    assert t.turns.next_batch() == 2 and t.collated_on[2] == "receive"
    # "forward 2" ends with nothing waiting: this thread takes the pipe back and reads what comes next itself
    t.send_when_the_model_thread_reads(("call",), ("embed", 3))
    assert t.turns.next_batch() == 3 and t.collated_on[3] == me
    t.writer.send(("stop",))  # during "forward 3"
    assert t.turns.next_batch() is STOP


def test_every_request_is_run_once_and_in_order_whoever_reads_it():
    t = Turns()
    count = 300
    rng = random.Random(0)
    delays = [rng.random() * 0.002 for _ in range(count)]

    def sender():
        for i, delay in enumerate(delays):
            time.sleep(delay)
            t.writer.send(("embed", i))
        t.writer.send(("stop",))

    threading.Thread(target=sender, daemon=True).start()
    ran = []
    while (item := t.turns.next_batch()) is not STOP:
        ran.append(item)
        time.sleep(rng.random() * 0.002)  # the "forward"
    assert ran == list(range(count))
    assert set(t.collated_on.values()) == {threading.current_thread().name, "receive"}  # both paths taken


# ---------------------------------------------------------------- several HTTP workers, one model process


def test_batches_from_several_workers_waiting_together_run_as_one_forward():
    """Batches that arrive from different workers' pipes during a forward join the forward waiting to run (a
    batch from a pipe already in it waits for the next one); the model process stops only when every pipe has
    said stop."""
    pipes = [multiprocessing.Pipe(duplex=False) for _ in range(3)]
    readers, writers = [r for r, _ in pipes], [w for _, w in pipes]

    def handle(message, pipe):
        return [(pipe, message[1])]

    def join(waiting, batch):
        return None if any(pipe == batch[0][0] for pipe, _ in waiting) else waiting + batch

    turns = RequestTurns(readers, handle, join)
    threading.Thread(target=turns.receive_while_forwarding, daemon=True).start()
    writers[0].send(("embed", "a1"))
    assert turns.next_batch() == [(0, "a1")]  # "forward 1" runs; meanwhile:
    for count, (pipe, key) in enumerate(((1, "b1"), (2, "c1"), (1, "b2"), (0, "a2")), start=1):
        writers[pipe].send(("embed", key))
        deadline = time.monotonic() + 10  # each read before the next is sent: the order is the test's
        while sum(len(item) for item in list(turns.received)) < count and time.monotonic() < deadline:
            time.sleep(0.005)
    assert turns.next_batch() == [(1, "b1"), (2, "c1")]  # one forward; b2 could not join (pipe 1 is in it)
    assert turns.next_batch() == [(1, "b2"), (0, "a2")]
    writers[0].send(("stop",))
    writers[1].send(("stop",))
    writers[2].send(("embed", "c2"))
    assert turns.next_batch() == [(2, "c2")]  # two pipes closed, one still open: not stopped
    writers[2].close()  # the last worker gone (end of file)
    assert turns.next_batch() is STOP


def test_a_forward_merger_joins_only_within_the_batch_budget(tiny_model):
    from serve.engine.child import Forward, ForwardMerger, Part

    runner = ModelRunner(tiny_model)

    def forward(link, texts):
        rows = [EmbeddingRow.of(tiny_model.processor.prepare_item(t, index=i), multivector=False, dimensions=None)
                for i, t in enumerate(texts)]
        return Forward([Part(link, 0, len(rows))], rows, runner.collate(rows), 0.0)

    short, longer = ["a b"] * 3, ["a long sentence of a good many words " * 3]
    merger = ForwardMerger(runner, max_rows=4, max_padded_tokens=10_000)
    joined = merger.join(forward(0, short), forward(1, longer))
    assert [p.link for p in joined.parts] == [0, 1] and len(joined.rows) == 4
    assert joined.collated.batch.input_ids.shape[0] == 4  # collated again, as one batch
    assert merger.join(forward(0, short), forward(0, longer)) is None  # the same worker's: it split them
    assert merger.join(forward(0, short), forward(1, short)) is None  # 6 rows > 4
    tokens = forward(1, longer).rows[0].tokens
    assert ForwardMerger(runner, 8, 4 * tokens - 1).join(forward(0, short), forward(1, longer)) is None
    assert ForwardMerger(runner, 8, 4 * tokens).join(forward(0, short), forward(1, longer)) is not None
