"""A word-level tokenizer and image processor sized for `freevlm.tiny` models, so the evaluation runs end to end
through `loading.VLMBundle` without any downloaded files."""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BlipImageProcessorPil, PreTrainedTokenizerFast

from freevlm.loading import VLMBundle, images_only

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


# the special tokens Idefics3's and SmolVLM's processors write around tiles (`Idefics3Processor.replace_image_token`)
IDEFICS3_TOKENS = [
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
    "<end_of_utterance>",
    "<global-img>",
    "<fake_token_around_image>",
]


def tiny_bundle(model) -> VLMBundle:
    side = model.config.vision_config.image_size
    return VLMBundle(model, tiny_tokenizer(model), BlipImageProcessorPil(size={"height": side, "width": side}))


def tiny_processor(model):
    """The model's own processor, as a LLaVA, InternVL, LLaVA-NeXT, LLaVA-OneVision, SmolVLM, Idefics3, InstructBLIP or
    Gemma 3 checkpoint ships it (for `load_vlm`); InternVL's, OneVision's and SmolVLM's without their video part
    (`loading.images_only`: it needs torchvision)."""
    from training_helpers import make_qformer_tokenizer
    from transformers import (
        Gemma3Processor,
        Idefics3Processor,
        InstructBlipProcessor,
        InternVLProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
        SmolVLMProcessor,
    )
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    cfg = model.config
    side = cfg.vision_config.image_size
    if cfg.model_type == "idefics3":  # images up to 2x2 tiles, and the global view
        images = Idefics3ImageProcessorPil(size={"longest_edge": 2 * side}, max_image_size={"longest_edge": side})
        return Idefics3Processor(images, tiny_tokenizer(model), image_seq_len=model.model.image_seq_len)
    if cfg.model_type == "smolvlm":  # as Idefics3's, with SmolVLM's image processor
        images = SmolVLMImageProcessorPil(size={"longest_edge": 2 * side}, max_image_size={"longest_edge": side})
        processor = images_only(SmolVLMProcessor)
        return processor(images, tiny_tokenizer(model), None, image_seq_len=model.model.image_seq_len)
    if cfg.model_type == "llava_onevision":
        return tiny_onevision_processor(model)
    if cfg.model_type == "internvl":  # an image cut into up to 4 tiles, with a thumbnail when it is cut
        images = GotOcr2ImageProcessorPil(
            size={"height": side[0], "width": side[1]}, crop_to_patches=True, max_patches=4
        )
        return images_only(InternVLProcessor)(
            images, tiny_tokenizer(model), None, image_seq_length=cfg.image_seq_length
        )
    if cfg.model_type == "llava_next":  # grids of up to 2x2 patches, and the base view
        images = LlavaNextImageProcessorPil(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            image_grid_pinpoints=cfg.image_grid_pinpoints,
        )
        return LlavaNextProcessor(
            images,
            tiny_tokenizer(model),
            patch_size=cfg.vision_config.patch_size,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            num_additional_image_tokens=1,
        )
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


def tiny_onevision_processor(model):
    """`LlavaOnevisionProcessor` (how many tokens each image takes: `vision_aspect_ratio`, rows of several images)
    without its video processor, which needs torchvision (`loading.images_only`)."""
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    cfg, side = model.config, model.config.vision_config.image_size
    images = LlavaOnevisionImageProcessorPil(
        size={"height": side, "width": side}, image_grid_pinpoints=cfg.image_grid_pinpoints
    )
    return images_only(LlavaOnevisionProcessor)(
        images,
        tiny_tokenizer(model),
        None,
        num_image_tokens=(side // cfg.vision_config.patch_size) ** 2,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        vision_aspect_ratio=cfg.vision_aspect_ratio,
    )


def tiny_qwen_vl_image_processor():
    """The Qwen-VL image processor (the PIL one: the processor's video part needs torchvision) sized for the tiny
    models' 2x2 patches: images resized to 64-256 pixels, so 4-16 image tokens."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=2, temporal_patch_size=2, merge_size=2, size={"shortest_edge": 64, "longest_edge": 256}
    )


def tiny_qwen_vl_processor(model):
    """The model's own processor (`Qwen2VLProcessor`, `Qwen2_5_VLProcessor` or `Qwen3VLProcessor`) with
    `tiny_qwen_vl_image_processor`, without its video part (`loading.images_only`: it needs torchvision)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor

    classes = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor}
    return images_only(classes[model.config.model_type])(tiny_qwen_vl_image_processor(), tiny_tokenizer(model), None)


def tiny_tokenizer(model) -> PreTrainedTokenizerFast:
    """Words of the shapes world; `<image>` at the model's image token id (Gemma 3, InternVL: their image tokens and
    the ones around an image, named as their tokenizers name them)."""
    cfg = model.config
    family = cfg.text_config.model_type
    special = ["<pad>", "</s>", "<unk>"] if family == "t5" else ["<unk>", "<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(special + WORDS)}
    size = cfg.text_config.vocab_size
    assert len(vocab) < size - 1
    gemma = dict(boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>")
    internvl = dict(
        start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>", video_token="<video>"
    )
    if cfg.model_type == "gemma3":
        ids = dict(boi_token=cfg.boi_token_index, eoi_token=cfg.eoi_token_index, image_token=cfg.image_token_index)
        vocab.update({gemma[name]: ids[name] for name in gemma})
    elif cfg.model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        vocab.update(
            {
                "<|image_pad|>": cfg.image_token_id,
                "<|vision_start|>": cfg.vision_start_token_id,
                "<|vision_end|>": cfg.vision_end_token_id,
                "<|video_pad|>": cfg.video_token_id,  # its processor counts video tokens in every prompt
            }
        )
        names_of_images = ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]
    elif cfg.model_type in (
        "idefics3",
        "smolvlm",
    ):  # the tokens its processor puts around each tile, just below the image token
        vocab.update({name: cfg.image_token_id - len(IDEFICS3_TOKENS) + i for i, name in enumerate(IDEFICS3_TOKENS)})
        vocab["<image>"] = cfg.image_token_id
    elif cfg.model_type == "internvl":  # <img> and </img> just below the image token, <video> (its processor's) below
        image = cfg.image_token_id
        vocab.update({"<video>": image - 3, "<img>": image - 2, "</img>": image - 1, "<IMG_CONTEXT>": image})
    else:
        vocab["<image>"] = cfg.image_token_index
    if cfg.model_type == "llava_onevision":  # its processor counts `<video>` tokens in every prompt
        vocab["<video>"] = cfg.video_token_index
    if cfg.model_type not in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        names_of_images = ["<image>", *(IDEFICS3_TOKENS if cfg.model_type in ("idefics3", "smolvlm") else ())]
        names_of_images += ["<video>"] if cfg.model_type == "llava_onevision" else []
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if family == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        names = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    else:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
        names = dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if cfg.model_type in ("gemma3", "internvl"):
        special_tokens = gemma if cfg.model_type == "gemma3" else internvl
        return PreTrainedTokenizerFast(tokenizer_object=tok, **names, extra_special_tokens=special_tokens)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    tokenizer.add_special_tokens({"additional_special_tokens": names_of_images})
    return tokenizer
