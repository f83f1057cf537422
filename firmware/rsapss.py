# rsapss.py RSASSA-PSS verification (RFC 8017 section 8.1.2, EMSA-PSS-VERIFY 9.1.2) with
# SHA-256, MGF1-SHA-256 and a 32-byte salt: the scheme ESP32 Secure Boot V2 uses, here with
# MicroPython's own big integers (three-argument pow) and hashlib; no C module.
#
# Also the Secure Boot V2 public-key block (espsecure's _digest_sbv2_public_key layout):
# n (384 bytes), e (4), R^2 mod n (384), -1/n mod 2^32 (4), all little-endian; its SHA-256 is
# the key digest an ESP32 holds in eFuse and this firmware holds in its trust list.

import hashlib

N_BYTES = 384
H_LEN = 32
S_LEN = 32
E = 65537  # the exponent espsecure and `keygen` make; any other is refused
_DB_LEN = N_BYTES - H_LEN - 1  # 351: the masked data block before H and 0xbc
_PS_LEN = _DB_LEN - S_LEN - 1  # 318 zero bytes, then 0x01, then the salt


def key_digest(block):
    """SHA-256 of a public-key block: the value `espsecure digest-sbv2-public-key` writes."""
    return hashlib.sha256(block).digest()


def key_of(block):
    """(n, e) of a public-key block; ValueError if it is not an RSA-3072 key of exponent E."""
    if len(block) != 2 * N_BYTES + 8:
        raise ValueError("key block length")
    n = int.from_bytes(block[:N_BYTES], "little")
    e = int.from_bytes(block[N_BYTES:N_BYTES + 4], "little")
    if e != E:
        raise ValueError("exponent %d" % e)
    if n >> (8 * N_BYTES - 1) != 1 or not n & 1:
        raise ValueError("not a 3072-bit odd modulus")
    return n, e


def _mgf1_xor(db, seed):
    """db ^= MGF1-SHA-256(seed, len(db)), in place."""
    counter = bytearray(4)
    i = 0
    c = 0
    while i < len(db):
        counter[3] = c  # c < 12: the low byte is enough for 351 bytes
        h = hashlib.sha256(seed)
        h.update(counter)
        for b in h.digest():
            if i == len(db):
                break
            db[i] ^= b
            i += 1
        c += 1


def verify(n, e, sig, mhash):
    """True if `sig` (N_BYTES, big-endian) is a PSS signature of the SHA-256 digest `mhash`
    under (n, e). Never raises for any bytes of sig."""
    if len(sig) != N_BYTES or len(mhash) != H_LEN:
        return False
    s = int.from_bytes(sig, "big")
    if s >= n:
        return False
    m = pow(s, e, n)
    # emBits = modBits - 1 = 3071: EM is N_BYTES long and its top bit must be clear.
    if m >> (8 * N_BYTES - 1):
        return False
    em = m.to_bytes(N_BYTES, "big")
    if em[N_BYTES - 1] != 0xBC:
        return False
    db = bytearray(em[:_DB_LEN])
    h = em[_DB_LEN:_DB_LEN + H_LEN]
    _mgf1_xor(db, h)
    db[0] &= 0x7F
    for i in range(_PS_LEN):
        if db[i]:
            return False
    if db[_PS_LEN] != 1:
        return False
    mp = hashlib.sha256(b"\x00" * 8)
    mp.update(mhash)
    mp.update(db[_DB_LEN - S_LEN:])
    return mp.digest() == h
