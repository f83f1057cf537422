"""Rollout decisions (tools/rollout.py) against a fleet of shadow documents.

The fleet here is the replica's own merge (tools.control.shadow.apply_update) with devices that report
what the real firmware reports; the emulated fleet over the broker is in test_rollout_e2e.py.
"""

import pytest

from firmware import contract
from tools.operator import rollout as ro
from tools.control import shadow
from tools.control.shadows import Shadow
from tools.site.releases import Release

A = Release("1.0.0", "a" * 64, 1000, "2026-01-01T00:00:00Z")
B = Release("1.1.0", "b" * 64, 2000, "2026-01-02T00:00:00Z")
RELEASES = {r.sha256: r for r in (A, B)}


class Fleet:
    """Shadows as the replica keeps them; devices report the way firmware/agent.py does."""

    def __init__(self, n: int):
        self.t = 1_000_000
        self.docs: dict[str, dict] = {}
        self.sent: list[ro.Send] = []
        self.devices = [f"dev-{i:02d}" for i in range(n)]
        for d in self.devices:
            self.report(d, A)

    def update(self, device: str, state: dict) -> None:
        self.docs[device], _, _ = shadow.apply_update(self.docs.get(device), {"state": state}, self.t)

    def report(self, device: str, running: Release, state: str = "idle", target: Release | None = None,
               error: str | None = None, attempts: int | None = None, need_url: bool | None = None) -> None:
        self.update(device, {"reported": {"firmware": {
            "version": running.version, "sha256": running.sha256, "state": state,
            "target": target.version if target else None, "error": error, "attempts": attempts,
            "need_url": need_url}}})

    def apply(self, sends: list[ro.Send]) -> list[ro.Send]:
        for s in sends:
            self.sent.append(s)
            self.update(s.device, {"desired": {"firmware": {
                "url": f"https://store/{s.device}", "version": s.release.version, "sha256": s.release.sha256,
                "size": s.release.size, "allow_downgrade": s.allow_downgrade}}})
        return sends

    def tick(self, seconds: int = 1) -> None:
        self.t += seconds

    def shadows(self) -> dict[str, Shadow]:
        """What the engine reads: tools.control.shadows' views of the documents."""
        return {d: Shadow(d, doc) for d, doc in self.docs.items()}


def make(tmp_path, n=20, **policy):
    db = ro.RolloutDB(tmp_path / "rollouts.db")
    fleet = Fleet(n)
    info = db.create(B, fleet.devices, ro.Policy(**policy))
    return db, fleet, ro.Engine(db, info.id, RELEASES.get)


def step(engine, fleet):
    fleet.tick()
    sends = fleet.apply(engine.step(fleet.shadows(), fleet.t))
    engine.sent([s.device for s in sends], fleet.t)
    return sends


def states(db, engine):
    return {t.device: t.state for t in db.targets(engine.id)}


def test_batch_ends_are_cumulative_and_always_cover_the_fleet():
    assert ro.batch_ends(["1", "10%", "50%", "100%"], 20) == [1, 2, 10, 20]
    assert ro.batch_ends(["1", "10%", "50%", "100%"], 3) == [1, 2, 3]  # each batch adds one at least
    assert ro.batch_ends(["5"], 20) == [5, 20]  # the last batch is implied
    assert ro.batch_ends(["50", "100%"], 10) == [10]
    assert ro.batch_ends(["25%", "25%", "75%"], 8) == [2, 3, 6, 8]


@pytest.mark.parametrize("policy, message", [
    (dict(batches=[]), "at least one"), (dict(batches=["0"]), "counts are > 0"),
    (dict(batches=["150%"]), "percentages"), (dict(batches=["x"]), "a count"),
    (dict(success_pct=101), "success threshold"), (dict(abort_pct=0), "abort percentage"),
    (dict(timeout_s=0), "positive"), (dict(ttl=7200), "URL lifetime"),
])
def test_bad_policies_are_refused_before_anything_is_stored(tmp_path, policy, message):
    db = ro.RolloutDB(tmp_path / "r.db")
    with pytest.raises(ro.RolloutError, match=message):
        db.create(B, ["d1"], ro.Policy(**policy))
    assert db.list() == []
    with pytest.raises(ro.RolloutError, match="listed twice"):
        db.create(B, ["d1", "d1"], ro.Policy())
    with pytest.raises(ro.RolloutError, match="not a device id"):
        db.create(B, ["d1", "bad/id"], ro.Policy())


