"""Faults injected into a serving fleet of real processes on loopback (issue 7, faults).

Two inference replicas (vLLM on the CPU, the embedded model) behind one gateway, all reading
adapters from moto's S3 server. One module-wide fleet, the tests in this order:

1. corrupted and truncated adapter files in the bucket, among good ones;
2. the object store stopped and started again while adapters load;
3. the adapter disk cache of replica B (a 1 MiB tmpfs) full;
4. SIGKILL of the replica serving a stream, mid-stream (it stays dead: last).

Measured figures are printed (``-s``) for docs/reliability.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from lorafleet.inference.v1 import inference_pb2 as pb
from lorafleet.inference.v1 import inference_pb2_grpc as pb_grpc
from lorafleet_common.adapters import METADATA_FILE, sha256_file
from lorafleet_common.settings import EMBEDDED_BASE_MODEL
from tests.conftest import free_port
from tests.e2e.fault_fleet import (
    ADMIN_KEY,
    RestartableS3,
    chat,
    publish_folder,
    service_home,
    sigkill_main,
    start,
    start_gateway,
    write_adapter,
)
from tests.inference.inference_helpers import EvilPickle
from tests.service_processes import ServiceProcess, group_left, group_members, grpc_probe

pytestmark = [pytest.mark.e2e, pytest.mark.engine, pytest.mark.timeout(600)]

TMPFS_BYTES = 1024 * 1024
QUESTION = [pb.ChatMessage(role="user", content="Say hi.")]


@dataclass
class Replica:
    name: str
    proc: ServiceProcess
    port: int
    cache: Path

    def stub(self) -> tuple[grpc.Channel, pb_grpc.InferenceServiceStub]:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        return channel, pb_grpc.InferenceServiceStub(channel)

    def generate(self, adapter: str = "", max_tokens: int = 4) -> str:
        channel, stub = self.stub()
        with channel:
            request = pb.GenerateRequest(
                adapter=adapter,
                chat=pb.ChatInput(messages=QUESTION),
                sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0),
            )
            return "".join(chunk.text for chunk in stub.Generate(request, timeout=60))

    def load(self, adapter: str) -> pb.AdapterInfo:
        channel, stub = self.stub()
        with channel:
            return stub.LoadAdapter(pb.LoadAdapterRequest(adapter=adapter), timeout=60)

    def unload(self, adapter: str) -> None:
        channel, stub = self.stub()
        with channel:
            stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter=adapter), timeout=30)

    def running(self) -> int:
        channel, stub = self.stub()
        with channel:
            stats = stub.Stats(pb.StatsRequest(), timeout=5)
        return int(stats.running)


@dataclass
class Fleet:
    s3: RestartableS3
    replicas: list[Replica]
    gateway: ServiceProcess
    url: str
    root: Path
    model_path: Path
    tmpfs: Path | None

    def adapter(self, name: str, seed: int, version: str = "v1") -> Path:
        """Publish a good adapter as the admin tenant's model ``name``; returns its folder."""
        folder = write_adapter(self.root / "adapters" / f"{name}-{version}", self.model_path, seed=seed)
        publish_folder(self.s3.store, folder, f"default/{name}", version)
        return folder


