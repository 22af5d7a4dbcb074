"""LLaVA (Llama, Mistral, Qwen2 LMs), InstructBLIP (OPT, T5, Llama, Mistral, Qwen2 LMs), Gemma 3, InternVL,
SmolVLM / Idefics3, LLaVA-NeXT, LLaVA-OneVision and the Qwen-VL line (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) on the same
engine: what tests/test_engine.py, test_decoding_modes.py and test_static_engine.py show for BLIP-2, shown for these
families (their helpers reused).

Mistral, Qwen2 and Gemma 3 (its sliding layers) run with sliding windows shorter than the sequences, so the window
is exercised everywhere; Gemma 3's window (3) is shorter than its image (4 tokens that see each other both ways).
"""

import pytest
import torch
from conftest import RandomPolicy, TokenHashPolicy
from test_engine import _assert_caches_equal_full_model

from freevlm import CheckpointMismatchError, EarlyExitVLM, ExitConfig
from freevlm.backbones import load_backbone
from freevlm.backbones.base import causal_padding_mask
from freevlm.cache_utils import KVView, LayerKV
from freevlm.decoding.policies import FixedSchedulePolicy
from freevlm.decoding.static import StaticEngine
from freevlm.tiny import llava_config, tiny_model, tiny_model_inputs

FAMILIES = [
    "llama",
    "mistral",
    "qwen2",
    "instructblip-opt",
    "instructblip-t5",
    "instructblip-llama",
    "instructblip-mistral",
    "instructblip-qwen2",
    "gemma3",
    "internvl-qwen2",
    "smolvlm",
    "llava-next-qwen2",
    "llava-onevision",
    "qwen2-vl",
    "qwen2.5-vl",
    "qwen3-vl",
]
# Qwen2's (and Qwen2(.5)-VL's) from layer 1 up: full and windowed layers mixed
WINDOWS = {
    "mistral": 4,
    "qwen2": 3,
    "llava-onevision": 3,
    "qwen2-vl": 3,
    "qwen2.5-vl": 5,
    "instructblip-mistral": 4,
    "instructblip-qwen2": 3,
}
MAX_NEW = 10


@pytest.fixture(params=FAMILIES)
def new_family(request):
    return request.param


class Case:
    """A tiny model of `family` with exits and random inputs: `hf_inputs` holds all that the model's `generate`
    takes (the InstructBLIP instruction, Gemma 3's token_type_ids), passed whole to both generates; `inputs` is
    (pixel_values, input_ids, attention_mask) and `model_inputs` the family's others (`input_names`), for the
    backbone's own calls."""

    def __init__(self, family, seed=0, batch=1, pad=False, num_layers=4, exits=(1, 2, 3), sharpen=False):
        window = {"sliding_window": WINDOWS[family]} if family in WINDOWS else {}
        self.model = tiny_model(family, seed=seed, num_layers=num_layers, **window)
        self.ee = EarlyExitVLM.from_backbone(self.model, ExitConfig(list(exits)))
        if sharpen:  # sharper logits: exits are often confident, so thresholds in (0, 1) really exit
            _sharpen(_final_norm(self.ee.backbone))
        self.hf_inputs = tiny_model_inputs(self.model, batch=batch, seed=seed, pad=pad)
        self.inputs = tuple(self.hf_inputs[k] for k in ("pixel_values", "input_ids", "attention_mask"))
        self.instruction = None
        if family.startswith("instructblip"):
            self.instruction = (self.hf_inputs["qformer_input_ids"], self.hf_inputs["qformer_attention_mask"])
        self.model_inputs = {k: v for k, v in self.hf_inputs.items() if k in self.ee.backbone.input_names}

    def generate(self, **kwargs):
        return self.ee.generate(**self.hf_inputs, **kwargs)

    def hf_generate(self, **kwargs):
        return self.model.generate(**self.hf_inputs, do_sample=False, **kwargs)


def _hf_positions(ctx):
    """The context's positions of the prompt's slots for Hugging Face's forward; None for Qwen-VL's three streams
    (`[B, slots, 3]`), which its forward computes itself from the inputs (`get_rope_index`)."""
    positions = ctx.extra["positions"]
    return None if positions.dim() == 3 else positions.clamp(min=0)


def _final_norm(backbone):
    return backbone.text.norm if hasattr(backbone, "text") else backbone.decoder.final_layer_norm


@torch.no_grad()
def _sharpen(norm):
    """Scale a norm's output by 6 (Gemma's RMSNorm scales by 1 + weight)."""
    if type(norm).__name__ == "Gemma3RMSNorm":
        norm.weight.mul_(6).add_(5)
    else:
        norm.weight.mul_(6)


