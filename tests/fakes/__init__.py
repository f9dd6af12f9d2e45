"""Fake upstreams for tests: the mock server run in-process, and a byte-level stream server."""
