"""Gateway settings: LORAFLEET_GATEWAY_* variables plus the shared LORAFLEET_* ones."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from lorafleet_common.grpc_targets import check_targets, split_targets
from lorafleet_common.settings import CommonSettings


class GatewaySettings(CommonSettings):
    """How the gateway listens, where its upstreams are, and its limits."""

    model_config = SettingsConfigDict(
        env_prefix="LORAFLEET_GATEWAY_", env_ignore_empty=True, extra="ignore", populate_by_name=True
    )

    host: str = Field(default="127.0.0.1", description="HTTP bind address.")
    port: int = Field(default=8000, ge=0, le=65535, description="HTTP port.")
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Gateway processes serving the port: each takes its share of the connections (SO_REUSEPORT) "
        "on a CPU core of its own, under one supervisor that restarts a worker that dies; about one per CPU core "
        "the gateway may use. /metrics shows all of them together. Rate limits are per worker process: a key can "
        "get up to this many times its limits, as with that many gateway replicas (docs/tenancy.md). More than "
        "1 needs a fixed port (not 0).",
    )
    inference_targets: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1:50051"],
        min_length=1,
        description='Inference replicas: "host:port" (static) or "dns:///name:port" (every address the name resolves '
        "to, re-resolved every dns_refresh_s: a Kubernetes headless Service); a comma-separated string or a JSON "
        "list in the env.",
    )
    trainer_target: str = Field(default="127.0.0.1:50061", description='The trainer as "host:port".')
    admin_key: SecretStr = Field(
        validation_alias=AliasChoices("LORAFLEET_ADMIN_KEY"),
        description="The admin API key (shared LORAFLEET_ADMIN_KEY, no prefix); clients send it as a Bearer token. "
        "Required: the gateway refuses to start without it.",
    )
    connect_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="Bound on each connection attempt to a replica or the trainer, and on health checks.",
    )
    first_token_timeout_s: float = Field(
        default=60.0, gt=0, description="Longest wait for the first generated chunk (includes adapter loading)."
    )
    request_timeout_s: float = Field(default=600.0, gt=0, description="Deadline of a whole generation request.")
    trainer_timeout_s: float = Field(default=30.0, gt=0, description="Deadline of each trainer call.")
    event_stream_s: float = Field(
        default=3600.0,
        gt=0,
        description="Longest a job's event stream (GET /v1/fine_tuning/jobs/{id}/events/stream) stays open; "
        "clients then reconnect with Last-Event-ID and resume where they were.",
    )
    event_keepalive_s: float = Field(
        default=15.0,
        gt=0,
        description="A comment line is sent on a job's event stream after this much silence, so proxies and "
        "load balancers do not close an idle connection while a job is between steps.",
    )
    health_interval_s: float = Field(
        default=5.0, gt=0, description="How often each inference replica's gRPC health and Stats are polled."
    )
    stream_idle_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Longest silence between two chunks of a started stream before it is ended with an error.",
    )
    dns_refresh_s: float = Field(default=30.0, gt=0, description="How often dns:/// inference targets are re-resolved.")
    eject_after_failures: int = Field(
        default=3,
        ge=1,
        description="Consecutive failed health checks or calls after which a replica is ejected from routing; "
        "it is re-admitted when its health check answers SERVING again.",
    )
    retry_attempts: int = Field(
        default=2,
        ge=0,
        description="How many other replicas a request that fails before its first token is retried on.",
    )
    affinity_load_factor: float = Field(
        default=1.25,
        ge=1.0,
        description="Bounded-load affinity: a replica holding the adapter is preferred while its load stays under "
        "this factor times the average load (and under average + affinity_min_slack).",
    )
    affinity_min_slack: int = Field(
        default=2, ge=0, description="Requests above the average a preferred replica may always take."
    )
    merged_max_in_flight: int = Field(
        default=64,
        ge=1,
        description="Routing: an adapter merged into a replica's weights goes to that replica while it has fewer "
        "requests than this in flight or queued; beyond it, to the LoRA replicas. About the replica's batch size "
        "(vLLM max_num_seqs).",
    )
    merge_enabled: bool = Field(
        default=False,
        description="Run the hot-adapter planner: merge an adapter that takes most of the traffic into one "
        "merge-capable replica's weights (no LoRA cost there) and unmerge it when it cools. Enable it on one "
        "gateway of a fleet: each plans from its own traffic (with several workers, worker 0 plans for its "
        "gateway). See docs/routing.md.",
    )
    merge_interval_s: float = Field(
        default=10.0, gt=0, description="How often the planner decides; it makes at most one change each time."
    )
    merge_window_s: float = Field(
        default=60.0, gt=0, description="The sliding window over which the planner counts each adapter's tokens."
    )
    merge_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="An adapter whose share of all tokens (prompt + completion, base model included) over the "
        "window reaches this is merged into a replica, if no replica has it merged already.",
    )
    unmerge_share: float = Field(
        default=0.2,
        ge=0,
        lt=1,
        description="A merged adapter whose share stays under this for a whole window is unmerged (its replica "
        "returns to LoRA mode), and its replica may be reused for a hotter adapter. Below merge_share: the gap is "
        "the hysteresis.",
    )
    merge_min_tokens_per_s: float = Field(
        default=100.0,
        ge=0,
        description="An adapter is merged only if it was also served at least this many tokens per second over "
        "the window (a large share of little traffic is not worth a replica). This is the whole gateway's rate: "
        "with several workers the planner runs in worker 0 alone, which sees about 1/workers of the traffic and "
        "compares its own rate with this divided by workers.",
    )
    merge_min_hold_s: float = Field(
        default=300.0,
        ge=0,
        description="The planner does not switch a replica merged less than this long ago; keep it at least the "
        "replicas' own minimum hold (LORAFLEET_INFERENCE_MERGE_MIN_HOLD_S: they refuse earlier switches).",
    )
    merge_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="Deadline of one MergeAdapter call: the replica drains its requests in flight, then updates "
        "its weights.",
    )
    merge_allow_all_replicas: bool = Field(
        default=False,
        description="Let the planner merge the last replica in LoRA mode too. Then, while every replica is "
        "merged, the base model and the other adapters get 503: for single-adapter deployments and benchmarks.",
    )
    store_outage_grace_s: float = Field(
        default=600.0,
        ge=0,
        description="While the object store is unreachable, a model this gateway resolved less than this long ago "
        "is served as then resolved (published adapter versions never change; replicas keep loaded ones), so an "
        "outage of the store does not stop traffic to adapters in use. Other adapters get 503. 0: every adapter "
        "request needs the store.",
    )
    database_url: SecretStr | None = Field(
        default=None,
        description="SQLAlchemy URL of the tenants/keys database: sqlite:///path or "
        "postgresql+psycopg://user:pw@host/db. Default: sqlite:///<home>/gateway.db. Migrated at start-up.",
    )
    auth_cache_s: float = Field(
        default=5.0,
        ge=0,
        description="How long a verified API key is trusted without asking the database again (0: every request "
        "asks). A key in use is looked up again in the background once half this time has passed, one lookup per "
        "key at a time, so requests never wait on an expired entry. Revocations made through this gateway process "
        "apply at once; through another gateway replica or worker process, within this time.",
    )
    default_rpm_limit: int | None = Field(
        default=None, ge=1, description="Requests per minute per API key unless its tenant or key says otherwise."
    )
    default_tpm_limit: int | None = Field(
        default=None,
        ge=1,
        description="Tokens (prompt + completion) per minute per API key unless its tenant or key says otherwise.",
    )
    max_prompt_chars: int = Field(
        default=400_000,
        gt=0,
        description="Longest prompt (characters, all messages together); longer ones get 400. The token limit is "
        "the engine's, enforced by inference.",
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024, gt=0, description="Largest JSON request body; larger ones get 413."
    )
    max_file_bytes: int = Field(
        default=512 * 1024 * 1024, gt=0, description="Largest upload to POST /v1/files; larger ones get 413."
    )
    max_file_line_bytes: int = Field(
        default=8 * 1024 * 1024,
        gt=0,
        description="Longest line (one JSONL row) in an upload to POST /v1/files; a longer one gets 400. Each line "
        "is parsed whole, so this bounds the memory one upload can take.",
    )
    graceful_shutdown_s: int = Field(
        default=30, ge=0, description="On SIGTERM, how long in-flight requests may finish before they are cut."
    )
    access_log: bool = Field(
        default=False,
        description="Log one line per HTTP request (uvicorn's access log, at INFO). Off by default: it costs a "
        "formatted line and a write per request, and lorafleet_gateway_requests_total already counts requests "
        "by route, tenant, model and status.",
    )

    @field_validator("inference_targets", mode="before")
    @classmethod
    def _split_targets(cls, value: Any) -> Any:
        return split_targets(value)

    @field_validator("inference_targets")
    @classmethod
    def _check_targets(cls, value: list[str]) -> list[str]:
        return check_targets(value)

    @model_validator(mode="after")
    def _check_merge_shares(self) -> GatewaySettings:
        if self.unmerge_share >= self.merge_share:
            raise ValueError("unmerge_share must be below merge_share (the gap is the hysteresis)")
        return self

    @model_validator(mode="after")
    def _check_workers_port(self) -> GatewaySettings:
        if self.workers > 1 and self.port == 0:
            # Each worker binds the port itself: with port 0 each would get a different one.
            raise ValueError("workers > 1 needs a fixed port: with port 0 every worker would listen on another one")
        return self

    def resolved_database_url(self) -> str:
        """The database URL (it may hold a password: SecretStr keeps it out of reprs and logs)."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{(self.home / 'gateway.db').resolve()}"

    @field_validator("admin_key")
    @classmethod
    def _check_admin_key(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("LORAFLEET_ADMIN_KEY must not be blank")
        return value
