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
    """The model's own processor, as a LLaVA, an InstructBLIP or a Gemma 3 checkpoint ships it (for `load_vlm`)."""
    from training_helpers import make_qformer_tokenizer
    from transformers import Gemma3Processor, InstructBlipProcessor, LlavaProcessor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    cfg = model.config
    side = cfg.vision_config.image_size
    if cfg.model_type == "gemma3":
        images = Gemma3ImageProcessorPil(size={"height": side, "width": side})
        return Gemma3Processor(images, tiny_tokenizer(model), image_seq_length=cfg.mm_tokens_per_image)
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
    """Words of the shapes world; `<image>` at the model's image token id (Gemma 3: its image, start-of-image and
    end-of-image tokens, named as its tokenizer names them)."""
    cfg = model.config
    family = cfg.text_config.model_type
    special = ["<pad>", "</s>", "<unk>"] if family == "t5" else ["<unk>", "<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(special + WORDS)}
    size = cfg.text_config.vocab_size
    assert len(vocab) < size - 1
    gemma = dict(boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>")
    if cfg.model_type == "gemma3":
        ids = dict(boi_token=cfg.boi_token_index, eoi_token=cfg.eoi_token_index, image_token=cfg.image_token_index)
        vocab.update({gemma[name]: ids[name] for name in gemma})
    else:
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
    if cfg.model_type == "gemma3":
        return PreTrainedTokenizerFast(tokenizer_object=tok, **names, extra_special_tokens=gemma)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer
