//! Failpoints for the crash tests (`FAILPOINTS=name=action`, compiled in only with a service's
//! `failpoints` feature; nothing otherwise).

/// Evaluates the failpoint `name` in async code. A configured one runs on a thread of its own
/// (`block_in_place`) on a multi-threaded runtime: a `pause` there holds this task only, never
/// the tasks the runtime had queued on its thread.
pub fn failpoint(name: &str) {
    if !fail::has_failpoints() {
        return;
    }
    let configured = fail::list().iter().any(|(point, _)| point == name);
    let threaded = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if configured && threaded {
        tokio::task::block_in_place(|| fail::fail_point!(name));
    } else {
        fail::fail_point!(name);
    }
}
