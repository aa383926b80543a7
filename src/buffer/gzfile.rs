//! One local file being compressed as records arrive, kept as a single gzip member: one header,
//! one raw-deflate stream, one trailer at the end (as pigz does).
//!
//! At a checkpoint the stream is sync-flushed (byte-aligned, not final) and its length, running
//! CRC32 and uncompressed size recorded. After a crash, or after a cold file's compressor was
//! dropped to save memory, the file is truncated to the recorded length and a fresh raw-deflate
//! compressor appends to it: still one valid deflate stream, and the CRC32 continues from the
//! recorded value. Only `finish` writes the final block and the trailer, so every uploaded object
//! is a single-member gzip file that any reader decodes completely.
//!
//! Lines are staged uncompressed and handed to the compressor a chunk at a time. A worker
//! interleaves hundreds of files record by record; feeding each line straight to its own
//! compressor made every line pull a different ~300 KB deflate state into the CPU cache, and the
//! partition compressed at a tenth of plain gzip's speed (`benches/hot_path.rs`). Chunks keep
//! one compressor's state warm for tens of kilobytes at a time.
//!
//! Files heat and cool all the time (a worker has hundreds of files and tens of compressors), so
//! a cooled file's compressor is reset and kept for the next file that heats on the same thread,
//! instead of allocating and zeroing ~300 KB of fresh deflate state each time; its staging and
//! output buffers too, which given back to the allocator came back as pages the kernel zeroed.
//! A cooled file also keeps its descriptor, up to a process-wide cap, so that heating it again
//! costs no open, fstat and seek, and cooling no close.
//!
//! All of this is blocking file I/O: it runs on the buffer worker threads, never on the async
//! executor.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use flate2::{Compress, Compression, FlushCompress, Status};

use crate::checkpoint::StreamState;

/// gzip header: magic, deflate, no flags, mtime 0 (so replays produce identical bytes), no extra
/// flags, OS unknown.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// Compressed output is gathered up to this size before one write to the file.
const WRITE_CHUNK: usize = 32 << 10;

/// The most a file stages before compressing, whatever the caller allows: beyond this the cache
/// is already warm and more would only hold memory.
pub const MAX_STAGE_BYTES: usize = 64 << 10;

/// A gzip file open for appending.
pub struct GzStreamFile {
    path: PathBuf,
    level: Compression,
    /// `None` while cold: its ~300 KB of compressor state given back.
    hot: Option<Hot>,
    /// A cold file's descriptor, positioned at its end, while the process keeps fewer than
    /// [`MAX_KEPT_DESCRIPTORS`]; otherwise closed, and opened again when the file heats.
    kept: Option<KeptDescriptor>,
    /// Lines appended but not yet compressed (see the module doc). Not durable: a checkpoint
    /// compresses them first.
    staged: Vec<u8>,
    /// CRC32 of the uncompressed bytes handed to the compressor (staged lines excluded).
    crc: crc32fast::Hasher,
    /// Uncompressed bytes appended, staged lines included.
    uncompressed_len: u64,
    /// Bytes in the file plus bytes waiting in `hot.out`.
    compressed_len: u64,
    /// Lines appended since the last sync-flush; a flush without them would only add an empty
    /// block to the stream.
    unflushed: bool,
    /// Bytes were written (or the file truncated) since the last fsync: a checkpoint fsyncs only
    /// these, not the thousands of files that did not change.
    unsynced: bool,
}

struct Hot {
    file: File,
    compressor: PooledCompressor,
    out: Vec<u8>,
}

/// Descriptors of cold files kept open, process-wide. A worker's files cool and heat tens of
/// thousands of times an hour; the cap keeps the descriptors well inside the usual soft limit
/// of 1,024 beside the hot files' (one per open compressor), the sockets and the batch
/// directories.
const MAX_KEPT_DESCRIPTORS: usize = 256;
static KEPT_DESCRIPTORS: AtomicUsize = AtomicUsize::new(0);

/// A cold file's open descriptor, counted against [`MAX_KEPT_DESCRIPTORS`] until dropped. Its
/// position is the file's end: a file cools only once everything compressed is written.
struct KeptDescriptor {
    /// Always `Some` but while `into_file` takes it.
    file: Option<File>,
}

impl KeptDescriptor {
    /// Keeps `file` open if the cap allows; otherwise it is closed here.
    fn keep(file: File) -> Option<KeptDescriptor> {
        KEPT_DESCRIPTORS
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |kept| {
                (kept < MAX_KEPT_DESCRIPTORS).then_some(kept + 1)
            })
            .ok()
            .map(|_| KeptDescriptor { file: Some(file) })
    }

    /// The descriptor, no longer counted (it belongs to a hot file again).
    fn into_file(mut self) -> File {
        self.file.take().expect("taken only here")
    }

    fn file(&self) -> &File {
        self.file.as_ref().expect("taken only by into_file")
    }
}

