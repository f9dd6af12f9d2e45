"""Fake upstreams for tests: the mock server run in-process, and one raw scripted server."""
