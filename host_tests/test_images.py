"""Test images are real ESP32 app images, and release checks refuse what a slot can't boot."""

import struct
import subprocess
import sys

import pytest

from tools.espidf.images import ImageError, build_app_image, check_app_image
from tools.site.releases import Registry, ReleaseError


def test_built_image_passes_esptool_image_info(tmp_path):
    path = tmp_path / "app.bin"
    path.write_bytes(build_app_image("3.2.1", 150_000))
    out = subprocess.run([sys.executable, "-m", "esptool", "image-info", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Checksum: " in out.stdout and "(valid)" in out.stdout.split("Checksum: ")[1].splitlines()[0]
    assert "Validation hash: " in out.stdout
    assert "(valid)" in out.stdout.split("Validation hash: ")[1].splitlines()[0]
    assert "App version: 3.2.1" in out.stdout


def test_size_and_identity():
    a = build_app_image("1.0.0", 500_000)
    assert len(a) == 500_000
    assert build_app_image("1.0.0", 500_000) == a  # deterministic
    assert build_app_image("1.0.1", 500_000) != a
    assert check_app_image(a).version == "1.0.0"


def _combined(app: bytes) -> bytes:
    # firmware.bin as MicroPython's makeimg.py writes it, from flash offset 0x1000: bootloader
    # image, partition table at 0x8000 (file 0x7000), app at 0x10000 (file 0xF000).
    from tools.espidf import onflash

    out = bytearray(b"\xff" * 0xF000)
    boot = bytearray(app[:0x4000])
    struct.pack_into("<I", boot, 0x20, 0x50)  # a bootloader descriptor, not an app one
    out[: len(boot)] = boot
    table = onflash.make_partition_table()
    out[0x7000 : 0x7000 + len(table)] = table
    return bytes(out) + app


@pytest.mark.parametrize("make,code", [
    (lambda a: _combined(a), "combined_image"),
    (lambda a: b"\x00" + a[1:], "not_app_image"),
    (lambda a: a[:12] + b"\x05\x00" + a[14:], "wrong_chip"),
    (lambda a: a[:5000] + bytes([a[5000] ^ 1]) + a[5001:], "bad_checksum"),
    (lambda a: a[:-1] + bytes([a[-1] ^ 1]), "bad_digest"),
    (lambda a: a[:0x20] + b"\0\0\0\0" + a[0x24:], "not_app_image"),
    (lambda a: a[:100], "not_app_image"),
    (lambda a: a[:1000], "corrupt"),
])
def test_check_refuses_bad_images(make, code):
    with pytest.raises(ImageError) as e:
        check_app_image(make(build_app_image("1.0.0", 80_000)))
    assert e.value.code == code


def test_check_refuses_image_bigger_than_the_slot():
    with pytest.raises(ImageError) as e:
        check_app_image(build_app_image("1.0.0", 0x180000 + 16))
    assert e.value.code == "too_big"


def test_releases_are_immutable(tmp_path):
    reg = Registry(tmp_path)
    a = build_app_image("1.0.0", 70_000)
    rel = reg.add(a, "1.0.0")
    assert reg.path_of(rel.sha256).read_bytes() == a
    assert reg.add(a, "1.0.0") == rel  # same bytes again: no-op
    with pytest.raises(ReleaseError):
        reg.add(build_app_image("other", 70_000), "1.0.0")
    assert [r.version for r in reg.list()] == ["1.0.0"]


def test_releases_added_at_once_are_all_kept(tmp_path):
    """The CLI and the dashboard's uploads may add releases at the same moment: each is kept
    (the index is read, changed and written under a lock)."""
    from concurrent.futures import ThreadPoolExecutor

    reg = Registry(tmp_path)
    images = {f"1.0.{i}": build_app_image(f"1.0.{i}", 40_000 + i) for i in range(8)}
    with ThreadPoolExecutor(8) as pool:
        added = list(pool.map(lambda v: reg.add(images[v], v), images))
    assert sorted(r.version for r in reg.list()) == sorted(images) == sorted(r.version for r in added)
    for r in added:
        assert reg.path_of(r.sha256).read_bytes() == images[r.version]
    assert not list(tmp_path.glob("*.tmp"))


def test_provision_emulate_and_release_refuse_what_image_check_refuses_with_its_codes(tmp_path):
    """One check, one set of codes, wherever an image enters (site without services: provision
    refuses the image before it asks for them)."""
    from conftest import REPO
    from tools.espidf.images import build_combined_image

    app = build_app_image("1.0.0", 64 * 1024)
    bad = {"combined_image": build_combined_image(app), "not_app_image": b"\x00" * 4096,
           "wrong_chip": _with_chip(app, 5), "bad_digest": app[:-1] + bytes([app[-1] ^ 1])}
    for code, data in bad.items():
        f = tmp_path / f"{code}.bin"
        f.write_bytes(data)
        for argv in (["image-check", str(f)], ["release", str(f), "--version", "2", "--site", str(tmp_path / "s")],
                     ["provision", "d1", "--image", str(f), "--version", "2", "--site", str(tmp_path / "s")],
                     ["emulate", str(tmp_path / f"board-{code}"), "--new", str(f), "--max-boots", "1"]):
            out = subprocess.run([sys.executable, "-m", "tools", *argv], cwd=REPO, capture_output=True, text=True,
                                 timeout=60)
            assert out.returncode == 1 and out.stderr.startswith(f"error: {f}: {code}: "), (argv, out.stderr)
        assert not (tmp_path / f"board-{code}" / "flash.bin").exists()


def _with_chip(image: bytes, chip_id: int) -> bytes:
    data = bytearray(image)
    struct.pack_into("<H", data, 12, chip_id)
    return bytes(data)


def test_an_app_whose_segment_sits_on_the_bootloaders_memory_is_refused():
    """A well-formed app image (descriptor, checksum, digest) that the bootloader would still
    not load: its DRAM segment on the bootloader's stack."""
    from esptool.bin_image import ELFSection, ESP32FirmwareImage
    from esptool.targets import ESP32ROM

    from tools.espidf.images import app_descriptor

    img = ESP32FirmwareImage()
    img.entrypoint = 0x40080400
    img.flash_size_freq = ESP32ROM.FLASH_SIZES["4MB"]
    img.segments = [ELFSection(b".flash.appdesc", 0x3F400020, app_descriptor("1.0.0", "micropython"), 0),
                    ELFSection(b".dram0.data", 0x3FFE0000, b"\x00" * 256, 0)]
    with pytest.raises(ImageError) as e:
        check_app_image(img.save(None))
    assert e.value.code == "bad_load_address" and "overlaps bootloader stack" in str(e.value)
