"""Debian's Chromium under selenium, inside a test's network namespace (the browser tier and
bench/dashboard share it).

``inside(ns)`` moves the calling thread into ``ns`` (``setns``) and back: chromedriver and
Chromium, started from it, live there, and so do selenium's connections to chromedriver. The
browser trusts the config server's certificate by its public key only
(``--ignore-certificate-errors-spki-list``), so its pages run in a secure context, as behind a
trusted certificate.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from netlab import Netns
from selenium import webdriver

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CLONE_NEWNET = 0x40000000
# Headless, as root, and quiet: no calls home on a machine without a way out.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")


@contextlib.contextmanager
def inside(ns: Netns) -> Iterator[None]:
    """This thread in ``ns``'s network namespace, and back in its own one after."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns into the test namespace")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)


def spki_pin(certificate: Path) -> str:
    """The base64 SHA-256 of a PEM certificate's public key, as Chromium's flag wants it."""
    cert = x509.load_pem_x509_certificate(certificate.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@contextlib.contextmanager
def chromium(ns: Netns, server_certificate: Path, scratch: Path) -> Iterator[webdriver.Chrome]:
    """A fresh headless Chromium (own profile in ``scratch``) in ``ns``, trusting the server's
    key; quit and its profile removed after."""
    for tool in (CHROMIUM, CHROMEDRIVER):
        if not Path(tool).exists():
            raise FileNotFoundError(f"{tool}: Debian's chromium and chromium-driver "
                                    "(make deps)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = scratch / f"chromium-{os.urandom(3).hex()}"
    for flag in (*FLAGS, f"--user-data-dir={profile}",
                 f"--ignore-certificate-errors-spki-list={spki_pin(server_certificate)}"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER,
                                      log_output=str(scratch / "chromedriver.log"))
    with inside(ns):
        driver = webdriver.Chrome(options=options, service=service)
        try:
            driver.set_page_load_timeout(30)
            yield driver
        finally:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)
