"""What the demo's report shows, read from the results (`results.json`'s dict): its tables (title, headers, rows,
notes), the lines saying what was trained, and how cells are written. The Markdown and the HTML page both render
these, so the two always show the same numbers.

Honesty rule: every number shown is read from the results (or derived from them, e.g. a ratio of two of its
values), never typed in here; sections the run did not produce are left out.
"""

from __future__ import annotations

from typing import Any

CAPTION_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE", "exact_match")
SPLIT_NAMES = {"test": "test", "ood": "OOD"}
SPEEDUP_MEANING = {  # the placement's speedup kinds (`freevlm.placement.SPEEDUPS`) a report may name
    "analytic": "N / mean layers per token, an exit counting as one layer",
    "calls": "N / LM layers plus exit layers consulted per token: each exit a token passed or left at is a layer",
}
OOD_NOTE = (
    "OOD: the out-of-distribution split, colour-shape combinations never seen in training (like NoCaps' out-domain)."
)
VQA_NAMES = {"shapes": "shapes VQA", "easyvqa": "easy-VQA (external)"}
VARIANT_NAMES = {
    "free": "FREE (GAN + KD anchor)",
    "free_no_adversarial": "FREE without the adversarial term",
    "free_ce": "FREE-CE (GAN + CE anchor, semi-supervised)",
}
Table = tuple[str, list[str], list[list[str]], list[str]]  # title, headers, rows, notes


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


def _ratio(value: float | None, reference: float | None) -> str:
    return "n/a" if value is None or not reference else f"{100 * value / reference:.1f}%"


def _ci(interval: list[float]) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def final_layer(results: dict) -> int | None:
    return results["backbone"]["num_layers"] if "backbone" in results else None


def exit_layers(results: dict) -> list[int]:
    return results["exits"]["exit_layers"] if "exits" in results else []


def model_name(results: dict) -> str:
    """The demo's model: a LLaVA for the Llama LM, a BLIP-2 otherwise."""
    return "LLaVA" if results.get("backbone", {}).get("family") == "llama" else "BLIP-2"


def trained_summary(results: dict) -> list[str]:
    """Bullet lines saying what was trained, from the results' backbone, exits, config and timing."""
    lines = []
    if b := results.get("backbone"):
        model, trained = model_name(results), "projector" if model_name(results) == "LLaVA" else "Q-Former"
        how = "reused from the cache (trained by an earlier run)" if b["cached"] else "trained in this run"
        lines += [
            f"Backbone: {model} (Hugging Face classes), {trained} and language model trained on the shapes world; "
            f"LM {b['family'].upper()}, {b['num_layers']} layers, hidden size {b['hidden_size']}.",
            f"Vision encoder: {b['vision_encoder']}.",
            f"Backbone training: {fmt(b['train_steps'])} steps, {fmt_seconds(b['train_seconds'])}, "
            f"final loss {fmt(b['final_loss'])}; {how}.",
        ]
    if e := results.get("exits"):
        layers = ", ".join(map(str, e["exit_layers"]))
        lines.append(f"Exits at LM layers {layers}; {fmt(e['trainable_parameters'])} trainable parameters.")
        for name, v in e["variants"].items():
            if v.get("exits_of"):  # a subset of another run's exits: trained there
                at = ", ".join(map(str, v["exit_layers"]))
                lines.append(f"Exit variant `{name}`: the exits of `{v['exits_of']}` at layers {at}.")
                continue
            if "method" in v:  # a baseline: linear exits trained with that method's loss
                recipe = f"{v['method']} loss on linear exits"
            else:
                recipe = f"{v['anchor']} anchor, {'with' if v['adversarial'] else 'without'} adversarial term"
            if v.get("exit_layers"):  # trained elsewhere than the exits above (the placement's candidates)
                recipe += f", exits at layers {', '.join(map(str, v['exit_layers']))}"
            lines.append(f"Exit variant `{name}`: {recipe}, {fmt(v['steps'])} steps, {fmt_seconds(v['seconds'])}.")
    if c := results.get("config"):
        lines.append("Run settings: " + ", ".join(f"{k}={v}" for k, v in c.items()) + ".")
    if t := results.get("timing"):
        stages = ", ".join(f"{k} {fmt_seconds(v)}" for k, v in t["stages"].items())
        lines.append(f"Whole run: {fmt_seconds(t['total_seconds'])}" + (f" ({stages})." if stages else "."))
    return lines