def mount_tmpfs(path: Path, size: int) -> bool:
    """A real tiny filesystem (root only); False where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, embedded_model_path: Path) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("faults-serving")
    s3 = RestartableS3()
    tmpfs = root / "disk-b"
    mounted = os.geteuid() == 0 and mount_tmpfs(tmpfs, TMPFS_BYTES)
    procs: list[ServiceProcess] = []
    try:
        replicas = []
        for name in ("a", "b"):
            home = service_home(root / f"inference-{name}")
            cache = tmpfs / "cache" if name == "b" and mounted else home / "adapter-cache"
            port = free_port()
            env = {
                **s3.env(),
                "LORAFLEET_INFERENCE_GRPC_PORT": str(port),
                "LORAFLEET_INFERENCE_METRICS_PORT": "0",
                "LORAFLEET_INFERENCE_MAX_LORAS": "2",
                "LORAFLEET_INFERENCE_MAX_CPU_LORAS": "2",
                "LORAFLEET_INFERENCE_MAX_LORA_RANK": "8",
                "LORAFLEET_INFERENCE_MAX_MODEL_LEN": "512",
                "LORAFLEET_INFERENCE_GPU_MEMORY_UTILIZATION": "0.1",
                "LORAFLEET_INFERENCE_LOAD_TIMEOUT_S": "30",
                "LORAFLEET_INFERENCE_DRAIN_TIMEOUT_S": "2",
                "LORAFLEET_INFERENCE_ADAPTER_CACHE_DIR": str(cache),
            }
            proc = start("inference", home, env, name=f"inference-{name}")
            procs.append(proc)
            replicas.append(Replica(name, proc, port, cache))
        started = time.monotonic()
        for replica in replicas:
            replica.proc.wait_ready(grpc_probe(replica.port), 300)
        print(f"\n2 replicas SERVING after {time.monotonic() - started:.1f} s")
        gateway, url = start_gateway(
            service_home(root / "gateway"),
            s3,
            [r.port for r in replicas],
            free_port(),
            LORAFLEET_GATEWAY_FIRST_TOKEN_TIMEOUT_S="60",
            LORAFLEET_GATEWAY_STREAM_IDLE_TIMEOUT_S="30",
            LORAFLEET_GATEWAY_REQUEST_TIMEOUT_S="120",
        )
        procs.append(gateway)
        yield Fleet(s3, replicas, gateway, url, root, embedded_model_path, tmpfs if mounted else None)
    finally:
        for proc in reversed(procs):
            if proc.popen.poll() is None:
                proc.terminate(10)
            proc.kill()  # the whole group: vLLM's engine core too
            assert group_left(proc.pid) == [], f"{proc.service} left processes behind"
        if mounted:
            subprocess.run(["umount", "-l", str(tmpfs)], check=False)
        s3.stop()


def cache_files(replica: Replica) -> list[str]:
    return sorted(str(p.relative_to(replica.cache)) for p in replica.cache.rglob("*") if p.is_file())


def error_of(body: dict) -> dict:
    assert "error" in body, body
    return dict(body["error"])


# ----- 1. corrupted adapters in the bucket ---------------------------------------------------------


def test_corrupt_adapters_are_refused_and_serving_goes_on(fleet: Fleet) -> None:
    good = fleet.adapter("good", seed=1)
    weights = (good / "adapter_model.safetensors").read_bytes()
    bad = fleet.root / "adapters" / "bad"

    # Cut in half, and described as cut (its sha256 matches): only the format check can tell.
    truncated = bad / "truncated"
    shutil.copytree(good, truncated)
    (truncated / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    publish_folder(fleet.s3.store, truncated, "default/bad-truncated")
    # Bytes flipped in the tensor data after the metadata was written: a valid file, the wrong sha256.
    flipped = bad / "flipped"
    shutil.copytree(good, flipped)
    damaged = bytearray(weights)
    for offset in range(len(damaged) - 4096, len(damaged) - 4000):
        damaged[offset] ^= 0xFF
    (flipped / "adapter_model.safetensors").write_bytes(bytes(damaged))
    publish_folder(
        fleet.s3.store, flipped, "default/bad-flipped", sha256=sha256_file(good / "adapter_model.safetensors")
    )
    # A pickle named adapter_model.safetensors: unpickling it would write the marker.
    pickled = bad / "pickled"
    shutil.copytree(good, pickled)
    marker = fleet.root / "unpickled"
    import pickle

    (pickled / "adapter_model.safetensors").write_bytes(pickle.dumps(EvilPickle(marker)))
    publish_folder(fleet.s3.store, pickled, "default/bad-pickle")

    expected = {
        "bad-truncated": "not a valid safetensors file",
        "bad-flipped": "does not match metadata.sha256",
        "bad-pickle": "not a valid safetensors file",
    }
    for model, reason in expected.items():
        for attempt in ("first", "again"):  # the second answer comes from the replica's memory of the rejection
            status, body, seconds = chat(fleet.url, model)
            error = error_of(body)
            print(f"{model} ({attempt}): {status} {error['code']} in {seconds:.2f} s: {error['message'][:160]}")
            assert status == 400 and error["code"] == "adapter_rejected" and error["param"] == "model", body
            assert reason in error["message"], error
            assert seconds < 15
    assert not marker.exists(), "something unpickled the adapter"

    for model in ("good", EMBEDDED_BASE_MODEL):
        status, body, seconds = chat(fleet.url, model)
        assert status == 200, body
        print(f"{model}: 200 in {seconds:.2f} s")
    for replica in fleet.replicas:
        grpc_probe(replica.port)()  # SERVING: the engine is alive
        left = [f for f in cache_files(replica) if "bad-" in f or f.startswith(".tmp/")]
        assert left == [], f"replica {replica.name} kept {left}"
        # Every cached copy is a whole, validated version (its metadata.json written last).
        for weights_file in replica.cache.rglob("adapter_model.safetensors"):
            assert (weights_file.parent / METADATA_FILE).is_file()

    # The publisher fixes it with a new version: served at once (the rejection was of v1 only).
    fleet.adapter("bad-truncated", seed=2, version="v2")
    status, body, _ = chat(fleet.url, "bad-truncated")
    assert status == 200, body


# ----- 2. object store stopped and started during adapter loads ------------------------------------


def test_store_outage_during_adapter_loads(fleet: Fleet) -> None:
    for seed, name in enumerate(("warm", "on-disk", "cold"), start=10):
        fleet.adapter(name, seed=seed)
    for model in ("warm", "on-disk"):
        status, body, _ = chat(fleet.url, model)
        assert status == 200, body
    with httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as http:
        unloaded = http.post("/v1/admin/adapters/on-disk/unload")
    assert unloaded.status_code == 200, unloaded.text  # out of the engines; its disk copy stays

    fleet.s3.stop()
    stopped = time.monotonic()
    try:
        results = {}
        for model in (EMBEDDED_BASE_MODEL, "warm", "on-disk", "cold"):
            status, body, seconds = chat(fleet.url, model, timeout_s=60)
            results[model] = (status, body)
            detail = f": {error_of(body)['message'][:200]}" if status != 200 else ""
            print(f"store down, {model}: {status} in {seconds:.2f} s{detail}")
            assert seconds < 20, f"{model} took {seconds:.1f} s with the store down"
        assert results[EMBEDDED_BASE_MODEL][0] == 200
        assert results["warm"][0] == 200, results["warm"]  # loaded in an engine: no store needed
        assert results["on-disk"][0] == 200, results["on-disk"]  # the validated disk copy is enough
        status, body = results["cold"]
        assert status == 503 and error_of(body)["code"] == "service_unavailable", body
        assert "object store" in error_of(body)["message"]

        # What a replica itself answers for a version it never fetched, asked directly.
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            fleet.replicas[0].generate("default/cold@v1")
        took = time.monotonic() - started
        print(f"store down, replica a, cold@v1: {info.value.code().name} in {took:.2f} s: {info.value.details()}")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and took < 20
        assert all(not f.startswith("default/cold") for f in cache_files(fleet.replicas[0]))
    finally:
        fleet.s3.start()
    outage = time.monotonic() - stopped
    restarted = time.monotonic()
    while True:
        status, body, _ = chat(fleet.url, "cold")
        if status == 200 or time.monotonic() - restarted > 30:
            break
        time.sleep(0.5)
    print(f"store back after {outage:.1f} s; cold served {time.monotonic() - restarted:.2f} s later")
    assert status == 200, body


# ----- 3. the adapter disk cache of replica B is full ----------------------------------------------


def test_full_adapter_disk(fleet: Fleet) -> None:
    if fleet.tmpfs is None:
        pytest.skip("mounting a tmpfs needs root: the ENOSPC paths are covered by tests/inference/test_tiers.py")
    b = fleet.replicas[1]
    names = [f"disk-{i}" for i in range(1, 5)]
    for seed, name in enumerate(names, start=20):
        fleet.adapter(name, seed=seed)
    for name in names[:2]:
        b.load(f"default/{name}")
    b.unload("default/disk-1")  # registered no more: its disk copy is the one that may go
    entry = next(b.cache.glob("default/disk-2/v1"))
    size = sum(p.stat().st_size for p in entry.iterdir())
    ballast = fleet.tmpfs / "ballast"

    def fill(leave: int) -> None:
        """Grow the ballast file until ``leave`` bytes are free on the filesystem."""
        st = os.statvfs(fleet.tmpfs)
        free = st.f_bavail * st.f_frsize
        with ballast.open("ab") as fh:
            fh.write(b"\0" * max(0, free - leave))

    # Less free than one adapter, but enough once the unused disk-1 is gone.
    fill(size // 2)
    started = time.monotonic()
    info = b.load("default/disk-3")
    print(f"disk nearly full: disk-3 loaded in {time.monotonic() - started:.2f} s after evicting disk-1")
    assert info.loaded and not (b.cache / "default" / "disk-1").exists()

    # Now full, and both cached copies in use (registered in the engine): nothing may be evicted.
    fill(size // 4)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        b.load("default/disk-4")
    took = time.monotonic() - started
    print(f"disk full: disk-4 on B: {refused.value.code().name} in {took:.2f} s: {refused.value.details()}")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and took < 20
    assert "no space left" in refused.value.details()
    assert not (b.cache / "default" / "disk-4").exists() and list((b.cache / ".tmp").iterdir()) == []
    # B still serves the base model and the adapters it holds.
    assert b.generate() and b.generate("default/disk-2@v1") and b.generate("default/disk-3@v1")
    # Through the gateway, a request B cannot take goes to A.
    status, body, seconds = chat(fleet.url, "disk-4")
    print(f"disk full on B: disk-4 through the gateway: {status} in {seconds:.2f} s")
    assert status == 200, body

    ballast.unlink()  # space again: B takes it
    assert b.load("default/disk-4").loaded


# ----- 4. a replica SIGKILLed mid-stream -----------------------------------------------------------


def test_replica_killed_mid_stream(fleet: Fleet) -> None:
    client = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model=EMBEDDED_BASE_MODEL,
        messages=[{"role": "user", "content": "Tell me a long story about the sea."}],
        max_tokens=400,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    received = 0
    while received < 3:
        chunk = next(chunks)
        received += bool(chunk.choices and chunk.choices[0].delta.content)
    [victim] = [r for r in fleet.replicas if r.running() > 0]
    survivor = next(r for r in fleet.replicas if r is not victim)
    sigkill_main(victim.proc)
    killed = time.monotonic()
    leftovers_gone: list[float] = []  # when the last process of the dead replica's group exited

    def watch_leftovers() -> None:
        group_left(victim.proc.pid, timeout_s=20)
        leftovers_gone.append(time.monotonic() - killed)

    watcher = threading.Thread(target=watch_leftovers, daemon=True)
    watcher.start()

    with pytest.raises(openai.APIError) as ended:
        for _ in chunks:
            assert time.monotonic() - killed < 30, "the stream went on after its replica died"
    error_after = time.monotonic() - killed
    print(f"replica {victim.name} killed after {received} chunks: error event after {error_after:.2f} s: {ended.value}")
    assert error_after < 10
    body = ended.value.body
    assert isinstance(body, dict) and body.get("code") == "service_unavailable", body

    latencies = []
    for model in (EMBEDDED_BASE_MODEL, "good", "warm", EMBEDDED_BASE_MODEL, "good"):
        status, response, seconds = chat(fleet.url, model)
        assert status == 200, response
        latencies.append(seconds)
    print(
        f"after the kill: 5 requests, all 200 on replica {survivor.name}, {', '.join(f'{s:.2f}' for s in latencies)} s"
    )
    ready = httpx.get(f"{fleet.url}/ready", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).json()
    assert ready["replicas"] == {f"127.0.0.1:{victim.port}": False, f"127.0.0.1:{survivor.port}": True}, ready

    # vLLM's engine core and worker exit by themselves (replica_watch.py): nothing of the dead replica lingers.
    watcher.join(25)
    orphans = [" ".join(p.cmdline())[:80] for p in group_members(victim.proc.pid)]
    print(f"processes of the killed replica: all gone {leftovers_gone[0]:.1f} s after the kill; left: {orphans}")
    assert orphans == [] and leftovers_gone[0] < 30  # ~2.5 s on an idle machine; longer under load
