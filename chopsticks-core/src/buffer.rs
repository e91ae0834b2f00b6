//! Large byte buffers that fill quickly.
//!
//! Writing a fresh 64 MiB buffer costs one page fault per 4 KiB page, which
//! here takes longer than moving the bytes through a pipe. Buffers of at
//! least [`HUGE_PAGE_THRESHOLD`] bytes ask the kernel for transparent huge
//! pages (`MADV_HUGEPAGE`), which makes filling them about four times faster
//! where THP is in `madvise` mode. Where it is not, the advice is ignored.

/// Buffers at least this large are advised to use huge pages.
pub(crate) const HUGE_PAGE_THRESHOLD: usize = 4 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// An empty `Vec` with room for `capacity` bytes, huge-page advised when large.
pub(crate) fn with_capacity(capacity: usize) -> Vec<u8> {
    let buffer: Vec<u8> = Vec::with_capacity(capacity);
    advise(buffer)
}

/// Like [`with_capacity`], but `None` instead of aborting when the memory cannot be had.
pub(crate) fn try_with_capacity(capacity: usize) -> Option<Vec<u8>> {
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
