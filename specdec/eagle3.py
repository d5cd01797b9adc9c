"""EAGLE-3 draft heads: the published checkpoint format and the head's forward (see shared notes/eagle.md).

A head reads the target's own hidden states. For a token at position t its input is
cat(input_layernorm(embed(token_t)), hidden_norm(h_{t-1})), where h_{t-1} is fc(target features of
position t - 1) when the target has computed that position, else the head's own output at its parent
(taken before `norm`). One Llama decoder layer (attention over 2H inputs) follows, then `norm` and
`lm_head` over the draft vocabulary; draft id i is target id i + d2t[i].

Published format (SafeAILab/EAGLE, vLLM, SGLang): `config.json` (Llama keys, `num_hidden_layers` 1,
`draft_vocab_size`, optional `target_hidden_size`, optional `eagle_aux_hidden_state_layer_ids` at the
top level or under `eagle_config`) and `pytorch_model.bin` or `model.safetensors` with `fc.weight`,
`midlayer.*` (or `layers.0.*`), `norm.weight`, `lm_head.weight`, `d2t`, `t2d`; no embedding (the
target's is used).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from specdec.errors import SpecdecError

ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM", "LlamaForCausalLMEagle")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def default_aux_layers(target_layers: int) -> tuple[int, ...]:
    """The decoder layers whose inputs EAGLE-3 reads: low, middle, high (SmolLM2's 30: 2, 15, 27)."""
    return (2, target_layers // 2, target_layers - 3)


@dataclass(frozen=True)
class HeadConfig:
    hidden_size: int
    target_hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int  # the target's
    draft_vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0  # the reference's default when the config has none
    max_position_embeddings: int = 2048
    aux_layers: tuple[int, ...] | None = None  # None: default_aux_layers of the target

    @classmethod
    def read(cls, folder: Path) -> HeadConfig:
        data = json.loads((folder / "config.json").read_text())
        eagle = data.get("eagle_config") or {}
        aux = data.get("eagle_aux_hidden_state_layer_ids", eagle.get("eagle_aux_hidden_state_layer_ids"))
        heads = data["num_attention_heads"]
        return cls(
            hidden_size=data["hidden_size"],
            target_hidden_size=data.get("target_hidden_size") or data["hidden_size"],
            intermediate_size=data["intermediate_size"],
            heads=heads,
            kv_heads=data.get("num_key_value_heads") or heads,
            head_dim=data.get("head_dim") or data["hidden_size"] // heads,
            vocab_size=data["vocab_size"],
            draft_vocab_size=data.get("draft_vocab_size") or data["vocab_size"],
            rms_norm_eps=data.get("rms_norm_eps", 1e-6),
            rope_theta=(data.get("rope_parameters") or {}).get("rope_theta") or data.get("rope_theta") or 10000.0,
            max_position_embeddings=data.get("max_position_embeddings", 2048),
            aux_layers=tuple(aux) if aux else None,
        )

    def to_json(self) -> dict:
        """The published keys (a Llama config a reference loader accepts)."""
        data = {
            "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim, "num_hidden_layers": 1,
            "vocab_size": self.vocab_size, "draft_vocab_size": self.draft_vocab_size,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta, "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings, "torch_dtype": "float16",
        }
        if self.target_hidden_size != self.hidden_size:
            data["target_hidden_size"] = self.target_hidden_size
        if self.aux_layers is not None:
            data["eagle_aux_hidden_state_layer_ids"] = list(self.aux_layers)
        return data


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype)


class MidLayer(nn.Module):
    """The head's one decoder layer; attention projections read the 2H-wide [embedding | hidden]."""

    def __init__(self, c: HeadConfig):
        super().__init__()
        h = c.hidden_size
        self.hidden_norm = RMSNorm(h, c.rms_norm_eps)
        self.input_layernorm = RMSNorm(h, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, c.rms_norm_eps)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(2 * h, c.heads * c.head_dim, bias=False)
        self.self_attn.k_proj = nn.Linear(2 * h, c.kv_heads * c.head_dim, bias=False)
        self.self_attn.v_proj = nn.Linear(2 * h, c.kv_heads * c.head_dim, bias=False)
        self.self_attn.o_proj = nn.Linear(c.heads * c.head_dim, h, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(h, c.intermediate_size, bias=False)
        self.mlp.up_proj = nn.Linear(h, c.intermediate_size, bias=False)
        self.mlp.down_proj = nn.Linear(c.intermediate_size, h, bias=False)


class Eagle3Head(nn.Module):
    """Parameters under their published names; `embed` is the target's embedding, not stored."""

    def __init__(self, config: HeadConfig, embed: torch.Tensor):
        super().__init__()
        self.config = config
        self.fc = nn.Linear(len(config.aux_layers or (0, 0, 0)) * config.target_hidden_size, config.hidden_size, bias=False)
        self.midlayer = MidLayer(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))  # [Vd] offsets
        self.register_buffer("t2d", torch.ones(config.vocab_size, dtype=torch.bool))  # [V]
        self.register_buffer("embed", embed.detach(), persistent=False)  # [V, H], frozen: the target's, never stored
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [D / 2]

    @property
    def draft_to_target(self) -> torch.Tensor:
        """[Vd] target id of each draft id."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Target features [.., F] -> head hidden states [.., H]."""
        return self.fc(features.to(self.fc.weight.dtype))

    def qkv(self, ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor):
        """ids [.., Q]; hidden [.., Q, H] (each token's input state); positions [.., Q] -> q
        [.., H_q, Q, D] and k, v [.., Hk, Q, D], rotated: a token's key and value depend on its own
        inputs only."""
        c, layer = self.config, self.midlayer
        embeds = self.embed[ids].to(hidden.dtype)
        x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(hidden)], dim=-1)  # [.., Q, 2H]
        q = layer.self_attn.q_proj(x).unflatten(-1, (c.heads, c.head_dim)).transpose(-2, -3)
        k = layer.self_attn.k_proj(x).unflatten(-1, (c.kv_heads, c.head_dim)).transpose(-2, -3)
        v = layer.self_attn.v_proj(x).unflatten(-1, (c.kv_heads, c.head_dim)).transpose(-2, -3)
        return self._rope(q, positions), self._rope(k, positions), v

    def attention(self, q, keys, values, visible) -> torch.Tensor:
        """q [.., H_q, Q, D]; keys, values [.., Hk, S, D]; visible [.., Q, S] bool -> the attention
        output [.., H_q, Q, D] (`finish` takes it on)."""
        group = self.config.heads // self.config.kv_heads
        keys, values = keys.repeat_interleave(group, -3), values.repeat_interleave(group, -3)
        return nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=visible.unsqueeze(-3))

    def finish(self, attn: torch.Tensor, hidden: torch.Tensor):
        """Attention output attn [.., H_q, Q, D] and the inputs hidden [.., Q, H] -> (out [.., Q, H]
        before norm, logits [.., Q, Vd])."""
        layer = self.midlayer
        h = hidden + layer.self_attn.o_proj(attn.transpose(-2, -3).flatten(-2))
        normed = layer.post_attention_layernorm(h)
        out = h + layer.mlp.down_proj(nn.functional.silu(layer.mlp.gate_proj(normed)) * layer.mlp.up_proj(normed))
        return out, self.lm_head(self.norm(out))

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Llama rotary embedding (rotate_half) of x [.., heads, Q, D] at positions [.., Q]."""
        angles = positions.to(self.inv_freq.dtype)[..., None] * self.inv_freq  # [.., Q, D / 2]
        angles = torch.cat([angles, angles], -1).unsqueeze(-3)  # [.., 1, Q, D]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * angles.cos().to(x.dtype) + rotated * angles.sin().to(x.dtype)


def head_folder(model: str) -> Path | None:
    """The folder of the EAGLE-3 head `model` names (a local folder, or a hub id: downloaded), or
    None when `model` is not a head."""
    from specdec.models import looks_like_path

    path = Path(model).expanduser()
    if path.is_dir():
        return path if is_head_folder(path) else None
    if path.exists() or looks_like_path(model):
        return None
    try:  # a hub id: its config says whether it is a head
        from huggingface_hub import hf_hub_download, snapshot_download

        config = Path(hf_hub_download(model, "config.json"))
    except Exception:  # not reachable or not a model: the ordinary loader reports it
        return None
    if not is_head_folder(config.parent):
        return None
    return Path(snapshot_download(model, allow_patterns=["config.json", *WEIGHT_FILES]))


def is_head_folder(folder: Path) -> bool:
    """A published EAGLE-3 head: its config names an EAGLE architecture, or has a draft vocabulary
    and one layer (the reference's own config says `LlamaForCausalLM`)."""
    path = folder / "config.json"
    if not path.is_file():
        return False
    data = json.loads(path.read_text())
    named = any(a in ARCHITECTURES for a in data.get("architectures") or [])
    return named or ("draft_vocab_size" in data and data.get("num_hidden_layers") == 1)


def _read_weights(folder: Path) -> dict[str, torch.Tensor] | None:
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file() and name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path))
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
    return None


