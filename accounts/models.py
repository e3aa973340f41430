"""No models of its own: API tokens are django-rest-knox's, login failures django-axes'.

The module exists so that Django counts this app among those with models, and sends it
``post_migrate``: that is when the database cache's table is made (``accounts.apps``).
"""