def _captioning(results: dict) -> Table:
    """One full-model and one FREE row per split."""
    splits = results["captioning"]
    metrics = [m for m in CAPTION_METRICS if any(m in s["full"] or m in s["free"] for s in splits.values())]
    speeds = ["analytic speedup", "measured decode speedup", "measured end-to-end speedup", "mean layers / token"]
    headers = ["split", "model", *metrics, "CIDEr vs full", *speeds]
    rows, notes = [], []
    threshold = fmt_threshold(results["sweep"]["chosen_threshold"])
    for split, s in splits.items():
        full, free, speed, name = s["full"], s["free"], s["speed"], SPLIT_NAMES.get(split, split)
        blank = ["", "", "", ""]  # ratio and speedups
        rows.append([name, "full model", *[fmt(full.get(m)) for m in metrics], *blank, fmt(final_layer(results))])
        rows.append(
            [name, f"FREE @ {threshold}", *[fmt(free.get(m)) for m in metrics], _ratio(free["CIDEr"], full["CIDEr"])]
            + [fmt_speedup(speed[k]) for k in ("analytic_speedup", "decode_speedup", "wallclock_speedup")]
            + [fmt(speed["mean_layers_per_token"])]
        )
        if split == "ood":
            notes.insert(0, OOD_NOTE)
        notes += [f"SPICE on {name}: {s['spice']}"] if s["spice"] != "computed" else []
    notes.append(f"How speed is measured in every table: {results['speed_protocol']}.")
    return "Captioning: full model vs FREE at the chosen threshold", headers, rows, notes


def _compared(rows: list[dict], names: dict[str, str], parameters: bool) -> list[list[str]]:
    """Ablation and method rows: name, threshold, CIDEr, analytic and measured speedup (and parameters)."""
    return [
        [names.get(r["name"], r["name"]), fmt_threshold(r["threshold"]), fmt(r["CIDEr"])]
        + [fmt_speedup(r["speed"]["analytic_speedup"]), fmt_speedup(r["speed"]["decode_speedup"])]
        + ([fmt(r["trainable_parameters"])] if parameters else [])
        for r in rows
    ]


