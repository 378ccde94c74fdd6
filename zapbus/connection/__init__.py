"""The one owner of connection state (docs/architecture.md, "Where a state changes").

* ``states``: the states and every subset of them by name (nothing else spells a list);
* ``machine``: which moves the graph allows: events folded by ``apply``, and the moves the
  system forces (``force``), checked by the same rules;
* ``vocabulary``: what the Baileys servers' words and codes mean, and the reason codes;
* ``writer``: the one place that writes a connection's status (row, version, history, change).
"""
