"""A QuestionnaireResponse checked against its Questionnaire (issue 14).

Structure-level rules of R4 (Questionnaire and QuestionnaireResponse invariants) that a schema
cannot see: every answered `linkId` is an item of the Questionnaire at that place; answers have
the value[x] the item's `type` allows; a non-repeating item has one answer; `answerOption` and a
local (contained) `answerValueSet` restrict the answers (open-choice also allows a string);
`maxLength`; an item disabled by its `enableWhen` has no answers; and, once the response is
`completed`, every enabled `required` item is answered. Terminology servers, expressions (SDC)
and remote value sets are out of scope: such answers are accepted unchecked.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from .errors import Issue

# Questionnaire item type -> the QuestionnaireResponse answer value[x] it allows (R4 item-type)
ANSWER_TYPES: dict[str, tuple[str, ...]] = {
    "boolean": ("valueBoolean",), "decimal": ("valueDecimal",), "integer": ("valueInteger",),
    "date": ("valueDate",), "dateTime": ("valueDateTime",), "time": ("valueTime",),
    "string": ("valueString",), "text": ("valueString",), "url": ("valueUri",),
    "choice": ("valueCoding",), "open-choice": ("valueCoding", "valueString"),
    "attachment": ("valueAttachment",), "reference": ("valueReference",), "quantity": ("valueQuantity",),
    "group": (), "display": (),
}
NO_CHECK = ("question",)  # R4 allows a generic 'question' type: any answer


def _value(answer: dict[str, Any]) -> tuple[str, Any] | None:
    return next(((k, v) for k, v in answer.items() if k.startswith("value")), None)


class _Checker:
    def __init__(self, questionnaire: dict[str, Any], response: dict[str, Any]) -> None:
        self.q = questionnaire
        self.r = response
        self.issues: list[Issue] = []
        self.answers: dict[str, list[dict[str, Any]]] = {}  # linkId -> every answer in the response
        for item, _path in _walk_response(response.get("item"), "QuestionnaireResponse"):
            self.answers.setdefault(str(item.get("linkId")), []).extend(
                a for a in item.get("answer") or [] if isinstance(a, dict))
        self.value_sets = {f"#{vs.get('id')}": vs for vs in questionnaire.get("contained") or []
                           if isinstance(vs, dict) and vs.get("resourceType") == "ValueSet"}

    def error(self, text: str, path: str, code: str = "business-rule") -> None:
        self.issues.append(Issue(code, text, expression=[path]))

    def items(self, q_items: object, r_items: object, path: str) -> None:
        by_link = {str(q.get("linkId")): q for q in _items(q_items) if isinstance(q, dict)}
        seen: set[str] = set()
        for i, item in enumerate(_items(r_items)):
            if not isinstance(item, dict):
                continue
            here, link = f"{path}.item[{i}]", str(item.get("linkId"))
            q = by_link.get(link)
            if q is None:
                self.error(f"linkId '{link[:64]}' is not an item of the Questionnaire here", f"{here}.linkId")
                continue
            seen.add(link)
            self.item(q, item, here)
        if self.r.get("status") == "completed":
            for link, q in by_link.items():
                if q.get("required") is True and self.enabled(q) and link not in seen:
                    self.error(f"Item '{link[:64]}' is required and has no answer", f"{path}.item")

    def item(self, q: dict[str, Any], item: dict[str, Any], path: str) -> None:
        qtype, link = str(q.get("type")), str(q.get("linkId"))
        answers = [a for a in item.get("answer") or [] if isinstance(a, dict)]
        if answers and not self.enabled(q):
            self.error(f"Item '{link[:64]}' is answered although its enableWhen conditions are not met",
                       f"{path}.answer")
        if qtype in ("group", "display") and answers:
            self.error(f"Item '{link[:64]}' is a {qtype} and cannot have answers", f"{path}.answer")
        if len(answers) > 1 and q.get("repeats") is not True:
            self.error(f"Item '{link[:64]}' does not repeat but has {len(answers)} answers", f"{path}.answer")
        if q.get("required") is True and self.r.get("status") == "completed" and qtype not in ("group", "display") \
                and not answers and self.enabled(q):
            self.error(f"Item '{link[:64]}' is required and has no answer", f"{path}.answer")
        for j, answer in enumerate(answers):
            self.answer(q, answer, f"{path}.answer[{j}]")
            self.items(q.get("item"), answer.get("item"), f"{path}.answer[{j}]")
        self.items(q.get("item"), item.get("item"), path)

    def answer(self, q: dict[str, Any], answer: dict[str, Any], path: str) -> None:
        qtype, link = str(q.get("type")), str(q.get("linkId"))
        value = _value(answer)
        if value is None or qtype in NO_CHECK or qtype not in ANSWER_TYPES:
            return
        key, v = value
        allowed = ANSWER_TYPES[qtype]
        if key not in allowed:
            want = " or ".join(allowed) or "no answer"
            self.error(f"Item '{link[:64]}' is of type {qtype}: its answer must be {want}, not {key}", path)
            return
        if isinstance(q.get("maxLength"), int) and isinstance(v, str) and len(v) > q["maxLength"]:
            self.error(f"Item '{link[:64]}' allows at most {q['maxLength']} characters", path)
        if key == "valueString" and qtype == "open-choice":
            return  # open-choice: a free-text answer is allowed besides the options
        options = [o for o in q.get("answerOption") or [] if isinstance(o, dict)]
        if options and not any(_same(_value(o), value) for o in options):
            self.error(f"The answer to item '{link[:64]}' is not one of its answerOptions", path, "code-invalid")
        vs = self.value_sets.get(str(q.get("answerValueSet")))
        if vs is not None and key == "valueCoding" and isinstance(v, dict) \
                and (v.get("system"), v.get("code")) not in set(_codes(vs)):
            self.error(f"The answer to item '{link[:64]}' is not in its value set {q['answerValueSet']}",
                           path, "code-invalid")

    def enabled(self, q: dict[str, Any]) -> bool:
        conditions = [c for c in q.get("enableWhen") or [] if isinstance(c, dict)]
        if not conditions:
            return True
        results = [self.condition(c) for c in conditions]
        return all(results) if q.get("enableBehavior") == "all" else any(results)

    def condition(self, c: dict[str, Any]) -> bool:
        answers = self.answers.get(str(c.get("question")), [])
        op = c.get("operator")
        wanted = next((("value" + k[len("answer"):], v) for k, v in c.items() if k.startswith("answer")), None)
        if op == "exists":
            return bool(answers) == (wanted is not None and wanted[1] is True)
        got = [_value(a) for a in answers]
        if wanted is None:
            return False
        if op == "=":
            return any(_same(g, wanted) for g in got)
        if op == "!=":
            return not any(_same(g, wanted) for g in got)
        for g in got:
            if g is None or g[0] != wanted[0] or not isinstance(g[1], str | int | float):
                continue
            a, b = _ordered(g[1]), _ordered(wanted[1])
            if a is None or b is None:
                continue
            if (op == ">" and a > b) or (op == "<" and a < b) or (op == ">=" and a >= b) or (op == "<=" and a <= b):
                return True
        return False


def _ordered(v: object) -> Any:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return Decimal(str(v))
    return v if isinstance(v, str) else None  # dates and times compare as ISO text


def _same(a: tuple[str, Any] | None, b: tuple[str, Any] | None) -> bool:
    if a is None or b is None or a[0] != b[0]:
        return False
    if a[0] == "valueCoding" and isinstance(a[1], dict) and isinstance(b[1], dict):
        return a[1].get("code") == b[1].get("code") and a[1].get("system") == b[1].get("system")
    return bool(a[1] == b[1])


def _codes(vs: dict[str, Any]) -> Iterator[tuple[Any, Any]]:
    for inc in (vs.get("compose") or {}).get("include") or []:
        for concept in inc.get("concept") or []:
            yield inc.get("system"), concept.get("code")
    stack = list((vs.get("expansion") or {}).get("contains") or [])
    while stack:
        c = stack.pop()
        yield c.get("system"), c.get("code")
        stack.extend(c.get("contains") or [])


def _items(value: object) -> list[object]:
    """An `item` array as stored (anything else, e.g. a missing one, has no items)."""
    return value if isinstance(value, list) else []


def _walk_response(items: object, path: str) -> Iterator[tuple[dict[str, Any], str]]:
    for i, item in enumerate(_items(items)):
        if not isinstance(item, dict):
            continue
        here = f"{path}.item[{i}]"
        yield item, here
        yield from _walk_response(item.get("item"), here)
        for j, answer in enumerate(item.get("answer") or []):
            if isinstance(answer, dict):
                yield from _walk_response(answer.get("item"), f"{here}.answer[{j}]")


def check_response(response: dict[str, Any], questionnaire: dict[str, Any]) -> list[Issue]:
    """The response's violations of `questionnaire` (empty: it conforms)."""
    checker = _Checker(questionnaire, response)
    checker.items(questionnaire.get("item"), response.get("item"), "QuestionnaireResponse")
    return checker.issues
