//! An archived object's content as a reader gets it: exactly the first gzip member or zstd
//! frame, a line at a time as it inflates. `verify` checks objects with it and `forget`
//! rewrites them.

use crate::layout::Codec;

/// An object's content, decoded as its key's extension says: exactly the first gzip member or
/// zstd frame (what a reader that stops there gets), read as it is inflated; `trailing` tells,
/// once the content is read to its end, whether bytes follow that member or frame.
pub fn decode_object<'a>(key: &str, bytes: &'a [u8]) -> Result<DecodedObject<'a>, String> {
    match Codec::of_key(key) {
        Some(Codec::Zstd) => {
            let frame = zstd::zstd_safe::find_frame_compressed_size(bytes).map_err(|code| {
                format!(
                    "not a valid zstd frame ({})",
                    zstd::zstd_safe::get_error_name(code)
                )
            })?;
            let decoder = zstd::stream::read::Decoder::with_buffer(&bytes[..frame])
                .map_err(|err| format!("not a valid zstd frame: {err}"))?
                .single_frame();
            Ok(DecodedObject::Zstd {
                content: std::io::BufReader::new(decoder),
                trailing: frame < bytes.len(),
            })
        }
        _ => Ok(DecodedObject::Gzip(Box::new(std::io::BufReader::new(
            flate2::bufread::GzDecoder::new(bytes),
        )))),
    }
}

pub enum DecodedObject<'a> {
    Gzip(Box<std::io::BufReader<flate2::bufread::GzDecoder<&'a [u8]>>>),
    Zstd {
        content: std::io::BufReader<zstd::stream::read::Decoder<'a, &'a [u8]>>,
        trailing: bool,
    },
}

impl DecodedObject<'_> {
    pub fn content(&mut self) -> &mut dyn std::io::BufRead {
        match self {
            DecodedObject::Gzip(content) => content,
            DecodedObject::Zstd { content, .. } => content,
        }
    }

    /// Reads the next line (with its line break, if it has one) into `line`, cleared first;
    /// `false` at the end. An error names the format the bytes are not valid as.
    pub fn next_line(&mut self, line: &mut Vec<u8>) -> Result<bool, String> {
        line.clear();
        let format = match self {
            DecodedObject::Gzip(_) => "gzip member",
            DecodedObject::Zstd { .. } => "zstd frame",
        };
        match self.content().read_until(b'\n', line) {
            Ok(read) => Ok(read > 0),
            Err(err) => Err(format!("not a valid {format}: {err}")),
        }
    }

    /// Whether bytes follow the member or frame (valid once the content was read to its end).
    pub fn trailing(self) -> bool {
        match self {
            DecodedObject::Gzip(content) => !content.into_inner().into_inner().is_empty(),
            DecodedObject::Zstd { trailing, .. } => trailing,
        }
    }
}
