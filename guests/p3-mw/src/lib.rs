//! What edged's sample middleware guests share: bindings for the `wasi:http/middleware` world
//! (the `wasip3` crate ships only the `service` world) and the two behaviours of the samples,
//! written once so the loopback baseline (`p3-forward`) runs the same code as the composed chain.
//!
//! The world is generated from the WIT the `wasip3` crate ships (`scripts/build-guests.sh` links
//! it to `guests/.wasip3-wit`), with every interface the `wasip3` crate already binds mapped to
//! its types, so a `Request` built with `wasip3` can be handed to the imported handler.

use wasip3::http::types::{ErrorCode, Fields, Request, Response};
use wasip3::{wit_bindgen, wit_future, wit_stream};

/// The `wasi:http/middleware` world: imports `wasi:http/handler` (the next part of the chain)
/// and exports it. A guest implements `middleware::exports::wasi::http::handler::Guest` and
/// calls `p3_mw::middleware::export!(Type with_types_in p3_mw::middleware)`.
pub mod middleware {
    wit_bindgen::generate!({
        path: "../.wasip3-wit",
        world: "wasi:http/middleware@0.3.0",
        pub_export_macro: true,
        default_bindings_module: "p3_mw::middleware",
        with: {
            "wasi:http/types@0.3.0": wasip3::http::types,
            "wasi:http/client@0.3.0": wasip3::http::client,
            "wasi:random/random@0.3.0": wasip3::random::random,
            "wasi:random/insecure@0.3.0": wasip3::random::insecure,
            "wasi:random/insecure-seed@0.3.0": wasip3::random::insecure_seed,
            "wasi:cli/stdout@0.3.0": wasip3::cli::stdout,
            "wasi:cli/stderr@0.3.0": wasip3::cli::stderr,
            "wasi:cli/stdin@0.3.0": wasip3::cli::stdin,
            "wasi:cli/types@0.3.0": wasip3::cli::types,
            "wasi:clocks/monotonic-clock@0.3.0": wasip3::clocks::monotonic_clock,
            "wasi:clocks/system-clock@0.3.0": wasip3::clocks::system_clock,
            "wasi:clocks/types@0.3.0": wasip3::clocks::types,
        },
    });
}

/// The environment variable that overrides the bearer token the auth middleware accepts (a node
/// grants environment variables only to functions declared in its config).
pub const TOKEN_ENV: &str = "AUTH_TOKEN";

/// The token accepted when the environment does not name one: baked in at build time from
/// `EDGED_SAMPLE_AUTH_TOKEN`, else this sample's well-known value. Fine for a sample, not for
/// production.
pub const DEFAULT_TOKEN: &str = match option_env!("EDGED_SAMPLE_AUTH_TOKEN") {
    Some(token) => token,
    None => "edged-sample-token",
};

/// The header the header middleware adds to every response, and its value.
pub const ADDED_HEADER: (&str, &str) = ("x-edged-middleware", "header");

/// The bearer token this instance accepts. Read once per instance: the environment is fixed
/// for an instance's life, and a node reuses p3 instances across requests.
pub fn expected_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| {
        wasip3::cli::environment::get_environment()
            .into_iter()
            .find(|(k, _)| k == TOKEN_ENV)
            .map(|(_, v)| v)
            .unwrap_or_else(|| DEFAULT_TOKEN.to_string())
    })
}

/// Whether `request` carries `authorization: Bearer <token>`.
pub fn authorized(request: &Request, token: &str) -> bool {
    let expected = format!("Bearer {token}");
    request
        .get_headers()
        .get("authorization")
        .iter()
        .any(|v| v.as_slice() == expected.as_bytes())
}

/// A complete response with a small text body.
pub fn text_response(
    status: u16,
    extra_headers: &[(&str, &str)],
    body: String,
) -> Result<Response, ErrorCode> {
    let mut headers = vec![(
        "content-type".to_string(),
        b"text/plain; charset=utf-8".to_vec(),
    )];
    headers.extend(
        extra_headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())),
    );
    let headers = Fields::from_list(&headers)
        .map_err(|e| ErrorCode::InternalError(Some(format!("{e:?}"))))?;
    let (mut body_tx, body_rx) = wit_stream::new();
    let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
    drop(trailers_tx);
    let (response, _sent) = Response::new(headers, Some(body_rx), trailers_rx);
    response
        .set_status_code(status)
        .map_err(|()| ErrorCode::InternalError(Some(format!("bad status {status}"))))?;
    wit_bindgen::spawn_local(async move {
        body_tx.write_all(body.into_bytes()).await;
    });
    Ok(response)
}

/// The auth middleware's answer to a request without the right token.
pub fn unauthorized() -> Result<Response, ErrorCode> {
    text_response(
        401,
        &[("www-authenticate", "Bearer")],
        "unauthorized: send `authorization: Bearer <token>`\n".into(),
    )
}

/// `response` with [`ADDED_HEADER`] added: a new response over the same body and trailers (a
/// response's headers are immutable once it exists).
pub fn with_added_header(response: Response) -> Result<Response, ErrorCode> {
    let status = response.get_status_code();
    let mut headers = response.get_headers().copy_all();
    headers.push((
        ADDED_HEADER.0.to_string(),
        ADDED_HEADER.1.as_bytes().to_vec(),
    ));
    let (_, done_rx) = wit_future::new(|| Ok(()));
    let (body, trailers) = Response::consume_body(response, done_rx);
    let headers = Fields::from_list(&headers)
        .map_err(|e| ErrorCode::InternalError(Some(format!("{e:?}"))))?;
    let (response, _sent) = Response::new(headers, Some(body), trailers);
    response
        .set_status_code(status)
        .map_err(|()| ErrorCode::InternalError(Some(format!("bad status {status}"))))?;
    Ok(response)
}

/// Writes one line to the guest's stderr (WASI 0.3 `wasi:cli/stderr`, so the part imports
/// nothing from WASI 0.2), in a task of its own: the request does not wait for the log. Best
/// effort: a log line that cannot be written is dropped.
pub fn log_line(line: String) {
    let (mut tx, rx) = wit_stream::new();
    let done = wasip3::cli::stderr::write_via_stream(rx);
    wit_bindgen::spawn_local(async move {
        tx.write_all(line.into_bytes()).await;
        drop(tx);
        let _ = done.await;
    });
}
