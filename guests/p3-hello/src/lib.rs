//! The smallest `wasi:http@0.3.0` service: answers every request with a fixed body. The p3
//! counterpart of `hello-http`, and the bench's p3 row.

use wasip3::http::types::{ErrorCode, Fields, Request, Response};
use wasip3::{wit_bindgen, wit_future, wit_stream};

wasip3::http::service::export!(Hello);

struct Hello;

const BODY: &[u8] = b"hello from a wasi:http@0.3.0 component\n";

impl wasip3::exports::http::handler::Guest for Hello {
    async fn handle(_request: Request) -> Result<Response, ErrorCode> {
        let headers = Fields::from_list(&[(
            "content-type".to_string(),
            b"text/plain; charset=utf-8".to_vec(),
        )])
        .map_err(|e| ErrorCode::InternalError(Some(format!("{e:?}"))))?;
        let (mut body_tx, body_rx) = wit_stream::new();
        let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
        drop(trailers_tx);
        let (response, _sent) = Response::new(headers, Some(body_rx), trailers_rx);
        // The body is written after `handle` returns the response head: the host reads it from
        // the stream while this task finishes.
        wit_bindgen::spawn_local(async move {
            body_tx.write_all(BODY.to_vec()).await;
        });
        Ok(response)
    }
}
