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
