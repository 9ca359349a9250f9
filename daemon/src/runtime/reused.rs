//! Reused instances. A function whose [`InstancePolicy`] lets one instance serve more than one
//! request — every `wasi:http` 0.3 guest by default, a 0.2 guest whose operator opted in — is
//! served by wasmtime-wasi-http's `ProxyHandler`, the worker pool `wasmtime serve` itself runs,
//! with edged's rules plugged into its hooks:
//!
//! - **how many**: an instance accepts requests while it has served fewer than
//!   `requests_per_instance` and runs fewer than `concurrent_per_instance` at once;
//! - **never after a fault**: a request that traps, hits its deadline or its memory cap marks its
//!   instance faulted, and a faulted instance accepts nothing more (it finishes what it has and is
//!   dropped);
//! - **one request's trap is its own**: a trap ends the whole instance, but only the request
//!   whose task was running when it trapped gets the trap; the others lost their instance and
//!   are run again once or answered 503 ([`super::lost`]);
//! - **deadlines**: each request has the function's deadline to answer (504 after); a guest
//!   still busy one deadline after its last answer, or busy-looping past it, has its instance
//!   dropped (the epoch tick makes every guest yield, so the check runs even then);
//! - **idle**: an instance with nothing to do is dropped after `idle_timeout`;
//! - **no queueing behind a busy guest**: an instance whose guest kept the CPU through a recent
//!   epoch tick takes no further request until it goes quiet (wasmtime-wasi-http would otherwise
//!   hand a concurrent request to a guest that only yields because the epoch makes it);
//! - **memory** is capped per instance (its store's limiter), and the function's permits count
//!   requests, not instances.
//!
//! Request bodies stream into the guest as they arrive (capped, and cut at the node's body
//! timeout); responses that finish at once go out with a Content-Length.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use edged_compiler::GuestKind;
use edged_node_config::InstancePolicy;
use http::Response;
use prometheus_client::metrics::counter::Counter;
use wasmtime::component::GuestTaskId;
use wasmtime::{CallHook, Store, StoreContextMut, UpdateDeadline};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::handler::{
    ExpirationError, HandlerState, Instance, InstantiationError, ProxyHandler, ProxyPre,
    ShouldAccept, WorkerExpiration, WorkerState, WorkerStatus,
};

use super::lost::{self, Ended, Verdict};
use super::setup::GuestSetup;
use crate::body::{ResponseBody, read_prefix};
use crate::epoch::EpochClock;
use crate::fault::Fault;
use crate::lock::lock;
use crate::sandbox::{GuestState, component_wasi};

/// A function's live instances.
pub struct Instances {
    handler: ProxyHandler<Workers>,
    guest: GuestKind,
}

impl Instances {
    pub fn new(
        pre: ProxyPre<GuestState>,
        setup: GuestSetup,
        guest: GuestKind,
        policy: InstancePolicy,
    ) -> Instances {
        Instances {
            handler: ProxyHandler::new(Workers {
                pre,
                setup,
                policy,
                waiting: Arc::new(AtomicUsize::new(0)),
            }),
            guest,
        }
    }

    pub fn guest_kind(&self) -> GuestKind {
        self.guest
    }

    pub fn policy(&self) -> InstancePolicy {
        self.handler.state().policy
    }

    /// Creates one instance and drops it, running no guest code beyond instantiation: proof
    /// that the deployment links and fits the pool and its memory cap.
    pub async fn instantiate_once(&self) -> Result<(), Fault> {
        let workers = self.handler.state();
        let mut store = workers
            .new_store(
                BusyMark::new(workers.setup.env.epochs.clone()),
                RunningTask::default(),
            )
            .map_err(|e| Fault::Host(format!("{e:#}")))?;
        workers
            .pre
            .instantiate_async(&mut store)
            .await
            .map(drop)
            .map_err(|e| Fault::classify(e, workers.setup.config.limits.timeout))
    }

