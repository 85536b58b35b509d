"""Mixed-precision policy: which layers stay in float and which INT8 mode each of the others gets.

A ``Policy`` is an ordered list of rules (glob or regex on layer names -> action) plus exact-name
overrides. ``quantize_`` asks it once per candidate layer through ``decide``. Precedence, highest
first: overrides, then rules in order (first match wins), then the default action. Presets
(octet/presets.py) put their rules *after* the user's, so a user rule always beats a preset rule
for the same layer; the per-layer table a policy produces is octet/report.py's ``decision_table``.

Actions: ``keep`` (stay in float; aliases ``float``, ``bf16``, ``fp16``), ``weight_only``,
``dynamic``, ``static`` and ``default`` (quantize with whatever Quantize Model was asked for; use
it to pull a layer back out of a preset's keep list).

Everything here is JSON-serialisable: a policy goes into checkpoint metadata and workflow widgets.
"""
from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

from .api import OctetError
from .config import MODES, QuantConfig, config_for_mode
from .report import decision_table

FORMAT_VERSION = 1
KEEP = "keep"
DEFAULT = "default"
ACTION_ALIASES = {"keep": KEEP, "float": KEEP, "bf16": KEEP, "fp16": KEEP, "fp32": KEEP, "skip": KEEP,
                  "default": DEFAULT, "quantize": DEFAULT, "int8": DEFAULT,
                  "weight_only": "weight_only", "w8a16": "weight_only",
                  "dynamic": "dynamic", "w8a8": "dynamic", "static": "static"}
ACTIONS = (KEEP, DEFAULT) + tuple(MODES)
CARRIES_SMOOTHING = ("dynamic", "static")   # the W8A8 modes: SmoothQuant is an activation-side fold
REGEX_PREFIX = "re:"
# Bounded work for text typed into a widget or read from a file: a policy is a handful of rules, and
# every rule is tried against every layer name, so the limits keep Mixed-Precision Policy under a
# second even at the maximum, and a 2 MB paste is refused before any parsing.
MAX_TEXT = 64 * 1024       # characters in the rules (or overrides) box
MAX_RULES = 1000           # rules (or overrides)
MAX_LINE = 500             # characters per line
MAX_PATTERN = 200          # characters per glob or regex


def _nested_repetition(pattern: str) -> bool:
    """True if a repeated group (``(...)+``, ``*``, ``{n,}``) holds a repetition or an alternation,
    at any depth ("(a+)+", "(a|aa)*", "((a+)b)+"): the shapes whose backtracking can grow
    exponentially with the length of the name. Conservative: some such regexes are harmless."""
    stack, i = [[False]], 0  # per open group: does its body repeat or alternate?
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":  # a character class: skip to its end
            j = pattern.find("]", i + 2)
            i = len(pattern) if j < 0 else j + 1
            continue
        if c == "(":
            stack.append([False])
        elif c == ")" and len(stack) > 1:
            risky = stack.pop()[0]
            nxt = pattern[i + 1:i + 2]
            repeated = nxt in ("+", "*") or (nxt == "{" and re.match(r"\{\d*,", pattern[i + 1:]) is not None)
            if risky and repeated:
                return True
            stack[-1][0] |= risky or repeated
        elif c in "+*|" or (c == "{" and re.match(r"\{\d*,", pattern[i:])):
            stack[-1][0] = True
        i += 1
    return False


def normalize_action(action: str) -> str:
    a = str(action).strip().lower()
    if a not in ACTION_ALIASES:
        raise OctetError(f"Unknown policy action {action!r}; use one of {list(ACTIONS)} "
                         f"(aliases: float/bf16/fp16 = keep, w8a16 = weight_only, w8a8 = dynamic).")
    return ACTION_ALIASES[a]


