-- v2 (attachments): a message may carry several files.  Existing media_url
-- values are backfilled as one attachment each (backfilled = true); new
-- messages write both the attachments and media_url (the first one), so
-- the v1 API keeps returning mediaUrl.
CREATE TABLE message_attachments (
  id           bigserial PRIMARY KEY,
  message_id   bigint NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
  media_url    text NOT NULL,
  content_type text NOT NULL DEFAULT 'image/jpeg',
  size_bytes   integer,
  backfilled   boolean NOT NULL DEFAULT false,
  created_at   timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE messages ADD COLUMN attachment_count integer NOT NULL DEFAULT 0;
ALTER TABLE messages
  ADD CONSTRAINT messages_attachment_count_check CHECK (attachment_count >= 0);

INSERT INTO message_attachments (message_id, media_url, backfilled, created_at)
SELECT id, media_url, true, created_at
FROM messages
WHERE media_url IS NOT NULL
ORDER BY id;

UPDATE messages SET attachment_count = 1 WHERE media_url IS NOT NULL;
