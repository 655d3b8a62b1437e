"""The relational schema: every table of the server, in one module (and one MetaData) so that the
migrations, the tests and a reader see the whole database in one place -- which is why it is longer
than the 400 lines other modules keep to. Only ciphertext, keyed hashes, ids, codes, dates and
quantities live here.

Times are integer microseconds since the Unix epoch (UTC): exact, sortable and identical on SQLite
and PostgreSQL.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

metadata = MetaData()

# Envelope keys: one data key per patient compartment (crypto-shredding unit) plus a few
# system keys (shared, audit, blind-index). `wrapped` is AES-GCM(master key, data key).
data_key = Table(
    "data_key",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("scope", String(200), nullable=False, unique=True),
    Column("master_kid", String(64), nullable=False),
    Column("wrapped", LargeBinary, nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("shredded", Boolean, nullable=False, default=False),
)

# Current state of each logical resource.
resource = Table(
    "resource",
    metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("type", String(64), nullable=False),
    Column("id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_updated_us", BigInteger, nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    UniqueConstraint("type", "id", name="uq_resource_type_id"),
    Index("ix_resource_type_lu", "type", "last_updated_us"),
)

# Every version, encrypted. AAD binds type/id/version so a ciphertext cannot be moved.
resource_version = Table(
    "resource_version",
    metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("resource_pk", Integer, ForeignKey("resource.pk"), nullable=False),
    Column("type", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_updated_us", BigInteger, nullable=False),
    Column("method", String(8), nullable=False),  # POST / PUT / DELETE
    Column("deleted", Boolean, nullable=False, default=False),
    Column("key_id", Integer, ForeignKey("data_key.id"), nullable=True),
    Column("body", LargeBinary, nullable=True),  # nonce || ciphertext; NULL for deletes
    UniqueConstraint("resource_pk", "version", name="uq_version"),
    Index("ix_version_type_pk", "type", "pk"),
    Index("ix_version_lu", "last_updated_us"),
)

# Patient compartment membership of the current version (from the CompartmentDefinition).
compartment = Table(
    "compartment",
    metadata,
    Column("resource_pk", Integer, ForeignKey("resource.pk"), nullable=False),
    Column("patient_id", String(64), nullable=False),
    Index("ix_compartment_patient", "patient_id", "resource_pk"),
    Index("ix_compartment_resource", "resource_pk", "patient_id"),  # covering: consent probes per row
)

# ---- search indexes (current versions only) ----
# Values of identifying parameters (names, identifiers, telecom, addresses, birth dates) are
# stored only as keyed HMACs ("blind indexes"); clinical codes, dates and quantities in clear.
idx_token = Table(
    "idx_token",
    metadata,
    Column("resource_pk", Integer, ForeignKey("resource.pk"), nullable=False),
    Column("param", String(64), nullable=False),
    Column("system", String(255), nullable=True),
    Column("code", String(255), nullable=True),
    Index("ix_token_code", "param", "code", "system", "resource_pk"),
    Index("ix_token_resource", "resource_pk"),
)

idx_string = Table(
    "idx_string",
    metadata,
    Column("resource_pk", Integer, ForeignKey("resource.pk"), nullable=False),
    Column("param", String(64), nullable=False),
    # kind: 'e' exact (case-sensitive), 'n' normalized full value, 'p' normalized prefix
    Column("kind", String(1), nullable=False),
    Column("value", String(255), nullable=False),
    Index("ix_string_value", "param", "kind", "value", "resource_pk"),
    Index("ix_string_resource", "resource_pk"),
)

idx_date = Table(
    "idx_date",
    metadata,
    Column("resource_pk", Integer, ForeignKey("resource.pk"), nullable=False),
    Column("param", String(64), nullable=False),
    Column("low_us", BigInteger, nullable=False),
    Column("high_us", BigInteger, nullable=False),
    Index("ix_date_low", "param", "low_us", "resource_pk"),
    Index("ix_date_high", "param", "high_us", "resource_pk"),
    Index("ix_date_resource", "resource_pk"),
)

idx_reference = Table(
    "idx_reference",
    metadata,
    Column("resource_pk", Integer, ForeignKey("resource.pk"), nullable=False),
    Column("param", String(64), nullable=False),
    Column("target_type", String(64), nullable=True),
    Column("target_id", String(255), nullable=True),
    Column("url", String(1024), nullable=True),  # absolute/canonical references
    Index("ix_ref_target", "param", "target_id", "target_type", "resource_pk"),
    Index("ix_ref_resource", "resource_pk"),
)

idx_quantity = Table(
    "idx_quantity",
    metadata,
    Column("resource_pk", Integer, ForeignKey("resource.pk"), nullable=False),
    Column("param", String(64), nullable=False),
    Column("value", Float, nullable=False),
    Column("system", String(255), nullable=True),
    Column("code", String(255), nullable=True),
    Index("ix_qty_value", "param", "code", "value", "resource_pk"),
    Index("ix_qty_resource", "resource_pk"),
)

idx_number = Table(
    "idx_number",
    metadata,
    Column("resource_pk", Integer, ForeignKey("resource.pk"), nullable=False),
    Column("param", String(64), nullable=False),
    Column("value", Float, nullable=False),
    Index("ix_num_value", "param", "value", "resource_pk"),
    Index("ix_num_resource", "resource_pk"),
)

idx_uri = Table(
    "idx_uri",
    metadata,
    Column("resource_pk", Integer, ForeignKey("resource.pk"), nullable=False),
    Column("param", String(64), nullable=False),
    Column("value", String(1024), nullable=False),
    Index("ix_uri_value", "param", "value", "resource_pk"),
    Index("ix_uri_resource", "resource_pk"),
)

# Composite parameters (code-value-quantity, ...): the first component is a token, the second a
# token (system2/code2), quantity (num, system2/code2), date (low/high) or string (code2 = digest).
idx_composite = Table(
    "idx_composite",
    metadata,
    Column("resource_pk", Integer, ForeignKey("resource.pk"), nullable=False),
    Column("param", String(64), nullable=False),
    Column("system", String(255), nullable=True),
    Column("code", String(255), nullable=True),
    Column("system2", String(255), nullable=True),
    Column("code2", String(255), nullable=True),
    Column("num", Float, nullable=True),
    Column("low_us", BigInteger, nullable=True),
    Column("high_us", BigInteger, nullable=True),
    Index("ix_composite_code", "param", "code", "resource_pk"),
    Index("ix_composite_resource", "resource_pk"),
)

INDEX_TABLES = {
    "token": idx_token,
    "string": idx_string,
    "date": idx_date,
    "reference": idx_reference,
    "quantity": idx_quantity,
    "number": idx_number,
    "uri": idx_uri,
    "composite": idx_composite,
}

# ---- OAuth ----
client = Table(
    "client",
    metadata,
    Column("client_id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("kind", String(32), nullable=False),  # backend | public | confidential
    Column("jwks", Text, nullable=True),
    Column("jwks_uri", String(1024), nullable=True),
    Column("secret_hash", String(255), nullable=True),
    Column("redirect_uris", Text, nullable=True),
    Column("scopes", Text, nullable=False),
    Column("organization", String(255), nullable=True),
    Column("settings", Text, nullable=True),  # JSON: purposes, flags added by later features
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created_us", BigInteger, nullable=False),
)

# Opaque bearer tokens: only SHA-256 of the token is stored.
access_token = Table(
    "access_token",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("client_id", String(64), ForeignKey("client.client_id"), nullable=False),
    Column("scope", Text, nullable=False),
    Column("issued_us", BigInteger, nullable=False),
    Column("expires_us", BigInteger, nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("context", Text, nullable=True),  # JSON: user, patient, fhirUser, purpose ...
    Column("family_id", String(64), nullable=True),  # SMART grant family (see grant_family)
    Index("ix_token_client", "client_id"),
    Index("ix_token_family", "family_id"),
)

# Client-assertion JWT ids seen (replay protection), kept until the assertion expires.
assertion_jti = Table(
    "assertion_jti",
    metadata,
    Column("client_id", String(64), primary_key=True),
    Column("jti", String(255), primary_key=True),
    Column("expires_us", BigInteger, nullable=False),
)

# ---- the audit hash chain before migration 0009 (kept only to be read and emptied once by
# audit/legacy.py): each row linked one AuditEvent stored as a resource row,
# hash = HMAC(chain key, prev_hash | seq | event_id | recorded_us | content_hash).
audit_chain = Table(
    "audit_chain",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("event_id", String(64), nullable=False, unique=True),
    Column("recorded_us", BigInteger, nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    # "<sha256 of the redacted JSON>:<HMAC(chain key, ...)>" once an erasure pseudonymized the
    # event's patient references; the link above still commits to the original content
    Column("redaction", String(160), nullable=True),
)

# Single-row table: the old chain's head (it serialized every request; see access_record).
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)

# ---- access records (migration 0009): the audit log since the redesign (docs/audit.md) ----
# One compact row per access, written in the access's own transaction with no lock shared by
# other requests. `detail` is AES-GCM(audit data key, {"record": <leaf content>, "query": ...})
# with the record id as associated data; `leaf_hash` = SHA-256(0x00 || leaf content) (RFC 9162).
# `seq` is assigned afterwards by the sequencer, which builds the Merkle tree over the leaves in
# seq order; checkpoints sign its root. On PostgreSQL the table is partitioned by recorded_us.
access_record = Table(
    "access_record",
    metadata,
    Column("pk", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False),  # the AuditEvent id
    Column("recorded_us", BigInteger, nullable=False),
    Column("seq", BigInteger, nullable=True),  # position in the Merkle tree; NULL until sequenced
    Column("terms", String(64), nullable=False),  # audit_term set: its token/uri/string index rows
    Column("key_id", Integer, nullable=False),
    Column("detail", LargeBinary, nullable=False),
    Column("content_hash", String(64), nullable=False),  # SHA-256 of the record as written
    # "<sha256 of the redacted leaf content>:<HMAC(chain key, ...)>" after an erasure
    Column("redaction", String(160), nullable=True),
    Index("ix_access_record_id", "id"),
    Index("ix_access_record_time", "recorded_us", "pk"),
    Index("ix_access_record_terms", "terms", "pk"),
    Index("ix_access_record_seq", "seq"),
    Index("ix_access_record_unsequenced", "pk", sqlite_where=text("seq IS NULL"),
          postgresql_where=text("seq IS NULL")),
)

# The references an access record's AuditEvent would index (agent, entity, patient), one row
# each, like idx_reference; `patient` rows are its Patient compartment.
access_subject = Table(
    "access_subject",
    metadata,
    Column("record_pk", BigInteger().with_variant(Integer, "sqlite"), nullable=False),
    Column("recorded_us", BigInteger, nullable=False),  # partition key on PostgreSQL
    Column("param", String(64), nullable=False),
    Column("target_type", String(64), nullable=True),
    Column("target_id", String(255), nullable=True),
    Column("url", String(1024), nullable=True),
    Index("ix_subject_target", "param", "target_id", "target_type", "recorded_us", "record_pk"),
    Index("ix_subject_record", "record_pk"),
)

# Interned sets of index rows shared by many records (action, outcome, type, subtype, profile,
# site, entity-type/-role codes, the keyed digests of network addresses): a set's id is the
# SHA-256 of its rows, so a record stores one id instead of ~17 rows.
audit_term = Table(
    "audit_term",
    metadata,
    Column("set_id", String(64), primary_key=True),
    Column("n", Integer, primary_key=True, autoincrement=False),
    Column("tbl", String(16), nullable=False),  # token | uri | string
    Column("param", String(64), nullable=False),
    Column("system", String(255), nullable=True),
    Column("code", String(255), nullable=True),
    Column("kind", String(1), nullable=True),
    Column("value", String(1024), nullable=True),
    Index("ix_audit_term_code", "tbl", "param", "code", "set_id"),
    Index("ix_audit_term_value", "tbl", "param", "value", "set_id"),
)

# Hashes of the perfect subtrees (level >= 1) of the Merkle tree: node (level, idx) covers leaves
# [idx * 2^level, (idx + 1) * 2^level). Inclusion proofs and roots of any size come from these
# and the leaves in O(log n) lookups.
audit_node = Table(
    "audit_node",
    metadata,
    Column("level", Integer, primary_key=True, autoincrement=False),
    Column("idx", BigInteger, primary_key=True, autoincrement=False),
    Column("hash", String(64), nullable=False),
)

# Signed checkpoints (tree size, root, time); also appended to a file outside the database and
# written to the log. The signing key (Ed25519) is never in the database.
audit_checkpoint = Table(
    "audit_checkpoint",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tree_size", BigInteger, nullable=False),
    Column("root", String(64), nullable=False),
    Column("time_us", BigInteger, nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("signature", String(200), nullable=False),
    Index("ix_audit_checkpoint_size", "tree_size"),
)

# ---- privacy operations (migration 0010) ----
# Per (agent, hour, patient, action, outcome): how many access records, first and last time. Kept
# by the sequencer for every sequenced record below the `rollup_seq` watermark (audit/rollup.py);
# breach reports and snooping detection read it instead of the records.
access_hourly = Table(
    "access_hourly",
    metadata,
    Column("agent_type", String(64), primary_key=True),
    Column("agent_id", String(255), primary_key=True),
    Column("hour_us", BigInteger, primary_key=True, autoincrement=False),
    Column("patient_id", String(255), primary_key=True),
    Column("action", String(1), primary_key=True),
    Column("outcome", String(2), primary_key=True),
    Column("n", BigInteger, nullable=False),
    Column("first_us", BigInteger, nullable=False),
    Column("last_us", BigInteger, nullable=False),
    Index("ix_access_hourly_hour", "hour_us"),
    Index("ix_access_hourly_patient", "patient_id", "hour_us"),
)

# Per agent and hour: distinct patients and accesses (successful), computed by snooping detection
# for each day it examines; the baselines it compares a day with (oversight/snooping.py).
access_agent_hour = Table(
    "access_agent_hour",
    metadata,
    Column("agent_type", String(64), primary_key=True),
    Column("agent_id", String(255), primary_key=True),
    Column("hour_us", BigInteger, primary_key=True, autoincrement=False),
    Column("patients", Integer, nullable=False),
    Column("accesses", BigInteger, nullable=False),
    Index("ix_access_agent_hour_hour", "hour_us"),
)

# Named values of the audit log: `rollup_seq` (records below it are in access_hourly) and
# `horizon` (records below it were dropped by retention; `mac` authorizes it with the chain key).
audit_state = Table(
    "audit_state",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", BigInteger, nullable=False),
    Column("detail", Text, nullable=True),
    Column("mac", String(64), nullable=True),
)

# The graded penalty in force for a client (`client`, client_id) or a user (`user`, username).
account_penalty = Table(
    "account_penalty",
    metadata,
    Column("subject_kind", String(8), primary_key=True),
    Column("subject_id", String(255), primary_key=True),
    Column("level", String(16), nullable=False),  # warn | limit | suspend
    Column("since_us", BigInteger, nullable=False),
    Column("reason", Text, nullable=True),
)

# Scheduled privacy jobs: one row per (job, period) claimed by the process that runs it.
job_run = Table(
    "job_run",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("period", String(64), primary_key=True),
    Column("started_us", BigInteger, nullable=False),
    Column("finished_us", BigInteger, nullable=True),
    Column("progress", Text, nullable=True),
)

# Erasure requests (migration 0011): a patient or guardian asks (Patient/[id]/$erasure-request),
# an administrator approves -- running the erasure -- or refuses (`fhirserver erasure ...`). The
# free-text reason is sealed under the `erasure-requests` data key; an erasure renames the patient
# here to their pseudonym, as everywhere else.
erasure_request = Table(
    "erasure_request",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("patient_id", String(255), nullable=False),
    Column("requested_by", String(255), nullable=False),  # the fhirUser who asked
    Column("key_id", Integer, nullable=False),
    Column("reason", LargeBinary, nullable=True),
    Column("status", String(16), nullable=False),  # pending | approved | refused
    Column("created_us", BigInteger, nullable=False),
    Column("decided_us", BigInteger, nullable=True),
    Column("decided_by", String(255), nullable=True),
    Column("note", Text, nullable=True),  # the administrator's answer, shown to the patient
    Index("ix_erasure_request_patient", "patient_id", "created_us"),
    Index("ix_erasure_request_status", "status", "created_us"),
)

# ---- users (SMART App Launch) ----
# People who sign in at the authorization endpoint. The password is stored only as an Argon2id
# hash; the TOTP secret only sealed (AES-256-GCM) under the `users` data key with the username as
# associated data, so a copied database reveals neither and a secret cannot be moved to another
# account. Times are microseconds since the epoch like everywhere else.
app_user = Table(
    "app_user",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("username", String(128), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False),
    Column("fhir_user", String(200), nullable=False),  # Practitioner/1 | Patient/1 | RelatedPerson/1
    Column("totp_key_id", Integer, ForeignKey("data_key.id"), nullable=True),
    Column("totp_secret", LargeBinary, nullable=True),  # nonce || ciphertext; NULL = no second factor
    Column("totp_last_step", BigInteger, nullable=True),  # last accepted 30 s step (replay guard)
    # an enrolment the server issued (POST /auth/account/totp), kept until confirmed or expired
    Column("totp_pending_key_id", Integer, nullable=True),
    Column("totp_pending_secret", LargeBinary, nullable=True),
    Column("totp_pending_until_us", BigInteger, nullable=True),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("failed_logins", Integer, nullable=False, default=0),  # consecutive failures
    Column("locked_until_us", BigInteger, nullable=True),
    Column("last_login_us", BigInteger, nullable=True),
    Column("created_us", BigInteger, nullable=False),
)

# Patients a user may act for besides themselves: a guardian for a minor, or a proxy.
user_patient_link = Table(
    "user_patient_link",
    metadata,
    Column("user_id", Integer, ForeignKey("app_user.id"), primary_key=True),
    Column("patient_id", String(64), primary_key=True),
    Column("relationship", String(16), nullable=False),  # guardian | proxy
    Column("created_us", BigInteger, nullable=False),
    Index("ix_user_link_patient", "patient_id"),
)

# ---- SMART App Launch grants ----
# Every secret handed to a browser or app (authorization code, launch id, refresh token) is stored
# only as its SHA-256. A "family" ties together everything minted from one user approval: the
# code, its access tokens and the chain of rotated refresh tokens, so reuse of a spent code or a
# rotated refresh token revokes the whole family at once.
authorization_code = Table(
    "authorization_code",
    metadata,
    Column("code_hash", String(64), primary_key=True),
    Column("client_id", String(64), ForeignKey("client.client_id"), nullable=False),
    Column("family_id", String(64), nullable=False),
    Column("redirect_uri", String(1024), nullable=False),
    Column("scope", Text, nullable=False),
    Column("code_challenge", String(128), nullable=False),
    Column("nonce", String(255), nullable=True),
    Column("context", Text, nullable=False),  # JSON: user, fhirUser, patient, encounter, auth_time
    Column("expires_us", BigInteger, nullable=False),
    Column("used", Boolean, nullable=False, default=False),
)

refresh_token = Table(
    "refresh_token",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("client_id", String(64), ForeignKey("client.client_id"), nullable=False),
    Column("family_id", String(64), nullable=False),
    Column("scope", Text, nullable=False),
    Column("context", Text, nullable=False),
    Column("issued_us", BigInteger, nullable=False),
    Column("expires_us", BigInteger, nullable=False),
    Column("rotated", Boolean, nullable=False, default=False),  # spent: a newer one replaced it
    Column("revoked", Boolean, nullable=False, default=False),
    Index("ix_refresh_family", "family_id"),
)

# Single-use EHR launch contexts (`launch` parameter of the authorize request).
launch_context = Table(
    "launch_context",
    metadata,
    Column("launch_hash", String(64), primary_key=True),
    Column("client_id", String(64), ForeignKey("client.client_id"), nullable=False),
    Column("context", Text, nullable=False),  # JSON: patient, encounter, user
    Column("expires_us", BigInteger, nullable=False),
    Column("used", Boolean, nullable=False, default=False),
)

# Grant family of an access token (NULL for client_credentials tokens).
grant_family = Table(
    "grant_family",
    metadata,
    Column("family_id", String(64), primary_key=True),
    Column("client_id", String(64), ForeignKey("client.client_id"), nullable=False),
    Column("user_id", Integer, ForeignKey("app_user.id"), nullable=True),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("created_us", BigInteger, nullable=False),
)

# ---- consent engine (issue 6) ----
# Patients' privacy Consents, materialized at Consent write time (same transaction) into rules
# the search compiler joins against the index tables. One row per provision (nested provisions
# point at their parent); each criterion value is a row of `consent_criterion`. Replaced whenever
# the Consent is written or deleted, so a withdrawal is seen by the very next request. What they
# reveal (documented in docs/consent.md): which patients hold consents and their structure (permit/
# deny, purposes, resource types, codes, labels, periods); actor references only as keyed HMACs.
consent_rule = Table(
    "consent_rule",
    metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("consent_pk", Integer, ForeignKey("resource.pk"), nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("parent_pk", Integer, nullable=True),  # the enclosing provision's rule (nested provisions)
    Column("effect", String(8), nullable=False),  # permit | deny
    Column("start_us", BigInteger, nullable=False),  # provision.period (intersected with the parents')
    Column("end_us", BigInteger, nullable=False),
    Column("explicit", Boolean, nullable=False, default=False),  # names a code or securityLabel
    Column("n_groups", Integer, nullable=False, default=0),  # criterion groups that must all match
    Index("ix_consent_rule_patient", "patient_id", "effect"),
    Index("ix_consent_rule_consent", "consent_pk"),
    Index("ix_consent_rule_parent", "parent_pk"),
)

# A rule matches a resource when every group (grp) of its criteria has one matching row; groups
# are (nesting level, kind), so a nested provision carries its parents' criteria too.
consent_criterion = Table(
    "consent_criterion",
    metadata,
    Column("rule_pk", Integer, ForeignKey("consent_rule.pk"), nullable=False),
    Column("grp", Integer, nullable=False),
    Column("kind", String(8), nullable=False),  # actor purpose class code label data period
    Column("system", String(255), nullable=True),
    Column("value", String(1024), nullable=True),  # actor: keyed HMAC of the reference
    Column("low_us", BigInteger, nullable=True),  # dataPeriod
    Column("high_us", BigInteger, nullable=True),
    Index("ix_consent_criterion_rule", "rule_pk", "grp"),
)

# Alerts for the privacy office: break-the-glass use, consent-exempt access, denial bursts and
# automatic suspensions. Also listed by `fhirserver alerts list` and GET /api/admin/alerts.
consent_alert = Table(
    "consent_alert",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_us", BigInteger, nullable=False),
    Column("kind", String(32), nullable=False),  # break-glass | consent-exempt | denial-burst | client-suspended
    Column("client_id", String(64), nullable=True),
    Column("request_id", String(64), nullable=True),
    Column("detail", Text, nullable=True),  # JSON
    Index("ix_consent_alert_created", "created_us"),
    Index("ix_consent_alert_client", "client_id", "kind", "created_us"),
)

# Denied requests per client (for denial-burst detection); rows older than the window are pruned.
access_denial = Table(
    "access_denial",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("client_id", String(64), nullable=False),
    Column("at_us", BigInteger, nullable=False),
    # whom the denial counts against: user:<fhirUser> for a user-level token, client:<id> otherwise
    Column("account", String(255), nullable=True),
    Index("ix_access_denial_client", "client_id", "at_us"),
    Index("ix_access_denial_account", "account", "at_us"),
)


# ---- bulk export jobs (migration 0005). A job keeps a snapshot of who asked (client, scopes,
# launch context, purpose) so the worker applies the same authorization and consent rules when it
# runs, possibly after a restart. Output files are rows of `export_file`: NDJSON sealed with
# AES-256-GCM under the job's own data key (scope `export:<job id>`, associated data
# `export/<job>/<file>`); deleting the job deletes the rows and the key.
export_job = Table(
    "export_job",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("client_id", String(64), ForeignKey("client.client_id"), nullable=False),
    Column("status", String(16), nullable=False),  # queued running complete failed cancelled
    Column("request", Text, nullable=False),  # the kick-off URL (echoed in the manifest)
    Column("spec", Text, nullable=False),  # JSON: level, patient, types, since, type filters, deidentify
    Column("principal", Text, nullable=False),  # JSON snapshot of the caller (scopes, context, purpose)
    Column("progress", String(200), nullable=True),
    Column("error", Text, nullable=True),
    Column("transaction_us", BigInteger, nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("heartbeat_us", BigInteger, nullable=True),
    Column("completed_us", BigInteger, nullable=True),
    Column("expires_us", BigInteger, nullable=True),
)

export_file = Table(
    "export_file",
    metadata,
    Column("job_id", String(64), ForeignKey("export_job.id"), primary_key=True),
    Column("name", String(128), primary_key=True),
    Column("type", String(64), nullable=False),
    Column("count", Integer, nullable=False),
    Column("key_id", Integer, ForeignKey("data_key.id"), nullable=False),
    Column("body", LargeBinary, nullable=False),
)


# ---- import checkpoints of `fhirserver load` (migration 0006)
import_file = Table(
    "import_file",
    metadata,
    Column("key", String(64), primary_key=True),  # SHA-256 of the absolute path
    Column("path", Text, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("position", BigInteger, nullable=False),  # items (lines / entries) consumed and committed
    Column("counts", Text, nullable=False),  # JSON: loaded/updated/skipped per type, invalid
    Column("done", Boolean, nullable=False),
    Column("started_us", BigInteger, nullable=False),
    Column("updated_us", BigInteger, nullable=False),
    Column("completed_us", BigInteger, nullable=True),
)

import_patient = Table(
    "import_patient",
    metadata,
    Column("file_key", String(64), ForeignKey("import_file.key"), primary_key=True),
    Column("patient_id", String(64), primary_key=True),
)


# ---- subscriptions (migration 0014; docs/subscriptions.md). `change_event` is the transactional
# outbox: one row per create/update, written in the change's own transaction while any
# subscription exists, and deleted once the dispatcher has matched it. `subscription_state` is
# the dispatcher's view of a Subscription (its owner's snapshot, the live status, the event
# counter and how far delivery got); `subscription_event` the numbered events of one subscription,
# kept for `$events` replay until they expire.
change_event = Table(
    "change_event",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("resource_pk", Integer, nullable=False),
    Column("type", String(64), nullable=False),
    Column("id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("method", String(8), nullable=False),  # POST / PUT
    Column("recorded_us", BigInteger, nullable=False),
    # never reuse a number (SQLite would hand out max+1 again once the table is empty): an instance
    # taking a change by its number must never take a newer change that reused it
    sqlite_autoincrement=True,
)

subscription_state = Table(
    "subscription_state",
    metadata,
    Column("resource_pk", Integer, ForeignKey("resource.pk"), primary_key=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("client_id", String(64), nullable=False),
    Column("owner", String(255), nullable=False),
    Column("principal", Text, nullable=False),  # JSON snapshot of the owner (as an export job's)
    Column("topic", String(1024), nullable=False),
    Column("channel", String(16), nullable=False, default="rest-hook"),  # rest-hook | websocket
    Column("status", String(16), nullable=False),  # requested active error off
    Column("paused", Boolean, nullable=False, default=False),
    Column("events_since_start", BigInteger, nullable=False, default=0),
    Column("delivered_through", BigInteger, nullable=False, default=0),  # last acknowledged event number
    Column("handshake_done", Boolean, nullable=False, default=False),
    Column("withheld", BigInteger, nullable=False, default=0),  # events the owner may no longer see
    Column("failing_since_us", BigInteger, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_us", BigInteger, nullable=False, default=0),
    Column("last_sent_us", BigInteger, nullable=True),
    Column("heartbeat_us", BigInteger, nullable=False, default=0),  # backport-heartbeat-period (0: none)
    Column("lease_owner", String(64), nullable=True),
    Column("lease_until_us", BigInteger, nullable=True),
    Column("created_us", BigInteger, nullable=False),
    Index("ix_subscription_due", "status", "next_attempt_us"),
)

# one-time tokens of $get-ws-binding-token (only their SHA-256 is kept), valid for a minute
subscription_ws_token = Table(
    "subscription_ws_token",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("subscription_pk", Integer, ForeignKey("subscription_state.resource_pk"), nullable=False),
    Column("expires_us", BigInteger, nullable=False),
)

subscription_event = Table(
    "subscription_event",
    metadata,
    Column("subscription_pk", Integer, ForeignKey("subscription_state.resource_pk"), primary_key=True),
    Column("number", BigInteger, primary_key=True),
    Column("resource_pk", Integer, nullable=False),
    Column("type", String(64), nullable=False),
    Column("id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("method", String(8), nullable=False),
    Column("recorded_us", BigInteger, nullable=False),
)

# ---- installed IG packages (migration 0015, `fhirserver ig install`): the package file itself, so
# that every instance sharing the database validates against the same profiles and value sets.
ig_package = Table(
    "ig_package",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("version", String(64), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("installed_us", BigInteger, nullable=False),
    Column("content", LargeBinary, nullable=False),  # the .tgz as given
)