impl Drop for KeptDescriptor {
    fn drop(&mut self) {
        KEPT_DESCRIPTORS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Spare compressors kept per thread (~300 KB each, idle): a worker's share of the default
/// `buffer.max_open_compressors` (64 over two workers). Idle spares are memory outside that
/// budget, so their number stays that small; a file that heats when none is spare makes one.
const MAX_SPARE_COMPRESSORS: usize = 32;

thread_local! {
    /// Reset compressors of files that cooled or finished on this thread, with their level.
    static SPARE_COMPRESSORS: RefCell<Vec<(u32, Compress)>> = const { RefCell::new(Vec::new()) };
}

/// A raw-deflate compressor taken from this thread's spares (or made), given back reset when
/// dropped.
struct PooledCompressor {
    level: u32,
    inner: Option<Compress>,
}

impl PooledCompressor {
    fn take(level: Compression) -> PooledCompressor {
        let spare = SPARE_COMPRESSORS
            .try_with(|spares| {
                let mut spares = spares.borrow_mut();
                let index = spares.iter().position(|(l, _)| *l == level.level())?;
                Some(spares.swap_remove(index).1)
            })
            .ok()
            .flatten();
        PooledCompressor {
            level: level.level(),
            // Raw deflate: the gzip header and trailer are ours, so streams can be continued.
            inner: Some(spare.unwrap_or_else(|| Compress::new(level, false))),
        }
    }

    fn get(&mut self) -> &mut Compress {
        self.inner.as_mut().expect("only taken on drop")
    }
}

impl Drop for PooledCompressor {
    fn drop(&mut self) {
        let Some(mut compressor) = self.inner.take() else {
            return;
        };
        compressor.reset();
        // At thread exit the spares may be gone already; the compressor is then simply freed.
        let _ = SPARE_COMPRESSORS.try_with(|spares| {
            let mut spares = spares.borrow_mut();
            if spares.len() < MAX_SPARE_COMPRESSORS {
                spares.push((self.level, compressor));
            }
        });
    }
}

/// Spare staging and output buffers kept per thread, of files that cooled or finished, for the
/// next files that heat: at most this many, each at most [`MAX_SPARE_BUFFER_BYTES`] (so at most
/// 4 MiB a thread, idle).
const MAX_SPARE_BUFFERS: usize = 32;
const MAX_SPARE_BUFFER_BYTES: usize = 2 * MAX_STAGE_BYTES;

thread_local! {
    static SPARE_BUFFERS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer of at most `max_capacity` from this thread's spares, or a new one.
fn take_buffer(max_capacity: usize) -> Vec<u8> {
    SPARE_BUFFERS
        .try_with(|spares| {
            let mut spares = spares.borrow_mut();
            let index = spares
                .iter()
                .rposition(|spare| spare.capacity() <= max_capacity)?;
            Some(spares.swap_remove(index))
        })
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Keeps `buffer` for the next file that heats on this thread, if it is worth keeping and there
/// is room.
fn give_buffer(mut buffer: Vec<u8>) {
    if buffer.capacity() == 0 || buffer.capacity() > MAX_SPARE_BUFFER_BYTES {
        return;
    }
    buffer.clear();
    // At thread exit the spares may be gone already; the buffer is then simply freed.
    let _ = SPARE_BUFFERS.try_with(|spares| {
        let mut spares = spares.borrow_mut();
        if spares.len() < MAX_SPARE_BUFFERS {
            spares.push(buffer);
        }
    });
}

impl Drop for GzStreamFile {
    fn drop(&mut self) {
        give_buffer(std::mem::take(&mut self.staged));
        if let Some(hot) = self.hot.take() {
            give_buffer(hot.out);
        }
    }
}

impl GzStreamFile {
    /// Creates the file (replacing any leftover of a previous attempt) with its gzip header. It
    /// starts cold: its compressor starts with its first chunk of lines.
    pub fn create(path: &Path, level: u32) -> io::Result<GzStreamFile> {
        let mut file = crate::layout::create_private_file(path)?;
        file.write_all(&GZIP_HEADER)?;
        Ok(GzStreamFile {
            path: path.to_path_buf(),
            level: Compression::new(level),
            hot: None,
            kept: KeptDescriptor::keep(file),
            staged: Vec::new(),
            crc: crc32fast::Hasher::new(),
            uncompressed_len: 0,
            compressed_len: GZIP_HEADER.len() as u64,
            unflushed: false,
            unsynced: true,
        })
    }

    /// Reopens a file at a recorded state: truncates whatever was written after it. The file
    /// stays cold until the next append.
    pub fn resume(path: &Path, level: u32, state: StreamState) -> io::Result<GzStreamFile> {
        let file = OpenOptions::new().write(true).open(path)?;
        let actual = file.metadata()?.len();
        if actual < state.compressed_len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} holds {actual} bytes, checkpoint recorded {}",
                    path.display(),
                    state.compressed_len
                ),
            ));
        }
        file.set_len(state.compressed_len)?;
        file.sync_data()?;
        Ok(GzStreamFile {
            path: path.to_path_buf(),
            level: Compression::new(level),
            hot: None,
            // Opened at its start: the next heat opens it again at its end.
            kept: None,
            staged: Vec::new(),
            crc: crc32fast::Hasher::new_with_initial_len(state.crc32, state.uncompressed_len),
            uncompressed_len: state.uncompressed_len,
            compressed_len: state.compressed_len,
            unflushed: false,
            unsynced: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn uncompressed_len(&self) -> u64 {
        self.uncompressed_len
    }

    /// Compressed bytes so far, including output not yet written to the file.
    pub fn compressed_len(&self) -> u64 {
        self.compressed_len
    }

    pub fn is_hot(&self) -> bool {
        self.hot.is_some()
    }

    /// Appends `line` and a newline. Lines are staged until `stage_limit` bytes (at most
    /// [`MAX_STAGE_BYTES`]) wait, then compressed together. Returns whether that started a
    /// compressor (the file was cold), for the caller's count of open compressors.
    pub fn append_line(&mut self, line: &[u8], stage_limit: usize) -> io::Result<bool> {
        let stage_limit = stage_limit.min(MAX_STAGE_BYTES);
        let needed = line.len() + 1;
        let mut heated = false;
        if self.staged.len() + needed > self.staged.capacity() {
            // The buffer must grow for this line. Grown by doubling past the limit, the buffers
            // of twelve thousand files held up to twice the staging budget
            // (`buffer::STAGING_BUDGET_BYTES`). So it doubles only up to the limit (a file of a
            // few lines holds a few lines' worth), then grows to the limit exactly, and once
            // full the staged lines are compressed instead.
            let doubled = (2 * self.staged.capacity()).max(self.staged.len() + needed);
            if doubled > stage_limit {
                if self.staged.len() + needed <= stage_limit {
                    self.staged.reserve_exact(stage_limit - self.staged.len());
                } else if !self.staged.is_empty() {
                    heated = !self.is_hot();
                    self.compress_staged(FlushCompress::None)?;
                    self.give_back_staging_over(stage_limit);
                }
            }
            if self.staged.capacity() == 0 {
                self.staged = take_buffer(stage_limit);
            }
        }
        self.staged.extend_from_slice(line);
        self.staged.push(b'\n');
        self.uncompressed_len += needed as u64;
        self.unflushed = true;
        if self.staged.len() >= stage_limit {
            heated |= !self.is_hot();
            self.compress_staged(FlushCompress::None)?;
            self.give_back_staging_over(stage_limit);
        }
        Ok(heated)
    }

    /// Brings the staging buffer within `stage_limit`, which fell since it grew (files opened
    /// in the worker's other partitions while this one got no lines): lines staged up to the
    /// limit are compressed now, as the next line would have done (a cold file borrows a
    /// compressor for them and stays cold), and the buffer is given back or shrunk to the limit.
    pub fn fit_staging(&mut self, stage_limit: usize) -> io::Result<()> {
        let stage_limit = stage_limit.min(MAX_STAGE_BYTES);
        if self.staged.capacity() <= stage_limit {
            return Ok(());
        }
        if self.staged.len() >= stage_limit {
            if self.is_hot() {
                self.compress_staged(FlushCompress::None)?;
            } else {
                self.sync_flush()?;
            }
            self.give_back_staging_over(stage_limit);
        } else if self.staged.is_empty() {
            give_buffer(std::mem::take(&mut self.staged));
        } else {
            self.staged.shrink_to(stage_limit);
        }
        Ok(())
    }

    #[cfg(test)]
    pub fn staged_capacity(&self) -> usize {
        self.staged.capacity()
    }

    /// Drops the (emptied) staging buffer if it holds more than `stage_limit`: grown under a
    /// larger limit, when fewer files were open, or for a line larger than the limit. Kept up
    /// to twice the limit, a file whose buffer doubled to 3.7 KB for 920-byte events kept it
    /// when the limit fell to 2.6 KB.
    fn give_back_staging_over(&mut self, stage_limit: usize) {
        if self.staged.capacity() > stage_limit {
            drop(std::mem::take(&mut self.staged));
        }
    }

    /// Bytes appended but not yet compressed.
    pub fn staged_len(&self) -> usize {
        self.staged.len()
    }

    /// Sync-flushes the stream to a byte boundary and writes it out (without fsync), returning
    /// the state a checkpoint records. A cold file stays cold: if it had staged lines, a
    /// compressor is borrowed for them and dropped again.
    pub fn sync_flush(&mut self) -> io::Result<StreamState> {
        let was_cold = !self.is_hot();
        if self.unflushed {
            self.compress_staged(FlushCompress::Sync)?;
            self.unflushed = false;
        }
        if let Some(hot) = &mut self.hot {
            self.unsynced |= hot.write_out()?;
        }
        if was_cold {
            self.release_hot();
        }
        Ok(self.state())
    }

    /// fsyncs what was written, if anything was since the last time.
    pub fn sync_data(&mut self) -> io::Result<()> {
        if !self.unsynced {
            return Ok(());
        }
        match (&self.hot, &self.kept) {
            (Some(hot), _) => hot.file.sync_data()?,
            (None, Some(kept)) => kept.file().sync_data()?,
            (None, None) => File::open(&self.path)?.sync_data()?,
        }
        self.unsynced = false;
        Ok(())
    }

    /// Sync-flushes and gives back the compressor and the staging memory (the descriptor is kept
    /// while the cap allows); the next compression takes them again.
    pub fn cool(&mut self) -> io::Result<StreamState> {
        let state = self.sync_flush()?;
        self.release_hot();
        give_buffer(std::mem::take(&mut self.staged));
        Ok(state)
    }

    /// Gives back the compressor and the output buffer (everything in it was written) and keeps
    /// the descriptor if the cap allows.
    fn release_hot(&mut self) {
        if let Some(hot) = self.hot.take() {
            debug_assert!(
                hot.out.is_empty(),
                "a file cools only once its output is written"
            );
            give_buffer(hot.out);
            self.kept = KeptDescriptor::keep(hot.file);
        }
    }

    /// The state as of the last sync-flush or cooling; only meaningful right after one.
    pub fn state(&self) -> StreamState {
        debug_assert!(self.staged.is_empty(), "state read with lines still staged");
        StreamState {
            compressed_len: self.compressed_len,
            crc32: self.crc.clone().finalize(),
            uncompressed_len: self.uncompressed_len,
        }
    }

    /// Ends the deflate stream, appends the gzip trailer and fsyncs. Returns the final state:
    /// the length of the finished object and its CRC32.
    pub fn finish(self) -> io::Result<StreamState> {
        self.finish_written()?.sync()
    }

    /// Ends the deflate stream and appends the gzip trailer, and starts writing the file out
    /// without waiting: a batch's files are all finished this way first, then each
    /// [`FinishedFile::sync`]ed, so that their fsyncs wait on writes already under way together
    /// (and on a journaled file system share a journal commit) rather than one after another.
    pub fn finish_written(mut self) -> io::Result<FinishedFile> {
        self.compress_staged(FlushCompress::Finish)?;
        let crc = self.crc.clone().finalize();
        let mut hot = self.hot.take().expect("compress_staged heats the file");
        hot.out.extend_from_slice(&crc.to_le_bytes());
        // ISIZE is the uncompressed length modulo 2^32, as RFC 1952 defines it.
        hot.out
            .extend_from_slice(&(self.uncompressed_len as u32).to_le_bytes());
        self.compressed_len += 8;
        hot.write_out()?;
        start_writeback(&hot.file)?;
        let Hot {
            file,
            compressor,
            out,
        } = hot;
        // The compressor and the buffer go back to this thread's spares now, not after the
        // batch's fsyncs.
        drop(compressor);
        give_buffer(out);
        Ok(FinishedFile {
            file,
            state: StreamState {
                compressed_len: self.compressed_len,
                crc32: crc,
                uncompressed_len: self.uncompressed_len,
            },
        })
    }

    /// Hands the staged lines to the compressor (heating the file if it is cold) with `flush`.
    fn compress_staged(&mut self, flush: FlushCompress) -> io::Result<()> {
        self.heat()?;
        self.crc.update(&self.staged);
        let staged = std::mem::take(&mut self.staged);
        let hot = self.hot.as_mut().expect("just heated");
        let written = hot.compress(&staged, flush)?;
        if hot.out.len() >= WRITE_CHUNK {
            self.unsynced |= hot.write_out()?;
        }
        self.compressed_len += written;
        // Keep the allocation: the next chunk of a hot file reuses it.
        self.staged = staged;
        self.staged.clear();
        Ok(())
    }

    fn heat(&mut self) -> io::Result<()> {
        if self.hot.is_none() {
            let file = match self.kept.take() {
                Some(kept) => kept.into_file(),
                None => Hot::reopen(&self.path, self.compressed_len)?,
            };
            self.hot = Some(Hot {
                file,
                compressor: PooledCompressor::take(self.level),
                out: take_buffer(usize::MAX),
            });
            self.unsynced = true;
        }
        Ok(())
    }
}

/// A file whose gzip stream is complete and written, its fsync still to come.
pub struct FinishedFile {
    file: File,
    state: StreamState,
}

impl FinishedFile {
    /// The final state: the object's length and its CRC32.
    pub fn state(&self) -> StreamState {
        self.state
    }

    /// fsyncs the file; answers its final state.
    pub fn sync(self) -> io::Result<StreamState> {
        self.file.sync_all()?;
        Ok(self.state)
    }
}

/// Asks the kernel to start writing `file`'s dirty pages now, without waiting for them.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on a descriptor `file` keeps open for the call's duration; it
    // touches no memory of ours.
    let result =
        unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Elsewhere the fsync alone writes the file out.
#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File) -> io::Result<()> {
    Ok(())
}

impl Hot {
    /// Opens a cold file whose descriptor was not kept, at its end.
    fn reopen(path: &Path, compressed_len: u64) -> io::Result<File> {
        let mut file = OpenOptions::new().write(true).open(path)?;
        // Anything past the last flush point is from a compressor that no longer exists (a
        // file cools only after writing everything out, so usually there is nothing).
        if file.metadata()?.len() != compressed_len {
            file.set_len(compressed_len)?;
        }
        file.seek(SeekFrom::Start(compressed_len))?;
        Ok(file)
    }