    /// Runs `request` on an instance with room for it (a new one if none has). A response that
    /// finishes at once goes out in one piece (see [`crate::body::read_prefix`]). A request
    /// whose instance died of another request's fault is run again once, on a fresh instance,
    /// when [`lost::replayable`] (its head is kept for that; its body is empty).
    pub async fn handle(
        &self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
    ) -> Result<Response<ResponseBody>, Fault> {
        use http_body_util::BodyExt;
        use hyper::body::Body;
        let (head, body) = request.into_parts();
        let replay = lost::replayable(&head.method, body.is_end_stream()).then(|| head.clone());
        let mut request = http::Request::from_parts(head, body);
        let mut run_again_before = false;
        let response = loop {
            let ended = match self.run(request).await {
                Ok(response) => break response,
                Err(ended) => ended,
            };
            match lost::verdict(ended, replay.is_some(), run_again_before) {
                Verdict::Answer(fault) => return Err(fault),
                Verdict::RunAgain => {
                    let head = replay
                        .clone()
                        .expect("only a replayable request runs again");
                    tracing::info!(
                        function = %self.handler.state().setup.config.name,
                        "request run again on a fresh instance: its instance died of another request's fault"
                    );
                    run_again_before = true;
                    let empty = http_body_util::Empty::new()
                        .map_err(|never| match never {})
                        .boxed_unsync();
                    request = http::Request::from_parts(head, empty);
                }
            }
        };
        let (parts, mut body) = response.into_parts();
        let prefix = read_prefix(&mut body, std::future::pending())
            .await
            .map_err(|e| Fault::NoResponse(format!("response body failed: {e}")))?;
        Ok(Response::from_parts(parts, prefix.then(body)))
    }

    async fn run(
        &self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
    ) -> Result<Response<wasmtime_wasi_http::WasiBody>, Ended> {
        let timeout = self.handler.state().setup.config.limits.timeout;
        let outcome = Arc::new(RequestOutcome::queued(&self.handler.state().waiting));
        let result = self.handler.handle(outcome.clone(), request).await;
        // Taken, or refused before any instance took it.
        outcome.taken();
        let error = match result {
            Ok(response) => return Ok(response),
            Err(error) => error,
        };
        let fault = if error.is::<ExpirationError>() {
            // The instance stops accepting by itself: an expired request retires it.
            Fault::Deadline(timeout)
        } else if let Some(failed) = error.downcast_ref::<InstantiationError<Arc<RequestOutcome>>>()
        {
            let message = format!("{:#}", failed.error);
            match failed
                .error
                .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
            {
                Some(full) => Fault::Capacity(full.to_string()),
                None => Fault::Trap(format!("instantiation failed: {message}")),
            }
        } else if let Some(code) =
            error.downcast_ref::<wasmtime_wasi_http::p3::bindings::http::types::ErrorCode>()
        {
            // The guest answered with an error: a fault for this request, not of the instance.
            return Err(Ended::Own(Fault::NoResponse(format!(
                "guest answered with error {code:?}"
            ))));
        } else if error.is::<wasmtime_wasi_http::handler::TrapOrPanicError>() {
            // The instance died under one or several requests; its error reaches the worker's
            // drop hook just after the request's channel closes, and the hook tells each
            // request whether it was the one running when it happened.
            outcome.mark_instance_faulted();
            return Err(outcome
                .settled(Duration::from_millis(500))
                .await
                .unwrap_or_else(|| {
                    Ended::Own(Fault::Trap(
                        "the instance failed while serving this request".into(),
                    ))
                }));
        } else {
            Fault::classify(error, timeout)
        };
        outcome.mark_instance_faulted();
        Err(Ended::Own(fault))
    }
}

/// The guest task whose code runs in an instance right now (the root export task of the
/// current call stack): set each time the host enters guest code, so when the instance traps
/// it names the request whose call trapped.
#[derive(Clone, Default)]
struct RunningTask(Arc<Mutex<Option<GuestTaskId>>>);

impl RunningTask {
    fn entered(&self, store: &mut StoreContextMut<'_, GuestState>) {
        // No current task (instantiation, a host-only call): leave what was there.
        if let Ok(stack) = store.async_call_stack()
            && let Some(root) = stack.last()
        {
            *lock(&self.0) = Some(root);
        }
    }

    fn get(&self) -> Option<GuestTaskId> {
        *lock(&self.0)
    }
}

