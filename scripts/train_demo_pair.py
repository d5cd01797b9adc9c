"""Train the demo model pair shipped in models/demo: a byte-level BPE tokenizer, a Llama-architecture
target (~12M parameters) and draft (~1M), on this machine's Python standard library (tests and
site-packages excluded). CPU only; both models see the same batches.

Usage: python scripts/train_demo_pair.py [--out models/demo] [--steps 900] [--eval-every 100]
Run it in the background with a log file: it takes about an hour on two cores.
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
import zlib
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB, SEQ_LEN, BATCH = 4096, 256, 16
SIZES = {  # name -> (hidden, layers, heads, intermediate)
    "target": (384, 6, 6, 1024),
    "draft": (128, 2, 4, 384),
}


def corpus_files() -> tuple[Path, list[Path], list[Path]]:
    """Standard-library sources, split into train / held-out by a hash of the path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if "site-packages" not in p.parts
        and not any(part in ("test", "tests", "idle_test") or part.startswith("test_") for part in p.relative_to(root).parts)
    )
    held_out = [p for p in files if zlib.crc32(str(p.relative_to(root)).encode()) % 50 == 0]
    return root, [p for p in files if p not in held_out], held_out


def train_tokenizer(files: list[Path]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train([str(p) for p in files], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def encode(tokenizer, files: list[Path]) -> torch.Tensor:
    """One stream: each file's tokens followed by <|endoftext|>."""
    ids: list[int] = []
    for path in files:
        ids += tokenizer(path.read_text(errors="replace"))["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def build(name: str, eos: int) -> LlamaForCausalLM:
    hidden, layers, heads, intermediate = SIZES[name]
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=intermediate, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos, pad_token_id=None,
    )
    return LlamaForCausalLM(config)


@torch.no_grad()
def held_out_loss(model, stream: torch.Tensor, windows: int = 48) -> float:
    model.eval()
    starts = torch.linspace(0, len(stream) - SEQ_LEN - 2, windows).long()
    batch = torch.stack([stream[s : s + SEQ_LEN + 1] for s in starts])
    loss = float(model(batch[:, :-1], labels=batch[:, :-1].clone()).loss)  # labels are shifted inside
    model.train()
    return loss


def learning_rate(step: int, steps: int, peak: float = 1.5e-3, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/demo"))
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    root, train_files, held_files = corpus_files()
    tokenizer = train_tokenizer(train_files)
    train, held = encode(tokenizer, train_files), encode(tokenizer, held_files)
    print(f"corpus {root}: {len(train_files)} train files ({len(train)} tokens), {len(held_files)} held out ({len(held)} tokens)", flush=True)
    nets = {name: build(name, tokenizer.eos_token_id) for name in SIZES}
    optims = {n: torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1) for n, m in nets.items()}
    order = torch.Generator().manual_seed(args.seed)
    start, history = time.time(), []
    for step in range(args.steps):
        offsets = torch.randint(0, len(train) - SEQ_LEN - 1, (BATCH,), generator=order)
        batch = torch.stack([train[o : o + SEQ_LEN] for o in offsets])
        losses = {}
        for name, model in nets.items():
            for group in optims[name].param_groups:
                group["lr"] = learning_rate(step, args.steps)
            loss = model(batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optims[name].step()
            optims[name].zero_grad(set_to_none=True)
            losses[name] = float(loss.detach())
        if step % 10 == 0:
            rate = (step + 1) * BATCH * SEQ_LEN / (time.time() - start)
            print(f"step {step} " + " ".join(f"{n} {l:.3f}" for n, l in losses.items()) + f" ({rate:.0f} tok/s)", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            evals = {name: held_out_loss(model, held) for name, model in nets.items()}
            history.append({"step": step + 1, **{f"{n}_held_out_loss": v for n, v in evals.items()}})
            print(f"eval {history[-1]}", flush=True)
            save(nets, tokenizer, args, history, len(train), len(held), root, time.time() - start)


def save(nets, tokenizer, args, history, train_tokens, held_tokens, root, seconds) -> None:
    for name, model in nets.items():
        out = args.out / name
        model.half().save_pretrained(out)  # float16 weights keep the repository small
        model.float()
        tokenizer.save_pretrained(out)
    facts = {
        "corpus": f"Python {sysconfig.get_python_version()} standard library at {root} (tests and site-packages excluded)",
        "train_tokens": train_tokens, "held_out_tokens": held_tokens, "vocab": VOCAB,
        "parameters": {n: sum(p.numel() for p in m.parameters()) for n, m in nets.items()},
        "sizes": {n: dict(zip(("hidden", "layers", "heads", "intermediate"), s)) for n, s in SIZES.items()},
        "steps": history[-1]["step"], "planned_steps": args.steps, "batch": BATCH, "seq_len": SEQ_LEN,
        "seed": args.seed, "train_seconds": round(seconds), "history": history,
    }
    (args.out / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
    write_card(args.out, facts)


def write_card(out: Path, facts: dict) -> None:
    """models/demo/README.md: what the pair is, how it was trained, how well it does."""
    last = facts["history"][-1]
    rows = "\n".join(
        f"| {name} | {facts['parameters'][name] / 1e6:.2f}M | {s['hidden']} | {s['layers']} | {s['heads']} | "
        f"{s['intermediate']} | {last[name + '_held_out_loss']:.3f} |"
        for name, s in facts["sizes"].items()
    )
    curve = ", ".join(f"{h['step']}: {h['target_held_out_loss']:.2f} / {h['draft_held_out_loss']:.2f}" for h in facts["history"])
    (out / "README.md").write_text(f"""# specdec demo model pair

A Llama-architecture target and draft trained from scratch on Python source code, so that specdec
runs a real speculative generation offline. Small and CPU-trained: useful for demos, tests and
benchmarks of the decoding machinery, not as a code assistant.

- Corpus: {facts['corpus']}: {facts['train_tokens']:,} training tokens; {facts['held_out_tokens']:,} held-out tokens
  from files chosen by a hash of their path.
- Tokenizer: byte-level BPE, {facts['vocab']} tokens, trained on the same files; `<|endoftext|>` separates files.
- Training: {facts['steps']} steps of {facts['batch']} x {facts['seq_len']} tokens (both models see the same batches),
  AdamW (lr 1.5e-3, cosine, 50 warm-up steps, weight decay 0.1), seed {facts['seed']}, CPU, {facts['train_seconds'] / 60:.0f} minutes.
- Weights: float16 safetensors (load with `dtype: float32` on a CPU).

| model | parameters | hidden | layers | heads | intermediate | held-out loss (nats/token) |
|---|---:|---:|---:|---:|---:|---:|
{rows}

Held-out loss during training (step: target / draft): {curve}.

Reproduce: `python scripts/train_demo_pair.py --out models/demo --steps {facts['planned_steps']}`.
""")


if __name__ == "__main__":
    main()
