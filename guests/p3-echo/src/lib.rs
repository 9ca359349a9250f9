//! A streaming echo `wasi:http@0.3.0` service: the request body goes back as the response body,
//! chunk by chunk as it arrives (the first bytes are answered before the client has sent the
//! last), with the request's `content-type` if it had one.

use wasip3::http::types::{ErrorCode, Fields, Request, Response};
use wasip3::wit_bindgen::StreamResult;
use wasip3::{wit_bindgen, wit_future, wit_stream};

wasip3::http::service::export!(Echo);

struct Echo;

impl wasip3::exports::http::handler::Guest for Echo {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let content_type = request.get_headers().get("content-type");
        let mut list = vec![("x-edged-echo".to_string(), b"streaming".to_vec())];
        if let Some(value) = content_type.into_iter().next() {
            list.push(("content-type".to_string(), value));
        }
        let headers =
            Fields::from_list(&list).map_err(|e| ErrorCode::InternalError(Some(format!("{e:?}"))))?;

        let (request_done_tx, request_done_rx) = wit_future::new(|| Ok(()));
        let (mut body_in, _trailers_in) = Request::consume_body(request, request_done_rx);
        let (mut body_out, body_out_rx) = wit_stream::new();
        let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
        let (response, _sent) = Response::new(headers, Some(body_out_rx), trailers_rx);

        wit_bindgen::spawn_local(async move {
            let mut chunk = Vec::with_capacity(16 << 10);
            loop {
                let (status, buf) = body_in.read(chunk).await;
                chunk = buf;
                match status {
                    StreamResult::Complete(_) => {
                        chunk = body_out.write_all(chunk).await;
                        chunk.clear();
                    }
                    StreamResult::Dropped | StreamResult::Cancelled => break,
                }
            }
            drop(body_out);
            let _ = request_done_tx.write(Ok(())).await;
            let _ = trailers_tx.write(Ok(None)).await;
        });
        Ok(response)
    }
}
