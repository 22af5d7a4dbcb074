"""Continuous batching (freevlm.serving) on the families with Llama-like LMs and their own inputs: every request gets
what `EarlyExitVLM.generate` gives it alone, tokens and exit layers, with rows joining at different steps, prompts
encoded in chunks and a row reused. Sliding windows (Mistral, Qwen2, Qwen2-VL, Gemma 3's sliding layers) are shorter
than the sequences; Qwen-VL's rows carry their three rotary position streams; Gemma 3's chunks never cut an image."""

import pytest
import torch
from test_families import WINDOWS, _sharpen

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.serving import Scheduler
from freevlm.tiny import tiny_model, tiny_model_inputs

FAMILIES = [
    "mistral",
    "gemma3",
    "internvl-qwen2",
    "smolvlm",
    "llava-next-qwen2",
    "llava-onevision",
    "qwen2-vl",
    "qwen2.5-vl",
    "instructblip-llama",
    "qwen3-vl",
]
# Those whose joining prompts ride in the decode steps' layer calls (`RotaryDecoder.ragged_layers`: Hugging Face's
# Llama and Qwen2 layers with full attention); the others' have sliding windows, their own layer classes or positions
RAGGED = {"internvl-qwen2", "smolvlm", "llava-next-qwen2", "instructblip-llama"}


def _request(backbone, inputs: dict, b: int) -> dict:
    """Row `b` of a left-padded batch as a request of its own, its padding dropped (its image, tiles or patches)."""
    keep = inputs["attention_mask"][b].bool()
    request = {}
    for name, value in inputs.items():
        if name in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"):  # per prompt slot
            request[name] = value[b : b + 1, keep]
        elif name == "pixel_values" and backbone.pixel_layout == "patches":  # Qwen-VL: the row's image's patches
            sizes = inputs["image_grid_thw"].prod(-1).tolist()
            request[name] = torch.split(value, sizes)[b]
        else:  # one image (or its tiles) per row
            request[name] = value[b : b + 1]
    return request


def _case(family: str):
    """A tiny model of `family` with exits, three requests (thresholds 0, 0.3, 1) and what `generate` gives each."""
    window = {"sliding_window": WINDOWS[family]} if family in WINDOWS else {}  # Gemma 3's: 3 in any tiny one
    model = tiny_model(family, seed=5, num_layers=6, **window)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 3, 4]))
    _sharpen(ee.backbone.text.norm)
    batch = tiny_model_inputs(model, batch=3, prompt_len=4, seed=1, pad=True)
    requests = [_request(ee.backbone, batch, b) for b in range(3)]
    options = [dict(threshold=t, max_new_tokens=8, eos_token_id=[]) for t in (0.0, 0.3, 1.0)]
    expected = []
    for request, option in zip(requests, options):
        out = ee.generate(**request, **option)
        expected.append((out.sequences[0, request["input_ids"].shape[1] :].tolist(), out.exit_layers[0].tolist()))
    return ee, requests, options, expected


@pytest.mark.parametrize("family", FAMILIES)
def test_every_request_decodes_as_alone(family):
    ee, requests, options, expected = _case(family)
    scheduler = Scheduler(ee, max_batch=2, max_len=40, prefill_chunk=3)  # the third waits for a free row
    handles = [scheduler.submit(**requests[0], **options[0])]
    scheduler.step()
    handles += [scheduler.submit(**r, **o) for r, o in zip(requests[1:], options[1:])]
    scheduler.run_until_idle()
    for handle, (tokens, layers) in zip(handles, expected):
        result = handle.result(timeout=0)
        assert (result.tokens, result.exit_layers) == (tokens, layers)
    assert {layer for _, layers in expected for layer in layers} != {6}  # some tokens left early
    assert (scheduler.engine.riding_slots > 0) == (family in RAGGED)


