-- v2: the photo fields of a work order may only change while the photo_first
-- feature flag is on.  Turning the flag off (feature_flags) freezes them: an
-- UPDATE that changes photo_url, photo_taken_at or photo_status raises
-- SQLSTATE P0001.
CREATE FUNCTION work_orders_photo_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF (NEW.photo_url IS DISTINCT FROM OLD.photo_url
      OR NEW.photo_taken_at IS DISTINCT FROM OLD.photo_taken_at
      OR NEW.photo_status IS DISTINCT FROM OLD.photo_status)
     AND NOT COALESCE((SELECT enabled FROM feature_flags WHERE name = 'photo_first'), false)
  THEN
    RAISE EXCEPTION 'photo fields of work order % are read-only while feature photo_first is off', OLD.id
      USING ERRCODE = 'P0001', HINT = 'enable the photo_first feature flag first';
  END IF;
  RETURN NEW;
END
$$;

CREATE TRIGGER work_orders_photo_guard
  BEFORE UPDATE OF photo_url, photo_taken_at, photo_status ON work_orders
  FOR EACH ROW EXECUTE FUNCTION work_orders_photo_guard();