def test_batches_open_only_when_the_previous_one_succeeded_and_the_rollout_completes(tmp_path):
    db, fleet, engine = make(tmp_path, 20)
    first = step(engine, fleet)
    assert [s.device for s in first] == ["dev-00"] and first[0].release == B and not first[0].allow_downgrade
    for _ in range(3):  # nothing more goes out while batch 1 has not succeeded
        assert step(engine, fleet) == []
    fleet.report("dev-00", A, "downloading", B)
    assert step(engine, fleet) == []
    fleet.report("dev-00", B)
    assert [s.device for s in step(engine, fleet)] == ["dev-01"]
    fleet.report("dev-01", B)
    batch3 = step(engine, fleet)
    assert [s.device for s in batch3] == [f"dev-{i:02d}" for i in range(2, 10)]
    for s in batch3[:-1]:
        fleet.report(s.device, B)
    assert step(engine, fleet) == []  # 7 of 8: the threshold is 100 %
    fleet.report(batch3[-1].device, B)
    assert len(step(engine, fleet)) == 10
    for d in fleet.devices[10:]:
        fleet.report(d, B)
    step(engine, fleet)
    assert engine.info.state == ro.COMPLETED and engine.settled()
    assert set(states(db, engine).values()) == {ro.SUCCEEDED}
    assert sorted(s.device for s in fleet.sent) == fleet.devices  # each device targeted exactly once


def test_failures_abort_at_the_threshold_skip_the_rest_and_roll_back_what_was_touched(tmp_path):
    db, fleet, engine = make(tmp_path, 20, abort_failures=3, min_finished=3, success_pct=50)
    step(engine, fleet)
    fleet.report("dev-00", B)
    step(engine, fleet)
    fleet.report("dev-01", B)
    batch3 = step(engine, fleet)
    assert len(batch3) == 8
    fleet.report("dev-02", B)
    for d in ("dev-03", "dev-04"):  # the image crashed: the bootloader went back to A
        fleet.report(d, A, "failed", B, contract.E_ROLLED_BACK, 1)
    assert step(engine, fleet) == [] and engine.info.state == ro.RUNNING  # 2 failed: below 3
    fleet.report("dev-05", A, "failed", B, contract.E_ROLLED_BACK, 1)
    back = step(engine, fleet)
    assert engine.info.state == ro.ABORTED and "3 devices failed" in engine.info.reason
    st = states(db, engine)
    assert [d for d in fleet.devices if st[d] == ro.SKIPPED] == fleet.devices[10:]
    assert [d for d in fleet.devices if st[d] == ro.STOPPED] == fleet.devices[6:10]  # were updating
    touched = fleet.devices[:10]
    assert sorted(s.device for s in back) == touched
    assert all(s.release == A and s.allow_downgrade for s in back)
    assert not engine.settled()  # roll backs under way
    for d in touched:
        fleet.report(d, A)  # (in the real fleet B devices download A again, crashed ones adopt)
    step(engine, fleet)
    assert engine.settled()
    assert all(t.rollback == ro.RB_DONE for t in db.targets(engine.id) if t.device in touched)
    assert all(s.device in touched for s in fleet.sent)  # the skipped half never heard of B


def test_a_batch_that_finishes_below_the_success_threshold_aborts(tmp_path):
    db, fleet, engine = make(tmp_path, 4, batches=["2", "100%"], success_pct=100, rollback_on_abort=False)
    step(engine, fleet)
    fleet.report("dev-00", B)
    fleet.report("dev-01", A, "failed", B, contract.E_HASH, 3)
    assert step(engine, fleet) == []
    assert engine.info.state == ro.ABORTED and "1 of 2 succeeded" in engine.info.reason
    assert engine.settled()  # no roll back asked for


def test_a_device_that_never_reports_fails_at_the_timeout(tmp_path):
    db, fleet, engine = make(tmp_path, 3, batches=["100%"], timeout_s=60, success_pct=0)
    step(engine, fleet)
    fleet.report("dev-00", B)
    fleet.report("dev-01", A, "downloading", B)  # then silence: a bricked device never says so
    fleet.tick(59)
    step(engine, fleet)
    assert states(db, engine)["dev-01"] == ro.IN_PROGRESS
    fleet.tick(2)
    step(engine, fleet)
    t = {t.device: t for t in db.targets(engine.id)}
    assert (t["dev-01"].state, t["dev-01"].error) == (ro.FAILED, ro.E_TIMEOUT)
    assert (t["dev-02"].state, t["dev-02"].error) == (ro.FAILED, ro.E_TIMEOUT)
    assert engine.info.state == ro.COMPLETED  # success threshold 0, no abort threshold


