# install.py Installing one desired firmware: a temporary credential when it needs one, the
# release's signature (a device that trusts keys), the download (or its resumption) into the
# inactive slot, the checks, a last look that it is still the desired one, set_boot() on that
# slot, reset.
#
# Loaded only while installing, with the download code, and dropped afterwards: RAM is tight
# on an ESP32 without PSRAM. It works through the agent's own interface (agent.py): `st`,
# `cfg`, `link`, go(), fail(), report(), reconnect(), ask(), on_progress().

import gc
import json

from firmware import contract, log, phases, power, slots, state, unload
from firmware.ota import UpdateError

# How long a request to a service (the renewer's token) is made again before it counts as a
# failed attempt: a restarting service or a broker restart drops requests for seconds.
_SERVICE_WAIT_MS = 30000


class Abandon(Exception):
    """The desired firmware changed while this one was being installed."""


def run(agent, fw, resume):
    """Install `fw`, resuming a download into the same slot when `resume`. Resets the board
    when the new image is set to boot; otherwise returns with the outcome recorded and
    reported, and the MQTT link back when it can be."""
    st = agent.st
    part = slots.next_update()
    label = slots.label(part)
    written = st["written"] if resume and st["slot"] == label else 0
    verify_only = resume and st["phase"] == phases.VERIFYING and st["slot"] == label
    if not verify_only:
        if not written:
            st["images"].pop(label, None)  # its contents are about to be erased
            st["signers"].pop(label, None)
        agent.go("install", target=fw, slot=label, error=None, written=written, verified=None)
    if st["fetched"] > contract.BYTE_BUDGET * fw["size"]:
        log("byte budget spent on", fw["version"])
        agent.fail(contract.E_BUDGET)
        agent.report()
        return
    log("installing", fw["version"], "into", label, "from", written, "attempt", st["attempts"] + 1)
    parked = agent.cfg["tls_slots"] < 2
    agent.report(progress=written * 100 // fw["size"], mqtt="parked for the download" if parked else None)
    headers = _basic(agent.cfg)
    try:
        if fw.get("auth") == contract.AUTH_TOKEN:
            headers = {"Authorization": "Bearer " + _credential(agent, fw)}  # while MQTT is still up
    except (UpdateError, OSError) as e:
        code = e.code if isinstance(e, UpdateError) else contract.E_NETWORK
        log("no download credential:", code)
        agent.fail(code)
        if not isinstance(e, UpdateError) and agent.link is not None:
            agent.link.close()  # the link broke while asking
            agent.link = None
        if agent.link is None:
            agent.reconnect()
        agent.report(detail=e.detail if isinstance(e, UpdateError) else None)
        return
    if parked:
        _park_link(agent)
    gc.collect()
    inst = None
    try:
        if agent.cfg["trusted_keys"]:
            st["verified"] = _check_release(agent, fw, headers)  # before a byte is written
            state.save(st)
        from firmware.installer import BLOCK, Installer

        inst = Installer(part, headers, agent.cfg["net_timeout_s"], agent.cfg["ca_file"])
        Installer = headers = None  # nothing but `inst` holds the download code
        if gc.mem_free() < agent.cfg["min_free_heap"]:
            raise MemoryError()  # not enough for a TLS connection: erase nothing
        if not verify_only:
            want = _unhex(fw["sha256"])
            checkpoint = _checkpointer(agent)
            digest, resumed = inst.download(fw, written, checkpoint, agent.on_progress)
            if digest != want and resumed:
                log("hash mismatch after resuming: downloading everything again")
                agent.go("install", written=0)
                digest, _ = inst.download(fw, 0, checkpoint, agent.on_progress)
            if digest != want:
                raise UpdateError(contract.E_HASH, "received bytes do not match sha256")
            st["fetched"] += fw["size"] - st["written"]
            agent.go("downloaded", written=fw["size"] // BLOCK * BLOCK)
        inst.read_back(fw)
        inst = None
        unload("firmware.installer", "firmware.https")  # the rest needs neither: room for MQTT
        if not _still_wanted(agent, fw):
            raise Abandon()
        try:
            part.set_boot()  # the slot written, and the bootloader's own image check
        except OSError as e:
            raise UpdateError(contract.E_VALIDATE, str(e))
    except Abandon:
        log("the desired firmware changed: abandoning", fw["version"])
        st["written"] = 0
        state.save(st)
        inst = None
        unload("firmware.installer", "firmware.https")
        if agent.link is None:
            agent.reconnect()
        if agent.link is not None:
            agent.ask()
        return
    except UpdateError as e:
        log("update failed:", e.code, e.detail)
        code = e.code
        if code == contract.E_URL_EXPIRED and fw.get("auth") == contract.AUTH_TOKEN:
            code = contract.E_TOKEN_EXPIRED  # not the URL: the next attempt asks for another token
        agent.fail(code, progressed=st["written"] > written)
    except (OSError, ValueError) as e:  # network; TLS errors arrive as ValueError
        log("update failed:", repr(e))
        # wrap_socket raises OSError(ENOMEM) when the board has no memory for TLS
        agent.fail(contract.E_MEMORY if e.args and e.args[0] == 12 else contract.E_NETWORK,
                   progressed=st["written"] > written)
    except MemoryError:
        inst = None
        gc.collect()
        log("update failed: out of memory")
        agent.fail(contract.E_MEMORY)
    else:
        agent.go("verified")
        if agent.link is None:
            agent.reconnect()  # MQTT was parked for the download: say what happens next
        agent.report()
        log("rebooting into", label)
        if agent.link is not None:
            agent.link.close()
        power.reset()
    inst = None
    unload("firmware.installer", "firmware.https")
    if agent.link is None:
        agent.reconnect()
    agent.report()


def _check_release(agent, fw, headers):
    """The release's signature bundle, fetched from the store and checked (release.py) once
    that connection is closed, before the download's buffer and TLS context exist. Each
    module is loaded for its step only. Returns the seal; raises UpdateError, or
    OSError/ValueError for the network."""
    from firmware import bundle, trust

    try:
        body = bundle.fetch(trust.load(agent.cfg["ca_file"]), agent.cfg, fw, headers)
    finally:
        bundle = None
        unload("firmware.bundle")
    from firmware import release

    try:
        seal = release.check(agent.cfg, fw, body)
    finally:
        release = body = None
        unload("firmware.release", "firmware.rsapss")
    log("signature of", fw["version"], "verified: key", seal["signer"], "secure_version", seal["secure_version"])
    return seal


def _basic(cfg):
    import binascii

    cred = binascii.b2a_base64(("%s:%s" % (cfg["device_id"], cfg["mqtt_password"])).encode())
    return {"Authorization": "Basic " + cred.decode().strip()}


def _unhex(s):
    import binascii

    return binascii.unhexlify(s)


def _credential(agent, fw):
    """A temporary download credential for this one image, asked for over MQTT (before the
    link is parked). Returns the token; raises UpdateError."""
    if agent.link is None:
        agent.reconnect()
    if agent.link is None:
        raise UpdateError(contract.E_NETWORK, "no broker to ask for a credential")
    doc = agent.link.exchange(contract.CREDENTIALS, {"sha256": fw["sha256"]},
                              (contract.CREDENTIALS_ACCEPTED, contract.CREDENTIALS_REJECTED),
                              _SERVICE_WAIT_MS, "cred")
    if doc is None:
        raise UpdateError(contract.E_NETWORK, "no answer to the credential request")
    cred = doc.get("token")
    if not isinstance(cred, str) or not cred or len(cred) > 256:
        raise UpdateError(contract.E_NO_CREDENTIAL, str(doc.get("message"))[:80])
    return cred


def _park_link(agent):
    # One TLS connection at a time on this board: close MQTT and drop its code.
    if agent.link is not None:
        agent.link.close()
        agent.link = None
    unload("firmware.link", "umqtt.simple", "umqtt")


def _checkpointer(agent):
    """Called every 64 KiB of the download: persist the progress (a reset resumes from it)
    and, with MQTT up alongside, stop when another image is desired now."""
    st = agent.st

    def checkpoint(written):
        st["fetched"] += max(0, written - st["written"])
        st["written"] = written
        state.save(st)
        power.feed()
        link = agent.link
        if link is not None and agent.cfg["tls_slots"] >= 2:
            link.poll(0)
            want = st["target"]["sha256"]
            for suffix, msg in link.inbox:
                if suffix == contract.UPDATE_DELTA and b"sha256" in msg:
                    try:
                        sha = contract.firmware_in(json.loads(msg))["sha256"]
                    except (ValueError, TypeError, KeyError):
                        continue
                    if sha != want:
                        raise Abandon()  # a different image is desired now: stop and look

    return checkpoint


def _still_wanted(agent, fw):
    """Before committing: is this still the desired image? (True if we cannot tell.)"""
    if agent.link is None:
        agent.reconnect()
    if agent.link is None:
        return True
    doc = agent.link.exchange(contract.GET, {}, (contract.GET_ACCEPTED,), 6000, "check")
    desired = contract.firmware_in(doc, contract.DESIRED)
    return not isinstance(desired, dict) or desired.get("sha256") == fw["sha256"]
