# Rampart for real deployments (see docker-compose.yml). Not buildable on the development
# machines (no Docker engine there); kept in step with scripts/setup.sh.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends mold libclang-dev clang pkg-config libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --bin rampart --example gateway \
    && cp target/release/rampart target/release/examples/gateway /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libssl3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/rampart /usr/local/bin/gateway /usr/local/bin/
COPY pipelines /pipelines
VOLUME /var/lib/rampart
# Plain HTTP unless the pipeline sets [service] tls_certificate and tls_key (docs/operations.md):
# publish it beyond the host only with TLS on.
EXPOSE 9464
ENTRYPOINT ["rampart"]
CMD ["run", "/pipelines/cloudtrail", "--state", "/var/lib/rampart/cloudtrail", "--audit", "/var/lib/rampart/cloudtrail-audit.log", "--listen", "0.0.0.0:9464"]
