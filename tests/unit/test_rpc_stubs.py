"""The checked-in gRPC stubs are exactly what the protos generate."""

from __future__ import annotations

from pathlib import Path

from tlt.rpc.generate import PACKAGE_DIR, generate


def test_regenerating_the_stubs_gives_no_diff(tmp_path):
    written = generate(tmp_path / "v1")
    checked_in = PACKAGE_DIR / "v1"
    stubs = sorted(p.name for p in checked_in.iterdir() if p.suffix in {".py", ".pyi"})
    assert sorted(p.name for p in written) == stubs
    for path in written:
        assert path.read_text() == (checked_in / path.name).read_text(), (
            f"{path.name} is stale: run `python -m tlt.rpc.generate` after editing proto/tlt/v1")


def test_every_proto_field_is_documented_by_its_file():
    protos = Path(PACKAGE_DIR).parents[2] / "proto" / "tlt" / "v1"
    for proto in protos.glob("*.proto"):
        text = proto.read_text()
        assert "package tlt.v1;" in text and text.lstrip().startswith("//"), f"{proto.name} lacks a header comment"
