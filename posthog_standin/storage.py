"""The "object storage" listener: a second origin serving export bytes at presigned URLs.

Like S3 with a presigned URL, it needs no credentials and refuses a request that also carries an
``Authorization`` header (S3: 400 InvalidArgument "Only one auth mechanism allowed"). That is what
catches clients that forward their PostHog key across the 302.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .exports import content_response, is_expired
from .middleware import ApiMiddleware
from .state import State

_ONE_AUTH = (
    "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, Signature query "
    "string parameter or the Authorization header should be specified"
)


def s3_error(status: int, code: str, message: str) -> Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    )
    return Response(body, status_code=status, media_type="application/xml")


def build_storage_app(state: State) -> ApiMiddleware:
    async def get_object(request: Request) -> Response:
        state.stats.requests_by_route["GET storage"] += 1
        if "authorization" in request.headers:
            return s3_error(400, "InvalidArgument", _ONE_AUTH)
        found = state.storage_tokens.get(request.path_params["token"])
        if found is None:
            return s3_error(404, "NoSuchKey", "The specified key does not exist.")
        export_id, expiry = found
        if state.now() > expiry:
            return s3_error(403, "AccessDenied", "Request has expired")
        rec = state.exports.get(export_id)
        if rec is None or rec.content_lost or is_expired(rec, state.now()):
            return s3_error(404, "NoSuchKey", "The specified key does not exist.")
        response = await content_response(state.seed, rec, download=False)
        disposition = request.query_params.get("response-content-disposition")
        if disposition:
            response.headers["Content-Disposition"] = disposition
        return response

    app = Starlette(routes=[Route("/exports/{token}", get_object, methods=["GET"])])
    return ApiMiddleware(app, state, server="storage")
