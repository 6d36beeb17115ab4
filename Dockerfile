# syntax=docker/dockerfile:1
# The kaspr-packages-webhook image: the binary only, on a distroless base, as a non-root user.
#
#   docker build -t ghcr.io/kaspr-io/kaspr-packages-webhook:0.1.0 .
#   docker push ghcr.io/kaspr-io/kaspr-packages-webhook:0.1.0
#
# Multi-arch: docker buildx build --platform linux/amd64,linux/arm64 -t IMAGE:TAG --push .
# (each platform compiles natively under emulation; no cross toolchain is needed).
#
# Without Docker, scripts/build-image makes the same image as an OCI archive from Debian packages
# (same files, user, entrypoint, command and ports): change the two together.

ARG RUST_VERSION=1.89

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Only what the build reads; Cargo.lock pins every dependency (--locked refuses to change it).
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin kaspr-packages-webhook \
 && install -D -m 0755 target/release/kaspr-packages-webhook /out/kaspr-packages-webhook

# glibc and libgcc for the Rust binary, CA certificates, nothing else: no shell, no package
# manager. The nonroot variant runs as uid/gid 65532, the chart's runAsUser.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/kaspr-packages-webhook /usr/local/bin/kaspr-packages-webhook
USER 65532:65532
# 10250: HTTPS webhook (the chart's default); 8080: probes and metrics.
EXPOSE 10250 8080
ENTRYPOINT ["/usr/local/bin/kaspr-packages-webhook"]
CMD ["serve", "--help"]
