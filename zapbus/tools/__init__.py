"""The operator's and developer's tools: the ``zapbus`` command (``cli``, ``servercli``),
``make run`` (``devrun``), child service processes (``procs``) and the embedded NATS and
PostgreSQL of development and tests (``localinfra``, from the ``local`` extra's wheels).

The services never import this package: it is not the runtime library (``zapbus/``), and the
production image runs it only for ``zapbus migrate`` and the operator's commands.
"""
