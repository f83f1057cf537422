# trust.py The TLS client context every connection of the board uses: CERT_REQUIRED, with the
# project CA as the only trust anchor (MicroPython's default is CERT_NONE).


def context(ca_der):
    """A client SSLContext that verifies peers against the DER CA certificate `ca_der`."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=ca_der)
    return ctx


def load(ca_file):
    """context() of the CA in `ca_file`; its bytes are garbage once parsed, so the heap does
    not hold them between connections."""
    with open(ca_file, "rb") as f:
        return context(f.read())