/// One request's link to the instance that took it: lets the caller mark that instance
/// faulted, and lets the instance hand a request the fault that killed it.
pub struct RequestOutcome {
    instance_faulted: Mutex<Option<Arc<AtomicBool>>>,
    fault: Mutex<Option<Ended>>,
    fault_set: tokio::sync::Notify,
    /// Its function's count of waiting requests, until an instance takes it.
    waiting: Mutex<Option<Arc<AtomicUsize>>>,
}

impl RequestOutcome {
    /// A request about to be handed to the pool, counted in `waiting` until taken.
    fn queued(waiting: &Arc<AtomicUsize>) -> RequestOutcome {
        waiting.fetch_add(1, Ordering::SeqCst);
        RequestOutcome {
            instance_faulted: Mutex::new(None),
            fault: Mutex::new(None),
            fault_set: tokio::sync::Notify::new(),
            waiting: Mutex::new(Some(waiting.clone())),
        }
    }

    /// No longer waiting (an instance took it, or it was refused); once only.
    fn taken(&self) {
        if let Some(waiting) = lock(&self.waiting).take() {
            waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn mark_instance_faulted(&self) {
        if let Some(flag) = lock(&self.instance_faulted).as_ref() {
            flag.store(true, Ordering::SeqCst);
        }
    }

    fn settle(&self, ended: Ended) {
        lock(&self.fault).get_or_insert(ended);
        self.fault_set.notify_one();
    }

    async fn settled(&self, within: Duration) -> Option<Ended> {
        let wait = async {
            loop {
                let notified = self.fault_set.notified();
                if let Some(fault) = lock(&self.fault).clone() {
                    return fault;
                }
                notified.await;
            }
        };
        tokio::time::timeout(within, wait).await.ok()
    }
}

/// A request dropped before any instance took it (its client went away, or no instance could
/// be made) no longer waits either.
impl Drop for RequestOutcome {
    fn drop(&mut self) {
        self.taken();
    }
}

/// The handler's state: how to make an instance of this function.
struct Workers {
    pre: ProxyPre<GuestState>,
    setup: GuestSetup,
    policy: InstancePolicy,
    /// Requests handed to the pool that no instance has taken yet.
    waiting: Arc<AtomicUsize>,
}

impl Workers {
    /// A store with the function's capabilities and memory cap. Every epoch tick the guest
    /// yields, so a busy-looping guest cannot hold its worker thread, and the worker gets to
    /// check its deadline (wasmtime-wasi-http checks expiry between polls of the store); each
    /// such yield is noted in `busy`, with the guest's calls into the host counted by a call
    /// hook (not by the host's views of the store: wasmtime's event loop uses those between the
    /// guest's yields too, which made a spinning guest look busy serving).
    fn new_store(&self, busy: BusyMark, running: RunningTask) -> anyhow::Result<Store<GuestState>> {
        let setup = &self.setup;
        let limits = setup.config.limits;
        let ctx = component_wasi(&setup.config, &setup.output)?;
        let state = GuestState::component(ctx, setup.outbound.clone(), limits.memory_bytes);
        let mut store = Store::new(&setup.engine, state);
        store.limiter(|s| &mut s.limits);
        store.call_hook(move |mut store, hook| {
            match hook {
                CallHook::CallingHost => {
                    let state = store.data_mut();
                    state.host_calls = state.host_calls.wrapping_add(1);
                }
                CallHook::CallingWasm | CallHook::ReturningFromHost => running.entered(&mut store),
                CallHook::ReturningFromWasm => {}
            }
            Ok(())
        });
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |store| {
            busy.interrupted(store.data().host_calls);
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(tokio::task::yield_now()),
            ))
        });
        Ok(store)
    }
}

impl HandlerState for Workers {
    type StoreData = GuestState;
    type WorkerExpiration = Expiry;
    type WorkerState = Worker;