def test_only_reports_made_since_the_target_count(tmp_path):
    db, fleet, engine = make(tmp_path, 2, batches=["100%"])
    # Before the rollout dev-00 had already failed B (someone set it by hand, long ago).
    fleet.report("dev-00", A, "failed", B, contract.E_HASH, 3)
    fleet.tick(5)
    step(engine, fleet)
    step(engine, fleet)
    assert states(db, engine)["dev-00"] == ro.IN_PROGRESS
    # Transient errors and a request for a fresh URL are not failures (the device retries,
    # the renewer re-signs) until the device has used its attempts.
    fleet.report("dev-00", A, "failed", B, contract.E_NETWORK, 1)
    fleet.report("dev-01", A, "failed", B, contract.E_URL_EXPIRED, 1, need_url=True)
    step(engine, fleet)
    assert states(db, engine) == {"dev-00": ro.IN_PROGRESS, "dev-01": ro.IN_PROGRESS}
    fleet.report("dev-00", A, "failed", B, contract.E_NETWORK, 3)
    step(engine, fleet)
    assert states(db, engine)["dev-00"] == ro.FAILED


def test_a_stopped_rollout_resumes_where_it_was(tmp_path):
    db, fleet, engine = make(tmp_path, 20)
    step(engine, fleet)
    fleet.report("dev-00", B)
    # The driver targets dev-01 (persisted), then dies before its desired state goes out.
    fleet.tick()
    sends = engine.step(fleet.shadows(), fleet.t)
    assert [s.device for s in sends] == ["dev-01"]
    db.close()

    db2 = ro.RolloutDB(tmp_path / "rollouts.db")
    engine2 = ro.Engine(db2, engine.id, RELEASES.get)
    fleet.tick()
    resent = engine2.step(fleet.shadows(), fleet.t)
    assert [s.device for s in resent] == ["dev-01"]  # it never went out: send it now
    engine2.sent(["dev-01"], fleet.t)  # ... and this time the broker loses it
    assert step(engine2, fleet) == []  # not again at once: it may still be on its way
    fleet.tick(ro.REPUBLISH_S)
    assert [s.device for s in step(engine2, fleet)] == ["dev-01"]  # not in the shadow: again
    fleet.report("dev-01", B)
    assert len(step(engine2, fleet)) == 8  # batch 3; dev-00 and dev-01 are not sent again
    assert sorted(s.device for s in fleet.sent) == fleet.devices[:10]


def test_cancel_from_another_process_stops_targeting(tmp_path):
    db, fleet, engine = make(tmp_path, 20)
    step(engine, fleet)
    other = ro.Engine(ro.RolloutDB(tmp_path / "rollouts.db"), engine.id, RELEASES.get)
    assert other.abort("cancelled by the operator", state=ro.CANCELLED) == []  # no roll back on cancel
    fleet.report("dev-00", B)
    assert step(engine, fleet) == []
    assert engine.info.state == ro.CANCELLED and engine.settled()
    st = states(db, engine)
    assert st["dev-00"] == ro.SUCCEEDED and list(st.values()).count(ro.SKIPPED) == 19


_HOLD = """
import sys, time
from tools.operator import rollout as ro
with ro.sole_driver(ro.RolloutDB(sys.argv[1]), sys.argv[2]):
    print("driving", flush=True)
    time.sleep(60)
"""


class _Stop(Exception):
    pass


def test_a_rollout_has_one_driver_and_a_killed_one_lets_go(tmp_path):
    import asyncio
    import subprocess
    import sys

    from conftest import REPO

    db, fleet, engine = make(tmp_path, 4)
    published = []

    async def publish(s):
        published.append(s.device)
        raise _Stop  # the first desired state is out: enough

    other = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "rollouts.db"), engine.id],
                             cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "driving"
        with pytest.raises(ro.RolloutError, match=rf"already being driven \(process {other.pid}\)"):
            asyncio.run(ro.drive(engine, lambda devices: fleet.shadows(), publish, tick=0))
        assert published == [] and set(states(db, engine).values()) == {ro.PENDING}
    finally:
        other.kill()  # dies holding the lock
        other.wait()
        other.stdout.close()
    with pytest.raises(_Stop):
        asyncio.run(ro.drive(engine, lambda devices: fleet.shadows(), publish, tick=0))
    assert published == ["dev-00"]


def test_someone_else_changing_the_desired_firmware_is_a_failure_not_a_fight(tmp_path):
    db, fleet, engine = make(tmp_path, 1, batches=["100%"], success_pct=0)
    step(engine, fleet)
    c = Release("2.0.0", "c" * 64, 10, "x")
    fleet.apply([ro.Send("dev-00", c)])
    fleet.sent.clear()
    fleet.tick(ro.REPUBLISH_S + 1)
    assert step(engine, fleet) == []  # not sent again
    t = db.targets(engine.id)[0]
    assert (t.state, t.error) == (ro.FAILED, ro.E_SUPERSEDED)


