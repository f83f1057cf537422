"""Who logs in: the site's service identities, and the names no device may take.

Every other login is a device, named by its id (tools.control.acl gives each its topics).
"""

import hashlib
import hmac

REPLICA, OPERATOR = "replica", "operator"
SERVICE_USERS = (REPLICA, OPERATOR)


def reserved_id(name: str) -> bool:
    """A name no device may have: a service identity, or a client id a service connects with
    (`replica-<worker>-…`, `operator-renewer-…`): a device of that name would take the
    service's session over on the broker."""
    return any(name == s or name.startswith(s + "-") for s in SERVICE_USERS)


def service_client_id(user: str, password: str, role: str) -> str:
    """`<user>-<role>-<tag>`, the tag keyed by the identity's password: the same across restarts
    (the broker keeps the session of a replica worker that comes back) and unknown to whoever
    lacks the password. A known id is a target: mosquitto 2.0.11 (Debian 12's) takes a client
    out of its index of ids when a CONNECT without a username under that id is refused on the
    devices' listener (use_username_as_clientid); the next reload then leaves the client with
    freed ACLs, and the broker crashes when it next routes to it (upstream fixed in 2.0.13)."""
    tag = hmac.new(password.encode(), f"{user}/{role}".encode(), hashlib.sha256).hexdigest()[:16]
    return f"{user}-{role}-{tag}"


# People who sign in to the dashboard (`fleet-ota account add`), besides the operator identity.
ACCOUNT_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")
MIN_ACCOUNT_PASSWORD = 12


def check_account(name: str, password: str | None = None) -> None:
    """An account's name (1-64 letters, digits, `._-@`, not a service identity) and, when
    given, its password (at least MIN_ACCOUNT_PASSWORD characters); ValueError says which."""
    if not name or len(name) > 64 or not set(name) <= ACCOUNT_NAME_CHARS:
        raise ValueError(f"account name {name!r}: 1-64 letters, digits or ._-@")
    if name in SERVICE_USERS:
        raise ValueError(f"{name!r} is a service identity; sign in as it with its password from services.json")
    if password is not None and len(password) < MIN_ACCOUNT_PASSWORD:
        raise ValueError(f"a password of at least {MIN_ACCOUNT_PASSWORD} characters")
