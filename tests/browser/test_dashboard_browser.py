"""The dashboard in a real browser: Debian's Chromium driven by selenium through Debian's
chromedriver, both inside the test's own network namespace (tests/browserlab.py), against
``configserver serve`` there; a real DHCP client (dhclient) asks from a second namespace.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import netlab
import pytest
from browserlab import chromium
from netlab import Netns, namespaces, veth_pair
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from configserver.model import NodeSpec
from configserver.registry.sqlite import SqliteRegistry

pytestmark = pytest.mark.browser

CONFIGSERVER = Path(sys.executable).with_name("configserver")
SERVER_IP = "198.18.0.1"
HTTP_PORT = 18080
HTTPS_PORT = 18443
BASE = f"https://{SERVER_IP}:{HTTPS_PORT}"
STORAGE_MAC = "52:54:00:0b:00:01"
STORAGE_HOST = "shelf-1"
CLIENT_MAC = "52:54:00:0b:00:99"
NEW_MAC = "52:54:00:0b:00:42"


class Lab:
    def __init__(self, server_ns: Netns, client_ns: Netns, state: Path, tmp: Path) -> None:
        self.server_ns, self.client_ns, self.state, self.tmp = server_ns, client_ns, state, tmp

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(CONFIGSERVER), "--state-dir", str(self.state), *args],
                              check=True, capture_output=True, text=True, timeout=30)

    def login_url(self) -> str:
        return json.loads(self.cli("dashboard", "login", "--json").stdout)["url"]

    def node(self, mac: str) -> dict:
        return json.loads(self.cli("node", "show", mac, "--json").stdout)

    def browser(self) -> contextlib.AbstractContextManager[webdriver.Chrome]:
        return chromium(self.server_ns, self.state / "pki" / "server.pem", self.tmp)


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("dashboard")
    state = tmp / "state"
    state.mkdir()
    registry = SqliteRegistry(state / "registry.sqlite")
    registry.add_node(NodeSpec(mac=STORAGE_MAC, role="storage", hostname=STORAGE_HOST,
                               ip="198.18.0.60"))
    registry.close()
    with namespaces(2, "nbdash") as (server_ns, client_ns):
        veth_pair(server_ns, client_ns, f"{SERVER_IP}/24", "")
        client_ns.ip("link", "set", "eth0", "address", CLIENT_MAC)
        log = state / "serve.log"
        server = server_ns.popen(
            str(CONFIGSERVER), "-v", "serve", "--state-dir", str(state), "--interface", "eth0",
            "--http-port", str(HTTP_PORT), "--https-port", str(HTTPS_PORT), "--tftp", "off",
            "--dhcp", "full", "--unknown-mac", "discover",
            stdout=log.open("w"), stderr=subprocess.STDOUT)
        try:
            netlab.wait_for((state / "server.json").exists, 30, "configserver serve to start",
                            process=server, log=log)
            yield Lab(server_ns, client_ns, state, tmp)
        finally:
            netlab.stop(server, 15)


def wait(driver, what: str, predicate, timeout: float = 20):
    def attempt(d):
        try:
            return predicate(d)
        except StaleElementReferenceException:
            return False  # the live feed redrew the table meanwhile
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(attempt, message=what)


def row(driver, mac: str):
    found = driver.find_elements(By.CSS_SELECTOR, f'#nodes tr[data-mac="{mac}"]')
    return found[0] if found else None


def click(driver, what: str, css: str) -> None:
    """Click ``css`` once the live table holds it (it may be redrawn under the pointer)."""
    def clicked(d) -> bool:
        buttons = d.find_elements(By.CSS_SELECTOR, css)
        if not buttons:
            return False
        buttons[0].click()
        return True
    wait(driver, what, clicked)


def confirm(driver, answer: str = "#confirm-yes") -> str:
    dialog = wait(driver, "the confirmation dialog",
                  lambda d: d.find_element(By.ID, "confirm").get_attribute("open") is not None
                  and d.find_element(By.ID, "confirm"))
    text = dialog.find_element(By.ID, "confirm-text").text
    dialog.find_element(By.CSS_SELECTOR, answer).click()
    return text


def signed_in(lab: Lab, driver) -> None:
    driver.get(lab.login_url())
    wait(driver, "the live feed", lambda d: d.find_element(By.ID, "live").text == "live")


def test_a_browser_without_a_session_gets_the_login_page_and_no_data(lab):
    with lab.browser() as driver:
        driver.get(f"{BASE}/")
        assert driver.find_element(By.ID, "login").is_displayed()
        assert STORAGE_HOST not in driver.page_source and STORAGE_MAC not in driver.page_source
        assert "configserver dashboard login" in driver.page_source
        driver.get(f"{BASE}/api/v1/nodes")
        body = driver.find_element(By.TAG_NAME, "body").text
        assert '"unauthorized"' in body and STORAGE_HOST not in body
        # A forged or reused link opens nothing.
        driver.get(f"{BASE}/login?token=forged")
        assert "used, expired or unknown" in driver.find_element(By.ID, "login-error").text
        url = lab.login_url()
        driver.get(url)
        wait(driver, "the dashboard", lambda d: d.find_elements(By.ID, "nodes"))
        driver.delete_all_cookies()
        driver.get(url)
        assert driver.find_elements(By.ID, "login-error")
        assert STORAGE_HOST not in driver.page_source


def test_a_node_appears_live_when_a_real_dhcp_client_asks(lab):
    with lab.browser() as driver:
        signed_in(lab, driver)
        (cookie,) = driver.get_cookies()
        assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"]) == (
            True, True, "Strict")
        assert driver.execute_script("return document.cookie") == ""
        wait(driver, "the registered node", lambda d: row(d, STORAGE_MAC))
        assert row(driver, CLIENT_MAC) is None
        driver.execute_script("window.__stillTheSamePage = true")
        # dhclient asks from the other namespace as PXE firmware does (an unknown PXE client
        # is recorded as pending); no answer is needed for the node to show.
        conf = lab.tmp / "dhclient.conf"
        conf.write_text('timeout 6;\nretry 1;\n'
                        'send vendor-class-identifier "PXEClient:Arch:00000:UNDI:002001";\n')
        leases = lab.tmp / "dhclient.leases"
        leases.touch()
        lab.client_ns.run("dhclient", "-1", "-v", "-sf", "/bin/true", "-cf", str(conf),
                          "-lf", str(leases), "-pf", str(lab.tmp / "dhclient.pid"), "eth0",
                          check=False, timeout=30)
        found = wait(driver, "the DHCP client's node in the table",
                     lambda d: row(d, CLIENT_MAC))
        assert "pending" in found.find_element(By.CLASS_NAME, "state-cell").text
        assert driver.execute_script("return window.__stillTheSamePage") is True


def test_draining_and_registering_through_the_page(lab):
    with lab.browser() as driver:
        signed_in(lab, driver)
        click(driver, "the drain button", f'#nodes tr[data-mac="{STORAGE_MAC}"] button.drain')
        assert STORAGE_HOST in confirm(driver, "#confirm-no")
        wait(driver, "the cancel notice",
             lambda d: d.find_element(By.ID, "notice").text == "cancelled")
        assert lab.node(STORAGE_MAC)["drained"] is False
        click(driver, "the drain button", f'#nodes tr[data-mac="{STORAGE_MAC}"] button.drain')
        confirm(driver)
        wait(driver, "the drained badge", lambda d: "drained" in row(
            d, STORAGE_MAC).find_element(By.CLASS_NAME, "state-cell").text)
        assert lab.node(STORAGE_MAC)["drained"] is True
        click(driver, "the undrain button",
              f'#nodes tr[data-mac="{STORAGE_MAC}"] button.undrain')
        confirm(driver)
        wait(driver, "the badge gone", lambda d: "drained" not in row(
            d, STORAGE_MAC).find_element(By.CLASS_NAME, "state-cell").text)
        assert lab.node(STORAGE_MAC)["drained"] is False
        # Register a MAC with a role; a bad one is refused with the API's own message.
        driver.find_element(By.ID, "register-mac").send_keys("not-a-mac")
        driver.find_element(By.ID, "register-submit").click()
        confirm(driver)
        wait(driver, "the refusal", lambda d: d.find_element(By.ID, "notice")
             .get_attribute("class") == "error")
        mac = driver.find_element(By.ID, "register-mac")
        mac.clear()
        mac.send_keys(NEW_MAC)
        driver.find_element(By.ID, "register-hostname").send_keys("fresh-1")
        roles = driver.find_element(By.ID, "register-role")
        roles.find_element(By.CSS_SELECTOR, 'option[value="dom0"]').click()
        driver.find_element(By.ID, "register-submit").click()
        assert NEW_MAC in confirm(driver)
        new = wait(driver, "the registered MAC in the table", lambda d: row(d, NEW_MAC))
        assert new.find_element(By.CLASS_NAME, "role").text == "dom0"
        assert lab.node(NEW_MAC)["hostname"] == "fresh-1"
        # Signing out ends the session: the next load is the login page.
        driver.find_element(By.ID, "logout").click()
        wait(driver, "the login page", lambda d: d.find_elements(By.ID, "login"))
        driver.get(f"{BASE}/")
        assert driver.find_elements(By.ID, "login") and NEW_MAC not in driver.page_source
