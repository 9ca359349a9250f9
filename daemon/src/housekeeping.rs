//! Store housekeeping, at start and then hourly: blobs no deployment references any more (after
//! `edgectl rm`) are collected once older than an hour (younger ones may belong to a push that
//! has not committed yet), and partial uploads and fetches abandoned for a day are dropped.

use std::sync::Arc;
use std::time::Duration;

use edged_snapshots::{Store, StoreError};

const EVERY: Duration = Duration::from_secs(3600);
const UNREFERENCED_GRACE: Duration = Duration::from_secs(3600);
const ABANDONED_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Runs forever; spawn it.
pub async fn maintain(store: Arc<Store>) {
    let mut interval = tokio::time::interval(EVERY);
    loop {
        interval.tick().await;
        let store = store.clone();
        let result = tokio::task::spawn_blocking(move || {
            let gc = store.gc(UNREFERENCED_GRACE)?;
            let partials = store.expire_partials(ABANDONED_AFTER)?;
            Ok::<_, StoreError>((gc, partials))
        })
        .await;
        match result {
            Ok(Ok((gc, (partial_files, partial_bytes)))) => {
                if !gc.blobs_removed.is_empty() || partial_files > 0 {
                    tracing::info!(
                        blobs = gc.blobs_removed.len(),
                        bytes = gc.bytes_freed,
                        partial_files,
                        partial_bytes,
                        "store housekeeping freed space"
                    );
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "store housekeeping failed"),
            Err(e) => tracing::warn!(error = %e, "store housekeeping panicked"),
        }
    }
}