@pytest.mark.filterwarnings("error::FutureWarning")
@pytest.mark.parametrize("batch,pad", [(1, False), (3, True)])
def test_full_and_threshold_one_equal_hf_generate(new_family, batch, pad):
    """On the engine each batch gets by default (the static one here; tests below hold it to the general one)."""
    case = Case(new_family, seed=FAMILIES.index(new_family), batch=batch, pad=pad)
    ref = case.hf_generate(max_new_tokens=MAX_NEW, num_beams=1)
    assert torch.equal(case.generate(max_new_tokens=MAX_NEW, mode="full").sequences, ref)
    never = case.generate(max_new_tokens=MAX_NEW, threshold=1.0)
    assert torch.equal(never.sequences, ref)
    assert (never.exit_layers[never.exit_layers >= 0] == 4).all()


@pytest.mark.parametrize("family", ["opt", "t5", *FAMILIES, "idefics3"])
def test_a_row_that_ends_first_is_padded_as_hugging_face_pads(family):
    """Row 0's second token made its EOS: it ends there while the other rows go on, and both generates pad it with
    the same id (a model whose pad id lies outside its vocabulary fails here: Hugging Face embeds the padding at
    its next step, as the tiny Idefics3's default 128002 did on transformers 5.17)."""
    case = Case(family, seed=2, batch=3, pad=True)
    eos = int(case.hf_generate(max_new_tokens=MAX_NEW)[0, -MAX_NEW + 1])
    ref = case.hf_generate(max_new_tokens=MAX_NEW, eos_token_id=eos)
    assert torch.equal(case.generate(max_new_tokens=MAX_NEW, mode="full", eos_token_id=eos).sequences, ref)
    row = ref[0, -MAX_NEW:].tolist()
    assert eos in row and row.index(eos) < len(row) - 1, row  # row 0 ended before the others: it was padded


@pytest.mark.parametrize("family", ["opt", "t5", *FAMILIES, "idefics3"])
def test_stage1_parts_name_every_parameter(family):
    """`finetune`'s part flags reach the whole model: the adapter's vision, projection and LM parts hold every
    parameter, and the LM part none of the image path's (tied embeddings may stand twice within it)."""
    model = tiny_model(family)
    parts = load_backbone(model).stage1_parts()
    named = {
        name: {id(p) for m in modules for p in ([m] if isinstance(m, torch.nn.Parameter) else m.parameters())}
        for name, modules in parts.items()
    }
    assert set(named) - {"qformer"} == {"vision", "projection", "lm"}  # BLIP-2s: and their Q-Former
    assert set().union(*named.values()) == {id(p) for p in model.parameters()}
    assert not named["lm"] & (named["vision"] | named["projection"])


def test_beam_search_without_exits_equals_hugging_face(new_family):
    case = Case(new_family, seed=2, batch=2, pad=True)
    kwargs = dict(max_new_tokens=8, num_beams=3, length_penalty=0.6)
    assert torch.equal(case.generate(threshold=1.0, **kwargs).sequences, case.hf_generate(**kwargs))


def test_speculative_equals_full_greedy_at_every_threshold(new_family):
    case = Case(new_family, seed=3, batch=3, pad=True, num_layers=6, exits=(1, 2, 4), sharpen=True)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # exits nudged off the last layer: their drafts are sometimes right, sometimes wrong
        for p in case.ee.exits.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    full = case.generate(max_new_tokens=12, mode="full")
    drafted = 0
    for threshold in (0.0, 0.6):
        out = case.generate(max_new_tokens=12, mode="speculative", threshold=threshold, max_draft=4)
        assert torch.equal(out.sequences, full.sequences), threshold
        drafted += out.stats.speculative["drafted"]
    assert drafted > 0


@pytest.mark.parametrize("batch_policy", ["per_row", "ride_along"])
def test_recompute_caches_equal_full_model(new_family, batch_policy):
    """A random mixed schedule (rows compacted or riding along): every layer's and exit layer's K/V equal the full
    model's - rotary keys at their slots' positions, catch-up windows included."""
    case = Case(new_family, seed=3, batch=3, pad=True, num_layers=6, exits=(1, 3, 4))
    policy = RandomPolicy(0.4, 3) if batch_policy == "per_row" else TokenHashPolicy()
    out = case.ee.generate(
        *case.inputs,
        **case.model_inputs,
        max_new_tokens=12,
        policy=policy,
        eos_token_id=[],
        return_engine=True,
        batch_policy=batch_policy,
    )
    assert len(out.stats.exit_histogram) >= 2, out.stats.exit_histogram
    if batch_policy == "per_row":
        assert out.stats.work.catchup_slots > 0
    _assert_caches_equal_full_model(case.ee, out, *case.inputs, **case.model_inputs)


