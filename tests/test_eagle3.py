"""EAGLE-3 heads: the published format loads and computes the published forward; target features
equal transformers' hidden states; every strategy stays lossless with a head as its draft."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from transformers.models.llama.modeling_llama import rotate_half

from enumeration import enumerate_outcomes
from helpers import hf_greedy, record_steps
from specdec.backends.base import Backend
from specdec.backends.eagle3 import Eagle3Backend
from specdec.backends.pytorch import PyTorchBackend
from specdec.config import GenerationOptions
from specdec.decode import speculative_decode
from specdec.decoder import SpeculativeDecoder, load_backend
from specdec.eagle3 import Eagle3Head, HeadConfig, default_aux_layers, is_head_folder, save_head
from specdec.errors import SpecdecError
from specdec.plugins import get_strategy
from specdec.sampling import Random, Warp
from specdec.stopping import Stopper
from specdec.tree import ancestor_mask, depths_from_parents
from test_gpu import target_distribution
from test_strategies_greedy import STRATEGIES
from tiny_models import tiny_model

LAYERS = 8  # EAGLE-3's default features: the inputs of layers 2, 4 and 5
AUX = default_aux_layers(LAYERS)
PROMPT = [3, 17, 42, 8, 60, 5, 5, 21]


@functools.lru_cache(maxsize=None)
def eagle_target(arch: str = "llama", vocab: int = 96):
    return tiny_model(arch, 0, layers=LAYERS, vocab=vocab)


TARGET_BACKENDS = ["pytorch", "onnxruntime"]


@pytest.fixture(scope="module")
def target_backend(onnx_export):
    """(backend name, arch, vocab) -> a fresh target backend over eagle_target(arch, vocab); on
    onnxruntime, over its ONNX export (made once per test run, with the features output at layers AUX)."""

    def make(backend: str = "pytorch", arch: str = "llama", vocab: int = 96):
        if backend == "pytorch":
            return PyTorchBackend(eagle_target(arch, vocab))
        pytest.importorskip("onnxruntime", reason="needs the [onnx] extra (onnx, onnxscript, onnxruntime)")
        from specdec.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeOptions

        folder = onnx_export(f"eagle-{arch}-{vocab}", functools.partial(eagle_target, arch, vocab))
        return OnnxRuntimeBackend.load(str(folder), OnnxRuntimeOptions(prefill_chunk=5))

    return make


def build_head(target, seed: int = 0, draft_vocab: int | None = None) -> Eagle3Head:
    """A random head for `target` (its embedding, 3 x its hidden size of features); with
    `draft_vocab`, over that many target ids chosen at random (d2t / t2d as published)."""
    text = target.config.get_text_config()
    hidden, vocab = text.hidden_size, text.vocab_size
    config = HeadConfig(hidden_size=hidden, target_hidden_size=hidden, intermediate_size=2 * hidden, heads=4,
                        kv_heads=2, head_dim=hidden // 4, vocab_size=vocab, draft_vocab_size=draft_vocab or vocab,
                        aux_layers=AUX)
    torch.manual_seed(seed)
    head = Eagle3Head(config, target.get_input_embeddings().weight)
    with torch.no_grad():
        for name, param in head.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
        head.lm_head.weight.mul_(8.0)  # peaked proposals, as a trained head's are
        if draft_vocab:
            ids = torch.randperm(vocab)[:draft_vocab].sort().values
            head.d2t.copy_(ids - torch.arange(draft_vocab))
            head.t2d.zero_()
            head.t2d[ids] = True
    return head.eval()


def write_head(folder, head: Eagle3Head, style: str = "safetensors"):
    """The head in the published format: as `save_head` writes it, or as the reference code's
    checkpoints are (`pytorch_model.bin`, `layers.0.*` names, architectures LlamaForCausalLM)."""
    save_head(head, folder)
    if style == "bin":
        from safetensors.torch import load_file

        state = load_file(str(folder / "model.safetensors"))
        (folder / "model.safetensors").unlink()
        torch.save({k.replace("midlayer.", "layers.0.", 1): v for k, v in state.items()}, folder / "pytorch_model.bin")
        config = json.loads((folder / "config.json").read_text())
        config["architectures"] = ["LlamaForCausalLM"]
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def published_forward(state: dict, config: HeadConfig, embed: torch.Tensor, ids: list[int], hidden: list):
    """The published head written out plainly, token by token: token t reads hidden[t] [H] (None:
    the output of token t - 1, before norm) and attends causally to every earlier token -> logits [T, Vd]."""
    def rms(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)

    def rope(x, position):  # x [heads, D]
        inv = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim)
        angles = torch.cat([position * inv, position * inv])
        return x * angles.cos() + rotate_half(x) * angles.sin()

    p = {k.replace("layers.0.", "midlayer.", 1): v.float() for k, v in state.items()}
    keys, values, rows = [], [], []
    group = config.heads // config.kv_heads
    h = None
    for t, token in enumerate(ids):
        h = hidden[t] if hidden[t] is not None else h
        x = torch.cat([rms(embed[token], p["midlayer.input_layernorm.weight"]), rms(h, p["midlayer.hidden_norm.weight"])])
        q = rope((p["midlayer.self_attn.q_proj.weight"] @ x).view(config.heads, -1), t)
        keys.append(rope((p["midlayer.self_attn.k_proj.weight"] @ x).view(config.kv_heads, -1), t))
        values.append((p["midlayer.self_attn.v_proj.weight"] @ x).view(config.kv_heads, -1))
        heads = []
        for head in range(config.heads):
            k = torch.stack([key[head // group] for key in keys])  # [t + 1, D]
            v = torch.stack([value[head // group] for value in values])
            weights = torch.softmax(k @ q[head] / math.sqrt(config.head_dim), dim=0)
            heads.append(weights @ v)
        h = h + p["midlayer.self_attn.o_proj.weight"] @ torch.cat(heads)
        n = rms(h, p["midlayer.post_attention_layernorm.weight"])
        gate, up = p["midlayer.mlp.gate_proj.weight"] @ n, p["midlayer.mlp.up_proj.weight"] @ n
        h = h + p["midlayer.mlp.down_proj.weight"] @ (torch.nn.functional.silu(gate) * up)
        rows.append(p["lm_head.weight"] @ rms(h, p["norm.weight"]))
    return torch.stack(rows)


def target_features(model, ids: list[int]) -> torch.Tensor:
    """transformers' own hidden states entering layers AUX, concatenated -> [T, 3H]."""
    with torch.no_grad():
        states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    return torch.cat([states[i][0] for i in AUX], dim=-1)


