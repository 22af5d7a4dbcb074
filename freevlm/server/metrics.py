"""The server's Prometheus metrics, in a registry of its own (two apps in one process, as tests and Ray replicas
make, never share or clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from ..serving import Scheduler
from .remote import SchedulerProcess

# seconds: a token takes milliseconds on a small model, a first token up to seconds behind a queue
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# the decode steps' work (`Scheduler.work`): metric name and help, per key
WORK = {
    "steps": ("freevlm_decode_steps", "Decode steps the scheduler ran"),
    "rows": ("freevlm_decode_rows", "Rows each decode step made a token for, summed (per step: the batch)"),
    "calls": ("freevlm_layer_calls", "LM and exit layer calls of the decode steps (per step: the depth they ran)"),
    "slot_layers": (
        "freevlm_slot_layers",
        "(slot, layer) pairs the decode steps ran, catch-up and riding prompts included (per output token: the work)",
    ),
}


class ServerMetrics:
    """Requests by outcome, tokens in and out, where tokens left the stack, and the scheduler's load."""

    def __init__(self, scheduler: Scheduler | SchedulerProcess, num_layers: int):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "freevlm_requests", "Chat completion requests by outcome", ["outcome"], registry=registry
        )
        self.prompt_tokens = Counter(
            "freevlm_prompt_tokens", "Prompt tokens (image tokens included)", registry=registry
        )
        self.completion_tokens = Counter("freevlm_completion_tokens", "Tokens generated", registry=registry)
        layers = [float(i) for i in range(num_layers + 1)]
        self.exit_layer = Histogram(
            "freevlm_exit_layer",
            f"LM layer each token left at ({num_layers}: the final layer)",
            buckets=layers,
            registry=registry,
        )
        self.layers_per_token = Histogram(
            "freevlm_layers_per_token",
            "A request's mean exit layer over its tokens",
            buckets=layers,
            registry=registry,
        )
        self.ttft = Histogram(
            "freevlm_time_to_first_token_seconds",
            "From submission to the first token",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "freevlm_time_per_output_token_seconds",
            "Mean time between a request's tokens after the first",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        running = Gauge("freevlm_requests_running", "Requests holding a row", registry=registry)
        running.set_function(lambda: scheduler.running)
        waiting = Gauge("freevlm_requests_waiting", "Requests waiting for a row", registry=registry)
        waiting.set_function(lambda: scheduler.waiting)
        registry.register(_Work(scheduler))

    def finished(self, outcome: str, prompt_tokens: int, exit_layers: list[int], timings: list[float]) -> None:
        """Count one request that reached the scheduler: its outcome, the exit layers of the tokens it was answered
        and when each was made (`timings[0]`: submission, `time.perf_counter`)."""
        self.requests.labels(outcome).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(len(exit_layers))
        for layer in exit_layers:
            self.exit_layer.observe(layer)
        if exit_layers:
            self.layers_per_token.observe(sum(exit_layers) / len(exit_layers))
        if len(timings) > 1:
            self.ttft.observe(timings[1] - timings[0])
        if len(timings) > 2:
            self.tpot.observe((timings[-1] - timings[1]) / (len(timings) - 2))

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _Work:
    """The decode steps' work as counters, read from the scheduler at each scrape: with the exits' histogram they
    show whether tokens that leave early also save layer calls under the load of the moment (parked tokens are
    caught up later; a climbing row takes the batch up with it)."""

    def __init__(self, scheduler: Scheduler | SchedulerProcess):
        self.scheduler = scheduler

    def collect(self):
        work = self.scheduler.work
        for key, (name, text) in WORK.items():
            yield CounterMetricFamily(name, text, value=work[key])
