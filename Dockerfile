# syntax=docker/dockerfile:1
# A small, non-root image: the release binary on distroless (glibc, CA roots, no shell).
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
COPY openapi.json openapi.json
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked && cp target/release/txrelay /txrelay

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /txrelay /usr/local/bin/txrelay
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/txrelay"]
CMD ["operator"]
