"""tools.control.acl: the one role table both brokers' ACLs come from (end to end: test_trust.py)."""

import pytest

from tools.control import acl
from tools.site.identities import reserved_id


@pytest.mark.parametrize("user,topic,publish,read", [
    ("dev1", "state/dev1/update", True, False),
    ("dev1", "state/dev1/get", True, False),
    ("dev1", "state/dev1/credentials/get", True, False),
    ("dev1", "state/dev1/update/delta", False, True),
    ("dev1", "state/dev1/credentials/get/accepted", False, True),
    ("dev1", "state/dev1/update/documents", False, False),
    ("dev1", "state/dev2/update", False, False),
    ("dev1", "state/dev2/update/delta", False, False),
    ("dev1", "other/dev1/update", False, False),
    ("replica", "state/dev1/update/accepted", True, False),
    ("replica", "state/dev1/update/documents", True, False),
    ("replica", "state/dev1/update", False, True),
    ("replica", "state/dev1/credentials/get/accepted", False, False),
    ("operator", "state/dev1/update", True, True),
    ("operator", "state/dev1/update/delta", False, True),
    ("operator", "state/dev1/credentials/get/rejected", True, True),
])
def test_roles(user, topic, publish, read):
    assert (acl.may_publish(user, topic), acl.may_read(user, topic)) == (publish, read)


@pytest.mark.parametrize("user,topic_filter,granted", [
    ("dev1", "state/dev1/#", True),
    ("dev1", "state/dev1/credentials/get/+", True),
    ("dev1", "state/dev1/update/delta", True),
    ("dev1", "state/dev1/update", False),  # a request: not for devices to read
    ("dev1", "state/dev1/+", False),  # only requests are one level deep
    ("dev1", "state/+/update/delta", False),
    ("dev1", "state/#", False),
    ("dev1", "#", False),
    ("replica", "state/+/update", True),
    ("replica", "state/+/update/delta", False),
    ("operator", "state/#", True),
    ("operator", "#", False),
])
def test_subscriptions(user, topic_filter, granted):
    assert acl.may_subscribe(user, topic_filter) is granted


def test_reserved_ids():
    assert [n for n in ("operator", "replica-w0", "operator-renewer", "replicas", "op", "dev-replica")
            if reserved_id(n)] == ["operator", "replica-w0", "operator-renewer"]
