"""Stage 5, the report: `results.json` (the serialized `DemoResults`), a Markdown summary, plots and an HTML page,
all written from that one dict (so a saved `results.json` can be rendered again), their tables from `tables.py`.
The HTML page is self-contained (inline CSS, images by relative path, no scripts) and colours every generated token
by the LM layer it left at, like Figure 3 of the FREE paper."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ..colours import FINAL_COLOUR, layer_colours
from ..eval.plots import plot_per_layer, plot_quality_vs_speedup
from ..eval.sweep import markdown_table
from ..files import write_text_atomic
from .tables import (
    SPLIT_NAMES,
    exit_layers,
    final_layer,
    fmt,
    fmt_speedup,
    fmt_threshold,
    histograms,
    layer_label,
    model_name,
    tables,
    targets,
    trained_summary,
)

PLOTS = {"sweep": "quality_vs_speedup.png", "per_layer": "per_layer.png", "exit_histogram": "exit_histogram.png"}


def write_report(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write `results.json`, `report.md`, `index.html` and the plots the results have data for into `out_dir`;
    returns their paths by kind ("json", "markdown", "html", and each plot's name in `PLOTS`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "report.md", "html": out_dir / "index.html"}
    write_text_atomic(paths["json"], json.dumps(results, indent=2) + "\n")
    plots = {name: out_dir / file for name, file in PLOTS.items() if _plot(name, results, out_dir / file)}
    captions = {name.replace("_", " "): path.name for name, path in plots.items()}
    write_text_atomic(paths["markdown"], markdown_report(results, captions))
    write_text_atomic(paths["html"], html_report(results, captions))
    return paths | plots


def markdown_report(results: dict, plots: dict[str, str]) -> str:
    """The Markdown summary; `plots` maps a caption to an image file (relative to the report folder)."""
    out = [
        "# freevlm demo report",
        "",
        "Every number here was measured by this run of `freevlm demo` and is also in `results.json`. "
        "Samples with each token coloured by the layer it left at: [index.html](index.html).",
        "",
    ]
    out += [f"- {line}" for line in trained_summary(results)] + [""]
    if results.get("targets"):
        out += ["## Targets", ""] + [f"- **{'met' if m else 'NOT met'}**: {text}" for m, text in targets(results)]
        out.append("")
    for title, headers, rows, notes in tables(results):
        out += [f"## {title}", "", markdown_table(headers, rows), ""]
        out += [f"- {n}" for n in notes] + ([""] if notes else [])
    if plots:
        out += ["## Plots", ""] + [f"![{name}]({file})\n" for name, file in plots.items()]
    out += ["---", "", "Open [index.html](index.html) for the samples with token-level exit colours.", ""]
    return "\n".join(out)


def _plot(name: str, results: dict, path: Path) -> bool:
    """Draw the plot `name` of `PLOTS` from the results into `path`; False when the results have no data for it."""
    if name == "sweep" and results.get("sweep"):
        points = [dict(p, score=p["CIDEr"], wallclock_speedup=None) for p in results["sweep"]["points"]]
        plot_quality_vs_speedup(points, "CIDEr", path, "FREE on the dev split")
    elif name == "per_layer" and results.get("per_layer") and "backbone" in results:
        points = [{"layer": p["layer"], "score": p["CIDEr"]} for p in results["per_layer"]]
        plot_per_layer(points, "CIDEr", final_layer(results), path, "every token forced out at one exit (dev)")
    elif name == "exit_histogram" and histograms(results):
        _plot_exit_histograms(results, path)
    else:
        return False
    return True


def _plot_exit_histograms(results: dict, path: Path) -> None:
    """Bar chart of the share of tokens leaving at each layer, one bar group per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = histograms(results)
    final = final_layer(results)
    layers = sorted({layer for h in splits.values() for layer in h})
    colours = layer_colours(exit_layers(results), final if final is not None else layers[-1], layers)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    width = 0.8 / len(splits)
    for j, (split, counts) in enumerate(splits.items()):
        total = sum(counts.values()) or 1
        xs = [i + (j - (len(splits) - 1) / 2) * width for i in range(len(layers))]
        shares = [100 * counts.get(layer, 0) / total for layer in layers]
        colour = [colours[layer] for layer in layers]
        label = SPLIT_NAMES.get(split, split)
        ax.bar(xs, shares, width, color=colour, edgecolor="#333", hatch="//" if j else None, label=label)
    ax.set_xticks(range(len(layers)), [layer_label(layer, final) for layer in layers])
    ax.set_xlabel("LM layer the token left at")
    ax.set_ylabel("share of generated tokens (%)")
    ax.set_title("FREE at the chosen threshold: exit layers")
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;background:#f6f7f9;
 color:#1d2330} main{max-width:1120px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:26px;margin:4px 0 4px}
