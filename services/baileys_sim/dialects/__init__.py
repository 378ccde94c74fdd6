"""The simulator speaks each Baileys server dialect zapbus supports (``ZAPBUS_SIM_KIND``).

A dialect here is the server side of one ``zapbus/dialects/<kind>.py``: its HTTP routes (mapped
onto the shared ``SessionRegistry``) and how it renders what happens to a session as webhook
bodies. One module per dialect, ``<kind>.py``, defining ``DIALECT``.
"""

from __future__ import annotations

import importlib

from services.baileys_sim.dialects.base import SimDialect

KINDS = ("seed", "evolution", "waha", "fazer")


def sim_dialect(kind: str) -> SimDialect:
    if kind not in KINDS:
        raise ValueError(f"the simulator does not speak {kind!r}; it speaks {', '.join(KINDS)}")
    dialect = importlib.import_module(f"services.baileys_sim.dialects.{kind}").DIALECT
    assert isinstance(dialect, SimDialect)
    return dialect
