//! Why a request did not get a response from its guest, classified by the error's type: a
//! wasmtime [`Trap`] code, WASI's exit status, the pool's capacity error, or the node's own
//! [`GrowthRefused`] marker from the per-instance memory cap ([`crate::sandbox::MemoryCap`]). Never by matching error text.

use std::time::Duration;

use http::StatusCode;
use wasmtime::Trap;
use wasmtime_wasi::I32Exit;

use crate::sandbox::{Growth, GrowthRefused};

/// What a guest did wrong (or what the node could not give it), for one request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Fault {
    #[error("deadline of {0:?} exceeded")]
    Deadline(Duration),
    #[error("memory limit exceeded: {0}")]
    OutOfMemory(String),
    #[error("stack overflow")]
    StackOverflow,
    #[error("trap: {0}")]
    Trap(String),
    #[error("guest exited with status {0}")]
    Exit(i32),
    #[error("guest returned no response: {0}")]
    NoResponse(String),
    #[error("host error: {0}")]
    Host(String),
    /// The node's instance pool is full (every slot busy): an overload, not the guest's fault.
    #[error("instance pool exhausted: {0}")]
    Capacity(String),
    /// The reused instance serving this request died of another request's fault (the reused
    /// runtime decides who answers for a shared instance's fault): not this request's doing,
    /// and it may be retried.
    #[error("instance lost to another request's fault: {0}")]
    InstanceLost(String),
}

impl Fault {
    /// Short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Deadline(_) => "deadline",
            Fault::OutOfMemory(_) => "oom",
            Fault::StackOverflow => "stack_overflow",
            Fault::Trap(_) => "trap",
            Fault::Exit(_) => "exit",
            Fault::NoResponse(_) => "no_response",
            Fault::Host(_) => "host",
            Fault::Capacity(_) => "capacity",
            Fault::InstanceLost(_) => "instance_lost",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Fault::Deadline(_) => StatusCode::GATEWAY_TIMEOUT,
            Fault::Host(_) | Fault::Capacity(_) | Fault::InstanceLost(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The body the client gets: the kind only (details stay in the log line), or, for a
    /// request that lost its instance to another, that it was not its guest's doing.
    pub fn answer(&self) -> String {
        match self {
            Fault::InstanceLost(_) => "instance lost to another request's fault\n".into(),
            _ => format!("guest fault: {}\n", self.kind()),
        }
    }

    /// The fault a guest call's error stands for. `deadline` is the function's wall-clock limit
    /// (an epoch interrupt is only ever raised for it).
    pub fn classify(error: wasmtime::Error, deadline: Duration) -> Fault {
        if let Some(trap) = error.downcast_ref::<Trap>() {
            return match trap {
                Trap::Interrupt => Fault::Deadline(deadline),
                Trap::StackOverflow => Fault::StackOverflow,
                other => Fault::Trap(other.to_string()),
            };
        }
        if let Some(refused) = error.downcast_ref::<GrowthRefused>() {
            return match refused.what {
                Growth::Memory => Fault::OutOfMemory(format!(
                    "growing memory to {} bytes (the cap is {} bytes)",
                    refused.desired, refused.limit
                )),
                Growth::Table => Fault::Trap(refused.to_string()),
            };
        }
        if let Some(exit) = error.downcast_ref::<I32Exit>() {
            return Fault::Exit(exit.0);
        }
        if let Some(full) = error.downcast_ref::<wasmtime::PoolConcurrencyLimitError>() {
            return Fault::Capacity(full.to_string());
        }
        // Keep log lines to one line: the wasm backtrace goes to debug logs only.
        tracing::debug!(error = ?error, "guest error");
        let message = format!("{error:#}");
        Fault::Trap(message.lines().next().unwrap_or_default().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEADLINE: Duration = Duration::from_millis(50);

    #[test]
    fn traps_are_classified_by_code() {
        let fault = Fault::classify(wasmtime::Error::new(Trap::Interrupt), DEADLINE);
        assert!(matches!(fault, Fault::Deadline(d) if d == DEADLINE));
        let fault = Fault::classify(wasmtime::Error::new(Trap::StackOverflow), DEADLINE);
        assert_eq!(fault.kind(), "stack_overflow");
        let fault = Fault::classify(wasmtime::Error::new(Trap::UnreachableCodeReached), DEADLINE);
        assert_eq!(fault.kind(), "trap");
    }

    #[test]
    fn memory_growth_past_the_cap_is_oom_whatever_the_context_says() {
        let refused = GrowthRefused {
            what: Growth::Memory,
            desired: 64 << 20,
            limit: 32 << 20,
        };
        // Context added on the way up must not hide the marker.
        let error = wasmtime::Error::new(refused).context("while running the guest");
        let fault = Fault::classify(error, DEADLINE);
        assert_eq!(fault.kind(), "oom");
        assert_eq!(fault.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let table = GrowthRefused {
            what: Growth::Table,
            desired: 10,
            limit: 5,
        };
        assert_eq!(
            Fault::classify(wasmtime::Error::new(table), DEADLINE).kind(),
            "trap"
        );
    }

    #[test]
    fn a_text_that_looks_like_oom_is_not_oom() {
        let error = wasmtime::Error::msg("forcing trap when growing memory to 1 bytes");
        assert_eq!(Fault::classify(error, DEADLINE).kind(), "trap");
    }

    #[test]
    fn exit_and_capacity_keep_their_kinds() {
        assert!(matches!(
            Fault::classify(wasmtime::Error::new(I32Exit(3)), DEADLINE),
            Fault::Exit(3)
        ));
        let capacity = Fault::Capacity("full".into());
        assert_eq!(capacity.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
