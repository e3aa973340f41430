"""Settings for sagarunner.

Every value that can change between machines is read from the environment here, and only
here (django-environ, read strictly: ``config.env``). The sections read like a table of
contents; tool settings live in ``pyproject.toml``.
"""

import math
import os
import sys
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured
from kombu import Exchange, Queue

from config.env import TRUE, StrictEnv, refuse_bad_redis_url

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("SAGARUNNER_VAR_DIR", BASE_DIR / "var"))

env = StrictEnv()

# ---------------------------------------------------------------------------------------------
# Core
# ---------------------------------------------------------------------------------------------
DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = env("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set the SECRET_KEY environment variable "
            "(or DEBUG=1 for a throwaway development key)."
        )
    SECRET_KEY = "insecure-development-key-only-used-with-DEBUG"
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
# ---------------------------------------------------------------------------------------------
# HTTPS, cookies, browser protections (docs/operations.md, "Running it in production")
# ---------------------------------------------------------------------------------------------
# The site is reached over HTTPS only (directly, or through a proxy that ends TLS). On by
# default whenever DEBUG is off; `make run` (DEBUG on, plain http on localhost) leaves it off.
HTTPS_ONLY = env.bool("HTTPS_ONLY", default=not DEBUG)
SECURE_SSL_REDIRECT = HTTPS_ONLY
# Load balancers and compose health checks probe over plain http from inside the network.
SECURE_REDIRECT_EXEMPT = [r"^healthz/?$", r"^metrics/?$"]
SESSION_COOKIE_SECURE = HTTPS_ONLY
CSRF_COOKIE_SECURE = HTTPS_ONLY
# TLS ends at a proxy: name the header it sets to say the client used https (it must also
# overwrite any such header a client sends), e.g. SECURE_PROXY_SSL_HEADER=X-Forwarded-Proto.
_proxy_ssl_header = env("SECURE_PROXY_SSL_HEADER", default="")
if _proxy_ssl_header:
    SECURE_PROXY_SSL_HEADER = (
        "HTTP_" + _proxy_ssl_header.upper().replace("-", "_"),
        "https",
    )
# HSTS: a conservative hour by default (a mistake is undone within an hour); raise it to a year
# (31536000) once HTTPS has run well. includeSubDomains only reaches hosts below this one.
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=3600, minimum=0) if HTTPS_ONLY else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=True)
# Preloading is a promise to browser vendors that is slow to take back: only on request.
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
SILENCED_SYSTEM_CHECKS = [] if SECURE_HSTS_PRELOAD else ["security.W021"]
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
# Content Security Policy (django-csp): only this origin's scripts, styles, images and fonts.
# The ops console and Swagger UI (its split view: no inline script) run under it; a template
# must not add inline <script> or on*= handlers. Inline style attributes are allowed (Django's
# admin and a few ops console templates use them; they cannot run code).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'", "'unsafe-inline'"],
        "img-src": ["'self'", "data:"],
        "font-src": ["'self'"],
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    },
}

