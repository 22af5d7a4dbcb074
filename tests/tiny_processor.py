"""A word-level tokenizer and image processor sized for `freevlm.tiny` models, so the evaluation runs end to end
through `loading.VLMBundle` without any downloaded files."""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BlipImageProcessorPil, PreTrainedTokenizerFast

from freevlm.loading import VLMBundle

WORDS = [
    "a",
    "photo",
    "of",
    "question",
    "short",
    "answer",
    "what",
    "color",
    "is",
    "the",
    "square",
    "how",
    "many",
    "it",
    "red",
    "blue",
    "green",
    "one",
    "two",
    "yes",
    "no",
    "there",
    "any",
    "people",
    "big",
    "small",
    "circle",
    "triangle",
] + [":", "?", ".", ","]


def tiny_bundle(model) -> VLMBundle:
    side = model.config.vision_config.image_size
    return VLMBundle(model, tiny_tokenizer(model), BlipImageProcessorPil(size={"height": side, "width": side}))


def tiny_processor(model):
    """The model's own processor, as a LLaVA or an InstructBLIP checkpoint ships it (for `load_vlm`)."""
    from training_helpers import make_qformer_tokenizer
    from transformers import InstructBlipProcessor, LlavaProcessor

    cfg = model.config
    side = cfg.vision_config.image_size
    images = BlipImageProcessorPil(size={"height": side, "width": side})
    if cfg.model_type == "llava":  # CLIP's CLS feature is dropped by the "default" strategy: one token per patch
        return LlavaProcessor(
            images,
            tiny_tokenizer(model),
            patch_size=cfg.vision_config.patch_size,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            num_additional_image_tokens=1,
        )
    return InstructBlipProcessor(
        images, tiny_tokenizer(model), make_qformer_tokenizer(), num_query_tokens=cfg.num_query_tokens
    )


def tiny_tokenizer(model) -> PreTrainedTokenizerFast:
    """Words of the shapes world; `<image>` at the model's image token id."""
    cfg = model.config
    family = cfg.text_config.model_type
    special = ["<pad>", "</s>", "<unk>"] if family == "t5" else ["<unk>", "<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(special + WORDS)}
    size = cfg.text_config.vocab_size
    assert len(vocab) < size - 1
    vocab["<image>"] = cfg.image_token_index
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if family == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        names = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    else:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
        names = dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer
