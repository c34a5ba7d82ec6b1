# Builds rtap-server, rtap-simulator and migration in one stage, then copies
# them into a slim runtime image. protox compiles the protos, so no protoc.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --workspace --bins \
 && mkdir -p /out \
 && cp target/release/rtap-server target/release/rtap-simulator target/release/migration /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 rtap \
 && install -d -o rtap /var/lib/rtap
COPY --from=build /out/ /usr/local/bin/
USER rtap
ENV RTAP_LISTEN_ADDR=0.0.0.0:50051
EXPOSE 50051
CMD ["rtap-server"]
