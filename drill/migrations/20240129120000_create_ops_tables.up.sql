-- v1: operational tables.  feature_flags is read by the app and by the
-- photo guard trigger (v2); deployment_history is written by the deploy
-- pipeline and by rollbacks; data_archive keeps rows that a rollback
-- snapshots before changing the schema (it is part of v1 on purpose, so no
-- v2 down-migration ever drops it).
CREATE TABLE feature_flags (
  name        text PRIMARY KEY,
  enabled     boolean NOT NULL DEFAULT false,
  description text,
  updated_at  timestamptz NOT NULL DEFAULT now(),
  updated_by  text
);

CREATE TABLE deployment_history (
  id                   bigserial PRIMARY KEY,
  version              text NOT NULL,
  git_sha              text NOT NULL,
  vercel_deployment_id text,
  status               text NOT NULL
                       CHECK (status IN ('deploying', 'active', 'stable', 'failed',
                                         'rolled_back', 'rollback')),
  deployed_at          timestamptz NOT NULL DEFAULT now(),
  deployed_by          text NOT NULL,
  notes                text
);
CREATE INDEX deployment_history_deployed_at_idx ON deployment_history (deployed_at DESC);

CREATE TABLE data_archive (
  id           bigserial PRIMARY KEY,
  source_table text NOT NULL,
  source_id    bigint NOT NULL,
  data         jsonb NOT NULL,
  reason       text,
  archived_at  timestamptz NOT NULL DEFAULT now(),
  archived_by  text
);
CREATE INDEX data_archive_source_idx ON data_archive (source_table, source_id);
