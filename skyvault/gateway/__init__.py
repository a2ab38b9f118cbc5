"""The HTTP gateway (``skyvault-api``): other systems' requests become Prefect deployment runs.

Each request is answered in the caller's own words: the data catalog's jobs (``POST /jobs``), the
STAC pipeline API (``POST /newitem``, ``GET /status``), the view server's browse-report ingestion
(``POST /browse-reports``), plus skyvault's own product pages (``/products``). Request handling is
small typed functions over the domain library; only :mod:`skyvault.gateway.runs` talks to Prefect.
"""
