"""The swarm health service: ``python -m swarm.health --initial-peers MADDR``.

- monitor.py: ``Monitor``: joins the DHT as a client, reads announcements, probes servers, refreshes the state
- state.py: ``SwarmState`` / ``ModelStatus`` / ``ServerStatus`` and the JSON schema of /api/v1/state
- history.py: ``History``: samples in SQLite for the page's chart, kept across restarts
- page.py: the HTML page (server-rendered, self-refreshing, SVG chart)
- metrics.py: Prometheus metrics computed from the latest state
- app.py: the FastAPI routes
- __main__.py: the command line (parsed before uvicorn and hivemind load)
"""
