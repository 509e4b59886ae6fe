"""The value paths the chart's templates read, found by following each template's dot and variables.

A key such as `enabled`, `name` or `key` occurs in many places, so "the word appears in a template" says
nothing about any one of them. This reader walks the Go template actions of every file in order and keeps,
for the dot and for each variable, which value it stands for: `$e` in `range $i, $e := $root.Values.engines`
is an item of engines, `.` inside `with $e.lora` is that engine's lora, `.budget` inside a helper called
with `(dict "budget" $budget)` is what `$budget` was. A read is then a whole path, such as
`gateway.autoscaling.enabled` or `engines[].lora.adapters[].name`, in the forms the templates use: `$x.a.b`,
`.a.b`, `get`/`index`/`hasKey $x "a"`, `dig "a" "b" $x`, and `get $x $field` where `$field` ranges over an
inline `list "a" "b"`. A key the resolved engine list carries under another name (`set $e
"resolvedStrategy" $strategy`) is followed to the key it came from.

Paths are tuples. ROOT begins a path from the chart's root context (`("<root>", "Values", "gateway")`);
BUILT begins one inside a value the templates built and handed on (the engine list that
`(include "llm-gateway.engines" . | fromJson).engines` returns keeps the user's keys, so its items are read
as `engines[].<key>`). ITEM is an element of a list, or any entry of a map ranged over; DYNAMIC a key known
only at render time (`get $root.Values.enginePresets $kind`). What the reader cannot follow (a key held in
a variable, a function's result) reads nothing: unknown is never counted as read. A read is a read wherever
it is, a check that refuses a value included: a key read only by such a check passes here, and only a
rendering test (`REACHES` in test_chart_values_used.py) tells that it reaches no object.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = "<root>"
BUILT = "<built>"
ITEM = "[]"
DYNAMIC = "<key>"
DICT = "<dict>"  # (DICT, call site): the `(dict "k" $v ...)` a helper was called with there (ReadFinder.dicts)
MAX_DEPTH = 12  # deeper than any value of the chart: a helper calling itself (mergeInto) adds a level a round

ValuePath = tuple[str, ...]

_ACTION = re.compile(r"\{\{-?(.*?)-?\}\}", re.S)
_COMMENT = re.compile(r"/\*.*?\*/", re.S)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|`[^`]*`')
_IDENT = r"[A-Za-z_]\w*"
_VAR_CHAIN = re.compile(rf"(?<![\w$.)\]])(\$(?:{_IDENT})?)((?:\.{_IDENT})+)")
_DOT_CHAIN = re.compile(rf"(?<![\w$)\]])\.({_IDENT}(?:\.{_IDENT})*)")
_BUILT_CHAIN = re.compile(rf"\)((?:\.{_IDENT})+)")
_FUNCTIONS = re.compile(r"(?<![\w$.])(get|index|hasKey|dig|set|include|template)\s")
_ASSIGN = re.compile(r"^(?:(\$\w+)\s*,\s*)?(\$\w+)\s*(:?=)\s*(.*)$", re.S)
_LITERAL_LIST = re.compile(r'^\(?\s*list((?:\s+"[\w-]*")+)\s*\)?$')


@dataclass
class _Frame:
    """A file, a helper or a control structure: its dot, the dot outside it (for else), its variables."""

    dot: set[ValuePath]
    outer_dot: set[ValuePath]
    variables: dict[str, set[ValuePath]] = field(default_factory=dict)
    literals: dict[str, list[str]] = field(default_factory=dict)  # variables ranging over an inline list


@dataclass
class ReadFinder:
    files: dict[str, str]
    helper_dots: dict[str, set[ValuePath]] = field(default_factory=dict)  # what each helper is called with
    dicts: dict[str, dict[str, set[ValuePath]]] = field(default_factory=dict)  # by call site
    renames: dict[ValuePath, set[ValuePath]] = field(default_factory=dict)  # a built key -> where it came from
    reads: set[ValuePath] = field(default_factory=set)

    def run(self) -> set[ValuePath]:
        """Every path read. A helper's dot comes from its callers, which may come later: walk until they settle."""
        for _ in range(50):
            before = self._arguments()
            self.reads = set()
            for name, text in self.files.items():
                self._walk(name, text)
            if before == self._arguments():
                return self._followed(self.reads)
        raise AssertionError("the helpers' arguments did not settle")

    def _arguments(self) -> tuple[dict[str, frozenset[ValuePath]], dict[str, dict[str, frozenset[ValuePath]]]]:
        helpers = {name: frozenset(dots) for name, dots in self.helper_dots.items()}
        return helpers, {site: {k: frozenset(v) for k, v in entries.items()} for site, entries in self.dicts.items()}

    def _followed(self, reads: set[ValuePath]) -> set[ValuePath]:
        """The reads, plus each read of a renamed key as a read of the key it came from."""
        found = set(reads)
        while True:
            more = set()
            for path in found:
                for end in range(2, len(path) + 1):
                    for key, sources in self.renames.items():
                        if lands_on(path[:end], key):
                            more |= {(*source, *path[end:]) for source in sources}
            more = {path for path in more if len(path) <= MAX_DEPTH} - found
            if not more:
                return found
            found |= more

    # --- one file, action by action ---------------------------------------------------------------------

    def _walk(self, name: str, text: str) -> None:
        stack = [_Frame(dot={(ROOT,)}, outer_dot={(ROOT,)})]
        for match in _ACTION.finditer(text):
            action = _COMMENT.sub("", match.group(1)).strip()
            if not action:
                continue
            word = action.split(None, 1)[0]
            rest = action[len(word) :].strip()
            site = f"{name}:{match.start()}"
            if word == "define":
                helper = _STRING.match(rest)
                dots = self.helper_dots.get(helper.group(0).strip('"'), set()) if helper else set()
                stack.append(_Frame(dot=set(dots), outer_dot=set(dots), variables={"$": set(dots)}))
            elif word in ("if", "with", "range"):
                stack.append(_Frame(dot=set(stack[-1].dot), outer_dot=set(stack[-1].dot)))
                self._open(word, rest, stack, site)
            elif word == "else":
                stack[-1].dot = set(stack[-1].outer_dot)
                inner = rest.split(None, 1)
                if inner and inner[0] in ("if", "with"):
                    self._open(inner[0], inner[1] if len(inner) > 1 else "", stack, site)
            elif word == "end":
                if len(stack) > 1:
                    stack.pop()
            else:
                self._statement(action, stack, site)

    def _open(self, word: str, expression: str, stack: list[_Frame], site: str) -> None:
        self._record(expression, stack, site)
        if word == "if":
            return
        assignment = _ASSIGN.match(expression)
        value = assignment.group(4) if assignment else expression
        paths = self._value_of(value, stack)
        if word == "range":
            paths = {(*path, ITEM) for path in paths}
        frame = stack[-1]
        frame.dot = paths
        if assignment:
            frame.variables[assignment.group(2)] = set(paths)
            literal = _LITERAL_LIST.match(value.strip())
            if word == "range" and literal:
                frame.literals[assignment.group(2)] = re.findall(r'"([\w-]*)"', literal.group(1))

    def _statement(self, action: str, stack: list[_Frame], site: str) -> None:
        self._record(action, stack, site)
        assignment = _ASSIGN.match(action)
        if not assignment:
            return
        target, operator, value = assignment.group(2), assignment.group(3), assignment.group(4)
        paths = self._value_of(value, stack)
        if operator == ":=":
            stack[-1].variables[target] = paths
            return
        for frame in reversed(stack):  # `$x = ...` changes the variable where it was declared
            if target in frame.variables:
                frame.variables[target] = frame.variables[target] | paths
                return

    # --- what an expression stands for ------------------------------------------------------------------

    def _variable(self, name: str, stack: list[_Frame]) -> set[ValuePath]:
        for frame in reversed(stack):
            if name in frame.variables:
                return frame.variables[name]
        return {(ROOT,)} if name == "$" else set()

    def _keys(self, word: str, stack: list[_Frame]) -> list[str]:
        """The keys a lookup's key argument stands for: a literal, an inline list's items, else DYNAMIC."""
        if word.startswith('"'):
            return [word.strip('"')]
        for frame in reversed(stack):
            if word in frame.literals:
                return frame.literals[word]
        return [DYNAMIC]

    def _extend(self, bases: Iterable[ValuePath], keys: list[str]) -> set[ValuePath]:
        """Each base + keys; a helper's `(dict ...)` argument is followed into the value under the key."""
        found: set[ValuePath] = set()
        for base in bases:
            if base[:1] == (DICT,):
                if keys:
                    found |= {(*inner, *keys[1:]) for inner in self.dicts.get(base[1], {}).get(keys[0], set())}
            else:
                found.add((*base, *keys))
        return {path for path in found if len(path) <= MAX_DEPTH}

    def _value_of(self, expression: str, stack: list[_Frame]) -> set[ValuePath]:
        """The value an expression stands for, where it is one the templates were given: a chain (`$x.a`,
        `.a`, `.`, `$`), through deepCopy, default, ternary, get/index, `append $list $item`, and
        `(include ... | fromJson).key`, a built value."""
        expression = _unwrap(expression.strip())
        built = re.fullmatch(rf"(\(.*\))((?:\.{_IDENT})+)", expression, re.S)
        if built and _closing(built.group(1)) == len(built.group(1)) - 1:
            keys = built.group(2)[1:].split(".")
            inner = _unwrap(built.group(1))
            if re.match(r"include\s", inner):
                return {(BUILT, *keys)}
            return self._extend(self._value_of(inner, stack), keys)
        words = _words(_split_pipe(expression)[0])
        if not words:
            return set()
        head = words[0]
        if len(words) == 1:
            if head.startswith("("):
                return self._value_of(head, stack)
            if head.startswith("$"):
                name, _, keys = head.partition(".")
                return self._extend(self._variable(name, stack), keys.split(".") if keys else [])
            if head.startswith("."):
                return self._extend(stack[-1].dot, head[1:].split(".") if head != "." else [])
            return set()
        if head == "deepCopy":
            return self._value_of(words[1], stack)
        if head == "default":
            return self._value_of(words[-1], stack)
        if head == "ternary" and len(words) >= 3:
            return self._value_of(words[1], stack) | self._value_of(words[2], stack)
        if head in ("get", "index") and len(words) >= 3:
            found = self._value_of(words[1], stack)
            for word in words[2:]:
                found = {path for key in self._keys(word, stack) for path in self._extend(found, [key])}
            return found
        if head == "append" and len(words) == 3:  # a list of such items
            return {path[:-1] for path in self._value_of(words[2], stack) if path[-1:] == (ITEM,)}
        return set()

    # --- what an action reads ---------------------------------------------------------------------------

    def _record(self, action: str, stack: list[_Frame], site: str) -> None:
        reads: set[ValuePath] = set()
        for match in _FUNCTIONS.finditer(action):
            function, words = match.group(1), _words(action[match.end() :])
            if function in ("get", "index", "hasKey") and len(words) >= 2:
                found = self._value_of(words[0], stack)
                for word in words[1:]:
                    if not (word.startswith('"') or word.startswith("$")):
                        break
                    found = {path for key in self._keys(word, stack) for path in self._extend(found, [key])}
                    reads |= found
            elif function == "dig":
                keys = [word.strip('"') for word in words if word.startswith('"')]
                if len(words) > len(keys):
                    reads |= self._extend(self._value_of(words[len(keys)], stack), keys)
            elif function == "set" and len(words) >= 3 and words[1].startswith('"'):
                for target in self._value_of(words[0], stack):
                    sources = self._value_of(words[2], stack)
                    if sources:
                        key = (*target, words[1].strip('"'))
                        self.renames[key] = self.renames.get(key, set()) | sources
            elif function in ("include", "template") and len(words) >= 2 and words[0].startswith('"'):
                self._call(words[0].strip('"'), words[1], stack, f"{site}:{match.start()}")
        code = _STRING.sub('""', action)
        for match in _VAR_CHAIN.finditer(code):
            reads |= self._extend(self._variable(match.group(1), stack), match.group(2)[1:].split("."))
        for match in _DOT_CHAIN.finditer(code):
            reads |= self._extend(stack[-1].dot, match.group(1).split("."))
        for match in _BUILT_CHAIN.finditer(code):
            reads.add((BUILT, *match.group(1)[1:].split(".")))
        for path in reads:  # a path's parents are read on the way
            self.reads |= {path[:end] for end in range(2, len(path) + 1)}

    def _call(self, helper: str, argument: str, stack: list[_Frame], site: str) -> None:
        """A helper's dot is what its callers pass: a value, or a `(dict "k" $v ...)` of values."""
        dots = self.helper_dots.setdefault(helper, set())
        inner = _words(_unwrap(argument)) if argument.startswith("(") else []
        if inner[:1] == ["dict"]:
            entries = self.dicts.setdefault(site, {})
            for key, value in zip(inner[1::2], inner[2::2], strict=False):
                if key.startswith('"'):
                    entries[key.strip('"')] = entries.get(key.strip('"'), set()) | self._value_of(value, stack)
            dots.add((DICT, site))
        else:
            dots |= self._value_of(argument, stack)


