#!/bin/sh
# Configure the S3 side of the pipeline on MinIO; safe to run again (a Kubernetes Job and a one-shot
# docker compose service both run it with the `minio/mc` image):
#   - the uploads, artifacts and backups buckets, versioned (an overwritten or deleted upload or
#     artifact can be restored from its previous version);
#   - the put-event of the uploads bucket to the Kafka target `PRIMARY` (MINIO_NOTIFY_KAFKA_*_PRIMARY
#     on the server publishes it to the topic wsi.bucket-events);
#   - lifecycle rules (lifecycle-*.json beside this script): tile shards expire before embeddings,
#     old object versions after a grace period.
# Environment: S3_URL, S3_ACCESS_KEY, S3_SECRET_KEY, UPLOADS_BUCKET, ARTIFACTS_BUCKET, BACKUPS_BUCKET,
# LIFECYCLE_DIR (where the lifecycle JSON files are mounted).
set -eu

: "${S3_URL:?set S3_URL, e.g. http://minio:9000}"
: "${S3_ACCESS_KEY:?set S3_ACCESS_KEY}"
: "${S3_SECRET_KEY:?set S3_SECRET_KEY}"
UPLOADS_BUCKET="${UPLOADS_BUCKET:-wsi-uploads}"
ARTIFACTS_BUCKET="${ARTIFACTS_BUCKET:-wsi-artifacts}"
BACKUPS_BUCKET="${BACKUPS_BUCKET:-wsi-backups}"
LIFECYCLE_DIR="${LIFECYCLE_DIR:-/setup}"

attempt=0
until mc alias set wsi "$S3_URL" "$S3_ACCESS_KEY" "$S3_SECRET_KEY" >/dev/null 2>&1; do
  attempt=$((attempt + 1))
  if [ "$attempt" -ge 60 ]; then
    echo "MinIO at $S3_URL did not answer for 2 minutes; check the minio pod/container and the credentials" >&2
    exit 1
  fi
  sleep 2
done

for bucket in "$UPLOADS_BUCKET" "$ARTIFACTS_BUCKET" "$BACKUPS_BUCKET"; do
  mc mb --ignore-existing "wsi/$bucket"
  mc version enable "wsi/$bucket"
done

mc event add "wsi/$UPLOADS_BUCKET" arn:minio:sqs::PRIMARY:kafka --event put --ignore-existing
mc ilm import "wsi/$ARTIFACTS_BUCKET" < "$LIFECYCLE_DIR/lifecycle-artifacts.json"
mc ilm import "wsi/$UPLOADS_BUCKET" < "$LIFECYCLE_DIR/lifecycle-uploads.json"

mc event list "wsi/$UPLOADS_BUCKET"
echo "MinIO ready: $UPLOADS_BUCKET publishes put events to Kafka; lifecycle rules applied"
