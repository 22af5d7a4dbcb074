"""`freevlm serve --replicas N`: the same app (`create_app`) as a Ray Serve deployment of N replicas. Each replica
is a process that loads the model and batches continuously with its own scheduler; Ray's HTTP proxy spreads the
requests over them (to the replica with the shorter queue of two) and streams their answers back.

    app = deployment(load, ServerConfig(), replicas=2)   # load: a picklable () -> ServedModel, run in each replica
    serve.run(app, route_prefix="/")

Every answer names its replica in the `x-freevlm-replica` header.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable

import ray
from ray import serve
from ray.serve.exceptions import RayServeException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .app import ServedModel, create_app
from .config import ServerConfig

APP_NAME = "freevlm"
REPLICA_HEADER = "x-freevlm-replica"
# Ray's shared-memory object store: requests and answers go between processes as messages, not objects, so a small
# one is plenty (Ray's default takes 30% of the machine's memory)
OBJECT_STORE_BYTES = 128 * 2**20


class ReplicaHeader:
    """ASGI middleware: every HTTP response says which replica (process) answered it."""

    def __init__(self, app: ASGIApp, replica: str):
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER.encode(), self.replica)]
            await send(message)

        await self.app(scope, receive, send_named)


def deployment(
    load: Callable[[], ServedModel], config: ServerConfig, replicas: int, cpus: float = 1.0, gpus: float = 0.0
) -> serve.Application:
    """N replicas of the server, each with `cpus` CPUs (Ray sets its torch threads to match) and `gpus` GPUs.
    A replica queues no more than its own scheduler does (`max_batch` running + `max_waiting`): beyond that its
    answer is the scheduler's 429, and Ray's proxy holds at most `max_waiting` more requests per replica."""
    config.validate()

    def build():  # runs in each replica
        app = create_app(load(), config)
        app.add_middleware(ReplicaHeader, replica=f"{os.getpid()}")
        return app

    ingress = serve.ingress(build)()
    return serve.deployment(
        ingress,
        name="freevlm",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
        max_ongoing_requests=config.max_batch + config.max_waiting + 1,
        max_queued_requests=config.max_waiting * replicas,
        graceful_shutdown_timeout_s=config.drain_seconds,
    ).bind()


def run(
    load: Callable[[], ServedModel],
    config: ServerConfig,
    replicas: int,
    host: str,
    port: int,
    cpus: float = 1.0,
    gpus: float = 0.0,
) -> None:
    """Start Ray (a local cluster of just the CPUs the replicas take, or the cluster `RAY_ADDRESS` names; its usage
    reports off unless `RAY_USAGE_STATS_ENABLED` says otherwise), Serve's HTTP proxy on host:port, and the
    deployment; returns when every replica is ready."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray reports usage to its makers unless told not to
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(num_cpus=math.ceil(replicas * cpus), object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(load, config, replicas, cpus, gpus), name=APP_NAME, route_prefix="/")


def stop() -> None:
    """Delete the app first (no new request is routed to it, and each replica finishes its running ones within
    `drain_seconds` while the proxy still streams them out), then shut Serve and Ray down."""
    if not ray.is_initialized():  # Ray did not start: nothing to stop
        return
    with contextlib.suppress(RayServeException):  # Serve did not start
        serve.delete(APP_NAME)
    serve.shutdown()
    ray.shutdown()
