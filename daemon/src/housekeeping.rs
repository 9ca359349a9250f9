//! Store housekeeping, at start and then hourly: blobs no deployment references any more (after
//! `edgectl rm`) are collected once older than an hour (younger ones may belong to a push that
//! has not committed yet), and partial uploads and fetches abandoned for a day are dropped.
//!
//! Collecting deletes data, so it is careful: the store refuses while its index looks damaged
//! (a damaged index makes every blob look unreferenced) and logs every file it deletes; this
//! module logs the refusal and its reason, and goes on with the partials (they are never blobs).

use std::sync::Arc;
use std::time::Duration;

use edged_artifacts::{GcReport, Store, StoreError};

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
            let gc = match store.gc(UNREFERENCED_GRACE) {
                Ok(gc) => gc,
                Err(StoreError::GcRefused(reason)) => {
                    tracing::warn!("store housekeeping deleted no blob: {reason}");
                    GcReport::default()
                }
                Err(e) => return Err(e),
            };
            let partials = store.expire_partials(ABANDONED_AFTER)?;
            Ok::<_, StoreError>((gc, partials))
        })
        .await;
        match result {
            Ok(Ok((gc, (partial_files, partial_bytes)))) => {
                if !gc.blobs_removed.is_empty() || gc.stray_files_removed > 0 || partial_files > 0 {
                    tracing::info!(
                        blobs = gc.blobs_removed.len(),
                        bytes = gc.bytes_freed,
                        stray_files = gc.stray_files_removed,
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
