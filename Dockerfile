# syntax=docker/dockerfile:1
#
# The twins service image: built with Rust on Debian 12, run on distroless (glibc,
# CA certificates, nothing else) as an unprivileged user.
#
#   docker build --build-arg TWINS_COMMIT=$(git rev-parse --short=12 HEAD) -t twins .
#
# Dependencies are compiled in a layer of their own (cargo-chef), which is rebuilt only
# when Cargo.toml or Cargo.lock change; a code change recompiles the service crate only.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS chef
RUN cargo install cargo-chef --locked
WORKDIR /src

# The dependency recipe: Cargo.toml and Cargo.lock with the sources left out.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --bin twins --recipe-path recipe.json
COPY . .
# The commit shown by /health (there is no .git in the build context).
ARG TWINS_COMMIT=unknown
ENV TWINS_COMMIT=${TWINS_COMMIT}
RUN cargo build --release --locked --bin twins \
    && mkdir -p /out/data \
    && cp target/release/twins /out/twins

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/twins /usr/local/bin/twins
# Working directory of the embedded SQLite store (./data/twins.db), owned by the
# service's user; mount a volume here to keep it.
COPY --from=build --chown=65532:65532 /out/data /var/lib/twins/data
WORKDIR /var/lib/twins
USER 65532:65532
EXPOSE 9018
# The binary probes itself: GET /health on the configured port and scheme, exit 0 on 200.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/twins", "--healthcheck"]
# SIGTERM (docker stop) drains requests and messages within MG_TWINS_SHUTDOWN_TIMEOUT.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/twins"]
