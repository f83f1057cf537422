# phases.py The update as one transition table: (phase, event) -> next phase.
#
# The phase is persisted (state.py) before the action it announces, so after a reset at any
# moment the device knows what it was doing. Events:
#   install        act on a desired firmware (new target, retry, or resume)
#   downloaded     every byte is in the inactive slot and hashed
#   verified       SHA-256, read-back and set_boot() passed: the next boot runs the target
#   booted_target  this boot runs the target slot (the bootloader gave it its one trial)
#   booted_old     this boot runs the other slot
#   confirmed      the trial passed its health check and mark_app_valid_cancel_rollback()
#   error          a failure with a code (contract.E_*)
#   adopt          the desired image is the one already running: take its labels
#   forget         the record cannot be what happened (a download into the running slot)

from firmware import contract

IDLE = contract.ST_IDLE
DOWNLOADING = contract.ST_DOWNLOADING
VERIFYING = contract.ST_VERIFYING
REBOOTING = contract.ST_REBOOTING
TRIAL = contract.ST_TRIAL
FAILED = contract.ST_FAILED

TABLE = {
    (IDLE, "install"): DOWNLOADING,
    (FAILED, "install"): DOWNLOADING,
    (DOWNLOADING, "install"): DOWNLOADING,  # resume, or a newer target replaces this one
    (VERIFYING, "install"): DOWNLOADING,
    (DOWNLOADING, "downloaded"): VERIFYING,
    (VERIFYING, "verified"): REBOOTING,
    (REBOOTING, "booted_target"): TRIAL,
    (VERIFYING, "booted_target"): TRIAL,  # reset between set_boot() and saving REBOOTING
    (TRIAL, "booted_target"): TRIAL,  # reset after confirming, before saving IDLE
    (TRIAL, "confirmed"): IDLE,
    (REBOOTING, "booted_old"): FAILED,  # the trial never confirmed: rolled back
    (TRIAL, "booted_old"): FAILED,
    (DOWNLOADING, "booted_old"): DOWNLOADING,  # a reset interrupted the download: resume
    (VERIFYING, "booted_old"): VERIFYING,  # set_boot() never completed: verify again
    (IDLE, "booted_old"): IDLE,
    (FAILED, "booted_old"): FAILED,
    (IDLE, "adopt"): IDLE,
    (FAILED, "adopt"): IDLE,
    (DOWNLOADING, "adopt"): IDLE,
    (VERIFYING, "adopt"): IDLE,
    (DOWNLOADING, "error"): FAILED,
    (VERIFYING, "error"): FAILED,
    (TRIAL, "error"): FAILED,
    (FAILED, "error"): FAILED,
    (IDLE, "error"): FAILED,  # a desired state the device refuses (bad_desired, downgrade)
    (DOWNLOADING, "forget"): IDLE,
    (VERIFYING, "forget"): IDLE,
    (REBOOTING, "forget"): IDLE,
    (TRIAL, "forget"): IDLE,
}


def step(phase, event):
    """The next phase; raises ValueError for a transition the table does not allow."""
    nxt = TABLE.get((phase, event))
    if nxt is None:
        raise ValueError("no transition from %s on %s" % (phase, event))
    return nxt
