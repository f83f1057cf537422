# contract.py The wire contract: topics, the firmware document, states and error codes.
#
# One module for both sides: the device firmware (MicroPython) and the replica, store and CLI
# (CPython) import this file, so a topic or a field can't be spelled two ways. Keep it in the
# common subset of both languages.
#
# Topics (seed pattern "Software Update", shadow contract after AWS IoT Device Shadow):
#   state/<id>/update            desired (operator) or reported (device) state, JSON
#   state/<id>/update/accepted   replica: the update was stored; echoes it with version
#   state/<id>/update/rejected   replica: {code, message, clientToken?}
#   state/<id>/update/delta      replica: desired fields that differ from reported
#   state/<id>/get               ask for the whole document
#   state/<id>/get/accepted      replica: {state: {desired, reported, delta}, version, ...}
#   state/<id>/get/rejected      replica: {code, message}; 404 before the first update
#   state/<id>/credentials/get   device: {sha256, clientToken} asks for a temporary download
#                                credential for the image its desired firmware names
#   state/<id>/credentials/get/accepted  {token, expires, sha256, clientToken}
#   state/<id>/credentials/get/rejected  {code, message, clientToken}

ROOT = "state"
UPDATE = "update"
UPDATE_ACCEPTED = "update/accepted"
UPDATE_REJECTED = "update/rejected"
UPDATE_DELTA = "update/delta"
UPDATE_DOCUMENTS = "update/documents"  # for applications; devices do not subscribe
GET = "get"
GET_ACCEPTED = "get/accepted"
GET_REJECTED = "get/rejected"
CREDENTIALS = "credentials/get"
CREDENTIALS_ACCEPTED = "credentials/get/accepted"
CREDENTIALS_REJECTED = "credentials/get/rejected"
SUFFIXES = (UPDATE, UPDATE_ACCEPTED, UPDATE_REJECTED, UPDATE_DELTA, UPDATE_DOCUMENTS, GET, GET_ACCEPTED,
             GET_REJECTED, CREDENTIALS, CREDENTIALS_ACCEPTED, CREDENTIALS_REJECTED)

# Documents: a request or answer carries {"state": {"desired"|"reported": {"firmware": {...}}}};
# a delta carries {"state": {"firmware": {...}}}. Build and read them with firmware_update and
# firmware_in, nowhere else.
DESIRED = "desired"
REPORTED = "reported"
DELTA = "delta"  # get/accepted's state.delta
FIRMWARE = "firmware"

# desired.firmware: url, version, sha256, size (check_firmware), and optionally:
# desired.firmware.auth: how the device proves it may download. Absent: the URL is pre-signed
# for this device (plus its own credential); "token": the URL is bare, and the device first
# asks for a temporary credential on CREDENTIALS and sends it as a bearer token.
AUTH_TOKEN = "token"

# desired.firmware.grant: an operator's MAC over the device id and the image it targets
# (tools/control/grants.py), for the replica and the renewer. A device neither needs nor
# reports it, so it is left out of the delta (NOT_REPORTED).
GRANT = "grant"

# Signed releases (docs/signing.md; the format and checks: firmware/release.py, loaded only to
# check one). The store serves a release's signature bundle beside its image: at the image's
# URL, under the same authorization, with .sig for .bin and the release version added
# (bundle.url). A device that trusts keys fetches and checks it before anything is
# erased, installs nothing else, and reports which key signed what runs (signer: the first
# SIGNER_CHARS hex digits of the key's digest) and that release's security counter.
# desired.firmware.signer names the key that signed the desired release, for people and
# tools reading the shadow; a device does not read it (it checks the signature itself), and
# it is never in a delta: a device that checks no signature reports none.
SIGNER = "signer"
NOT_REPORTED = ((FIRMWARE, GRANT), (FIRMWARE, SIGNER))  # desired leaves never in a delta
MAX_TRUSTED_KEYS = 3  # key digests a device trusts, as ESP32-S3 eFuses hold three Secure Boot V2 digests
SIGNER_CHARS = 16

MAX_DEVICE_ID = 64
MAX_DOCUMENT = 8192  # bytes of desired + reported, as AWS IoT Device Shadow
MAX_DEPTH = 6  # levels of objects in desired/reported; AWS: {"one": {"two": ... {"five": {}}}}
MAX_CLIENT_TOKEN = 64
MAX_URL = 1024
MAX_VERSION = 32
MAX_IMAGE_SIZE = 16 * 1024 * 1024  # esp_image_verify refuses partitions above 16 MB

