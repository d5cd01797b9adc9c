"""`specdec distill`: train a small draft for any causal-LM target, from the target's own answers.

Phases, each resumable from the work folder `<out>.distill-work/`:
1. data: the target answers the prompts greedily; its top-k log-probabilities at every answer
   position are cached (`data/*.pt`). A share of the prompts is held out for evaluation.
2. vocab: the draft's head keeps the `draft_vocab` most frequent answer tokens (FR-Spec, EAGLE-3).
3. train: the draft (the target's first layers copied, reduced head) learns the target's distributions for a
   time budget; checkpoints every few minutes. With `head="eagle3"` the draft is an EAGLE-3 head
   reading the target's features (cached in the work folder), trained with the training-time test
   (specdec.distill.eagle3).
4. write: a Hugging Face model folder with `specdec_vocab.json` (an EAGLE-3 head: the published
   format, d2t inside) and a model card, whole or not at all.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from specdec.errors import SpecdecError

logger = logging.getLogger(__name__)


@dataclass
class DistillSettings:
    head: str = "layers"  # "layers": a small model of the target's own architecture; "eagle3": an EAGLE-3 head
    ttt_steps: int = 3  # eagle3: unrolled draft steps per position (training-time test)
    prompts: str | None = None  # text file (one per line) or Spec-Bench JSONL; default: the shipped seeds
    limit: int | None = None  # use only the first N prompts (after shuffling)
    max_answer_tokens: int = 192
    topk: int = 20  # teacher log-probabilities kept per position
    sampled_answers: int = 1  # answers sampled per training prompt, besides the greedy one
    generate_batch: int = 32
    layers: int = 2  # draft depth
    init: str = "target"  # "target": copy the target's first `layers` layers; "random": fresh layers
    draft_vocab: int = 10240  # 0 = the target's full vocabulary
    train_minutes: float = 30.0
    max_steps: int | None = None  # stop earlier after this many steps (deterministic runs)
    batch_tokens: int = 4096
    max_len: int = 1024
    lr: float = 5e-4
    heldout: float = 0.05
    seed: int = 0
    device: str = "cpu"
    save_dtype: str = "float16"

    def identity(self) -> dict:
        """The settings a resumed run must share with the run it resumes."""
        return {k: v for k, v in asdict(self).items() if k not in ("train_minutes", "max_steps", "device")}


def distill(target: str, out: Path, settings: DistillSettings) -> dict:
    """Train a draft for `target` into `out`; returns the summary written to the model card."""
    from specdec.distill.data import read_prompts
    from specdec.models import resolve_source

    if settings.head not in ("layers", "eagle3"):
        raise SpecdecError(f"unknown draft head {settings.head!r}; choose layers or eagle3")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpecdecError(f"output folder {str(out)!r} is not empty; remove it or choose another --out")
    resolve_source(target)  # bad inputs fail before any work folder exists
    read_prompts(settings.prompts)
    work = out.with_name(out.name + ".distill-work")
    state = _open_work(work, target, settings)
    started = time.perf_counter()
    try:
        return _run(target, out, work, state, started, settings)
    finally:  # an interrupted run's time counts towards the card's wall time when it resumes
        if work.is_dir() and not any(work.rglob("*.pt")):
            shutil.rmtree(work)  # failed before caching anything: nothing to resume
        elif work.is_dir():
            state["minutes_before"] += (time.perf_counter() - started) / 60
            (work / "state.json").write_text(json.dumps(state))


def _run(target: str, out: Path, work: Path, state: dict, started: float, settings: DistillSettings) -> dict:
    from specdec.distill.data import choose_vocab, coverage, read_prompts
    from specdec.backends.pytorch import eos_token_ids
    from specdec.distill.draft import build_draft
    from specdec.models import load_tokenizer

    torch.manual_seed(settings.seed)
    model, tokenizer = _load_target(target, settings.device)
    prompts = read_prompts(settings.prompts)
    random.Random(settings.seed).shuffle(prompts)
    prompts = prompts[: settings.limit] if settings.limit else prompts
    held = max(1, round(len(prompts) * settings.heldout))
    eos = set(eos_token_ids(model)) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    train_ex = _generate(work / "data" / "train", model, tokenizer, prompts[held:], settings, eos)
    for number in range(settings.sampled_answers):
        train_ex += _generate(work / "data" / f"sampled-{number}", model, tokenizer, prompts[held:], settings, eos, True)
    eval_ex = _generate(work / "data" / "heldout", model, tokenizer, prompts[:held], settings, eos)
    vocab_size = model.config.get_text_config().vocab_size
    if settings.draft_vocab and settings.draft_vocab < vocab_size:
        vocab = choose_vocab(train_ex, settings.draft_vocab, vocab_size, eos | _special_ids(tokenizer))
    else:
        vocab = list(range(vocab_size))
    if settings.head == "eagle3":
        from specdec.distill.eagle3 import cached_features, new_head

        draft = new_head(model, vocab).to(settings.device)
        cached_features(work / "features.pt", model, train_ex + eval_ex, draft.config.aux_layers, settings.batch_tokens)
        layers = list(draft.config.aux_layers)
        t2d = torch.full((vocab_size,), -1, dtype=torch.long)  # target id -> draft id, -1 outside
    else:
        layers = list(range(min(settings.layers, model.config.get_text_config().num_hidden_layers)))
        draft = build_draft(model, layers, vocab, copy_layers=settings.init == "target").to(settings.device)
        t2d = torch.full((vocab_size,), len(vocab), dtype=torch.long)  # target id -> draft id, the last row outside
    t2d[torch.tensor(vocab)] = torch.arange(len(vocab))
    del model
    summary = _train(draft, train_ex, eval_ex, t2d, settings, work, state)
    summary.update(
        target=target, head=settings.head, layers_from_target=layers, draft_vocab=len(vocab), target_vocab=vocab_size,
        heldout_coverage=coverage(eval_ex, vocab), train_examples=len(train_ex), heldout_examples=len(eval_ex),
        train_answer_tokens=sum(len(ex.ids) - ex.start for ex in train_ex),
        heldout_answer_tokens=sum(len(ex.ids) - ex.start for ex in eval_ex),
        parameters=sum(p.numel() for p in draft.parameters()), settings=asdict(settings),
    )
    summary["wall_minutes"] = state["minutes_before"] + (time.perf_counter() - started) / 60
    _write(out, draft, vocab, vocab_size, load_tokenizer(target), summary, settings)
    shutil.rmtree(work, ignore_errors=True)
    return summary


def _open_work(work: Path, target: str, settings: DistillSettings) -> dict:
    identity = {"target": target, **settings.identity()}
    path = work / "state.json"
    if path.is_file():
        state = json.loads(path.read_text())
        if state["identity"] != identity:
            raise SpecdecError(f"{work} holds an unfinished run with other settings; remove it to start again")
        logger.warning("resuming the unfinished run in %s", work)
        return state
    work.mkdir(parents=True, exist_ok=True)
    state = {"identity": identity, "minutes_before": 0.0}
    path.write_text(json.dumps(state))
    return state


def _load_target(target: str, device: str):
    from transformers import AutoModelForCausalLM

    from specdec.models import load_error, load_tokenizer, resolve_source

    source = resolve_source(target)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device).eval()
    except Exception as exc:
        raise load_error(target, exc) from exc
    tokenizer = load_tokenizer(target)
    if tokenizer is None:
        raise SpecdecError(f"{target!r} has no tokenizer; distill needs one to render the prompts")
    return model, tokenizer


def _special_ids(tokenizer) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", []) or [])


def _generate(folder: Path, model, tokenizer, prompts: list[str], settings: DistillSettings, eos: set[int],
              sample: bool = False):
    """The examples of `prompts`, generated batch by batch into `folder` (batches already there are kept)."""
    from specdec.distill.data import chat_ids, generate_examples

    folder.mkdir(parents=True, exist_ok=True)
    order = sorted(range(len(prompts)), key=lambda i: len(chat_ids(tokenizer, prompts[i])))
    examples = []
    size = settings.generate_batch
    bar = tqdm(total=len(prompts), desc=f"target answers ({folder.name})", unit="prompt", file=sys.stderr)
    for number, first in enumerate(range(0, len(order), size)):
        path = folder / f"{number:05d}.pt"
        if path.is_file():
            batch = torch.load(path, weights_only=False)
        else:
            chunk = [prompts[i] for i in order[first : first + size]]
            torch.manual_seed(settings.seed * 100_003 + number)
            batch = generate_examples(model, tokenizer, chunk, settings.max_answer_tokens, settings.topk, eos, sample)
            torch.save(batch, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").rename(path)
        examples += batch
        bar.update(min(size, len(order) - first))
    bar.close()
    return examples


def _objective(settings: DistillSettings):
    """(loss of a batch -> (loss, top-1 agreements, positions), held-out agreement per draft position)."""
    from specdec.distill import eagle3, train

    if settings.head == "eagle3":
        def loss(draft, batch, t2d, max_len):
            total, agree, count = eagle3.ttt_loss(draft, batch, t2d, settings.ttt_steps, max_len)
            return total, agree[0], count[0]

        def measure(draft, examples, t2d):
            return eagle3.acceptance(draft, examples, t2d, settings.ttt_steps, settings.max_len, settings.batch_tokens)

        return loss, measure
    return train.step_loss, lambda draft, examples, t2d: [
        train.agreement(draft, examples, t2d, settings.max_len, settings.batch_tokens)]


def _train(draft, train_ex, eval_ex, t2d, settings: DistillSettings, work: Path, state: dict) -> dict:
    from specdec.distill.train import batches, learning_rate

    step_loss, measure = _objective(settings)
    checkpoint = work / "checkpoint.pt"
    before = measure(draft, eval_ex, t2d)
    optimizer = torch.optim.AdamW(draft.parameters(), lr=settings.lr, weight_decay=0.0)
    done, steps, epoch = 0.0, 0, 0
    if checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=False)
        draft.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        done, steps, epoch = saved["seconds"], saved["steps"], saved["epoch"]
    budget = settings.train_minutes * 60
    max_steps = settings.max_steps or float("inf")
    bar = tqdm(total=round(budget), initial=round(done), desc="train (seconds)", file=sys.stderr)
    last_save = time.perf_counter()
    while done < budget and steps < max_steps:
        for batch in batches(train_ex, settings.batch_tokens, settings.max_len, random.Random(settings.seed + epoch)):
            if done >= budget or steps >= max_steps:
                break
            tick = time.perf_counter()
            draft.train()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(max(done / budget, steps / max_steps), settings.lr)
            loss, agree, count = step_loss(draft, batch, t2d, settings.max_len)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
            optimizer.step()
            steps += 1
            done += time.perf_counter() - tick
            bar.update(round(done) - bar.n)
            bar.set_postfix(loss=f"{loss.item():.3f}", top1=f"{agree / max(1, count):.2f}")
            if time.perf_counter() - last_save > 180:
                _save_checkpoint(checkpoint, draft, optimizer, done, steps, epoch)
                last_save = time.perf_counter()
        else:
            epoch += 1
    bar.close()
    _save_checkpoint(checkpoint, draft, optimizer, done, steps, epoch)
    after = measure(draft, eval_ex, t2d)
    return {"heldout_top1_agreement": after[0], "untrained_top1_agreement": before[0], "steps": steps,
            "heldout_top1_by_position": after, "untrained_top1_by_position": before,
            "epochs": epoch + 1, "train_minutes": done / 60}


def _save_checkpoint(path: Path, draft, optimizer, seconds: float, steps: int, epoch: int) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": draft.state_dict(), "optimizer": optimizer.state_dict(), "seconds": seconds,
                "steps": steps, "epoch": epoch}, tmp)
    tmp.rename(path)


def _write(out: Path, draft, vocab, target_vocab: int, tokenizer, summary: dict, settings: DistillSettings) -> None:
    from specdec.backends.vocab import write_vocab_map
    from specdec.distill.card import model_card
    from specdec.eagle3 import Eagle3Head, save_head

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        if isinstance(draft, Eagle3Head):
            save_head(draft, partial)  # the published format: d2t inside, the target's tokenizer and embedding
        else:
            draft.to(getattr(torch, settings.save_dtype)).save_pretrained(partial)
            if tokenizer is not None:
                tokenizer.save_pretrained(partial)
            if len(vocab) < target_vocab:
                write_vocab_map(partial, vocab, target_vocab)
        (partial / "distill.json").write_text(json.dumps(summary, indent=2) + "\n")
        (partial / "README.md").write_text(model_card(summary))
        if out.exists():
            out.rmdir()
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
