"""The server's prompt layout for a model whose processor has a chat template (a tiny LLaVA): the conversation goes
through the template, the image where its part stands, and the answer equals `generate` on that prompt. In process
(FastAPI's test client); tests/test_server.py runs the server as a process."""

import base64

import torch
from fastapi.testclient import TestClient
from PIL import Image
from tiny_processor import tiny_processor

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.loading import VLMBundle
from freevlm.server.app import ServedModel, create_app
from freevlm.server.config import ServerConfig
from freevlm.tiny import tiny_llava, tiny_model

TEMPLATE = (  # Hugging Face renders templates with trim_blocks: a newline after a tag is dropped, hence "{{ '\n' }}"
    "{% for m in messages %}{{ m['role'] }} :{% for c in m['content'] %} {% if c['type'] == 'image' %}<image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}answer :{% endif %}"
)


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_a_chat_template_lays_out_the_conversation(tmp_path):
    torch.manual_seed(0)
    model = tiny_llava("llama", seed=3)
    processor = tiny_processor(model)
    processor.chat_template = TEMPLATE
    bundle = VLMBundle(model, processor.tokenizer, processor.image_processor, processor)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 2]))
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(image)
    messages = [
        {"role": "system", "content": "short answer"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what color is"},
                {"type": "image_url", "image_url": {"url": data_url(image)}},
                {"type": "text", "text": "the square ?"},
            ],
        },
    ]
    app = create_app(ServedModel(bundle, ee, "llava"), ServerConfig(max_batch=2, max_len=128, max_tokens=6))
    with TestClient(app) as client:
        body = {"model": "llava", "messages": messages, "threshold": 0.3}
        out = client.post("/v1/chat/completions", json=body).json()
    prompt = "system : short answer\nuser : what color is <image> the square ?\nanswer :"  # TEMPLATE's layout
    inputs = bundle.inputs([Image.open(image).convert("RGB")], [prompt])
    expected = ee.generate(**inputs, max_new_tokens=6, threshold=0.3)
    new = expected.sequences[0, inputs["input_ids"].shape[1] :]
    assert out["choices"][0]["message"]["content"] == bundle.decode(new[None])[0]
    assert out["freevlm"]["exit_layers"] == expected.exit_layers[0].tolist()
    assert out["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1]


def test_a_family_with_its_own_inputs_is_served(tmp_path):
    """Gemma 3's processor adds `token_type_ids` to the image and prompt: they travel with the request to the
    scheduler, and the answer equals `generate` on the same inputs."""
    model = tiny_model("gemma3", seed=3)
    processor = tiny_processor(model)
    bundle = VLMBundle(model, processor.tokenizer, processor.image_processor, processor)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 2]))
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(image)
    content = [
        {"type": "image_url", "image_url": {"url": data_url(image)}},
        {"type": "text", "text": "what color is the square"},
    ]
    app = create_app(ServedModel(bundle, ee, "gemma3"), ServerConfig(max_batch=2, max_len=128, max_tokens=6))
    with TestClient(app) as client:
        body = {"model": "gemma3", "messages": [{"role": "user", "content": content}], "threshold": 0.3}
        out = client.post("/v1/chat/completions", json=body).json()
    inputs = bundle.inputs([Image.open(image).convert("RGB")], ["what color is the square"])
    assert "token_type_ids" in inputs
    expected = ee.generate(**inputs, max_new_tokens=6, threshold=0.3)
    new = expected.sequences[0, inputs["input_ids"].shape[1] :]
    assert out["choices"][0]["message"]["content"] == bundle.decode(new[None])[0]
    assert out["freevlm"]["exit_layers"] == expected.exit_layers[0].tolist()