@pytest.mark.parametrize("style", ["safetensors", "bin"])
@pytest.mark.parametrize("draft_vocab", [None, 40])
def test_a_published_head_computes_the_published_forward(style, draft_vocab, tmp_path):
    target = eagle_target()
    made = build_head(target, seed=1, draft_vocab=draft_vocab)
    folder = write_head(tmp_path / "head", made, style)
    assert is_head_folder(folder)
    backend = Eagle3Backend.for_target(folder, PyTorchBackend(target))
    ids = PROMPT + [9, 1, 33]
    features = target_features(target, ids)
    backend.take_features(0, features)
    logits = backend.prefill(torch.tensor([ids]))[0]  # [V], the last position
    state = {k: v.half().float() if v.is_floating_point() else v for k, v in made.state_dict().items()}  # as stored
    previous = torch.cat([torch.zeros(1, features.shape[1]), features[:-1]])  # token t reads position t - 1
    embed = target.get_input_embeddings().weight.detach()
    want = published_forward(state, made.config, embed, ids, list(previous @ state["fc.weight"].T))
    columns = backend.head.draft_to_target
    torch.testing.assert_close(logits[columns], want[-1], rtol=1e-4, atol=1e-4)
    outside = torch.ones(logits.shape[0], dtype=torch.bool)
    outside[columns] = False
    assert torch.isneginf(logits[outside]).all()  # zero draft probability outside the map: lossless


