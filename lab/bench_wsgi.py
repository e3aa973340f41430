"""WSGI entry point for ``manage.py api_bench`` only: the real application, plus a response
header ``X-DB-Queries`` with the number of SQL statements the request ran.

Counting wraps the request's database connection (``connection.execute_wrapper``), so the
figure is exact and costs a counter increment per query. Never used in production: gunicorn is
pointed here only by the benchmark.
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

_application = get_wsgi_application()


def application(environ, start_response):
    from django.db import connection

    count = [0]

    def counter(execute, sql, params, many, context):
        count[0] += 1
        return execute(sql, params, many, context)

    captured: dict = {}

    def capture(status, headers, exc_info=None):
        captured["status"], captured["headers"], captured["exc_info"] = status, headers, exc_info
        return lambda data: None  # the body is returned as an iterable below, never written

    with connection.execute_wrapper(counter):
        body = _application(environ, capture)
        chunks = list(body)
        if hasattr(body, "close"):
            body.close()
    headers = [*captured["headers"], ("X-DB-Queries", str(count[0]))]
    start_response(captured["status"], headers, captured["exc_info"])
    return chunks
