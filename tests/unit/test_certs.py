"""`fedloop certs` (fedloop.security.certs): the files it writes and their modes."""

from __future__ import annotations

import stat
from pathlib import Path

from fedloop.security.certs import make_dev_pki


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_keys_are_600_and_certificates_644_even_over_old_files(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    out.mkdir()
    # Left by an earlier run, or by hand: readable by all, and one of them a link elsewhere.
    for name in ("ca.key", "server.key", "ca.crt"):
        (out / name).write_text("old")
        (out / name).chmod(0o644)
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("not a key")
    (out / "agent-a.key").symlink_to(elsewhere)
    made = make_dev_pki(out, ["localhost"], ["a"])
    for issued in made.values():
        assert _mode(issued.key) == 0o600, issued.key  # os.open kept 644 on existing files
        assert _mode(issued.cert) == 0o644, issued.cert
        assert issued.key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert elsewhere.read_text() == "not a key"  # the link was replaced, not written through
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{stem}.{ext}" for stem in ("ca", "server", "agent-a") for ext in ("crt", "key")
    )
