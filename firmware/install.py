# install.py Deciding what a desired firmware asks for, and installing it: download (or
# resume), verify, check it is still wanted, set_boot(), reset. Part of the Agent (app.py).
#
# RAM is the constraint on an ESP32 without PSRAM: the download code, its 4 KiB buffer and
# the MQTT code are loaded only while they are needed and dropped afterwards (_unload).

import gc
import json
import time

from firmware import contract, phases, power, slots, state


# How long a request to a service (the renewer's token) is made again before it counts as a
# failed attempt: a restarting service or a broker restart drops requests for seconds.
_SERVICE_WAIT_MS = 30000


def log(*args):
    print("[ota]", *args)


def _unload(*names):
    """Drop modules from RAM until they are imported again (bytecode is ~2x its .mpy size
    in RAM; on a board without frozen firmware that matters). The parent package holds a
    reference to each submodule too, so that goes as well."""
    import sys

    for name in names:
        sys.modules.pop(name, None)
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            try:
                delattr(sys.modules[parent], child)
            except (AttributeError, KeyError):  # MicroPython raises KeyError
                pass
    gc.collect()


def _new_link(cfg):
    from firmware.link import Link

    return Link(cfg)


class Abandon(Exception):
    """The desired firmware changed while this one was being installed."""


def _unhex(s):
    import binascii

    return binascii.unhexlify(s)


