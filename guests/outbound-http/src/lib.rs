//! A `wasi:http/proxy` component that makes one outbound request, for edged's tests of the
//! outbound-host allowlist. `GET /?url=http://host:port/path` fetches the URL and answers
//! `upstream <status>: <body>`, or `denied: <error code>` when the host refuses the request.

use std::io::{Read as _, Write as _};

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingRequest, OutgoingResponse,
    ResponseOutparam, Scheme,
};

struct Outbound;

fn fetch(url: &str) -> Result<String, String> {
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let request = OutgoingRequest::new(Fields::new());
    request.set_method(&Method::Get).map_err(|_| "method")?;
    request.set_scheme(Some(&Scheme::Http)).map_err(|_| "scheme")?;
    request.set_authority(Some(authority)).map_err(|_| "authority")?;
    request.set_path_with_query(Some(path)).map_err(|_| "path")?;
    let future = outgoing_handler::handle(request, None).map_err(|e| format!("denied: {e:?}"))?;
    future.subscribe().block();
    let response = future
        .get()
        .ok_or("no response")?
        .map_err(|_| "response taken twice")?
        .map_err(|e| format!("denied: {e:?}"))?;
    let status = response.status();
    let body = response.consume().map_err(|_| "body")?;
    let mut text = String::new();
    let _ = body.stream().map_err(|_| "stream")?.read_to_string(&mut text);
    Ok(format!("upstream {status}: {text}"))
}

impl wasip2::exports::http::incoming_handler::Guest for Outbound {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let query = request.path_with_query().unwrap_or_default();
        let url = query
            .split_once("url=")
            .map(|(_, u)| u.to_string())
            .unwrap_or_default();
        let text = fetch(&url).unwrap_or_else(|e| e);
        let response = OutgoingResponse::new(Fields::new());
        let body = response.body().expect("body is taken once");
        ResponseOutparam::set(response_out, Ok(response));
        let mut out = body.write().expect("stream is taken once");
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
        drop(out);
        let _ = OutgoingBody::finish(body, None);
    }
}

wasip2::http::proxy::export!(Outbound);
