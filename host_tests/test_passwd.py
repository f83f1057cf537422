"""The site's password file: how each kind of password is kept and checked."""

from argon2 import PasswordHasher

from tools.site.credentials import Credentials


def _line(creds: Credentials, name: str) -> str:
    return dict(line.split(":", 1) for line in creds.path.read_text().splitlines())[name]


def test_a_generated_password_is_kept_as_a_salted_sha256_and_checks(tmp_path):
    creds = Credentials(tmp_path / "passwd")
    pw1, pw2 = creds.set("dev1"), creds.set("dev2")
    assert len(pw1) >= 32 and pw1 != pw2
    line = _line(creds, "dev1")
    assert line.startswith("$sha256$") and pw1 not in line
    assert creds.verify("dev1", pw1) and creds.verify("dev2", pw2)
    assert not creds.verify("dev1", pw2)  # another identity's password
    assert not creds.verify("dev1", pw1[:-1]) and not creds.verify("dev1", "")
    assert not creds.verify("nobody", pw1)
    assert "dev1" in creds.mosquitto_names()  # mosquitto's own file, written in the same step
    creds.set("dev3")
    assert _line(creds, "dev3") != line.replace("dev1", "dev3")  # salted: no two lines alike


def test_a_chosen_password_keeps_argon2_and_old_lines_still_check(tmp_path):
    creds = Credentials(tmp_path / "passwd")
    assert creds.set("alice", "correct horse") == "correct horse"
    assert _line(creds, "alice").startswith("$argon2id$")
    assert creds.verify("alice", "correct horse") and not creds.verify("alice", "wrong horse")
    # A service password read back from services.json was generated: it gets the fast hash.
    creds.set("replica", "r" * 32, generated=True)
    assert _line(creds, "replica").startswith("$sha256$") and creds.verify("replica", "r" * 32)
    # A line written before the fast hash existed (argon2 of a generated password) still checks.
    with creds.path.open("a") as f:
        f.write("old:" + PasswordHasher(time_cost=1, memory_cost=1024).hash("p" * 32) + "\n")
    again = Credentials(creds.path)  # edited in place: a reader that has not cached it
    assert again.verify("old", "p" * 32) and not again.verify("old", "q" * 32)


def test_a_damaged_line_refuses_without_raising(tmp_path):
    creds = Credentials(tmp_path / "passwd")
    pw = creds.set("dev1")
    good = _line(creds, "dev1")
    salt, digest = good[len("$sha256$"):].split("$")
    for bad in ("$sha256$", "$sha256$" + salt, "$sha256$!!$" + digest, "$sha256$" + salt + "$" + digest + "$x",
                "$argon2id$garbage", "plain"):
        creds.path.write_text(f"dev1:{bad}\n")
        assert not Credentials(creds.path).verify("dev1", pw), bad


def test_a_reader_sees_every_change_at_once(tmp_path):
    # The store and the broker each hold a Credentials that re-reads the file when it changes;
    # several changes inside one clock tick (a provision, then a revoke) must all be seen.
    writer, reader = Credentials(tmp_path / "passwd"), Credentials(tmp_path / "passwd")
    for _ in range(20):
        pw = writer.set("dev1")
        assert reader.verify("dev1", pw)
        assert writer.remove("dev1")
        assert not reader.verify("dev1", pw) and not reader.known("dev1")
