"""The emulated ESP32's power and reset loop.

A device is a folder: `flash.bin` (raw 4 MiB flash in ESP-IDF's layout), `fs/` (the MicroPython
filesystem: boot.py, main.py, firmware/, lib/, config) and `run/` (live control files).

Each chip reset runs the ESP-IDF second-stage bootloader model (`target/espidf.py`) on flash.bin,
which may rewrite otadata exactly as the real one does, then starts the MicroPython unix port on
`target/_emu_boot.py` with the chip's state in its environment. How that process ends decides
the next reset cause: machine.reset() -> HARD_RESET, a panic -> HARD_RESET, watchdog expiry ->
WDT_RESET; a finished main.py leaves the board idling at the REPL.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tools.board import mpy
from tools.espidf import onflash
from tools.esp32emu.process import die_with_parent, micropython_command, no_orphan_prefix
from tools.esp32emu.target._emuhw import (  # how a MicroPython run of the chip ended
    EXIT_DEEPSLEEP,
    EXIT_PANIC,
    EXIT_REPL,
    EXIT_RESET,
    EXIT_SOFT_RESET,
)
from tools.esp32emu.target.norflash import NorFlash, PowerCut, PowerPlan, arm_power_cut, disarm_power_cut

TARGET_DIR = Path(__file__).resolve().parent / "target"
ROM_CACHE = Path(__file__).resolve().parents[2] / "build" / "cache" / "esp32emu-rom"
FLASH_SIZE = 4 * 1024 * 1024
DEFAULT_HEAPSIZE = "112k"  # GC heap of an ESP32 without PSRAM after one growth (MP PR #13219)
# On the chip, esp32/machine/network are C and cost no GC heap. Here they are MicroPython
# (.mpy), so the process gets this much extra heap; _emu_boot.py reserves the nominal size for
# the firmware in one piece before they load and ballasts the rest (see _emuhw.pin_heap).
EMULATOR_ALLOWANCE = 128 * 1024
DEFAULT_CHIP_REV = 301  # v3.1, the current ESP32 revision
DEFAULT_TLS_BUDGET = 2  # TLS connections an ESP32 without PSRAM holds at once (target/ssl.py)
EPOCH_2000 = 946684800  # where a cold ESP32's RTC starts


# machine.reset_cause() values (MicroPython ports/esp32/modmachine.c)
PWRON_RESET, HARD_RESET, WDT_RESET, DEEPSLEEP_RESET, SOFT_RESET = 1, 2, 3, 4, 5

# Marker in a test image's app descriptor: the emulated CPU panics right after the bootloader
# hands over (a build that crashes during start-up). `image-build --panic-on-boot` sets it.
PANIC_ON_BOOT = "emu:panic-on-boot"
# An image that crashes on older silicon only (as builds without a chip errata workaround do):
# project name PANIC_BELOW_REV + "300" panics on chips before v3.0.
PANIC_BELOW_REV = "emu:panic-below-rev:"


def panics_on(project: str, chip_rev: int) -> bool:
    """Does an image with this app-descriptor project name crash at start-up on this chip?"""
    if project == PANIC_ON_BOOT:
        return True
    rev = project[len(PANIC_BELOW_REV):] if project.startswith(PANIC_BELOW_REV) else ""
    return rev.isdigit() and chip_rev < int(rev)


def parse_size(text: str) -> int:
    """'112k' / '1m' / '65536' -> bytes, as micropython -X heapsize= reads them."""
    t = text.strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    return int(t[:-1] if t[-1:] in "km" else t) * mult


ROM_NATIVE = ("_native.py",)  # viper code, compiled for this machine (see target/_native.py)


def rom_sources() -> dict[str, Path]:
    """The emulated chip's built-in modules: target/, and the ESP-IDF model as `espidf`."""
    rom = mpy.tree(TARGET_DIR, (p for p in TARGET_DIR.glob("*.py") if p.name != "_emu_boot.py"))
    rom["espidf.py"] = Path(onflash.__file__)
    return rom


def rom_dir() -> Path:
    """The emulated chip's built-in modules compiled to .mpy (cached by content)."""
    return mpy.compile_tree(rom_sources(), ROM_CACHE, native=ROM_NATIVE)


