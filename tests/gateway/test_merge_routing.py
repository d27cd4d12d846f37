"""Routing with merged replicas: the pure choice (merged replica first, bounded; switching and merged-with-another
replicas never chosen), and a gateway in front of real fake replicas that switch mode behind its back (a
FAILED_PRECONDITION from a switched replica is retried elsewhere before the first token; a genuine one is not)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from lorafleet.inference.v1 import inference_pb2
from lorafleet_gateway.upstream.routing import Mode, ReplicaLoad, choose
from tests.gateway.gateway_fakes import FakeInference, serve_inference
from tests.gateway.gateway_harness import BASE_MODEL, Gateway, Stack, publish_test_adapter
from tests.gateway.test_routing import samples

pytestmark = pytest.mark.timeout(60)

HOT = "t/hot@v1"


def replica(
    i: int, load: int = 0, mode: Mode = "lora", merged: str = "", adapters: tuple[str, ...] = ()
) -> ReplicaLoad:
    return ReplicaLoad(f"r{i}:1", load, frozenset(adapters), mode, merged)


def target_of(pick: tuple[ReplicaLoad, str] | None) -> tuple[str, str] | None:
    return (pick[0].target, pick[1]) if pick is not None else None


# -- the pure choice -----------------------------------------------------------------------------------


def test_a_merged_replica_is_preferred_for_its_adapter() -> None:
    # r1 is busier than the LoRA replicas, and r0 even has the adapter loaded: the merged one still wins.
    fleet = [replica(0, 0, adapters=(HOT,)), replica(1, 5, "merged", HOT), replica(2, 1)]
    assert target_of(choose(fleet, HOT)) == ("r1:1", "merged")
    assert target_of(choose(fleet, "t/hot")) == ("r1:1", "merged")  # an unversioned name matches any version
    pick = choose(fleet, "t/hot@v2")  # another version is not merged there: a LoRA replica
    assert pick is not None and pick[0].target in ("r0:1", "r2:1")
    # Of two merged with it, the less loaded one.
    fleet = [replica(0, 3, "merged", HOT), replica(1, 2, "merged", HOT), replica(2, 0)]
    assert target_of(choose(fleet, HOT)) == ("r1:1", "merged")


def test_other_requests_never_go_to_a_merged_or_switching_replica() -> None:
    fleet = [replica(0, 0, "merged", HOT), replica(1, 0, "switching", "t/next@v1"), replica(2, 9)]
    for turn in range(4):
        assert target_of(choose(fleet, "", turn=turn)) == ("r2:1", "least_loaded")  # base model
        pick = choose(fleet, "t/other@v1", turn=turn)
        assert pick is not None and pick[0].target == "r2:1"
        # The adapter a replica is switching to is not served there either until it is merged.
        pick = choose(fleet, "t/next@v1", turn=turn)
        assert pick is not None and pick[0].target == "r2:1"
    # No LoRA replica left: one switching into a mode that serves the request takes it (and holds it until its
    # switch ends); else None (the pool answers 503).
    unmerging, merging = replica(1, 0, "switching", ""), replica(1, 0, "switching", "t/next@v1")
    assert target_of(choose([replica(0, 0, "merged", HOT), unmerging], "")) == ("r1:1", "switching")
    assert target_of(choose([replica(0, 0, "merged", HOT), merging], "t/next@v1")) == ("r1:1", "switching")
    assert choose([replica(0, 0, "merged", HOT), merging], "") is None
    assert choose([replica(0, 0, "merged", HOT)], "t/other@v1") is None


def test_an_overloaded_merged_replica_spills_to_lora_replicas() -> None:
    fleet = [replica(0, 4, "merged", HOT), replica(1, 1), replica(2, 0)]
    assert target_of(choose(fleet, HOT, merged_max_in_flight=5)) == ("r0:1", "merged")
    pick = choose(fleet, HOT, merged_max_in_flight=4)  # at the bound: to the LoRA replicas, by their rules
    assert pick is not None and pick[0].target in ("r1:1", "r2:1") and pick[1] == "hashed"
    # With no LoRA replica left, the merged one still takes it (queueing beats a 503).
    assert target_of(choose([replica(0, 40, "merged", HOT)], HOT, merged_max_in_flight=4)) == ("r0:1", "merged")


# -- a gateway in front of replicas that switch behind its back ---------------------------------------------


@pytest.fixture
def pair(gw: Stack) -> Iterator[list[FakeInference]]:
    fakes = [FakeInference(f"m{i}", merge_capable=True) for i in range(2)]
    servers = [gw.loop.run(serve_inference(f)) for f in fakes]
    yield fakes
    for server in servers:
        gw.loop.run(server.stop(None))


@pytest.fixture
def blind_gateway(pair: list[FakeInference], extra_gateway: Callable[..., Gateway]) -> Gateway:
    """A gateway that polls Stats only every minute: it learns of a switch from the refusal alone."""
    return extra_gateway([f"127.0.0.1:{f.port}" for f in pair], health_interval_s=60)


def chat(client: openai.OpenAI, model: str, *, stream: bool) -> str:
    messages = [{"role": "user", "content": "hi"}]
    if stream:
        chunks = client.chat.completions.create(model=model, messages=messages, stream=True)  # type: ignore[arg-type]
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return client.chat.completions.create(model=model, messages=messages).choices[0].message.content or ""  # type: ignore[arg-type]


def test_a_replica_that_switched_since_the_last_poll_is_retried_elsewhere(
    pair: list[FakeInference], blind_gateway: Gateway, gw: Stack, tmp_path: Path
) -> None:
    switched, lora = pair
    publish_test_adapter(gw.store, tmp_path / "other", "default/other", "v1")
    switched.merge_now("default/other@v1")  # as another gateway's planner would; this one has not polled since
    client = blind_gateway.client()
    for stream in (False, True, False, True):
        assert chat(client, BASE_MODEL, stream=stream) == "Hello from base choice0. Bye!"
    # Refused once (FAILED_PRECONDITION, before any token); the gateway asked its Stats, saw the merge, and
    # from then on sends it nothing but its adapter.
    assert len(switched.requests) == 1 and len(lora.requests) == 4
    assert chat(client, "other", stream=False) == "Hello from default/other choice0. Bye!"
    assert [r.adapter for r in switched.requests[1:]] == ["default/other@v1"]
    with blind_gateway.http() as http:
        metrics = samples(http.get("/metrics").text, order=("replica", "reason"))
    assert metrics[("lorafleet_gateway_upstream_retries_total", f"127.0.0.1:{switched.port}")] == 1
    assert metrics[("lorafleet_gateway_routing_decisions_total", "merged")] == 1


def test_a_genuine_failed_precondition_is_not_retried(pair: list[FakeInference], blind_gateway: Gateway) -> None:
    for fake in pair:
        fake.mode = "rejected"  # "LoRA rank 64 exceeds this server's max_lora_rank 8": the mode did not change
    with pytest.raises(openai.BadRequestError) as raised:
        chat(blind_gateway.client(), BASE_MODEL, stream=False)
    assert raised.value.code == "adapter_rejected"
    assert sum(len(f.requests) for f in pair) == 1


def test_when_every_replica_switched_the_answer_is_503(pair: list[FakeInference], blind_gateway: Gateway) -> None:
    for fake in pair:  # both start merging another adapter, behind the gateway's back
        fake.merge_state, fake.merged = inference_pb2.MERGE_STATE_MERGING, "default/other@v1"
    with pytest.raises(openai.InternalServerError) as raised:
        chat(blind_gateway.client(), BASE_MODEL, stream=True)
    assert raised.value.status_code == 503
    assert "switching merge mode" in str(raised.value)
    assert [len(f.requests) for f in pair] == [1, 1]  # each tried once, then nothing left to try


def test_replicas_back_in_lora_mode_serve_again_before_the_next_poll(
    pair: list[FakeInference], blind_gateway: Gateway, gw: Stack, tmp_path: Path
) -> None:
    publish_test_adapter(gw.store, tmp_path / "other", "default/other", "v1")
    client = blind_gateway.client()
    for fake in pair:  # both merged behind the gateway's back: it learns so from their refusals
        fake.merge_now("default/other@v1")
    with pytest.raises(openai.InternalServerError):
        chat(client, BASE_MODEL, stream=False)
    for fake in pair:  # and back to LoRA mode (another gateway's planner, or an operator): no poll for a minute
        fake.merge_now("")
    time.sleep(0.6)  # older than STALE_MODE_S: the gateway asks their Stats instead of answering 503
    assert chat(client, BASE_MODEL, stream=True) == "Hello from base choice0. Bye!"
    assert sum(len(f.requests) for f in pair) == 3
