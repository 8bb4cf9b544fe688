-- v2 (photo-first): a technician takes the photo before filling in the form
ALTER TABLE work_orders
  ADD COLUMN photo_url      text,
  ADD COLUMN photo_taken_at timestamptz,
  ADD COLUMN photo_status   text NOT NULL DEFAULT 'none',
  ADD COLUMN photo_first    boolean NOT NULL DEFAULT false;
ALTER TABLE work_orders
  ADD CONSTRAINT work_orders_photo_status_check
  CHECK (photo_status IN ('none', 'pending', 'uploaded', 'processed', 'failed'));
