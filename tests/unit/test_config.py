import tomllib
from pathlib import Path

import pytest

from configserver.config import DhcpMode, from_mapping
from configserver.errors import ConfigError
from configserver.inventory import format_inventory, parse_inventory

EXAMPLE = Path(__file__).parents[2] / "docs" / "configserver.example.toml"


def test_documented_example_config_is_valid():
    config = from_mapping(tomllib.loads(EXAMPLE.read_text()))
    assert config.dhcp.mode == DhcpMode.FULL
    assert config.dhcp.subnet.pool == ("198.18.0.100", "198.18.0.199")
    assert config.dhcp.relayed[0].network == "198.18.10.0/24"
    assert config.http.port == 8080
    assert (config.http.keepalive_timeout, config.http.body_timeout) == (20.0, 30.0)
    assert config.tftp.enabled is True
    assert config.cloud.instance_pool == ("198.18.0.200", "198.18.0.239")


@pytest.mark.parametrize(("data", "message"), [
    ({"colour": "red"}, "unknown setting colour"),
    ({"http": {"port": 70000}}, "port number"),
    ({"http": {"port": "eighty"}}, "invalid value"),
    ({"dhcp": {"mode": "sometimes"}}, "invalid value"),
    ({"dhcp": {"subnet": {"network": "198.18.0.0/24", "pool": "198.18.1.1-198.18.1.9"}}},
     "not inside"),
    ({"dhcp": {"subnet": {"network": "198.18.0.0/24", "pool": "198.18.0.9-198.18.0.1"}}},
     "after end"),
    ({"dhcp": {"subnet": {"network": "nonsense"}}}, "invalid IPv4 network"),
    ({"dhcp": {"lease_time": 5}}, "at least 60"),
    ({"tftp": {"enabled": "maybe"}}, "invalid value"),
    ({"tftp": {"busy_poll": 0.002}}, "tftp.busy_poll must be between 0 and 0.001"),
    ({"tftp": {"busy_poll": -1}}, "tftp.busy_poll must be between 0 and 0.001"),
    ({"tftp": {"lockstep_threads": 65}}, "tftp.lockstep_threads must be between 0 and 64"),
    ({"tftp": {"max_inflight_per_client": 511}},
     "tftp.max_inflight_per_client must be at least 512 bytes"),
    ({"tftp": {"silent_timeout": 0}}, "tftp.silent_timeout must be between 0 and 60"),
    ({"http": []}, "must be a table"),
    ({"http": {"keepalive_timeout": 0}}, "http.keepalive_timeout must be between 0 and 3600"),
    ({"http": {"body_timeout": 7200}}, "http.body_timeout must be between 0 and 3600"),
    ({"cloud": {"instance_pool": "198.18.0.9-198.18.0.1"}}, "cloud.instance_pool: start"),
    ({"cloud": {"instance_pool": "198.18.0.1-nine"}}, "invalid value"),
    ({"cloud": {"instance_pool": "198.18.1.1-198.18.1.9"},
      "dhcp": {"subnet": {"network": "198.18.0.0/24"}}}, "not inside the DHCP subnet"),
    ({"cloud": {"instance_pool": "198.18.0.150-198.18.0.210"},
      "dhcp": {"subnet": {"network": "198.18.0.0/24", "pool": "198.18.0.100-198.18.0.199"}}},
     "overlaps the DHCP pool"),
])
def test_bad_settings_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(data)


def test_inventory_round_trips_through_toml():
    export = {"roles": [{"name": "gpu", "image": "dom0", "template": "xen",
                         "kernel_args": 'quote " and \\ backslash'}],
              "nodes": [{"mac": "52:54:00:aa:bb:01", "role": "gpu", "tags": ["a", "b"],
                         "nics": [{"mac": "52:54:00:aa:bb:02", "ip": "198.18.0.2"}]}]}
    parsed = parse_inventory(format_inventory(export))
    assert parsed == {"roles": export["roles"], "nodes": export["nodes"]}


def test_inventory_with_unknown_tables_is_refused():
    with pytest.raises(Exception, match="unknown table"):
        parse_inventory('[[nodes]]\nmac = "x"\n')
