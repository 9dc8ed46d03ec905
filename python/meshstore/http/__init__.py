"""The node's HTTP side (aiohttp, on the node's own event loop): a JSON API over a
store, its live feed as Server-Sent Events, and the web page in ``static/``.

- ``meshstore.http.server``: ``HttpServer`` (start/stop, port 0) and the aiohttp app;
- ``meshstore.http.api``: the handlers (the contract is docs/http.md);
- ``meshstore.http.entity_json``: entities as JSON-ready dicts (also used by the CLI).

Importing this package loads nothing else: ``entity_json`` does not need aiohttp.
"""
