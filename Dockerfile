# The production-shaped image: web (gunicorn), worker and beat all run from it
# (see docker-compose.yml). Static files are collected at build time and served by whitenoise.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Run the code from /app (templates and app static files live next to it, not in the wheel).
    PYTHONPATH=/app \
    DJANGO_SETTINGS_MODULE=config.settings \
    SAGARUNNER_VAR_DIR=/app/var \
    PROMETHEUS_MULTIPROC_DIR=/run/sagarunner/metrics \
    LOG_FORMAT=json

RUN groupadd --system --gid 10001 sagarunner \
    && useradd --system --uid 10001 --gid sagarunner --home-dir /app --shell /usr/sbin/nologin sagarunner

WORKDIR /app
# Dependencies first, in a layer of their own: a change to the code alone reuses it instead of
# downloading and installing every dependency again. They are read from pyproject.toml, the one
# list of them.
COPY pyproject.toml /app/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
       > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY . /app
RUN pip install --no-deps . \
    && SECRET_KEY=collectstatic-only DATABASE_URL=sqlite:////tmp/build.sqlite3 \
       CELERY_BROKER_URL=memory:// python manage.py collectstatic --noinput \
    && mkdir -p /app/var /run/sagarunner/metrics \
    && chown -R sagarunner:sagarunner /app/var /run/sagarunner

USER sagarunner
EXPOSE 8000
# Checks SECRET_KEY and empties this container's metrics directory, then runs the command.
ENTRYPOINT ["/app/scripts/docker-entrypoint.sh"]
CMD ["gunicorn", "config.wsgi", "--bind", "0.0.0.0:8000", "--workers", "3", "--access-logfile", "-"]
