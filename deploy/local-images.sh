#!/bin/sh
# Build the project's images and run the six services as containers against the local stack, on a
# machine without a Docker engine or a reachable registry (podman as root, Debian base from debootstrap).
#
#   deploy/local-images.sh base            # Debian bookworm + python3 via debootstrap -> localhost/wsi-base:bookworm
#   deploy/local-images.sh build [TARGET..] # deploy/docker/Dockerfile targets (default: the six services)
#   deploy/local-images.sh smoke           # the six containers against `wsi stack up`, one slide -> prediction
#   deploy/local-images.sh all             # base, build, smoke  (also: make images / make containers-smoke)
#
# The Dockerfiles keep their public base images (python:3.11.x-slim-bookworm); here the base is the
# build argument PYTHON_IMAGE. pip inside a build uses this machine's own package index settings:
# `pip config list` and PIP_* variables are read now, written to a temporary pip.conf, and it and the
# local folders and files it names are mounted read-only into the build (nothing machine-specific is
# written into an image layer or into the repository).
#
# Requirements: podman (with runc) and debootstrap (Debian: apt-get install podman runc debootstrap),
# root, the project's .venv (for `wsi stack up`, `wsi synth`, `wsi submit`).
# Containers run as uid 10001 with a read-only root; writable are only WSI_HOME, WSI_CACHE_DIR and /tmp
# (tmpfs), models are mounted read-only. Logs and timings: $WSI_HOME/containers/ (default .wsi/).
set -eu

cd "$(dirname "$0")/.."
VERSION="${WSI_VERSION:-0.1.0}"
BASE_IMAGE="${WSI_BASE_IMAGE:-localhost/wsi-base:bookworm}"
SUITE_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SERVICES="ingest tiler quality-filter embedder mil-scorer recorder"
WSI="${WSI_BIN:-.venv/bin/wsi}"
PY="${WSI_PYTHON:-.venv/bin/python}"
export WSI_HOME="${WSI_HOME:-$PWD/.wsi}"
OUT="$WSI_HOME/containers"
mkdir -p "$OUT"
PODMAN="podman --runtime runc"
RUN_LIMITS="--network host --ulimit nofile=1024:1024 --ulimit nproc=1000:1000"

say() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$OUT/timings.log"; }

base() {
  if $PODMAN image exists "$BASE_IMAGE"; then
    say "base image $BASE_IMAGE exists"
    return
  fi
  root="$(mktemp -d)"
  start=$(date +%s)
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root" "$SUITE_MIRROR" >"$OUT/debootstrap.log" 2>&1
  # What python:3.11-slim offers and the Dockerfiles use: `python` and `pip` commands, pip allowed
  # to install (the image's own venv is where the project goes).
  ln -sf python3 "$root/usr/bin/python"
  rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | $PODMAN import - "$BASE_IMAGE" >/dev/null
  rm -rf "$root"
  say "base image $BASE_IMAGE imported in $(($(date +%s) - start)) s"
}

# pip settings of this machine -> a pip.conf plus --volume options for the local paths it names.
pip_mounts() {
  conf_dir="$(mktemp -d)"
  python3 - "$conf_dir" <<'EOF'
import os, re, subprocess, sys
from pathlib import Path

out = Path(sys.argv[1])
values = {}
listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
for line in listing.splitlines():
    match = re.match(r"^[^.]*\.([a-z-]+)='(.*)'$", line)
    if match:
        values[match.group(1)] = match.group(2)
for name, value in os.environ.items():
    if name.startswith("PIP_") and value:
        values[name[4:].lower().replace("_", "-")] = value
values.pop("no-cache-dir", None)
paths = set()
for key, value in values.items():
    for item in value.split():
        path = item[len("file://"):] if item.startswith("file://") else item
        if path.startswith("/") and os.path.exists(path):
            path = path.rstrip("/") or "/"
            # a "simple" index links its files relatively (../../files/...): mount the folder above
            paths.add(os.path.dirname(path) if os.path.basename(path) == "simple" else path)
(out / "pip.conf").write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(values.items())))
(out / "mounts").write_text("".join(f"{p}\n" for p in sorted(paths)))
EOF
  mounts="--volume $conf_dir/pip.conf:/etc/pip.conf:ro"
  while read -r path; do
    mounts="$mounts --volume $path:$path:ro"
  done <"$conf_dir/mounts"
  echo "$mounts"
}