    /// Runs the compressor over `input` with `flush`, appending to `out`; returns bytes produced.
    fn compress(&mut self, mut input: &[u8], flush: FlushCompress) -> io::Result<u64> {
        let compressor = self.compressor.get();
        let start_out = compressor.total_out();
        loop {
            if self.out.capacity() - self.out.len() < 1024 {
                // Deflate output rarely exceeds a quarter of its input on event JSON.
                self.out.reserve((input.len() / 4).clamp(4096, WRITE_CHUNK));
            }
            let before_in = compressor.total_in();
            let status = compressor
                .compress_vec(input, &mut self.out, flush)
                .map_err(io::Error::other)?;
            let consumed = (compressor.total_in() - before_in) as usize;
            input = &input[consumed..];
            let room_left = self.out.len() < self.out.capacity();
            let done = match flush {
                FlushCompress::Finish => status == Status::StreamEnd,
                _ => input.is_empty() && room_left,
            };
            if done {
                break;
            }
        }
        Ok(compressor.total_out() - start_out)
    }

    /// Writes the gathered output; returns whether there was any.
    fn write_out(&mut self) -> io::Result<bool> {
        if self.out.is_empty() {
            return Ok(false);
        }
        self.file.write_all(&self.out)?;
        self.out.clear();
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Small enough that the tests' few hundred lines go through many chunks.
    const STAGE: usize = 1000;

    /// Decodes the first gzip member only and checks nothing follows it.
    fn decode_single_member(path: &Path) -> Vec<u8> {
        let bytes = std::fs::read(path).unwrap();
        let mut decoder = flate2::bufread::GzDecoder::new(&bytes[..]);
        let mut out = Vec::new();
        decoder.read_to_end(&mut out).unwrap();
        let rest = decoder.into_inner();
        assert!(
            rest.is_empty(),
            "{} bytes after the first member",
            rest.len()
        );
        out
    }

    fn lines(range: std::ops::Range<u32>) -> Vec<Vec<u8>> {
        range
            .map(|i| {
                format!(r#"{{"n":{i},"pad":"{}"}}"#, "x".repeat((i % 50) as usize)).into_bytes()
            })
            .collect()
    }

    /// Each test runs on a thread of its own, so the spares seen here are this test's.
    fn spare_buffers() -> Vec<usize> {
        SPARE_BUFFERS.with(|spares| spares.borrow().iter().map(Vec::capacity).collect())
    }

    #[test]
    fn a_cooled_files_buffers_serve_the_next_files_that_heat_on_the_thread() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = GzStreamFile::create(&dir.path().join("a.gz"), 6).unwrap();
        for line in lines(0..200) {
            first.append_line(&line, STAGE).unwrap();
        }
        assert!(spare_buffers().is_empty());
        first.cool().unwrap();
        // Its staging and output buffers, emptied, with their capacity.
        let kept = spare_buffers();
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert!(kept.iter().all(|&capacity| capacity > 0));
        let mut second = GzStreamFile::create(&dir.path().join("b.gz"), 6).unwrap();
        for line in lines(0..200) {
            second.append_line(&line, STAGE).unwrap();
        }
        assert!(spare_buffers().is_empty(), "both taken again");
        // A staging buffer grown under a larger limit is not handed to a file staging less.
        second.cool().unwrap();
        let mut small = GzStreamFile::create(&dir.path().join("c.gz"), 6).unwrap();
        small.append_line(b"{}", 8).unwrap();
        assert_eq!(spare_buffers().len(), 2, "staging starts anew");
        // Finished files give theirs back too, and what is kept stays bounded.
        small.finish().unwrap();
        second.finish().unwrap();
        first.finish().unwrap();
        assert!(spare_buffers().len() <= MAX_SPARE_BUFFERS);
        assert!(spare_buffers()
            .iter()
            .all(|&capacity| capacity <= MAX_SPARE_BUFFER_BYTES));
        for file in ["a.gz", "b.gz", "c.gz"] {
            assert!(!decode_single_member(&dir.path().join(file)).is_empty());
        }
    }

    /// A batch's files are all finished before any is fsynced: each is complete and the
    /// compressors are back in the spares by then, so a batch of hundreds holds none of them
    /// through its fsyncs.
    #[test]
    fn files_finished_before_their_fsyncs_are_complete_and_hold_no_compressor() {
        let dir = tempfile::tempdir().unwrap();
        let spares = || SPARE_COMPRESSORS.with(|spares| spares.borrow().len());
        let before = spares();
        let mut written = Vec::new();
        for name in ["a.gz", "b.gz", "c.gz"] {
            let path = dir.path().join(name);
            let mut file = GzStreamFile::create(&path, 6).unwrap();
            for line in lines(0..300) {
                file.append_line(&line, STAGE).unwrap();
            }
            written.push((path, file.finish_written().unwrap()));
        }
        assert!(
            spares() >= before.max(1),
            "compressors given back before the fsyncs"
        );
        let expected: Vec<u8> = lines(0..300)
            .into_iter()
            .flat_map(|line| [line, b"\n".to_vec()].concat())
            .collect();
        for (path, finished) in written {
            assert_eq!(
                decode_single_member(&path),
                expected,
                "complete before its fsync"
            );
            let state = finished.state();
            assert_eq!(finished.sync().unwrap(), state);
            assert_eq!(
                state.compressed_len,
                std::fs::metadata(&path).unwrap().len()
            );
            assert_eq!(state.crc32, crc32fast::hash(&expected));
        }
    }

    #[test]
    fn a_finished_file_is_one_gzip_member_with_every_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.gz");
        let mut file = GzStreamFile::create(&path, 6).unwrap();
        let mut expected = Vec::new();
        for line in lines(0..5000) {
            file.append_line(&line, STAGE).unwrap();
            expected.extend_from_slice(&line);
            expected.push(b'\n');
        }
        let state = file.finish().unwrap();
        assert_eq!(
            state.compressed_len,
            std::fs::metadata(&path).unwrap().len()
        );
        assert_eq!(state.uncompressed_len, expected.len() as u64);
        assert_eq!(state.crc32, crc32fast::hash(&expected));
        assert_eq!(decode_single_member(&path), expected);
    }

