"""The R4 narrative rules (txt-1, txt-2) on `text.div`, checked with a real XML parser (lxml).

txt-1: the div is XHTML (namespace http://www.w3.org/1999/xhtml) using only the basic formatting
elements and attributes the FHIR spec lists (HTML 4.0 chapters 7-11 and 15, `a`, images, inline
styles): no scripts, forms, frames, objects, event attributes (`onerror=`), head/body, links to
stylesheets or `javascript:` URLs. txt-2: some non-whitespace content.

The parser never resolves entities, loads a DTD or touches the network; a DOCTYPE or a processing
instruction is refused outright. Anything that renders narrative must still escape it: this is a
gate on what is stored, not a sanitizer.
"""

from __future__ import annotations

import re
from typing import Any

from lxml import etree

from .errors import FhirError

XHTML = "http://www.w3.org/1999/xhtml"
XML_NS = "http://www.w3.org/XML/1998/namespace"
# the element and attribute lists of the FHIR narrative rules (fhir-xhtml.xsd, R4)
ELEMENTS = frozenset({
    "a", "abbr", "acronym", "b", "big", "blockquote", "br", "caption", "cite", "code", "col", "colgroup", "dd",
    "dfn", "div", "dl", "dt", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "kbd", "li", "ol", "p",
    "pre", "q", "samp", "small", "span", "strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th", "thead",
    "tr", "tt", "ul", "var",
})
ATTRIBUTES = frozenset({
    "abbr", "accesskey", "align", "alt", "axis", "bgcolor", "border", "cellhalign", "cellpadding", "cellspacing",
    "cellvalign", "char", "charoff", "charset", "cite", "class", "colspan", "compact", "coords", "dir", "frame",
    "headers", "height", "href", "hreflang", "hspace", "id", "lang", "longdesc", "name", "nowrap", "rel", "rev",
    "rowspan", "rules", "scope", "shape", "span", "src", "start", "style", "summary", "tabindex", "title", "type",
    "valign", "value", "vspace", "width",
})
URL_ATTRIBUTES = frozenset({"href", "src", "cite", "longdesc"})
_SCRIPT_URL = re.compile(r"^(javascript|vbscript|data:text/html)", re.IGNORECASE)
_STYLE_SCRIPT = re.compile(r"expression\s*\(|javascript:|url\s*\(\s*['\"]?\s*javascript", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x20]+")

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
                          huge_tree=False, remove_blank_text=False)


def _fail(path: str, why: str, key: str = "txt-1") -> FhirError:
    return FhirError(400, "invariant", f"{key}: the narrative {why}", [path])


def check_div(div: object, path: str) -> None:
    """Raise FhirError(400) unless `div` satisfies txt-1 and txt-2."""
    if not isinstance(div, str):
        raise _fail(path, "must be an XHTML string")
    try:
        root = etree.fromstring(div.encode("utf-8"), _PARSER)
    except etree.XMLSyntaxError:
        raise _fail(path, "is not well-formed XHTML") from None
    tree = root.getroottree()
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        raise _fail(path, "may not carry a DOCTYPE")
    if root.tag != f"{{{XHTML}}}div":
        raise _fail(path, "must be a <div> in the XHTML namespace (xmlns=\"http://www.w3.org/1999/xhtml\")")
    has_image = False
    for node in root.iter():
        if isinstance(node, etree._ProcessingInstruction):  # noqa: SLF001 - lxml's node kinds
            raise _fail(path, "may not contain processing instructions")
        if not isinstance(node.tag, str):
            continue  # comments
        ns, _, local = node.tag[1:].partition("}") if node.tag.startswith("{") else ("", "", node.tag)
        if ns != XHTML or local not in ELEMENTS:
            raise _fail(path, f"may not contain the element <{local[:40]}>")
        has_image = has_image or local == "img"
        for name, value in node.attrib.items():
            ans, _, alocal = name[1:].partition("}") if name.startswith("{") else ("", "", name)
            if ans == XML_NS and alocal in ("lang", "space"):
                continue
            if ans or alocal not in ATTRIBUTES:
                raise _fail(path, f"may not use the attribute '{alocal[:40]}' (on <{local}>)")
            if alocal in URL_ATTRIBUTES and _SCRIPT_URL.match(_CONTROL.sub("", value)):
                raise _fail(path, f"may not link to a script URL (attribute '{alocal}' on <{local}>)")
            if alocal == "style" and _STYLE_SCRIPT.search(value):
                raise _fail(path, f"may not run script from a style attribute (on <{local}>)")
    if not has_image and not "".join(root.itertext()).strip():
        raise _fail(path, "must have some non-whitespace content", "txt-2")


def check_narratives(body: dict[str, Any], root: str) -> None:
    """txt-1/txt-2 on the resource's narrative and on that of each contained resource."""
    targets = [(body, root)] + [(c, f"{root}.contained[{i}]") for i, c in enumerate(body.get("contained") or [])
                                if isinstance(c, dict)]
    for res, path in targets:
        text = res.get("text")
        if isinstance(text, dict) and "div" in text:
            check_div(text["div"], f"{path}.text.div")
