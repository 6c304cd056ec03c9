#!/bin/sh
# Create the pipeline's Secrets in namespace wsi, once: run it before the first `kubectl apply -k`, and
# again whenever you like. A Secret that exists is never changed (the passwords in use stay), only
# missing ones are created with random values; `wsi-s3-identities` (SeaweedFS' identity file) is
# rebuilt from the per-identity Secrets each time.
#
#   deploy/k3s/make-secrets.sh            # namespace wsi (created if missing)
#   NAMESPACE=other deploy/k3s/make-secrets.sh
#
# Object-store identities, one per client, each limited to the buckets and actions it needs
# (SeaweedFS actions; an S3 service with IAM policies needs the same grants):
#   admin            everything          the Job s3-setup only (buckets, versioning, lifecycle)
#   models           artifacts: rwl      the Job wsi-models (uploads the default models)
#   postgres-backup  backups: rwl        CloudNativePG's Barman Cloud plugin (ObjectStore wsi-backups)
#   ingest, tiler    uploads: rl, artifacts: rwl
#   quality-filter, embedder, mil-scorer, recorder  artifacts: rwl (the recorder: DICOM/FHIR results)
#   viewer           uploads: rl, artifacts: rl
# Database: wsi-pg-app-role (the services' role wsi_app)
# and wsi-pg-viewer-role (wsi_viewer), which CloudNativePG creates as managed roles. Kafka passwords
# are Strimzi's (one Secret per KafkaUser), the database owner's URL is CloudNativePG's (wsi-pg-app).
set -eu

NAMESPACE="${NAMESPACE:-wsi}"
UPLOADS="${UPLOADS_BUCKET:-wsi-uploads}"
ARTIFACTS="${ARTIFACTS_BUCKET:-wsi-artifacts}"
BACKUPS="${BACKUPS_BUCKET:-wsi-backups}"
KUBECTL="${KUBECTL:-kubectl}"

rl() { echo "Read:$1 List:$1"; }
rwl() { echo "Read:$1 Write:$1 List:$1"; }
identity_actions() {
  case "$1" in
    admin) echo "Admin Read Write List Tagging" ;;
    models) rwl "$ARTIFACTS" ;;
    postgres-backup) rwl "$BACKUPS" ;;
    ingest | tiler) echo "$(rl "$UPLOADS") $(rwl "$ARTIFACTS")" ;;
    quality-filter | embedder | mil-scorer | recorder) rwl "$ARTIFACTS" ;;
    viewer) echo "$(rl "$UPLOADS") $(rl "$ARTIFACTS")" ;;
  esac
}
IDENTITIES="admin models postgres-backup ingest tiler quality-filter embedder mil-scorer recorder viewer"

random() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
exists() { $KUBECTL -n "$NAMESPACE" get secret "$1" >/dev/null 2>&1; }
field() { $KUBECTL -n "$NAMESPACE" get secret "$1" -o "jsonpath={.data.$2}" | base64 -d; }

$KUBECTL get namespace "$NAMESPACE" >/dev/null 2>&1 || $KUBECTL create namespace "$NAMESPACE"

for role in app viewer; do
  name="wsi-pg-$role-role"
  if exists "$name"; then
    echo "kept   secret/$name"
  else
    $KUBECTL -n "$NAMESPACE" create secret generic "$name" --type=kubernetes.io/basic-auth \
      --from-literal=username="wsi_$role" --from-literal=password="$(random)" >/dev/null
    echo "created secret/$name"
  fi
done

json='{"identities": ['
separator=""
for identity in $IDENTITIES; do
  name="wsi-s3-$identity"
  if exists "$name"; then
    echo "kept   secret/$name"
  else
    $KUBECTL -n "$NAMESPACE" create secret generic "$name" \
      --from-literal=access-key="$identity-$(random | cut -c1-12)" --from-literal=secret-key="$(random)" >/dev/null
    echo "created secret/$name"
  fi
  actions=""
  for action in $(identity_actions "$identity"); do actions="$actions${actions:+, }\"$action\""; done
  json="$json$separator{\"name\": \"$identity\", \"credentials\": [{\"accessKey\": \"$(field "$name" access-key)\", \"secretKey\": \"$(field "$name" secret-key)\"}], \"actions\": [$actions]}"
  separator=", "
done
json="$json]}"

printf '%s' "$json" | $KUBECTL -n "$NAMESPACE" create secret generic wsi-s3-identities \
  --from-file=s3.json=/dev/stdin --dry-run=client -o yaml | $KUBECTL apply -f - >/dev/null
echo "applied secret/wsi-s3-identities ($(echo "$IDENTITIES" | wc -w) identities; restart statefulset/seaweedfs if it runs)"
