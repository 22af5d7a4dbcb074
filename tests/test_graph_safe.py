"""What a CUDA graph needs of a `graph_safe` backbone, checked on the CPU (capture itself needs a GPU:
bench/check_device.py checks it there).

A replayed graph reruns the device work recorded at capture: host values a segment closed over (its window's start)
stay as they were, and the host cannot read device values inside it. `FrozenReplay` stands in for the graph runner:
the static engine pads windows to buckets as on CUDA, the first segment function seen for a key runs for every later
window with that key, and any read of a device value on the host inside it fails. Decoding so must equal the general
engine under a mixed exit schedule; a layer that reads the window start on the host decodes differently.
"""

import pytest
import torch
from conftest import RandomPolicy
from torch.utils._python_dispatch import TorchDispatchMode

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.decoding import static
from freevlm.serving import Scheduler
from freevlm.tiny import tiny_inputs, tiny_model, tiny_model_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

# ops that make the host wait for the device (a value read back, or an output whose shape depends on values)
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive", "equal"}


class NoHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            raise AssertionError(f"a captured segment would read a device value on the host ({name})")
        return func(*args, **(kwargs or {}))


class PaddedEager(static.SegmentRunner):
    """Runs every segment eagerly over the windows a graph would run (padded to buckets)."""

    def __init__(self, enabled: bool):
        super().__init__(True)
        self.captured = {}

    def __call__(self, key, fn, *inputs):
        self.captured.setdefault(key, fn)
        return fn(*inputs)


class FrozenReplay(PaddedEager):
    """Replays the segment function first seen for a key, with no host reads: what capture leaves of it."""

    def __call__(self, key, fn, *inputs):
        fn = self.captured.setdefault(key, fn)
        with NoHostReads():
            return fn(*inputs)


def _static(ee, inputs, runner, monkeypatch, **kw):
    with monkeypatch.context() as patch:
        patch.setattr(static, "SegmentRunner", runner)
        init = static.StaticEngine.__init__
        patch.setattr(static.StaticEngine, "__init__", lambda self, *a, **k: init(self, *a, **{**k, "graphs": True}))
        out = ee.generate(**inputs, static=True, return_engine=True, **kw)
    assert isinstance(out.engine.runner, runner) and out.engine.runner.captured
    return out


@pytest.mark.parametrize("family", ["opt", "llama", "idefics3", "qwen2-vl", "qwen2.5-vl"])
@pytest.mark.parametrize(("batch", "kv"), [(1, "recompute"), (3, "propagate"), (3, "recompute")])
def test_graph_safe_backbones_decode_the_same_replaying_frozen_segments(family, batch, kv, monkeypatch):
    """Tokens and exit layers equal the general engine's, and every layer's K/V (the exits' too) equal an eager
    run over the same padded windows."""
    model = tiny_model(family, seed=0)
    ee = EarlyExitVLM(model, ExitConfig([1, 2]))
    assert ee.backbone.graph_safe
    inputs = tiny_model_inputs(model, batch=batch, pad=batch > 1)
    kw = dict(max_new_tokens=10, kv=kv, batch_policy="ride_along", eos_token_id=[])
    general = ee.generate(**inputs, policy=RandomPolicy(0.4, seed=batch), static=False, **kw)
    eager = _static(ee, inputs, PaddedEager, monkeypatch, policy=RandomPolicy(0.4, seed=batch), **kw)
    frozen = _static(ee, inputs, FrozenReplay, monkeypatch, policy=RandomPolicy(0.4, seed=batch), **kw)
    assert len(general.stats.exit_histogram) >= 2  # a mixed schedule: windows start at many slots
    for out in (eager, frozen):
        assert torch.equal(out.sequences, general.sequences)
        assert torch.equal(out.exit_layers, general.exit_layers)
    pairs = [
        *zip(eager.engine.kv, frozen.engine.kv, strict=True),
        *zip(eager.engine.exit_kv.values(), frozen.engine.exit_kv.values(), strict=True),
    ]
    for a, b in pairs:
        assert a.fill == b.fill
        torch.testing.assert_close(a.keys[:, :, : a.fill], b.keys[:, :, : b.fill])
        torch.testing.assert_close(a.values[:, :, : a.fill], b.values[:, :, : b.fill])


@pytest.mark.parametrize(
    ("family", "config"),
    [("gemma3", {}), ("mistral", {"sliding_window": 4}), ("qwen2-vl", {"sliding_window": 3}), ("qwen3-vl", {})],
)
def test_backbones_that_cut_windows_on_the_host_are_not_graph_safe(family, config):
    """Gemma 3's image overlay and sliding windows (Mistral's, Qwen2-VL's windowed layers here) cut the mask by the
    window start on the host; Qwen3-VL finds DeepStack's image slots from it."""
    assert not EarlyExitVLM(tiny_model(family, **config), ExitConfig([1])).backbone.graph_safe


def _schedule(ee, thresholds: list[float], frozen: bool) -> tuple[Scheduler, list]:
    # prompts join over several steps, in windows of their own: steps their chunks rode in would run eagerly
    scheduler = Scheduler(ee, max_batch=5, max_len=40, prefill_chunk=3, ragged=False)
    if frozen:
        scheduler.engine.runner = FrozenReplay(True)
    handles = []
    for i, threshold in enumerate(thresholds):
        pv, ids, _ = tiny_inputs(ee.model, batch=1, prompt_len=2 + i, seed=60 + i)
        options = dict(max_new_tokens=6 + 3 * i, threshold=threshold, eos_token_id=[])
        handles.append((scheduler.submit(pv, ids, **options), pv, ids, options))
        scheduler.step()
        scheduler.step()
    scheduler.run_until_idle()
    return scheduler, handles


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_scheduler_replaying_frozen_plain_segments_decodes_as_alone(family):
    """The continuous batcher's plain segments (every row's new slot) through `FrozenReplay`, one function per
    (layers, row bucket) whatever the rows' slots: each request still gets what `generate` gives it alone, with rows
    joining (their prompts over several steps, in rows a padded bucket covers), leaving early and finishing at
    different steps, so the buckets and the rows' slots change under it; and every K/V buffer ends as eagerly (a
    padded row writes nowhere a query reads)."""
    model = tiny_model(family, seed=5, num_layers=6)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 3]))
    with torch.no_grad():  # sharper logits: confident exits
        ee.backbone.final_norm_modules()[0].mul_(6)
    thresholds = {"opt": [1.0, 0.1, 0.15, 0.2, 1.0], "llama": [1.0, 0.05, 0.1, 0.05, 1.0]}[family]
    frozen, handles = _schedule(ee, thresholds, frozen=True)
    eager, _ = _schedule(ee, thresholds, frozen=False)
    for handle, pv, ids, options in handles:
        out = ee.generate(pv, ids, **options)
        layers = out.exit_layers[0].tolist()
        assert (handle.result().tokens, handle.result().exit_layers) == (
            out.sequences[0, -len(layers) :].tolist(),
            layers,
        )
    assert any(layer < 6 for h, *_ in handles for layer in h.result().exit_layers), "no early exit: segments alike"
    assert len({key[2] for key in frozen.engine.runner.captured}) >= 3, "too few row buckets to see"
    slots = slice(0, frozen.max_len)  # the trash slot past them is never read
    for a, b in zip(
        [*frozen.engine.kv, *frozen.engine.exit_kv.values()], [*eager.engine.kv, *eager.engine.exit_kv.values()]
    ):
        torch.testing.assert_close(a.keys[:, :, slots], b.keys[:, :, slots])
        torch.testing.assert_close(a.values[:, :, slots], b.values[:, :, slots])
