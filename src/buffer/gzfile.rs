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
//! All of this is blocking file I/O: it runs on the buffer worker threads, never on the async
//! executor.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use flate2::{Compress, Compression, FlushCompress, Status};
use serde::{Deserialize, Serialize};

/// gzip header: magic, deflate, no flags, mtime 0 (so replays produce identical bytes), no extra
/// flags, OS unknown.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// Compressed output is gathered up to this size before one write to the file.
const WRITE_CHUNK: usize = 64 << 10;

/// The durable state of a file at its last sync-flush: enough to truncate and continue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    /// Bytes of the file that hold a valid, byte-aligned deflate prefix (header included).
    pub compressed_len: u64,
    /// CRC32 of all uncompressed bytes so far.
    pub crc32: u32,
    /// Uncompressed bytes so far.
    pub uncompressed_len: u64,
}

/// A gzip file open for appending.
pub struct GzStreamFile {
    path: PathBuf,
    level: Compression,
    /// `None` while cold: closed to save a file descriptor and ~300 KB of compressor state.
    hot: Option<Hot>,
    crc: crc32fast::Hasher,
    uncompressed_len: u64,
    /// Bytes in the file plus bytes waiting in `hot.out`.
    compressed_len: u64,
    /// Lines appended since the last sync-flush; a flush without them would only add an empty
    /// block to the stream.
    unflushed: bool,
}

struct Hot {
    file: File,
    compressor: Compress,
    out: Vec<u8>,
}

