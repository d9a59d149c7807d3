"""Authentication for ``/v1``, ``/admin``, the other APIs and dialects (and ``/metrics`` if configured).

``/health``, ``/ready``, ``/openapi.yaml``, signed image files and CORS preflights need no credential. Refusals
are OpenAI-shaped errors (401 with ``WWW-Authenticate``, 403 for a non-admin on ``/admin`` and on
``/infer_api/v1/secure-route``, the inference API's admin-only check).
"""

from __future__ import annotations

from litestar.types import ASGIApp, Receive, Scope, Send

from app import metrics, telemetry
from app.api.errors import error_response
from app.auth.principals import ANONYMOUS, Authenticator
from app.errors import ApiError, PermissionDenied


def _protected(path: str, metrics_admin: bool) -> tuple[bool, bool]:
    """(needs a credential, needs an admin)."""
    if path.startswith("/admin"):
        return True, True
    if path == "/metrics":
        return metrics_admin, metrics_admin
    if path.startswith("/infer_api/") or path == "/infer_api":
        return True, path == "/infer_api/v1/secure-route"
    if path.startswith(("/custom-models/", "/hf/", "/sdapi/")):
        return True, False
    return path.startswith("/v1/") or path == "/v1", False


class AuthMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        needs_credential, needs_admin = _protected(scope["path"], state.settings.metrics_auth == "admin")
        if needs_credential:
            auth: Authenticator = state.auth
            try:
                with telemetry.span("auth") as span:
                    if await auth.anonymous():
                        principal = ANONYMOUS
                    else:
                        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
                        principal = await auth.authenticate(headers)
                    if span is not None:
                        span.set_attributes({"imagegate.principal": principal.id, "imagegate.auth": principal.kind})
                    if needs_admin and not principal.admin:
                        metrics.LIMIT_REJECTIONS.labels("admin").inc()
                        raise PermissionDenied("This route needs an admin credential.", code="admin_required")
            except ApiError as error:
                response = error_response(error, scope["path"])
                await response.to_asgi_response(app=None, request=None)(scope, receive, send)  # type: ignore[arg-type]
                return
            scope["user"] = principal
        await self.app(scope, receive, send)
