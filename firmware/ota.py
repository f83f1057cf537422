# ota.py What a desired firmware asks of this device: a pure function of the shadow document,
# the persisted update state (state.py) and the image that runs. The agent carries it out.

from firmware import contract, phases

class UpdateError(Exception):
    """An install that failed, with its contract error code (E_*) and a detail. Defined here,
    where the agent keeps it, so that the download code can be dropped from RAM."""

    def __init__(self, code, detail=""):
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


# Actions decide() returns, as (action, firmware or the reason it is refused).
NOTHING = 0  # no desired firmware, or nothing to do about it now
BAD = 1  # the desired firmware is malformed (the reason: ValueError text)
ADOPT = 2  # it is the image that runs: take its labels, no download
REFUSE = 3  # older than what runs, without allow_downgrade
INSTALL = 4  # a target to download (new, changed, a retry, or a download to resume)


def decide(doc, st, running, max_attempts, backing_off):
    """(action, firmware) for a shadow document (get/accepted). `running` is the record of
    the image that runs; `backing_off` whether a retry's backoff is still pending. Changes
    nothing: the caller records what it does."""
    desired = contract.firmware_in(doc, contract.DESIRED)
    if desired is None:
        return NOTHING, None
    try:
        fw = contract.check_firmware(desired)
    except ValueError as e:
        return (NOTHING, None) if st["error"] == contract.E_BAD_DESIRED else (BAD, str(e))
    if running["sha256"] == fw["sha256"]:
        # The same image under a new URL, name or flags, or an update left half way: adopt.
        same = running == fw and st["phase"] == phases.IDLE
        return (NOTHING, None) if same else (ADOPT, fw)
    order = contract.compare_versions(fw["version"], running["version"])
    if order is not None and order < 0 and not fw.get("allow_downgrade"):
        told = st["error"] == contract.E_DOWNGRADE and st["target"] == fw
        return (NOTHING, None) if told else (REFUSE, fw)
    # The same target after a failure waits: for the backoff, for a new URL, or (after
    # max_attempts or a permanent error) for a change to the desired document.
    if st["target"] == fw and st["phase"] == phases.FAILED:
        if st["attempts"] >= max_attempts or st["error"] == contract.E_URL_EXPIRED or backing_off:
            return NOTHING, None
    return INSTALL, fw
