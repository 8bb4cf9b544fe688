-- v1: people who log in (dispatchers, technicians, admins)
CREATE TABLE users (
  id              bigserial PRIMARY KEY,
  organization_id bigint NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  email           text NOT NULL UNIQUE,
  full_name       text NOT NULL,
  role            text NOT NULL DEFAULT 'technician'
                  CHECK (role IN ('admin', 'dispatcher', 'technician')),
  created_at      timestamptz NOT NULL DEFAULT now(),
  last_seen_at    timestamptz
);
CREATE INDEX users_organization_id_idx ON users (organization_id);
