# app.py The device agent: follow the desired firmware in the shadow, report what runs.
#
# Boot: the persisted phase (phases.py) and the running slot say whether this boot is the
# trial of a new image, a rollback, an interrupted download to resume, or ordinary. A trial
# must pass a health check (broker over TLS, shadow round trip) before
# mark_app_valid_cancel_rollback(); if it does not, the device resets unconfirmed and the
# bootloader goes back to the old image, which then reports `failed: rolled_back`. Identity
# is the SHA-256 of the running image, never a claim.
#
# Steady state: on every (re)connect ask for the whole shadow (state/<id>/get) and act on
# desired.firmware; a delta only triggers another get. Reports are state.reported.firmware.
# A get nobody answers is asked again: a broker drops what no one is subscribed for (the
# replica between a broker restart and its new subscription), and nothing else would come.
# An answer whose reported firmware is not what this board would report (its report was
# dropped the same way) is answered with the report again.

import gc
import json
import random
import time

from firmware import clock, contract, phases, power, slots, state, wifi
from firmware.install import Installer, _new_link, _unload, log

_STABLE_LINK_MS = 30000  # a link up this long has worked: the next failure starts a fresh backoff
_IDLE_MS = 5000  # longest wait for a message while idle; a message ends the wait at once
_ASK_FIRST_MS = 10000  # an unanswered get is asked again after 5-10 s, then up to 30-60 s
_ASK_MAX_MS = 60000
_REPORT_KEYS = ("version", "sha256", "slot", "state", "error", "target")
_FIRMWARE_KEY = ('"' + contract.FIRMWARE + '"').encode()  # in a delta: the firmware changed


