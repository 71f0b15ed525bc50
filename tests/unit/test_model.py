import pytest

from configserver.errors import InvalidAddress, InvalidHostname, InvalidMac
from configserver.model import NodeSpec, normalize_mac, validate_hostname, validate_ipv4


@pytest.mark.parametrize("text", [
    "52:54:00:aa:bb:01", "52-54-00-AA-BB-01", "5254.00aa.bb01", "525400AABB01",
    " 52:54:00:aa:bb:01 ", "01-52-54-00-aa-bb-01", "52:54:0:aa:bb:1", "5254-00aa-bb01",
])
def test_mac_spellings_normalise_to_one_form(text):
    assert normalize_mac(text) == "52:54:00:aa:bb:01"


@pytest.mark.parametrize("text", [
    "", "52:54:00:aa:bb", "52:54:00:aa:bb:01:02", "zz:54:00:aa:bb:01", "01:00:5e:00:00:01",
    "00:00:00:00:00:00", "52:54:00:aa:bb:0g", "525-400aa-bb01", "52:54:00-aa:bb:01x",
])
def test_bad_macs_are_refused_with_a_clear_error(text):
    with pytest.raises(InvalidMac) as info:
        normalize_mac(text)
    assert info.value.code == "invalid_mac"
    assert info.value.status == 400


def test_non_string_mac_is_refused():
    with pytest.raises(InvalidMac):
        normalize_mac(1234)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "expected"), [
    ("sn1", "sn1"), ("SN1.Rack-2.example", "sn1.rack-2.example"), ("a" * 63, "a" * 63),
    ("node.", "node"),
])
def test_valid_hostnames(text, expected):
    assert validate_hostname(text) == expected


@pytest.mark.parametrize("text", [
    "", "-sn1", "sn1-", "sn_1", "a" * 64, "sn1..x", "sn 1", "sn1\x00", "123", "x" * 254,
])
def test_invalid_hostnames(text):
    with pytest.raises(InvalidHostname):
        validate_hostname(text)


@pytest.mark.parametrize("text", ["198.18.0.300", "224.0.0.1", "0.0.0.0", "255.255.255.255",
                                  "fe80::1", "x"])
def test_invalid_reserved_addresses(text):
    with pytest.raises(InvalidAddress):
        validate_ipv4(text)


def test_spec_normalisation_sorts_tags_and_folds_kernel_args():
    spec = NodeSpec("52-54-00-AA-BB-01", "storage", "SN1", "198.18.0.21",
                    kernel_args="  quiet   loglevel=3 ", tags=("b", "a", "b")).normalized()
    assert spec.mac == "52:54:00:aa:bb:01"
    assert spec.hostname == "sn1"
    assert spec.kernel_args == "quiet loglevel=3"
    assert spec.tags == ("a", "b")
