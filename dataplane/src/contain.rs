//! Panic containment: a panic in one stream connection's TLS and framing work costs that
//! connection, not the shard (and with it every allocation of the process).
//!
//! The binary is built with `panic = "unwind"`. A shard runs each connection's byte work
//! ([`Connection::received`](crate::stream::Connection::received) and
//! [`Connection::queue_frame`](crate::stream::Connection::queue_frame): rustls, the framers)
//! inside [`contained`], which catches an unwinding panic; the caller then closes that
//! connection, counts it (`connection_panics`, exported as `uturn_connection_panics_total`) and
//! logs it with its backtrace. Everything else aborts the process, as `panic = "abort"` did:
//!
//! ```text
//!  panic on a shard thread ─┬─ inside contained(), not inside uncontained() ─► caught:
//!                           │      the hook keeps message, location and (first time per
//!                           │      location) a backtrace; catch_unwind returns them
//!                           └─ anywhere else (tables, rings, the fast path called back from
//!                              a connection's frames) ─► default hook prints it, abort()
//!  panic on another thread ─► default hook; abort() too once the binary called
//!                              abort_on_uncontained_panics()
//! ```
//!
//! Why abort outside: the shard's tables, ring and buffer ring are shared by every allocation
//! on it and have no recovery path; a shard thread that unwound away would leave its sockets
//! open and its allocations silently dead. A connection's own state is thrown away after a
//! panic (its slot is closed and freed once the ring gives its buffers back), so whatever it
//! was in the middle of cannot be observed.

use std::backtrace::Backtrace;
use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

/// Distinct panic locations remembered per shard for "log the backtrace once".
const LOCATIONS_MAX: usize = 64;

static HOOK: Once = Once::new();
static ABORT_EVERYWHERE: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Inside connection work that a panic may end.
    static CONTAINED: Cell<bool> = const { Cell::new(false) };
    /// A shard thread: an uncontained panic here aborts.
    static SHARD_THREAD: Cell<bool> = const { Cell::new(false) };
    /// What the hook saw of the panic being caught.
    static CAUGHT: RefCell<Option<Caught>> = const { RefCell::new(None) };
    /// Panic locations already logged with a backtrace on this thread.
    static SEEN: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// A panic caught in a connection's work.
#[derive(Debug)]
pub(crate) struct Caught {
    /// The panic message.
    pub(crate) message: String,
    /// `file:line:column` of the panic.
    pub(crate) location: String,
    /// Captured the first time a location panics on this thread; `None` after that (already
    /// logged, and capturing costs a stack walk per panic a client can trigger).
    pub(crate) backtrace: Option<Backtrace>,
}

/// Makes every panic outside a contained connection's work abort the process, on every
/// thread (the binary's behaviour with `panic = "abort"`, minus the contained part). Without
/// it, only shard threads abort; other threads keep the default (unwinding) behaviour, which
/// is what a test process wants.
pub fn abort_on_uncontained_panics() {
    ABORT_EVERYWHERE.store(true, Ordering::Relaxed);
    install_hook();
}

/// Called first on every shard thread.
pub(crate) fn enter_shard_thread() {
    install_hook();
    SHARD_THREAD.set(true);
}

/// Runs one connection's work; a panic inside it is caught and returned.
pub(crate) fn contained<R>(work: impl FnOnce() -> R) -> Result<R, Caught> {
    let outer = CONTAINED.replace(true);
    // AssertUnwindSafe: after a panic the caller discards the connection whose state `work`
    // was changing; shared state reached from inside goes through `uncontained`, where a
    // panic aborts instead of unwinding out here.
    let result = panic::catch_unwind(AssertUnwindSafe(work));
    CONTAINED.set(outer);
    result.map_err(|payload| {
        CAUGHT
            .try_with(RefCell::take)
            .ok()
            .flatten()
            .unwrap_or_else(|| Caught {
                message: payload_text(payload.as_ref()),
                location: String::new(),
                backtrace: None,
            })
    })
}

/// Runs shard-wide work called back from inside [`contained`] (a connection's frames going to
/// the fast path): a panic here is not the connection's, and aborts.
pub(crate) fn uncontained<R>(work: impl FnOnce() -> R) -> R {
    struct AbortOnUnwind(bool);
    impl Drop for AbortOnUnwind {
        fn drop(&mut self) {
            if std::thread::panicking() {
                // The hook aborts first on a shard thread; this covers a thread without the
                // hook, so that `contained` never catches a panic of shared state.
                std::process::abort();
            }
            CONTAINED.set(self.0);
        }
    }
    let _restore = AbortOnUnwind(CONTAINED.replace(false));
    work()
}

