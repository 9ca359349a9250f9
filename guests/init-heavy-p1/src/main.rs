//! A WASI preview 1 command with expensive start-up work, run CGI-style by edged.
//!
//! It builds a 4 MiB lookup table before it can answer. Exporting `wizer-initialize` lets
//! `edgectl build` do that once at build time; without Wizer (the bench baseline) every fresh
//! instance pays for it in `main`.
//!
//! Request: `GET /?key=N` (query string in `QUERY_STRING`), any body on stdin.
//! Response: a CGI header block, then `table[N] = <hex>` and the body length.

use std::io::{Read, Write};
use std::sync::OnceLock;

const TABLE_LEN: usize = 1 << 19;
const ROUNDS_PER_ENTRY: u32 = 48;

static TABLE: OnceLock<Vec<u64>> = OnceLock::new();

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Stands in for real start-up work (parsing an embedded dataset, compiling regexes, ...).
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

#[unsafe(export_name = "wizer-initialize")]
pub extern "C" fn wizer_initialize() {
    TABLE.get_or_init(build_table);
}

fn main() {
    let table = TABLE.get_or_init(build_table);
    let query = std::env::var("QUERY_STRING").unwrap_or_default();
    let key = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("key="))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0)
        % TABLE_LEN;
    let mut body = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut body);
    let mut out = std::io::stdout().lock();
    let _ = write!(
        out,
        "Content-Type: text/plain\r\n\r\ntable[{key}] = {:016x}\nbody: {} bytes\n",
        table[key],
        body.len()
    );
}
