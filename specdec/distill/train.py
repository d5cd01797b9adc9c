"""Training the draft on cached teacher distributions, and measuring its agreement with the target.

Loss: cross-entropy against the target's top-k distribution renormalised over the draft's
vocabulary (forward KL up to a constant, as EAGLE-3 does), on answer positions only.
"""

from __future__ import annotations

import math
import random

import torch

from specdec.distill.data import Example


def batches(examples: list[Example], max_tokens: int, max_len: int, rng: random.Random) -> list[list[Example]]:
    """Examples grouped by length into batches of about `max_tokens` tokens, in random order."""
    order = sorted(examples, key=lambda ex: min(len(ex.ids), max_len) + rng.random())
    out, batch, width = [], [], 0
    for ex in order:
        width = max(width, min(len(ex.ids), max_len))
        if batch and width * (len(batch) + 1) > max_tokens:
            out.append(batch)
            batch, width = [], min(len(ex.ids), max_len)
        batch.append(ex)
    if batch:
        out.append(batch)
    rng.shuffle(out)
    return out


def _inputs(batch: list[Example], t2d: torch.Tensor, max_len: int, unknown: int):
    """Right-padded draft inputs [B, L] and, per answer position kept after truncation, its batch
    row and column [P] and the teacher's top-k ids and log-probabilities [P, k]."""
    cuts = [max(0, len(ex.ids) - 1 - max_len) for ex in batch]
    width = max(len(ex.ids) - 1 - cut for ex, cut in zip(batch, cuts))
    ids = torch.full((len(batch), width), unknown, dtype=torch.long)
    attention = torch.zeros(len(batch), width, dtype=torch.long)
    rows, cols, top_ids, top_lp = [], [], [], []
    for b, (ex, cut) in enumerate(zip(batch, cuts)):
        seq = t2d[ex.ids[cut:-1].long()]
        ids[b, : len(seq)] = seq
        attention[b, : len(seq)] = 1
        answer = len(ex.ids) - ex.start
        first = max(0, cut - ex.start + 1)  # answer tokens whose predicting position survived the cut
        cols.append(torch.arange(ex.start - 1 + first - cut, ex.start - 1 + answer - cut))
        rows.append(torch.full((answer - first,), b))
        top_ids.append(ex.topk_ids[first:])
        top_lp.append(ex.topk_logprobs[first:])
    return ids, attention, torch.cat(rows), torch.cat(cols), torch.cat(top_ids).long(), torch.cat(top_lp).float()


def step_loss(draft, batch: list[Example], t2d: torch.Tensor, max_len: int) -> tuple[torch.Tensor, int, int]:
    """-> (mean loss over answer positions, top-1 agreements, positions)."""
    unknown = draft.config.vocab_size - 1
    ids, attention, rows, cols, top_ids, top_lp = _inputs(batch, t2d, max_len, unknown)
    device = next(draft.parameters()).device
    hidden = draft.model(input_ids=ids.to(device), attention_mask=attention.to(device)).last_hidden_state
    logits = draft.lm_head(hidden[rows.to(device), cols.to(device)]).float()  # [P, V_draft + 1]
    logits[:, unknown] = float("-inf")  # the catch-all row is an input, never a proposal
    draft_ids = t2d[top_ids]  # [P, k]
    known = draft_ids != unknown
    teacher = top_lp.masked_fill(~known, float("-inf")).softmax(-1).nan_to_num(0.0).to(device)  # renormalised
    logprobs = logits.log_softmax(-1).gather(-1, draft_ids.masked_fill(~known, 0).to(device))
    usable = known.any(-1).to(device)
    loss = -(teacher * logprobs.masked_fill(~known.to(device), 0.0)).sum(-1)[usable].mean()
    agree = int((logits.argmax(-1).cpu() == draft_ids[:, 0]).logical_and(known[:, 0]).sum())
    return loss, agree, len(rows)


@torch.no_grad()
def agreement(draft, examples: list[Example], t2d: torch.Tensor, max_len: int, max_tokens: int) -> float:
    """Share of answer positions where the draft's top-1 is the target's top-1 (teacher forcing)."""
    draft.eval()
    agree = total = 0
    for batch in batches(examples, max_tokens, max_len, random.Random(0)):
        _, a, n = step_loss(draft, batch, t2d, max_len)
        agree, total = agree + a, total + n
    return agree / max(1, total)


def learning_rate(progress: float, peak: float, warmup: float = 0.05) -> float:
    """Linear warm-up then cosine decay to 10% over training progress in [0, 1]."""
    if progress < warmup:
        return peak * progress / warmup
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup)))))
