"""The hot-adapter planner: its decisions on a fake clock and fake replica views (shares, hysteresis, minimum
hold, the last LoRA replica, the allow-all flag, several adapters), then a real gateway with the planner on in
front of two merge-capable replicas on loopback gRPC, driven by the openai client: it merges the hot adapter,
routes it there and everything else elsewhere, shows it in the admin view, and unmerges when traffic moves on."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from pydantic import ValidationError

from lorafleet.inference.v1 import inference_pb2
from lorafleet_gateway.settings import GatewaySettings
from lorafleet_gateway.upstream.hot_adapters import (
    HotAdapterTracker,
    MergeDecision,
    MergePolicy,
    ReplicaState,
    TokenWindow,
)
from lorafleet_gateway.upstream.routing import Mode
from tests.gateway.gateway_fakes import FakeInference, serve_inference
from tests.gateway.gateway_harness import BASE_MODEL, Gateway, Stack, publish_test_adapter, stop_gateway, wait_for
from tests.gateway.test_routing import samples

pytestmark = pytest.mark.timeout(60)

A, B, C = "t/a@v1", "t/b@v1", "t/c@v1"
POLICY = MergePolicy(window_s=60, merge_share=0.5, unmerge_share=0.2, min_tokens_per_s=10, min_hold_s=120)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tracker(**policy: float | bool) -> tuple[HotAdapterTracker, FakeClock]:
    clock = FakeClock()
    fields = vars(POLICY) | policy
    return HotAdapterTracker(MergePolicy(**fields), clock), clock  # type: ignore[arg-type]


def lora(i: int, load: int = 0, *, capable: bool = True, healthy: bool = True, **kw: object) -> ReplicaState:
    return ReplicaState(f"r{i}", healthy, capable, "lora", load=load, **kw)  # type: ignore[arg-type]


def merged(i: int, adapter: str, held_s: float = 1000.0, mode: Mode = "merged") -> ReplicaState:
    return ReplicaState(f"r{i}", True, True, mode, adapter, held_s)


def traffic(t: HotAdapterTracker, **tokens: int) -> None:
    """Tokens per adapter in the current second (a: A, b: B, c: C, base: the base model)."""
    names = {"a": A, "b": B, "c": C, "base": ""}
    for key, n in tokens.items():
        t.record(names[key], n)


def test_window_forgets_what_is_older_than_it() -> None:
    clock = FakeClock()
    window = TokenWindow(10, clock)
    window.add(A, 5)
    clock.now += 5
    window.add(A, 1)
    window.add("", 2)
    assert window.totals() == {A: 6, "": 2}
    clock.now += 6  # the first second is now 11 s old
    assert window.totals() == {A: 1, "": 2}
    clock.now += 10
    assert window.totals() == {}


def test_merge_needs_both_the_share_and_the_rate() -> None:
    t, _ = tracker()
    fleet = [lora(0, load=3), lora(1, load=1)]
    traffic(t, a=590, base=610)  # 49%: not hot
    assert t.decide(fleet) is None
    traffic(t, a=30)  # 50.6% and 10.3 tokens/s over the 60 s window
    decision = t.decide(fleet)
    assert decision is not None and (decision.target, decision.adapter, decision.action) == ("r1", A, "merge")
    assert "50% of tokens" in decision.why
    # The same share of less traffic is not worth a replica.
    t, _ = tracker()
    traffic(t, a=500, base=100)  # 83%, but 8.3 tokens/s
    assert t.decide(fleet) is None


def test_the_replica_with_the_adapter_loaded_is_merged_first() -> None:
    t, _ = tracker()
    traffic(t, a=900, base=100)
    decision = t.decide([lora(0), lora(1, load=5, adapters=frozenset({A})), lora(2)])
    assert decision is not None and decision.target == "r1"


def test_never_the_last_lora_replica_unless_allowed() -> None:
    for allow in (False, True):
        t, _ = tracker(allow_all_replicas=allow)
        traffic(t, a=900, base=100)
        alone = t.decide([lora(0)])
        assert (alone is not None) is allow
        # Another LoRA replica that is down or cannot merge does not count / cannot be used.
        assert (t.decide([lora(0), lora(1, healthy=False)]) is not None) is allow
        decision = t.decide([lora(0), lora(1, capable=False)])
        assert decision is not None and decision.target == "r0"  # r1 stays LoRA: allowed either way
        # One LoRA replica and one merged with B (cool, but merged only 10 s ago: not to be switched yet).
        assert (t.decide([merged(0, B, held_s=10), lora(1)]) is not None) is allow


def test_already_merged_adapters_are_not_merged_twice() -> None:
    t, _ = tracker()
    traffic(t, a=900, base=100)
    assert t.decide([merged(0, A), lora(1), lora(2)]) is None
    # Unless the replica that has it is down: then another one takes it.
    down = ReplicaState("r0", False, True, "merged", A, 1000)
    decision = t.decide([down, lora(1), lora(2)])
    assert decision is not None and decision.adapter == A and decision.target in ("r1", "r2")


def test_a_switching_replica_pauses_planning() -> None:
    t, _ = tracker()
    traffic(t, a=900, base=100)
    assert t.decide([merged(0, B, mode="switching"), lora(1), lora(2)]) is None
    assert t.decide([lora(0), lora(1), lora(2)]) is not None


def steady(
    t: HotAdapterTracker, clock: FakeClock, fleet: list[ReplicaState], seconds: int, **tokens: int
) -> list[MergeDecision | None]:
    """Every 10 s for ``seconds``: that traffic, then a decision."""
    decisions = []
    for _ in range(seconds // 10):
        clock.now += 10
        traffic(t, **tokens)
        decisions.append(t.decide(fleet))
    return decisions


def test_unmerge_after_a_whole_cool_window_with_hysteresis() -> None:
    t, clock = tracker()
    fleet = [merged(0, A), lora(1)]
    # 30%: too little to merge A, too much to unmerge it: it stays merged, however long.
    assert steady(t, clock, fleet, 300, a=300, base=700) == [None] * 30
    # A falls to 5%. Its share over the window passes under 20% at the third step; a window later it is unmerged.
    decisions = steady(t, clock, fleet, 90, a=50, base=950)
    assert decisions[:8] == [None] * 8
    last = decisions[8]
    assert last is not None and (last.target, last.adapter, last.action) == ("r0", "", "unmerge")
    assert "under 20% for 60s" in last.why


def test_warm_again_resets_the_cool_window() -> None:
    t, clock = tracker()
    fleet = [merged(0, A), lora(1)]
    assert steady(t, clock, fleet, 50, a=50, base=950) == [None] * 5  # cool ...
    assert steady(t, clock, fleet, 30, a=900, base=100) == [None] * 3  # ... then warm: 80 s, and not unmerged
    decisions = steady(t, clock, fleet, 120, a=50, base=950)
    first = next(i for i, d in enumerate(decisions) if d is not None)
    assert first >= 6 and decisions[first].action == "unmerge"  # type: ignore[union-attr]  # a whole new window


def test_the_minimum_hold_is_respected() -> None:
    t, clock = tracker()
    traffic(t, base=1000)
    assert t.decide([merged(0, A, held_s=100), lora(1)]) is None
    clock.now += 61
    assert t.decide([merged(0, A, held_s=100), lora(1)]) is None  # cool for a window, but held < 120 s
    decision = t.decide([merged(0, A, held_s=121), lora(1)])
    assert decision is not None and decision.action == "unmerge"


def test_a_cooled_replica_is_reused_for_the_hot_adapter() -> None:
    t, _ = tracker()
    traffic(t, b=900, a=50, base=50)
    fleet = [merged(0, A, held_s=500), lora(1), lora(2)]
    decision = t.decide(fleet)  # A at 5% < 20%: r0 takes B, and both LoRA replicas stay
    assert decision is not None and (decision.target, decision.adapter) == ("r0", B)
    # Not while its merge is younger than the minimum hold: a LoRA replica then.
    decision = t.decide([merged(0, A, held_s=60), lora(1), lora(2)])
    assert decision is not None and decision.target in ("r1", "r2")
    # Not while A is still warm (hysteresis): 25% stays.
    t, _ = tracker(merge_share=0.4)
    traffic(t, b=1000, a=500, base=500)
    decision = t.decide([merged(0, A, held_s=500), lora(1), lora(2)])
    assert decision is not None and decision.target in ("r1", "r2")


def test_several_adapters() -> None:
    t, _ = tracker()
    traffic(t, a=400, b=350, base=250)  # none has half
    assert t.decide([lora(0), lora(1), lora(2)]) is None
    t, _ = tracker(merge_share=0.3, unmerge_share=0.1)
    traffic(t, a=1200, b=1050, base=750)
    first = t.decide([lora(0), lora(1), lora(2)])
    assert first is not None and first.adapter == A  # the hottest first, one change per round
    second = t.decide([merged(0, A), lora(1), lora(2)])
    assert second is not None and second.adapter == B and second.target in ("r1", "r2")
    assert t.decide([merged(0, A), merged(1, B), lora(2)]) is None  # the last LoRA replica stays


def test_a_replica_that_refused_is_left_alone_for_a_window() -> None:
    t, clock = tracker()
    traffic(t, a=900, base=100)
    t.block("r0")
    decision = t.decide([lora(0), lora(1, load=9)])
    assert decision is not None and decision.target == "r1"
    assert t.decide([lora(0), merged(1, B, held_s=10)]) is None  # r1 is not usable either: nothing to do
    clock.now += 61
    traffic(t, a=900)
    decision = t.decide([lora(0), lora(2)])
    assert decision is not None and decision.target == "r0"


# -- the whole loop, for real ---------------------------------------------------------------------------------


@pytest.fixture
def mergeable(gw: Stack) -> Iterator[list[FakeInference]]:
    fakes = [FakeInference(f"h{i}", merge_capable=True, merge_delay_s=0.1) for i in range(2)]
    servers = [gw.loop.run(serve_inference(f)) for f in fakes]
    yield fakes
    for server in servers:
        gw.loop.run(server.stop(None))


def planner_gateway(start: Callable[..., Gateway], fakes: list[FakeInference], **overrides: object) -> Gateway:
    settings: dict[str, object] = {
        "merge_enabled": True,
        "merge_interval_s": 0.1,
        "merge_window_s": 2.0,
        "merge_min_tokens_per_s": 5,
        "merge_min_hold_s": 0.5,
    }
    return start([f"127.0.0.1:{f.port}" for f in fakes], **(settings | overrides))


def ask(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    return reply.choices[0].message.content or ""


def test_the_planner_merges_the_hot_adapter_and_unmerges_it_when_it_cools(
    mergeable: list[FakeInference], extra_gateway: Callable[..., Gateway], gw: Stack, tmp_path: Path
) -> None:
    publish_test_adapter(gw.store, tmp_path / "hot", "default/hot", "v1")
    gateway = planner_gateway(extra_gateway, mergeable)
    client = gateway.client()
    for _ in range(6):  # 6 x 9 tokens of the adapter, 2 x 9 of the base model: 75%, 27 tokens/s over 2 s
        assert ask(client, "hot") == "Hello from default/hot choice0. Bye!"
    for _ in range(2):
        assert ask(client, BASE_MODEL) == "Hello from base choice0. Bye!"
    assert wait_for(lambda: any(f.merge_state == inference_pb2.MERGE_STATE_MERGED for f in mergeable), timeout=5)
    target, other = sorted(mergeable, key=lambda f: f.merge_state != inference_pb2.MERGE_STATE_MERGED)
    assert (target.merged, target.merge_calls, other.merge_calls) == ("default/hot@v1", ["default/hot@v1"], [])
    pool = gateway.app.state.services.pool
    assert wait_for(lambda: {r.target: r.mode for r in pool.replicas}[f"127.0.0.1:{target.port}"] == "merged")

    # The adapter now goes to its merged replica, everything else to the LoRA one.
    for fake in mergeable:
        fake.requests.clear()
    for _ in range(4):
        assert ask(client, "hot") == "Hello from default/hot choice0. Bye!"
        assert ask(client, BASE_MODEL) == "Hello from base choice0. Bye!"
    assert [r.adapter for r in target.requests] == ["default/hot@v1"] * 4
    assert [r.adapter for r in other.requests] == [""] * 4
    with gateway.http() as http:
        detail = http.get("/v1/lorafleet/adapters/hot").json()
        metrics = samples(http.get("/metrics").text, order=("action", "outcome", "reason"))
    placement = {p["replica"]: p.get("merged_version") for p in detail["loaded_on"]}
    assert placement[f"127.0.0.1:{target.port}"] == "v1"
    assert placement.get(f"127.0.0.1:{other.port}") is None
    assert metrics[("lorafleet_gateway_merge_decisions_total", "merge", "ok")] == 1
    assert metrics[("lorafleet_gateway_routing_decisions_total", "merged")] >= 4
    assert metrics[("lorafleet_gateway_hot_adapter_share",)] > 0.3

    # Traffic moves to the base model: the adapter's share falls, and after a whole window it is unmerged.
    deadline = time.monotonic() + 10
    while target.merge_state != inference_pb2.MERGE_STATE_LORA and time.monotonic() < deadline:
        assert ask(client, BASE_MODEL) == "Hello from base choice0. Bye!"
        time.sleep(0.05)
    assert (target.merge_state, target.merge_calls) == (inference_pb2.MERGE_STATE_LORA, ["default/hot@v1", ""])
    assert other.merge_calls == []  # the last LoRA replica was never touched
    with gateway.http() as http:
        metrics = samples(http.get("/metrics").text, order=("action", "outcome"))
        placements = http.get("/v1/lorafleet/adapters/hot").json()["loaded_on"]
    assert placements and all(p.get("merged_version") is None for p in placements)
    assert metrics[("lorafleet_gateway_merge_decisions_total", "unmerge", "ok")] == 1


def test_allow_all_replicas_merges_a_single_replica_fleet(
    mergeable: list[FakeInference], extra_gateway: Callable[..., Gateway], gw: Stack, tmp_path: Path
) -> None:
    publish_test_adapter(gw.store, tmp_path / "solo", "default/solo", "v1")
    only = mergeable[:1]
    refusing = planner_gateway(extra_gateway, only)  # allow-all off: never the last LoRA replica
    for _ in range(6):
        assert ask(refusing.client(), "solo") == "Hello from default/solo choice0. Bye!"
    time.sleep(0.5)  # five planning rounds
    assert only[0].merge_calls == []
    gw.loop.run(stop_gateway(refusing))  # its own planner would unmerge what the next one merges
    only[0].merge_delay_s = 1.0  # a slow switch
    gateway = planner_gateway(extra_gateway, only, merge_allow_all_replicas=True)
    for _ in range(2):  # 100% of the tokens, 9 tokens/s over the 2 s window
        assert ask(gateway.client(), "solo") == "Hello from default/solo choice0. Bye!"
    assert wait_for(lambda: only[0].merge_state == inference_pb2.MERGE_STATE_MERGING, timeout=5)
    # A request during the switch has no replica to go to: it waits for the switch, and is served merged.
    started = time.monotonic()
    assert ask(gateway.client(), "solo") == "Hello from default/solo choice0. Bye!"
    assert time.monotonic() - started > 0.3
    assert only[0].merge_state == inference_pb2.MERGE_STATE_MERGED and only[0].merge_calls == ["default/solo@v1"]
    # Fully merged: the base model has no replica until the adapter cools (the price of the flag).
    with pytest.raises(openai.InternalServerError) as raised:
        ask(gateway.client(), BASE_MODEL)
    assert raised.value.status_code == 503 and "can serve the base model" in str(raised.value)


def test_the_planner_is_off_by_default_and_its_shares_are_checked(gw: Stack) -> None:
    assert gw.gateway.app.state.settings.merge_enabled is False
    assert gw.gateway.app.state.services.hot_adapters is None
    with pytest.raises(ValidationError, match="unmerge_share must be below merge_share"):
        GatewaySettings(admin_key="k", merge_share=0.3, unmerge_share=0.3)
