"""Log-likelihood of candidate answers under early exits (VisDial's 100 options are ranked by it).

Teacher forcing runs every layer and every exit over the whole sequence at once (`EarlyExitVLM.forward`), then each
target token takes its distribution from the first exit whose max probability reaches the threshold, else from the
final layer - the same rule generation uses, so ranking quality reflects the exits, whatever their kind. Speed is
measured with `generate`, not here: this pass computes all layers by construction.
"""

from __future__ import annotations

import torch

from ..decoding.config import DecodeConfig
from ..decoding.policies import ExitPolicy
from ..inputs import pad_rows
from ..methods import exit_rule
from ..model import IGNORE_INDEX, EarlyExitVLM, ExitOutputs

OPTION_BATCH_SIZE = 50  # options per teacher-forced pass (a VisDial round has 100)


def option_log_likelihoods(
    ee: EarlyExitVLM,
    processor,
    image,
    prompt: str,
    options: list[str],
    threshold: float = DecodeConfig.threshold,
    layer: int | None = None,
    batch_size: int = OPTION_BATCH_SIZE,
    method: str = "free",
) -> list[float]:
    """Sum of log p(token) over each option's tokens (encoder-decoder LMs: its EOS included), given image and prompt.

    `layer` forces every token's distribution from that exit (or the final layer, `num_layers`), as the
    per-layer curve does; otherwise `method`'s exit rule at `threshold` picks it.
    """
    (scores,) = option_log_likelihoods_many(
        ee, processor, image, prompt, options, [(threshold, layer)], batch_size, method
    )
    return scores


@torch.no_grad()
def option_log_likelihoods_many(
    ee: EarlyExitVLM,
    processor,
    image,
    prompt: str,
    options: list[str],
    rules: list[tuple[float | None, int | None]],
    batch_size: int = OPTION_BATCH_SIZE,
    method: str = "free",
) -> list[list[float]]:
    """`option_log_likelihoods` under each (threshold, layer) of `rules` (a sweep's): the teacher-forced pass does
    not depend on the rule, so it runs once per chunk of options and each rule only chooses among its outputs."""
    backbone, tok = ee.backbone, processor.tokenizer
    policies = []
    for threshold, layer in rules:
        if layer is not None and layer not in ee.exit_layers and layer != backbone.num_layers:
            raise ValueError(f"layer {layer} has no exit (exits: {ee.exit_layers}, final: {backbone.num_layers})")
        policies.append(exit_rule(method, threshold, layer))
        policies[-1].validate(ee.exit_layers, backbone.num_layers)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    scores: list[list[float]] = [[] for _ in rules]
    for start in range(0, len(options), batch_size):
        chunk = options[start : start + batch_size]
        inputs = processor.inputs([image] * len(chunk), [prompt] * len(chunk))
        device = inputs["input_ids"].device
        if backbone.encoder_decoder:  # the option is the decoder's sequence, its EOS included
            targets = [tok(o, add_special_tokens=True)["input_ids"] for o in chunk]
            start_id = backbone.lm.config.decoder_start_token_id
            decoder_in, _ = pad_rows([[start_id] + t[:-1] for t in targets], pad_id)
            batch = {
                **inputs,
                "decoder_input_ids": decoder_in.to(device),
                "targets": pad_rows(targets, IGNORE_INDEX)[0],
            }
        else:  # the option follows the prompt in the one sequence
            targets = [tok(" " + o, add_special_tokens=False)["input_ids"] for o in chunk]
            ids, tmask = pad_rows(targets, pad_id)
            first = inputs["input_ids"].shape[1] - 1  # position p predicts token p + 1
            labels = torch.full((len(chunk), first + 1 + ids.shape[1]), IGNORE_INDEX, dtype=torch.long)
            labels[:, first : first + ids.shape[1]] = pad_rows(targets, IGNORE_INDEX)[0]
            batch = {
                **inputs,  # with what the image path reads beyond image and prompt (InstructBLIP's instruction)
                "targets": labels,
                "input_ids": torch.cat([inputs["input_ids"], ids.to(device)], dim=1),
                "attention_mask": torch.cat([inputs["attention_mask"], tmask.to(device)], dim=1),
            }
            if "token_type_ids" in inputs:  # Gemma 3's: the options are text
                batch["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.zeros_like(ids.to(device))], dim=1)
        batch["targets"] = batch["targets"].to(device)
        out = ee(batch)
        rows = (batch["targets"] != IGNORE_INDEX).nonzero()[:, 0]  # the option each text position belongs to
        for kept, policy in zip(scores, policies):
            token_logp = _chosen_log_probs(ee, out, policy).gather(-1, out.targets[:, None]).squeeze(-1)
            kept += torch.zeros(len(chunk), device=device).index_add_(0, rows, token_logp).tolist()
    return scores


def _chosen_log_probs(ee: EarlyExitVLM, out: ExitOutputs, policy: ExitPolicy) -> torch.Tensor:
    """Per text position, the log-probabilities of the exit `policy` lets it leave at, else the final layer's: every
    position is a row of one generation step, decided exit by exit as the engine does."""
    chosen = torch.log_softmax(out.final_logits.float(), dim=-1)
    rows = torch.arange(len(chosen), device=chosen.device)  # positions that have not left yet
    live = policy.live_exits(ee.exit_layers)
    for k, features in out.features.items():  # in depth order; MuE's rule compares h_i, its head exits' features
        if int(k) not in live or not len(rows):
            continue
        logits = out.logits[k][rows]
        leave = policy.decide(int(k), logits if policy.needs_logits(int(k)) else None, 0, rows, features[rows])
        chosen[rows[leave]] = torch.log_softmax(logits[leave].float(), dim=-1)
        rows = rows[~leave]
    return chosen
