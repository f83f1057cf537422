"""tools.control.grants: an operator's MAC on a desired firmware (end to end: test_trust.py)."""

import pytest

from tools.control import grants

KEY = b"k" * 32
FW = {"url": "https://h/x", "version": "1.1.0", "sha256": "b" * 64, "size": 300}


def test_a_grant_binds_the_device_and_every_field_but_the_url():
    fw = grants.granted(KEY, "dev1", FW)
    assert grants.check(KEY, "dev1", dict(fw, url="https://h/y")) == int(fw["grant"].split(".")[0])
    for other in ({"version": "1.1.1"}, {"sha256": "c" * 64}, {"size": 301}, {"size": 300.0}, {"size": "300"},
                  {"auth": "token"}, {"allow_downgrade": True}):
        assert grants.issued(KEY, "dev1", dict(fw, **other)) is None, other
    assert grants.issued(KEY, "dev2", fw) is None
    assert grants.issued(b"x" * 32, "dev1", fw) is None


@pytest.mark.parametrize("grant", [None, 7, "", "1", "1.", "x." + "0" * 64, "²." + "0" * 64, "1.é",
                                   "1." + "0" * 63, "1." + "0" * 65, "1234567890123." + "0" * 64])
def test_malformed_grants_are_refused_not_raised(grant):
    with pytest.raises(grants.GrantError):
        grants.check(KEY, "dev1", dict(FW, grant=grant))
    assert grants.issued(KEY, "dev1", dict(FW, grant=grant)) is None


def test_integers_beyond_64_bits_are_granted_the_same_way_on_both_sides():
    fw = grants.granted(KEY, "dev1", dict(FW, size=1 << 70))
    assert grants.issued(KEY, "dev1", fw) is not None
