"""Continuous batching: requests join and leave the running batch at every step boundary.

    scheduler = Scheduler(model, max_batch=8, max_len=128)
    handle = scheduler.submit(pixel_values, input_ids, threshold=0.6, max_new_tokens=20)
    scheduler.start()                      # or drive it yourself: while scheduler.step(): ...
    for event in handle:                   # TokenEvent(token, exit_layer), as they are made
        ...

One iteration (`step`): rows whose request finished or was cancelled leave (their row is free at once); waiting
requests take free rows (image and prompt encoded by the backbone, then the prompt's slots in chunks of at most
`prefill_chunk` per iteration, so a long prompt stalls the running rows by a bounded amount; with no row decoding,
all at once); then one decode step runs every active row's next token (`RowEngine.step`) and each row's token goes
to its handle, chosen as its request asks (greedy, or sampled with its own temperature, top-k, top-p, penalty and a
generator of its own: `TokenChooser`).

Capacity is fixed at construction: `max_batch` rows of `max_len` slots (prompt + new tokens), a waiting queue of
`max_waiting`. A request that can never fit is refused at `submit` (ValueError naming the option); one that cannot
fit yet waits; a full queue refuses with `QueueFull`.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from dataclasses import dataclass, fields, replace

import torch

from ..backbones.base import Context, Start
from ..decoding.config import DecodeConfig
from ..decoding.sampling import TokenChooser, make_generator
from ..inputs import validate_generate_inputs
from ..model import EarlyExitVLM
from .handle import Handle, QueueFull
from .rows import EXIT_RULES, RowEngine

CONFIG_FIELDS = {f.name for f in fields(DecodeConfig)}


@dataclass
class _Request:
    handle: Handle
    config: DecodeConfig
    pixel_values: torch.Tensor
    input_ids: torch.Tensor  # [1, L] without padding
    eos: frozenset[int]
    stop: tuple[tuple[int, ...], ...]
    slots: int  # prompt slots, image tokens included
    inputs: dict  # the family's other model inputs (`Backbone.input_names`), for `Backbone.start`
    row: int | None = None
    prompt_ids: torch.Tensor | None = None  # [1, L0] the decoder's prompt (what the repetition penalty counts)


WORK = ("steps", "rows", "calls", "slot_layers")  # the keys of `Scheduler.work`, in its order


class Scheduler:
    """Runs decode steps over every live request of one `EarlyExitVLM` (see the module docstring). `ragged`: where the
    backbone has ragged layer calls (OPT, Llama-like LMs), prompts joining while rows decode ride in the decode steps'
    layer calls (`RowEngine`); False: each iteration's chunks in a window of their own, as for the other families."""

    def __init__(
        self,
        model: EarlyExitVLM,
        max_batch: int = 8,
        max_len: int = 256,
        max_prompt: int | None = None,
        max_waiting: int = 64,
        prefill_chunk: int = 64,
        exit_rule: str = EXIT_RULES[0],
        ragged: bool = True,
    ):
        for name, value in (("max_batch", max_batch), ("max_len", max_len), ("max_waiting", max_waiting)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
        self.model, self.backbone = model, model.backbone
        self.max_batch, self.max_len, self.max_waiting, self.prefill_chunk = (
            max_batch,
            max_len,
            max_waiting,
            prefill_chunk,
        )
        self.max_prompt = max_len if max_prompt is None else max_prompt
        self.engine = RowEngine(
            self.backbone,
            model.exit_dict(),
            max_batch,
            max_len,
            self.max_prompt,
            exit_rule,
            graphs=self.backbone.replays_graphs,
            ragged=ragged,
        )
        vocab, device = self.backbone.lm_head.weight.shape[0], self.backbone.device
        self.chooser = TokenChooser(max_batch, vocab, device, per_row_generators=True)  # a generator per request
        self._waiting: collections.deque[_Request] = collections.deque()
        self._joining: list[_Request] = []  # have a row, prompt being encoded
        self._running: dict[int, _Request] = {}  # row -> request
        self._last = torch.zeros(max_batch, dtype=torch.long, device=self.backbone.device)
        self._rows = torch.arange(max_batch, device=self.backbone.device)
        self._lock = threading.Condition()
        self._ids = 0
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- submission (any thread) ------------------------------------------------------------------------------------
    def submit(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        config: DecodeConfig | None = None,
        stop: list[list[int]] | None = None,
        **options,
    ) -> Handle:
        """Queue one request (one prompt and its images); DecodeConfig fields given as keywords override a copy of
        `config`, the family's model inputs (`image_sizes`, `token_type_ids`...: as `generate` takes them) travel
        with it. `stop`: token sequences that end the answer (included in it), besides EOS. A sampling request
        without a `seed` gets one from torch's global generator here. Invalid options, or a
        request that could never fit this scheduler, raise ValueError here, naming the problem."""
        request = self._check(pixel_values, input_ids, attention_mask, config, stop, options)
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"the scheduler's waiting queue is full ({self.max_waiting} requests): retry later")
            self._ids += 1
            request.handle = Handle(self._ids)
            self._waiting.append(request)
            self._lock.notify()
        return request.handle

    def _check(self, pixel_values, input_ids, attention_mask, config, stop, options) -> _Request:
        names = self.backbone.input_names
        inputs = {k: options.pop(k) for k in list(options) if k in names and options[k] is not None}
        unknown = sorted(set(options) - CONFIG_FIELDS - set(names))
        if unknown:
            takes = f" and {type(self.model.model).__name__}'s inputs {', '.join(names)}" if names else ""
            raise ValueError(f"unknown option(s) {unknown}: the options are DecodeConfig's fields, stop{takes}")
        if config is not None and not isinstance(config, DecodeConfig):
            raise ValueError(f"config must be a DecodeConfig, got {type(config).__name__}")
        config = replace(config or DecodeConfig(), **options)
        config.validate()
        unsupported = {
            "num_beams": (config.num_beams == 1, "the scheduler decodes one hypothesis per request (num_beams=1)"),
            "mode": (config.mode in ("full", "early_exit"), "the scheduler runs mode 'full' or 'early_exit'"),
            "policy": (config.policy is None, "the scheduler's rows leave by their threshold: no custom policy"),
            "return_engine": (not config.return_engine, "requests share the scheduler's engine: no return_engine"),
            "batch_policy": (config.batch_policy == "auto", "its exit rule moves the rows: batch_policy='auto'"),
            "static": (config.static is None, "the scheduler keeps its own buffers: static=None"),
        }
        for name, (ok, why) in unsupported.items():
            if not ok:
                raise ValueError(f"{name}={getattr(config, name)!r} is not supported: {why}")
        if config.do_sample and config.seed is None:  # torch.manual_seed makes a run's unseeded requests repeat
            config.seed = int(torch.randint(2**63 - 1, ()))
        if input_ids is not None and (not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2)):
            raise ValueError("input_ids must be a [length] or [1, length] tensor of token ids")
        if input_ids is not None and input_ids.dim() == 1:
            input_ids = input_ids[None]
            attention_mask = None if attention_mask is None else attention_mask[None]
        if input_ids is not None and input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must hold one prompt, got {input_ids.shape[0]}")
        self._check_images(pixel_values, input_ids, inputs)
        validate_generate_inputs(self.backbone, pixel_values, input_ids, attention_mask, config.max_new_tokens, inputs)
        device = self.backbone.device
        if input_ids is None:
            input_ids = self.model.default_prompt(1, device)
        elif attention_mask is not None:  # the prompt alone: a row holds no padding (nor do inputs per prompt slot)
            keep = attention_mask[0].bool()
            per_slot = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.shape == input_ids.shape]
            inputs.update({k: inputs[k][:, keep] for k in per_slot})
            input_ids = input_ids[:, keep]
        eos, _ = self.model.special_tokens(config.eos_token_id, config.pad_token_id)
        stop = _check_stop(stop)
        prompt = self._prompt_slots(input_ids)
        encoder, decoder = prompt
        if encoder > self.max_prompt:
            raise ValueError(
                f"the prompt takes {encoder} slots (image tokens included), more than this scheduler's "
                f"max_prompt={self.max_prompt}"
            )
        if decoder + config.max_new_tokens > self.max_len:
            raise ValueError(
                f"max_new_tokens={config.max_new_tokens} with a prompt of {decoder} decoder slots needs "
                f"{decoder + config.max_new_tokens} slots, more than this scheduler's max_len={self.max_len}"
            )
        pixel_values = pixel_values.to(device=device, dtype=self.backbone.dtype)
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        return _Request(None, config, pixel_values, input_ids.to(device), frozenset(eos), stop, encoder, inputs)

    def _check_images(self, pixel_values, input_ids, inputs: dict) -> None:
        """`pixel_values` hold one prompt's images (one, or as many as its image tokens say: Gemma 3, InternVL);
        Qwen-VL's patches are checked with their grids by `validate_generate_inputs`."""
        dims = {"images": 4, "tiles": 5}.get(self.backbone.pixel_layout)
        if dims is None:
            return
        images = 1 if input_ids is None else sum(self.backbone.images_per_row(input_ids, **inputs))
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != dims or pixel_values.shape[0] != images:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            what = "one image" if images == 1 else f"the {images} images of one prompt"
            tiles = "tiles, " if dims == 5 else ""
            raise ValueError(f"pixel_values must hold {what}, [{images}, {tiles}channels, height, width], got {shape}")

    def _prompt_slots(self, input_ids: torch.Tensor) -> tuple[int, int]:
        """(encoder slots, decoder slots) of a prompt: image tokens are put in front where it has none; an
        encoder-decoder LM's decoder starts from one token."""
        cfg = self.backbone.config
        length = input_ids.shape[1]
        if cfg.image_token_index is None or not bool((input_ids == cfg.image_token_index).any()):
            length += cfg.num_query_tokens
        if self.backbone.lm.config.is_encoder_decoder:
            return length, 1
        return length, length

    # --- the loop -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the loop in a background thread until `stop()`."""
        if self._thread is not None:
            return
        self._stopping = False
        threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._loop, args=(threads,), name="freevlm-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self, threads: int) -> None:
        # a new thread starts at the OpenMP/MKL default (every core), not at the caller's `torch.set_num_threads`:
        # unset, a 1-thread caller's matmuls ran on 2 threads here, for ~18% more CPU (a 1024x1024 matmul)
        torch.set_num_threads(threads)
        while True:
            with self._lock:
                while not self._stopping and not (self._waiting or self._joining or self._running):
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except BaseException as err:  # a failed step fails every request in it, not silently the thread
                for request in [*self._running.values(), *self._joining]:
                    request.handle._finish("error", err)
                    self.engine.leave(request.row)
                    self.chooser.clear(request.row)
                self._running, self._joining = {}, []
                raise

    def run_until_idle(self) -> None:
        """Step until no request is waiting or running (in the caller's thread)."""
        while self.step():
            pass

    @property
    def running(self) -> int:
        """Requests holding a row (their prompt being encoded, or decoding)."""
        return len(self._running) + len(self._joining)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def work(self) -> dict[str, int]:
        """What the decode steps have run so far (`RowEngine`'s counters): `steps`; `rows`, the rows each step made
        a token for, summed; `calls`, layer calls with the exits'; `slot_layers`, the (slot, layer) pairs they ran.
        Their ratios are the batch (rows per step), calls per step and slot-layers per output token: whether the
        exits skip layers under this load."""
        engine = self.engine
        calls = engine.layer_calls + engine.exit_calls
        return dict(zip(WORK, (engine.steps, engine.row_steps, calls, engine.slot_layers), strict=True))

    @property
    def alive(self) -> bool:
        """Whether the background loop runs (False before `start`, after `stop`, or after a failed step)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def idle(self) -> bool:
        return not (self._waiting or self._joining or self._running)

    @torch.no_grad()
    def step(self) -> bool:
        """One iteration (see the module docstring); returns whether any request is still live."""
        self._retire_cancelled()
        self._admit()
        self._prefill()
        if self._running:
            self._decode()
        return not self.idle

    def _retire_cancelled(self) -> None:
        with self._lock:
            for request in [r for r in self._waiting if r.handle.cancel_requested]:
                self._waiting.remove(request)
                request.handle._finish("cancelled")
        for request in [*self._running.values(), *self._joining]:
            if request.handle.cancel_requested:
                self._release(request, "cancelled")

    def _release(self, request: _Request, reason: str) -> None:
        self.engine.leave(request.row)
        self.chooser.clear(request.row)
        if request.row in self._running:
            del self._running[request.row]
        else:
            self._joining.remove(request)
        request.handle._finish(reason)

    def _budget(self) -> int:
        """Prompt slots (image tokens included) this iteration may encode: `prefill_chunk` while some row decodes,
        the bound on its stall; with none decoding nobody waits on the prompts, so all of them (a burst into an idle
        scheduler joins in one window per layer, as a static batch would, not over several iterations)."""
        return self.prefill_chunk if self._running else sys.maxsize

    def _admit(self) -> None:
        """Waiting requests take free rows as long as this iteration's prefill budget (`_budget`) is not spent by
        the prompts already joining: a burst of arrivals joins over several iterations instead of freezing the
        running rows for all of them at once. The images and prompts of the requests that join in one iteration
        are encoded together (`Backbone.start_many`)."""
        taken = {r.row for r in [*self._running.values(), *self._joining]}
        free = [row for row in range(self.max_batch) if row not in taken]
        budget = self._budget() - sum(self.engine.prompt_left(r.row) for r in self._joining)
        admitted = []
        with self._lock:
            while len(admitted) < len(free) and budget > 0 and self._waiting:
                admitted.append(self._waiting.popleft())
                budget -= admitted[-1].slots
        for request, ctx in zip(admitted, self._start(admitted)):
            if isinstance(ctx, ValueError):  # refused by the family's own checks: this request alone fails
                request.handle._finish("error", ctx)
                continue
            try:  # a row the engine cannot take (T5: an encoder input longer than its rows') fails this request alone
                may_exit = request.config.mode == "early_exit" and request.config.threshold < 1.0
                self.engine.join(free[0], ctx, request.config.threshold, may_exit, request.config.kv)
            except ValueError as err:
                request.handle._finish("error", err)
                continue
            request.row = free.pop(0)
            request.prompt_ids = ctx.prompt_ids
            self._joining.append(request)

    def _start(self, requests: list[_Request]) -> list[Context | ValueError]:
        """Each request's context, their images encoded together where the family can (`Backbone.start_many`); a
        request only the family's own checks refuse (Gemma 3's token types) gets its error, the others start."""
        starts = [Start(r.pixel_values, r.input_ids, r.config.max_new_tokens, r.inputs) for r in requests]
        try:
            return self.backbone.start_many(starts) if starts else []
        except ValueError:
            contexts = []
            for start in starts:
                try:
                    contexts.append(self.backbone.start_many([start])[0])
                except ValueError as err:
                    contexts.append(err)
            return contexts

    def _prefill(self) -> None:
        """Encode joining prompts, at most `_budget()` slots in all per iteration (oldest first), together; a row
        whose prompt gave its first token's logits (its whole prompt encoded in a window) gets that token now."""
        self._joined(self.engine.prefill([request.row for request in self._joining], self._budget()))

    def _joined(self, first: dict[int, tuple[torch.Tensor, int]]) -> None:
        """Joining rows the engine made active start decoding; those with their first token's logits in `first`
        (from `prefill`, or from a step their prompt's chunk rode in) get that token now."""
        for request in [r for r in self._joining if self.engine.active[r.row]]:
            self._joining.remove(request)
            self._running[request.row] = request
            self._choose_as(request)
        if first:
            made = list(first)
            self._emit(made, torch.stack([first[row][0] for row in made]), [first[row][1] for row in made])

    def _choose_as(self, request: _Request) -> None:
        """The row starts decoding: its token choice (and generator) from now on."""
        config, ids = request.config, request.prompt_ids
        generator = make_generator(config.seed, ids.device) if config.do_sample else None
        self.chooser.set([request.row], config, ids, torch.ones_like(ids, dtype=torch.bool), generator)

    def _decode(self) -> None:
        out = self.engine.step(self._last)
        made = [row for row, done in enumerate(out.out) if done]  # a parked token is not out: nothing drawn for it
        self._emit(made, out.logits[made], [out.exit_at[row] for row in made])
        self._joined(out.first)  # after `_emit`: a joining row below the highest running one got a garbage token

    def _emit(self, made: list[int], logits: torch.Tensor, exit_at: list[int]) -> None:
        """Rows `made` choose their token from `logits [k, V]` (greedy argmax, unless a row samples); each running
        one sends it to its handle with the layer it left at (`exit_at`), and leaves if its request is done."""
        rows = self._rows[made]
        tokens = self.chooser.choose(logits, rows, made)
        self.chooser.observe(rows, tokens)
        self._last[rows] = tokens
        now = time.perf_counter()
        for row, token, layer in zip(made, tokens.tolist(), exit_at):
            request = self._running.get(row)
            if request is None:  # a row without a request (below the highest one in use): garbage
                continue
            request.handle._emit(token, layer, now)
            reason = _finished(request.handle.tokens, request)
            if reason is not None:
                self._release(request, reason)


def _finished(tokens: list[int], request: _Request) -> str | None:
    if tokens[-1] in request.eos:
        return "eos"
    if any(len(s) <= len(tokens) and tuple(tokens[-len(s) :]) == s for s in request.stop):
        return "stop"
    if len(tokens) >= request.config.max_new_tokens:
        return "length"
    return None


def _check_stop(stop) -> tuple[tuple[int, ...], ...]:
    if stop is None:
        return ()
    ok = isinstance(stop, (list, tuple)) and all(
        isinstance(s, (list, tuple)) and s and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in s)
        for s in stop
    )
    if not ok:
        raise ValueError(f"stop must be a list of token-id sequences (lists of non-negative ints), got {stop!r}")
    return tuple(tuple(s) for s in stop)
