"""`EarlyExitVLM.generate` fuzzed with Hypothesis (issue 26): inputs of every shape, dtype, batch size, mask layout
and id range, every `DecodeConfig` field in and out of range, and the model states a user reaches (cast or moved
after `from_backbone`, training mode, exits saved from another model).

Every outcome must be one of: the same tokens as a reference, a documented warning (`InputWarning`), or a
`ValueError` / `TypeError` whose message names the argument. Anything else escaping `generate` fails the test, and
Hypothesis prints the example (bounded and replayable: tests/fuzzing.py)."""

from __future__ import annotations

import math
import warnings
from dataclasses import fields

import pytest
import torch
from fuzzing import fuzz_settings
from hypothesis import event, given
from hypothesis import strategies as st

from freevlm.decoding.config import DecodeConfig
from freevlm.decoding.engine import BATCH_POLICIES, KV_MODES, resolve_batch_policy
from freevlm.decoding.policies import ConfidencePolicy, ExitPolicy
from freevlm.exits import ExitConfig
from freevlm.inputs import InputWarning
from freevlm.model import EarlyExitVLM
from freevlm.tiny import tiny_model, tiny_model_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("opt", "t5", "llama")  # BLIP-2 decoder-only, BLIP-2 encoder-decoder, LLaVA (image tokens in the prompt)
GENERATE_ARGS = ("pixel_values", "input_ids", "attention_mask", "config")
CONFIG_FIELDS = tuple(f.name for f in fields(DecodeConfig))


class Models(dict):
    def __repr__(self) -> str:  # Hypothesis prints the test's arguments with a failing example
        return f"<tiny models {', '.join(self)}>"


@pytest.fixture(scope="module")
def models():
    """One tiny model per family with exits at 1 and 2 (of 4 layers), built once for the module."""
    out = Models()
    for family in FAMILIES:
        model = tiny_model(family, seed=0)
        out[family] = EarlyExitVLM.from_backbone(model, ExitConfig(exit_layers=[1, 2]))
    return out


# --- strategies ----------------------------------------------------------------------------------------------------
def option_values(vocab: int) -> dict[str, tuple[list, list]]:
    """Per DecodeConfig field: (values in range, nearby values out of it)."""
    bad_number = [math.nan, math.inf, "1", None, True]
    values = {
        "max_new_tokens": ([1, 2, 3], [0, -1, 1.5, True, "2", None, 10**6]),
        "num_beams": ([1, 2, 3], [0, -2, 2.0, True, None]),
        "threshold": ([0.0, 0.05, 0.3, 0.9, 1.0, 1], [-0.1, 1.5, *bad_number]),
        "mode": (["full", "early_exit", "speculative"], ["fast", "", None, 0]),
        "kv": (list(KV_MODES), ["none", None]),
        "policy": ([None, ExitPolicy(), ConfidencePolicy(0.2)], ["confidence", print, 0.5]),
        "eos_token_id": ([None, 3, [3, 5], [], (3,), vocab - 1], [-1, 1.5, [3, "x"], True, "3"]),
        "pad_token_id": ([None, 0, 1, vocab - 1], [-1, 2.5, True, "0"]),
        "batch_policy": (list(BATCH_POLICIES), ["fastest", None]),
        "max_draft": ([1, 2, 6], [0, -1, 1.5]),
        "length_penalty": ([1.0, 0.0, -1.0, 2], bad_number),
        "early_stopping": ([True, False, "never"], ["always", 1, None]),
        "return_engine": ([False, True], [1, "yes"]),
        "static": ([None, True, False], ["auto", 1]),
        "do_sample": ([False, True], [1, "yes", None]),
        "temperature": ([1.0, 0.5, 2], [0, -1, *bad_number]),
        "top_p": ([1.0, 0.5], [0, 1.5, *bad_number]),
        "top_k": ([0, 1, 5], [-1, 1.5, None, True]),
        "repetition_penalty": ([1.0, 1.2, 0.5], [0, -1, *bad_number]),
        "seed": ([None, 0, 123], [-1, 2**64, 1.5, "0", True]),
    }
    return {name: values[name] for name in CONFIG_FIELDS if name in values}


# how each input may be changed from what the processor gives: (still valid, invalid)
PIXELS = (["ok", "bfloat16", "float16"], ["int", "bool", "3d", "size", "channels", "list", "nan", "batch"])
IDS = (
    ["ok", "none", "int32", "no_image_tokens"],
    ["float", "bool", "vocab", "negative", "empty", "1d", "image_token", "rows"],
)
MASKS = (["ok", "none", "middle", "bool", "float"], ["right", "zero_row", "two", "half", "shape", "nan"])


