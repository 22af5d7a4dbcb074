"""The demo's report: `results.json`, a Markdown summary and an HTML page, all written from one `results` dict.

Honesty rule: every number shown is read from `results` (or derived from it, e.g. a ratio of two of its values),
never typed in here; sections whose data is missing are left out rather than filled. The HTML page colours each
generated token by the LM layer it left at, like Figure 3 of the FREE paper.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..eval.sweep import markdown_table

CAPTION_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE", "exact_match")
SPLIT_NAMES = {"test": "test", "ood": "OOD"}
SPLIT_NOTES = {
    "ood": "OOD: the out-of-distribution split, colour-shape combinations never seen in training (like NoCaps' out-domain)."
}
VQA_NAMES = {"shapes": "shapes VQA", "easyvqa": "easy-VQA (external)"}
VARIANT_NAMES = {
    "free": "FREE (GAN + KD anchor)",
    "free_no_adversarial": "FREE without the adversarial term",
    "free_ce": "FREE-CE (GAN + CE anchor, semi-supervised)",
}
# A hue ramp of light backgrounds (black text stays readable): early exits warm, later ones cool; the final layer grey.
EXIT_COLOURS = ("#ff8a80", "#ffb74d", "#ffe066", "#c5e17a", "#8fd9a8", "#80d8d8", "#8cc8f5", "#b3a4f2")
FINAL_COLOUR = "#dcdcdc"
HISTOGRAM_PLOT = "exit_histogram.png"


def fmt(value: Any) -> str:
    """A table cell: floats to 3 decimals, ints with thousands separators, booleans as yes/no, missing as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def fmt_speedup(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def fmt_threshold(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"


def fmt_seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


def layer_colours(exit_layers: list[int], final_layer: int, extra: list[int] = ()) -> dict[int, str]:
    """Colour per layer: exits (and any other non-final layer seen) spread over the palette, the final one grey."""
    layers = sorted({*exit_layers, *extra} - {final_layer})
    if len(layers) <= 1:
        picks = [0] * len(layers)
    else:
        picks = [round(i * (len(EXIT_COLOURS) - 1) / (len(layers) - 1)) for i in range(len(layers))]
    colours = {layer: EXIT_COLOURS[p % len(EXIT_COLOURS)] for layer, p in zip(layers, picks)}
    colours[final_layer] = FINAL_COLOUR
    return colours


def write_report(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write `results.json`, `report.md`, `index.html` (and the exit-histogram plot) into `out_dir`; returns their
    paths by kind ("json", "markdown", "html", and "exit_histogram" when there was a histogram to draw)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "report.md", "html": out_dir / "index.html"}
    _write_atomic(paths["json"], json.dumps(results, indent=2) + "\n")
    plots = {name: file for name, file in (results.get("plots") or {}).items() if (out_dir / file).is_file()}
    histogram = _plot_exit_histograms(results, out_dir / HISTOGRAM_PLOT)
    if histogram is not None:
        paths["exit_histogram"] = histogram
        plots["exit histogram"] = histogram.name
    _write_atomic(paths["markdown"], markdown_report(results, plots))
    _write_atomic(paths["html"], html_report(results, plots))
    return paths


def _write_atomic(path: Path, text: str) -> None:
    """A reader (or a crash) never sees half a file: write a temp file beside it, then rename over."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- Markdown


def _final_layer(results: dict) -> int | None:
    return (results.get("backbone") or {}).get("num_layers")


def _exit_layers(results: dict) -> list[int]:
    return list((results.get("exits") or {}).get("exit_layers") or [])


def _model_name(results: dict) -> str:
    """The demo's model: a LLaVA for the Llama LM, a BLIP-2 otherwise."""
    return "LLaVA" if (results.get("backbone") or {}).get("family") == "llama" else "BLIP-2"


def trained_summary(results: dict) -> list[str]:
    """Bullet lines saying what was trained, from results["backbone"], ["exits"] and ["config"]."""
    b, e, c = results.get("backbone") or {}, results.get("exits") or {}, results.get("config") or {}
    lines = []
    if b:
        trained = "projector" if _model_name(results) == "LLaVA" else "Q-Former"
        lines.append(
            f"Backbone: {_model_name(results)} (Hugging Face classes), {trained} and language model trained on the shapes world; "
            f"LM {b.get('family', '?').upper()}, {b.get('num_layers', '?')} layers, hidden size {b.get('hidden_size', '?')}."
        )
        if b.get("vision_encoder"):
            lines.append(f"Vision encoder: {b['vision_encoder']}.")
        how = "reused from the cache (trained by an earlier run)" if b.get("cached") else "trained in this run"
        lines.append(
            f"Backbone training: {fmt(b.get('train_steps'))} steps, {fmt_seconds(b.get('train_seconds'))}, "
            f"final loss {fmt(b.get('final_loss'))}; {how}."
        )
    if e:
        layers = ", ".join(str(x) for x in e.get("exit_layers", []))
        lines.append(f"Exits at LM layers {layers}; {fmt(e.get('trainable_parameters'))} trainable parameters.")
        for name, v in (e.get("variants") or {}).items():
            if "method" in v:  # a baseline: linear exits trained with that method's loss
                recipe = f"{v['method']} loss on linear exits"
            else:
                adv = "with" if v.get("adversarial") else "without"
                recipe = f"{v.get('anchor', '?')} anchor, {adv} adversarial term"
            if v.get("exits_of"):  # a subset of another variant's exits: trained there
                lines.append(
                    f"Exit variant `{name}`: the exits of `{v['exits_of']}` at layers "
                    f"{', '.join(map(str, v.get('exit_layers', [])))}."
                )
                continue
            if v.get("exit_layers"):  # trained elsewhere than the exits above (the placement's candidates)
                recipe += f", exits at layers {', '.join(map(str, v['exit_layers']))}"
            lines.append(
                f"Exit variant `{name}`: {recipe}, {fmt(v.get('steps'))} steps, {fmt_seconds(v.get('seconds'))}."
            )
    if c:
        lines.append("Run settings: " + ", ".join(f"{k}={v}" for k, v in c.items()) + ".")
    timing = results.get("timing") or {}
    if timing.get("total_seconds") is not None:
        stages = ", ".join(f"{k} {fmt_seconds(v)}" for k, v in (timing.get("stages") or {}).items())
        lines.append(f"Whole run: {fmt_seconds(timing['total_seconds'])}" + (f" ({stages})." if stages else "."))
    return lines


def _caption_rows(results: dict) -> tuple[list[str], list[list[str]], list[str]]:
    """Headers, rows and footnotes of the captioning table (one full and one FREE row per split)."""
    splits = results.get("captioning") or {}
    metrics = [
        m for m in CAPTION_METRICS if any(m in (s.get(k) or {}) for s in splits.values() for k in ("full", "free"))
    ]
    headers = [
        "split",
        "model",
        *metrics,
        "CIDEr vs full",
        "analytic speedup",
        "measured decode speedup",
        "measured end-to-end speedup",
        "mean layers / token",
    ]
    rows, notes = [], []
    threshold = fmt_threshold((results.get("sweep") or {}).get("chosen_threshold"))
    for split, s in splits.items():
        full, free = s.get("full") or {}, s.get("free") or {}
        name = SPLIT_NAMES.get(split, split)
        rows.append(
            [name, "full model", *[fmt(full.get(m)) for m in metrics], "", "", "", "", fmt(_final_layer(results))]
        )
        ratio = _ratio(free.get("CIDEr"), full.get("CIDEr"))
        rows.append(
            [
                name,
                f"FREE @ {threshold}",
                *[fmt(free.get(m)) for m in metrics],
                ratio,
                fmt_speedup(free.get("analytic_speedup")),
                fmt_speedup(free.get("measured_decode_speedup")),
                fmt_speedup(free.get("measured_end_to_end_speedup")),
                fmt(free.get("mean_layers_per_token")),
            ]
        )
        if split in SPLIT_NOTES:
            notes.insert(0, SPLIT_NOTES[split])
        if isinstance(s.get("spice"), str):
            notes.append(f"SPICE on {name}: {s['spice']}")
    if results.get("speed_protocol"):
        notes.append(f"How speed is measured in every table: {results['speed_protocol']}.")
    return headers, rows, notes


def _ratio(value: float | None, reference: float | None) -> str:
    return "n/a" if value is None or not reference else f"{100 * value / reference:.1f}%"


def tables(results: dict) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """The report's tables as (title, headers, rows, notes), in order; sections without data are left out. Both
    the Markdown and the HTML render these, so the two always show the same numbers."""
    out = []
    if results.get("captioning"):
        headers, rows, notes = _caption_rows(results)
        out.append(("Captioning: full model vs FREE at the chosen threshold", headers, rows, notes))

    if results.get("vqa"):
        rows = []
        for task, v in results["vqa"].items():
            full, free = v.get("full") or {}, v.get("free") or {}
            rows.append(
                [
                    VQA_NAMES.get(task, task),
                    fmt(full.get("accuracy")),
                    fmt(free.get("accuracy")),
                    fmt_speedup(free.get("analytic_speedup")),
                    fmt_speedup(free.get("measured_decode_speedup")),
                ]
            )
        out.append(
            (
                "VQA accuracy: full model vs FREE",
                ["task", "full accuracy", "FREE accuracy", "analytic speedup", "measured decode speedup"],
                rows,
                [],
            )
        )

    spec = results.get("speculative")
    if spec:
        rows = [
            [
                fmt_threshold(spec.get("threshold")),
                fmt_speedup(spec.get("measured_decode_speedup")),
                fmt(spec.get("acceptance_rate")),
                fmt(spec.get("identical_to_full")),
            ]
        ]
        out.append(
            (
                "Speculative mode (lossless: exits draft, the full model verifies)",
                ["threshold", "measured decode speedup", "acceptance rate", "identical to full model"],
                rows,
                [],
            )
        )

    if results.get("ablation"):
        rows = [
            [
                VARIANT_NAMES.get(a.get("variant"), a.get("variant")),
                fmt_threshold(a.get("threshold")),
                fmt(a.get("CIDEr")),
                fmt_speedup(a.get("analytic_speedup")),
                fmt_speedup(a.get("measured_decode_speedup")),
            ]
            for a in results["ablation"]
        ]
        out.append(
            (
                "Ablation (each variant at its best dev threshold)",
                ["variant", "threshold", "CIDEr", "analytic speedup", "measured decode speedup"],
                rows,
                [],
            )
        )

    sweep = results.get("sweep")
    if sweep and sweep.get("points"):
        chosen, metric = sweep.get("chosen_threshold"), sweep.get("metric", "score")
        rows = [
            [
                fmt_threshold(p.get("threshold")),
                fmt(p.get("score")),
                fmt_speedup(p.get("analytic_speedup")),
                fmt_speedup(p.get("measured_speedup")),
                "chosen" if p.get("threshold") == chosen else "",
            ]
            for p in sweep["points"]
        ]
        out.append(
            (
                f"Threshold sweep on dev ({metric}); chosen threshold {fmt_threshold(chosen)}",
                ["threshold", metric, "analytic speedup", "measured speedup", "chosen"],
                rows,
                [],
            )
        )
    out += _calibration_tables(results.get("calibration"))

    if results.get("per_layer"):
        rows = [
            [_layer_label(p.get("layer"), _final_layer(results)), fmt(p.get("CIDEr"))] for p in results["per_layer"]
        ]
        out.append(("Each exit on its own (every token leaves at that layer)", ["layer", "CIDEr"], rows, []))

    if results.get("methods"):
        rows = [
            [
                str(m.get("method")),
                fmt_threshold(m.get("threshold")),
                fmt(m.get("quality")),
                fmt_speedup(m.get("analytic_speedup")),
                fmt_speedup(m.get("measured_speedup")),
                fmt(m.get("trainable_parameters")),
            ]
            for m in results["methods"]
        ]
        notes = [f"Measured speedup: {results['methods_speed']}."] if results.get("methods_speed") else []
        out.append(
            (
                "Early-exit methods compared (each at its best dev threshold)",
                ["method", "threshold", "quality", "analytic speedup", "measured speedup", "trainable parameters"],
                rows,
                notes,
            )
        )
    out += _placement_table(results.get("placement"))

    conf = results.get("confidence") or {}
    rows = []
    for group in ("per_layer", "variants", "methods"):
        for name, row in (conf.get(group) or {}).items():
            diff = (
                ""
                if "diff_ci" not in row
                else f"{row['diff_vs_first']:+.3f} [{row['diff_ci'][0]:.3f}, {row['diff_ci'][1]:.3f}]"
            )
            rows.append(
                [
                    group.replace("_", " "),
                    name,
                    fmt(row["mean"]),
                    f"[{row['ci'][0]:.3f}, {row['ci'][1]:.3f}]",
                    diff,
                    row.get("verdict", ""),
                ]
            )
    if rows:
        out.append(
            (
                "95% bootstrap intervals over test images",
                ["group", "name", "CIDEr-D", "interval", "difference to the group's first row", "verdict"],
                rows,
                [conf.get("metric", "")],
            )
        )
    if results.get("claims"):
        rows = [[c["claim"], c["verdict"], c["evidence"]] for c in results["claims"]]
        out.append(
            (
                "The paper's claims, judged on this run",
                ["claim", "verdict", "evidence"],
                rows,
                ["Supported only where a paired 95% interval excludes no difference."],
            )
        )

    for split, counts in _histograms(results).items():
        total = sum(counts.values())
        rows = [[_layer_label(layer, _final_layer(results)), fmt(n), _ratio(n, total)] for layer, n in counts.items()]
        out.append(
            (f"Where FREE's tokens left: {SPLIT_NAMES.get(split, split)}", ["layer", "tokens", "share"], rows, [])
        )
    return out


def _certified(threshold: float | None, certified: bool | None) -> str:
    return fmt_threshold(threshold) + ("" if certified else " (none certified: never exit)")


def _calibration_tables(c: dict | None) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """The certified threshold beside the best-mean-dev one with the test risk of each, then the certification."""
    if not c:
        return []
    risks = {r["threshold"]: r["empirical_risk"] for r in c.get("per_threshold", [])}
    rows = []
    for r in c["test"]:
        t = r["threshold"]
        shown = _certified(t, c["certified"]) if t == c["certified_threshold"] else fmt_threshold(t)
        rows.append(
            [
                r["rule"],
                shown,
                fmt(risks.get(t)),
                fmt(r["test_risk"]),
                fmt(r["test_risk"] <= c["tolerance"]),
                fmt(r["test_CIDEr"]),
                fmt_speedup(r["test_analytic_speedup"]),
            ]
        )
    notes = [
        f"Loss: {c['loss']} ({c['loss_definition']}); risk is its mean. {c.get('why', '')}".strip(),
        (
            f"Certified on the {c['split']} split ({c['n']} images, apart from dev and test) at tolerance "
            f"{c['tolerance']:g} and confidence {c['confidence']:g} ({c['p_value_method']} p-values, thresholds tested "
            f"from the safest down): {c['guarantee']}. The best-mean-dev threshold promises nothing."
        ),
        f"Added time: {fmt_seconds(c.get('seconds'))}.",
    ]
    headers = [
        "rule",
        "threshold",
        "calibration risk",
        "test risk",
        "test risk within tolerance",
        "test CIDEr",
        "test analytic speedup",
    ]
    per = [
        [
            fmt_threshold(r["threshold"]),
            fmt(r["empirical_risk"]),
            f"{r['p_value']:.2g}",
            fmt(r["certified"]),
            fmt_speedup(r.get("analytic_speedup")),
        ]
        for r in c.get("per_threshold", [])
    ]
    title = (
        f"Threshold with a guarantee: certified {fmt_threshold(c['certified_threshold'])} vs best mean dev "
        f"{fmt_threshold(c['best_mean_dev_threshold'])}"
    )
    return [
        (title, headers, rows, notes),
        (
            f"Learn-then-Test on the {c['split']} split (FREE)",
            ["threshold", "risk", "p-value", "certified", "analytic speedup"],
            per,
            [],
        ),
    ]


def _placement_table(p: dict | None) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """Every exit set the placement search certified, fastest first; test columns for the chosen and fixed sets."""
    if not p:
        return []
    marked = {tuple(p["chosen"]["layers"]): ("chosen", p["chosen"])}
    if p.get("fixed"):
        layers = tuple(p["fixed"]["layers"])
        note = "the demo's fixed exits"
        marked[layers] = (f"chosen; {note}" if layers in marked else note, p["fixed"])
    rows = []
    for a in p["alternatives"]:
        note, tested = marked.get(tuple(a["layers"]), ("", {}))
        test = [fmt(tested["test_risk"]), fmt(tested["test_CIDEr"])] if tested else ["", ""]
        rows.append(
            [
                ", ".join(map(str, a["layers"])),
                fmt(a["trainable_parameters"]),
                _certified(a["threshold"], a["certified"]),
                fmt(a["risk"]),
                fmt_speedup(a["speedup"]),
                *test,
                note,
            ]
        )
    source = "FREE's exits"
    if p["exits_from"] == "free_candidates":
        source = (
            "exits trained once at every candidate layer with FREE's recipe (`free_candidates`); the fixed row "
            "is those exits at the fixed layers"
        )
    notes = [
        (
            f"From {source}. {p['placements_tested']} sets of at most {p['budget_exits']} exits, each certified on the "
            f"calibration split ({p['n']} images, thresholds {', '.join(map(fmt_threshold, p['thresholds']))}) at "
            f"confidence {p['confidence_per_placement']:.4g} (Bonferroni): {p['guarantee']}."
        ),
        (
            f"Speedup: {p['speedup']} (N / mean layers per token, an exit counting as one layer) at each set's certified "
            "threshold; the runs are batched, where one request's work cannot be counted."
        ),
        f"Added time: {fmt_seconds(p.get('seconds'))}.",
    ]
    headers = [
        "exits",
        "trainable parameters",
        "certified threshold",
        "calibration risk",
        "speedup",
        "test risk",
        "test CIDEr",
        "note",
    ]
    title = f"Exit placement: at most {p['budget_exits']} exits from layers {', '.join(map(str, p['candidates']))}"
    return [(title, headers, rows, notes)]


def _targets(results: dict) -> list[tuple[bool, str]]:
    return [
        (bool(t.get("met")), f"{t.get('name')} (reached: {t.get('value', 'n/a')})")
        for t in results.get("targets") or []
    ]


def markdown_report(results: dict, plots: dict[str, str]) -> str:
    """The Markdown summary; `plots` maps a caption to an image file (relative to the report folder)."""
    out = [
        "# freevlm demo report",
        "",
        (
            "Every number here was measured by this run of `freevlm demo` and is also in `results.json`. "
            "Samples with each token coloured by the layer it left at: [index.html](index.html)."
        ),
        "",
    ]
    out += [f"- {line}" for line in trained_summary(results)] + [""]
    if results.get("targets"):
        out += (
            ["## Targets", ""]
            + [f"- **{'met' if met else 'NOT met'}**: {text}" for met, text in _targets(results)]
            + [""]
        )
    for title, headers, rows, notes in tables(results):
        out += [f"## {title}", "", markdown_table(headers, rows), ""]
        out += [f"- {n}" for n in notes] + ([""] if notes else [])
    if plots:
        out += ["## Plots", ""] + [f"![{name}]({file})\n" for name, file in plots.items()]
    out += ["---", "", "Open [index.html](index.html) for the samples with token-level exit colours.", ""]
    return "\n".join(out)


def _layer_label(layer: int, final: int | None) -> str:
    return f"{layer} (final)" if layer == final else str(layer)


def _histograms(results: dict) -> dict[str, dict[int, int]]:
    """FREE's exit histogram per captioning split, layers as ints in ascending order."""
    out = {}
    for split, s in (results.get("captioning") or {}).items():
        hist = (s.get("free") or {}).get("exit_histogram")
        if hist:
            out[split] = {int(k): int(v) for k, v in sorted(hist.items(), key=lambda kv: int(kv[0]))}
    return out


def _plot_exit_histograms(results: dict, path: Path) -> Path | None:
    """Bar chart of the share of tokens leaving at each layer, one bar group per split; None if no histogram."""
    histograms = _histograms(results)
    if not histograms:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = _final_layer(results)
    layers = sorted({layer for h in histograms.values() for layer in h})
    colours = layer_colours(_exit_layers(results), final if final is not None else layers[-1], layers)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    width = 0.8 / len(histograms)
    for j, (split, counts) in enumerate(histograms.items()):
        total = sum(counts.values()) or 1
        xs = [i + (j - (len(histograms) - 1) / 2) * width for i in range(len(layers))]
        shares = [100 * counts.get(layer, 0) / total for layer in layers]
        ax.bar(
            xs,
            shares,
            width,
            color=[colours[layer] for layer in layers],
            edgecolor="#333",
            hatch="//" if j else None,
            label=SPLIT_NAMES.get(split, split),
        )
    ax.set_xticks(range(len(layers)), [_layer_label(layer, final) for layer in layers])
    ax.set_xlabel("LM layer the token left at")
    ax.set_ylabel("share of generated tokens (%)")
    ax.set_title("FREE at the chosen threshold: exit layers")
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1120px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:26px;margin:4px 0 4px}h2{font-size:19px;margin:30px 0 10px;border-bottom:1px solid #d9dde3;padding-bottom:4px}
.sub{color:#5a6475;margin:0 0 14px;font-size:14px}
ul.trained{font-size:14px;line-height:1.5;margin:6px 0;padding-left:20px;color:#333b48}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:14px 0}
.card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:10px 14px;min-width:150px}
.card .v{font-size:22px;font-weight:650}.card .k{font-size:12px;color:#5a6475;margin-top:2px}
.legend{display:flex;flex-wrap:wrap;gap:8px;align-items:center;background:#fff;border:1px solid #dde1e7;
 border-radius:8px;padding:10px 14px;font-size:14px;position:sticky;top:0;z-index:1}
.legend b{margin-right:6px}
.tok{border-radius:4px;padding:1px 4px;margin:0 1px;line-height:2;box-decoration-break:clone;-webkit-box-decoration-break:clone}
.tok.final{border:1px dashed #8b8b8b;padding:0 3px}
.samples{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:14px;margin-top:14px}
.sample{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:12px;display:flex;gap:12px}
.sample img{width:128px;height:128px;image-rendering:pixelated;border-radius:4px;border:1px solid #ccd;flex:none}
.sample .free{font-size:16px;margin:0 0 6px}
.sample .full{font-size:13px;color:#4a5262;margin:0}
.sample .meta{font-size:12px;color:#7a8394;margin:6px 0 0}
.split{display:inline-block;font-size:11px;font-weight:600;text-transform:uppercase;letter-spacing:.04em;
 background:#eef1f6;color:#4a5262;border-radius:3px;padding:1px 6px;margin-bottom:6px}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:8px 0}
th,td{border:1px solid #dde1e7;padding:4px 8px;text-align:right}th{background:#eef1f6}
td:first-child,th:first-child,td:nth-child(2),th:nth-child(2){text-align:left}
.same{color:#17813a}.diff{color:#b3261e}
.met{color:#17813a;font-weight:650}.notmet{color:#b3261e;font-weight:650}
.plots img{max-width:100%;background:#fff;border:1px solid #dde1e7;border-radius:8px;margin:8px 0}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _own_spaces(tokens: list[dict]) -> bool:
    """Whether the tokens carry their own leading whitespace (subword pieces decoded as-is); else they are words."""
    return any(t["text"][:1].isspace() for t in tokens)


def caption_text(tokens: list[dict]) -> str:
    """The caption the tokens spell."""
    return "".join(t["text"] for t in tokens).strip() if _own_spaces(tokens) else " ".join(t["text"] for t in tokens)


def token_spans(tokens: list[dict], colours: dict[int, str], final_layer: int) -> str:
    """One `<span class="tok">` per token, coloured by its exit layer, spaced as `caption_text` spaces them."""
    own_spaces = _own_spaces(tokens)
    parts = []
    for t in tokens:
        layer = int(t["layer"])
        text = t["text"]
        lead = text[: len(text) - len(text.lstrip())] if own_spaces else ""
        cls = "tok final" if layer == final_layer else "tok"
        colour = colours.get(layer, FINAL_COLOUR)
        parts.append(
            f'{_e(lead)}<span class="{cls}" data-layer="{layer}" title="left at layer {layer}" '
            f'style="background:{colour}">{_e(text.lstrip() if own_spaces else text)}</span>'
        )
    return "".join(parts) if own_spaces else " ".join(parts)


def _legend(colours: dict[int, str], final_layer: int) -> str:
    items = []
    for layer in sorted(colours):
        label = f"layer {layer} (final: no early exit)" if layer == final_layer else f"exit at layer {layer}"
        cls = "tok final" if layer == final_layer else "tok"
        items.append(f'<span class="{cls}" style="background:{colours[layer]}">{_e(label)}</span>')
    return '<div class="legend"><b>Token colour = LM layer it left at:</b>' + "".join(items) + "</div>"


def _cards(results: dict) -> str:
    """Headline numbers for the test split and speculative mode."""
    test = (results.get("captioning") or {}).get("test") or {}
    full, free = test.get("full") or {}, test.get("free") or {}
    spec = results.get("speculative") or {}
    threshold = (results.get("sweep") or {}).get("chosen_threshold")
    cards = [
        (fmt_threshold(threshold), "chosen threshold (dev)"),
        (fmt(full.get("CIDEr")), "CIDEr, full model (test)"),
        (fmt(free.get("CIDEr")), "CIDEr, FREE (test)"),
        (fmt_speedup(free.get("measured_decode_speedup")), "measured decode speedup (test)"),
        (fmt_speedup(free.get("measured_end_to_end_speedup")), "measured end-to-end speedup"),
        (fmt(free.get("mean_layers_per_token")), f"mean layers / token (of {_final_layer(results)})"),
        (fmt_speedup(spec.get("measured_decode_speedup")), "speculative mode speedup"),
    ]
    body = "".join(
        f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>'
        for v, k in cards
        if v != "n/a"
    )
    return f'<div class="cards">{body}</div>' if body else ""


def _html_table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_report(results: dict, plots: dict[str, str]) -> str:
    """The self-contained page: inline CSS, images by relative path, no scripts or external assets."""
    final = _final_layer(results)
    samples = results.get("samples") or []
    seen = [int(t["layer"]) for s in samples for t in s.get("tokens", [])]
    if final is None:
        final = max(seen + _exit_layers(results), default=0)
    colours = layer_colours(_exit_layers(results), final, seen)
    threshold = fmt_threshold((results.get("sweep") or {}).get("chosen_threshold"))

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>freevlm demo report</title>",
        f"<style>{CSS}</style></head><body><main>",
        f"<h1>freevlm demo: {_model_name(results)} with FREE early exits</h1>",
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
            for met, text in _targets(results)
        )
        parts.append(f"<h2>Targets</h2><ul>{items}</ul>")

    if samples:
        parts += [
            f"<h2>Samples: FREE captions at threshold {_e(threshold)}, each token coloured by its exit layer</h2>",
            _legend(colours, final),
            '<div class="samples">',
        ]
        for s in samples:
            tokens = s.get("tokens") or []
            mean = (
                f"mean exit layer {sum(int(t['layer']) for t in tokens) / len(tokens):.1f} of {final}" if tokens else ""
            )
            same = caption_text(tokens) == s.get("full_caption", "").strip()
            verdict = (
                '<span class="same">same as full model</span>'
                if same
                else '<span class="diff">differs from full model</span>'
            )
            parts.append(
                f'<div class="sample"><img src="{_e(s.get("image", ""))}" alt="sample image">'
                f'<div><span class="split">{_e(s.get("split", ""))}</span>'
                f'<p class="free">{token_spans(tokens, colours, final)}</p>'
                f'<p class="full">Full model: {_e(s.get("full_caption", ""))}</p>'
                f'<p class="meta">{verdict} · {_e(mean)}</p></div></div>'
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
