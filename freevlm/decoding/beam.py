"""Beam search with exits: every beam is a row of the engine, so each beam leaves at its own exit.

The search itself follows Hugging Face's vectorised beam search step for step (top 2k continuations per item,
finished hypotheses kept with the length penalty `score / generated_length ** length_penalty`, the same
`early_stopping` rules), so with no exit taken it returns exactly what `generate(num_beams=k)` returns.

A beam's score when its token left early: the token's log-probability under the exit it left at (log-softmax of
that exit's logits through the frozen head), added to the beam's running score like any other token's. Beams are
reordered after each step; the engine's caches and pending states move with them.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .generate import Call, GenerateOutput, Request


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`tensor[b, index[b, j], ...]` for `[batch, beams, ...]` tensors."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def beam_generate(call: Call) -> GenerateOutput:
    backbone, config, input_ids = call.backbone, call.config, call.input_ids
    k, max_new_tokens, eos_token_id = config.num_beams, config.max_new_tokens, config.eos_token_id
    length_penalty, early_stopping = config.length_penalty, config.early_stopping
    batch = input_ids.shape[0]
    attention_mask = torch.ones_like(input_ids) if call.attention_mask is None else call.attention_mask
    pixel_values, inputs = backbone.beam_inputs(call.pixel_values, input_ids, call.inputs, k)
    expand = lambda t: t.repeat_interleave(k, dim=0)  # noqa: E731 - as Hugging Face expands inputs per beam
    call = replace(
        call,
        pixel_values=pixel_values,
        input_ids=expand(input_ids),
        attention_mask=expand(attention_mask),
        inputs=inputs,
    )
    req = Request.start(call)
    ctx, engine, device = req.ctx, req.engine, backbone.device
    prompt_len = ctx.prompt_ids.shape[1]
    keep = max(2, 1 + len(eos_token_id)) * k  # candidates per item, so k unfinished ones always remain
    top_k_mask = torch.arange(keep, device=device) < k

    # Hugging Face fills unused positions with pad, or EOS where pad is 0 (its `pad or eos` quirk)
    fill = (config.pad_token_id or eos_token_id[0]) if eos_token_id else -1
    running = torch.full((batch, k, max_new_tokens), fill, dtype=torch.long, device=device)
    running_exits = torch.full((batch, k, max_new_tokens), -1, dtype=torch.long, device=device)
    running_scores = torch.zeros(batch, k, device=device)
    running_scores[:, 1:] = -1e9  # all beams start identical: only the first one may spread
    finished, finished_exits = running.clone(), running_exits.clone()
    finished_scores = torch.full((batch, k), -1e9, device=device)
    is_finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    rows = torch.arange(batch * k, device=device)

    x = None  # the next step's input embeddings, set at the end of each iteration
    for t in range(max_new_tokens):
        if t == 0:
            result = engine.prefill(backbone.embed_prompt(ctx))
        else:
            result = engine.step(rows, x, prompt_len - 1 + t, step=t)
        req.prefilled()
        log_probs = torch.log_softmax(result.logits.float(), dim=-1).view(batch, k, -1)
        vocab = log_probs.shape[-1]
        scores = (log_probs + running_scores[..., None]).view(batch, -1)
        top_scores, top_index = torch.topk(scores, keep)
        source = top_index // vocab  # which beam each candidate extends
        tokens = top_index % vocab
        cand = _gather(running, source)
        cand[:, :, t] = tokens
        cand_exits = _gather(running_exits, source)
        cand_exits[:, :, t] = _gather(result.exit_at.view(batch, k), source)
        hits_eos = torch.isin(tokens, req.eos) if len(eos_token_id) else torch.zeros_like(tokens, dtype=torch.bool)
        hits_stop = hits_eos | (t + 1 >= max_new_tokens)

        # the best k candidates that did not stop keep running
        alive_scores = top_scores + hits_stop.float() * -1e9
        next_index = torch.topk(alive_scores, k)[1]
        running = _gather(cand, next_index)
        running_exits = _gather(cand_exits, next_index)
        running_scores = _gather(alive_scores, next_index)
        beam_rows = _gather(source, next_index) + torch.arange(batch, device=device)[:, None] * k

        # candidates that stopped compete with the finished hypotheses, length-normalised
        just_finished = hits_stop & top_k_mask[None, :]
        normed = top_scores / ((t + 1) ** length_penalty)
        normed = normed + (is_finished.all(-1, keepdim=True) & (early_stopping is True)).float() * -1e9
        normed = normed + (~improvable).float() * -1e9 + (~just_finished).float() * -1e9
        merged_scores = torch.cat([finished_scores, normed], dim=1)
        best = torch.topk(merged_scores, k)[1]
        finished = _gather(torch.cat([finished, cand], dim=1), best)
        finished_exits = _gather(torch.cat([finished_exits, cand_exits], dim=1), best)
        finished_scores = _gather(merged_scores, best)
        is_finished = _gather(torch.cat([is_finished, just_finished], dim=1), best)

        engine.reorder(beam_rows.flatten())
        # Hugging Face's heuristic: can the best running beam still beat the worst finished hypothesis?
        best_length = max_new_tokens if early_stopping == "never" and length_penalty > 0.0 else t + 1
        best_running = running_scores[:, :1] / (best_length**length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], -1.0e9)
        improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
        open_beams = not (bool(is_finished.all()) and early_stopping is True)
        if not (bool(improvable.any()) and open_beams and not bool(hits_stop.all())):
            break
        x = backbone.embed(ctx, running[:, :, t].reshape(-1, 1), None, prompt_len + t)

    best_seq, best_exits = finished[:, 0], finished_exits[:, 0]
    length = int((best_exits >= 0).sum(dim=1).max())
    exit_layers = best_exits[:, :length]
    stats = req.finish(exit_layers)
    sequences = torch.cat([ctx.prompt_ids.view(batch, k, -1)[:, 0], best_seq[:, :length]], dim=1)
    return GenerateOutput(sequences, exit_layers, stats, engine if config.return_engine else None)
