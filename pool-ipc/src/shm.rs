//! Shared memory segments (sealed memfds mapped `MAP_SHARED`) and process-shared futexes.
//!
//! A [`Segment`] is a memfd that several processes map. Its fd can be passed to another
//! process (over a socket with [`fdpass`](crate::fdpass), by inheritance, or opened from
//! `/proc/<pid>/fd/<n>` with [`Segment::open_in_process`]). Words of the segment can be
//! used as atomics, and [`futex_wait`]/[`futex_wake`] block and wake across processes on
//! them, which is enough to build process-shared events and counters.
//!
//! # Safety
//!
//! This module is one of the crate's two places with `unsafe` code (mapping and raw
//! copies). The invariants it keeps:
//!
//! * **No SIGBUS.** A mapping is only made of a memfd that is sealed against shrinking
//!   (`F_SEAL_SHRINK`, checked with `F_GET_SEALS` before mapping; seals can never be
//!   removed) and that lives on the kernel's shmem filesystem (checked with `fstatfs`, so
//!   hugetlbfs files, which can fault with SIGBUS, are refused). The mapping length is the
//!   file size read after the seal check, so every mapped page stays backed. Segments we
//!   create are also fully allocated up front (`fallocate`).
//! * **The mapping outlives every pointer into it.** `ptr..ptr + len` stays mapped until
//!   `Drop`; accessors hand out references bounded by `&self`.
//! * **Shared bytes are foreign memory.** Other processes (or other threads through
//!   [`Segment::write_at`]) may change the bytes at any moment. Safe code therefore never
//!   gets a `&[u8]` into the segment: bytes are only copied in and out through raw
//!   pointers ([`Segment::write_at`], [`Segment::read_at`]), which at worst yields
//!   unspecified byte values when writers race, and words are accessed only as atomics
//!   ([`Segment::atomic_u32`], [`Segment::atomic_u64`]), which are made for concurrent
//!   mutation. Everything read from a segment is treated as untrusted input by the rest
//!   of the crate. [`Segment::as_slice`] is `unsafe` for that reason.
//! * **Frozen bytes are immutable.** A [`FrozenSegment`] is mapped read-only, and only
//!   once its file carries `F_SEAL_WRITE` (with `F_SEAL_SHRINK` and `F_SEAL_GROW`: set
//!   before mapping when we make it, checked before mapping when a peer sent it; seals are
//!   never removed). The kernel then refuses every write, truncation and hole punch to
//!   the file in every process, so its bytes cannot change while mapped and
//!   [`FrozenSegment::as_slice`] is safe. Its writable mapping while being filled is
//!   exclusive (the file is not shared yet) and unmapped before the seal.
//! * **Alignment.** `mmap` returns a page-aligned address, so word `i` (at byte `4 * i` or
//!   `8 * i`) is aligned for `AtomicU32`/`AtomicU64`.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use rustix::fs::{MemfdFlags, OFlags, SealFlags};
use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};
use rustix::thread::futex;

/// `f_type` of the kernel's shmem filesystem, where memfds live.
const TMPFS_MAGIC: u64 = 0x0102_1994;

/// The largest written range [`Segment::zero`] overwrites rather than gives back.
pub const ZERO_IN_PLACE: usize = 16 << 10;

/// A shared memory segment: a sealed memfd mapped read-write and `MAP_SHARED`.
///
/// The file is sealed against shrinking and growing when created here, and
/// [`Segment::from_fd`] refuses files not sealed against shrinking, so a peer can never
/// truncate it under us (which would make our accesses fault with SIGBUS). Its fd is
/// close-on-exec.
///
/// # Examples
///
/// ```
/// use std::sync::atomic::Ordering;
/// use pool_ipc::shm::Segment;
///
/// let seg = Segment::create("example", 4096)?;
/// seg.atomic_u32(0).store(7, Ordering::Release);
/// seg.write_at(8, b"hello");
///
/// // Another mapping of the same memory, as a peer process would have it.
/// let peer = Segment::from_fd(seg.as_fd().try_clone_to_owned()?)?;
/// assert_eq!(peer.atomic_u32(0).load(Ordering::Acquire), 7);
/// let mut out = [0u8; 5];
/// peer.read_at(8, &mut out);
/// assert_eq!(&out, b"hello");
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Segment {
    fd: OwnedFd,
    map: Mapping,
}

