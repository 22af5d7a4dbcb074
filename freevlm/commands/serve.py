"""`freevlm serve`: an OpenAI-compatible server (chat completions with images, streamed or not) over the
continuous-batching scheduler, with early exits; without --backbone, the demo's trained model from its cache."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from functools import partial
from pathlib import Path
from typing import NamedTuple

from ..argtypes import device, input_path, integer, number, positive_int, threshold_or_report
from ..decoding.config import DecodeConfig
from ..errors import UserError
from ..server.config import ServerConfig  # no dependency of the serve extra: `freevlm --help` works without it

POSITIVE = number(0, low_open=True)
# the `ServerConfig` fields the command line sets: (flag, field, argument type, help); each defaults to the field's
SERVER_OPTIONS = (
    ("--max-batch", "max_batch", positive_int, "rows decoded together"),
    ("--max-len", "max_len", positive_int, "slots per row: prompt + answer"),
    ("--max-queue", "max_waiting", positive_int, "requests waiting for a row; beyond, 429 with Retry-After"),
    (
        "--prefill-chunk",
        "prefill_chunk",
        positive_int,
        "prompt slots (image tokens included) encoded per decode step, at most: more starts a burst of requests "
        "sooner and holds the running answers up longer",
    ),
    (
        "--threshold",
        "threshold",
        threshold_or_report,
        "confidence to leave at an exit when a request gives none, or a `freevlm calibrate --out` report for these "
        "--backbone and --exits: the threshold it certified (default: the threshold certified for the model's exits "
        f"where it records one, as the demo's model does; else {DecodeConfig.threshold:g})",
    ),
    ("--max-tokens", "max_tokens", positive_int, "answer length when a request gives none"),
    ("--prompt", "prompt", str, "text after the image when a request has none (default: the folder's recorded prompt)"),
    ("--request-timeout", "request_timeout", POSITIVE, "seconds before an unfinished request is cancelled"),
    ("--drain-seconds", "drain_seconds", POSITIVE, "on SIGTERM, how long running requests may take to finish"),
    ("--max-image-bytes", "max_image_bytes", positive_int, "largest image an http(s) URL may send"),
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible server (chat completions) with early exits")
    p.add_argument(
        "--backbone",
        type=input_path,
        help="model folder, as for `freevlm caption` (default: the demo's trained model, from the demo cache)",
    )
    p.add_argument(
        "--exits", type=input_path, help="folder of exits saved by EarlyExitVLM.save_exits (default: none, full model)"
    )
    p.add_argument("--name", help="the model name clients send (default: the backbone folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=integer(0, 65535), default=8000)
    p.add_argument("--device", type=device, default="cpu")
    defaults = ServerConfig()
    for flag, field, kind, text in SERVER_OPTIONS:
        p.add_argument(flag, dest=field, type=kind, default=getattr(defaults, field), help=text)
    p.add_argument("--no-image-urls", action="store_true", help="refuse http(s) image URLs (data: URLs only)")
    p.add_argument(
        "--scheduler-thread",
        action="store_true",
        help="decode in a thread of the server's process, not in a process of its own beside it (which runs the "
        "HTTP work on another core): one process, a little less CPU per token where no second core is free (each "
        "replica of --replicas decodes in a thread)",
    )
    p.add_argument(
        "--replicas",
        type=positive_int,
        help="run N copies of the server on Ray Serve behind one address, each loading the model and batching on "
        "its own (default: one server, no Ray)",
    )
    p.add_argument(
        "--replica-cpus",
        type=POSITIVE,
        help="with --replicas: CPUs Ray gives each replica, which set its torch threads (default: 1)",
    )
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..server.app import create_app
        from ..server.remote import SchedulerProcess
    except ImportError as err:
        raise UserError(
            f"freevlm serve needs the serve extra ({err.name} is missing): pip install 'freevlm[serve]'"
        ) from err

    config = server_config(args)
    if args.replica_cpus and not args.replicas:
        raise UserError("--replica-cpus applies to --replicas N (Ray Serve): give both, or neither")
    if args.replicas:
        return serve_replicas(args, config)
    if args.scheduler_thread:
        model = load_served_model(args)
        app = create_app(model, config)
    else:  # the model loads and decodes in a process of its own, beside the event loop's (server/remote.py)
        from ..loading import check_vlm_folder

        if args.backbone:  # a missing model fails here, not in the scheduler's process
            check_vlm_folder(args.backbone)
        else:
            demo_model()
        scheduler = SchedulerProcess(partial(load_served_model, args), config)
        model = scheduler.model
        app = create_app(model, config, scheduler)
    server = uvicorn.Server(
        uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=config.drain_seconds)
    )
    # uvicorn drains on SIGTERM / SIGINT and then raises the signal again under the handlers it found: these make
    # that second delivery a no-op, so a drained server exits 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    threshold, source = config.default_threshold(model)
    print(f"serving {model.name} on http://{args.host}:{args.port} (OpenAI API at /v1)", flush=True)
    print(f"threshold {threshold:g} where a request gives none ({source})", flush=True)
    server.run()
    return 0


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The `ServerConfig` the command line gives (`SERVER_OPTIONS`, `--no-image-urls`), validated."""
    options = {field: getattr(args, field) for _, field, _, _ in SERVER_OPTIONS}
    if isinstance(args.threshold, Path):  # a calibrate report: the threshold it certified for these folders
        from ..calibration import reported_threshold

        if not args.backbone:
            raise UserError("--threshold with a calibrate report needs the --backbone and --exits it certified")
        options["threshold"] = reported_threshold(args.threshold, args.backbone, args.exits)
    config = ServerConfig(**options, image_urls=not args.no_image_urls)
    config.validate()
    return config


