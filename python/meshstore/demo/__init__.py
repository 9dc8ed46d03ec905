"""The demos: they compose nodes and services, so they sit above both (with the CLI).

- ``meshstore.demo.pipeline``: the live pipeline (``meshstore demo``): a node (or a mesh
  of nodes) and every service in one process, with a live table;
- ``meshstore.demo.replicas``: the two-store replication walk-through
  (``python -m meshstore.demo``).
"""
