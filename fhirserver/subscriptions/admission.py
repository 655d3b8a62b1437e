"""What a Subscription must say to be stored (R4 Subscriptions Backport IG 1.1.0, backport-subscription
profile; docs/subscriptions.md). Checked on every create, update and patch, before the transaction:
a known topic (or an R4 criteria string), filters the topic allows, a rest-hook channel to an
endpoint the client may use, a payload content the server supports. The stored body is the
client's, with the owner tag (fhir/ownership.py) and `status` as the server holds it: a new or
changed subscription is `requested` until its handshake succeeds (`$status` says how it goes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from ..auth.principal import Principal
from ..config import Settings
from ..fhir.errors import FhirError
from ..fhir.ownership import owner_code, stamp_owner
from ..search.params import ParamRegistry
from ..search.parser import parse_search
from .endpoints import EndpointRefused, resolve
from .topics import BACKPORT, CRITERIA_TOPIC, PATIENT_FILTER, Topic, Topics, criteria_topic

FILTER_EXT = f"{BACKPORT}/backport-filter-criteria"
PAYLOAD_EXT = f"{BACKPORT}/backport-payload-content"
HEARTBEAT_EXT = f"{BACKPORT}/backport-heartbeat-period"
PAYLOADS = ("empty", "id-only", "full-resource")
_HEADER = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}:[ \t]?[^\r\n\x00]{0,4096}$")
_RESERVED_HEADERS = {"host", "content-length", "content-type", "transfer-encoding", "connection",
                     "x-fhirserver-signature"}
MAX_FILTERS = 10
CHANNELS = ("rest-hook", "websocket")


@dataclass(frozen=True)
class Criteria:
    """A subscription as the dispatcher evaluates it."""

    topic: Topic
    filters: dict[str, list[tuple[str, str]]]  # resource type ("*" for any) -> search parameters
    patients: tuple[str, ...]  # the `patient` filter's ids (empty: not filtered by patient)
    payload: str  # empty | id-only | full-resource
    endpoint: str
    headers: tuple[tuple[str, str], ...]
    heartbeat_seconds: int
    channel: str = "rest-hook"  # rest-hook | websocket

    def filters_for(self, rtype: str) -> list[tuple[str, str]]:
        """The search parameters an `rtype` change must meet (those for any type, then its own)."""
        return [*self.filters.get("*", []), *self.filters.get(rtype, [])]


def _ext(element: object, url: str) -> list[dict[str, Any]]:
    if not isinstance(element, dict):
        return []
    return [e for e in element.get("extension") or [] if isinstance(e, dict) and e.get("url") == url]


def _invalid(message: str, where: str) -> FhirError:
    return FhirError(422, "processing", message, [where])


def criteria_of(body: dict[str, Any], topics: Topics, params: ParamRegistry) -> Criteria:
    """Parse a stored (or to-be-stored) Subscription; FhirError 422 naming the element at fault."""
    criteria = str(body.get("criteria") or "")
    topic = topics.get(criteria)
    raw_filters = [str(e.get("valueString") or "") for e in _ext(body.get("_criteria"), FILTER_EXT)]
    if topic is None:
        rtype = criteria.partition("?")[0]
        if rtype not in topics.criteria_types or criteria.startswith(("http:", "https:", "urn:")):
            raise _invalid(f"Unknown subscription topic '{criteria[:200]}' (GET /fhir/metadata lists the topics; "
                           "an R4 criteria is 'Type?search')", "Subscription.criteria")
        topic = criteria_topic(rtype)
        raw_filters = [criteria, *raw_filters]
    if len(raw_filters) > MAX_FILTERS:
        raise _invalid(f"At most {MAX_FILTERS} filter criteria", "Subscription.criteria")
    filters: dict[str, list[tuple[str, str]]] = {}
    patients: list[str] = []
    for text in raw_filters:
        rtype, _sep, query = text.partition("?")
        if rtype not in topic.triggers and rtype != "*":
            raise _invalid(f"The filter '{text[:200]}' names a type the topic does not cover", "Subscription.criteria")
        pairs = parse_qsl(query, keep_blank_values=True)
        rest: list[tuple[str, str]] = []
        for key, value in pairs:
            name = key.split(":", 1)[0]
            if key == PATIENT_FILTER:  # every topic, every type: in this patient's compartment
                for ref in value.split(","):
                    prefix, _slash, pid = ref.rpartition("/")  # id, Patient/id or [base]/Patient/id
                    if not pid or (prefix and prefix.rsplit("/", 1)[-1] != "Patient"):
                        raise _invalid(f"A patient filter names patients (Patient/id), not '{ref[:100]}'",
                                       "Subscription.criteria")
                    patients.append(pid)
                continue
            if topic.url != CRITERIA_TOPIC and not topic.may_filter(rtype, name):
                raise _invalid(f"The topic does not allow filtering {rtype} by '{name}'", "Subscription.criteria")
            rest.append((key, value))
        for target in ([rtype] if rtype != "*" else sorted(topic.triggers)) if rest else []:
            try:  # valid for the type, or for every type the topic covers
                parse_search(params, target, rest, 1, 1, strict=True)
            except FhirError as err:
                raise _invalid(f"The filter '{text[:200]}' is not a valid search: {err}",
                               "Subscription.criteria") from None
        filters.setdefault(rtype, []).extend(rest)
    channel = body.get("channel") if isinstance(body.get("channel"), dict) else {}
    assert isinstance(channel, dict)
    kind = channel.get("type")
    if kind not in CHANNELS:
        raise _invalid(f"Channel type '{str(kind)[:40]}' is not supported (this server delivers "
                       f"{' and '.join(CHANNELS)})", "Subscription.channel.type")
    endpoint = str(channel.get("endpoint") or "") if kind == "rest-hook" else ""
    if kind == "rest-hook" and not endpoint:
        raise _invalid("A rest-hook channel needs an endpoint", "Subscription.channel.endpoint")
    content = [str(e.get("valueCode")) for e in _ext(channel.get("_payload"), PAYLOAD_EXT)]
    payload = content[0] if content else ("id-only" if channel.get("payload") else "empty")
    if payload not in PAYLOADS:
        raise _invalid(f"Payload content '{payload[:40]}' is not one of {', '.join(PAYLOADS)}",
                       "Subscription.channel.payload")
    if payload != "empty" and channel.get("payload") not in ("application/fhir+json", "application/json"):
        raise _invalid("channel.payload must be application/fhir+json", "Subscription.channel.payload")
    headers: list[tuple[str, str]] = []
    for line in channel.get("header") or []:
        if not isinstance(line, str) or not _HEADER.match(line):
            raise _invalid("A channel header must be 'Name: value' on one line", "Subscription.channel.header")
        name, _c, value = line.partition(":")
        if name.lower() in _RESERVED_HEADERS:
            raise _invalid(f"The header '{name}' is set by the server", "Subscription.channel.header")
        headers.append((name, value.strip()))
    beats = [e.get("valueUnsignedInt") for e in _ext(channel, HEARTBEAT_EXT)]
    heartbeat = int(beats[0]) if beats and isinstance(beats[0], int) else 0
    return Criteria(topic, filters, tuple(dict.fromkeys(patients)), payload, endpoint, tuple(headers), heartbeat,
                    str(kind))


def admit(body: dict[str, Any], principal: Principal, topics: Topics, params: ParamRegistry,
          settings: Settings) -> dict[str, Any]:
    """The Subscription body to store, or FhirError. Its endpoint is checked for this client."""
    crit = criteria_of(body, topics, params)
    own = _own_patients(principal)
    # a patient (or guardian) app subscribes to its own records only
    if own is not None and (not crit.patients or any(p not in own for p in crit.patients)):
        raise FhirError(403, "forbidden", "A patient-context subscription must filter by its own patient "
                                              f"(e.g. {PATIENT_FILTER}=Patient/{own[0] if own else 'id'})")
    try:
        if crit.channel == "rest-hook":  # a websocket's client connects to the server instead
            resolve(crit.endpoint, list(principal.client_settings.get("subscription_endpoints") or []),
                    settings.subscription_allow_http_loopback, settings.subscription_private_networks)
    except EndpointRefused as err:
        raise _invalid(f"Endpoint refused: {err}", "Subscription.channel.endpoint") from None
    stored = stamp_owner(body, owner_code(principal.client_id, principal.fhir_user, principal.patient))
    stored["status"] = "off" if body.get("status") == "off" else "requested"
    stored.pop("error", None)
    return stored


def _own_patients(principal: Principal) -> list[str] | None:
    """The patients a patient-context caller acts for; None for a caller not confined to any."""
    user = principal.fhir_user or ""
    if user.startswith("Patient/"):
        return [user.split("/", 1)[1], *principal.linked_patients]
    if user.startswith("RelatedPerson/"):
        return list(principal.linked_patients)
    if principal.patient:
        return [principal.patient]
    return None