def mutate_pixels(pv: torch.Tensor, how: str):
    if how == "bfloat16":
        return pv.bfloat16()
    if how == "float16":
        return pv.half()
    if how == "int":
        return (pv * 10).long()
    if how == "bool":
        return pv > 0
    if how == "3d":
        return pv[0]
    if how == "size":
        return torch.nn.functional.interpolate(pv, scale_factor=1.5)
    if how == "channels":
        return pv[:, :1]
    if how == "list":
        return pv.tolist()
    if how == "nan":
        out = pv.clone()
        out[0, 0, 0, 0] = math.nan
        return out
    if how == "batch":
        return torch.cat([pv, pv[:1]])
    return pv


def mutate_ids(ids: torch.Tensor, how: str, vocab: int, image_token: int):
    out = ids.clone()
    if how == "none":
        return None
    if how == "int32":
        return out.int()
    if how == "float":
        return out.float()
    if how == "bool":
        return out > 5
    if how == "vocab":
        out[0, -1] = vocab
    elif how == "negative":
        out[-1, -1] = -3
    elif how == "empty":
        return out[:, :0]
    elif how == "1d":
        return out[0]
    elif how == "no_image_tokens":  # BLIP-2 puts them in front (LLaVA refuses)
        out = out[:, (out != image_token).any(0)]
    elif how == "image_token":  # one image token too many, among the text
        out[0, -1] = image_token
    elif how == "rows":
        return out[:1].expand(out.shape[0] + 1, -1)
    return out


def mutate_mask(mask: torch.Tensor, how: str):
    out = mask.clone()
    if how == "none":
        return None
    if how == "right":  # row 0 padded on the right
        out[0, -1] = 0
    elif how == "zero_row":
        out[-1] = 0
    elif how == "middle":  # a hole inside row 0's text
        out[0, -2] = 0
    elif how == "two":
        out[0, -1] = 2
    elif how == "half":
        return out.float() * 0.5
    elif how == "bool":
        return out.bool()
    elif how == "float":
        return out.float()
    elif how == "shape":
        return out[:, 1:]
    elif how == "nan":
        out = out.float()
        out[0, 0] = math.nan
    return out


# --- outcomes ------------------------------------------------------------------------------------------------------
def attempt(ee, names: set[str], *args, **kwargs):
    """`ee.generate(*args, **kwargs)`: its output and warnings, or None after a ValueError / TypeError that names one
    of `names`. Any other exception escapes (the test fails on it), as does any warning but `InputWarning`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = ee.generate(*args, **kwargs)
        except (ValueError, TypeError) as err:
            message = str(err)
            assert any(name in message for name in names), f"{type(err).__name__} names no argument: {message}"
            return None, []
    other = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, InputWarning)]
    assert not other, other
    return out, caught


def generated(out, row: int) -> tuple[list[int], list[int]]:
    """Row `row`'s new tokens and their exit layers, up to its EOS (what follows is padding)."""
    n = out.exit_layers.shape[1]
    layers = out.exit_layers[row].tolist()
    length = layers.index(-1) if -1 in layers else n
    return out.sequences[row, -n:][:length].tolist(), layers[:length]


def reference_rows(ee, pixel_values, input_ids, attention_mask, options, names):
    """Each row alone, its padding dropped, in canonical dtypes: what every row of the batch must equal when rows
    do not interact (`per_row`, or `full` mode where every row runs every layer)."""
    rows = []
    for r in range(pixel_values.shape[0]):
        ids = None
        if input_ids is not None:
            ids = input_ids[r : r + 1].long()
            if attention_mask is not None:
                ids = ids[:, attention_mask[r].bool()]
        out, caught = attempt(ee, names, pixel_values[r : r + 1].float(), ids, None, **options)
        assert out is not None and not caught, "a row alone was refused where its batch was not"
        rows.append(generated(out, 0))
    return rows


def rows_independent(options: dict, batch: int) -> bool:
    config = DecodeConfig(**options)
    if config.do_sample:  # the rows of a batch draw from one generator in turn
        return False
    if config.mode == "full" or batch == 1:
        return True
    return resolve_batch_policy(config.batch_policy, batch, config.mode == "speculative") == "per_row"


