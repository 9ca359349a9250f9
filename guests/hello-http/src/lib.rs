//! The smallest useful `wasi:http/proxy` component: answers every request with a greeting and
//! the path it was asked for. Runs unchanged under edged, `wasmtime serve` and Spin.
//! `?repeat=N` writes the greeting N times, one write each (a large, streamed body for tests).

use std::io::Write as _;

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Hello;

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let headers = Fields::from_list(&[(
            "content-type".to_string(),
            b"text/plain".to_vec(),
        )])
        .expect("static header is valid");
        let response = OutgoingResponse::new(headers);
        let body = response.body().expect("body is taken once");
        ResponseOutparam::set(response_out, Ok(response));
        let repeat = path
            .split_once("repeat=")
            .and_then(|(_, n)| n.split('&').next()?.parse::<usize>().ok())
            .unwrap_or(1);
        let mut out = body.write().expect("stream is taken once");
        for _ in 0..repeat {
            let _ = write!(out, "hello from edged: {path}\n");
        }
        let _ = out.flush();
        drop(out);
        let _ = OutgoingBody::finish(body, None);
    }
}

wasip2::http::proxy::export!(Hello);
