-- v2: attachments are listed per message; the photo queue scans pending photos
CREATE INDEX message_attachments_message_id_idx ON message_attachments (message_id);
CREATE INDEX work_orders_photo_status_idx ON work_orders (photo_status)
  WHERE photo_status <> 'none';