def draw_call(data, ee, valid: bool):
    """pixel_values, input_ids, attention_mask and keyword options for `ee.generate`: all valid, or with at least
    one input or option out of range (most draws break one thing, so that each check is reached on its own)."""
    model = ee.model
    vocab = model.get_input_embeddings().num_embeddings
    batch = data.draw(st.integers(1, 3), label="batch")
    inputs = tiny_model_inputs(model, batch=batch, prompt_len=data.draw(st.integers(2, 4)), seed=1, pad=True)
    options = option_values(vocab)
    broken = (
        set()
        if valid
        else set(
            data.draw(
                st.lists(st.sampled_from(["pixels", "ids", "mask", "unknown", *options]), min_size=1, max_size=2),
                label="broken",
            )
        )
    )

    def pick(name, choices):
        return data.draw(st.sampled_from(choices[name in broken]), label=name)

    pv = mutate_pixels(inputs["pixel_values"], pick("pixels", PIXELS))
    ids = mutate_ids(inputs["input_ids"], pick("ids", IDS), vocab, model.config.image_token_index)
    mask = mutate_mask(inputs["attention_mask"], pick("mask", MASKS))
    chosen = data.draw(st.lists(st.sampled_from(sorted(options)), max_size=4, unique=True), label="options")
    kwargs = {name: pick(name, options[name]) for name in sorted(set(chosen) | (broken & set(options)))}
    if ee.backbone.lm.config.is_encoder_decoder and kwargs.get("max_new_tokens") == 10**6:
        kwargs["max_new_tokens"] = 0  # T5's positions are relative: only n_positions, absent here, would refuse it
    kwargs.setdefault("max_new_tokens", 3)
    if "unknown" in broken:
        kwargs["temperatur"] = 0.5
    return pv, ids, mask, kwargs, broken


@pytest.mark.parametrize("family", FAMILIES)
@fuzz_settings(max_examples=60)
@given(data=st.data())
def test_valid_inputs_decode_as_each_row_alone(models, family, data):
    """Inputs the processor could give, in any legal dtype and layout, with every option in range: tokens, or a
    documented warning, or (options that do not go together) a ValueError naming one."""
    ee = models[family]
    pv, ids, mask, options, _ = draw_call(data, ee, valid=True)
    names = {*GENERATE_ARGS, *CONFIG_FIELDS}
    out, caught = attempt(ee, names, pv, ids, mask, **options)
    if out is None or caught:
        event("refused" if out is None else "warned")
        return
    event("decoded")
    options.pop("return_engine", None)
    batch = pv.shape[0]
    assert out.sequences.shape[0] == batch and out.exit_layers.shape[0] == batch
    if rows_independent(options, batch):
        event("compared with each row alone")
        assert [generated(out, r) for r in range(batch)] == reference_rows(ee, pv, ids, mask, options, names)


@pytest.mark.parametrize("family", FAMILIES)
@fuzz_settings(max_examples=60)
@given(data=st.data())
def test_bad_inputs_and_options_are_refused_naming_them(models, family, data):
    """At least one input or option out of range: a ValueError / TypeError naming an argument, or (for values that
    turn out legal, such as a mask hole) tokens or a documented warning; never another exception."""
    ee = models[family]
    pv, ids, mask, options, broken = draw_call(data, ee, valid=False)
    out, caught = attempt(ee, {*GENERATE_ARGS, *CONFIG_FIELDS, "temperatur"}, pv, ids, mask, **options)
    event("refused" if out is None else "warned" if caught else "decoded")
    if broken & set(CONFIG_FIELDS):  # an option out of its documented range is never taken
        assert out is None, f"{sorted(broken)} out of range, yet generate ran: {options}"


# --- model states --------------------------------------------------------------------------------------------------
CASTS = [None, torch.bfloat16, torch.float16, "round trip"]  # "round trip": to bfloat16, then back to float32


def cast(module: torch.nn.Module, how) -> None:
    if how == "round trip":
        module.to(torch.bfloat16).to(torch.float32)
    elif how is not None:
        module.to(how)


