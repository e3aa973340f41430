"""The rate limits' counts when the cache is not Redis; nothing else: API tokens are
django-rest-knox's, login failures django-axes'.

The app being one with models is also what has Django send it ``post_migrate``: that is when
the database cache's table is made (``accounts.apps``).
"""

from __future__ import annotations

from django.db import models

#: The longest counter a row holds as it is (a longer one is counted under its digest).
COUNTER_MAX_LENGTH = 200


class RateLimitCount(models.Model):
    """How many requests one rate limit has counted for one client in one fixed window
    (``accounts.throttling``), for a cache that is not Redis (``CACHE_URL=db://`` or
    ``file://``).

    Each request adds one with a single ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING`` on
    the unique (window end, counter) pair, so concurrent requests never lose a count; a row
    is never culled or expired early, as a cache entry is, and once its window has ended it is
    dead weight that the periodic purge deletes (``accounts.purge_rate_limit_counts``). The
    unique index leads with the window's end, so that purge is a range of the same index.
    """

    #: The limit, the client and the window's length, e.g. ``user:42:60`` or
    #: ``anon:203.0.113.7:86400`` (a digest when longer than the column).
    counter = models.CharField(max_length=COUNTER_MAX_LENGTH)
    #: When the window ends: the count no longer applies from then on.
    window_end = models.DateTimeField()
    #: The requests counted in the window (above the limit too: refused ones count).
    hits = models.BigIntegerField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["window_end", "counter"], name="accounts_ratelimit_one_count_per_window"
            )
        ]

    def __str__(self) -> str:
        return f"{self.counter} until {self.window_end:%Y-%m-%d %H:%M:%S}: {self.hits}"
