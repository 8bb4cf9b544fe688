ALTER TABLE work_orders DROP CONSTRAINT IF EXISTS work_orders_photo_status_check;
ALTER TABLE work_orders
  DROP COLUMN IF EXISTS photo_first,
  DROP COLUMN IF EXISTS photo_status,
  DROP COLUMN IF EXISTS photo_taken_at,
  DROP COLUMN IF EXISTS photo_url;