def run_script(code: str, cwd: Path, env: dict | None = None, heapsize: str = "256k",
               timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `code` under the MicroPython unix port, outside the boot loop, with the repository,
    its build cache and the emulated chip's modules importable (tests and benchmarks)."""
    repo = TARGET_DIR.parents[2]
    script = Path(cwd) / "_script.py"
    script.write_text(code)
    full_env = dict(os.environ)
    full_env["MICROPYPATH"] = ":".join([str(rom_dir()), str(repo), str(repo / "build" / "cache"), ""])
    full_env.update(env or {})
    return subprocess.run([*micropython_command(), "-X", f"heapsize={heapsize}", str(script)],
                          cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def chip_env(flash: Path, running: int = 0x10000, cause: int = PWRON_RESET) -> dict:
    """Environment for run_script: the code runs "on" the chip whose flash is `flash` (its
    control folder beside it), from the slot at `running`, after reset cause `cause`."""
    ctl = Path(flash).parent / "run"
    ctl.mkdir(exist_ok=True)
    return {
        "ESP32EMU_FLASH": str(flash),
        "ESP32EMU_CTL": str(ctl),
        "ESP32EMU_RUNNING": str(running),
        "ESP32EMU_RESET_CAUSE": str(cause),
    }


def make_fresh_board(root: Path, app_image: bytes) -> None:
    """A board folder as `make flash` leaves a board: the app in ota_0, blank otadata, and a
    filesystem holding only MicroPython's default boot.py (the code comes with `deploy`)."""
    (Path(root) / "fs").mkdir(parents=True, exist_ok=True)
    make_flash(Path(root) / "flash.bin", app_image)
    (Path(root) / "fs" / "boot.py").write_text("# boot.py -- run on boot-up\n")


def make_flash(path: Path, app_image: bytes, size: int = FLASH_SIZE, rows=onflash.MICROPYTHON_OTA_4MIB) -> None:
    """Write a flash image as esptool leaves a board: partition table (`rows`, as
    onflash.make_partition_table takes them), app in ota_0, otadata blank (the first boot then
    writes otadata[0] = {seq 1, VALID})."""
    table = onflash.make_partition_table(rows)
    parts = onflash.parse_partition_table(table, size)  # refuses partitions beyond the flash
    ota_0 = onflash.ota_slots(parts)[0]
    if len(app_image) > ota_0.size:
        raise ValueError(f"app image of {len(app_image)} bytes does not fit ota_0")
    flash = bytearray(b"\xff" * size)
    flash[onflash.PARTITION_TABLE_OFFSET : onflash.PARTITION_TABLE_OFFSET + len(table)] = table
    flash[ota_0.offset : ota_0.offset + len(app_image)] = app_image
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_bytes(flash)
    tmp.replace(path)


@dataclass
class BootRecord:
    """One chip boot: what the bootloader did and how the run ended."""

    number: int
    reset_cause: int
    slot: str | None
    log: list[str]
    writes: list[str]
    ended: str = "running"


@dataclass
class Runner:
    """Runs one emulated device until stop() (or max_boots chip boots)."""

    root: Path
    heapsize: str = DEFAULT_HEAPSIZE
    chip_rev: int = DEFAULT_CHIP_REV
    max_boots: int | None = None
    tls_budget: int = DEFAULT_TLS_BUDGET
    cut_at: float | None = None  # cut the power this many seconds after run() starts
    off_after_cut: float = 0.0  # seconds the board stays dark after a power cut
    repl_port: int | None = None  # expose the REPL on 127.0.0.1:PORT for mpremote (0: any)
    clock_unset: bool = True  # power-on starts the RTC at 2000-01-01, as on a cold ESP32
    on_line: Callable[[str], None] | None = None
    device_id: str | None = None
    env: dict[str, str] | None = None  # extra environment for the chip's runs (benchmark probes)
    boots: list[BootRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.device_id = self.device_id or self.root.name
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self.repl = None
        self.link = None  # the board's Wi-Fi link (tools/esp32emu/link.py), made by run()
        self._cut_now = False
        self._plan_armed = False
        self._wake = threading.Event()  # set when the run ends or the power is cut from outside

    @property
    def flash_path(self) -> Path:
        return self.root / "flash.bin"

    @property
    def fs(self) -> Path:
        return self.root / "fs"

    @property
    def ctl(self) -> Path:
        return self.root / "run"

    def say(self, line: str) -> None:
        (self.on_line or (lambda s: print(s, flush=True)))(line)

    @property
    def power_plan(self) -> Path:
        return self.ctl / "powercut"

    def arm_power_cut(self, after: int, tear: bool = False) -> None:
        """Cut the power at the `after`-th flash erase/program from now (bootloader writes
        included); with `tear`, halfway through that operation. One-shot."""
        self.ctl.mkdir(parents=True, exist_ok=True)
        arm_power_cut(str(self.power_plan), after, tear)
        self._plan_armed = True

    def cut_power(self) -> None:
        """Cut the power now (it comes back at once, or after off_after_cut)."""
        self._cut_now = True
        self._wake.set()

    def _raise_cut(self) -> None:
        raise PowerCut()

    def stop(self) -> None:
        self._stop.set()
        proc = self._proc
        if proc and proc.poll() is None:
            proc.kill()
        if self.repl is not None:
            self.repl.close()

    # -- one chip boot --------------------------------------------------------------

    def _bootloader(self, cause: int) -> BootRecord:
        flash = NorFlash(str(self.flash_path), power=PowerPlan(str(self.power_plan), self._raise_cut))
        try:
            parts = onflash.read_partition_table(flash, flash.size)
            sel = onflash.select_boot(flash, parts, self.chip_rev, commit=True)
        finally:
            flash.close()
        rec = BootRecord(len(self.boots) + 1, cause, sel["part"].label if sel["part"] else None,
                         sel["log"], sel["writes"])
        self.boots.append(rec)
        for line in sel["log"]:
            self.say(f"boot: {line}")
        self._booted = sel
        return rec

    def _fast_wake(self) -> BootRecord:
        """Wake from deep sleep as MicroPython's ESP32 bootloader does
        (CONFIG_BOOTLOADER_SKIP_VALIDATE_IN_DEEP_SLEEP): boot the partition the RTC remembers,
        without reading otadata. An image set_boot() chose before sleeping is NOT booted."""
        prev = self.boots[-1]
        rec = BootRecord(len(self.boots) + 1, DEEPSLEEP_RESET, prev.slot,
                         [f"fast boot from deep sleep: {prev.slot} (otadata not read)"], [])
        self.boots.append(rec)
        self.say(f"boot: {rec.log[0]}")
        return rec

    def _spawn(self, cause: int, skip_main: bool = False) -> subprocess.Popen:
        part = self._booted["part"]
        self.ctl.mkdir(parents=True, exist_ok=True)
        (self.ctl / "exit").unlink(missing_ok=True)
        env = dict(os.environ)
        env.update(
            ESP32EMU_FLASH=str(self.flash_path.resolve()),
            ESP32EMU_CTL=str(self.ctl.resolve()),
            ESP32EMU_RUNNING=str(part.offset),
            ESP32EMU_RESET_CAUSE=str(cause),
            ESP32EMU_CHIP_REV=str(self.chip_rev),
            ESP32EMU_DEVICE_ID=self.device_id or "",
            ESP32EMU_TLS_BUDGET=str(self.tls_budget),
        )
        env.update(self.env or {})
        env.pop("MICROPYPATH", None)
        nominal = parse_size(self.heapsize)
        env.update(ESP32EMU_ROM=str(rom_dir()), ESP32EMU_HEAP=str(nominal))
        cmd = [*micropython_command(), "-X", f"heapsize={nominal + EMULATOR_ALLOWANCE}"]
        if self.repl is None:
            prefix = no_orphan_prefix()
            proc = subprocess.Popen([*prefix, *cmd, str(TARGET_DIR / "_emu_boot.py")], cwd=self.fs, env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    preexec_fn=None if prefix else die_with_parent)
            threading.Thread(target=self._pump, args=(proc,), daemon=True).start()
            return proc
        env["ESP32EMU_REPL"] = "1"
        if skip_main:
            env["ESP32EMU_SKIP_MAIN"] = "1"
        proc = subprocess.Popen(cmd + ["-i", str(TARGET_DIR / "_emu_boot.py")], cwd=self.fs, env=env,
                                **self.repl.spawn_args())
        self.repl.started()
        return proc

    def _pump(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            self.say(raw.decode(errors="replace").rstrip("\r\n"))

    def _wdt_left(self) -> float | None:
        """Seconds until the armed watchdog expires unless fed (<= 0: it has), or None."""
        wdt = self.ctl / "wdt"
        try:
            st = wdt.stat()
            timeout_ms = int(wdt.read_text() or "0")
        except (OSError, ValueError):
            return None
        if timeout_ms <= 0:
            return None
        return timeout_ms / 1000 - (time.time() - st.st_mtime)

    def _wdt_expired(self) -> bool:
        left = self._wdt_left()
        return left is not None and left < 0

    def _cut_due(self) -> bool:
        if self._cut_now or (self.ctl / "cut").exists():  # asked for, or a planned cut was hit
            return True
        return self.cut_at is not None and time.monotonic() - self._t_start >= self.cut_at

    def _wait(self, proc: subprocess.Popen) -> int | str | None:
        """Wait for the run to end; returns its exit code, None on a watchdog reset, or
        "cut" when the power is cut."""
        wake = self._wake
        wake.clear()
        ended = threading.Event()

        def reap() -> None:  # blocked in waitpid: no polling for the exit
            proc.wait()
            ended.set()
            wake.set()

        threading.Thread(target=reap, daemon=True).start()
        while not self._stop.is_set():
            if self._cut_due():
                proc.kill()
                proc.wait()
                return "cut"
            if ended.is_set():
                self._take_exit()
                return proc.returncode
            requested = self._take_exit()
            if requested is not None:
                proc.kill()  # the run ended (machine.reset() and the like) but -i kept it at the REPL
                proc.wait()
                return requested
            wdt_left = self._wdt_left()
            if wdt_left is not None and wdt_left < 0:
                proc.kill()
                proc.wait()
                return None
            wake.wait(self._check_interval(wdt_left))
        return EXIT_REPL  # stopped from outside

    def _check_interval(self, wdt_left: float | None) -> float:
        """How long to wait before looking at the control files again. They only matter to
        the watchdog, a planned power cut (the board then waits to die) and exit requests
        that did not end the process (the REPL's); the end of the process and cut_power()
        wake the wait at once. Every board checking 4 times a second cost an idle 200-board
        fleet a fifth of a host core; a board whose watchdog is armed is looked at when it
        could expire, and at least once a second. A timed cut and a REPL session stay precise."""
        if self.repl is not None:
            return 0.02
        if self.cut_at is not None:
            return max(0.005, min(0.25, self.cut_at - (time.monotonic() - self._t_start)))
        if wdt_left is None or self._plan_armed:
            return 0.25
        return max(0.005, min(1.0, wdt_left + 0.002))

    def _take_exit(self) -> int | None:
        path = self.ctl / "exit"
        try:
            code = int(path.read_text() or "-1")
        except (OSError, ValueError):
            return None
        path.unlink(missing_ok=True)
        return code

    def _power_restored(self) -> None:
        self.cut_at = None
        self._cut_now = False
        self._plan_armed = False
        disarm_power_cut(str(self.power_plan))
        (self.ctl / "cut").unlink(missing_ok=True)
        self.say("emulator: power cut; powering on again")
        self._stop.wait(self.off_after_cut)

    def _idle_at_repl(self) -> bool:
        """Board sits at the REPL. Returns True if an armed watchdog then resets it; False at
        once if none is armed (nothing can change the board's state any more)."""
        if not (self.ctl / "wdt").exists():
            return False
        while not self._stop.is_set():
            if self._wdt_expired():
                return True
            time.sleep(0.05)
        return False

    # -- the power/reset loop -----------------------------------------------------------

    def set_clock(self, unix_seconds: float | None = None) -> None:
        """Set the board's RTC (default: the host's time), as NTP or a bench would."""
        now = time.time()
        (self.ctl / "rtc").write_text(str(int(unix_seconds if unix_seconds is not None else now) - int(now)))

    def _rtc_power_on(self) -> None:
        # Power lost: the RTC starts over (software resets and deep sleep keep it).
        offset = (EPOCH_2000 - int(time.time())) if self.clock_unset else 0
        (self.ctl / "rtc").write_text(str(offset))

    def _running_pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def repl_address(self) -> str | None:
        return f"socket://127.0.0.1:{self.repl.port}" if self.repl else None

    def run(self) -> list[BootRecord]:
        cause = PWRON_RESET
        chip_reset = True
        self._t_start = time.monotonic()
        self.ctl.mkdir(parents=True, exist_ok=True)
        from tools.esp32emu.link import Link

        self.link = Link(self.ctl, self._running_pid)
        skip_main = False
        if self.repl_port is not None and self.repl is None:
            from tools.esp32emu.repl import ReplBridge

            self.repl = ReplBridge(self.repl_port, self.on_line or self.say)
            self.say(f"emulator: REPL on socket://127.0.0.1:{self.repl.port}")
        while not self._stop.is_set():
            if chip_reset:
                if self.max_boots is not None and len(self.boots) >= self.max_boots:
                    break
                (self.ctl / "wdt").unlink(missing_ok=True)  # a chip reset stops the task WDT
                if cause in (PWRON_RESET,):
                    self._rtc_power_on()
                try:
                    if cause == DEEPSLEEP_RESET and self.boots and self.boots[-1].slot:
                        rec = self._fast_wake()
                    else:
                        rec = self._bootloader(cause)
                except PowerCut:
                    self.boots.append(BootRecord(len(self.boots) + 1, cause, None, [], [], "power cut in bootloader"))
                    self._power_restored()
                    cause = PWRON_RESET
                    continue
                if self._booted["part"] is None:
                    rec.ended = "no bootable app"
                    self.say("boot: no bootable app partition: the board is bricked")
                    break
                desc = self._booted["images"][rec.slot].get("desc") or {}
                if panics_on(desc.get("project_name") or "", self.chip_rev):
                    self.say("Guru Meditation Error: Core 0 panic'ed (image crashes at start-up)")
                    rec.ended = "panic"
                    cause = HARD_RESET
                    continue
            else:
                rec = self.boots[-1]
            self._proc = self._spawn(cause, skip_main)
            if skip_main:
                threading.Thread(target=self.repl.reenter_raw, daemon=True).start()
            skip_main = False
            code = self._wait(self._proc)
            if self._stop.is_set():
                rec.ended = "stopped"
                break
            chip_reset = True
            if code == "cut":
                rec.ended, cause = "power cut", PWRON_RESET
                self._power_restored()
            elif code is None:
                rec.ended, cause = "watchdog", WDT_RESET
                self.say("E (wdt) Task watchdog got triggered: resetting")
            elif code == EXIT_RESET:
                rec.ended, cause = "reset", HARD_RESET
            elif code == EXIT_PANIC:
                rec.ended, cause = "panic", HARD_RESET
            elif code == EXIT_DEEPSLEEP:
                rec.ended, cause = "deepsleep", DEEPSLEEP_RESET
                try:
                    sleep_ms = int((self.ctl / "deepsleep").read_text() or "0")
                except (OSError, ValueError):
                    sleep_ms = 0
                self._stop.wait(sleep_ms / 1000 if sleep_ms > 0 else None)  # no timer: sleeps on
            elif code == EXIT_SOFT_RESET:
                rec.ended, cause, chip_reset = "soft reset", SOFT_RESET, False
                skip_main = self.repl is not None and self.repl.raw_mode
            elif self.repl is not None and code == 0:
                # Ctrl-D at the REPL: the unix port exits where a board soft-resets.
                rec.ended, cause, chip_reset = "soft reset", SOFT_RESET, False
                self.repl.soft_reboot()
                skip_main = self.repl.raw_mode
            else:
                rec.ended = "repl" if code == EXIT_REPL else f"repl (exit {code})"
                if self._idle_at_repl():
                    rec.ended, cause = "watchdog", WDT_RESET
                    self.say("E (wdt) Task watchdog got triggered: resetting")
                else:
                    self.say("emulator: board idle at the REPL with no watchdog armed: powering off")
                    break
        self.stop()
        return self.boots
