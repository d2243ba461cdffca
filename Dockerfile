# One multi-stage build for both services: `--build-arg SERVICE=follow-api` or
# `SERVICE=follow-image-gateway` (compose.yaml passes it). Protobuf codegen needs no protoc.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
ARG SERVICE
WORKDIR /src
# cmake and nasm build libjpeg-turbo (the gateway's JPEG codec) and libheif (HEIC) from their
# crates' vendored sources; libheif decodes HEVC with Debian's libde265.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake nasm pkg-config libde265-dev \
 && rm -rf /var/lib/apt/lists/*
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    test -n "${SERVICE}" \
 && cargo build --release --locked -p "${SERVICE}" --bin "${SERVICE}" \
 && install -D "target/release/${SERVICE}" /out/service

# Small runtime: glibc, CA roots, bash (the health check speaks HTTP through /dev/tcp) and
# libde265 (the gateway's HEVC decoder, linked dynamically).
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libde265-0 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin follow
COPY --from=build /out/service /usr/local/bin/service
USER 10001:10001
ENV FOLLOW_LOG_FORMAT=json
ENTRYPOINT ["/usr/local/bin/service"]