def test_threshold_zero_leaves_at_first_exit_and_runs_nothing_above(new_family):
    case = Case(new_family, seed=1, batch=2, exits=(2, 3))
    backbone = case.ee.backbone
    calls = [0] * backbone.num_layers
    hooks = [
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(backbone.layers)
    ]
    exit3_calls = []
    hooks.append(case.ee.exits["3"].layer.register_forward_hook(lambda *_: exit3_calls.append(1)))
    try:
        out = case.generate(max_new_tokens=MAX_NEW, threshold=0.0)
    finally:
        for h in hooks:
            h.remove()
    assert (out.exit_layers[out.exit_layers >= 0] == 2).all()
    encode_calls = 0 if new_family.endswith("t5") else 1  # the prompt but its last slot, once (T5: no such slots)
    assert calls[0] == calls[1] == out.stats.steps + encode_calls
    assert calls[2:] == [encode_calls] * (backbone.num_layers - 2)
    assert len(exit3_calls) == encode_calls


@pytest.mark.parametrize("kv", ["recompute", "propagate"])
def test_static_engine_equals_general(new_family, kv):
    case = Case(new_family, seed=1, batch=3, pad=True, num_layers=6, exits=(1, 3, 4), sharpen=True)
    policy = TokenHashPolicy() if kv == "recompute" else FixedSchedulePolicy([1, 6, 3, 3, 4, 6, 1, 1, 6, 4])
    kw = dict(max_new_tokens=10, kv=kv, batch_policy="ride_along", eos_token_id=[], policy=policy)
    static = case.generate(static=True, return_engine=True, **kw)
    general = case.generate(static=False, **kw)
    assert isinstance(static.engine, StaticEngine)
    assert torch.equal(static.sequences, general.sequences)
    assert torch.equal(static.exit_layers, general.exit_layers)
    assert len(static.stats.exit_histogram) >= 2


@pytest.mark.parametrize("family", ["opt", "t5", *FAMILIES])
def test_kv_projection_is_what_the_layer_caches(family):
    """Propagate mode's K/V of a skipped layer: for rotary LMs the keys are rotated by the slots' positions."""
    case = Case(family, seed=4, batch=3, pad=True)
    backbone = case.ee.backbone
    ctx = backbone.start(*case.inputs, max_new_tokens=8, **case.model_inputs)
    start, length = 2, 4  # a window that does not start at slot 0
    rows = torch.tensor([0, 2])
    x = backbone.embed(ctx, torch.randint(4, 90, (2, length)), rows, start)
    kv = LayerKV(3, start + length)
    mask = causal_padding_mask(ctx.key_mask[rows], start, start + length)
    for layer in backbone.layers:
        backbone.run_layer(layer, x, ctx, KVView(kv, rows, start, None), mask, rows)
        keys, values = backbone.kv_projection(layer, x, ctx, rows, start)
        assert torch.allclose(kv.keys[rows, :, start:], keys, atol=1e-5)
        assert torch.allclose(kv.values[rows, :, start:], values, atol=1e-5)


def test_propagate_at_threshold_one_is_the_full_model(new_family):
    case = Case(new_family, seed=6, batch=2, pad=True)
    a = case.generate(max_new_tokens=8, threshold=1.0, kv="propagate", batch_policy="per_row")
    b = case.generate(max_new_tokens=8, mode="full")
    assert torch.equal(a.sequences, b.sequences)


def test_features_are_the_full_models_hidden_states(new_family):
    """The training-time pass (`features`) gives Hugging Face's logits (padding, rotary positions, windows)."""
    case = Case(new_family, seed=7, batch=2, pad=True)
    backbone = case.ee.backbone
    if backbone.lm.config.is_encoder_decoder:
        dec = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10]])
        states, ctx, _ = backbone.features(*case.inputs, decoder_input_ids=dec, **case.model_inputs)
        ref = case.model(**case.hf_inputs, decoder_input_ids=dec).logits
    else:
        states, ctx, _ = backbone.features(*case.inputs, **case.model_inputs)
        ref = case.model(**case.hf_inputs, position_ids=_hf_positions(ctx)).logits
    real = ctx.key_mask[:, : states[-1].shape[1]]
    assert len(states) == backbone.num_layers + 1
    assert torch.allclose(backbone.head(states[-1])[real], ref[real], atol=1e-5)


# --- bad input -------------------------------------------------------------------------------------------------
def test_llava_prompt_with_the_wrong_image_token_count_is_refused():
    case = Case("llama", batch=2)
    pv, ids, mask = case.inputs
    image_token = case.model.config.image_token_index
    fewer = ids.clone()
    fewer[1, 0] = 5
    with pytest.raises(ValueError, match=r"prompt row 1 holds 3 image token\(s\).*gives 4 features"):
        case.ee.generate(pv, fewer, mask, max_new_tokens=2)
    more = torch.cat([torch.full((2, 1), image_token), ids], dim=1)
    with pytest.raises(ValueError, match=r"prompt row 0 holds 5 image token\(s\).*expands <image> into 4 tokens"):
        case.ee.generate(pv, more, torch.ones_like(more), max_new_tokens=2)