// SAFETY: a Segment owns its mapping and fd; the memory is only accessed through atomics
// and raw copies (see the module's Safety section), which are valid from any thread.
unsafe impl Send for Segment {}
// SAFETY: as above: `&Segment` only allows atomic accesses and raw copies, which are fine
// to make concurrently from several threads (racing copies give unspecified bytes, never UB
// for the crate's users, who only ever see copied-out values).
unsafe impl Sync for Segment {}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("fd", &self.fd)
            .field("len", &self.map.len)
            .finish()
    }
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Segment {
    /// Creates a segment of `len` zeroed bytes.
    ///
    /// `memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING)`, sized and fully allocated,
    /// then sealed with `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`, then mapped. `name`
    /// only shows up in `/proc/<pid>/fd` listings. Nothing appears in `/dev/shm`; the
    /// memory is freed when the last fd and mapping are gone.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] if `len` is 0 or `name` contains a NUL byte; the
    /// system call's error otherwise (e.g. `ENOSPC`/`ENOMEM` when memory is short).
    ///
    /// # References
    ///  - [`memfd_create(2)`](https://man7.org/linux/man-pages/man2/memfd_create.2.html)
    #[doc(alias = "memfd_create")]
    pub fn create(name: &str, len: usize) -> io::Result<Segment> {
        Segment::create_with(name, len, true)
    }

    /// Like [`Segment::create`], but its memory is not allocated up front: each page is
    /// allocated (zeroed) when first written, so a large segment that is mostly unused costs
    /// only the pages used. A first write when the system is out of memory raises `SIGBUS`
    /// in the writer instead of failing here.
    ///
    /// # Errors
    ///
    /// As for [`Segment::create`].
    pub fn create_sparse(name: &str, len: usize) -> io::Result<Segment> {
        Segment::create_with(name, len, false)
    }

    fn create_with(name: &str, len: usize, allocate: bool) -> io::Result<Segment> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty shared segment",
            ));
        }
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
        rustix::fs::ftruncate(&fd, len as u64)?;
        if allocate {
            match rustix::fs::fallocate(&fd, rustix::fs::FallocateFlags::empty(), 0, len as u64) {
                Ok(()) | Err(Errno::NOTSUP) => {}
                Err(e) => return Err(e.into()),
            }
        }
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
        Segment::map(fd, len)
    }

    /// Maps a segment from an fd received from a peer (or inherited).
    ///
    /// The fd must be a memfd on shmem sealed with at least `F_SEAL_SHRINK`; the whole file
    /// is mapped. The fd is kept (and closed on drop).
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidData`] if the file is not sealed against shrinking, is not
    /// on shmem, or is empty; the system call's error otherwise (e.g. `EINVAL` from
    /// `F_GET_SEALS` for a file that is not a memfd, `EACCES` for a read-only fd).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Segment> {
        let len = sealed_shmem_len(
            &fd,
            SealFlags::SHRINK,
            "shared segment is not sealed against shrinking",
            "shared segment is not a shmem file",
        )?;
        Segment::map(fd, len)
    }

    /// Opens and maps a segment that process `pid` holds as its fd number `fd`, through
    /// `/proc/<pid>/fd/<fd>`.
    ///
    /// This reopens the same memfd (read-write, close-on-exec) without any fd passing; it
    /// needs the permission to inspect that process (same user, ptrace access mode
    /// `PTRACE_MODE_READ`). Then as [`Segment::from_fd`].
    ///
    /// # Errors
    ///
    /// `ENOENT` if there is no such process or fd, `EACCES`/`EPERM` without permission,
    /// and the errors of [`Segment::from_fd`].
    pub fn open_in_process(pid: u32, fd: i32) -> io::Result<Segment> {
        let path = format!("/proc/{pid}/fd/{fd}");
        let f = rustix::fs::open(
            path,
            OFlags::RDWR | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        Segment::from_fd(f)
    }

    fn map(fd: OwnedFd, len: usize) -> io::Result<Segment> {
        // `fd` was checked (or made) to be sealed against shrinking with size >= len, so
        // every page of the mapping stays backed.
        let map = Mapping::new(&fd, len, ProtFlags::READ | ProtFlags::WRITE)?;
        Ok(Segment { fd, map })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// Always `false`: segments are never empty.
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// The memfd (close-on-exec), e.g. to pass it to another process.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The `u32` word number `index` (bytes `4 * index .. 4 * index + 4`) as an atomic.
    ///
    /// # Panics
    ///
    /// If the word lies outside the segment.
    #[inline]
    pub fn atomic_u32(&self, index: usize) -> &AtomicU32 {
        let off = index.checked_mul(4).filter(|o| o + 4 <= self.map.len);
        let off = off.expect("atomic_u32 index outside the shared segment");
        // `off + 4 <= len`, so the word is inside the live mapping, which outlives `&self`;
        // it is 4-aligned (page-aligned base). Atomics may be mutated concurrently by other
        // threads and processes; no non-atomic Rust reference to it exists.
        // SAFETY: in bounds, aligned, only ever accessed atomically (above).
        unsafe { AtomicU32::from_ptr(self.map.ptr.as_ptr().add(off).cast::<u32>()) }
    }

    /// The `u64` word number `index` (bytes `8 * index .. 8 * index + 8`) as an atomic.
    ///
    /// # Panics
    ///
    /// If the word lies outside the segment.
    #[inline]
    pub fn atomic_u64(&self, index: usize) -> &AtomicU64 {
        let off = index.checked_mul(8).filter(|o| o + 8 <= self.map.len);
        let off = off.expect("atomic_u64 index outside the shared segment");
        // SAFETY: in bounds and 8-aligned, as for `atomic_u32`.
        unsafe { AtomicU64::from_ptr(self.map.ptr.as_ptr().add(off).cast::<u64>()) }
    }

    #[inline]
    fn check_range(&self, off: usize, n: usize) {
        assert!(
            off.checked_add(n).is_some_and(|end| end <= self.map.len),
            "range {off}+{n} outside the shared segment of {} bytes",
            self.map.len
        );
    }

    /// Copies `b` into the segment at byte offset `off`.
    ///
    /// Concurrent writers of the same bytes (here or in a peer) leave unspecified values;
    /// use atomics for coordination.
    ///
    /// # Panics
    ///
    /// If `off + b.len()` exceeds the segment.
    #[inline]
    pub fn write_at(&self, off: usize, b: &[u8]) {
        self.check_range(off, b.len());
        // SAFETY: `off` is inside the mapping or at its end (checked above).
        let dst = unsafe { self.map.ptr.as_ptr().add(off) };
        if b.len() <= 16 {
            // A worker writes each tiny result here, just encoded byte by byte: copied the
            // same way, each byte's load is forwarded from its store (a wider load of bytes
            // stored one at a time stalls), and no memmove is called.
            for (i, &x) in b.iter().enumerate() {
                // `dst + i` is below `off + b.len() <= len`: inside the live mapping.
                // SAFETY: in bounds (checked above).
                unsafe { std::ptr::write_volatile(dst.add(i), x) };
            }
            return;
        }
        // The destination range is inside the live mapping (checked above) and `b` is valid
        // for reads of `b.len()` bytes. `ptr::copy` tolerates overlap (only possible through
        // the unsafe `as_slice`, whose contract already forbids writes).
        // SAFETY: both ranges valid for the copy (above).
        unsafe { std::ptr::copy(b.as_ptr(), dst, b.len()) }
    }

    /// Gives the memory behind bytes `off .. off + len` back to the system (the file's
    /// pages there are freed, in every process that maps it); they read as zeros until
    /// written again. Only page-aligned whole pages inside the range are freed.
    ///
    /// Any process may be reading those bytes at the time: call it only for bytes nobody
    /// uses any more.
    ///
    /// # Errors
    ///
    /// The `fallocate` error (e.g. `EPERM` on a segment sealed against writing).
    ///
    /// # Panics
    ///
    /// If `off + len` exceeds the segment.
    pub fn discard(&self, off: usize, len: usize) -> io::Result<()> {
        self.check_range(off, len);
        let page = rustix::param::page_size();
        let start = off.div_ceil(page) * page;
        let end = (off + len) / page * page;
        if end > start {
            rustix::fs::fallocate(
                &self.fd,
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                start as u64,
                (end - start) as u64,
            )?;
        }
        Ok(())
    }

    /// Sets every byte of the segment to zero, in every process that maps it.
    ///
    /// Only the file's written ranges are cleared (found with `SEEK_DATA` and `SEEK_HOLE`):
    /// one of at most [`ZERO_IN_PLACE`] bytes is overwritten, keeping its memory for the
    /// next writer (freeing it, then faulting it in and zeroing it again on the next write,
    /// costs more); a larger one is given back, as [`Segment::discard`] does.
    ///
    /// Any process may be reading those bytes at the time: call it only for a segment
    /// nobody uses any more.
    ///
    /// # Errors
    ///
    /// The `lseek` or `fallocate` error.
    pub fn zero(&self) -> io::Result<()> {
        use rustix::fs::SeekFrom;
        let len = self.map.len as u64;
        let mut off = 0;
        while off < len {
            let start = match rustix::fs::seek(&self.fd, SeekFrom::Data(off)) {
                Ok(d) => d,
                // No data from `off` on.
                Err(Errno::NXIO) => break,
                Err(e) => return Err(e.into()),
            };
            if start >= len {
                break;
            }
            let end = rustix::fs::seek(&self.fd, SeekFrom::Hole(start))?.min(len);
            let (start, n) = (start as usize, (end - start) as usize);
            if n <= ZERO_IN_PLACE {
                // SAFETY: `start + n <= len`: the range is inside the live mapping.
                unsafe { std::ptr::write_bytes(self.map.ptr.as_ptr().add(start), 0, n) };
            } else {
                self.discard(start, n)?;
            }
            off = end;
        }
        Ok(())
    }

    /// Copies `out.len()` bytes from byte offset `off` of the segment into `out`.
    ///
    /// The bytes may be changing under a concurrent writer, so treat them as untrusted.
    ///
    /// # Panics
    ///
    /// If `off + out.len()` exceeds the segment.
    pub fn read_at(&self, off: usize, out: &mut [u8]) {
        self.check_range(off, out.len());
        // SAFETY: the source range is inside the live mapping (checked above); `out` is a
        // distinct Rust buffer, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.ptr.as_ptr().add(off),
                out.as_mut_ptr(),
                out.len(),
            )
        }
    }

    /// Appends `n` bytes from byte offset `off` to `out` (one copy, no zero-filling).
    ///
    /// # Panics
    ///
    /// If `off + n` exceeds the segment.
    pub fn read_to_vec(&self, off: usize, n: usize, out: &mut Vec<u8>) {
        self.check_range(off, n);
        out.reserve(n);
        let old = out.len();
        // The source range is inside the live mapping (checked above); the destination is
        // `n` bytes of `out`'s spare capacity (reserved above), which is distinct memory.
        // After the copy those bytes are initialized, so `set_len` is sound.
        // SAFETY: valid, disjoint ranges; the new length covers initialized bytes (above).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.ptr.as_ptr().add(off),
                out.as_mut_ptr().add(old),
                n,
            );
            out.set_len(old + n);
        }
    }

    /// The whole segment as a byte slice.
    ///
    /// # Safety
    ///
    /// While the returned slice is alive, no one (no thread of this process, no other
    /// process mapping the memfd) may write to the segment, including through
    /// [`Segment::write_at`] or the atomic accessors. Otherwise the slice's contents would
    /// change under a shared reference, which is undefined behaviour. Prefer
    /// [`Segment::read_at`].
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is live for `&self` and `len` bytes long; the caller promises
        // that nothing writes to it while the slice exists.
        unsafe { std::slice::from_raw_parts(self.map.ptr.as_ptr(), self.map.len) }
    }
}

/// Bytes in shared memory that nobody can change: a memfd sealed against writing
/// (`F_SEAL_WRITE`), shrinking and growing, mapped read-only.
///
/// Its contents are fixed when it is made ([`FrozenSegment::copy_from`],
/// [`FrozenSegment::with_fill`]); from then on the kernel refuses every write to the file,
/// in this process and in any other that gets its descriptor, so the bytes can be borrowed
/// as a plain `&[u8]` ([`FrozenSegment::as_slice`]) without copying them. Pass its
/// descriptor to another process (with [`fdpass`](crate::fdpass), say) and map it there with
/// [`FrozenSegment::from_fd`], which refuses a file that is not sealed so.
///
/// # Examples
///
/// ```
/// use pool_ipc::shm::FrozenSegment;
///
/// let seg = FrozenSegment::copy_from("example", b"hello")?;
/// // Another mapping of the same memory, as a peer process would have it.
/// let peer = FrozenSegment::from_fd(seg.as_fd().try_clone_to_owned()?)?;
/// assert_eq!(peer.as_slice(), b"hello");
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct FrozenSegment {
    fd: OwnedFd,
    map: Mapping,
}

