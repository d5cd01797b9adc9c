"""YAML configs: loading, dotted overrides, validation against each component's options model.

Sections: `target`, `draft` (optional for strategies without a draft model), `strategy`,
`generation`. `target`/`draft` take `model` and `backend`; their other keys belong to the backend's
options model. `strategy` takes `name`; its other keys belong to that strategy's options model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from specdec.errors import SpecdecError

SECTIONS = ("target", "draft", "strategy", "generation")
DEFAULT_BACKEND = "pytorch"
DEFAULT_STRATEGY = "chain"


class GenerationOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(128, ge=1, description="exact number of new tokens unless a stop comes first")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens (0 = off)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (1 = off)")
    seed: int = Field(0, description="seed of every random draw (drafting and verification)")
    ignore_eos: bool = Field(False, description="keep generating after an end-of-sequence token")
    stop: list[str] = Field(default_factory=list, description="stop after any of these strings")
    stop_token_ids: list[int] = Field(default_factory=list, description="stop after any of these tokens (besides EOS)")


@dataclass
class ModelSpec:
    model: str
    backend: str
    options: BaseModel

    def to_dict(self) -> dict:
        return {"model": self.model, "backend": self.backend, **self.options.model_dump()}


@dataclass
class StrategySpec:
    name: str
    options: BaseModel

    def to_dict(self) -> dict:
        return {"name": self.name, **self.options.model_dump()}


@dataclass
class Config:
    target: ModelSpec
    draft: ModelSpec | None
    strategy: StrategySpec
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    source: str = "<config>"

    def to_dict(self) -> dict:
        out = {"target": self.target.to_dict()}
        if self.draft is not None:
            out["draft"] = self.draft.to_dict()
        out["strategy"] = self.strategy.to_dict()
        out["generation"] = self.generation.model_dump()
        return out


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), data: dict | None = None
) -> Config:
    """Read a YAML file (or take `data`), apply `KEY=VALUE` overrides, validate -> Config."""
    if path is not None:
        source = str(path)
        raw = _read_yaml(Path(path))
        base_dir = Path(path).parent
    else:
        source, raw, base_dir = "<config>", dict(data or {}), Path.cwd()
    for override in overrides:
        apply_override(raw, override)
    overridden = {o.partition("=")[0].strip() for o in overrides}
    return resolve(raw, source, base_dir, overridden)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise SpecdecError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecdecError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SpecdecError(f"{path}: the top level must be a mapping of sections ({', '.join(SECTIONS)})")
    return raw


def apply_override(raw: dict, override: str) -> None:
    """`strategy.k=6` -> raw["strategy"]["k"] = 6 (the value is parsed as YAML)."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise SpecdecError(f"override {override!r} must look like KEY=VALUE, e.g. strategy.k=6")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecdecError(f"override {override!r}: {part!r} is not a section")
        node = child
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise SpecdecError(f"override {override!r}: value is not valid YAML") from exc


def resolve(raw: dict, source: str = "<config>", base_dir: Path | None = None, overridden: set[str] = frozenset()) -> Config:
    """Validate raw sections -> Config. `overridden` names the keys set by -o (for error messages)."""
    from specdec import plugins

    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise SpecdecError(f"{source}: unknown section {unknown[0]!r}; allowed: {', '.join(SECTIONS)}")
    base_dir = base_dir or Path.cwd()
    target = _model_spec(raw.get("target"), "target", source, base_dir, overridden)
    draft = _model_spec(raw["draft"], "draft", source, base_dir, overridden) if raw.get("draft") is not None else None
    strategy_raw = _section(raw.get("strategy", {}), "strategy", source)
    name = strategy_raw.pop("name", DEFAULT_STRATEGY)
    component = _component(plugins.get_strategy, name, f"{source}: strategy.name")
    options = _validate(component.cls.Options, strategy_raw, "strategy", source, ("strategy", str(name), overridden))
    if component.cls.needs_draft and draft is None:
        raise SpecdecError(f"{source}: strategy {name!r} needs a draft model; add a `draft:` section")
    generation = _validate(GenerationOptions, _section(raw.get("generation", {}), "generation", source), "generation", source)
    return Config(target, draft, StrategySpec(str(name), options), generation, source)


def _model_spec(value: Any, section: str, source: str, base_dir: Path, overridden: set[str]) -> ModelSpec:
    from specdec import plugins

    if value is None:
        raise SpecdecError(f"{source}: missing section {section!r} (needs at least `model:`)")
    raw = _section(value, section, source)
    model = raw.pop("model", None)
    if not isinstance(model, str) or not model:
        raise SpecdecError(f"{source}: {section}.model is required (a local path or a hub id)")
    backend = str(raw.pop("backend", DEFAULT_BACKEND))
    component = _component(plugins.get_backend, backend, f"{source}: {section}.backend")
    options = _validate(component.cls.Options, raw, section, source, ("backend", backend, overridden))
    return ModelSpec(_resolve_model_path(model, base_dir), backend, options)


def _component(lookup, name, where: str):
    try:
        return lookup(str(name))
    except SpecdecError as exc:
        raise SpecdecError(f"{where}: {exc}") from None


def _resolve_model_path(model: str, base_dir: Path) -> str:
    """Relative paths are looked up next to the config file first, then in the current folder."""
    candidate = base_dir / model
    if not Path(model).is_absolute() and candidate.exists() and not Path(model).exists():
        return str(candidate)
    return model


def _section(value: Any, section: str, source: str) -> dict:
    if not isinstance(value, dict):
        raise SpecdecError(f"{source}: section {section!r} must be a mapping, got {type(value).__name__}")
    return dict(value)


def _validate(model: type[BaseModel], values: dict, section: str, source: str,
              owner: tuple[str, str, set[str]] | None = None) -> BaseModel:
    """`owner` = (kind, name of the component owning the options, keys set by -o): named in unknown-key errors."""
    try:
        return model(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in (section, *err["loc"]))
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(model.model_fields) or "none"
            if owner is None:
                raise SpecdecError(f"{source}: unknown key {key!r}; allowed: {allowed}") from None
            kind, name, overridden = owner
            origin = "set with -o" if key in overridden else f"set in {source}"
            whole = f"{{name: {name}}}" if kind == "strategy" else f"{{model: {values.get('model', '...')}, backend: {name}}}"
            raise SpecdecError(
                f"{source}: {kind} {name!r} has no option {err['loc'][0]!r} ({key} is {origin}); its options: {allowed}. "
                f"To replace the whole section, use -o '{section}={whole}'"
            ) from None
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        raise SpecdecError(f"{source}: {key}: {err['msg']}{got}") from None
