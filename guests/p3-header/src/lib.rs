//! A `wasi:http@0.3.0` middleware (imports and exports `wasi:http/handler`): logs each
//! request's method and path to stderr, forwards it unchanged, and adds
//! `x-edged-middleware: header` to the response on its way back.

use p3_mw::middleware::exports::wasi::http::handler::Guest;
use p3_mw::middleware::wasi::http::handler;
use wasip3::http::types::{ErrorCode, Request, Response};

p3_mw::middleware::export!(Header with_types_in p3_mw::middleware);

struct Header;

impl Guest for Header {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let path = request.get_path_with_query().unwrap_or_default();
        p3_mw::log_line(format!(
            "header middleware: {:?} {path}\n",
            request.get_method()
        ));
        let response = handler::handle(request).await?;
        p3_mw::with_added_header(response)
    }
}