    #[test]
    fn resuming_after_a_crash_truncates_to_the_checkpoint_and_stays_one_member() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.gz");
        let mut file = GzStreamFile::create(&path, 6).unwrap();
        let mut expected = Vec::new();
        for line in lines(0..1000) {
            file.append_line(&line, STAGE).unwrap();
            expected.extend_from_slice(&line);
            expected.push(b'\n');
        }
        let state = file.sync_flush().unwrap();
        file.sync_data().unwrap();
        // Written after the checkpoint, then the process dies: these must vanish.
        for line in lines(5000..6000) {
            file.append_line(&line, STAGE).unwrap();
        }
        file.sync_flush().unwrap();
        drop(file);

        let mut file = GzStreamFile::resume(&path, 6, state).unwrap();
        assert!(!file.is_hot());
        for line in lines(1000..2000) {
            file.append_line(&line, STAGE).unwrap();
            expected.extend_from_slice(&line);
            expected.push(b'\n');
        }
        // Cooling and reheating mid-stream joins a third compressor's output to the stream.
        file.cool().unwrap();
        for line in lines(2000..2500) {
            file.append_line(&line, STAGE).unwrap();
            expected.extend_from_slice(&line);
            expected.push(b'\n');
        }
        let final_state = file.finish().unwrap();
        assert_eq!(final_state.crc32, crc32fast::hash(&expected));
        assert_eq!(decode_single_member(&path), expected);
    }

