"""
Test support shared by every test module; fixtures live in tests/conftest.py.

  - processes: redis-server, a sentinel, ``twistd pushservice`` (foreground or daemonized), ports.
  - inprocess: a PushService started in the test's own process.
  - clients: the WebSocket test client (every frame checked as strict JSON) and tokens.
  - raw: raw loopback sockets: hand-built heads and frames, clients that never read.
  - web: plain HTTP GETs, /healthz, /metrics.
  - waiting: timeouts, polling (`until`), and markers instead of sleeps.
  - browser: headless Chromium through Selenium, and reading the demo page.
  - examples: Hypothesis examples drawn up front, for tests that push them through a node.
  - proxy: a TCP proxy that can go silent (a half-open Redis connection).

Nothing here imports the reactor at module level: pytest-twisted installs it
after the conftest (which imports support) has loaded.
"""
