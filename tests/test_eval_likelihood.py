"""Option log-likelihoods with exits: at threshold 1.0 they equal the Hugging Face model's own; a forced exit uses
that exit's distribution for every token; threshold 0 is the first exit."""

import pytest
import torch
from PIL import Image
from tiny_processor import tiny_bundle

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.eval.likelihood import option_log_likelihoods

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
            extra = {}
            if "token_type_ids" in inputs:  # Gemma 3: the option is text
                extra["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.zeros_like(target)], 1)
            logits = model(pixel_values=inputs["pixel_values"], input_ids=ids, attention_mask=mask, **extra).logits
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
    assert len({round(x, 3) for x in ours}) == len(OPTIONS)  # options really score differently
    forced_final = option_log_likelihoods(ee, bundle, image, PROMPT, OPTIONS, layer=4)
    assert forced_final == pytest.approx(ours, abs=1e-5)


def test_gemma3_final_layer_equals_hugging_face():
    """Gemma 3 through its processor: the batch carries token_type_ids (0 at the options' tokens)."""
    from tiny_processor import tiny_processor

    from freevlm.loading import VLMBundle
    from freevlm.tiny import tiny_model

    model = tiny_model("gemma3", seed=1)
    processor = tiny_processor(model)
    bundle = VLMBundle(model, processor.tokenizer, processor.image_processor, processor)
    ee = EarlyExitVLM(model, ExitConfig([1, 2], init="fresh"))
    image = Image.new("RGB", (32, 32), (10, 200, 40))
    ours = option_log_likelihoods(ee, bundle, image, PROMPT, OPTIONS, threshold=1.0, batch_size=3)
    assert ours == pytest.approx(hf_log_likelihoods(bundle, image, PROMPT, OPTIONS), abs=1e-4)
    assert len({round(x, 3) for x in ours}) == len(OPTIONS)


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


def test_linear_exits_score_through_their_own_classifier_under_their_method(opt_model):
    """Baselines rank too: a linear exit's distribution is its own classifier on h_i (the frozen head would give
    another), and the method's rule picks the exit (DeeBLIP's confidence, PABEE's patience)."""
    bundle = tiny_bundle(opt_model)
    ee = EarlyExitVLM(opt_model, ExitConfig([1, 2], kind="linear"))
    torch.manual_seed(0)
    for e in ee.exits.values():  # untrained classifiers equal the LM head: move them away from it
        e.classifier.weight.data += 0.5 * torch.randn_like(e.classifier.weight)
    image = Image.new("RGB", (32, 32), (10, 200, 40))
    ref = []
    for option in OPTIONS:  # Hugging Face's h_1 of prompt + option through exit 1's classifier
        inputs = bundle.inputs([image], [PROMPT])
        target = torch.tensor([bundle.tokenizer(" " + option, add_special_tokens=False)["input_ids"]])
        out = opt_model(
            pixel_values=inputs["pixel_values"],
            input_ids=torch.cat([inputs["input_ids"], target], 1),
            attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(target)], 1),
            output_hidden_states=True,
        )
        h1 = out.language_model_outputs.hidden_states[1][0, inputs["input_ids"].shape[1] - 1 : -1]
        logp = torch.log_softmax(ee.exits["1"].logits(ee.backbone, h1).float(), -1)
        ref.append(logp.gather(-1, target[0][:, None]).sum().item())
    forced = option_log_likelihoods(ee, bundle, image, PROMPT, OPTIONS, layer=1)
    assert forced == pytest.approx(ref, abs=1e-4)
    assert forced != pytest.approx(
        option_log_likelihoods(EarlyExitVLM(opt_model, ExitConfig([1, 2])), bundle, image, PROMPT, OPTIONS, layer=1),
        abs=1e-3,
    )
    assert option_log_likelihoods(ee, bundle, image, PROMPT, OPTIONS, threshold=0.0, method="deeblip") == forced
    assert option_log_likelihoods(ee, bundle, image, PROMPT, OPTIONS, threshold=1, method="pabee") == forced
    never = option_log_likelihoods(ee, bundle, image, PROMPT, OPTIONS, threshold=1000, method="pabee")
    assert never == pytest.approx(option_log_likelihoods(ee, bundle, image, PROMPT, OPTIONS, layer=4), abs=1e-6)
