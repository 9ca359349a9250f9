//! Fitting the pooling allocator into the address space this process may reserve.
//!
//! The pool maps every slot up front: with the default 1000 slots × (4096 MiB reservation +
//! 32 MiB guard) that is about 4 TiB of address space (not memory). Many 64-bit ARM kernels
//! give a process only 512 GiB (39-bit virtual addresses), and `ulimit -v` may give it less,
//! so a pool sized for x86_64 fails at start with nothing but an `mmap` error.
//!
//! This module owns two things:
//!
//! - [`probe_reservable`]: how large a `PROT_NONE` reservation this process can make right now
//!   (a few `mmap`/`munmap` pairs; nothing is touched, nothing stays mapped);
//! - [`plan_pool`]: sans-IO arithmetic from that number and the requested settings to slot
//!   counts, or a [`PoolTooLarge`] refusal naming the settings and the largest values that fit.
//!
//! Slot counts are what is lowered, never `memory_reservation`: it is compiled into artifacts
//! (part of the engine fingerprint), so changing it would make the node recompile every
//! deployment it is sent.

use std::fmt;

/// Of what the probe could reserve, the pool sized to fit takes at most `1 / HEADROOM_DIVISOR`:
/// the rest is for everything else the process maps (heap arenas, thread stacks, mapped
/// artifacts, the store).
pub const HEADROOM_DIVISOR: u64 = 2;

/// Table elements per table slot. wasmtime's default, set explicitly by
/// [`crate::runtime_engine`] so this arithmetic and the engine agree.
pub const TABLE_ELEMENTS: usize = 20_000;
/// Bytes per table element in wasmtime's table pool (a function reference is one pointer).
const TABLE_ELEMENT_BYTES: u64 = 8;
/// Tables per instance slot: one per core instance (see `CORE_INSTANCES_PER_INSTANCE`).
pub(crate) const TABLES_PER_INSTANCE: u32 = 8;
/// wasmtime's default async stack, one per instance slot, plus its guard page.
const ASYNC_STACK_BYTES: u64 = 2 << 20;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// How many slots of one kind the configuration asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slots {
    /// Exactly this many (the operator set it): refused if it cannot be reserved.
    Exactly(u32),
    /// As many as fit the budget, up to this many (the default).
    UpTo(u32),
}

impl Slots {
    /// The number asked for: exact, or the ceiling.
    pub fn count(self) -> u32 {
        match self {
            Slots::Exactly(n) | Slots::UpTo(n) => n,
        }
    }
}

/// What the pool is asked to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolRequest {
    /// Address space per linear memory (the artifact-fingerprint setting; never lowered here).
    pub memory_reservation: u64,
    pub memory_guard: u64,
    pub total_memories: Slots,
    pub total_instances: Slots,
    /// The host's page size (table slots are rounded up to it).
    pub page_size: u64,
}

impl PoolRequest {
    /// Bytes one memory slot reserves.
    fn memory_slot(&self) -> u64 {
        self.memory_reservation.saturating_add(self.memory_guard)
    }

    /// Bytes one instance slot reserves besides its memory: its tables and its async stack.
    fn instance_slot(&self) -> u64 {
        let page = self.page_size.max(1);
        let table = (TABLE_ELEMENTS as u64 * TABLE_ELEMENT_BYTES).div_ceil(page) * page;
        table * u64::from(TABLES_PER_INSTANCE) + ASYNC_STACK_BYTES + page
    }

    /// Bytes the pool reserves with `memories` memory slots and `instances` instance slots:
    /// wasmtime maps one guard region before the first memory slot, then each slot with the
    /// guard after it.
    pub fn reserved_bytes(&self, memories: u32, instances: u32) -> u64 {
        u64::from(memories)
            .saturating_mul(self.memory_slot())
            .saturating_add(self.memory_guard)
            .saturating_add(u64::from(instances).saturating_mul(self.instance_slot()))
    }

    /// What the pool reserves if every requested count is used as asked.
    pub fn requested_bytes(&self) -> u64 {
        self.reserved_bytes(self.total_memories.count(), self.total_instances.count())
    }

    /// What the probe should try: room for the full request plus the headroom, so that when it
    /// succeeds nothing needs lowering.
    pub fn probe_size(&self) -> u64 {
        match (self.total_memories, self.total_instances) {
            (Slots::Exactly(_), Slots::Exactly(_)) => self.requested_bytes(),
            _ => self.requested_bytes().saturating_mul(HEADROOM_DIVISOR),
        }
    }
}