def test_unsupported_models_are_named_with_what_is_supported():
    from transformers import LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    with pytest.raises(TypeError, match="does not support LlamaForCausalLM: it supports Blip2ForConditionalGeneration"):
        load_backbone(LlamaForCausalLM(text))
    gemma = dict(
        model_type="gemma",
        vocab_size=99,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    model = LlavaForConditionalGeneration(
        LlavaConfig(text_config=gemma, vision_config=Case("llama").model.config.vision_config.to_dict())
    )
    with pytest.raises(
        TypeError,
        match="unsupported LLaVA language model 'gemma'.*LlavaForConditionalGeneration \\(llama, mistral, qwen2\\)",
    ):
        load_backbone(model)


def test_llava_settings_the_engine_cannot_honour_are_refused():
    from transformers import LlavaForConditionalGeneration

    eager = LlavaForConditionalGeneration._from_config(llava_config("llama"), attn_implementation="eager")
    with pytest.raises(ValueError, match="load it with attn_implementation='sdpa'"):
        load_backbone(eager)
    model = tiny_model("llama")
    model.model.language_model.rotary_emb.rope_type = "dynamic"
    with pytest.raises(NotImplementedError, match="rotary scaling 'dynamic'"):
        load_backbone(model)


def test_instructblip_without_its_instruction_is_refused():
    case = Case("instructblip-opt")
    with pytest.raises(ValueError, match="Q-Former reads the instruction"):
        case.ee.generate(*case.inputs, max_new_tokens=2)
    with pytest.raises(ValueError, match="the instruction has 2 rows for 1 images"):
        case.ee.generate(*case.inputs, qformer_input_ids=torch.ones(2, 3, dtype=torch.long), max_new_tokens=2)


def test_instructblip_image_features_depend_on_the_instruction():
    case = Case("instructblip-t5", batch=2)
    ids, mask = case.instruction
    a = case.ee.backbone.image_features(case.inputs[0], ids, mask)
    b = case.ee.backbone.image_features(case.inputs[0], ids.flip(0), mask.flip(0))
    assert not torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("other", ["qwen2", "opt"])
def test_exits_saved_for_another_backbone_are_refused(tmp_path, other):
    Case("llama").ee.save_exits(tmp_path / "exits")
    with pytest.raises(CheckpointMismatchError, match="trained for another backbone: family is 'llama' there"):
        EarlyExitVLM.from_pretrained(tiny_model(other), tmp_path / "exits")
    with pytest.raises(CheckpointMismatchError, match="same architecture, different weights"):
        EarlyExitVLM.from_pretrained(tiny_model("llama", seed=1), tmp_path / "exits")
    assert EarlyExitVLM.from_pretrained(tiny_model("llama"), tmp_path / "exits").exit_layers == [1, 2, 3]


def test_llava_default_prompt_is_the_image_tokens():
    case = Case("llama", batch=2)
    out = case.ee.generate(case.inputs[0], max_new_tokens=3, mode="full")
    ids = torch.full((2, 4), case.model.config.image_token_index)
    ref = case.model.generate(pixel_values=case.inputs[0], input_ids=ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(out.sequences, ref)


def test_instructblip_default_prompt_is_hugging_faces():
    """Image tokens, then BOS (Vicuna's), as Hugging Face's `generate` without input_ids; with T5, which has no
    BOS (there Hugging Face's `generate` fails), the image tokens alone."""
    case = Case("instructblip-llama", batch=2)
    out = case.ee.generate(case.inputs[0], max_new_tokens=3, mode="full", **case.model_inputs)
    ref = case.model.generate(pixel_values=case.inputs[0], **case.model_inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out.sequences, ref)
    case = Case("instructblip-t5", batch=2)
    out = case.ee.generate(case.inputs[0], max_new_tokens=3, mode="full", **case.model_inputs)
    ids = torch.full((2, case.model.config.num_query_tokens), case.model.config.image_token_index)
    same = case.ee.generate(case.inputs[0], ids, max_new_tokens=3, mode="full", **case.model_inputs)
    assert torch.equal(out.sequences, same.sequences)


@pytest.mark.parametrize("kind", ["linear", "head"])
@pytest.mark.parametrize("family", ["qwen2", "instructblip-t5", "gemma3"])
def test_every_exit_kind_decodes(family, kind):
    """Exits without a layer of their own (a linear head per exit, or the frozen head itself): tokens leave at the
    first exit at threshold 0, and speculative decoding with them as drafters stays the full model's."""
    case = Case(family, seed=5, batch=2, pad=True, num_layers=4, exits=(1, 2))
    case.ee = EarlyExitVLM.from_backbone(case.model, ExitConfig([1, 2], kind=kind))
    out = case.generate(max_new_tokens=6, threshold=0.0, eos_token_id=[])
    assert (out.exit_layers == 1).all()
    full = case.generate(max_new_tokens=6, mode="full")
    assert torch.equal(case.generate(max_new_tokens=6, mode="speculative", threshold=0.3).sequences, full.sequences)


# --- Gemma 3 ---------------------------------------------------------------------------------------------------
def test_gemma3_inputs_missing_or_inconsistent_are_refused_by_name():
    case = Case("gemma3", batch=2)
    inputs = case.hf_inputs
    without = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    with pytest.raises(ValueError, match="Gemma 3 needs token_type_ids"):
        case.ee.generate(**without, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"token_type_ids must have the shape of input_ids \(2, 7\), got \(2, 6\)"):
        case.ee.generate(**without, token_type_ids=inputs["token_type_ids"][:, 1:], max_new_tokens=2)
    types = inputs["token_type_ids"].clone()
    types[1, 5] = 1  # a text slot marked as image
    with pytest.raises(ValueError, match=r"token_type_ids disagree with input_ids at row 1, slot 5"):
        case.ee.generate(**without, token_type_ids=types, max_new_tokens=2)
    ids = inputs["input_ids"].clone()
    ids[0, 2] = 5  # an image token fewer in row 0: 7 image tokens for 2 images of 4
    with pytest.raises(ValueError, match=r"input_ids hold 7 image token\(s\) \(id 98; row 0: 3\) for 2 image"):
        case.ee.generate(**{**inputs, "input_ids": ids, "token_type_ids": (ids == 98).long()}, max_new_tokens=2)
    ends = torch.cat([inputs["input_ids"][:, 3:], inputs["input_ids"][:, :3]], dim=1)  # text, then the image
    with pytest.raises(ValueError, match="the prompt of row 0 ends with an image token"):
        case.ee.generate(**{**inputs, "input_ids": ends, "token_type_ids": (ends == 98).long()}, max_new_tokens=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'image_sizes'.*model inputs are token_type_ids"):
        case.ee.generate(**inputs, image_sizes=torch.ones(2, 2), max_new_tokens=2)
    with pytest.raises(TypeError, match="'token_type_ids'.*LlavaForConditionalGeneration.*takes no other model inputs"):
        Case("llama").ee.generate(**inputs, max_new_tokens=2)


def test_gemma3_head_is_hugging_faces_without_soft_capping():
    """`Gemma3ForConditionalGeneration` applies no final_logit_softcapping (Gemma3ForCausalLM does): with one in
    the config, the backbone's (and so every exit's) logits are still Hugging Face's."""
    case = Case("gemma3", batch=2, pad=True)
    case.model.config.text_config.final_logit_softcapping = 0.1  # below the logits: capping would change them
    states, ctx, _ = case.ee.backbone.features(*case.inputs, **case.model_inputs)
    ref = case.model(**case.hf_inputs, position_ids=ctx.extra["positions"].clamp(min=0)).logits
    real = ctx.key_mask[:, : ref.shape[1]]
    assert ref[real].abs().max() > 0.2
    assert torch.allclose(case.ee.backbone.head(states[-1])[real], ref[real], atol=1e-5)


def test_gemma3_as_an_encoder_is_refused():
    from transformers import Gemma3ForConditionalGeneration

    from freevlm.tiny import gemma3_config

    config = gemma3_config()
    config.text_config.use_bidirectional_attention = True
    with pytest.raises(ValueError, match="use_bidirectional_attention=True"):
        load_backbone(Gemma3ForConditionalGeneration(config))


# --- InternVL --------------------------------------------------------------------------------------------------
def test_internvl_with_a_llama_lm_equals_hf_generate():
    """InternVL's other LM (the matrix runs its Qwen2 one): greedy and beam, left-padded."""
    case = Case("internvl-llama", seed=2, batch=3, pad=True)
    for kwargs in (dict(num_beams=1), dict(num_beams=3, length_penalty=0.6)):
        ref = case.hf_generate(max_new_tokens=MAX_NEW, **kwargs)
        assert torch.equal(case.generate(max_new_tokens=MAX_NEW, threshold=1.0, **kwargs).sequences, ref)


# --- several images per prompt row (Gemma 3: several images or crops; InternVL: an image's tiles) ---------------
def _several_images(case):
    """Row 0 holds two images (Gemma 3: two image blocks between text; InternVL: two tiles, adjacent), row 1 one,
    left-padded: pixel_values has 3 rows, in prompt order."""
    cfg, backbone = case.model.config, case.ee.backbone
    image, per, pad = backbone.config.image_token_index, backbone.config.num_query_tokens, 1
    between = [10] if backbone.family == "gemma3_text" else []
    rows = [[image] * per + between + [image] * per + [11, 12], [image] * per + [13, 14]]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    size = case.inputs[0].shape[-1]
    inputs = {
        "pixel_values": torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0)),
        "input_ids": ids,
        "attention_mask": mask,
    }
    if "token_type_ids" in backbone.input_names:
        inputs["token_type_ids"] = (ids == image).long()
    assert cfg is not None and backbone.images_per_row(ids) == [2, 1]
    return inputs


@pytest.mark.parametrize("family", ["gemma3", "internvl-qwen2", "llava-onevision"])
def test_several_images_per_row_equal_hf_generate(family):
    """Greedy, threshold 1.0 and beam search equal Hugging Face's (whose generate repeats each row's images as a
    group per beam, since it encodes images before expanding), speculative equals greedy; images in another order
    change the output. LLaVA-OneVision says which row holds which images by `batch_num_images`."""
    case = Case(family, seed=5, sharpen=True)
    inputs = _onevision_several_images(case.model) if family == "llava-onevision" else _several_images(case)
    ref = case.model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    assert torch.equal(case.ee.generate(**inputs, max_new_tokens=MAX_NEW, mode="full").sequences, ref)
    assert torch.equal(case.ee.generate(**inputs, max_new_tokens=MAX_NEW, threshold=1.0).sequences, ref)
    from transformers import GenerationMixin

    if hasattr(GenerationMixin, "_expand_multimodal_outputs"):  # before (5.17), its beams got [A, A, B, B]
        beam = dict(max_new_tokens=6, num_beams=3, length_penalty=0.6)
        hf_beam = case.model.generate(**inputs, do_sample=False, **beam)
        assert torch.equal(case.ee.generate(**inputs, threshold=1.0, **beam).sequences, hf_beam)
    out = case.ee.generate(**inputs, max_new_tokens=MAX_NEW, mode="speculative", threshold=0.0)
    assert torch.equal(out.sequences, ref) and out.stats.speculative["drafted"] > 0
    swapped = dict(inputs, pixel_values=inputs["pixel_values"][[1, 0, 2]])
    logits = [case.model(**x).logits[0, -1] for x in (inputs, swapped)]
    assert not torch.allclose(*logits, atol=1e-4)


def test_several_images_per_row_counts_are_checked():
    case = Case("internvl-qwen2")
    inputs = _several_images(case)
    with pytest.raises(ValueError, match=r"image tokens of input_ids stand for 3 image\(s\) \(per row: \[2, 1\]\) but"):
        case.ee.generate(**dict(inputs, pixel_values=inputs["pixel_values"][:2]), max_new_tokens=2)
    ids = inputs["input_ids"].clone()
    ids[0, 0] = 5  # 7 image tokens in row 0: not a whole number of images
    with pytest.raises(ValueError, match=r"input_ids hold 11 image token\(s\) \(id 98; row 0: 7\) for 3 image"):
        case.ee.generate(**dict(inputs, input_ids=ids), max_new_tokens=2)


# --- LLaVA-NeXT ------------------------------------------------------------------------------------------------
def test_llava_next_inputs_missing_or_inconsistent_are_refused_by_name():
    case = Case("llava-next-qwen2", batch=3, pad=True)
    inputs = case.hf_inputs
    without = {k: v for k, v in inputs.items() if k != "image_sizes"}
    with pytest.raises(ValueError, match="LLaVA-NeXT needs image_sizes"):
        case.ee.generate(**without, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"image_sizes must be \[images, 2\] \(3, 2\), got \(2, 2\)"):
        case.ee.generate(**without, image_sizes=inputs["image_sizes"][:2], max_new_tokens=2)
    sizes = inputs["image_sizes"][[0, 0, 0]]  # other sizes: more features than the prompts' image tokens
    with pytest.raises(ValueError, match=r"input_ids hold 54 image token\(s\) \(id 98; per row: \[24, 14, 16\]\)"):
        case.ee.generate(**without, image_sizes=sizes, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"pixel_values must be a \[batch, tiles, channels, height, width\]"):
        case.ee.generate(**dict(inputs, pixel_values=inputs["pixel_values"][:, 0]), max_new_tokens=2)


# --- LLaVA-OneVision --------------------------------------------------------------------------------------------
def _onevision_several_images(model):
    """Row 0 holds two images (each its base tile and a newline feature, as Hugging Face lays out a
    row of several), row 1 one image at its best-fitting grid, left-padded; `batch_num_images` says which."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([2, 1])
    pixel_values = torch.randn(int(counts.sum()), 5, 3, 16, 16, generator=gen)
    sizes = torch.tensor([[30, 28], [12, 30], [31, 14]])
    output = model.model.get_image_features(pixel_values, sizes, batch_num_images=counts)
    lengths = [len(f) for f in output.pooler_output]
    image = model.config.image_token_index
    rows = [[image] * sum(lengths[:-1]) + [11, 12], [image] * lengths[-1] + [13, 14, 15]]
    width = max(len(r) for r in rows)
    return {
        "pixel_values": pixel_values,
        "input_ids": torch.tensor([[1] * (width - len(r)) + r for r in rows]),
        "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
        "image_sizes": sizes,
        "batch_num_images": counts,
    }


def test_llava_onevision_inputs_missing_or_inconsistent_are_refused_by_name():
    case = Case("llava-onevision", batch=2, pad=True)
    inputs = _onevision_several_images(case.model)
    generate = lambda **changed: case.ee.generate(**{**inputs, **changed}, max_new_tokens=2)  # noqa: E731
    without = {k: v for k, v in inputs.items() if k != "batch_num_images"}  # one image per row: 3 for 2 rows
    with pytest.raises(ValueError, match=r"input_ids has 2 rows but pixel_values has 3 images"):
        case.ee.generate(**without, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"batch_num_images must be an integer tensor of \(2,\).*got \(3,\)"):
        generate(batch_num_images=torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match=r"batch_num_images must be an integer tensor.*got list"):
        generate(batch_num_images=[2, 1])
    with pytest.raises(
        ValueError, match=r"prompt row 1 holds 8 image token\(s\) \(id 98\) but its 2 image\(s\) give 10"
    ):
        generate(batch_num_images=torch.tensor([1, 2]))  # the images' count right, the rows' wrong
    ids = inputs["input_ids"].clone()
    ids[0, 0] = 5  # an image token fewer in row 0 (HF would shift the features of row 1 into it)
    with pytest.raises(
        ValueError, match=r"prompt row 0 holds 9 image token\(s\) \(id 98\) but its 2 image\(s\) give 10"
    ):
        generate(input_ids=ids)
    with pytest.raises(ValueError, match="LLaVA-OneVision needs image_sizes"):
        case.ee.generate(**{k: v for k, v in inputs.items() if k != "image_sizes"}, max_new_tokens=2)
    with pytest.raises(TypeError, match="'pixel_values_videos'.*model inputs are image_sizes, batch_num_images"):
        generate(pixel_values_videos=inputs["pixel_values"])


# --- SmolVLM / Idefics3 ----------------------------------------------------------------------------------------
def test_idefics3_equals_hf_generate():
    """Idefics3's class (the matrix runs SmolVLM's; same adapter, Hugging Face's own image path): greedy and beam,
    left-padded, rows with different numbers of tiles."""
    case = Case("idefics3", seed=2, batch=3, pad=True)
    for kwargs in (dict(num_beams=1), dict(num_beams=3, length_penalty=0.6)):
        ref = case.hf_generate(max_new_tokens=MAX_NEW, **kwargs)
        assert torch.equal(case.generate(max_new_tokens=MAX_NEW, threshold=1.0, **kwargs).sequences, ref)


def test_smolvlm_inputs_missing_or_inconsistent_are_refused_by_name():
    case = Case("smolvlm", batch=3, pad=True)
    inputs = case.hf_inputs
    pixels, mask = inputs["pixel_values"], inputs["pixel_attention_mask"]
    with pytest.raises(ValueError, match=r"pixel_values must be a \[batch, tiles, channels, height, width\] tensor"):
        case.ee.generate(**dict(inputs, pixel_values=pixels[:, 0]), max_new_tokens=2)
    with pytest.raises(
        ValueError, match=r"pixel_attention_mask must be \[batch, tiles, height, width\] \(3, 2, 16, 16\)"
    ):
        case.ee.generate(**dict(inputs, pixel_attention_mask=mask[:, :1]), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"input_ids has 3 rows but pixel_values has 2 images"):
        case.ee.generate(**dict(inputs, pixel_values=pixels[:2], pixel_attention_mask=mask[:2]), max_new_tokens=2)
    one_tile = pixels.clone()
    one_tile[0, 1] = 0  # row 0's second tile now padding: its 4 image tokens have no features
    with pytest.raises(ValueError, match=r"prompt row 0 holds 8 image token\(s\) \(id 98\) but its tiles give 4"):
        case.ee.generate(**dict(inputs, pixel_values=one_tile), max_new_tokens=2)
    with pytest.raises(TypeError, match="'image_sizes'.*model inputs are pixel_attention_mask"):
        case.ee.generate(**inputs, image_sizes=torch.ones(3, 2), max_new_tokens=2)
    without = {k: v for k, v in inputs.items() if k != "pixel_attention_mask"}  # Hugging Face's default: all pixels
    ref = case.model.generate(**without, max_new_tokens=4, do_sample=False)
    assert torch.equal(case.ee.generate(**without, max_new_tokens=4, mode="full").sequences, ref)


# --- Qwen-VL ---------------------------------------------------------------------------------------------------
def test_qwen_vl_inputs_missing_or_inconsistent_are_refused_by_name():
    case = Case("qwen2-vl", batch=3, pad=True)  # images of 6, 4 and 2 tokens (grids 4x6, 4x4, 2x4 patches)
    inputs = case.hf_inputs
    generate = lambda **changed: case.ee.generate(**{**inputs, **changed}, max_new_tokens=2)  # noqa: E731
    without = {k: v for k, v in inputs.items() if k != "image_grid_thw"}
    with pytest.raises(ValueError, match="Qwen2-VL needs image_grid_thw"):
        case.ee.generate(**without, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"image_grid_thw must be an integer \[images, 3\] tensor.*got \(3, 2\)"):
        generate(image_grid_thw=inputs["image_grid_thw"][:, 1:])
    grid = inputs["image_grid_thw"].clone()
    grid[2, 2] = 3  # not a multiple of the 2x2 merge
    with pytest.raises(ValueError, match="multiples of 2"):
        generate(image_grid_thw=grid)
    grid[2] = torch.tensor([1, 2, 2])  # 4 patches fewer
    with pytest.raises(ValueError, match=r"pixel_values has 48 patches but image_grid_thw .* makes 44"):
        generate(image_grid_thw=grid)
    with pytest.raises(ValueError, match=r"flattened patches, \[patches, 24\], got \(3, 3, 8, 8\)"):
        generate(pixel_values=torch.randn(3, 3, 8, 8))
    grid = inputs["image_grid_thw"][[1, 0, 2]]  # the first two images' sizes swapped: same patches, same tokens
    with pytest.raises(ValueError, match="prompt row 0's image tokens do not cover whole images"):
        generate(image_grid_thw=grid)
    ids = inputs["input_ids"].clone()
    ids[0, 1] = 5  # an image token fewer
    with pytest.raises(ValueError, match=r"input_ids hold 11 image token\(s\) \(id 98\) but image_grid_thw's 3"):
        generate(input_ids=ids)
    types = inputs["mm_token_type_ids"]
    with pytest.raises(ValueError, match="Qwen2-VL needs mm_token_type_ids"):
        case.ee.generate(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"}, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"mm_token_type_ids must have the shape of input_ids \(3, 11\)"):
        generate(mm_token_type_ids=types[:, 1:])
    wrong = types.clone()
    wrong[1, 9] = 1  # a text slot marked as image
    with pytest.raises(ValueError, match="mm_token_type_ids disagree with input_ids at row 1, slot 9"):
        generate(mm_token_type_ids=wrong)
    with pytest.raises(ValueError, match=r"mark video tokens \(2\)"):
        generate(mm_token_type_ids=types.masked_fill(types.bool(), 2))
    with pytest.raises(ValueError, match="Qwen2-VL needs input_ids"):
        case.ee.generate(inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], max_new_tokens=2)
    with pytest.raises(TypeError, match="'video_grid_thw'.*model inputs are image_grid_thw, mm_token_type_ids"):
        generate(video_grid_thw=inputs["image_grid_thw"])


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_qwen_vl_several_images_per_row_equal_hf_generate(family):
    """Row 0 holds two images of different sizes, row 1 one (left-padded): greedy and beam search equal Hugging
    Face's (each beam gets its row's patches and grids); images in another order change the output."""
    case = Case(family, seed=5, batch=3, pad=True)
    x = case.hf_inputs
    cfg = case.model.config
    rows = x["input_ids"][:, :].tolist()
    pad = cfg.text_config.pad_token_id
    two = [t for t in rows[0] if t != pad] + [t for t in rows[1] if t != pad]
    one = [t for t in rows[2] if t != pad]
    ids = torch.tensor([two, [pad] * (len(two) - len(one)) + one])
    mask = (torch.arange(len(two)) >= len(two) - torch.tensor([[len(two)], [len(one)]])).long()
    inputs = dict(x, input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == cfg.image_token_id).long())
    assert case.ee.backbone.images_per_row(ids, x["image_grid_thw"]) == [2, 1]
    ref = case.model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    assert torch.equal(case.ee.generate(**inputs, max_new_tokens=MAX_NEW, mode="full").sequences, ref)
    beam = dict(max_new_tokens=6, num_beams=3, length_penalty=0.6)
    hf_beam = case.model.generate(**inputs, do_sample=False, **beam)
    assert torch.equal(case.ee.generate(**inputs, threshold=1.0, **beam).sequences, hf_beam)


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl"])
def test_qwen_vl_positions_are_the_ones_hf_generate_feeds(family):
    """Every slot's three rotary positions (prompt and new tokens, left-padded rows of different image sizes) are
    the ones the model's own `generate` hands its language model, step by step."""
    case = Case(family, batch=3, pad=True)
    seen = []
    hook = case.model.model.language_model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["position_ids"][-3:]), with_kwargs=True
    )
    try:
        case.hf_generate(max_new_tokens=6, min_new_tokens=6)
    finally:
        hook.remove()
    hf = torch.cat(seen, dim=2).permute(1, 2, 0)  # [B, slots, 3]
    ctx = case.ee.backbone.start(*case.inputs, max_new_tokens=6, **case.model_inputs)
    ours = ctx.extra["positions"][:, : hf.shape[1]]
    real = ctx.key_mask[:, : hf.shape[1]]
    assert torch.equal(ours[real], hf[real])
    assert (ours[real][:, 1] != ours[real][:, 2]).any()  # the image tokens' height and width differ
