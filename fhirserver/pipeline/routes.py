"""The route table: every interaction kind and operation the server answers, mapped once to its
handler. The resource-type registry (profiles/resource-types.json) says which types support which
of them; parse_interaction (interaction.py) names the key; the pipeline looks the handler up here."""

from __future__ import annotations

from .bundle import BundleHandler
from .crud import Capabilities, Create, Delete, Patch, Read, SmartConfiguration, Update
from .erase_op import Erase
from .erasure_request_op import ErasureRequestOp
from .export_ops import ExportFile, ExportKickoff, ExportStatus
from .handler import Handler
from .history import History
from .proof_op import Proof
from .searching import Everything, LastN, Search
from .subscription_ops import BindingToken, SubscriptionEvents, SubscriptionStatus
from .summary_op import Summary
from .terminology_ops import Expand, Lookup, ValidateCode
from .validate_op import Validate

ROUTES: dict[str, Handler] = {
    "capabilities": Capabilities(),
    "smart-configuration": SmartConfiguration(),
    "read": Read(),
    "vread": Read(),
    "create": Create(),
    "update": Update(),
    "patch": Patch(),
    "delete": Delete(),
    "history-instance": History(),
    "history-type": History(),
    "history-system": History(),  # GET [base]/_history
    "search-type": Search(),
    "bundle": BundleHandler(),  # batch / transaction at POST [base]
    "$everything": Everything(),
    "$lastn": LastN(),
    "$summary": Summary(),
    "$validate": Validate(),
    "$lookup": Lookup(),  # CodeSystem
    "$expand": Expand(),  # ValueSet
    "$validate-code": ValidateCode(),  # CodeSystem and ValueSet
    "$erase": Erase(),
    "$erasure-request": ErasureRequestOp(),
    "$proof": Proof(),
    "$status": SubscriptionStatus(),  # Subscription
    "$events": SubscriptionEvents(),  # Subscription
    "$get-ws-binding-token": BindingToken(),  # Subscription
    "$export": ExportKickoff(),
    "$export-poll-status": ExportStatus(),
    "$export-file": ExportFile(),
}


def handler_for(kind: str, operation: str | None) -> Handler:
    return ROUTES[f"${operation}" if operation else kind]