# ---------------------------------------------------------------------------------------------
# Logins to the ops console: strong passwords, lockout after repeated failures (django-axes)
# ---------------------------------------------------------------------------------------------
AUTHENTICATION_BACKENDS = [
    # First: refuses a locked-out user or address before any password is checked.
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {
        "NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
        "OPTIONS": {"min_length": env.int("PASSWORD_MIN_LENGTH", default=12, minimum=1)},
    },
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# After LOGIN_FAILURE_LIMIT failed logins for one user name, or from one address, that user or
# address is locked out for LOGIN_LOCKOUT_MINUTES (failures are counted in the database, so
# every web process and host agrees). Unlock early: `manage.py axes_reset_username NAME`,
# `axes_reset_ip ADDRESS`, or delete the access attempt in the ops console.
AXES_FAILURE_LIMIT = env.int("LOGIN_FAILURE_LIMIT", default=5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env.float("LOGIN_LOCKOUT_MINUTES", default=15, positive=True))
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_RESET_ON_SUCCESS = True
# A success clears its own user name's failures only (see the handler for why).
AXES_HANDLER = "accounts.lockout.OwnAttemptsOnlyHandler"
# IPv6 counted by its /64, as the API's rate limits count it (accounts.lockout).
AXES_CLIENT_IP_CALLABLE = "accounts.lockout.lockout_address"
AXES_LOCKOUT_TEMPLATE = "admin/locked_out.html"
AXES_HTTP_RESPONSE_CODE = 429
# Not verbose: its "AXES: BEGIN version ..." line at every process's start (each management
# command's included, on the terminal of `TOKEN=$(manage.py issue_token ...)`) said nothing an
# operator needs; lockouts and failures are still logged, and audited (their log lines name the
# lockout parameters, user name and address, masked as before, no longer the user agent).
AXES_VERBOSE = False

# How many reverse proxies (load balancer, ingress) stand in front of the web processes and
# append to X-Forwarded-For. 0: clients connect directly and REMOTE_ADDR is their address. The
# audit log, the per-address rate limit and the login lockout all use the same answer.
TRUSTED_PROXY_COUNT = env.int("TRUSTED_PROXY_COUNT", default=0, minimum=0)
# Seconds a request's whole body may take to arrive (config.middleware.FramedBody reads every
# body whole, first, but an anonymous API call's): a body that stops arriving or trickles is
# answered 408 and the thread freed. Without it, such a client held a gunicorn thread for as
# long as it kept the connection open. 10 s: the API's bodies are a few kilobytes.
REQUEST_BODY_TIMEOUT = env.float("REQUEST_BODY_TIMEOUT", default=10.0)
if not (math.isfinite(REQUEST_BODY_TIMEOUT) and REQUEST_BODY_TIMEOUT > 0):
    raise ImproperlyConfigured(
        f"REQUEST_BODY_TIMEOUT must be a positive number of seconds, not {REQUEST_BODY_TIMEOUT:g}"
    )

INSTALLED_APPS = [
    # Django's admin, its site recording every console edit in the audit log (audit.console).
    "audit.admin_app.AuditedAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "knox",
    "axes",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "django_fsm",
    "csp",
    "audit",
    "providers",
    "accounts",
    "sagas",
    "inventory",
    "payments",
    "shipping",
    "orders",
    "webhooks",
]
# The development app (chaos, benchmarks, data generators: lab/) is installed wherever the
# checkout has it; the production image leaves the folder out (.dockerignore), so production
# never lists its commands. SAGARUNNER_LAB=0 shows a checkout in the production shape.
SAGARUNNER_LAB = env.bool("SAGARUNNER_LAB", default=(BASE_DIR / "lab" / "__init__.py").exists())
if SAGARUNNER_LAB:
    INSTALLED_APPS.append("lab")

MIDDLEWARE = [
    "config.middleware.RefuseUnknownHost",
    "config.middleware.MisspeltApiPath",
    "config.middleware.FramedBody",
    "django.middleware.security.SecurityMiddleware",
    "config.middleware.RefuseNul",
    "csp.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "audit.context.AuditContextMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: turns a locked-out login into its lockout page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "staticfiles"
# Empty until collectstatic runs (the image runs it; a checkout serves app static files through
# the finders below). whitenoise warns "No directory at: .../staticfiles/" at every process
# start when it is missing, which is noise on a first `make run`.
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
# Project-wide static files (the landing page's stylesheet); apps keep theirs in <app>/static/.
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True  # serve app static files without collectstatic in dev and tests

# ---------------------------------------------------------------------------------------------
# Database
# ---------------------------------------------------------------------------------------------
DATABASES = {
    "default": env.db("DATABASE_URL", default="postgres://postgres@127.0.0.1:5432/sagarunner"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The embedded default: several processes share one file, so wait for the lock instead of
    # failing, take the write lock up front, and let readers run beside the writer (WAL).
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
else:
    # Persistent connections: a worker reuses one connection across tasks; it never holds a
    # transaction open while it waits on a provider.
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=600, minimum=0)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    DATABASES["default"].setdefault("OPTIONS", {})["connect_timeout"] = 5
    _options = DATABASES["default"]["OPTIONS"]
    # A DATABASE_URL's query string arrives as text; Django wants these two typed.
    if isinstance(_options.get("server_side_binding"), str):
        _binding = _options["server_side_binding"].lower()
        _options["server_side_binding"] = _binding in TRUE
    if isinstance(_options.get("prepare_threshold"), str):
        _options["prepare_threshold"] = int(_options["prepare_threshold"])
    if DATABASES["default"]["ENGINE"].endswith("postgresql") and env.bool(
        "SAGA_PREPARED_STATEMENTS", default=True
    ):
        # Every query is bound on the server and psycopg prepares it from its fifth run on a
        # connection (its default threshold), so PostgreSQL stops parsing and planning the
        # participants' and Django's few dozen statement texts again on each run, and psycopg
        # stops quoting every parameter into the text. Django leaves both off by default for
        # connection poolers; see SAGA_PREPARED_STATEMENTS below. A DATABASE_URL that sets
        # either (?server_side_binding=false&prepare_threshold=20) keeps its own value.
        _options.setdefault("server_side_binding", True)
        _options.setdefault("prepare_threshold", 5)
DATABASES["default"].setdefault("TEST", {})["NAME"] = env("TEST_DATABASE_NAME", default=None)

# ---------------------------------------------------------------------------------------------
# Celery
# ---------------------------------------------------------------------------------------------
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="redis://127.0.0.1:6379/0")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_CONNECTION_TIMEOUT = 3
CELERY_BROKER_TRANSPORT_OPTIONS: dict = {"visibility_timeout": 3600}
if CELERY_BROKER_URL.startswith("filesystem://"):
    _broker_dir = VAR_DIR / "broker"
    for _sub in ("queue", "processed", "control"):
        (_broker_dir / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }
elif CELERY_BROKER_URL.startswith("redis"):
    # Fail fast when the broker is down so a doorbell never stalls a request or a step.
    CELERY_BROKER_TRANSPORT_OPTIONS.update(
        {"socket_connect_timeout": 2, "socket_timeout": 5, "max_retries": 1}
    )
CELERY_TASK_ACKS_LATE = True
# On a lost broker connection, let the step in flight finish and record (the redelivered
# doorbell is then fenced as stale) instead of killing it mid-call, which would leave its lease
# to expire before the saga moves again. Set explicitly: Celery 6 changes the default. Fencing
# makes True safe too, but not better: it SIGTERMs the prefork process mid-call (the step waits
# out SAGA_STEP_TIMEOUT + SAGA_STUCK_AFTER and retries as "may have taken effect"), and the
# threads pool cannot cancel at all (Celery logs a traceback per running task instead).
# Celery's reminder about the default is filtered out in config/celery.py.
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True  # saga results live in our tables
CELERY_RESULT_BACKEND = None
CELERY_TASK_DEFAULT_QUEUE = env("CELERY_QUEUE", default="sagarunner")
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_WORKER_SEND_TASK_EVENTS = False
CELERY_TASK_SEND_SENT_EVENT = False
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
# Task modules outside INSTALLED_APPS (autodiscovery only looks at apps).
CELERY_IMPORTS = ["config.tasks"]
CELERY_TIMEZONE = TIME_ZONE

# ---------------------------------------------------------------------------------------------
# Cache. CACHE_URL: redis://... (the default: the broker's Redis when the broker is Redis),
# db:// (a table in the database, created by every `migrate`) or file:///path (one host only;
# the embedded default of `make run`). A Redis cache holds the API's rate-limit counters,
# shared by every web process and host; with any other the counters are rows in the database
# (accounts/throttling.py: those caches cannot count atomically). A Redis that does not answer
# leaves requests uncounted for a few seconds, so it is asked with short timeouts: a request
# never hangs on it. Login failures are rows in the database, django-axes' own tables.
# ---------------------------------------------------------------------------------------------
if CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    _cache_default = CELERY_BROKER_URL
elif CELERY_BROKER_URL.startswith("filesystem://"):
    _cache_default = f"file://{VAR_DIR / 'cache'}"
else:
    _cache_default = "db://"
CACHE_URL = env("CACHE_URL", default=_cache_default)
# CACHE_URL=db://'s table: every `migrate` makes it, whatever the cache is then, so switching
# to db:// (or to a RabbitMQ broker, whose default cache it is) needs no migrate of its own.
DB_CACHE_TABLE = "sagarunner_cache"
if CACHE_URL.startswith(("redis://", "rediss://")):
    refuse_bad_redis_url("CACHE_URL", CACHE_URL)
    _cache = {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": CACHE_URL,
        "OPTIONS": {"socket_connect_timeout": 1.0, "socket_timeout": 1.0},
    }
elif CACHE_URL.startswith("file://"):
    _cache = {
        "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
        "LOCATION": CACHE_URL.removeprefix("file://"),
    }
elif CACHE_URL == "db://":
    _cache = {"BACKEND": "django.core.cache.backends.db.DatabaseCache", "LOCATION": DB_CACHE_TABLE}
else:
    raise ImproperlyConfigured(f"CACHE_URL must be redis://, db:// or file://, not {CACHE_URL!r}")
CACHES = {"default": {**_cache, "KEY_PREFIX": env("CACHE_KEY_PREFIX", default="sagarunner")}}

# ---------------------------------------------------------------------------------------------
# Saga engine knobs (the README's Configuration table says what each does)
# ---------------------------------------------------------------------------------------------
SAGA_BACKOFF_BASE = env.float("SAGA_BACKOFF_BASE", default=0.5, positive=True)
SAGA_BACKOFF_MAX = env.float("SAGA_BACKOFF_MAX", default=30.0, positive=True)
SAGA_MAX_ATTEMPTS = env.int("SAGA_MAX_ATTEMPTS", default=5, minimum=1)
SAGA_COMPENSATION_MAX_ATTEMPTS = env.int("SAGA_COMPENSATION_MAX_ATTEMPTS", default=8, minimum=1)
SAGA_STUCK_AFTER = env.float("SAGA_STUCK_AFTER", default=30.0, positive=True)
SAGA_SWEEP_INTERVAL = env.float("SAGA_SWEEP_INTERVAL", default=10.0, positive=True)
# Set explicitly, the interval is applied to beat's schedule at every migrate (each deploy),
# replacing one staff changed in the ops console; unset, the schedule keeps the console's.
SAGA_SWEEP_INTERVAL_SET = env.is_set("SAGA_SWEEP_INTERVAL")
SAGA_DEADLINE = env.float("SAGA_DEADLINE", default=600.0, positive=True)
# How long a step may run unless it sets its own timeout. Tasks' time limits, and the leases
# that outlive them (so an expired lease always means the holder is gone), are sized from the
# longest step timeout registered, up to SAGA_TASK_TIMEOUT_MAX below.
SAGA_STEP_TIMEOUT = env.float("SAGA_STEP_TIMEOUT", default=30.0, positive=True)
# How long a task may keep running due steps of one saga before handing back to the broker.
SAGA_INLINE_BUDGET = env.float("SAGA_INLINE_BUDGET", default=2.0, minimum=0)
# Every doorbell's task gets the time limits of the longest step timeout any registered saga
# type sets, up to this, so a task never stops mid-saga for a longer step; each step is still
# ended at its own timeout. The lease (how long a dead worker's saga waits) grows with it. A
# step longer than this keeps a task message of its own.
SAGA_TASK_TIMEOUT_MAX = env.float(
    "SAGA_TASK_TIMEOUT_MAX", default=2 * SAGA_STEP_TIMEOUT, positive=True
)
SAGA_SWEEP_BATCH = env.int("SAGA_SWEEP_BATCH", default=500, minimum=1)
# A parked saga (Wait timeout, Sleep) due within this many seconds also gets a doorbell with a
# countdown; later ones are fired by the sweeper alone (at most SAGA_STUCK_AFTER late), so a
# million long waits hold no broker message.
SAGA_TIMER_RING_WITHIN = env.float("SAGA_TIMER_RING_WITHIN", default=300.0, minimum=0)
# PostgreSQL: a claim, and a record after which the same task goes straight on, commit without
# waiting for their WAL flush (they only extend the task's lease; see
# sagas.timing.lease_only_commits), and so do the order saga's payment row and its copies of a
# provider's answers (payments.services) and the fake carrier's booking. Except: the claim of,
# or the record going straight on into, a forward step that may leave the database
# (Step.may_leave_database), and the record that begins a compensation. Records that hand the
# saga on (doorbell, terminal state, a person) always wait.
SAGA_ASYNC_LEASE_COMMITS = env.bool("SAGA_ASYNC_LEASE_COMMITS", default=True)
# PostgreSQL: transactional steps that follow each other in one task share one transaction and
# one record, and steps that stay in the database (Step.shares_records) share one record, each
# committing its own writes (sagas.store.Batch); off, each step has its own record.
SAGA_BATCH_STEPS = env.bool("SAGA_BATCH_STEPS", default=True)
# Pump slots (sagas.pumps): at most this many doorbells for "due now" sagas are out at once;
# past that, a start or hand-over sends no message and a running pump claims the saga from the
# database. It bounds how many sagas run at once, so keep it at or above the pool slots of all
# workers on the queue together. 0: one doorbell per saga, always. The slots live in Redis:
# the cache's when it is Redis, else the broker's; with neither, every saga gets its own.
SAGA_PUMPS = env.int("SAGA_PUMPS", default=128, minimum=0)
if CACHE_URL.startswith(("redis://", "rediss://")):
    _pump_redis = CACHE_URL
elif CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    _pump_redis = CELERY_BROKER_URL
else:
    _pump_redis = ""
SAGA_PUMP_REDIS_URL = env("SAGA_PUMP_REDIS_URL", default=_pump_redis)
if SAGA_PUMP_REDIS_URL:
    refuse_bad_redis_url("SAGA_PUMP_REDIS_URL", SAGA_PUMP_REDIS_URL)
# PostgreSQL: the engine's own statements (claim, record, start) are prepared on first use in
# each connection, every other query from its fifth run (DATABASES above), instead of being
# parsed and planned on every run. Turn off behind a pooler that cannot keep prepared
# statements (PgBouncer in transaction mode before 1.21, or without max_prepared_statements):
# then queries are bound on the client and nothing is prepared, Django's default.
SAGA_PREPARED_STATEMENTS = env.bool("SAGA_PREPARED_STATEMENTS", default=True)
SAGA_FAULTS = env("SAGA_FAULTS", default="")
# Downstream providers (providers app): per-provider circuit breaker and call limits. Off makes
# every step call its provider as before (no gate, no health window): the comparison baseline.
SAGA_PROVIDER_BREAKERS = env.bool("SAGA_PROVIDER_BREAKERS", default=True)
# Defaults for every provider, tuned for a card processor; SAGA_PROVIDERS (JSON) overrides them
# per provider, e.g. {"payments": {"max_in_flight": 20}}. See providers.config for each knob.
SAGA_PROVIDER_DEFAULTS = {
    "window": 30.0,
    "min_calls": 10,
    "failure_rate": 0.5,
    "cooldown": 10.0,
    "canaries": 3,
    "max_in_flight": 50,
    "rate": 0.0,
    "release_spread": 5.0,
    "park_max": 0.0,
}
SAGA_PROVIDERS = env.json("SAGA_PROVIDERS", default={})
# Tests and chaos runs: the fake providers count their own concurrent calls (two extra writes
# per call), so a run can prove the in-flight limit from the provider's side.
SAGA_FAKE_PROVIDER_STATS = env.bool("SAGA_FAKE_PROVIDER_STATS", default=False)
# Modules that register saga types besides the apps' own (imported when the sagas app is ready,
# so every worker knows them). None by default: the benchmark's 5-step type (lab.bench_saga)
# is registered by the benchmark, in its own process and the workers it starts.
SAGA_DEFINITION_MODULES = env.list("SAGA_DEFINITION_MODULES", default=[])
# A step task may run inline steps for SAGA_INLINE_BUDGET and then one more step; its hard
# limit kills it past that, so an expired lease always means its holder is gone. These are the
# limits of a message that carries none; the doorbell sends its own when a registered step is
# longer than SAGA_STEP_TIMEOUT (see SAGA_TASK_TIMEOUT_MAX).
CELERY_TASK_ANNOTATIONS = {
    "sagas.run": {
        "soft_time_limit": SAGA_STEP_TIMEOUT + SAGA_INLINE_BUDGET,
        "time_limit": SAGA_STEP_TIMEOUT + SAGA_INLINE_BUDGET + 3,
    },
}
# Orders above this total wait before capture for ops staff's `fraud_review` signal; a review
# not given within ORDER_FRAUD_REVIEW_TIMEOUT seconds goes to a person (needs_manual).
ORDER_FRAUD_REVIEW_ABOVE = env("ORDER_FRAUD_REVIEW_ABOVE", default="").strip() or "1000.00"
try:
    _review_above = Decimal(ORDER_FRAUD_REVIEW_ABOVE)
except InvalidOperation:
    _review_above = Decimal("NaN")
# Every order compares its total with it: read wrong, every order's saga failed at that step.
if not (_review_above.is_finite() and _review_above >= 0):
    raise ImproperlyConfigured(
        "ORDER_FRAUD_REVIEW_ABOVE must be an amount such as 1000.00 (a '.' before the cents, "
        f"no thousands separator), not {ORDER_FRAUD_REVIEW_ABOVE!r}"
    )
ORDER_FRAUD_REVIEW_TIMEOUT = env.float("ORDER_FRAUD_REVIEW_TIMEOUT", default=86400.0, positive=True)
# pm_card_3ds_required: how long the order waits for the client's `3ds_confirmed` before it is
# cancelled (timed_out).
ORDER_3DS_TIMEOUT = env.float("ORDER_3DS_TIMEOUT", default=900.0, positive=True)

# ---------------------------------------------------------------------------------------------
# Webhooks (docs/webhooks.md)
# ---------------------------------------------------------------------------------------------
# Development and tests only: endpoints may use plain http and loopback or private addresses.
WEBHOOKS_ALLOW_PRIVATE = env.bool("WEBHOOKS_ALLOW_PRIVATE", default=False)
# Webhook tasks have a queue of their own, so a slow endpoint never waits beside saga steps.
WEBHOOKS_QUEUE = env("WEBHOOKS_QUEUE", default=f"{CELERY_TASK_DEFAULT_QUEUE}-webhooks")
WEBHOOKS_CONNECT_TIMEOUT = env.float("WEBHOOKS_CONNECT_TIMEOUT", default=3.0, positive=True)
# Each read of the response.
WEBHOOKS_TIMEOUT = env.float("WEBHOOKS_TIMEOUT", default=10.0, positive=True)
WEBHOOKS_BACKOFF_BASE = env.float("WEBHOOKS_BACKOFF_BASE", default=5.0, positive=True)
WEBHOOKS_BACKOFF_MAX = env.float("WEBHOOKS_BACKOFF_MAX", default=3600.0, positive=True)
# Then dead.
WEBHOOKS_RETRY_FOR = env.float("WEBHOOKS_RETRY_FOR", default=24 * 3600.0, positive=True)
WEBHOOKS_SECRET_GRACE = env.float("WEBHOOKS_SECRET_GRACE", default=24 * 3600.0, minimum=0)
# Bytes kept (at most 500: the check framework says so; a negative one read the whole answer).
WEBHOOKS_RESPONSE_EXCERPT = env.int("WEBHOOKS_RESPONSE_EXCERPT", default=200, minimum=0)
WEBHOOKS_TASK_BUDGET = env.float("WEBHOOKS_TASK_BUDGET", default=10.0, positive=True)
WEBHOOKS_SWEEP_INTERVAL = env.float("WEBHOOKS_SWEEP_INTERVAL", default=10.0, positive=True)
# As SAGA_SWEEP_INTERVAL_SET: set, it is applied to beat's schedule at every migrate.
WEBHOOKS_SWEEP_INTERVAL_SET = env.is_set("WEBHOOKS_SWEEP_INTERVAL")
WEBHOOKS_SWEEP_AFTER = env.float("WEBHOOKS_SWEEP_AFTER", default=15.0, positive=True)
WEBHOOKS_SWEEP_BATCH = env.int("WEBHOOKS_SWEEP_BATCH", default=500, minimum=1)
WEBHOOKS_MAX_COUNTDOWN = env.float("WEBHOOKS_MAX_COUNTDOWN", default=1800.0, positive=True)
WEBHOOKS_RETENTION_DAYS = env.float("WEBHOOKS_RETENTION_DAYS", default=30.0, positive=True)
WEBHOOKS_PURGE_BATCH = env.int("WEBHOOKS_PURGE_BATCH", default=1000, minimum=1)
CELERY_TASK_ROUTES = {"webhooks.*": {"queue": WEBHOOKS_QUEUE}}
# A plain `celery -A config worker` consumes both queues (`make run`); production runs a
# worker per queue (`-Q`), so webhook deliveries never take a slot from saga steps.
CELERY_TASK_QUEUES = [
    Queue(name, Exchange(name, type="direct"), routing_key=name)
    for name in (CELERY_TASK_DEFAULT_QUEUE, WEBHOOKS_QUEUE)
]
CELERY_TASK_ANNOTATIONS["webhooks.deliver"] = {
    "soft_time_limit": WEBHOOKS_TASK_BUDGET + 2 * (WEBHOOKS_CONNECT_TIMEOUT + WEBHOOKS_TIMEOUT),
    "time_limit": WEBHOOKS_TASK_BUDGET + 2 * (WEBHOOKS_CONNECT_TIMEOUT + WEBHOOKS_TIMEOUT) + 5,
}

# Idempotency records of POST /orders/ are kept at least this long.
IDEMPOTENCY_KEY_TTL_HOURS = env.int("IDEMPOTENCY_KEY_TTL_HOURS", default=24)
if IDEMPOTENCY_KEY_TTL_HOURS < 24:
    # Clients are promised a day to retry under the same key; shorter, a retry after the purge
    # would place the order a second time.
    raise ImproperlyConfigured(
        f"IDEMPOTENCY_KEY_TTL_HOURS must be at least 24 (keys are kept at least a day), "
        f"not {IDEMPOTENCY_KEY_TTL_HOURS}"
    )
# `seed_demo`: the demo staff user's password (a development convenience, printed on purpose).
DEMO_STAFF_PASSWORD = env("DEMO_STAFF_PASSWORD", default="demo-staff-password")

# ---------------------------------------------------------------------------------------------
# REST API
# ---------------------------------------------------------------------------------------------
# API tokens (django-rest-knox): stored as SHA-512 digests, valid this many days unless
# `issue_token --expires-days N` says otherwise.
API_TOKEN_TTL_DAYS = env.int("API_TOKEN_TTL_DAYS", default=90, minimum=1)
REST_KNOX = {
    "TOKEN_TTL": timedelta(days=API_TOKEN_TTL_DAYS),
    "AUTH_HEADER_PREFIX": "Token",
    "AUTO_REFRESH": False,
}
# Rate limits (accounts/throttling.py), "N/s|min|hour|day"; empty: no limit. Counted in Redis
# (a Redis cache, below) or in the database, so they hold across web processes and hosts.
API_RATE_LIMIT = env("API_RATE_LIMIT", default="1200/min")  # per user, every API route
API_RATE_LIMIT_ORDERS = env("API_RATE_LIMIT_ORDERS", default="60/min")  # per user, POST /orders/
# Per client address (IPv6: per /64), requests without valid credentials (anonymous, failed
# token attempts).
API_RATE_LIMIT_ANON = env("API_RATE_LIMIT_ANON", default="120/min")
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.tokens.TokenAuthentication",
        "accounts.tokens.SessionAuthentication",
        "accounts.tokens.AnonymousRateLimit",
    ],
    # None: the authentication classes charge the rate limits (accounts.throttling), as DRF
    # checks permissions before throttles and a throttle never saw a request refused there.
    "DEFAULT_THROTTLE_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    # One JSON error shape for every 4xx: {"code", "detail", "fields"} (config/api_errors.py).
    "EXCEPTION_HANDLER": "config.api_errors.exception_handler",
    # JSON only, size-bounded; never a 500 for a body that cannot be read.
    "DEFAULT_PARSER_CLASSES": ["config.api_parsers.JSONParser"],
}
SPECTACULAR_SETTINGS = {
    "TITLE": "sagarunner API",
    "DESCRIPTION": "Orders that cross payments, inventory and shipping, run as sagas.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI's files come from the installed sidecar package, not a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # The ways to authenticate (accounts.tokens.AnonymousRateLimit only counts anonymous calls).
    "AUTHENTICATION_WHITELIST": [
        "accounts.tokens.TokenAuthentication",
        "accounts.tokens.SessionAuthentication",
    ],
    # Every operation documents the shared error responses with the one error schema.
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "config.api.add_plain_views",
        "config.api.add_error_responses",
        # Request bodies take only the names they list (config.api.ClosedInput).
        "config.api.close_request_bodies",
    ],
    "ENUM_NAME_OVERRIDES": {
        "OrderStatusEnum": "orders.representation.ORDER_STATUS_CHOICES",
        "ShipmentStatusEnum": "shipping.models.ShipmentStatus",
        "StepStatusEnum": "sagas.models.StepStatus",
    },
}

