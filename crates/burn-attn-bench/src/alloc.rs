//! A counting global allocator: the bench binary registers it so that the comparison can
//! report how many bytes one forward pass allocated above what was live before it.
//!
//! It counts host allocations only: on a GPU backend it sees staging buffers and
//! bookkeeping, not device memory.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
// Set on the first allocation through the counter, so the tool can tell a binary that
// registered it from one that did not (and print "n/a" instead of 0).
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// The system allocator, counting live and peak bytes. Register it in a binary with
/// `#[global_allocator] static ALLOC: CountingAllocator = CountingAllocator;`.
pub struct CountingAllocator;

impl CountingAllocator {
    fn add(size: usize) {
        let now = CURRENT.fetch_add(size, Ordering::Relaxed) + size;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }

    fn sub(size: usize) {
        CURRENT.fetch_sub(size, Ordering::Relaxed);
    }
}

// SAFETY: every call forwards to `System` with the same layout; the counters are only
// bookkeeping and never affect the returned pointers.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            ACTIVE.store(true, Ordering::Relaxed);
            Self::add(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        Self::sub(layout.size());
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            ACTIVE.store(true, Ordering::Relaxed);
            Self::add(layout.size());
        }
        ptr
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            Self::sub(layout.size());
            Self::add(new_size);
        }
        new
    }
}

/// Whether a [`CountingAllocator`] is the global allocator of this process.
pub fn is_active() -> bool {
    // A small allocation makes sure the flag is set if the counter is registered.
    drop(std::hint::black_box(Box::new(0u8)));
    ACTIVE.load(Ordering::Relaxed)
}

/// Bytes live now (through the counting allocator).
pub fn current() -> usize {
    CURRENT.load(Ordering::Relaxed)
}

/// A measurement window: bytes allocated above the live bytes at its start.
pub struct PeakWindow {
    baseline: usize,
}

impl PeakWindow {
    /// Starts a window: the peak is reset to what is live now.
    pub fn start() -> Self {
        let baseline = current();
        PEAK.store(baseline, Ordering::Relaxed);
        Self { baseline }
    }

    /// The highest live byte count since [`PeakWindow::start`], minus the baseline; `None`
    /// when no counting allocator is registered.
    pub fn peak_above_baseline(&self) -> Option<u64> {
        // The forward itself allocated, so the flag is set by now if the counter is in use.
        if !ACTIVE.load(Ordering::Relaxed) {
            return None;
        }
        Some(PEAK.load(Ordering::Relaxed).saturating_sub(self.baseline) as u64)
    }
}