@pytest.mark.parametrize("backend_name", TARGET_BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_target_features_are_the_hidden_states_entering_the_chosen_layers(arch, backend_name, target_backend):
    """Prefill (on onnxruntime in chunks of 5) and a tree forward after it: each node's features
    are those of its own path."""
    model = eagle_target(arch)
    backend = target_backend(backend_name, arch)
    backend.request_features(AUX)
    backend.prefill(torch.tensor([PROMPT]))
    tolerance = 1e-5 if backend_name == "pytorch" else 2e-4  # onnxruntime's kernels sum in another order
    torch.testing.assert_close(backend.features, target_features(model, PROMPT), rtol=tolerance, atol=tolerance)
    parents = torch.tensor([-1, 0, 0, 1, 1, 3])
    tokens = torch.tensor([7, 11, 13, 17, 19, 23])
    depths = depths_from_parents(parents)
    backend.forward(tokens[None], (len(PROMPT) + depths)[None], ancestor_mask(parents)[None])
    for node in range(len(tokens)):
        path, walk = [], node
        while walk >= 0:
            path.insert(0, int(tokens[walk]))
            walk = int(parents[walk])
        want = target_features(model, PROMPT + path)[-1]
        torch.testing.assert_close(backend.features[node], want, rtol=2e-4, atol=2e-4)  # 8 layers: sums reorder


def head_decoder(target: Backend, head: Eagle3Head, tmp_path, strategy: str, **options) -> SpeculativeDecoder:
    draft = Eagle3Backend.for_target(write_head(tmp_path / "head", head), target)
    component = get_strategy(strategy)
    return SpeculativeDecoder(target, draft, component.cls(component.cls.Options(**options)), GenerationOptions())


HEAD_STRATEGIES = {**STRATEGIES, "hybrid": ("hybrid", {"max_nodes": 10}), "chain_adaptive": ("chain", {"k": 3, "adaptive": True})}


@pytest.fixture(scope="module")
def reference():
    return hf_greedy(eagle_target(), PROMPT, 120)


@pytest.mark.parametrize("backend_name", TARGET_BACKENDS)
@pytest.mark.parametrize("draft_vocab", [None, 40])
@pytest.mark.parametrize("label", list(HEAD_STRATEGIES))
def test_greedy_output_is_the_targets_own_with_a_head(label, draft_vocab, backend_name, reference, target_backend, tmp_path):
    name, options = HEAD_STRATEGIES[label]
    head = build_head(eagle_target(), draft_vocab=draft_vocab)
    decoder = head_decoder(target_backend(backend_name), head, tmp_path, name, **options)
    out = decoder.generate(PROMPT, max_new_tokens=120)
    assert out.token_ids == reference


def test_the_loop_feeds_the_head_the_published_recurrence(tmp_path, monkeypatch):
    """Every distribution the head gives a strategy equals the published forward over the emitted
    tokens, each reading the target's features of the position before it, then the drafted path,
    each node reading its parent's output. `hybrid` accepts lookup chains, so the head is fed
    several tokens after a step (its accepted nodes again, now from target features)."""
    from specdec.strategies.base import TreeDrafter

    model = eagle_target()
    head = build_head(model, seed=3, draft_vocab=40)
    calls = []
    start, feed = TreeDrafter.start, TreeDrafter.feed

    def recording_start(drafter):
        probs = start(drafter)
        calls.append((list(drafter.ctx.tokens), [], probs[None], drafter._lag + 1))
        return probs

    def recording_feed(drafter, nodes):
        probs = feed(drafter, nodes)
        for row, node in enumerate(nodes):
            path = []
            while node > 0:
                path.insert(0, drafter.tokens[node])
                node = drafter.parents[node]
            calls.append((list(drafter.ctx.tokens), path, probs[row : row + 1], 0))
        return probs

    monkeypatch.setattr(TreeDrafter, "start", recording_start)
    monkeypatch.setattr(TreeDrafter, "feed", recording_feed)
    decoder = head_decoder(PyTorchBackend(model), head, tmp_path, "hybrid", max_nodes=6)
    decoder.generate(PROMPT, max_new_tokens=40)
    assert max(fed for *_, fed in calls) >= 2  # an accepted node was fed again, before the root
    state = {k: v.half().float() if v.is_floating_point() else v for k, v in head.state_dict().items()}
    embed, columns = model.get_input_embeddings().weight.detach(), head.draft_to_target
    for tokens, path, probs, _ in calls:
        features = target_features(model, tokens[:-1])  # positions 0 .. root - 1
        inputs = [torch.zeros(head.config.hidden_size)] + list(features @ state["fc.weight"].T)
        logits = published_forward(state, head.config, embed, tokens + path, inputs + [None] * len(path))[-1]
        torch.testing.assert_close(probs[0, columns], logits.softmax(-1), rtol=1e-4, atol=1e-5)


SAMPLED = {  # every draw has two candidates (top_k 2), so every outcome can be enumerated
    "chain": ("chain", {"k": 2}),
    "static_tree": ("static_tree", {"branching": [2, 1]}),
    "dyspec": ("dyspec", {"max_nodes": 3, "max_depth": 2, "expand_per_step": 2}),
    "gsd": ("gsd", {"max_out_degree": 2, "max_nodes": 4, "max_depth": 2, "prob_threshold": 0.0}),
}
# A 6-token vocabulary: a random head's two candidates often hold target mass, so drafts are accepted
# and rejected with every probability, and the residual matters.
SAMPLED_VOCAB, SAMPLED_PROMPT, SAMPLED_LENGTH, SAMPLED_WARP = 6, [3, 1, 4], 3, Warp(1.0, top_k=2)
# The target's distribution comes from transformers' plain forwards; onnxruntime's kernels sum in
# another order, which moves probabilities by about 1e-7 (the negative control's gap is over 1e-3).
SAMPLED_TOLERANCE = {"pytorch": 1e-6, "onnxruntime": 1e-5}


def sampled_gap(decoder) -> float:
    """Largest difference between the probability of any outcome (3 sampled tokens) through the
    loop, every draw enumerated, and under the target alone."""
    def generate(rng: Random) -> tuple[int, ...]:
        tokens, _ = speculative_decode(decoder.target, decoder.draft, decoder.strategy, SAMPLED_PROMPT, SAMPLED_WARP,
                                       Stopper(SAMPLED_LENGTH), rng)
        return tuple(tokens)

    got = enumerate_outcomes(generate)
    want = target_distribution(eagle_target(vocab=SAMPLED_VOCAB), SAMPLED_PROMPT, SAMPLED_LENGTH, SAMPLED_WARP)
    assert math.isclose(sum(got.values()), 1.0, abs_tol=1e-9)
    return max(abs(got.get(seq, 0.0) - want.get(seq, 0.0)) for seq in got.keys() | want.keys())


def sampled_decoder(target: Backend, tmp_path, name: str, draft_vocab: int | None = None, **options) -> SpeculativeDecoder:
    head = build_head(eagle_target(vocab=SAMPLED_VOCAB), seed=4, draft_vocab=draft_vocab)
    return head_decoder(target, head, tmp_path, name, **options)


@pytest.mark.parametrize("backend_name", TARGET_BACKENDS)
@pytest.mark.parametrize("draft_vocab", [None, 4])
@pytest.mark.parametrize("label", list(SAMPLED))
def test_sampled_output_has_exactly_the_targets_distribution_with_a_head(label, draft_vocab, backend_name, target_backend,
                                                                          tmp_path):
    name, options = SAMPLED[label]
    decoder = sampled_decoder(target_backend(backend_name, vocab=SAMPLED_VOCAB), tmp_path, name, draft_vocab, **options)
    steps = record_steps(decoder)
    assert sampled_gap(decoder) < SAMPLED_TOLERANCE[backend_name]
    assert any(v.num_accepted > 0 for _, v in steps) and any(v.num_accepted < t.depth for t, v in steps)


@pytest.mark.parametrize("backend_name", TARGET_BACKENDS)
def test_negative_control_verifying_against_another_proposal_is_caught(backend_name, target_backend, tmp_path, monkeypatch):
    """The same check fails when the recorded draft distribution is not the one sampled from."""
    from specdec.strategies.base import TreeDrafter

    proposal = TreeDrafter.proposal

    def misrecorded(drafter, node, probs, exclude=None):
        used = proposal(drafter, node, probs, exclude)
        if not drafter.greedy:
            drafter.proposals[node] = (used > 0).float() / (used > 0).sum()  # uniform over the support
        return used

    monkeypatch.setattr(TreeDrafter, "proposal", misrecorded)
    target = target_backend(backend_name, vocab=SAMPLED_VOCAB)
    assert sampled_gap(sampled_decoder(target, tmp_path, "chain", k=2)) > 1e-3


def test_an_auto_budget_measures_the_heads_cost(tmp_path):
    from specdec.costs import time_forward

    target = PyTorchBackend(eagle_target())
    draft = Eagle3Backend.for_target(write_head(tmp_path / "head", build_head(eagle_target())), target)
    assert time_forward(draft, query=8, context=32, repeats=2) > 0  # zero features stand in for the target's
    assert draft.committed_len == 32 and draft.pending_len == 0


def head_config(tmp_path, head: Eagle3Head, **target) -> dict:
    return {"target": {"model": str(target_folder(tmp_path)), **target}, "draft": {"model": str(write_head(tmp_path / "head", head))},
            "strategy": {"name": "chain", "k": 2}}


def target_folder(tmp_path):
    folder = tmp_path / "target"
    if not folder.is_dir():
        eagle_target().save_pretrained(folder)
    return folder


def test_a_head_loads_from_a_config_and_decodes_losslessly(tmp_path):
    from specdec.config import load_config

    decoder = SpeculativeDecoder.from_config(load_config(data=head_config(tmp_path, build_head(eagle_target(), draft_vocab=40))))
    assert isinstance(decoder.draft, Eagle3Backend)
    assert decoder.generate(PROMPT, max_new_tokens=30).token_ids == hf_greedy(eagle_target(), PROMPT, 30)


@pytest.mark.parametrize("case, message", [
    ("other_target", "was made for another target: it expects a vocabulary of 80"),
    ("no_d2t", "has a draft vocabulary of 40 tokens but no d2t map"),
])
def test_a_head_that_cannot_serve_the_target_is_one_line(case, message, tmp_path):
    from safetensors.torch import load_file, save_file

    from specdec.config import load_config

    model = tiny_model("llama", 0, layers=LAYERS, vocab=80) if case == "other_target" else eagle_target()
    head = build_head(model, draft_vocab=40)
    data = head_config(tmp_path, head, **({"backend": "onnxruntime"} if case == "onnx_target" else {}))
    if case == "no_d2t":
        weights = tmp_path / "head" / "model.safetensors"
        save_file({k: v for k, v in load_file(str(weights)).items() if k != "d2t"}, str(weights))
    with pytest.raises(SpecdecError) as err:
        SpeculativeDecoder.from_config(load_config(data=data))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_folder_that_is_neither_a_model_nor_a_head_is_one_line(tmp_path):
    from specdec.config import load_config

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"\0" * 16)
    data = {"target": {"model": str(target_folder(tmp_path))}, "draft": {"model": str(tmp_path / "junk")},
            "strategy": {"name": "chain", "k": 2}}
    with pytest.raises(SpecdecError, match="has no config.json; is it a Hugging Face model or an EAGLE-3 head"):
        SpeculativeDecoder.from_config(load_config(data=data))