# ---------------------------------------------------------------------------------------------
# Metrics: prometheus_client multiprocess mode, so counters from every worker process and
# gunicorn worker add up in /metrics. The directory must be known before prometheus_client is
# imported, which is why it is exported here.
# ---------------------------------------------------------------------------------------------
PROMETHEUS_MULTIPROC_DIR = env("PROMETHEUS_MULTIPROC_DIR", default=str(VAR_DIR / "metrics"))
# Seconds a web process reuses its last /metrics render (open to anyone; each render counts the
# sagas per state in the database). 0: render every time.
METRICS_REUSE_SECONDS = env.float("METRICS_REUSE_SECONDS", default=2.0, minimum=0)
Path(PROMETHEUS_MULTIPROC_DIR).mkdir(parents=True, exist_ok=True)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = PROMETHEUS_MULTIPROC_DIR
# A Celery worker with a metrics directory of its own (a container) serves its counters on
# this port at /metrics (0: off; on one host, web's /metrics reads the shared directory).
WORKER_METRICS_PORT = env.int("WORKER_METRICS_PORT", default=0, minimum=0)

# ---------------------------------------------------------------------------------------------
# Logging: structlog, JSON when not in a terminal, key=value in one
# ---------------------------------------------------------------------------------------------
# Any case, as operators write it (``info``); logging itself takes only upper case.
LOG_LEVEL = env("LOG_LEVEL", default="INFO").strip().upper()
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
if LOG_LEVEL not in _LOG_LEVELS:
    raise ImproperlyConfigured(
        f"LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)} (any case), not {LOG_LEVEL!r}"
    )
