"""``python -m meshstore.demo``: the two-store replication walk-through."""

from meshstore.demo.replicas import run

raise SystemExit(0 if run() else 1)
