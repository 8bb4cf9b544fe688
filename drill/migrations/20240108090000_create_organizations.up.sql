-- v1: customers of the field-service product
CREATE TABLE organizations (
  id         bigserial PRIMARY KEY,
  name       text NOT NULL,
  slug       text NOT NULL UNIQUE,
  plan       text NOT NULL DEFAULT 'standard'
             CHECK (plan IN ('free', 'standard', 'enterprise')),
  created_at timestamptz NOT NULL DEFAULT now()
);
