"""``python -m meshstore.cli``: the ``meshstore`` command."""

from meshstore.cli import main

main()
