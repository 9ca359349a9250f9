//! WASI p1 commands, CGI-style: a fresh instance per request runs `_start` with the request's
//! CGI/1.1 meta-variables (RFC 3875) in its environment and its body on stdin; what it writes
//! to stdout is the response (an optional header block, then the body).

use std::time::Instant;

use bytes::Bytes;
use edged_node_config::InstancePolicy;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use wasmtime::InstancePre;
use wasmtime_wasi::I32Exit;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};

use super::setup::{GuestSetup, fresh_store};
use crate::body::{ResponseBody, full_body};
use crate::fault::Fault;
use crate::sandbox::{GuestState, wasi_builder};

/// Largest CGI response a p1 guest may write to stdout.
const MAX_CGI_OUTPUT: usize = 16 << 20;
/// Guest stderr kept for the log line of a fault.
const MAX_STDERR: usize = 4 << 10;

/// A p1 command's runtime: its module, ready to instantiate.
pub struct Command {
    pre: InstancePre<GuestState>,
    setup: GuestSetup,
    pub(super) policy: InstancePolicy,
}

impl Command {
    pub fn new(pre: InstancePre<GuestState>, setup: GuestSetup, policy: InstancePolicy) -> Command {
        Command { pre, setup, policy }
    }

    /// Runs the command for `request` (body already collected).
    pub async fn handle(&self, request: Request<Bytes>) -> Result<Response<ResponseBody>, Fault> {
        let config = &self.setup.config;
        let limits = config.limits;
        let stdout = MemoryOutputPipe::new(MAX_CGI_OUTPUT);
        let stderr = MemoryOutputPipe::new(MAX_STDERR);
        let mut builder = wasi_builder(config).map_err(|e| Fault::Host(format!("{e:#}")))?;
        for (key, value) in cgi_environment(&config.route, &request) {
            builder.env(key, value);
        }
        builder
            .stdin(MemoryInputPipe::new(request.into_body()))
            .stdout(stdout.clone())
            .stderr(stderr.clone());
        let state = GuestState::p1(builder.build_p1(), limits.memory_bytes);
        let mut store = fresh_store(&self.setup.engine, state, limits.timeout);

        let started = Instant::now();
        let result = async {
            let instance = self.pre.instantiate_async(&mut store).await?;
            self.setup.instance_created(started.elapsed());
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
            start.call_async(&mut store, ()).await
        }
        .await;
        drop(store);
        match result {
            Ok(()) => {}
            Err(e) if e.downcast_ref::<I32Exit>().is_some_and(|exit| exit.0 == 0) => {}
            Err(e) => {
                self.setup.output.failed_command_stderr(&stderr.contents());
                return Err(Fault::classify(e, limits.timeout));
            }
        }
        Ok(parse_cgi_output(stdout.contents()))
    }

    /// See [`super::Runtime::instantiate_once`].
    pub async fn instantiate_once(&self) -> Result<(), Fault> {
        let config = &self.setup.config;
        let limits = config.limits;
        let ctx = wasi_builder(config)
            .map_err(|e| Fault::Host(format!("{e:#}")))?
            .build_p1();
        let mut store = fresh_store(
            &self.setup.engine,
            GuestState::p1(ctx, limits.memory_bytes),
            limits.timeout,
        );
        self.pre
            .instantiate_async(&mut store)
            .await
            .map(drop)
            .map_err(|e| Fault::classify(e, limits.timeout))
    }
}

/// CGI/1.1 meta-variables (RFC 3875) for `request` routed by `route`.
fn cgi_environment(route: &str, request: &Request<Bytes>) -> Vec<(String, String)> {
    let uri = request.uri();
    let path = uri.path();
    let script = route.trim_end_matches('/');
    let mut env = vec![
        ("GATEWAY_INTERFACE".into(), "CGI/1.1".into()),
        (
            "SERVER_SOFTWARE".into(),
            concat!("edged/", env!("CARGO_PKG_VERSION")).into(),
        ),
        ("SERVER_PROTOCOL".into(), format!("{:?}", request.version())),
        ("REQUEST_METHOD".into(), request.method().to_string()),
        (
            "REQUEST_URI".into(),
            uri.path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
        ),
        ("SCRIPT_NAME".into(), script.to_string()),
        (
            "PATH_INFO".into(),
            path.strip_prefix(script).unwrap_or(path).to_string(),
        ),
        (
            "QUERY_STRING".into(),
            uri.query().unwrap_or_default().to_string(),
        ),
        ("CONTENT_LENGTH".into(), request.body().len().to_string()),
    ];
    for (name, value) in request.headers() {
        let Ok(value) = value.to_str() else { continue };
        if name == http::header::CONTENT_TYPE {
            env.push(("CONTENT_TYPE".into(), value.to_string()));
            continue;
        }
        let key = format!(
            "HTTP_{}",
            name.as_str().to_ascii_uppercase().replace('-', "_")
        );
        env.push((key, value.to_string()));
    }
    env
}

/// Splits CGI output into status, headers and body. Output without a header block is all body.
fn parse_cgi_output(output: Bytes) -> Response<ResponseBody> {
    let split = find_header_end(&output);
    let mut status = StatusCode::OK;
    let mut headers = HeaderMap::new();
    let body = match split {
        Some((head_end, body_start)) => {
            let head = String::from_utf8_lossy(&output[..head_end]).into_owned();
            let mut parsed = Vec::new();
            let mut valid = true;
            for line in head.lines().filter(|l| !l.is_empty()) {
                match line.split_once(':') {
                    Some((name, value)) => {
                        parsed.push((name.trim().to_string(), value.trim().to_string()))
                    }
                    None => valid = false,
                }
            }
            if valid && !parsed.is_empty() {
                for (name, value) in parsed {
                    if name.eq_ignore_ascii_case("status") {
                        let code = value.split_whitespace().next().unwrap_or_default();
                        status = code
                            .parse::<u16>()
                            .ok()
                            .and_then(|c| StatusCode::from_u16(c).ok())
                            .unwrap_or(StatusCode::BAD_GATEWAY);
                    } else if let (Ok(n), Ok(v)) = (
                        HeaderName::try_from(name.as_str()),
                        HeaderValue::try_from(value.as_str()),
                    ) {
                        headers.append(n, v);
                    }
                }
                output.slice(body_start..)
            } else {
                output
            }
        }
        None => output,
    };
    if !headers.contains_key(http::header::CONTENT_TYPE) {
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
    }
    let mut response = Response::new(full_body(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// End of the header block and start of the body: `\r\n\r\n` or `\n\n`.
fn find_header_end(output: &[u8]) -> Option<(usize, usize)> {
    let crlf = output
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4));
    let lf = output
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2));
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn cgi_output_with_status_and_headers() {
        let out = Bytes::from_static(
            b"Status: 404 Not Found\r\nContent-Type: text/plain\r\nX-A: b\r\n\r\nmissing",
        );
        let response = parse_cgi_output(out);
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.headers()["x-a"], "b");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "missing");
    }

    #[tokio::test]
    async fn cgi_output_without_headers_is_body() {
        let response = parse_cgi_output(Bytes::from_static(b"just text\n\nmore"));
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "just text\n\nmore");
    }
}
