"""Reading shadows on the host: the one reader of the replica's store.

The replica writes the shadows (it alone, answering MQTT requests: tools.control.replica);
operator tools, the renewer and the benchmarks read them here, straight from its store (SQLite
in WAL mode lets readers in while it runs; PostgreSQL anyway), as Shadow views. Nothing is
created when there is no store yet.
"""

from __future__ import annotations

from pathlib import Path

from firmware import contract
from tools.control.shadowstore import is_url, open_store


class Shadow:
    """One device's shadow document: its firmware sections and when their leaves were set
    (the replica's clock, metadata timestamps)."""

    def __init__(self, device: str, doc: dict):
        self.device, self.doc = device, doc

    def firmware(self, section: str) -> dict:
        """state.<section>.firmware, {} when there is none (or it is not an object)."""
        fw = contract.firmware_in(self.doc, section)
        return fw if isinstance(fw, dict) else {}

    @property
    def desired(self) -> dict:
        return self.firmware(contract.DESIRED)

    @property
    def reported(self) -> dict:
        return self.firmware(contract.REPORTED)

    def stamp(self, section: str, leaf: str) -> int:
        """When metadata.<section>.firmware.<leaf> was set; -1 if it never was."""
        meta = ((self.doc.get("metadata") or {}).get(section) or {}).get(contract.FIRMWARE)
        stamp = meta.get(leaf) if isinstance(meta, dict) else None
        t = stamp.get("timestamp") if isinstance(stamp, dict) else None
        return t if isinstance(t, int) else -1

    @property
    def last_seen(self) -> int | None:
        """The newest timestamp in the reported section's metadata: the device's last report."""
        best = None
        stack = [(self.doc.get("metadata") or {}).get(contract.REPORTED, {})]
        while stack:
            m = stack.pop()
            if isinstance(m, dict):
                if isinstance(m.get("timestamp"), int):
                    best = max(best or 0, m["timestamp"])
                stack.extend(v for k, v in m.items() if k != "timestamp")
        return best


def read(location, devices: list[str] | None = None) -> dict[str, Shadow]:
    """Shadows by device (every device's, or those of `devices` that have one) from the
    store at `location`: an SQLite file or a postgresql:// URL."""
    if not is_url(location) and not Path(location).exists():
        return {}
    store = open_store(location, readonly=True)
    try:
        return {d: Shadow(d, doc) for d, doc in store.docs(devices).items()}
    finally:
        store.close()
