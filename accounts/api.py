"""``/api/v1/auth/token/``: a client looks at, or revokes, the token it is calling with."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema
from knox.models import AuthToken
from rest_framework import permissions, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.tokens import token_label, token_revoke
from config.api import BodyReadFirst, ErrorSerializer
from config.api_errors import ApiError


class CurrentTokenSerializer(serializers.Serializer):
    user = serializers.CharField()
    token = serializers.CharField(help_text="The token's first characters, to tell it apart.")
    created = serializers.DateTimeField()
    expiry = serializers.DateTimeField(allow_null=True)


def _current_token(request: Request) -> AuthToken:
    if not isinstance(request.auth, AuthToken):
        raise ApiError(
            "This request is not authenticated with an API token "
            "(send Authorization: Token <token>).",
            code="no_token",
            status_code=400,
        )
    return request.auth


class CurrentTokenView(BodyReadFirst, APIView):
    permission_classes = [permissions.IsAuthenticated]
    takes_no_fields = {"delete": "a revocation"}

    @extend_schema(
        summary="The token this request is authenticated with: when it expires",
        description="For a client calling with an API token: whose it is, its first "
        "characters (to tell it apart from the user's others), when it was issued and when it "
        "expires (`null`: never). A call signed in another way (a session) is `400 no_token`.",
        tags=["auth"],
        responses={200: CurrentTokenSerializer, 400: ErrorSerializer},
    )
    def get(self, request: Request) -> Response:
        token = _current_token(request)
        return Response(
            CurrentTokenSerializer(
                {
                    "user": request.user.get_username(),
                    "token": token_label(token),
                    "created": token.created,
                    "expiry": token.expiry,
                }
            ).data
        )

    @extend_schema(
        summary="Revoke the token this request is authenticated with",
        description="At once and for good; the user's other tokens stay valid.",
        tags=["auth"],
        responses={
            204: OpenApiResponse(description="Revoked."),
            400: OpenApiResponse(ErrorSerializer, description="Not a token-authenticated call."),
        },
    )
    def delete(self, request: Request) -> Response:
        token_revoke(token=_current_token(request), actor=request.user, reason="by its owner")
        return Response(status=status.HTTP_204_NO_CONTENT)
