"""TFTP for the config server: read-only, RFC 1350/2347/2348/2349/7440.

``codec`` (packets), ``options`` (negotiation), ``transfer`` (one transfer's state machine),
``netascii`` and ``files`` are pure or nearly so; ``server`` and ``lockstep`` (windowsize-1
transfers in worker threads) move bytes; ``service`` composes them and is started through
``service.start_tftp``.
"""