h2{font-size:19px;margin:30px 0 10px;border-bottom:1px solid #d9dde3;padding-bottom:4px}
.sub{color:#5a6475;margin:0 0 14px;font-size:14px}
ul.trained{font-size:14px;line-height:1.5;margin:6px 0;padding-left:20px;color:#333b48}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:14px 0}
.card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:10px 14px;min-width:150px}
.card .v{font-size:22px;font-weight:650}.card .k{font-size:12px;color:#5a6475;margin-top:2px}
.legend{display:flex;flex-wrap:wrap;gap:8px;align-items:center;background:#fff;border:1px solid #dde1e7;
 border-radius:8px;padding:10px 14px;font-size:14px;position:sticky;top:0;z-index:1} .legend b{margin-right:6px}
.tok{border-radius:4px;padding:1px 4px;margin:0 1px;line-height:2;box-decoration-break:clone;
 -webkit-box-decoration-break:clone} .tok.final{border:1px dashed #8b8b8b;padding:0 3px}
.samples{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:14px;margin-top:14px}
.sample{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:12px;display:flex;gap:12px}
.sample img{width:128px;height:128px;image-rendering:pixelated;border-radius:4px;border:1px solid #ccd;flex:none}
.sample .free{font-size:16px;margin:0 0 6px} .sample .full{font-size:13px;color:#4a5262;margin:0}
.sample .meta{font-size:12px;color:#7a8394;margin:6px 0 0}
.split{display:inline-block;font-size:11px;font-weight:600;text-transform:uppercase;letter-spacing:.04em;
 background:#eef1f6;color:#4a5262;border-radius:3px;padding:1px 6px;margin-bottom:6px}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:8px 0}
th,td{border:1px solid #dde1e7;padding:4px 8px;text-align:right}th{background:#eef1f6}
td:first-child,th:first-child,td:nth-child(2),th:nth-child(2){text-align:left}
.same{color:#17813a}.diff{color:#b3261e} .met{color:#17813a;font-weight:650}.notmet{color:#b3261e;font-weight:650}
.plots img{max-width:100%;background:#fff;border:1px solid #dde1e7;border-radius:8px;margin:8px 0}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def token_spans(tokens: list[dict], colours: dict[int, str], final_layer: int) -> str:
    """One `<span class="tok">` per token (the demo's tokens are words), coloured by the layer it left at."""
    parts = []
    for t in tokens:
        layer, cls = t["layer"], "tok final" if t["layer"] == final_layer else "tok"
        parts.append(
            f'<span class="{cls}" data-layer="{layer}" title="left at layer {layer}" '
            f'style="background:{colours.get(layer, FINAL_COLOUR)}">{_e(t["text"])}</span>'
        )
    return " ".join(parts)


def _legend(colours: dict[int, str], final_layer: int) -> str:
    items = []
    for layer in sorted(colours):
        label = f"layer {layer} (final: no early exit)" if layer == final_layer else f"exit at layer {layer}"
        cls = "tok final" if layer == final_layer else "tok"
        items.append(f'<span class="{cls}" style="background:{colours[layer]}">{_e(label)}</span>')
    return '<div class="legend"><b>Token colour = LM layer it left at:</b>' + "".join(items) + "</div>"


def _cards(results: dict) -> str:
    """Headline numbers: the test split and speculative mode (a whole run has them all)."""
    if not {"captioning", "sweep", "speculative"} <= results.keys():
        return ""
    test = results["captioning"]["test"]
    speed = test["speed"]
    cards = [
        (fmt_threshold(results["sweep"]["chosen_threshold"]), "chosen threshold (dev)"),
        (fmt(test["full"]["CIDEr"]), "CIDEr, full model (test)"),
        (fmt(test["free"]["CIDEr"]), "CIDEr, FREE (test)"),
        (fmt_speedup(speed["decode_speedup"]), "measured decode speedup (test)"),
        (fmt_speedup(speed["wallclock_speedup"]), "measured end-to-end speedup"),
        (fmt(speed["mean_layers_per_token"]), f"mean layers / token (of {final_layer(results)})"),
        (fmt_speedup(results["speculative"]["decode_speedup"]), "speculative mode speedup"),
    ]
    card = '<div class="card"><div class="v">{}</div><div class="k">{}</div></div>'
    return '<div class="cards">' + "".join(card.format(_e(v), _e(k)) for v, k in cards) + "</div>"


def _html_table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_report(results: dict, plots: dict[str, str]) -> str:
    """The self-contained page: inline CSS, images by relative path, no scripts or external assets."""
    final = final_layer(results)
    samples = results.get("samples", [])
    seen = [t["layer"] for s in samples for t in s["tokens"]]
    if final is None:
        final = max(seen + exit_layers(results), default=0)
    colours = layer_colours(exit_layers(results), final, seen)
    threshold = fmt_threshold(results.get("sweep", {}).get("chosen_threshold"))

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>freevlm demo report</title>",
        f"<style>{CSS}</style></head><body><main>",
        f"<h1>freevlm demo: {model_name(results)} with FREE early exits</h1>",
        (
            '<p class="sub">Every number on this page was measured by this run '
            '(<a href="results.json">results.json</a>, <a href="report.md">report.md</a>).</p>'
        ),
        '<ul class="trained">' + "".join(f"<li>{_e(line)}</li>" for line in trained_summary(results)) + "</ul>",
        _cards(results),
    ]

    if results.get("targets"):
        items = "".join(
            f'<li><span class="{"met" if met else "notmet"}">{"met" if met else "NOT met"}</span>: {_e(text)}</li>'
            for met, text in targets(results)
        )
        parts.append(f"<h2>Targets</h2><ul>{items}</ul>")

    if samples:
        parts += [
            f"<h2>Samples: FREE captions at threshold {_e(threshold)}, each token coloured by its exit layer</h2>",
            _legend(colours, final),
            '<div class="samples">',
        ]
        for s in samples:
            tokens = s["tokens"]
            mean = f"mean exit layer {sum(t['layer'] for t in tokens) / len(tokens):.1f} of {final}" if tokens else ""
            same = " ".join(t["text"] for t in tokens) == s["full_caption"].strip()
            verdict = '<span class="same">same as' if same else '<span class="diff">differs from'
            parts.append(
                f'<div class="sample"><img src="{_e(s["image"])}" alt="sample image">'
                f'<div><span class="split">{_e(s["split"])}</span>'
                f'<p class="free">{token_spans(tokens, colours, final)}</p>'
                f'<p class="full">Full model: {_e(s["full_caption"])}</p>'
                f'<p class="meta">{verdict} full model</span> · {_e(mean)}</p></div></div>'
            )
        parts.append("</div>")

    for title, headers, rows, notes in tables(results):
        parts += [f"<h2>{_e(title)}</h2>", _html_table(headers, rows)] + [f'<p class="sub">{_e(n)}</p>' for n in notes]
    if plots:
        parts.append('<h2>Plots</h2><div class="plots">')
        parts += [
            f'<figure><img src="{_e(file)}" alt="{_e(name)}"><figcaption class="sub">{_e(name)}</figcaption></figure>'
            for name, file in plots.items()
        ]
        parts.append("</div>")
    parts.append("</main></body></html>")
    return "\n".join(parts)