# Replica rejection codes (HTTP-like, as the shadow service answers).
R_BAD_REQUEST = 400
R_NOT_FOUND = 404
R_CONFLICT = 409
R_FORBIDDEN = 403
R_TOO_LARGE = 413
R_UNSUPPORTED_ENCODING = 415  # not UTF-8
R_INTERNAL = 500

# state.reported.firmware: every field, every report (null deletes what no longer applies;
# reported objects merge). The running image, as the desired firmware it was installed from
# said (or as provisioning recorded it): version, sha256, size, url, allow_downgrade, auth;
# slot: the partition it runs from; the update: state (ST_*), error (E_*), target (the
# version being installed), attempts, need_url (true: a fresh pre-signed URL is needed),
# progress (percent of the download), mqtt and detail (free text about the last failure).
# A device that checks signatures adds signer (the key that signed the running image) and
# secure_version (the security counter in that image's signed manifest).
REPORT_FIELDS = ("version", "sha256", "size", "url", "allow_downgrade", "auth", "slot", "state", "error",
                 "target", "attempts", "need_url", "progress", "mqtt", "detail", "signer", "secure_version")

# Device update states, reported in state.reported.firmware.state.
ST_IDLE = "idle"
ST_DOWNLOADING = "downloading"
ST_VERIFYING = "verifying"
ST_REBOOTING = "rebooting"
ST_TRIAL = "trial"
ST_FAILED = "failed"

# Device error codes, reported in state.reported.firmware.error.
E_BAD_DESIRED = "bad_desired"  # the desired firmware document is malformed
E_TOO_BIG = "too_big"  # size larger than the inactive slot
E_HTTP = "http_status"  # the store answered other than 200/206 (transient: 5xx, bad range)
E_FORBIDDEN = "forbidden"  # 403: the store refuses this device or URL (permanent)
E_URL_EXPIRED = "url_expired"  # 403: the pre-signed URL expired; reported with need_url
E_NOT_FOUND = "not_found"  # 404: no such artifact (permanent)
E_DOWNGRADE = "downgrade_refused"  # desired is older than what runs, without allow_downgrade
E_SIZE = "size_mismatch"  # Content-Length or bytes received differ from the desired size
E_NOT_APP = "not_app_image"  # first block is not an ESP32 app image (e.g. firmware.bin)
E_HASH = "hash_mismatch"  # SHA-256 of the received bytes differs from the desired sha256
E_READBACK = "readback_mismatch"  # the slot does not hold what was written
E_VALIDATE = "validate_failed"  # set_boot() refused the image (ESP_ERR_OTA_VALIDATE_FAILED)
E_NETWORK = "network"  # connection, TLS or timeout failure
E_MEMORY = "out_of_memory"  # not enough heap to download (e.g. for a second TLS connection)
E_BUDGET = "byte_budget"  # downloaded more than BYTE_BUDGET x the image without finishing

E_ROLLED_BACK = "rolled_back"  # the new image did not confirm; the bootloader went back
E_TOKEN_EXPIRED = "token_expired"  # the temporary credential expired mid-download: get another
E_NO_CREDENTIAL = "no_credential"  # the broker refused a temporary credential (permanent)
# Signed releases (a device that trusts keys); all permanent, and all found before anything
# is erased.
E_UNSIGNED = "unsigned"  # the store has no signature for the desired release
E_BAD_SIGNATURE = "bad_signature"  # the signature does not verify with the key it names
E_UNTRUSTED_KEY = "untrusted_key"  # signed by a key this device does not (or no longer) trust
E_ROLLBACK = "rollback_refused"  # the manifest's secure_version is below the device's counter
E_MANIFEST = "manifest_mismatch"  # image hash, size, version or chip differ from the signed manifest

BYTE_BUDGET = 4  # a target may cost at most this many times its size in downloaded bytes

# Failures a device tries again (with backoff, up to its max_attempts); the rest wait for a
# new desired state. url_expired waits for a fresh URL (reported with need_url).
TRANSIENT_ERRORS = (E_NETWORK, E_HTTP, E_SIZE, E_MEMORY, E_ROLLED_BACK, E_READBACK, E_TOKEN_EXPIRED)

_HEX = "0123456789abcdef"


def topic(device_id, suffix):
    return ROOT + "/" + device_id + "/" + suffix


