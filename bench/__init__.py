"""`make bench`: the proxy against a bare aiohttp pass-through, same fake upstream, same wrk load.

Entry point: ``python -m bench.run``. Pieces: ``fake_upstream`` (the fast fake
upstream both sides call), ``passthrough`` (the baseline), ``wrk`` (running wrk
and parsing its output), ``routing`` (the router micro-benchmark).
"""
