DROP TRIGGER IF EXISTS work_orders_photo_guard ON work_orders;
DROP FUNCTION IF EXISTS work_orders_photo_guard();