@pytest.mark.parametrize("exported, message", [
    ((), "has no features output (format 6, or exported with --feature-layers none), which an EAGLE-3 draft reads"),
    ((0, 1), "returns the inputs of layers [0, 1], but the draft reads [2, 4, 5]; export again with --feature-layers 2,4,5"),
])
def test_an_onnx_target_without_the_heads_features_is_one_line(exported, message, onnx_export, tmp_path):
    """The features are checked before anything else about the target (exports of the 2-layer tiny
    Llama, which the shared exports already hold without features: an 8-layer export takes 30 s)."""
    pytest.importorskip("onnxruntime", reason="needs the [onnx] extra (onnx, onnxscript, onnxruntime)")
    from conftest import cached_model
    from specdec.config import load_config

    folder = onnx_export("llama-0", functools.partial(cached_model, "llama", 0), **({"feature_layers": exported} if exported else {}))
    data = head_config(tmp_path, build_head(eagle_target()), backend="onnxruntime")
    data["target"]["model"] = str(folder)
    with pytest.raises(SpecdecError) as err:
        SpeculativeDecoder.from_config(load_config(data=data))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_backends_sharing_a_model_share_its_feature_hooks():
    model = tiny_model("llama", 3, layers=LAYERS)
    for _ in range(3):
        PyTorchBackend(model).request_features(AUX)
    from specdec.features import decoder_layers

    assert [len(layer._forward_pre_hooks) for layer in decoder_layers(model)] == [1 if i in AUX else 0 for i in range(LAYERS)]
