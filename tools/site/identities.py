"""Who logs in: the site's service identities, and the names no device may take.

Every other login is a device, named by its id (tools.control.acl gives each its topics).
"""

REPLICA, OPERATOR = "replica", "operator"
SERVICE_USERS = (REPLICA, OPERATOR)


def reserved_id(name: str) -> bool:
    """A name no device may have: a service identity, or a client id a service connects with
    (`replica-<worker>`, `operator-renewer`): a device of that name would take the service's
    session over on the broker."""
    return any(name == s or name.startswith(s + "-") for s in SERVICE_USERS)
