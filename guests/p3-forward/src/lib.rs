//! The bench's "microservices" baseline for a middleware chain: a `wasi:http@0.3.0` service that
//! does what one of the sample middlewares does, but reaches the next part over loopback HTTP
//! (`wasi:http/client`) instead of through an imported handler. The function's environment
//! says which part it plays and where the next one is:
//!
//! - `FORWARD_ROLE` — `auth` (the `p3-auth` check) or `header` (the `p3-header` log line and
//!   response header);
//! - `FORWARD_TO` — `http://host:port/path` of the next function (the host must be in the
//!   function's `outbound_hosts`).

use wasip3::http::types::{ErrorCode, Fields, Request, Response, Scheme};
use wasip3::wit_future;

wasip3::http::service::export!(Forward);

struct Forward;

fn env(name: &str) -> Option<String> {
    wasip3::cli::environment::get_environment()
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

fn internal(reason: impl Into<String>) -> ErrorCode {
    ErrorCode::InternalError(Some(reason.into()))
}

/// `request` re-addressed to `url` (`http://authority/path`), same method, headers and body.
fn readdress(request: Request, url: &str) -> Result<Request, ErrorCode> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| internal(format!("FORWARD_TO {url:?} is not an http:// URL")))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let method = request.get_method();
    let headers: Vec<(String, Vec<u8>)> = request
        .get_headers()
        .copy_all()
        .into_iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("host"))
        .collect();
    let (_, done_rx) = wit_future::new(|| Ok(()));
    let (body, trailers) = Request::consume_body(request, done_rx);
    let headers = Fields::from_list(&headers).map_err(|e| internal(format!("{e:?}")))?;
    let (outgoing, _sent) = Request::new(headers, Some(body), trailers, None);
    outgoing
        .set_method(&method)
        .map_err(|()| internal("bad method"))?;
    outgoing
        .set_scheme(Some(&Scheme::Http))
        .map_err(|()| internal("bad scheme"))?;
    outgoing
        .set_authority(Some(authority))
        .map_err(|()| internal(format!("bad authority {authority:?}")))?;
    outgoing
        .set_path_with_query(Some(path))
        .map_err(|()| internal(format!("bad path {path:?}")))?;
    Ok(outgoing)
}

impl wasip3::exports::http::handler::Guest for Forward {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let role = env("FORWARD_ROLE").unwrap_or_default();
        let next = env("FORWARD_TO").ok_or_else(|| internal("FORWARD_TO is not set"))?;
        match role.as_str() {
            "auth" => {
                if !p3_mw::authorized(&request, p3_mw::expected_token()) {
                    return p3_mw::unauthorized();
                }
                wasip3::http::client::send(readdress(request, &next)?).await
            }
            "header" => {
                let path = request.get_path_with_query().unwrap_or_default();
                p3_mw::log_line(format!(
                    "header forwarder: {:?} {path}\n",
                    request.get_method()
                ));
                let response = wasip3::http::client::send(readdress(request, &next)?).await?;
                p3_mw::with_added_header(response)
            }
            other => Err(internal(format!(
                "FORWARD_ROLE {other:?} is neither `auth` nor `header`"
            ))),
        }
    }
}
