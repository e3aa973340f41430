"""Settings every gunicorn started from the project root reads (gunicorn loads
``./gunicorn.conf.py`` by default): ``make run``, the image (WORKDIR /app), the compose stack,
and the lab's chaos and benchmark stacks. Command-line flags still win over these.

No control socket. gunicorn 25+ opens one at a fixed path per user by default
(``$XDG_RUNTIME_DIR/gunicorn.ctl`` or ``~/.gunicorn/gunicorn.ctl``): a second gunicorn of the
same user (a test run, a benchmark or a second ``make run`` beside the first) unlinks the
first one's socket and takes the path over, and whichever stops first removes the socket the
other is using, so ``gunicornc`` would reach the wrong server, or none. Nothing here uses it:
reloads go through signals (HUP, as the rolling deploy of the chaos run does). To use
``gunicornc`` on one server, start it with ``GUNICORN_CONTROL_SOCKET=/its/own/path.ctl``.

Its own log lines (error and access) follow ``LOG_FORMAT`` like the rest of the project
(``config/gunicorn_logging.py``): JSON objects, the access line's request as fields. Its own
answers to requests it refuses before Django (a control character in a header, say) carry the
API's JSON error body (``config/gunicorn_errors.py``), not an HTML page.
"""

import os

_own_path = os.environ.get("GUNICORN_CONTROL_SOCKET", "")
if _own_path:
    control_socket = _own_path
else:
    control_socket_disable = True

# A logger_class of our own also means gunicorn no longer switches to its statsd logger when
# --statsd-host is given: nothing here uses statsd (metrics are Prometheus, /metrics).
logger_class = "config.gunicorn_logging.Logger"


def on_starting(server) -> None:
    """Before the workers fork: gunicorn's own error answers in the API's JSON error shape
    (config/gunicorn_errors.py)."""
    from config.gunicorn_errors import install

    install()
