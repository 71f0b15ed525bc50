"""The CLI's human-readable output: no character from the network reaches the terminal raw."""

from __future__ import annotations

import io
import json

from hypothesis import given
from hypothesis import strategies as st

from configserver.cli import format as cliformat
from configserver.cli.format import printable

TITLE = "\x1b]0;pwned\x07"  # OSC 0: sets the terminal window's title
CLEAR = "\x1b[2J"  # CSI 2 J: clears the screen
RAW = ("\x1b", "\x07", "\x9b", "\x7f")


def _node(**changes) -> dict:
    node = {"mac": "52:54:00:aa:bb:01", "role": "storage", "hostname": "sn1", "ip": None,
            "state": "pending", "last_seen": None, "last_heartbeat": None,
            "nics": [{"mac": "52:54:00:aa:bb:01", "ip": None}], "kernel_args": "",
            "tags": [], "facts": {}, "inventory": None, "timeline": [], "events": []}
    return {**node, **changes}


def _event(detail: dict) -> dict:
    return {"mac": "52:54:00:aa:bb:01", "time": 1.0e9, "stage": "dhcp.discover",
            "detail": detail}


def _assert_escaped(text: str) -> None:
    assert not any(raw in text for raw in RAW), repr(text)
    assert all(line.isprintable() for line in text.split("\n")), repr(text)


@given(st.text())
def test_printable_output_is_always_printable(text):
    assert printable(text).isprintable()
    assert all(line.isprintable() for line in printable(text, newlines=True).split("\n"))


@given(st.text(st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp",
                                                   "Zs")) | st.just(" ")))
def test_printable_keeps_printable_text_as_it_is(text):
    assert printable(text) == text


def test_printable_escapes_c0_c1_del_and_escape_sequences():
    assert printable(TITLE) == "\\x1b]0;pwned\\x07"
    assert printable(CLEAR) == "\\x1b[2J"
    assert printable("a\x9b2Jb\x7f") == "a\\x9b2Jb\\x7f"
    assert printable("evil\u202etxt.exe") == "evil\\u202etxt.exe"
    assert printable("one\ntwo\r") == "one\\x0atwo\\x0d"
    assert printable("one\ntwo", newlines=True) == "one\ntwo"


def test_node_show_escapes_facts_inventory_and_events():
    node = _node(facts={"vendor_class": TITLE, "product": CLEAR},
                 inventory={"cpu": {"count": 2, "model": CLEAR}},
                 events=[_event({"hostname": TITLE, "vendor_class": CLEAR + "\nforged"})])
    text = cliformat.node_details(node)
    _assert_escaped(text)
    assert "vendor_class=\\x1b]0;pwned\\x07" in text and "product=\\x1b[2J" in text
    assert "hostname=\\x1b]0;pwned\\x07" in text and "\\x0aforged" in text
    assert "2 CPU (\\x1b[2J)" in text


def test_node_list_escapes_every_cell():
    text = cliformat.node_table([_node(hostname=TITLE, role=CLEAR)])
    _assert_escaped(text)
    assert "\\x1b]0;pwned\\x07" in text and "\\x1b[2J" in text


def test_node_events_escapes_every_event():
    answer = {"mac": "52:54:00:aa:bb:01", "timeline": [],
              "events": [_event({"facts": TITLE}), _event({"x": CLEAR})]}
    text = cliformat.node_events(answer)
    _assert_escaped(text)
    assert "facts=\\x1b]0;pwned\\x07" in text and "x=\\x1b[2J" in text


def test_json_output_stays_exact_json():
    data = {"facts": {"a": TITLE, "b": CLEAR + "\x9b\x7f"}}
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=True)
    _assert_escaped(text)
    assert json.loads(text) == data


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_drain_wait_shows_progress_on_a_terminal_only(capsys):
    import argparse

    from configserver.cli.drain import cmd_drain
    from configserver.cli.format import StatusLine

    class Client:
        def __init__(self) -> None:
            self.held = [2, 1, 0]

        def node(self) -> dict:
            return {"mac": "52:54:00:00:05:01", "hostname": "sn1",
                    "drain": {"legs_held": self.held.pop(0)}}

        def post(self, path, body):
            return self.node()

        def get(self, path):
            return self.node()

    now = [0.0]
    args = argparse.Namespace(action="drain", node="sn1", wait=60.0)
    for stream in (Terminal(), io.StringIO()):
        def sleep(seconds: float) -> None:
            now[0] += seconds
        status = StatusLine(stream)
        assert cmd_drain(args, Client(), clock=lambda: now[0], sleep=sleep,
                         status=status) == 0
        if isinstance(stream, Terminal):
            shown = stream.getvalue()
            assert "draining sn1: 2 legs still held by dom0s (0s)" in shown
            assert "draining sn1: 1 leg still held by dom0s (1s)" in shown
            assert shown.endswith("\r\x1b[K")  # the line is gone before the result
        else:
            assert stream.getvalue() == ""
    assert capsys.readouterr().out.count("sn1 drained: safe to power off") == 2
