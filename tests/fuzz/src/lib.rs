//! Shared pieces of edgehub's fuzz targets (see README.md): a bounded allocator, so that "memory
//! bounded" is checked per allocation on stable Rust too, and small helpers.
//!
//! libFuzzer's `-malloc_limit_mb` needs a sanitizer's malloc hooks; the targets are built with
//! `-s none` (no sanitizer: stable toolchain), so the limit is enforced here instead: any single
//! allocation above [`MAX_ALLOCATION_BYTES`] fails, the process aborts, and libFuzzer reports
//! the input as a crash. libFuzzer's `-rss_limit_mb` bounds the total.

use std::alloc::{GlobalAlloc, Layout, System};

/// Largest single allocation a target may make. Every decoder under test bounds what it holds
/// by far less (MQTT: one packet of at most 320 KiB; AMQP: one frame of at most 256 KiB; the
/// store: one segment), so an allocation this large means a length field was trusted.
pub const MAX_ALLOCATION_BYTES: usize = 64 << 20;

/// The system allocator, refusing any single allocation above [`MAX_ALLOCATION_BYTES`].
pub struct BoundedAlloc;

fn too_large(size: usize) -> bool {
    if size > MAX_ALLOCATION_BYTES {
        // Not `eprintln!`: it may allocate. The abort that follows is the finding.
        let msg = b"edgehub-fuzz: single allocation above MAX_ALLOCATION_BYTES refused\n";
        // SAFETY: writing a static buffer to stderr.
        unsafe { libc_write(2, msg.as_ptr(), msg.len()) };
        return true;
    }
    false
}

extern "C" {
    #[link_name = "write"]
    fn libc_write(fd: i32, buf: *const u8, count: usize) -> isize;
}

// SAFETY: every call is forwarded to `System` unchanged, or answered with null (allowed: the
// caller then reports an allocation failure).
unsafe impl GlobalAlloc for BoundedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if too_large(layout.size()) {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if too_large(layout.size()) {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if too_large(new_size) {
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: BoundedAlloc = BoundedAlloc;

/// Splits `data` into its first byte (a knob for the target) and the rest.
pub fn knob(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((k, rest)) => (*k, rest),
        None => (0, data),
    }
}
