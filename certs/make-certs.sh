#!/usr/bin/env bash
# Makes a CA and a serving certificate for kaspr-packages-webhook with the openssl CLI, for
# manual installs (certificates.mode=provided) and local runs (serve --tls-cert/--tls-key).
#
#   certs/make-certs.sh [-o DIR] [-n NAMESPACE] [-s SERVICE] [-d DAYS] [NAME_OR_IP...]
#
#   -o DIR        output directory (default: ./webhook-certs), created with mode 0700
#   -n NAMESPACE  namespace of the Service (default: kaspr-packages-system)
#   -s SERVICE    Service name (default: kaspr-packages-webhook, the chart's name for a release
#                 called kaspr-packages-webhook); its four DNS forms go into the certificate
#   -d DAYS       validity of the serving certificate (default: 365; the CA gets 10 times that)
#   NAME_OR_IP    more subject alternative names, e.g. 127.0.0.1 or webhook.example.com
#   --local       only localhost, 127.0.0.1 and ::1 (no Service names)
#
# Output: ca.crt, ca.key (keep it private, or delete it once done), tls.crt (leaf then CA),
# tls.key. Existing files are never overwritten.
#
# In a cluster, with the chart (see the README, "Install with Helm"):
#   kubectl -n kaspr-packages-system create secret tls kaspr-packages-webhook-serving \
#     --cert=webhook-certs/tls.crt --key=webhook-certs/tls.key
#   helm install kaspr-packages-webhook charts/kaspr-packages-webhook -n kaspr-packages-system \
#     --set certificates.mode=provided \
#     --set certificates.provided.secretName=kaspr-packages-webhook-serving \
#     --set-file certificates.provided.caBundle=webhook-certs/ca.crt
# Locally:
#   certs/make-certs.sh --local -o /tmp/webhook-certs
#   kaspr-packages-webhook serve --tls-cert /tmp/webhook-certs/tls.crt --tls-key /tmp/webhook-certs/tls.key ...
set -euo pipefail

out=./webhook-certs
namespace=kaspr-packages-system
service=kaspr-packages-webhook
days=365
local_only=false
extra=()
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -o) out="$2"; shift 2 ;;
    -n) namespace="$2"; shift 2 ;;
    -s) service="$2"; shift 2 ;;
    -d) days="$2"; shift 2 ;;
    --local) local_only=true; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "make-certs.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done
[[ "$days" =~ ^[1-9][0-9]*$ ]] || { echo "make-certs.sh: -d needs a number of days" >&2; exit 2; }
command -v openssl >/dev/null || { echo "make-certs.sh: openssl is required" >&2; exit 1; }

sans=()
if $local_only; then
  sans+=("DNS:localhost" "IP:127.0.0.1" "IP:::1")
else
  sans+=("DNS:$service" "DNS:$service.$namespace" "DNS:$service.$namespace.svc"
         "DNS:$service.$namespace.svc.cluster.local")
fi
ip_re='^([0-9]{1,3}\.){3}[0-9]{1,3}$|:'
for name in "${extra[@]}"; do
  if [[ "$name" =~ $ip_re ]]; then sans+=("IP:$name"); else sans+=("DNS:$name"); fi
done
san_list="$(IFS=,; echo "${sans[*]}")"

for f in ca.crt ca.key tls.crt tls.key; do
  if [[ -e "$out/$f" ]]; then
    echo "make-certs.sh: $out/$f exists; choose another -o or remove the old files" >&2
    exit 1
  fi
done
mkdir -p "$out"
chmod 0700 "$out"
umask 077
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -days "$((days * 10))" -subj "/CN=kaspr-packages-webhook CA" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null

cn="${sans[0]#*:}"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -subj "/CN=$cn" -keyout "$out/tls.key" -out "$work/tls.csr" 2>/dev/null
cat > "$work/ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san_list
EXT
openssl x509 -req -in "$work/tls.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
  -CAserial "$work/ca.srl" -CAcreateserial -days "$days" -sha256 \
  -extfile "$work/ext" -out "$work/leaf.crt" 2>/dev/null
cat "$work/leaf.crt" "$out/ca.crt" > "$out/tls.crt"
chmod 0644 "$out/ca.crt" "$out/tls.crt"
openssl verify -CAfile "$out/ca.crt" "$work/leaf.crt" >/dev/null

echo "wrote $out/{ca.crt,ca.key,tls.crt,tls.key} for $san_list (valid $days days)"
