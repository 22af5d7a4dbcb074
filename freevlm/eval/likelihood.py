"""Log-likelihood of candidate answers under early exits (VisDial's 100 options are ranked by it).

Teacher forcing runs every layer over the whole sequence at once (`backbone.features`), then each target token
takes its distribution from the first exit whose max probability reaches the threshold, else from the final
layer - the same rule generation uses, so ranking quality reflects the exits. Speed is measured with `generate`,
not here: this pass computes all layers by construction.
"""

from __future__ import annotations

import torch

from ..model import EarlyExitVLM


def _pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


@torch.no_grad()
def option_log_likelihoods(
    ee: EarlyExitVLM,
    processor,
    image,
    prompt: str,
    options: list[str],
    threshold: float = 0.8,
    layer: int | None = None,
    batch_size: int = 50,
) -> list[float]:
    """Sum of log p(token) over each option's tokens (T5: its EOS included), given image and prompt.

    `layer` forces every token's distribution from that exit (or the final layer, `num_layers`), as the
    per-layer curve does; otherwise the confidence rule at `threshold` picks it.
    """
    backbone, tok = ee.backbone, processor.tokenizer
    if layer is not None and layer not in ee.exit_layers and layer != backbone.num_layers:
        raise ValueError(f"layer {layer} has no exit (exits: {ee.exit_layers}, final: {backbone.num_layers})")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    scores: list[float] = []
    for start in range(0, len(options), batch_size):
        chunk = options[start : start + batch_size]
        inputs = processor.inputs([image] * len(chunk), [prompt] * len(chunk))
        device = inputs["input_ids"].device
        if backbone.family == "t5":
            targets = [tok(o, add_special_tokens=True)["input_ids"] for o in chunk]
            start_id = backbone.lm.config.decoder_start_token_id
            decoder_in, _ = _pad([[start_id] + t[:-1] for t in targets], pad_id)
            states, ctx, mask = backbone.features(
                inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], decoder_in.to(device)
            )
            first = 0
        else:
            targets = [tok(" " + o, add_special_tokens=False)["input_ids"] for o in chunk]
            ids, tmask = _pad(targets, pad_id)
            states, ctx, mask = backbone.features(
                inputs["pixel_values"],
                torch.cat([inputs["input_ids"], ids.to(device)], dim=1),
                torch.cat([inputs["attention_mask"], tmask.to(device)], dim=1),
            )
            first = inputs["input_ids"].shape[1] - 1  # position p predicts token p + 1
        target_ids, target_mask = _pad(targets, pad_id)
        span = slice(first, first + target_ids.shape[1])
        logp = _exit_log_probs(ee, states, ctx, mask, span, threshold, layer)
        token_logp = logp.gather(-1, target_ids.to(device)[..., None]).squeeze(-1)
        scores += (token_logp * target_mask.to(device)).sum(-1).tolist()
    return scores


def _exit_log_probs(ee, states, ctx, mask, span: slice, threshold: float, layer: int | None) -> torch.Tensor:
    backbone = ee.backbone
    final = torch.log_softmax(backbone.head(states[-1][:, span]).float(), dim=-1)
    if layer == backbone.num_layers or (layer is None and threshold >= 1.0):
        return final
    chosen = final.clone()
    decided = torch.zeros(final.shape[:-1], dtype=torch.bool, device=final.device)
    for at, exit_layer in sorted(ee.exit_dict().items()):
        if layer is not None and at != layer:
            continue
        hidden = backbone.run_layer(exit_layer.layer, states[at], ctx, None, mask, None)[:, span]
        logp = torch.log_softmax(backbone.head(hidden).float(), dim=-1)
        leave = torch.ones_like(decided) if layer is not None else logp.max(-1).values.exp() >= threshold
        take = leave & ~decided
        chosen[take] = logp[take]
        decided |= take
    return chosen