    async fn instantiate(&self) -> wasmtime::Result<Instance<GuestState, Expiry, Worker>> {
        let started = Instant::now();
        let busy = BusyMark::new(self.setup.env.epochs.clone());
        let running = RunningTask::default();
        let mut store = self
            .new_store(busy.clone(), running.clone())
            .map_err(wasmtime::Error::from_anyhow)?;
        let proxy = self.pre.instantiate_async(&mut store).await?;
        self.setup.instance_created(started.elapsed());
        let config = &self.setup.config;
        let timed_out = Arc::new(AtomicBool::new(false));
        Ok(Instance {
            store,
            proxy,
            view: <GuestState as WasiHttpView>::http,
            expiration: Expiry {
                request_timeout: config.limits.timeout,
                idle_timeout: self.policy.idle_timeout,
                sleep: Box::pin(tokio::time::sleep(Duration::MAX / 4)),
                timed_out: timed_out.clone(),
                busy: busy.clone(),
                waiting: self.waiting.clone(),
                function: config.name.clone(),
            },
            state: Worker {
                policy: self.policy,
                request_timeout: config.limits.timeout,
                faulted: Arc::new(AtomicBool::new(false)),
                timed_out,
                busy,
                discarded: self.setup.env.metrics.discarded.clone(),
                requests: Mutex::new(Vec::new()),
                running,
            },
        })
    }
}

/// One instance's bookkeeping.
struct Worker {
    policy: InstancePolicy,
    request_timeout: Duration,
    /// Set by a request that faulted on this instance: it takes nothing more.
    faulted: Arc<AtomicBool>,
    /// Set by [`Expiry`] when it ends the instance for a guest still running past a deadline.
    timed_out: Arc<AtomicBool>,
    /// Requests it took, with their guest tasks, to hand them the fault that ends it.
    requests: Mutex<Vec<(GuestTaskId, Weak<RequestOutcome>)>>,
    /// Whose guest code ran last: the request a trap is charged to.
    running: RunningTask,
    /// When its guest last held the CPU through an epoch tick.
    busy: BusyMark,
    discarded: Counter,
}

/// Whether a guest is holding the CPU. A guest that keeps computing (or spinning) is
/// interrupted at every epoch tick without calling the host in between; a guest serving
/// requests calls WASI, `wasi:http` and the component model's intrinsics for each of them. So:
/// interrupts at two consecutive ticks with no host call between them (but the epoch check
/// itself) mean it ran through the tick. (Ticks alone are not enough:
/// back-to-back quick requests each meet a stale deadline, one tick after another.) Counted in
/// ticks, not time, so a ticker delayed by a loaded machine does not hide a spinning guest.
#[derive(Clone)]
struct BusyMark {
    epochs: EpochClock,
    /// Epoch and host-call count at the last interrupt (`u64::MAX` epoch: never), and the epoch
    /// of the last interrupt that showed the guest computing through a tick.
    last_interrupt: Arc<Mutex<(u64, u64)>>,
    busy_at: Arc<AtomicU64>,
}

impl BusyMark {
    fn new(epochs: EpochClock) -> BusyMark {
        BusyMark {
            epochs,
            last_interrupt: Arc::new(Mutex::new((u64::MAX, 0))),
            busy_at: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }

    /// Called at each epoch interrupt of the guest, with its host-call count.
    fn interrupted(&self, host_calls: u64) {
        let now = self.epochs.now();
        let (previous, previous_calls) =
            std::mem::replace(&mut *lock(&self.last_interrupt), (now, host_calls));
        // The epoch check that brought the guest here is itself a call into the host.
        let no_other_call = host_calls.wrapping_sub(previous_calls) <= 1;
        if previous != u64::MAX && now.saturating_sub(previous) <= 1 && no_other_call {
            self.busy_at.store(now, Ordering::Relaxed);
        }
    }

    /// Busy until a full tick has passed without the guest computing through it.
    fn is_busy(&self) -> bool {
        let busy_at = self.busy_at.load(Ordering::Relaxed);
        busy_at != u64::MAX && self.epochs.now().saturating_sub(busy_at) <= 1
    }
}

impl WorkerState for Worker {
    type StoreData = GuestState;
    type RequestData = Arc<RequestOutcome>;

    fn should_accept_request(&self, concurrent: usize, total: usize) -> ShouldAccept {
        if self.faulted.load(Ordering::SeqCst)
            || total >= self.policy.requests_per_instance as usize
        {
            ShouldAccept::Never
        } else if concurrent >= self.policy.concurrent_per_instance as usize || self.busy.is_busy()
        {
            ShouldAccept::No
        } else {
            ShouldAccept::Yes
        }
    }

