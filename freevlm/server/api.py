"""The request side of the OpenAI Chat Completions API, as its official client sends it, checked by pydantic; and the
OpenAI error object every refusal is answered with.

Only what the server honours is accepted: any other field (`logprobs`, `tools`, a penalty, ...) and `n > 1` are
refused by name rather than ignored. freevlm's early-exit options come as extra body fields (`extra_body=` in the
`openai` client): `threshold`, `mode`, `kv`."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)  # a list after validation
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None  # an end-user id, for logs; it changes nothing
    # freevlm's early-exit options (extra body fields); the scheduler checks mode and kv
    threshold: float | None = Field(None, ge=0, le=1)
    mode: str | None = None
    kv: str | None = None

    @field_validator("n")
    @classmethod
    def _one_answer(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise ValueError(f"n={n} is not supported: the server gives one answer per request")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> list[str]:
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stop) > 4 or not all(stop):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stop

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class APIError(Exception):
    """A refusal the client can act on, answered with `status` and the OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    @property
    def outcome(self) -> str:
        """How the metrics count it."""
        if self.status == 429:
            return "rejected"
        if self.status == 504:
            return "timeout"
        return "error" if self.status >= 500 else "invalid"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_error(errors: list[dict]) -> APIError:
    """pydantic's first complaint about a request body as one 400, naming the field."""
    error = errors[0]
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    kind = error.get("type")
    if kind == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {error.get('msg')}", code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"unsupported parameter '{param}': freevlm does not honour it", param, "unsupported")
    if kind == "missing":
        return APIError(400, f"missing required parameter '{param}'", param, "missing")
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"invalid '{param}': {message}" if param else message, param, "invalid_value")
