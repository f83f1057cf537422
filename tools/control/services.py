"""Broker, replica, firmware store and URL renewer together on one asyncio loop.

Used by `serve`, by `demo` and by the tests. Each is an independent component talking over the
network (the replica is an ordinary MQTT client of the broker), so they could run apart.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tools.control import store
from tools.control import brokers
from tools.control.ports import free_port
from tools.site.pki import server_ssl_context
from tools.control.renewer import Renewer
from tools.control.replica import SHARE_GROUP, MQTTSettings, Replica
from tools.site import Endpoints, Site
from tools.control.timeserver import start_time_server

log = logging.getLogger("services")


async def stop_task(task: asyncio.Task, tries: int = 50) -> None:
    """Cancel `task` and wait until it has ended.

    Python 3.11's asyncio.wait_for (used inside aiomqtt) can swallow a cancellation that
    races with completion, so cancel again until the task is really done (bounded).
    """
    for _ in range(tries):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.2)
        if done:
            return
    log.error("task %s did not stop", task.get_name())


async def start_ready(run, timeout: float = 20) -> asyncio.Task:
    """Start `run(ready)` (a service loop that sets the event once it serves) as a task and
    wait until it is ready; returns the task (stop it with stop_task)."""
    ready = asyncio.Event()
    task = asyncio.create_task(run(ready))
    await asyncio.wait_for(ready.wait(), timeout)
    return task


class Services:
    def __init__(self, site: Site, host: str = "127.0.0.1", mqtt_port: int = 0, https_port: int = 0,
                 ntp_port: int = 0, broker: str = "amqtt", service_port: int = 0):
        """broker: a key of tools.control.brokers.KINDS ("amqtt", embedded in this process, or
        "mosquitto", a child process with a listener of the services' own at `service_port`).
        Ports 0: free ones."""
        if broker not in brokers.KINDS:
            raise ValueError(f"broker: one of {', '.join(brokers.KINDS)}")
        self.broker_kind = broker
        self.site = site
        self.host = host
        self.mqtt_port = mqtt_port
        self.https_port = https_port
        self.ntp_port = ntp_port
        self.service_port = service_port
        self._time_server = None
        self.broker: brokers.Broker | None = None
        self.replica: Replica | None = None
        self._replica_task: asyncio.Task | None = None
        self._store_runner = None
        self._renewer_task: asyncio.Task | None = None
        self.renewer: Renewer | None = None
        self.endpoints: Endpoints | None = None

    async def start(self) -> Endpoints:
        site = self.site
        mqtt_port = self.mqtt_port or free_port(self.host)
        self.broker = brokers.make(self.broker_kind, site, self.host, mqtt_port, self.service_port)
        await self.broker.start()
        # 0 when it is the devices' listener: endpoints.json then names one port
        service_port = self.broker.service_port if self.broker.service_port != mqtt_port else 0
        app = store.make_app(site.releases, site.store_key, site.creds)
        self._store_runner, https_port = await store.start_store(
            self.host, self.https_port, app, server_ssl_context(site.pki))
        self._time_server, ntp_port = await start_time_server(self.host, self.ntp_port)
        self.endpoints = Endpoints(self.host, mqtt_port, https_port, ntp_port, service_port)
        await self.start_replica()
        site.write_endpoints(self.endpoints)
        await self.start_renewer()
        log.info("services up: mqtts://%s:%d https://%s:%d sntp://%s:%d", self.host, mqtt_port,
                 self.host, https_port, self.host, ntp_port)
        return self.endpoints

    async def start_replica(self) -> None:
        settings = MQTTSettings(self.host, self.endpoints.service_mqtt_port, "replica", self.site.service_password("replica"),
                                self.site.pki.ca_cert,
                                share_group=SHARE_GROUP if self.broker.shared_subscriptions else None)
        self.replica = Replica(settings, self.site.shadow_store, grant_key=self.site.grant_key)
        self._replica_task = await start_ready(self.replica.run)

    async def stop_replica(self) -> None:
        if self._replica_task:
            await stop_task(self._replica_task)
            self._replica_task = None
        if self.replica:
            self.replica.db.close()
            self.replica = None

    async def restart_broker(self, down_s: float = 0.0) -> None:
        """Stop the broker (every client is disconnected) and start it on the same ports."""
        await self.broker.stop()
        await asyncio.sleep(down_s)
        await self.broker.start()

    async def start_renewer(self) -> None:
        self.renewer = Renewer(self.site, self.host, self.endpoints.service_mqtt_port)
        self._renewer_task = await start_ready(self.renewer.run)

    async def stop_renewer(self) -> None:
        if self._renewer_task:
            await stop_task(self._renewer_task)
            self._renewer_task = None

    async def stop(self) -> None:
        await self.stop_renewer()
        await self.stop_replica()
        if self._store_runner:
            await self._store_runner.cleanup()
            self._store_runner = None
        if self._time_server:
            self._time_server.close()
            self._time_server = None
        if self.broker:
            await self.broker.stop()
            self.broker = None


class ServicesThread:
    """Services on their own loop in a background thread, for synchronous callers (tests)."""

    def __init__(self, site: Site, host: str = "127.0.0.1", broker: str = "amqtt"):
        self.services = Services(site, host, broker=broker)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True, name="services")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            # Let every task still alive (clients a test left open) finish before closing.
            pending = asyncio.all_tasks(self.loop)
            for t in pending:
                t.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> "ServicesThread":
        self._thread.start()
        self.endpoints = self.call(self.services.start())
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.call(self.services.stop())
        except TimeoutError:
            import io
            buf = io.StringIO()
            for t in asyncio.all_tasks(self.loop):
                t.print_stack(file=buf)
            log.error("services did not stop in time; tasks:\n%s", buf.getvalue())
            raise
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)


class ServicesProcess:
    """`serve` as a child process, for callers that run much else in their own process (the
    fleet benchmark's hundreds of emulated boards): the services get an interpreter and a GIL
    of their own, as they have when deployed."""

    def __init__(self, site: Site, host: str = "127.0.0.1", broker: str = "mosquitto", timeout: float = 60):
        self.site = site
        self.args = [sys.executable, "-m", "tools", "serve", "--site", str(site.root), "--host", host,
                     "--broker", broker, "--mqtt-port", "0", "--https-port", "0", "--ntp-port", "0",
                     "--service-port", "0"]
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServicesProcess":
        repo = Path(__file__).resolve().parents[2]
        self.proc = subprocess.Popen(self.args, cwd=repo, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        ready = threading.Event()
        lines: collections.deque[str] = collections.deque(maxlen=30)  # for an error message

        def pump() -> None:  # the log must keep flowing, or `serve` blocks on a full pipe
            for line in self.proc.stdout:
                lines.append(line)
                if line.startswith("mqtts://"):
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + self.timeout
        while not ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("serve did not come up:\n" + "".join(lines))
        self.endpoints = self.site.endpoints()
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
