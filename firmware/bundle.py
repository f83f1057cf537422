# bundle.py Fetch a release's signature bundle from the store, beside its image (a device
# that trusts signing keys; docs/signing.md). Loaded for this only: release.py, which checks
# the bundle, is loaded once this connection is closed, so its code and a TLS connection
# never share the heap.

from firmware import contract, https
from firmware.ota import UpdateError

MAX_BYTES = 4096  # a bundle is ~2 KiB


def fetch(ctx, cfg, fw, headers):
    """The bundle of the desired firmware `fw` (bytes), or None if the store has none (404),
    asked over the TLS context `ctx` with the download's own `headers`. Raises UpdateError,
    or OSError/ValueError for the network."""
    resp = https.get(ctx, url(fw["url"], fw["version"]), headers, cfg["net_timeout_s"])
    try:
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise https.refusal(resp)
        if resp.length is None or not 0 < resp.length <= MAX_BYTES:
            raise UpdateError(contract.E_HTTP, "a signature of %s bytes" % resp.length)
        body = resp.stream.read(resp.length)
        if len(body) != resp.length:
            raise UpdateError(contract.E_SIZE, "the connection closed after %d bytes" % len(body))
        return body
    finally:
        resp.close()


def url(image_url, version):
    """Where the store serves the signature bundle of release `version`, whose image is at
    `image_url`, under the same authorization: https://h/fw/<sha256>.bin?q ->
    https://h/fw/<sha256>.sig?q&version=<version>."""
    i = image_url.find("?")
    path, query = (image_url, "") if i < 0 else (image_url[:i], image_url[i + 1:])
    if not path.endswith(".bin"):
        raise UpdateError(contract.E_BAD_DESIRED, "url: not an image URL")
    v = ""
    for b in version.encode():  # percent-encode all but unreserved characters
        c = chr(b)
        v += c if 48 <= b <= 57 or 65 <= b <= 90 or 97 <= b <= 122 or c in "-._~" else "%%%02X" % b
    return path[:-4] + ".sig?" + (query + "&" if query else "") + "version=" + v
