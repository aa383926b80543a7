# syntax=docker/dockerfile:1
# Multi-stage: build with the Rust toolchain (librdkafka is compiled from source by rdkafka-sys),
# run on a slim Debian as an unprivileged user.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY examples ./examples
RUN cargo build --release --locked --bin kafka-s3-archiver \
 && strip target/release/kafka-s3-archiver

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent archiver \
 && mkdir -p /var/lib/kafka-s3-archiver \
 && chown 10001:10001 /var/lib/kafka-s3-archiver
COPY --from=build /src/target/release/kafka-s3-archiver /usr/local/bin/kafka-s3-archiver
USER 10001:10001
ENV ARCHIVER_BUFFER_DATA_DIR=/var/lib/kafka-s3-archiver
VOLUME ["/var/lib/kafka-s3-archiver"]
EXPOSE 9187
ENTRYPOINT ["/usr/local/bin/kafka-s3-archiver"]
CMD ["run"]