def parse_topic(t):
    """Split "state/<id>/<suffix>" into (id, suffix); None if it is not a contract topic."""
    if not t.startswith(ROOT + "/"):
        return None
    rest = t[len(ROOT) + 1 :]
    i = rest.find("/")
    if i <= 0:
        return None
    device_id, suffix = rest[:i], rest[i + 1 :]
    if not valid_device_id(device_id) or suffix not in SUFFIXES:
        return None
    return device_id, suffix


def valid_device_id(s):
    if not isinstance(s, str) or not 0 < len(s) <= MAX_DEVICE_ID:
        return False
    for c in s:
        if not (c.isalpha() or c.isdigit() or c in "-_."):
            return False
    return c.isalpha() or c.isdigit() or c in "-_"


def is_sha256_hex(s):
    if not isinstance(s, str) or len(s) != 64:
        return False
    for c in s:
        if c not in _HEX:
            return False
    return True


def check_firmware(fw):
    """Validate a desired `firmware` object; returns a new dict with exactly the known keys.

    Raises ValueError("<field>: <why>") for anything a device must not act on.
    """
    if not isinstance(fw, dict):
        raise ValueError("firmware: must be an object")
    url = fw.get("url")
    if not isinstance(url, str) or not url.startswith("https://") or len(url) > MAX_URL:
        raise ValueError("url: must be an https:// URL of at most %d characters" % MAX_URL)
    version = fw.get("version")
    if not isinstance(version, str) or not 0 < len(version) <= MAX_VERSION:
        raise ValueError("version: must be a string of 1 to %d characters" % MAX_VERSION)
    if not is_sha256_hex(fw.get("sha256")):
        raise ValueError("sha256: must be 64 lowercase hex digits")
    size = fw.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_IMAGE_SIZE:
        raise ValueError("size: must be an integer from 1 to %d" % MAX_IMAGE_SIZE)
    out = {"url": url, "version": version, "sha256": fw["sha256"], "size": size}
    allow = fw.get("allow_downgrade", False)
    if not isinstance(allow, bool):
        raise ValueError("allow_downgrade: must be true or false")
    if allow:
        out["allow_downgrade"] = True
    auth = fw.get("auth")
    if auth is not None and auth != AUTH_TOKEN:
        raise ValueError("auth: must be \"%s\" or absent" % AUTH_TOKEN)
    if auth:
        out["auth"] = auth
    return out


def firmware_update(section, firmware, token=None):
    """An update request setting state.<section>.firmware (DESIRED or REPORTED)."""
    doc = {"state": {section: {FIRMWARE: firmware}}}
    if token is not None:
        doc["clientToken"] = token
    return doc


def firmware_in(doc, section=None):
    """state.<section>.firmware of a shadow document or message (state.firmware of a delta:
    section None); None where there is none. Whatever its type: check it before use."""
    state = doc.get("state") if isinstance(doc, dict) else None
    if section is not None:
        state = state.get(section) if isinstance(state, dict) else None
    return state.get(FIRMWARE) if isinstance(state, dict) else None


def reported_firmware(image, update):
    """The reported firmware object: the running `image` (a check_firmware record) and the
    `update` fields (slot, state, ...); every REPORT_FIELDS key is there, null where unset."""
    fw = {}
    for k in REPORT_FIELDS:
        fw[k] = update.get(k, image.get(k))
    return fw


def compare_versions(a, b):
    """-1, 0 or 1 for dotted numeric versions ("1.10.2" > "1.9"); None if either is not
    of that form (then no order is assumed)."""
    pa, pb = a.split("."), b.split(".")
    for p in pa + pb:
        if not p.isdigit():
            return None
    na = [int(p) for p in pa]
    nb = [int(p) for p in pb]
    n = max(len(na), len(nb))
    na += [0] * (n - len(na))
    nb += [0] * (n - len(nb))
    return (na > nb) - (na < nb)


def split_url(url):
    """https://host[:port]/path?query -> (host, port, "/path?query")."""
    if not url.startswith("https://"):
        raise ValueError("url: not https")
    rest = url[8:]
    i = rest.find("/")
    hostport, path = (rest, "/") if i < 0 else (rest[:i], rest[i:])
    port = 443
    if hostport.startswith("["):
        raise ValueError("url: IPv6 literals are not supported")
    j = hostport.rfind(":")
    if j >= 0:
        port = int(hostport[j + 1 :])
        hostport = hostport[:j]
    if not hostport or not 0 < port < 65536:
        raise ValueError("url: bad host or port")
    return hostport, port, path
