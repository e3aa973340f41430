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
COPY . /app
RUN pip install . \
    && SECRET_KEY=collectstatic-only DATABASE_URL=sqlite:////tmp/build.sqlite3 \
       CELERY_BROKER_URL=memory:// python manage.py collectstatic --noinput \
    && mkdir -p /app/var /run/sagarunner/metrics \
    && chown -R sagarunner:sagarunner /app/var /run/sagarunner

USER sagarunner
EXPOSE 8000
CMD ["gunicorn", "config.wsgi", "--bind", "0.0.0.0:8000", "--workers", "3", "--access-logfile", "-"]
