"""The device's RSA-PSS verifier (firmware/rsapss.py, under MicroPython) against `cryptography`.

Proven here:

* On ~380 generated cases (valid signatures by several keys; bit flips in the signature, the
  message hash and the key's modulus; signatures made with other salt lengths; signatures of
  the wrong length, of a value outside 1..n-1, or s + n for a valid s; another signer's key;
  encodings signed with raw RSA that are right but for one fault: a nonzero padding octet, a
  wrong separator or trailer, EM's top bit set; a key of exponent 3, and its modulus in a block
  claiming 65537; RSA-2048 keys) the device accepts exactly what an independent verifier
  accepts: OpenSSL through `cryptography`, with RSASSA-PSS SHA-256 / MGF1-SHA-256 / salt 32,
  for an RSA-3072 key of exponent 65537. Every category gets the verdict it should have, and
  each of the device's refusals is reached.
* The device's key digest (rsapss.key_digest of the Secure Boot V2 key block) is the one the
  host tools write (signing.key_digest) and the one `espsecure digest-sbv2-public-key` writes.
* A few thousand fuzzed signature byte strings never make rsapss.verify raise and are never
  accepted; only the untouched signature (the control) is.

The independent verdict adds one rule of RFC 8017 (8.1.2 step 1: S is exactly k = 384 octets)
that OpenSSL leaves out: it reads a shorter S as the number it spells, so a valid signature
whose first octet is 0, with that octet dropped, verifies there. The device refuses it; a
case shows the difference is there and that the device is the strict side.

The device side runs in one MicroPython process over a cases file, as the firmware is
deployed (copy_firmware: compiled .mpy).
"""

import hashlib
import json
import random
import struct
import subprocess
import sys
from collections import Counter, defaultdict
from functools import cache
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from conftest import run_micropython
from tools.board.provision import copy_firmware
from tools.site import signing

K = 384  # octets of an RSA-3072 modulus and signature
BLOCK = 2 * K + 8
E = 65537
PREHASHED = utils.Prehashed(hashes.SHA256())


def pss(salt_length):
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt_length)


PSS32 = pss(32)  # the scheme, written out here rather than taken from tools/site/signing.py


@cache
def key(e: int = E, bits: int = 3072, which: int = 0) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=e, key_size=bits)


def sign(k: rsa.RSAPrivateKey, mhash: bytes, padding_=PSS32) -> bytes:
    return k.sign(mhash, padding_, PREHASHED)


def sbv2_block(n: int, e: int, nbytes: int) -> bytes:
    """The Secure Boot V2 key-block layout for a modulus of `nbytes` octets (for the RSA-2048
    key's own, shorter block; the RSA-3072 blocks come from signing.key_block)."""
    r2 = pow(2, 2 * 8 * nbytes, n)
    m = -pow(n, -1, 1 << 32) & 0xFFFFFFFF
    return struct.pack(f"<{nbytes}sI{nbytes}sI", n.to_bytes(nbytes, "little"), e, r2.to_bytes(nbytes, "little"), m)


def crypto_alone(block: bytes, sig: bytes, mhash: bytes) -> bool:
    """OpenSSL's verdict on the key the block spells (n and e, little-endian): RSA-3072,
    exponent 65537, PSS-SHA-256 with a 32-byte salt."""
    if len(block) != BLOCK:
        return False
    n = int.from_bytes(block[:K], "little")
    e = int.from_bytes(block[K:K + 4], "little")
    try:
        pub = rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError:
        return False
    if pub.key_size != 8 * K or e != E:
        return False
    try:
        pub.verify(sig, mhash, PSS32, PREHASHED)
    except InvalidSignature:
        return False
    return True


def independent(block: bytes, sig: bytes, mhash: bytes) -> bool:
    # RFC 8017 8.1.2 step 1, which OpenSSL does not apply (see the module docstring)
    return len(sig) == K and crypto_alone(block, sig, mhash)


DEVICE = """
import binascii, json
from firmware import rsapss

def outcome(block, sig, mhash):
    try:
        n, e = rsapss.key_of(block)
    except ValueError:
        return "key"
    r = rsapss.verify(n, e, sig, mhash)
    return "ok" if r is True else "bad" if r is False else "odd " + repr(r)

out = []
with open("cases.jsonl") as f:
    for line in f:
        block, sig, mhash = [binascii.unhexlify(x) for x in json.loads(line)]
        try:
            out.append(outcome(block, sig, mhash))
        except Exception as e:
            out.append("raised " + repr(e))
digests = []
with open("keys.jsonl") as f:
    for line in f:
        digests.append(binascii.hexlify(rsapss.key_digest(binascii.unhexlify(json.loads(line)))).decode())
print(json.dumps({"outcomes": out, "digests": digests}))
"""


