#!/usr/bin/env bash
# Build the container image and check what it serves: /healthz ready, a JSON answer, the result page with its
# heat-map, a non-root user, the image's own health check, and no PyTorch inside.
#
#   deploy/check-image.sh PHOTO.jpg
#
# ENGINE: docker or podman (default: whichever is installed, docker first). BUILD_OPTS and RUN_OPTS pass options
# through, e.g. where no registry can be reached and the host needs runc without cgroup limits:
#   PYTHON_IMAGE=localhost/python:3.11-bookworm BUILD_OPTS="--isolation=chroot --format docker" \
#   RUN_OPTS="--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024" ENGINE=podman \
#   deploy/check-image.sh photo.jpg
# (docs/deployment.md, "Docker", says how to make that base image.)
set -euo pipefail

photo=${1:?usage: deploy/check-image.sh PHOTO.jpg}
engine=${ENGINE:-$(command -v docker >/dev/null && docker info >/dev/null 2>&1 && echo docker || echo podman)}
port=${PORT:-8087}
tag=${TAG:-dermsight:check}
name=dermsight-check-$$
cd "$(dirname "$0")/.."

# shellcheck disable=SC2086  # the *_OPTS are lists of options
$engine build ${BUILD_OPTS:-} ${PYTHON_IMAGE:+--build-arg PYTHON_IMAGE=$PYTHON_IMAGE} -t "$tag" .
# shellcheck disable=SC2086
$engine run -d --name "$name" ${RUN_OPTS:-} -p "$port:8000" "$tag" >/dev/null
trap '$engine rm -f "$name" >/dev/null 2>&1 || true' EXIT

for _ in $(seq 60); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
  sleep 1
done
fail() { echo "FAILED: $*" >&2; $engine logs "$name" 2>&1 | tail -20 >&2; exit 1; }

health=$(curl -sf "http://127.0.0.1:$port/healthz") || fail "/healthz did not answer within 60 s"
grep -q '"ready":true' <<<"$health" || fail "/healthz is not ready: $health"
echo "healthz: $health"

answer=$(curl -sf -F "image=@$photo" "http://127.0.0.1:$port/api/v1/predict") || fail "the API refused the photo"
grep -q '"status":"ok"' <<<"$answer" || fail "no answer: $answer"
echo "api: $(grep -o '"advice":{"level":"[a-z_]*"' <<<"$answer")"

jar=$(mktemp)
token=$(curl -sf -c "$jar" "http://127.0.0.1:$port/" | grep -o 'name="csrf_token" value="[^"]*"' | head -1 | cut -d'"' -f4)
page=$(curl -sf -b "$jar" -F "csrf_token=$token" -F "image=@$photo" "http://127.0.0.1:$port/analyse") \
  || fail "the result page did not load"
rm -f "$jar"
grep -q 'id="heatmap"' <<<"$page" || fail "the result page has no heat-map"
echo "result page: $(grep -o '<h2 id="advice-title">[^<]*' <<<"$page" | cut -d'>' -f2), with its heat-map"

user=$($engine exec "$name" id -u)
[ "$user" != 0 ] || fail "the app runs as root"
echo "user id: $user"
if $engine exec "$name" python -c "import torch" 2>/dev/null; then fail "PyTorch is installed in the image"; fi
echo "PyTorch: not installed"
if [ "$engine" = podman ]; then
  podman healthcheck run "$name" 2>/dev/null || fail "the image's health check failed"
  echo "health check: passed"
fi
echo "image: $($engine image inspect "$tag" --format '{{.Size}}' | awk '{printf "%.0f MB", $1 / 1e6}')"
echo "image check passed"