// SAFETY: the mapping is read-only and its file sealed against writes: its bytes never
// change, so sharing `&[u8]` into it between threads is as sound as for any immutable data.
unsafe impl Send for FrozenSegment {}
// SAFETY: as above.
unsafe impl Sync for FrozenSegment {}

impl std::fmt::Debug for FrozenSegment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrozenSegment")
            .field("fd", &self.fd)
            .field("len", &self.map.len)
            .finish()
    }
}

/// The seals of a [`FrozenSegment`]'s file.
const FROZEN_SEALS: SealFlags = SealFlags::WRITE
    .union(SealFlags::SHRINK)
    .union(SealFlags::GROW)
    .union(SealFlags::SEAL);

impl FrozenSegment {
    /// A segment holding a copy of `bytes` (written into the file by the kernel, with no
    /// page faults in this process).
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] if `bytes` is empty or `name` contains a NUL byte;
    /// the system call's error otherwise (`ENOSPC`/`ENOMEM` when memory is short, `EMFILE`
    /// when out of descriptors).
    pub fn copy_from(name: &str, bytes: &[u8]) -> io::Result<FrozenSegment> {
        let fd = new_memfd(name, bytes.len())?;
        let mut done = 0;
        while done < bytes.len() {
            match rustix::io::pwrite(&fd, &bytes[done..], done as u64) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        FrozenSegment::seal_and_map(fd, bytes.len())
    }

    /// A segment of `len` bytes that `fill` writes in place (they start zeroed), then
    /// frozen: for contents made straight into shared memory, with no copy.
    ///
    /// # Errors
    ///
    /// As for [`FrozenSegment::copy_from`] (`len` 0 is refused).
    ///
    /// # Panics
    ///
    /// If `fill` panics (nothing is left behind).
    pub fn with_fill(
        name: &str,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> io::Result<FrozenSegment> {
        let fd = new_memfd(name, len)?;
        // The file was just created with `len` bytes and no other process has it, so every
        // page of the mapping stays backed.
        let map = Mapping::new(&fd, len, ProtFlags::READ | ProtFlags::WRITE)?;
        // The mapping is `len` bytes, live until `map` drops (after `fill` returns), and
        // only this slice refers to it: nothing else writes or reads it meanwhile.
        // SAFETY: valid, exclusive, initialized (zeroed) memory for the slice's life.
        fill(unsafe { std::slice::from_raw_parts_mut(map.ptr.as_ptr(), len) });
        // The write seal needs every writable mapping gone.
        drop(map);
        FrozenSegment::seal_and_map(fd, len)
    }

    /// Maps a frozen segment from a descriptor received from a peer (or inherited); a
    /// read-only descriptor is enough. The descriptor is kept (and closed on drop).
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidData`] if the file is not a memfd on shmem sealed against
    /// writing, shrinking and growing, or is empty; the system call's error otherwise.
    pub fn from_fd(fd: OwnedFd) -> io::Result<FrozenSegment> {
        let len = sealed_shmem_len(
            &fd,
            SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW,
            "shared bytes are not sealed against every change",
            "shared bytes are not in a shmem file",
        )?;
        FrozenSegment::map(fd, len)
    }

    fn seal_and_map(fd: OwnedFd, len: usize) -> io::Result<FrozenSegment> {
        rustix::fs::fcntl_add_seals(&fd, FROZEN_SEALS)?;
        FrozenSegment::map(fd, len)
    }

    fn map(fd: OwnedFd, len: usize) -> io::Result<FrozenSegment> {
        // The file is sealed against shrinking (checked or set by the callers) with size
        // `len`, so every page of the mapping stays backed.
        let map = Mapping::new(&fd, len, ProtFlags::READ)?;
        Ok(FrozenSegment { fd, map })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // The mapping is live for `&self` and `len` bytes long; its file is sealed against
        // writing, shrinking and growing (checked or set before mapping; seals are never
        // removed), so no process can change or remove these bytes while the slice lives.
        // SAFETY: valid, immutable memory for the slice's life (above).
        unsafe { std::slice::from_raw_parts(self.map.ptr.as_ptr(), self.map.len) }
    }

    /// Length in bytes (never 0).
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// Always `false`: frozen segments are never empty.
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// The memfd (close-on-exec), e.g. to pass it to another process.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A shared mapping of a file, at an address the kernel picked, unmapped when dropped
/// (also when a fill panics).
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes of `fd` from its start, shared, with `prot`. Its owner sees to it
    /// that every page stays backed (the file sealed against shrinking, at `len` bytes or
    /// more).
    fn new(fd: &OwnedFd, len: usize, prot: ProtFlags) -> io::Result<Mapping> {
        // A null address hint lets the kernel pick a fresh range, so the mapping aliases no
        // existing Rust object.
        // SAFETY: a fresh range (above).
        let p =
            unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, prot, MapFlags::SHARED, fd, 0)? };
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| invalid("mmap returned null"))?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr + len` is the mapping made in `new`, unmapped only here; every
        // reference into it borrows its owner, so none outlives this call.
        let r = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
        if let Err(e) = r {
            tracing::warn!(error = %e, "munmap of a shared segment failed");
        }
    }
}

