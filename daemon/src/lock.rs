//! The node's one way to take a `std::sync::Mutex`: a panic while another thread held the lock
//! (a poisoned mutex) must not take the node down with it, and the data behind these locks
//! (tables, counters, slots) stays consistent at every await-free step, so it is used as it is.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, taking over the data of a poisoned one.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