@pytest.mark.parametrize("family", ["gemma3", "qwen2-vl", "internvl-qwen2", "llava-next-qwen2"])
def test_requests_joining_together_decode_as_alone(family):
    """All three join in one iteration: images stacked where the family can (InternVL: LLaVA's image path with
    several tiles per prompt, one call per request here), prompts in one window where their positions are their slots
    (Gemma 3's images see themselves both ways, Qwen-VL's positions follow the image grid: each its own context)."""
    ee, requests, options, expected = _case(family)
    scheduler = Scheduler(ee, max_batch=3, max_len=40, prefill_chunk=256)
    windows, encode = [], scheduler.engine._encode
    scheduler.engine._encode = lambda rows, chunks, own=False: windows.append(len(rows)) or encode(rows, chunks, own)
    handles = [scheduler.submit(**r, **o) for r, o in zip(requests, options)]
    scheduler.step()
    assert scheduler.running == 3
    scheduler.run_until_idle()
    for handle, (tokens, layers) in zip(handles, expected):
        result = handle.result(timeout=0)
        assert (result.tokens, result.exit_layers) == (tokens, layers)
    assert max(windows) == (1 if family in ("gemma3", "qwen2-vl") else 3)


def test_family_inputs_are_refused_by_name_at_submission():
    model = tiny_model("llava-next-qwen2")
    scheduler = Scheduler(EarlyExitVLM.from_backbone(model, ExitConfig([1])), max_batch=1, max_len=40)
    request = _request(scheduler.backbone, tiny_model_inputs(model), 0)
    with pytest.raises(ValueError, match="LLaVA-NeXT needs image_sizes"):
        scheduler.submit(**{k: v for k, v in request.items() if k != "image_sizes"})
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) \['token_type_ids'\].*LlavaNextForConditional.*image_sizes"
    ):
        scheduler.submit(**request, token_type_ids=request["input_ids"])
    with pytest.raises(ValueError, match=r"pixel_values must hold one image, \[1, tiles, channels, height, width\]"):
        scheduler.submit(**dict(request, pixel_values=request["pixel_values"][0]))


def test_a_request_its_family_refuses_when_it_starts_fails_alone():
    """Gemma 3's token types are checked when its request starts: that request fails, the others run."""
    model = tiny_model("gemma3")
    scheduler = Scheduler(EarlyExitVLM.from_backbone(model, ExitConfig([1])), max_batch=2, max_len=40)
    good = _request(scheduler.backbone, tiny_model_inputs(model), 0)
    bad = scheduler.submit(**dict(good, token_type_ids=torch.zeros_like(good["token_type_ids"])), max_new_tokens=2)
    fine = scheduler.submit(**good, max_new_tokens=2)
    scheduler.run_until_idle()
    assert bad.finish_reason == "error" and fine.result(timeout=0).finish_reason == "length"
    with pytest.raises(ValueError, match="token_type_ids disagree with input_ids"):
        bad.result(timeout=0)


def test_qwen_vl_rows_get_the_positions_generate_gives():
    """A window of rows at their own slots gets each row's three position streams as its request alone has them
    (the last prompt slot's plus the distance from it), rows of different image sizes side by side. Qwen2-VL's tiny
    random LM hardly tells positions apart, so this is checked here rather than through its tokens."""
    model = tiny_model("qwen2-vl")
    backbone = EarlyExitVLM.from_backbone(model, ExitConfig([1])).backbone
    batch = tiny_model_inputs(model, batch=3, pad=True)
    rows_ctx = backbone.rows_context(3, 40, 40)
    contexts = []
    for b in range(3):
        request = _request(backbone, batch, b)
        inputs = {k: request[k] for k in backbone.input_names}
        contexts.append(backbone.start(request["pixel_values"], request["input_ids"], None, 8, **inputs))
        backbone.join_row(rows_ctx, b, contexts[-1])
    lengths = [ctx.prompt_ids.shape[1] for ctx in contexts]
    slots = torch.tensor([[length - 1 + i for i in range(6)] for length in lengths])
    window = backbone.window_context(rows_ctx, slots)
    for b, (ctx, length) in enumerate(zip(contexts, lengths)):
        assert torch.equal(window.extra["positions"][b], ctx.extra["positions"][0, length - 1 : length + 5])
    assert len({int(p[0, 0] - s[0]) for p, s in zip(window.extra["positions"], slots)}) > 1  # rows' offsets differ
