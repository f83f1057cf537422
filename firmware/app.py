# app.py The device agent: follow the desired firmware in the shadow, report what runs.
#
# Boot: decide from the persisted update state and the running slot whether this boot is
# the trial of a new image, a rollback, or ordinary. A trial must pass a health check
# (broker over TLS, shadow round trip) before mark_app_valid_cancel_rollback(); if it does not,
# the device resets unconfirmed and the bootloader goes back to the old image, which then
# reports `failed: rolled_back`. Identity is the SHA-256 of the running image, never a claim.
#
# Steady state: on every (re)connect ask for the whole shadow (state/<id>/get) and act on
# desired.firmware; a delta only triggers another get. Reports are state.reported.firmware.

import gc
import json
import random
import time

from firmware import clock, contract, link, power, slots, state, wifi
from firmware.updater import UpdateError, Updater

_TRANSIENT = (contract.E_NETWORK, contract.E_HTTP, contract.E_SIZE, contract.E_MEMORY)


def log(*args):
    print("[ota]", *args)


class Agent:
    def __init__(self, cfg):
        self.cfg = cfg
        self.st = state.load()
        self.run_label = slots.label(slots.running())
        self.link = None
        self.doc_version = -1
        self.retry_at = None  # ticks_ms when a transient failure may be retried
        self._progress_at = (0, 0)  # (percent, ticks_ms) of the last progress report
        from firmware import https

        import binascii

        cred = binascii.b2a_base64(("%s:%s" % (cfg["device_id"], cfg["mqtt_password"])).encode())
        self.updater = Updater(
            https.tls_context(cfg["ca"]),
            {"Authorization": "Basic " + cred.decode().strip()},
            cfg["net_timeout_s"],
        )

    # -- what happened across the last reset ---------------------------------------------

    def boot_check(self):
        """Returns True if this boot is the trial of a freshly installed image."""
        st = self.st
        if st["phase"] == contract.ST_REBOOTING and st["slot"]:
            if self.run_label == st["slot"]:
                log("trial boot of", st["target"]["version"], "in", self.run_label)
                return True
            # The new image did not confirm itself and the bootloader went back.
            log("back on", self.run_label, ": the trial of", st["slot"], "failed")
            self._fail(contract.E_ROLLED_BACK)
        elif st["phase"] == contract.ST_DOWNLOADING:
            log("a reset interrupted the download")
            self._fail(contract.E_NETWORK, transient=True)
        elif st["phase"] == contract.ST_IDLE and slots.pending_verify():
            # Running an unconfirmed image we know nothing about: do not keep it.
            log("unconfirmed image with no update record: resetting to roll back")
            power.reset()
        return False

    def _fail(self, code, transient=False):
        st = self.st
        st["phase"], st["error"] = contract.ST_FAILED, code
        if transient and st["attempts"] < self.cfg["max_attempts"]:
            # Capped exponential backoff with jitter, so a fleet does not retry in step.
            delay = min(60000, 1000 * 2 ** st["attempts"])
            self.retry_at = time.ticks_add(time.ticks_ms(), delay // 2 + random.getrandbits(16) % (delay // 2 + 1))
        else:
            st["attempts"] = max(st["attempts"], self.cfg["max_attempts"])  # permanent: stop
            self.retry_at = None
        state.save(st)

    # -- reports ------------------------------------------------------------------------

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
        rec = self.running_image()
        failed = self.st["phase"] == contract.ST_FAILED and self.st["target"]
        # Every field the device owns, every time: null deletes what no longer applies, so
        # no stale progress or error survives in the shadow (reported objects are merged).
        fw = {
            "version": rec["version"],
            "sha256": rec["sha256"],
            "size": rec["size"],
            "url": rec["url"],
            "slot": self.run_label,
            "state": self.st["phase"],
            "error": self.st["error"],
            "target": self.st["target"]["version"] if failed else None,
            "attempts": self.st["attempts"] if failed else None,
            "progress": None,
            "mqtt": None,
            "detail": None,
        }
        fw.update(extra)
        self.link.report(fw)

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

    # -- trial ---------------------------------------------------------------------------

    def health_check(self):
        """The new image can reach the broker over TLS and round-trip the shadow."""
        token = "health-%d" % random.getrandbits(24)
        self.link.request_get(token)
        doc = self.link.wait_for(contract.GET_ACCEPTED, self.cfg["health_deadline_s"] * 1000, token)
        return doc is not None

    def finish_trial(self):
        st = self.st
        target = st["target"]
        digest = slots.sha256_of(slots.running(), target["size"], self.updater.buf)
        import binascii

        if binascii.hexlify(digest).decode() != target["sha256"]:
            # Not the image we installed: never confirm it.
            log("running image does not hash to the target: rolling back")
            self._fail(contract.E_HASH)
            power.reset()
        slots.confirm()  # before saving: a reset in between re-runs the trial, harmlessly
        st["images"][self.run_label] = dict(target)
        st["phase"], st["target"], st["slot"], st["error"], st["attempts"] = (
            contract.ST_IDLE, None, None, None, 0)
        state.save(st)
        log("confirmed", target["version"], "in", self.run_label)

    # -- acting on the shadow -----------------------------------------------------------

    def on_document(self, doc):
        if not isinstance(doc, dict) or not isinstance(doc.get("state"), dict):
            return
        version = doc.get("version")
        if isinstance(version, int):
            if version < self.doc_version:
                return  # stale answer
            self.doc_version = version
        desired = doc["state"].get("desired")
        if not isinstance(desired, dict) or "firmware" not in desired:
            return
        try:
            fw = contract.check_firmware(desired["firmware"])
        except ValueError as e:
            if self.st["error"] != contract.E_BAD_DESIRED:
                log("ignoring desired firmware:", e)
                self.st["phase"], self.st["error"] = contract.ST_FAILED, contract.E_BAD_DESIRED
                state.save(self.st)
                self.report(detail=str(e))
            return
        rec = self.running_image()
        if rec["sha256"] == fw["sha256"]:
            if rec["url"] != fw["url"] or rec["version"] != fw["version"] or self.st["phase"] != "idle":
                # Same image under a new URL or name: adopt the labels, no download.
                self.st["images"][self.run_label] = dict(fw)
                self.st["phase"], self.st["error"], self.st["target"] = contract.ST_IDLE, None, None
                state.save(self.st)
                self.report()
            return
        st = self.st
        same_target = st["target"] is not None and st["target"]["sha256"] == fw["sha256"]
        if not same_target:
            st["attempts"] = 0
        elif st["attempts"] >= self.cfg["max_attempts"]:
            if st["phase"] != contract.ST_FAILED:  # whatever ended the last try, it was the last
                self._fail(st["error"] or contract.E_NETWORK)
                self.report()
            return  # gave up on this image; a new desired state is needed
        elif self.retry_at is not None and time.ticks_diff(self.retry_at, time.ticks_ms()) > 0:
            return  # serve() asks again when the backoff has passed
        self.install(fw)

    def install(self, fw):
        st = self.st
        part = slots.next_update()
        st["images"].pop(slots.label(part), None)  # its contents are about to be erased
        st["phase"], st["target"], st["slot"], st["error"] = (
            contract.ST_DOWNLOADING, fw, slots.label(part), None)
        st["attempts"] += 1
        state.save(st)
        self._progress_at = (0, time.ticks_ms())
        log("installing", fw["version"], "into", st["slot"], "attempt", st["attempts"])
        if self.cfg["tls_slots"] < 2:
            self.report(progress=0, mqtt="parked for the download")
            self.link.close()  # one TLS connection at a time on this board
            self.link = None
        else:
            self.report(progress=0)
        gc.collect()
        try:
            self.updater.install(fw, self._on_progress)
        except UpdateError as e:
            log("update failed:", e.code, e.detail)
            self._fail(e.code, transient=e.code in _TRANSIENT)
            if self.link is None:
                self._reconnect()
            self.report()
            return
        except (OSError, ValueError) as e:  # network; TLS errors arrive as ValueError
            log("update failed:", repr(e))
            # wrap_socket raises OSError(ENOMEM) when the board has no memory for TLS
            code = contract.E_MEMORY if e.args and e.args[0] == 12 else contract.E_NETWORK
            self._fail(code, transient=True)
            if self.link is None:
                self._reconnect()
            self.report()
            return
        except MemoryError:
            gc.collect()
            log("update failed: out of memory")
            self._fail(contract.E_MEMORY, transient=True)
            if self.link is None:
                self._reconnect()
            self.report()
            return
        st["phase"] = contract.ST_REBOOTING
        state.save(st)
        if self.link is None:
            self._reconnect()  # MQTT was parked for the download: say what happens next
        self.report()
        log("rebooting into", st["slot"])
        if self.link is not None:
            self.link.close()
        power.reset()

    def _reconnect(self):
        """One bounded attempt to bring MQTT back; on failure the report waits for later."""
        gc.collect()
        try:
            self.link = link.Link(self.cfg)
            self.link.connect()
        except Exception as e:  # noqa: BLE001 - best effort; the state is already persisted
            log("could not reconnect to report:", repr(e))
            if self.link is not None:
                self.link.close()
            self.link = None

    def serve(self):
        while True:
            power.feed()
            self.link.poll(500)
            while self.link.inbox:
                suffix, msg = self.link.inbox.pop(0)
                gc.collect()
                try:
                    doc = json.loads(msg)
                except ValueError:
                    log("dropping a message that is not JSON on", suffix)
                    continue
                if suffix == contract.UPDATE_DELTA:
                    if isinstance(doc, dict) and isinstance(doc.get("state"), dict):
                        if "firmware" in doc["state"]:
                            self.link.request_get()
                elif suffix == contract.GET_ACCEPTED:
                    self.on_document(doc)
                    if self.link is None:
                        return  # install() dropped the link to free TLS memory
                elif suffix == contract.UPDATE_REJECTED:
                    log("replica rejected a report:", doc)
            if self.retry_at is not None and time.ticks_diff(time.ticks_ms(), self.retry_at) >= 0:
                self.retry_at = None
                self.link.request_get()  # act on the desired state as it is now

    # -- main loop ------------------------------------------------------------------------

    def run(self):
        trial = self.boot_check()
        t_boot = time.ticks_ms()
        failures = 0
        while True:
            try:
                wifi.connect(self.cfg["wifi_ssid"], self.cfg["wifi_password"])
                clock.ensure(self.cfg["ntp_host"])
                gc.collect()  # the TLS handshake needs its buffers in one piece
                self.link = link.Link(self.cfg)
                self.link.connect()
                if trial:
                    if not self.health_check():
                        raise OSError(110, "health check: no shadow round trip")
                    self.finish_trial()
                    trial = False
                failures = 0
                self.report()
                self.link.request_get()
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
            failures += 1
            delay = min(30000, 500 * 2 ** min(failures, 6))
            delay = delay // 2 + random.getrandbits(16) % (delay // 2 + 1)
            t0 = time.ticks_ms()
            while time.ticks_diff(time.ticks_ms(), t0) < delay:
                power.feed()
                time.sleep_ms(100)


def main():
    import sys

    from firmware import config

    cfg = config.load()
    # Configuration is read once: drop its code from RAM (it is ~3 KiB of bytecode).
    del sys.modules["firmware.config"]
    del config
    gc.collect()
    power.arm_watchdog(cfg["wdt_ms"])
    Agent(cfg).run()
