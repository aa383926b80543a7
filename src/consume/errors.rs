//! Which Kafka errors the archiver cannot get past, and what it tells the operator about them.

/// Consumer errors that no retry gets past — a setting the broker refuses, a permission it
/// denies, a batch this build cannot decode — with what the operator can do. librdkafka reports
/// them and tries again every few seconds; the archiver stops instead (readiness off, a clear
/// error, a restart by Kubernetes once the cause is fixed).
pub(super) fn permanent_consume_error(
    code: rdkafka::types::RDKafkaErrorCode,
) -> Option<&'static str> {
    use rdkafka::types::RDKafkaErrorCode as Code;
    Some(match code {
        Code::InvalidSessionTimeout => {
            "kafka.session_timeout_ms is outside what the broker allows \
             (group.min.session.timeout.ms to group.max.session.timeout.ms)"
        }
        Code::GroupAuthorizationFailed => {
            "the broker denies this consumer group: allow Read on the group (kafka.group_id)"
        }
        Code::TopicAuthorizationFailed => {
            "the broker denies the topic: allow Read and Describe on kafka.topic"
        }
        Code::InvalidGroupId => "the broker refuses kafka.group_id",
        Code::InconsistentGroupProtocol => {
            "other members of this group use another assignment strategy; the archiver needs \
             cooperative-sticky, so give it a group of its own"
        }
        Code::NotImplemented | Code::UnsupportedCompressionType => {
            "a record batch uses a compression codec this build cannot decode"
        }
        Code::BadCompression | Code::BadMessage => {
            "a record batch does not decode (its compressed bytes are damaged, or its checksum \
             when check.crcs is on): \
             the archiver will not skip records on its own; if that batch is to be given up, \
             commit the group's offset for the partition past it \
             (kafka-consumer-groups.sh --reset-offsets --to-offset) and restart"
        }
        _ => return None,
    })
}

/// Where a consumer error happened, as far as it can be told: rdkafka hands the poll loop only
/// the error code, and librdkafka's text (given to the client context just before) names the
/// offset but not the partition. The partition is the assigned one whose position is that
/// offset: every record before the failed batch was read, so its position stops there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ErrorPlace {
    /// The offset librdkafka's text names; `None` for errors of the group or the client.
    pub offset: Option<i64>,
    /// Assigned partitions positioned at that offset (more than one only by coincidence).
    pub partitions: Vec<i32>,
}

impl ErrorPlace {
    /// Locates an error from librdkafka's text and the assigned partitions' positions
    /// (`None` for a partition not read yet).
    pub fn locate(reason: &str, positions: &[(i32, Option<i64>)]) -> ErrorPlace {
        let offset = offset_named_in(reason);
        let partitions = match offset {
            Some(offset) => positions
                .iter()
                .filter(|(_, position)| *position == Some(offset))
                .map(|(partition, _)| *partition)
                .collect(),
            None => Vec::new(),
        };
        ErrorPlace { offset, partitions }
    }
}

impl std::fmt::Display for ErrorPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(offset) = self.offset else {
            return f.write_str(
                "with no offset named (an error of the group, the topic or the client)",
            );
        };
        match self.partitions.as_slice() {
            [] => write!(f, "at offset {offset} of a partition that cannot be told"),
            [partition] => write!(f, "on partition {partition} at offset {offset}"),
            several => {
                let names: Vec<String> = several.iter().map(i32::to_string).collect();
                write!(
                    f,
                    "at offset {offset} of one of partitions {}",
                    names.join(", ")
                )
            }
        }
    }
}

/// The offset librdkafka's consumer-error texts name: "… at offset N …" (fetch errors, CRC
/// failures, messages too large) or "… message at N of … bytes failed" (decompression). A
/// "relative offset" (inside an old-format compressed message set) is not a log offset.
fn offset_named_in(reason: &str) -> Option<i64> {
    let lower = reason.to_ascii_lowercase();
    if lower.contains("relative offset") {
        return None;
    }
    ["offset ", "message at "].iter().find_map(|marker| {
        lower.match_indices(marker).find_map(|(at, _)| {
            let digits: String = lower[at + marker.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
    })
}

/// The message for a fatal librdkafka error (the client is unusable after one), with what an
/// operator can do about the common cause.
pub(super) fn fatal_kafka_error(code: rdkafka::types::RDKafkaErrorCode, reason: &str) -> String {
    let hint = match code {
        rdkafka::types::RDKafkaErrorCode::FencedInstanceId => {
            "; another member of the group joined with the same group.instance.id \
             (kafka.group_instance_id): each pod needs its own"
        }
        _ => "",
    };
    format!("fatal kafka error ({code:?}): {reason}{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_no_retry_gets_past_are_told_apart() {
        use rdkafka::types::RDKafkaErrorCode as Code;
        let hint = permanent_consume_error(Code::InvalidSessionTimeout).unwrap();
        assert!(hint.contains("kafka.session_timeout_ms"), "{hint}");
        assert!(permanent_consume_error(Code::TopicAuthorizationFailed).is_some());
        for transient in [
            Code::AllBrokersDown,
            Code::RequestTimedOut,
            Code::NotCoordinator,
            Code::RebalanceInProgress,
        ] {
            assert_eq!(permanent_consume_error(transient), None, "{transient:?}");
        }
        for undecodable in [Code::BadCompression, Code::BadMessage, Code::NotImplemented] {
            assert!(
                permanent_consume_error(undecodable).is_some(),
                "{undecodable:?}"
            );
        }
    }

    #[test]
    fn an_error_is_placed_at_the_offset_librdkafka_names_on_the_partition_stuck_there() {
        let positions = [(0, Some(10)), (1, Some(7)), (2, None), (3, Some(250))];
        // librdkafka's texts, as rdkafka_msgset_reader.c and rdkafka_fetcher.c write them.
        let cases = [
            (
                "Decompression (codec 0x1) of message at 10 of 37 bytes failed: \
                 Local: Invalid compressed data",
                "on partition 0 at offset 10",
            ),
            (
                "Fetch from broker 2 failed at offset 250 (leader epoch 0): \
                 Broker: Not leader for partition",
                "on partition 3 at offset 250",
            ),
            (
                "Fetch from broker 2 failed: Broker: Topic authorization failed",
                "with no offset named (an error of the group, the topic or the client)",
            ),
            (
                "Message at offset 7 (120 bytes) failed CRC32 check \
                 (original 0x1 != calculated 0x2)",
                "on partition 1 at offset 7",
            ),
            (
                "Message at relative offset 3 (120 bytes) failed CRC32 check \
                 (original 0x1 != calculated 0x2)",
                "with no offset named (an error of the group, the topic or the client)",
            ),
            (
                "MessageSet at offset 99 (64 bytes) failed CRC32C check",
                "at offset 99 of a partition that cannot be told",
            ),
            (
                "JoinGroup failed: Broker: Invalid session timeout",
                "with no offset named (an error of the group, the topic or the client)",
            ),
            (
                "Fetch from broker 1 failed at offset INVALID (leader epoch -1): x",
                "with no offset named (an error of the group, the topic or the client)",
            ),
        ];
        for (reason, expected) in cases {
            assert_eq!(
                ErrorPlace::locate(reason, &positions).to_string(),
                expected,
                "{reason}"
            );
        }
        let both = [(4, Some(10)), (5, Some(10))];
        assert_eq!(
            ErrorPlace::locate("message at 10 of 5 bytes failed", &both).to_string(),
            "at offset 10 of one of partitions 4, 5"
        );
    }
}
