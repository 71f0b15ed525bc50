# The QEMU test farm (docs/farm.md): `make farm` boots one Xen dom0 and one storage node.
# FARM_ARGS passes options to `up`, e.g. make farm FARM_ARGS="--storage 2 --firmware uefi".
FARM_DIR ?= build/farm
FARM_ARGS ?=
FARM := $(PY) -m configserver.farm --farm-dir $(FARM_DIR)

.PHONY: farm farm-status farm-down farm-ssh farm-console farm-dashboard bench-storm

farm: deps venv images
	$(FARM) up $(FARM_ARGS)

farm-status: venv
	$(FARM) status

farm-down: venv
	$(FARM) down

# make farm-ssh NODE=dom0-1 [CMD="xl info"]: root on a farm node, with the farm's own key.
NODE ?= dom0-1
CMD ?=
farm-ssh: venv
	$(FARM) ssh $(NODE) $(if $(CMD),'$(CMD)')

# make farm-console NODE=storage-1: the VM's serial console (Ctrl-] detaches; it runs on).
farm-console: venv
	$(FARM) console $(NODE)

bench-storm: deps venv
	bench/storm/run

# make farm-dashboard [PORT=8443]: the farm server's dashboard at https://127.0.0.1:PORT/
# (forwarded into the farm's namespace) and a single-use login link; Ctrl-C stops forwarding.
PORT ?= 8443
farm-dashboard: venv
	$(FARM) dashboard --port $(PORT)
