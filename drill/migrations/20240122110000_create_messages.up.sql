-- v1: the chat thread of a work order; media_url is the one photo or file a
-- message may carry (the API returns it as mediaUrl)
CREATE TABLE messages (
  id            bigserial PRIMARY KEY,
  work_order_id bigint NOT NULL REFERENCES work_orders (id) ON DELETE CASCADE,
  author_id     bigint REFERENCES users (id) ON DELETE SET NULL,
  body          text NOT NULL,
  media_url     text,
  created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX messages_work_order_id_idx ON messages (work_order_id);