@pytest.mark.parametrize("family", ["opt", "llama"])
@fuzz_settings(max_examples=12)
@given(
    backbone_cast=st.sampled_from(CASTS),
    exits_cast=st.sampled_from(CASTS),
    training=st.sampled_from([None, "backbone", "exits"]),
    batch=st.integers(1, 2),
)
def test_backbone_cast_or_trained_after_from_backbone(family, backbone_cast, exits_cast, training, batch):
    """The backbone cast after its exits were attached (the issue's `mat1 and mat2 must have the same dtype`), the
    exits cast on their own, either in training mode: the exits follow the backbone, and the tokens are those of
    exits attached to a backbone built in that dtype (with the same exit weights); training mode warns."""
    model = tiny_model(family, seed=0)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig(exit_layers=[1, 2]))
    cast(model, backbone_cast)
    cast(ee, exits_cast)
    if training == "backbone":
        model.train()
    elif training == "exits":
        ee.train()
    inputs = tiny_model_inputs(model, batch=batch, seed=2, pad=True)
    names = set(GENERATE_ARGS)
    out, caught = attempt(ee, names, **inputs, max_new_tokens=3, threshold=0.05)
    assert out is not None
    dtype = ee.backbone.dtype
    assert {p.dtype for p in ee.exits.parameters()} == {dtype}
    if training:
        assert any("training mode" in str(w.message) for w in caught)
        return
    reference_model = tiny_model(family, seed=0).to(dtype)
    reference = EarlyExitVLM.from_backbone(reference_model, ExitConfig(exit_layers=[1, 2]))
    reference.exits.load_state_dict(ee.exits.state_dict())
    ref, _ = attempt(reference, names, **inputs, max_new_tokens=3, threshold=0.05)
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.exit_layers, ref.exit_layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moving a backbone needs a second device")
def test_backbone_moved_after_from_backbone_takes_its_exits_along():
    model = tiny_model("opt", seed=0)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig(exit_layers=[1, 2]))
    model.cuda()
    inputs = {k: v.cuda() for k, v in tiny_model_inputs(model, batch=2, seed=2, pad=True).items()}
    out = ee.generate(**inputs, max_new_tokens=3, threshold=0.05)
    assert out.sequences.device.type == "cuda"
    assert {p.device.type for p in ee.exits.parameters()} == {"cuda"}
    model.cpu()
    back = ee.generate(**{k: v.cpu() for k, v in inputs.items()}, max_new_tokens=3, threshold=0.05)
    assert {p.device.type for p in ee.exits.parameters()} == {"cpu"} and back.sequences.shape == out.sequences.shape


@pytest.fixture(scope="module")
def saved_exits(tmp_path_factory):
    """Exits folders saved from models of several kinds, each by name."""
    root = tmp_path_factory.mktemp("exits")
    folders = {}
    for name, family, seed, layers, dtype in [
        ("same backbone", "opt", 0, [1, 2], None),
        ("same backbone, saved in bfloat16", "opt", 0, [1, 2], torch.bfloat16),
        ("same backbone, other layers", "opt", 0, [3], None),
        ("other weights", "opt", 1, [1, 2], None),
        ("other family", "t5", 0, [1, 2], None),
        ("other model type", "llama", 0, [1, 2], None),
    ]:
        model = tiny_model(family, seed=seed)
        ee = EarlyExitVLM.from_backbone(model, ExitConfig(exit_layers=layers))
        with torch.no_grad():
            for p in ee.exits.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(folders))))
        if dtype is not None:
            model.to(dtype)
            ee.follow_backbone()
        ee.save_exits(root / str(len(folders)))
        folders[name] = root / str(len(folders))
    return folders


@pytest.mark.parametrize("backbone_cast", [None, torch.bfloat16])
@fuzz_settings(max_examples=8)
@given(
    source=st.sampled_from(
        [
            "same backbone",
            "same backbone, saved in bfloat16",
            "same backbone, other layers",
            "other weights",
            "other family",
            "other model type",
        ]
    )
)
def test_exits_saved_from_another_model(saved_exits, backbone_cast, source):
    """Exits load onto the backbone they were trained on (in any dtype) and decode; exits of another backbone are
    refused by `from_pretrained` with a ValueError naming the folder."""
    model = tiny_model("opt", seed=0)
    cast(model, backbone_cast)
    if source.startswith("same backbone"):
        ee = EarlyExitVLM.from_pretrained(model, saved_exits[source])
        assert {p.dtype for p in ee.exits.parameters()} == {ee.backbone.dtype}
        inputs = tiny_model_inputs(model, batch=2, seed=2, pad=True)
        out, caught = attempt(ee, set(GENERATE_ARGS), **inputs, max_new_tokens=3, threshold=0.05)
        assert out is not None and not caught
    else:
        with pytest.raises(ValueError, match=str(saved_exits[source])):
            EarlyExitVLM.from_pretrained(model, saved_exits[source])