LOG_FORMAT = env("LOG_FORMAT", default="console" if sys.stderr.isatty() else "json")

import structlog  # noqa: E402

from config.structlog_logger import LevelFirstBoundLogger  # noqa: E402

_shared_processors: list[structlog.typing.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]
structlog.configure(
    processors=[
        *_shared_processors,
        structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
    ],
    logger_factory=structlog.stdlib.LoggerFactory(),
    # Asks the stdlib logger's level before running the processors (config/structlog_logger.py).
    wrapper_class=LevelFirstBoundLogger,
    cache_logger_on_first_use=True,
)
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {
            "()": structlog.stdlib.ProcessorFormatter,
            "processors": [
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
            "foreign_pre_chain": _shared_processors,
        },
        "console": {
            "()": structlog.stdlib.ProcessorFormatter,
            "processors": [
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.KeyValueRenderer(
                    key_order=["timestamp", "level", "event", "logger"], sort_keys=True
                ),
            ],
            "foreign_pre_chain": _shared_processors,
        },
    },
    "filters": {
        "ack_on_lost_connection": {"()": "config.log_filters.AckOnLostConnection"},
        "missed_scheduled_run": {"()": "config.log_filters.MissedScheduledRun"},
        "suspicious_request": {"()": "config.log_filters.SuspiciousRequest"},
    },
    "handlers": {
        # A request Django refuses as suspicious (django.security.*, answered 400): one
        # warning line, not an ERROR with Django's traceback (config/log_filters.py).
        "default": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["suspicious_request"],
        },
    },
    "root": {"handlers": ["default"], "level": LOG_LEVEL},
    "loggers": {
        # Django's own handlers go (its console handler printed every django.* record a
        # second time under DEBUG, as plain text with the traceback, before the JSON or
        # key=value line; mail_admins mails no one here): its records reach the root's.
        "django": {"handlers": [], "level": "INFO"},
        "django.db.backends": {"level": "INFO"},
        # A 4xx is a line of gunicorn's access log already (status, path, size, client); at
        # WARNING Django's request logger wrote every one a second time ("Not Found: /x/").
        # 5xx still arrive here as ERROR, with the traceback.
        "django.request": {"level": "ERROR"},
        "celery": {"level": LOG_LEVEL},
        # A task finishing while the broker restarts cannot ack: one warning, not a CRITICAL
        # with a traceback (config/log_filters.py says why that is harmless here).
        "celery.worker.request": {"filters": ["ack_on_lost_connection"]},
        # Beat could not hand a due task to the broker: one warning, not 8 KB of stack.
        "celery.beat": {"filters": ["missed_scheduled_run"]},
    },
}
