"""Which ops of which modules Mesa compresses, and how: a model-wide default plus per-layer
rules, loadable from JSON/YAML (and the official Mesa policy text files)."""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ev_compress.mesa.ops import OP_KINDS
from ev_core.errors import EvError

__all__ = ["OP_KINDS", "LayerRule", "MesaPolicy", "ModulePolicy", "OpSettings", "load_policy"]


@dataclass(frozen=True)
class OpSettings:
    """How one op call is compressed (the policy resolved for it).

    Attributes:
        enabled: compress it at all.
        bits: code width.
        channel_groups: groups of the channel layouts.
        head_groups: head groups of attention tensors (``None``: one per head).
        momentum: ``λ`` of its running estimates.
    """

    enabled: bool
    bits: int
    channel_groups: int
    head_groups: int | None
    momentum: float


@dataclass(frozen=True)
class LayerRule:
    """Per-layer override of the policy's defaults (later rules win).

    A rule applies to an op call when the owning module's name matches one of ``modules``
    (``fnmatch``), its kind is in ``ops`` (empty: any kind) and its index is in ``indices``
    (``None``: any). The index of a call is its position among the calls of the same kind
    in one forward of the whole model, in execution order (0 = the first ``gelu`` the model
    runs), like the official Mesa's ``by_index`` (there: module order of each layer type).

    Attributes:
        modules: module-name patterns.
        ops: op kinds (keys of :data:`OP_KINDS`).
        indices: call indices.
        enable: ``True``/``False`` switches compression on/off; ``None`` keeps it.
        bits: code width override.
        groups: group count override (channel groups, and head groups of attention tensors).
        momentum: running-estimate momentum override.
    """

    modules: tuple[str, ...] = ("*",)
    ops: tuple[str, ...] = ()
    indices: tuple[int, ...] | None = None
    enable: bool | None = None
    bits: int | None = None
    groups: int | None = None
    momentum: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", _str_tuple(self.modules, "modules"))
        object.__setattr__(self, "ops", _str_tuple(self.ops, "ops"))
        if self.indices is not None:
            object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))
        if self.enable is not None and not isinstance(self.enable, bool):
            raise ValueError(f"enable must be true, false or null, got {self.enable!r}")
        _check_ops(self.ops)
        _check_values(self.bits, self.groups, self.momentum)

    def matches(self, module: str, kind: str, index: int) -> bool:
        """Whether the rule applies to call ``index`` of ``kind`` inside ``module``."""
        return (
            (not self.ops or kind in self.ops)
            and (self.indices is None or index in self.indices)
            and any(fnmatch.fnmatchcase(module, p) for p in self.modules)
        )


