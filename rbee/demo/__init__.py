"""The demo of ``rbee up``: its hive's config, its simulated workers and engines."""

DEMO_HIVE_PORT = 7835
"""The demo hive's API port, unless ``--hive-port`` (or ``--port 0``) says otherwise."""
