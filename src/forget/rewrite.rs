//! One archived object without the lines of forgotten users: read a line at a time as it
//! inflates, each line judged by the ids it names (an event's top-level `userId` and
//! `anonymousId`, a dead letter's record and Kafka key, as routing matches them), the others
//! written to a new object of the same codec. Blocking (inflate, deflate, file writes): run it
//! off the async threads.

use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::index::IdFilter;
use crate::layout::Codec;
use crate::suppress::{dead_letter_ids, key_of, top_level_ids, Suppression};

/// What an object holds, as its batch manifest records it: lines and the CRC32 of its
/// uncompressed bytes (the gzip trailer's), which a rewrite changes and `verify` checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Content {
    pub records: u64,
    pub uncompressed_bytes: u64,
    /// Hex, as manifests write it.
    pub crc32: String,
}

/// An object's content before and after the lines of the listed users are taken out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filtered {
    pub old: Content,
    pub new: Content,
    /// The ids the kept lines name, as the archiver's id index holds them (`crate::index`):
    /// what the object's index entry says once it is rewritten, so the index no longer
    /// answers for the forgotten users.
    pub kept_ids: IdFilter,
}

impl Filtered {
    /// Lines taken out.
    pub fn removed(&self) -> u64 {
        self.old.records - self.new.records
    }
}

/// Compression levels of rewritten objects: the archiver's own (`buffer.compression_level`,
/// `output.zstd_level`), so a rewritten object is as a new one would be.
#[derive(Debug, Clone, Copy)]
pub struct Levels {
    pub gzip: u32,
    pub zstd: i32,
}

/// Whether a line of an object names a user on `list`.
pub fn names_listed_user(list: &Suppression, line: &[u8], dead_letter: bool) -> bool {
    line_ids(line, dead_letter)
        .iter()
        .any(|id| list.matches(id))
}

/// The ids a line of an object names, as routing matches them.
fn line_ids(line: &[u8], dead_letter: bool) -> Vec<String> {
    if dead_letter {
        dead_letter_ids(line)
    } else {
        top_level_ids(line)
    }
}

/// Reads the object `key` holds (`bytes`) and, with `out`, writes it again without the lines
/// that name a user on `list`, compressed as the key says; `pledged` is the size of those lines
/// when known (a zstd frame records it, as the archiver's do). An object that is no valid gzip
/// member or zstd frame is an error naming why: it is left as it is.
pub fn filter_object(
    key: &str,
    bytes: &[u8],
    dead_letter: bool,
    list: &Suppression,
    out: Option<(std::fs::File, Levels, Option<u64>)>,
) -> Result<Filtered, String> {
    let codec = Codec::of_key(key).unwrap_or(Codec::Gzip);
    let mut writer = out
        .map(|(file, levels, pledged)| Writer::new(file, codec, levels, pledged))
        .transpose()
        .map_err(|err| format!("cannot start the new object: {err}"))?;
    let mut decoded = crate::object::decode_object(key, bytes)?;
    let (mut old, mut new) = (Tally::default(), Tally::default());
    let mut kept_ids = IdFilter::default();
    let mut line = Vec::new();
    while decoded.next_line(&mut line)? {
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        old.add(&line, !text.is_empty());
        let ids = if text.is_empty() {
            Vec::new()
        } else {
            line_ids(text, dead_letter)
        };
        if ids.iter().any(|id| list.matches(id)) {
            continue;
        }
        for id in &ids {
            kept_ids.insert(key_of(id));
        }
        new.add(&line, !text.is_empty());
        if let Some(writer) = writer.as_mut() {
            writer
                .write_all(&line)
                .map_err(|err| format!("cannot write the new object: {err}"))?;
        }
    }
    if decoded.trailing() {
        return Err("bytes follow the first gzip member or zstd frame".into());
    }
    if let Some(writer) = writer {
        writer
            .finish()
            .map_err(|err| format!("cannot finish the new object: {err}"))?;
    }
    Ok(Filtered {
        old: old.content(),
        new: new.content(),
        kept_ids,
    })
}

#[derive(Default)]
struct Tally {
    records: u64,
    bytes: u64,
    crc: crc32fast::Hasher,
}

impl Tally {
    fn add(&mut self, line: &[u8], counted: bool) {
        self.records += u64::from(counted);
        self.bytes += line.len() as u64;
        self.crc.update(line);
    }