def _str_tuple(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    out = tuple(value)
    if not all(isinstance(v, str) for v in out):
        raise ValueError(f"{name} must be strings, got {out!r}")
    return out


def _check_ops(ops: tuple[str, ...]) -> None:
    unknown = sorted(set(ops) - set(OP_KINDS))
    if unknown:
        raise ValueError(f"unknown op kinds {unknown}; known: {sorted(OP_KINDS)}")


def _check_values(bits: int | None, groups: int | None, momentum: float | None) -> None:
    if bits is not None and not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if groups is not None and groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")


@dataclass
class MesaPolicy:
    """What :func:`ev_compress.mesa.convert` compresses.

    Ops are attributed to the innermost module whose ``forward`` runs them (an ``nn.Linear``
    owns its ``F.linear``; a timm ``Attention`` owns its ``F.scaled_dot_product_attention``),
    and ``include``/``exclude`` are ``fnmatch`` patterns over those modules' qualified names
    (``""`` is the root).

    Attributes:
        ops: op kinds to compress (keys of :data:`OP_KINDS`); default all.
        include: module-name patterns whose ops are compressed (default all).
        exclude: module-name patterns left in full precision (wins over ``include``); the
            default ``("patch_embed*",)`` keeps the patch-embedding conv exact like the Mesa
            DeiT recipe (its input is the image).
        bits: code width (8 = Mesa; fewer bits keep one byte per value but coarser codes).
        channel_groups: groups of the channel layouts (linear/conv/norm/activation inputs).
        head_groups: head groups of attention tensors; ``None`` = one group per head.
        momentum: ``λ`` of the running range/minimum estimates (first batch initialises).
        stochastic_rounding: unbiased stochastic rounding (``False``: round to nearest).
        reuse: quantise a tensor once when several ops save it (softmax output → ``attn @ v``),
            and give a linear layer whose input is a layer norm's or GELU/SiLU's output no
            codes of its own: backward rebuilds that input from the codes the norm or
            activation saved (at their bits; ``summary`` shows it as rebuilt, 0 bytes).
        seed: seed of Mesa's own random generator (``None``: ``torch.initial_seed()``); Mesa
            never draws from the global generators, so dropout masks are unchanged.
        rules: per-layer overrides (:class:`LayerRule`), applied in order after the above.
    """

    ops: tuple[str, ...] = tuple(OP_KINDS)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ("patch_embed*",)
    bits: int = 8
    channel_groups: int = 8
    head_groups: int | None = None
    momentum: float = 0.9
    stochastic_rounding: bool = True
    reuse: bool = True
    seed: int | None = None
    rules: tuple[LayerRule, ...] = ()
    _ops: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.ops = _str_tuple(self.ops, "ops")
        self.include = _str_tuple(self.include, "include")
        self.exclude = _str_tuple(self.exclude, "exclude")
        self.rules = tuple(r if isinstance(r, LayerRule) else LayerRule(**r) for r in self.rules)
        _check_ops(self.ops)
        _check_values(self.bits, self.channel_groups, self.momentum)
        if self.head_groups is not None and self.head_groups < 1:
            raise ValueError(f"head_groups must be >= 1 or None, got {self.head_groups}")
        for name in ("stochastic_rounding", "reuse"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ValueError(f"seed must be an integer or null, got {self.seed!r}")
        self._ops = frozenset(self.ops)

    def ops_for(self, module_name: str) -> frozenset[str]:
        """Op kinds compressed by default inside ``module_name`` (before per-layer rules)."""
        if any(fnmatch.fnmatchcase(module_name, p) for p in self.exclude):
            return frozenset()
        if not any(fnmatch.fnmatchcase(module_name, p) for p in self.include):
            return frozenset()
        return self._ops

    def may_compress(self, module_name: str) -> frozenset[str]:
        """Op kinds that the defaults or any rule may enable inside ``module_name``."""
        kinds = set(self.ops_for(module_name))
        for r in self.rules:
            if r.enable and any(fnmatch.fnmatchcase(module_name, p) for p in r.modules):
                kinds.update(r.ops or OP_KINDS)
        return frozenset(kinds)

    def settings(self, module_name: str, kind: str, index: int) -> OpSettings:
        """The resolved settings of call ``index`` of ``kind`` inside ``module_name``."""
        return self.for_module(module_name).settings(kind, index)

    def for_module(self, module_name: str) -> ModulePolicy:
        """The policy of one module with its name patterns resolved (what a converted model
        keeps per module: resolving a call's settings then matches no patterns)."""
        rules = tuple(
            r for r in self.rules if any(fnmatch.fnmatchcase(module_name, p) for p in r.modules)
        )
        return ModulePolicy(self, self.ops_for(module_name), rules)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (dumped beside outputs; :meth:`from_dict` reads them back)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name.startswith("_"):
                continue
            value = getattr(self, f.name)
            if f.name == "rules":
                value = [
                    {k.name: _listify(getattr(r, k.name)) for k in fields(LayerRule)} for r in value
                ]
            out[f.name] = _listify(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MesaPolicy:
        """A policy from :meth:`to_dict`'s layout (unknown keys are an error)."""
        if not isinstance(data, dict):
            raise ValueError(f"a Mesa policy is a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls) if not f.name.startswith("_")}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown policy keys {unknown}; known: {sorted(known)}")
        rules = data.get("rules", ())
        if not isinstance(rules, (list, tuple)) or not all(isinstance(r, dict) for r in rules):
            raise ValueError("rules must be a list of mappings")
        rule_keys = {f.name for f in fields(LayerRule)}
        for r in rules:
            bad = sorted(set(r) - rule_keys)
            if bad:
                raise ValueError(f"unknown rule keys {bad}; known: {sorted(rule_keys)}")
        return cls(**{**data, "rules": tuple(LayerRule(**r) for r in rules)})

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON (loadable by :func:`load_policy`)."""
        from ev_core.io import write_json

        return write_json(path, self.to_dict())


@dataclass(frozen=True)
class ModulePolicy:
    """A :class:`MesaPolicy` restricted to one module (see :meth:`MesaPolicy.for_module`).

    Attributes:
        policy: the whole policy (its defaults).
        kinds: op kinds the defaults compress in this module.
        rules: the rules whose module patterns match it, in order.
    """

    policy: MesaPolicy
    kinds: frozenset[str]
    rules: tuple[LayerRule, ...]

    def settings(self, kind: str, index: int) -> OpSettings:
        """The resolved settings of call ``index`` of ``kind`` in this module."""
        p = self.policy
        enabled = kind in self.kinds
        bits, momentum = p.bits, p.momentum
        channel_groups, head_groups = p.channel_groups, p.head_groups
        for r in self.rules:
            if (r.ops and kind not in r.ops) or (r.indices is not None and index not in r.indices):
                continue
            if r.enable is not None:
                enabled = r.enable
            if r.bits is not None:
                bits = r.bits
            if r.groups is not None:
                channel_groups = head_groups = r.groups
            if r.momentum is not None:
                momentum = r.momentum
        return OpSettings(enabled, bits, channel_groups, head_groups, momentum)


def _listify(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------------------------------------
# files

#: Section names of the official Mesa policy files → op kinds.
OFFICIAL_SECTIONS: dict[str, tuple[str, ...]] = {
    "fc": ("linear",),
    "conv": ("conv",),
    "gelu": ("gelu",),
    "layernorm": ("layer_norm",),
    "bn": ("batch_norm",),
    "relu": ("relu",),
    "softmax": ("softmax",),
    "matmul": ("matmul",),
}


def load_policy(path: str | os.PathLike[str]) -> MesaPolicy:
    """Read a policy file.

    Formats: JSON (``.json``) or YAML (``.yaml``/``.yml``, needs PyYAML) holding
    :meth:`MesaPolicy.to_dict`'s layout; anything else is read as an official Mesa policy text
    file (``on <layer type>:`` sections of ``by_index: all | i j ...`` blocks with ``enable``,
    ``level`` (levels, 256 = 8 bits), ``ema_decay`` and ``quant_groups``). An official file
    starts from "nothing compressed" and enables what its sections enable, like the official
    code; sections for layer types ev does not have (``eltwise``, ``shuffle``, ``concat``,
    ``norm``) are an error.

    Raises:
        EvError: the file is missing, unreadable or not a valid policy (the message names it).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvError(f"cannot read the Mesa policy: {exc}", path=p) from exc
    try:
        suffix = p.suffix.lower()
        if suffix == ".json":
            return MesaPolicy.from_dict(json.loads(text))
        if suffix in (".yaml", ".yml"):
            from ev_core.errors import require

            yaml: Any = require("yaml", "yaml", "ev-compress", "reading YAML Mesa policies")
            return MesaPolicy.from_dict(yaml.safe_load(text))
        return _parse_official(text)
    except EvError:
        raise
    except (ValueError, TypeError) as exc:  # json/yaml decode errors derive from ValueError
        raise EvError(f"not a valid Mesa policy: {exc}", path=p) from exc
    except Exception as exc:  # yaml.YAMLError and friends
        if type(exc).__module__.startswith("yaml"):
            raise EvError(f"not a valid Mesa policy: {exc}", path=p) from exc
        raise


_SECTION = re.compile(r"^on\s+(\w+)\s*:\s*(.*)$")


def _parse_official(text: str) -> MesaPolicy:
    rules: list[LayerRule] = []
    kinds: tuple[str, ...] | None = None
    block: dict[str, Any] | None = None

    def flush() -> None:
        if block is not None and kinds is not None and len(block) > 1:
            rules.append(_official_rule(kinds, block))

    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        section = _SECTION.match(line)
        if section:
            flush()
            block = None
            name = section.group(1)
            if name not in OFFICIAL_SECTIONS:
                raise ValueError(
                    f"line {lineno}: unknown section {name!r}; known: {sorted(OFFICIAL_SECTIONS)}"
                )
            kinds = OFFICIAL_SECTIONS[name]
            continue
        if ":" not in line:
            raise ValueError(f"line {lineno}: expected 'key: value', got {raw!r}")
        key, value = (s.strip() for s in line.split(":", 1))
        if kinds is None:
            raise ValueError(f"line {lineno}: {key!r} before any 'on <layer type>:' section")
        if key.startswith("by_"):
            flush()
            if key != "by_index":
                raise ValueError(f"line {lineno}: only by_index is supported, got {key!r}")
            block = {"by_index": value}
            continue
        if block is None:
            raise ValueError(f"line {lineno}: {key!r} outside a 'by_index:' block")
        if key not in ("enable", "level", "ema_decay", "quant_groups"):
            raise ValueError(
                f"line {lineno}: unknown key {key!r} (enable, level, ema_decay, quant_groups)"
            )
        block[key] = value
    flush()
    return MesaPolicy(ops=(), exclude=(), rules=tuple(rules))


def _official_rule(kinds: tuple[str, ...], block: dict[str, Any]) -> LayerRule:
    index = block["by_index"].replace(",", " ").split()
    indices = None if index == ["all"] else tuple(int(i) for i in index)
    enable = None
    if "enable" in block:
        if block["enable"].lower() not in ("true", "false"):
            raise ValueError(f"enable must be True or False, got {block['enable']!r}")
        enable = block["enable"].lower() == "true"
    bits = None
    if "level" in block:
        level = int(block["level"])
        bits = int(math.log2(level)) if level > 1 else 0
        if 2**bits != level:
            raise ValueError(f"level must be a power of two (256 = 8 bits), got {level}")
    momentum = float(block["ema_decay"]) if "ema_decay" in block else None
    groups = int(block["quant_groups"]) if "quant_groups" in block else None
    return LayerRule(
        ops=kinds, indices=indices, enable=enable, bits=bits, groups=groups, momentum=momentum
    )
