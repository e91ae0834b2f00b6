//! Large byte buffers that fill quickly.
//!
//! Writing a fresh 64 MiB buffer costs one page fault per 4 KiB page, which
//! here takes longer than moving the bytes through a pipe. Buffers of at
//! least [`HUGE_PAGE_THRESHOLD`] bytes ask the kernel for transparent huge
//! pages (`MADV_HUGEPAGE`), which makes filling them about four times faster
//! where THP is in `madvise` mode. Where it is not, the advice is ignored.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Buffers at least this large are advised to use huge pages and may be kept as the spare.
pub const HUGE_PAGE_THRESHOLD: usize = 4 << 20;
const HUGE_PAGE: usize = 2 << 20;
/// How long the spare buffer is kept without use.
pub const SPARE_IDLE: Duration = Duration::from_secs(2);

static SPARE: Mutex<Option<(Vec<u8>, Instant)>> = Mutex::new(None);
static RELEASE_PENDING: AtomicBool = AtomicBool::new(false);

/// Offers a buffer that is no longer needed as the process's spare.
/// Small buffers, and buffers smaller than the current spare, are dropped.
pub fn give(buffer: Vec<u8>) {
    if buffer.capacity() < HUGE_PAGE_THRESHOLD {
        return;
    }
    {
        let mut spare = SPARE.lock().unwrap_or_else(|poison| poison.into_inner());
        if spare
            .as_ref()
            .is_some_and(|(kept, _)| kept.capacity() >= buffer.capacity())
        {
            return;
        }
        *spare = Some((buffer, Instant::now()));
    }
    schedule_release();
}

/// Takes the spare, emptied, if it can hold `len` bytes.
fn take(len: usize) -> Option<Vec<u8>> {
    if len < HUGE_PAGE_THRESHOLD {
        return None;
    }
    let mut spare = SPARE.lock().unwrap_or_else(|poison| poison.into_inner());
    if spare
        .as_ref()
        .is_some_and(|(kept, _)| kept.capacity() >= len)
    {
        return spare.take().map(|(mut kept, _)| {
            kept.clear();
            kept
        });
    }
    None
}

/// Releases the spare if it has not been used for [`SPARE_IDLE`]; returns whether one is still kept.
pub fn release_if_idle() -> bool {
    let mut spare = SPARE.lock().unwrap_or_else(|poison| poison.into_inner());
    if spare
        .as_ref()
        .is_some_and(|(_, kept_at)| kept_at.elapsed() >= SPARE_IDLE)
    {
        *spare = None;
    }
    spare.is_some()
}

/// Starts one task (on the current tokio runtime, if any) that releases the spare once idle.
fn schedule_release() {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if RELEASE_PENDING.swap(true, Ordering::AcqRel) {
        return;
    }
    runtime.spawn(async {
        // Reset the flag even if the runtime drops this task half-way.
        struct Pending;
        impl Drop for Pending {
            fn drop(&mut self) {
                RELEASE_PENDING.store(false, Ordering::Release);
            }
        }
        let pending = Pending;
        loop {
            tokio::time::sleep(SPARE_IDLE).await;
            if !release_if_idle() {
                break;
            }
        }
        drop(pending);
        // A buffer given between the last check and the flag reset still gets released.
        if SPARE.lock().map(|spare| spare.is_some()).unwrap_or(false) {
            schedule_release();
        }
    });
}

/// An empty `Vec` with room for `capacity` bytes: the spare if it fits, else
/// a new allocation, huge-page advised when large.
pub(crate) fn with_capacity(capacity: usize) -> Vec<u8> {
    take(capacity).unwrap_or_else(|| advise(Vec::with_capacity(capacity)))
}

/// Like [`with_capacity`], but `None` instead of aborting when the memory cannot be had.
pub(crate) fn try_with_capacity(capacity: usize) -> Option<Vec<u8>> {
    if let Some(spare) = take(capacity) {
        return Some(spare);
    }
    let mut buffer: Vec<u8> = Vec::new();
    buffer.try_reserve_exact(capacity).ok()?;
    Some(advise(buffer))
}

fn advise(buffer: Vec<u8>) -> Vec<u8> {
    let capacity = buffer.capacity();
    if capacity >= HUGE_PAGE_THRESHOLD {
        let base = buffer.as_ptr() as usize;
        let start = (base + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
        let end = (base + capacity) & !(HUGE_PAGE - 1);
        if end > start {
            // SAFETY: [start, end) lies inside the allocation `buffer` owns;
            // MADV_HUGEPAGE changes only how the kernel backs those pages.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    buffer
}

/// Makes room for `additional` more bytes, moving large buffers into a huge-page advised one.
pub(crate) fn reserve(buffer: &mut Vec<u8>, additional: usize) {
    let needed = buffer.len().saturating_add(additional);
    if needed <= buffer.capacity() {
        return;
    }
    if needed < HUGE_PAGE_THRESHOLD {
        buffer.reserve(additional);
        return;
    }
    let mut bigger = with_capacity(needed.max(buffer.capacity().saturating_mul(2)));
    bigger.extend_from_slice(buffer);
    *buffer = bigger;
}
