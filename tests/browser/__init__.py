"""Browser tests of the web page (a package, so that its conftest never shadows tests/conftest.py)."""
