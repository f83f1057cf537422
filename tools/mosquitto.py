"""Run mosquitto (the distribution's package) as the scale-out broker, on the site's PKI.

amqtt is the embedded default but has no shared subscriptions; mosquitto has them, so several
replica workers can split one stream (`$share/<group>/state/+/update`). The configuration
mirrors the embedded broker's rules: TLS only, no anonymous clients, a device confined to
`state/<its username>/...` by a pattern ACL, service identities allowed under `state/`.
Passwords live in mosquitto's own password file (written with `mosquitto_passwd`), since
mosquitto cannot read our hashes.

Two listeners, because mosquitto cannot tie a client id to a username on one listener and
still let one service identity hold several sessions (workers `replica-w0`, `replica-w1`):
- devices (`port`): `use_username_as_clientid`, so a device's session is always named after
  its login. Without it any device could connect under another's client id and take that
  session over, disconnecting it, as often as it liked (the embedded broker refuses such a
  CONNECT; mosquitto replaces the id instead).
- services (`service_port`): only the service identities can log in there (a password file
  of theirs alone), with any client id.

On SIGHUP mosquitto re-reads the password files and disconnects every client whose login is
no longer in them (`mosquitto_security_apply_default`): `revoke` cuts a device off at once.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from tools.broker import SERVICE_USERS
from tools.credentials import mosquitto_hash, write_private
from tools.pki import PKI, TLS12_CIPHERS


class MosquittoError(Exception):
    pass


def available() -> bool:
    return shutil.which("mosquitto") is not None and shutil.which("mosquitto_passwd") is not None


MAX_PACKET_BYTES = 1 << 20


class Mosquitto:
    def __init__(self, workdir: Path, pki: PKI, host: str = "127.0.0.1", port: int = 0,
                 services: tuple[str, ...] = SERVICE_USERS, password_file: Path | None = None,
                 service_port: int = 0):
        """`password_file`: a site's `passwd.mosquitto` (tools.credentials keeps it); else the
        broker has its own file in `workdir`, filled with add_user/add_users. `port` is the
        devices' listener, `service_port` the services' (0: a free port each)."""
        self.dir = Path(workdir)
        self.pki = pki
        self.host = host
        self.port = port
        self.service_port = service_port
        self.services = services
        self.proc: subprocess.Popen | None = None
        self.passwd = Path(password_file) if password_file else self.dir / "passwd"
        self.service_passwd = self.dir / "passwd.services"

    def add_user(self, name: str, password: str) -> None:
        """Create or replace a login (mosquitto re-reads the file on SIGHUP)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        args = ["mosquitto_passwd", "-b"] + ([] if self.passwd.exists() else ["-c"]) + [str(self.passwd), name, password]
        out = subprocess.run(args, capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise MosquittoError(f"mosquitto_passwd: {out.stderr.strip()}")
        self.passwd.chmod(0o600)
        self.reload()  # SIGHUP: reload password and ACL files

    def add_users(self, users: dict[str, str]) -> None:
        """Many new logins at once (simulated fleets), hashed here instead of one
        mosquitto_passwd run per user."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.passwd, "a") as f:
            for name, password in users.items():
                f.write(f"{name}:{mosquitto_hash(password)}\n")
        self.passwd.chmod(0o600)
        self.reload()

    def reload(self) -> None:
        """Re-read the password and ACL files (SIGHUP); mosquitto then disconnects every
        client whose login is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self._write_service_passwd()
            self.proc.send_signal(1)

    def _write_service_passwd(self) -> None:
        """The services listener's logins: the service identities' lines of the password file."""
        lines = self.passwd.read_text().splitlines(keepends=True) if self.passwd.exists() else []
        write_private(self.service_passwd, "".join(ln for ln in lines if ln.split(":", 1)[0] in self.services))

    def _write_config(self) -> Path:
        device_acl, service_acl = self.dir / "acl.devices", self.dir / "acl.services"
        device_acl.write_text("pattern readwrite state/%u/#\n")
        service_acl.write_text("".join(f"user {u}\ntopic readwrite state/#\n\n" for u in self.services))
        self._write_service_passwd()
        tls = (f"cafile {self.pki.ca_cert}\n"
               f"certfile {self.pki.server_cert}\n"
               f"keyfile {self.pki.server_key}\n"
               "tls_version tlsv1.2\n"
               f"ciphers {TLS12_CIPHERS}\n")
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            "per_listener_settings true\n"  # each listener its own logins and ACL (below)
            "persistence false\n"
            "set_tcp_nodelay true\n"  # small shadow messages must not wait for ACKs (Nagle)
            # The default (1000 per client) drops QoS 1 messages in a burst: a rollout to 10,000
            # devices at once lost requests on their way to the replica workers.
            "max_queued_messages 1000000\n"
            "max_inflight_messages 1000\n"
            # A client that sends more is disconnected, so a device cannot make the broker and the
            # replica hold payloads of any size; ~16x the largest message the replica sends
            # (update/documents of an 8 KiB document of one-character leaves: ~62 KB).
            f"max_packet_size {MAX_PACKET_BYTES}\n"
            "user root\n"  # keep the test's files readable (mosquitto drops to 'mosquitto' by default)
            "log_dest stdout\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            # devices: the session is named after the login, whatever client id was sent
            f"listener {self.port} {self.host}\n"
            "allow_anonymous false\n"
            f"password_file {self.passwd}\n"
            f"acl_file {device_acl}\n"
            "use_username_as_clientid true\n"
            + tls +
            # services: their identities only, any client id (several workers per identity)
            f"listener {self.service_port} {self.host}\n"
            "allow_anonymous false\n"
            f"password_file {self.service_passwd}\n"
            f"acl_file {service_acl}\n"
            + tls
        )
        return conf

    def start(self, timeout: float = 15) -> int:
        if not available():
            raise MosquittoError("mosquitto is not installed (Debian/Ubuntu: apt-get install mosquitto)")
        from tools.services import free_port

        if self.port == 0:
            self.port = free_port(self.host)
        if self.service_port == 0:
            self.service_port = free_port(self.host)
        if not self.passwd.exists():
            raise MosquittoError("add at least one user before starting")
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self._write_config()
        log = open(self.dir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MosquittoError(f"mosquitto exited ({self.proc.returncode}): "
                                     f"{(self.dir / 'mosquitto.log').read_text()[-2000:]}")
            try:
                for port in (self.port, self.service_port):
                    with socket.create_connection((self.host, port), timeout=0.5):
                        pass
                return self.port
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise MosquittoError(f"mosquitto did not listen on {self.host}:{self.port} and "
                             f":{self.service_port} within {timeout}s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def __enter__(self) -> "Mosquitto":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
