# trial.py What the last reset interrupted, and the trial of a new image: run at boot, then
# dropped from RAM (agent.run).
#
# A trial must pass a health check (broker over TLS, a shadow round trip) before
# mark_app_valid_cancel_rollback(); if it does not, the device resets unconfirmed and the
# bootloader goes back to the old image, which then reports `failed: rolled_back`. Identity
# is the SHA-256 of the running image, never a claim.

from firmware import contract, log, phases, power, slots, unload


def boot_check(agent):
    """Record what this boot means for the update; True if it is the trial of a freshly
    installed image."""
    st = agent.st
    if st["phase"] in (phases.DOWNLOADING, phases.VERIFYING, phases.REBOOTING, phases.TRIAL):
        event = "booted_target" if agent.run_label == st["slot"] else "booted_old"
        try:
            nxt = phases.step(st["phase"], event)
        except ValueError:  # e.g. "downloading" into the slot we run: state is corrupt
            log("inconsistent update state: starting over")
            agent.go("forget", target=None, slot=None, written=0)
            return False
        if nxt == phases.FAILED:
            log("back on", agent.run_label, ": the trial of", st["slot"], "did not confirm")
            agent.fail(contract.E_ROLLED_BACK, event)
        elif nxt == phases.TRIAL:
            log("trial boot of", st["target"]["version"], "in", agent.run_label)
            agent.go(event)
            return True
        else:
            log("a reset interrupted", st["phase"], "of", st["target"]["version"], "at", st["written"])
    elif slots.pending_verify():
        # Running an unconfirmed image we know nothing about: do not keep it.
        log("unconfirmed image with no update record: resetting to roll back")
        power.reset()
    return False


def healthy(agent):
    """The new image can reach the broker over TLS and round-trip the shadow. A request lost
    on the way is made again (waits of 2, 4, 8 s...) until the deadline: one lost message
    must not roll back a good image."""
    return agent.link.exchange(contract.GET, {}, (contract.GET_ACCEPTED,),
                               agent.cfg["health_deadline_s"] * 1000, "health") is not None


def confirm(agent):
    """The running image is the target, hashed from its slot: confirm it, or roll back."""
    import binascii

    st = agent.st
    target = st["target"]
    digest = slots.sha256_of(slots.running(), target["size"], bytearray(4096))
    if binascii.hexlify(digest).decode() != target["sha256"]:
        # Not the image we installed: never confirm it.
        log("running image does not hash to the target: rolling back")
        agent.fail(contract.E_HASH)
        power.reset()
    slots.confirm()  # before saving: a reset in between re-runs the trial, harmlessly
    seal = st["verified"]  # (release.check: signer, secure_version, trust?; a damaged one counts as none)
    if seal is not None and isinstance(seal.get("signer"), str) and isinstance(seal.get("secure_version"), int):
        # a signed release: its counter and trust list take effect now
        from firmware import release
        from firmware.ota import UpdateError

        try:
            release.commit(agent.cfg, seal)
        except UpdateError as e:  # signing.json is damaged: it stays so, and refuses every release
            log("trust file:", e.detail)
        release = None
        unload("firmware.release", "firmware.rsapss")
        st["signers"][agent.run_label] = [seal["signer"], seal["secure_version"]]
    st["images"][agent.run_label] = dict(target)
    agent.go("confirmed", target=None, slot=None, error=None, attempts=0, written=0, fetched=0, verified=None)
    log("confirmed", target["version"], "in", agent.run_label)