def _jittered(delay):
    # ticks_ms after delay/2..delay: a fleet does not retry in step
    return time.ticks_add(time.ticks_ms(), delay // 2 + random.getrandbits(16) % (delay // 2 + 1))


class Agent(Installer):
    def __init__(self, cfg):
        self.cfg = cfg
        self.st = state.load()
        self.run_label = slots.label(slots.running())
        self.link = None
        self.updater = None  # loaded only while installing: RAM is tight on an ESP32
        self.doc_version = -1
        self.retry_at = None  # ticks_ms when a transient failure may be retried
        self._progress_at = (0, 0)  # (percent, ticks_ms) of the last progress report
        self.ask_at = None  # ticks_ms when an unanswered get is asked again
        self.ask_wait = _ASK_FIRST_MS
        self.reports = 0  # reports sent (to tell whether handling a message sent one)

    # -- persisted phase ------------------------------------------------------------------

    def _go(self, event, **fields):
        """Apply a table transition and persist it (with any other changed fields)."""
        self.st["phase"] = phases.step(self.st["phase"], event)
        self.st.update(fields)
        state.save(self.st)

    def _fail(self, code, event="error", progressed=False):
        """Record a failure. A transient one that still moved the download forward (more
        bytes safely in flash) does not use up an attempt: a link that drops every few
        KiB converges, bounded by the byte budget instead."""
        st = self.st
        st["error"] = code
        if code in contract.TRANSIENT_ERRORS:
            if not progressed:
                st["attempts"] += 1
        else:
            st["attempts"] = self.cfg["max_attempts"]  # permanent: wait for a new desired
        if code in contract.TRANSIENT_ERRORS and st["attempts"] < self.cfg["max_attempts"]:
            # Capped exponential backoff with jitter, so a fleet does not retry in step.
            self.retry_at = _jittered(min(60000, 1000 * 2 ** st["attempts"]))
        else:
            self.retry_at = None
        self._go(event)

    # -- what happened across the last reset ------------------------------------------------

    def boot_check(self):
        """Returns True if this boot is the trial of a freshly installed image."""
        st = self.st
        if st["phase"] in (phases.DOWNLOADING, phases.VERIFYING, phases.REBOOTING, phases.TRIAL):
            event = "booted_target" if self.run_label == st["slot"] else "booted_old"
            try:
                nxt = phases.step(st["phase"], event)
            except ValueError:  # e.g. "downloading" into the slot we run: state is corrupt
                log("inconsistent update state: starting over")
                st.update(phase=phases.IDLE, target=None, slot=None, written=0)
                state.save(st)
                return False
            if nxt == phases.FAILED:
                log("back on", self.run_label, ": the trial of", st["slot"], "did not confirm")
                self._fail(contract.E_ROLLED_BACK, event)
            elif nxt == phases.TRIAL:
                log("trial boot of", st["target"]["version"], "in", self.run_label)
                self._go(event)
                return True
            else:
                log("a reset interrupted", st["phase"], "of", st["target"]["version"], "at", st["written"])
        elif slots.pending_verify():
            # Running an unconfirmed image we know nothing about: do not keep it.
            log("unconfirmed image with no update record: resetting to roll back")
            power.reset()
        return False

    # -- reports --------------------------------------------------------------------------

    def running_image(self):
        """What we know of the running image: recorded at provisioning or when this device
        confirmed it (hashed from the slot). Unknown images are reported as such."""
        rec = self.st["images"].get(self.run_label)
        if rec is None:
            return {"version": "unknown", "sha256": None, "size": None, "url": None}
        return rec

    def report(self, **extra):
        if self.link is None:
            return
        self.link.report(self.reported(**extra))
        self.reports += 1

    def reported(self, **extra):
        """The firmware report as this board would send it now."""
        st = self.st
        rec = self.running_image()
        pending = st["target"] if st["phase"] != phases.IDLE else None
        failed = st["phase"] == phases.FAILED
        extra["slot"] = self.run_label
        extra["state"] = st["phase"]
        extra["error"] = st["error"] if failed else None
        extra["target"] = pending["version"] if pending else None
        extra["attempts"] = st["attempts"] if failed else None
        extra["need_url"] = True if st["error"] == contract.E_URL_EXPIRED and pending else None
        return contract.reported_firmware(rec, extra)

    def ask(self):
        """Ask for the whole shadow; until an answer comes, ask again with backoff and jitter."""
        self.link.request_get()
        self.ask_at = _jittered(self.ask_wait)
        self.ask_wait = min(_ASK_MAX_MS, self.ask_wait * 2)

    def _missed(self, doc):
        """Whether the reported firmware in a shadow document is not what we would report."""
        theirs = contract.firmware_in(doc, contract.REPORTED)
        if not isinstance(theirs, dict):
            return True
        mine = self.reported()
        for k in _REPORT_KEYS:
            if theirs.get(k) != mine[k]:
                return True
        return False

    def _on_progress(self, done, total):
        pct = done * 100 // total
        last_pct, last_t = self._progress_at
        now = time.ticks_ms()
        if pct >= last_pct + 10 and time.ticks_diff(now, last_t) >= 1000 or done == total:
            self._progress_at = (pct, now)
            log("download", pct, "%")
            power.feed()
            if self.link is not None:
                self.report(progress=pct)

    def _reconnect(self):
        """One bounded attempt to bring MQTT back; on failure the report waits for later."""
        gc.collect()
        try:
            self.link = _new_link(self.cfg)
            self.link.connect()
        except Exception as e:  # noqa: BLE001 - best effort; the state is already persisted
            log("could not reconnect:", repr(e))
            if self.link is not None:
                self.link.close()
            self.link = None

    # -- trial ------------------------------------------------------------------------------

    def health_check(self):
        """The new image can reach the broker over TLS and round-trip the shadow. A request
        lost on the way is made again (waits of 2, 4, 8 s...) until the deadline: one lost
        message must not roll back a good image."""
        return self.link.exchange(contract.GET, {}, (contract.GET_ACCEPTED,),
                                  self.cfg["health_deadline_s"] * 1000, "health") is not None

    def finish_trial(self):
        import binascii

        st = self.st
        target = st["target"]
        digest = slots.sha256_of(slots.running(), target["size"], bytearray(4096))
        if binascii.hexlify(digest).decode() != target["sha256"]:
            # Not the image we installed: never confirm it.
            log("running image does not hash to the target: rolling back")
            self._fail(contract.E_HASH)
            power.reset()
        slots.confirm()  # before saving: a reset in between re-runs the trial, harmlessly
        st["images"][self.run_label] = dict(target)
        self._go("confirmed", target=None, slot=None, error=None, attempts=0, written=0, fetched=0)
        log("confirmed", target["version"], "in", self.run_label)

    def handle_message(self, suffix, msg):
        """One message from the broker: returns (firmware, resume) to install, or None.
        Whatever it holds, nothing escapes but a link error: input that is not what the
        contract says is dropped (tests fuzz this)."""
        if suffix == contract.UPDATE_DELTA:
            # The delta only says that something changed: the whole shadow is asked for (its
            # metadata makes a delta as large as the document's firmware part; not parsed).
            if _FIRMWARE_KEY in msg:
                self.ask()
            return None
        try:
            doc = json.loads(msg)
        except ValueError:  # includes UnicodeError
            log("dropping a message that is not JSON on", suffix)
            return None
        if suffix in (contract.GET_ACCEPTED, contract.GET_REJECTED):  # (rejected: no shadow yet)
            self.ask_at = None
            self.ask_wait = _ASK_FIRST_MS
            before = self.reports
            action = self.on_document(doc) if suffix == contract.GET_ACCEPTED else None
            if action is None and self.reports == before and self._missed(doc):
                self.report()  # (an install reports anyway)
            return action
        elif suffix == contract.UPDATE_REJECTED:
            log("replica rejected a report")
        return None

    def _idle_ms(self):
        # Wake only to feed the watchdog, to keep the MQTT session alive and for a retry:
        # each wake-up costs the chip power and an emulated fleet its host's CPU.
        wait = _IDLE_MS
        if self.cfg["wdt_ms"]:
            wait = min(wait, self.cfg["wdt_ms"] // 4)
        if self.cfg["keepalive_s"]:
            wait = min(wait, self.cfg["keepalive_s"] * 250)
        for at in (self.retry_at, self.ask_at):
            if at is not None:
                wait = min(wait, max(0, time.ticks_diff(at, time.ticks_ms())))
        return wait

    def serve(self):
        while True:
            power.feed()
            self.link.poll(self._idle_ms())
            while self.link.inbox:
                suffix, msg = self.link.inbox.pop(0)
                gc.collect()
                action = self.handle_message(suffix, msg)
                if action is not None:
                    # The install needs the largest free blocks for TLS: the raw message and
                    # its parsed document (several KiB) must be garbage by then, not pinned
                    # by this frame.
                    suffix = msg = None
                    gc.collect()
                    self.install(*action)
                    action = None
                if self.link is None:
                    return  # the link could not be brought back after an install
            if self.retry_at is not None and time.ticks_diff(time.ticks_ms(), self.retry_at) >= 0:
                self.retry_at = None
                self.ask()  # act on the desired state as it is now
            elif self.ask_at is not None and time.ticks_diff(time.ticks_ms(), self.ask_at) >= 0:
                self.ask()

    # -- main loop ----------------------------------------------------------------------------

    def run(self):
        trial = self.boot_check()
        t_boot = time.ticks_ms()
        failures = 0
        while True:
            up_at = None  # ticks_ms when this round's link came up
            try:
                wifi.connect(self.cfg["wifi_ssid"], self.cfg["wifi_password"])
                clock_state = clock.ensure(self.cfg["ntp_host"], self.cfg["ntp_port"])
                if clock_state == 2:
                    log("clock set:", clock.unix_time())
                elif not clock_state:
                    log("clock not set: certificate checks will fail until it is")
                gc.collect()  # the TLS handshake needs its buffers in one piece
                self.link = _new_link(self.cfg)
                self.link.connect()
                if trial:
                    if not self.health_check():
                        raise OSError(110, "health check: no shadow round trip")
                    self.finish_trial()
                    trial = False
                up_at = time.ticks_ms()
                self.report()
                self.ask_wait = _ASK_FIRST_MS  # a new link: its first answer is due soon
                self.ask()
                self.serve()
            except MemoryError:
                log("out of memory; reconnecting")  # no formatting: the heap is exhausted
            except (OSError, ValueError) as e:
                log("link error:", repr(e))
            except Exception as e:  # noqa: BLE001 - umqtt.MQTTException (refused CONNECT)
                log("broker refused:", repr(e))
            if self.link is not None:
                self.link.close()
                self.link = None
            gc.collect()
            if trial and time.ticks_diff(time.ticks_ms(), t_boot) > self.cfg["health_deadline_s"] * 1000:
                log("health check deadline passed: resetting without confirming")
                power.reset()
            # Only a link that stayed up a while resets the backoff: one that fails right after
            # connecting (out of memory in every round) would otherwise reconnect every second.
            if up_at is not None and time.ticks_diff(time.ticks_ms(), up_at) > _STABLE_LINK_MS:
                failures = 0
            failures += 1
            until = _jittered(min(30000, 500 * 2 ** min(failures, 6)))
            while time.ticks_diff(until, time.ticks_ms()) > 0:
                power.feed()
                time.sleep_ms(100)


def main():
    from firmware import config

    cfg = config.load()
    # Configuration is read once: drop its code from RAM (it is ~3 KiB of bytecode). The
    # package holds it too, which `del sys.modules[...]` alone left in place.
    del config
    _unload("firmware.config")
    power.arm_watchdog(cfg["wdt_ms"])
    Agent(cfg).run()
