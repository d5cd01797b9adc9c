"""`specdec distill --head eagle3`: an EAGLE-3 head trained on the target's own answers, with the training-time test.

Data: the examples of specdec.distill.data (the target's answers and its top-k distributions) and
the target's features at every position (the hidden states entering the aux layers), computed once
by a teacher-forced forward and cached in the work folder.

Training-time test (EAGLE-3): `ttt_steps` unrolled draft steps per position. Step 0 reads fc(target
features of position t - 1). Step i reads step i - 1's output at t - 1 and attends to step-0 keys up
to position t - i and to the diagonal of later steps' keys (step j at position t - i + j, j = 1..i):
what a depth-i draft node sees in the loop (committed entries, then its drafted ancestors).
Loss: soft cross-entropy against the teacher's top-k distribution renormalised over the draft
vocabulary, steps weighted 0.8^i, on answer positions only.
"""

from __future__ import annotations

import math
import random
import sys

import torch
from tqdm import tqdm

from specdec.distill.data import Example
from specdec.distill.train import batches
from specdec.eagle3 import Eagle3Head, HeadConfig, default_aux_layers

STEP_WEIGHT = 0.8


def new_head(model, vocab: list[int]) -> Eagle3Head:
    """An untrained head for `model` over the draft vocabulary `vocab` (target ids): the target's
    widths, its rotary base, `lm_head` rows initialised from the target's embedding of `vocab`."""
    text = model.config.get_text_config()
    heads = text.num_attention_heads
    rope = getattr(text, "rope_parameters", None) or {}
    config = HeadConfig(
        hidden_size=text.hidden_size, target_hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab_size=text.vocab_size,
        draft_vocab_size=len(vocab), rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta") or getattr(text, "rope_theta", None) or 10000.0,
        max_position_embeddings=getattr(text, "max_position_embeddings", 2048),
        aux_layers=default_aux_layers(text.num_hidden_layers),
    )
    embed = model.get_input_embeddings().weight.detach().float()
    head = Eagle3Head(config, embed)
    ids = torch.tensor(vocab)
    with torch.no_grad():
        head.lm_head.weight.copy_(embed[ids])
        head.d2t.copy_(ids - torch.arange(len(vocab)))
        head.t2d.zero_()
        head.t2d[ids] = True
    return head


def cached_features(path, model, examples: list[Example], aux: tuple[int, ...], max_tokens: int) -> None:
    """Set every example's features, computed once and kept at `path` (the work folder) for a resumed run."""
    if path.is_file():
        for ex, features in zip(examples, torch.load(path, weights_only=True)):
            ex.features = features
        return
    add_features(model, examples, aux, max_tokens)
    torch.save([ex.features for ex in examples], path.with_suffix(".tmp"))
    path.with_suffix(".tmp").rename(path)


@torch.no_grad()
def add_features(model, examples: list[Example], aux: tuple[int, ...], max_tokens: int) -> None:
    """Set the target's features [L, F] float16 of every example, teacher-forced, in batches of
    about `max_tokens` tokens."""
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    bar = tqdm(total=len(order), desc="target features", unit="answer", file=sys.stderr)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and len(examples[order[end]].ids) * (end - start + 1) <= max_tokens:
            end += 1
        chunk = order[start:end]
        width = max(len(examples[i].ids) for i in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attention = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, : len(examples[i].ids)] = examples[i].ids.long()
            attention[row, : len(examples[i].ids)] = 1
        states = model(ids.to(device), attention_mask=attention.to(device), output_hidden_states=True).hidden_states
        features = torch.cat([states[i] for i in aux], dim=-1).half().cpu()  # [B, W, F]
        for row, i in enumerate(chunk):
            examples[i].features = features[row, : len(examples[i].ids)].clone()
        bar.update(len(chunk))
        start = end
    bar.close()


def _inputs(batch: list[Example], max_len: int):
    """Right-padded ids [B, W], features [B, W, F] and, per answer position, its row, column [P]
    and the teacher's top-k ids and log-probabilities [P, k]."""
    cuts = [max(0, len(ex.ids) - max_len) for ex in batch]
    width = max(len(ex.ids) - cut for ex, cut in zip(batch, cuts))
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    features = torch.zeros(len(batch), width, batch[0].features.shape[-1])
    rows, cols, top_ids, top_lp = [], [], [], []
    for b, (ex, cut) in enumerate(zip(batch, cuts)):
        ids[b, : len(ex.ids) - cut] = ex.ids[cut:].long()
        features[b, : len(ex.ids) - cut] = ex.features[cut:].float()
        answer = len(ex.ids) - ex.start
        first = max(0, cut - ex.start + 1)  # answer tokens whose predicting position (start - 1 + j) survived the cut
        cols.append(torch.arange(ex.start - 1 + first - cut, ex.start - 1 + answer - cut))
        rows.append(torch.full((answer - first,), b))
        top_ids.append(ex.topk_ids[first:])
        top_lp.append(ex.topk_logprobs[first:])
    return ids, features, torch.cat(rows), torch.cat(cols), torch.cat(top_ids).long(), torch.cat(top_lp).float()