/// The size of `fd`, a file a peer handed over: a non-empty file on shmem with at least
/// `seals`. Otherwise [`io::ErrorKind::InvalidData`], saying `unsealed` or `not_shmem`.
fn sealed_shmem_len(
    fd: &OwnedFd,
    seals: SealFlags,
    unsealed: &'static str,
    not_shmem: &'static str,
) -> io::Result<usize> {
    if !rustix::fs::fcntl_get_seals(fd)?.contains(seals) {
        return Err(invalid(unsealed));
    }
    let fs = rustix::fs::fstatfs(fd)?;
    #[allow(
        clippy::useless_conversion,
        reason = "f_type's type differs between targets"
    )]
    let fs_type = u64::try_from(fs.f_type).unwrap_or(0);
    if fs_type != TMPFS_MAGIC {
        return Err(invalid(not_shmem));
    }
    let st = rustix::fs::fstat(fd)?;
    let len = usize::try_from(st.st_size).map_err(|_| invalid("bad segment size"))?;
    if len == 0 {
        return Err(invalid("empty shared segment"));
    }
    Ok(len)
}

/// A new memfd of `len` bytes (not 0) that can be sealed.
fn new_memfd(name: &str, len: usize) -> io::Result<OwnedFd> {
    if len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "empty shared segment",
        ));
    }
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    rustix::fs::ftruncate(&fd, len as u64)?;
    Ok(fd)
}