def _closing(text: str) -> int:
    """Where the parenthesis that opens text closes (-1: it does not)."""
    depth = 0
    for at, char in enumerate(_STRING.sub(lambda m: "_" * len(m.group(0)), text)):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return at
    return -1


def _unwrap(text: str) -> str:
    """text without parentheses around all of it."""
    text = text.strip()
    while text.startswith("(") and _closing(text) == len(text) - 1:
        text = text[1:-1].strip()
    return text


def _split_pipe(text: str) -> list[str]:
    """A pipeline's commands: split at the `|`s outside parentheses and strings."""
    masked = _STRING.sub(lambda m: "_" * len(m.group(0)), text)
    parts, depth, start = [], 0, 0
    for at, char in enumerate(masked):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "|" and depth == 0:
            parts.append(text[start:at])
            start = at + 1
    return [*parts, text[start:]]


def _words(text: str) -> list[str]:
    """A command's words (a parenthesized expression or a string is one word), up to the end of it: a `|`
    or a `)` that closes an outer expression."""
    masked = _STRING.sub(lambda m: "_" * len(m.group(0)), text)
    words, depth, start = [], 0, None
    for at, char in enumerate(masked):
        if depth == 0 and (char == "|" or char == ")"):
            break
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char.isspace() and depth == 0:
            if start is not None:
                words.append(text[start:at])
                start = None
        elif start is None:
            start = at
    else:
        at = len(text)
    if start is not None:
        words.append(text[start:at])
    return words


def lands_on(read: ValuePath, target: ValuePath) -> bool:
    """Whether a read path is the target path: equal, or, for a read inside a built value (BUILT first), a
    tail of it. A read's ITEM or DYNAMIC stands for the target's ITEM (or the same DYNAMIC) only."""
    if read[0] == BUILT:
        return len(target) >= len(read) and target[len(target) - len(read) + 1 :] == read[1:]
    return read == target


def template_reads(templates: Path) -> set[ValuePath]:
    """Every value path the chart's templates read."""
    files = {str(path): path.read_text() for path in sorted(templates.rglob("*")) if path.is_file()}
    return ReadFinder(files).run()
