"""LORAFLEET_GATEWAY_WORKERS: `python -m lorafleet_gateway` as a supervisor of worker processes, run for real on a
loopback port in front of a fake inference replica (a real grpc.aio server in this process).

Checked: connections spread over the workers and /metrics adds up all of them; a killed worker is replaced
while the others keep serving; SIGTERM drains a stream in flight and the supervisor exits 0 with no worker
left; workers that cannot start make the supervisor give up; one worker keeps the single-process gateway.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr, ValidationError

from lorafleet_common.store import LocalStore
from lorafleet_gateway.app import create_app, merge_policy
from lorafleet_gateway.db.database import current_revision, open_engine
from lorafleet_gateway.deps import GatewayDeps
from lorafleet_gateway.settings import GatewaySettings
from lorafleet_gateway.workers import (
    CANNOT_START_EXIT,
    MAX_QUICK_DEATHS,
    QUICK_DEATH_S,
    Supervisor,
    WorkerRole,
    _Worker,
)
from tests.gateway.gateway_fakes import FakeInference, serve_inference
from tests.gateway.gateway_harness import (
    ADAPTER,
    ADAPTER_VERSION,
    ADMIN_KEY,
    BASE_MODEL,
    LoopThread,
    publish_test_adapter,
    wait_for,
)
from tests.service_processes import ServiceProcess, http_probe, start_service, wait_gone

CHAT = "/v1/chat/completions"
REPLY = "Hello from base choice0. Bye!"  # the fake's reply to the base model (gateway_fakes.reply_tokens)
ADAPTER_REPLY = f"Hello from {ADAPTER} choice0. Bye!"


@dataclass
class Replica:
    fake: FakeInference
    target: str


@pytest.fixture
def replica() -> Iterator[Replica]:
    """A fake inference replica on a loopback port, served from a loop thread of this process."""
    loop = LoopThread()
    fake = FakeInference("a")
    server = loop.run(serve_inference(fake))
    try:
        yield Replica(fake, f"127.0.0.1:{fake.port}")
    finally:
        loop.run(server.stop(None))
        loop.stop()


@dataclass
class GatewayProcess:
    proc: ServiceProcess
    url: str
    port: int
    tmp: Path

    def workers(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children()

    def worker_pids(self) -> set[int]:
        return {w.pid for w in self.workers()}

    def listening_workers(self) -> set[int]:
        """Workers with a socket listening on the gateway's port (each binds its own: SO_REUSEPORT)."""
        listening = set()
        for worker in self.workers():
            try:
                sockets = worker.net_connections(kind="tcp")
            except psutil.Error:
                continue
            if any(s.status == psutil.CONN_LISTEN and s.laddr.port == self.port for s in sockets):
                listening.add(worker.pid)
        return listening

    def wait_workers_listening(self, count: int, timeout: float = 30.0) -> set[int]:
        assert wait_for(lambda: len(self.listening_workers()) == count, timeout), self.proc.log_tail()
        return self.listening_workers()

    def metrics_dir(self) -> Path:
        # The supervisor's tempfile.mkdtemp, under the TMPDIR this test gave it.
        (found,) = self.tmp.glob("lorafleet-gateway-metrics-*")
        return found

    def admin_get(self, path: str) -> httpx.Response:
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=15) as http:
            response = http.get(path)
        assert response.status_code == 200, response.text
        return response

    def chat_count(self) -> float:
        """lorafleet_gateway_requests_total of successful chats, as /metrics shows it."""
        total = 0.0
        for family in text_string_to_metric_families(self.admin_get("/metrics").text):
            for sample in family.samples:
                wanted = {"route": CHAT, "status": "200"}
                if sample.name == "lorafleet_gateway_requests_total" and wanted.items() <= sample.labels.items():
                    total += sample.value
        return total


