"""Run mosquitto (the distribution's package) as the scale-out broker, on the site's PKI.

amqtt is the embedded default but has no shared subscriptions; mosquitto has them, so several
replica workers can split one stream (`$share/<group>/state/+/update`). The configuration
holds to the embedded broker's rules: TLS only, no anonymous clients, the role ACL of
tools.control.acl (a device confined to its requests and its answers under `state/<its username>/`),
no retained messages. Passwords live in mosquitto's own password file (written with
`mosquitto_passwd`, or by tools.credentials), since mosquitto cannot read our hashes.

Two listeners, because mosquitto cannot tie a client id to a username on one listener and
still let one service identity hold several sessions (workers `replica-w0`, `replica-w1`):
- devices (`port`): `use_username_as_clientid`, so a device's session is always named after
  its login. Without it any device could connect under another's client id and take that
  session over, disconnecting it, as often as it liked (the embedded broker refuses such a
  CONNECT; mosquitto replaces the id instead).
- services (`service_port`): only the service identities can log in there (a password file
  of theirs alone), with any client id.

Started as root, mosquitto runs as the unprivileged `mosquitto` user (the package's), which
it turns into before it reads a certificate, key or password file (mosquitto.c, main: config,
drop_privileges, then security init and listeners). So it reads copies only that user can
read, made afresh at each start and reload, in a directory root keeps (0711).

On SIGHUP mosquitto re-reads the password files and disconnects every client whose login is
no longer in them (`mosquitto_security_apply_default`): `revoke` cuts a device off at once.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tools.control import acl, brokers
from tools.control.ports import free_port
from tools.site.identities import SERVICE_USERS
from tools.site.credentials import mosquitto_hash
from tools.site.secretfile import write_private
from tools.site.pki import PKI, TLS12_CIPHERS


class MosquittoError(Exception):
    pass


def available() -> bool:
    return shutil.which("mosquitto") is not None and shutil.which("mosquitto_passwd") is not None


def _run_user() -> pwd.struct_passwd | None:
    """Whom mosquitto runs as: None for whoever starts it, the package's user under root."""
    if os.geteuid() != 0:
        return None
    for name in ("mosquitto", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise MosquittoError("running as root, and neither a 'mosquitto' nor a 'nobody' user exists to run mosquitto as")


class Mosquitto:
    def __init__(self, workdir: Path, pki: PKI, host: str = "127.0.0.1", port: int = 0,
                 services: tuple[str, ...] = SERVICE_USERS, password_file: Path | None = None,
                 service_port: int = 0):
        """`password_file`: a site's `passwd.mosquitto` (tools.site.credentials keeps it); else the
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
        self.user = _run_user()
        self.run_dir: Path | None = None  # what mosquitto reads: its config and copies

    def add_user(self, name: str, password: str) -> None:
        """Create or replace a login (mosquitto re-reads the file on SIGHUP)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.passwd.exists():
            write_private(self.passwd, "")  # `mosquitto_passwd -c` would make it with the umask's mode
        out = subprocess.run(["mosquitto_passwd", "-b", str(self.passwd), name, password],
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise MosquittoError(f"mosquitto_passwd: {out.stderr.strip()}")
        self.reload()  # SIGHUP: reload password and ACL files

    def add_users(self, users: dict[str, str]) -> None:
        """Many new logins at once (simulated fleets), hashed here instead of one
        mosquitto_passwd run per user."""
        self.dir.mkdir(parents=True, exist_ok=True)
        old = self.passwd.read_text() if self.passwd.exists() else ""
        write_private(self.passwd, old + "".join(f"{n}:{mosquitto_hash(p)}\n" for n, p in users.items()))
        self.reload()

    def reload(self) -> None:
        """Re-read the password and ACL files (SIGHUP); mosquitto then disconnects every
        client whose login is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self._write_passwords()
            self.proc.send_signal(1)

    def _private(self, name: str, data: str | bytes) -> Path:
        """A file in the run directory only mosquitto's user can read."""
        path = self.run_dir / name
        write_private(path, data, (self.user.pw_uid, self.user.pw_gid) if self.user is not None else None)
        return path

    def _write_passwords(self) -> None:
        """The devices' listener's logins (all of them) and the services' (theirs alone)."""
        text = self.passwd.read_text() if self.passwd.exists() else ""
        self._private("passwd.devices", text)
        self._private("passwd.services", "".join(ln for ln in text.splitlines(keepends=True)
                                                 if ln.split(":", 1)[0] in self.services))

    def _write_config(self) -> Path:
        device_rules, service_rules = acl.mosquitto_acls()
        device_acl, service_acl = self._private("acl.devices", device_rules), self._private("acl.services", service_rules)
        self._write_passwords()
        ca = self._private("ca.crt", self.pki.ca_cert.read_bytes())
        cert = self._private("server.crt", self.pki.server_cert.read_bytes())
        key = self._private("server.key", self.pki.server_key.read_bytes())
        tls = (f"cafile {ca}\n"
               f"certfile {cert}\n"
               f"keyfile {key}\n"
               "tls_version tlsv1.2\n"
               f"ciphers {TLS12_CIPHERS}\n")
        return self._private("mosquitto.conf",
            "per_listener_settings true\n"  # each listener its own logins and ACL (below)
            "persistence false\n"
            # A retained message would reach every later subscriber; the contract has none, and a
            # client that publishes one (or a will that would be one) is disconnected.
            "retain_available false\n"
            "set_tcp_nodelay true\n"  # small shadow messages must not wait for ACKs (Nagle)
            # The default (1000 per client) drops QoS 1 messages in a burst: a rollout to 10,000
            # devices at once lost requests on their way to the replica workers.
            "max_queued_messages 1000000\n"
            "max_inflight_messages 1000\n"
            f"max_packet_size {brokers.MAX_PACKET_BYTES}\n"  # a client sending more is disconnected
            # What may wait for one client that stops reading (a device subscribed to its
            # answers, still sending requests): the default has no bound in bytes.
            f"max_queued_bytes {64 << 20}\n"
            + (f"user {self.user.pw_name}\n" if self.user is not None else "") +
            "log_dest stdout\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            # devices: the session is named after the login, whatever client id was sent
            f"listener {self.port} {self.host}\n"
            "allow_anonymous false\n"
            f"password_file {self.run_dir / 'passwd.devices'}\n"
            f"acl_file {device_acl}\n"
            "use_username_as_clientid true\n"
            + tls +
            # services: their identities only, any client id (several workers per identity)
            f"listener {self.service_port} {self.host}\n"
            "allow_anonymous false\n"
            f"password_file {self.run_dir / 'passwd.services'}\n"
            f"acl_file {service_acl}\n"
            + tls
        )

    def start(self, timeout: float = 15) -> int:
        if not available():
            raise MosquittoError("mosquitto is not installed (Debian/Ubuntu: apt-get install mosquitto)")
        if self.port == 0:
            self.port = free_port(self.host)
        if self.service_port == 0:
            self.service_port = free_port(self.host)
        if not self.passwd.exists():
            raise MosquittoError("add at least one user before starting")
        self.dir.mkdir(parents=True, exist_ok=True)
        # Not under the workdir: its parents may be private to root (pytest's tmp_path is).
        # Ours, 0711: mosquitto's user opens its files by name but can put nothing there.
        self.run_dir = Path(tempfile.mkdtemp(prefix="fleet-ota-mosquitto-"))
        if self.user is not None:
            self.run_dir.chmod(0o711)
        conf = self._write_config()
        log = open(self.dir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                why = f"mosquitto exited ({self.proc.returncode}): {(self.dir / 'mosquitto.log').read_text()[-2000:]}"
                self.stop()
                raise MosquittoError(why)
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
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    def __enter__(self) -> "Mosquitto":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class MosquittoBroker(brokers.Broker):
    """mosquitto as a child process on the site's `passwd.mosquitto`, with a listener of the
    services' own; sent SIGHUP whenever provisioning or `revoke` changes that file."""

    shared_subscriptions = True

    def __init__(self, site, host: str, port: int, service_port: int = 0):
        super().__init__(site, host, port, service_port)
        self._proc: Mosquitto | None = None
        self._follow: asyncio.Task | None = None

    async def start(self) -> None:
        site = self.site
        for user in SERVICE_USERS:  # sites from before passwd.mosquitto: add the services to it
            password = site.service_password(user)
            if user not in site.creds.mosquitto_names():
                site.creds.set(user, password, generated=True)
        self._proc = Mosquitto(site.root / "mosquitto", site.pki, self.host, self.port,
                               password_file=site.creds.mosquitto_path, service_port=self.service_port)
        await asyncio.to_thread(self._proc.start)
        self.port, self.service_port = self._proc.port, self._proc.service_port
        self._follow = asyncio.create_task(self._follow_passwords())

    async def _follow_passwords(self) -> None:
        """mosquitto reads its password file at start and on SIGHUP: send one when it changes."""
        path = self.site.creds.mosquitto_path
        seen = path.stat().st_mtime_ns
        while True:
            await asyncio.sleep(0.5)
            try:
                now = path.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if now != seen:
                seen = now
                self._proc.reload()

    async def stop(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            await asyncio.gather(self._follow, return_exceptions=True)
            self._follow = None
        if self._proc is not None:
            await asyncio.to_thread(self._proc.stop)
            self._proc = None
