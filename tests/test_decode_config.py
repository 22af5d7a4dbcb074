"""DecodeConfig: every generate option checked once, by name, and delivered to the search that runs it."""

import pytest
import torch
from conftest import TokenHashPolicy

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.decoding.config import DecodeConfig
from freevlm.decoding.search import SEARCH, search_name
from freevlm.tiny import tiny_blip2, tiny_inputs


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(num_beams=True), "num_beams must be a positive integer"),
        (dict(max_draft=1.5), "max_draft must be a positive integer"),
        (dict(threshold=2.0), "threshold must be a number in"),
        (dict(mode="fast"), "mode must be one of .*'speculative'"),
        (dict(kv="magic"), "kv must be one of .*'propagate'"),
        (dict(batch_policy="fastest"), "batch_policy must be one of .*'slowest'"),
        (dict(policy="confidence"), "policy must be an ExitPolicy"),
        (dict(eos_token_id=[2, "x"]), "eos_token_id must be"),
        (dict(pad_token_id=-1), "pad_token_id must be"),
        (dict(length_penalty="1"), "length_penalty must be a number"),
        (dict(early_stopping=1), "early_stopping must be one of .*'never'"),
        (dict(return_engine="yes"), "return_engine must be one of"),
        (dict(static="auto"), "static must be one of"),
        (dict(mode="speculative", num_beams=2), "speculative.*num_beams"),
        (dict(mode="speculative", kv="propagate"), "speculative.*kv='recompute'"),
        (dict(mode="speculative", batch_policy="ride_along"), "ride_along.*speculative.*'per_row'"),
        (dict(do_sample=1), "do_sample must be one of"),
        (dict(temperature=0.0), "temperature must be a number > 0"),
        (dict(temperature=float("nan")), "temperature must be a number > 0"),
        (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(top_k=2.0), "top_k must be an integer >= 0"),
        (dict(repetition_penalty=0), "repetition_penalty must be a number > 0"),
        (dict(seed=-1), "seed must be an integer"),
        (dict(seed="7"), "seed must be an integer"),
        (dict(do_sample=True, num_beams=2), "do_sample=True does not apply to beam search"),
        (dict(repetition_penalty=1.2, mode="speculative"), "repetition_penalty=1.2 does not apply to mode='spec"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        DecodeConfig(**options).validate()


def test_generate_validates_its_keywords(opt_model):
    ee = EarlyExitVLM.from_backbone(opt_model, ExitConfig([1]))
    pv, ids, mask = tiny_inputs(opt_model)
    with pytest.raises(ValueError, match="early_stopping must be one of"):
        ee.generate(pv, ids, mask, num_beams=2, early_stopping="sometimes")


def test_search_table():
    assert SEARCH[search_name(DecodeConfig())].__name__ == "greedy_generate"
    assert SEARCH[search_name(DecodeConfig(mode="full", num_beams=3))].__name__ == "beam_generate"
    assert SEARCH[search_name(DecodeConfig(mode="speculative"))].__name__ == "speculative_generate"


def test_batch_policy_reaches_speculative(family):
    model = tiny_blip2(family, seed=4, num_layers=4)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 2]))
    pv, ids, mask = tiny_inputs(model, batch=3, seed=4, pad=True)
    full = ee.generate(pv, ids, mask, max_new_tokens=8, mode="full")
    kwargs = dict(max_new_tokens=8, mode="speculative", threshold=0.0, max_draft=3, return_engine=True)
    slowest = ee.generate(pv, ids, mask, batch_policy="slowest", **kwargs)
    assert slowest.engine.batch_policy == "slowest"
    assert slowest.stats.speculative["drafted"] > 0
    assert torch.equal(slowest.sequences, full.sequences)  # speculative is lossless, whatever the batch policy
    assert ee.generate(pv, ids, mask, **kwargs).engine.batch_policy == "per_row"  # what "auto" means there


def test_return_engine_reaches_beam_search(opt_model):
    ee = EarlyExitVLM.from_backbone(opt_model, ExitConfig([1, 2]))
    pv, ids, mask = tiny_inputs(opt_model, batch=2, seed=1)
    out = ee.generate(pv, ids, mask, max_new_tokens=5, num_beams=3, threshold=0.0, return_engine=True)
    assert out.engine is not None and out.engine.batch_size == 2 * 3
    assert ee.generate(pv, ids, mask, max_new_tokens=5, num_beams=3).engine is None


def test_return_decoder_is_the_deprecated_name_of_return_engine(opt_model):
    ee = EarlyExitVLM.from_backbone(opt_model, ExitConfig([1]))
    pv, ids, mask = tiny_inputs(opt_model)
    with pytest.warns(DeprecationWarning, match="use return_engine"):
        out = ee.generate(pv, ids, mask, max_new_tokens=2, return_decoder=True)
    with pytest.warns(DeprecationWarning, match="use .engine"):
        assert out.decoder is out.engine is not None


@pytest.mark.parametrize(
    "options",
    [
        dict(max_new_tokens=6, policy=TokenHashPolicy(), eos_token_id=[], batch_policy="per_row"),
        dict(max_new_tokens=6, num_beams=2, length_penalty=0.6, early_stopping=True, threshold=0.0),
        dict(max_new_tokens=6, mode="speculative", threshold=0.0, max_draft=2, pad_token_id=0),
    ],
)
def test_config_and_keywords_give_the_same_output(opt_model, options):
    ee = EarlyExitVLM.from_backbone(opt_model, ExitConfig([1, 2]))
    pv, ids, mask = tiny_inputs(opt_model, batch=2, seed=2, pad=True)
    by_keywords = ee.generate(pv, ids, mask, **options)
    by_config = ee.generate(pv, ids, mask, config=DecodeConfig(**options))
    assert torch.equal(by_keywords.sequences, by_config.sequences)
    assert torch.equal(by_keywords.exit_layers, by_config.exit_layers)
    # a keyword overrides the config's option on a copy (Hugging Face's generation_config), the config stays as given
    config = DecodeConfig(**options)
    shorter = ee.generate(pv, ids, mask, config=config, max_new_tokens=4)
    assert config.max_new_tokens == 6
    assert shorter.exit_layers.shape[1] <= 4
    assert torch.equal(shorter.sequences, ee.generate(pv, ids, mask, **{**options, "max_new_tokens": 4}).sequences)


def test_an_unknown_keyword_is_a_type_error_naming_it(opt_model):
    ee = EarlyExitVLM.from_backbone(opt_model, ExitConfig([1]))
    with pytest.raises(TypeError, match="'treshold'.*it takes no other model inputs"):
        ee.generate(*tiny_inputs(opt_model), treshold=0.5)
