"""Loading a supported model (BLIP-2, InstructBLIP, LLaVA, InternVL, LLaVA-NeXT / OneVision, SmolVLM / Idefics3,
Gemma 3, Qwen-VL) and its processor from a local folder, and turning images + prompts into model inputs.

Nothing here downloads: paths are local folders written by `save_pretrained` (a Hugging Face checkpoint copied
to disk, or a backbone the demo trained).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open

from .backbones import load_backbone
from .errors import MissingFileError, UserError
from .inputs import InputWarning

# beside config.json: the BLIP-2's `vision_model` is not a ViT but the encoder this file names (see `freevlm.vision`)
BACKBONE_MARKER = "freevlm_backbone.json"
# beside config.json, in a folder freevlm trained (`finetune`, the demo): the prompt it was trained with
PROMPT_FILE = "freevlm_prompt.json"
# the prompt captions are trained and evaluated after, unless one is given (BLIP-2's)
CAPTION_PROMPT = "a photo of"
# config.json's model_type -> the model class loaded for it; other models are refused before any weights load
MODEL_CLASSES = {
    "blip-2": "Blip2ForConditionalGeneration",
    "instructblip": "InstructBlipForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}
# loaded as tokenizer + image processor, its prompt laid out by `VLMBundle._blip2_inputs` (the demo's BLIP-2 ships no
# processor)
TOKENIZER_AND_IMAGE_PROCESSOR = ("blip-2",)
QWEN_VL = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# their processors expand an image token a prompt holds (one is put in front of a prompt without)
EXPANDS_IMAGE_TOKEN = ("llava", "internvl", "gemma3", "llava_next", "llava_onevision", "idefics3", "smolvlm", *QWEN_VL)


@dataclass
class VLMBundle:
    """A supported model with what turns text and images into its inputs and tokens back into text: BLIP-2's
    tokenizer and image processor, or the model's own `processor` (LLaVA, InstructBLIP), which lays out the image
    tokens (and InstructBLIP's Q-Former instruction) as the model expects; `tokenizer` and `image_processor` are
    then the processor's."""

    model: torch.nn.Module
    tokenizer: object
    image_processor: object
    processor: object | None = None
    prompt: str | None = None  # the prompt its folder records (`TrainingPrompt`), for commands given none

    @property
    def preprocessing(self) -> tuple:
        """What to `save_pretrained` beside the model so that `load_vlm` reads the folder back (its prompt too)."""
        saved = (self.tokenizer, self.image_processor) if self.processor is None else (self.processor,)
        return saved if self.prompt is None else (*saved, TrainingPrompt(self.prompt))

    def inputs(self, images: list[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
        """Pixel values and left-padded prompt ids, image tokens where the model's processor puts them (in front
        for BLIP-2; where `<image>` stands for LLaVA, in front of a prompt without one), and what else the processor
        gives (InstructBLIP's `qformer_input_ids`, Qwen-VL's `image_grid_thw`, ...): `ee.generate(**inputs)` takes them
        all."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        warn_small_images(images, self.image_processor)
        self.tokenizer.padding_side = "left"
        inputs = self._blip2_inputs(images, prompts) if self.processor is None else self._processed(images, prompts)
        device, dtype = self.model.device, next(self.model.parameters()).dtype
        return {k: v.to(device, dtype) if k == "pixel_values" else v.to(device) for k, v in inputs.items()}

    def _blip2_inputs(self, images: list[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
        """As Hugging Face's `Blip2Processor` lays them out: `num_query_tokens` image tokens before the prompt."""
        cfg = self.model.config
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        text = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
        ids, mask = text["input_ids"], text["attention_mask"]
        if cfg.image_token_index is not None and not bool((ids == cfg.image_token_index).any()):
            image = torch.full((len(prompts), cfg.num_query_tokens), cfg.image_token_index, dtype=ids.dtype)
            ids = torch.cat([image, ids], dim=1)
            mask = torch.cat([torch.ones_like(image), mask], dim=1)
        return {"pixel_values": pixel_values, "input_ids": ids, "attention_mask": mask}

    def _processed(self, images: list[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
        model_type = self.model.config.model_type
        if model_type in EXPANDS_IMAGE_TOKEN:  # each image token (<start_of_image>, <|image_pad|>) a prompt holds
            prompts = [prompt_with_image(self.processor, self.model.config, p) for p in prompts]
        if model_type in ("gemma3", "idefics3", "smolvlm"):  # their processors take each prompt's images as a list
            images = [[image] for image in images]
        out = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        keys = (
            "pixel_values",
            "input_ids",
            "attention_mask",
            "qformer_input_ids",
            "qformer_attention_mask",
            "token_type_ids",  # Gemma 3: 1 at image tokens
            "pixel_attention_mask",  # SmolVLM / Idefics3: each tile's real pixels
            "image_sizes",  # LLaVA-NeXT / OneVision
            "batch_num_images",  # LLaVA-OneVision
            "image_grid_thw",  # Qwen-VL: each image's patch grid
            "mm_token_type_ids",  # Qwen-VL: 1 at image tokens
        )
        return {k: out[k] for k in keys if k in out}

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)]


def prompt_with_image(processor, model_config, prompt: str) -> str:
    """`prompt` as the processor of an `EXPANDS_IMAGE_TOKEN` model takes it: as given where it holds the processor's
    image token (which the processor expands), else with that token in front on a line of its own; Qwen-VL's between
    `<|vision_start|>` and `<|vision_end|>`, which its chat template (not its processor) writes. Captioning and
    training both lay prompts out with it, so a model trains on the prompts it captions with."""
    token = processor.image_token
    if token in prompt:
        return prompt
    if model_config.model_type in QWEN_VL:
        ids = [model_config.vision_start_token_id, model_config.vision_end_token_id]
        start, end = processor.tokenizer.convert_ids_to_tokens(ids)
        if start is None or end is None:
            raise ValueError(
                f"the tokenizer has no token for ids {ids} (<|vision_start|>, <|vision_end|>): use the "
                f"{model_config.model_type} processor's tokenizer"
            )
        token = f"{start}{token}{end}"
    return f"{token}\n{prompt}"


@dataclass(frozen=True)
class TrainingPrompt:
    """The prompt a model was trained with, kept in its folder (`PROMPT_FILE`): `freevlm caption`, `eval` and `serve`
    use it when given none (a captioner trained after "a photo of" answers badly after nothing). It saves like a
    processor, so `finetune(save_with=...)` and `VLMBundle.preprocessing` carry it."""

    text: str

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        Path(folder, PROMPT_FILE).write_text(json.dumps({"prompt": self.text}))

    @staticmethod
    def read(folder: str | os.PathLike) -> str | None:
        """The prompt `folder` records, or None."""
        file = Path(folder, PROMPT_FILE)
        if not file.is_file():
            return None
        try:
            prompt = json.loads(file.read_text()).get("prompt")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise ValueError(f"{file} is not a valid prompt record: {err}") from err
        if not isinstance(prompt, str):
            raise ValueError(f"{file} records no prompt text: {prompt!r}")
        return prompt


def warn_small_images(images: list[Image.Image], image_processor) -> None:
    """One warning when an image is far smaller than what the processor resizes to: upscaled many times over, it
    holds little the model can see (a thumbnail passed by mistake)."""
    size = getattr(image_processor, "size", None) or {}
    target = min(size.get("height", 0), size.get("width", 0)) or size.get("shortest_edge", 0)
    small = [i for i, image in enumerate(images) if target and min(image.size) * 4 < target]
    if small:
        warnings.warn(
            f"image(s) {small[:8]} are under a quarter of the {target} px the image processor resizes "
            "to: upscaled that far they carry little detail",
            InputWarning,
            stacklevel=3,
        )


def load_vlm(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None) -> VLMBundle:
    """A supported model (its class from config.json's model_type, `MODEL_CLASSES`) from a local folder, with its
    tokenizer and image processor (BLIP-2), or its processor (`load_processor`: the others)."""
    import transformers
    from transformers import AutoTokenizer

    path = Path(path)
    config = check_vlm_folder(path)
    name = type(config).__name__.removesuffix("Config")
    try:
        if (path / BACKBONE_MARKER).is_file():
            model = _load_with_custom_vision(path, dtype)
        else:
            model = getattr(transformers, MODEL_CLASSES[config.model_type]).from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"{path} is not a loadable {name} checkpoint: {_first_line(err)}") from err
    try:  # a supported model class whose language model freevlm has no adapter for
        load_backbone(model)
    except TypeError as err:
        raise UserError(f"{path}: {err}") from err
    model = model.to(device).eval()
    prompt = TrainingPrompt.read(path)
    try:
        if config.model_type in TOKENIZER_AND_IMAGE_PROCESSOR:
            tokenizer, image_processor = AutoTokenizer.from_pretrained(path), load_image_processor(path)
            return VLMBundle(model, tokenizer, image_processor, prompt=prompt)
        processor = load_processor(path)
        return VLMBundle(model, processor.tokenizer, processor.image_processor, processor, prompt)
    except ImportError as err:  # SmolVLM's processor needs num2words (the `smolvlm` extra)
        raise UserError(f"{path}: the {name} processor needs a package that is not installed: {err}") from err
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{path} has no {name} processor saved beside the model: {_first_line(err)}") from err


def load_processor(path: str | os.PathLike):
    """The processor saved in `path` (the class its processor_config.json names, else its model type's: a folder
    holding only a tokenizer and an image processor, as Qwen-VL checkpoints ship). One with a video part
    (LLaVA-OneVision's, SmolVLM's, InternVL's, Qwen-VL's) is built without it (`images_only`): Hugging Face's video
    processors need torchvision, which does not work with our torch, and freevlm feeds images only. Its image
    processor is `load_image_processor`'s."""
    from transformers import AutoProcessor, AutoTokenizer, ProcessorMixin
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    file, config = Path(path, "processor_config.json"), Path(path, "config.json")
    name = json.loads(file.read_text()).get("processor_class") if file.is_file() else None
    if name is None and config.is_file():
        name = PROCESSOR_MAPPING_NAMES.get(json.loads(config.read_text()).get("model_type"))
    processor_class = _transformers_class(name) if isinstance(name, str) else None
    if not (isinstance(processor_class, type) and issubclass(processor_class, ProcessorMixin)):
        return AutoProcessor.from_pretrained(path)
    if "video_processor" in processor_class.get_attributes():
        processor_class = images_only(processor_class)
    if processor_class.get_attributes() != ["image_processor", "tokenizer"]:  # InstructBLIP's Q-Former tokenizer
        return processor_class.from_pretrained(path)
    # `from_pretrained`'s steps, with the image processor loaded as below
    settings, kwargs = processor_class.get_processor_dict(path)
    parts = [load_image_processor(path), AutoTokenizer.from_pretrained(path)]
    return processor_class.from_args_and_dict(parts, settings, **kwargs)


def load_image_processor(path: str | os.PathLike):
    """`AutoImageProcessor`'s for `path`, or, where it finds only a stub asking for torchvision, the PIL class of the
    type the folder names, from its own module: transformers 5.17 marks Idefics3's and SmolVLM's PIL image processors
    as needing torchvision, which they do not."""
    # from its module: transformers 5.17's top-level name is a stub that demands torchvision (which does not work
    # with our torch), though the class itself falls back to the PIL processors
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path)
    except ValueError as err:
        if "torchvision" not in str(err):
            raise
        model_type = json.loads(Path(path, "config.json").read_text())["model_type"]
        settings, _ = ImageProcessingMixin.get_image_processor_dict(path)
        module = model_type_to_module_name(model_type)
        pil = importlib.import_module(f"transformers.models.{module}.image_processing_pil_{module}")
        base = settings.get("image_processor_type", "").removesuffix("Fast").removesuffix("Pil")
        if not hasattr(pil, f"{base}Pil"):
            raise
        return getattr(pil, f"{base}Pil").from_pretrained(path)


def _transformers_class(name: str):
    import transformers

    try:
        return getattr(transformers, name, None)
    except (ImportError, AttributeError):  # a name transformers lists but cannot import here
        return None


def images_only(processor_class: type) -> type:
    """`processor_class` (a Hugging Face processor with a video part) without its video processor: its own
    `__init__` and image-token layout, built, loaded and saved from an image processor and a tokenizer alone. The
    video processor's saved settings are kept and written back by `save_pretrained`, so a folder it saves still
    loads whole where torchvision works."""
    position = list(inspect.signature(processor_class.__init__).parameters).index("video_processor") - 1

    class ImagesOnly(processor_class):
        video_config: dict | None = None

        @classmethod
        def get_attributes(cls) -> list[str]:  # what `ProcessorMixin` checks, loads and saves
            return [name for name in super().get_attributes() if name != "video_processor"]

        @classmethod
        def from_args_and_dict(cls, args, processor_dict: dict, **kwargs):
            processor_dict = dict(processor_dict)
            video_config = processor_dict.pop("video_processor", None)
            processor = super().from_args_and_dict([*args[:position], None, *args[position:]], processor_dict, **kwargs)
            processor.video_config = video_config
            return processor

        def to_dict(self) -> dict:
            saved = super().to_dict()
            return saved if self.video_config is None else {**saved, "video_processor": self.video_config}

    # saved under the class's own name (`processor_class`), so that Hugging Face loads the folder as it would
    ImagesOnly.__name__ = ImagesOnly.__qualname__ = processor_class.__name__
    return ImagesOnly


# files `save_pretrained` writes for a tokenizer (a fast tokenizer.json, or a slow one's vocabulary)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_vlm_folder(path: str | os.PathLike):
    """The folder's model config, after checking (without loading any weights) that everything `load_vlm` reads
    is there and readable: config.json of a supported model, weights whose safetensors headers parse and whose
    size matches them, a tokenizer and an image processor (InstructBLIP: and the Q-Former's tokenizer). Each
    problem is one error naming the file."""
    from transformers import AutoConfig

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MissingFileError(f"no model at {path}: expected a folder with config.json (from save_pretrained)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{config_file} is not a valid model config: {err}") from err
    if model_type not in MODEL_CLASSES:
        raise ValueError(
            f"{path} holds a '{model_type}' model: freevlm loads "
            f"{', '.join(f'{c} ({t!r})' for t, c in MODEL_CLASSES.items())}"
        )
    if not any((path / name).is_file() for name in WEIGHT_FILES) and not any(path.glob("*.safetensors")):
        raise MissingFileError(f"{path} has config.json but no weights (model.safetensors or pytorch_model.bin)")
    for file in sorted(path.glob("*.safetensors")):
        check_safetensors(file)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise MissingFileError(
            f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...): save the "
            "tokenizer beside the model (tokenizer.save_pretrained(folder))"
        )
    # what the user saves beside the model
    saver = "image_processor" if model_type in TOKENIZER_AND_IMAGE_PROCESSOR else "processor"
    if not any((path / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        raise MissingFileError(
            f"{path} has no preprocessor_config.json or processor_config.json: save the "
            f"{saver} beside the model ({saver}.save_pretrained(folder))"
        )
    if model_type == "instructblip" and not (path / "qformer_tokenizer").is_dir():
        raise MissingFileError(
            f"{path} has no qformer_tokenizer folder: save InstructBLIP's processor beside the "
            "model (processor.save_pretrained(folder))"
        )
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{config_file} is not a valid {model_type} config: {_first_line(err)}") from err


def check_safetensors(file: str | os.PathLike) -> None:
    """A clear error if `file` is not a complete safetensors file (bad header, or shorter than its header says)."""
    file = Path(file)
    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{file} is damaged or not a safetensors file ({_first_line(err)}): copy it again") from err


def load_exits(model, path: str | os.PathLike):
    """`EarlyExitVLM.from_pretrained(model, path)`, with a damaged weights file reported as one clear error."""
    from .model import WEIGHTS_NAME, EarlyExitVLM

    weights = Path(path) / WEIGHTS_NAME
    if weights.is_file():
        check_safetensors(weights)
    return EarlyExitVLM.from_pretrained(model, path)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def lm_num_layers(config) -> int:
    """The number of LM layers exits can sit between (OPT: decoder layers; T5: decoder blocks), from the config."""
    text = config.text_config
    if getattr(text, "is_encoder_decoder", False):
        return text.num_decoder_layers if text.num_decoder_layers is not None else text.num_layers
    return text.num_hidden_layers


def _load_with_custom_vision(path: Path, dtype: torch.dtype | None) -> torch.nn.Module:
    """A BLIP-2 (or LLaVA) whose image encoder is not a ViT: `from_pretrained` would build a ViT, so rebuild and
    load here.

    The marker names the encoder, found in the registry `freevlm.vision.VISION_MODELS` (this loader imports no
    model builder: the demo's is a layer above it).
    """
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoConfig, GenerationConfig

    from .vision import VISION_MODELS

    name = json.loads((path / BACKBONE_MARKER).read_text()).get("vision_model")
    if name not in VISION_MODELS:
        raise ValueError(
            f"{path / BACKBONE_MARKER} names an unknown vision model {name!r} (not in {list(VISION_MODELS)})"
        )
    config = AutoConfig.from_pretrained(path)
    model = getattr(transformers, MODEL_CLASSES[config.model_type])(config)
    vision = config.vision_config
    encoder = VISION_MODELS[name](vision.hidden_size, vision.image_size, pretrained=False)
    if config.model_type == "llava":
        model.model.vision_tower = encoder
    else:
        model.vision_model = encoder
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise OSError(f"no *.safetensors weights in {path}")
    state = {key: value for file in files for key, value in load_file(file).items()}
    if config.model_type == "llava":
        state = {_llava_key(key): value for key, value in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    current = model.state_dict()
    loaded = {current[key].data_ptr() for key in state if key in current}
    untied = [key for key in missing if current[key].data_ptr() not in loaded]  # tied weights are saved once
    if untied or unexpected:
        raise ValueError(f"weights in {path} do not fit the model: missing {untied[:5]}, unexpected {unexpected[:5]}")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
        if config.model_type != "llava":  # BLIP-2's LM generates on its own too; LLaVA's head is the model's
            model.language_model.generation_config = model.generation_config
    return model.to(dtype) if dtype is not None else model


# `save_pretrained` writes a LLaVA under the original checkpoint's names; the module's are on the right
LLAVA_SAVED_PREFIXES = {
    "vision_tower.": "model.vision_tower.",
    "multi_modal_projector.": "model.multi_modal_projector.",
    "language_model.model.": "model.language_model.",
    "language_model.lm_head.": "lm_head.",
}


def _llava_key(key: str) -> str:
    """A saved LLaVA weight's name in the module (names already the module's pass through)."""
    for saved, module in LLAVA_SAVED_PREFIXES.items():
        if key.startswith(saved):
            return module + key.removeprefix(saved)
    return key
