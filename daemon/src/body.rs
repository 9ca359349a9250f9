//! HTTP bodies as the node handles them, in one place: the response body type every path
//! returns, the node's own plain-text answers, request bodies streamed to a guest under the
//! function's cap and the node's body timeout, response bodies that carry a request's guard
//! until the guest is done writing, and coalescing a response that finishes at once into one
//! piece with a Content-Length.
//!
//! Nothing here knows guests or functions: it sits at the bottom of the daemon's layers so that
//! the ingress, the serving core and every runtime share the same types.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};

/// The error type of every body the node streams.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// What every serving path answers with.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body of bytes already in memory.
pub fn full_body(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A plain-text response the node writes itself (refusals, faults, health answers).
pub fn text_response(status: StatusCode, body: &str) -> Response<ResponseBody> {
    let mut response = Response::new(full_body(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A request body read as the guest asks for it: capped at the function's limit, and cut when
/// the whole body has not arrived within the node's body timeout (a trickling client must not
/// hold an instance). Its errors are `wasi:http`'s, so a guest reading it sees what went wrong;
/// [`RequestBodyError::of`] tells the node's own paths which refusal it was.
pub struct StreamedBody<B> {
    inner: http_body_util::Limited<B>,
    limit: usize,
    deadline: Pin<Box<tokio::time::Sleep>>,
    refusal: BodyRefusal,
}

impl<B> StreamedBody<B> {
    pub fn new(inner: B, limit: usize, timeout: Duration) -> StreamedBody<B> {
        StreamedBody {
            inner: http_body_util::Limited::new(inner, limit),
            limit,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            refusal: BodyRefusal::default(),
        }
    }

    /// Set once the body is over its cap or late: the response to it must not end as a success.
    pub fn refusal(&self) -> BodyRefusal {
        self.refusal.clone()
    }
}

/// Whether a request body was refused (over its cap, or not in within the body timeout) while a
/// guest was reading it. A guest may already have answered by then (a streaming echo), so the
/// node makes sure that answer does not end like a complete response (see [`CutOnRefusal`]).
#[derive(Clone, Default)]
pub struct BodyRefusal(Arc<OnceLock<RequestBodyError>>);

impl BodyRefusal {
    fn set(&self, error: RequestBodyError) {
        let _ = self.0.set(error);
    }

    pub fn get(&self) -> Option<&RequestBodyError> {
        self.0.get()
    }
}

/// A response body that fails as soon as its request's body was refused, so hyper closes the
/// connection instead of ending the response: the client sees a broken response, never a
/// complete success built on a cut request.
pub struct CutOnRefusal<B> {
    body: B,
    refusal: BodyRefusal,
}

impl<B> CutOnRefusal<B> {
    pub fn new(body: B, refusal: BodyRefusal) -> CutOnRefusal<B> {
        CutOnRefusal { body, refusal }
    }
}

impl<B> Body for CutOnRefusal<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let cut = |refusal: &RequestBodyError| -> BoxError {
            format!("the request body was refused ({refusal:?}); response cut").into()
        };
        if let Some(refusal) = self.refusal.get() {
            return Poll::Ready(Some(Err(cut(refusal))));
        }
        match Pin::new(&mut self.body).poll_frame(cx) {
            // The guest ended its answer: a refusal by then still means the answer is not whole.
            Poll::Ready(None) => match self.refusal.get() {
                Some(refusal) => Poll::Ready(Some(Err(cut(refusal)))),
                None => Poll::Ready(None),
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.refusal.get().is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl<B> Body for StreamedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.refusal.set(RequestBodyError::Timeout);
            return Poll::Ready(Some(Err(wasmtime_wasi_http::Error::ConnectionReadTimeout)));
        }
        let limit = self.limit as u64;
        let refusal = self.refusal.clone();
        Pin::new(&mut self.inner).poll_frame(cx).map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                refusal.set(RequestBodyError::TooLarge);
                wasmtime_wasi_http::Error::HttpRequestBodySize(Some(limit))
            } else {
                tracing::debug!(error = %e, "request body failed");
                wasmtime_wasi_http::Error::ConnectionTerminated
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

/// Why a [`StreamedBody`] could not be read whole, for the paths that collect it before the
/// guest runs (they answer the client themselves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestBodyError {
    /// Not all of it arrived within the body timeout.
    Timeout,
    /// Larger than the function's limit.
    TooLarge,
    /// The client's stream broke.
    Failed(String),
}

impl RequestBodyError {
    pub fn of(error: &wasmtime_wasi_http::Error) -> RequestBodyError {
        match error {
            wasmtime_wasi_http::Error::ConnectionReadTimeout => RequestBodyError::Timeout,
            wasmtime_wasi_http::Error::HttpRequestBodySize(_) => RequestBodyError::TooLarge,
            other => RequestBodyError::Failed(other.to_string()),
        }
    }
}

/// The request body every runtime is handed: streamed, capped and timed (see [`StreamedBody`]).
pub type RequestBody = wasmtime_wasi_http::WasiBody;

/// A response body carrying `guard` until the body is done or dropped: the request's permit
/// and in-flight count last as long as the guest may still be writing.
pub struct Guarded<B, G> {
    body: B,
    _guard: G,
}

impl<B, G> Guarded<B, G> {
    pub fn new(body: B, guard: G) -> Guarded<B, G> {
        Guarded {
            body,
            _guard: guard,
        }
    }
}

impl<B: Body + Unpin, G: Unpin> Body for Guarded<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Response bodies a guest finishes within [`COALESCE_WAIT`] and [`COALESCE_LIMIT`] go out in
/// one piece with a Content-Length (one write, one wake-up of the client); larger or slower
/// ones stream as the guest writes them.
pub const COALESCE_LIMIT: usize = 64 << 10;
pub const COALESCE_WAIT: Duration = Duration::from_millis(1);

/// The start of a response body, read within the coalescing limits.
pub struct BodyPrefix {
    frames: VecDeque<Frame<Bytes>>,
    buffered: usize,
    /// The frames are the whole body.
    complete: bool,
}

/// Reads the start of `body` until it ends, passes [`COALESCE_LIMIT`] bytes, meets trailers
/// (they need the chunked encoding) or [`COALESCE_WAIT`] is up. Meanwhile `alongside` is polled
/// until it ends: the inline p2 path drives its guest there, which writes the body (the reused
/// path passes `std::future::pending()`: its guest runs on its own worker).
pub async fn read_prefix<B>(
    body: &mut B,
    alongside: impl Future<Output = ()>,
) -> Result<BodyPrefix, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut frames = VecDeque::new();
    let mut buffered = 0usize;
    let wait = tokio::time::sleep(COALESCE_WAIT);
    tokio::pin!(wait, alongside);
    let mut alongside_ended = false;
    let complete = loop {
        if buffered > COALESCE_LIMIT {
            break false;
        }
        let frame = tokio::select! {
            biased;
            frame = body.frame() => frame,
            () = &mut alongside, if !alongside_ended => {
                alongside_ended = true;
                continue;
            }
            () = &mut wait => break false,
        };
        match frame {
            None => break true,
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    buffered += data.len();
                }
                let trailers = frame.is_trailers();
                frames.push_back(frame);
                if trailers {
                    break false;
                }
            }
            Some(Err(e)) => return Err(e),
        }
    };
    Ok(BodyPrefix {
        frames,
        buffered,
        complete,
    })
}

impl BodyPrefix {
    /// The response body: the prefix in one piece (so hyper sends a Content-Length) when it is
    /// the whole body, else the prefix followed by the rest of `rest`.
    pub fn then<B>(self, rest: B) -> ResponseBody
    where
        B: Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: Into<BoxError>,
    {
        if self.complete {
            let mut bytes = bytes::BytesMut::with_capacity(self.buffered);
            for frame in self.frames {
                if let Ok(data) = frame.into_data() {
                    bytes.extend_from_slice(&data);
                }
            }
            return full_body(bytes.freeze());
        }
        PrefixedBody {
            prefix: self.frames,
            rest: rest.map_err(Into::into),
        }
        .boxed_unsync()
    }
}

/// Frames already read from a body, then the rest of it.
struct PrefixedBody<B> {
    prefix: VecDeque<Frame<Bytes>>,
    rest: B,
}

impl<B> Body for PrefixedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(frame) = self.prefix.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_that_ends_at_once_is_one_piece_with_its_length() {
        let mut body = Full::new(Bytes::from_static(b"hello")).map_err(|never| match never {});
        let prefix = read_prefix(&mut body, std::future::pending())
            .await
            .unwrap();
        let whole = prefix.then(body);
        assert_eq!(whole.size_hint().exact(), Some(5));
        assert_eq!(whole.collect().await.unwrap().to_bytes(), "hello");
    }

    #[tokio::test]
    async fn a_streamed_body_over_its_cap_is_refused_as_too_large() {
        let body = Full::new(Bytes::from(vec![0u8; 100]));
        let streamed = StreamedBody::new(body, 10, Duration::from_secs(5));
        let Err(error) = streamed.collect().await else {
            panic!("a body over its cap was read whole")
        };
        assert_eq!(RequestBodyError::of(&error), RequestBodyError::TooLarge);
    }

    #[tokio::test]
    async fn an_answer_to_a_refused_body_never_ends_as_a_success() {
        let streamed = StreamedBody::new(
            Full::new(Bytes::from(vec![0u8; 100])),
            10,
            Duration::from_secs(5),
        );
        let refusal = streamed.refusal();
        assert!(refusal.get().is_none());
        // The guest answered before it read the body...
        let answer = CutOnRefusal::new(full_body("echo"), refusal.clone());
        // ...then read past the cap.
        assert!(streamed.collect().await.is_err());
        assert_eq!(refusal.get(), Some(&RequestBodyError::TooLarge));
        assert!(answer.collect().await.is_err(), "the answer must be cut");
        // An answer to a body that was not refused is untouched.
        let fine = CutOnRefusal::new(full_body("ok"), BodyRefusal::default());
        assert_eq!(fine.collect().await.unwrap().to_bytes(), "ok");
    }
}
