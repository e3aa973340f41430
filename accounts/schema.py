"""The OpenAPI security schemes of the API's tokens (``Authorization: Token <token>``) and of
the session, whose class is drf-spectacular's known one's subclass (``accounts.tokens``)."""

from drf_spectacular.authentication import SessionScheme as SpectacularSessionScheme
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.plumbing import build_bearer_security_scheme_object


class TokenScheme(OpenApiAuthenticationExtension):
    target_class = "accounts.tokens.TokenAuthentication"
    name = "tokenAuth"

    def get_security_definition(self, auto_schema):
        return build_bearer_security_scheme_object(
            header_name="Authorization", token_prefix="Token"
        )


class SessionScheme(SpectacularSessionScheme):
    target_class = "accounts.tokens.SessionAuthentication"
