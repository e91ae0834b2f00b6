//! Large byte buffers that fill quickly.
//!
//! Writing a fresh 64 MiB buffer costs one page fault per 4 KiB page, which
//! here takes longer than moving the bytes through a pipe. Buffers of at
//! least [`HUGE_PAGE_THRESHOLD`] bytes ask the kernel for transparent huge
//! pages (`MADV_HUGEPAGE`), which makes filling them about four times faster
//! where THP is in `madvise` mode. Where it is not, the advice is ignored.

use bytes::Bytes;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Buffers at least this large are advised to use huge pages and may be kept as the spare.
pub const HUGE_PAGE_THRESHOLD: usize = 4 << 20;
const HUGE_PAGE: usize = 2 << 20;
/// How long the spare buffer is kept without use.
pub const SPARE_IDLE: Duration = Duration::from_secs(2);

static SPARE: Mutex<Option<(Vec<u8>, Instant)>> = Mutex::new(None);
/// Transfer chunk buffers kept for reuse, and when one was last returned.
static CHUNKS: Mutex<(Vec<Vec<u8>>, Option<Instant>)> = Mutex::new((Vec::new(), None));
/// At most this many chunk buffers are kept (2 MiB of 256 KiB chunks).
const SPARE_CHUNKS: usize = 8;
static RELEASE_PENDING: AtomicBool = AtomicBool::new(false);

/// Work on at least this many bytes (a copy, an encode, a decode) is done
/// with [`off_the_runtime`].
pub const LARGE_WORK: usize = 1 << 20;

/// Runs `work`, which touches `len` bytes, without holding up a tokio
/// runtime: on a worker of a multi-thread runtime, work on
/// [`LARGE_WORK`] bytes or more runs under
/// [`block_in_place`](tokio::task::block_in_place), so the worker's other
/// tasks (the replies of small calls, say) move to another thread for the
/// milliseconds a 100 MB copy takes. Anywhere else it simply runs.
pub fn off_the_runtime<R>(len: usize, work: impl FnOnce() -> R) -> R {
    let multi_thread = len >= LARGE_WORK
        && tokio::runtime::Handle::try_current().is_ok_and(|runtime| {
            runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
        });
    if multi_thread {
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}

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

/// An empty buffer for one transfer chunk of up to `len` bytes: a recycled
/// one when there is one. Wrap it with [`chunk_bytes`] once filled.
///
/// A chunk of a fresh allocation is 64 page faults; moving a file through
/// recycled chunks touches the same pages again.
pub fn chunk(len: usize) -> Vec<u8> {
    let recycled = CHUNKS
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .0
        .pop();
    match recycled {
        Some(mut buffer) if buffer.capacity() >= len => {
            buffer.clear();
            buffer
        }
        _ => Vec::with_capacity(len),
    }
}

/// A filled chunk as `Bytes`; the buffer is kept for [`chunk`] when the last
/// clone is dropped (released after [`SPARE_IDLE`] without use).
pub fn chunk_bytes(buffer: Vec<u8>) -> Bytes {
    Bytes::from_owner(Lent {
        buffer,
        hand_back: keep_chunk,
    })
}

/// A large payload as `Bytes`; the buffer is offered as the spare ([`give`])
/// when the last clone (the last chunk sent of it) is dropped.
pub fn spare_bytes(buffer: Vec<u8>) -> Bytes {
    Bytes::from_owner(Lent {
        buffer,
        hand_back: give,
    })
}

/// A buffer lent out as `Bytes`, handed back when its last clone is dropped.
struct Lent {
    buffer: Vec<u8>,
    hand_back: fn(Vec<u8>),
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buffer
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        (self.hand_back)(std::mem::take(&mut self.buffer));
    }
}

/// Keeps a chunk buffer for [`chunk`], up to [`SPARE_CHUNKS`] of them.
fn keep_chunk(buffer: Vec<u8>) {
    {
        let mut chunks = CHUNKS.lock().unwrap_or_else(|poison| poison.into_inner());
        if chunks.0.len() >= SPARE_CHUNKS {
            return;
        }
        chunks.0.push(buffer);
        chunks.1 = Some(Instant::now());
    }
    schedule_release();
}

/// Releases the spare buffer and the kept chunks if they have not been used
/// for [`SPARE_IDLE`]; returns whether anything is still kept.
pub fn release_if_idle() -> bool {
    let chunks_kept = {
        let mut chunks = CHUNKS.lock().unwrap_or_else(|poison| poison.into_inner());
        if chunks
            .1
            .is_some_and(|returned_at| returned_at.elapsed() >= SPARE_IDLE)
        {
            *chunks = (Vec::new(), None);
        }
        !chunks.0.is_empty()
    };
    let mut spare = SPARE.lock().unwrap_or_else(|poison| poison.into_inner());
    if spare
        .as_ref()
        .is_some_and(|(_, kept_at)| kept_at.elapsed() >= SPARE_IDLE)
    {
        *spare = None;
    }
    spare.is_some() || chunks_kept
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
        let spare_kept = SPARE.lock().map(|spare| spare.is_some()).unwrap_or(false);
        let chunks_kept = CHUNKS
            .lock()
            .map(|chunks| !chunks.0.is_empty())
            .unwrap_or(false);
        if spare_kept || chunks_kept {
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
