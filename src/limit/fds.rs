//! The process's file-descriptor budget. Every client and upstream connection
//! is counted while it is open ([`Fd`]); with the descriptors open when the
//! workers started, that tells how close the process is to RLIMIT_NOFILE
//! without a system call. Near the limit, a worker stops taking new client
//! connections for free (it sheds an idle one first, else closes the new one
//! at once) and new upstream connections wait for one to close: luagate never
//! runs into EMFILE itself, and a reserve stays for the upstream connections
//! of the requests it serves.
//!
//! The count is an estimate: descriptors that Lua cosockets and files open
//! are not in it (the reserve covers them); accept failing with EMFILE is
//! handled too (`server::listener`).

use std::sync::atomic::{AtomicUsize, Ordering};

/// Connections open now.
static OPEN: AtomicUsize = AtomicUsize::new(0);
/// Descriptors open before any connection: listeners, epoll, logs, stdio.
static BASE: AtomicUsize = AtomicUsize::new(0);
/// The soft RLIMIT_NOFILE (usize::MAX when unlimited or unknown).
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

/// One counted descriptor; uncounted on drop.
#[derive(Debug)]
pub struct Fd(());

impl Fd {
    pub fn open() -> Self {
        OPEN.fetch_add(1, Ordering::Relaxed);
        Fd(())
    }
}

impl Drop for Fd {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Raises the soft open-file limit to the hard one (as nginx's
/// `worker_rlimit_nofile` would, without a number to choose) and notes it.
/// Returns the limit in force.
pub fn raise_limit() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    let cur = lim.rlim_cur;
    let limit = if cur == libc::RLIM_INFINITY { usize::MAX } else { usize::try_from(cur).unwrap_or(usize::MAX) };
    LIMIT.store(limit, Ordering::Relaxed);
    Some(cur)
}

/// Counts the descriptors open now as the base the connections add to (call
/// once the workers have opened their listeners).
pub fn set_base() {
    let n = std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(64);
    BASE.store(n.saturating_sub(OPEN.load(Ordering::Relaxed)), Ordering::Relaxed);
}

/// Descriptors kept free for upstream connections and the rest: an eighth
/// of the limit, 32 to 4096.
fn reserve(limit: usize) -> usize {
    (limit / 8).clamp(32, 4096)
}

fn in_use() -> usize {
    BASE.load(Ordering::Relaxed) + OPEN.load(Ordering::Relaxed)
}

/// True when a new client connection would eat into the reserve.
pub fn near_limit() -> bool {
    let limit = LIMIT.load(Ordering::Relaxed);
    limit != usize::MAX && in_use() + reserve(limit) >= limit
}

/// True when an upstream connection may still be opened: half the reserve
/// stays free for everything else.
pub fn may_connect() -> bool {
    let limit = LIMIT.load(Ordering::Relaxed);
    limit == usize::MAX || in_use() + reserve(limit) / 2 < limit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_an_eighth_within_bounds() {
        assert_eq!(reserve(100), 32);
        assert_eq!(reserve(1024), 128);
        assert_eq!(reserve(1 << 20), 4096);
    }
}