class Installer:
    """Mixin for Agent: needs self.cfg, self.st, self.link, self.updater, self.report(),
    self.ask(), self._reconnect(), self._go(), self._fail(), self._on_progress()."""

    def _load_updater(self):
        if self.updater is None:
            import binascii

            from firmware import trust
            from firmware.updater import Updater

            cfg = self.cfg
            cred = binascii.b2a_base64(("%s:%s" % (cfg["device_id"], cfg["mqtt_password"])).encode())
            self.updater = Updater(None, {"Authorization": "Basic " + cred.decode().strip()},
                                   cfg["net_timeout_s"])
            # The 4 KiB block buffer first, the CA (read, parsed, dropped) after it: a hole
            # the CA leaves below the buffer would split the free heap for good.
            self.updater.ctx = trust.load(cfg["ca_file"])
        return self.updater

    def _credential(self, fw):
        """A temporary download credential for this one image, asked for over MQTT (before
        the link is parked). Returns the token; raises UpdateError."""
        from firmware.updater import UpdateError

        if self.link is None:
            self._reconnect()
        if self.link is None:
            raise UpdateError(contract.E_NETWORK, "no broker to ask for a credential")
        doc = self.link.exchange(contract.CREDENTIALS, {"sha256": fw["sha256"]},
                                 (contract.CREDENTIALS_ACCEPTED, contract.CREDENTIALS_REJECTED),
                                 _SERVICE_WAIT_MS, "cred")
        if doc is None:
            raise UpdateError(contract.E_NETWORK, "no answer to the credential request")
        cred = doc.get("token")
        if not isinstance(cred, str) or not cred or len(cred) > 256:
            raise UpdateError(contract.E_NO_CREDENTIAL, str(doc.get("message"))[:80])
        return cred

    def _drop_updater(self):
        # The download code and its 4 KiB buffer are ~11 KiB of heap: give them back.
        self.updater = None
        _unload("firmware.updater", "firmware.https")

    def _park_link(self):
        # One TLS connection at a time on this board: close MQTT and drop its code.
        if self.link is not None:
            self.link.close()
            self.link = None
        _unload("firmware.link", "umqtt.simple", "umqtt")

    def _checkpoint(self, written):
        # Persisted every 64 KiB: after a reset the download resumes from here.
        st = self.st
        st["fetched"] += max(0, written - st["written"])
        st["written"] = written
        state.save(st)
        power.feed()
        if self.link is not None and self.cfg["tls_slots"] >= 2:
            self.link.poll(0)
            want = self.st["target"]["sha256"]
            for suffix, msg in self.link.inbox:
                if suffix == contract.UPDATE_DELTA and b"sha256" in msg:
                    try:
                        sha = contract.firmware_in(json.loads(msg))["sha256"]
                    except (ValueError, TypeError, KeyError):
                        continue
                    if sha != want:
                        raise Abandon()  # a different image is desired now: stop and look

    def _still_wanted(self, fw):
        """Before committing: is this still the desired image? (True if we cannot tell.)"""
        if self.link is None:
            self._reconnect()
        if self.link is None:
            return True
        doc = self.link.exchange(contract.GET, {}, (contract.GET_ACCEPTED,), 6000, "check")
        desired = contract.firmware_in(doc, contract.DESIRED)
        return not isinstance(desired, dict) or desired.get("sha256") == fw["sha256"]

    # -- acting on the shadow ---------------------------------------------------------------

    def on_document(self, doc):
        """Decide what the desired firmware in a shadow document asks for. Returns
        (firmware, resume) to install, or None. The caller drops the document (several KiB
        with its metadata) before installing."""
        if not isinstance(doc, dict) or not isinstance(doc.get("state"), dict):
            return None
        version = doc.get("version")
        if isinstance(version, int):
            if version < self.doc_version:
                return None  # stale answer
            self.doc_version = version
        desired = contract.firmware_in(doc, contract.DESIRED)
        if desired is None:
            return None
        st = self.st
        try:
            fw = contract.check_firmware(desired)
        except ValueError as e:
            if st["error"] != contract.E_BAD_DESIRED:
                log("ignoring desired firmware:", e)
                self._fail(contract.E_BAD_DESIRED)
                self.report(detail=str(e))
            return None
        rec = self.running_image()
        if rec["sha256"] == fw["sha256"]:
            if rec != fw or st["phase"] != phases.IDLE:
                # Same image under a new URL, name or grant: adopt the labels, no download.
                st["images"][self.run_label] = dict(fw)
                self._go("adopt", target=None, slot=None, error=None, attempts=0, written=0, fetched=0)
                self.report()
            return None
        order = contract.compare_versions(fw["version"], rec["version"])
        if order is not None and order < 0 and not fw.get("allow_downgrade"):
            if st["error"] != contract.E_DOWNGRADE or st["target"] != fw:
                log("refusing downgrade to", fw["version"])
                st["target"] = fw
                self._fail(contract.E_DOWNGRADE)
                self.report()
            return None
        # The same image resumes where its download stopped; any change to the desired
        # document (a fresh URL, allow_downgrade, a new version label) is a new request and
        # gets a fresh set of attempts. An unchanged one after a failure waits: for the
        # backoff, for a new URL, or (after max_attempts or a permanent error) for a change.
        same_target = st["target"] is not None and st["target"]["sha256"] == fw["sha256"]
        if st["target"] != fw:
            st["attempts"] = 0
            self.retry_at = None
            if not same_target:
                st["fetched"] = 0
        elif st["phase"] == phases.FAILED:
            if st["attempts"] >= self.cfg["max_attempts"] or st["error"] == contract.E_URL_EXPIRED:
                return None
            if self.retry_at is not None and time.ticks_diff(self.retry_at, time.ticks_ms()) > 0:
                return None  # serve() asks again when the backoff has passed
        return fw, same_target

    def install(self, fw, resume):
        from firmware.updater import BLOCK, UpdateError

        st = self.st
        part = slots.next_update()
        label = slots.label(part)
        written = st["written"] if resume and st["slot"] == label else 0
        verify_only = resume and st["phase"] == phases.VERIFYING and st["slot"] == label
        if not verify_only:
            if not written:
                st["images"].pop(label, None)  # its contents are about to be erased
            self._go("install", target=fw, slot=label, error=None, written=written)
        self._progress_at = (0, time.ticks_ms())
        if st["fetched"] > contract.BYTE_BUDGET * fw["size"]:
            log("byte budget spent on", fw["version"])
            self._fail(contract.E_BUDGET)
            self.report()
            return
        log("installing", fw["version"], "into", label, "from", written, "attempt", st["attempts"] + 1)
        parked = self.cfg["tls_slots"] < 2
        self.report(progress=written * 100 // fw["size"], mqtt="parked for the download" if parked else None)
        bearer = None
        try:
            if fw.get("auth") == contract.AUTH_TOKEN:
                bearer = self._credential(fw)  # while MQTT is still up
        except (UpdateError, OSError) as e:
            code = e.code if isinstance(e, UpdateError) else contract.E_NETWORK
            log("no download credential:", code)
            self._fail(code)
            if not isinstance(e, UpdateError) and self.link is not None:
                self.link.close()  # the link broke while asking
                self.link = None
            if self.link is None:
                self._reconnect()
            self.report(detail=e.detail if isinstance(e, UpdateError) else None)
            return
        if parked:
            self._park_link()
        gc.collect()
        try:
            updater = self._load_updater()
            if bearer:
                updater.headers = {"Authorization": "Bearer " + bearer}
            bearer = None
            if gc.mem_free() < self.cfg["min_free_heap"]:
                raise MemoryError()  # not enough for a TLS connection: erase nothing
            if not verify_only:
                digest, resumed = updater.download(fw, written, self._checkpoint, self._on_progress)
                if digest != _unhex(fw["sha256"]) and resumed:
                    log("hash mismatch after resuming: downloading everything again")
                    self._go("install", written=0)
                    digest, _ = updater.download(fw, 0, self._checkpoint, self._on_progress)
                if digest != _unhex(fw["sha256"]):
                    raise UpdateError(contract.E_HASH, "received bytes do not match sha256")
                st["fetched"] += fw["size"] - st["written"]
                self._go("downloaded", written=fw["size"] // BLOCK * BLOCK)
            updater.read_back(fw)
            updater = None
            self._drop_updater()  # the rest needs no buffer: make room for MQTT again
            if not self._still_wanted(fw):
                raise Abandon()
            try:
                slots.next_update().set_boot()  # the bootloader's own image check
            except OSError as e:
                raise UpdateError(contract.E_VALIDATE, str(e))
        except Abandon:
            log("the desired firmware changed: abandoning", fw["version"])
            self.st["written"] = 0
            state.save(self.st)
            self._drop_updater()
            if self.link is None:
                self._reconnect()
            if self.link is not None:
                self.ask()
            return
        except UpdateError as e:
            log("update failed:", e.code, e.detail)
            code = e.code
            if code == contract.E_URL_EXPIRED and fw.get("auth") == contract.AUTH_TOKEN:
                code = contract.E_TOKEN_EXPIRED  # not the URL: the next attempt asks for another token
            self._fail(code, progressed=st["written"] > written)
        except (OSError, ValueError) as e:  # network; TLS errors arrive as ValueError
            log("update failed:", repr(e))
            # wrap_socket raises OSError(ENOMEM) when the board has no memory for TLS
            self._fail(contract.E_MEMORY if e.args and e.args[0] == 12 else contract.E_NETWORK,
                       progressed=st["written"] > written)
        except MemoryError:
            gc.collect()
            log("update failed: out of memory")
            self._fail(contract.E_MEMORY)
        else:
            self._go("verified")
            if self.link is None:
                self._reconnect()  # MQTT was parked for the download: say what happens next
            self.report()
            log("rebooting into", label)
            if self.link is not None:
                self.link.close()
            power.reset()
        self._drop_updater()
        if self.link is None:
            self._reconnect()
        self.report()