/// The pool [`plan_pool`] chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolPlan {
    pub total_memories: u32,
    pub total_instances: u32,
    /// Address space the pool reserves with these counts.
    pub reserved_bytes: u64,
    /// Whether a default count was lowered to fit.
    pub lowered: bool,
}

/// An explicit pool (or even one slot of a default one) cannot be reserved in this process.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PoolTooLarge {
    pub request: PoolRequest,
    /// The slot counts the refusal is about: as configured, or one for a default count (when
    /// not even one slot fits).
    pub memories: u32,
    pub instances: u32,
    /// Bytes the pool needs with those counts.
    pub needed: u64,
    /// Bytes the probe could reserve.
    pub reservable: u64,
    /// Largest `total_memories` that fits the budget with the other settings as configured.
    pub largest_memories: u32,
    /// Largest `memory_reservation_mib` that fits the budget with `total_memories` and
    /// `memory_guard_mib` as configured.
    pub largest_reservation_mib: u64,
}

impl fmt::Display for PoolTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.request;
        let memories = self.memories;
        write!(
            f,
            "[engine] total_memories = {memories} × (memory_reservation_mib = {} + \
             memory_guard_mib = {}) with total_instances = {} needs {} GiB of address space, and \
             this process can reserve {} GiB (ulimit -v, or the kernel's virtual address size); \
             keeping half of that for the rest of edged, ",
            r.memory_reservation / MIB,
            r.memory_guard / MIB,
            self.instances,
            self.needed.div_ceil(GIB),
            self.reservable / GIB,
        )?;
        match (self.largest_memories, self.largest_reservation_mib) {
            (0, 0) => write!(
                f,
                "not one memory slot fits: lower memory_reservation_mib and memory_guard_mib"
            ),
            (0, mib) => write!(
                f,
                "the largest that fits is memory_reservation_mib = {mib} (with total_memories = \
                 {memories}; artifacts compiled elsewhere assume the default 4096)"
            ),
            (n, 0) => write!(
                f,
                "the largest that fits is total_memories = {n} (with memory_reservation_mib = \
                 {}; total_instances at most as many)",
                r.memory_reservation / MIB
            ),
            (n, mib) => write!(
                f,
                "the largest that fit are total_memories = {n} (with memory_reservation_mib = \
                 {}; keep it, artifacts compiled elsewhere assume it) or memory_reservation_mib \
                 = {mib} (with total_memories = {memories})",
                r.memory_reservation / MIB
            ),
        }
    }
}

/// Chooses the pool's slot counts for a process that can reserve `reservable` bytes.
///
/// Counts given as [`Slots::UpTo`] are lowered until the whole pool fits a budget of
/// `reservable / HEADROOM_DIVISOR`; counts given as [`Slots::Exactly`] are kept, and refused
/// only when the pool cannot be reserved at all. A refusal names the largest values that fit
/// the budget.
pub fn plan_pool(request: &PoolRequest, reservable: u64) -> Result<PoolPlan, PoolTooLarge> {
    let budget = reservable / HEADROOM_DIVISOR;
    let (fixed_memories, fixed_instances) = (
        matches!(request.total_memories, Slots::Exactly(_)).then(|| request.total_memories.count()),
        matches!(request.total_instances, Slots::Exactly(_))
            .then(|| request.total_instances.count()),
    );
    // Bytes that do not depend on the counts being fitted, and bytes per fitted slot (a
    // memory and an instance slot together when both are fitted).
    let fixed = request.reserved_bytes(fixed_memories.unwrap_or(0), fixed_instances.unwrap_or(0));
    let per_slot = request.reserved_bytes(
        u32::from(fixed_memories.is_none()),
        u32::from(fixed_instances.is_none()),
    ) - request.memory_guard;
    let ceiling = match (request.total_memories, request.total_instances) {
        (Slots::UpTo(m), Slots::UpTo(i)) => m.max(i),
        (Slots::UpTo(n), _) | (_, Slots::UpTo(n)) => n,
        _ => 0,
    };
    let fitted = if per_slot == 0 || ceiling == 0 {
        0
    } else {
        let n = budget.saturating_sub(fixed) / per_slot;
        u32::try_from(n).unwrap_or(u32::MAX).min(ceiling)
    };
    let memories = fixed_memories.unwrap_or(fitted.min(request.total_memories.count()));
    let instances = fixed_instances.unwrap_or(fitted.min(request.total_instances.count()));
    let reserved = request.reserved_bytes(memories, instances);
    let nothing_fitted = ceiling > 0 && fitted == 0;
    if reserved > reservable || nothing_fitted {
        return Err(too_large(request, reservable, memories.max(1)));
    }
    Ok(PoolPlan {
        total_memories: memories,
        total_instances: instances,
        reserved_bytes: reserved,
        lowered: memories < request.total_memories.count()
            || instances < request.total_instances.count(),
    })
}

