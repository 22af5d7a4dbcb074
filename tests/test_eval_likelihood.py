"""Option log-likelihoods with exits: at threshold 1.0 they equal the Hugging Face model's own; a forced exit uses
that exit's distribution for every token; threshold 0 is the first exit."""

import pytest
import torch
from PIL import Image

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.eval.likelihood import option_log_likelihoods
from tiny_processor import tiny_bundle

OPTIONS = ["red", "blue square", "no", "two big circle"]
PROMPT = "question : what color is it ? answer :"


def hf_log_likelihoods(bundle, image, prompt, options):
    """Reference: Blip2ForConditionalGeneration.forward on prompt + option, summed over the option's tokens."""
    model, tok = bundle.model, bundle.tokenizer
    out = []
    for option in options:
        inputs = bundle.inputs([image], [prompt])
        if model.config.text_config.model_type == "t5":
            target = torch.tensor([tok(option)["input_ids"]])
            logits = model(**inputs, labels=target).logits
            logp = torch.log_softmax(logits.float(), -1)[0]
            out.append(logp.gather(-1, target[0][:, None]).sum().item())
        else:
            target = torch.tensor([tok(" " + option, add_special_tokens=False)["input_ids"]])
            ids = torch.cat([inputs["input_ids"], target], 1)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(target)], 1)
            logits = model(pixel_values=inputs["pixel_values"], input_ids=ids, attention_mask=mask).logits
            logp = torch.log_softmax(logits.float(), -1)[0, inputs["input_ids"].shape[1] - 1 : -1]
            out.append(logp.gather(-1, target[0][:, None]).sum().item())
    return out


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_final_layer_equals_hugging_face(family, opt_model, t5_model):
    model = opt_model if family == "opt" else t5_model
    bundle = tiny_bundle(model)
    ee = EarlyExitVLM(model, ExitConfig([1, 2], init="fresh"))
    image = Image.new("RGB", (32, 32), (10, 200, 40))
    ours = option_log_likelihoods(ee, bundle, image, PROMPT, OPTIONS, threshold=1.0, batch_size=3)
    ref = hf_log_likelihoods(bundle, image, PROMPT, OPTIONS)
    assert ours == pytest.approx(ref, abs=1e-4)
    assert len(set(round(x, 3) for x in ours)) == len(OPTIONS)  # options really score differently
    forced_final = option_log_likelihoods(ee, bundle, image, PROMPT, OPTIONS, layer=4)
    assert forced_final == pytest.approx(ours, abs=1e-5)


def test_exits_change_the_scores(opt_model):
    bundle = tiny_bundle(opt_model)
    ee = EarlyExitVLM(opt_model, ExitConfig([1, 2], init="fresh"))
    image = Image.new("RGB", (32, 32), (10, 200, 40))
    first = option_log_likelihoods(ee, bundle, image, PROMPT, OPTIONS, layer=1)
    assert option_log_likelihoods(ee, bundle, image, PROMPT, OPTIONS, threshold=0.0) == pytest.approx(first)
    final = option_log_likelihoods(ee, bundle, image, PROMPT, OPTIONS, threshold=1.0)
    assert first != pytest.approx(final, abs=1e-3)
    with pytest.raises(ValueError, match="layer 3 has no exit"):
        option_log_likelihoods(ee, bundle, image, PROMPT, OPTIONS, layer=3)
