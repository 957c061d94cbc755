"""Per-parameter rules: excluded from weight decay, excluded from layer adaptation, trust-ratio slices.

The optimizer keeps them as :class:`GroupRules` (one per param group, a new object whenever anything in it
changes, which is what tells the layout to rebuild), and shows them in every group as per-parameter lists
(``exclude_from_weight_decay``, ``exclude_from_layer_adaptation``, ``trust_ratio_slices``), which
checkpoints save. :class:`RuleMirrors` writes those lists and notices when one was edited since it wrote it
(replaced, or changed in place): the edit is checked and applied at the next step, before anything changes.
An engine that copies param groups around on its own (``ZeroRedundancyOptimizer``) puts back lists the
optimizer wrote earlier; :class:`RuleMirrors` tells those from edits and writes the current lists again.

Parameters are selected by identity or by a regex search on the names given by ``named_parameters()``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from .slices import SliceSpec, group_slices

__all__ = ["ADAPT_EXCLUDED", "DECAY_EXCLUDED", "RULE_KEYS", "SLICES", "GroupRules", "RuleMirrors", "Selection",
           "selection"]

SLICES = "trust_ratio_slices"
DECAY_EXCLUDED = "exclude_from_weight_decay"
ADAPT_EXCLUDED = "exclude_from_layer_adaptation"
RULE_KEYS = (DECAY_EXCLUDED, ADAPT_EXCLUDED, SLICES)
_FIELDS = {DECAY_EXCLUDED: "decay_excluded", ADAPT_EXCLUDED: "adapt_excluded", SLICES: "slices"}


@dataclass(frozen=True, eq=False)
class GroupRules:
    """One group's rules, per parameter (a new object whenever any of it changes)."""

    decay_excluded: list[bool]
    adapt_excluded: list[bool]
    slices: list[SliceSpec | None]

    def get(self, key: str) -> list[Any]:
        return getattr(self, _FIELDS[key])

    def with_(self, key: str, values: list[Any]) -> GroupRules:
        return replace(self, **{_FIELDS[key]: values})

    def updated(self, lists: dict[str, list[Any] | None]) -> GroupRules:
        """These rules with the given lists (None: keep this rule's)."""
        return replace(self, **{_FIELDS[k]: v for k, v in lists.items() if v is not None})


@dataclass(frozen=True)
class Selection:
    """Parameters chosen by identity and by a regex search on their names."""

    ids: frozenset[int] = frozenset()
    pattern: re.Pattern[str] | None = None

    def of(self, group: dict[str, Any]) -> list[bool]:
        """Per parameter of ``group``: selected or not."""
        names = group.get("param_names") or [None] * len(group["params"])
        return [id(p) in self.ids or bool(self.pattern is not None and name is not None and self.pattern.search(name))
                for p, name in zip(group["params"], names)]


def selection(groups: Sequence[dict[str, Any]], var_list: Iterable[Tensor] | None,
              var_names: Iterable[str] | None) -> Selection:
    """Check a Keras-style selection against ``groups``; a pattern that matches no name warns (a typo would
    otherwise select nothing without a word), a bare string is refused (each character would be a pattern)."""
    known = {id(p) for g in groups for p in g["params"]}
    ids = frozenset(id(v) for v in (var_list or ()))
    if not ids <= known:
        raise ValueError("`var_list` holds tensors that are not parameters of this optimizer.")
    if isinstance(var_names, (str, bytes)):
        raise ValueError(f"`var_names` must be a list of regex patterns, not one string (each character would be a "
                         f"pattern). Received: var_names={var_names!r}; pass var_names=[{var_names!r}].")
    names = list(var_names or ())
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"`var_names` must be strings (regex patterns). Received: {names!r}")
    if not names:
        return Selection(ids)
    if not any("param_names" in g for g in groups):
        raise ValueError("`var_names` needs named parameters: pass `model.named_parameters()` to Lamb.")
    try:
        patterns = [re.compile(n) for n in names]
    except re.error as err:
        raise ValueError(f"`var_names` holds an invalid regex: {err}") from None
    all_names = [n for g in groups for n in g.get("param_names", ())]
    unmatched = [p.pattern for p in patterns if not any(p.search(n) for n in all_names)]
    if unmatched:
        warnings.warn(f"`var_names` patterns {unmatched} match no parameter name of this optimizer (its names look "
                      f"like {all_names[:3]}).", UserWarning, stacklevel=3)
    return Selection(ids, re.compile("|".join(sorted(set(names)))))


def _flags(value: Any, count: int, key: str) -> list[bool]:
    if not isinstance(value, list) or len(value) != count or not all(isinstance(f, bool) for f in value):
        raise ValueError(f"A param group's `{key}` must be a list of {count} bools. Received: {value!r}")
    return list(value)


def checked(key: str, value: Any, group: dict[str, Any], index: int) -> list[Any]:
    """A group's rule list as given (an edit, a checkpoint's), checked; slices normalised (a group-level spec
    applies to each parameter)."""
    if key == SLICES:
        return group_slices({**group, SLICES: value}, group["params"], index)
    return _flags(value, len(group["params"]), key)


class RuleMirrors:
    """The rule lists the optimizer last wrote into each group (see the module docstring)."""

    def __init__(self) -> None:
        self._written: list[dict[str, tuple[Any, Any]]] = []  # per group: key -> (the list object, a copy)
        self._earlier: dict[int, Any] = {}  # id -> every list written before (held, so that ids stay unique)

    def write(self, group: dict[str, Any], index: int, rules: GroupRules) -> None:
        while len(self._written) <= index:
            self._written.append({})
        for key in RULE_KEYS:
            old = self._written[index].get(key)
            if old is not None:
                self._earlier[id(old[0])] = old[0]
            shown = list(rules.get(key))
            group[key] = shown
            self._written[index][key] = (shown, list(shown))

    def truncate(self, count: int) -> None:
        del self._written[count:]

    def edits(self, groups: Sequence[dict[str, Any]], rules: list[GroupRules],
              engine_copies_groups: bool) -> list[GroupRules]:
        """The groups' rules with any edit since the last write applied (checked first: raises before anything
        changes). Lists written earlier that an engine put back are not edits (``engine_copies_groups``: none
        are): the current lists are written again."""
        out = list(rules)
        changed = []
        for index, group in enumerate(groups):
            written = self._written[index] if index < len(self._written) else {}
            for key in RULE_KEYS:
                value = group.get(key)
                mine = written.get(key)
                if mine is not None and value is mine[0] and value == mine[1]:
                    continue
                changed.append(index)
                if value is None or engine_copies_groups or id(value) in self._earlier:
                    continue  # deleted, or an earlier list put back: the current one is written again
                out[index] = out[index].with_(key, checked(key, value, group, index))
        for index in dict.fromkeys(changed):  # every edit checked: now shown
            self.write(groups[index], index, out[index])
        return out
