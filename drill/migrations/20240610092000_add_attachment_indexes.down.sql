DROP INDEX IF EXISTS work_orders_photo_status_idx;
DROP INDEX IF EXISTS message_attachments_message_id_idx;