    fn content(self) -> Content {
        Content {
            records: self.records,
            uncompressed_bytes: self.bytes,
            crc32: format!("{:08x}", self.crc.finalize()),
        }
    }
}

/// The new object, compressed as the archiver compresses its own.
enum Writer {
    Gzip(flate2::write::GzEncoder<std::fs::File>),
    Zstd(zstd::stream::write::Encoder<'static, std::fs::File>),
}

impl Writer {
    fn new(
        file: std::fs::File,
        codec: Codec,
        levels: Levels,
        pledged: Option<u64>,
    ) -> std::io::Result<Writer> {
        Ok(match codec {
            Codec::Gzip => Writer::Gzip(flate2::write::GzEncoder::new(
                file,
                flate2::Compression::new(levels.gzip),
            )),
            Codec::Zstd => {
                let mut encoder = zstd::stream::write::Encoder::new(file, levels.zstd)?;
                encoder.include_checksum(true)?;
                if let Some(size) = pledged {
                    encoder.set_pledged_src_size(Some(size))?;
                    encoder.include_contentsize(true)?;
                }
                Writer::Zstd(encoder)
            }
        })
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Writer::Gzip(encoder) => encoder.write_all(bytes),
            Writer::Zstd(encoder) => encoder.write_all(bytes),
        }
    }

    /// Ends the stream and makes it durable: the object is put from this file.
    fn finish(self) -> std::io::Result<()> {
        let file = match self {
            Writer::Gzip(encoder) => encoder.finish()?,
            Writer::Zstd(encoder) => encoder.finish()?,
        };
        file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suppress::hash_id;

    pub fn gzip(text: &str) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(text.as_bytes()).unwrap();
        encoder.finish().unwrap()
    }

    fn content(text: &str) -> Content {
        Content {
            records: text.lines().count() as u64,
            uncompressed_bytes: text.len() as u64,
            crc32: format!("{:08x}", crc32fast::hash(text.as_bytes())),
        }
    }

    const LEVELS: Levels = Levels { gzip: 6, zstd: 3 };

    #[test]
    fn the_lines_of_listed_users_are_taken_out_and_the_rest_kept_byte_for_byte() {
        let list = Suppression::new([hash_id("u1"), hash_id("a9")]);
        let kept = "{\"userId\":\"u2\",\"n\":1}\n{\"anonymousId\":\"a1\",\"userId\":\"u3\"}\n";
        let text = format!(
            "{{\"userId\":\"u1\",\"n\":0}}\n{}{{\"anonymousId\":\"a9\"}}\n",
            kept
        );
        for (key, bytes) in [
            ("segment-logs/s/d/t-0-0.gz", gzip(&text)),
            (
                "segment-logs/s/d/t-0-0.zst",
                zstd::encode_all(text.as_bytes(), 3).unwrap(),
            ),
        ] {
            let dir = std::env::temp_dir().join(format!("ksa-rewrite-{}", fastrand::u64(..)));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("new");
            let file = std::fs::File::create(&path).unwrap();
            let filtered = filter_object(
                key,
                &bytes,
                false,
                &list,
                Some((file, LEVELS, Some(kept.len() as u64))),
            )
            .unwrap();
            assert_eq!(filtered.old, content(&text), "{key}");
            assert_eq!(filtered.new, content(kept), "{key}");
            assert_eq!(filtered.removed(), 2);
            let written = std::fs::read(&path).unwrap();
            let again = filter_object(key, &written, false, &Suppression::new([]), None).unwrap();
            assert_eq!(
                again.old,
                content(kept),
                "{key}: the new object holds the kept lines"
            );
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn a_dead_letter_is_judged_by_its_record_and_key_and_a_damaged_object_is_refused() {
        let list = Suppression::new([hash_id("u1")]);
        let letter = r#"{"reason":"no-source","key_base64":"dTE=","payload_base64":"e30="}"#;
        assert!(names_listed_user(&list, letter.as_bytes(), true));
        assert!(!names_listed_user(&list, letter.as_bytes(), false));
        let mut bytes = gzip("{\"userId\":\"u1\"}\n");
        bytes.truncate(bytes.len() - 6);
        assert!(filter_object("k.gz", &bytes, false, &list, None).is_err());
        let mut trailing = gzip("{}\n");
        trailing.extend(gzip("{}\n"));
        assert!(filter_object("k.gz", &trailing, false, &list, None).is_err());
    }
}
