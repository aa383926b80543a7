//! Record headers as the bytes a producer sent. Kafka header keys are arbitrary bytes on the
//! wire, and any producer (a Go client, the raw protocol) can send a key that is not UTF-8;
//! rdkafka's safe API turns such a key into a `&str` with `unwrap()`, which would panic the poll
//! loop on one hostile message, again after every restart. Every place that reads headers from a
//! consumed message (the archiver's poll loop, `restore`'s read-back) and every place that writes
//! a key it did not choose (`restore` re-driving a dead letter) goes through here instead.

use std::ffi::CStr;
use std::os::raw::{c_char, c_void};

use rdkafka::bindings as rdsys;
use rdkafka::message::{BorrowedHeaders, BorrowedMessage, OwnedHeaders};
use rdkafka::types::RDKafkaRespErr;

/// One header: its key and value (`None`: a null value), as bytes.
pub type RawHeader = (Vec<u8>, Option<Vec<u8>>);

/// The headers of a consumed message, in order, keys and values as bytes.
pub fn read_all(message: &BorrowedMessage<'_>) -> Vec<RawHeader> {
    let mut headers = Vec::new();
    visit(message, |key, value| {
        headers.push((key.to_vec(), value.map(<[u8]>::to_vec)));
        true
    });
    headers
}

/// The value of the first header whose key is `key`, if any (`Some(None)`: a null value).
pub fn find(message: &BorrowedMessage<'_>, key: &[u8]) -> Option<Option<Vec<u8>>> {
    let mut found = None;
    visit(message, |name, value| {
        if name == key {
            found = Some(value.map(<[u8]>::to_vec));
            false
        } else {
            true
        }
    });
    found
}

/// The headers of an `OwnedHeaders`, keys and values as bytes (what a test wrote).
#[cfg(test)]
pub fn read_owned(headers: &OwnedHeaders) -> Vec<RawHeader> {
    let mut all = Vec::new();
    // SAFETY: the native object `headers` owns, valid for this borrow (see `native_of`).
    unsafe {
        visit_native(native_of(headers), |key, value| {
            all.push((key.to_vec(), value.map(<[u8]>::to_vec)));
            true
        })
    };
    all
}

/// Calls `each(key, value)` for the message's headers in order while it returns `true`.
fn visit(message: &BorrowedMessage<'_>, each: impl FnMut(&[u8], Option<&[u8]>) -> bool) {
    let mut native: *mut rdsys::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: the message pointer is valid for the borrow of `message`; librdkafka keeps the
    // headers it returns owned by the message, so they live as long as that borrow too.
    let err = unsafe { rdsys::rd_kafka_message_headers(message.ptr(), &mut native) };
    if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || native.is_null() {
        // `_NOENT`: the message has no headers.
        return;
    }
    // SAFETY: as above.
    unsafe { visit_native(native, each) }
}

/// # Safety
/// `native` is a valid headers object for the whole call.
unsafe fn visit_native(
    native: *const rdsys::rd_kafka_headers_t,
    mut each: impl FnMut(&[u8], Option<&[u8]>) -> bool,
) {
    let count = rdsys::rd_kafka_header_cnt(native);
    for index in 0..count {
        let mut name: *const c_char = std::ptr::null();
        let mut value: *const c_void = std::ptr::null();
        let mut size: usize = 0;
        let err = rdsys::rd_kafka_header_get_all(native, index, &mut name, &mut value, &mut size);
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        // librdkafka stores every key NUL-terminated; the value is `size` bytes, or null.
        let key = CStr::from_ptr(name).to_bytes();
        let value =
            (!value.is_null()).then(|| std::slice::from_raw_parts(value.cast::<u8>(), size));
        if !each(key, value) {
            return;
        }
    }
}

/// The native headers object of `headers`. rdkafka's `BorrowedHeaders` is that object seen
/// through a reference (its own `as_borrowed` is a pointer cast), so the reference's address is
/// the pointer librdkafka takes; the round-trip test below fails if a release of rdkafka changes
/// that.
fn native_of(headers: &OwnedHeaders) -> *mut rdsys::rd_kafka_headers_t {
    headers.as_borrowed() as *const BorrowedHeaders as *mut rdsys::rd_kafka_headers_t
}

/// `headers` with one more header whose key is any bytes (rdkafka's `insert` takes a `&str`).
pub fn insert(headers: OwnedHeaders, key: &[u8], value: Option<&[u8]>) -> OwnedHeaders {
    let (value_ptr, value_len) = match value {
        Some(value) => (value.as_ptr().cast::<c_void>(), value.len() as isize),
        None => (std::ptr::null(), 0),
    };
    let native = native_of(&headers);
    // SAFETY: `native` is the writable headers object `headers` owns; librdkafka copies the key
    // (`key.len()` bytes) and the value.
    let err = unsafe {
        rdsys::rd_kafka_header_add(
            native,
            key.as_ptr().cast::<c_char>(),
            key.len() as isize,
            value_ptr,
            value_len,
        )
    };
    // Adding fails only on a read-only headers object, which an `OwnedHeaders` never is.
    debug_assert_eq!(err, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR);
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, Headers as _};

    #[test]
    fn any_key_bytes_round_trip() {
        let headers = OwnedHeaders::new().insert(Header {
            key: "source-id",
            value: Some("a"),
        });
        let headers = insert(headers, b"\xff\xfek", Some(b"v"));
        let headers = insert(headers, b"", None);
        assert_eq!(headers.count(), 3);
        assert_eq!(
            read_owned(&headers),
            vec![
                (b"source-id".to_vec(), Some(b"a".to_vec())),
                (b"\xff\xfek".to_vec(), Some(b"v".to_vec())),
                (Vec::new(), None),
            ]
        );
        // What rdkafka itself reads of a key it could have written: the same bytes.
        assert_eq!(headers.get(0).key, "source-id");
    }
}
