//! A `wasi:http@0.3.0` middleware that does nothing: hands each request to the next part and
//! its response back. The bench composes two in front of the hello to measure what a hop of a
//! chain costs by itself, apart from what the sample middlewares do.

use p3_mw::middleware::exports::wasi::http::handler::Guest;
use p3_mw::middleware::wasi::http::handler;
use wasip3::http::types::{ErrorCode, Request, Response};

p3_mw::middleware::export!(Pass with_types_in p3_mw::middleware);

struct Pass;

impl Guest for Pass {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        handler::handle(request).await
    }
}