/// The refusal for `memories` memory slots, with the largest values that fit. A default
/// instance count goes along with the memories, as it does when it is fitted.
fn too_large(request: &PoolRequest, reservable: u64, memories: u32) -> PoolTooLarge {
    let budget = reservable / HEADROOM_DIVISOR;
    let instances = match request.total_instances {
        Slots::Exactly(n) => n,
        Slots::UpTo(n) => n.min(memories),
    };
    // With total_instances fitted, it shrinks along with the memories (one each per slot).
    let (instance_fixed, instance_per_memory) = match request.total_instances {
        Slots::Exactly(n) => (request.reserved_bytes(0, n), 0),
        Slots::UpTo(_) => (request.reserved_bytes(0, 0), request.instance_slot()),
    };
    let per_memory = request.memory_slot() + instance_per_memory;
    let largest_memories = budget
        .saturating_sub(instance_fixed)
        .checked_div(per_memory)
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
    // Each memory slot gets (budget - instance slots - leading guard) / memories, its guard
    // included.
    let slot = budget.saturating_sub(request.reserved_bytes(0, instances)) / u64::from(memories);
    let largest_reservation_mib = slot.saturating_sub(request.memory_guard) / MIB;
    PoolTooLarge {
        request: *request,
        memories,
        instances,
        needed: request.reserved_bytes(memories, instances),
        reservable,
        largest_memories,
        largest_reservation_mib,
    }
}

/// The largest `PROT_NONE` reservation of at most `want` bytes this process can make now,
/// to within 1 GiB: `want` itself if that succeeds.
///
/// It tries `want`, halves until a reservation succeeds, then bisects between the last success
/// and failure; each try is an `mmap(PROT_NONE, MAP_NORESERVE)` unmapped at once, so nothing is
/// touched and no memory is committed. Under `ulimit -v` the answer is the limit less what the
/// process maps already; on a 39-bit kernel it is the largest free gap.
pub fn probe_reservable(want: u64) -> u64 {
    if try_reserve(want) {
        return want;
    }
    let mut high = want;
    let mut low = want / 2;
    while low > 0 && !try_reserve(low) {
        high = low;
        low /= 2;
    }
    if low == 0 {
        return 0;
    }
    while high - low > GIB {
        let mid = low + (high - low) / 2;
        if try_reserve(mid) {
            low = mid;
        } else {
            high = mid;
        }
    }
    low
}

fn try_reserve(bytes: u64) -> bool {
    let Ok(len) = usize::try_from(bytes) else {
        return false;
    };
    if len == 0 {
        return true;
    }
    // SAFETY: a fresh anonymous mapping at an address the kernel chooses; it overlaps nothing
    // this process uses, is never accessed, and is unmapped before returning.
    unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if at == libc::MAP_FAILED {
            return false;
        }
        libc::munmap(at, len);
    }
    true
}

