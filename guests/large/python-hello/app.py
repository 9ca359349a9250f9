"""The Python twin of guests/hello-http: a wasi:http/proxy handler that answers every request
with a greeting and the path it was asked for. Built by scripts/build-large-guests.sh with
componentize-py; its point is the size of the interpreter behind it, not what it does."""

from wit_world import exports
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)
from componentize_py_types import Ok


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        path = request.path_with_query() or ""
        response = OutgoingResponse(Fields.from_list([("content-type", b"text/plain")]))
        body = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        with body.write() as out:
            out.blocking_write_and_flush(f"hello from edged: {path}\n".encode())
        OutgoingBody.finish(body, None)
