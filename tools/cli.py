"""Command line: `fleet-ota <command>` in the venv, or `python -m tools <command>` (`--help`).

A thin layer over the importable modules: each command parses arguments, calls one function,
prints the result. Expected failures become one line on stderr and exit status 1 (2 for
usage errors, from argparse).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

DEFAULT_SITE = Path("build/site")


class CommandError(Exception):
    pass


def _site(args):
    from tools.site import DEFAULT_NAMES, Site

    # `serve --host <LAN address>`: the server certificate must name the address boards dial.
    names = tuple(dict.fromkeys([getattr(args, "host", None) or "127.0.0.1", *getattr(args, "cert_name", []),
                                 *DEFAULT_NAMES]))
    return Site(args.site, names)


def cmd_image_build(args) -> None:
    from tools.esp32emu.runner import PANIC_ON_BOOT
    from tools.espidf.images import build_app_image

    data = build_app_image(args.version, args.size, PANIC_ON_BOOT if args.panic_on_boot else args.project)
    args.output.write_bytes(data)
    print(f"{args.output}: {len(data)} bytes, ESP32 app image {args.version}")


def cmd_image_check(args) -> None:
    from tools.espidf.images import ImageError, check_app_image

    try:
        r = check_app_image(args.file.read_bytes(), args.slot_size)
    except ImageError as e:
        raise CommandError(f"{args.file}: {e.code}: {e}") from None
    print(json.dumps(r.__dict__, indent=1))


def cmd_release(args) -> None:
    from tools.site.releases import ReleaseError

    try:
        bundle = args.signature.read_bytes() if args.signature else None
        rel = _site(args).releases.add_files(args.file.read_bytes(), bundle, args.version, str(args.file),
                                             str(args.signature))
    except ReleaseError as e:
        raise CommandError(str(e)) from None
    out = {k: v for k, v in rel.__dict__.items() if k != "signature"}
    out.update(signer=rel.signer, secure_version=rel.secure_version)
    print(json.dumps(out, indent=1))


def cmd_releases(args) -> None:
    site = _site(args)
    if not site.trust.required:
        print("(this site accepts unsigned releases)")
    for r in site.releases.list():
        signed = f"signed {r.signer} sv {r.secure_version}" if r.signature else "unsigned"
        print(f"{r.version:<12} {r.sha256} {r.size:>9} {r.date} {signed}")


def cmd_keygen(args) -> None:
    from tools.site.signing import SigningError, generate_key

    try:
        digest = generate_key(args.keyfile)
    except SigningError as e:
        raise CommandError(str(e)) from None
    print(f"{args.keyfile}: RSA-3072 release signing key (keep it offline)\nkey digest {digest}")


def cmd_key_digest(args) -> None:
    from tools.site.signing import SigningError, key_digest, load_public

    try:
        print(key_digest(load_public(args.keyfile)))
    except SigningError as e:
        raise CommandError(str(e)) from None


def cmd_sign(args) -> None:
    from tools.espidf.images import ImageError, check_app_image
    from tools.site.releases import ReleaseError, check_version
    from tools.site.signing import SigningError, load_private, load_public, manifest_text, sign

    if bool(args.key) == bool(args.signer):
        raise CommandError("sign with --key KEY.pem, or with --signer CMD and --pub-key PUB.pem")
    if args.signer and not args.pub_key:
        raise CommandError("--signer needs --pub-key: the public key the signature is checked with")
    if args.output.exists():
        raise CommandError(f"{args.output} exists")
    try:
        report = check_app_image(args.file.read_bytes())
    except ImageError as e:
        raise CommandError(f"{args.file}: {e.code}: {e}") from None
    try:
        check_version(args.version)
        manifest = manifest_text(args.version, report.sha256, report.size, args.secure_version, args.trust or None)
    except (ValueError, ReleaseError) as e:
        raise CommandError(str(e)) from None
    try:
        if args.key:
            bundle = sign(manifest, load_private(args.key))
        else:
            bundle = sign(manifest, signer=args.signer, pub=load_public(args.pub_key))
    except SigningError as e:
        raise CommandError(str(e)) from None
    args.output.write_text(json.dumps(bundle, indent=1) + "\n")
    print(f"{args.output}: {args.version} (sha256 {report.sha256}, {report.size} bytes, secure_version "
          f"{args.secure_version}{', trust ' + ' '.join(d[:16] for d in args.trust) if args.trust else ''})")


def cmd_trust(args) -> None:
    from tools.site.signing import SigningError, load_public

    trust = _site(args).trust
    if args.action in ("add", "remove") and not args.key:
        raise CommandError(f"trust {args.action}: name the key")
    try:
        if args.action == "add":
            print(f"trusted {trust.add(load_public(Path(args.key)))}")
        elif args.action == "remove":
            trust.remove(args.key)
        elif args.action == "require":
            trust.require(True)
        elif args.action == "allow-unsigned":
            trust.require(False)
        print("releases must be signed" if trust.required else "releases may be unsigned")
        for d in trust.keys():
            print(f"  {d}")
    except SigningError as e:
        raise CommandError(str(e)) from None


def cmd_account(args) -> None:
    """The people who sign in to the dashboard, each with a password they chose."""
    import getpass

    from tools.site.identities import check_account

    accounts = _site(args).accounts
    if args.action in ("add", "remove") and not args.name:
        raise CommandError(f"account {args.action}: name the account")
    try:
        if args.action == "add":
            check_account(args.name)
            if args.password_stdin:
                password = sys.stdin.readline().rstrip("\n")
            elif not sys.stdin.isatty():
                raise CommandError("no terminal to ask for the password on: give it with --password-stdin")
            else:
                password = getpass.getpass(f"password for {args.name}: ")
                if getpass.getpass("again: ") != password:
                    raise CommandError("the two passwords differ")
            check_account(args.name, password)
            accounts.set(args.name, password)
            print(f"{args.name}: may sign in to the dashboard")
        elif args.action == "remove":
            if not accounts.remove(args.name):
                raise CommandError(f"no account {args.name}")
            print(f"{args.name}: removed (signed out at their next request)")
        else:
            for name in accounts.names():
                print(name)
    except ValueError as e:
        raise CommandError(str(e)) from None
    except EOFError:
        raise CommandError("no password given") from None


def cmd_serve(args) -> None:
    import dataclasses

    from tools.control.services import Services
    from tools.operator import dashboard

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("transitions", "amqtt"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    _ports_free(args.host, {"--mqtt-port": args.mqtt_port, "--https-port": args.https_port,
                            "--service-port": args.service_port if args.broker == "mosquitto" else 0,
                            "--dashboard-port": args.dashboard_port})

    async def main():
        services = Services(_site(args), args.host, args.mqtt_port, args.https_port, args.ntp_port, args.broker,
                            args.service_port)
        ep = await services.start()
        dash, dash_port = await dashboard.start(services.site, args.host, args.dashboard_port)
        ep = dataclasses.replace(ep, dashboard_port=dash_port)
        services.site.write_endpoints(ep)
        own = f"  services mqtts://{ep.host}:{ep.service_port}" if ep.service_port else ""
        print(f"mqtts://{ep.host}:{ep.mqtt_port}{own}  https://{ep.host}:{ep.https_port}  sntp://{ep.host}:{ep.ntp_port}"
              f"  dashboard https://{ep.host}:{dash_port}/  (Ctrl-C stops)", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await dash.cleanup()
        await services.stop()

    asyncio.run(main())


def _ports_free(host: str, ports: dict[str, int]) -> None:
    """Say which port is taken before a service fails on it half started."""
    import socket

    for flag, port in ports.items():
        if not port:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError as e:
                raise CommandError(f"{host}:{port} ({flag}): {e.strerror}; another `serve`? pick another "
                                   f"with {flag}") from None


def cmd_replica(args) -> None:
    from tools.control.replica import MQTTSettings, Replica

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    site = _site(args)
    settings = MQTTSettings(args.mqtt_host, args.mqtt_port, "replica", site.service_password("replica"),
                            Path(args.ca) if args.ca else site.pki.ca_cert, worker=args.name,
                            share_group=args.share_group)
    try:
        replica = Replica(settings, args.db or site.shadow_store, grant_key=site.grant_key)
    except Exception as e:  # noqa: BLE001 - sqlite3 and psycopg each have their own errors
        raise CommandError(f"shadow store {args.db or site.shadow_store}: {str(e).splitlines()[0]}") from None

    async def main():
        task = asyncio.create_task(replica.run())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        from tools.control.services import stop_task

        await stop_task(task)

    asyncio.run(main())


def cmd_provision(args) -> None:
    from tools.esp32emu.provision import provision_emulated

    from tools.espidf.images import ImageError

    try:
        root = provision_emulated(_site(args), args.device, args.image.read_bytes(), args.version,
                                  args.dir, compiled=not args.source)
    except ImageError as e:
        raise CommandError(f"{args.image}: {e.code}: {e}") from None
    except (ValueError, FileNotFoundError) as e:
        raise CommandError(str(e)) from None
    print(root)


def cmd_provision_board(args) -> None:
    import os

    from tools.board.provision import provision_board

    image = args.image.read_bytes() if args.image else None
    try:
        out = provision_board(_site(args), args.device, args.out, args.wifi_ssid,
                              os.environ.get("WIFI_PASSWORD", ""), args.broker_host, image, args.version)
    except (ValueError, FileNotFoundError) as e:
        raise CommandError(str(e)) from None
    print(f"{out}: config.json secrets.json ca.der{' ota.json' if image else ''}"
          f" (copy them to the board with `make deploy PORT=... CONFIG={out}`)")


def cmd_revoke(args) -> None:
    from tools.board.provision import revoke

    try:
        if not revoke(_site(args), args.device):
            raise CommandError(f"no device {args.device}")
    except ValueError as e:
        raise CommandError(str(e)) from None
    print(f"{args.device}: revoked (broker and store refuse it from now on)")


def cmd_flash(args) -> None:
    from tools.board.flashing import FlashError, flash

    try:
        info = flash(args.port, args.firmware, args.baud, erase=not args.no_erase, verify_read=args.verify)
    except FlashError as e:
        raise CommandError(f"{e.code}: {e}") from None
    except OSError as e:
        raise CommandError(f"{args.firmware}: {e.strerror}") from None
    print(f"{args.firmware}: {info.size} bytes written at 0x1000 to {args.port}"
          f"{' and read back identical' if args.verify else ''}")


def cmd_deploy(args) -> None:
    from tools.board.deploy import DeployError, deploy

    try:
        r = deploy(args.port, args.config, force_source=args.source, reset=not args.no_reset)
    except DeployError as e:
        raise CommandError(str(e)) from None
    print(f"board .mpy {r.board_mpy}; {'compiled with mpy-cross' if r.compiled else 'sources'}: "
          f"{len(r.copied)} copied, {len(r.unchanged)} unchanged, {len(r.removed)} stale removed; verified by SHA-256")
    for p in r.copied:
        print(f"  + {p}")
    for p in r.removed:
        print(f"  - {p}")


def cmd_emulate(args) -> None:
    from tools.esp32emu.runner import Runner

    if args.new:
        from tools.esp32emu.runner import make_fresh_board
        from tools.espidf.images import ImageError, check_app_image

        if (args.dir / "flash.bin").exists():
            raise CommandError(f"{args.dir} already holds a board")
        image = args.new.read_bytes()
        try:
            check_app_image(image)
        except ImageError as e:
            raise CommandError(f"{args.new}: {e.code}: {e}") from None
        make_fresh_board(args.dir, image)
    runner = Runner(args.dir, heapsize=args.heapsize, max_boots=args.max_boots, cut_at=args.cut_at,
                    repl_port=args.repl_port, clock_unset=not args.clock_set)
    if args.cut_after_ops:
        runner.arm_power_cut(args.cut_after_ops, args.tear)
    signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    try:
        boots = runner.run()
    except KeyboardInterrupt:
        runner.stop()
        return
    if boots and boots[-1].ended == "no bootable app":
        raise CommandError("no bootable app partition")


def cmd_flash_info(args) -> None:
    from tools.esp32emu.flashinfo import flash_info

    try:
        print(json.dumps(flash_info(args.flash, args.chip_rev), indent=1))
    except ValueError as e:
        raise CommandError(str(e)) from None


def cmd_desired(args) -> None:
    from tools.operator import client as op

    site = _site(args)
    rel = site.releases.get(args.version)
    if rel is None:
        raise CommandError(f"no release {args.version} (see `releases`)")
    try:
        doc = asyncio.run(op.set_desired(site, args.device, rel, args.ttl, token=args.auth == "token"))
    except (op.OperatorError, ValueError) as e:
        raise CommandError(str(e)) from None
    print(json.dumps(doc, indent=1))


def cmd_shadow(args) -> None:
    from tools.operator import client as op

    try:
        doc = asyncio.run(op.get_shadow(_site(args), args.device))
    except op.OperatorError as e:
        raise CommandError(str(e)) from None
    print(json.dumps(doc, indent=1))


def cmd_status(args) -> None:
    import time

    from tools.operator import rollout as ro
    from tools.site import Site
    from tools.operator.status import as_json, fleet, table

    site = Site(args.site)

    def rollouts():
        """Those running and the last one to end: what an operator wants to see."""
        if not site.rollouts_path.exists():
            return []
        db = ro.RolloutDB(site.rollouts_path)
        try:
            infos = db.list()
            shown = [i for i in infos if i.state == ro.RUNNING] or infos[-1:]
            return [(i, db.targets(i.id)) for i in shown]
        finally:
            db.close()

    def signer(info):
        rel = site.releases.get(info.version)
        return rel.signer if rel and rel.sha256 == info.sha256 else None

    while True:
        rows = fleet(site.shadow_store, site.grant_key)
        if args.device:
            rows = [r for r in rows if r.device in args.device]
        runs = rollouts()
        if args.json:
            doc = as_json(rows)
            doc["rollouts"] = [dict(ro.summary(i, t, with_devices=False), signer=signer(i)) for i, t in runs]
            print(json.dumps(doc, indent=1))
        else:
            if args.watch:
                print("\033[H\033[J", end="")  # redraw in place
            print(table(rows))
            if not site.trust.required:
                print("(this site accepts unsigned releases: `trust require` to stop)")
            for i, t in runs:
                print(ro.progress_line(i, t, signer=signer(i)))
        if not args.watch:
            return
        time.sleep(args.watch)


def _drive(site, engine) -> None:
    """Run a rollout to its end, with a live progress line; exit 1 if it did not complete."""
    from tools.operator import rollout as ro

    tty = sys.stdout.isatty()
    last = [""]

    def show(info, targets):
        line = ro.progress_line(info, targets, signer=engine.release.signer)
        if line != last[0]:
            print(("\r\033[K" if tty else "") + line, end="" if tty else "\n", flush=True)
            last[0] = line

    import aiomqtt

    try:
        info = asyncio.run(ro.run(site, engine, on_tick=show))
    except (OSError, aiomqtt.MqttError) as e:
        raise CommandError(f"broker: {e} (is `serve` running?); `rollout resume {engine.id}` carries on") from None
    except KeyboardInterrupt:
        raise CommandError(f"interrupted; `rollout resume {engine.id}` carries on") from None
    if tty:
        print()
    if info.state != ro.COMPLETED:
        raise CommandError(f"rollout {info.id} {info.state}: {info.reason or ''} (`rollout show {info.id}`)")


def cmd_rollout(args) -> None:
    from tools.operator import rollout as ro

    site = _site(args)
    db = ro.RolloutDB(site.rollouts_path)
    try:
        if args.action == "list":
            for info in db.list():
                print(ro.progress_line(info, db.targets(info.id)))
            return
        if args.action == "start":
            rel = site.releases.get(args.version)
            if rel is None:
                raise CommandError(f"no release {args.version} (see `releases`)")
            policy = ro.Policy(args.batches.split(","), args.success, args.abort_failures, args.abort_pct,
                               args.min_finished, args.timeout, args.max_attempts, not args.no_rollback, args.ttl,
                               args.auth)
            info = db.create(rel, ro.select_devices(site, args.devices, args.match, args.group, args.all), policy)
            print(f"{info.id}: {rel.version} to {info.ends[-1]} devices in batches ending at {info.ends}")
            if not args.detach:
                _drive(site, ro.Engine(db, info.id, site.releases.by_sha256, site.grant_key))
            return
        engine = ro.Engine(db, args.id, site.releases.by_sha256, site.grant_key)
        if args.action == "show":
            targets = db.targets(args.id)
            if args.json:
                print(json.dumps(ro.summary(engine.info, targets), indent=1))
                return
            print(ro.progress_line(engine.info, targets))
            for t in targets:
                print(f"  {t.device:<20} batch {t.batch + 1}  {t.state:<11} {t.error or '':<18}"
                      f" was {t.prev_version or '-'}{'  rollback ' + t.rollback if t.rollback else ''}")
        elif args.action == "cancel":
            engine.cancel()
            print(ro.progress_line(db.info(args.id), db.targets(args.id)))
        elif args.action == "rollback":
            sends = engine.roll_back()
            print(f"{args.id}: rolling back {len(sends)} devices")
            _drive(site, engine)
        elif args.action == "resume":
            _drive(site, engine)
    except ro.RolloutError as e:
        raise CommandError(str(e)) from None
    finally:
        db.close()


def cmd_demo(args) -> None:
    from tools.demo import run_demo

    logging.basicConfig(level=logging.ERROR)
    if asyncio.run(run_demo(args.dir)) != 0:
        raise CommandError("demo failed")


def parser() -> argparse.ArgumentParser:
    # `fleet-ota` once installed (pyproject.toml), `python -m tools` from a checkout
    name = Path(sys.argv[0]).name
    p = argparse.ArgumentParser(prog="python -m tools" if name == "__main__.py" else name,
                                description="ESP32 fleet OTA: host tools.")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help):
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    def with_site(sp):
        sp.add_argument("--site", type=Path, default=DEFAULT_SITE, help="installation folder (default: build/site)")
        return sp

    sp = add("image-build", cmd_image_build, "build a valid ESP32 app image for tests")
    sp.add_argument("--version", required=True)
    sp.add_argument("--size", type=int, default=256 * 1024, help="bytes (rounded up to 16)")
    sp.add_argument("--project", default="micropython", help="app descriptor project name")
    sp.add_argument("--panic-on-boot", action="store_true", help="emulated chip crashes right after booting it")
    sp.add_argument("-o", "--output", type=Path, required=True)

    sp = add("image-check", cmd_image_check, "check that a file is an app image a slot can boot")
    sp.add_argument("file", type=Path)
    sp.add_argument("--slot-size", type=lambda s: int(s, 0), default=0x180000)

    sp = with_site(add("release", cmd_release, "validate an app image and add it to the store"))
    sp.add_argument("file", type=Path)
    sp.add_argument("--version", help="release version (signed: the manifest's, by default)")
    sp.add_argument("--signature", type=Path, help="the signature bundle `sign` made for this image")

    with_site(add("releases", cmd_releases, "list releases"))

    sp = add("keygen", cmd_keygen, "make an RSA-3072 release signing key (on the machine that keeps it offline)")
    sp.add_argument("keyfile", type=Path)

    sp = add("key-digest", cmd_key_digest, "print a key's digest (what devices trust; espsecure "
             "digest-sbv2-public-key writes the same bytes)")
    sp.add_argument("keyfile", type=Path, help="PEM public or private key")

    sp = add("sign", cmd_sign, "sign a release manifest for an image, with a key or an external signer (needs no site)")
    sp.add_argument("file", type=Path, help="the app image")
    sp.add_argument("--version", required=True)
    sp.add_argument("--secure-version", type=int, required=True,
                    help="security counter: devices refuse any release below the highest they confirmed; "
                         "raise it for a release that fixes a vulnerability or changes --trust")
    sp.add_argument("--trust", nargs="+", metavar="DIGEST",
                    help="key digests devices trust once this release is confirmed (rotation, revocation; needs a "
                         "--secure-version above the devices' counter)")
    sp.add_argument("--key", type=Path, help="PEM private key (keygen, or espsecure generate-signing-key)")
    sp.add_argument("--signer", help="external signer command: SHA-256 of the manifest on stdin, "
                    "the 384-byte PSS signature (raw or base64) on stdout")
    sp.add_argument("--pub-key", type=Path, help="with --signer: its public key (PEM)")
    sp.add_argument("-o", "--output", type=Path, required=True, help="signature bundle to write")

    sp = with_site(add("trust", cmd_trust, "the signing keys new devices trust, and whether releases must be signed"))
    sp.add_argument("action", choices=("list", "add", "remove", "require", "allow-unsigned"))
    sp.add_argument("key", nargs="?", help="add: a PEM public (or private) key file; remove: a key digest or "
                    "a unique prefix of one")

    sp = with_site(add("account", cmd_account, "the people who sign in to the dashboard"))
    sp.add_argument("action", choices=("list", "add", "remove"))
    sp.add_argument("name", nargs="?")
    sp.add_argument("--password-stdin", action="store_true", help="add: read the password from standard input")

    sp = with_site(add("serve", cmd_serve, "run broker, replica and firmware store"))
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--mqtt-port", type=int, default=8883)
    sp.add_argument("--https-port", type=int, default=8443)
    sp.add_argument("--ntp-port", type=int, default=1123, help="UDP port of the SNTP server for devices")
    sp.add_argument("--cert-name", action="append", default=[],
                    help="another DNS name or address boards may use (repeatable)")
    sp.add_argument("--broker", choices=("amqtt", "mosquitto"), default="amqtt",
                    help="embedded amqtt (default), or mosquitto as a child process (many devices)")
    sp.add_argument("--dashboard-port", type=int, default=8445, help="the operators' web page (HTTPS)")
    sp.add_argument("--service-port", type=int, default=8884,
                    help="mosquitto only: the MQTT listener of the replica and operator tools (devices "
                         "use --mqtt-port, where a session is always named after its login)")

    sp = with_site(add("replica", cmd_replica, "run one replica worker against any MQTT broker (mosquitto: "
                       "several workers with --share-group)"))
    sp.add_argument("--mqtt-host", default="127.0.0.1")
    sp.add_argument("--mqtt-port", type=int, required=True,
                    help="the broker's listener for services (mosquitto from `serve`: its --service-port)")
    sp.add_argument("--share-group", help="subscribe as $share/GROUP/... so workers split the stream (`serve` on "
                    "mosquitto joins the group replicas)")
    sp.add_argument("--name", default="1", help="worker name (client id replica-NAME-<tag>)")
    sp.add_argument("--ca", help="CA of the broker's certificate (default: the site's)")
    sp.add_argument("--db", help="SQLite file or postgresql:// URL (default: <site>/shadows.url if present, "
                    "else <site>/replica.db)")

    sp = with_site(add("provision", cmd_provision, "create an emulated device (needs `serve` running)"))
    sp.add_argument("device")
    sp.add_argument("--image", type=Path, required=True, help="app image the device starts with")
    sp.add_argument("--version", required=True, help="version label of that image")
    sp.add_argument("--dir", type=Path, help="device folder (default: <site>/devices/<device>)")
    sp.add_argument("--source", action="store_true", help="copy .py instead of mpy-cross output")

    sp = with_site(add("provision-board", cmd_provision_board,
                       "create a real board's identity and the config files `deploy` copies (needs `serve`)"))
    sp.add_argument("device")
    sp.add_argument("--out", type=Path, required=True, help="folder for config.json, secrets.json, ca.der")
    sp.add_argument("--wifi-ssid", required=True, help="Wi-Fi network (its password: $WIFI_PASSWORD)")
    sp.add_argument("--broker-host", help="address the board dials (default: the one `serve` listens on)")
    sp.add_argument("--image", type=Path, help="the app image flashed on the board (micropython.bin), so it "
                    "reports a version from its first boot")
    sp.add_argument("--version", help="version label of --image")

    sp = with_site(add("revoke", cmd_revoke, "remove a device's access to the broker and the store"))
    sp.add_argument("device")

    sp = add("flash", cmd_flash, "erase a board and write a combined MicroPython firmware.bin at 0x1000")
    sp.add_argument("--port", required=True, help="serial port (/dev/ttyUSB0) or esptool URL")
    sp.add_argument("--firmware", type=Path, required=True, help="ESP32_GENERIC-OTA firmware.bin")
    sp.add_argument("--baud", type=int, default=460800)
    sp.add_argument("--no-erase", action="store_true", help="keep the filesystem and otadata")
    sp.add_argument("--verify", action="store_true", help="read it back and compare (slow)")

    sp = add("deploy", cmd_deploy, "copy the device code (and config) to a board with mpremote")
    sp.add_argument("--port", required=True, help="/dev/ttyUSB0, or socket://127.0.0.1:PORT (emulated board)")
    sp.add_argument("--config", type=Path, help="folder from provision-board")
    sp.add_argument("--source", action="store_true", help="copy .py sources instead of mpy-cross output")
    sp.add_argument("--no-reset", action="store_true", help="leave the board at the REPL afterwards")

    sp = add("emulate", cmd_emulate, "power on an emulated ESP32 device folder")
    sp.add_argument("dir", type=Path)
    sp.add_argument("--heapsize", default="112k", help="GC heap the firmware gets (default 112k)")
    sp.add_argument("--max-boots", type=int)
    sp.add_argument("--cut-after-ops", type=int, metavar="N",
                    help="cut the power at the N-th flash erase/program (bootloader included)")
    sp.add_argument("--tear", action="store_true", help="with --cut-after-ops: halfway through it")
    sp.add_argument("--cut-at", type=float, metavar="SECONDS", help="cut the power after this long")
    sp.add_argument("--clock-set", action="store_true",
                    help="power on with the host's time instead of 2000-01-01 (a cold ESP32)")
    sp.add_argument("--new", type=Path, metavar="IMAGE",
                    help="first create DIR as a freshly flashed board: IMAGE in ota_0, boot.py only (then `deploy`)")
    sp.add_argument("--repl-port", type=int, metavar="PORT",
                    help="serve the REPL on 127.0.0.1:PORT for `mpremote connect socket://...` (0: any)")

    sp = add("flash-info", cmd_flash_info, "show partitions, otadata, next boot and slot images of a flash.bin")
    sp.add_argument("flash", type=Path)
    sp.add_argument("--chip-rev", type=int, default=301)

    sp = with_site(add("desired", cmd_desired, "set a device's desired firmware to a release"))
    sp.add_argument("device")
    sp.add_argument("version")
    sp.add_argument("--ttl", type=int, default=900, help="URL lifetime in seconds (max 3600)")
    sp.add_argument("--auth", choices=("url", "token"), default="url",
                    help="url: pre-signed for the device; token: the device fetches a temporary credential")

    sp = with_site(add("shadow", cmd_shadow, "print a device's shadow document"))
    sp.add_argument("device")

    sp = with_site(add("status", cmd_status, "fleet table: running and desired version, state, last seen, error"))
    sp.add_argument("device", nargs="*", help="only these devices")
    sp.add_argument("--json", action="store_true", help="machine-readable, with a summary")
    sp.add_argument("--watch", type=float, nargs="?", const=1.0, metavar="S",
                    help="redraw every S seconds (default 1) until Ctrl-C: a live progress bar")

    sp = with_site(add("rollout", cmd_rollout, "staged rollout of a release to many devices, with abort and "
                       "roll back (needs `serve`)"))
    act = sp.add_subparsers(dest="action", required=True)
    def action(name, **kw):  # `rollout start ... --site S` as well as `rollout --site S start ...`
        a = act.add_parser(name, **kw)
        a.add_argument("--site", type=Path, default=argparse.SUPPRESS, help="installation folder")
        return a

    st = action("start", help="create a rollout and drive it to its end (Ctrl-C leaves it resumable)")
    st.add_argument("version", help="release to roll out")
    who = st.add_mutually_exclusive_group(required=True)
    who.add_argument("--devices", nargs="+", metavar="ID")
    who.add_argument("--match", metavar="GLOB", help="devices whose id matches, e.g. 'shelf-*'")
    who.add_argument("--group", metavar="NAME", help="a group from <site>/groups.json: {\"NAME\": [ids or globs]}")
    who.add_argument("--all", action="store_true", help="every device the replica knows")
    st.add_argument("--batches", default="1,10%,50%,100%",
                    help="cumulative batch ends, counts or percentages (default 1,10%%,50%%,100%%)")
    st.add_argument("--success", type=float, default=100.0, metavar="PCT",
                    help="share of a batch that must succeed before the next one starts (default 100)")
    st.add_argument("--abort-failures", type=int, metavar="N", help="abort when N devices have failed")
    st.add_argument("--abort-pct", type=float, metavar="PCT", help="abort when PCT%% of finished devices failed")
    st.add_argument("--min-finished", type=int, default=1, metavar="N",
                    help="failure thresholds apply once N devices have finished (default 1)")
    st.add_argument("--timeout", type=int, default=900, metavar="S",
                    help="a device in progress longer than this has failed (default 900)")
    st.add_argument("--max-attempts", type=int, default=3,
                    help="a transient device error counts as failed after this many tries (default 3)")
    st.add_argument("--no-rollback", action="store_true", help="on abort, leave touched devices as they are")
    st.add_argument("--ttl", type=int, default=900, help="lifetime of each device's URL in seconds (max 3600)")
    st.add_argument("--auth", choices=("url", "token"), default="url",
                    help="url: each device gets a URL pre-signed for it; token: a bare URL, and devices ask "
                    "the broker for a temporary credential (default url)")
    st.add_argument("--detach", action="store_true", help="only create it (drive it with `rollout resume`)")
    action("list", help="every rollout, one line each")
    for name, text in (("show", "one rollout and each of its devices"), ("resume", "drive a rollout on to its end"),
                       ("cancel", "target no more devices (those updating carry on)"),
                       ("rollback", "cancel, and set each touched device back to the release it ran before")):
        a = action(name, help=text)
        a.add_argument("id")
        if name == "show":
            a.add_argument("--json", action="store_true")

    sp = add("demo", cmd_demo, "run the end-to-end demo")
    sp.add_argument("--dir", type=Path, default=Path("build/demo"))
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except CommandError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a file missing or unwritable, a port taken: the user's to fix
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    return 0
