"""`benchmarks/transport.py --quick` runs end to end (file:// and s3:// on a moto server) at the smallest size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "transport.py"
SIZE_MB = 2
RATIOS = ["file_load_ratio", "file_fetch_ratio", "file_fetch_link_ratio", "file_copy_publish_load_ratio",
          "file_copy_publish_fetch_ratio", "io_floor_ratio", "file_fetch_vs_io_floor", "hash_floor_ratio",
          "s3_fetch_ratio", "s3_load_ratio"]


def test_transport_quick_prints_a_result_line_of_positive_ratios(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--sizes", str(SIZE_MB), "--repeats", "1",
                          "--hidden", "256", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, out.stdout[-3000:]
    fields = dict(item.split("=", 1) for item in lines[0].split()[1:])
    assert fields.pop("digest") == "xxh3_128"
    assert sorted(fields) == sorted(f"{name}_{SIZE_MB}MB" for name in RATIOS)
    for name, value in fields.items():
        assert float(value) > 0, f"{name}={value}"
    assert f"{SIZE_MB} MB policy version" in out.stdout and "s3:// publish+load" in out.stdout