@pytest.fixture
def start_gateway(
    tmp_path: Path, unused_port: Callable[[], int], replica: Replica
) -> Iterator[Callable[..., GatewayProcess]]:
    """Start `python -m lorafleet_gateway` with these LORAFLEET_GATEWAY_* overrides; stopped after the test."""
    started: list[ServiceProcess] = []

    def start(**overrides: str) -> GatewayProcess:
        port = unused_port()
        env = {
            "TMPDIR": str(tmp_path),
            "LORAFLEET_HOME": str(tmp_path / "home"),
            "LORAFLEET_ADMIN_KEY": ADMIN_KEY,
            "LORAFLEET_BASE_MODEL": BASE_MODEL,
            "LORAFLEET_GATEWAY_HOST": "127.0.0.1",
            "LORAFLEET_GATEWAY_PORT": str(port),
            "LORAFLEET_GATEWAY_INFERENCE_TARGETS": replica.target,
            "LORAFLEET_GATEWAY_TRAINER_TARGET": f"127.0.0.1:{unused_port()}",
            "LORAFLEET_GATEWAY_CONNECT_TIMEOUT_S": "1",
            "LORAFLEET_GATEWAY_HEALTH_INTERVAL_S": "0.5",
            "LORAFLEET_GATEWAY_GRACEFUL_SHUTDOWN_S": "10",
            **{f"LORAFLEET_GATEWAY_{k.upper()}": v for k, v in overrides.items()},
        }
        proc = start_service("gateway", env, tmp_path / "logs")
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        proc.wait_ready(http_probe(f"{url}/health"), 60)
        return GatewayProcess(proc, url, port, tmp_path)

    yield start
    for proc in started:
        code, _ = proc.terminate(30)
        if code is None:
            proc.kill()


def stream_chat(url: str, model: str = BASE_MODEL) -> str:
    """One streamed chat on a connection of its own (a new client), so that the kernel picks its worker."""
    with openai.OpenAI(base_url=f"{url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=15) as client:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi there"}], stream=True
        )
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def chat_burst(url: str, count: int, model: str = BASE_MODEL) -> list[str]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda _: stream_chat(url, model), range(count)))


def chats_per_worker(metrics_dir: Path, which: str = "[0-9]*") -> dict[Any, float]:
    """Successful chats counted by each worker process, read from its own counter file (by pid), or ``"archive"``:
    those of dead workers."""
    counts: dict[Any, float] = {}
    for path in metrics_dir.glob(f"counter_{which}.db"):
        pid = path.stem.removeprefix("counter_")
        pid = int(pid) if pid.isdigit() else pid
        counts[pid] = 0.0
        for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(str(path)):
            _family, name, labels, _help = json.loads(key)
            if name == "lorafleet_gateway_requests_total" and labels["route"] == CHAT and labels["status"] == "200":
                counts[pid] += value
    return counts


