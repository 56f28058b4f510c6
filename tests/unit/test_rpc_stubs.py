"""The checked-in gRPC stubs are exactly what the protos generate, and every contract element is documented."""

from __future__ import annotations

import re
from pathlib import Path

from tlt.rpc.generate import PACKAGE_DIR, generate

PROTO_DIR = Path(PACKAGE_DIR).parents[2] / "proto" / "tlt" / "v1"
# What must carry a comment: services, rpcs, messages, enums, fields (plain, optional, repeated, map, oneof
# members) and enum values. `oneof` groups, `syntax`, `package`, `import` and braces need none.
DECLARATION = re.compile(
    r"^\s*(?:(?:service|message|enum)\s+(?P<type>\w+)\s*\{"
    r"|rpc\s+(?P<rpc>\w+)\s*\("
    r"|(?:optional\s+|repeated\s+)?(?:map<[^>]+>|[\w.]+)\s+(?P<field>\w+)\s*=\s*\d+\s*;"
    r"|(?P<value>[A-Z][A-Z0-9_]*)\s*=\s*-?\d+\s*;)")


def test_regenerating_the_stubs_gives_no_diff(tmp_path):
    written = generate(tmp_path / "v1")
    checked_in = PACKAGE_DIR / "v1"
    stubs = sorted(p.name for p in checked_in.iterdir() if p.suffix in {".py", ".pyi"})
    assert sorted(p.name for p in written) == stubs
    for path in written:
        assert path.read_text() == (checked_in / path.name).read_text(), (
            f"{path.name} is stale: run `python -m tlt.rpc.generate` after editing proto/tlt/v1")


def undocumented(text: str) -> list[str]:
    """Declarations in a .proto text with neither a ``//`` line directly above nor a trailing ``//``."""
    missing, previous = [], ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        match = DECLARATION.match(line)
        if match and "//" not in line and not previous.startswith("//"):
            missing.append(f"line {number}: {next(g for g in match.groups() if g)}")
        if stripped:
            previous = stripped
    return missing


def test_every_proto_element_is_documented():
    protos = sorted(PROTO_DIR.glob("*.proto"))
    assert [p.stem for p in protos] == ["common", "drafter", "rollout", "trainer"]
    for proto in protos:
        text = proto.read_text()
        assert "package tlt.v1;" in text and text.lstrip().startswith("//"), f"{proto.name} lacks a header comment"
        assert not undocumented(text), (f"{proto.name}: undocumented {undocumented(text)}; add a `//` comment "
                                        "line directly above each")


def test_the_documentation_check_finds_what_lacks_a_comment():
    text = """// header
syntax = "proto3";

// A message.
message M {
  // Documented.
  int64 a = 1;
  repeated int32 b = 2;
  optional double c = 3;  // trailing comments count
  map<string, double> d = 4;
  oneof x {
    // Documented.
    bytes e = 5;
    M f = 6;
  }
}

enum E {
  E_UNSPECIFIED = 0;  // documented
  E_ONE = 1;
}

service S {
  rpc Call(M) returns (M);
}
"""
    assert [m.split(": ")[1] for m in undocumented(text)] == ["b", "d", "f", "E", "E_ONE", "S", "Call"]
