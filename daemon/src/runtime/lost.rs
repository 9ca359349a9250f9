//! What a request gets when the reused instance it ran on died: the request whose own call
//! faulted gets its fault; the others on that instance lost it through no fault of their own,
//! so they are run again once on a fresh instance when that is safe (an idempotent request whose
//! body the lost instance never had), and are otherwise answered
//! [`Fault::InstanceLost`] (503), not the other request's trap. Pure: fed the outcome and the
//! request's facts, unit-tested here.

use http::Method;

use crate::fault::Fault;

/// How a request on a reused instance ended without a response.
#[derive(Debug, Clone)]
pub enum Ended {
    /// Its own call failed: the fault surfaced on its task (its trap, deadline, memory cap...).
    Own(Fault),
    /// Its instance went away under it because of another request: `cause` is the fault that
    /// ended the instance, when the instance reported one.
    Lost { cause: Option<Fault> },
}

/// What to do with a request that ended without a response.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Answer it with this fault.
    Answer(Fault),
    /// Run it again, on a fresh instance (a dead instance accepts nothing).
    RunAgain,
}

/// Whether a request can be run again as it was: its method is idempotent (GET or HEAD) and
/// it carries no body (one the lost instance was handed cannot be handed again: it may have
/// been read in part).
pub fn replayable(method: &Method, body_is_empty: bool) -> bool {
    (method == Method::GET || method == Method::HEAD) && body_is_empty
}

/// The verdict for a request that ended as `ended`; `replayable` as [`replayable`] says, and
/// `run_again_before` whether it already had its one second run.
pub fn verdict(ended: Ended, replayable: bool, run_again_before: bool) -> Verdict {
    match ended {
        Ended::Own(fault) => Verdict::Answer(fault),
        Ended::Lost { .. } if replayable && !run_again_before => Verdict::RunAgain,
        Ended::Lost { cause } => Verdict::Answer(Fault::InstanceLost(match cause {
            Some(cause) => cause.to_string(),
            None => "the instance ended without saying why".into(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trap() -> Fault {
        Fault::Trap("unreachable".into())
    }

    fn answered(verdict: Verdict) -> (u16, &'static str) {
        match verdict {
            Verdict::Answer(fault) => (fault.status().as_u16(), fault.kind()),
            Verdict::RunAgain => panic!("run again, not answered"),
        }
    }

    #[test]
    fn the_request_that_trapped_gets_its_trap_even_if_it_could_be_run_again() {
        assert_eq!(
            answered(verdict(Ended::Own(trap()), true, false)),
            (500, "trap")
        );
        assert_eq!(
            answered(verdict(Ended::Own(trap()), false, false)),
            (500, "trap")
        );
    }

    #[test]
    fn an_idempotent_sibling_runs_again_once() {
        let lost = || Ended::Lost {
            cause: Some(trap()),
        };
        assert!(matches!(verdict(lost(), true, false), Verdict::RunAgain));
        // Its second instance died too: no third run, and not a trap of its own either.
        assert_eq!(
            answered(verdict(lost(), true, true)),
            (503, "instance_lost")
        );
    }

    #[test]
    fn a_sibling_that_cannot_be_run_again_is_answered_503_naming_the_cause() {
        let verdict = verdict(
            Ended::Lost {
                cause: Some(trap()),
            },
            false,
            false,
        );
        let Verdict::Answer(fault) = verdict else {
            panic!("a POST is not run again")
        };
        assert_eq!(fault.status().as_u16(), 503);
        assert_eq!(fault.answer(), "instance lost to another request's fault\n");
        assert!(fault.to_string().contains("unreachable"), "{fault}");
    }

    #[test]
    fn only_bodiless_gets_and_heads_are_replayable() {
        assert!(replayable(&Method::GET, true));
        assert!(replayable(&Method::HEAD, true));
        assert!(!replayable(&Method::GET, false));
        assert!(!replayable(&Method::POST, true));
        assert!(!replayable(&Method::PUT, true));
        assert!(!replayable(&Method::DELETE, true));
    }
}
