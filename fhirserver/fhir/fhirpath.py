"""A small compiled FHIRPath subset, enough for the R4 SearchParameter expressions we ship.

Why not a full engine: indexing runs on every write (dozens of expressions per resource), and the
R4 expressions for our types use only paths, `|`, `ofType()`/`as`, `where(resolve() is T)`,
`where(field='x')`, `exists()`, `and`, `=`/`!=`. Compiling those to closures keeps indexing at a
few microseconds per expression. An unsupported construct raises UnsupportedExpression at load
time, so a custom SearchParameter never silently indexes nothing.

Nodes are (value, type) pairs; `type` is known for choice elements (`valueQuantity` -> Quantity)
and for resolve() results, which is what `ofType`/`is` need.

One module, past the 400 lines others keep to: the tokenizer, the recursive-descent parser and
the functions it compiles to are one grammar, and read best side by side.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

Node = tuple[Any, str | None]
Fn = Callable[[list[Node]], list[Node]]
Extract = Callable[[dict[str, Any]], list[Node]]  # a compiled expression applied to a resource


class UnsupportedExpression(ValueError):
    pass


_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^'\\]|\\.)*')|(?P<op>!=|[().|=,])|(?P<id>[A-Za-z_][A-Za-z0-9_]*|`[^`]+`))"
)

# FHIR data types that start with an upper-case letter; used to split `valueQuantity` into
# element `value` and type `Quantity`.
_PRIMITIVE_CHOICE = {
    "Boolean": "boolean", "Integer": "integer", "String": "string", "DateTime": "dateTime",
    "Date": "date", "Time": "time", "Instant": "instant", "Decimal": "decimal", "Uri": "uri",
    "Url": "url", "Canonical": "canonical", "Code": "code", "Base64Binary": "base64Binary",
    "PositiveInt": "positiveInt", "UnsignedInt": "unsignedInt", "Id": "id", "Oid": "oid",
    "Uuid": "uuid", "Markdown": "markdown",
}


def _tokenize(text: str) -> list[tuple[str, str]]:
    pos, out = 0, []
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise UnsupportedExpression(f"cannot parse FHIRPath near: {text[pos:pos + 20]!r}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def _type_matches(node_type: str | None, wanted: str) -> bool:
    if node_type is None:
        return False
    return node_type.lower() == wanted.lower()


def _child(nodes: list[Node], name: str, choice: bool) -> list[Node]:
    out: list[Node] = []
    for value, _t in nodes:
        if not isinstance(value, dict):
            continue
        if name in value:
            v = value[name]
            items = v if isinstance(v, list) else [v]
            out.extend((item, None) for item in items)
            continue
        if not choice:
            continue
        # choice element: value -> valueQuantity, valueString, ...
        for key, tname in _choice_keys(value, name):
            v = value[key]
            items = v if isinstance(v, list) else [v]
            out.extend((item, tname) for item in items)
    return out


# (choice name, an object's keys in order) -> its typed keys: objects of one shape (every
# Observation with effectiveDateTime and valueQuantity) are scanned once, not per write.
_CHOICE_KEYS: dict[tuple[str, tuple[str, ...]], tuple[tuple[str, str], ...]] = {}


def _choice_keys(value: dict[str, Any], name: str) -> tuple[tuple[str, str], ...]:
    """(key, type) of each `name[Type]` key of `value`, in key order."""
    shape = (name, tuple(value))
    found = _CHOICE_KEYS.get(shape)
    if found is None:
        n = len(name)
        found = tuple((key, _PRIMITIVE_CHOICE.get(key[n:], key[n:])) for key in value
                      if key.startswith(name) and len(key) > n and key[n].isupper())
        if len(_CHOICE_KEYS) >= 4096:
            _CHOICE_KEYS.clear()  # bounded: shapes are few in practice
        _CHOICE_KEYS[shape] = found
    return found


def _resolve(nodes: list[Node]) -> list[Node]:
    out: list[Node] = []
    for value, _t in nodes:
        if isinstance(value, dict):
            ref = value.get("reference")
            rtype = value.get("type")
            if isinstance(ref, str) and not ref.startswith("#"):
                parts = ref.split("?")[0].rstrip("/").split("/")
                if "_history" in parts:
                    parts = parts[: parts.index("_history")]
                if len(parts) >= 2:
                    rtype = parts[-2]
            if rtype:
                out.append(({}, rtype))
    return out


# Choice elements (`value[x]`, ...): navigation expands them to their typed names. Set from the
# StructureDefinitions via `set_choice_elements`; the default covers the R4 resources we serve.
_CHOICES: set[str] = {"value", "effective", "deceased", "multipleBirth", "occurred", "source"}


def set_choice_elements(names: set[str]) -> None:
    _CHOICES.clear()
    _CHOICES.update(names)


def child_nodes(nodes: list[Node], name: str) -> list[Node]:
    """`nodes.name` exactly as a compiled path step navigates it (choice elements included)."""
    return _child(nodes, name, name in _CHOICES)


def resolves_to(value: object, type_name: str) -> bool:
    """Whether one node passes `where(resolve() is type_name)`."""
    found = _resolve([(value, None)])
    return bool(found) and all(_type_matches(t, type_name) for _, t in found)


class _Parser:
    def __init__(self, text: str, root_type: str) -> None:
        self.tokens = _tokenize(text)
        self.i = 0
        self.root_type = root_type

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value):
            raise UnsupportedExpression(f"expected {value!r}")
        self.i += 1
        return tok

    def parse(self) -> Fn:
        fn = self.and_expr()
        if self.peek() is not None:
            raise UnsupportedExpression(f"unexpected token {self.peek()}")
        return fn

    def and_expr(self) -> Fn:
        left = self.eq_expr()
        while self.peek() and self.peek()[1] == "and":  # type: ignore[index]
            self.take()
            right = self.eq_expr()
            left = _and(left, right)
        return left

    def eq_expr(self) -> Fn:
        left = self.type_expr()
        tok = self.peek()
        if tok and tok[1] in ("=", "!="):
            self.take()
            right = self.type_expr()
            return _equals(left, right, negate=tok[1] == "!=")
        return left

    def type_expr(self) -> Fn:
        left = self.union_expr()
        tok = self.peek()
        if tok and tok[1] in ("is", "as"):
            self.take()
            tname = self.take()[1]
            return _is(left, tname) if tok[1] == "is" else _of_type(left, tname)
        return left

    def union_expr(self) -> Fn:
        parts = [self.term()]
        while self.peek() and self.peek()[1] == "|":  # type: ignore[index]
            self.take()
            parts.append(self.term())
        if len(parts) == 1:
            return parts[0]
        return lambda nodes: [n for p in parts for n in p(nodes)]

    def term(self) -> Fn:
        tok = self.peek()
        if tok is None:
            raise UnsupportedExpression("unexpected end")
        strict = False  # only the steps after the first decide where a chain may stop early
        if tok[1] == "(":
            self.take()
            inner = self.and_expr()
            self.take(")")
            fn = inner
        elif tok[0] == "str":
            self.take()
            lit = tok[1][1:-1]
            fn = _constant((lit, "string"))
        elif tok[1] in ("true", "false"):
            self.take()
            lit_b = tok[1] == "true"
            fn = _constant((lit_b, "boolean"))
        else:
            fn, strict = self.invocation(first=True)
        steps = [(fn, strict)]
        while self.peek() and self.peek()[1] == ".":  # type: ignore[index]
            self.take()
            steps.append(self.invocation(first=False))
        return _path(steps)

    def invocation(self, first: bool) -> tuple[Fn, bool]:
        """One path step and whether it maps an empty input to an empty output."""
        kind, name = self.take()
        if kind != "id":
            raise UnsupportedExpression(f"unexpected {name!r}")
        name = name.strip("`")
        tok = self.peek()
        if tok and tok[1] == "(":
            self.take()
            args: list[Any] = []
            if name in ("ofType", "as", "is"):
                args.append(self.take()[1])
            elif name == "where":
                args.append(self.and_expr())
            elif name == "matches" and (lit := self.peek()) is not None and lit[0] == "str":
                self.take()
                try:
                    args.append(re.compile(lit[1][1:-1].replace("\\\\", "\\")))
                except re.error:
                    raise UnsupportedExpression("matches() with an invalid regular expression") from None
            after = self.peek()
            if after and after[1] != ")":
                raise UnsupportedExpression(f"unsupported arguments to {name}()")
            self.take(")")
            return _function(name, args), name in _STRICT_FUNCTIONS
        if first and name[0].isupper():
            return (lambda nodes, root=name: [(v, t) for v, t in nodes if t == root]), True
        return _child_step(name, name in _CHOICES), True


# Functions whose result on an empty collection is empty (exists(), empty() and `is` are not).
_STRICT_FUNCTIONS = frozenset({"ofType", "as", "where", "first", "resolve", "not"})


def _path(steps: list[tuple[Fn, bool]]) -> Fn:
    """A chain of steps as one function that stops at the first empty result once every
    remaining step would keep it empty: most parameters of a resource find nothing at their
    first or second step, and indexing evaluates every parameter on every write."""
    if len(steps) == 1:
        return steps[0][0]
    fns = tuple(f for f, _ in steps)
    stops = tuple(all(strict for _, strict in steps[i + 1:]) for i in range(len(steps)))
    pairs = tuple(zip(fns, stops, strict=True))

    def run(nodes: list[Node]) -> list[Node]:
        for fn, stop in pairs:
            nodes = fn(nodes)
            if stop and not nodes:
                return []
        return nodes

    return run


def _child_step(name: str, choice: bool) -> Fn:
    if choice:
        return lambda nodes: _child(nodes, name, True)

    def step(nodes: list[Node]) -> list[Node]:  # _child without choice expansion, inlined
        out: list[Node] = []
        for value, _t in nodes:
            if isinstance(value, dict) and name in value:
                v = value[name]
                if isinstance(v, list):
                    out.extend((item, None) for item in v)
                else:
                    out.append((v, None))
        return out

    return step


def _and(a: Fn, b: Fn) -> Fn:
    return lambda nodes: [(_truthy(a(nodes)) and _truthy(b(nodes)), "boolean")]


def _truthy(nodes: list[Node]) -> bool:
    if not nodes:
        return False
    if len(nodes) == 1 and isinstance(nodes[0][0], bool):
        return nodes[0][0]
    return True


def _equals(a: Fn, b: Fn, negate: bool) -> Fn:
    def fn(nodes: list[Node]) -> list[Node]:
        left, right = a(nodes), b(nodes)
        if not left or not right:
            return []
        same = [v for v, _ in left] == [v for v, _ in right]
        return [(same != negate, "boolean")]

    return fn


def _is(a: Fn, tname: str) -> Fn:
    return lambda nodes: [(all(_type_matches(t, tname) for _, t in a(nodes)) and bool(a(nodes)), "boolean")]


def _of_type(a: Fn, tname: str) -> Fn:
    return lambda nodes: [(v, t) for v, t in a(nodes) if _type_matches(t, tname)]


def _function(name: str, args: list[Any]) -> Fn:
    if name in ("ofType", "as"):
        tname = args[0]
        return lambda nodes: [(v, t) for v, t in nodes if _type_matches(t, tname)]
    if name == "is":
        tname = args[0]
        return lambda nodes: [(bool(nodes) and all(_type_matches(t, tname) for _, t in nodes), "boolean")]
    if name == "where":
        cond: Fn = args[0]
        return lambda nodes: [n for n in nodes if _truthy(cond([n]))]
    if name == "exists":
        return lambda nodes: [(bool(nodes), "boolean")]
    if name == "empty":
        return lambda nodes: [(not nodes, "boolean")]
    if name == "not":
        return lambda nodes: [(not _truthy(nodes), "boolean")] if nodes else []
    if name == "first":
        return lambda nodes: nodes[:1]
    if name == "matches" and args:
        regex: re.Pattern[str] = args[0]
        # a string's whole value, as FHIRPath's matches() with the regex anchored by the author
        return lambda nodes: [(bool(regex.search(nodes[0][0])), "boolean")] \
            if len(nodes) == 1 and isinstance(nodes[0][0], str) else []
    if name == "resolve":
        return _resolve
    raise UnsupportedExpression(f"unsupported FHIRPath function {name}()")


def _constant(node: Node) -> Fn:
    """A literal: the same one node whatever the input."""
    return lambda _nodes: [node]


# Kept per (expression, type): the result is a pure function of them, and every Services builds
# its search-parameter registry from the same ~700 expressions (0.07 s of each app start).
@functools.lru_cache(maxsize=4096)
def compile_expression(expression: str, resource_type: str) -> Extract | None:
    """Compile the branches of `expression` that apply to `resource_type`.

    Returns a function from a resource (dict) to its nodes, or None if no branch applies.
    """
    branches = _split_union(expression)
    keep = [b for b in branches if _root_of(b) in (resource_type, "Resource", "DomainResource")]
    if not keep:
        return None
    fns: list[tuple[Fn, str | None]] = []
    for branch in keep:
        root = _root_of(branch)
        text = branch.replace(root, resource_type, 1) if root != resource_type else branch
        guard = _guard(text, resource_type)
        # a choice element (value -> valueQuantity) needs a scan of the keys: no cheaper than the step
        fns.append((_Parser(text, resource_type).parse(), None if guard in _CHOICES else guard))

    def run(resource: dict[str, Any]) -> list[Node]:
        nodes: list[Node] = [(resource, resource_type)]
        out: list[Node] = []
        is_dict = isinstance(resource, dict)
        for fn, guard in fns:
            if guard is not None and is_dict and guard not in resource:
                continue  # the branch's first element is absent, so it finds nothing
            out.extend(fn(nodes))
        return out

    return run


def _guard(branch: str, root: str) -> str | None:
    """The element a branch steps into first, if the branch cannot find anything without it.

    That holds for a plain path `Root.name...` whose later steps are child steps, functions in
    _STRICT_FUNCTIONS (any arguments) or a trailing `as Type`; anything else (operators,
    exists(), unions, literals) may produce a value from nothing, and gets no guard (None)."""
    toks = _tokenize(branch)
    while toks and toks[0][1] == "(" and _closing(toks, 0) == len(toks) - 1:
        toks = toks[1:-1]
    if len(toks) < 3 or toks[0] != ("id", root) or toks[1][1] != "." or toks[2][0] != "id":
        return None
    name = toks[2][1].strip("`")
    if name in ("and", "is", "as") or (len(toks) > 3 and toks[3][1] == "("):
        return None
    i, depth = 3, 0
    while i < len(toks):
        kind, value = toks[i]
        if value == "(":
            depth += 1
        elif value == ")":
            depth -= 1
        elif depth == 0:
            following = toks[i + 1][1] if i + 1 < len(toks) else None
            if value == "as" and kind == "id" and i + 2 == len(toks):
                break  # `... as Type` ends the branch
            if kind != "id" and value != ".":
                return None  # |, =, != or a literal at the top level
            if kind == "id" and (value in ("and", "is", "as") or
                                 (following == "(" and value not in _STRICT_FUNCTIONS)):
                return None
        i += 1
    return name


def _closing(toks: list[tuple[str, str]], start: int) -> int:
    """Index of the parenthesis closing the one at `start` (-1 if unbalanced)."""
    depth = 0
    for i in range(start, len(toks)):
        if toks[i][1] == "(":
            depth += 1
        elif toks[i][1] == ")":
            depth -= 1
            if depth == 0:
                return i
    return -1


def compile_relative(expression: str) -> Fn:
    """Compile an expression evaluated against given nodes (composite components)."""
    return _Parser(expression, "").parse()


def _split_union(expression: str) -> list[str]:
    """Split at top-level `|` (outside parentheses and strings)."""
    parts, depth, cur, in_str = [], 0, "", False
    for ch in expression:
        if ch == "'" and not in_str:
            in_str = True
        elif ch == "'" and in_str:
            in_str = False
        if not in_str:
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
            elif ch == "|" and depth == 0:
                parts.append(cur.strip())
                cur = ""
                continue
        cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def _root_of(branch: str) -> str:
    m = re.match(r"\(*\s*([A-Za-z]+)", branch)
    return m.group(1) if m else ""