def test_roll_back_by_the_operator_cancels_and_restores_each_device_s_previous_release(tmp_path):
    db, fleet, engine = make(tmp_path, 20, batches=["2", "100%"])
    step(engine, fleet)
    fleet.report("dev-00", B)
    back = engine.roll_back(fleet.t)
    assert engine.db.info(engine.id).state == ro.CANCELLED
    assert sorted((s.device, s.release.version, s.allow_downgrade) for s in back) == [
        ("dev-00", "1.0.0", True), ("dev-01", "1.0.0", True)]
    assert list(states(db, engine).values()).count(ro.SKIPPED) == 18


def test_a_roll_back_goes_out_at_the_drivers_next_step(tmp_path):
    """The roll back's desired states are sent by whoever drives the rollout (the command or the
    dashboard that asked for it, or another process): at its next step, not REPUBLISH_S after
    the devices were targeted."""
    db, fleet, engine = make(tmp_path, 20, batches=["2", "100%"])
    step(engine, fleet)
    fleet.report("dev-00", B)
    engine.roll_back(fleet.t)
    driver = ro.Engine(db, engine.id, RELEASES.get)  # e.g. the process driving it
    assert sorted((s.device, s.release.version) for s in step(driver, fleet)) == [("dev-00", "1.0.0"),
                                                                                   ("dev-01", "1.0.0")]
    assert step(driver, fleet) == []  # and once only, while the devices take it


def test_a_roll_back_asked_for_while_a_driver_judges_its_devices_is_not_undone(tmp_path):
    """The dashboard's Roll back lands between the CLI driver's read of the targets and its
    write of their outcomes: the driver writes nothing over it, and its next step sends the
    roll back."""
    db, fleet, engine = make(tmp_path, 2, batches=["100%"], timeout_s=10)
    step(engine, fleet)  # both targeted, running 1.0.0
    other = ro.RolloutDB(tmp_path / "rollouts.db")
    real_targets = db.targets
    asked = []

    def targets_then_roll_back(rid):
        out = real_targets(rid)
        if not asked:
            asked.extend(ro.Engine(other, rid, RELEASES.get).roll_back(fleet.t))
        return out
    db.targets = targets_then_roll_back
    fleet.tick(20)
    engine.step(fleet.shadows(), fleet.t)  # both time out in this step
    db.targets = real_targets
    assert len(asked) == 2
    got = {t.device: (t.state, t.rollback) for t in db.targets(engine.id)}
    assert got == {"dev-00": (ro.STOPPED, ro.RB_REQUESTED), "dev-01": (ro.STOPPED, ro.RB_REQUESTED)}
    assert sorted((s.device, s.release.version) for s in step(engine, fleet)) == [("dev-00", "1.0.0"),
                                                                                  ("dev-01", "1.0.0")]


def test_a_device_with_nothing_to_roll_back_to_still_gets_its_outcome(tmp_path):
    """A roll back cannot take back a device that ran an image none of our releases is: it
    stays in progress, and its outcome is still recorded when it reports one."""
    other = Release("0.9.0", "c" * 64, 900, "2026-01-01T00:00:00Z")
    db, fleet, engine = make(tmp_path, 2, batches=["100%"])
    fleet.report("dev-01", other)
    step(engine, fleet)
    engine.roll_back(fleet.t)
    fleet.report("dev-01", B)
    step(engine, fleet)
    t = {x.device: x for x in db.targets(engine.id)}["dev-01"]
    assert (t.rollback, t.state) == (ro.RB_NO_PREVIOUS, ro.SUCCEEDED)


def test_a_cancel_that_lands_while_a_batch_opens_wins(tmp_path):
    db, fleet, engine = make(tmp_path, 20)
    step(engine, fleet)
    fleet.report("dev-00", B)
    # Another process cancels between this step's read of the rollout and its targeting.
    other = ro.RolloutDB(tmp_path / "rollouts.db")
    real_targets = db.targets

    def targets_then_cancel(rid):
        out = real_targets(rid)
        if other.info(rid).state == ro.RUNNING:
            ro.Engine(other, rid, RELEASES.get).abort("cancelled", state=ro.CANCELLED)
        return out
    db.targets = targets_then_cancel
    assert step(engine, fleet) == []  # batch 2 was about to open: nothing goes out
    db.targets = real_targets
    st = states(db, engine)
    assert st["dev-01"] == ro.SKIPPED and list(st.values()).count(ro.SKIPPED) == 19
