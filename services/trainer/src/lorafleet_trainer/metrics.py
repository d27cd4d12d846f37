"""Prometheus metrics of the trainer, on a registry of its own (tests build several trainers)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from lorafleet_trainer.jobstore import JobState


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.jobs = Gauge("lorafleet_training_jobs", "Training jobs by state.", ["state"], registry=self.registry)
        self.tokens_per_second = Gauge(
            "lorafleet_training_tokens_per_second",
            "Training throughput of the running job's last optimizer step.",
            registry=self.registry,
        )
        self.loss = Gauge(
            "lorafleet_training_loss", "Training loss of the running job's last optimizer step.", registry=self.registry
        )
        # Not "lorafleet_training_jobs_total": a counter's family name drops "_total" and would clash with the
        # lorafleet_training_jobs gauge.
        self.jobs_total = Counter(
            "lorafleet_training_jobs_finished_total",
            "Jobs that reached a final state, by result.",
            ["result"],
            registry=self.registry,
        )

    def set_job_counts(self, counts: dict[JobState, int]) -> None:
        for state, count in counts.items():
            self.jobs.labels(state=state.name.lower()).set(count)

    def job_finished(self, state: JobState) -> None:
        self.jobs_total.labels(result=state.name.lower()).inc()
        self.tokens_per_second.set(0)

    def step(self, tokens_per_second: float, loss: float) -> None:
        self.tokens_per_second.set(tokens_per_second)
        self.loss.set(loss)
