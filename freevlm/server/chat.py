"""From a chat request to model inputs, and from streamed tokens back to text.

`image_bytes` reads an `image_url` (a base64 `data:` URL, or an http(s) URL fetched with a timeout and a size
cap) and `decode` makes it an RGB image; `layout_prompt` lays a conversation out as the model's processor would (its
chat template where it has one; otherwise the user's text after the image, as `freevlm caption --prompt` does);
`TextStream` turns an answer's tokens into the text deltas a stream sends, so that the deltas add up to what
`VLMBundle.decode` gives for the whole answer, cut before the first stop string."""

from __future__ import annotations

import base64
import binascii

import httpx
from PIL import Image
from transformers import PreTrainedTokenizerBase

from ..data.images import ImageError, decode_image
from .api import APIError, ImagePart, Message
from .config import ServerConfig


async def image_bytes(url: str, config: ServerConfig) -> bytes:
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise APIError(
                400, "an image data: URL must be base64 (data:image/png;base64,...)", "messages", "bad_image"
            )
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise APIError(400, f"the image data: URL is not valid base64: {err}", "messages", "bad_image") from err
    if url.startswith(("http://", "https://")):
        if not config.image_urls:
            raise APIError(
                400,
                "this server does not fetch image URLs (started with --no-image-urls): send the image as a "
                "base64 data: URL",
                "messages",
                "image_url_refused",
            )
        return await fetch(url, config)
    raise APIError(400, f"image_url must be a data: or http(s) URL, got {url[:40]!r}", "messages", "bad_image")


async def fetch(url: str, config: ServerConfig) -> bytes:
    """An image URL's bytes, refused past `max_image_bytes` (read as a stream: a large body is never held whole)."""
    cap = config.max_image_bytes
    try:
        async with (
            httpx.AsyncClient(timeout=config.image_url_timeout, follow_redirects=True) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise APIError(400, f"fetching {url} answered HTTP {response.status_code}", "messages", "bad_image")
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > cap:
                    raise APIError(400, f"the image at {url} is over {cap} bytes", "messages", "image_too_large")
            return bytes(data)
    except httpx.TimeoutException as err:
        message = f"fetching {url} took over {config.image_url_timeout:g} s"
        raise APIError(400, message, "messages", "image_url_timeout") from err
    except httpx.HTTPError as err:
        raise APIError(400, f"cannot fetch {url}: {err}", "messages", "bad_image") from err


def decode(data: bytes) -> Image.Image:
    try:
        return decode_image(data, "in the request")
    except ImageError as err:
        code = "image_too_large" if "too large" in str(err) else "bad_image"
        raise APIError(400, str(err), "messages", code) from err


def the_image(messages: list[Message]) -> str:
    """The URL of the one image a conversation holds (the scheduler decodes one image per request)."""
    urls = [
        part.image_url.url
        for m in messages
        if isinstance(m.content, list)
        for part in m.content
        if isinstance(part, ImagePart)
    ]
    if not urls:
        raise APIError(400, "the messages hold no image: send one image_url part", "messages", "missing_image")
    if len(urls) > 1:
        raise APIError(400, f"the messages hold {len(urls)} images: send exactly one", "messages", "too_many_images")
    return urls[0]


def text_of(message: Message) -> str:
    if isinstance(message.content, str):
        return message.content
    return " ".join(part.text for part in message.content or [] if not isinstance(part, ImagePart))


def layout_prompt(messages: list[Message], bundle, default_prompt: str) -> str:
    """The prompt text `VLMBundle.inputs` takes with the image: the processor's chat template applied to the
    conversation where it has one, else the one user message's text (`default_prompt` where it has none)."""
    template_owner = bundle.processor if getattr(bundle.processor, "chat_template", None) else None
    if template_owner is not None:
        conversation = [
            {
                "role": m.role,
                "content": [
                    {"type": "image"} if isinstance(p, ImagePart) else {"type": "text", "text": p.text}
                    for p in (m.content if isinstance(m.content, list) else [])
                ]
                or [{"type": "text", "text": m.content or ""}],
            }
            for m in messages
        ]
        return template_owner.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    if len(messages) != 1 or messages[0].role != "user":
        roles = [m.role for m in messages]
        raise APIError(
            400,
            f"this model has no chat template: send one user message (its text after the image), got roles {roles}",
            "messages",
            "no_chat_template",
        )
    return text_of(messages[0]).strip() or default_prompt


class TextStream:
    """An answer's text as its tokens come: `add(token)` returns the new text that is final (held back: trailing
    spaces, an incomplete character, and anything that may still become a stop string); `finish()` the rest. The
    deltas add up to `text`: the whole answer decoded as `VLMBundle.decode` does, cut before the first stop string
    (`stopped` then True)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self._decode = _list_decoder(tokenizer)
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False
        self._hold = max((len(s) for s in stop), default=1) - 1

    @property
    def text(self) -> str:
        text = self._decode(self.tokens, skip_special_tokens=True).strip()
        cuts = [text.find(s) for s in self.stop if s in text]
        return text[: min(cuts)] if cuts else text

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self._decode(self.tokens, skip_special_tokens=True).lstrip()
        cuts = [text.find(s) for s in self.stop if s in text]
        if cuts:
            self.stopped = True
            return self._send(text[: min(cuts)])
        ready = text[: len(text) - self._hold].rstrip().removesuffix("\ufffd")
        return self._send(ready)

    def finish(self) -> str:
        return self._send(self.text)

    def _send(self, ready: str) -> str:
        if not ready.startswith(self.sent):  # the decoder rewrote earlier text: wait for the end
            return ""
        delta, self.sent = ready[len(self.sent) :], ready
        return delta


def _list_decoder(tokenizer):
    """`tokenizer.decode` for a list of ints. A stream decodes its whole answer at every token, and `decode` first
    checks every id of the list in Python (`to_py_obj`) before calling `_decode`, which cost more than decoding
    itself: where a tokenizer keeps the base class's `decode` (which is then `to_py_obj` and `_decode`, the same for
    a list of ints), `_decode` is called straight; a tokenizer with a `decode` of its own keeps it."""
    if type(tokenizer).decode is PreTrainedTokenizerBase.decode and hasattr(tokenizer, "_decode"):
        return tokenizer._decode
    return tokenizer.decode
