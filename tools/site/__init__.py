"""One installation on disk: keys, credentials, releases, the replica database, endpoints.

    <root>/pki/            CA (ca.crt, ca.der) and the server certificate for broker and store
    <root>/passwd          identity:hash lines (devices, replica, operator; salted SHA-256 or argon2id)
    <root>/services.json   passwords of the service identities (mode 0600)
    <root>/store.key       HMAC key for pre-signed URLs and download tokens (mode 0600)
    <root>/grant.key       HMAC key for operator grants on desired firmware (mode 0600, tools.grants)
    <root>/releases/       released images and their index
    <root>/signing.json    public keys whose signed releases devices trust; whether releases
                           must be signed (tools.site.signing; on for a new site)
    <root>/replica.db      shadow documents (SQLite; the default store)
    <root>/shadows.url     optional: a postgresql:// URL; then the shadows live there instead
    <root>/rollouts.db     rollouts and where each of their devices stands
    <root>/endpoints.json  where the running services listen (written by `serve`)
    <root>/groups.json     optional: device groups for rollouts, {"name": ["id", "glob*", ...]}
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from tools.site.identities import SERVICE_USERS
from tools.site.credentials import Credentials
from tools.site.secretfile import write_private
from tools.site.pki import DEFAULT_NAMES, PKI, ensure_pki
from tools.site.releases import Registry
from tools.site.signing import Trust


@dataclass(frozen=True)
class Endpoints:
    host: str
    mqtt_port: int  # devices
    https_port: int
    ntp_port: int = 0
    service_port: int = 0  # the services' own MQTT listener (mosquitto); 0: mqtt_port
    dashboard_port: int = 0  # the operators' web page (tools.operator.dashboard); 0: not served

    @property
    def service_mqtt_port(self) -> int:
        """Where the replica, the renewer and operator tools connect."""
        return self.service_port or self.mqtt_port

    @property
    def store_url(self) -> str:
        return f"https://{self.host}:{self.https_port}"


class Site:
    def __init__(self, root: Path, names: tuple[str, ...] = DEFAULT_NAMES):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        new = not (self.root / "pki").exists()
        self.pki: PKI = ensure_pki(self.root / "pki", names)
        self.creds = Credentials(self.root / "passwd")
        # People who sign in to the dashboard: no broker or store reads this file.
        self.accounts = Credentials(self.root / "accounts", mosquitto=False, chosen=True)
        self.trust = Trust(self.root / "signing.json")
        if new:
            self.trust.require(True)  # a new site installs signed releases only
        self.releases = Registry(self.root / "releases", self.trust)
        self.db_path = self.root / "replica.db"
        self.rollouts_path = self.root / "rollouts.db"
        self.devices_dir = self.root / "devices"

    @property
    def shadow_store(self) -> Path | str:
        """Where the replica keeps shadows: replica.db, or the URL in shadows.url."""
        url = self.root / "shadows.url"
        return url.read_text().strip() if url.exists() else self.db_path

    def use_shadow_store(self, url: str | None) -> None:
        """Keep the shadows in PostgreSQL at `url` from now on (None: back to SQLite)."""
        path = self.root / "shadows.url"
        if url is None:
            path.unlink(missing_ok=True)
            return
        write_private(path, url + "\n")  # the URL may hold a password

    def _secret_file(self, name: str, make) -> bytes:
        path = self.root / name
        if not path.exists():
            write_private(path, make())
        return path.read_bytes()

    @property
    def store_key(self) -> bytes:
        return self._secret_file("store.key", lambda: secrets.token_bytes(32))

    @property
    def grant_key(self) -> bytes:
        return self._secret_file("grant.key", lambda: secrets.token_bytes(32))

    def service_password(self, user: str) -> str:
        """Password of a service identity (replica, operator), created on first use."""
        if user not in SERVICE_USERS:
            raise ValueError(f"{user} is not a service identity")
        path = self.root / "services.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        if user not in data or user not in self.creds.names():
            data[user] = self.creds.set(user)
            write_private(path, json.dumps(data))
        return data[user]

    def groups(self) -> dict[str, list[str]]:
        """Device groups (ids or globs) by name; {} without a groups.json."""
        path = self.root / "groups.json"
        if not path.exists():
            return {}
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                                                 for v in data.values()):
            raise ValueError(f"{path}: must be an object of name -> list of device ids or globs")
        return data

    def write_endpoints(self, ep: Endpoints) -> None:
        (self.root / "endpoints.json").write_text(json.dumps(ep.__dict__))

    def endpoints(self) -> Endpoints:
        path = self.root / "endpoints.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no running services (start them with `serve`)")
        return Endpoints(**json.loads(path.read_text()))
