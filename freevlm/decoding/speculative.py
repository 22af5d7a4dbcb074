"""Speculative mode: exits draft, the final layer verifies, output equals the full model's greedy output.

A token that leaves at a confident exit is a *draft*. Drafts pile up as pending tokens (their deeper layers not yet
run). The next token that goes to the final layer - because no exit is confident, because the draft reached
`max_draft` tokens, or because it drafted EOS - catches the pending drafts up through the deeper layers; that
catch-up is exactly the verification pass, so we ask the final layer for its greedy choice at every caught-up slot.
The longest prefix of drafts the final layer agrees with is accepted, plus the final layer's own token at the
first disagreement (or after the last draft); every cache is cropped back to the accepted length. Each accepted
token is the full model's greedy token given an exact prefix, so the output is the full model's, whatever the
threshold.

Rows of a batch move at their own pace (a row that accepted four drafts is four slots ahead of a row that had its
draft rejected). Each engine call takes the rows that sit at the same slot, lowest slot first.
"""

from __future__ import annotations

import torch

from .generate import Call, GenerateOutput, Request


@torch.no_grad()
def speculative_generate(call: Call) -> GenerateOutput:
    backbone, config = call.backbone, call.config
    max_new_tokens, max_draft, pad_token_id = config.max_new_tokens, config.max_draft, config.pad_token_id
    width = max_new_tokens + max_draft + 1
    req = Request.start(call, slots=width)
    ctx, engine, device = req.ctx, req.engine, backbone.device
    batch, prompt_len = ctx.prompt_ids.shape
    num_layers = backbone.num_layers
    generated = torch.full((batch, width), pad_token_id, dtype=torch.long, device=device)
    exit_layers = torch.full((batch, width), -1, dtype=torch.long, device=device)
    eos = set(config.eos_token_id)
    accepted = [0] * batch  # verified tokens per row
    drafts = [0] * batch  # unverified tokens after them
    finished = [False] * batch
    counts = {"drafted": 0, "accepted_drafts": 0, "verifications": 0}  # verifications: passes that checked drafts

    prompt = backbone.embed_prompt(ctx)
    if prompt_len > 1:
        engine.encode(prompt[:, :-1])
    while not all(finished):
        # the rows that sit at the lowest slot go next, together
        slot_of = {b: prompt_len - 1 + accepted[b] + drafts[b] for b in range(batch) if not finished[b]}
        slot = min(slot_of.values())
        group = [b for b, s in slot_of.items() if s == slot]
        rows = torch.tensor(group, device=device)
        verify = []  # rows whose drafts the final layer must check now, instead of drafting another token
        for b in group:
            last = generated[b, accepted[b] + drafts[b] - 1] if accepted[b] + drafts[b] else None
            full = drafts[b] >= max_draft or accepted[b] + drafts[b] >= max_new_tokens
            verify.append(full or (last is not None and int(last) in eos))
        if slot == prompt_len - 1:
            x = prompt[rows, -1:]
        else:
            x = backbone.embed(ctx, generated[rows, slot - prompt_len : slot - prompt_len + 1], rows, slot)
        result = engine.step(rows, x, slot, step=slot - prompt_len + 1, verify=verify)
        verified = {} if result.verified_rows is None else {r: j for j, r in enumerate(result.verified_rows.tolist())}
        for i, b in enumerate(group):
            n = accepted[b] + drafts[b]
            if i not in verified:  # a draft
                generated[b, n], exit_layers[b, n] = result.tokens[i], result.exit_at[i]
                drafts[b] += 1
                counts["drafted"] += 1
                continue
            counts["verifications"] += drafts[b] > 0
            final = result.verified_tokens[verified[i]]  # final-layer choice at slots window_start..slot
            agree = 0
            while agree < drafts[b]:
                at = prompt_len - 1 + accepted[b] + agree - result.window_start
                if int(final[at]) != int(generated[b, accepted[b] + agree]):
                    break
                agree += 1
            counts["accepted_drafts"] += agree
            rejected = agree < drafts[b]
            new = accepted[b] + agree
            generated[b, new] = final[prompt_len - 1 + new - result.window_start]
            exit_layers[b, new] = num_layers
            exit_layers[b, new + 1 :] = -1
            accepted[b], drafts[b] = new + 1, 0
            if rejected:  # slots from the first wrong draft on hold K/V of the wrong tokens
                engine.crop_row(b, prompt_len - 1 + accepted[b])
            finished[b] = _finish_row(generated, exit_layers, b, accepted, eos, max_new_tokens, pad_token_id)
            if finished[b]:  # tokens verified past EOS or past max_new_tokens were dropped: so are their slots
                engine.crop_row(b, prompt_len - 1 + accepted[b])
        req.prefilled()

    length = max(accepted)
    exit_layers = exit_layers[:, :length]
    stats = req.finish(exit_layers)
    stats.speculative = dict(counts, acceptance_rate=counts["accepted_drafts"] / max(counts["drafted"], 1))
    sequences = torch.cat([ctx.prompt_ids, generated[:, :length]], dim=1)
    return GenerateOutput(sequences, exit_layers, stats, engine if config.return_engine else None)


def _finish_row(generated, exit_layers, b, accepted, eos, max_new_tokens, pad_token_id) -> bool:
    """Cut a row at its first EOS or at max_new_tokens (what the full model's greedy loop would have emitted)."""
    tokens = generated[b, : accepted[b]].tolist()
    stop = next((i + 1 for i, t in enumerate(tokens) if t in eos), None)
    if stop is None and accepted[b] < max_new_tokens:
        return False
    stop = min(stop or max_new_tokens, max_new_tokens)
    generated[b, stop:] = pad_token_id
    exit_layers[b, stop:] = -1
    accepted[b] = stop
    return True
