//! A `wasi:http@0.3.0` service with expensive start-up work that Wizer can do at build time: the
//! p3 counterpart of `init-heavy-http` (same table, same answers).
//!
//! `wizer-initialize` is exported at the component level from a second, tiny WIT world, as in
//! `init-heavy-http`. It may not call any import: Wizer runs it with every import trapping.
//!
//! Request: `GET /?key=N`. Response: `table[N] = <hex>`.

use std::sync::OnceLock;

use wasip3::http::types::{ErrorCode, Fields, Request, Response};
use wasip3::{wit_bindgen, wit_future, wit_stream};

mod preinit {
    wit_bindgen::generate!({
        inline: "
            package edged:guest;
            world preinit {
                export wizer-initialize: func();
            }
        ",
    });
}

const TABLE_LEN: usize = 1 << 19;
const ROUNDS_PER_ENTRY: u32 = 48;

static TABLE: OnceLock<Vec<u64>> = OnceLock::new();

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn build_table() -> Vec<u64> {
    let mut state = 0x5EED_u64;
    (0..TABLE_LEN as u64)
        .map(|i| {
            for _ in 0..ROUNDS_PER_ENTRY {
                state = splitmix64(state ^ i);
            }
            state
        })
        .collect()
}

fn table() -> &'static [u64] {
    TABLE.get_or_init(build_table)
}

struct Component;

impl preinit::Guest for Component {
    fn wizer_initialize() {
        table();
    }
}

preinit::export!(Component with_types_in preinit);
wasip3::http::service::export!(Component);

impl wasip3::exports::http::handler::Guest for Component {
    async fn handle(request: Request) -> Result<Response, ErrorCode> {
        let path = request.get_path_with_query().unwrap_or_default();
        let key = path
            .split_once("key=")
            .and_then(|(_, k)| k.split('&').next())
            .and_then(|k| k.parse::<usize>().ok())
            .unwrap_or(0)
            % TABLE_LEN;
        let body = format!("table[{key}] = {:016x}\n", table()[key]);
        let headers = Fields::from_list(&[("content-type".to_string(), b"text/plain".to_vec())])
            .map_err(|e| ErrorCode::InternalError(Some(format!("{e:?}"))))?;
        let (mut body_tx, body_rx) = wit_stream::new();
        let (trailers_tx, trailers_rx) = wit_future::new(|| Ok(None));
        drop(trailers_tx);
        let (response, _sent) = Response::new(headers, Some(body_rx), trailers_rx);
        wit_bindgen::spawn_local(async move {
            body_tx.write_all(body.into_bytes()).await;
        });
        Ok(response)
    }
}
