# The QEMU test farm (docs/farm.md): `make farm` boots one Xen dom0 and one storage node.
# FARM_ARGS passes options to `up`, e.g. make farm FARM_ARGS="--storage 2 --firmware uefi".
FARM_DIR ?= build/farm
FARM_ARGS ?=
FARM := $(PY) -m configserver.farm --farm-dir $(FARM_DIR)

.PHONY: farm farm-status farm-down bench-storm

farm: deps venv images
	$(FARM) up $(FARM_ARGS)

farm-status: venv
	$(FARM) status

farm-down: venv
	$(FARM) down

bench-storm: deps venv
	bench/storm/run