/// The host's page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: u32 = 1000;

    fn request(memories: Slots, instances: Slots) -> PoolRequest {
        PoolRequest {
            memory_reservation: 4096 * MIB,
            memory_guard: 32 * MIB,
            total_memories: memories,
            total_instances: instances,
            page_size: 4096,
        }
    }

    fn default_request() -> PoolRequest {
        request(Slots::UpTo(DEFAULT), Slots::UpTo(DEFAULT))
    }

    #[test]
    fn the_default_pool_is_what_wasmtime_reported() {
        // `mmap failed to reserve 0x3efd2000000 bytes` for the memory pool.
        let r = default_request();
        assert_eq!(r.reserved_bytes(1000, 0), 0x3efd2000000);
        // Tables (8 × 160 KiB) and a 2 MiB + 4 KiB stack per instance slot.
        assert_eq!(r.instance_slot(), 8 * 163_840 + (2 << 20) + 4096);
    }

    #[test]
    fn unlimited_keeps_the_default() {
        let r = default_request();
        for reservable in [r.probe_size(), 128 << 40, u64::MAX] {
            let plan = plan_pool(&r, reservable).unwrap();
            assert_eq!((plan.total_memories, plan.total_instances), (1000, 1000));
            assert!(!plan.lowered);
            assert_eq!(plan.reserved_bytes, r.requested_bytes());
        }
    }

    #[test]
    fn a_39_bit_address_space_gets_63_slots() {
        let plan = plan_pool(&default_request(), 512 * GIB).unwrap();
        assert_eq!((plan.total_memories, plan.total_instances), (63, 63));
        assert!(plan.lowered);
        assert!(plan.reserved_bytes <= 256 * GIB, "{plan:?}");
        // One more slot would not fit half the space.
        assert!(default_request().reserved_bytes(64, 64) > 256 * GIB);
    }

    #[test]
    fn a_256_gib_limit_gets_31_slots() {
        let plan = plan_pool(&default_request(), 256 * GIB).unwrap();
        assert_eq!((plan.total_memories, plan.total_instances), (31, 31));
        assert!(plan.reserved_bytes <= 128 * GIB, "{plan:?}");
    }

    #[test]
    fn an_explicit_count_is_kept_and_the_other_fitted() {
        let r = request(Slots::Exactly(8), Slots::UpTo(DEFAULT));
        let plan = plan_pool(&r, 256 * GIB).unwrap();
        assert_eq!(plan.total_memories, 8);
        // 128 GiB less 8 memories (~32 GiB) leaves ~96 GiB for 3 MiB instance slots: the cap.
        assert_eq!(plan.total_instances, 1000);
        let r = request(Slots::UpTo(DEFAULT), Slots::Exactly(8));
        let plan = plan_pool(&r, 256 * GIB).unwrap();
        assert_eq!((plan.total_memories, plan.total_instances), (31, 8));
    }

    #[test]
    fn an_explicit_pool_that_fits_is_kept_even_past_the_budget() {
        // 40 × 4128 MiB ≈ 161 GiB: more than half of 256 GiB, less than all of it.
        let r = request(Slots::Exactly(40), Slots::Exactly(40));
        let plan = plan_pool(&r, 256 * GIB).unwrap();
        assert_eq!((plan.total_memories, plan.total_instances), (40, 40));
        assert!(!plan.lowered);
    }

    #[test]
    fn an_explicit_pool_too_large_is_refused_with_the_numbers() {
        let r = request(Slots::Exactly(1000), Slots::UpTo(DEFAULT));
        let err = plan_pool(&r, 256 * GIB).unwrap_err();
        assert_eq!(err.largest_memories, 31);
        // 128 GiB - 1000 instance slots (~3.3 GiB) - 32 MiB over 1000 slots, less the guard.
        assert_eq!(err.largest_reservation_mib, 95);
        assert_eq!(
            err.to_string(),
            "[engine] total_memories = 1000 × (memory_reservation_mib = 4096 + memory_guard_mib \
             = 32) with total_instances = 1000 needs 4035 GiB of address space, and this \
             process can reserve 256 GiB (ulimit -v, or the kernel's virtual address size); \
             keeping half of that for the rest of edged, the largest that fit are \
             total_memories = 31 (with memory_reservation_mib = 4096; keep it, artifacts \
             compiled elsewhere assume it) or memory_reservation_mib = 95 (with total_memories \
             = 1000)"
        );
        // The suggestions do fit.
        let fits = request(Slots::Exactly(31), Slots::Exactly(31));
        plan_pool(&fits, 256 * GIB).unwrap();
        let fits = PoolRequest {
            memory_reservation: 95 * MIB,
            ..request(Slots::Exactly(1000), Slots::Exactly(1000))
        };
        assert!(fits.requested_bytes() <= 128 * GIB);
    }

    #[test]
    fn not_even_one_default_slot_is_refused() {
        let err = plan_pool(&default_request(), 6 * GIB).unwrap_err();
        assert_eq!(err.largest_memories, 0);
        assert!(
            err.to_string()
                .contains("memory_reservation_mib = 3004 (with total_memories = 1;"),
            "{err}"
        );
        let err = plan_pool(&default_request(), 0).unwrap_err();
        assert!(
            err.to_string().ends_with(
                "not one memory slot fits: lower memory_reservation_mib and memory_guard_mib"
            ),
            "{err}"
        );
    }

    #[test]
    fn the_probe_finds_a_limit_it_is_given() {
        // Unbounded here; ask for something modest that always fits.
        assert_eq!(probe_reservable(GIB), GIB);
        assert_eq!(probe_reservable(0), 0);
        // A size no process can reserve (beyond any 64-bit user address space).
        let found = probe_reservable(1 << 62);
        assert!((GIB..1 << 62).contains(&found), "{found}");
    }
}
