"""Small random vision-language models built from configs (tests, the quick-start command, benchmarks).

Built from a config, Hugging Face's BLIP-2 has a dead vision path: the vision config's default
`initializer_range` is 1e-10 and `query_tokens` start at zero, so images cannot change the output. We pass a real
initializer range and draw the query tokens, so the image matters in every model built here.

`tiny_model(family)` builds any supported family: "opt", "t5" (BLIP-2), "instructblip-opt", "instructblip-t5",
"instructblip-llama", "instructblip-mistral", "instructblip-qwen2" or "llama", "mistral", "qwen2" (LLaVA), "gemma3",
"internvl-qwen2" or "internvl-llama", "smolvlm" or "idefics3" (a Llama LM; images as tiles), "llava-next-llama" (or
-mistral, -qwen2), "llava-onevision" (a Qwen2 LM), "qwen2-vl", "qwen2.5-vl" or "qwen3-vl".
`tiny_model_inputs` gives what its processor would: a dict that both `ee.generate(**inputs)` and the model's own
`generate(**inputs)` take.
"""

from .inputs import image_tokens, llava_next_inputs, qwen_vl_inputs, tiled_inputs, tiny_inputs, tiny_model_inputs
from .models import (
    blip2_config,
    decoder_sizes,
    gemma3_config,
    internvl_config,
    llava_config,
    llava_next_config,
    llava_onevision_config,
    qwen_vl_config,
    tiled_config,
    tiny_blip2,
    tiny_gemma3,
    tiny_instructblip,
    tiny_instruction,
    tiny_llava,
    tiny_model,
)

__all__ = [
    "blip2_config",
    "decoder_sizes",
    "gemma3_config",
    "image_tokens",
    "internvl_config",
    "llava_config",
    "llava_next_config",
    "llava_next_inputs",
    "llava_onevision_config",
    "qwen_vl_config",
    "qwen_vl_inputs",
    "tiled_config",
    "tiled_inputs",
    "tiny_blip2",
    "tiny_gemma3",
    "tiny_inputs",
    "tiny_instructblip",
    "tiny_instruction",
    "tiny_llava",
    "tiny_model",
    "tiny_model_inputs",
]