fn install_hook() {
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CONTAINED.try_with(Cell::get).unwrap_or(false) {
                let location = info
                    .location()
                    .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
                    .unwrap_or_default();
                let first = SEEN
                    .try_with(|seen| {
                        let mut seen = seen.borrow_mut();
                        if seen.contains(&location) {
                            return false;
                        }
                        if seen.len() < LOCATIONS_MAX {
                            seen.push(location.clone());
                        }
                        true
                    })
                    .unwrap_or(false);
                let caught = Caught {
                    message: payload_text(info.payload()),
                    location,
                    backtrace: first.then(Backtrace::force_capture),
                };
                let _ = CAUGHT.try_with(|slot| slot.replace(Some(caught)));
                return;
            }
            previous(info);
            if SHARD_THREAD.try_with(Cell::get).unwrap_or(false)
                || ABORT_EVERYWHERE.load(Ordering::Relaxed)
            {
                std::process::abort();
            }
        }));
    });
}

fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "(a panic without a message)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_contained_work_is_caught_with_its_location_and_message() {
        install_hook();
        let caught = contained(|| -> u32 { panic!("the connection broke") })
            .expect_err("the panic is caught");
        assert_eq!(caught.message, "the connection broke");
        assert!(caught.location.contains("contain.rs"), "{caught:?}");
        assert!(!CONTAINED.get(), "the flag is restored");
        assert_eq!(contained(|| 7).ok(), Some(7));
    }

    #[test]
    fn the_backtrace_is_taken_the_first_time_a_location_panics_only() {
        install_hook();
        fn broken() {
            panic!("same place");
        }
        let first = contained(broken).expect_err("caught");
        let second = contained(broken).expect_err("caught");
        assert!(first.backtrace.is_some(), "logged with its backtrace once");
        assert!(second.backtrace.is_none(), "{second:?}");
        assert_eq!(first.location, second.location);
    }

    /// Runs this test binary again with only `test` selected and `UTURN_CONTAIN_CHILD` set;
    /// returns how the child ended.
    fn run_child(test: &str, mode: &str) -> std::process::ExitStatus {
        let exe = std::env::current_exe().expect("test binary");
        std::process::Command::new(exe)
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env("UTURN_CONTAIN_CHILD", mode)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("run the child")
    }

    fn child_mode() -> Option<String> {
        std::env::var("UTURN_CONTAIN_CHILD").ok()
    }

    /// A panic on a shard thread outside a connection's work, or in shared work called back
    /// from inside one, ends the process with SIGABRT (what `panic = "abort"` did), instead of
    /// unwinding away the shard thread or being caught as the connection's.
    #[test]
    fn a_panic_outside_contained_work_aborts_the_process() {
        use std::os::unix::process::ExitStatusExt as _;
        const NAME: &str = "contain::tests::a_panic_outside_contained_work_aborts_the_process";
        match child_mode().as_deref() {
            Some("outside") => {
                let _ = std::thread::spawn(|| {
                    enter_shard_thread();
                    panic!("a shard bug outside any connection");
                })
                .join();
                // Only reached if the hook did not abort; the parent sees a clean exit.
                return;
            }
            Some("callback") => {
                let _ = std::thread::spawn(|| {
                    enter_shard_thread();
                    let _ = contained(|| uncontained(|| panic!("a fast-path bug")));
                })
                .join();
                return;
            }
            _ => {}
        }
        for mode in ["outside", "callback"] {
            let status = run_child(NAME, mode);
            assert_eq!(status.signal(), Some(libc::SIGABRT), "{mode}: {status:?}");
        }
        // The contained case, for contrast: the same thread survives and exits cleanly.
        let survived = std::thread::spawn(|| {
            enter_shard_thread();
            contained(|| panic!("one connection's bug")).is_err()
        })
        .join()
        .expect("the shard thread lives on");
        assert!(survived);
    }

    #[test]
    fn uncontained_work_inside_contained_work_restores_the_flag() {
        let inner = contained(|| uncontained(|| CONTAINED.get())).expect("no panic");
        assert!(!inner, "shared work runs uncontained");
        assert!(!CONTAINED.get());
    }
}
