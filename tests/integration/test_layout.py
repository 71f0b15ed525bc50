"""Integration tier: the protocol packages import alone, without the server around them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

PROBE = ("import json, sys, importlib; importlib.import_module(sys.argv[1]); "
         "print(json.dumps(sorted(m for m in sys.modules)))")


def _loaded(module: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, module], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return set(json.loads(out))


@pytest.mark.parametrize("module", ["configserver.dhcp.codec", "configserver.tftp.codec",
                                    "configserver.dhcp.options", "configserver.tftp.transfer"])
def test_protocol_codec_imports_alone(module):
    loaded = _loaded(module)
    ours = {m for m in loaded if m.startswith("configserver")}
    assert module in ours
    assert "sqlite3" not in loaded, sorted(ours)
    assert "aiohttp" not in loaded, sorted(ours)
    package = module.rsplit(".", 1)[0]
    outside = {m for m in ours if m not in ("configserver", "configserver.errors")
               and not m.startswith(package)}
    assert not outside, sorted(ours)
