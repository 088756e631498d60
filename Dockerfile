# syntax=docker/dockerfile:1
# A small, non-root image: the release binary on distroless (glibc, CA roots, no shell).
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# sqlx-core with TCP_NODELAY (vendor/README.md), patched in by Cargo.toml.
COPY vendor vendor
COPY src src
COPY migrations migrations
COPY openapi.json openapi.json
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols cargo build --release --locked \
    && cp target/release/txrelay /txrelay
# The release profile keeps line tables for profiling (about 190 MB); the
# image ships the binary without them or any symbol.

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /txrelay /usr/local/bin/txrelay
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/txrelay"]
CMD ["operator"]