def _ttt_attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], group: int) -> torch.Tensor:
    """Step i = len(keys) - 1: q [B, Hq, W, D]; keys/values per step [B, Hk, W, D] -> [B, Hq, W, D].
    Position t sees step-0 entries at s <= t - i and step j's entry at t - i + j (j = 1..i)."""
    step, width = len(keys) - 1, q.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    expand = [k.repeat_interleave(group, 1) for k in keys]
    expand_v = [v.repeat_interleave(group, 1) for v in values]
    visible = torch.ones(width, width, dtype=torch.bool, device=q.device).tril_(-step)
    scores = [(q @ expand[0].transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))]  # [B, Hq, W, W]
    shifted_v = []
    for j in range(1, step + 1):
        shift = step - j  # step j's entry at t - shift
        k = torch.nn.functional.pad(expand[j], (0, 0, shift, 0))[..., :width, :]
        shifted_v.append(torch.nn.functional.pad(expand_v[j], (0, 0, shift, 0))[..., :width, :])
        diagonal = (q * k).sum(-1, keepdim=True) * scale  # [B, Hq, W, 1]
        valid = torch.arange(width, device=q.device)[:, None] >= shift
        scores.append(diagonal.masked_fill(~valid, float("-inf")))
    weights = torch.cat(scores, dim=-1).float().softmax(-1).to(q.dtype)  # every row sees step i's own entry
    out = weights[..., :width] @ expand_v[0]
    for j, v in enumerate(shifted_v):
        out = out + weights[..., width + j : width + j + 1] * v
    return out


def ttt_loss(head: Eagle3Head, batch, t2d: torch.Tensor, steps: int, max_len: int):
    """-> (weighted loss, per step [top-1 agreements], positions per step)."""
    ids, features, rows, cols, top_ids, top_lp = _inputs(batch, max_len)
    group = head.config.heads // head.config.kv_heads
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    projected = head.project(features)  # [B, W, H]
    hidden = torch.nn.functional.pad(projected, (0, 0, 1, 0))[:, :-1]  # token t reads position t - 1
    draft_ids = t2d[top_ids]  # [P, k], -1 outside the draft vocabulary
    known = draft_ids >= 0
    teacher = top_lp.masked_fill(~known, float("-inf")).softmax(-1).nan_to_num(0.0)
    usable = known.any(-1)
    keys, values, total, agree, counted = [], [], 0.0, [], []
    for step in range(steps):
        q, k, v = head.qkv(ids, hidden, positions)
        keys.append(k)
        values.append(v)
        out, logits = head.finish(_ttt_attention(q, keys, values, group), hidden)
        logprobs = logits[rows, cols].float().log_softmax(-1).gather(-1, draft_ids.clamp(min=0))  # [P, k]
        valid = usable & (cols >= step)  # step i at t drafts depth i + 1 after a root at t - i
        loss = -(teacher * logprobs.masked_fill(~known, 0.0)).sum(-1)[valid].mean()
        total = total + STEP_WEIGHT**step * loss
        best = logits[rows, cols].argmax(-1)
        agree.append(int(((best == draft_ids[:, 0]) & known[:, 0] & valid).sum()))
        counted.append(int(valid.sum()))
        hidden = torch.nn.functional.pad(out, (0, 0, 1, 0))[:, :-1]  # the next step reads this output at t - 1
    return total, agree, counted


@torch.no_grad()
def acceptance(head: Eagle3Head, data: list[Example], t2d: torch.Tensor, steps: int,
               max_len: int, max_tokens: int) -> list[float]:
    """Held-out top-1 agreement at draft positions 1..steps (teacher-forced: position d assumes
    positions 1..d-1 were accepted, as the loop only reaches it then)."""
    head.eval()
    agree, count = [0] * steps, [0] * steps
    for batch in batches(data, max_tokens, max_len, random.Random(0)):
        _, a, n = ttt_loss(head, batch, t2d, steps, max_len)
        agree = [x + y for x, y in zip(agree, a)]
        count = [x + y for x, y in zip(count, n)]
    return [a / max(1, n) for a, n in zip(agree, count)]
