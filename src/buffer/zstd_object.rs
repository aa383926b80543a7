//! zstd objects (`output.compression = "zstd"`): a sealed file, finished as a single gzip member
//! like every local file, is re-encoded as one zstd frame with its content size and a checksum
//! in the frame, then replaces the gzip file. One frame per object, so a reader that stops after
//! the first frame (Python `zstandard`'s `decompress`, some stream readers) still gets every line.
//!
//! Local files stay gzip: their sync-flush points are what checkpoints and crash recovery rely
//! on (`gzfile.rs`), and a zstd frame cannot be continued by a new compressor after a restart.
//! The re-encoding runs on the buffer worker thread at seal time, like the gzip finish.

use std::fs::{self, File};
use std::io::{self, BufReader, Write};
use std::path::Path;

/// Re-encodes the finished gzip file `gz` (`uncompressed_len` bytes of lines) as the zstd object
/// `zst`, fsynced, and removes `gz`. Returns the object's length.
pub fn transcode(gz: &Path, zst: &Path, level: i32, uncompressed_len: u64) -> io::Result<u64> {
    let staging = zst.with_extension("zst.partial");
    let mut lines =
        flate2::read::GzDecoder::new(BufReader::with_capacity(1 << 16, File::open(gz)?));
    let mut encoder =
        zstd::stream::write::Encoder::new(crate::layout::create_private_file(&staging)?, level)?;
    // The size in the frame header lets single-shot readers allocate once; the checksum lets
    // every reader check the content.
    encoder.set_pledged_src_size(Some(uncompressed_len))?;
    encoder.include_contentsize(true)?;
    encoder.include_checksum(true)?;
    let copied = io::copy(&mut lines, &mut encoder)?;
    if copied != uncompressed_len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} holds {copied} bytes of lines, the batch recorded {uncompressed_len}",
                gz.display()
            ),
        ));
    }
    let mut file = encoder.finish()?;
    file.flush()?;
    file.sync_all()?;
    let len = file.metadata()?.len();
    fs::rename(&staging, zst)?;
    fs::remove_file(gz)?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_sealed_file_becomes_one_zstd_frame_holding_every_line() {
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("a.gz");
        let zst = dir.path().join("a.zst");
        let lines: String = (0..5000)
            .map(|n| format!("{{\"messageId\":\"m{n}\",\"type\":\"track\"}}\n"))
            .collect();
        let mut encoder =
            flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::fast());
        encoder.write_all(lines.as_bytes()).unwrap();
        encoder.finish().unwrap();

        let len = transcode(&gz, &zst, 3, lines.len() as u64).unwrap();
        assert!(!gz.exists(), "the gzip file is replaced");
        let bytes = fs::read(&zst).unwrap();
        assert_eq!(bytes.len() as u64, len);
        // One frame, the whole object, with the content size a single-shot reader needs.
        assert_eq!(
            zstd::zstd_safe::find_frame_compressed_size(&bytes),
            Ok(bytes.len())
        );
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&bytes).unwrap(),
            Some(lines.len() as u64)
        );
        let mut decoded = String::new();
        zstd::stream::read::Decoder::new(&bytes[..])
            .unwrap()
            .single_frame()
            .read_to_string(&mut decoded)
            .unwrap();
        assert_eq!(decoded, lines);
    }

    #[test]
    fn a_short_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("a.gz");
        let mut encoder =
            flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::fast());
        encoder.write_all(b"{}\n").unwrap();
        encoder.finish().unwrap();
        let err = transcode(&gz, &dir.path().join("a.zst"), 3, 10).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(gz.exists(), "nothing is removed on a failure");
    }
}
