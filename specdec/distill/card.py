"""The model card `specdec distill` writes beside the draft."""

from __future__ import annotations


def model_card(s: dict) -> str:
    settings = s["settings"]
    vocab = (f"{s['draft_vocab']} of the target's {s['target_vocab']} tokens (`specdec_vocab.json` maps them to "
             f"target ids; one more row stands for every other input token), covering "
             f"{s['heldout_coverage']:.1%} of the target's held-out top-1 answer tokens"
             if s["draft_vocab"] < s["target_vocab"] else f"the target's full vocabulary ({s['target_vocab']} tokens)")
    eagle = s.get("head") == "eagle3"
    if eagle:
        vocab = (f"{s['draft_vocab']} of the target's {s['target_vocab']} tokens (`d2t` maps them to target ids), "
                 f"covering {s['heldout_coverage']:.1%} of the target's held-out top-1 answer tokens")
        architecture = (f"an EAGLE-3 head (published format): one decoder layer over [embedding | hidden], reading the "
                        f"inputs of target layers {s['layers_from_target']}; the target's embedding, not stored")
    else:
        architecture = f"the target's, {len(s['layers_from_target'])} layers initialised from target layers {s['layers_from_target']}"
    by_position = " / ".join(f"{a:.3f}" for a in s.get("heldout_top1_by_position", [])[1:])
    later = f"; draft positions 2..{len(s['heldout_top1_by_position'])}: {by_position}" if eagle and by_position else ""
    return f"""# {'EAGLE-3 head' if eagle else 'Draft model'} for `{s['target']}`

Trained by `specdec distill` for speculative decoding with specdec: it proposes, the target verifies,
so the output stays the target's own (lossless) whatever this draft predicts.

| | |
|---|---|
| architecture | {architecture} |
| parameters | {s['parameters'] / 1e6:.1f}M |
| vocabulary | {vocab} |
| held-out top-1 agreement with the target | **{s['heldout_top1_agreement']:.3f}** at draft position 1 (untrained: {s['untrained_top1_agreement']:.3f}){later} |
| training | {s['steps']} steps, {s['epochs']} epochs, {s['train_minutes']:.1f} min of training |
| wall time | {s['wall_minutes']:.1f} min in all (target answers, training, evaluation) |

## Data

The target's own answers, rendered with its chat template: {s['train_examples']} answers
({s['train_answer_tokens']} answer tokens), one greedy and {settings['sampled_answers']} sampled from its
unwarped distribution per prompt (prompts: {settings['prompts'] or 'the seed instructions shipped with specdec'}).
At every answer position the target's top-{settings['topk']} log-probabilities were recorded while it generated.
{s['heldout_examples']} prompts ({s['heldout_answer_tokens']} answer tokens of greedy answers) were held out;
agreement is measured on them, teacher-forced: the share of answer positions where the draft's most likely
token is the target's. {'At draft position d the head reads its own outputs for the d - 1 positions before, as in the loop (training-time test, ' + str(settings.get('ttt_steps')) + ' steps).' if eagle else ''}

## Objective

Cross-entropy against the target's top-{settings['topk']} distribution renormalised over the draft's
vocabulary, on answer positions only; AdamW, peak learning rate {settings['lr']}, warm-up then cosine decay,
batches of about {settings['batch_tokens']} tokens.

## Settings

```json
{_json(settings)}
```
"""


def _json(data: dict) -> str:
    import json

    return json.dumps(data, indent=2)
