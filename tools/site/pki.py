"""A local certificate authority for the broker and firmware store.

Devices verify every server they talk to (CERT_REQUIRED, the project CA, server_hostname), so the
services need certificates that chain to a CA the device holds. MicroPython's unix port only
parses DER for `cadata`, and ESP-IDF parses both, so the CA is shipped to devices as DER.

Keys are RSA-2048, not ECDSA P-256: in every handshake the device checks two signatures (the
CA's on the server certificate, the server's on its key exchange), and mbedTLS verifies RSA
(public exponent 65537) far faster than ECDSA. Measured with MicroPython's mbedTLS on loopback:
11 ms of CPU per handshake against 27 ms with a P-256 chain. The ESP32 also has a big-number
(RSA) accelerator that ESP-IDF's mbedTLS uses, and no ECC one. The servers pay for it in
signing (~1 ms per handshake), which they have to spare. Forward secrecy is unchanged: the
session key still comes from ECDHE, and the servers accept no TLS 1.2 suite without it
(TLS12_CIPHERS).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tools.site.secretfile import write_private

DEFAULT_NAMES = ("127.0.0.1", "localhost")

# The TLS 1.2 suites every server here accepts (store, amqtt, mosquitto): ECDHE key exchange
# and AEAD only. Without ECDHE (RSA key exchange) whoever gets a server key later can decrypt
# every recorded session, with the passwords and download URLs in it; mosquitto's default list
# allows that, and CBC-SHA1. MicroPython's mbedTLS offers ECDHE-RSA with AES-GCM. TLS 1.3
# suites (the host's clients) are always forward secret and not governed by this list.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


@dataclass(frozen=True)
class PKI:
    """Paths of one CA and the server certificate it issued."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_der(self) -> Path:
        return self.dir / "ca.der"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.key"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))


def make_ca(common_name: str = "esp32-fleet-ota local CA", days: int = 3650):
    """A new self-signed CA: returns (key, certificate)."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_server_cert(ca_key, ca_cert, names=DEFAULT_NAMES, not_before=None, not_after=None):
    """A server certificate for `names` (IP addresses or DNS names): returns (key, cert)."""
    key = _new_key()
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or _now() - dt.timedelta(minutes=5))
        .not_valid_after(not_after or _now() + dt.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def cert_names(cert: x509.Certificate) -> set[str]:
    """The IP addresses and DNS names a certificate is valid for."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(n) for n in sans.get_values_for_type(x509.IPAddress)} | set(sans.get_values_for_type(x509.DNSName))


def ensure_pki(directory: Path, names=DEFAULT_NAMES) -> PKI:
    """Create the CA and server certificate in `directory` unless they already exist. A server
    certificate that does not cover every one of `names` (serving on a LAN address for a real
    board, say) is reissued for the union of its names and these, by the same CA."""
    pki = PKI(Path(directory))
    pki.dir.mkdir(parents=True, exist_ok=True)
    if not (pki.ca_cert.exists() and pki.ca_key.exists()):
        key, cert = make_ca()
        _write_key(pki.ca_key, key)
        pki.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pki.ca_der.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    wanted = {str(ipaddress.ip_address(n)) if _is_ip(n) else n for n in names}
    have: set[str] = set()
    if pki.server_cert.exists() and pki.server_key.exists():
        have = cert_names(x509.load_pem_x509_certificate(pki.server_cert.read_bytes()))
    if not wanted <= have:
        names = sorted(have | wanted)
        ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
        key, cert = issue_server_cert(ca_key, ca_cert, names)
        _write_key(pki.server_key, key)
        pki.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pki


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def server_ssl_context(pki: PKI):
    """A server-side ssl.SSLContext for the store (TLS 1.2+, as MicroPython speaks 1.2)."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    return ctx