def tables(results: dict) -> list[Table]:
    """The report's tables, in order; sections without data are left out. Both the Markdown and the HTML render
    these, so the two always show the same numbers."""
    out = []
    speeds = ["analytic speedup", "measured decode speedup"]
    if results.get("captioning"):
        out.append(_captioning(results))
    if vqa := results.get("vqa"):
        rows = [
            [VQA_NAMES.get(task, task), fmt(v["full_accuracy"]), fmt(v["free_accuracy"])]
            + [fmt_speedup(v["speed"]["analytic_speedup"]), fmt_speedup(v["speed"]["decode_speedup"])]
            for task, v in vqa.items()
        ]
        out.append(("VQA accuracy: full model vs FREE", ["task", "full accuracy", "FREE accuracy", *speeds], rows, []))
    if spec := results.get("speculative"):
        row = [fmt_threshold(spec["threshold"]), fmt_speedup(spec["decode_speedup"])]
        row += [fmt(spec["acceptance_rate"]), fmt(spec["identical_to_full"])]
        headers = ["threshold", "measured decode speedup", "acceptance rate", "identical to full model"]
        out.append(("Speculative mode (lossless: exits draft, the full model verifies)", headers, [row], []))
    if results.get("ablation"):
        rows = _compared(results["ablation"], VARIANT_NAMES, parameters=False)
        headers = ["variant", "threshold", "CIDEr", *speeds]
        out.append(("Ablation (each variant at its best dev threshold)", headers, rows, []))
    if sweep := results.get("sweep"):
        chosen = sweep["chosen_threshold"]
        rows = [
            [fmt_threshold(p["threshold"]), fmt(p["CIDEr"]), fmt_speedup(p["analytic_speedup"])]
            + ["chosen" if p["threshold"] == chosen else ""]
            for p in sweep["points"]
        ]
        title = f"Threshold sweep on dev (CIDEr); chosen threshold {fmt_threshold(chosen)}"
        out.append((title, ["threshold", "CIDEr", "analytic speedup", "chosen"], rows, []))
    if results.get("calibration"):
        out += _calibration_tables(results["calibration"])
    if results.get("per_layer"):
        rows = [[layer_label(p["layer"], final_layer(results)), fmt(p["CIDEr"])] for p in results["per_layer"]]
        out.append(("Each exit on its own (every token leaves at that layer)", ["layer", "CIDEr"], rows, []))
    if results.get("methods"):
        rows = _compared(results["methods"], {}, parameters=True)
        headers = ["method", "threshold", "CIDEr", *speeds, "trainable parameters"]
        notes = [f"Measured speedup: {results['speed_protocol']}."]
        out.append(("Early-exit methods compared (each at its best dev threshold)", headers, rows, notes))
    if results.get("placement"):
        out.append(_placement_table(results["placement"]))
    if conf := results.get("confidence"):
        rows = [
            [group.replace("_", " "), name, fmt(row["mean"]), _ci(row["ci"])]
            + ["" if "diff_ci" not in row else f"{row['diff_vs_first']:+.3f} {_ci(row['diff_ci'])}"]
            + [row.get("verdict", "")]
            for group in ("per_layer", "variants", "methods")
            for name, row in (conf[group] or {}).items()
        ]
        headers = ["group", "name", "CIDEr-D", "interval", "difference to the group's first row", "verdict"]
        out.append(("95% bootstrap intervals over test images", headers, rows, [conf["metric"]]))
    if results.get("claims"):
        rows = [[c["claim"], c["verdict"], c["evidence"]] for c in results["claims"]]
        notes = ["Supported only where a paired 95% interval excludes no difference."]
        out.append(("The paper's claims, judged on this run", ["claim", "verdict", "evidence"], rows, notes))
    for split, counts in histograms(results).items():
        total = sum(counts.values())
        rows = [[layer_label(k, final_layer(results)), fmt(n), _ratio(n, total)] for k, n in counts.items()]
        title = f"Where FREE's tokens left: {SPLIT_NAMES.get(split, split)}"
        out.append((title, ["layer", "tokens", "share"], rows, []))
    return out


def _certified(threshold: float | None, certified: bool | None) -> str:
    return fmt_threshold(threshold) + ("" if certified else " (none certified: never exit)")


def _calibration_tables(c: dict) -> list[Table]:
    """The certified threshold beside the best-mean-dev one with the test risk of each, then the certification."""
    risks = {r["threshold"]: r["empirical_risk"] for r in c["per_threshold"]}
    rows = []
    for r in c["test"]:
        t = r["threshold"]
        shown = _certified(t, c["certified"]) if t == c["certified_threshold"] else fmt_threshold(t)
        rows.append([r["rule"], shown, fmt(risks.get(t)), fmt(r["test_risk"]), fmt(r["test_risk"] <= c["tolerance"])])
        rows[-1] += [fmt(r["test_CIDEr"]), fmt_speedup(r["test_analytic_speedup"])]
    notes = [
        f"Loss: {c['loss']} ({c['loss_definition']}); risk is its mean. {c['why']}",
        f"Certified on the {c['split']} split ({c['n']} images, apart from dev and test) at tolerance "
        f"{c['tolerance']:g} and confidence {c['confidence']:g} ({c['p_value_method']} p-values, thresholds tested "
        f"from the safest down): {c['guarantee']}. The best-mean-dev threshold promises nothing.",
        f"Added time: {fmt_seconds(c['seconds'])}.",
    ]
    headers = ["rule", "threshold", "calibration risk", "test risk", "test risk within tolerance", "test CIDEr"]
    per = [
        [fmt_threshold(r["threshold"]), fmt(r["empirical_risk"]), f"{r['p_value']:.2g}", fmt(r["certified"])]
        + [fmt_speedup(r["analytic_speedup"])]
        for r in c["per_threshold"]
    ]
    title = (
        f"Threshold with a guarantee: certified {fmt_threshold(c['certified_threshold'])} vs best mean dev "
        f"{fmt_threshold(c['best_mean_dev_threshold'])}"
    )
    ltt = ["threshold", "risk", "p-value", "certified", "analytic speedup"]
    return [
        (title, [*headers, "test analytic speedup"], rows, notes),
        (f"Learn-then-Test on the {c['split']} split (FREE)", ltt, per, []),
    ]