def flip(data: bytes, bit: int) -> bytes:
    """`data` with bit `bit` flipped, bit 0 being the least significant of the last octet."""
    b = bytearray(data)
    b[len(b) - 1 - bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def mgf1(seed: bytes, length: int) -> bytes:
    out = b"".join(hashlib.sha256(seed + c.to_bytes(4, "big")).digest() for c in range(-(-length // 32)))
    return out[:length]


def encoded(mhash: bytes, salt: bytes, fault: tuple = ()) -> bytes:
    """EMSA-PSS-ENCODE (RFC 8017 9.1.1; emBits 3071, so EM is K octets with its top bit clear),
    with one fault put in: ("ps", index, value), ("separator", value), ("trailer", value) or
    ("top bit",). A signer makes no such encodings; raw RSA with the private key signs them,
    so that the checks of the encoding's structure are reached with every other part right."""
    h = hashlib.sha256(bytes(8) + mhash + salt).digest()
    db = bytearray(K - len(salt) - 32 - 2) + b"\x01" + salt
    if fault[:1] == ("ps",):
        db[fault[1]] = fault[2]
    if fault[:1] == ("separator",):
        db[-len(salt) - 1] = fault[1]
    masked = bytearray(a ^ b for a, b in zip(db, mgf1(h, len(db))))
    masked[0] = masked[0] & 0x7F | (0x80 if fault == ("top bit",) else 0)
    return bytes(masked) + h + bytes([fault[1] if fault[:1] == ("trailer",) else 0xBC])


def raw_sign(k: rsa.RSAPrivateKey, em: bytes) -> bytes:
    """EM^d mod n (by the CRT, as RSA private keys are used)."""
    pn = k.private_numbers()
    x = int.from_bytes(em, "big")
    sp, sq = pow(x, pn.dmp1, pn.p), pow(x, pn.dmq1, pn.q)
    return (sq + pn.q * (pn.iqmp * (sp - sq) % pn.p)).to_bytes(K, "big")


def with_modulus(block: bytes, n: int) -> bytes:
    # R^2 and n' stay those of the old modulus: neither verifier reads them (they are the
    # ROM's Montgomery constants; the key digest, which covers them, is what is trusted)
    return n.to_bytes(K, "little") + block[K:]


def build_cases(rnd: random.Random) -> list[tuple[str, bytes, bytes, bytes]]:
    """(category, key block, signature, message hash) for every case."""
    keys = [key(which=i) for i in range(3)]
    blocks = [signing.key_block(k.public_key()) for k in keys]
    cases = []

    def message() -> bytes:
        return hashlib.sha256(rnd.randbytes(rnd.randrange(200))).digest()

    valid = []  # (key index, block, signature, hash)
    for i, (k, block) in enumerate(zip(keys, blocks)):
        for _ in range(20):
            m = message()
            valid.append((i, block, sign(k, m), m))
    cases += [("valid", block, sig, m) for _, block, sig, m in valid]

    # a changed signature: the top and bottom bits of its first and last octets, and random ones
    for j, (_, block, sig, m) in enumerate(rnd.sample(valid, 40)):
        bit = [0, 7, 8 * K - 8, 8 * K - 1][j] if j < 4 else rnd.randrange(8 * K)
        cases.append(("sig bit", block, flip(sig, bit), m))
    for _, block, sig, m in rnd.sample(valid, 20):  # several bits at once
        bad = sig
        for bit in rnd.sample(range(8 * K), rnd.randrange(2, 9)):
            bad = flip(bad, bit)
        cases.append(("sig bits", block, bad, m))

    # a changed manifest
    for _, block, sig, m in rnd.sample(valid, 40):
        cases.append(("hash bit", block, sig, flip(m, rnd.randrange(256))))

    # a changed key: the modulus's lowest bit (even), its top bit (3071-bit), and random ones
    for j, (_, block, sig, m) in enumerate(rnd.sample(valid, 30)):
        n = int.from_bytes(block[:K], "little")
        bit = [0, 8 * K - 1][j] if j < 2 else rnd.randrange(1, 8 * K - 1)
        cases.append(("modulus bit", with_modulus(block, n ^ (1 << bit)), sig, m))

    # another signer's key
    for i, block, sig, m in rnd.sample(valid, 20):
        cases.append(("other key", blocks[(i + 1 + rnd.randrange(2)) % 3], sig, m))

    # another salt length (PSS.MAX_LENGTH is 384 - 32 - 2 = 350 here)
    for salt in (0, 20, 31, 33, 64, padding.PSS.MAX_LENGTH):
        for k, block in zip(keys, blocks):
            m = message()
            cases.append(("salt", block, sign(k, m, pss(salt)), m))

    # a signature of the wrong length, or of a value outside 1..n-1
    for _, block, sig, m in rnd.sample(valid, 6):
        n = int.from_bytes(block[:K], "little")
        cases += [("length", block, s, m) for s in (sig[1:], sig[:-1], b"\0" + sig, sig + b"\0", b"", sig + sig,
                                                     sig[:rnd.randrange(1, K)])]
        cases += [("range", block, s, m) for s in (n.to_bytes(K, "big"), (n + 1).to_bytes(K, "big"),
                                                   b"\xff" * K, bytes(K), (1).to_bytes(K, "big"),
                                                   (n - 1).to_bytes(K, "big"))]

    # s + n: the same number mod n, so only the range check refuses it. It fits in K octets
    # when s < 2^3072 - n; more signatures by the key with the smallest n, if too few do.
    def plus_n(block, sig):
        v = int.from_bytes(sig, "big") + int.from_bytes(block[:K], "little")
        return v.to_bytes(K, "big") if v < 1 << 8 * K else None
    wrapped = [(block, s, m) for _, block, sig, m in valid if (s := plus_n(block, sig))]
    i = min(range(3), key=lambda i: blocks[i][K - 1::-1])  # compares the moduli big-endian
    for _ in range(2000):
        if len(wrapped) >= 5:
            break
        m = message()
        if s := plus_n(blocks[i], sign(keys[i], m)):
            wrapped.append((blocks[i], s, m))
    cases += [("sig + n", block, s, m) for block, s, m in wrapped[:10]]

    # encodings that are right but for one fault (the control: with none, OpenSSL accepts it)
    for k in keys:
        ps_len = K - 32 - 32 - 2
        # a nonzero PS octet: the first (only its low 7 bits survive the mask), the last, others
        faults = [(), (), ("ps", 0, 0x01), ("ps", 1, 0x80), ("ps", rnd.randrange(2, ps_len - 1), rnd.randrange(1, 256)),
                  ("ps", ps_len - 1, 0x01), ("separator", 0x00), ("separator", 0x02), ("separator", 0x81),
                  ("trailer", 0xBD), ("trailer", 0x00), ("trailer", 0xCC)]
        block = signing.key_block(k.public_key())
        for fault in faults:
            m = message()
            cat = "crafted " + (fault[0] if fault else "valid")
            cases.append((cat, block, raw_sign(k, encoded(m, rnd.randbytes(32), fault)), m))
        # with EM's top bit set, EM must stay below n to be signed: other salts until it does
        n = k.public_key().public_numbers().n
        m = message()
        for _ in range(400):
            em = encoded(m, rnd.randbytes(32), ("top bit",))
            if int.from_bytes(em, "big") < n:
                cases.append(("crafted top bit", block, raw_sign(k, em), m))
                break

    # OpenSSL accepts this one (module docstring): a valid signature starting with 0, that 0 dropped
    for _ in range(5000):  # P(no leading zero in 5000 signatures) = (255/256)^5000 < 1e-8
        m = message()
        sig = sign(keys[0], m)
        if sig[0] == 0:
            cases.append(("short by a 0", blocks[0], sig[1:], m))
            break

    # exponent 3: its own block (refused for the exponent), and its modulus claiming 65537
    k3 = key(e=3)
    n3 = k3.public_key().public_numbers().n
    for _ in range(6):
        m = message()
        sig = sign(k3, m)
        cases.append(("e=3", signing.key_block(k3.public_key()), sig, m))
        cases.append(("e=3 as 65537", sbv2_block(n3, E, K), sig, m))

    # RSA-2048: its own block (520 octets) and its modulus in a 3072 block (a 2048-bit n)
    k2048 = key(bits=2048)
    n2048 = k2048.public_key().public_numbers().n
    for _ in range(4):
        m = message()
        sig = sign(k2048, m)
        cases.append(("rsa-2048 block", sbv2_block(n2048, E, 256), sig, m))
        cases.append(("rsa-2048 in 3072 block", sbv2_block(n2048, E, K), sig.rjust(K, b"\0"), m))
    return cases


# category: (verdict, what the device does: "ok" accepts, "bad" verify refuses, "key" key_of refuses)
EXPECTED = {
    "valid": (True, {"ok"}), "sig bit": (False, {"bad"}), "sig bits": (False, {"bad"}),
    "hash bit": (False, {"bad"}), "modulus bit": (False, {"bad", "key"}), "other key": (False, {"bad"}),
    "salt": (False, {"bad"}), "length": (False, {"bad"}), "range": (False, {"bad"}), "sig + n": (False, {"bad"}),
    "crafted valid": (True, {"ok"}), "crafted ps": (False, {"bad"}), "crafted separator": (False, {"bad"}),
    "crafted trailer": (False, {"bad"}), "crafted top bit": (False, {"bad"}), "short by a 0": (False, {"bad"}),
    "e=3": (False, {"key"}), "e=3 as 65537": (False, {"bad"}),
    "rsa-2048 block": (False, {"key"}), "rsa-2048 in 3072 block": (False, {"key"}),
}
MIN_COUNT = {"valid": 60, "sig bit": 40, "sig bits": 20, "hash bit": 40, "modulus bit": 30, "other key": 20,
             "salt": 18, "length": 42, "range": 36, "sig + n": 5, "crafted valid": 6, "crafted ps": 12,
             "crafted separator": 9, "crafted trailer": 9, "crafted top bit": 2, "short by a 0": 1,
             "e=3": 6, "e=3 as 65537": 6, "rsa-2048 block": 4, "rsa-2048 in 3072 block": 4}


def run_device(tmp_path: Path, script: str, files: dict[str, str]):
    fs = tmp_path / "fs"
    copy_firmware(fs)
    for name, text in files.items():
        (fs / name).write_text(text)
    proc = run_micropython(script, fs, heapsize="1m", timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_device_verifier_agrees_with_openssl(tmp_path):
    cases = build_cases(random.Random(20240611))
    pubs = [key(which=i).public_key() for i in range(3)]
    result = run_device(tmp_path, DEVICE, {
        "cases.jsonl": "".join(json.dumps([b.hex(), s.hex(), m.hex()]) + "\n" for _, b, s, m in cases),
        "keys.jsonl": "".join(json.dumps(signing.key_block(p).hex()) + "\n" for p in pubs)})
    outcomes = result["outcomes"]
    assert len(outcomes) == len(cases)

    seen = defaultdict(Counter)
    disagree, unexpected = [], []
    for i, ((cat, block, sig, m), got) in enumerate(zip(cases, outcomes)):
        seen[cat][got] += 1
        verdict = independent(block, sig, m)
        if (got == "ok") != verdict:
            disagree.append((i, cat, got, verdict, len(block), len(sig)))
        want_verdict, want_paths = EXPECTED[cat]
        if verdict != want_verdict or got not in want_paths:
            unexpected.append((i, cat, got, verdict))
    assert not disagree, f"device and OpenSSL disagree on (case, category, device, openssl, |block|, |sig|): {disagree}"
    assert not unexpected, f"(case, category, device, openssl): {unexpected}\n{dict(seen)}"
    assert set(seen) == set(EXPECTED)
    for cat, least in MIN_COUNT.items():
        assert sum(seen[cat].values()) >= least, (cat, seen[cat])
    # the modulus flips reach both refusals: key_of's (even or 3071-bit n) and verify's
    assert seen["modulus bit"]["key"] >= 2 and seen["modulus bit"]["bad"] >= 20, seen["modulus bit"]
    assert sum(seen.values(), Counter()).total() >= 300

    # the one case where the RFC's length rule is all that separates the verdicts: OpenSSL
    # alone accepts it, so this category proves the device applies the rule itself
    (short,) = [c for c in cases if c[0] == "short by a 0"]
    assert crypto_alone(*short[1:]) and not independent(*short[1:])
    # and the exponent-3 signatures are good ones: only the exponent rule refuses them
    k3pub = key(e=3).public_key()
    for cat, block, sig, m in cases:
        if cat == "e=3":
            k3pub.verify(sig, m, PSS32, PREHASHED)

    # key digests: the device's, the host tools', espsecure's
    for i, pub in enumerate(pubs):
        pem = tmp_path / f"key{i}.pem"
        pem.write_text(signing.public_pem(pub))
        out = tmp_path / f"digest{i}.bin"
        espsecure = Path(sys.executable).parent / "espsecure"  # esptool's, installed in the venv
        subprocess.run([str(espsecure), "digest-sbv2-public-key", "--keyfile", str(pem), "--output", str(out)],
                       check=True, capture_output=True, timeout=60)
        assert result["digests"][i] == signing.key_digest(pub) == out.read_bytes().hex()


FUZZ = """
import binascii, json
from firmware import rsapss

n, e = rsapss.key_of(binascii.unhexlify(open("key.hex").read().strip()))
mhash = binascii.unhexlify(open("hash.hex").read().strip())
accepted, raised, count = [], [], 0
with open("sigs.txt") as f:
    for i, line in enumerate(f):
        sig = binascii.unhexlify(line.strip())
        try:
            r = rsapss.verify(n, e, sig, mhash)
            if r is not False:
                accepted.append([i, repr(r)])
        except Exception as exc:
            raised.append([i, repr(exc)])
        count += 1
print(json.dumps({"count": count, "accepted": accepted, "raised": raised}))
"""


def fuzzed_signatures(rnd: random.Random, sig: bytes, n: int, count: int) -> list[bytes]:
    def bitflips():
        s = sig
        for _ in range(rnd.randrange(1, 9)):
            s = flip(s, rnd.randrange(8 * K))
        return s

    def overwrite():
        b = bytearray(sig)
        for _ in range(rnd.randrange(1, 5)):
            at = rnd.randrange(K)
            end = min(K, at + rnd.randrange(1, 16))
            b[at:end] = rnd.randbytes(end - at)
        return bytes(b)

    # the same-length ones get past the length check to the arithmetic and the padding checks
    makers = [
        lambda: rnd.randbytes(rnd.randrange(801)),
        lambda: rnd.randbytes(K),
        lambda: rnd.randrange(n).to_bytes(K, "big"),  # below n: always reaches pow and the EM checks
        lambda: rnd.randrange(n, 1 << 8 * K).to_bytes(K, "big"),
        bitflips, bitflips, overwrite,
        lambda: sig[:rnd.randrange(K)],
        lambda: sig[rnd.randrange(1, K + 1):],
        lambda: sig + rnd.randbytes(rnd.randrange(1, 417)),
        lambda: bytes(rnd.randrange(1, 9)) + sig,
        lambda: rnd.randbytes(rnd.randrange(1, 9)) + sig[:K - rnd.randrange(1, 9)],
    ]
    s = int.from_bytes(sig, "big")
    edges = [n - 1, n, n + 1, (1 << 8 * K) - 1, 0, 1, 2, n >> 1, 1 << (8 * K - 1)]
    edges += [s + n] if s + n < 1 << 8 * K else []
    out = [sig] + [v.to_bytes(K, "big") for v in edges]  # the control first
    while len(out) < count:
        out.append(rnd.choice(makers)())
    return out


def test_fuzzed_signatures_never_raise_and_are_never_accepted(tmp_path):
    k = key(which=0)
    pub = k.public_key()
    block = signing.key_block(pub)
    mhash = hashlib.sha256(b'{"version": "1.0.0", "fuzz": true}').digest()
    sig = sign(k, mhash)
    sigs = fuzzed_signatures(random.Random(7), sig, pub.public_numbers().n, 4000)
    result = run_device(tmp_path, FUZZ, {"key.hex": block.hex(), "hash.hex": mhash.hex(),
                                         "sigs.txt": "".join(s.hex() + "\n" for s in sigs)})
    assert result["count"] == len(sigs)
    assert result["raised"] == []
    # a mutation may give the signature back (two flips of one bit): those count as the control
    controls = [i for i, s in enumerate(sigs) if s == sig]
    assert [i for i, _ in result["accepted"]] == controls and controls[0] == 0, result["accepted"][:20]
    assert all(r == "True" for _, r in result["accepted"])
    # OpenSSL's verdict on the same bytes, for agreement beyond "refused"
    assert [i for i, s in enumerate(sigs) if independent(block, s, mhash)] == controls
    lengths = Counter(len(s) == K for s in sigs)
    assert lengths[True] >= 1500 and lengths[False] >= 1000, lengths  # both kinds well exercised
