# netboot-appliance: every target a fresh Debian bookworm machine needs, as root.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# One tier per run. Under CI (CI=true) a tier that selects no test, or any skipped test, fails
# (see tools/pytest-tier and tests/conftest.py); elsewhere both are reported and pass.
PYTEST := tools/pytest-tier $(PY)
# The vm tier boots what `make images` built: an image missing then fails its tests.
VM_PYTEST := NETBOOT_IMAGES_BUILT=1 $(PYTEST)
STAMPS := build/.stamps
UNIT := not integration and not netns and not vm and not browser

# Debian packages for the servers' system tools, the test clients and the image builds.
DEB_PACKAGES := \
	iproute2 procps curl ca-certificates python3 python3-venv \
	ipxe ovmf qemu-system-x86 qemu-utils \
	dnsmasq-base isc-dhcp-client udhcpc kea-admin tftp-hpa atftp busybox \
	debootstrap squashfs-tools zstd xz-utils cpio kmod sudo shellcheck socat nftables e2fsprogs openssh-client \
	iputils-ping chromium chromium-driver \
	build-essential flex bison dpkg-dev
# Servers the tests run by hand inside namespaces (Prometheus scrapes the config server in
# the netns tier): installed with their services kept from starting and disabled, so nothing
# ever listens on the host's interfaces.
SERVICE_PACKAGES := prometheus
# Reference servers for the benchmarks only: installed by `make bench` the same way.
BENCH_PACKAGES := kea-dhcp4-server tftpd-hpa
SERVICE_UNITS := prometheus tftpd-hpa kea-dhcp4-server

# $(call install_quiet,PACKAGES): apt-get install with every service kept from starting
# (policy-rc.d), then disabled and stopped.
define install_quiet
	@set -e; guard=; if [ ! -e /usr/sbin/policy-rc.d ]; then \
		printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; \
		guard=1; fi; \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		$(1) || { [ -z "$$guard" ] || rm -f /usr/sbin/policy-rc.d; exit 1; }; \
	[ -z "$$guard" ] || rm -f /usr/sbin/policy-rc.d; \
	for unit in $(SERVICE_UNITS); do \
		systemctl disable --now $$unit >/dev/null 2>&1 || true; done
endef


.PHONY: all deps bench-deps venv test test-unit test-integration test-netns test-browser test-vm \
	lint bench clean

all: venv

deps: $(STAMPS)/deps $(STAMPS)/service-deps
$(STAMPS)/service-deps: Makefile | $(STAMPS)/deps
	$(call install_quiet,$(SERVICE_PACKAGES))
	@touch $@
$(STAMPS)/deps: Makefile
	@mkdir -p $(STAMPS)
	@missing=$$(dpkg-query -W -f='$${Package} $${Status}\n' $(DEB_PACKAGES) 2>/dev/null \
		| awk '$$4 != "installed" {print $$1}'; \
		for p in $(DEB_PACKAGES); do dpkg-query -W $$p >/dev/null 2>&1 || echo $$p; done); \
	missing=$$(echo $$missing | tr ' ' '\n' | sort -u | tr '\n' ' '); \
	if [ -n "$${missing// /}" ]; then \
		echo "installing Debian packages: $$missing"; \
		SUDO=; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@touch $@

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[server,agent,build,dev]'
	@touch $@

lint: venv
	$(VENV)/bin/ruff check configserver nodeagent netbootmac tests bench images \
		$$(grep -l "^#!.*python" bench/*/run) \
		$$(grep -rl "^#!/usr/bin/python3" elements/*/static)

# Every tier, one pytest run each so that a failure in one does not hide the others.
# The vm tier PXE-boots the real images, so they are built (or found up to date) first.
test: deps venv images
	@failed=; \
	$(PYTEST) -m "$(UNIT)" tests || failed="$$failed unit"; \
	$(PYTEST) -m integration tests || failed="$$failed integration"; \
	$(PYTEST) -m netns tests || failed="$$failed netns"; \
	$(PYTEST) -m browser tests || failed="$$failed browser"; \
	$(VM_PYTEST) -m vm --durations=15 tests || failed="$$failed vm"; \
	if [ -n "$$failed" ]; then echo "make test: FAILED tiers:$$failed" >&2; exit 1; fi

test-unit: venv
	$(PYTEST) -m "$(UNIT)" tests
test-integration: venv
	$(PYTEST) -m integration tests
test-netns: deps venv
	$(PYTEST) -m netns tests
test-browser: deps venv
	$(PYTEST) -m browser tests
test-vm: deps venv images
	$(VM_PYTEST) -m vm tests

bench-deps: $(STAMPS)/bench-deps
$(STAMPS)/bench-deps: Makefile | deps
	@mkdir -p $(STAMPS)
	$(call install_quiet,$(BENCH_PACKAGES))
	@touch $@

bench: bench-deps venv
	@set -e; for b in bench/*/run; do echo "== $$b"; $$b; done

clean:
	rm -rf $(VENV) build/.stamps .pytest_cache

-include mk/*.mk