build() {
  targets="${*:-$SERVICES}"
  mounts="$(pip_mounts)"
  # buildah does not key its cache on bind-mounted content: pass the sources' digest instead
  digest="$(find pyproject.toml setup.py proto shared services -type f ! -name '*.pyc' ! -path '*/__pycache__/*' \
    ! -path 'shared/contracts/_generated/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)"
  # The tools image's torch: the CPU build from this machine's index settings (see pip_mounts).
  torch_index="$(python3 -m pip config get global.index-url 2>/dev/null || echo https://pypi.org/simple)"
  for target in $targets; do
    start=$(date +%s)
    # shellcheck disable=SC2086  # word splitting of the option lists is intended
    $PODMAN build --format docker --network host --ulimit nofile=4096:4096 $mounts \
      --ignorefile deploy/docker/Dockerfile.dockerignore \
      --build-arg PYTHON_IMAGE="$BASE_IMAGE" --build-arg WSI_VERSION="$VERSION" --build-arg SOURCE_DIGEST="$digest" \
      --build-arg TORCH_INDEX_URL="$torch_index" \
      -f deploy/docker/Dockerfile --target "$target" -t "wsi-toolkit/$target:$VERSION" . \
      >"$OUT/build-$target.log" 2>&1 || { tail -30 "$OUT/build-$target.log"; exit 1; }
    size=$($PODMAN image inspect --format '{{.Size}}' "wsi-toolkit/$target:$VERSION")
    say "built wsi-toolkit/$target:$VERSION in $(($(date +%s) - start)) s ($((size / 1048576)) MiB)"
  done
}

# The six services as containers against the local stack (loopback; host network).
smoke() {
  $WSI stack up >/dev/null
  test -f "$WSI_HOME/models/models.json" || $WSI model init-defaults
  # The containers' uid must read them (the model files are written private to their owner).
  models="$OUT/models"
  rm -rf "$models" && mkdir -p "$models" && cp -R "$WSI_HOME/models/." "$models/" && chmod -R a+rX "$models"
  env_file="$OUT/services.env"
  grep '^WSI_' "$WSI_HOME/stack.env" | grep -v -e '^WSI_DATABASE_ADMIN_URL' -e '^WSI_VIEWER_DATABASE_URL' >"$env_file"
  chmod 600 "$env_file"
  port=9300
  for service in $SERVICES; do
    $PODMAN rm -f "wsi-$service" >/dev/null 2>&1 || true
    port=$((port + 1))
    # shellcheck disable=SC2086
    $PODMAN run -d --name "wsi-$service" $RUN_LIMITS --read-only --read-only-tmpfs=false \
      --user 10001:10001 --no-healthcheck --cap-drop ALL --security-opt no-new-privileges \
      --tmpfs /tmp:rw,size=512m,mode=1777 --tmpfs /var/lib/wsi:rw,size=256m,mode=0700,U \
      --tmpfs /var/cache/wsi:rw,size=1g,mode=0700,U \
      --volume "$models:/models:ro" --env-file "$env_file" \
      -e WSI_HOME=/var/lib/wsi -e WSI_CACHE_DIR=/var/cache/wsi -e WSI_MODEL_DIR=/models \
      -e WSI_METRICS_PORT=$port -e WSI_METRICS_HOST=127.0.0.1 \
      "wsi-toolkit/$service:$VERSION" >/dev/null
    say "started container wsi-$service (metrics on 127.0.0.1:$port)"
  done
  slides="$OUT/slides"
  rm -rf "$slides"
  $WSI synth "$slides" --count 1 --format svs --seed "$(date +%s)" >/dev/null
  slide="$(find "$slides" -name '*.svs' | head -1)"
  prefix="containers-$(date +%s)"
  start=$(date +%s)
  $WSI submit --prefix "$prefix" "$slide" >/dev/null
  key="$prefix/$(basename "$slide")"
  say "submitted $slide as $key"
  deadline=$((start + ${SMOKE_TIMEOUT_S:-600}))
  while :; do
    # The prediction as the recorder (a container too) stored it, read under the services' role.
    found="$(WSI_KEY="$key" "$PY" -c '
import os, psycopg
from wsitk.shared.config import load_settings
with psycopg.connect(load_settings().dsn()) as conn:
    rows = conn.execute(
        "SELECT p.label, round(p.probability::numeric, 3), p.model_version FROM wsi.predictions p "
        "JOIN wsi.slide_sources s USING (slide_id) WHERE s.upload_key = %s", (os.environ["WSI_KEY"],)
    ).fetchall()
print(" ".join(map(str, rows[0])) if rows else "")
' 2>/dev/null || true)"
    if [ -n "$found" ]; then
      say "prediction after $(($(date +%s) - start)) s: $found"
      break
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      say "no prediction after $(($(date +%s) - start)) s; container logs in $OUT/"
      for service in $SERVICES; do $PODMAN logs "wsi-$service" >"$OUT/$service.log" 2>&1 || true; done
      $WSI status || true
      exit 1
    fi
    sleep 5
  done
  for service in $SERVICES; do
    $PODMAN logs "wsi-$service" >"$OUT/$service.log" 2>&1 || true
    state=$($PODMAN inspect --format '{{.State.Status}} user={{.Config.User}} readonly={{.HostConfig.ReadonlyRootfs}}' "wsi-$service")
    say "wsi-$service: $state"
  done
}

stop() {
  for service in $SERVICES; do $PODMAN rm -f "wsi-$service" >/dev/null 2>&1 || true; done
}

case "${1:-all}" in
  base) base ;;
  build) shift; build "$@" ;;
  smoke) smoke ;;
  stop) stop ;;
  all) base; build; smoke ;;
  *) echo "usage: $0 base|build [TARGET...]|smoke|stop|all" >&2; exit 2 ;;
esac
