//! A `wasi:http@0.3.0` middleware (imports and exports `wasi:http/handler`): answers 401 to a
//! request without `authorization: Bearer <token>`, and the rest of the chain never runs;
//! forwards every other request unchanged. The token is `AUTH_TOKEN` from the environment, else
//! the one baked in at build time (see `p3_mw::DEFAULT_TOKEN`).

use p3_mw::middleware::exports::wasi::http::handler::Guest;
use p3_mw::middleware::wasi::http::handler;
use wasip3::http::types::{ErrorCode, Request, Response};

p3_mw::middleware::export!(Auth with_types_in p3_mw::middleware);

struct Auth;

impl Guest for Auth {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        if !p3_mw::authorized(&request, p3_mw::expected_token()) {
            return p3_mw::unauthorized();
        }
        handler::handle(request).await
    }
}
