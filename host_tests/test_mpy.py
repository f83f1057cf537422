"""mpy-cross compilation of the emulated chip's ROM and the firmware."""

import threading

from tools import mpy
from tools.esp32emu.runner import TARGET_DIR


def test_boards_compiling_the_same_rom_at_once_all_get_it(tmp_path):
    # Boards that power on together (fleet tests, benchmarks) each compile the ROM on their
    # first boot; a shared temporary file made all but one of them crash.
    sources = [p for p in TARGET_DIR.glob("*.py") if p.name != "_emu_boot.py"]
    errors, results = [], []

    def compile_rom():
        try:
            results.append(mpy.compile_tree(sources, tmp_path, TARGET_DIR))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=compile_rom) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1
    rom = results[0]
    assert sorted(p.stem for p in rom.glob("*.mpy")) == sorted(p.stem for p in sources)
    assert not list(rom.glob("*.tmp"))
    assert all((rom / f"{p.stem}.mpy").read_bytes()[:1] == b"M" for p in sources)
