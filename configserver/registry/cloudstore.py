"""The cloud's part of the SQLite registry: volumes, drains, instances and the guest map.

A mixin of ``SqliteRegistry``: reads on this thread's connection (``_db``), writes as writer
jobs (``_run``) of the row modules ``volumes``, ``drain`` and ``instances``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from configserver.cloud.instances import Instance, InstanceNic
from configserver.cloud.model import Volume, VolumeEvent, new_volume_id
from configserver.cloud.resources import Resources
from configserver.model import Node
from configserver.registry import ReportOutcome
from configserver.registry import drain as cloud_drain
from configserver.registry import failover as cloud_failover
from configserver.registry import instances as cloud_instances
from configserver.registry import migrations as cloud_migrations
from configserver.registry import volumes as cloud_volumes
from configserver.registry.cache import ReadCache
from configserver.registry.drain import settling
from configserver.registry.overview import overview

T = TypeVar("T")


class CloudStore:
    """Cloud methods of the registry (see ``Registry`` in ``__init__``)."""

    _cache: ReadCache

    def _db(self) -> sqlite3.Connection:
        raise NotImplementedError

    def _run(self, fn: Callable[..., T], /, **kwargs: Any) -> T:
        raise NotImplementedError

    def _now(self) -> float:
        raise NotImplementedError

    # -- the cloud: volumes -----------------------------------------------------------------

    def cloud_generation(self) -> int:
        return cloud_volumes.generation(self._db())

    def volumes(self) -> list[Volume]:
        return cloud_volumes.load_all(self._db())

    def volume(self, name: str) -> Volume | None:
        return cloud_volumes.by_name(self._db(), name)

    def volume_events(self, volume_id: str, limit: int = 500) -> list[VolumeEvent]:
        return cloud_volumes.events(self._db(), volume_id, limit)

    def create_volume(self, name: str, size: int, image: str | None,
                      tenant: str | None) -> tuple[Volume, int]:
        return self._run(cloud_volumes.create, volume_id=new_volume_id(), name=name,
                         size=size, image=image, tenant=tenant, now=self._now())

    # An instance's disk is not the volumes API's to detach from under its guest or to delete
    # while the instance exists (``instances``). Attaching it elsewhere is refused while it
    # is attached where the instance runs (``volumes.attach``), and a start is refused while
    # it is attached elsewhere: an admin may look at a stopped instance's disk.
    def delete_volume(self, name: str) -> tuple[Volume, int]:
        return self._run(cloud_instances.delete_volume, name=name, now=self._now())

    def attach_volume(self, name: str, node: str) -> tuple[Volume, int]:
        return self._run(cloud_volumes.attach, name=name, node=node, now=self._now())

    def detach_volume(self, name: str, node: str, *, force: bool = False
                      ) -> tuple[Volume, int]:
        return self._run(settling(cloud_instances.detach_volume), name=name, node=node,
                         now=self._now(), force=force)

    def record_cloud_report(self, mac: str, report: dict[str, Any],
                            seen: int | None = None) -> ReportOutcome:
        """``seen``: the generation of the work the report follows."""
        return self._run(settling(cloud_instances.record_report), mac=mac, report=report,
                         now=self._now(), seen=seen)

    def drain_node(self, ref: str, parallel: int | None = None) -> tuple[Node, int]:
        return self._run(cloud_drain.drain, ref=ref, now=self._now(), parallel=parallel)

    def dom0_drain(self, node: Node) -> dict[str, Any] | None:
        return cloud_drain.dom0_status(self._db(), node)

    def undrain_node(self, ref: str) -> tuple[Node, int]:
        return self._run(cloud_drain.undrain, ref=ref, now=self._now())

    def fail_over_lost(self) -> int | None:
        return self._run(cloud_failover.fail_over, now=self._now())

    def storage_facts(self, mac: str) -> dict[str, Any] | None:
        return cloud_volumes.storage_facts(self._db(), mac)


    # -- the cloud: instances and the guest map ----------------------------------------------

    def instances(self) -> list[Instance]:
        return cloud_instances.load_all(self._db())

    def instance(self, name: str) -> Instance | None:
        return cloud_instances.by_name(self._db(), name)

    def instance_counts(self) -> list[tuple[str, str, str | None, int, int]]:
        return cloud_instances.counts(self._db())

    def overview(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return overview(self._db())

    def instance_events(self, instance_id: str, limit: int = 500) -> list[dict[str, Any]]:
        return cloud_instances.events(self._db(), instance_id, limit)

    def instance_usage(self, name: str, since: float | None = None) -> dict[str, Any]:
        return cloud_instances.usage(self._db(), name, since, self._now())

    def dom0_facts(self, mac: str) -> dict[str, Any] | None:
        return cloud_instances.dom0_facts(self._db(), mac)

    def instance_nic(self, mac: str) -> tuple[Instance, InstanceNic] | None:
        """Kept in the read cache like a node's lookup: the DHCP server asks on its loop."""
        return self._cache.get(("instance_nic", mac), cloud_instances.nic, self._db(), mac)

    def create_instance(self, instance: Instance) -> tuple[Instance, int]:
        return self._run(cloud_instances.create, instance=instance, now=self._now())

    def create_instance_with_disk(self, *, name: str, memory: int, vcpus: int,
                                  image: str | None, disk: int, tenant: str | None,
                                  ssh_keys: tuple[str, ...], pool: tuple[str, str] | None,
                                  ip: str | None = None,
                                  resources: Resources | None = None) -> tuple[Instance, int]:
        return self._run(cloud_instances.create_with_disk, name=name, memory=memory,
                         vcpus=vcpus, image=image, disk=disk, tenant=tenant,
                         ssh_keys=ssh_keys, pool=pool, ip=ip, now=self._now(),
                         resources=resources)

    # ``expect``: the id of the instance the caller was allowed to act on (else NotFound).
    def migrate_instance(self, name: str, to: str | None = None, *,
                         expect: str | None = None) -> tuple[Instance, int]:
        return self._run(cloud_migrations.migrate, name=name, to=to, now=self._now(),
                         expect=expect)

    def start_instance(self, name: str, node: str | None = None, *,
                       expect: str | None = None) -> tuple[Instance, int]:
        return self._run(cloud_instances.start, name=name, node=node, now=self._now(),
                         expect=expect)

    def set_instance_resources(self, name: str, changes: dict[str, Any], *,
                               expect: str | None = None) -> tuple[Instance, int]:
        return self._run(cloud_instances.set_resources, name=name, changes=changes,
                         now=self._now(), expect=expect)

    def reboot_instance(self, name: str, *, expect: str | None = None
                        ) -> tuple[Instance, int]:
        return self._run(cloud_instances.reboot, name=name, now=self._now(), expect=expect)

    def destroy_instance(self, name: str, *, delete_disk: bool = False,
                         expect: str | None = None) -> tuple[Instance, int]:
        return self._run(cloud_instances.destroy, name=name, now=self._now(),
                         delete_disk=delete_disk, expect=expect)

    def stop_instance(self, name: str, *, expect: str | None = None) -> tuple[Instance, int]:
        return self._run(cloud_instances.stop, name=name, now=self._now(), expect=expect)

    def instance_gone(self, name: str, node: str, epoch: int) -> tuple[Instance, int]:
        return self._run(cloud_instances.gone, name=name, node=node, epoch=epoch,
                         now=self._now())


__all__ = ["CloudStore"]
