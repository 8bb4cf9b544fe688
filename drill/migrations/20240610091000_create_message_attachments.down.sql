ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_attachment_count_check;
ALTER TABLE messages DROP COLUMN IF EXISTS attachment_count;
DROP TABLE IF EXISTS message_attachments;