def _placement_table(p: dict) -> Table:
    """Every exit set the placement search certified, fastest first; test columns for the chosen and fixed sets."""
    marked = {tuple(p["chosen"]["layers"]): ("chosen", p["chosen"])}
    if p["fixed"]:
        layers, note = tuple(p["fixed"]["layers"]), "the demo's fixed exits"
        marked[layers] = (f"chosen; {note}" if layers in marked else note, p["fixed"])
    rows, beside = [], p["speedup"] != "analytic"  # the paper's speedup beside the one the placement maximised
    for a in p["alternatives"]:
        note, tested = marked.get(tuple(a["layers"]), ("", {}))
        test = [fmt(tested["test_risk"]), fmt(tested["test_CIDEr"])] if tested else ["", ""]
        row = [
            ", ".join(map(str, a["layers"])),
            fmt(a["trainable_parameters"]),
            _certified(a["threshold"], a["certified"]),
        ]
        speeds = [fmt_speedup(a["speedup"])] + ([fmt_speedup(a["speedups"]["analytic"])] if beside else [])
        rows.append(row + [fmt(a["risk"]), *speeds, *test, note])
    source = "FREE's exits"
    if p["exits_from"] == "free_candidates":
        source = (
            "exits trained once at every candidate layer with FREE's recipe (`free_candidates`); the fixed row "
            "is those exits at the fixed layers"
        )
    notes = [
        f"From {source}. {p['placements_tested']} sets of at most {p['budget_exits']} exits, each certified on the "
        f"calibration split ({p['n']} images, thresholds {', '.join(map(fmt_threshold, p['thresholds']))}) at "
        f"confidence {p['confidence_per_placement']:.4g} (Bonferroni): {p['guarantee']}.",
        f"Speedup: {p['speedup']} ({SPEEDUP_MEANING.get(p['speedup'], '')}) at each set's certified threshold; the "
        "runs are batched, where one request's work cannot be counted.",
        f"Added time: {fmt_seconds(p['seconds'])}.",
    ]
    headers = ["exits", "trainable parameters", "certified threshold", "calibration risk", "speedup"]
    headers += ["analytic speedup"] * beside + ["test risk", "test CIDEr", "note"]
    title = f"Exit placement: at most {p['budget_exits']} exits from layers {', '.join(map(str, p['candidates']))}"
    return title, headers, rows, notes


def targets(results: dict) -> list[tuple[bool, str]]:
    return [(t["met"], f"{t['name']} (reached: {t['value']})") for t in results.get("targets", [])]


def layer_label(layer: int, final: int | None) -> str:
    return f"{layer} (final)" if layer == final else str(layer)


def histograms(results: dict) -> dict[str, dict[int, int]]:
    """FREE's exit histogram per captioning split, layers as ints in ascending order."""
    return {
        split: {int(k): int(v) for k, v in sorted(s["speed"]["exit_histogram"].items(), key=lambda kv: int(kv[0]))}
        for split, s in results.get("captioning", {}).items()
        if "speed" in s
    }
