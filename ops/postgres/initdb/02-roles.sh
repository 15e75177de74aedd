#!/bin/sh
# Runs once, when the postgres container initialises an empty data directory: the
# database roles of SPEC section 7, with the passwords compose.yaml passes in.
# `fleet-payouts migrate` (as fleet_payouts_owner) then creates the schema and gives
# each role exactly its privileges.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v owner_password="$FLEET_PAYOUTS_OWNER_PASSWORD" \
     -v app_password="$FLEET_PAYOUTS_APP_PASSWORD" <<'SQL'
CREATE ROLE fleet_payouts_owner LOGIN PASSWORD :'owner_password';
CREATE ROLE fleet_payouts_app LOGIN PASSWORD :'app_password';
-- DBAs and analysts: GRANT fleet_payouts_readonly TO alice;
CREATE ROLE fleet_payouts_readonly NOLOGIN;
GRANT CREATE, USAGE ON SCHEMA public TO fleet_payouts_owner;
SQL
