# agent.py The device agent: follow the desired firmware in the shadow, report what runs.
#
# Boot: trial.py says, from the persisted phase (phases.py) and the running slot, whether this
# boot is the trial of a new image, a rollback, an interrupted download to resume, or an
# ordinary one. Steady state: on every (re)connect ask for the whole shadow (state/<id>/get)
# and act on its desired firmware (ota.decide; install.py carries an install out); a delta
# only triggers another get. Reports are state.reported.firmware. A get nobody answers is
# asked again: a broker drops what no one is subscribed for (the replica between a broker
# restart and its new subscription), and nothing else would come. An answer whose reported
# firmware is not what this board would report (its report was dropped the same way) is
# answered with the report again.
#
# The phase changes in one place, go(), by phases.py's table, and is saved before the action
# it announces.

import gc
import json
import random
import time

from firmware import clock, contract, log, ota, phases, power, slots, state, unload, wifi

_STABLE_LINK_MS = 30000  # a link up this long has worked: the next failure starts a fresh backoff
_IDLE_MS = 5000  # longest wait for a message while idle; a message ends the wait at once
_ASK_FIRST_MS = 10000  # an unanswered get is asked again after 5-10 s, then up to 30-60 s
_ASK_MAX_MS = 60000
_REPORT_KEYS = ("version", "sha256", "slot", "state", "error", "target")
_FIRMWARE_KEY = ('"' + contract.FIRMWARE + '"').encode()  # in a delta: the firmware changed


def _jittered(delay):
    # ticks_ms after delay/2..delay: a fleet does not retry in step
    return time.ticks_add(time.ticks_ms(), delay // 2 + random.getrandbits(16) % (delay // 2 + 1))


def _new_link(cfg):
    from firmware.link import Link  # loaded with umqtt when MQTT is needed, dropped when parked

    return Link(cfg)


class Agent:
    def __init__(self, cfg):
        self.cfg = cfg
        self.st = state.load()
        self.run_label = slots.label(slots.running())
        self.link = None
        self.doc_version = -1
        self.retry_at = None  # ticks_ms when a transient failure may be retried
        self._progress_at = (0, 0)  # (percent, ticks_ms) of the last progress report
        self.ask_at = None  # ticks_ms when an unanswered get is asked again
        self.ask_wait = _ASK_FIRST_MS
        self.reports = 0  # reports sent (to tell whether handling a message sent one)

    # -- persisted phase ------------------------------------------------------------------

    def go(self, event, **fields):
        """Apply a table transition and persist it (with any other changed fields): the one
        place the phase changes."""
        self.st["phase"] = phases.step(self.st["phase"], event)
        self.st.update(fields)
        state.save(self.st)

    def fail(self, code, event="error", progressed=False):
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
        self.go(event)

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
        extra["signer"], extra["secure_version"] = st["signers"].get(self.run_label) or (None, None)
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

    def on_progress(self, done, total):
        pct = done * 100 // total
        last_pct, last_t = self._progress_at
        now = time.ticks_ms()
        if pct >= last_pct + 10 and time.ticks_diff(now, last_t) >= 1000 or done == total:
            self._progress_at = (pct, now)
            log("download", pct, "%")
            power.feed()
            if self.link is not None:
                self.report(progress=pct)

    def reconnect(self):
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

    # -- acting on the shadow ---------------------------------------------------------------

    def on_document(self, doc):
        """Carry out what the desired firmware in a shadow document asks (ota.decide).
        Returns (firmware, resume) to install, or None. The caller drops the document
        (several KiB with its metadata) before installing."""
        if not isinstance(doc, dict):
            return None
        version = doc.get("version")
        if isinstance(version, int):
            if version < self.doc_version:
                return None  # stale answer
            self.doc_version = version
        st = self.st
        backing_off = self.retry_at is not None and time.ticks_diff(self.retry_at, time.ticks_ms()) > 0
        action, fw = ota.decide(doc, st, self.running_image(), self.cfg["max_attempts"], backing_off)
        if action == ota.BAD:
            log("ignoring desired firmware:", fw)
            self.fail(contract.E_BAD_DESIRED)
            self.report(detail=fw)
        elif action == ota.ADOPT:
            st["images"][self.run_label] = dict(fw)
            self.go("adopt", target=None, slot=None, error=None, attempts=0, written=0, fetched=0, verified=None)
            self.report()
        elif action == ota.REFUSE:
            log("refusing downgrade to", fw["version"])
            st["target"] = fw
            self.fail(contract.E_DOWNGRADE)
            self.report()
        elif action == ota.INSTALL:
            # A change to the desired document (a fresh URL, allow_downgrade, a new version
            # label) is a new request with a fresh set of attempts; the same image resumes
            # where its download stopped.
            same_target = st["target"] is not None and st["target"]["sha256"] == fw["sha256"]
            if st["target"] != fw:
                st["attempts"] = 0
                self.retry_at = None
                if not same_target:
                    st["fetched"] = 0
            return fw, same_target
        return None

    def install(self, fw, resume):
        self._progress_at = (0, time.ticks_ms())
        from firmware import install

        try:
            install.run(self, fw, resume)
        finally:
            install = None
            unload("firmware.install")

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
            log("replica rejected a report:", doc.get("code") if isinstance(doc, dict) else None)
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
        from firmware import trial as tried

        trial = tried.boot_check(self)
        if not trial:
            tried = None
            unload("firmware.trial")  # needed again only after the next install's reboot
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
                    if not tried.healthy(self):
                        raise OSError(110, "health check: no shadow round trip")
                    tried.confirm(self)
                    trial = tried = False
                    unload("firmware.trial")
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
    unload("firmware.config")
    power.arm_watchdog(cfg["wdt_ms"])
    Agent(cfg).run()
