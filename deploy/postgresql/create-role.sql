-- The gateway's role and database, run once as the postgres superuser:
--   sudo -u postgres psql -v ON_ERROR_STOP=1 -v gateway_password="'$(openssl rand -hex 24)'" < create-role.sql
-- (the password then goes into GATEWAY_DATABASE_URL in /etc/gateway/gateway.env)
-- The gateway needs no superuser: it owns its database and schema, and its migrations only create tables,
-- indexes, sequences, PL/pgSQL trigger functions (plpgsql is installed in every database) and triggers.
-- No extension is used.
CREATE ROLE gateway LOGIN PASSWORD :gateway_password
    NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 90;
CREATE DATABASE gateway OWNER gateway ENCODING 'UTF8' LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8' TEMPLATE template0;
REVOKE ALL ON DATABASE gateway FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE gateway TO gateway;
\connect gateway
-- PostgreSQL 15: public belongs to pg_database_owner (the gateway); older versions: make it so.
ALTER SCHEMA public OWNER TO gateway;
REVOKE ALL ON SCHEMA public FROM PUBLIC;
