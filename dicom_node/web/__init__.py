"""The node's HTTP side: REST API, web UI and dashboard, health, readiness and Prometheus metrics.

``app.create_app`` builds the FastAPI app, ``server.HttpServer`` runs it next to the DICOM port,
``mount.app_for_node`` wires it to a running node. Only ``settings`` is imported by the node's
configuration, so it stays free of the web libraries.
"""
