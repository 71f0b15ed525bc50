"""Agent configuration: the kernel command-line parser, layering and validation, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent import cli
from nodeagent.config import AgentConfig, build_config, normalize_mac, parse_kernel_cmdline
from nodeagent.errors import ConfigError

CMDLINE = ("BOOT_IMAGE=/vmlinuz console=ttyS0,115200 netboot.server=http://198.18.0.1:8080/ "
           "BOOTIF=01-52-54-00-AB-CD-01 netboot.hostname=store1 netboot.role=storage quiet "
           'ip=dhcp netboot.unknown=1 "quoted=a b"')


def test_kernel_cmdline_names_server_mac_hostname_and_role():
    assert parse_kernel_cmdline(CMDLINE) == {
        "server": "http://198.18.0.1:8080/", "boot_mac": "01-52-54-00-AB-CD-01",
        "hostname": "store1", "role": "storage"}


def test_netboot_mac_and_last_occurrence_win():
    text = "netboot.mac=52:54:00:00:00:01 netboot.server=http://a netboot.server=http://b"
    assert parse_kernel_cmdline(text) == {"boot_mac": "52:54:00:00:00:01",
                                          "server": "http://b"}


def test_unbalanced_quotes_do_not_break_parsing():
    assert parse_kernel_cmdline('netboot.server=http://x "oops')["server"] == "http://x"


def test_layers_later_wins_and_values_are_normalised():
    config = build_config({"boot_id": "abc"}, parse_kernel_cmdline(CMDLINE),
                          {"api_port": 0, "state-dir": "/tmp/x"},
                          {"server": None, "macs": ["52-54-00-00-00-09"]})
    assert config == AgentConfig(server="http://198.18.0.1:8080", boot_id="abc",
                                 boot_mac="52:54:00:ab:cd:01", macs=("52:54:00:00:00:09",),
                                 hostname="store1", role="storage", state_dir=Path("/tmp/x"),
                                 api_port=0)


def test_lookup_macs_put_the_boot_mac_first():
    config = build_config({"server": "http://s", "boot_id": "b",
                           "boot_mac": "52:54:00:00:00:02"})
    found = ("52:54:00:00:00:01", "52:54:00:00:00:02")
    assert config.lookup_macs(found) == ("52:54:00:00:00:02", "52:54:00:00:00:01")


@pytest.mark.parametrize(("layer", "message"), [
    ({"boot_id": "b"}, "no config server URL"),
    ({"server": "http://s"}, "no boot identifier"),
    ({"server": "ftp://s", "boot_id": "b"}, "invalid server URL"),
    ({"server": "http://s", "boot_id": "b c"}, "invalid boot identifier"),
    ({"server": "http://s", "boot_id": "b", "api_port": 70000}, "port number"),
    ({"server": "http://s", "boot_id": "b", "api_port": "x"}, "invalid value"),
    ({"server": "http://s", "boot_id": "b", "macs": ["01:00:5e"]}, "invalid MAC"),
    ({"server": "http://s", "boot_id": "b", "frobnicate": 1}, "unknown setting"),
    ({"server": "http://s", "boot_id": "b", "watch": "yes"}, "watch must be"),
    ({"server": "http://s", "boot_id": "b", "backoff_max": -1}, "at least"),
])
def test_bad_settings_name_the_problem(layer, message):
    with pytest.raises(ConfigError, match=message):
        build_config(layer)


def test_normalize_mac_spellings():
    assert normalize_mac("01-AA-BB-CC-DD-EE-FF") == "aa:bb:cc:dd:ee:ff"
    assert normalize_mac(" AA-BB-CC-DD-EE-FF ") == "aa:bb:cc:dd:ee:ff"
    with pytest.raises(ConfigError):
        normalize_mac("aabbccddeeff0")


def test_cli_layers_cmdline_file_and_flags(tmp_path, monkeypatch):
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(CMDLINE)
    toml = tmp_path / "nodeagent.toml"
    toml.write_text('role = "dom0"\napi_port = 9100\nheartbeat_jitter = 0.2\n')
    args = cli._parser().parse_args(["run", "--cmdline", str(cmdline), "--config", str(toml),
                                     "--boot-id", "boot-7", "--mac", "52:54:00:00:00:07",
                                     "--api-port", "0", "--no-watch"])
    config = cli.load_config(args, {"NOTIFY_SOCKET": "@sd"})
    assert config.server == "http://198.18.0.1:8080"
    assert (config.role, config.api_port, config.heartbeat_jitter) == ("dom0", 0, 0.2)
    assert (config.boot_id, config.macs, config.watch) == ("boot-7", ("52:54:00:00:00:07",),
                                                           False)
    assert config.notify_socket == "@sd"


def test_cli_reports_bad_config_in_one_line(tmp_path, capsys):
    toml = tmp_path / "bad.toml"
    toml.write_text("server = [")
    assert cli.main(["run", "--config", str(toml), "--boot-id", "b",
                     "--cmdline", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nodeagent: ") and err.count("\n") == 1
    assert cli.main(["run", "--config", str(tmp_path / "missing.toml"), "--boot-id", "b"]) == 2