def serve_replicas(args: argparse.Namespace, config: ServerConfig) -> int:
    """`--replicas N`: the app as a Ray Serve deployment, until SIGTERM or Ctrl-C; then each replica drains its
    running requests (`--drain-seconds`), Ray stops, and the command exits 0."""
    try:
        from ..server import replicas
    except ImportError as err:
        raise UserError(f"--replicas needs Ray Serve ({err.name} is missing): pip install 'freevlm[serve]'") from err
    from ..loading import check_vlm_folder

    if args.backbone:  # a missing model fails here, not in each replica
        check_vlm_folder(args.backbone)
    else:
        demo_model()
    if args.device.startswith("cuda:"):
        raise UserError("with --replicas, give --device cuda: Ray gives each replica a GPU of its own, its 'cuda'")
    placement = {"gpus": 1.0} if args.device == "cuda" else {}
    if args.replica_cpus:
        placement["cpus"] = args.replica_cpus
    stopped = threading.Event()
    try:
        replicas.run(partial(load_served_model, args), config, args.replicas, args.host, args.port, **placement)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stopped.set())
        print(f"serving {args.replicas} replicas on http://{args.host}:{args.port} (OpenAI API at /v1)", flush=True)
        while not stopped.wait(1):
            pass
    finally:
        replicas.stop()
    return 0


def load_served_model(args: argparse.Namespace):
    """The model, processor and exits the command names, or the demo's trained model."""
    from ..exits import ExitConfig
    from ..loading import check_vlm_folder, load_exits, load_vlm
    from ..model import EarlyExitVLM
    from ..server.served import ServedModel

    demo = None if args.backbone else demo_model()
    backbone, exits = (args.backbone, args.exits) if demo is None else (demo.backbone, demo.exits)
    check_vlm_folder(backbone)
    logging.getLogger("freevlm").info("loading %s", backbone)
    bundle = load_vlm(backbone, device=args.device)
    if exits:
        ee = load_exits(bundle.model, exits)
        if demo is not None:
            from ..placement import exits_subset

            ee = exits_subset(ee, demo.layers)
    else:
        ee = EarlyExitVLM(bundle.model, ExitConfig([1]))  # a placeholder exit that full mode never runs
    name = args.name or (Path(backbone).resolve().name if args.backbone else "freevlm-demo")
    prompt = bundle.prompt if bundle.prompt is not None or demo is None else demo.prompt
    threshold = None if demo is None else demo.threshold
    return ServedModel(bundle, ee, name, prompt, has_exits=bool(exits), threshold=threshold)


class DemoModel(NamedTuple):
    """The demo's trained model, as `freevlm serve` finds it in the demo cache."""

    backbone: Path
    exits: Path
    layers: tuple[int, ...]  # the exits consulted: those its placement chose, else FREE's fixed ones
    prompt: str  # the prompt its captions were trained after (for a cache from before its folder recorded it)
    threshold: float | None  # the threshold its placement certified for those exits (None: none certified)


def demo_model() -> DemoModel:
    """The demo's trained model: the full recipe's, else `--quick`'s. Its exits are those its placement chose (by
    layer calls, exits consulted counted) at the threshold it certified for them, else FREE's fixed ones."""
    from ..demo.config import DemoConfig, default_cache
    from ..demo.train import read_placement, trained_model
    from ..loading import CAPTION_PROMPT

    for cfg in (DemoConfig(), DemoConfig.quick_config()):
        found = trained_model(cfg)
        if found is not None:
            placement = read_placement(found[1])
            if placement is None:
                return DemoModel(*found, tuple(cfg.exit_layers), CAPTION_PROMPT, None)
            threshold = placement.threshold if placement.certified else None
            return DemoModel(*found, placement.layers, CAPTION_PROMPT, threshold)
    raise UserError(
        f"no trained demo model in {default_cache()} ($FREEVLM_CACHE): run `freevlm demo --quick` (a few minutes) "
        "or `freevlm demo` to make one, or give --backbone (and --exits)"
    )
