"""zapbus benchmarks (issue 7): how fast zapbus is, as ratios to floors measured in the same run.

``python -m bench`` (or ``make bench``) runs them all and writes ``docs/benchmarks.md``;
``python -m bench --quick`` is a ~1 min smoke run (``tests/test_bench.py`` runs it);
``python -m bench create webhook`` picks benchmarks. Each benchmark starts what it needs
(services as child processes, in its own NATS namespace and Postgres schema, removed afterwards),
drives them from a load generator that runs in a process of its own, and returns a ``Section``
(a table plus the targets it checks).
"""
