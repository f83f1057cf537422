"""ota.decide: what a shadow document's desired firmware asks of a device, a pure function
(the agent carries it out; end to end in test_e2e.py and test_resume.py)."""

import pytest

from firmware import contract, ota, state

RUNNING = {"version": "1.0.0", "sha256": "a" * 64, "size": 100, "url": None}


def fw(version="1.1.0", sha="b", **kw):
    return dict({"url": "https://h/x", "version": version, "sha256": sha * 64, "size": 100}, **kw)


def doc(desired):
    return contract.firmware_update(contract.DESIRED, desired)


def st(**kw):
    s = state.fresh()
    s.update(kw)
    return s


@pytest.mark.parametrize("document,state_,backing_off,want", [
    ({"state": {}}, st(), False, (ota.NOTHING, None)),
    (doc({"url": 5}), st(), False, (ota.BAD, "url: must be an https:// URL of at most 1024 characters")),
    (doc({"url": 5}), st(error=contract.E_BAD_DESIRED), False, (ota.NOTHING, None)),  # said once
    (doc(fw("1.0.0", "a")), st(), False, (ota.ADOPT, fw("1.0.0", "a"))),  # runs it, under another URL
    (doc(dict(RUNNING, url="https://h/x")), st(phase="downloading"), False,
     (ota.ADOPT, dict(RUNNING, url="https://h/x"))),  # an update left half way, for what runs
    (doc(fw("0.9.0")), st(), False, (ota.REFUSE, fw("0.9.0"))),
    (doc(fw("0.9.0")), st(error=contract.E_DOWNGRADE, target=fw("0.9.0")), False, (ota.NOTHING, None)),
    (doc(fw("0.9.0", allow_downgrade=True)), st(), False, (ota.INSTALL, fw("0.9.0", allow_downgrade=True))),
    (doc(fw()), st(), False, (ota.INSTALL, fw())),
    (doc(fw(grant="1.ab")), st(), False, (ota.INSTALL, fw())),  # the grant is not the device's
    (doc(fw()), st(phase="failed", target=fw(), attempts=1, error="network"), True, (ota.NOTHING, None)),
    (doc(fw()), st(phase="failed", target=fw(), attempts=1, error="network"), False, (ota.INSTALL, fw())),
    (doc(fw()), st(phase="failed", target=fw(), attempts=3, error="network"), False, (ota.NOTHING, None)),
    (doc(fw()), st(phase="failed", target=fw(), attempts=1, error="url_expired"), False, (ota.NOTHING, None)),
    (doc(fw(url="https://h/y")), st(phase="failed", target=fw(), attempts=3, error="network"), False,
     (ota.INSTALL, fw(url="https://h/y"))),  # a changed desired document is a new request
])
def test_decide(document, state_, backing_off, want):
    before = repr(state_)
    assert ota.decide(document, state_, dict(RUNNING), 3, backing_off) == want
    assert repr(state_) == before  # changes nothing
