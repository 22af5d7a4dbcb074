"""The colour of each exit layer, one scale for every place that colours tokens by the layer they left at: the
demo's report (`demo/report.py`) and the server's live page (`server/page.py`)."""

from __future__ import annotations

# A hue ramp of light backgrounds (black text stays readable): early exits warm, later ones cool; the final layer grey.
EXIT_COLOURS = ("#ff8a80", "#ffb74d", "#ffe066", "#c5e17a", "#8fd9a8", "#80d8d8", "#8cc8f5", "#b3a4f2")
FINAL_COLOUR = "#dcdcdc"


def layer_colours(exit_layers: list[int], final_layer: int, extra: list[int] = ()) -> dict[int, str]:
    """Colour per layer: exits (and any other non-final layer seen) spread over the palette, the final one grey."""
    layers = sorted({*exit_layers, *extra} - {final_layer})
    last = max(len(layers) - 1, 1)
    colours = {k: EXIT_COLOURS[round(i * (len(EXIT_COLOURS) - 1) / last)] for i, k in enumerate(layers)}
    return colours | {final_layer: FINAL_COLOUR}
