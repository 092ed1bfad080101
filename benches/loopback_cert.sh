#!/usr/bin/env bash
# Writes a throwaway P-256 CA (ca.pem) and a server certificate for 127.0.0.1 and localhost
# (server.pem, server.key) into DIR, for the benches that put the hub and a peer behind the same
# TLS certificate.
#
#   benches/loopback_cert.sh DIR
set -euo pipefail
cd "$1"
{
  openssl ecparam -name prime256v1 -genkey -noout -out ca.key
  openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=edgehub bench CA" -out ca.pem
  openssl ecparam -name prime256v1 -genkey -noout -out server.key
  openssl req -new -key server.key -subj "/CN=127.0.0.1" -out server.csr
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > ext.cnf
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -sha256 -extfile ext.cnf -out server.pem
} >/dev/null 2>&1
