# Network-boot images and the guests' root file system, built with diskimage-builder (see
# docs/images.md).
# Included by the top Makefile. A role's image is rebuilt only when one of its inputs changed:
# the elements, its recipe, the build driver, the agent's source or the project metadata.
# diskimage-builder's caches (debootstrap tarball, .deb archives) and the wheel cache live in
# build/cache and survive `make clean-images`.

IMAGE_ROLES := dom0 storage guest
IMAGES_DIR := build/images
IMAGE_INPUTS := $(shell find elements nodeagent netbootmac systemd images/agent -type f \
	! -name '*.pyc' ! -path '*/__pycache__/*' 2>/dev/null) \
	pyproject.toml images/build.py images/dibrun.py mk/images.mk

.PHONY: images image-dom0 image-storage image-guest clean-images xen-shadow

# The dom0 image's hypervisor: Debian's source built with shadow paging (PV live migration
# needs it; see images/xenshadow.py and docs/migration.md). About 3 minutes once, cached.
XEN_SHADOW := build/xen/shadow.stamp
xen-shadow: $(XEN_SHADOW)
$(XEN_SHADOW): images/xenshadow.py | deps venv
	@mkdir -p $(dir $@)
	flock build/xen/.build.lock $(PY) images/xenshadow.py
	@touch $@
$(IMAGES_DIR)/dom0/manifest.json: $(XEN_SHADOW)

images: $(foreach role,$(IMAGE_ROLES),$(IMAGES_DIR)/$(role)/manifest.json)

image-dom0: $(IMAGES_DIR)/dom0/manifest.json
image-storage: $(IMAGES_DIR)/storage/manifest.json
image-guest: $(IMAGES_DIR)/guest/manifest.json

# One build at a time even under `make -j`: each already uses both cores, and they share the
# apt cache.
$(IMAGES_DIR)/%/manifest.json: images/%.toml $(IMAGE_INPUTS) | deps venv
	@mkdir -p $(IMAGES_DIR)
	flock $(IMAGES_DIR)/.build.lock $(PY) images/build.py $<

clean-images:
	rm -rf $(IMAGES_DIR)