def load_head(folder: Path, embed: torch.Tensor, aux_layers: tuple[int, ...], target_hidden: int) -> Eagle3Head:
    """The head stored in `folder`, reading the target's embedding `embed` [V, H_target] and the
    inputs of the target layers `aux_layers` (hidden size `target_hidden`); a head that does not fit
    the target is one line."""
    config = HeadConfig.read(folder)
    config = replace(config, aux_layers=config.aux_layers or aux_layers)
    name = str(folder)
    state = _read_weights(folder)
    if state is None:
        raise SpecdecError(f"EAGLE-3 head {name!r} has no {' or '.join(WEIGHT_FILES)}")
    state = {k.replace("layers.0.", "midlayer.", 1) if k.startswith("layers.0.") else k: v for k, v in state.items()}
    if config.vocab_size != embed.shape[0] or config.target_hidden_size != target_hidden or config.hidden_size != embed.shape[1]:
        raise SpecdecError(
            f"EAGLE-3 head {name!r} was made for another target: it expects a vocabulary of {config.vocab_size} and "
            f"hidden size {config.target_hidden_size}, the target has {embed.shape[0]} and {target_hidden}"
        )
    if "d2t" not in state and config.draft_vocab_size != config.vocab_size:
        raise SpecdecError(
            f"EAGLE-3 head {name!r} has a draft vocabulary of {config.draft_vocab_size} tokens but no d2t map to the "
            f"target's {config.vocab_size}; it cannot be used without one (re-export it with d2t)"
        )
    head = Eagle3Head(config, embed)
    expected = head.fc.weight.shape[1]
    if state.get("fc.weight") is not None and state["fc.weight"].shape[1] != expected:
        raise SpecdecError(
            f"EAGLE-3 head {name!r} reads features {state['fc.weight'].shape[1]} wide, but {len(config.aux_layers)} "
            f"target layers of {target_hidden} give {expected}; set eagle_aux_hidden_state_layer_ids to match"
        )
    state.pop("embed_tokens.weight", None)
    missing, unexpected = head.load_state_dict(state, strict=False)
    missing = [m for m in missing if m not in ("d2t", "t2d")]
    if missing or unexpected:
        raise SpecdecError(f"EAGLE-3 head {name!r} does not match the published format: "
                           f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return head.eval()


def save_head(head: Eagle3Head, folder: Path) -> None:
    """Write `head` in the published format (float16 safetensors, no embedding)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(head.config.to_json(), indent=2) + "\n")
    state = {k: v.detach().to(torch.float16) if v.is_floating_point() else v.detach()
             for k, v in head.state_dict().items()}
    state["t2d"] = head.t2d.detach().clone()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