impl GzStreamFile {
    /// Creates the file (replacing any leftover of a previous attempt) with its gzip header.
    pub fn create(path: &Path, level: u32) -> io::Result<GzStreamFile> {
        let mut file = File::create(path)?;
        file.write_all(&GZIP_HEADER)?;
        Ok(GzStreamFile {
            path: path.to_path_buf(),
            level: Compression::new(level),
            hot: Some(Hot::new(file, Compression::new(level))),
            crc: crc32fast::Hasher::new(),
            uncompressed_len: 0,
            compressed_len: GZIP_HEADER.len() as u64,
            unflushed: false,
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
            crc: crc32fast::Hasher::new_with_initial_len(state.crc32, state.uncompressed_len),
            uncompressed_len: state.uncompressed_len,
            compressed_len: state.compressed_len,
            unflushed: false,
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

    /// Appends `line` and a newline.
    pub fn append_line(&mut self, line: &[u8]) -> io::Result<()> {
        self.crc.update(line);
        self.crc.update(b"\n");
        self.uncompressed_len += line.len() as u64 + 1;
        self.unflushed = true;
        let hot = self.heat()?;
        let mut written = hot.compress(line, FlushCompress::None)?;
        written += hot.compress(b"\n", FlushCompress::None)?;
        if hot.out.len() >= WRITE_CHUNK {
            hot.write_out()?;
        }
        self.compressed_len += written;
        Ok(())
    }

    /// Sync-flushes the stream to a byte boundary and writes it out (without fsync), returning
    /// the state a checkpoint records. A cold file is already flushed.
    pub fn sync_flush(&mut self) -> io::Result<StreamState> {
        if let Some(hot) = &mut self.hot {
            if self.unflushed {
                self.compressed_len += hot.compress(&[], FlushCompress::Sync)?;
                self.unflushed = false;
            }
            hot.write_out()?;
        }
        Ok(self.state())
    }

    /// fsyncs what was written.
    pub fn sync_data(&self) -> io::Result<()> {
        match &self.hot {
            Some(hot) => hot.file.sync_data(),
            None => File::open(&self.path)?.sync_data(),
        }
    }

    /// Sync-flushes and drops the compressor and file handle; the next append reopens them.
    pub fn cool(&mut self) -> io::Result<StreamState> {
        let state = self.sync_flush()?;
        self.hot = None;
        Ok(state)
    }

    /// The state as of the last sync-flush or cooling; only meaningful right after one.
    pub fn state(&self) -> StreamState {
        StreamState {
            compressed_len: self.compressed_len,
            crc32: self.crc.clone().finalize(),
            uncompressed_len: self.uncompressed_len,
        }
    }

    /// Ends the deflate stream, appends the gzip trailer and fsyncs. Returns the final state:
    /// the length of the finished object and its CRC32.
    pub fn finish(mut self) -> io::Result<StreamState> {
        let level = self.level;
        let hot = match self.hot.take() {
            Some(hot) => hot,
            None => Hot::reopen(&self.path, self.compressed_len, level)?,
        };
        let mut hot = hot;
        self.compressed_len += hot.compress(&[], FlushCompress::Finish)?;
        let crc = self.crc.clone().finalize();
        hot.out.extend_from_slice(&crc.to_le_bytes());
        // ISIZE is the uncompressed length modulo 2^32, as RFC 1952 defines it.
        hot.out
            .extend_from_slice(&(self.uncompressed_len as u32).to_le_bytes());
        self.compressed_len += 8;
        hot.write_out()?;
        hot.file.sync_all()?;
        Ok(StreamState {
            compressed_len: self.compressed_len,
            crc32: crc,
            uncompressed_len: self.uncompressed_len,
        })
    }

    fn heat(&mut self) -> io::Result<&mut Hot> {
        if self.hot.is_none() {
            self.hot = Some(Hot::reopen(&self.path, self.compressed_len, self.level)?);
        }
        Ok(self.hot.as_mut().expect("just heated"))
    }
}

impl Hot {
    fn new(file: File, level: Compression) -> Hot {
        Hot {
            file,
            // Raw deflate: the gzip header and trailer are ours, so streams can be continued.
            compressor: Compress::new(level, false),
            out: Vec::with_capacity(WRITE_CHUNK + 1024),
        }
    }

    fn reopen(path: &Path, compressed_len: u64, level: Compression) -> io::Result<Hot> {
        let mut file = OpenOptions::new().write(true).open(path)?;
        // Anything past the last flush point is from a compressor that no longer exists.
        file.set_len(compressed_len)?;
        file.seek(SeekFrom::End(0))?;
        Ok(Hot::new(file, level))
    }

    /// Runs the compressor over `input` with `flush`, appending to `out`; returns bytes produced.
    fn compress(&mut self, mut input: &[u8], flush: FlushCompress) -> io::Result<u64> {
        let start_out = self.compressor.total_out();
        loop {
            if self.out.capacity() - self.out.len() < 1024 {
                self.out.reserve(WRITE_CHUNK);
            }
            let before_in = self.compressor.total_in();
            let status = self
                .compressor
                .compress_vec(input, &mut self.out, flush)
                .map_err(io::Error::other)?;
            let consumed = (self.compressor.total_in() - before_in) as usize;
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
        Ok(self.compressor.total_out() - start_out)
    }

    fn write_out(&mut self) -> io::Result<()> {
        self.file.write_all(&self.out)?;
        self.out.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

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

    #[test]
    fn a_finished_file_is_one_gzip_member_with_every_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.gz");
        let mut file = GzStreamFile::create(&path, 6).unwrap();
        let mut expected = Vec::new();
        for line in lines(0..5000) {
            file.append_line(&line).unwrap();
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
            file.append_line(&line).unwrap();
            expected.extend_from_slice(&line);
            expected.push(b'\n');
        }
        let state = file.sync_flush().unwrap();
        file.sync_data().unwrap();
        // Written after the checkpoint, then the process dies: these must vanish.
        for line in lines(5000..6000) {
            file.append_line(&line).unwrap();
        }
        file.sync_flush().unwrap();
        drop(file);

        let mut file = GzStreamFile::resume(&path, 6, state).unwrap();
        assert!(!file.is_hot());
        for line in lines(1000..2000) {
            file.append_line(&line).unwrap();
            expected.extend_from_slice(&line);
            expected.push(b'\n');
        }
        // Cooling and reheating mid-stream joins a third compressor's output to the stream.
        file.cool().unwrap();
        for line in lines(2000..2500) {
            file.append_line(&line).unwrap();
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
        file.append_line(b"only").unwrap();
        file.cool().unwrap();
        file.finish().unwrap();
        assert_eq!(decode_single_member(&path), b"only\n");

        let empty = dir.path().join("empty.gz");
        GzStreamFile::create(&empty, 6).unwrap().finish().unwrap();
        assert_eq!(decode_single_member(&empty), b"");
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
