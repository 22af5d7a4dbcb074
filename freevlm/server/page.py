"""The live page at `/`: pick or drop an image, type a prompt, set the threshold, and watch the answer stream in
from `POST /v1/chat/completions`, each token coloured by the layer it left at (the demo report's scale,
`freevlm.colours`). The page is one static file (`static/index.html`, plain JS, nothing fetched from outside);
`GET /page/settings` tells it the model, its layers' colours and the server's defaults."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from ..colours import layer_colours

PAGE = files(__package__) / "static" / "index.html"


def page_routes(
    model: str, num_layers: int, exit_layers: list[int], *, threshold: float, max_tokens: int, prompt: str
) -> APIRouter:
    """`GET /` (the page) and `GET /page/settings` (what it shows: the model, its layers' colours, the server's
    defaults for a request)."""
    router = APIRouter(include_in_schema=False)
    html = PAGE.read_text(encoding="utf-8")
    settings = {
        "model": model,
        "num_layers": num_layers,
        "exit_layers": exit_layers,
        "colours": layer_colours(exit_layers, num_layers),
        "threshold": threshold,
        "max_tokens": max_tokens,
        "prompt": prompt,
    }

    @router.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(html)

    @router.get("/page/settings")
    async def page_settings() -> dict:
        return settings

    return router
