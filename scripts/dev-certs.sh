#!/usr/bin/env bash
# Makes a throwaway certificate authority and a server certificate for
# localhost and 127.0.0.1 in DIR (default .run/tls), for TLS on this
# machine: ca.pem (what clients trust: --tls-ca, grpcurl -cacert),
# server.pem and server.key (rtap-server --tls-cert/--tls-key). Keeps the
# files that already exist. Not for production: use your own CA there.
set -euo pipefail
dir=${1:-.run/tls}
mkdir -p "$dir"
cd "$dir"
[[ -s ca.pem && -s server.pem && -s server.key ]] && exit 0
if ! command -v openssl >/dev/null; then
  command -v apt-get >/dev/null || { echo "dev-certs: openssl is missing; install it" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
fi
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
  -subj "/CN=RTAP development CA" -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/CN=localhost" -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
  -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 600 ca.key server.key
