"""The cloud control plane, part 1: replicated volumes (desired state in, actual state out).

``model`` (volumes, validation, names), ``placement`` (which two storage nodes), ``work``
(each node's desired work), ``reports`` (agents' reports applied to actual state) and
``notify`` (the long-poll generation) are pure or loop-only; storage is the registry's
(``configserver/registry/volumes.py``), HTTP is ``configserver/http/volumesapi.py`` and
``workapi.py``.
"""
