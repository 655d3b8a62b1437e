"""User accounts for SMART App Launch: registry, Argon2id passwords, TOTP, lockout, audited logins.

May import: services and everything below it.
"""

from .login import LoginPolicy, LoginResult, authenticate_user, login_audit_record, verify_login
from .passwords import WeakPasswordError, check_strength
from .registry import (
    RELATIONSHIPS,
    PatientLink,
    UserError,
    UserRecord,
    create_user,
    get_user,
    link_patient,
    list_users,
    patient_links,
    reset_mfa,
    set_disabled,
    unlink_patient,
)
from .totp import provisioning_uri

__all__ = [
    "RELATIONSHIPS", "LoginPolicy", "LoginResult", "PatientLink", "UserError", "UserRecord", "WeakPasswordError",
    "authenticate_user", "check_strength", "create_user", "get_user", "link_patient", "list_users",
    "login_audit_record", "patient_links", "provisioning_uri", "reset_mfa", "set_disabled", "unlink_patient",
    "verify_login",
]
