"""Per-parameter rules: excluded from weight decay, excluded from layer adaptation, trust-ratio slices.

The optimizer keeps them as :class:`GroupRules` (one per param group, a new object whenever anything in it
changes, which is what tells the layout to rebuild), and shows them in every group as per-parameter lists
(``exclude_from_weight_decay``, ``exclude_from_layer_adaptation``, ``trust_ratio_slices``), which
checkpoints save. :class:`GroupBooks` writes those lists and notices when one was edited since it wrote it
(replaced, or changed in place): the edit is checked and applied at the next step, before anything changes.

Parameters are selected by identity or by a regex search on the names given by ``named_parameters()``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor

from .config import GroupSources
from .slices import SliceSpec, group_slices, normalize

__all__ = ["ADAPT_EXCLUDED", "DECAY_EXCLUDED", "RULE_KEYS", "SLICES", "GroupBook", "GroupBooks", "GroupRules",
           "Selection", "param_names", "selection", "sliced"]

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

    def of(self, group: dict[str, Any], names: dict[int, str]) -> list[bool]:
        """Per parameter of ``group`` (named by ``names``, by id): selected or not."""
        return [self.holds(id(p), names.get(id(p))) for p in group["params"]]

    def holds(self, owner: int | None, name: str | None) -> bool:
        """Whether the parameter ``owner`` (an id) named ``name`` is selected (a fragment's logical tensor too)."""
        return owner in self.ids or bool(self.pattern is not None and name is not None and self.pattern.search(name))


def selection(groups: Sequence[dict[str, Any]], var_list: Iterable[Tensor] | None,
              var_names: Iterable[str] | None, param_names: dict[int, str], named: bool,
              strict: bool = True) -> Selection:
    """Check a Keras-style selection against ``groups``; a pattern that matches no name warns (a typo would
    otherwise select nothing without a word), a bare string is refused (each character would be a pattern).
    ``param_names``: each parameter's name, by id; ``named``: they came from ``named_parameters()``; ``strict``:
    ``var_list`` may hold only the groups' tensors."""
    known = {id(p) for g in groups for p in g["params"]}
    ids = frozenset(id(v) for v in (var_list or ()))
    if strict and not ids <= known:
        raise ValueError("`var_list` holds tensors that are not parameters of this optimizer.")
    if isinstance(var_names, (str, bytes)):
        raise ValueError(f"`var_names` must be a list of regex patterns, not one string (each character would be a "
                         f"pattern). Received: var_names={var_names!r}; pass var_names=[{var_names!r}].")
    names = list(var_names or ())
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"`var_names` must be strings (regex patterns). Received: {names!r}")
    if not names:
        return Selection(ids)
    if not named:
        raise ValueError("`var_names` needs named parameters: pass `model.named_parameters()` to Lamb.")
    try:
        patterns = [re.compile(n) for n in names]
    except re.error as err:
        raise ValueError(f"`var_names` holds an invalid regex: {err}") from None
    all_names = list(param_names.values())  # and the names of the pieces an FSDP1 FlatParameter holds:
    all_names += [n for g in groups for p in g["params"] for n in getattr(p, "_fqns", ())]
    unmatched = [p.pattern for p in patterns if not any(p.search(n) for n in all_names)]
    if unmatched:
        warnings.warn(f"`var_names` patterns {unmatched} match no parameter name of this optimizer (its names look "
                      f"like {all_names[:3]}).", UserWarning, stacklevel=3)
    return Selection(ids, re.compile("|".join(sorted(set(names)))))


def sliced(groups: Sequence[dict[str, Any]], rules: Sequence[GroupRules], chosen: Selection, spec: Any,
           names: dict[int, str], strict: bool = True) -> list[list[SliceSpec | None]]:
    """Every group's slice specs with ``spec`` set on the ``chosen`` parameters (each checked against its shape
    first; choosing none raises, unless not ``strict``: another rank may hold them)."""
    picks = [chosen.of(g, names) for g in groups]
    if strict and not any(map(any, picks)):
        raise ValueError("set_trust_ratio_slices: `var_list` / `var_names` select no parameter of this optimizer.")
    return [[normalize(spec, p.shape, f"parameter {names[id(p)]!r}") if c else old
             for p, c, old in zip(g["params"], row, r.slices)] for g, row, r in zip(groups, picks, rules)]


