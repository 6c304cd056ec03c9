#!/bin/sh
# Runs once, when the compose PostgreSQL initialises an empty data directory: creates the services'
# role (rows only; `wsi db migrate` grants it, under the owner role POSTGRES_USER).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  --set app_password="$WSI_APP_DB_PASSWORD" <<'SQL'
CREATE ROLE wsi_app LOGIN PASSWORD :'app_password';
SQL
