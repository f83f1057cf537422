"""mpy-cross compilation of the emulated chip's ROM and the firmware."""

import shutil
import threading
from pathlib import Path

from tools.board import mpy
from tools.esp32emu.runner import ROM_NATIVE, rom_sources


def test_boards_compiling_the_same_rom_at_once_all_get_it(tmp_path):
    # Boards that power on together (fleet tests, benchmarks) each compile the ROM on their
    # first boot; a shared temporary file made all but one of them crash. And each copies the
    # folder it got (as provisioning copies the firmware's) while others may still compile:
    # another compiler's files in it made the copy fail.
    sources = rom_sources()
    out = tmp_path / "cache"
    errors, results = [], []

    def compile_rom(i):
        try:
            got = mpy.compile_tree(sources, out, native=ROM_NATIVE)
            shutil.copytree(got, tmp_path / f"copy{i}")
            results.append(got)
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=compile_rom, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1
    rom = results[0]
    built = [Path(rel).stem for rel in sources if rel not in ROM_NATIVE or mpy.native_arch() is not None]
    assert "espidf" in built  # the ESP-IDF model, tools/espidf/onflash.py, under the chip's own name
    assert sorted(p.stem for p in rom.glob("*.mpy")) == sorted(built)
    assert not list(rom.glob("*.tmp"))
    assert all((rom / f"{stem}.mpy").read_bytes()[:1] == b"M" for stem in built)
    assert [p.name for p in out.iterdir()] == [rom.name]  # no compiler's folder left behind
    for i in range(8):
        assert sorted(p.name for p in (tmp_path / f"copy{i}").iterdir()) == sorted(p.name for p in rom.iterdir())