/// Blocks while `*word == expected`, until woken by [`futex_wake`] or `timeout` passes.
///
/// A shared (not `FUTEX_PRIVATE`) futex, so it works on a word of a [`Segment`] mapped in
/// several processes. Returns `Ok(false)` on timeout and `Ok(true)` otherwise: woken, the
/// word did not hold `expected` on entry, or a signal interrupted the wait. Wakeups can be
/// spurious, so callers recheck the word in a loop.
///
/// # Examples
///
/// ```
/// use std::sync::atomic::AtomicU32;
/// use std::time::Duration;
/// use pool_ipc::shm::futex_wait;
///
/// let w = AtomicU32::new(1);
/// // The word is not 0, so this returns at once.
/// assert!(futex_wait(&w, 0, Some(Duration::from_secs(5)))?);
/// // It is 1 and nobody wakes us: times out.
/// assert!(!futex_wait(&w, 1, Some(Duration::from_millis(1)))?);
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
///
/// The `futex(2)` error other than `EAGAIN`, `EINTR` and `ETIMEDOUT`.
///
/// # References
///  - [`futex(2)`](https://man7.org/linux/man-pages/man2/futex.2.html)
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> io::Result<bool> {
    let ts = timeout.map(|t| rustix::time::Timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: i64::from(t.subsec_nanos()),
    });
    match futex::wait(word, futex::Flags::empty(), expected, ts.as_ref()) {
        Ok(()) | Err(Errno::AGAIN) | Err(Errno::INTR) => Ok(true),
        Err(Errno::TIMEDOUT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Wakes up to `n` waiters blocked in [`futex_wait`] on `word` (in any process); `u32::MAX`
/// (or anything above `i32::MAX`) wakes them all. Returns how many were woken.
///
/// # Errors
///
/// The `futex(2)` error (rare: `EFAULT`/`EINVAL` for a bad address).
pub fn futex_wake(word: &AtomicU32, n: u32) -> io::Result<usize> {
    // The kernel reads the count as a C `int`: u32::MAX would be -1 there, which wakes one.
    let n = n.min(i32::MAX as u32);
    Ok(futex::wake(word, futex::Flags::empty(), n)?)
}

/// An event count on a `u32` word of shared memory, for one process to wait until another
/// says that something happened, without a descriptor to poll: the waiter reads the
/// count, looks at whatever it waits for, and sleeps only while the count is still what
/// it read; the other side changes what it waits for, then rings.
///
/// The count is the word's upper 31 bits; the lowest bit says that a waiter may sleep, so
/// that a ring with nobody asleep costs one atomic add and no system call. A waiter that
/// reads the count before the change it waits for is woken by the ring that follows it
/// (or sees the count moved and does not sleep): no wakeup is lost. Rings wrap after
/// 2³¹: a waiter that slept through exactly that many would not notice, which is why
/// waits are bounded.
///
/// # Examples
///
/// ```
/// use std::sync::atomic::AtomicU32;
/// use std::time::Duration;
/// use pool_ipc::shm::Bell;
///
/// let word = AtomicU32::new(0);
/// let bell = Bell::new(&word);
/// let seen = bell.count();
/// // Nothing rang since: the wait times out.
/// assert!(!bell.wait_past(seen, Duration::from_millis(1))?);
/// bell.ring();
/// // It rang since `seen`: returns at once.
/// assert!(bell.wait_past(seen, Duration::from_secs(5))?);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Bell<'a> {
    word: &'a AtomicU32,
}

impl<'a> Bell<'a> {
    /// The bell on `word` (a word of a [`Segment`] to ring across processes).
    pub fn new(word: &'a AtomicU32) -> Self {
        Bell { word }
    }

    /// The count now: pass it to [`wait_past`](Bell::wait_past) to wait for the next ring.
    pub fn count(&self) -> u32 {
        self.word.load(Ordering::SeqCst) >> 1
    }

    /// Bumps the count, and wakes every waiter if one may sleep.
    pub fn ring(&self) {
        let old = self.word.fetch_add(2, Ordering::SeqCst);
        if old & 1 != 0 {
            // The mark is cleared before the wake: a waiter that marks the word after this
            // sees the new count with it, and does not sleep; one that marked it before
            // sleeps on a word that no longer holds what it expects, or is woken below.
            self.word.fetch_and(!1, Ordering::SeqCst);
            // A failure (none expected on a mapped word) leaves waiters to their timeout.
            let _ = futex_wake(self.word, u32::MAX);
        }
    }

    /// Sleeps until the count moves past `seen` or `timeout` passes: `true` if it moved
    /// (also when it had already), `false` on timeout.
    ///
    /// # Errors
    ///
    /// The `futex(2)` error other than `EAGAIN`, `EINTR` and `ETIMEDOUT`.
    pub fn wait_past(&self, seen: u32, timeout: Duration) -> io::Result<bool> {
        let seen = seen & (u32::MAX >> 1);
        let end = std::time::Instant::now() + timeout;
        loop {
            // A plain load first: a waiter that need not sleep leaves no mark, which
            // would cost the next ring a system call.
            if self.count() != seen {
                return Ok(true);
            }
            let v = self.word.fetch_or(1, Ordering::SeqCst);
            if v >> 1 != seen {
                return Ok(true);
            }
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || !futex_wait(self.word, v | 1, Some(left))? {
                return Ok(self.count() != seen);
            }
        }
    }
}