@dataclass(frozen=True)
class Rule:
    """``pattern`` is a glob on the dotted layer name (``*`` crosses dots) unless ``regex``.

    A glob also matches every layer *under* the named module, so ``time_embed`` covers
    ``time_embed.0`` and ``time_embed.2``. A regex is searched anywhere in the name
    (anchor it with ``^...$`` for exact matches).
    """
    pattern: str
    action: str
    regex: bool = False
    why: str = ""        # shown in the report: what this layer is and why the rule exists
    source: str = "rule"  # "rule N", "preset SD15", "override", "sensitivity"

    def __post_init__(self):
        object.__setattr__(self, "action", normalize_action(self.action))
        if not self.pattern:
            raise OctetError("A policy rule has an empty pattern; write e.g. '*.attn2.to_k: keep'.")
        if not isinstance(self.pattern, str) or len(self.pattern) > MAX_PATTERN:
            raise OctetError(f"A policy rule's pattern has {len(str(self.pattern))} characters; keep patterns under "
                             f"{MAX_PATTERN} (layer names are short: match a distinctive part).")
        if self.regex and _nested_repetition(self.pattern):
            raise OctetError(f"Rule regex {self.pattern!r} repeats a group that itself repeats or alternates (like "
                             f"'(a+)+' or '(a|aa)*'), which can take exponential time; rewrite it without the nested "
                             f"repetition, or use a glob.")
        if self.regex:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise OctetError(f"Rule regex {self.pattern!r} does not compile ({e}). Fix it, or drop the "
                                 f"'re:' prefix to use a glob.") from e

    def matches(self, name: str) -> bool:
        if self.regex:
            return re.search(self.pattern, name) is not None
        return fnmatch.fnmatchcase(name, self.pattern) or fnmatch.fnmatchcase(name, self.pattern + ".*")

    def to_dict(self) -> dict:
        return {"pattern": self.pattern, "action": self.action, "regex": self.regex, "why": self.why,
                "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> "Rule":
        unknown = set(d) - {"pattern", "action", "regex", "why", "source"}
        if unknown:
            raise OctetError(f"Unknown rule fields {sorted(unknown)}; expected pattern, action, regex, why, source.")
        return cls(d["pattern"], d["action"], bool(d.get("regex", False)), d.get("why", ""), d.get("source", "rule"))


@dataclass
class Policy:
    """Ordered rules + exact-name overrides. ``decide`` implements ``octet.api.DecidesLayers``."""
    name: str = "custom"
    rules: list[Rule] = field(default_factory=list)
    overrides: dict[str, str] = field(default_factory=dict)   # exact layer name -> action
    default_action: str = DEFAULT
    notes: dict[str, str] = field(default_factory=dict)       # layer -> extra text for the report (sensitivity)
    scores: dict[str, float] = field(default_factory=dict)    # layer -> PSNR (dB) when quantized alone

    def __post_init__(self):
        self.default_action = normalize_action(self.default_action)
        self.overrides = {k: normalize_action(v) for k, v in self.overrides.items()}

    # --- the octet.api.DecidesLayers protocol -----------------------------------------------
    def decide(self, name: str, module, default: QuantConfig) -> tuple[Optional[QuantConfig], str]:
        action, why = self.action_for(name)
        note = self.notes.get(name)
        if note:
            why = f"{why}; {note}" if why else note
        return _config_for(action, default), why

    def action_for(self, name: str) -> tuple[str, str]:
        """(action, reason) for one layer name, following the precedence above."""
        if name in self.overrides:
            return self.overrides[name], "override"
        for rule in self.rules:
            if rule.matches(name):
                label = f"{rule.source}: {rule.why}" if rule.why else rule.source
                return rule.action, f"{label} [{_show(rule)}]"
        return self.default_action, ""

    # --- helpers for nodes and reports -------------------------------------------------------
    def unmatched(self, names: Iterable[str]) -> tuple[list[Rule], list[str]]:
        """Rules and overrides that match none of ``names``: usually a typo, worth telling the user."""
        names = list(names)
        rules = [r for r in self.rules if not r.source.startswith("preset")
                 and not any(r.matches(n) for n in names)]
        known = set(names)
        return rules, [n for n in self.overrides if n not in known]

    def preview(self, layers: Iterable[tuple[str, str, int]]) -> str:
        """A table of what this policy would do to ``(name, kind, params)`` layers, without quantizing."""
        rows = []
        for name, kind, params in layers:
            action, why = self.action_for(name)
            note = self.notes.get(name)
            rows.append((name, kind, params, self.scores.get(name), action, f"{why}; {note}" if note and why
                         else (note or why)))
        return decision_table(rows)

    def describe(self) -> str:
        lines = [f"policy '{self.name}': default action {self.default_action}, {len(self.rules)} rules, "
                 f"{len(self.overrides)} overrides (precedence: overrides, rules in order, default)"]
        for i, r in enumerate(self.rules, 1):
            lines.append(f"  {i:>3}. {_show(r):<48} -> {r.action:<11} {r.source}{': ' + r.why if r.why else ''}")
        for n, a in self.overrides.items():
            lines.append(f"  override {n} -> {a}")
        return "\n".join(lines)

    def merged(self, other: "Policy", name: Optional[str] = None) -> "Policy":
        """``self`` first (wins), then ``other``'s rules; overrides and notes combined, self winning."""
        return Policy(name=name or f"{self.name}+{other.name}", rules=list(self.rules) + list(other.rules),
                      overrides={**other.overrides, **self.overrides},
                      default_action=self.default_action if self.default_action != DEFAULT else other.default_action,
                      notes={**other.notes, **self.notes}, scores={**other.scores, **self.scores})

    # --- serialisation -----------------------------------------------------------------------
    def to_dict(self, compact: bool = False) -> dict:
        """``compact`` drops the per-layer notes and scores (report material): what a checkpoint
        header needs to reproduce the decisions, at a fraction of the size."""
        d = {"format_version": FORMAT_VERSION, "name": self.name, "default_action": self.default_action,
             "rules": [r.to_dict() for r in self.rules], "overrides": dict(self.overrides)}
        if not compact:
            d.update(notes=dict(self.notes), scores={k: float(v) for k, v in self.scores.items()})
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Policy":
        version = d.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise OctetError(f"This policy was written by a newer Octet (format {version}, this one reads "
                             f"{FORMAT_VERSION}). Update Octet.")
        return cls(name=d.get("name", "custom"), rules=[Rule.from_dict(r) for r in d.get("rules", [])],
                   overrides=dict(d.get("overrides", {})), default_action=d.get("default_action", DEFAULT),
                   notes=dict(d.get("notes", {})), scores={k: float(v) for k, v in d.get("scores", {}).items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Policy":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise OctetError(f"Policy JSON does not parse ({e}).") from e


class Only:
    """Quantize exactly the named layers, each with its config, and keep every other layer in float:
    the one-off policy of the measurements that quantize a layer (or a block) alone."""

    def __init__(self, configs: dict[str, QuantConfig], reason: str):
        self.configs, self.reason = configs, reason   # reason: why the other layers stay float

    def decide(self, name: str, module, default: QuantConfig) -> tuple[Optional[QuantConfig], str]:
        return (self.configs[name], "") if name in self.configs else (None, self.reason)


def _show(rule: Rule) -> str:
    return (REGEX_PREFIX + rule.pattern) if rule.regex else rule.pattern


def _config_for(action: str, default: QuantConfig) -> Optional[QuantConfig]:
    if action == KEEP:
        return None
    if action == DEFAULT or action == default.mode:
        return default
    # Another mode than Quantize Model's: carry over what the user chose there (kinds, kernels, and
    # SmoothQuant between static and dynamic: a layer a policy makes dynamic keeps its smoothing, which
    # per-token scales need as much as static ones where one input channel dominates).
    carry = dict(kinds=default.kinds, backend=default.backend, goal=default.goal)
    if action in CARRIES_SMOOTHING and getattr(default, "smooth_alpha", None) is not None:
        carry["smooth_alpha"] = default.smooth_alpha
    return config_for_mode(action, **carry)


# --- rules as text (workflow widgets) ----------------------------------------------------------

def _bounded_lines(text: str, what: str) -> list[str]:
    """The lines of a rules/overrides box, refused (before any parsing) when beyond the limits."""
    text = text or ""
    if not isinstance(text, str):
        raise OctetError(f"The policy {what} must be text, got {type(text).__name__}.")
    if len(text) > MAX_TEXT:
        raise OctetError(f"The policy {what} text has {len(text)} characters; the limit is {MAX_TEXT}. A policy is "
                         f"a few rules: use globs that cover many layers (e.g. '*.attn2.*: keep').")
    lines = text.splitlines()
    meaningful = sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))
    if meaningful > MAX_RULES:
        raise OctetError(f"The policy {what} has {meaningful} lines; the limit is {MAX_RULES}. Use globs that "
                         f"cover many layers instead of one line per layer.")
    for lineno, line in enumerate(lines, 1):
        if len(line) > MAX_LINE:
            raise OctetError(f"Line {lineno} of the policy {what} has {len(line)} characters; the limit is "
                             f"{MAX_LINE}.")
    return lines


def parse_rules(text: str, source: str = "rule") -> list[Rule]:
    """One rule per line: ``pattern: action``; ``re:`` prefixes a regex; ``#`` starts a comment."""
    rules = []
    for lineno, raw in enumerate(_bounded_lines(text, "rules"), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.split(" #", 1)[0].strip()  # trailing comment ('#' inside a regex needs no space before it)
        regex = line.startswith(REGEX_PREFIX)
        body = line[len(REGEX_PREFIX):] if regex else line
        if ":" not in body:
            raise OctetError(f"Rule line {lineno} ({raw.strip()!r}) has no action; write 'pattern: action', "
                             f"e.g. '*.attn2.to_k: keep' or 're:ff\\.net\\.2$: weight_only'.")
        pattern, action = (s.strip() for s in body.rsplit(":", 1))
        try:
            rules.append(Rule(pattern, action, regex, source=f"{source} {lineno}"))
        except OctetError as e:
            raise OctetError(f"Rule line {lineno} ({raw.strip()!r}): {e}") from e
    return rules


def parse_overrides(text: str) -> dict[str, str]:
    """One override per line: ``exact.layer.name: action``."""
    out = {}
    for lineno, raw in enumerate(_bounded_lines(text, "overrides"), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if ":" not in line:
            raise OctetError(f"Override line {lineno} ({raw.strip()!r}) has no action; write "
                             f"'exact.layer.name: action', e.g. 'out.2: keep'.")
        name, action = (s.strip() for s in line.rsplit(":", 1))
        if any(c in name for c in "*?["):
            raise OctetError(f"Override line {lineno}: '{name}' has wildcards; overrides name one layer exactly. "
                             f"Put patterns in the rules box instead.")
        try:
            out[name] = normalize_action(action)
        except OctetError as e:
            raise OctetError(f"Override line {lineno} ({raw.strip()!r}): {e}") from e
    return out