    fn on_request_start(
        &self,
        _store: StoreContextMut<'_, GuestState>,
        outcome: Arc<RequestOutcome>,
        task: GuestTaskId,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + Sync>> {
        outcome.taken();
        *lock(&outcome.instance_faulted) = Some(self.faulted.clone());
        let mut requests = lock(&self.requests);
        requests.retain(|(_, r)| r.strong_count() > 0);
        requests.push((task, Arc::downgrade(&outcome)));
        Box::pin(tokio::time::sleep(self.request_timeout))
    }

    fn drop(&self, store: Store<GuestState>, result: wasmtime::Result<()>) {
        drop(store);
        if result.is_err() || self.faulted.load(Ordering::SeqCst) {
            self.discarded.inc();
        }
        let Err(error) = result else { return };
        let timed_out = self.timed_out.load(Ordering::SeqCst);
        let fault = if timed_out {
            Fault::Deadline(self.request_timeout)
        } else {
            Fault::classify(error, self.request_timeout)
        };
        // A guest cut at its deadline is charged to every request it still had (as before);
        // a trap only to the request whose task was running, when that is known.
        let culprit = if timed_out { None } else { self.running.get() };
        tracing::debug!(%fault, ?culprit, "instance dropped after a fault");
        for (task, request) in lock(&self.requests).drain(..) {
            if let Some(request) = request.upgrade() {
                request.settle(charge(&fault, culprit, task));
            }
        }
    }
}

/// How a request of an instance that ended with `fault` ended: the fault's own when its task
/// is the culprit (or no culprit is known: then every request is charged, as nothing tells them
/// apart), lost otherwise.
fn charge<Task: PartialEq>(fault: &Fault, culprit: Option<Task>, task: Task) -> Ended {
    match culprit {
        Some(culprit) if culprit != task => Ended::Lost {
            cause: Some(fault.clone()),
        },
        _ => Ended::Own(fault.clone()),
    }
}

/// When an instance ends: idle past its idle timeout (a normal retirement); still running one
/// request deadline after its last request started or its last answer (the guest is cut); or,
/// having answered everything, still computing while requests for its function wait. That
/// last one is retired at once: wasmtime-wasi-http counts it as ready for requests, and its
/// worker cannot decline them while the guest holds the store, so they would wait for the
/// deadline. (A guest computing for a request it has not answered keeps its deadline.)
struct Expiry {
    request_timeout: Duration,
    idle_timeout: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    timed_out: Arc<AtomicBool>,
    busy: BusyMark,
    waiting: Arc<AtomicUsize>,
    function: String,
}

impl WorkerExpiration for Expiry {
    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        status: WorkerStatus,
        start: Instant,
    ) -> Poll<()> {
        // Polled between the guest's epoch yields too, so this sees a spinning guest.
        if status == WorkerStatus::PostReturn
            && self.busy.is_busy()
            && self.waiting.load(Ordering::SeqCst) > 0
        {
            tracing::warn!(
                function = %self.function,
                "instance retired: its guest kept computing after answering while requests waited"
            );
            self.timed_out.store(true, Ordering::SeqCst);
            return Poll::Ready(());
        }
        let timeout = match status {
            WorkerStatus::Idle => self.idle_timeout,
            WorkerStatus::Requests | WorkerStatus::PostReturn => self.request_timeout,
        };
        let Some(deadline) = start.checked_add(timeout) else {
            return Poll::Pending;
        };
        let deadline = tokio::time::Instant::from_std(deadline);
        if self.sleep.deadline() != deadline {
            self.sleep.as_mut().reset(deadline);
        }
        let expired = self.sleep.as_mut().poll(cx);
        if expired.is_ready() && status != WorkerStatus::Idle {
            self.timed_out.store(true, Ordering::SeqCst);
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_waits_from_queueing_until_taken_or_dropped_once() {
        let waiting = Arc::new(AtomicUsize::new(0));
        let taken = RequestOutcome::queued(&waiting);
        let dropped = RequestOutcome::queued(&waiting);
        assert_eq!(waiting.load(Ordering::SeqCst), 2);
        taken.taken();
        taken.taken();
        assert_eq!(waiting.load(Ordering::SeqCst), 1);
        drop(taken);
        assert_eq!(waiting.load(Ordering::SeqCst), 1);
        drop(dropped);
        assert_eq!(waiting.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn busy_means_interrupted_at_consecutive_ticks_with_no_other_host_call() {
        let clock = EpochClock::default();
        let busy = BusyMark::new(clock.clone());
        // A guest serving quick requests: interrupted at ticks 1 and 2, calling the host between.
        clock.tick();
        busy.interrupted(10);
        clock.tick();
        busy.interrupted(25);
        assert!(!busy.is_busy());
        // Interrupted again one tick later with only that epoch check in between: it computed
        // through the tick.
        clock.tick();
        busy.interrupted(26);
        assert!(busy.is_busy());
        // Quiet for two ticks: no longer busy.
        clock.tick();
        clock.tick();
        assert!(!busy.is_busy());
        // Interrupts far apart (an idle guest woken now and then) are not computing.
        for _ in 0..5 {
            clock.tick();
        }
        busy.interrupted(27);
        assert!(!busy.is_busy());
    }

    fn worker(requests: u32, concurrent: u32) -> (Worker, EpochClock) {
        let clock = EpochClock::default();
        let worker = Worker {
            policy: InstancePolicy {
                requests_per_instance: requests,
                concurrent_per_instance: concurrent,
                idle_timeout: Duration::from_secs(30),
            },
            request_timeout: Duration::from_secs(5),
            faulted: Arc::new(AtomicBool::new(false)),
            timed_out: Arc::new(AtomicBool::new(false)),
            requests: Mutex::new(Vec::new()),
            running: RunningTask::default(),
            busy: BusyMark::new(clock.clone()),
            discarded: Counter::default(),
        };
        (worker, clock)
    }

    fn accepts(worker: &Worker, concurrent: usize, total: usize) -> &'static str {
        match worker.should_accept_request(concurrent, total) {
            ShouldAccept::Yes => "yes",
            ShouldAccept::No => "no",
            ShouldAccept::Never => "never",
        }
    }

    #[test]
    fn an_instance_with_room_accepts_a_request() {
        let (worker, _) = worker(1000, 4);
        assert_eq!(accepts(&worker, 0, 0), "yes");
        assert_eq!(accepts(&worker, 3, 999), "yes");
    }

    #[test]
    fn an_instance_that_served_its_requests_accepts_none_ever_again() {
        let (worker, _) = worker(10, 4);
        assert_eq!(accepts(&worker, 0, 10), "never");
        assert_eq!(accepts(&worker, 0, 11), "never");
    }

    #[test]
    fn an_instance_at_its_concurrency_accepts_later() {
        let (worker, _) = worker(1000, 2);
        assert_eq!(accepts(&worker, 2, 5), "no");
        assert_eq!(accepts(&worker, 1, 5), "yes");
    }

    #[test]
    fn a_faulted_instance_accepts_nothing_more() {
        let (worker, _) = worker(1000, 4);
        worker.faulted.store(true, Ordering::SeqCst);
        assert_eq!(accepts(&worker, 0, 1), "never");
    }

    #[test]
    fn a_busy_guest_takes_no_request_until_it_goes_quiet() {
        let (worker, clock) = worker(1000, 4);
        clock.tick();
        worker.busy.interrupted(1);
        clock.tick();
        worker.busy.interrupted(2);
        assert_eq!(accepts(&worker, 0, 1), "no");
        clock.tick();
        clock.tick();
        assert_eq!(accepts(&worker, 0, 1), "yes");
    }

    #[test]
    fn a_fault_is_charged_to_the_running_task_and_the_others_lost_their_instance() {
        let trap = Fault::Trap("unreachable".into());
        assert!(matches!(
            charge(&trap, Some(1), 1),
            Ended::Own(Fault::Trap(_))
        ));
        assert!(matches!(
            charge(&trap, Some(1), 2),
            Ended::Lost {
                cause: Some(Fault::Trap(_))
            }
        ));
        // Nobody known to be running: nothing tells the requests apart, all are charged.
        assert!(matches!(charge(&trap, None, 2), Ended::Own(Fault::Trap(_))));
    }

    #[test]
    fn the_requests_cap_outranks_a_busy_guest() {
        let (worker, clock) = worker(3, 4);
        clock.tick();
        worker.busy.interrupted(1);
        clock.tick();
        worker.busy.interrupted(2);
        assert_eq!(accepts(&worker, 0, 3), "never");
    }
}