def test_workers_share_the_connections_and_metrics_add_them_up(
    start_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    publish_test_adapter(LocalStore(tmp_path / "home" / "store"), tmp_path / "adapter", ADAPTER, ADAPTER_VERSION)
    gateway = start_gateway(workers="2")
    pids = gateway.wait_workers_listening(2)
    assert pids == gateway.worker_pids() and gateway.proc.pid not in pids

    replies = chat_burst(gateway.url, 30, ADAPTER)

    assert replies == [ADAPTER_REPLY] * 30
    per_worker = chats_per_worker(gateway.metrics_dir())
    served = {pid: n for pid, n in per_worker.items() if n}
    assert set(served) == pids, per_worker  # both workers took connections...
    assert sum(served.values()) == 30
    assert gateway.chat_count() == 30  # ...and /metrics, from whichever answers, counts them all
    # So does the adapter's traffic in the adapters API (7 tokens a reply).
    traffic = gateway.admin_get(f"/v1/lorafleet/adapters/{ADAPTER}").json()["traffic"]
    assert (traffic["requests"], traffic["errors"], traffic["completion_tokens"]) == (30, 0, 30 * 7)
    # Each worker froze its start-up heap for the garbage collector once it served (lorafleet_common.gc_heap).
    assert gateway.proc.log_path.read_text().count("start-up heap frozen for the garbage collector") == 2


def test_a_killed_worker_is_replaced_and_requests_keep_succeeding(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(workers="2")
    first = gateway.wait_workers_listening(2)
    assert chat_burst(gateway.url, 10) == [REPLY] * 10
    victim = min(first)
    metrics_dir = gateway.metrics_dir()
    assert list(metrics_dir.glob(f"gauge_live*_{victim}.db"))
    victim_chats = chats_per_worker(metrics_dir)[victim]
    assert victim_chats > 0

    os.kill(victim, signal.SIGKILL)

    assert wait_for(lambda: len(gateway.worker_pids() - first) == 1, 10), gateway.proc.log_tail()
    after = gateway.wait_workers_listening(2)
    assert victim not in after and len(after & first) == 1
    assert chat_burst(gateway.url, 20) == [REPLY] * 20
    # The dead worker's gauges (in flight, replica up) left the totals; its counters stayed in them, folded into
    # the archive files with its own files gone, so restarts pile up no files.
    assert not list(metrics_dir.glob(f"*_{victim}.db"))
    assert chats_per_worker(metrics_dir, "archive") == {"archive": victim_chats}
    assert gateway.chat_count() == 30
    assert "exited (killed by SIGKILL)" in gateway.proc.log_path.read_text()


def test_sigterm_drains_a_stream_in_flight_then_the_supervisor_exits_0(
    start_gateway: Callable[..., GatewayProcess], replica: Replica
) -> None:
    replica.fake.delay_s = 0.3  # 7 chunks: a stream of about 2 s
    gateway = start_gateway(workers="2")
    gateway.wait_workers_listening(2)
    workers = gateway.workers()

    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=15) as client:
        stream = client.chat.completions.create(
            model=BASE_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = iter(stream)
        text = next(chunks).choices[0].delta.content or ""
        started = time.monotonic()
        os.kill(gateway.proc.pid, signal.SIGTERM)
        text += "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        drained_s = time.monotonic() - started

    assert text == REPLY
    assert drained_s > 1.0  # the stream ran on after the SIGTERM: it was drained, not cut
    assert gateway.proc.popen.wait(30) == 0, gateway.proc.log_tail()
    assert wait_gone(workers, 5) == []
    assert not list(gateway.tmp.glob("lorafleet-gateway-metrics-*"))  # the supervisor removed its folder
    assert " ERROR " not in gateway.proc.log_path.read_text()


def test_workers_that_cannot_start_stop_the_supervisor(unused_port: Callable[[], int], tmp_path: Path) -> None:
    port = unused_port()
    # Something else holds the port (without SO_REUSEPORT): every worker fails to bind it.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        env = {
            "TMPDIR": str(tmp_path),
            "LORAFLEET_HOME": str(tmp_path / "home"),
            "LORAFLEET_ADMIN_KEY": ADMIN_KEY,
            "LORAFLEET_GATEWAY_HOST": "127.0.0.1",
            "LORAFLEET_GATEWAY_PORT": str(port),
            "LORAFLEET_GATEWAY_WORKERS": "2",
        }
        proc = start_service("gateway", env, tmp_path / "logs")
        try:
            code = proc.popen.wait(60)
        finally:
            proc.kill()
    log = proc.log_path.read_text()
    assert code == 1, log
    assert "cannot bind 127.0.0.1" in log and "died 5 times in a row" in log
    assert f"exited (exit code {CANNOT_START_EXIT})" in log


@pytest.mark.parametrize(("code", "gives_up"), [(CANNOT_START_EXIT, True), (1, False)])
def test_a_worker_that_could_not_start_died_at_start_however_long_it_took(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, gives_up: bool
) -> None:
    """On a loaded machine a worker's imports alone can outlast QUICK_DEATH_S: its exit code still tells."""
    settings = GatewaySettings(admin_key=SecretStr("k"), home=tmp_path, workers=2, port=8000)
    supervisor = Supervisor(settings, tmp_path)
    starts: list[int] = []

    class Exited:  # a worker process that exited ``code`` after QUICK_DEATH_S + 5 s
        pid = 2**22 + 1  # above any pid_max: no process of the machine

        def poll(self) -> int:
            return code

    def start(index: int) -> None:
        starts.append(index)
        supervisor._workers[index] = _Worker(index, Exited(), time.monotonic() - QUICK_DEATH_S - 5)  # type: ignore[arg-type]
        if len(starts) == 20:
            supervisor._stop_requested = True  # restarted many times: it would go on until stopped

    monkeypatch.setattr(supervisor, "_start", start)
    start(0)
    start(1)
    assert supervisor._keep_running() is gives_up
    assert len(starts) == (2 + MAX_QUICK_DEATHS - 1 if gives_up else 20)


def test_one_worker_is_the_single_process_gateway(start_gateway: Callable[..., GatewayProcess]) -> None:
    gateway = start_gateway()  # LORAFLEET_GATEWAY_WORKERS unset: 1
    assert stream_chat(gateway.url) == REPLY
    assert gateway.chat_count() == 1
    assert gateway.workers() == []  # it serves by itself
    assert gateway.proc.log_path.read_text().count("start-up heap frozen for the garbage collector") == 1
    assert "PROMETHEUS_MULTIPROC_DIR" not in psutil.Process(gateway.proc.pid).environ()
    assert not list(gateway.tmp.glob("lorafleet-gateway-metrics-*"))


def test_workers_need_a_fixed_port() -> None:
    with pytest.raises(ValidationError, match="workers > 1 needs a fixed port"):
        GatewaySettings(admin_key=SecretStr("k"), port=0, workers=2)
    assert GatewaySettings(admin_key=SecretStr("k"), port=0).workers == 1
    with pytest.raises(ValidationError):
        GatewaySettings(admin_key=SecretStr("k"), workers=0)


@pytest.mark.parametrize("index", [0, 1])
def test_workers_neither_migrate_nor_plan_merges_but_worker_0(tmp_path: Path, index: int) -> None:
    settings = GatewaySettings(
        admin_key=SecretStr("k"), home=tmp_path, workers=2, merge_enabled=True, merge_min_tokens_per_s=100, port=8000
    )
    worker = WorkerRole(index=index, count=2, metrics_dir=tmp_path, supervisor_pid=os.getppid())
    app = create_app(settings, GatewayDeps.from_settings(settings), worker=worker)

    async def run_lifespan() -> bool:
        async with app.router.lifespan_context(app):
            return app.state.services.hot_adapters is not None

    assert asyncio.run(run_lifespan()) == (index == 0)
    engine = open_engine(settings.resolved_database_url())
    assert current_revision(engine) is None  # the supervisor migrates, before any worker starts
    engine.dispose()
    # Worker 0 sees half the traffic: it needs half the rate.
    assert merge_policy(settings, worker).min_tokens_per_s == 50
    assert merge_policy(settings).min_tokens_per_s == 100


# A worker process of the gateway's metrics, as workers.py starts them: prometheus_client's multiprocess mode
# is chosen at import, from PROMETHEUS_MULTIPROC_DIR, so it needs a process of its own.
_METRICS_WORKER = """
import sys
from pathlib import Path
from prometheus_client import CollectorRegistry
from lorafleet_gateway.metrics import GatewayMetrics

metrics = GatewayMetrics(CollectorRegistry(), multiprocess_dir=Path(sys.argv[1]))
for target in ("10.0.0.1:7000", "10.0.0.2:7000"):
    metrics.add_replica(target).inc()
metrics.replica_ejections.labels(replica="10.0.0.2:7000").inc()
shown = []
if sys.argv[2] == "reader":
    shown.append(metrics.exposition().decode())
    metrics.forget_replica("10.0.0.2:7000")  # no longer in DNS
    shown.append(metrics.exposition().decode())
    metrics.add_replica("10.0.0.2:7000")  # back
    shown.append(metrics.exposition().decode())
print("\\f".join(shown))
"""


def test_a_replica_gone_from_dns_leaves_the_workers_metrics(tmp_path: Path) -> None:
    """Multiprocess mode cannot remove a series, so a worker's reads leave out the gauges of replicas it retired,
    the other workers' values of them included; its counters (history) stay."""
    env = os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}

    def worker(role: str) -> list[dict[tuple[str, str], float]]:
        out = subprocess.run(
            [sys.executable, "-c", _METRICS_WORKER, str(tmp_path), role],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        return [replica_samples(text) for text in out.split("\f")] if out.strip() else []

    def replica_samples(text: str) -> dict[tuple[str, str], float]:
        return {
            (s.name, s.labels["replica"]): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if "replica" in s.labels and not s.name.endswith("_created")
        }

    worker("other")  # another worker, its files left in the folder with both replicas up and one stream each
    before, retired, back = worker("reader")
    gone = "10.0.0.2:7000"
    assert before[("lorafleet_gateway_replica_up", gone)] == 1  # livemin of both workers
    assert before[("lorafleet_gateway_replica_in_flight", gone)] == 2  # livesum of both workers
    assert ("lorafleet_gateway_replica_up", gone) not in retired
    assert ("lorafleet_gateway_replica_in_flight", gone) not in retired
    assert retired[("lorafleet_gateway_replica_ejections_total", gone)] == 2  # history stays
    assert retired[("lorafleet_gateway_replica_in_flight", "10.0.0.1:7000")] == 2  # the other replica untouched
    assert back == before
