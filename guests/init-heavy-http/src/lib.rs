//! A `wasi:http/proxy` component with expensive start-up work that Wizer can do at build time.
//!
//! Recipe for pre-initializing a component: export a `func()` named `wizer-initialize` at the
//! *component* level (not only from the core module). Here a second, tiny WIT world declares
//! that export; wit-bindgen embeds it beside the `wasi:http/proxy` world from `wasip2`, and
//! `wasm-component-ld` merges the two into one component. The init function may not call any
//! import — no clocks, random or I/O — because Wizer runs it with every import trapping.
//!
//! Request: `GET /?key=N`. Response: `table[N] = <hex>`.

use std::io::Write as _;
use std::sync::OnceLock;

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

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

struct Component;

impl preinit::Guest for Component {
    fn wizer_initialize() {
        TABLE.get_or_init(build_table);
    }
}

impl wasip2::exports::http::incoming_handler::Guest for Component {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let table = TABLE.get_or_init(build_table);
        let query = request.path_with_query().unwrap_or_default();
        let key = query
            .split_once('?')
            .map(|(_, q)| q)
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("key="))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0)
            % TABLE_LEN;
        let headers = Fields::from_list(&[(
            "content-type".to_string(),
            b"text/plain".to_vec(),
        )])
        .expect("static header is valid");
        let response = OutgoingResponse::new(headers);
        let body = response.body().expect("body is taken once");
        ResponseOutparam::set(response_out, Ok(response));
        let mut out = body.write().expect("stream is taken once");
        let _ = write!(out, "table[{key}] = {:016x}\n", table[key]);
        let _ = out.flush();
        drop(out);
        let _ = OutgoingBody::finish(body, None);
    }
}

preinit::export!(Component with_types_in preinit);
wasip2::http::proxy::export!(Component);