def param_names(groups: Sequence[dict[str, Any]], known: Callable[[list[Tensor]], list[str] | None]
                ) -> dict[int, str]:
    """Each parameter's name, by id: as ``known`` gives it (a sharding engine's own record), from
    ``named_parameters()`` when the group has them, else ``"<group>.<index>"``."""
    out = {}
    for gi, g in enumerate(groups):
        given = known(g["params"]) or g.get("param_names")
        if not given or len(given) != len(g["params"]):
            given = [f"{gi}.{i}" for i in range(len(g["params"]))]
        out.update(zip(map(id, g["params"]), given))
    return out


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


@dataclass
class GroupBook:
    """What the optimizer keeps beside one param group: where its values come from, its rules, and the rule lists
    it last wrote into the group (each object, and a copy of its value)."""

    source: GroupSources
    rules: GroupRules
    written: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    group: dict[str, Any] = field(default_factory=dict, repr=False)


class GroupBooks:
    """The books of the groups, found by each group's identity: an engine may show the optimizer some of its groups
    (DeepSpeed steps one group at a time, and drops empty ones). Writes the rule lists into the groups and notices
    when one was edited since (replaced, or changed in place): the edit is checked and applied at the next step.
    An engine that copies param groups around on its own (``ZeroRedundancyOptimizer``) puts back lists written
    earlier, or another rank's: those are not edits, and the current lists are written again."""

    def __init__(self) -> None:
        self._books: dict[int, GroupBook] = {}
        self._earlier: dict[int, Any] = {}  # id -> every list written before (held, so that ids stay unique)

    def add(self, group: dict[str, Any], source: GroupSources, rules: GroupRules) -> None:
        self._books[id(group)] = GroupBook(source, rules, group=group)
        self.write(group)

    def groups(self) -> list[dict[str, Any]]:
        """Every group the books were kept for (also those an engine hides during a call)."""
        return [b.group for b in self._books.values()]

    def of(self, group: dict[str, Any]) -> GroupBook:
        book = self._books.get(id(group))
        if book is None:
            raise ValueError("A param group of this optimizer was replaced by a new dict: add groups with "
                             "`add_param_group` (or load them with `load_state_dict`).")
        return book

    def sources(self, groups: Sequence[dict[str, Any]]) -> list[GroupSources]:
        return [self.of(g).source for g in groups]

    def rules(self, groups: Sequence[dict[str, Any]]) -> list[GroupRules]:
        return [self.of(g).rules for g in groups]

    def moved(self, old: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]) -> None:
        """The books of ``old`` groups now belong to ``new`` ones, in order (torch's loader makes new dicts)."""
        books = [self.of(g) for g in old]
        self._books = {id(g): GroupBook(b.source, b.rules, group=g) for g, b in zip(new, books)}

    def write(self, group: dict[str, Any]) -> None:
        book = self.of(group)
        for key in RULE_KEYS:
            old = book.written.get(key)
            if old is not None:
                self._earlier[id(old[0])] = old[0]
            shown = list(book.rules.get(key))
            group[key] = shown
            book.written[key] = (shown, list(shown))

    def set_rules(self, groups: Sequence[dict[str, Any]], rules: Sequence[GroupRules]) -> None:
        for group, rule in zip(groups, rules):
            self.of(group).rules = rule
            self.write(group)

    def adopt_edits(self, groups: Sequence[dict[str, Any]], engine_copies_groups: bool) -> bool:
        """Apply any edit of a group's rule lists since the last write (checked first: raises before anything
        changes); whether any rules changed."""
        changed: dict[int, GroupRules] = {}
        for index, group in enumerate(groups):
            book = self.of(group)
            rules = book.rules
            for key in RULE_KEYS:
                value, mine = group.get(key), book.written.get(key)
                if mine is not None and value is mine[0] and value == mine[1]:
                    continue
                changed.setdefault(index, rules)
                if value is None or engine_copies_groups or id(value) in self._earlier:
                    continue  # deleted, or a list written earlier put back: the current one is written again
                changed[index] = changed[index].with_(key, checked(key, value, group, index))
        for index, rules in changed.items():  # every edit checked: now shown
            self.of(groups[index]).rules = rules
            self.write(groups[index])
        return bool(changed)
