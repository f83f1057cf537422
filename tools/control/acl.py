"""Who may publish and read which contract topics: the one table both brokers' ACLs come from.

A login is a role: the service identities `replica` and `operator` are themselves, every other
login is a device, named by its id. Each role may publish some suffixes of `state/<id>/...`
and read some; a device only under its own id.

- A device publishes its requests (`update`, `get`, `credentials/get`) and reads only the
  answers meant for it. It cannot forge an answer to itself or to the services, and it cannot
  read what operators send the replica (their requests) or the documents history.
- The replica reads requests and is the only identity that answers them.
- Operators (applications, and the renewer, which runs as `operator`) make requests for any
  device, answer credential requests, and read everything.

Which desired firmware a device may act on is not the broker's to decide (a device writes
`state/<id>/update` too): that is tools.control.grants.
"""

from __future__ import annotations

from firmware import contract
from tools.site.identities import OPERATOR, REPLICA, SERVICE_USERS

DEVICE = "device"

_ANSWERS = (contract.UPDATE_ACCEPTED, contract.UPDATE_REJECTED, contract.UPDATE_DELTA,
            contract.GET_ACCEPTED, contract.GET_REJECTED)
_CREDENTIAL_ANSWERS = (contract.CREDENTIALS_ACCEPTED, contract.CREDENTIALS_REJECTED)
_ALL = contract.SUFFIXES

PUBLISH = {
    DEVICE: (contract.UPDATE, contract.GET, contract.CREDENTIALS),
    REPLICA: _ANSWERS + (contract.UPDATE_DOCUMENTS,),
    OPERATOR: (contract.UPDATE, contract.GET) + _CREDENTIAL_ANSWERS,
}
READ = {
    DEVICE: _ANSWERS + _CREDENTIAL_ANSWERS,
    REPLICA: (contract.UPDATE, contract.GET),
    OPERATOR: _ALL,
}


def role(user: str) -> str:
    return user if user in SERVICE_USERS else DEVICE


def may_publish(user: str, topic: str) -> bool:
    return _allowed(user, topic, PUBLISH)


def may_read(user: str, topic: str) -> bool:
    return _allowed(user, topic, READ)


def _allowed(user: str, topic: str, table: dict) -> bool:
    parsed = contract.parse_topic(topic)
    if parsed is None:
        return False
    device, suffix = parsed
    r = role(user)
    return (r != DEVICE or device == user) and suffix in table[r]


def may_subscribe(user: str, topic_filter: str) -> bool:
    """A filter inside what the role may see (a device: only `state/<own id>/...`, no wildcard
    in those two levels) that can match at least one topic it may read. Delivery is checked
    again per message (may_read), so `state/<id>/#` is granted and carries only answers."""
    levels = topic_filter.split("/")
    r = role(user)
    if len(levels) < 2 or levels[0] != contract.ROOT:
        return False
    if r == DEVICE and levels[1] != user:
        return False
    own = user if r == DEVICE else "+"
    return any(_intersect(levels, [contract.ROOT, own] + s.split("/")) for s in READ[r])


def _intersect(a: list[str], b: list[str]) -> bool:
    """Whether some topic matches both filters (level lists; `+` one level, `#` the rest)."""
    for x, y in zip(a, b):
        if x == "#" or y == "#":
            return True
        if x != y and "+" not in (x, y):
            return False
    if len(a) == len(b):
        return True
    longer = a if len(a) > len(b) else b
    return longer[min(len(a), len(b))] == "#"  # `a/#` also matches `a`


def mosquitto_acls() -> tuple[str, str]:
    """(devices' listener ACL, services' listener ACL) in mosquitto's acl_file format."""
    root = contract.ROOT
    devices = "".join(f"pattern write {root}/%u/{s}\n" for s in PUBLISH[DEVICE]) + \
        "".join(f"pattern read {root}/%u/{s}\n" for s in READ[DEVICE])
    services = ""
    for user in SERVICE_USERS:
        services += f"user {user}\n"
        services += "".join(f"topic write {root}/+/{s}\n" for s in PUBLISH[user])
        services += "".join(f"topic read {root}/+/{s}\n" for s in READ[user]) + "\n"
    return devices, services