    #[test]
    fn a_cold_file_can_be_finished_and_an_empty_one_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cold.gz");
        let mut file = GzStreamFile::create(&path, 1).unwrap();
        file.append_line(b"only", STAGE).unwrap();
        file.cool().unwrap();
        file.finish().unwrap();
        assert_eq!(decode_single_member(&path), b"only\n");

        let empty = dir.path().join("empty.gz");
        GzStreamFile::create(&empty, 6).unwrap().finish().unwrap();
        assert_eq!(decode_single_member(&empty), b"");
    }

    #[test]
    fn staged_lines_reach_the_file_at_a_sync_flush_and_a_cold_file_stays_cold() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("staged.gz");
        let mut file = GzStreamFile::create(&path, 6).unwrap();
        assert!(
            !file.is_hot(),
            "a new file holds no compressor until it has a chunk"
        );
        assert!(!file.append_line(b"one", MAX_STAGE_BYTES).unwrap());
        assert_eq!(file.staged_len(), 4);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 10, "header only");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "raw events are for the archiver's eyes only"
        );

        let state = file.sync_flush().unwrap();
        assert!(
            !file.is_hot(),
            "a flush borrows a compressor and drops it again"
        );
        assert_eq!(file.staged_len(), 0);
        assert_eq!(
            state.compressed_len,
            std::fs::metadata(&path).unwrap().len()
        );
        assert_eq!(state.crc32, crc32fast::hash(b"one\n"));

        // A chunk reaching the limit heats the file, and says so once.
        assert!(file.append_line(&[b'x'; 40], 32).unwrap());
        assert!(file.is_hot());
        assert!(!file.append_line(&[b'y'; 40], 32).unwrap());
        file.cool().unwrap();
        assert_eq!(
            file.staged.capacity(),
            0,
            "cooling gives the staging memory back"
        );
        let mut expected = b"one\n".to_vec();
        expected.extend_from_slice(&[b'x'; 40]);
        expected.push(b'\n');
        expected.extend_from_slice(&[b'y'; 40]);
        expected.push(b'\n');
        file.finish().unwrap();
        assert_eq!(decode_single_member(&path), expected);
    }

    /// Fitted to a lower limit, a file compresses the lines staged up to it (a hot file stays
    /// hot, a cold one borrows a compressor and stays cold), shrinks a buffer holding fewer,
    /// gives back an empty one; every line reaches the file, in order.
    #[test]
    fn a_file_fitted_to_a_lower_limit_keeps_every_line_and_its_temperature() {
        let dir = tempfile::tempdir().unwrap();
        let limit = 2_048;
        for case in ["hot", "cold", "below the limit", "empty"] {
            let path = dir.path().join(format!("{case}.gz"));
            let mut file = GzStreamFile::create(&path, 6).unwrap();
            let mut expected = Vec::new();
            let mut append = |file: &mut GzStreamFile, lines: Vec<Vec<u8>>, limit: usize| {
                for line in lines {
                    file.append_line(&line, limit).unwrap();
                    expected.extend_from_slice(&line);
                    expected.push(b'\n');
                }
            };
            match case {
                "hot" => {
                    append(&mut file, lines(0..40), STAGE);
                    assert!(file.is_hot());
                    append(&mut file, lines(40..140), MAX_STAGE_BYTES);
                }
                "cold" => append(&mut file, lines(0..100), MAX_STAGE_BYTES),
                "below the limit" => {
                    append(&mut file, lines(0..5), MAX_STAGE_BYTES);
                    file.staged.reserve(32 << 10);
                }
                _ => file.staged.reserve(32 << 10),
            }
            let (was_hot, staged) = (file.is_hot(), file.staged.len());
            assert!(file.staged.capacity() > limit, "{case}");
            file.fit_staging(limit).unwrap();
            assert_eq!(file.is_hot(), was_hot, "{case}");
            assert!(file.staged.capacity() <= limit, "{case}");
            if staged < limit {
                assert_eq!(file.staged.len(), staged, "{case}: nothing to compress yet");
            } else {
                assert!(file.staged.is_empty(), "{case}");
            }
            append(&mut file, lines(200..210), limit);
            file.finish().unwrap();
            assert_eq!(decode_single_member(&path), expected, "{case}");
        }
    }

    #[test]
    fn a_buffer_grown_under_a_higher_limit_is_given_back_at_its_next_chunk() {
        // As files open, the limit falls (12,800 files: from 16 KiB to 2.6 KB); a file whose
        // buffer doubled to 3.7 KB for typical 920-byte events must not keep it, or a worker's
        // files hold up to twice its share of the budget.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.gz");
        let mut file = GzStreamFile::create(&path, 6).unwrap();
        let line = vec![b'x'; 920];
        for _ in 0..5 {
            file.append_line(&line, 4_096).unwrap();
        }
        assert!(file.staged.capacity() > 2_662, "grown past the next limit");
        for n in 0..6 {
            file.append_line(&line, 2_662).unwrap();
            if n >= 2 {
                assert!(
                    file.staged.capacity() <= 2_662,
                    "line {n}: {} bytes held for a limit of 2,662",
                    file.staged.capacity()
                );
            }
        }
        file.finish().unwrap();
        assert_eq!(decode_single_member(&path).len(), 11 * 921);
    }

    /// A file's staging buffer holds a chunk at the limit and no more (a line larger than the
    /// limit excepted), whatever the lines' lengths: twelve thousand files stay within the
    /// staging budget. Every line still reaches the file, in order.
    #[test]
    fn staging_never_grows_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.gz");
        let mut file = GzStreamFile::create(&path, 6).unwrap();
        let mut expected = Vec::new();
        // The limit moves as files open and close: after its first chunk at a new limit, a
        // file holds at most that limit.
        for (phase, limit) in [2_621usize, 1_024, 4_096, 1_500].into_iter().enumerate() {
            for n in 0..500u32 {
                let line = format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat((n % 300) as usize));
                file.append_line(line.as_bytes(), limit).unwrap();
                if n >= 50 {
                    assert!(
                        file.staged.capacity() <= limit,
                        "phase {phase}, line {n}: {} bytes held for a limit of {limit}",
                        file.staged.capacity()
                    );
                }
                expected.push(line);
            }
        }
        let huge = "y".repeat(10_000);
        file.append_line(huge.as_bytes(), 1_024).unwrap();
        expected.push(huge);
        file.finish().unwrap();
        let text = String::from_utf8(decode_single_member(&path)).unwrap();
        assert_eq!(text.lines().collect::<Vec<_>>(), expected);
    }

    fn spare_compressors() -> usize {
        SPARE_COMPRESSORS.with(|spares| spares.borrow().len())
    }

    #[test]
    fn a_cooled_files_compressor_serves_the_next_file_and_both_stay_whole() {
        let dir = tempfile::tempdir().unwrap();
        let paths = [dir.path().join("a.gz"), dir.path().join("b.gz")];
        let mut files: Vec<GzStreamFile> = paths
            .iter()
            .map(|path| GzStreamFile::create(path, 6).unwrap())
            .collect();
        let mut expected = [Vec::new(), Vec::new()];
        let spares_before = spare_compressors();
        for round in 0..20u32 {
            let which = (round % 2) as usize;
            for line in lines(round * 100..round * 100 + 100) {
                files[which].append_line(&line, STAGE).unwrap();
                expected[which].extend_from_slice(&line);
                expected[which].push(b'\n');
            }
            assert!(files[which].is_hot());
            files[which].cool().unwrap();
            assert_eq!(
                spare_compressors(),
                spares_before + 1,
                "the cooled compressor waits for the next file, which takes it"
            );
        }
        for (file, (path, expected)) in files.into_iter().zip(paths.iter().zip(&expected)) {
            file.finish().unwrap();
            assert_eq!(&decode_single_member(path), expected);
        }
    }

    /// The descriptor count is process-wide: tests that fill or rely on it take turns.
    static DESCRIPTOR_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn a_cooled_file_heats_again_on_the_descriptor_it_kept() {
        let _turn = DESCRIPTOR_TESTS
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.gz");
        let mut file = GzStreamFile::create(&path, 6).unwrap();
        let mut expected = Vec::new();
        for line in lines(0..300) {
            file.append_line(&line, STAGE).unwrap();
            expected.extend_from_slice(&line);
            expected.push(b'\n');
        }
        file.cool().unwrap();
        file.sync_data().unwrap();
        // Moved away while cold: a file opened again by its path would not be found.
        let moved = dir.path().join("moved.gz");
        std::fs::rename(&path, &moved).unwrap();
        for line in lines(300..600) {
            file.append_line(&line, STAGE).unwrap();
            expected.extend_from_slice(&line);
            expected.push(b'\n');
        }
        file.finish().unwrap();
        assert_eq!(decode_single_member(&moved), expected);
    }

    #[test]
    fn files_past_the_descriptor_cap_open_again_and_every_file_stays_whole() {
        let _turn = DESCRIPTOR_TESTS
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let count = MAX_KEPT_DESCRIPTORS + 40;
        let paths: Vec<PathBuf> = (0..count)
            .map(|i| dir.path().join(format!("{i}.gz")))
            .collect();
        let mut files: Vec<GzStreamFile> = paths
            .iter()
            .map(|path| GzStreamFile::create(path, 1).unwrap())
            .collect();
        assert!(
            files.iter().filter(|file| file.kept.is_none()).count() >= 40,
            "files past the cap keep no descriptor: they open theirs again when they heat"
        );
        let mut expected = vec![Vec::new(); count];
        for round in 0..3u32 {
            for (i, file) in files.iter_mut().enumerate() {
                for line in lines(round * 30..round * 30 + 30) {
                    file.append_line(&line, 200).unwrap();
                    expected[i].extend_from_slice(&line);
                    expected[i].push(b'\n');
                }
                file.cool().unwrap();
                assert!(KEPT_DESCRIPTORS.load(Ordering::Relaxed) <= MAX_KEPT_DESCRIPTORS);
            }
        }
        for (file, (path, expected)) in files.into_iter().zip(paths.iter().zip(&expected)) {
            file.finish().unwrap();
            assert_eq!(&decode_single_member(path), expected);
        }
        // Other tests of this binary may hold a few of their own.
        assert!(
            KEPT_DESCRIPTORS.load(Ordering::Relaxed) < 64,
            "finished files give their descriptors back"
        );
    }

    #[test]
    fn resume_refuses_a_file_shorter_than_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short.gz");
        std::fs::write(&path, GZIP_HEADER).unwrap();
        let state = StreamState {
            compressed_len: 100,
            crc32: 0,
            uncompressed_len: 5,
        };
        assert!(GzStreamFile::resume(&path, 6, state).is_err());
    }
}
