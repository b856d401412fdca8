#!/usr/bin/env bash
# Install the system programs the tests start for real: redis-server, a JDK and Maven
# (for Apache Kafka), Prometheus and promtool. Debian/Ubuntu packages; installs only what
# is missing.
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v java >/dev/null || missing+=(default-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
# promtool checks the alert rules; the prometheus server scrapes a worker in a test.
command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
# kustomize renders k8s/ in the tests: a standalone one or kubectl's built-in one, else
# built from its Go module (Debian's kubectl 1.20 embeds a kustomize too old for the
# components k8s/ uses).
if ! command -v kustomize >/dev/null && ! kubectl kustomize --help >/dev/null 2>&1; then
  echo "installing kustomize (go install)" >&2
  GOBIN=/usr/local/bin go install sigs.k8s.io/kustomize/kustomize/v5@v5.5.0
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing ${missing[*]}" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
